"""llama.cpp's 32-element GGUF block formats Q8_0, Q4_0, Q5_0 and Q5_1: the numpy spec
edgetune writes GGUF with (the 256-element K formats are in ``ggml_kquants``).

Bit-identical to ggml's reference quantizers (``quantize_row_q8_0_ref``,
``quantize_row_q4_0_ref`` and the Q5 ones, which ``llama-quantize`` and ``convert_hf_to_gguf.py`` use when no
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
Q5_0 32       fp16 d; u32 qh (bit j: element j's 5th bit);     22
              u8 qs[16] as Q4_0; value = (q - 16) × d
Q5_1 32       fp16 d; fp16 m; u32 qh; u8 qs[16];               24
              value = q × d + m
==== ======== ================================================ =====

The arithmetic is float32 throughout, in the C code's order: ``d`` is computed in fp32 and
its reciprocal (not the fp16-rounded ``d``) scales the values; Q8_0 rounds half away from
zero (``roundf``), Q4_0 truncates ``x/d + 8.5`` toward zero and clamps at 15. Q4_0's ``d``
is the block's signed extreme divided by -8, taking the first element of largest magnitude
(Q5_0: by -16, truncating ``x/d + 16.5`` and clamping at 31). Q5_1 is asymmetric:
``d = (max - min)/31``, ``m = min``, ``q = trunc((x - min)/d + 0.5)``.

"The C code's order" holds for builds that do not contract ``a*b + c`` into one fused
multiply-add: x86-64 builds without ``-mfma`` in the quantizer (ggml-base is built that
way); an aarch64 compiler contracts by default, so an ARM llama.cpp can differ in the last
bit of a few codes.
"""

from __future__ import annotations

import numpy as np

QK = 32  # elements per Q8_0 / Q4_0 / Q5_0 / Q5_1 block
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q5_0": 6 + QK // 2, "Q5_1": 8 + QK // 2}


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


def _high_bits(q: np.ndarray) -> np.ndarray:
    """5-bit codes (…, 32) -> (…, 4) bytes: the little-endian u32 whose bit j is code j's
    bit 4."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(QK, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32)[..., None].astype("<u4").view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes (…, 32) -> (…, 16) bytes: element j low, element j+16 high."""
    return (q[..., : QK // 2] & 0x0F) | ((q[..., QK // 2 :] & 0x0F) << 4)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """(rows, K) float -> (rows, K/32·22) uint8: Q5_0 blocks, row after row."""
    b = _blocks(x)
    first = np.abs(b).argmax(axis=-1)[..., None]
    d = (np.take_along_axis(b, first, axis=-1)[..., 0] / np.float32(-16)).astype(np.float32)
    v = (b * _inverse(d)[..., None] + np.float32(16.5)).astype(np.float32)
    q = np.minimum(np.trunc(v), 31).astype(np.uint8)
    return _pack(d, np.concatenate([_high_bits(q), _nibbles(q)], axis=-1))


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """(rows, K) float -> (rows, K/32·24) uint8: Q5_1 blocks, row after row."""
    b = _blocks(x)
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    d = ((hi - lo) / np.float32(31)).astype(np.float32)
    v = ((b - lo[..., None]) * _inverse(d)[..., None] + np.float32(0.5)).astype(np.float32)
    q = np.trunc(v).astype(np.uint8)
    m = lo.astype("<f2")[..., None].view(np.uint8)
    return _pack(d, np.concatenate([m, _high_bits(q), _nibbles(q)], axis=-1))


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


QUANTIZE = {
    "Q8_0": quantize_q8_0,
    "Q4_0": quantize_q4_0,
    "Q5_0": quantize_q5_0,
    "Q5_1": quantize_q5_1,
}
DEQUANTIZE = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0}
