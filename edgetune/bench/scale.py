"""``edgetune bench scale``: peak memory and time of every stage against the number of layers.

    edgetune bench scale                          # Phi-3-mini's width at 2, 4 and 8 layers
    edgetune bench scale --layers 32              # the full Phi-3-mini shape (7.6 GB of bf16)
    edgetune bench scale --hidden 128 --intermediate 256 --heads 4 --vocab 2048 --layers 1,2

For each layer count a random-weight model of the given width is built once and cached
(``bench.random_model``), then each stage runs on it in its own freshly spawned process, so
its peak RSS (VmHWM, imports included, as a user's process has them) is its own; its time is
that of the stage's call (its module imported and its inputs written first; what it imports
lazily counts). The models of all layer counts are found or built first, in one process.
The stages:

* ``export``      ``edgetune.export.export(model, out, ExportConfig())``: int4, the default
* ``merge``       ``edgetune.merge.merge`` of a random rank-16 PEFT adapter over every
                  projection, marked as trained on an NF4 base (a qlora merge)
* ``qlora-step``  ``edgetune.train.train``: qlora on the CPU, one optimizer step of one row
                  of the bundled smart-home data packed to <= 256 tokens, rank 16, gradient
                  checkpointing
* ``decode``      ``edgetune.runtime.Model.load(bundle)`` and greedy decoding (eos ignored),
                  once with ``backend="native"`` and once with ``"ort"``: tokens/s, bytes read
                  per token, their share of the read bandwidth measured in this same run, and
                  VmHWM / (bytes read per token + the KV cache's resident bytes)

Each stage's peak and wall time are fitted by least squares as ``y(L) = c + s·L`` and
extrapolated to a target shape T from the benchmarked shape B:

    y_T = c · E_T / E_B + s · L_T · P_T / P_B

    P = h·(h + 2·kv·d) + h·h + 3·h·i     parameters of one layer (q|k|v, o, gate|up|down)
    E = vocab · h                        the embedding's (and LM head's) parameters

(h hidden, i MLP width, kv key/value heads of size d = h / heads). The constant part also
holds the interpreter and its libraries, which do not grow with the vocabulary, so scaling
it by E over-estimates: the extrapolation errs high. Targets: Phi-3-mini (h 3072, i 8192, 32
heads, 32 layers, vocab 32064) and Phi-3-medium (h 5120, i 17920, 40 heads of which 10
key/value, 40 layers, vocab 32064). A stage that fails shows its error and the rest go on.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from . import in_fresh_process, peak_rss_bytes

STAGES = ("export", "merge", "qlora-step", "decode")
BACKENDS = ("native", "ort")
GB, MB = 1e9, 1e6  # decimal units throughout, as the targets are stated
PAGE = 4096


@dataclass(frozen=True)
class Shape:
    """A decoder's width: what the per-layer and constant parts of memory scale with."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int = 0  # a target's depth; 0 for a benchmarked width

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        return h * (h + 2 * kv) + h * h + 3 * h * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden


PHI3_MINI = Shape(hidden=3072, intermediate=8192, heads=32, kv_heads=32, vocab=32064, layers=32)
PHI3_MEDIUM = Shape(hidden=5120, intermediate=17920, heads=40, kv_heads=10, vocab=32064, layers=40)
TARGETS = {"phi3-mini": PHI3_MINI, "phi3-medium": PHI3_MEDIUM}


@dataclass(frozen=True)
class ScaleConfig:
    """What ``bench scale`` measures."""

    layers: tuple[int, ...] = (2, 4, 8)
    """Layer counts to build and measure (at least two for a slope)."""
    stages: tuple[str, ...] = STAGES
    """Stages to run, of export, merge, qlora-step, decode."""
    hidden: int = PHI3_MINI.hidden
    """Hidden size of the benchmark models (Phi-3-mini's by default)."""
    intermediate: int = PHI3_MINI.intermediate
    """MLP width."""
    heads: int = PHI3_MINI.heads
    """Attention heads."""
    kv_heads: int | None = None
    """Key/value heads (default: ``heads``, as Phi-3-mini)."""
    vocab: int = PHI3_MINI.vocab
    """Vocabulary size (>= 2048, the shipped tokenizer's ids)."""
    threads: int = 2
    """Threads of the runtime backends and of the bandwidth measurement."""
    prompt_tokens: int = 32
    """decode: prompt length."""
    new_tokens: int = 32
    """decode: tokens decoded (eos ignored)."""
    bandwidth_mb: int = 512
    """Buffer size of the read-bandwidth measurement (well above the last-level cache)."""
    keep: bool = False
    """Keep every stage's output (bundles, merged models, runs) and print where."""

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 1:
            raise ConfigError(f"--layers must be positive layer counts, got {self.layers}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"--stages must be some of {', '.join(STAGES)}, got {bad or 'none'}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.threads < 1:
            raise ConfigError("--prompt-tokens must be >= 1, --new-tokens >= 2, --threads >= 1")
        if self.prompt_tokens + self.new_tokens > 4096:
            raise ConfigError("--prompt-tokens + --new-tokens exceeds the models' 4096 positions")
        from .random_model import check_shape

        s = self.shape
        check_shape("phi3", 1, s.hidden, s.intermediate, s.heads, s.kv_heads, s.vocab, "BF16")

    @property
    def shape(self) -> Shape:
        return Shape(self.hidden, self.intermediate, self.heads, self.kv_heads or self.heads,
                     self.vocab)

    def model_args(self) -> dict:
        s = self.shape
        return dict(hidden=s.hidden, intermediate=s.intermediate, heads=s.heads,
                    kv_heads=s.kv_heads, vocab=s.vocab)


def parse_list(text: str, what: str, cast=str) -> tuple:
    """'2,4,8' -> (2, 4, 8), naming the flag when a value does not parse."""
    try:
        items = tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not items:
        raise ConfigError(f"--{what}: empty list")
    return items


# -- fitting and extrapolation ---------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """y(L) = intercept + slope·L by least squares over the measured layer counts."""

    intercept: float
    slope: float

    def at(self, layers: int) -> float:
        return self.intercept + self.slope * layers

    def extrapolate(self, bench: Shape, target: Shape) -> float:
        """y_T = c·E_T/E_B + s·L_T·P_T/P_B (see the module docstring)."""
        return (self.intercept * target.embedding_params / bench.embedding_params
                + self.slope * target.layers * target.layer_params / bench.layer_params)


def fit(points: list[tuple[int, float]]) -> Fit | None:
    """Least-squares line through (layers, value) points; None with fewer than two layer counts."""
    if len({x for x, _ in points}) < 2:
        return None
    mx, my = (sum(p[k] for p in points) / len(points) for k in (0, 1))
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return Fit(my - slope * mx, slope)


# -- the stages, each run in a fresh process -------------------------------------------------

def _export(model: str, out: str):
    from ..bundle import dir_bytes
    from ..export import ExportConfig, export

    def run() -> dict:
        export(model, out, ExportConfig(), force=True, log=lambda s: None)
        return {"bundle_bytes": dir_bytes(out)}
    return run


def _merge(model: str, adapter: str, out: str):
    from ..bundle import dir_bytes
    from ..merge import merge

    write_random_adapter(Path(model), Path(adapter))  # one small tensor at a time

    def run() -> dict:
        merge(model, adapter, out, force=True)
        return {"merged_bytes": dir_bytes(out)}
    return run


def _qlora_step(model: str, data: str, out: str):
    from ..train import TrainConfig, train

    cfg = TrainConfig(model=model, data=data, out=out, method="qlora", rank=16, alpha=32.0,
                      max_steps=1, seq_len=256, packing=True, batch_size=1, warmup_steps=1,
                      gradient_checkpointing=True, device="cpu", seed=0)

    def run() -> dict:
        run_dir = train(cfg, progress=False)
        rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        return {"loss": rec["loss"], "train_tokens_per_s": rec["tokens_per_s"]}
    return run


class _Box:
    """Stands in for the queue ``bench.runtime._measure`` puts its result on."""

    def put(self, item: dict) -> None:
        self.item = item


def _decode(backend: str, bundle: str, threads: int, prompt_tokens: int, new_tokens: int):
    from .runtime import _measure

    def run() -> dict:
        box = _Box()
        _measure(backend, bundle, threads, prompt_tokens, new_tokens, 1, box)
        return {k: v for k, v in box.item.items() if k not in ("name", "peak_rss_bytes")}
    return run


_STAGE_FNS = {"export": _export, "merge": _merge, "qlora-step": _qlora_step, "decode": _decode}


def _stage_child(stage: str, kwargs: dict, q: mp.Queue) -> None:
    """One stage in this fresh process: its setup (imports, inputs), then the timed call;
    {fields, wall_s, peak_rss_bytes} or {"error"} on the queue."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run = _STAGE_FNS[stage](**kwargs)
        t0 = time.perf_counter()
        out = run()
        out["wall_s"] = time.perf_counter() - t0
    except Exception as e:  # a failing stage is reported in the table; the rest go on
        q.put({"error": f"{type(e).__name__}: {e}"[:800]})
        return
    q.put({**out, "peak_rss_bytes": peak_rss_bytes()})


def _bandwidth_child(threads: int, nbytes: int, q: mp.Queue) -> None:
    from .kernels import read_bandwidth

    q.put({"read_bandwidth_gb_s": read_bandwidth(threads, nbytes)[0]})


def _build_child(layer_counts: list[int], model_args: dict, q: mp.Queue) -> None:
    """Find or build the model of every layer count (one process: one transformers import);
    {"models": [{layers, path, cached, build_s}], "build_peak_rss_bytes"} or {"error"}."""
    from .random_model import cached_random_model

    models = []
    try:
        for layers in layer_counts:
            t0 = time.perf_counter()
            path, cached = cached_random_model(layers, **model_args)
            models.append({"layers": layers, "path": str(path), "cached": cached,
                           "build_s": time.perf_counter() - t0})
    except Exception as e:
        q.put({"error": f"{type(e).__name__}: {e}"[:800]})
        return
    q.put({"models": models, "build_peak_rss_bytes": peak_rss_bytes()})


def _in_child(target, *args) -> dict:
    result, code = in_fresh_process(target, *args)
    return result if result is not None else {"error": f"the process died (exit code {code})"}


def run_stage(stage: str, **kwargs) -> dict:
    """One stage in a fresh process: {fields, wall_s, peak_rss_bytes, process_s (the whole
    child: start, imports, the stage)} or {"error"}."""
    t0 = time.perf_counter()
    r = _in_child(_stage_child, stage, kwargs)
    return {**r, "process_s": time.perf_counter() - t0}


# -- inputs ----------------------------------------------------------------------------------

def write_random_adapter(model_dir: Path, out: Path, rank: int = 16, alpha: float = 32.0,
                         seed: int = 0) -> Path:
    """A PEFT LoRA adapter of rank ``rank`` over every projection of ``model_dir``, random
    A ~ N(0, 1/in) and B ~ N(0, 0.02²) (so the merge has a delta to add), with edgetune's
    note that it was trained on an NF4 base, so merging it is a qlora merge."""
    import numpy as np

    from ..merge import ADAPTER_META
    from ..tensors import SafetensorsSource, SafetensorsWriter

    src = SafetensorsSource(model_dir)
    mods = [n[:-len(".weight")] for n in src.names()
            if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    targets = sorted({m.rsplit(".", 1)[1] for m in mods})
    specs = []
    for m in mods:
        n_out, n_in = src.info(f"{m}.weight").shape
        specs += [(f"base_model.model.{m}.lora_A.weight", "F32", (rank, n_in)),
                  (f"base_model.model.{m}.lora_B.weight", "F32", (n_out, rank))]
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with SafetensorsWriter(out / "adapter_model.safetensors", specs) as w:
        for name, _, shape in specs:
            std = 1 / math.sqrt(shape[1]) if ".lora_A." in name else 0.02
            w.write(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "use_dora": False,
              "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": str(model_dir)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {"method": "qlora", "base_quantization": "nf4", "base_model": str(model_dir),
            "rank": rank, "alpha": alpha}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def kv_resident_bytes(shape: Shape, layers: int, tokens: int) -> int:
    """Resident bytes of the native backend's fp32 KV cache after ``tokens`` tokens: keys and
    values of every (layer, kv head) are slabs touched a page at a time."""
    d = shape.hidden // shape.heads
    return 2 * layers * shape.kv_heads * math.ceil(tokens * d * 4 / PAGE) * PAGE


# -- the benchmark ---------------------------------------------------------------------------

@dataclass
class _Run:
    cfg: ScaleConfig
    work: Path
    log: object
    results: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    bandwidth: float | None = None
    data: Path | None = None

    def record(self, name: str, layers: int, r: dict) -> dict:
        row = {"name": name, "layers": layers, **r}
        if "peak_rss_bytes" in row:
            row["peak_rss_mb"] = row["peak_rss_bytes"] / MB
            row["ms"] = 1e3 * row["wall_s"]
            self.log(f"{name} @{layers} layers: peak RSS {row['peak_rss_mb']:.0f} MB, "
                     f"{row['wall_s']:.1f} s ({row['process_s']:.0f} s with the process's "
                     "start and imports)")
        else:
            self.log(f"{name} @{layers} layers: failed: {row['error']}")
        self.results.append(row)
        return row

    def build(self, layer_counts: list[int]) -> str | None:
        """Find or build every model (in one fresh process); the error, if that failed."""
        from ..bundle import dir_bytes

        self.log(f"finding or building the random models ({', '.join(map(str, layer_counts))} "
                 f"layers) under {self.work.parent} ...")
        built = _in_child(_build_child, layer_counts, self.cfg.model_args())
        if "error" in built:
            return built["error"]
        for m in built["models"]:
            self.models.append({**m, "bytes": dir_bytes(m["path"]),
                                "build_peak_rss_bytes": built["build_peak_rss_bytes"]})
        return None

    def fail_all(self, layers: int, error: str) -> None:
        for s in self.cfg.stages:
            for name in ([f"decode-{b}" for b in BACKENDS] if s == "decode" else [s]):
                self.record(name, layers, {"error": error})

    def layer_count(self, layers: int, model: Path) -> None:
        cfg, log = self.cfg, self.log
        log(f"-- {layers} layers: {model}")
        here = self.work / f"L{layers}"
        here.mkdir(parents=True, exist_ok=True)
        bundle = here / "bundle"
        if "export" in cfg.stages:
            self.record("export", layers, run_stage("export", model=str(model), out=str(bundle)))
        if "merge" in cfg.stages:
            self.record("merge", layers, run_stage("merge", model=str(model),
                                                   adapter=str(here / "adapter"),
                                                   out=str(here / "merged")))
            if not cfg.keep:
                shutil.rmtree(here / "merged", ignore_errors=True)
        if "qlora-step" in cfg.stages:
            self.record("qlora-step", layers, run_stage("qlora-step", model=str(model),
                                                        data=str(self.train_data()),
                                                        out=str(here / "run")))
        if "decode" in cfg.stages:
            self.decode(layers, model, bundle)
        if not cfg.keep:
            shutil.rmtree(here, ignore_errors=True)

    def train_data(self) -> Path:
        if self.data is None:
            from ..data import smart_home

            self.data, _ = smart_home.generate(self.work / "data", n_train=64, n_heldout=1)
        return self.data

    def decode(self, layers: int, model: Path, bundle: Path) -> None:
        from .runtime import weight_bytes

        cfg = self.cfg
        if not (bundle / "edgetune.json").is_file():  # export not asked for (or it failed)
            prep = run_stage("export", model=str(model), out=str(bundle))
            if "error" in prep:
                for b in BACKENDS:
                    self.record(f"decode-{b}", layers, {"error": f"export: {prep['error']}"})
                return
        if self.bandwidth is None:
            bw = _in_child(_bandwidth_child, cfg.threads, cfg.bandwidth_mb << 20)
            self.bandwidth = bw.get("read_bandwidth_gb_s")
            self.log(f"read bandwidth ({cfg.threads} threads): "
                     + ("n/a" if self.bandwidth is None else f"{self.bandwidth:.1f} GB/s"))
        try:
            total, per_token = weight_bytes(bundle)
        except Exception as e:  # a bundle this benchmark cannot read fails decode, not the run
            for b in BACKENDS:
                self.record(f"decode-{b}", layers, {"error": f"{type(e).__name__}: {e}"[:800]})
            return
        kv = kv_resident_bytes(cfg.shape, layers, cfg.prompt_tokens + cfg.new_tokens)
        for b in BACKENDS:
            r = run_stage("decode", backend=b, bundle=str(bundle), threads=cfg.threads,
                          prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens)
            if "error" not in r:
                r.update(weight_bytes=total, bytes_per_token=per_token, kv_bytes=kv,
                         rss_per_read_and_kv=r["peak_rss_bytes"] / (per_token + kv),
                         decode_weight_gb_s=per_token * r["tokens_per_s"] / GB)
                if self.bandwidth:
                    r["bw_utilisation"] = r["decode_weight_gb_s"] / self.bandwidth
            self.record(f"decode-{b}", layers, r)


def bench(cfg: ScaleConfig | None = None, log=print) -> dict:
    """Run every stage at every layer count; the report with ``results`` (one row per stage
    and layer count), ``fits`` (slopes and extrapolations) and ``targets`` (pass/fail)."""
    from .random_model import cache_root

    cfg = cfg or ScaleConfig()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    run = _Run(cfg, work, log)
    counts = sorted(set(cfg.layers))
    try:
        error = run.build(counts)
        for layers in counts:
            if error:
                run.fail_all(layers, f"building the model: {error}")
            else:
                run.layer_count(layers, Path(run.models[counts.index(layers)]["path"]))
    finally:
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    fits = fit_results(run.results, cfg.shape)
    report = {"benchmark": "scale", "shape": asdict(cfg.shape), "layers": sorted(set(cfg.layers)),
              "stages": list(cfg.stages), "threads": cfg.threads,
              "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
              "read_bandwidth_gb_s": run.bandwidth, "models": run.models,
              "work_dir": str(work) if cfg.keep else None,
              "results": run.results, "fits": fits}
    report["targets"] = targets(report)
    return report


def fit_results(results: list[dict], shape: Shape) -> list[dict]:
    """Per stage: slope and intercept of peak RSS and wall time, and both extrapolated to
    Phi-3-mini and Phi-3-medium."""
    out = []
    for name in dict.fromkeys(r["name"] for r in results):
        ok = [r for r in results if r["name"] == name and "error" not in r]
        entry: dict = {"name": name, "layers": [r["layers"] for r in ok]}
        for key, unit in (("peak_rss_bytes", "peak_rss_bytes"), ("wall_s", "wall_s")):
            f = fit([(r["layers"], r[key]) for r in ok])
            entry[f"{unit}_slope"] = f.slope if f else None
            entry[f"{unit}_intercept"] = f.intercept if f else None
            for tname, t in TARGETS.items():
                entry.setdefault(tname, {})[unit] = f.extrapolate(shape, t) if f else None
        out.append(entry)
    return out


def _measured(results: list[dict], name: str, layers: int, key: str, shape: Shape):
    """A measured value when the benchmark ran Phi-3-mini's own width at ``layers``."""
    same = (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.vocab) == (
        PHI3_MINI.hidden, PHI3_MINI.intermediate, PHI3_MINI.heads, PHI3_MINI.kv_heads,
        PHI3_MINI.vocab)
    for r in results:
        if same and r["name"] == name and r["layers"] == layers and "error" not in r:
            return r[key]
    return None


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with its value (measured where the run has it, else
    extrapolated), bound and pass/fail (None: no value)."""
    shape = Shape(**report["shape"])
    results, fits = report["results"], {f["name"]: f for f in report["fits"]}
    rows = []

    def add(name: str, value, bound: float, unit: str, source: str, most: bool = True):
        rows.append({"name": name, "value": value, "bound": bound, "unit": unit,
                     "at_least": not most, "source": source if value is not None else "n/a",
                     "passed": None if value is None else (value <= bound if most else
                                                          value >= bound)})

    def at_mini(stage: str, key: str):
        v = _measured(results, stage, 32, key, shape)
        if v is not None:
            return v, "measured"
        e = fits.get(stage, {}).get("phi3-mini", {}).get(key)
        return e, "extrapolated"

    v, src = at_mini("export", "peak_rss_bytes")
    add("export int4 peak RSS, Phi-3-mini", v, 2.0 * GB, "bytes", src)
    a, b = (_measured(results, "export", n, "peak_rss_bytes", shape) for n in (2, 8))
    slope = fits.get("export", {}).get("peak_rss_bytes_slope")
    if a is not None and b is not None:
        add("export peak(8 layers) - peak(2 layers)", b - a, 150 * MB, "bytes", "measured")
    else:
        add("export peak(8 layers) - peak(2 layers)", None if slope is None else
            6 * slope * PHI3_MINI.layer_params / shape.layer_params, 150 * MB, "bytes",
            "extrapolated")
    v, src = at_mini("export", "wall_s")
    add("export wall time, Phi-3-mini", v, 6 * 60, "s", src)
    v, src = at_mini("merge", "peak_rss_bytes")
    add("merge peak RSS, Phi-3-mini", v, 1.5 * GB, "bytes", src)
    v, src = at_mini("qlora-step", "peak_rss_bytes")
    add("qlora-step peak RSS, Phi-3-mini", v, 6 * GB, "bytes", src)
    native = [r for r in results if r["name"] == "decode-native" and "error" not in r]
    last = max(native, key=lambda r: r["layers"]) if native else {}
    src = f"measured ({last['layers']} layers)" if last else "n/a"
    add("native decode RSS / (bytes read per token + KV)", last.get("rss_per_read_and_kv"),
        1.1, "x", src)
    add("native decode share of read bandwidth", last.get("bw_utilisation"), 0.75, "share",
        src, most=False)
    for name, f in fits.items():
        add(f"{name} peak RSS, Phi-3-medium", f["phi3-medium"]["peak_rss_bytes"], 12 * GB,
            "bytes", "extrapolated")
    return rows


# -- the table -------------------------------------------------------------------------------

def _fmt(v, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "bytes":
        return f"{v / MB:.0f} MB" if abs(v) < GB else f"{v / GB:.2f} GB"
    if unit == "s":
        return f"{v:.1f} s"
    if unit == "share":
        return f"{100 * v:.0f}%"
    return f"{v:.2f}x" if unit == "x" else f"{v:.3g}"


def _stage_table(report: dict, key: str, title: str, unit: str) -> list[str]:
    """One row per stage: the value at each layer count, the slope per layer, the fit at 32
    layers of this width, and the extrapolations to Phi-3-mini and Phi-3-medium."""
    scale = MB if key == "peak_rss_bytes" else 1.0
    digits = 0 if key == "peak_rss_bytes" else 1

    def num(v) -> str:
        return "n/a" if v is None else f"{v / scale:.{digits}f}"

    layers = report["layers"]
    by = {(r["name"], r["layers"]): r for r in report["results"]}
    lines = [f"{title:<16}" + "".join(f"{'@' + str(n):>9}" for n in layers)
             + f"{unit + '/layer':>11}{'fit @32':>9}{'Phi-3-mini':>12}{'Phi-3-medium':>14}"]
    for f in report["fits"]:
        cells = []
        for n in layers:
            r = by.get((f["name"], n))
            cells.append("" if r is None else "error" if "error" in r else num(r[key]))
        slope, c = f[f"{key}_slope"], f[f"{key}_intercept"]
        lines.append(f"{f['name']:<16}" + "".join(f"{x:>9}" for x in cells)
                     + f"{num(slope):>11}{num(None if slope is None else c + 32 * slope):>9}"
                     + f"{num(f['phi3-mini'][key]):>12}{num(f['phi3-medium'][key]):>14}")
    return lines


def format_results(report: dict) -> str:
    s = report["shape"]
    lines = [f"random {s['hidden']}-wide model (MLP {s['intermediate']}, {s['heads']} heads, "
             f"{s['kv_heads']} key/value, vocab {s['vocab']}) at "
             f"{', '.join(map(str, report['layers']))} layers; {report['threads']} threads", ""]
    lines += _stage_table(report, "peak_rss_bytes", "peak RSS MB", "MB")
    lines += [""] + _stage_table(report, "wall_s", "wall s", "s")
    dec = [r for r in report["results"] if r["name"].startswith("decode-") and "error" not in r]
    if dec:
        bw = report.get("read_bandwidth_gb_s")
        lines += ["", f"decode: {report['prompt_tokens']}-token prompt, {report['new_tokens']} new "
                  f"tokens; read bandwidth in this run "
                  + ("n/a" if bw is None else f"{bw:.1f} GB/s"),
                  f"{'backend':<16}{'layers':>7}{'tok/s':>9}{'MB/token':>10}{'KV MB':>8}"
                  f"{'BW use':>8}{'RSS/(read+KV)':>15}"]
        for r in dec:
            util = r.get("bw_utilisation")
            lines.append(f"{r['name']:<16}{r['layers']:>7}{r['tokens_per_s']:>9.1f}"
                         f"{r['bytes_per_token'] / MB:>10.1f}{r['kv_bytes'] / MB:>8.1f}"
                         f"{'n/a' if util is None else f'{100 * util:.0f}%':>8}"
                         f"{r['rss_per_read_and_kv']:>15.2f}")
    lines += ["", f"{'target':<52}{'value':>11}{'bound':>12}  result"]
    for t in report["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[t["passed"]]
        bound = (">= " if t.get("at_least") else "<= ") + _fmt(t["bound"], t["unit"])
        lines.append(f"{t['name']:<52}{_fmt(t['value'], t['unit']):>11}{bound:>12}  "
                     f"{verdict} ({t['source']})")
    lines += ["", "fit @32: the least-squares line c + s*L at 32 layers of this width. "
              "Phi-3-mini / -medium: y = c*E_T/E_B + s*L_T*P_T/P_B,",
              "P = h*(h + 2*kv*d) + h*h + 3*h*i the parameters of one layer, E = vocab*h; "
              "mini: h 3072, i 8192, 32 layers; medium: h 5120,",
              "i 17920, kv 10 x d 128, 40 layers; vocab 32064. MB and GB are decimal."]
    errors = [f"  {r['name']} @{r['layers']}: {r['error']}" for r in report["results"]
              if "error" in r]
    if errors:
        lines += ["", "errors:"] + errors
    if report.get("work_dir"):
        lines += ["", f"outputs kept in {report['work_dir']}"]
    return "\n".join(lines)
