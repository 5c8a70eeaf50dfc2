"""The export's parity report: how much of the fp32 model each stage kept.

* ONNX vs PyTorch: ONNX Runtime on the bundle against PyTorch running the bundle's own
  (dequantized) weights: max |Δlogit|, relative logit error, greedy tokens over N steps;
* quantized vs fp32: top-1 next-token agreement, perplexity and the mean KL divergence of
  the next-token distributions on held-out text, both models run layer by layer from the
  checkpoint and the bundle (``layerwise.py``), one layer's weights in memory at a time;
* size of every file.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..data import load_examples, smart_home
from ..errors import ConfigError
from ..runtime.ort_backend import OrtDecoder
from .config import ExportConfig
from .scores import Scores


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The chat as the model sees it; plain "role: content" lines for a model without a template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render(tokenizer, ex) -> str:
    if ex.kind == "messages":
        return render_chat(tokenizer, ex.as_chat(), list(ex.tools) or None)
    if ex.kind == "prompt":
        return ex.prompt + ex.completion
    return ex.text


def task_texts(
    tokenizer, path: str | None, limit: int, heldout: bool, seed: int, what: str
) -> list[str]:
    """Up to ``limit`` texts: from a JSONL file (rendered as the model sees them) or a .txt
    file (paragraphs), else chats of the bundled task's held-out or training combinations."""
    if path and not Path(path).is_file():
        raise ConfigError(f"{path}: {what} not found")
    if path and str(path).endswith(".txt"):
        return [p.strip() for p in Path(path).read_text().split("\n\n") if p.strip()][:limit]
    if path:
        return [render(tokenizer, ex) for ex in load_examples(path)[:limit]]
    rng = random.Random(seed)
    train, held = smart_home.split_combinations(seed=0)
    combos = held if heldout else train
    return [
        render_chat(tokenizer, smart_home.make_example(rng, *rng.choice(combos))["messages"])
        for _ in range(limit)
    ]


def eval_texts(tokenizer, eval_data: str | None, limit: int = 64) -> list[str]:
    """Held-out texts: the given JSONL/.txt file, else the bundled task's held-out split."""
    return task_texts(tokenizer, eval_data, limit, heldout=True, seed=1, what="eval data")


def logits_over(decoder: OrtDecoder, ids: list[int]) -> np.ndarray:
    logits, _ = decoder.forward(np.array([ids], np.int64))
    return logits[0]  # (T, V)


def onnx_greedy(decoder: OrtDecoder, ids: list[int], steps: int) -> list[int]:
    logits, past = decoder.forward(np.array([ids], np.int64))
    out = []
    for _ in range(steps):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits, past = decoder.forward(np.array([[nxt]], np.int64), past)
    return out


def fp32_weight_bytes(model_dir: Path) -> int:
    """What the checkpoint's weights take in fp32 (the size a quantized bundle is judged by)."""
    from ..tensors import SafetensorsSource

    return 4 * sum(t.numel for t in SafetensorsSource(model_dir).tensors.values())


def parity_report(
    model_dir: Path, decoder: Path, token_lists: list[list[int]], cfg: ExportConfig
) -> dict:
    """``onnx_vs_torch``: ONNX Runtime on the bundle against PyTorch running the same
    (dequantized) weights — is the graph right; ``quant_vs_fp32``: the quantized weights
    against the checkpoint's, both run by PyTorch layer by layer — what quantization cost.
    One layer's weights in memory at a time; ONNX Runtime runs only when the bundle's data
    is at most ``cfg.report_ort_bytes`` (a session holds all of it).

    Greedy parity without decoding in PyTorch: ONNX Runtime decodes ``report_tokens``
    greedy tokens, then one PyTorch pass over prompt + tokens checks that each token is
    PyTorch's argmax at its position (the same as equal greedy sequences)."""
    from . import layerwise
    from .readback import BundleWeights

    dynamic = cfg.quant == "int8-dynamic"  # activations quantized per tensor: no PyTorch twin
    quantized = cfg.quant != "none" or cfg.embedding != "fp32"
    weights = BundleWeights(decoder) if quantized and not dynamic else None
    out: dict = {}
    if weights is not None:
        out["quant_vs_fp32"] = layerwise.parity(model_dir, token_lists, weights).metrics
    data = decoder.parent / (decoder.name + ".data")
    size = data.stat().st_size if data.is_file() else 0
    if size > cfg.report_ort_bytes:
        out["onnx_vs_torch"] = {
            "skipped": f"bundle data {size / 1e9:.2f} GB > report_ort_bytes "
            f"{cfg.report_ort_bytes / 1e9:.2f} GB"
        }
        return out
    dec = OrtDecoder(str(decoder))
    if dynamic:
        out["quant_vs_fp32"] = quant_vs_ort(
            layerwise.logits(model_dir, token_lists), dec, token_lists
        )
        return out
    prompt = token_lists[0][: max(4, len(token_lists[0]) // 2)]
    steps = cfg.report_tokens
    got_tokens = onnx_greedy(dec, prompt, steps)
    checked = token_lists[:4]
    ort_logits = [logits_over(dec, ids) for ids in checked]
    del dec  # ONNX Runtime's copy of the weights goes before PyTorch reads them again
    ref = list(layerwise.logits(model_dir, [*checked, prompt + got_tokens[:-1]], weights))
    max_abs = max_rel = 0.0
    for lo, lr in zip(ort_logits, ref, strict=False):
        diff = float(np.abs(lo - lr).max())
        max_abs, max_rel = (
            max(max_abs, diff),
            max(max_rel, diff / (float(np.abs(lr).max()) + 1e-12)),
        )
    ref_tokens = ref[-1][len(prompt) - 1 :].argmax(-1).tolist()
    agree = next(
        (i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens, strict=False)) if a != b), steps
    )
    out["onnx_vs_torch"] = {
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": max_rel,
        "greedy_steps": steps,
        "greedy_tokens_equal": agree == steps,
        "greedy_tokens_agree": agree,
        "weights": "dequantized from the bundle" if weights else "checkpoint",
    }
    return out


def quant_vs_ort(fp32_logits, quant: OrtDecoder, token_lists: list[list[int]]) -> dict:
    """Top-1 agreement, perplexity and KL(fp32 || quantized) of a decoder PyTorch cannot
    run (int8-dynamic), against the fp32 reference's logits (an iterator, one (T, V) a
    sequence, as ``layerwise.logits`` yields them)."""
    scores = Scores()
    for ids, lf in zip(token_lists, fp32_logits, strict=True):
        scores.add(lf[:-1], logits_over(quant, ids)[:-1], ids)
    return scores.result()


def format_report(report: dict) -> str:
    lines = ["parity report"]
    t = report.get("onnx_vs_torch")
    if t and "skipped" in t:
        lines.append(f"  ONNX vs PyTorch        skipped: {t['skipped']}")
    elif t:
        # on a quantized bundle both run its weights: what differs is ONNX Runtime's int8
        # activations (accuracy level 4), not the export; say so, or 1e-2 reads as a bug
        how = ""
        if t.get("weights") == "dequantized from the bundle":
            int8 = report.get("quantization", {}).get("accuracy_level") == 4
            how = "  (same weights; ORT's int8 activations)" if int8 else "  (same weights)"
        lines.append(
            f"  ONNX vs PyTorch        max|Δlogit| {t['max_abs_logit_diff']:.2e}  "
            f"rel {t['max_rel_logit_diff']:.2e}  greedy {t['greedy_steps']} tokens "
            f"{'equal' if t['greedy_tokens_equal'] else 'DIFFER'}{how}"
        )
    q = report.get("quant_vs_fp32")
    if q:
        spec = report["quantization"]
        name = (
            spec["quant"]
            + (f" {spec['algo']}" if "algo" in spec else "")
            + (
                f" +{spec['embedding']} embedding"
                if spec.get("embedding", "fp32") != "fp32"
                else ""
            )
        )
        lines.append(
            f"  {name} vs fp32 ONNX   top-1 agreement "
            f"{100 * q['top1_agreement']:.1f}%  ppl {q['ppl_fp32']:.3f} -> {q['ppl_quant']:.3f} "
            f"({100 * q['ppl_change']:+.2f}%)  KL {q['kl_mean']:.2e} over {q['tokens']} tokens"
        )
    lines.append("  files")
    for name, size in report["file_bytes"].items():
        lines.append(f"    {name:<28} {size / 1e6:9.2f} MB")
    return "\n".join(lines)
