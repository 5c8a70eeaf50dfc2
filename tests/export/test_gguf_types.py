"""Every ``--quant`` of the GGUF export is the file ``llama-quantize`` writes: edgetune's
q8_0 / q6_k / q5_k_m / q4_k_m / q4_0 GGUF of a model has, tensor by tensor, the types and
the bytes of llama.cpp's own quantization (``llama_model_quantize``, the library call
behind the ``llama-quantize`` tool) of edgetune's f32 GGUF of the same model — and
llama.cpp's logits from it stay close to PyTorch's.

The models are wide enough for the 256-element K blocks (hidden 256) and deep enough for
the _M mixtures' layer choice (8 layers); their FFN rows (320, or 304 for Llama) are not
whole K blocks, so the fallbacks to Q5_0 / Q5_1 / Q8_0 / F16 are covered too."""

from __future__ import annotations

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp_lib import chat_ids, llama_logits, torch_logits_and_greedy

from edgetune.export.config import GGUF_QUANTS
from edgetune.export.gguf import export_gguf
from edgetune.export.gguf_types import FILE_TYPES, tensor_types, use_more_bits

T = gguf.GGMLQuantizationType
QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def k_model(family_config, tiny_model, tmp_path_factory):
    """(family, FFN width, tied) -> a saved random model, weights doubled for peaked
    next-token distributions (8 random layers amplify any error: more than 2x and even
    Q8_0's rounding flips a quarter of the argmaxes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.models import copy_tokenizer

    made = {}

    def make(family, inter=320, tied=False):
        key = (family, inter, tied)
        if key not in made:
            c = family_config(family).to_dict()
            for derived in ("head_dim", "layer_types", "max_window_layers"):
                c.pop(derived, None)
            c.update(hidden_size=256, intermediate_size=inter, num_hidden_layers=8)
            c["tie_word_embeddings"] = tied
            if family == "phi3":
                half = 256 // 4 // 2
                c["rope_scaling"] = {
                    "type": "longrope",
                    "short_factor": [1.0] * half,
                    "long_factor": [1.0 + i / half for i in range(half)],
                }
            cfg = type(family_config(family))(**c)
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(cfg)
            with torch.no_grad():
                for p in m.parameters():
                    if p.ndim == 2:
                        p.mul_(2.0)
            d = tmp_path_factory.mktemp(f"{family}-k{inter}{'-tied' if tied else ''}")
            m.save_pretrained(d)
            copy_tokenizer(tiny_model, d)
            made[key] = d
        return made[key]

    return make


def llama_quantize(src, dst, quant: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPES[quant][0])
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize -> {rc}"


@pytest.mark.parametrize(
    "family, inter, tied", [("phi3", 320, False), ("llama", 304, False), ("qwen2", 320, True)]
)
def test_each_quant_is_the_file_llama_quantize_writes(family, inter, tied, k_model, tmp_path):
    model_dir = k_model(family, inter, tied)
    f32 = export_gguf(model_dir, tmp_path / "m-f32.gguf", "f32", log=_quiet)
    seen = set()
    for quant in QUANTS:
        ref_path = tmp_path / f"ref-{quant}.gguf"
        llama_quantize(f32, ref_path, quant)
        ours = gguf.GGUFReader(export_gguf(model_dir, tmp_path / f"m-{quant}.gguf", quant))
        ref = gguf.GGUFReader(ref_path)
        want = {t.name: t for t in ref.tensors}
        assert sorted(t.name for t in ours.tensors) == sorted(want)  # llama.cpp reorders
        for t in ours.tensors:
            r = want[t.name]
            assert t.tensor_type == r.tensor_type, (quant, t.name, t.tensor_type, r.tensor_type)
            assert np.array_equal(
                np.asarray(t.data).view(np.uint8), np.asarray(r.data).view(np.uint8)
            ), (quant, t.name)
            seen.add(T(t.tensor_type))
        ft = "general.file_type"
        assert ours.fields[ft].contents() == ref.fields[ft].contents() == FILE_TYPES[quant][0]
    assert {T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0} <= seen
    # FFN-down rows: 320 falls back to Q5_0 / Q5_1; 304 is not whole 32-blocks either: F16
    assert ({T.Q5_0, T.Q5_1} <= seen) if inter % 32 == 0 else (T.F16 in seen)


def test_error_in_llama_cpp_falls_with_the_bits(k_model, tmp_path):
    """llama.cpp's logits from each file against PyTorch's fp32: f32 equal to rounding, and
    the relative error ordered as the bits per weight are (q8_0 < q6_k < q5_k_m < q4_k_m <
    q4_0), the K mixture beating Q4_0 at about the same size. (On random weights top-1
    agreement says little below 8 bits; the fine-tuned model's tokens are in test_gguf.)"""
    model_dir = k_model("phi3")
    ids, _ = chat_ids(model_dir, "set the bedroom fan to 3 at 6am and dim the kitchen")
    ref, _ = torch_logits_and_greedy(model_dir, ids, 1, {5})
    err, top1 = {}, {}
    for quant in ("f32", *QUANTS):
        got = llama_logits(export_gguf(model_dir, tmp_path / f"{quant}.gguf", quant), ids)
        err[quant] = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))
        top1[quant] = float((got.argmax(1) == ref.argmax(1)).mean())
    print({q: (round(err[q], 4), round(top1[q], 3)) for q in err})
    assert err["f32"] < 2e-3 and top1["f32"] == 1.0
    order = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
    assert [err[q] for q in order] == sorted(err[q] for q in order), err
    assert top1["q8_0"] >= 0.9, top1


def test_mixture_rules():
    """The layer choice and the fallbacks, on names alone (32 layers, as Phi-3-mini)."""
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    names = [("token_embd.weight", (32064, 3072)), ("output_norm.weight", (3072,))]
    for i in range(32):
        names += [
            (f"blk.{i}.attn_qkv.weight", (9216, 3072)),
            (f"blk.{i}.ffn_down.weight", (3072, 8192)),
            (f"blk.{i}.ffn_up.weight", (16384, 3072)),
        ]
    names.append(("output.weight", (32064, 3072)))
    types = dict(zip([n for n, _ in names], tensor_types(names, "q4_k_m", 32), strict=True))
    assert types["token_embd.weight"] == T.Q4_K and types["output.weight"] == T.Q6_K
    assert types["output_norm.weight"] == T.F32
    for i in range(32):
        want = T.Q6_K if i in more else T.Q4_K
        assert types[f"blk.{i}.attn_qkv.weight"] == types[f"blk.{i}.ffn_down.weight"] == want
        assert types[f"blk.{i}.ffn_up.weight"] == T.Q4_K
    assert set(GGUF_QUANTS) == set(FILE_TYPES)
