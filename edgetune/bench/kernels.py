"""``edgetune bench kernels``: Q4 GEMV/GEMM and dequantization against ONNX Runtime.

For every shape (Phi-3-mini's projections) and batch, at 1 and 2 threads, each kernel
cycles over more than 64 MiB of distinct weight matrices, so the L3 cache cannot hide
DRAM. Reported per result: ms per matmul, weight GB/s, percent of the read bandwidth
measured in this same run, and the ratio against ONNX Runtime run in this same process
(> 1: edgetune is faster): ``MatMulNBits`` ``accuracy_level`` 4 for the integer Q4 x Q8
path, ``accuracy_level`` 0 for Q4 x fp32, ``MatMulBnb4`` (bitsandbytes NF4) for both NF4
GEMVs (exact fp32 and integer Q8).
Weight values do not matter for speed, so packed bytes and scales are random.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from .. import kernels
from ..kernels import Q4Weight

SHAPES = ((3072, 3072), (3072, 8192), (8192, 3072))  # (K, N) of Phi-3-mini's projections
BATCHES = (1, 8)
THREADS = (1, 2)
WORKING_SET = 80 << 20  # bytes of distinct weights to cycle over (> 64 MiB)
ROUNDS = 2  # alternating rounds over baseline and kernels; each keeps its best


@dataclass(frozen=True)
class BenchResult:
    name: str
    ms: float
    gbps: float
    pct_bw: float
    baseline: str | None = None
    ratio: float | None = None

    def as_dict(self) -> dict:
        d = {"name": self.name, "ms": self.ms, "weight_gb_s": self.gbps, "pct_read_bw": self.pct_bw}
        if self.baseline:
            d.update(baseline=self.baseline, ratio=self.ratio)
        return d


def _timeit(fn, min_time: float = 0.4, min_runs: int = 3) -> float:
    """Median seconds of one call to ``fn``, after a warm-up call."""
    fn()
    runs = []
    start = time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def _best_of(runs: dict, rounds: int = ROUNDS) -> dict:
    """Seconds per call of each named callable: the rounds alternate over all of them (a slow
    phase of a shared machine then hits the baseline and the kernel alike), and each keeps
    its fastest round's median (noise only ever slows a run down)."""
    best: dict = {}
    for _ in range(rounds):
        for name, fn in runs.items():
            sec = _timeit(fn)
            best[name] = min(sec, best.get(name, sec))
    return best


def read_bandwidth(threads: int, nbytes: int = 512 << 20) -> tuple[float, float]:
    """(read GB/s, copy GB/s counting bytes read + written) with ``threads`` threads."""
    import numba

    from ..kernels import numba_kernels

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    t_read = _timeit(lambda: numba_kernels.stream_sum(a))
    t_copy = _timeit(lambda: numba_kernels.stream_copy(a, b))
    return a.nbytes / t_read / 1e9, 2 * a.nbytes / t_copy / 1e9


def random_q4(k: int, n: int, block: int, rng: np.random.Generator) -> Q4Weight:
    packed = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, k // block)).astype(np.float32)
    return Q4Weight(packed, scales, None, k, n, block)


def ort_matmulnbits(weights: list[Q4Weight], m: int, accuracy_level: int, threads: int):
    """One ONNX Runtime session computing A @ B_i for every weight; returns a callable."""
    from onnx import TensorProto, helper, numpy_helper

    w0 = weights[0]
    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w.packed, f"B{i}"),
                  numpy_helper.from_array(w.scales.reshape(-1), f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"],
                                      domain="com.microsoft", K=w.k, N=w.n, bits=4,
                                      block_size=w.block, accuracy_level=accuracy_level))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, w.n]))
    return _ort_runner(nodes, outs, inits, m, w0.k, threads)


def _ort_runner(nodes, outs, inits, m: int, k: int, threads: int):
    """One ONNX Runtime session over ``nodes`` with input A (m, k); a callable running it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info(
        "A", TensorProto.FLOAT, [m, k])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    return lambda: sess.run(None, {"A": x})


def random_nf4(k: int, n: int, rng: np.random.Generator):
    """An NF4 weight of PyTorch Linear shape (N, K) with random codes."""
    from ..kernels import NF4Tensor

    numel = n * k
    return NF4Tensor(rng.integers(0, 256, numel // 2, dtype=np.uint8),
                     rng.integers(0, 256, numel // 64, dtype=np.uint8),
                     rng.uniform(0.01, 0.05, -(-numel // 64 // 256)).astype(np.float32), 0.1, (n, k))


def ort_matmulbnb4(weights: list, m: int, threads: int):
    """One ONNX Runtime session computing A @ dequant(W_i).T with ``MatMulBnb4`` (NF4)."""
    from onnx import TensorProto, helper, numpy_helper

    from ..kernels import reference

    n, k = weights[0].shape
    nodes, inits, outs = [], [], []
    for i, t in enumerate(weights):
        absmax = reference.dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)
        inits += [numpy_helper.from_array(reference.bnb_nf4_to_edgetune(t.packed), f"B{i}"),
                  numpy_helper.from_array(absmax, f"S{i}")]
        nodes.append(helper.make_node("MatMulBnb4", ["A", f"B{i}", f"S{i}"], [f"Y{i}"],
                                      domain="com.microsoft", K=k, N=n, block_size=64,
                                      quant_type=1))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, n]))
    return _ort_runner(nodes, outs, inits, m, k, threads)


def _nf4_results(k: int, n: int, batches, threads: int, bw: float, rng) -> list[BenchResult]:
    """NF4 GEMV (the QLoRA base format), exact fp32 (``nf4_gemv``) and integer
    (``nf4_q8_gemv``), against ``MatMulBnb4`` on the same weights."""
    one = random_nf4(k, n, rng)
    count = max(2, -(-WORKING_SET // one.nbytes))
    weights = [one] + [random_nf4(k, n, rng) for _ in range(count - 1)]
    res = []
    for m in batches:
        x = rng.standard_normal((m, k)).astype(np.float32)
        runs = {"ort": ort_matmulbnb4(weights, m, threads)}
        for kernel, fn in (("nf4_gemv", kernels.nf4_gemv), ("nf4_q8_gemv", kernels.nf4_q8_gemv)):
            for backend in ("cython", "numba"):
                def run_all(fn=fn, backend=backend, x=x):
                    with kernels.forced_backend(backend):
                        for t in weights:
                            fn(x, t, threads=threads)
                runs[f"{kernel}[{backend}]"] = run_all
        sec = {name: t / count for name, t in _best_of(runs).items()}
        base = sec.pop("ort")
        res.append(BenchResult(f"ort_matmulbnb4 {k}x{n} m{m} t{threads}", base * 1e3,
                               one.nbytes / base / 1e9, 100 * one.nbytes / base / 1e9 / bw))
        for name, t in sec.items():
            res.append(BenchResult(f"{name} {k}x{n} m{m} t{threads}", t * 1e3,
                                   one.nbytes / t / 1e9, 100 * one.nbytes / t / 1e9 / bw,
                                   "ort_matmulbnb4", base / t))
    return res


def bench(quick: bool = False, block: int = 32, log=print) -> list[BenchResult]:
    """Run the kernel benchmark; ``quick`` uses one shape, batch 1, 2 threads."""
    shapes = SHAPES[:1] if quick else SHAPES
    batches = BATCHES[:1] if quick else BATCHES
    threads_list = (2,) if quick else THREADS
    rng = np.random.default_rng(0)
    results: list[BenchResult] = []
    for threads in threads_list:
        # the bandwidths are measured before and after the kernels and the higher kept, as
        # every kernel keeps its best round; percentages are filled in at the end
        bw, copy_bw = read_bandwidth(threads)
        first = len(results)
        results.append(BenchResult(f"read_bandwidth t{threads}", 0.0, bw, 100.0))
        for k, n in shapes:
            one = random_q4(k, n, block, rng)
            count = max(2, -(-WORKING_SET // one.nbytes))
            weights = [one] + [random_q4(k, n, block, rng) for _ in range(count - 1)]
            wbytes = one.nbytes
            for m in batches:
                x = rng.standard_normal((m, k)).astype(np.float32)
                runs = {f"ort_matmulnbits_acc{acc} {k}x{n} m{m} t{threads}":
                        ort_matmulnbits(weights, m, acc, threads) for acc in (4, 0)}
                against = {}
                for kernel, fn, acc in (("q4q8_gemm", kernels.q4q8_gemm, 4),
                                        ("q4_gemm_f32", kernels.q4_gemm, 0)):
                    for backend in ("cython", "numba"):
                        def run_all(fn=fn, backend=backend, weights=weights, x=x, threads=threads):
                            with kernels.forced_backend(backend):
                                for w in weights:
                                    fn(x, w, threads=threads)
                        name = f"{kernel}[{backend}] {k}x{n} m{m} t{threads}"
                        runs[name] = run_all
                        against[name] = f"ort_matmulnbits_acc{acc}"
                sec = {name: t / count for name, t in _best_of(runs).items()}
                for name, t in sec.items():
                    base = against.get(name)
                    results.append(BenchResult(
                        name, t * 1e3, wbytes / t / 1e9, 100 * wbytes / t / 1e9 / bw, base,
                        sec[f"{base} {k}x{n} m{m} t{threads}"] / t if base else None))
            results += _nf4_results(k, n, batches, threads, bw, rng)
            if threads == threads_list[-1]:
                results += _dequant_results(weights, copy_bw, rng)
        bw_end, copy_end = read_bandwidth(threads)
        bw, copy_bw = max(bw, bw_end), max(copy_bw, copy_end)
        log(f"threads={threads}: read bandwidth {bw:.1f} GB/s, copy {copy_bw:.1f} GB/s "
            "(the higher of a measurement before and after the kernels)")
        results[first] = replace(results[first], gbps=bw)
        for i in range(first, len(results)):
            r = results[i]
            if r.baseline == "copy_bandwidth":
                results[i] = replace(r, pct_bw=100 * r.gbps / copy_bw, ratio=r.gbps / copy_bw)
            else:
                results[i] = replace(r, pct_bw=100 * r.gbps / bw)
    return results


def _dequant_results(weights: list[Q4Weight], copy_bw: float, rng) -> list[BenchResult]:
    """Q4 and NF4 dequantization to fp32 (all cores): bytes read + written, against the copy
    bandwidth (read + write) measured in the same run."""
    w0 = weights[0]
    numel = w0.k * w0.n
    nf4 = [random_nf4(w0.k, w0.n, rng) for _ in weights]
    out = np.empty((w0.n, w0.k), np.float32)  # written in place, as the copy it is compared to
    res = []
    runs, sizes = {}, {}
    for name, fn, items, nbytes in (
            ("q4_dequantize", lambda w: kernels.q4_dequantize(w, out.T), weights, w0.nbytes),
            ("nf4_dequantize", lambda t: kernels.nf4_dequantize(t, out), nf4, nf4[0].nbytes)):
        for backend in ("cython", "numba"):
            def run_all(fn=fn, items=items, backend=backend):
                with kernels.forced_backend(backend):
                    for it in items:
                        fn(it)
            label = f"{name}[{backend}] {w0.k}x{w0.n}"
            runs[label], sizes[label] = run_all, (nbytes, len(items))
    for label, sec in _best_of(runs).items():
        nbytes, count = sizes[label]
        moved = (nbytes + 4 * numel) / (sec / count) / 1e9
        res.append(BenchResult(label, sec / count * 1e3, moved, 100 * moved / copy_bw,
                               "copy_bandwidth", moved / copy_bw))
    return res


def format_results(results: list[BenchResult]) -> str:
    lines = [f"{'kernel':<44}{'ms':>9}{'GB/s':>8}{'% read BW':>11}  vs baseline"]
    for r in results:
        vs = f"{r.ratio:.2f}x {r.baseline}" if r.baseline else ""
        lines.append(f"{r.name:<44}{r.ms:>9.3f}{r.gbps:>8.2f}{r.pct_bw:>10.0f}%  {vs}")
    return "\n".join(lines)
