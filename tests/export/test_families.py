"""Export works for every supported family: tiny random-weight Llama, Mistral, Qwen2 and
Phi-3 (with long-context rope scaling) models; fp32 ONNX matches PyTorch."""

import json

import pytest
import torch

from edgetune.export import ExportConfig, export
from edgetune.models import copy_tokenizer


@pytest.mark.parametrize("quant,bound", [("none", 1e-4), ("int4", 5e-2)])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_family_exports_with_parity(family, quant, bound, family_model, tmp_path):
    """ONNX Runtime on the bundle against PyTorch on the same weights: fp32 to float
    rounding; int4 within ORT's int8-activation error (accuracy_level 4)."""
    src = family_model(family)
    out = export(
        src, tmp_path / "b", ExportConfig(quant=quant, report_tokens=16), log=lambda s: None
    )
    report = json.loads((out / "report.json").read_text())
    parity = report["onnx_vs_torch"]
    assert parity["max_rel_logit_diff"] <= bound, parity
    assert parity["greedy_tokens_equal"]
    manifest = json.loads((out / "edgetune.json").read_text())
    assert manifest["architecture"]["model_type"] == family


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_native_backend_matches_ort(family, family_model, tmp_path):
    """Same architecture maths as the exported graph: fp32 bundles agree to float rounding and
    decode the same greedy tokens; int4 bundles agree within the int8-activation error."""
    import numpy as np

    from edgetune.runtime import Model, SamplingConfig

    src = family_model(family)
    ids = [3, 17, 200, 45, 9, 1000, 12, 7]
    for quant, bound in (("none", 1e-4), ("int4", 5e-2)):
        out = export(
            src, tmp_path / quant, ExportConfig(quant=quant, report_tokens=4), log=lambda s: None
        )
        ort_m, nat_m = Model.load(out, backend="ort"), Model.load(out, backend="native")
        lo, _ = ort_m.decoder.forward(np.array([ids]))
        ln, _ = nat_m.decoder.forward(np.array([ids]))
        assert np.abs(lo - ln).max() <= bound * np.abs(lo).max(), (quant, np.abs(lo - ln).max())
        if quant == "none":
            cfg = SamplingConfig(max_new_tokens=12)
            assert list(ort_m.generate_ids(ids, cfg)) == list(nat_m.generate_ids(ids, cfg))


def test_int4_weights_at_most_02x_fp32_for_weight_dominated_model(tmp_path, tiny_model):
    """Projections dominate (small vocabulary, wide MLP): int4 bundle weights <= 0.2x fp32."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=3072,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=5,
        pad_token_id=1,
    )
    src = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model / name, src / name)
    out = export(
        src, tmp_path / "b", ExportConfig(quant="int4", report_tokens=4), log=lambda s: None
    )
    report = json.loads((out / "report.json").read_text())
    assert report["file_bytes"]["model.onnx.data"] <= 0.2 * report["fp32_weight_bytes"]


@pytest.mark.parametrize("family", ["phi3", "mistral"])
def test_native_long_context_and_sliding_window_match_pytorch(
    family, tmp_path, tiny_model, family_config
):
    """Past Phi-3's original context the native backend switches to longrope's long factors,
    and Mistral's sliding window limits what each position sees, in the batched prompt pass
    and in one-token decoding alike: logits as PyTorch's on an fp32 bundle."""

    import numpy as np
    from transformers import AutoModelForCausalLM

    from edgetune.runtime.native import NativeDecoder

    cfg = family_config(family)
    if family == "phi3":
        cfg.original_max_position_embeddings = 16  # a 24-token prompt is past it
    else:
        cfg.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    copy_tokenizer(tiny_model, src)
    out = export(
        src, tmp_path / "b", ExportConfig(quant="none", report_tokens=4), log=lambda s: None
    )
    from edgetune.bundle import read_manifest

    dec = NativeDecoder(out, read_manifest(out))
    ids = np.random.default_rng(0).integers(6, 2000, 24)
    with torch.no_grad():
        want = model(torch.tensor(ids[None])).logits[0].numpy()
    full, _ = dec.forward(ids[None])  # one batched pass
    _, cache = dec.forward(ids[None, :20])
    steps = [dec.forward(ids[None, t : t + 1], cache)[0][0, -1] for t in range(20, 24)]
    scale = np.abs(want).max()
    assert np.abs(full[0] - want).max() <= 1e-4 * scale
    assert np.abs(np.stack(steps) - want[20:]).max() <= 1e-4 * scale
