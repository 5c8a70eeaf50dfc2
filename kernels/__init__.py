"""edgetune.kernels: quantized-weight kernels with a numpy spec and fast backends.

Backends, fastest first: ``cython`` (C core, AVX2+FMA picked at run time),
``numba``, ``reference`` (numpy, the spec). ``EDGETUNE_KERNELS=reference|numba|cython``
forces one. Every public function checks dtypes, shapes and block sizes here,
in Python, so nothing malformed reaches compiled code; ``traits.py`` is the table of
formats and kernels (layouts, bounds, entry points) and ``dispatch.py`` the one dispatcher.
Matmul names follow ``<weight>_<activation>_<op>``.
"""

from __future__ import annotations

import numpy as np

from . import reference, traits
from .adapters import check as _check
from .adapters import thread_count as _threads
from .dispatch import (
    BACKENDS,
    available_backends,
    backend,
    entry_point,
    forced_backend,
    isa,
    run,
)
from .reference import NF4_BLOCK, NF4_CODE, Q4_BLOCK_SIZES, NF4Tensor, Q4Weight
from .traits import FORMATS, KERNELS, OPS, check_weight

__all__ = [
    "NF4Tensor",
    "Q4Weight",
    "NF4_CODE",
    "NF4_BLOCK",
    "Q4_BLOCK_SIZES",
    "BACKENDS",
    "FORMATS",
    "KERNELS",
    "OPS",
    "backend",
    "forced_backend",
    "available_backends",
    "isa",
    "check_weight",
    "nf4_quantize",
    "nf4_dequantize",
    "q4_quantize",
    "q4_dequantize",
    "q8_weight_quantize",
    "q4_f32_gemm",
    "q4_q8_gemm",
    "nf4_f32_gemv",
    "nf4_q8_gemv",
    "q8_f32_gemm",
    "prepare_q4_q8_gemm",
    "prepare_q8_f32_gemm",
    "rms_norm",
    "swiglu",
    "attention_decode",
    "reference",
    "traits",
]


# -- quantization (reference implementations, once per weight) --------------------------------


def nf4_quantize(w: np.ndarray) -> NF4Tensor:
    """NF4 with double-quantized absmax (QLoRA). Quantization runs once per weight."""
    if not isinstance(w, np.ndarray) or w.dtype.kind != "f" or w.size == 0:
        raise ValueError("nf4_quantize needs a non-empty float numpy array")
    if not np.isfinite(w).all():
        raise ValueError("nf4_quantize: weight has NaN or infinite values")
    return reference.nf4_quantize(w)


def q4_quantize(b: np.ndarray, block: int = 32, symmetric: bool = True) -> Q4Weight:
    """Pack a (K, N) MatMul weight into ONNX Runtime's MatMulNBits 4-bit layout."""
    if not isinstance(b, np.ndarray) or b.ndim != 2 or b.dtype.kind != "f":
        raise ValueError("q4_quantize needs a 2-D float numpy array (K, N)")
    if block not in Q4_BLOCK_SIZES or b.shape[0] % block:
        raise ValueError(f"block size must be one of {Q4_BLOCK_SIZES} and divide K={b.shape[0]}")
    if not np.isfinite(b).all():
        raise ValueError("q4_quantize: weight has NaN or infinite values")
    return reference.q4_quantize(b, block, symmetric)


def q8_weight_quantize(b: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """8-bit MatMulNBits packing of a (K, N) weight (used for the LM head by default)."""
    if not isinstance(b, np.ndarray) or b.ndim != 2 or b.dtype.kind != "f":
        raise ValueError("q8_weight_quantize needs a 2-D float numpy array (K, N)")
    if block not in Q4_BLOCK_SIZES or b.shape[0] % block:
        raise ValueError(f"block size must be one of {Q4_BLOCK_SIZES} and divide K={b.shape[0]}")
    return reference.q8_weight_quantize(b, block)


# -- dequantization ----------------------------------------------------------------------------


def nf4_dequantize(t: NF4Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 weight of an NF4 tensor, written into ``out`` (same shape) when given."""
    check_weight("nf4", t)
    if out is None:
        out = np.empty(t.shape, np.float32)
    elif out.shape != t.shape:
        raise ValueError(f"out has shape {out.shape}, expected {t.shape}")
    _check(out, "out", np.float32)
    return run("nf4_dequantize", t, out)


def q4_dequantize(w: Q4Weight, out: np.ndarray | None = None) -> np.ndarray:
    """The (K, N) fp32 weight of a MatMulNBits-packed Q4 weight (a transposed view of an
    (N, K) buffer); written into ``out`` when given, which must be such a view."""
    check_weight("q4", w)
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != (w.k, w.n):
            raise ValueError(f"out must be a ({w.k}, {w.n}) array")
        _check(out.T, "out.T", np.float32)
    return run("q4_dequantize", w, out)


# -- matmuls: y (M, N) = x (M, K) @ weight -----------------------------------------------------


def _check_x(x: np.ndarray, k: int) -> None:
    _check(x, "x", np.float32, 2)
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={k}")


def q4_f32_gemm(x: np.ndarray, w: Q4Weight, threads: int | None = None) -> np.ndarray:
    """y (M, N) = x (M, K) @ dequant(B), fp32 activations; ``threads`` defaults to all cores."""
    check_weight("q4", w)
    _check_x(x, w.k)
    return run("q4_f32_gemm", x, w, threads)


def q4_q8_gemm(x: np.ndarray, w: Q4Weight, threads: int | None = None) -> np.ndarray:
    """Integer datapath y = x @ B: x quantized per block to int8 (Q8), int32 block sums of
    (q - zp) * xq, then scaled by both block scales."""
    check_weight("q4", w)
    _check_x(x, w.k)
    return run("q4_q8_gemm", x, w, threads)


def _check_nf4_gemv(x: np.ndarray, t: NF4Tensor) -> None:
    """Checks shared by the NF4 GEMVs: a consistent 2-D NF4 weight (N, K), x float32 (M, K)."""
    check_weight("nf4", t)
    _check(x, "x", np.float32, 2)
    if len(t.shape) != 2 or x.shape[1] != t.shape[1]:
        raise ValueError(f"x (M, K={x.shape[1]}) does not match an NF4 weight of shape {t.shape}")


def nf4_f32_gemv(x: np.ndarray, t: NF4Tensor, threads: int | None = None) -> np.ndarray:
    """y (M, N) = x (M, K) @ W.T for an NF4 weight W of shape (N, K) (PyTorch Linear
    layout), fp32 activations, without materializing W."""
    _check_nf4_gemv(x, t)
    return run("nf4_f32_gemv", x, t, threads)


def nf4_q8_gemv(x: np.ndarray, t: NF4Tensor, threads: int | None = None) -> np.ndarray:
    """``nf4_f32_gemv`` through an integer datapath (``reference.nf4_q8_gemv``): x quantized
    per 64-element block to int8 and NF4's code book as int8, int32 block sums, then both
    scales. Faster than the exact fp32 path (no fp32 decode of the weights) at the cost of the
    two roundings, as ONNX Runtime's ``accuracy_level=4``. K must be a multiple of 64."""
    _check_nf4_gemv(x, t)
    if t.shape[1] % NF4_BLOCK:
        raise ValueError(
            f"nf4_q8_gemv needs K a multiple of {NF4_BLOCK} (so activation blocks "
            f"line up with the NF4 blocks), got an NF4 weight of shape {t.shape}"
        )
    return run("nf4_q8_gemv", x, t, threads)


def q8_f32_gemm(
    x: np.ndarray, codes: np.ndarray, scales: np.ndarray, threads: int | None = None
) -> np.ndarray:
    """y = x @ dequant(B), fp32 activations, for an 8-bit MatMulNBits weight: codes
    (N, K/block, block), zero point 128, scales (N, K/block). Used for the LM head the
    exporter keeps at 8 bits."""
    check_weight("q8", codes, scales)
    _check(x, "x", np.float32, 2)
    n, nb, block = codes.shape
    if x.shape[1] != nb * block:
        raise ValueError(f"x has K={x.shape[1]}, codes {codes.shape} have K={nb * block}")
    return run("q8_f32_gemm", x, codes, scales, threads)


# -- prepared matmuls: one weight's checks and dispatch out of a decoder's token loop ---------


def _prepared(kernel: str, k: int, fast, slow):
    """x -> y for one weight whose checks already passed: per call only x is checked (a few
    attribute reads: a decoder calls this ~70 times a token, and the full dispatch costs
    more than a small GEMV). The backend is the one ``kernel`` resolves to now; only the C
    core gets the short path (``fast(fn, x)``), the others go through ``slow(x)``."""
    name = backend(kernel)
    fn = entry_point(kernel, name)[1] if name == "cython" else None

    def run_prepared(x: np.ndarray) -> np.ndarray:
        if (
            type(x) is not np.ndarray
            or x.dtype != np.float32
            or x.ndim != 2
            or x.shape[1] != k
            or not x.flags.c_contiguous
        ):
            _check_x(x, k)
        return slow(x) if fn is None else fast(fn, x)

    return run_prepared


def prepare_q4_q8_gemm(w: Q4Weight, threads: int | None = None):
    """``q4_q8_gemm`` bound to one weight: a callable x (M, K) -> (M, N)."""
    check_weight("q4", w)
    zps, nt = (None if w.zero_points is None else w.zp_values), _threads(threads)

    def fast(fn, x):
        out = np.empty((x.shape[0], w.n), np.float32)
        fn(x, w.packed, w.scales, zps, out, nt)
        return out

    return _prepared("q4_q8_gemm", w.k, fast, lambda x: q4_q8_gemm(x, w, threads))


def prepare_q8_f32_gemm(codes: np.ndarray, scales: np.ndarray, threads: int | None = None):
    """``q8_f32_gemm`` bound to one 8-bit weight: a callable x (M, K) -> (M, N)."""
    check_weight("q8", codes, scales)
    n, nb, block = codes.shape
    nt = _threads(threads)

    def fast(fn, x):
        out = np.empty((x.shape[0], n), np.float32)
        fn(x, codes, scales, out, nt)
        return out

    return _prepared(
        "q8_f32_gemm", nb * block, fast, lambda x: q8_f32_gemm(x, codes, scales, threads)
    )


# -- decoder ops of the native runtime (C, or the numpy reference) ----------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, H) / sqrt(mean(x ** 2) + eps) * w (H,), fp32."""
    _check(x, "x", np.float32, 2)
    _check(w, "w", np.float32, 1)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"norm weight has {w.shape[0]} values, x rows have {x.shape[1]}")
    if x.size == 0:
        return reference.rms_norm(x, w, eps)
    return run("rms_norm", x, w, eps)


def swiglu(gu: np.ndarray) -> np.ndarray:
    """silu(gate) * up for gu (T, 2N) = [gate | up] (Phi-3's fused gate_up_proj output)."""
    _check(gu, "gu", np.float32, 2)
    if gu.shape[1] % 2:
        raise ValueError(f"gate|up rows need an even length, got {gu.shape[1]}")
    if gu.size == 0:
        return reference.swiglu(gu)
    return run("swiglu", gu)


def attention_decode(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    pos: int,
    first: int,
    scale: float,
    threads: int | None = None,
) -> np.ndarray:
    """Attention of one new token at position ``pos`` over cache positions [first, pos]:
    q (n_heads, d), k and v (n_kv, d) of the token (k rotated and both written into the
    caches kc / vc (n_kv, ctx, d) at ``pos``), cos / sin (rot,) rotary tables of ``pos``.
    Returns (n_heads, d); heads are split over ``threads``."""
    for arr, name, ndim in (
        (q, "q", 2),
        (k, "k", 2),
        (v, "v", 2),
        (kc, "kc", 3),
        (vc, "vc", 3),
        (cos, "cos", 1),
        (sin, "sin", 1),
    ):
        _check(arr, name, np.float32, ndim)
    n_heads, d = q.shape
    n_kv, ctx = k.shape[0], kc.shape[1]
    if (
        k.shape != (n_kv, d)
        or v.shape != (n_kv, d)
        or kc.shape != (n_kv, ctx, d)
        or vc.shape != kc.shape
        or n_kv == 0
        or n_heads % n_kv
    ):
        raise ValueError(
            f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}, "
            f"caches {kc.shape} / {vc.shape}"
        )
    if cos.shape != sin.shape or cos.shape[0] > d or cos.shape[0] % 2 or d > 1024:
        raise ValueError(f"rotary tables {cos.shape} / {sin.shape} do not fit head_dim {d}")
    if not 0 <= first <= pos < ctx:
        raise ValueError(f"positions first={first}, pos={pos} outside the cache of {ctx}")
    if not (kc.flags.writeable and vc.flags.writeable):
        raise ValueError("the KV caches must be writable")
    return run("attention_decode", q, k, v, kc, vc, cos, sin, pos, first, scale, threads)
