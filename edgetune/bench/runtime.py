"""``edgetune bench runtime``: the two runtime backends (ONNX Runtime and native) side by side.

    edgetune bench runtime                      # the cached ~0.5B Phi-3-shaped int4 bundle
    edgetune bench runtime BUNDLE --json --quick

Each backend runs in its own fresh process (so its peak RSS is its own) over the same
bundle, prompt and thread count: prefill tokens/s (one batched pass over the prompt),
first-token latency (prefill + picking the first token), decode tokens/s (greedy, one
token a pass, eos ignored so every run decodes the same count), peak RSS (VmHWM) against
the bundle's weight bytes, and decode bandwidth utilisation: the weight bytes one decode
step reads x decode tokens/s / the memory read bandwidth measured in this same run
(``bench.kernels.read_bandwidth``). Ratios are native / ort (> 1: native is faster). Then
the native backend's batched decode at 1, 2, 4 and 8 sequences (``bench/batched.py``).

With no bundle, a Phi-3-shaped model of ~0.55B random-weight parameters (hidden 1536,
16 layers, vocab 32064: DRAM-bound on a CPU; values do not matter for speed) is saved as
safetensors and exported with ``edgetune.export`` once, cached under
``$EDGETUNE_CACHE/bench`` (default ``~/.cache/edgetune/bench``); the build time is kept.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import best_round, in_fresh_process, peak_rss_bytes
from .batched import batched_decode, format_rows


class ResultQueue(Protocol):
    """Where ``_measure`` puts its result dict: an ``mp.Queue``, or anything with ``put``."""

    def put(self, obj: Any, /) -> None: ...


BACKENDS = ("ort", "native")
BENCH_MODEL = "phi3-0.55b-int4-v1"
# Phi-3-mini's shape scaled to ~0.55B parameters (head_dim 96, MHA, vocab 32064)
BENCH_CONFIG = dict(
    vocab_size=32064,
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    bos_token_id=0,
    eos_token_id=5,
    pad_token_id=1,
)


def cache_dir() -> Path:
    root = os.environ.get("EDGETUNE_CACHE") or Path.home() / ".cache" / "edgetune"
    return Path(root) / "bench"


# -- the benchmark bundle --------------------------------------------------------------------


def _build(out: Path, log) -> None:
    """Random Phi-3-shaped model -> safetensors -> ``edgetune.export`` (int4) at ``out``."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from ..export import ExportConfig, export
    from ..models import copy_tokenizer, tiny_model_path

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.model-", dir=out.parent))
    try:
        torch.manual_seed(0)
        model = Phi3ForCausalLM(Phi3Config(**BENCH_CONFIG)).float().eval()
        model.save_pretrained(work / "model", safe_serialization=True)
        del model
        copy_tokenizer(tiny_model_path(), work / "model")
        # the parity report is not the point here: one short text, two greedy steps
        text = work / "report.txt"
        text.write_text("The function returns the number of items in the list.\n")
        export(
            work / "model",
            out,
            ExportConfig(eval_data=str(text), report_tokens=2),
            force=True,
            log=log,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_child(out: str) -> None:
    _build(Path(out), log=lambda s: None)


def bench_bundle(log=print) -> tuple[Path, float, bool]:
    """(bundle, build seconds, was cached): the benchmark bundle, built once (in a child
    process, so the benchmark's own process stays torch-free) and renamed into place
    complete, under a lock so two concurrent runs build it once."""
    import fcntl

    from ..bundle import read_manifest

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    out, info = root / BENCH_MODEL, root / f"{BENCH_MODEL}.build.json"
    with open(root / f".{BENCH_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "edgetune.json").is_file() and info.is_file():
            read_manifest(out)
            return out, float(json.loads(info.read_text())["build_s"]), True
        log(f"building the benchmark bundle (~0.55B parameters, random weights) in {out} ...")
        t0 = time.perf_counter()
        p = mp.get_context("spawn").Process(target=_build_child, args=(str(out),))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"building the benchmark bundle failed (exit code {p.exitcode})")
        build_s = time.perf_counter() - t0
        tmp = info.with_suffix(".tmp")
        tmp.write_text(json.dumps({"build_s": round(build_s, 1), "config": BENCH_CONFIG}) + "\n")
        tmp.rename(info)
        log(f"built in {build_s:.0f} s")
        return out, build_s, False


# -- one backend, measured in its own process ------------------------------------------------


def _measure(
    backend: str,
    bundle: str,
    threads: int,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    out: ResultQueue,
) -> None:
    import sys

    from ..runtime import Model, SamplingConfig
    from ..runtime.sampling import select

    t0 = time.perf_counter()
    model = Model.load(bundle, backend=backend, threads=threads)
    load_s = time.perf_counter() - t0
    dec = model.decoder
    vocab = model.tokenizer.get_vocab_size()
    rng = np.random.default_rng(0)
    prompt = rng.integers(6, vocab, prompt_tokens).tolist()
    cfg = SamplingConfig(max_new_tokens=new_tokens)

    def run(ids: list[int], steps: int) -> tuple[float, float, float]:
        """(prefill s, first-token s, decode s for steps - 1 tokens); greedy, eos ignored."""
        context = list(ids)
        t0 = time.perf_counter()
        logits, past = dec.forward(np.array([ids], np.int64), last_only=True)
        t1 = time.perf_counter()
        nxt = select(logits[0, -1], context, cfg, rng)
        t2 = time.perf_counter()
        for _ in range(steps - 1):
            context.append(nxt)
            logits, past = dec.forward(np.array([[nxt]], np.int64), past)
            nxt = select(logits[0, -1], context, cfg, rng)
        return t1 - t0, t2 - t0, time.perf_counter() - t2

    run(prompt[:8], 3)  # warm-up: thread pools, compiled-kernel caches, first page faults
    runs = [run(prompt, new_tokens) for _ in range(repeats)]
    prefill, first, decode = np.median(np.array(runs), axis=0).tolist()
    out.put(
        {
            "name": backend,
            "load_s": load_s,
            "prefill_tokens_per_s": prompt_tokens / prefill,
            "tokens_per_s": (new_tokens - 1) / decode if new_tokens > 1 else 0.0,
            "first_token_ms": 1e3 * first,
            "peak_rss_bytes": peak_rss_bytes(),
            "torch_imported": "torch" in sys.modules,
        }
    )


def _run_backend(
    backend: str, bundle: Path, threads: int, prompt_tokens: int, new_tokens: int, repeats: int
) -> dict:
    result, code = in_fresh_process(
        _measure, backend, str(bundle), threads, prompt_tokens, new_tokens, repeats
    )
    if result is None:
        raise RuntimeError(f"bench runtime: the {backend} backend failed (exit code {code})")
    return result


# -- bytes -----------------------------------------------------------------------------------


def weight_bytes(bundle: Path) -> tuple[int, int]:
    """(the bundle's weight bytes: the decoder and its external data, the bytes one decode
    step reads: every projection + one row of the rest, the embedding table, whatever its
    format)."""
    from ..bundle import read_manifest
    from ..runtime.weights import OnnxWeights

    manifest = read_manifest(bundle)
    dec = manifest["decoder"]
    files = manifest["files"]
    total = sum(
        files[f]["bytes"] for f in (dec["filename"], dec.get("external_data")) if f in files
    )
    projections = sum(
        lin.nbytes for lin in OnnxWeights(bundle / dec["filename"]).linears().values()
    )
    return total, projections + (total - projections) // int(manifest["architecture"]["vocab_size"])


# -- the benchmark ---------------------------------------------------------------------------


def bench(
    bundle: str | os.PathLike | None = None,
    quick: bool = False,
    threads: int = 2,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    log=print,
) -> dict:
    """Measure both backends on ``bundle`` (default: the cached 0.55B benchmark bundle);
    returns {"benchmark", "bundle", ..., "results": [ort, native]}."""
    from ..bundle import read_manifest
    from ..errors import ConfigError
    from .kernels import read_bandwidth

    build_s, cached = None, None
    if bundle is None:
        bundle, build_s, cached = bench_bundle(log)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    prompt_tokens = prompt_tokens or (32 if quick else 128)
    new_tokens = new_tokens or (16 if quick else 64)
    context = int(manifest["decoder"]["context_length"])
    if prompt_tokens < 1 or new_tokens < 2 or threads < 1:
        raise ConfigError("--prompt-tokens must be >= 1, --new-tokens >= 2, --threads >= 1")
    if prompt_tokens + new_tokens > context:
        raise ConfigError(
            f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} exceeds "
            f"the bundle's context of {context} tokens"
        )
    total, per_token = weight_bytes(bundle)
    bw, _ = read_bandwidth(threads, (128 if quick else 512) << 20)
    log(
        f"read bandwidth ({threads} threads): {bw:.1f} GB/s; weights {total / 1e6:.0f} MB, "
        f"{per_token / 1e6:.0f} MB read per decoded token"
    )
    # rounds alternate the backends (ort, native, ort, native): a slow phase of this shared
    # machine then hits both, and each backend keeps its best round (noise only slows)
    rounds = 1 if quick else 2
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for _ in range(rounds):
        for backend in BACKENDS:
            runs[backend].append(
                _run_backend(backend, bundle, threads, prompt_tokens, new_tokens, 1 if quick else 3)
            )
    results = []
    for backend in BACKENDS:
        r = best_round(runs[backend], lambda r: r["tokens_per_s"], "peak_rss_bytes")
        r["peak_rss_mb"] = r["peak_rss_bytes"] / 2**20
        r["rss_per_weight_byte"] = r["peak_rss_bytes"] / total
        r["decode_weight_gb_s"] = per_token * r["tokens_per_s"] / 1e9
        r["bw_utilisation"] = r["decode_weight_gb_s"] / bw
        log(
            f"{backend}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode "
            f"{r['tokens_per_s']:.1f} tok/s, first token {r['first_token_ms']:.0f} ms, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (best of {rounds})"
        )
        results.append(r)
    ort, native = results
    native.update(
        baseline="ort",
        baseline_tokens_per_s=ort["tokens_per_s"],
        ratio=native["tokens_per_s"] / ort["tokens_per_s"],
        prefill_ratio=native["prefill_tokens_per_s"] / ort["prefill_tokens_per_s"],
        first_token_ratio=ort["first_token_ms"] / native["first_token_ms"],
        rss_ratio=native["peak_rss_bytes"] / ort["peak_rss_bytes"],
    )
    batched = batched_decode(bundle, threads, prompt_tokens, 8 if quick else 32)
    log(
        "native batched decode: "
        + ", ".join(f"{r['sequences']} seq {r['ratio']:.2f}x" for r in batched)
        + " the aggregate tokens/s of 1"
    )
    return {
        "benchmark": "runtime",
        "bundle": str(bundle),
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "weight_bytes": total,
        "decode_bytes_per_token": per_token,
        "read_bandwidth_gb_s": bw,
        "bundle_build_s": build_s,
        "bundle_cached": cached,
        "results": results,
        "batched": batched,
    }


def format_results(report: dict) -> str:
    def f(x, spec):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    head = (
        f"{'backend':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'first token ms':>16}"
        f"{'peak RSS MB':>13}{'RSS/weights':>13}{'decode BW util':>16}"
    )
    lines = [
        f"bundle {report['bundle']}: weights {report['weight_bytes'] / 1e6:.0f} MB, "
        f"{report['decode_bytes_per_token'] / 1e6:.0f} MB read per decoded token; "
        f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s; {report['threads']} "
        f"threads, {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens",
        head,
    ]
    for r in report["results"]:
        lines.append(
            f"{r['name']:<14}{r['prefill_tokens_per_s']:>14.1f}{r['tokens_per_s']:>14.1f}"
            f"{r['first_token_ms']:>16.0f}{r['peak_rss_mb']:>13.0f}"
            f"{r['rss_per_weight_byte']:>13.2f}{100 * r['bw_utilisation']:>15.0f}%"
        )
    n = report["results"][-1]
    if "ratio" in n:
        lines.append(
            f"{'native / ort':<14}{f(n['prefill_ratio'], '.2f') + 'x':>14}"
            f"{f(n['ratio'], '.2f') + 'x':>14}{f(n['first_token_ratio'], '.2f') + 'x':>16}"
            f"{f(n['rss_ratio'], '.2f') + 'x':>13}"
        )
        lines.append(
            "(speed ratios: > 1 means native is faster; first token: ort ms / native ms; "
            "RSS: native / ort)"
        )
    if report.get("batched"):
        lines += format_rows(report["batched"])
    if report.get("bundle_build_s") is not None:
        lines.append(
            f"benchmark bundle built in {report['bundle_build_s']:.0f} s"
            + (" (cached)" if report.get("bundle_cached") else "")
        )
    return "\n".join(lines)
