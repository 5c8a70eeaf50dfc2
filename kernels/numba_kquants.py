"""The K-quant scale searches compiled with Numba (spec: ``ggml_kquants.py``), one sub-block
per ``prange`` iteration. The searches are nearly all of Q4_K / Q5_K / Q6_K's time: the
numpy spec runs each candidate scale over (sub-blocks, 32) temporaries, ~10x llama.cpp's
C loop; this is that loop. The rest (packing, the super-block scales) stays the spec's
numpy, which ``ggml_kquants.quantize_*(x, fast=True)`` calls with these searches.

Bit-identical to the spec (and so to ggml's ``quantize_row_q*_K_ref``), which takes care:
every constant and every integer that meets a float is cast to float32 first (Numba would
promote ``float32 * int`` to float64), and ``fastmath`` stays off so LLVM neither
reassociates the sums nor fuses a multiply and an add.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

f32 = np.float32
EPS = np.float32(1e-15)


@njit(cache=True, fastmath=False)
def _rint(v):  # pragma: no cover - compiled
    return np.float32(np.rint(v))


@njit(cache=True, fastmath=False, error_model="numpy")
def _qkx2(x, w, nmax, rmin, nstep, codes, aux):  # pragma: no cover - compiled
    """make_qkx2_quants over one 32-element sub-block; writes codes, returns (scale, -min)."""
    n = x.shape[0]
    fmax = f32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        for i in range(n):
            codes[i] = 0
        return f32(0), -mn
    iscale = fmax / (mx - mn)
    scale = f32(1) / iscale
    best = f32(0)
    for i in range(n):
        q = min(max(_rint(iscale * (x[i] - mn)), f32(0)), fmax)
        codes[i] = np.uint8(q)
        diff = scale * q + mn - x[i]
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + f32(0.1) * f32(step) + fmax) / (mx - mn)
        sum_l = f32(0)
        sum_l2 = f32(0)
        sum_xl = f32(0)
        for i in range(n):
            q = min(max(_rint(iscale * (x[i] - mn)), f32(0)), fmax)
            aux[i] = q
            wl = w[i] * q
            sum_l += wl
            sum_l2 += wl * q
            sum_xl += wl * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            err = f32(0)
            for i in range(n):
                diff = this_scale * aux[i] + this_min - x[i]
                err += w[i] * (diff * diff)
            if err < best:
                for i in range(n):
                    codes[i] = np.uint8(aux[i])
                best = err
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, fastmath=False, error_model="numpy")
def _qx_rmse1(x, nmax, codes):  # pragma: no cover - compiled
    """make_qx_quants(rmse_type=1) over one 16-element sub-block; returns the scale."""
    n = x.shape[0]
    fmax = f32(nmax)
    mx = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < EPS:
        for i in range(n):
            codes[i] = 0
        return f32(0)
    iscale = -fmax / mx
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        q = min(max(_rint(iscale * x[i]), -fmax), fmax - f32(1))
        codes[i] = np.uint8(q + fmax)
        w = x[i] * x[i]
        sumlx += w * x[i] * q
        suml2 += w * q * q
    scale = sumlx / suml2 if suml2 != 0 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + f32(0.1) * f32(step)) / mx
        sumlx = f32(0)
        suml2 = f32(0)
        for i in range(n):
            q = min(max(_rint(iscale * x[i]), -fmax), fmax - f32(1))
            w = x[i] * x[i]
            sumlx += w * x[i] * q
            suml2 += w * q * q
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                q = min(max(_rint(iscale * x[i]), -fmax), fmax - f32(1))
                codes[i] = np.uint8(q + fmax)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _qkx2_all(x, w, nmax, rmin, nstep, codes, scales, mins):  # pragma: no cover - compiled
    for r in prange(x.shape[0]):
        aux = np.zeros(x.shape[1], np.float32)
        s, m = _qkx2(x[r], w[r], nmax, rmin, nstep, codes[r], aux)
        scales[r] = s
        mins[r] = m


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _qx_all(x, nmax, codes, scales):  # pragma: no cover - compiled
    for r in prange(x.shape[0]):
        scales[r] = _qx_rmse1(x[r], nmax, codes[r])


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """``ggml_kquants.make_qkx2_quants``, compiled (``rdelta`` is llama.cpp's 0.1 always)."""
    assert rdelta == 0.1
    x = np.ascontiguousarray(x, np.float32)
    w = np.ascontiguousarray(w, np.float32)
    codes = np.empty(x.shape, np.uint8)
    scales = np.empty(x.shape[0], np.float32)
    mins = np.empty(x.shape[0], np.float32)
    _qkx2_all(x, w, nmax, np.float32(rmin), nstep, codes, scales, mins)
    return codes, scales, mins


def make_qx_quants_rmse1(x, nmax):
    """``ggml_kquants.make_qx_quants_rmse1``, compiled."""
    x = np.ascontiguousarray(x, np.float32)
    codes = np.empty(x.shape, np.uint8)
    scales = np.empty(x.shape[0], np.float32)
    _qx_all(x, nmax, codes, scales)
    return codes, scales
