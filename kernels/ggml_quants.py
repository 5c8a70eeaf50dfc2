"""llama.cpp's GGUF block formats Q8_0 and Q4_0: the numpy spec edgetune writes GGUF with.

Bit-identical to ggml's reference quantizers (``quantize_row_q8_0_ref`` /
``quantize_row_q4_0_ref``, which ``llama-quantize`` and ``convert_hf_to_gguf.py`` use when no
importance matrix is given), so a GGUF edgetune writes holds the bytes llama.cpp would have
written from the same fp32 weights (``tests/kernels/test_ggml_quants.py`` checks this
against the ``gguf`` package's own quantizers and against llama.cpp's C library).

==== ======== ================================================ =====
type elements block layout (little-endian)                     bytes
==== ======== ================================================ =====
Q8_0 32       fp16 d; int8 q[32]; value = q × d                 34
Q4_0 32       fp16 d; u8 qs[16]: element j in the low nibble    18
              of byte j, element j+16 in the high nibble;
              value = (q - 8) × d
==== ======== ================================================ =====

The arithmetic is float32 throughout, in the C code's order: ``d`` is computed in fp32 and
its reciprocal (not the fp16-rounded ``d``) scales the values; Q8_0 rounds half away from
zero (``roundf``), Q4_0 truncates ``x/d + 8.5`` toward zero and clamps at 15. Q4_0's ``d``
is the block's signed extreme divided by -8, taking the first element of largest magnitude.
"""

from __future__ import annotations

import numpy as np

QK = 32  # elements per Q8_0 / Q4_0 block
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2}


def _blocks(x: np.ndarray) -> np.ndarray:
    """(rows, K) fp32 -> (rows, K/32, 32); K must be a multiple of 32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"a row of {x.shape[-1]} values is not a whole number of {QK}-blocks")
    return x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _pack(d: np.ndarray, payload: np.ndarray) -> np.ndarray:
    """fp16 scales (…, nb) and payload bytes (…, nb, P) -> (…, nb·(2+P)) uint8 rows."""
    out = np.concatenate([d.astype("<f2")[..., None].view(np.uint8), payload], axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.rint would round them to even)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0).astype(np.float32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """(rows, K) float -> (rows, K/32·34) uint8: Q8_0 blocks, row after row."""
    b = _blocks(x)
    d = (np.abs(b).max(axis=-1) / np.float32(127)).astype(np.float32)
    q = _roundf(b * _inverse(d)[..., None]).astype(np.int8)
    return _pack(d, q.view(np.uint8))


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """(rows, K) float -> (rows, K/32·18) uint8: Q4_0 blocks, row after row."""
    b = _blocks(x)
    first = np.abs(b).argmax(axis=-1)[..., None]  # the first element of largest magnitude
    d = (np.take_along_axis(b, first, axis=-1)[..., 0] / np.float32(-8)).astype(np.float32)
    v = (b * _inverse(d)[..., None] + np.float32(8.5)).astype(np.float32)
    q = np.minimum(np.trunc(v), 15).astype(np.uint8)  # v >= 0.5, so truncation is C's cast
    qs = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return _pack(d, qs)


def dequantize_q8_0(raw: np.ndarray, k: int) -> np.ndarray:
    """(rows, K/32·34) uint8 -> (rows, K) fp32."""
    b = raw.reshape(*raw.shape[:-1], k // QK, BLOCK_BYTES["Q8_0"])
    d = b[..., :2].copy().view("<f2").astype(np.float32)
    q = b[..., 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(*raw.shape[:-1], k)


def dequantize_q4_0(raw: np.ndarray, k: int) -> np.ndarray:
    """(rows, K/32·18) uint8 -> (rows, K) fp32."""
    b = raw.reshape(*raw.shape[:-1], k // QK, BLOCK_BYTES["Q4_0"])
    d = b[..., :2].copy().view("<f2").astype(np.float32)
    qs = b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8
    return (q * d).reshape(*raw.shape[:-1], k)


QUANTIZE = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0}
DEQUANTIZE = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0}
