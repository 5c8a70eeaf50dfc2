"""The compute-bound half of ``edgetune bench kernels``: Q4 x Q8 GEMM at m = 1 ... 256
activation rows (prompt chunks, batched decode) against ONNX Runtime's ``MatMulNBits``
accuracy level 4 in the same run, in GOP/s (2 x m x K x N per call) and percent of the
int8 multiply-add peak measured in the same run by a tight loop of the C core's own
instruction (``vpdpbusd`` on the VNNI paths, ``vpmaddubsw`` + ``vpmaddwd`` on AVX2;
``kernels.int8_peak``). At m >= 16 the weights are re-read from cache by each activation
tile, so two weight matrices suffice; m = 1 and 4 stay in the DRAM-bound table."""

from __future__ import annotations

import time

import numpy as np

from .. import kernels
from ..kernels import traits

ROWS = (1, 4, 16, 64, 256)
SHAPE = (3072, 8192)  # (K, N): Phi-3-mini's gate/up projection width


def int8_peak(threads: int, seconds: float = 0.3) -> float:
    """GOP/s (2 per multiply-add) of the C core's int8 multiply-add loop on ``threads``
    threads, best of 3; 0.0 without the compiled module or SIMD."""
    try:
        from ..kernels import _ckernels as C
    except ImportError:
        return 0.0
    iters, best = 1 << 20, 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        macs, _ = C.int8_peak(iters, threads)
        dt = time.perf_counter() - t0
        if dt < seconds / 4:  # too short to time: grow once, then measure
            iters = int(iters * seconds / max(dt, 1e-6))
            continue
        best = max(best, 2 * macs / dt / 1e9)
    return best


def gemm_results(threads: int, log=print):
    """BenchResult rows: ORT and the C core's q4_q8_gemm at each m of ROWS on SHAPE."""
    from .kernels import BenchResult, _best_of, check_kernel, ort_matmulnbits

    peak = int8_peak(threads)
    log(f"int8 multiply-add peak ({kernels.isa()}, {threads} threads): {peak:.0f} GOP/s")
    kn, q4 = traits.KERNELS["q4_q8_gemm"], traits.FORMATS["q4"]
    if "cython" not in kernels.available_backends():
        return []
    k, n = SHAPE
    rng = np.random.default_rng(1)
    weights = [q4.random(k, n, 32, q4.variants[0], rng) for _ in range(2)]
    wbytes = weights[0][0].packed.nbytes + weights[0][0].scales.nbytes
    res = [BenchResult(f"int8_peak[{kernels.isa()}] t{threads}", 0.0, 0.0, 0.0, gops=peak)]
    for m in ROWS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        check_kernel(kn, "cython", x, weights[0], threads, None, None)
        tag = f"{k}x{n} m{m} t{threads}"

        def ours(x=x):
            with kernels.forced_backend("cython"):
                for w in weights:
                    kernels.q4_q8_gemm(x, *w, threads=threads)

        sec = _best_of({"ort": ort_matmulnbits([w[0] for w in weights], m, 4, threads), "et": ours})
        ops = 2 * m * k * n
        for name, t, base in (
            (f"ort_matmulnbits_acc4 {tag}", sec["ort"], None),
            (f"q4_q8_gemm[cython] {tag}", sec["et"], "ort_matmulnbits_acc4"),
        ):
            t /= len(weights)
            gops = ops / t / 1e9
            res.append(
                BenchResult(
                    name,
                    t * 1e3,
                    wbytes / t / 1e9,
                    0.0,
                    base,
                    sec["ort"] / sec["et"] if base else None,
                    gops=gops,
                    pct_peak=100 * gops / peak if peak else None,
                )
            )
    return res
