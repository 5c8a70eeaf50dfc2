"""The traits table's adapters: how each backend's entry point is called with a kernel's
public arguments (``traits.py`` pairs each backend symbol with one of these), and the
argument checks every public kernel function shares.

The C core quantizes activations itself and wants flat contiguous arrays; Numba reads Q8
activations split into even and odd positions with per-block sums; the numpy reference
takes the weight arguments without ``threads``.
"""

from __future__ import annotations

import os

import numpy as np

from . import reference
from .reference import ABSMAX_BLOCK, NF4_BLOCK, NF4_CODE, NF4_CODE_I8, Q4_BLOCK_SIZES

# -- shared checks ---------------------------------------------------------------------------


def check(arr: np.ndarray, name: str, dtype, ndim: int | None = None) -> None:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def thread_count(threads: int | None) -> int:
    return int(threads) if threads else (os.cpu_count() or 1)


def numba_threads(threads: int | None) -> None:
    import numba

    numba.set_num_threads(min(thread_count(threads), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]  # set at import, absent from numba's stub


# -- Q4 (MatMulNBits 4-bit) --------------------------------------------------------------------


def q4_arrays(w) -> dict:
    if not isinstance(w, reference.Q4Weight):
        raise ValueError(f"expected a Q4Weight, got {type(w).__name__}")
    return {"packed": w.packed, "scales": w.scales, "zero_points": w.zero_points}


def q4_shapes(w) -> dict:
    if w.block not in Q4_BLOCK_SIZES or w.k % w.block:
        raise ValueError(f"Q4 block size {w.block} must be one of {Q4_BLOCK_SIZES} and divide K")
    nb = w.k // w.block
    return {
        "packed": (w.n, nb, w.block // 2),
        "scales": (w.n, nb),
        "zero_points": (w.n, -(-nb // 2)),
    }


def q4_random(k: int, n: int, block: int, variant: str, rng) -> tuple:
    packed = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, k // block)).astype(np.float32)
    zp = None
    if variant == "asymmetric":
        zp = rng.integers(0, 256, (n, -(-(k // block) // 2)), dtype=np.uint8)
    return (reference.Q4Weight(packed, scales, zp, k, n, block),)


def q4_gemm_cython(fn, x, w, threads):
    """The C core quantizes x itself (Q8 path) and reads no zero points when symmetric."""
    out = np.empty((x.shape[0], w.n), np.float32)
    fn(
        x,
        w.packed,
        w.scales,
        None if w.zero_points is None else w.zp_values,
        out,
        thread_count(threads),
    )
    return out


def q4_gemm_numba(q8: bool):
    """Numba reads activations split into even and odd positions, with block sums."""

    def call(fn, x, w, threads):
        m, nb = x.shape[0], w.k // w.block
        extra: tuple[np.ndarray, ...] = ()
        if q8:
            xv, xs = reference.q8_quantize(x, w.block)
            extra = (xs,)
        else:
            xv = x
        xsum = xv.reshape(m, nb, w.block).sum(axis=2, dtype=np.int32 if q8 else np.float32)
        out = np.empty((m, w.n), np.float32)
        numba_threads(threads)
        fn(
            np.ascontiguousarray(xv[:, 0::2]),
            np.ascontiguousarray(xv[:, 1::2]),
            xsum,
            *extra,
            w.packed,
            w.scales,
            w.zp_values,
            out,
        )
        return out

    return call


def q4_dequantize_ref(fn, w, out):
    if out is None:
        return fn(w)
    out[...] = fn(w)
    return out


def q4_dequantize_fast(fn, w, out):
    """``out`` (when given) is a transposed view of an (N, K) buffer: filled as (N, K)."""
    buf = np.empty((w.n, w.k), np.float32) if out is None else out.T
    fn(w.packed, w.scales, w.zp_values, buf)
    return buf.T


# -- Q8 (MatMulNBits 8-bit weights) ------------------------------------------------------------


def q8_arrays(codes, scales) -> dict:
    return {"codes": codes, "scales": scales}


def q8_shapes(codes, scales) -> dict:
    check(codes, "codes", np.uint8, 3)  # the codes' shape is the logical shape
    return {"codes": codes.shape, "scales": codes.shape[:2]}


def q8_random(k: int, n: int, block: int, variant: str, rng) -> tuple:
    return (
        rng.integers(0, 256, (n, k // block, block), dtype=np.uint8),
        rng.uniform(0.001, 0.02, (n, k // block)).astype(np.float32),
    )


def q8_gemm_fast(numba: bool):
    def call(fn, x, codes, scales, threads):
        out = np.empty((x.shape[0], codes.shape[0]), np.float32)
        if numba:
            numba_threads(threads)
            fn(x, codes, scales, out)
        else:
            fn(x, codes, scales, out, thread_count(threads))
        return out

    return call


# -- NF4 (QLoRA) -------------------------------------------------------------------------------


def nf4_arrays(t) -> dict:
    if not isinstance(t, reference.NF4Tensor):
        raise ValueError(f"expected an NF4Tensor, got {type(t).__name__}")
    return {"packed": t.packed, "absmax_q": t.absmax_q, "absmax_scale": t.absmax_scale}


def nf4_shapes(t) -> dict:
    nblocks = -(-t.numel // NF4_BLOCK)
    return {
        "packed": (-(-t.numel // 2),),
        "absmax_q": (nblocks,),
        "absmax_scale": (-(-nblocks // ABSMAX_BLOCK),),
    }


def nf4_random(k: int, n: int, block: int, variant: str, rng) -> tuple:
    """An NF4 weight of PyTorch Linear shape (N, K) with random codes."""
    numel = n * k
    nblocks = -(-numel // NF4_BLOCK)
    return (
        reference.NF4Tensor(
            rng.integers(0, 256, -(-numel // 2), dtype=np.uint8),
            rng.integers(0, 256, nblocks, dtype=np.uint8),
            rng.uniform(0.01, 0.05, -(-nblocks // ABSMAX_BLOCK)).astype(np.float32),
            0.1,
            (n, k),
        ),
    )


def absmax_of(t) -> np.ndarray:
    return reference.dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)


def nf4_gemv_cython(code: np.ndarray):
    """The C core dequantizes absmax on the fly (and quantizes x itself on the Q8 path)."""

    def call(fn, x, t, threads):
        out = np.empty((x.shape[0], t.shape[0]), np.float32)
        fn(
            x,
            t.packed,
            t.absmax_q,
            t.absmax_scale,
            t.absmax_offset,
            reference.DYNAMIC_MAP,
            code,
            out,
            thread_count(threads),
        )
        return out

    return call


def nf4_f32_gemv_numba(fn, x, t, threads):
    out = np.empty((x.shape[0], t.shape[0]), np.float32)
    numba_threads(threads)
    fn(x, t.packed, absmax_of(t), NF4_CODE, out)
    return out


def nf4_q8_gemv_numba(fn, x, t, threads):
    out = np.empty((x.shape[0], t.shape[0]), np.float32)
    xq, xs = reference.q8_quantize(x, NF4_BLOCK)
    absmax = absmax_of(t)
    numba_threads(threads)
    fn(
        np.ascontiguousarray(xq[:, 0::2]),
        np.ascontiguousarray(xq[:, 1::2]),
        xs / np.float32(127.0),
        t.packed,
        absmax,
        NF4_CODE_I8,
        out,
    )
    return out


def nf4_dequantize_ref(fn, t, out):
    out[...] = fn(t)
    return out


def nf4_dequantize_cython(fn, t, out):
    fn(
        t.packed,
        t.absmax_q,
        t.absmax_scale,
        t.absmax_offset,
        reference.DYNAMIC_MAP,
        NF4_CODE,
        out.reshape(-1),
    )
    return out


def nf4_dequantize_numba(fn, t, out):
    fn(t.packed, absmax_of(t), NF4_CODE, out.reshape(-1))
    return out


# -- decoder ops -------------------------------------------------------------------------------


def rms_norm_cython(fn, x, w, eps):
    out = np.empty_like(x)
    fn(x, w, out, float(eps))
    return out


def swiglu_cython(fn, gu):
    out = np.empty((gu.shape[0], gu.shape[1] // 2), np.float32)
    fn(gu, out)
    return out


def attention_ref(fn, q, k, v, kc, vc, cos, sin, pos, first, scale, threads):
    return fn(q, k, v, kc, vc, cos, sin, pos, first, scale)


def attention_cython(fn, q, k, v, kc, vc, cos, sin, pos, first, scale, threads):
    out = np.empty_like(q)
    fn(
        q,
        k,
        v,
        kc,
        vc,
        cos,
        sin,
        out,
        np.empty(q.shape[0] * (pos + 1), np.float32),
        pos,
        first,
        float(scale),
        thread_count(threads),
    )
    return out
