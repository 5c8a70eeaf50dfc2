"""GGUF export: the file llama.cpp reads back, and what llama.cpp computes from it.

The consumer is llama.cpp itself (llama-cpp-python, built from its sdist by the project's
install): it loads the GGUF of a tiny model of each family, and its logits and greedy
tokens are compared with PyTorch's on the same merged model and with edgetune's runtime."""

from __future__ import annotations

import json
import os

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp_lib import (
    CTX,
    chat_ids,
    llama,
    llama_greedy,
    llama_logits,
    torch_logits_and_greedy,
)

from edgetune.errors import ConfigError, ModelError, OutputExistsError
from edgetune.export import modelfile
from edgetune.export.families import Dims
from edgetune.export.gguf import export_gguf, plan, stored
from edgetune.models import load_tokenizer, read_config
from edgetune.tensors import SafetensorsSource

PROMPTS = ["turn on the kitchen lights", "set the bedroom fan to 3 at 6am"]


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def peaked_family(family_model, tmp_path_factory):
    """Each family's tiny random model with weights scaled up, so next-token distributions
    are peaked (std 0.02 gives near-uniform logits whose argmax any rounding flips)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.models import copy_tokenizer

    made = {}

    def make(family, tied=False):
        key = (family, tied)
        if key not in made:
            src = family_model(family)
            m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            if tied:
                m.config.tie_word_embeddings = True
                m.lm_head.weight = m.model.embed_tokens.weight
            with torch.no_grad():
                for p in m.parameters():
                    if p.ndim == 2:
                        p.mul_(6.0)
            d = tmp_path_factory.mktemp(f"{family}-peaked{'-tied' if tied else ''}")
            m.save_pretrained(d)
            copy_tokenizer(src, d)
            made[key] = d
        return made[key]

    return make


def test_round_trip_through_gguf_reader(tiny_model, tmp_path):
    out = export_gguf(tiny_model, tmp_path / "tiny.gguf", "q4_0", log=_quiet)
    r = gguf.GGUFReader(out)
    cfg = read_config(tiny_model)
    d = Dims.of(cfg)
    src = SafetensorsSource(tiny_model)
    planned = {t.name: t for t in plan(src, cfg, d, "q4_0")}
    assert {t.name for t in r.tensors} == set(planned)
    for t in r.tensors:
        p = planned[t.name]
        assert t.tensor_type == p.qtype, t.name
        assert tuple(int(x) for x in reversed(t.shape)) == p.shape, t.name  # ggml order
        want = stored(p)
        assert np.array_equal(
            np.asarray(t.data).view(np.uint8).ravel(), want.view(np.uint8).ravel()
        ), t.name
    f = r.fields

    def val(key):
        field = f[key]
        return field.contents()

    assert val("general.architecture") == "phi3"
    assert val("phi3.block_count") == d.layers
    assert val("phi3.embedding_length") == d.hidden
    assert val("phi3.attention.head_count_kv") == d.kv_heads
    assert val("phi3.context_length") == cfg["max_position_embeddings"]
    assert val("tokenizer.ggml.model") == "gpt2"
    assert val("tokenizer.ggml.pre") == "gpt-2"
    assert len(val("tokenizer.ggml.tokens")) == d.vocab
    assert val("tokenizer.ggml.eos_token_id") == load_tokenizer(tiny_model).eos_token_id
    assert val("tokenizer.chat_template") == load_tokenizer(tiny_model).chat_template
    assert val("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K  # as llama-quantize
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("family", ["phi3", "llama", "mistral", "qwen2"])
def test_llama_cpp_matches_pytorch_per_family(family, peaked_family, tmp_path):
    model_dir = peaked_family(family)
    ids, prompt = chat_ids(model_dir, PROMPTS[0])
    stop = {5, 0}
    ref, greedy = torch_logits_and_greedy(model_dir, ids, 16, stop)
    f16 = export_gguf(model_dir, tmp_path / "m-f16.gguf", "f16", log=_quiet)
    llm = llama(f16)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
    got = llama_logits(f16, ids)
    assert np.abs(got - ref).max() <= 5e-3 * np.abs(ref).max()
    assert llama_greedy(f16, ids, 16, stop) == greedy
    q8 = export_gguf(model_dir, tmp_path / "m-q8.gguf", "q8_0", log=_quiet)
    got8 = llama_logits(q8, ids)
    assert (got8.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got8 - ref).max() <= 0.05 * np.abs(ref).max()


def test_tied_embedding_writes_no_output(peaked_family, tmp_path):
    model_dir = peaked_family("qwen2", tied=True)
    out = export_gguf(model_dir, tmp_path / "tied.gguf", "f16", log=_quiet)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    ids, _ = chat_ids(model_dir, PROMPTS[1])
    ref, greedy = torch_logits_and_greedy(model_dir, ids, 12, {5, 0})
    assert np.abs(llama_logits(out, ids) - ref).max() <= 5e-3 * np.abs(ref).max()
    assert llama_greedy(out, ids, 12, {5, 0}) == greedy


def test_fine_tuned_model_q8_0_gives_edgetune_runtime_tokens(merged_model, fp32_bundle, tmp_path):
    """The quickstart's merged fine-tune: llama.cpp on the q8_0 GGUF greedy-decodes the
    tokens edgetune's runtime decodes from the fp32 bundle; q4_k_m and q4_0 are reported."""
    from edgetune.runtime import Model, SamplingConfig

    m = Model.load(fp32_bundle, threads=1)
    q8 = export_gguf(merged_model, tmp_path / "ft-q8.gguf", "q8_0", log=_quiet)
    q4 = export_gguf(merged_model, tmp_path / "ft-q4.gguf", "q4_0", log=_quiet)
    q4k = export_gguf(merged_model, tmp_path / "ft-q4km.gguf", "q4_k_m", log=_quiet)
    stop = set(m.eos_ids)
    same4 = same4k = 0
    for text in PROMPTS:
        ids = m.encode(m.render_chat([{"role": "user", "content": text}]))
        ours = list(m.generate_ids(ids, SamplingConfig(max_new_tokens=24)))
        assert llama_greedy(q8, ids, 24, stop) == ours
        same4 += llama_greedy(q4, ids, 24, stop) == ours
        same4k += llama_greedy(q4k, ids, 24, stop) == ours
    print(f"greedy answers equal to fp32: q4_k_m {same4k}, q4_0 {same4} of {len(PROMPTS)}")


def test_modelfile_template_renders_the_chat_template(tiny_model, tmp_path):
    out = export_gguf(tiny_model, tmp_path / "tiny.gguf", "q8_0", log=_quiet)
    text = out.with_suffix(".Modelfile").read_text()
    assert "FROM ./tiny.gguf" in text
    assert 'PARAMETER stop "<|end|>"' in text
    tok = load_tokenizer(tiny_model)
    pieces = modelfile.template_pieces(tok)
    assert pieces is not None
    convo = modelfile.PROBE + [{"role": "assistant", "content": "Fan on. ünïcode"}]
    for gen in (True, False):
        assert modelfile.render(pieces, convo[:4], gen) == tok.apply_chat_template(
            convo[:4], tokenize=False, add_generation_prompt=gen
        )
    assert (
        'TEMPLATE """' in text
        and 'eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n{{ else if' in text
    )


def test_bad_input_writes_nothing(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="q4_k_s"):
        export_gguf(tiny_model, out, "q4_k_s", log=_quiet)
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="gpt2"):
        export_gguf(bad, out, "q8_0", log=_quiet)

    import edgetune.export.gguf as g

    calls = {"n": 0}
    real = g.encode  # a failure inside the fifth tensor's conversion

    def failing(x, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(x, qtype)

    monkeypatch.setattr(g, "encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_model, out, "q8_0", log=_quiet)
    assert list(tmp_path.glob("*m.gguf*")) == []  # neither the file nor its temporary
    monkeypatch.setattr(g, "encode", real)
    export_gguf(tiny_model, out, "q8_0", log=_quiet)
    with pytest.raises(OutputExistsError):
        export_gguf(tiny_model, out, "q8_0", log=_quiet)


def test_cli_export_gguf(tiny_model, tmp_path):
    from edgetune.cli import main

    out = tmp_path / "cli.gguf"
    assert (
        main(["export", str(tiny_model), "--format", "gguf", "--quant", "int8", "--out", str(out)])
        == 0
    )
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert out.with_suffix(".Modelfile").is_file()
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes it, not mkstemp's 0600


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_gguf_lora_in_llama_cpp_gives_the_merged_model(family, peaked_family, tmp_path):
    """A LoRA exported with export-adapter, applied by llama.cpp over the base's f16 GGUF,
    computes what the merged model's f16 GGUF computes (Phi-3: fused qkv; Llama: permuted
    q/k rows; rsLoRA's scale folded into B)."""
    from peft_adapters import random_adapter

    from edgetune.cli import main
    from edgetune.merge import merge

    base = peaked_family(family)
    adapter = random_adapter(base, tmp_path / "adapter", rank=4, use_rslora=family == "llama")
    merged = merge(base, adapter, tmp_path / "merged")
    lora = tmp_path / "lora.gguf"
    assert main(["export-adapter", str(adapter), "--base", str(base), "--out", str(lora)]) == 0
    r = gguf.GGUFReader(lora)
    assert r.fields["general.type"].contents() == "adapter"
    base_gguf = export_gguf(base, tmp_path / "base.gguf", "f16", log=_quiet)
    merged_gguf = export_gguf(merged, tmp_path / "merged.gguf", "f16", log=_quiet)
    ids, _ = chat_ids(base, PROMPTS[1])
    with_lora = llama_cpp.Llama(
        str(base_gguf),
        lora_path=str(lora),
        n_ctx=CTX,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )
    with_lora.eval(ids)
    got = np.array(with_lora.scores[: len(ids)], dtype=np.float32)
    want = llama_logits(merged_gguf, ids)
    plain = llama_logits(base_gguf, ids)
    assert np.abs(want - plain).max() > 0.1 * np.abs(want).max()  # the adapter matters
    assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()


def test_gguf_lora_refuses_dora(peaked_family, tmp_path):
    from peft_adapters import random_adapter

    from edgetune.export.gguf_lora import export_gguf_lora

    base = peaked_family("qwen2")
    adapter = random_adapter(base, tmp_path / "dora", method="dora", rank=4)
    with pytest.raises(ModelError, match="DoRA"):
        export_gguf_lora(adapter, base, tmp_path / "x.gguf", log=_quiet)
    assert not list(tmp_path.glob("*x.gguf*"))


def test_report_scores_the_gguf_beside_the_int4_bundle(
    merged_model, int4_bundle, task_data, tmp_path
):
    """llama.cpp on the q4_k_m GGUF of the quickstart model, scored against fp32 on the same
    held-out tokens as the int4 ONNX bundle's report: the two 4-bit files agree with fp32
    about equally often (measured: GGUF 97.6 %, ONNX 97.3 %)."""
    from edgetune.cli import main

    onnx = json.loads((int4_bundle / "report.json").read_text())["quant_vs_fp32"]
    out = tmp_path / "ft.gguf"
    args = ["export", str(merged_model), "--format", "gguf", "--quant", "q4_k_m"]
    assert main([*args, "--out", str(out), "--eval-data", str(task_data[1])]) == 0
    r = json.loads(out.with_suffix(".report.json").read_text())
    g = r["gguf_vs_fp32"]
    assert g["tokens"] == onnx["tokens"]  # the same texts under the same budget
    assert g["top1_agreement"] >= 0.95
    assert abs(g["top1_agreement"] - onnx["top1_agreement"]) <= 0.02
    assert abs(g["ppl_change"]) <= 0.05
    assert r["tensor_types"]["Q4_K"] >= 1 and r["file_bytes"] == out.stat().st_size


def test_report_without_llama_cpp_says_so(tiny_model, tmp_path, monkeypatch):
    """llama-cpp-python is optional: without it the GGUF is still written, and its report
    says why it holds no scores."""
    import edgetune.export.gguf_report as gr

    monkeypatch.setattr(gr, "_llama_cpp", lambda: None)
    lines: list[str] = []
    out = export_gguf(tiny_model, tmp_path / "m.gguf", "q4_0", log=lines.append, report=True)
    r = json.loads(out.with_suffix(".report.json").read_text())
    assert "llama-cpp-python is not installed" in r["skipped"] and "gguf_vs_fp32" not in r
    assert any("GGUF report skipped" in line for line in lines)
