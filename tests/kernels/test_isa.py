"""The C core's instruction-set levels for Q4 x Q8 (kernels/csrc/q4q8.c): every SIMD level the
CPU has gives the AVX2 path's output bit for bit (the int32 lane sums and their float
accumulation are the same on all of them) over ragged shapes, every block size and both
variants; the scalar path matches the reference; the level is chosen from cpuid + xgetbv,
capped by EDGETUNE_ISA, and a level above the CPU's is never run."""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from edgetune.kernels import traits
from hypothesis import given, settings
from hypothesis import strategies as st

C = pytest.importorskip("edgetune.kernels._ckernels")
KERNEL = traits.KERNELS["q4_q8_gemm"]
Q4 = traits.FORMATS["q4"]
LEVELS = list(enumerate(C.ISA_NAMES))


def _run(level: int, x, weight, threads: int = 2):
    entry = KERNEL.entries["cython"]
    return entry.call(functools.partial(getattr(C, entry.symbol), simd=level), x, *weight, threads)


def _case(rng, m: int, chunks: int, n: int, block: int, variant: str):
    k = 64 * chunks
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, : k // 4] *= 40.0  # blocks of very different scales
    return x, Q4.from_float(rng.standard_normal((k, n)).astype(np.float32), block, variant)


@pytest.mark.parametrize("level,name", LEVELS[2:])
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 9),
    chunks=st.integers(1, 7),  # odd chunk counts exercise the AVX-512 tail
    n=st.integers(1, 13),  # not a multiple of the 4-row weight tiles
    block=st.sampled_from([16, 32, 64]),
    variant=st.sampled_from(Q4.variants),
    seed=st.integers(0, 2**16),
)
def test_simd_levels_are_bit_identical_to_avx2(level, name, m, chunks, n, block, variant, seed):
    if level > C.BEST_ISA:
        pytest.skip(f"this CPU lacks {name} (best: {C.ISA_NAMES[C.BEST_ISA]})")
    x, w = _case(np.random.default_rng(seed), m, chunks, n, block, variant)
    np.testing.assert_array_equal(_run(level, x, w), _run(1, x, w))


@pytest.mark.parametrize("block", [128, 256])
def test_large_blocks_on_every_level(block):
    rng = np.random.default_rng(block)
    x, w = _case(rng, 5, 12, 11, block, Q4.variants[-1])
    want = KERNEL.reference(x, *w)
    for level, _ in LEVELS[: C.BEST_ISA + 1]:
        np.testing.assert_allclose(
            _run(level, x, w), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
        )


def test_a_level_above_the_cpu_runs_the_best_it_has():
    # never an illegal instruction: the C core clamps the level to et_best_isa()
    x, w = _case(np.random.default_rng(1), 3, 3, 6, 32, Q4.variants[0])
    np.testing.assert_array_equal(_run(99, x, w), _run(C.BEST_ISA, x, w))


def _isa_in_child(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDGETUNE_ISA=value)
    code = "from edgetune.kernels import _ckernels as C; print(C.ISA_NAMES[C.ISA])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_edgetune_isa_caps_the_default_level():
    out = _isa_in_child("avx2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("avx2" if C.BEST_ISA >= 1 else "scalar")


def test_edgetune_isa_rejects_an_unknown_name():
    out = _isa_in_child("avx9000")
    assert out.returncode != 0
    assert "EDGETUNE_ISA='avx9000'" in out.stderr and "avx512_vnni" in out.stderr


def test_detected_level_agrees_with_the_kernel_cpu_flags():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        want = 3
    elif "avx_vnni" in flags and {"avx2", "fma"} <= flags:
        want = 2
    elif {"avx2", "fma"} <= flags:
        want = 1
    else:
        want = 0
    assert C.ISA_NAMES[C.BEST_ISA] == C.ISA_NAMES[want]


@pytest.mark.parametrize("level,name", LEVELS[1:])
def test_int8_peak_loop_does_the_work_it_counts(level, name):
    # the benchmark's peak: every multiply-add it counts lands in the checksum (8 chains of
    # 3 x -2 products, wrapped to int32), so none was optimised away
    if level > C.BEST_ISA:
        pytest.skip(f"this CPU lacks {name}")
    iters, threads = 1000, 2
    macs, checksum = C.int8_peak(iters, threads, level)
    lanes = 8 * (16 if level == 3 else 8)  # int32 lanes over the 8 chains
    assert macs == lanes * 4 * iters * threads
    want = (-24 * lanes * iters * threads + 2**31) % 2**32 - 2**31
    assert checksum == want
