"""The kernel traits table: complete, its size assertions bite, every (kernel, backend) entry
matches its reference within the kernel's bound, and the dispatcher runs the forced backend."""

import copy
import dataclasses
import functools
import re

import numpy as np
import pytest
from edgetune.kernels import dispatch, traits
from edgetune.kernels import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune import kernels

FAST = [b for b in ("cython", "numba") if b in kernels.available_backends()]
CASES = [(k.name, b) for k in traits.matmuls() for b in FAST if b in k.entries]
DEQUANT = [
    (k.name, b)
    for k in traits.KERNELS.values()
    if k.op == "dequantize"
    for b in FAST
    if b in k.entries
]
RAGGED_K = [30, 64, 100, 192, 512]  # for kernels that take any K (NF4 x fp32)


def test_table_is_complete():
    assert set(traits.FORMATS) == {"q4", "q8", "nf4"}
    for name, f in traits.FORMATS.items():
        # the spec's quantize / dequantize, a layout and a block size for every format
        assert f.quantize.__module__ == ref.__name__ and f.dequantize.__module__ == ref.__name__
        assert f.layout and f.block_sizes and f.variants
        for block in f.block_sizes:
            for variant in f.variants:
                assert f.bytes_per_block(block, variant) > block / 2
        assert [k for k in traits.KERNELS.values() if k.weight == name], name
    for k in traits.TABLE.values():
        assert "reference" in k.entries and callable(k.reference)
        assert k.reference.__module__ == ref.__name__
        assert k.weight is None or k.weight in traits.FORMATS
        assert set(k.entries) <= set(dispatch.BACKENDS)
        for backend in kernels.available_backends():  # every entry point exists
            if backend in k.entries:
                assert callable(getattr(dispatch._load(backend), k.entries[backend].symbol))
        if k.op in ("gemm", "gemv"):  # <weight>_<activation>_<op>
            assert k.name == f"{k.weight}_{k.activation}_{k.op}"
            assert callable(getattr(kernels, k.name))
        else:
            assert callable(getattr(kernels, k.name))


@pytest.mark.parametrize("fmt", list(traits.FORMATS))
def test_bytes_per_block_is_what_the_arrays_hold(fmt):
    f = traits.FORMATS[fmt]
    k, n = 512, 32  # whole blocks of everything: Q4 zero-point bytes, NF4 absmax-scale blocks
    b = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    for block in f.block_sizes:
        for variant in f.variants:
            args = f.from_float(b, block, variant)
            traits.check_weight(fmt, *args)
            held = sum(a.nbytes for a in f.arrays(*args).values() if a is not None)
            assert held == k * n // block * f.bytes_per_block(block, variant)
            assert f.in_features(*args) == k
            assert f.to_float(*args).shape == (k, n)


def _with_array(fmt: str, args: tuple, name: str, arr) -> tuple:
    """``args`` with one packed array replaced (frozen weights copied without their checks)."""
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        w = copy.copy(args[0])
        object.__setattr__(w, name, arr)
        return (w,)
    names = [a.name for a in traits.FORMATS[fmt].layout]
    return tuple(arr if n == name else a for n, a in zip(names, args, strict=True))


@pytest.mark.parametrize("fmt", list(traits.FORMATS))
def test_size_assertion_names_the_wrong_array(fmt):
    f = traits.FORMATS[fmt]
    b = np.random.default_rng(1).standard_normal((128, 6)).astype(np.float32)
    args = f.from_float(b, f.block_sizes[0], f.variants[-1])  # Q4: asymmetric, zero points
    shapes = f.shapes(*args)
    for a in f.layout:
        good = f.arrays(*args)[a.name]
        assert good is not None and good.shape == shapes[a.name] and good.dtype == a.dtype
        if fmt == "q8" and a.name == "codes":  # the codes carry the logical shape
            bad = good.reshape(good.shape[0], -1)
            with pytest.raises(ValueError, match="codes must have 3 dimensions"):
                traits.check_weight(fmt, *_with_array(fmt, args, a.name, bad))
            continue
        bad = np.zeros(good.shape[:-1] + (good.shape[-1] + 1,), good.dtype)
        with pytest.raises(ValueError, match=re.escape(repr(a.name)) + ".*bytes"):
            traits.check_weight(fmt, *_with_array(fmt, args, a.name, bad))
        with pytest.raises(ValueError, match=re.escape(a.name)):  # wrong dtype, same bytes
            traits.check_weight(
                fmt,
                *_with_array(
                    fmt, args, a.name, good.view(np.int8) if good.dtype != np.int8 else good
                ),
            )


@pytest.mark.parametrize("kernel,backend", CASES)
@settings(max_examples=20, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 40),
    m=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 99),
)
def test_matmul_matches_reference(kernel, backend, data, n, m, threads, seed):
    kn = traits.KERNELS[kernel]
    f = traits.FORMATS[kn.weight]
    block = data.draw(st.sampled_from(f.block_sizes))
    variant = data.draw(st.sampled_from(f.variants))
    if kn.k_multiple == 1:
        k = data.draw(st.sampled_from(RAGGED_K))
    else:
        k = (kn.k_multiple or block) * data.draw(st.integers(1, 5 if kn.k_multiple else 3))
    rng = np.random.default_rng(seed)
    weight = f.from_float(rng.standard_normal((k, n)).astype(np.float32), block, variant)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 10, (m, 1))).astype(np.float32)
    with kernels.forced_backend(backend):
        got = getattr(kernels, kernel)(x, *weight, threads=threads)
    want = kn.reference(x, *weight)
    assert got.shape == (m, n) and got.dtype == np.float32
    assert traits.excess(kn, got, want, x, weight) <= 0


@pytest.mark.parametrize("kernel,backend", DEQUANT)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), seed=st.integers(0, 99))
def test_dequantize_bit_exact(kernel, backend, data, n, seed):
    kn = traits.KERNELS[kernel]
    f = traits.FORMATS[kn.weight]
    block = data.draw(st.sampled_from(f.block_sizes))
    variant = data.draw(st.sampled_from(f.variants))
    k = data.draw(
        st.sampled_from([2, 6, 64, 100, 320])
        if kn.k_multiple == 1
        else st.integers(1, 4).map(lambda kb: kb * block)
    )
    weight = f.from_float(
        np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32), block, variant
    )
    with kernels.forced_backend(backend):
        got = getattr(kernels, kernel)(*weight)
    np.testing.assert_array_equal(got, kn.reference(*weight))


@pytest.mark.parametrize("kernel", [k.name for k in traits.matmuls() if "cython" in k.entries])
def test_c_portable_path_matches_the_spec(kernel):
    # the C core's scalar fallback (CPUs without AVX2) is a separate code path: same results
    C = pytest.importorskip("edgetune.kernels._ckernels")
    kn = traits.KERNELS[kernel]
    f = traits.FORMATS[kn.weight]
    rng = np.random.default_rng(12)
    k, n, m = 128, 9, 3
    x = rng.standard_normal((m, k)).astype(np.float32)
    weight = f.from_float(
        rng.standard_normal((k, n)).astype(np.float32),
        32 if 32 in f.block_sizes else f.block_sizes[0],
        f.variants[-1],
    )
    want = kn.reference(x, *weight)
    entry = kn.entries["cython"]
    for simd in (False, True):
        out = entry.call(functools.partial(getattr(C, entry.symbol), simd=simd), x, *weight, 2)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


class _Called(Exception):
    pass


@pytest.mark.parametrize("kernel", [k.name for k in traits.matmuls()])
def test_dispatcher_runs_the_forced_backend(monkeypatch, kernel):
    kn = traits.KERNELS[kernel]
    f = traits.FORMATS[kn.weight]
    rng = np.random.default_rng(3)
    weight = f.from_float(rng.standard_normal((128, 4)).astype(np.float32), 64, f.variants[0])
    x = rng.standard_normal((2, 128)).astype(np.float32)
    for backend in FAST:

        def spy(*args, backend=backend, **kw):
            raise _Called(backend)

        with monkeypatch.context() as mp:
            mp.setattr(dispatch._load(backend), kn.entries[backend].symbol, spy)
            for other in FAST:  # only the forced one may be reached
                if other != backend:
                    mp.setattr(dispatch._load(other), kn.entries[other].symbol, None)
            with kernels.forced_backend(backend), pytest.raises(_Called, match=backend):
                getattr(kernels, kernel)(x, *weight)
    with kernels.forced_backend("reference"):
        assert kernels.backend(kernel) == "reference"
        np.testing.assert_array_equal(
            getattr(kernels, kernel)(x, *weight), kn.reference(x, *weight)
        )


def test_a_forced_backend_without_the_kernel_falls_to_the_next(monkeypatch):
    # Numba has no decoder ops: forced numba runs them on the reference
    monkeypatch.setenv("EDGETUNE_KERNELS", "numba")
    for name in traits.OPS:
        assert kernels.backend(name) == "reference"
    assert kernels.backend("q4_q8_gemm") == "numba"
    monkeypatch.setenv("EDGETUNE_KERNELS", "cython")
    assert all(kernels.backend(name) == "cython" for name in traits.TABLE)
    assert kernels.backend("stream_sum") == "numba"  # a name outside the table: by attribute
    monkeypatch.delenv("EDGETUNE_KERNELS")
    assert kernels.backend() == "cython" and kernels.backend("nf4_q8_gemv") == "cython"


@pytest.mark.parametrize("kernel,backend", CASES)
def test_bench_check_passes_on_random_bytes_and_fails_a_wrong_kernel(monkeypatch, kernel, backend):
    # the benchmark's weights are random bytes (every code, any zero point): checked the same
    from edgetune.bench.kernels import KernelMismatch, check_kernel

    kn = traits.KERNELS[kernel]
    f = traits.FORMATS[kn.weight]
    rng = np.random.default_rng(5)
    weight = f.random(256, 24, f.block_sizes[0], f.variants[-1], rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    check_kernel(kn, backend, x, weight, threads=2)
    entry = kn.entries[backend]
    right = getattr(dispatch._load(backend), entry.symbol)

    def off_by_a_little(*args, **kw):
        right(*args, **kw)
        args[-1 if backend == "numba" else -2][0, 0] += 0.1  # out: last, or before threads

    monkeypatch.setattr(dispatch._load(backend), entry.symbol, off_by_a_little)
    with pytest.raises(KernelMismatch, match=re.escape(f"{kernel}[{backend}]")):
        check_kernel(kn, backend, x, weight, threads=2)
