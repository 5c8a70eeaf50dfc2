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

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .scale_stages import (
    bandwidth_child,
    build_child,
    in_child,
    run_stage,
)
from .scale_table import GB, MB, format_results

__all__ = ["ScaleConfig", "bench", "format_results", "targets", "fit_results"]

STAGES = ("export", "merge", "qlora-step", "decode")
BACKENDS = ("native", "ort")
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
        return Shape(
            self.hidden, self.intermediate, self.heads, self.kv_heads or self.heads, self.vocab
        )

    def model_args(self) -> dict:
        s = self.shape
        return dict(
            hidden=s.hidden,
            intermediate=s.intermediate,
            heads=s.heads,
            kv_heads=s.kv_heads,
            vocab=s.vocab,
        )


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
        return (
            self.intercept * target.embedding_params / bench.embedding_params
            + self.slope * target.layers * target.layer_params / bench.layer_params
        )


def fit(points: list[tuple[int, float]]) -> Fit | None:
    """Least-squares line through (layers, value) points; None with fewer than two layer counts."""
    if len({x for x, _ in points}) < 2:
        return None
    mx, my = (sum(p[k] for p in points) / len(points) for k in (0, 1))
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return Fit(my - slope * mx, slope)


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
    log: Callable[[str], object]
    results: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    bandwidth: float | None = None
    data: Path | None = None

    def record(self, name: str, layers: int, r: dict) -> dict:
        row = {"name": name, "layers": layers, **r}
        if "peak_rss_bytes" in row:
            row["peak_rss_mb"] = row["peak_rss_bytes"] / MB
            row["ms"] = 1e3 * row["wall_s"]
            self.log(
                f"{name} @{layers} layers: peak RSS {row['peak_rss_mb']:.0f} MB, "
                f"{row['wall_s']:.1f} s ({row['process_s']:.0f} s with the process's "
                "start and imports)"
            )
        else:
            self.log(f"{name} @{layers} layers: failed: {row['error']}")
        self.results.append(row)
        return row

    def build(self, layer_counts: list[int]) -> str | None:
        """Find or build every model (in one fresh process); the error, if that failed."""
        from ..bundle import dir_bytes

        self.log(
            f"finding or building the random models ({', '.join(map(str, layer_counts))} "
            f"layers) under {self.work.parent} ..."
        )
        built = in_child(build_child, layer_counts, self.cfg.model_args())
        if "error" in built:
            return built["error"]
        for m in built["models"]:
            self.models.append(
                {
                    **m,
                    "bytes": dir_bytes(m["path"]),
                    "build_peak_rss_bytes": built["build_peak_rss_bytes"],
                }
            )
        return None

    def fail_all(self, layers: int, error: str) -> None:
        for s in self.cfg.stages:
            for name in [f"decode-{b}" for b in BACKENDS] if s == "decode" else [s]:
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
            self.record(
                "merge",
                layers,
                run_stage(
                    "merge",
                    model=str(model),
                    adapter=str(here / "adapter"),
                    out=str(here / "merged"),
                ),
            )
            if not cfg.keep:
                shutil.rmtree(here / "merged", ignore_errors=True)
        if "qlora-step" in cfg.stages:
            self.record(
                "qlora-step",
                layers,
                run_stage(
                    "qlora-step",
                    model=str(model),
                    data=str(self.train_data()),
                    out=str(here / "run"),
                ),
            )
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
            bw = in_child(bandwidth_child, cfg.threads, cfg.bandwidth_mb << 20)
            self.bandwidth = bw.get("read_bandwidth_gb_s")
            self.log(
                f"read bandwidth ({cfg.threads} threads): "
                + ("n/a" if self.bandwidth is None else f"{self.bandwidth:.1f} GB/s")
            )
        try:
            total, per_token = weight_bytes(bundle)
        except Exception as e:  # a bundle this benchmark cannot read fails decode, not the run
            for b in BACKENDS:
                self.record(f"decode-{b}", layers, {"error": f"{type(e).__name__}: {e}"[:800]})
            return
        kv = kv_resident_bytes(cfg.shape, layers, cfg.prompt_tokens + cfg.new_tokens)
        for b in BACKENDS:
            r = run_stage(
                "decode",
                backend=b,
                bundle=str(bundle),
                threads=cfg.threads,
                prompt_tokens=cfg.prompt_tokens,
                new_tokens=cfg.new_tokens,
            )
            if "error" not in r:
                r.update(
                    weight_bytes=total,
                    bytes_per_token=per_token,
                    kv_bytes=kv,
                    rss_per_read_and_kv=r["peak_rss_bytes"] / (per_token + kv),
                    decode_weight_gb_s=per_token * r["tokens_per_s"] / GB,
                )
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
    report = {
        "benchmark": "scale",
        "shape": asdict(cfg.shape),
        "layers": sorted(set(cfg.layers)),
        "stages": list(cfg.stages),
        "threads": cfg.threads,
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
        "read_bandwidth_gb_s": run.bandwidth,
        "models": run.models,
        "work_dir": str(work) if cfg.keep else None,
        "results": run.results,
        "fits": fits,
    }
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
        PHI3_MINI.hidden,
        PHI3_MINI.intermediate,
        PHI3_MINI.heads,
        PHI3_MINI.kv_heads,
        PHI3_MINI.vocab,
    )
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
        rows.append(
            {
                "name": name,
                "value": value,
                "bound": bound,
                "unit": unit,
                "at_least": not most,
                "source": source if value is not None else "n/a",
                "passed": None if value is None else (value <= bound if most else value >= bound),
            }
        )

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
        add(
            "export peak(8 layers) - peak(2 layers)",
            None if slope is None else 6 * slope * PHI3_MINI.layer_params / shape.layer_params,
            150 * MB,
            "bytes",
            "extrapolated",
        )
    v, src = at_mini("export", "wall_s")
    add("export wall time, Phi-3-mini", v, 6 * 60, "s", src)
    v, src = at_mini("merge", "peak_rss_bytes")
    add("merge peak RSS, Phi-3-mini", v, 1.5 * GB, "bytes", src)
    v, src = at_mini("qlora-step", "peak_rss_bytes")
    add("qlora-step peak RSS, Phi-3-mini", v, 6 * GB, "bytes", src)
    native = [r for r in results if r["name"] == "decode-native" and "error" not in r]
    last = max(native, key=lambda r: r["layers"]) if native else {}
    src = f"measured ({last['layers']} layers)" if last else "n/a"
    add(
        "native decode RSS / (bytes read per token + KV)",
        last.get("rss_per_read_and_kv"),
        1.1,
        "x",
        src,
    )
    add(
        "native decode share of read bandwidth",
        last.get("bw_utilisation"),
        0.75,
        "share",
        src,
        most=False,
    )
    for name, f in fits.items():
        add(
            f"{name} peak RSS, Phi-3-medium",
            f["phi3-medium"]["peak_rss_bytes"],
            12 * GB,
            "bytes",
            "extrapolated",
        )
    return rows
