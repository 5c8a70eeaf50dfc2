"""Read and validate fine-tuning datasets in JSONL.

One example per line, in any of the three formats docs/design.md names:
``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat, as Azure AI
Foundry and OpenAI fine-tuning use, with per-turn ``weight``, tools and tool
calls: see chat.py), ``{"prompt": ..., "completion": ...}``, or ``{"text": ...}``.
Files are UTF-8 as editors save them (a Windows byte-order mark is skipped).
Every problem is reported with file, line and field.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from ..files import temp_beside
from .chat import parse_message, parse_tools


@dataclass(frozen=True)
class Example:
    """One validated example; exactly one of ``messages``, ``prompt``/``completion``, ``text``."""

    messages: tuple[dict, ...] = ()  # as chat templates take them (chat.parse_message)
    weights: tuple[int, ...] = ()  # per message: 1 learns an assistant turn, 0 does not
    tools: tuple[dict, ...] = ()  # the line's function definitions, for the template
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    where: str = ""  # "file:line" it came from, for error messages

    @property
    def kind(self) -> str:
        if self.messages:
            return "messages"
        return "prompt" if self.prompt is not None else "text"

    def as_chat(self) -> list[dict]:
        """The messages as fresh dicts (a template or caller may change them)."""
        return copy.deepcopy(list(self.messages))

    def learned(self, i: int) -> bool:
        """Whether message ``i`` is an assistant turn the loss is taken on."""
        return self.messages[i]["role"] == "assistant" and self.weights[i] == 1


def _str_field(obj: dict, field: str, where: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def parse_example(obj: object, where: str) -> Example:
    """Validate one decoded JSON line; ``where`` is 'file:line' for error messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        parsed = [parse_message(m, where, f"messages[{i}]") for i, m in enumerate(msgs)]
        messages, weights = tuple(m for m, _ in parsed), tuple(w for _, w in parsed)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
        if not any(m["role"] == "assistant" and w for m, w in parsed):
            raise DataError(
                f"{where}: field 'messages' has only weight-0 assistant turns: nothing to learn"
            )
        tools = parse_tools(obj["tools"], where) if obj.get("tools") is not None else ()
        return Example(messages=messages, weights=weights, tools=tools, where=where)
    if "prompt" in obj or "completion" in obj:
        for field in ("prompt", "completion"):
            if field not in obj:
                raise DataError(f"{where}: field '{field}' is missing (prompt/completion format)")
        return Example(
            prompt=_str_field(obj, "prompt", where),
            completion=_str_field(obj, "completion", where),
            where=where,
        )
    if "text" in obj:
        text = _str_field(obj, "text", where)
        if not text:
            raise DataError(f"{where}: field 'text' is empty")
        return Example(text=text, where=where)
    raise DataError(f"{where}: no 'messages', 'prompt'/'completion' or 'text' field")


def load_examples(path: str | os.PathLike) -> list[Example]:
    """All examples of a JSONL file; blank lines are skipped, anything else must be valid."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # the byte-order mark Windows editors put first
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            examples.append(parse_example(obj, where))
    if not examples:
        raise DataError(f"{path}: dataset is empty")
    return examples


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL atomically (temporary file, then rename)."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
