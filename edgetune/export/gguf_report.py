"""The GGUF export's parity report: llama.cpp running the file against the fp32 checkpoint.

``FILE.report.json`` holds ``gguf_vs_fp32`` with the keys of the ONNX bundle's
``quant_vs_fp32`` (top-1 next-token agreement, perplexity of both, KL(fp32 || GGUF)) on
the same held-out texts and token budget (``eval_data``, ``eval_tokens``), so the two
reports of one model compare directly. The fp32 side is ``layerwise.logits`` (one layer
of the checkpoint in memory at a time); the GGUF side is llama.cpp itself, through
llama-cpp-python, on the token ids the fp32 side sees: what llama.cpp and Ollama users
get, activation quantization in its kernels included. llama-cpp-python is optional (it
compiles llama.cpp on install): without it the report says so and the export goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..models import load_tokenizer, read_config
from .config import ExportConfig
from .report import eval_texts
from .scores import Scores


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _context(cfg: dict) -> int:
    """The longest sequence the report feeds llama.cpp: at most the model's original
    context, since llama.cpp switches Phi-3's rope to the long factors above it (PyTorch
    does so per sequence length, which stays below it then too)."""
    ctx = int(cfg.get("max_position_embeddings", 2048))
    orig = cfg.get("original_max_position_embeddings")
    return min(ctx, int(orig)) if orig else ctx


def gguf_report(
    model_dir: str | os.PathLike,
    gguf_path: str | os.PathLike,
    eval_data: str | None = None,
    eval_tokens: int = ExportConfig.eval_tokens,
    threads: int | None = None,
) -> dict:
    """``{"gguf_vs_fp32": {...}, "evaluator": ..., "eval_texts": n}`` for the GGUF file at
    ``gguf_path`` of the merged model ``model_dir``; ``{"skipped": why}`` without
    llama-cpp-python."""
    from . import budget, layerwise

    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ctx = _context(cfg)
    texts = eval_texts(tokenizer, eval_data)
    token_lists = budget(
        [tokenizer(t, add_special_tokens=False)["input_ids"][:ctx] for t in texts], eval_tokens
    )
    if not token_lists:
        raise ConfigError("the GGUF report needs eval text of at least two tokens")
    llm = llama_cpp.Llama(
        str(gguf_path),
        n_ctx=max(len(ids) for ids in token_lists),
        n_batch=512,
        n_threads=threads or os.cpu_count() or 1,
        logits_all=True,
        verbose=False,
    )
    scores = Scores()
    for ids, lf in zip(token_lists, layerwise.logits(model_dir, token_lists), strict=True):
        llm.reset()
        llm.eval(ids)
        lq = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        scores.add(lf[:-1], lq[:-1], ids)
    llm.close()
    return {
        "gguf_vs_fp32": scores.result(),
        "evaluator": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "eval_texts": len(token_lists),
    }


def write_report(out: Path, report: dict) -> Path:
    """``FILE.report.json`` beside ``FILE.gguf``."""
    path = out.with_suffix(".report.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_gguf_report(report: dict) -> str:
    if "skipped" in report:
        return f"GGUF report skipped: {report['skipped']}"
    q = report["gguf_vs_fp32"]
    return (
        f"GGUF vs fp32 ({report['evaluator']}, {q['tokens']} tokens): top-1 agreement "
        f"{100 * q['top1_agreement']:.1f}%  ppl {q['ppl_fp32']:.3f} -> {q['ppl_quant']:.3f}  "
        f"KL {q['kl_mean']:.2e}"
    )
