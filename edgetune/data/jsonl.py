"""Read and validate fine-tuning datasets in JSONL.

One example per line, in any of the three formats docs/design.md names:
``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat, as Azure AI
Foundry and OpenAI fine-tuning use), ``{"prompt": ..., "completion": ...}``,
or ``{"text": ...}``. Every problem is reported with file, line and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from ..files import temp_beside

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One validated example; exactly one of ``messages``, ``prompt``/``completion``, ``text``."""

    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    where: str = ""  # "file:line" it came from, for error messages

    @property
    def kind(self) -> str:
        if self.messages:
            return "messages"
        return "prompt" if self.prompt is not None else "text"

    def as_chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


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
        pairs = []
        for i, m in enumerate(msgs):
            field = f"messages[{i}]"
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(
                    f"{where}: field '{field}' must be an object with 'role' and 'content'"
                )
            if m["role"] not in ROLES:
                raise DataError(
                    f"{where}: field '{field}.role' is {m['role']!r}; "
                    f"expected one of {', '.join(ROLES)}"
                )
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: field '{field}.content' must be a string")
            pairs.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in pairs):
            raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
        return Example(messages=tuple(pairs), where=where)
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
