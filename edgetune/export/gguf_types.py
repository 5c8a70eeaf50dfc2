"""Which ggml type each GGUF tensor is stored in for ``--quant``: llama.cpp's ``llama-quantize``
rules (``llama_tensor_get_type`` in ``src/llama-quant.cpp``), for the dense families
edgetune exports, so that ``export --format gguf --quant q4_k_m`` writes the file
``llama-quantize model-f32.gguf out.gguf Q4_K_M`` would (``tests/export/test_gguf_types.py``
compares the two byte for byte).

The rules, per file type (default type in parentheses):

- every 1-D tensor (norms, biases, rope factors) stays F32;
- f32 / f16 / bf16: every 2-D weight in that type;
- the output (LM head), or with tied embeddings the token embedding: Q6_K, unless the file
  type is q8_0 (Q8_0 stays) — so q4_0 files carry a Q6_K head, as llama-quantize's do;
- q4_k_m (Q4_K) and q5_k_m (Q5_K): the attention V projection — for Phi-3 the fused QKV,
  which llama.cpp counts as V — and the FFN down projection get Q6_K in the layers
  ``use_more_bits`` picks: the first and last eighth and every third layer between;
- a row length the type's block does not divide falls back: Q4_K → Q5_0, Q5_K → Q5_1,
  Q6_K → Q8_0, and to F16 when 32 does not divide it either.
"""

from __future__ import annotations

from collections.abc import Sequence

import gguf

T = gguf.GGMLQuantizationType
FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, T.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, T.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, T.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "q6_k": (gguf.LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    "q5_k_m": (gguf.LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "q4_k_m": (gguf.LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
FLOAT = (T.F32, T.F16, T.BF16)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of layers that get more bits in the _M mixtures."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _block(t: gguf.GGMLQuantizationType) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def fallback(t: gguf.GGMLQuantizationType, row: int) -> gguf.GGMLQuantizationType:
    """``t``, or what llama-quantize stores instead when ``row`` is not whole blocks of it."""
    if row % _block(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if row % _block(t) == 0 else T.F16


def tensor_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]], quant: str, n_layers: int
) -> list[gguf.GGMLQuantizationType]:
    """The stored type of each (GGUF name, numpy shape) in file order, for file type
    ``quant`` (a key of FILE_TYPES). The order matters as in llama-quantize: the V and
    down-projection counters advance tensor by tensor."""
    default = FILE_TYPES[quant][1]
    names = [name for name, _ in tensors]
    tied = "output.weight" not in names
    n_attn_v = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n)
    i_attn_v = i_ffn_down = 0
    out = []
    for name, shape in tensors:
        if len(shape) < 2:
            out.append(T.F32)
            continue
        t = default
        if default in FLOAT:
            out.append(t)
            continue
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if shape[-1] % _block(t):
                t = T.Q8_0
            elif t != T.Q8_0:
                t = T.Q6_K
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:
            if quant in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
                t = T.Q6_K
            i_attn_v += 1
        elif "ffn_down" in name:
            if quant in ("q4_k_m", "q5_k_m") and use_more_bits(i_ffn_down, n_layers):
                t = T.Q6_K
            i_ffn_down += 1
        out.append(fallback(t, shape[-1]))
    return out
