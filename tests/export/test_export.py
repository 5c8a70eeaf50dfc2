"""Export: fp32 parity with PyTorch, int4/int8 accuracy, a verified and atomic bundle."""

import json
import shutil

import numpy as np
import onnx
import pytest

from edgetune.bundle import MANIFEST, verify
from edgetune.errors import BundleError, ModelError, OutputExistsError
from edgetune.export import ExportConfig, export


def test_int4_bundle_report_and_manifest(int4_bundle):
    report = json.loads((int4_bundle / "report.json").read_text())
    parity = report["onnx_vs_torch"]  # ORT's int8 activations vs PyTorch on the same weights
    assert parity["greedy_tokens_equal"]
    assert parity["weights"] == "dequantized from the bundle"
    assert parity["max_rel_logit_diff"] <= 5e-2
    q = report["quant_vs_fp32"]
    assert q["top1_agreement"] >= 0.95
    assert abs(q["ppl_change"]) <= 0.05
    manifest = verify(int4_bundle)
    assert manifest["architecture"]["model_type"] == "phi3"
    files = set(manifest["files"])
    assert {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "genai_config.json",
        "report.json",
    } <= files
    assert manifest["tokenizer"]["chat_template"]


def test_fp32_bundle_matches_pytorch_to_float_rounding(fp32_bundle):
    parity = json.loads((fp32_bundle / "report.json").read_text())["onnx_vs_torch"]
    assert parity["weights"] == "checkpoint"
    assert parity["max_rel_logit_diff"] <= 1e-4, parity
    assert parity["greedy_tokens_equal"]


def test_int4_graph_uses_matmulnbits_with_int8_head(int4_bundle):
    model = onnx.load(str(int4_bundle / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nbits}
    assert len(nbits) == 4 * 4 + 1  # 4 projections x 4 layers + lm_head
    assert [b for name, b in bits.items() if "lm_head" in name] == [8]
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and "proj" in n.name]


def test_int4_weights_smaller_than_fp32(int4_bundle):
    report = json.loads((int4_bundle / "report.json").read_text())
    data = report["file_bytes"]["model.onnx.data"]
    # the tiny model's fp32 embedding table dominates; the projections themselves are 4-bit
    assert data <= 0.35 * report["fp32_weight_bytes"]


def test_verify_names_the_damaged_file(int4_bundle, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(int4_bundle, broken)
    data = bytearray((broken / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (broken / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx.data: damaged"):
        verify(broken)
    from edgetune.runtime import Model

    with pytest.raises(BundleError, match=r"model.onnx.data: damaged"):
        Model.load(broken)
    missing = tmp_path / "m"
    shutil.copytree(int4_bundle, missing)
    (missing / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: listed in edgetune.json but missing"):
        verify(missing)


def test_existing_output_refused_without_force(merged_model, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        export(merged_model, out, ExportConfig(quant="none"), log=lambda s: None)


def test_int8_and_fp32_exports(merged_model, int8_bundle, tmp_path):
    q = json.loads((int8_bundle / "report.json").read_text())["quant_vs_fp32"]
    assert q["top1_agreement"] >= 0.98 and abs(q["ppl_change"]) <= 0.02
    # --force replaces the bundle atomically; nothing temporary is left beside it
    shutil.copytree(int8_bundle, tmp_path / "int8")
    out = export(
        merged_model, tmp_path / "int8", ExportConfig(quant="none"), force=True, log=lambda s: None
    )
    assert json.loads((out / MANIFEST).read_text())["quantization"]["quant"] == "none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_bad_model_dirs_fail_clearly_and_leave_nothing(merged_model, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        export(tmp_path / "missing", tmp_path / "o1")
    partial = tmp_path / "partial"
    shutil.copytree(merged_model, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        export(partial, tmp_path / "o2")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(merged_model, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match="model.safetensors"):
        export(corrupt, tmp_path / "o3")
    cfg = json.loads((corrupt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (corrupt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="supported: llama, phi3, mistral, qwen2"):
        export(corrupt, tmp_path / "o4")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_onnx_decoder_matches_torch_with_kv_cache(merged_model, fp32_bundle):
    """The fp32 export, token by token through the KV cache, against PyTorch."""
    import torch

    from edgetune.models import load_model
    from edgetune.runtime.ort_backend import OrtDecoder

    dec = OrtDecoder(str(fp32_bundle / "model.onnx"))
    ids = [5, 17, 300, 42, 9, 1000, 7]
    logits, past = dec.forward(np.array([ids[:4]]))
    steps = [logits[0, -1]]
    for t in ids[4:]:
        logits, past = dec.forward(np.array([[t]]), past)
        steps.append(logits[0, -1])
    with torch.no_grad():
        ref = load_model(merged_model)(torch.tensor([ids])).logits[0, 3:].numpy()
    np.testing.assert_allclose(np.stack(steps), ref, rtol=1e-4, atol=1e-4)


def test_parity_line_says_what_differs(int4_bundle, fp32_bundle):
    """A quantized bundle's ONNX-vs-PyTorch line is ORT's int8 activations on the same
    weights (rel ~1e-2): the report says so; the fp32 bundle's line needs no such note."""
    from edgetune.export.report import format_report

    lines = {
        name: format_report(json.loads((b / "report.json").read_text())).splitlines()[1]
        for name, b in (("int4", int4_bundle), ("fp32", fp32_bundle))
    }
    assert lines["int4"].endswith("(same weights; ORT's int8 activations)")
    assert "ONNX vs PyTorch" in lines["fp32"] and "same weights" not in lines["fp32"]
