"""The kernel traits table: every quantized format and every kernel, as plain data.

One table in the spirit of ggml's ``type_traits``: adding a quant type or a backend (NEON,
...) means adding rows here, not another branch in every dispatcher.

**Formats** (``FORMATS``, one :class:`Format` each; the numpy spec is ``reference.py``):

======= ============================= ======================================= ==============
format  block (elements)              packed arrays: dtype (shape)            bytes / block
======= ============================= ======================================= ==============
``q4``  16, 32, 64, 128 or 256 along  ``packed`` u8 (N, K/block, block/2):    block/2 + 4
        K; symmetric (zero point 8)   element 2i of a block in the low        (+ 1/2 with
        or asymmetric (4-bit zero     nibble of byte i; ``scales`` f32        zero points)
        points)                       (N, K/block); ``zero_points`` u8
                                      (N, ceil(K/block / 2)), low nibble
                                      first, or None (symmetric)
``nf4`` 64 along the flattened        ``packed`` u8 (ceil(numel/2),), low     32 + 1 + 4/256
        tensor (a row may end inside  nibble first; ``absmax_q`` u8           (+ 4 a tensor:
        a block); absmax double-      (nblocks,), codes of DYNAMIC_MAP;       the absmax
        quantized in blocks of 256    ``absmax_scale`` f32                    offset)
                                      (ceil(nblocks/256),)
``q8``  16, 32, 64, 128 or 256 along  ``codes`` u8 (N, K/block, block), zero  block + 4
        K                             point 128 (they carry the shape);
                                      ``scales`` f32 (N, K/block)
======= ============================= ======================================= ==============

``q4`` is ONNX Runtime's ``MatMulNBits`` 4-bit layout of a MatMul weight B (K, N), ``q8``
its 8-bit layout (the LM head), ``nf4`` QLoRA / bitsandbytes NF4 of a PyTorch Linear
weight (N, K). Each format carries its reference quantize / dequantize, a size assertion
(:func:`check_weight`: every packed array has exactly the dtype and shape, so the bytes, that
the logical shape implies, or a ValueError naming the array), uniform ``from_float`` /
``to_float`` / ``random`` adapters over a (K, N) matrix (tests and the benchmark iterate over
the table with them), and the number of bytes a block stores.

**Kernels** (``KERNELS``: ops on a format; ``OPS``: the decoder's per-token ops that are
not per-format). Names follow ``<weight>_<activation>_<op>`` for matmuls, ``<format>_<op>``
otherwise. Activations are ``f32`` or ``q8`` (per-block symmetric int8 with one fp32 scale
a block, ``reference.q8_quantize``; block = the weight's block, 64 for NF4, quantized inside
the kernel):

==================== ====== ==== ===== ===================== =====================
kernel               weight act. bound cython symbol         numba symbol
==================== ====== ==== ===== ===================== =====================
``q4_q8_gemm``       q4     q8   1e-5  ``q4q8_gemm``         ``q4_q8_gemm``
``q4_f32_gemm``      q4     f32  1e-5  ``q4_gemm``           ``q4_f32_gemm``
``nf4_f32_gemv``     nf4    f32  1e-5  ``nf4_gemv``          ``nf4_f32_gemv``
``nf4_q8_gemv``      nf4    q8   1e-6  ``nf4_q8_gemv``       ``nf4_q8_gemv``
``q8_f32_gemm``      q8     f32  1e-5  ``q8w_gemm``          ``q8_f32_gemm``
``q4_dequantize``    q4     -    exact ``q4_dequantize_nk``  ``q4_dequantize_nk``
``nf4_dequantize``   nf4    -    exact ``nf4_dequantize``    ``nf4_dequantize``
``rms_norm``         -      f32  1e-5  ``rms_norm``          -
``swiglu``           -      f32  2e-6  ``swiglu``            -
``attention_decode`` -      f32  1e-5  ``attention_decode``  -
==================== ====== ==== ===== ===================== =====================

Every kernel also has a ``reference`` entry (the function of the same name in
``reference.py``). A bound is the largest allowed |fast - reference|, relative to
sum(|x|) x max(|weight|) per output row for a matmul (the magnitude of the terms summed, so
cancellation cannot fail it) and to max(|reference|) for an op; "exact" is bit-exact. The
Cython symbols keep the names of the compiled module (``_ckernels.pyx``); each
:class:`Entry` pairs a backend's symbol with the adapter (``adapters.py``) that passes it the public
arguments in the form it reads (the C core quantizes activations itself; Numba reads them
split into even and odd positions with block sums).

Backends, fastest first: ``cython`` (C core, AVX2+FMA picked at run time), ``numba``,
``reference``; ``dispatch.run`` picks one per call (``EDGETUNE_KERNELS`` /
``forced_backend`` first, then the next in that order that has the kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from . import adapters, reference
from .reference import ABSMAX_BLOCK, NF4_BLOCK, NF4_CODE, NF4_CODE_I8, Q4_BLOCK_SIZES

# -- the records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Array:
    """One packed array of a format's layout."""

    name: str  # attribute (or argument) name, as error messages name it
    dtype: type
    shape: str  # the shape the logical shape implies, as documentation
    optional: bool = False  # may be None (Q4 zero points of a symmetric weight)


@dataclass(frozen=True)
class Format:
    """Traits of one quantized weight format. A weight travels as its "args": the positional
    arguments the kernels take for it ((w,) for Q4, (t,) for NF4, (codes, scales) for Q8)."""

    name: str
    doc: str  # one line
    layout: tuple[Array, ...]
    block_sizes: tuple[int, ...]
    variants: tuple[str, ...]  # first is the default
    bytes_per_block: Callable[[int, str], float]  # (block, variant) -> bytes stored a block
    quantize: Callable  # reference quantize, its own signature
    dequantize: Callable  # reference dequantize, its own signature
    arrays: Callable[..., dict]  # args -> {array name: array or None}; ValueError if not one
    shapes: Callable[..., dict]  # args -> {array name: shape the logical shape implies}
    from_float: Callable[[np.ndarray, int, str], tuple]  # (K, N) fp32, block, variant -> args
    to_float: Callable[..., np.ndarray]  # args -> (K, N) fp32 (x @ it is the matmul)
    random: Callable[[int, int, int, str, np.random.Generator], tuple]  # random bytes -> args
    in_features: Callable[..., int]  # args -> K
    describe: Callable[..., str]  # args -> its logical shape, for error messages


@dataclass(frozen=True)
class Entry:
    """One backend's implementation of a kernel."""

    symbol: str  # function name in the backend's module
    call: Callable[..., Any]  # (fn, *public args) -> result: passes fn what it reads


@dataclass(frozen=True)
class Kernel:
    """Traits of one kernel."""

    name: str
    weight: str | None  # key of FORMATS, or None for a decoder op
    activation: str  # "f32", "q8", or "-" (dequantization)
    op: str  # "gemm", "gemv", "dequantize", or the op's name
    entries: Mapping[str, Entry]  # backend -> entry; always has "reference"
    bound: float  # allowed |fast - reference| / magnitude (module docstring); 0 = bit-exact
    k_multiple: int | None = None  # K must be a multiple of this (None: the weight's block)

    @property
    def reference(self) -> Callable:
        return getattr(reference, self.entries["reference"].symbol)


# -- the size assertion ------------------------------------------------------------------------


def check_weight(fmt: str, *args) -> None:
    """Size assertion of a weight in format ``fmt``: every packed array C-contiguous, of its
    dtype and of exactly the shape (so the bytes) that the weight's logical shape implies."""
    f = FORMATS[fmt]
    arrays, shapes = f.arrays(*args), f.shapes(*args)
    for a in f.layout:
        arr = arrays[a.name]
        if arr is None and a.optional:
            continue
        adapters.check(arr, a.name, a.dtype)
        want = shapes[a.name]
        if arr.shape != want:
            need = math.prod(want) * np.dtype(a.dtype).itemsize
            raise ValueError(
                f"{f.name} weight of {f.describe(*args)} has inconsistent sizes: "
                f"{a.name!r} is {arr.shape} ({arr.nbytes} bytes), its layout {a.shape} "
                f"needs {want} ({need} bytes)"
            )


# -- the tables --------------------------------------------------------------------------------

FORMATS: Mapping[str, Format] = MappingProxyType(
    {
        "q4": Format(
            name="Q4",
            doc="ONNX Runtime MatMulNBits 4-bit blocks of a (K, N) MatMul weight",
            layout=(
                Array("packed", np.uint8, "(N, K/block, block/2)"),
                Array("scales", np.float32, "(N, K/block)"),
                Array("zero_points", np.uint8, "(N, ceil(K/block / 2))", optional=True),
            ),
            block_sizes=Q4_BLOCK_SIZES,
            variants=("symmetric", "asymmetric"),
            bytes_per_block=lambda block, variant: block / 2 + 4 + (variant == "asymmetric") / 2,
            quantize=reference.q4_quantize,
            dequantize=reference.q4_dequantize,
            arrays=adapters.q4_arrays,
            shapes=adapters.q4_shapes,
            from_float=lambda b, block, variant: (
                reference.q4_quantize(b, block, variant == "symmetric"),
            ),
            to_float=reference.q4_dequantize,
            random=adapters.q4_random,
            in_features=lambda w: w.k,
            describe=lambda w: f"K={w.k}, N={w.n}, block={w.block}",
        ),
        "nf4": Format(
            name="NF4",
            doc="QLoRA NF4 with double-quantized absmax, of an (N, K) Linear weight",
            layout=(
                Array("packed", np.uint8, "(ceil(numel/2),)"),
                Array("absmax_q", np.uint8, "(ceil(numel/64),)"),
                Array("absmax_scale", np.float32, "(ceil(numel/64/256),)"),
            ),
            block_sizes=(NF4_BLOCK,),
            variants=("double-quantized absmax",),
            bytes_per_block=lambda block, variant: block / 2 + 1 + 4 / ABSMAX_BLOCK,
            quantize=reference.nf4_quantize,
            dequantize=reference.nf4_dequantize,
            arrays=adapters.nf4_arrays,
            shapes=adapters.nf4_shapes,
            from_float=lambda b, block, variant: (
                reference.nf4_quantize(np.ascontiguousarray(b.T)),
            ),
            to_float=lambda t: reference.nf4_dequantize(t).T,
            random=adapters.nf4_random,
            in_features=lambda t: t.shape[-1],
            describe=lambda t: f"shape {t.shape}",
        ),
        "q8": Format(
            name="Q8",
            doc="ONNX Runtime MatMulNBits 8-bit blocks (zero point 128), the LM head",
            layout=(
                Array("codes", np.uint8, "(N, K/block, block)"),
                Array("scales", np.float32, "(N, K/block)"),
            ),
            block_sizes=Q4_BLOCK_SIZES,
            variants=("zero point 128",),
            bytes_per_block=lambda block, variant: block + 4,
            quantize=reference.q8_weight_quantize,
            dequantize=reference.q8_weight_dequantize,
            arrays=adapters.q8_arrays,
            shapes=adapters.q8_shapes,
            from_float=lambda b, block, variant: reference.q8_weight_quantize(b, block),
            to_float=reference.q8_weight_dequantize,
            random=adapters.q8_random,
            in_features=lambda codes, scales: codes.shape[1] * codes.shape[2],
            describe=lambda codes, scales: f"(N, K/block, block)={codes.shape}",
        ),
    }
)


def _entries(**by_backend: Entry) -> Mapping[str, Entry]:
    return MappingProxyType(by_backend)


def _plain(fn, *args):
    """Reference entry of a matmul: the spec takes the weight args, not ``threads``."""
    return fn(*args[:-1])


KERNELS: Mapping[str, Kernel] = MappingProxyType(
    {
        "q4_q8_gemm": Kernel(
            "q4_q8_gemm",
            "q4",
            "q8",
            "gemm",
            _entries(
                cython=Entry("q4q8_gemm", adapters.q4_gemm_cython),
                numba=Entry("q4_q8_gemm", adapters.q4_gemm_numba(q8=True)),
                reference=Entry("q4_q8_gemm", _plain),
            ),
            bound=1e-5,
        ),
        "q4_f32_gemm": Kernel(
            "q4_f32_gemm",
            "q4",
            "f32",
            "gemm",
            _entries(
                cython=Entry("q4_gemm", adapters.q4_gemm_cython),
                numba=Entry("q4_f32_gemm", adapters.q4_gemm_numba(q8=False)),
                reference=Entry("q4_f32_gemm", _plain),
            ),
            bound=1e-5,
        ),
        "nf4_f32_gemv": Kernel(
            "nf4_f32_gemv",
            "nf4",
            "f32",
            "gemv",
            _entries(
                cython=Entry("nf4_gemv", adapters.nf4_gemv_cython(NF4_CODE)),
                numba=Entry("nf4_f32_gemv", adapters.nf4_f32_gemv_numba),
                reference=Entry("nf4_f32_gemv", _plain),
            ),
            bound=1e-5,
            k_multiple=1,
        ),
        "nf4_q8_gemv": Kernel(
            "nf4_q8_gemv",
            "nf4",
            "q8",
            "gemv",
            _entries(
                cython=Entry("nf4_q8_gemv", adapters.nf4_gemv_cython(NF4_CODE_I8)),
                numba=Entry("nf4_q8_gemv", adapters.nf4_q8_gemv_numba),
                reference=Entry("nf4_q8_gemv", _plain),
            ),
            bound=1e-6,
            k_multiple=NF4_BLOCK,
        ),
        "q8_f32_gemm": Kernel(
            "q8_f32_gemm",
            "q8",
            "f32",
            "gemm",
            _entries(
                cython=Entry("q8w_gemm", adapters.q8_gemm_fast(numba=False)),
                numba=Entry("q8_f32_gemm", adapters.q8_gemm_fast(numba=True)),
                reference=Entry("q8_f32_gemm", _plain),
            ),
            bound=1e-5,
        ),
        "q4_dequantize": Kernel(
            "q4_dequantize",
            "q4",
            "-",
            "dequantize",
            _entries(
                cython=Entry("q4_dequantize_nk", adapters.q4_dequantize_fast),
                numba=Entry("q4_dequantize_nk", adapters.q4_dequantize_fast),
                reference=Entry("q4_dequantize", adapters.q4_dequantize_ref),
            ),
            bound=0.0,
        ),
        "nf4_dequantize": Kernel(
            "nf4_dequantize",
            "nf4",
            "-",
            "dequantize",
            _entries(
                cython=Entry("nf4_dequantize", adapters.nf4_dequantize_cython),
                numba=Entry("nf4_dequantize", adapters.nf4_dequantize_numba),
                reference=Entry("nf4_dequantize", adapters.nf4_dequantize_ref),
            ),
            bound=0.0,
            k_multiple=1,
        ),
    }
)

OPS: Mapping[str, Kernel] = MappingProxyType(
    {
        "rms_norm": Kernel(
            "rms_norm",
            None,
            "f32",
            "rms_norm",
            _entries(
                cython=Entry("rms_norm", adapters.rms_norm_cython),
                reference=Entry("rms_norm", lambda fn, *args: fn(*args)),
            ),
            bound=1e-5,
        ),
        "swiglu": Kernel(
            "swiglu",
            None,
            "f32",
            "swiglu",
            _entries(
                cython=Entry("swiglu", adapters.swiglu_cython),
                reference=Entry("swiglu", lambda fn, gu: fn(gu)),
            ),
            bound=2e-6,
        ),
        "attention_decode": Kernel(
            "attention_decode",
            None,
            "f32",
            "attention_decode",
            _entries(
                cython=Entry("attention_decode", adapters.attention_cython),
                reference=Entry("attention_decode", adapters.attention_ref),
            ),
            bound=1e-5,
        ),
    }
)

#: Every kernel by name: what the dispatcher looks names up in.
TABLE: Mapping[str, Kernel] = MappingProxyType({**KERNELS, **OPS})


def matmuls() -> list[Kernel]:
    """The matmul kernels (x (M, K) @ weight -> (M, N)): what the benchmark times."""
    return [k for k in KERNELS.values() if k.op in ("gemm", "gemv")]


def magnitude(
    kernel: Kernel, want: np.ndarray, x: np.ndarray | None = None, weight: tuple | None = None
) -> Any:
    """What ``kernel``'s bound is relative to: sum(|x|) per row x max(|weight|) for a matmul
    (``x`` and the weight args needed; the same for every matmul of one format on one x), and
    max(|want|) for an op."""
    if kernel.op in ("gemm", "gemv"):
        assert kernel.weight is not None and weight is not None and x is not None  # a matmul
        w = FORMATS[kernel.weight].to_float(*weight)
        return np.abs(x).sum(axis=1, keepdims=True, dtype=np.float64) * float(np.abs(w).max())
    return float(np.abs(want).max(initial=0.0))


def excess(
    kernel: Kernel,
    got: np.ndarray,
    want: np.ndarray,
    x: np.ndarray | None = None,
    weight: tuple | None = None,
    mag: Any = None,
) -> float:
    """How far ``got`` is beyond ``kernel``'s bound around the reference result ``want``:
    max(|got - want| - bound x magnitude), <= 0 when within (``mag``: :func:`magnitude`,
    computed when not given)."""
    if got.shape != want.shape:
        return math.inf
    if mag is None:
        mag = magnitude(kernel, want, x, weight)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float((diff - kernel.bound * (mag + 1e-30)).max(initial=0.0))
