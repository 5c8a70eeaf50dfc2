"""Turn validated examples into token ids with a loss mask.

Loss is on assistant / completion tokens only (unless ``train_on_prompt``).
Chat examples are rendered with the tokenizer's own chat template; the tokens
of each assistant turn are found by rendering the conversation up to that turn
with and without it, so this works for any model family's template.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import DataError
from .jsonl import Example

IGNORE = -100  # label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    segments: tuple[int, ...] = ()  # lengths of the examples packed in this row, if packed


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_segments(tokenizer, ex: Example) -> list[tuple[list[int], bool]]:
    """(token ids, is_assistant) segments covering the whole rendered conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{ex.where}: a 'messages' example needs a chat template, and this "
            "model's tokenizer has none; use 'prompt'/'completion' or 'text' "
            "examples, or add chat_template.jinja to the model dir"
        )
    chat = ex.as_chat()
    segments: list[tuple[list[int], bool]] = []
    done: list[int] = []
    for i, msg in enumerate(chat):
        if msg["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat[: i + 1], tokenize=False)
        prefix_ids, full_ids = _ids(tokenizer, prefix), _ids(tokenizer, full)
        if full_ids[: len(prefix_ids)] != prefix_ids:
            raise DataError(
                "the chat template does not render a conversation as a prefix of "
                "its continuation; cannot mask the prompt tokens"
            )
        segments.append((prefix_ids[len(done) :], False))
        segments.append((full_ids[len(prefix_ids) :], True))
        done = full_ids
    return segments


def tokenize_example(tokenizer, ex: Example, train_on_prompt: bool = False) -> TokenizedExample:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.kind == "messages":
        segments = _chat_segments(tokenizer, ex)
    elif ex.kind == "prompt":
        # parse_example only makes a prompt example with both fields set
        assert ex.prompt is not None and ex.completion is not None
        segments = [
            (_ids(tokenizer, ex.prompt), False),
            (_ids(tokenizer, ex.completion) + eos, True),
        ]
    else:
        assert ex.text is not None  # neither messages nor prompt: parse_example set text
        segments = [(_ids(tokenizer, ex.text) + eos, True)]
    ids: list[int] = []
    labels: list[int] = []
    for seg, learn in segments:
        ids += seg
        labels += seg if (learn or train_on_prompt) else [IGNORE] * len(seg)
    return TokenizedExample(ids, labels)


def tokenize_examples(
    tokenizer,
    examples: list[Example],
    seq_len: int,
    source: str = "",
    strict: bool = False,
    train_on_prompt: bool = False,
) -> list[TokenizedExample]:
    """Tokenize all examples; sequences over ``seq_len`` are truncated with a warning,
    or refused under ``strict``."""
    out, too_long = [], []
    for i, ex in enumerate(examples):
        t = tokenize_example(tokenizer, ex, train_on_prompt)
        if len(t.input_ids) > seq_len:
            too_long.append(ex.where or f"example {i + 1}")
            t = TokenizedExample(t.input_ids[:seq_len], t.labels[:seq_len])
        if all(lab == IGNORE for lab in t.labels):
            raise DataError(
                f"{ex.where or source}: no tokens to learn from within --seq-len {seq_len}"
            )
        out.append(t)
    if too_long:
        msg = (
            f"{source}: {len(too_long)} example(s) longer than --seq-len {seq_len} "
            f"(first: {too_long[0]})"
        )
        if strict:
            raise DataError(msg + "; refusing under --strict")
        warnings.warn(msg + "; truncated", stacklevel=2)
    return out
