"""llama.cpp's 256-element "K" block formats Q4_K, Q5_K and Q6_K: the numpy spec edgetune
writes ``q4_k_m`` / ``q5_k_m`` / ``q6_k`` GGUF files with.

Bit-identical to ggml's ``quantize_row_q{4,5,6}_K_ref`` (what ``llama-quantize`` runs
without an importance matrix; ``tests/kernels/test_ggml_kquants.py`` compares against
llama.cpp's C library). Unlike Q4_0 these are searches, not formulas: Q4_K / Q5_K fit each
32-element sub-block's scale and minimum by weighted least squares over 21 / 16 candidate
scales (``make_qkx2_quants``), Q6_K each 16-element sub-block's scale over 19 candidates
(``make_qx_quants``); the sub-block scales are then quantized to 6 or 8 bits against one
fp16 super-block scale and every value re-rounded with its final scale.

========= ==================================================================== =====
type      super-block layout (256 elements, little-endian)                     bytes
========= ==================================================================== =====
Q4_K      fp16 d, fp16 dmin; u8 scales[12] (8 six-bit scales and 8 six-bit     144
          mins); u8 qs[128]: 64-element groups, element l in the low nibble
          of byte l, element l+32 in the high; value = d·sc·q - dmin·m
Q5_K      as Q4_K, then u8 qh[32] (bit 2g of byte l: element 64g+l's 5th bit,  176
          bit 2g+1: element 64g+32+l's) before qs[128]
Q6_K      u8 ql[128], u8 qh[64], i8 scales[16], fp16 d; 128-element halves,    210
          value = d·scale·(q - 32)
========= ==================================================================== =====

Every step is float32 in the C code's order: sums run element 0 to 31 in sequence (numpy's
pairwise ``sum`` would round differently), products keep C's left-to-right grouping, and
``nearest_int`` is round-half-to-even (``np.rint``). The search runs for all sub-blocks of
a chunk at once, so the Python loops are over the 32 elements and the candidate scales,
never over blocks. ``fast=True`` runs the two searches (nearly all of the time) compiled by
Numba (``numba_kquants``), with the same bits.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = np.float32(1e-15)
F = np.float32


def _super_blocks(x: np.ndarray) -> np.ndarray:
    """(rows, K) -> (blocks, 256) fp32; K must be a multiple of 256."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"a row of {x.shape[-1]} values is not a whole number of {QK_K}-blocks")
    return x.reshape(-1, QK_K)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis element 0, 1, 2, … in turn, in float32 (C's loop order)."""
    acc = np.zeros(a.shape[:-1], np.float32)
    for i in range(a.shape[-1]):
        acc += a[..., i]
    return acc


def _nearest(v: np.ndarray) -> np.ndarray:
    """C's ``nearest_int`` (round half to even), kept in float32 so that products with the
    codes stay float32 as in C (an int array would promote them to float64)."""
    return np.rint(v)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 -> (fp16 bytes, the fp16 value back in fp32)."""
    h = v.astype(np.float16)
    return h.astype("<f2").view(np.uint8).reshape(*v.shape, 2), h.astype(np.float32)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """Asymmetric codes 0..nmax for each row of ``x`` (sub-blocks, n) with weights ``w``:
    returns (codes uint8, scale, -min), the fit with the least weighted squared error over
    the plain range fit and ``nstep + 1`` widened ones."""
    mn = np.minimum(x.min(axis=-1), 0)
    mx = x.max(axis=-1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F(nmax) / (mx - mn)
        scale = F(1) / iscale
        codes = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F)
        diff = scale[:, None] * codes + mn[:, None] - x
        best = _seqsum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            cand = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            wl = w * cand
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * cand), _seqsum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, F(0), this_min)
            diff = this_scale[:, None] * cand + this_min[:, None] - x
            err = _seqsum(w * (diff * diff))
            better = (det > 0) & (err < best) & ~flat
            codes[better] = cand[better]
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    codes[flat] = 0
    scale = np.where(flat, F(0), scale).astype(np.float32)
    return np.nan_to_num(codes).astype(np.uint8), scale, (-mn).astype(np.float32)


def make_qx_quants_rmse1(x, nmax):
    """Symmetric codes 0..2·nmax-1 (offset by nmax) for each row of ``x`` (sub-blocks, n),
    weighted by x², over the plain fit and 18 nudged scales: returns (codes, scale)."""
    first = np.abs(x).argmax(axis=-1)[:, None]
    mx = np.take_along_axis(x, first, axis=-1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x

    def fit(iscale):
        lv = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        return lv, _seqsum(w * x * lv), _seqsum(w * lv * lv)

    with np.errstate(divide="ignore", invalid="ignore"):
        lv, sumlx, suml2 = fit(F(-nmax) / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(np.float32)
        best = scale * sumlx
        for step in [s for s in range(-9, 10) if s]:
            cand, sumlx, suml2 = fit(-(F(nmax) + F(0.1) * F(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            lv[better] = cand[better]
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    codes = np.nan_to_num(lv + nmax).astype(np.uint8)
    codes[zero] = 0
    return codes, np.where(zero, F(0), scale).astype(np.float32)


def _six_bit(v: np.ndarray) -> np.ndarray:
    """C's ``MIN(63, (uint8_t)nearest_int(v))``: the cast wraps modulo 256 first."""
    return np.minimum(np.nan_to_num(_nearest(v)).astype(np.int64) & 0xFF, 63).astype(np.uint8)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block (blocks, 8) -> the 12 bytes of ``scales``."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _searches(fast: bool):
    """This module (the spec) or the Numba build of its two searches."""
    if not fast:
        import sys

        return sys.modules[__name__]
    from . import numba_kquants

    return numba_kquants


def _qk_asym(x: np.ndarray, nmax: int, rmin: float, nstep: int, fast: bool):
    """The shared Q4_K / Q5_K body: (blocks, 256) -> (d, dmin, scales[12]; codes (blocks, 256))."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seqsum(sub * sub) / F(32))
    w = av_x[:, None] + np.abs(sub)
    codes, scales, mins = _searches(fast).make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, codes = scales.reshape(nb, 8), mins.reshape(nb, 8), codes.reshape(nb, 256)
    max_scale = np.maximum(scales.max(axis=-1), 0)
    max_min = np.maximum(mins.max(axis=-1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
    ls = _six_bit(inv_scale[:, None] * scales)
    lm = _six_bit(inv_min[:, None] * mins)
    d_bytes, d = _fp16(max_scale / F(63))
    m_bytes, dmin = _fp16(max_min / F(63))
    ds = d[:, None] * ls.astype(np.float32)  # (nb, 8)
    dm = dmin[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(
            _nearest((x.reshape(nb, 8, 32) + dm[..., None]) / ds[..., None]), 0, nmax
        ).reshape(nb, 256)
    keep = np.repeat(ds == 0, 32, axis=-1)  # a zero scale keeps the search's codes
    codes = np.nan_to_num(np.where(keep, codes, requant)).astype(np.uint8)
    head = np.concatenate([d_bytes, m_bytes, _pack_scales(ls, lm)], axis=-1)
    return head, codes


def _low_nibbles(codes: np.ndarray) -> np.ndarray:
    """(blocks, 256) codes -> (blocks, 128): per 64-element group, byte l holds element l
    (low nibble) and element l+32 (high)."""
    g = codes.reshape(-1, 4, 2, 32) & 0x0F
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)


def quantize_q4_k(x: np.ndarray, fast: bool = False) -> np.ndarray:
    """(rows, K) float -> (rows, K/256·144) uint8: Q4_K super-blocks, row after row."""
    rows = np.asarray(x).shape[0]
    head, codes = _qk_asym(_super_blocks(x), 15, -1.0, 20, fast)
    return np.concatenate([head, _low_nibbles(codes)], axis=-1).reshape(rows, -1)


def quantize_q5_k(x: np.ndarray, fast: bool = False) -> np.ndarray:
    """(rows, K) float -> (rows, K/256·176) uint8: Q5_K super-blocks, row after row."""
    rows = np.asarray(x).shape[0]
    head, codes = _qk_asym(_super_blocks(x), 31, -0.5, 15, fast)
    hi = (codes.reshape(-1, 4, 2, 32) >> 4).astype(np.uint8)  # (nb, group, half, l)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([head, qh, _low_nibbles(codes)], axis=-1).reshape(rows, -1)


def quantize_q6_k(x: np.ndarray, fast: bool = False) -> np.ndarray:
    """(rows, K) float -> (rows, K/256·210) uint8: Q6_K super-blocks, row after row."""
    rows = np.asarray(x).shape[0]
    b = _super_blocks(x)
    nb = b.shape[0]
    codes, scales = _searches(fast).make_qx_quants_rmse1(b.reshape(nb * 16, 16), 32)
    codes, scales = codes.reshape(nb, 256), scales.reshape(nb, 16)
    first = np.abs(scales).argmax(axis=-1)[:, None]
    max_scale = np.take_along_axis(scales, first, axis=-1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F(-128) / max_scale
        d_bytes, d = _fp16(F(1) / iscale)
        sc = np.nan_to_num(np.minimum(_nearest(iscale[:, None] * scales), 127)).astype(np.int8)
        ds = d[:, None] * sc.astype(np.float32)
        requant = np.clip(_nearest(b.reshape(nb, 16, 16) / ds[..., None]), -32, 31) + 32
    keep = np.repeat(ds == 0, 16, axis=-1)
    codes = np.nan_to_num(np.where(keep, codes, requant.reshape(nb, 256))).astype(np.uint8)
    q = codes.reshape(nb, 2, 4, 32)  # (block, half, quarter, l)
    ql = (q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)  # quarters 0|2, 1|3
    qh = sum(((q[:, :, j] >> 4) & 3) << (2 * j) for j in range(4)).astype(np.uint8)
    out = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d_bytes], axis=-1
    )
    out[zero] = 0
    return out.reshape(rows, -1)


QUANTIZE = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
