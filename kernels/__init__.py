"""edgetune.kernels: quantized-weight kernels with a numpy spec and fast backends.

Backends, fastest first: ``cython`` (C core, AVX2+FMA picked at run time),
``numba``, ``reference`` (numpy, the spec). ``EDGETUNE_KERNELS=reference|numba|cython``
forces one. Every public function checks dtypes, shapes and block sizes here,
in Python, so nothing malformed reaches compiled code.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from . import reference
from .reference import NF4_BLOCK, NF4_CODE, NF4_CODE_I8, Q4_BLOCK_SIZES, NF4Tensor, Q4Weight

__all__ = [
    "NF4Tensor", "Q4Weight", "NF4_CODE", "NF4_BLOCK", "Q4_BLOCK_SIZES", "backend",
    "forced_backend", "available_backends", "nf4_quantize", "nf4_dequantize", "q4_quantize", "q4_dequantize",
    "q4_gemm", "q4q8_gemm", "nf4_gemv", "nf4_q8_gemv", "q8w_gemm", "q8_weight_quantize", "reference",
    "rms_norm", "swiglu", "attention_decode", "prepare_q4q8_gemm", "prepare_q8w_gemm",
]

BACKENDS = ("cython", "numba", "reference")


@lru_cache(maxsize=None)
def _load(name: str):
    """Import a backend module, or return None when it is not built or not installed."""
    try:
        if name == "cython":
            from . import _ckernels

            return _ckernels
        if name == "numba":
            from . import numba_kernels

            return numba_kernels
    except ImportError:
        return None
    return reference


def available_backends() -> list[str]:
    return [b for b in BACKENDS if _load(b) is not None]


def backend(kernel: str = "") -> str:
    """Backend that runs ``kernel``: the fastest available that has it, starting from the one
    EDGETUNE_KERNELS forces (a forced backend without that kernel falls to the next)."""
    return _resolve(os.environ.get("EDGETUNE_KERNELS", ""), kernel)


@contextmanager
def forced_backend(name: str):
    """Run a block with EDGETUNE_KERNELS=name (then restore what was set before): how the
    benchmarks and tests pick one implementation of every kernel."""
    old = os.environ.get("EDGETUNE_KERNELS")
    os.environ["EDGETUNE_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDGETUNE_KERNELS", None)
        else:
            os.environ["EDGETUNE_KERNELS"] = old


@lru_cache(maxsize=256)
def _resolve(env: str, kernel: str) -> str:
    """``backend`` for one value of EDGETUNE_KERNELS (cached: every kernel call asks, and
    the lookup cost ~3 us, ~1 % of a 3072x3072 GEMV)."""
    forced = env.strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"EDGETUNE_KERNELS must be one of {', '.join(BACKENDS)}, got {forced!r}")
        if _load(forced) is None:
            raise ValueError(f"EDGETUNE_KERNELS={forced} but that backend is not available "
                             f"(available: {', '.join(available_backends())})")
    for name in BACKENDS[BACKENDS.index(forced):] if forced else BACKENDS:
        mod = _load(name)
        if mod is not None and (not kernel or name == "reference" or hasattr(mod, kernel)):
            return name
    return "reference"


def _check(arr: np.ndarray, name: str, dtype, ndim: int | None = None) -> None:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def nf4_quantize(w: np.ndarray) -> NF4Tensor:
    """NF4 with double-quantized absmax (QLoRA). Quantization runs once per weight."""
    if not isinstance(w, np.ndarray) or w.dtype.kind != "f" or w.size == 0:
        raise ValueError("nf4_quantize needs a non-empty float numpy array")
    if not np.isfinite(w).all():
        raise ValueError("nf4_quantize: weight has NaN or infinite values")
    return reference.nf4_quantize(w)


def _check_nf4(t: NF4Tensor) -> None:
    if not isinstance(t, NF4Tensor):
        raise ValueError(f"expected an NF4Tensor, got {type(t).__name__}")
    _check(t.packed, "packed", np.uint8, 1)
    _check(t.absmax_q, "absmax_q", np.uint8, 1)
    _check(t.absmax_scale, "absmax_scale", np.float32, 1)
    nblocks = -(-t.numel // NF4_BLOCK)
    if (t.packed.size != -(-t.numel // 2) or t.absmax_q.size != nblocks
            or t.absmax_scale.size != -(-nblocks // reference.ABSMAX_BLOCK)):
        raise ValueError(f"NF4 tensor of shape {t.shape} has inconsistent packed/absmax sizes")


def nf4_dequantize(t: NF4Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 weight of an NF4 tensor, written into ``out`` (same shape) when given."""
    _check_nf4(t)
    if out is None:
        out = np.empty(t.shape, np.float32)
    elif out.shape != t.shape:
        raise ValueError(f"out has shape {out.shape}, expected {t.shape}")
    _check(out, "out", np.float32)
    name = backend("nf4_dequantize")
    if name == "reference":
        out[...] = reference.nf4_dequantize(t)
        return out
    if name == "cython":  # absmax dequantized on the fly: no per-call array
        _load(name).nf4_dequantize(t.packed, t.absmax_q, t.absmax_scale, t.absmax_offset,
                                   reference.DYNAMIC_MAP, NF4_CODE, out.reshape(-1))
        return out
    absmax = reference.dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)
    _load(name).nf4_dequantize(t.packed, absmax, NF4_CODE, out.reshape(-1))
    return out


def q4_quantize(b: np.ndarray, block: int = 32, symmetric: bool = True) -> Q4Weight:
    """Pack a (K, N) MatMul weight into ONNX Runtime's MatMulNBits 4-bit layout."""
    if not isinstance(b, np.ndarray) or b.ndim != 2 or b.dtype.kind != "f":
        raise ValueError("q4_quantize needs a 2-D float numpy array (K, N)")
    if block not in Q4_BLOCK_SIZES or b.shape[0] % block:
        raise ValueError(f"block size must be one of {Q4_BLOCK_SIZES} and divide K={b.shape[0]}")
    if not np.isfinite(b).all():
        raise ValueError("q4_quantize: weight has NaN or infinite values")
    return reference.q4_quantize(b, block, symmetric)


def _check_q4(w: Q4Weight) -> None:
    if not isinstance(w, Q4Weight):
        raise ValueError(f"expected a Q4Weight, got {type(w).__name__}")
    if w.block not in Q4_BLOCK_SIZES or w.k % w.block:
        raise ValueError(f"Q4 block size {w.block} must be one of {Q4_BLOCK_SIZES} and divide K")
    _check(w.packed, "packed", np.uint8, 3)
    _check(w.scales, "scales", np.float32, 2)
    if w.packed.shape != (w.n, w.k // w.block, w.block // 2) or w.scales.shape != (w.n, w.k // w.block):
        raise ValueError(f"Q4 weight arrays do not match K={w.k}, N={w.n}, block={w.block}")


def q4_dequantize(w: Q4Weight, out: np.ndarray | None = None) -> np.ndarray:
    """The (K, N) fp32 weight of a MatMulNBits-packed Q4 weight (a transposed view of an
    (N, K) buffer); written into ``out`` when given, which must be such a view."""
    _check_q4(w)
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != (w.k, w.n):
            raise ValueError(f"out must be a ({w.k}, {w.n}) array")
        _check(out.T, "out.T", np.float32)
    name = backend("q4_dequantize_nk")
    if name == "reference":
        if out is None:
            return reference.q4_dequantize(w)
        out[...] = reference.q4_dequantize(w)
        return out
    buf = np.empty((w.n, w.k), np.float32) if out is None else out.T
    _load(name).q4_dequantize_nk(w.packed, w.scales, w.zp_values, buf)
    return buf.T


def _threads(threads: int | None) -> int:
    return int(threads) if threads else (os.cpu_count() or 1)


def _gemm(kind: str, x: np.ndarray, w: Q4Weight, threads: int | None) -> np.ndarray:
    """Checks and dispatch shared by the fp32 (``q4_gemm``) and integer (``q4q8_gemm``) paths."""
    _check_q4(w)
    _check(x, "x", np.float32, 2)
    if x.shape[1] != w.k:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={w.k}")
    name = backend(kind)
    if name == "reference":
        return getattr(reference, kind)(x, w)
    out = np.empty((x.shape[0], w.n), np.float32)
    if name == "cython":  # quantizes x itself; reads no zero points for a symmetric weight
        zps = None if w.zero_points is None else w.zp_values
        getattr(_load(name), kind)(x, w.packed, w.scales, zps, out, _threads(threads))
    else:  # Numba reads activations split into even and odd positions, with block sums
        m, nb = x.shape[0], w.k // w.block
        if kind == "q4_gemm":
            xv, extra = x, ()
        else:
            xv, xs = reference.q8_quantize(x, w.block)
            extra = (xs,)
        xsum = xv.reshape(m, nb, w.block).sum(axis=2, dtype=np.float32 if kind == "q4_gemm"
                                               else np.int32)
        _numba_threads(threads)
        getattr(_load(name), kind)(np.ascontiguousarray(xv[:, 0::2]),
                                   np.ascontiguousarray(xv[:, 1::2]), xsum, *extra,
                                   w.packed, w.scales, w.zp_values, out)
    return out


def q4_gemm(x: np.ndarray, w: Q4Weight, threads: int | None = None) -> np.ndarray:
    """y (M, N) = x (M, K) @ dequant(B), fp32 activations; ``threads`` defaults to all cores."""
    return _gemm("q4_gemm", x, w, threads)


def q4q8_gemm(x: np.ndarray, w: Q4Weight, threads: int | None = None) -> np.ndarray:
    """Integer datapath y = x @ B: x quantized per block to int8 (Q8), int32 block sums of
    (q - zp) * xq, then scaled by both block scales."""
    return _gemm("q4q8_gemm", x, w, threads)


def _check_nf4_gemv(x: np.ndarray, t: NF4Tensor) -> None:
    """Checks shared by the NF4 GEMVs: a consistent 2-D NF4 weight (N, K), x float32 (M, K)."""
    _check_nf4(t)
    _check(x, "x", np.float32, 2)
    if len(t.shape) != 2 or x.shape[1] != t.shape[1]:
        raise ValueError(f"x (M, K={x.shape[1]}) does not match an NF4 weight of shape {t.shape}")


def nf4_gemv(x: np.ndarray, t: NF4Tensor, threads: int | None = None) -> np.ndarray:
    """y (M, N) = x (M, K) @ W.T for an NF4 weight W of shape (N, K) (PyTorch Linear
    layout), fp32 activations, without materializing W."""
    _check_nf4_gemv(x, t)
    name = backend("nf4_gemv")
    if name == "reference":
        return reference.nf4_gemv(x, t)
    out = np.empty((x.shape[0], t.shape[0]), np.float32)
    if name == "cython":
        _load(name).nf4_gemv(x, t.packed, t.absmax_q, t.absmax_scale, t.absmax_offset,
                             reference.DYNAMIC_MAP, NF4_CODE, out, _threads(threads))
    else:
        _numba_threads(threads)
        absmax = reference.dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)
        _load(name).nf4_gemv(x, t.packed, absmax, NF4_CODE, out)
    return out


def nf4_q8_gemv(x: np.ndarray, t: NF4Tensor, threads: int | None = None) -> np.ndarray:
    """``nf4_gemv`` through an integer datapath (``reference.nf4_q8_gemv``): x quantized per
    64-element block to int8 and NF4's code book as int8, int32 block sums, then both scales.
    Faster than the exact fp32 path (no fp32 decode of the weights) at the cost of the two
    roundings, as ONNX Runtime's ``accuracy_level=4``. K must be a multiple of 64."""
    _check_nf4_gemv(x, t)
    if t.shape[1] % NF4_BLOCK:
        raise ValueError(f"nf4_q8_gemv needs K a multiple of {NF4_BLOCK} (so activation blocks "
                         f"line up with the NF4 blocks), got an NF4 weight of shape {t.shape}")
    name = backend("nf4_q8_gemv")
    if name == "reference":
        return reference.nf4_q8_gemv(x, t)
    out = np.empty((x.shape[0], t.shape[0]), np.float32)
    if name == "cython":
        _load(name).nf4_q8_gemv(x, t.packed, t.absmax_q, t.absmax_scale, t.absmax_offset,
                                reference.DYNAMIC_MAP, NF4_CODE_I8, out, _threads(threads))
        return out
    xq, xs = reference.q8_quantize(x, NF4_BLOCK)
    absmax = reference.dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)
    _numba_threads(threads)
    _load(name).nf4_q8_gemv(np.ascontiguousarray(xq[:, 0::2]), np.ascontiguousarray(xq[:, 1::2]),
                            xs / np.float32(127.0), t.packed, absmax, NF4_CODE_I8, out)
    return out


def _check_q8w(codes: np.ndarray, scales: np.ndarray) -> tuple[int, int, int]:
    """(N, K/block, block) of an 8-bit MatMulNBits weight, after checking its arrays."""
    _check(codes, "codes", np.uint8, 3)
    _check(scales, "scales", np.float32, 2)
    if scales.shape != codes.shape[:2]:
        raise ValueError(f"codes {codes.shape} and scales {scales.shape} do not match")
    return codes.shape


def q8w_gemm(x: np.ndarray, codes: np.ndarray, scales: np.ndarray,
             threads: int | None = None) -> np.ndarray:
    """y = x @ dequant(B) for an 8-bit MatMulNBits weight: codes (N, K/block, block), zero
    point 128, scales (N, K/block). Used for the LM head the exporter keeps at 8 bits."""
    _check(x, "x", np.float32, 2)
    n, nb, block = _check_q8w(codes, scales)
    if x.shape[1] != nb * block:
        raise ValueError(f"x has K={x.shape[1]}, codes {codes.shape} have K={nb * block}")
    name = backend("q8w_gemm")
    if name == "reference":
        return reference.q8w_gemm(x, codes, scales)
    out = np.empty((x.shape[0], n), np.float32)
    if name == "cython":
        _load(name).q8w_gemm(x, codes, scales, out, _threads(threads))
        return out
    _numba_threads(threads)
    _load(name).q8w_gemm(x, codes, scales, out)
    return out


def _prepared(kernel: str, k: int, fast, slow):
    """x -> y for one weight whose checks already passed: per call only x is checked (a few
    attribute reads: a decoder calls this ~70 times a token, and the full dispatch costs
    more than a small GEMV). The backend is the one ``kernel`` resolves to now."""
    mod = _fast_op(kernel)

    def run(x: np.ndarray) -> np.ndarray:
        if (type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim != 2
                or x.shape[1] != k or not x.flags.c_contiguous):
            _check(x, "x", np.float32, 2)
            raise ValueError(f"x has K={x.shape[1]}, weight has K={k}")
        return slow(x) if mod is None else fast(mod, x)
    return run


def prepare_q4q8_gemm(w: Q4Weight, threads: int | None = None):
    """``q4q8_gemm`` bound to one weight: a callable x (M, K) -> (M, N)."""
    _check_q4(w)
    zps, nt = (None if w.zero_points is None else w.zp_values), _threads(threads)

    def fast(mod, x):
        out = np.empty((x.shape[0], w.n), np.float32)
        mod.q4q8_gemm(x, w.packed, w.scales, zps, out, nt)
        return out
    return _prepared("q4q8_gemm", w.k, fast, lambda x: q4q8_gemm(x, w, threads))


def prepare_q8w_gemm(codes: np.ndarray, scales: np.ndarray, threads: int | None = None):
    """``q8w_gemm`` bound to one 8-bit weight: a callable x (M, K) -> (M, N)."""
    n, nb, block = _check_q8w(codes, scales)
    nt = _threads(threads)

    def fast(mod, x):
        out = np.empty((x.shape[0], n), np.float32)
        mod.q8w_gemm(x, codes, scales, out, nt)
        return out
    return _prepared("q8w_gemm", nb * block, fast, lambda x: q8w_gemm(x, codes, scales, threads))


def _numba_threads(threads: int | None) -> None:
    import numba

    numba.set_num_threads(min(_threads(threads), numba.config.NUMBA_NUM_THREADS))


def q8_weight_quantize(b: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """8-bit MatMulNBits packing of a (K, N) weight (used for the LM head by default)."""
    if not isinstance(b, np.ndarray) or b.ndim != 2 or b.dtype.kind != "f":
        raise ValueError("q8_weight_quantize needs a 2-D float numpy array (K, N)")
    if block not in Q4_BLOCK_SIZES or b.shape[0] % block:
        raise ValueError(f"block size must be one of {Q4_BLOCK_SIZES} and divide K={b.shape[0]}")
    return reference.q8_weight_quantize(b, block)


# -- decoder ops of the native runtime (C, or the numpy reference) --------------------------

def _fast_op(kernel: str):
    """The compiled module when it runs ``kernel`` (Numba has no decoder ops), else None."""
    name = backend(kernel)
    return _load(name) if name == "cython" else None


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, H) / sqrt(mean(x ** 2) + eps) * w (H,), fp32."""
    _check(x, "x", np.float32, 2)
    _check(w, "w", np.float32, 1)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"norm weight has {w.shape[0]} values, x rows have {x.shape[1]}")
    mod = _fast_op("rms_norm")
    if mod is None or x.size == 0:
        return reference.rms_norm(x, w, eps)
    out = np.empty_like(x)
    mod.rms_norm(x, w, out, float(eps))
    return out


def swiglu(gu: np.ndarray) -> np.ndarray:
    """silu(gate) * up for gu (T, 2N) = [gate | up] (Phi-3's fused gate_up_proj output)."""
    _check(gu, "gu", np.float32, 2)
    if gu.shape[1] % 2:
        raise ValueError(f"gate|up rows need an even length, got {gu.shape[1]}")
    mod = _fast_op("swiglu")
    if mod is None or gu.size == 0:
        return reference.swiglu(gu)
    out = np.empty((gu.shape[0], gu.shape[1] // 2), np.float32)
    mod.swiglu(gu, out)
    return out


def attention_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, kc: np.ndarray,
                     vc: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: int, first: int,
                     scale: float, threads: int | None = None) -> np.ndarray:
    """Attention of one new token at position ``pos`` over cache positions [first, pos]:
    q (n_heads, d), k and v (n_kv, d) of the token (k rotated and both written into the
    caches kc / vc (n_kv, ctx, d) at ``pos``), cos / sin (rot,) rotary tables of ``pos``.
    Returns (n_heads, d); heads are split over ``threads``."""
    for arr, name, ndim in ((q, "q", 2), (k, "k", 2), (v, "v", 2), (kc, "kc", 3), (vc, "vc", 3),
                            (cos, "cos", 1), (sin, "sin", 1)):
        _check(arr, name, np.float32, ndim)
    n_heads, d = q.shape
    n_kv, ctx = k.shape[0], kc.shape[1]
    if (k.shape != (n_kv, d) or v.shape != (n_kv, d) or kc.shape != (n_kv, ctx, d)
            or vc.shape != kc.shape or n_kv == 0 or n_heads % n_kv):
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"caches {kc.shape} / {vc.shape}")
    if cos.shape != sin.shape or cos.shape[0] > d or cos.shape[0] % 2 or d > 1024:
        raise ValueError(f"rotary tables {cos.shape} / {sin.shape} do not fit head_dim {d}")
    if not 0 <= first <= pos < ctx:
        raise ValueError(f"positions first={first}, pos={pos} outside the cache of {ctx}")
    if not (kc.flags.writeable and vc.flags.writeable):
        raise ValueError("the KV caches must be writable")
    mod = _fast_op("attention_decode")
    if mod is None:
        return reference.attention_decode(q, k, v, kc, vc, cos, sin, pos, first, scale)
    out = np.empty_like(q)
    mod.attention_decode(q, k, v, kc, vc, cos, sin, out, np.empty(n_heads * (pos + 1), np.float32),
                         pos, first, float(scale), _threads(threads))
    return out
