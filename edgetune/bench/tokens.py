"""``edgetune bench tokens``: the runtime's per-token work outside the model, against its
plain spec in the same run (runtime/reference.py): token selection at Phi-3's and Qwen2's
vocabulary sizes, and streaming text over growing generated lengths.

Selection runs on logits of two shapes: flat (standard normal x 2.5: a nucleus of
thousands of tokens, the worst case for top-p) and peaked (20 tokens raised by 10-16: a
trained LM's shape, a nucleus of a few). Text decodes random ids of the shipped tiny
tokenizer (byte-level BPE) token by token.
"""

from __future__ import annotations

import time

import numpy as np

from ..runtime.reference import WholeDecodeStream, select_reference
from ..runtime.sampling import SamplingConfig, select
from ..runtime.text import TextStream

VOCABS = (32064, 151936)  # Phi-3's, Qwen2's
CASES = (
    ("top_p=0.9", SamplingConfig(temperature=1.0, top_p=0.9)),
    ("top_k=50", SamplingConfig(temperature=1.0, top_k=50)),
    ("top_k=50 top_p=0.9", SamplingConfig(temperature=0.8, top_k=50, top_p=0.9)),
    ("temperature 1", SamplingConfig(temperature=1.0)),
)
LENGTHS = (256, 1024, 4096)
STOP = ("\x00\x00",)  # a stop string random ids never make: its hold is checked, never cut


def _logits(g: np.random.Generator, vocab: int, shape: str, n: int = 40) -> list[np.ndarray]:
    rows = []
    for _ in range(n):
        r = (g.standard_normal(vocab) * (2.5 if shape == "flat" else 1.5)).astype(np.float32)
        if shape == "peaked":
            r[g.integers(0, vocab, 20)] += g.uniform(10, 16, 20).astype(np.float32)
        rows.append(r)
    return rows


def _ms_per_call(fn, rows, cfg, ctx) -> float:
    best = float("inf")
    for _ in range(3):
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for r in rows:
            fn(r, ctx, cfg, rng)
        best = min(best, (time.perf_counter() - t) / len(rows) * 1e3)
    return best


def bench_selection(log=print) -> list[dict]:
    g = np.random.default_rng(1)
    out = []
    for vocab in VOCABS:
        ctx = g.integers(0, vocab, 300).tolist()
        for shape in ("flat", "peaked"):
            rows = _logits(g, vocab, shape)
            for name, cfg in CASES:
                ref = _ms_per_call(select_reference, rows, cfg, ctx)
                fast = _ms_per_call(select, rows, cfg, ctx)
                out.append({"vocab": vocab, "logits": shape, "sampling": name,
                            "reference_ms": ref, "select_ms": fast})  # fmt: skip
                log(f"  select V={vocab} {shape} {name}: {ref:.2f} -> {fast:.2f} ms")
    return out


def bench_text(log=print) -> list[dict]:
    from tokenizers import Tokenizer

    from ..models import tiny_model_path

    tok = Tokenizer.from_file(str(tiny_model_path() / "tokenizer.json"))
    g = np.random.default_rng(2)
    out = []
    for n in LENGTHS:
        ids = g.integers(0, tok.get_vocab_size(), n).tolist()
        times = {}
        for name, make in (
            ("whole", lambda: WholeDecodeStream(tok.decode, STOP)),
            ("stream", lambda: TextStream(tok, STOP)),
        ):
            best = float("inf")
            for _ in range(3):
                s = make()
                t = time.perf_counter()
                for i in ids:
                    s.push(i)
                s.finish()
                best = min(best, (time.perf_counter() - t) / n * 1e6)
            times[name] = best
        out.append({"tokens": n, "reference_us": times["whole"], "stream_us": times["stream"]})
        log(f"  text {n} tokens: {times['whole']:.1f} -> {times['stream']:.1f} us/token")
    return out


def bench(log=print) -> dict:
    return {"benchmark": "tokens", "selection": bench_selection(log), "text": bench_text(log)}


def format_results(report: dict) -> str:
    lines = ["token selection, ms per call (reference: whole vocabulary, full sort)",
             f"{'V':>7}  {'logits':<7}{'sampling':<20}{'reference':>10}{'select':>9}{'ratio':>8}"]  # fmt: skip
    for r in report["selection"]:
        lines.append(
            f"{r['vocab']:>7}  {r['logits']:<7}{r['sampling']:<20}{r['reference_ms']:>10.2f}"
            f"{r['select_ms']:>9.2f}{r['reference_ms'] / r['select_ms']:>7.1f}x"
        )
    lines += ["", "streaming text, us per token (reference: whole sequence decoded per token)",
              f"{'tokens':>7}{'reference':>11}{'stream':>9}{'ratio':>8}"]  # fmt: skip
    for r in report["text"]:
        lines.append(
            f"{r['tokens']:>7}{r['reference_us']:>11.1f}{r['stream_us']:>9.1f}"
            f"{r['reference_us'] / r['stream_us']:>7.1f}x"
        )
    return "\n".join(lines)
