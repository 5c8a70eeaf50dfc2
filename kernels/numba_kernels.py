"""Numba implementations of the hot kernels (spec: ``reference.py``).

Hot loops extract nibbles and do arithmetic in float32: Numba promotes small
integers to int64, which defeats SIMD, so integer work stays out of inner loops
and the Q4 zero point is folded into a per-block sum (Σ(q-zp)·x = Σq·x - zp·Σx).
``cache=True`` keeps compiled code on disk so only the first import pays for it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def nf4_dequantize(packed, absmax, code, out):  # pragma: no cover - compiled
    """out[i] = code[nibble i] * absmax[i // 64]; ``packed`` low nibble first."""
    nblocks = absmax.shape[0]
    n = out.shape[0]
    for b in prange(nblocks):
        am = absmax[b]
        start = b * 64
        stop = min(start + 64, n)
        for i in range(start, stop, 2):
            byte = packed[i >> 1]
            out[i] = code[byte & 15] * am
            if i + 1 < stop:
                out[i + 1] = code[byte >> 4] * am


@njit(parallel=True, cache=True)
def q4_dequantize_nk(packed, scales, zps, out):  # pragma: no cover - compiled
    """out[n, k] = (q - zp) * scale for MatMulNBits blocks; out is (N, K)."""
    n_rows, nb, half = packed.shape
    block = half * 2
    for r in prange(n_rows):
        for b in range(nb):
            s = scales[r, b]
            z = np.float32(zps[r, b])
            base = b * block
            for j in range(half):
                byte = packed[r, b, j]
                out[r, base + 2 * j] = (np.float32(byte & 15) - z) * s
                out[r, base + 2 * j + 1] = (np.float32(byte >> 4) - z) * s


@njit(parallel=True, cache=True, fastmath=True)
def q4_f32_gemm(xe, xo, xsum, packed, scales, zps, out):  # pragma: no cover - compiled
    """out (M, N) = x (M, K) @ dequant(B). ``xe``/``xo`` are x's even and odd positions (so
    byte j of a block meets them without strided loads) and ``xsum`` its block sums (the
    zero point comes off as zp * sum(x) per block). Nibbles are split in float32:
    hi = floor(byte / 16), lo = byte - 16 hi, which vectorizes where integer shifts promote
    to int64 and do not."""
    m_rows = xe.shape[0]
    n_rows, nb, half = packed.shape
    for r in prange(n_rows):
        for m in range(m_rows):
            acc = np.float32(0.0)
            for b in range(nb):
                dot = np.float32(0.0)
                base = b * half
                for j in range(half):
                    f = np.float32(packed[r, b, j])
                    hi = np.floor(f * np.float32(0.0625))
                    lo = f - np.float32(16.0) * hi
                    dot += lo * xe[m, base + j] + hi * xo[m, base + j]
                acc += (dot - np.float32(zps[r, b]) * xsum[m, b]) * scales[r, b]
            out[m, r] = acc


@njit(parallel=True, cache=True)
def q4_q8_gemm(xe, xo, xsum, xs, packed, scales, zps, out):  # pragma: no cover - compiled
    """Integer datapath: int32 block sums of q * xq minus zp * sum(xq), then both scales;
    ``xe``/``xo`` are the int8 codes at even and odd positions, ``xsum`` their block sums."""
    m_rows = xe.shape[0]
    n_rows, nb, half = packed.shape
    for r in prange(n_rows):
        for m in range(m_rows):
            acc = np.float32(0.0)
            for b in range(nb):
                dot = np.int32(0)
                base = b * half
                for j in range(half):
                    p = np.int32(packed[r, b, j])
                    dot += (p & np.int32(15)) * np.int32(xe[m, base + j]) + (
                        p >> np.int32(4)
                    ) * np.int32(xo[m, base + j])
                dot -= np.int32(zps[r, b]) * xsum[m, b]
                acc += np.float32(dot) * (scales[r, b] * xs[m, b])
            out[m, r] = acc


@njit(parallel=True, cache=True)
def nf4_q8_gemv(xe, xo, xs127, packed, absmax, code_i8, out):  # pragma: no cover - compiled
    """NF4 integer datapath: int32 block sums of code_i8[q] * xq per 64-element block, then
    absmax * xs / 127; ``xe``/``xo`` are the int8 codes at even and odd positions, ``xs127``
    the block scales / 127. K is a multiple of 64 (checked by the caller)."""
    m_rows = xe.shape[0]
    n_rows = out.shape[1]
    half = xe.shape[1]  # K / 2 packed bytes a row
    nb = half // 32
    for r in prange(n_rows):
        row = r * half
        for m in range(m_rows):
            acc = np.float32(0.0)
            for b in range(nb):
                dot = np.int32(0)
                base = b * 32
                for j in range(32):
                    p = packed[row + base + j]
                    dot += np.int32(code_i8[p & 15]) * np.int32(xe[m, base + j]) + np.int32(
                        code_i8[p >> 4]
                    ) * np.int32(xo[m, base + j])
                acc += np.float32(dot) * (absmax[r * nb + b] * xs127[m, b])
            out[m, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def stream_sum(a):  # pragma: no cover - compiled
    """Sum of a large array: the read-bandwidth probe of the benchmarks."""
    s = np.float32(0.0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


@njit(parallel=True, cache=True)
def stream_copy(a, b):  # pragma: no cover - compiled
    """b[:] = a[:]: the copy-bandwidth probe (bytes read + written)."""
    for i in prange(a.shape[0]):
        b[i] = a[i]


@njit(parallel=True, cache=True)
def q4q8_gemv_fixed(packed, zps, ws_fx, xq, xs_fx, shift, out):  # pragma: no cover - compiled
    """Integer mode (kernels/fixed_point.py, the FPGA datapath): int32 block sums, int64
    accumulation of s * ws * xs, round-half-up shift, saturation to int32."""
    n_rows, nb, half = packed.shape
    block = half * 2
    for r in prange(n_rows):
        acc = np.int64(0)
        for b in range(nb):
            base = b * block
            z = np.int32(zps[r, b])
            s = np.int32(0)
            for j in range(half):
                byte = np.int32(packed[r, b, j])
                s += ((byte & 15) - z) * np.int32(xq[base + 2 * j])
                s += ((byte >> 4) - z) * np.int32(xq[base + 2 * j + 1])
            acc += np.int64(s) * np.int64(ws_fx[r, b]) * np.int64(xs_fx[b])
        if shift > 0:
            acc = (acc + (np.int64(1) << (shift - 1))) >> shift
        elif shift < 0:
            acc = acc << (-shift)
        out[r] = min(max(acc, -2147483648), 2147483647)


@njit(parallel=True, cache=True, fastmath=True)
def q8_f32_gemm(x, codes, scales, out):  # pragma: no cover - compiled
    """out (M, N) = x (M, K) @ dequant(B) for 8-bit MatMulNBits weights (zero point 128)."""
    m_rows = x.shape[0]
    n_rows, nb, block = codes.shape
    for r in prange(n_rows):
        for m in range(m_rows):
            acc = np.float32(0.0)
            for b in range(nb):
                dot = np.float32(0.0)
                xsum = np.float32(0.0)
                base = b * block
                for j in range(block):
                    xv = x[m, base + j]
                    dot += np.float32(codes[r, b, j]) * xv
                    xsum += xv
                acc += (dot - np.float32(128.0) * xsum) * scales[r, b]
            out[m, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def nf4_f32_gemv(x, packed, absmax, code, out):  # pragma: no cover - compiled
    """out (M, N) = x (M, K) @ W.T for an NF4 weight W (N, K); one absmax per 64 elements,
    applied once per block to the block's sum."""
    m_rows, k = x.shape
    n_rows = out.shape[1]
    for r in prange(n_rows):
        for m in range(m_rows):
            acc = np.float32(0.0)
            e0 = r * k
            b0 = e0
            while b0 < e0 + k:  # a row may start or end inside a 64-element block
                b1 = min(b0 - b0 % 64 + 64, e0 + k)
                dot = np.float32(0.0)
                for e in range(b0, b1):
                    byte = np.int64(packed[e >> 1])
                    q = (byte >> 4) if (e & 1) else (byte & 15)
                    dot += code[q] * x[m, e - e0]
                acc += dot * absmax[b0 // 64]
                b0 = b1
            out[m, r] = acc
