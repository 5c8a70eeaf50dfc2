"""``edgetune bench serve``: the server under load, against ``edgetune run`` in the same run.

    edgetune bench serve                 # the cached ~0.55B Phi-3-shaped int4 bench bundle
    edgetune bench serve BUNDLE --json

A real ``edgetune serve`` child process on a free loopback port serves the bundle and, as
``lora16``, a random rank-16 LoRA adapter over every projection (numpy, PEFT's layout: values
do not matter for speed). Streamed completions of ``--prompt-tokens`` random token ids and ``--new-tokens`` tokens (greedy, ``ignore_eos``), each
token's event timestamped where it arrives, read by a bare standard-library SSE client (the
load generator shares the 2 cores with the server; the tests use the ``openai`` client):

* **streams**: 1, 2, 4 and 8 concurrent requests, ``--rounds`` times each: time to first
  token p50/p95 (request sent -> first token received, over every request of every round)
  and aggregate decode tokens/s (all streams' tokens received while every stream is
  decoding, i.e. between the last stream's first token and the first stream's last one,
  best round), with its ratio to one stream;
* **adapter**: one stream's decode tokens/s through ``lora16`` over the base's, alternated
  round by round (a merged bundle has the base's shapes and int4 blocks, so it decodes at
  the base's speed: the base stands for it);
* **overhead**: one stream's decode tokens/s through HTTP over ``edgetune run``'s own loop
  (``Model.generate_ids`` on the same bundle, threads and prompt, in a fresh process).

The server's peak RSS (VmHWM) is reported against the bundle's weight bytes.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from ..serve.process import ServerProcess
from . import in_fresh_process

STREAMS = (1, 2, 4, 8)
ADAPTER = "lora16"


@dataclass(frozen=True)
class ServeBenchConfig:
    threads: int = 2
    """Kernel threads of the server (and of the ``edgetune run`` baseline)."""
    prompt_tokens: int = 128
    """Prompt length of every request."""
    new_tokens: int = 64
    """Tokens each request decodes (ignore_eos)."""
    rounds: int = 3
    """Repetitions of each measurement (noise only slows a run: rates take the best)."""
    rank: int = 16
    """Rank of the benchmark adapter."""


def make_adapter(bundle: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors) with
    random A and B on every projection of ``bundle``."""
    from safetensors.numpy import save_file

    from ..bundle import read_manifest
    from ..runtime.native import NativeDecoder

    dec = NativeDecoder(bundle, read_manifest(bundle), threads=1)
    shapes = {name: (lin.n, lin.k) for name, lin in dec.lin.items() if "layers." in name}
    del dec
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (n, k) in shapes.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, k)) / k**0.5).astype(
            np.float32
        )
        tensors[f"{prefix}.lora_B.weight"] = (0.01 * rng.standard_normal((n, rank))).astype(
            np.float32
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = sorted({name.rsplit(".", 1)[-1] for name in shapes})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def stream_once(url: str, model: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed completion: when it was sent and when each token arrived (``logprobs: 0``
    makes every token an event, even one whose text is held back or empty). A bare standard-library
    SSE reader: on a 2-core machine the load generator shares the CPU with the server, so it
    must cost as little as it can (the tests drive the server with the ``openai`` client)."""
    parts = urlsplit(url)
    body = {
        "model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
        "logprobs": 0,
    }  # fmt: skip
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
    stamps: list[float] = []
    usage = None
    try:
        sent = time.perf_counter()
        conn.request("POST", f"{parts.path}/completions", json.dumps(body),
                     {"content-type": "application/json"})  # fmt: skip
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"bench serve: HTTP {r.status}: {r.read()[:300]!r}")
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"bench serve: {event['error']['message']}")
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and event["choices"][0].get("logprobs"):
                now = time.perf_counter()
                stamps += [now] * len(event["choices"][0]["logprobs"]["tokens"])
    finally:
        conn.close()
    if usage is None or usage["completion_tokens"] != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"bench serve: {len(stamps)} tokens streamed, {new_tokens} asked")
    return {"sent": sent, "stamps": stamps}


def concurrent(url: str, model: str, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Every prompt as its own stream, all started together."""
    results: list[dict | BaseException] = [RuntimeError("not run")] * len(prompts)
    start = threading.Barrier(len(prompts))

    def go(i: int) -> None:
        try:
            start.wait(60)
            results[i] = stream_once(url, model, prompts[i], new_tokens)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def decode_rate(streams: list[dict]) -> float:
    """Tokens/s of all streams together while every one of them is decoding."""
    if len(streams) == 1:
        s = streams[0]["stamps"]
        return (len(s) - 1) / (s[-1] - s[0])
    start = max(s["stamps"][0] for s in streams)
    end = min(s["stamps"][-1] for s in streams)
    n = sum(start < t <= end for s in streams for t in s["stamps"])
    return n / (end - start)


def _run_baseline(bundle: str, threads: int, prompt: list[int], new_tokens: int, rounds: int, out):
    """``edgetune run``'s decode loop on the bundle: (n-1) / (last - first token), best."""
    from ..runtime import Model
    from ..runtime.sampling import SamplingConfig

    model = Model.load(bundle, backend="native", threads=threads)
    model.eos_ids = []  # ignore_eos, as the server requests do
    best = 0.0
    for _ in range(rounds + 1):  # the first round warms up
        stamps = []
        for _tok in model.generate_ids(prompt, SamplingConfig(new_tokens, temperature=0)):
            stamps.append(time.perf_counter())
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    out.put({"tokens_per_s": best})


def _vocab_size(bundle: Path) -> int:
    from tokenizers import Tokenizer

    from ..bundle import read_manifest

    tok = Tokenizer.from_file(str(bundle / read_manifest(bundle)["tokenizer"]["file"]))
    return tok.get_vocab_size()


def bench(bundle: Path | None, cfg: ServeBenchConfig = ServeBenchConfig(), log=print) -> dict:
    from .runtime import bench_bundle, weight_bytes

    build_s, cached = None, None
    if bundle is None:
        bundle, build_s, cached = bench_bundle(log)
    bundle = Path(bundle)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-serve-") as tmp:
        adapter = make_adapter(bundle, Path(tmp) / ADAPTER, cfg.rank)
        vocab = _vocab_size(bundle)
        prompts = [rng.integers(6, vocab, cfg.prompt_tokens).tolist() for _ in range(max(STREAMS))]
        log(f"bench serve: {bundle.name}, {cfg.threads} threads, adapter rank {cfg.rank}")
        baseline, code = in_fresh_process(
            _run_baseline, str(bundle), cfg.threads, prompts[0], cfg.new_tokens, cfg.rounds
        )
        if baseline is None:
            raise RuntimeError(f"bench serve: the edgetune run baseline failed (exit {code})")
        server = ServerProcess(
            [
                str(bundle),
                "--name",
                "base",
                "--adapter",
                f"{ADAPTER}={adapter}",
                "--threads",
                str(cfg.threads),
                "--max-batch",
                str(max(STREAMS)),
            ]  # fmt: skip
        )
        try:
            url = server.url
            assert url is not None
            concurrent(url, "base", prompts[:2], 8)  # warm-up
            rows = []
            for k in STREAMS:
                rates, ttfts = [], []
                for _ in range(cfg.rounds):
                    streams = concurrent(url, "base", prompts[:k], cfg.new_tokens)
                    rates.append(decode_rate(streams))
                    ttfts += [s["stamps"][0] - s["sent"] for s in streams]
                ttfts.sort()
                rows.append(
                    {
                        "streams": k,
                        "tokens_per_s": max(rates),
                        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
                        "ttft_p95_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
                    }
                )
                log(f"  {k} streams: {rows[-1]['tokens_per_s']:.1f} tok/s")
            for r in rows:
                r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
            base_rates, adapter_rates = [], []
            for _ in range(cfg.rounds):
                base_rates.append(decode_rate(concurrent(url, "base", prompts[:1], cfg.new_tokens)))
                adapter_rates.append(
                    decode_rate(concurrent(url, ADAPTER, prompts[:1], cfg.new_tokens))
                )
            peak = server.memory_bytes("VmHWM")
        finally:
            server.stop()
    q_bytes, total_bytes = weight_bytes(bundle)
    single = max(rows[0]["tokens_per_s"], max(base_rates))
    return {
        "benchmark": "serve",
        "bundle": str(bundle),
        "config": cfg.__dict__,
        "cpu_count": os.cpu_count(),
        "bundle_build_s": build_s,
        "bundle_cached": cached,
        "streams": rows,
        "adapter": {
            "rank": cfg.rank,
            "base_tokens_per_s": max(base_rates),
            "adapter_tokens_per_s": max(adapter_rates),
            "ratio": max(adapter_rates) / max(base_rates),
        },
        "overhead": {
            "run_tokens_per_s": baseline["tokens_per_s"],
            "http_tokens_per_s": single,
            "ratio": single / baseline["tokens_per_s"],
        },
        "server_peak_rss_bytes": peak,
        "weight_bytes": total_bytes,
        "quantized_weight_bytes": q_bytes,
    }


def format_results(report: dict) -> str:
    c = report["config"]
    lines = [
        f"edgetune bench serve: {Path(report['bundle']).name}, {c['threads']} threads, "
        f"prompt {c['prompt_tokens']} tokens, {c['new_tokens']} new tokens per request",
        f"{'concurrent streams':<20}{'tok/s (all)':>12}{'vs 1':>8}{'TTFT p50':>11}{'p95':>9}",
    ]
    for r in report["streams"]:
        lines.append(
            f"{r['streams']:<20}{r['tokens_per_s']:>12.1f}{r['ratio']:>7.2f}x"
            f"{r['ttft_p50_ms']:>9.0f}ms{r['ttft_p95_ms']:>7.0f}ms"
        )
    a, o = report["adapter"], report["overhead"]
    lines += [
        f"adapter (LoRA r={a['rank']}, unmerged) decode: {a['adapter_tokens_per_s']:.1f} tok/s "
        f"vs base/merged {a['base_tokens_per_s']:.1f}: {a['ratio']:.2f}x",
        f"one stream through HTTP: {o['http_tokens_per_s']:.1f} tok/s vs edgetune run "
        f"{o['run_tokens_per_s']:.1f}: {o['ratio']:.2f}x",
        f"server peak RSS {report['server_peak_rss_bytes'] / 2**20:.0f} MiB "
        f"(weights {report['weight_bytes'] / 2**20:.0f} MiB)",
    ]
    return "\n".join(lines)
