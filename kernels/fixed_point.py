"""Integer golden model of the decode datapath an FPGA runs (the spec for kernels/hls/).

Everything here is integer arithmetic with explicit widths, so a C++ ``ap_int``
implementation can match it bit for bit:

    int4 weight codes q (0..15), zero point zp (4-bit)       -> w = q - zp      (int5)
    int8 activation codes xq (-127..127)                     -> per block of B
    block sum   s = Σ (q - zp) · xq                           int32 (|s| < 2^19 for B ≤ 256)
    scales      ws_fx = round(ws · 2^WS_FRAC)                 int16, Q(WS_FRAC) per tensor
                xs_fx = round(xs · 2^XS_FRAC)                 int16, Q(XS_FRAC) per vector
    accumulate  acc += s · ws_fx · xs_fx                      int64
    output      y_fx = sat32((acc + 2^(sh-1)) >> sh),  sh = WS_FRAC + XS_FRAC - OUT_FRAC
                y ≈ y_fx / 2^OUT_FRAC                         int32, Q(OUT_FRAC) = Q15.16

The fractional bits of each scale are chosen per tensor / per vector so the largest
scale uses 15 bits of magnitude (block floating point); they travel with the data.
NF4 dequantization uses an int8 code book (round(127 · code)) times a Q(f) int16
absmax, giving int32 weights whose real value is w / (127 · 2^f).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .reference import NF4_CODE, Q4Weight, pack_nibbles, q8_quantize

OUT_FRAC = 16
SCALE_BITS = 15  # magnitude bits of an int16 scale
NF4_CODE_I8 = np.round(NF4_CODE * 127).astype(np.int8)


def frac_bits_for(values: np.ndarray, bits: int = SCALE_BITS) -> int:
    """Most fractional bits that keep max|values| · 2^f below 2^bits (at most 30)."""
    peak = float(np.abs(values).max())
    if peak == 0:
        return 30
    return int(min(30, np.floor(np.log2((2**bits - 1) / peak))))


def to_fixed(values: np.ndarray, frac: int) -> np.ndarray:
    """Round half away from zero to Q(frac), as int16 (values must fit)."""
    scaled = np.asarray(values, np.float64) * 2.0**frac
    out = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    assert np.abs(out).max(initial=0) < 2**15, "scale does not fit int16"
    return out.astype(np.int16)


@dataclass(frozen=True)
class FixedQ4Layer:
    """A Q4 weight with fixed-point scales: what the FPGA stores for one projection."""

    codes: np.ndarray  # uint8 (N, K) codes 0..15, element order (unpacked)
    zero_points: np.ndarray  # uint8 (N, K/block)
    ws_fx: np.ndarray  # int16 (N, K/block), Q(ws_frac)
    ws_frac: int
    block: int

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def packed(self) -> np.ndarray:
        """The codes as MatMulNBits bytes, (N, K/2), element 2j in the low nibble."""
        return pack_nibbles(self.codes).reshape(self.n, self.k // 2)


def fixed_layer(w: Q4Weight) -> FixedQ4Layer:
    codes = np.empty((w.n, w.k // w.block, w.block), np.uint8)
    codes[..., 0::2] = w.packed & 0x0F
    codes[..., 1::2] = w.packed >> 4
    frac = frac_bits_for(w.scales)
    return FixedQ4Layer(
        codes.reshape(w.n, w.k), w.zp_values.copy(), to_fixed(w.scales, frac), frac, w.block
    )


@dataclass(frozen=True)
class FixedActivation:
    """An activation vector as the FPGA receives it: int8 codes and Q(xs_frac) block scales."""

    xq: np.ndarray  # int8 (K,)
    xs_fx: np.ndarray  # int16 (K/block,)
    xs_frac: int


def fixed_activation(x: np.ndarray, block: int) -> FixedActivation:
    xq, xs = q8_quantize(x.reshape(1, -1).astype(np.float32), block)
    frac = frac_bits_for(xs)
    return FixedActivation(xq[0], to_fixed(xs[0], frac), frac)


def block_sums(layer: FixedQ4Layer, act: FixedActivation) -> np.ndarray:
    """int32 (N, K/block): Σ (q - zp) · xq over each block."""
    nb = layer.k // layer.block
    w = layer.codes.astype(np.int32).reshape(layer.n, nb, layer.block)
    w -= layer.zero_points.astype(np.int32)[..., None]
    x = act.xq.astype(np.int32).reshape(nb, layer.block)
    return np.einsum("nbk,bk->nb", w, x).astype(np.int32)


def q4_dequant_fixed(layer: FixedQ4Layer) -> np.ndarray:
    """Integer Q4 dequantization: (q - zp) × ws_fx -> int32 (N, K) in Q(ws_frac)."""
    nb = layer.k // layer.block
    w = layer.codes.astype(np.int32).reshape(layer.n, nb, layer.block)
    w -= layer.zero_points.astype(np.int32)[..., None]
    return (w * layer.ws_fx.astype(np.int32)[..., None]).reshape(layer.n, layer.k)


def round_shift(acc: np.ndarray, shift: int) -> np.ndarray:
    """(acc + 2^(shift-1)) >> shift with arithmetic shift (floor), saturated to int32."""
    acc = acc.astype(np.int64)
    if shift > 0:
        acc = (acc + (np.int64(1) << (shift - 1))) >> shift
    elif shift < 0:
        acc = acc << (-shift)
    return np.clip(acc, -(2**31), 2**31 - 1).astype(np.int32)


def q4q8_gemv_fixed(layer: FixedQ4Layer, act: FixedActivation) -> np.ndarray:
    """The golden model: int32 (N,) outputs in Q(OUT_FRAC)."""
    sums = block_sums(layer, act).astype(np.int64)  # (N, nb)
    prod = sums * layer.ws_fx.astype(np.int64) * act.xs_fx.astype(np.int64)[None, :]
    acc = prod.sum(axis=1)  # int64, exact (no overflow for K ≤ 2^16)
    return round_shift(acc, layer.ws_frac + act.xs_frac - OUT_FRAC)


def nf4_dequant_fixed(codes: np.ndarray, absmax_fx: np.ndarray, block: int = 64) -> np.ndarray:
    """Integer NF4 dequantization: int8 code book value × Q(f) int16 absmax of the block ->
    int32, standing for value / (127 · 2^f)."""
    lut = NF4_CODE_I8.astype(np.int32)[codes.astype(np.int64)]
    am = np.repeat(absmax_fx.astype(np.int32), block)[: codes.size]
    return lut * am


def fixed_scales(w: Q4Weight) -> tuple[np.ndarray, int]:
    """(int16 Q(frac) block scales, frac) of a Q4 weight, as the FPGA stores them."""
    frac = frac_bits_for(w.scales)
    return to_fixed(w.scales, frac), frac


def q4q8_gemv_fixed_fast(
    w: Q4Weight, ws_fx: np.ndarray, ws_frac: int, act: FixedActivation
) -> np.ndarray:
    """The CPU kernels' integer mode (Numba) over the packed weight: bit-exact with
    :func:`q4q8_gemv_fixed`. Returns int32 (N,) in Q(OUT_FRAC). Without numba (an optional
    extra) it runs that golden model itself: the same bits, slower."""
    try:
        from .numba_kernels import q4q8_gemv_fixed as kernel
    except ImportError:
        kernel = None  # type: ignore[assignment]  # numba not installed: the golden model

    if (
        ws_fx.shape != w.scales.shape
        or act.xq.shape != (w.k,)
        or act.xs_fx.shape != (w.k // w.block,)
    ):
        raise ValueError(
            f"shapes do not match: weight (N={w.n}, K={w.k}, block={w.block}), "
            f"scales {ws_fx.shape}, activation {act.xq.shape}"
        )
    if kernel is None:
        return q4q8_gemv_fixed(replace(fixed_layer(w), ws_fx=ws_fx, ws_frac=ws_frac), act)
    out = np.empty(w.n, np.int32)
    kernel(
        w.packed,
        w.zp_values,
        np.ascontiguousarray(ws_fx, np.int16),
        act.xq,
        np.ascontiguousarray(act.xs_fx),
        ws_frac + act.xs_frac - OUT_FRAC,
        out,
    )
    return out
