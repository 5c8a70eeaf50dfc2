"""End to end: the quickstart's table meets the bars users are promised, and every stage's
files load in the tool that reads them next."""

import json

import torch

from edgetune.bundle import MANIFEST, sha256_file, verify


def test_quickstart_table_meets_the_bars(quickstart_run):
    rows, out = quickstart_run
    by = {r.stage.split(" ")[0]: r for r in rows}
    base, tuned, merged = by["base"].result, by["fine-tuned"].result, by["merged"].result
    onnx_fp32, int4 = by["ONNX"].result, by["int4"].result
    # measured (README): exact match 0 / 63 / 63 / 63 / 64 %, perplexity 101.6 -> 1.076
    assert tuned.exact_match >= base.exact_match + 0.50
    assert tuned.perplexity <= 0.05 * base.perplexity
    assert abs(merged.exact_match - tuned.exact_match) <= 0.02
    assert abs(merged.perplexity - tuned.perplexity) <= 0.01 * tuned.perplexity
    assert abs(onnx_fp32.exact_match - merged.exact_match) <= 0.02
    assert abs(onnx_fp32.perplexity - merged.perplexity) <= 1e-3 * merged.perplexity
    assert int4.exact_match >= merged.exact_match - 0.03
    assert int4.perplexity <= 1.05 * merged.perplexity
    # measured 4.76 MB against 15.55 MB: the fp32 embedding table is most of what is left
    assert by["int4"].size_bytes <= 0.35 * by["ONNX"].size_bytes
    # measured 989 tok/s on 2 cores; a 20x margin for a loaded machine
    assert int4.decode_tokens_per_s >= 50
    assert {r.result.examples for r in rows} == {100}


def test_quickstart_prints_no_warning(quickstart_console):
    """A user's first command: its output is the five stages and the table, and no library
    says anything on stderr (no bitsandbytes, DeepSpeed or transformers warning)."""
    stdout, stderr = quickstart_console
    assert stderr.strip() == "", stderr
    assert [line[:5] for line in stdout.splitlines() if line.startswith("[")] == [
        f"[{i}/5]" for i in range(1, 6)
    ]
    assert not [
        line for line in stdout.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()
    ]


def test_quickstart_files_load_in_the_next_tool(quickstart_run, task_data, tiny_model):
    from transformers import AutoModelForCausalLM

    from edgetune.config import load_config
    from edgetune.merge import load_adapted
    from edgetune.train import TrainConfig

    _, out = quickstart_run
    # the data the tests use (task_data, generated without training) is the quickstart's
    assert (out / "data" / "train.jsonl").read_bytes() == task_data[0].read_bytes()
    assert (out / "data" / "heldout.jsonl").read_bytes() == task_data[1].read_bytes()

    run = out / "run"
    cfg = load_config(TrainConfig, run / "config.yaml")  # what `edgetune train --config` reads
    assert (cfg.method, cfg.max_steps, cfg.rank, cfg.batch_size) == ("qlora", 500, 16, 16)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 501))
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 10 and evals[-1] <= 0.3 * evals[0]  # measured 0.371 -> 0.071
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # merged = the adapter on the NF4 base it was trained on, and it loads in transformers
    x = torch.randint(6, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    adapted = load_adapted(tiny_model, run / "adapter").eval()
    with torch.no_grad():
        want = adapted(x).logits
        with adapted.disable_adapter():
            nf4_base = adapted(x).logits
        got = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()(x).logits
    assert float((got - want).norm() / want.norm()) <= 1e-3  # measured 1.6e-4 (fp32 order)
    assert float((nf4_base - want).norm() / want.norm()) > 0.05  # the adapter does something

    manifest = verify(out / "bundle")
    assert json.loads((out / "bundle" / MANIFEST).read_text()) == manifest
    on_disk = sorted(p.name for p in (out / "bundle").iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert sha256_file(out / "bundle" / name) == entry["sha256"]
