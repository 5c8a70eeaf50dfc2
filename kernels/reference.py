"""Readable numpy specification of every edgetune kernel.

This file is the spec: the Numba and Cython/C kernels are tested against it.
Nothing here is fast; everything here is meant to be read.

Formats (see DESIGN.md, "Quantized formats"):

* NF4 (QLoRA base weights): 16-value normal-float code book (bitsandbytes'
  values, index 7 is 0.0), blocks of 64 along the flattened weight, fp32 absmax
  per block; double quantization stores those absmax values as 8-bit codes of
  bitsandbytes' signed dynamic map, in blocks of 256, after subtracting their
  mean. Nibbles are packed low-first (element 2i in the low nibble).
* Q4 block (export, native runtime): ONNX Runtime ``MatMulNBits`` layout for a
  MatMul ``y = x @ B`` with ``B`` of shape (K, N): ``packed`` uint8
  (N, K/block, block/2), element k of a block in the low nibble when k is even;
  ``scales`` fp32 (N, K/block); optional ``zero_points`` uint8
  (N, ceil((K/block)/2)) packed low-first, default 8 (symmetric).
* Q8 activations: per-block symmetric int8, one fp32 scale per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# ---------------------------------------------------------------------------------------------
# NF4

#: bitsandbytes' NF4 code book (QLoRA, appendix E); index 7 is exactly 0.0.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_BLOCK = 64
ABSMAX_BLOCK = 256


def dynamic_map_signed() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic (tree) code, 256 sorted fp32 values.

    Used for double quantization of the NF4 absmax values. Seven exponent
    levels 10^-6 … 10^0, each split into 2^i linear fractions between 0.1 and
    1, both signs, plus 0 and 1.
    """
    values: list[float] = []
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += list(10.0 ** (-6 + i) * means)
        values += list(-(10.0 ** (-6 + i)) * means)
    values += [0.0, 1.0]
    assert len(values) == 256
    return np.sort(np.array(values, dtype=np.float32))


#: The same code exactly as bitsandbytes' ``create_dynamic_map(signed=True)`` returns it: its
#: float32 arithmetic rounds some entries one ulp away from :func:`dynamic_map_signed`, and
#: double quantization must pick bitsandbytes' codes, so the table is spelled out.
# fmt: off
DYNAMIC_MAP = np.array([
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938,
    -0.89453125, -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562,
    -0.79609376, -0.78203124, -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188,
    -0.6976563, -0.68359375, -0.6695312, -0.65546876, -0.6414063, -0.6273438, -0.61328125,
    -0.5992187, -0.58515626, -0.5710938, -0.5570313, -0.54296875, -0.5289062, -0.5148437,
    -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126, -0.43046874, -0.41640624,
    -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125, -0.31796873,
    -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375,
    -0.107031256, -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125,
    -0.08171876, -0.07890625, -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375,
    -0.06203125, -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251, -0.02546875,
    -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625, -0.00971875, -0.009156249,
    -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125, -0.0052187503,
    -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375,
    -0.0012812499, -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003,
    -0.00038125002, -0.00026875004, -0.00015625001, -8.875e-05, -6.625e-05, -4.375e-05,
    -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.0, 5.5000004e-07, 3.2500002e-06,
    7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001, 0.00026875004,
    0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501,
    0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
    0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375,
    0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125, 0.019843752, 0.02265625,
    0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752, 0.03953125, 0.042343747,
    0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625, 0.059218753, 0.06203125,
    0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876,
    0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874,
    0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626,
    0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375,
    0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437,
    0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438,
    0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437,
    0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374,
    0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375,
    0.9789063, 0.99296874, 1.0,
], dtype=np.float32)
# fmt: on
assert DYNAMIC_MAP.shape == (256,)


@dataclass(frozen=True)
class NF4Tensor:
    """An NF4-quantized tensor with double-quantized absmax (QLoRA's storage)."""

    packed: np.ndarray  # uint8 (ceil(n/2),): two codes a byte, low nibble first
    absmax_q: np.ndarray  # uint8 (nblocks,): index into DYNAMIC_MAP
    absmax_scale: np.ndarray  # float32 (ceil(nblocks/256),): absmax of each absmax block
    absmax_offset: float  # mean of the fp32 absmax values, subtracted before quantizing
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # not np.prod: ~10 us a call, and every GEMV checks it

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.absmax_q.nbytes + self.absmax_scale.nbytes + 4

    def __post_init__(self) -> None:
        nblocks = -(-self.numel // NF4_BLOCK)
        assert self.packed.shape == (-(-self.numel // 2),) and self.packed.dtype == np.uint8
        assert self.absmax_q.shape == (nblocks,) and self.absmax_q.dtype == np.uint8
        assert self.absmax_scale.shape == (-(-nblocks // ABSMAX_BLOCK),)


def nearest_code(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted code book for each value (ties go low)."""
    mid = (code[:-1] + code[1:]) / 2.0
    return np.searchsorted(mid, x, side="left").astype(np.uint8)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two a byte, element 2i in the low nibble."""
    codes = codes.astype(np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``n`` 4-bit codes."""
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


def blockwise_absmax(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad the flattened ``x`` to whole blocks; return (blocks, absmax per block)."""
    flat = x.astype(np.float32).reshape(-1)
    pad = (-flat.size) % block
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, block)
    return blocks, np.abs(blocks).max(axis=1)


def quantize_absmax(
    absmax: np.ndarray, offset: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Double quantization: (absmax - mean) as 8-bit dynamic codes in blocks of 256.

    The mean is the correctly rounded float32 mean; bitsandbytes takes torch's float32 mean,
    which can differ in the last bit (summation order). Pass ``offset`` to reproduce another
    implementation's codes exactly.
    """
    if offset is None:
        offset = float(np.float32(absmax.astype(np.float64).mean()))
    offset = float(np.float32(offset))
    blocks, scale = blockwise_absmax(absmax - np.float32(offset), ABSMAX_BLOCK)
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = nearest_code(blocks / safe[:, None], DYNAMIC_MAP).reshape(-1)[: absmax.size]
    return q, scale.astype(np.float32), offset


def dequantize_absmax(q: np.ndarray, scale: np.ndarray, offset: float) -> np.ndarray:
    """fp32 absmax per NF4 block from its double-quantized form."""
    per_value = np.repeat(scale, ABSMAX_BLOCK)[: q.size]
    return (DYNAMIC_MAP[q] * per_value + np.float32(offset)).astype(np.float32)


def nf4_quantize(w: np.ndarray, absmax_offset: float | None = None) -> NF4Tensor:
    """Quantize a float tensor to NF4 with double quantization (QLoRA); ``absmax_offset``
    as in :func:`quantize_absmax`."""
    blocks, absmax = blockwise_absmax(w, NF4_BLOCK)
    safe = np.where(absmax == 0, 1.0, absmax)
    codes = nearest_code(blocks / safe[:, None], NF4_CODE).reshape(-1)[: w.size]
    absmax_q, absmax_scale, offset = quantize_absmax(absmax, absmax_offset)
    return NF4Tensor(pack_nibbles(codes), absmax_q, absmax_scale, offset, tuple(w.shape))


def nf4_dequantize(t: NF4Tensor) -> np.ndarray:
    """fp32 tensor that an NF4 tensor stands for: code value × dequantized block absmax."""
    codes = unpack_nibbles(t.packed, t.numel)
    absmax = dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)
    values = NF4_CODE[codes] * absmax[np.arange(t.numel) // NF4_BLOCK]
    return values.astype(np.float32).reshape(t.shape)


def nf4_f32_gemv(x: np.ndarray, t: NF4Tensor) -> np.ndarray:
    """y = x @ W.T for an NF4 weight W of shape (N, K) (PyTorch Linear layout); x (M, K)."""
    return (x.astype(np.float32) @ nf4_dequantize(t).T).astype(np.float32)


#: NF4's code book as int8 (each value x 127, rounded): the integer datapath's weights.
#: |value| <= 127, so a u8 x s8 pair product sum (maddubs) cannot saturate int16, and the
#: sign follows the code index (0-6 negative, 7 zero, 8-15 positive).
NF4_CODE_I8 = np.round(NF4_CODE.astype(np.float64) * 127).astype(np.int8)


def nf4_q8_gemv(x: np.ndarray, t: NF4Tensor) -> np.ndarray:
    """Integer datapath y = x @ W.T for an NF4 weight W (N, K), K a multiple of 64: x
    quantized to Q8 per 64-element block (aligned with the NF4 blocks), int32 block sums of
    ``NF4_CODE_I8[code] * xq``, then x absmax x xs / 127. Against :func:`nf4_f32_gemv` it adds
    the code book's rounding (at most 0.5 / 127 of a block's absmax per weight) and the
    activations' Q8 rounding, as ONNX Runtime's ``accuracy_level=4`` does for int4."""
    n, k = t.shape
    m, nb = x.shape[0], k // NF4_BLOCK
    xq, xs = q8_quantize(x, NF4_BLOCK)
    codes = unpack_nibbles(t.packed, t.numel).reshape(n, nb, NF4_BLOCK)
    w8 = NF4_CODE_I8[codes].astype(np.int32)
    sums = np.einsum("mbk,nbk->mnb", xq.reshape(m, nb, NF4_BLOCK).astype(np.int32), w8)
    absmax = dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset).reshape(n, nb)
    scale = absmax[None, :, :] * (xs / np.float32(127.0))[:, None, :]
    return (sums.astype(np.float32) * scale).sum(axis=2, dtype=np.float32)


def bnb_nf4_to_edgetune(packed_bnb: np.ndarray) -> np.ndarray:
    """Convert bitsandbytes' packing (first element in the high nibble) to ours (low first)."""
    p = packed_bnb.astype(np.uint8)
    return ((p >> 4) | ((p & 0x0F) << 4)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Q4 block (ONNX Runtime MatMulNBits)

Q4_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Q4Weight:
    """A (K, N) MatMul weight in ONNX Runtime's MatMulNBits 4-bit layout."""

    packed: np.ndarray  # uint8 (N, K/block, block/2)
    scales: np.ndarray  # float32 (N, K/block)
    zero_points: np.ndarray | None  # uint8 (N, ceil((K/block)/2)), or None for symmetric (8)
    k: int
    n: int
    block: int

    def __post_init__(self) -> None:
        nb = self.k // self.block
        assert self.packed.shape == (self.n, nb, self.block // 2) and self.packed.dtype == np.uint8
        assert self.scales.shape == (self.n, nb) and self.scales.dtype == np.float32
        if self.zero_points is not None:
            assert self.zero_points.shape == (self.n, -(-nb // 2))

    @cached_property
    def zp_values(self) -> np.ndarray:
        """Zero point of every block, (N, K/block) uint8, C-contiguous (computed once)."""
        return np.ascontiguousarray(self.zero_point_values())

    def zero_point_values(self) -> np.ndarray:
        """Zero point of every block, (N, K/block) uint8."""
        nb = self.k // self.block
        if self.zero_points is None:
            return np.full((self.n, nb), 8, np.uint8)
        return np.stack([unpack_nibbles(row, nb) for row in self.zero_points])

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp


def weight_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """A (K, N) weight as fp32 blocks (N, K/block, block): the rows of MatMulNBits' layout."""
    k, n = w.shape
    return np.ascontiguousarray(np.asarray(w, np.float32).T).reshape(n, k // block, block)


def rtn_params(w: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest scales and zero points of a (K, N) weight, both (N, K/block) fp32:
    ``q4_quantize``'s choice (symmetric: zero point 8 and the signed scale that maps
    the largest-magnitude value to code 0), without packing anything (GPTQ asks per block)."""
    return _rtn(weight_blocks(w, block), symmetric)


def _rtn(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
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
    as ``q4_quantize`` rounds (times the reciprocal scale; a zero scale gives zp)."""
    inv = np.where(scales == 0, 0.0, 1.0 / np.where(scales == 0, 1.0, scales)).astype(scales.dtype)
    return np.clip(np.round(blocks * inv[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)


def q4_weight(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, block: int
) -> Q4Weight:
    """Pack codes (N, K) (or (N, nb, block)) with scales/zeros (N, K/block) into a Q4Weight;
    ``zeros`` None means symmetric (every zero point 8)."""
    n = codes.shape[0]
    q = codes.reshape(n, -1, block).astype(np.uint8)
    nb = q.shape[1]
    packed = np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4), dtype=np.uint8)
    zp = None
    if zeros is not None:
        zp = np.stack([pack_nibbles(row) for row in np.asarray(zeros).astype(np.uint8)])
    return Q4Weight(
        packed,
        np.ascontiguousarray(scales, dtype=np.float32).reshape(n, nb),
        zp,
        nb * block,
        n,
        block,
    )


def q4_quantize(b: np.ndarray, block: int = 32, symmetric: bool = True) -> Q4Weight:
    """Round-to-nearest 4-bit block quantization of a (K, N) MatMul weight.

    Symmetric follows ONNX Runtime's quantizer: the value of largest magnitude
    in a block maps to code 0 (scale = that value / -8), zero point 8.
    Asymmetric spans [min(x, 0), max(x, 0)] with 15 steps and a rounded zero point.
    RTN, HQQ and GPTQ (edgetune.export) differ only in how they choose codes, scales and
    zero points; all three end in ``q4_weight``.
    """
    k = b.shape[0]
    if block not in Q4_BLOCK_SIZES or k % block:
        raise ValueError(f"block must be one of {Q4_BLOCK_SIZES} and divide K={k}, got {block}")
    blocks = weight_blocks(b, block)  # one transposed copy, shared by the scales and codes
    scales, zeros = _rtn(blocks, symmetric)
    return q4_weight(codes_for(blocks, scales, zeros), scales, None if symmetric else zeros, block)


def q4_dequantize(w: Q4Weight) -> np.ndarray:
    """The (K, N) fp32 weight a Q4Weight stands for: (q - zero_point) × scale."""
    q = np.empty((w.n, w.k // w.block, w.block), np.float32)
    q[..., 0::2] = w.packed & 0x0F
    q[..., 1::2] = w.packed >> 4
    zp = w.zero_point_values().astype(np.float32)
    return ((q - zp[..., None]) * w.scales[..., None]).reshape(w.n, w.k).T.copy()


def q4_f32_gemm(x: np.ndarray, w: Q4Weight) -> np.ndarray:
    """y = x @ dequant(B) for activations x (M, K) in fp32."""
    return (x.astype(np.float32) @ q4_dequantize(w)).astype(np.float32)


def q8_quantize(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block symmetric int8 of activations (M, K): codes (M, K) int8, scales (M, K/block)."""
    m, k = x.shape
    blocks = x.astype(np.float32).reshape(m, k // block, block)
    scales = (np.abs(blocks).max(axis=2) / 127.0).astype(np.float32)
    inv = np.where(scales == 0, 0.0, 1.0 / np.where(scales == 0, 1.0, scales)).astype(np.float32)
    q = np.clip(np.round(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(m, k), scales


def q4_q8_gemm(x: np.ndarray, w: Q4Weight) -> np.ndarray:
    """Integer-datapath y = x @ B: int32 block sums of (q - zp) × xq, then × both scales."""
    xq, xs = q8_quantize(x, w.block)
    m = x.shape[0]
    nb = w.k // w.block
    q = np.empty((w.n, nb, w.block), np.int32)
    q[..., 0::2] = w.packed & 0x0F
    q[..., 1::2] = w.packed >> 4
    q -= w.zero_point_values().astype(np.int32)[..., None]
    xb = xq.reshape(m, nb, w.block).astype(np.int32)
    sums = np.einsum("mbk,nbk->mnb", xb, q)  # (M, N, nb) int32 block sums
    return (sums.astype(np.float32) * xs[:, None, :] * w.scales[None, :, :]).sum(axis=2)


def q4_0_to_q4(qs: np.ndarray, d: np.ndarray) -> Q4Weight:
    """Convert llama.cpp Q4_0 blocks of a (N, K) weight into MatMulNBits layout.

    Q4_0: 32 values a block, one fp16 scale ``d``, 16 bytes where byte j holds
    element j (low nibble) and element j+16 (high nibble); value = (q - 8) × d.
    ``qs`` is uint8 (N, K/32, 16) and ``d`` float16 (N, K/32).
    """
    lo = qs & 0x0F
    hi = qs >> 4
    q = np.concatenate([lo, hi], axis=2)  # (N, nb, 32) in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    n, nb, _ = qs.shape
    return Q4Weight(packed, d.astype(np.float32), None, nb * 32, n, 32)


def q8_weight_quantize(b: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """8-bit MatMulNBits layout of a (K, N) weight: codes uint8 (N, K/block, block) with the
    default zero point 128, scales fp32 (N, K/block); value = (q - 128) × scale."""
    k, n = b.shape
    blocks = np.ascontiguousarray(b.astype(np.float32).T).reshape(n, k // block, block)
    scales = (np.abs(blocks).max(axis=2) / 127.0).astype(np.float32)
    inv = np.where(scales == 0, 0.0, 1.0 / np.where(scales == 0, 1.0, scales)).astype(np.float32)
    q = (np.clip(np.round(blocks * inv[..., None]), -127, 127) + 128).astype(np.uint8)
    return q, scales


def q8_weight_dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The (K, N) fp32 weight of :func:`q8_weight_quantize`'s output."""
    n, nb, block = q.shape
    return ((q.astype(np.float32) - 128.0) * scales[..., None]).reshape(n, nb * block).T.copy()


def q8_f32_gemm(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """y = x @ dequant(B) for an 8-bit MatMulNBits weight (see :func:`q8_weight_quantize`)."""
    return (x.astype(np.float32) @ q8_weight_dequantize(codes, scales)).astype(np.float32)


# -- decoder ops of the native runtime (one token's worth of non-matmul work) ---------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, H) over its root mean square, times w (H,)."""
    var = np.einsum("th,th->t", x, x)[:, None] / np.float32(x.shape[-1])
    return (x * (1.0 / np.sqrt(var + np.float32(eps))) * w).astype(np.float32)


def swiglu(gu: np.ndarray) -> np.ndarray:
    """silu(gate) * up for gu (T, 2N) = [gate | up]."""
    g, u = np.split(gu, 2, axis=-1)
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g: silu(g) = -0
        return (g / (1.0 + np.exp(-g)) * u).astype(np.float32)


def rope_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half rotary embedding of the first ``len(cos)`` values of each row of x (..., d);
    cos / sin are cat(angles, angles)."""
    rot = cos.shape[-1]
    half = rot // 2
    r = x[..., :rot]
    rotated = np.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    return np.concatenate([r * cos + rotated * sin, x[..., rot:]], axis=-1).astype(np.float32)


def attention_decode(q, k, v, kc, vc, cos, sin, pos: int, first: int, scale: float) -> np.ndarray:
    """One new token at ``pos``: rotated k and v written into the caches kc / vc (n_kv, ctx, d)
    at ``pos``; softmax(scale * rot(q) . K[first:pos+1]) @ V per head (n_heads, d), head h
    reading kv head h // (n_heads // n_kv)."""
    kc[:, pos] = rope_rotate(k, cos, sin)
    vc[:, pos] = v
    group = q.shape[0] // k.shape[0]
    qr = rope_rotate(q, cos, sin)
    keys = np.repeat(kc[:, first : pos + 1], group, axis=0)
    vals = np.repeat(vc[:, first : pos + 1], group, axis=0)
    s = np.einsum("hd,hsd->hs", qr, keys) * np.float32(scale)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hs,hsd->hd", p, vals).astype(np.float32)
