"""4-bit codes <-> ``Q4Weight``: the MatMulNBits layout that HQQ and GPTQ write into.

RTN, HQQ and GPTQ differ only in how they choose codes, scales and zero points;
all three end in the one layout ``edgetune.kernels.Q4Weight`` describes (packed
uint8 (N, K/block, block/2) low nibble first, fp32 scales (N, K/block), 4-bit
zero points packed two a byte when asymmetric), so ONNX Runtime,
onnxruntime-genai and the native runtime read them unchanged.
"""

from __future__ import annotations

import numpy as np

from ..kernels import Q4Weight
from ..kernels.reference import pack_nibbles


def rtn_params(w: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest scales and zero points of a (K, N) weight, both (N, K/block) fp32:
    ``kernels.q4_quantize``'s choice (symmetric: zero point 8 and the signed scale that maps
    the largest-magnitude value to code 0), without packing anything (GPTQ asks per block)."""
    k, n = w.shape
    blocks = np.ascontiguousarray(np.asarray(w, np.float32).T).reshape(n, k // block, block)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        scales = (np.take_along_axis(blocks, idx, axis=2)[..., 0] / -8.0).astype(np.float32)
        return scales, np.full(scales.shape, 8.0, np.float32)
    vmin = np.minimum(blocks.min(axis=2), 0.0)
    scales = ((np.maximum(blocks.max(axis=2), 0.0) - vmin) / 15.0).astype(np.float32)
    zeros = np.clip(np.round(-vmin / np.where(scales == 0, 1.0, scales)), 0, 15)
    return scales, zeros.astype(np.float32)


def codes_for(blocks: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """4-bit codes of ``blocks`` (N, nb, block) for per-block scales/zeros (N, nb), rounded
    as ``kernels.q4_quantize`` rounds (times the reciprocal scale; a zero scale gives zp)."""
    inv = np.where(scales == 0, 0.0, 1.0 / np.where(scales == 0, 1.0, scales)).astype(scales.dtype)
    return np.clip(np.round(blocks * inv[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)


def q4_weight(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
              block: int) -> Q4Weight:
    """Pack codes (N, K) (or (N, nb, block)) with scales/zeros (N, K/block) into a Q4Weight;
    ``zeros`` None means symmetric (every zero point 8)."""
    n = codes.shape[0]
    q = codes.reshape(n, -1, block).astype(np.uint8)
    nb = q.shape[1]
    packed = np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4), dtype=np.uint8)
    zp = None
    if zeros is not None:
        zp = np.stack([pack_nibbles(row) for row in np.asarray(zeros).astype(np.uint8)])
    return Q4Weight(packed, np.ascontiguousarray(scales, dtype=np.float32).reshape(n, nb), zp,
                    nb * block, n, block)
