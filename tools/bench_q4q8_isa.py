"""Q4 x Q8 GEMV/GEMM of the C core on each x86 instruction-set path this CPU has (AVX2,
AVX-VNNI, AVX-512 VNNI) against ONNX Runtime's ``MatMulNBits`` accuracy level 4, same weights,
same run, 2 threads, over twice the last-level cache of distinct weights (as ``edgetune bench
kernels``). Prints one row per (shape, m): ORT's ms and GB/s, then each path's ratio to ORT
(> 1: edgetune is faster), its weight GB/s and GOP/s.

    python tools/bench_q4q8_isa.py [--shapes 3072x3072,3072x8192,8192x3072] [--m 1,4,16,64]
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
from edgetune.kernels import _ckernels as C
from edgetune.kernels import traits

from edgetune.bench.kernels import _best_of, ort_matmulnbits, read_bandwidth, working_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3072x3072,3072x8192,8192x3072", help="KxN,...")
    ap.add_argument("--m", default="1,4,16,64", help="activation rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    q4, entry = traits.FORMATS["q4"], traits.KERNELS["q4_q8_gemm"].entries["cython"]
    levels = [lv for lv in range(1, C.BEST_ISA + 1)]
    bw, _ = read_bandwidth(args.threads)
    print(f"best ISA {C.ISA_NAMES[C.BEST_ISA]}; read bandwidth {bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        one = q4.random(k, n, 32, q4.variants[0], rng)
        wbytes = one[0].packed.nbytes + one[0].scales.nbytes
        weights = [one] + [
            q4.random(k, n, 32, q4.variants[0], rng)
            for _ in range(max(2, working_set() // wbytes) - 1)
        ]
        total = wbytes * len(weights)
        for m in (int(v) for v in args.m.split(",")):
            x = rng.standard_normal((m, k)).astype(np.float32)
            runs = {"ort": ort_matmulnbits([w[0] for w in weights], m, 4, args.threads)}
            for lv in levels:

                def run(lv=lv, x=x, weights=weights):
                    fn = functools.partial(C.q4q8_gemm, simd=lv)
                    for w in weights:
                        entry.call(fn, x, *w, args.threads)

                runs[C.ISA_NAMES[lv]] = run
            sec = _best_of(runs)
            ort = sec.pop("ort")
            cells = [
                f"{name} {ort / t:.2f}x {total / t / 1e9:.1f} GB/s "
                f"{2 * m * k * n * len(weights) / t / 1e9:.0f} GOP/s"
                for name, t in sec.items()
            ]
            print(
                f"{k}x{n} m{m}: ort {ort / len(weights) * 1e3:.3f} ms {total / ort / 1e9:.1f} GB/s"
                f" ({100 * total / ort / 1e9 / bw:.0f}% BW) | " + " | ".join(cells)
            )


if __name__ == "__main__":
    main()
