"""Held-out evaluation of any stage: exact-match accuracy, perplexity, decode speed.

Works on a Hugging Face model dir (PyTorch, optionally with a PEFT adapter) and
on a bundle (edgetune.runtime), so every stage of the pipeline is scored the
same way on the same examples. An example's prompt is the chat rendered up to
its last assistant turn (or the ``prompt``); the answer is that turn (or the
``completion``); exact match compares them as JSON when both parse, else as
stripped text.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data import Example, load_examples
from .errors import DataError


@dataclass(frozen=True)
class EvalResult:
    exact_match: float  # fraction of examples answered exactly
    perplexity: float  # over answer tokens, teacher-forced
    decode_tokens_per_s: float  # batch 1, greedy
    examples: int

    def as_dict(self) -> dict:
        return {
            "exact_match": self.exact_match,
            "perplexity": self.perplexity,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "examples": self.examples,
        }


def split_example(ex: Example, render) -> tuple[str, str]:
    """(prompt text, reference answer) for an example; ``render(messages, tools=...)`` renders
    a chat with the generation prompt appended."""
    if ex.kind == "messages":
        msgs = ex.as_chat()
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return render(msgs[:last], tools=list(ex.tools) or None), msgs[last]["content"]
    if ex.kind == "prompt":
        # parse_example only makes a prompt example with both fields set
        assert ex.prompt is not None and ex.completion is not None
        return ex.prompt, ex.completion
    raise DataError(
        f"{ex.where}: 'text' examples have no answer to score; use messages or prompt/completion"
    )


def answers_match(generated: str, reference: str) -> bool:
    try:
        return json.loads(generated.strip()) == json.loads(reference.strip())
    except (json.JSONDecodeError, ValueError):
        return generated.strip() == reference.strip()


def _nll(logits: np.ndarray, targets: list[int]) -> float:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return -float(logp[np.arange(len(targets)), targets].sum())


# -- bundles (torch-free) -------------------------------------------------------------------


def evaluate_bundle(
    model, examples: list[Example], max_new_tokens: int = 64, desc: str = "eval bundle"
) -> EvalResult:
    """Score a loaded ``edgetune.runtime.Model``."""
    from .runtime.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    hits, nll, count, speeds = 0, 0.0, 0, []
    for ex in tqdm(examples, desc=desc, unit="ex", disable=None, leave=False):
        prompt, ref = split_example(ex, model.render_chat)
        p_ids = model.encode(prompt)
        out = list(model.generate_ids(p_ids, cfg))
        speeds.append(model.last_stats["decode_tokens_per_s"])
        hits += answers_match(model.decode(out), ref)
        a_ids = model.tokenizer.encode(ref, add_special_tokens=False).ids + model.eos_ids[:1]
        logits, _ = model.decoder.forward(np.array([p_ids + a_ids], np.int64))
        nll += _nll(logits[0, len(p_ids) - 1 : -1], a_ids)
        count += len(a_ids)
    return EvalResult(
        hits / len(examples), math.exp(nll / count), float(np.median(speeds)), len(examples)
    )


# -- PyTorch models -------------------------------------------------------------------------


def evaluate_torch(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    speed_examples: int = 4,
    desc: str = "eval torch",
) -> EvalResult:
    """Score a PyTorch causal LM (plain or PEFT-wrapped): batched greedy decoding for
    accuracy, batch-1 decoding on a few examples for speed."""
    import torch

    def render(msgs, tools=None):
        return tokenizer.apply_chat_template(
            msgs, tools=tools, tokenize=False, add_generation_prompt=True
        )

    pairs = [split_example(ex, render) for ex in examples]
    eos = tokenizer.eos_token_id
    model.eval()
    hits, nll, count = 0, 0.0, 0
    tokenizer.padding_side = "left"
    with torch.no_grad():
        for i in tqdm(
            range(0, len(pairs), batch_size), desc=desc, unit="batch", disable=None, leave=False
        ):
            chunk = pairs[i : i + batch_size]
            enc = tokenizer(
                [p for p, _ in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                return_token_type_ids=False,
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            for (_, ref), row in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
                hits += answers_match(tokenizer.decode(row, skip_special_tokens=True), ref)
        for prompt, ref in pairs:
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(ref, add_special_tokens=False)["input_ids"] + [eos]
            logits = model(torch.tensor([p_ids + a_ids])).logits[0].float().numpy()
            nll += _nll(logits[len(p_ids) - 1 : -1], a_ids)
            count += len(a_ids)
        speeds = []
        for prompt, _ in pairs[:speed_examples]:
            enc = tokenizer(
                prompt, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False
            )
            t0 = time.perf_counter()
            out = model.generate(
                **enc,
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            speeds.append((out.shape[1] - enc["input_ids"].shape[1]) / (time.perf_counter() - t0))
    return EvalResult(
        hits / len(pairs), math.exp(nll / count), float(np.median(speeds)), len(pairs)
    )


def evaluate_path(path: str | Path, data: str | Path, limit: int | None = None) -> EvalResult:
    """``edgetune eval``: a bundle (has edgetune.json) or a Hugging Face model dir."""
    from .bundle import MANIFEST

    examples = load_examples(data)[:limit]
    path = Path(path)
    if (path / MANIFEST).is_file():
        from .runtime import Model

        return evaluate_bundle(Model.load(path), examples)
    from .models import load_model, load_tokenizer

    return evaluate_torch(load_model(path), load_tokenizer(path), examples)
