"""The per-tensor arithmetic of a merge, in fp32 numpy, as training and PEFT do it.

    w = source.array(name)                    # (out, in) fp32
    nf4_roundtrip(w)                          # qlora / qdora: the base training saw
    apply_update(w, update, adapter)          # + LoRA delta, or DoRA's rescaled sum

PEFT's merge (``peft/tuners/lora/layer.py`` ``Linear.get_delta_weight`` and
``variants.py`` ``DoraLinearVariant.merge_unsafe``) on an fp32 model is:

    delta = (B @ A) * scale                   # scale = alpha / r, or alpha / sqrt(r) (rslora)
    LoRA:  W' = W + delta
    DoRA:  W' = (m / ||W + delta||_row)[:, None] * (W + delta)   # m: lora_magnitude_vector

An embedding's LoRA stores A as (r, vocab) and B as (dim, r), so its delta is (B @ A).T.
Here the same is done a block of output rows at a time, in place in ``w``: each row's delta,
norm and rescaling depend on that row only, so the temporaries are one block, not a second
copy of the weight. No torch: the NF4 round trip is ``edgetune.kernels``' numpy/C kernels,
the very functions ``edgetune.train.nf4.nf4_roundtrip_weights`` applies to each layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import kernels

BLOCK_ELEMENTS = 1 << 20  # values of W per block of rows (4 MB fp32, 8 MB for DoRA's norm)


@dataclass(frozen=True)
class LoraUpdate:
    """What one adapted module adds to its base weight (adapter tensors named, read when
    applied, so a merge holds one module's A and B at a time)."""

    module: str  # e.g. model.layers.0.self_attn.qkv_proj
    a: str  # adapter tensor: lora_A.weight (r, in), or lora_embedding_A (r, vocab)
    b: str  # adapter tensor: lora_B.weight (out, r), or lora_embedding_B (dim, r)
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora
    magnitude: str | None = None  # DoRA's lora_magnitude_vector (out,); None for LoRA
    embedding: bool = False  # delta = (B @ A).T (PEFT's LoRA embedding layout)


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def nf4_roundtrip(w: np.ndarray) -> np.ndarray:
    """dequant(quant(w)) written back into ``w`` (fp32, C-contiguous): the weight an NF4
    base stands for, exactly as ``nf4_roundtrip_weights`` and ``NF4Linear`` compute it."""
    return kernels.nf4_dequantize(kernels.nf4_quantize(w), out=w)


def _rows(w: np.ndarray) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))


def apply_update(
    w: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    update: LoraUpdate,
    magnitude: np.ndarray | None = None,
) -> np.ndarray:
    """Merge one module's adapter into its base weight ``w`` (out, in) fp32, in place.

    ``a``/``b`` are the fp32 values of ``update.a``/``update.b``, ``magnitude`` of
    ``update.magnitude`` (DoRA). Returns ``w``."""
    s = np.float32(update.scale)
    step = _rows(w)
    for i in range(0, w.shape[0], step):
        rows = w[i : i + step]  # (rows, in), a view
        if update.embedding:  # (B @ A).T restricted to these rows = A[:, rows].T @ B.T
            delta = a[:, i : i + step].T @ b.T
        else:
            delta = b[i : i + step] @ a  # (rows, r) @ (r, in)
        delta *= s
        rows += delta
        if magnitude is not None:
            # PEFT: torch.linalg.norm(W + delta, dim=1) in fp32; accumulated in fp64 here
            # (the two agree to ~1e-7 relative), then m / norm in fp32 as PEFT divides
            norm = np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1)).astype(np.float32)
            rows *= (magnitude[i : i + step] / norm)[:, None]
    return w


def apply_bias(bias: np.ndarray, lora_b_bias: np.ndarray, scale: float) -> np.ndarray:
    """``lora_bias``: PEFT adds lora_B's bias times the scale to the base bias."""
    bias += lora_b_bias * np.float32(scale)
    return bias
