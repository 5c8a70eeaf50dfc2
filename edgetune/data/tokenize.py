"""Turn validated examples into token ids with a loss mask.

Loss is on assistant / completion tokens only (unless ``train_on_prompt``), and
on an assistant turn only if its ``weight`` is 1. Chat examples are rendered with
the tokenizer's own chat template (with the line's ``tools``); the tokens of each
assistant turn are found by rendering the conversation up to that turn with and
without it, so this works for any model family's template.
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


def _chat_segments(tokenizer, ex: Example) -> list[tuple[list[int], bool | None]]:
    """(token ids, learn) segments covering the whole rendered conversation: learn is True
    for an assistant turn of weight 1, None for one of weight 0 (never learned, not even
    under ``train_on_prompt``), False for the prompt between them."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{ex.where}: a 'messages' example needs a chat template, and this "
            "model's tokenizer has none; use 'prompt'/'completion' or 'text' "
            "examples, or add chat_template.jinja to the model dir"
        )
    chat, tools = ex.as_chat(), list(ex.tools) or None

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2's TemplateError, or a template's raise_exception
            raise DataError(
                f"{ex.where}: the model's chat template refused this line ({e})"
            ) from None

    segments: list[tuple[list[int], bool | None]] = []
    done: list[int] = []
    for i, msg in enumerate(chat):
        if msg["role"] != "assistant":
            continue
        prefix, full = render(chat[:i], True), render(chat[: i + 1], False)
        for call in msg.get("tool_calls", ()):
            if call["function"]["name"] not in full[len(prefix) :]:
                raise DataError(
                    f"{ex.where}: field 'messages[{i}].tool_calls': the model's chat template "
                    "does not render tool calls (its assistant turn leaves them out); use a "
                    "model whose template supports tools, or put the call in 'content'"
                )
        prefix_ids, full_ids = _ids(tokenizer, prefix), _ids(tokenizer, full)
        if full_ids[: len(prefix_ids)] != prefix_ids:
            raise DataError(
                f"{ex.where}: the chat template does not render a conversation as a prefix "
                "of its continuation; cannot mask the prompt tokens"
            )
        segments.append((prefix_ids[len(done) :], False))
        segments.append((full_ids[len(prefix_ids) :], True if ex.learned(i) else None))
        done = full_ids
    return segments


def tokenize_example(tokenizer, ex: Example, train_on_prompt: bool = False) -> TokenizedExample:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.kind == "messages":
        segments: list[tuple[list[int], bool | None]] = _chat_segments(tokenizer, ex)
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
        learned = learn or (train_on_prompt and learn is not None)
        labels += seg if learned else [IGNORE] * len(seg)
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
