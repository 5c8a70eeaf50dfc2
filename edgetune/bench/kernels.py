"""``edgetune bench kernels``: every matmul and dequantization of the kernel traits table
(``kernels/traits.py``) on every fast backend, against ONNX Runtime.

Each (kernel, backend) is first checked against its numpy reference on the benchmark's own
weights and activations; a result beyond the kernel's bound raises KernelMismatch, so a new
table entry is checked and timed without touching this file. For every shape (Phi-3-mini's
projections) and batch, at 1 and 2 threads, each kernel cycles over twice the last-level
cache the OS reports of distinct weight matrices (80 MiB to 1 GiB), so the cache cannot hide
DRAM. Reported per result: ms per
matmul, weight GB/s, percent of the read bandwidth measured in this same run, and the ratio
against ONNX Runtime run in this same process (> 1: edgetune is faster): ``MatMulNBits``
``accuracy_level`` 4 for the integer Q4 x Q8 path, ``accuracy_level`` 0 for Q4 x fp32, 8-bit
``MatMulNBits`` for Q8 x fp32, ``MatMulBnb4`` (bitsandbytes NF4) for both NF4 GEMVs (exact
fp32 and integer Q8). Dequantization is measured as bytes read + written against the copy
bandwidth. ``edgetune bench kernels`` then adds the compute-bound rows of ``bench/gemm.py``
(Q4 x Q8 GEMM at m = 1 ... 256 in GOP/s and percent of the int8 peak measured in the same
run). The C core's instruction-set path (``kernels.isa()``) is printed first. Weight values do not matter for speed, so packed bytes and scales are random.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from .. import kernels
from ..kernels import NF4_BLOCK, Q4Weight, traits

SHAPES = ((3072, 3072), (3072, 8192), (8192, 3072))  # (K, N) of Phi-3-mini's projections
BATCHES = (1, 8)
THREADS = (1, 2)
MIN_WORKING_SET = 80 << 20  # bytes of distinct weights to cycle over, at least
MAX_WORKING_SET = 1 << 30  # and at most (memory and set-up time)


def last_level_cache() -> int:
    """Bytes of the largest cache the OS reports (sysfs), 0 if it reports none."""
    import glob

    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes)


def working_set() -> int:
    """Bytes of distinct weights each kernel cycles over: twice the last-level cache, so the
    weights come from DRAM (a Xeon here reported 480 MiB of L3; a fixed 80 MiB stayed in it)."""
    return min(MAX_WORKING_SET, max(MIN_WORKING_SET, 2 * last_level_cache()))


ROUNDS = 2  # alternating rounds over baseline and kernels; each keeps its best


@dataclass(frozen=True)
class BenchResult:
    name: str
    ms: float
    gbps: float
    pct_bw: float
    baseline: str | None = None
    ratio: float | None = None
    gops: float | None = None  # compute-bound rows (bench/gemm.py): GOP/s
    pct_peak: float | None = None  # and percent of the int8 peak measured in the same run

    def as_dict(self) -> dict:
        d = {"name": self.name, "ms": self.ms, "weight_gb_s": self.gbps, "pct_read_bw": self.pct_bw}
        if self.baseline:
            d.update(baseline=self.baseline, ratio=self.ratio)
        if self.gops is not None:
            d.update(gop_s=self.gops, pct_int8_peak=self.pct_peak)
        return d


def _timeit(fn, min_time: float = 0.4, min_runs: int = 3) -> float:
    """Median seconds of one call to ``fn``, after a warm-up call."""
    fn()
    runs: list[float] = []
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

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]  # set at import, absent from numba's stub
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    t_read = _timeit(lambda: numba_kernels.stream_sum(a))
    t_copy = _timeit(lambda: numba_kernels.stream_copy(a, b))
    return a.nbytes / t_read / 1e9, 2 * a.nbytes / t_copy / 1e9


def random_q4(k: int, n: int, block: int, rng: np.random.Generator) -> Q4Weight:
    return traits.FORMATS["q4"].random(k, n, block, "symmetric", rng)[0]


def random_nf4(k: int, n: int, rng: np.random.Generator):
    """An NF4 weight of PyTorch Linear shape (N, K) with random codes."""
    return traits.FORMATS["nf4"].random(k, n, NF4_BLOCK, "", rng)[0]


def ort_matmulnbits(weights: list, m: int, accuracy_level: int, threads: int, bits: int = 4):
    """One ONNX Runtime session computing A @ B_i for every weight (Q4Weight for 4 bits,
    (codes, scales) for 8); returns a callable."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        packed, scales = (w.packed, w.scales) if bits == 4 else w
        n, nb = scales.shape
        block = packed.shape[2] * 8 // bits
        inits += [
            numpy_helper.from_array(packed, f"B{i}"),
            numpy_helper.from_array(scales.reshape(-1), f"S{i}"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["A", f"B{i}", f"S{i}"],
                [f"Y{i}"],
                domain="com.microsoft",
                K=nb * block,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=accuracy_level,
            )
        )
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, n]))
    return _ort_runner(nodes, outs, inits, m, nb * block, threads)


def _ort_runner(nodes, outs, inits, m: int, k: int, threads: int):
    """One ONNX Runtime session over ``nodes`` with input A (m, k); a callable running it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])], outs, inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    return lambda: sess.run(None, {"A": x})


def ort_matmulbnb4(weights: list, m: int, threads: int):
    """One ONNX Runtime session computing A @ dequant(W_i).T with ``MatMulBnb4`` (NF4)."""
    from onnx import TensorProto, helper, numpy_helper

    from ..kernels import reference

    n, k = weights[0].shape
    nodes, inits, outs = [], [], []
    for i, t in enumerate(weights):
        absmax = reference.dequantize_absmax(t.absmax_q, t.absmax_scale, t.absmax_offset)
        inits += [
            numpy_helper.from_array(reference.bnb_nf4_to_edgetune(t.packed), f"B{i}"),
            numpy_helper.from_array(absmax, f"S{i}"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulBnb4",
                ["A", f"B{i}", f"S{i}"],
                [f"Y{i}"],
                domain="com.microsoft",
                K=k,
                N=n,
                block_size=64,
                quant_type=1,
            )
        )
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, n]))
    return _ort_runner(nodes, outs, inits, m, k, threads)


#: The baseline each matmul of the traits table is timed against, by name: a builder
#: (weights as args tuples, m, threads) -> callable. A kernel missing here is still checked
#: and timed, with no ratio.
BASELINES = {
    "q4_q8_gemm": (
        "ort_matmulnbits_acc4",
        lambda ws, m, t: ort_matmulnbits([w for (w,) in ws], m, 4, t),
    ),
    "q4_f32_gemm": (
        "ort_matmulnbits_acc0",
        lambda ws, m, t: ort_matmulnbits([w for (w,) in ws], m, 0, t),
    ),
    "q8_f32_gemm": ("ort_matmulnbits8_acc0", lambda ws, m, t: ort_matmulnbits(ws, m, 0, t, 8)),
    "nf4_f32_gemv": ("ort_matmulbnb4", lambda ws, m, t: ort_matmulbnb4([w for (w,) in ws], m, t)),
    "nf4_q8_gemv": ("ort_matmulbnb4", lambda ws, m, t: ort_matmulbnb4([w for (w,) in ws], m, t)),
}
#: How a dequantization kernel is handed the (N, K) fp32 buffer it fills in place.
DEQUANT_OUT = {"q4_dequantize": lambda buf: buf.T, "nf4_dequantize": lambda buf: buf}


class KernelMismatch(RuntimeError):
    """A fast kernel's result is beyond its bound around the reference: a bug, not noise."""


def _nbytes(args: tuple) -> int:
    """Bytes of one weight (its ``nbytes`` when it has one, else its arrays')."""
    if len(args) == 1 and hasattr(args[0], "nbytes"):
        return args[0].nbytes
    return sum(a.nbytes for a in args)


def _fast_backends(kernel: traits.Kernel) -> list[str]:
    return [b for b in kernel.entries if b != "reference" and b in kernels.available_backends()]


def check_kernel(
    kernel: traits.Kernel,
    backend: str,
    x: np.ndarray,
    weight: tuple,
    threads: int,
    want: np.ndarray | None = None,
    mag=None,
) -> tuple:
    """Run ``kernel`` on ``backend`` and raise KernelMismatch when its result is beyond the
    kernel's bound around the reference's. Returns (want, mag): the reference result and the
    magnitude the bound is relative to, for the next backend's check (computed when None)."""
    if want is None:
        want = kernel.reference(x, *weight)
    if mag is None:
        mag = traits.magnitude(kernel, want, x, weight)
    with kernels.forced_backend(backend):
        got = getattr(kernels, kernel.name)(x, *weight, threads=threads)
    over = traits.excess(kernel, got, want, mag=mag)
    if not over <= 0:
        raise KernelMismatch(
            f"{kernel.name}[{backend}] on x {x.shape}, "
            f"{traits.FORMATS[kernel.weight].describe(*weight)}: "
            f"{over:.3g} beyond its bound ({kernel.bound:g}) of the reference"
        )
    return want, mag


def _matmul_results(
    fmt: str, k: int, n: int, block: int, batches, threads: int, bw: float, rng
) -> tuple[list[BenchResult], list[tuple]]:
    """Every matmul of format ``fmt`` in the traits table, on every fast backend: checked
    against the reference, then timed against its baseline on the same weights. Also returns
    the weights (for the dequantization benchmark)."""
    f = traits.FORMATS[fmt]
    block = block if block in f.block_sizes else f.block_sizes[0]
    todo = [kn for kn in traits.matmuls() if kn.weight == fmt and k % (kn.k_multiple or block) == 0]
    if not todo:
        return [], []
    one = f.random(k, n, block, f.variants[0], rng)
    wbytes = _nbytes(one)
    count = max(2, -(-working_set() // wbytes))
    weights = [one] + [f.random(k, n, block, f.variants[0], rng) for _ in range(count - 1)]
    res = []
    for m in batches:
        x = rng.standard_normal((m, k)).astype(np.float32)
        tag = f"{k}x{n} m{m} t{threads}"
        runs, against = {}, {}
        for kn in todo:  # baselines first, each once
            if kn.name in BASELINES and f"{BASELINES[kn.name][0]} {tag}" not in runs:
                label, build = BASELINES[kn.name]
                runs[f"{label} {tag}"] = build(weights, m, threads)
        mag = None  # sum(|x|) x max(|w|): the same for every kernel of this format on x
        for kn in todo:
            want, fn = None, getattr(kernels, kn.name)
            for backend in _fast_backends(kn):
                want, mag = check_kernel(kn, backend, x, one, threads, want, mag)

                def run_all(fn=fn, backend=backend, x=x):
                    with kernels.forced_backend(backend):
                        for w in weights:
                            fn(x, *w, threads=threads)

                name = f"{kn.name}[{backend}] {tag}"
                runs[name] = run_all
                if kn.name in BASELINES:
                    against[name] = f"{BASELINES[kn.name][0]} {tag}"
        sec = {name: t / count for name, t in _best_of(runs).items()}
        for name, t in sec.items():
            base = against.get(name)
            res.append(
                BenchResult(
                    name,
                    t * 1e3,
                    wbytes / t / 1e9,
                    100 * wbytes / t / 1e9 / bw,
                    base and base.split()[0],
                    sec[base] / t if base else None,
                )
            )
    return res, weights


def bench(quick: bool = False, block: int = 32, log=print) -> list[BenchResult]:
    """Run the kernel benchmark; ``quick`` uses one shape, batch 1, 2 threads. Every kernel is
    checked against the reference before it is timed (KernelMismatch when beyond its bound)."""
    shapes = SHAPES[:1] if quick else SHAPES
    batches = BATCHES[:1] if quick else BATCHES
    threads_list = (2,) if quick else THREADS
    rng = np.random.default_rng(0)
    log(f"C core Q4 x Q8 path: {kernels.isa()} (cpuid + xgetbv; EDGETUNE_ISA caps it)")
    results: list[BenchResult] = []
    for threads in threads_list:
        # the bandwidths are measured before and after the kernels and the higher kept, as
        # every kernel keeps its best round; percentages are filled in at the end
        bw, copy_bw = read_bandwidth(threads)
        first = len(results)
        results.append(BenchResult(f"read_bandwidth t{threads}", 0.0, bw, 100.0))
        for k, n in shapes:
            weights = {}
            for fmt in traits.FORMATS:
                res, weights[fmt] = _matmul_results(fmt, k, n, block, batches, threads, bw, rng)
                results += res
            if threads == threads_list[-1]:
                results += _dequant_results(k, n, weights, copy_bw)
        bw_end, copy_end = read_bandwidth(threads)
        bw, copy_bw = max(bw, bw_end), max(copy_bw, copy_end)
        log(
            f"threads={threads}: read bandwidth {bw:.1f} GB/s, copy {copy_bw:.1f} GB/s "
            "(the higher of a measurement before and after the kernels)"
        )
        results[first] = replace(results[first], gbps=bw)
        for i in range(first, len(results)):
            r = results[i]
            if r.gops is not None:  # compute-bound rows: their own percent (of the peak)
                continue
            if r.baseline == "copy_bandwidth":
                results[i] = replace(r, pct_bw=100 * r.gbps / copy_bw, ratio=r.gbps / copy_bw)
            else:
                results[i] = replace(r, pct_bw=100 * r.gbps / bw)
    return results


def _dequant_results(k: int, n: int, weights: dict, copy_bw: float) -> list[BenchResult]:
    """Every dequantization kernel of the traits table to fp32 (all cores), on the weights of
    the matmul runs: checked bit for bit against the reference, then timed as bytes read +
    written against the copy bandwidth (read + write) measured in the same run."""
    out = np.empty((n, k), np.float32)  # written in place, as the copy it is compared to
    runs, sizes = {}, {}
    for kn in traits.KERNELS.values():
        items = weights.get(kn.weight)
        if kn.op != "dequantize" or not items:
            continue
        fn, into = getattr(kernels, kn.name), DEQUANT_OUT.get(kn.name, lambda buf: None)
        want = kn.reference(*items[0])
        for backend in _fast_backends(kn):
            with kernels.forced_backend(backend):
                got = fn(*items[0], into(out))
            if traits.excess(kn, got, want) > 0:
                raise KernelMismatch(
                    f"{kn.name}[{backend}] {k}x{n}: not bit-exact with the reference"
                )

            def run_all(fn=fn, items=items, backend=backend, into=into):
                with kernels.forced_backend(backend):
                    for it in items:
                        fn(*it, into(out))

            label = f"{kn.name}[{backend}] {k}x{n}"
            runs[label], sizes[label] = run_all, (_nbytes(items[0]), len(items))
    res = []
    for label, sec in _best_of(runs).items():
        nbytes, count = sizes[label]
        moved = (nbytes + 4 * k * n) / (sec / count) / 1e9
        res.append(
            BenchResult(
                label,
                sec / count * 1e3,
                moved,
                100 * moved / copy_bw,
                "copy_bandwidth",
                moved / copy_bw,
            )
        )
    return res


def format_results(results: list[BenchResult]) -> str:
    lines = [f"{'kernel':<44}{'ms':>9}{'GB/s':>8}{'% read BW':>11}  vs baseline"]
    compute = [r for r in results if r.gops is not None]
    for r in results:
        if r.gops is None:
            vs = f"{r.ratio:.2f}x {r.baseline}" if r.baseline else ""
            lines.append(f"{r.name:<44}{r.ms:>9.3f}{r.gbps:>8.2f}{r.pct_bw:>10.0f}%  {vs}")
    if compute:
        lines.append(
            f"{'GEMM (compute-bound)':<44}{'ms':>9}{'GOP/s':>8}{'% peak':>11}  vs baseline"
        )
    for r in compute:
        vs = f"{r.ratio:.2f}x {r.baseline}" if r.baseline else ""
        pct = f"{r.pct_peak:>10.0f}%" if r.pct_peak is not None else f"{'':>11}"
        lines.append(f"{r.name:<44}{r.ms:>9.3f}{r.gops:>8.0f}{pct}  {vs}")
    return "\n".join(lines)
