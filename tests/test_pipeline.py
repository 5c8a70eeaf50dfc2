"""End to end: the quickstart's table meets the bars users are promised."""

import json

from edgetune.bundle import MANIFEST, sha256_file


def test_quickstart_table_meets_the_bars(quickstart_run):
    rows, out = quickstart_run
    by = {r.stage.split(" ")[0]: r.result for r in rows}
    base, tuned, merged = by["base"], by["fine-tuned"], by["merged"]
    onnx_fp32, int4 = by["ONNX"], by["int4"]
    assert tuned.exact_match >= base.exact_match + 0.50
    assert abs(merged.exact_match - tuned.exact_match) <= 0.02
    assert abs(onnx_fp32.exact_match - merged.exact_match) <= 0.02
    assert int4.exact_match >= merged.exact_match - 0.03
    assert int4.decode_tokens_per_s > 0


def test_quickstart_files(quickstart_run):
    _, out = quickstart_run
    for rel in ("data/train.jsonl", "data/heldout.jsonl", "run/adapter/adapter_model.safetensors",
                "run/metrics.jsonl", "run/loss.png", "run/config.yaml", "merged/model.safetensors",
                "bundle/edgetune.json", "bundle/model.onnx", "bundle/report.json"):
        assert (out / rel).is_file(), rel
    manifest = json.loads((out / "bundle" / MANIFEST).read_text())
    on_disk = sorted(p.name for p in (out / "bundle").iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert sha256_file(out / "bundle" / name) == entry["sha256"]
