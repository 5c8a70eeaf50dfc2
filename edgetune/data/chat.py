"""The chat fine-tuning format of Azure AI Foundry and OpenAI, message by message, into the
messages transformers' chat templates take.

What a line may hold, and what it becomes:

- ``role``: ``system``, ``developer`` (OpenAI's newer name for it: rendered as ``system``,
  which is what chat templates know), ``user``, ``assistant`` or ``tool``;
- ``content``: a string, or a list of parts of which the ``text`` ones are joined (an image
  or audio part is an error: these are text models); an assistant turn with ``tool_calls``
  may have none;
- assistant ``tool_calls``: ``[{"id", "type": "function", "function": {"name",
  "arguments"}}]``, ``arguments`` a JSON string as OpenAI sends it (parsed to the object
  templates expect; a string that is not JSON is an error);
- tool turns: ``content`` and optionally ``tool_call_id`` / ``name``;
- assistant ``weight``: 1 (the default) learns the turn, 0 keeps it as context only;
- a line-level ``tools`` list (function definitions) goes to the template as ``tools``.

Every problem names the file, line and field (``messages[2].tool_calls[0].function``).
"""

from __future__ import annotations

import json

from ..errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
RENDERED_ROLE = {"developer": "system"}


def _text(content: object, where: str, field: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: field '{field}' must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        f = f"{field}[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise DataError(f"{where}: field '{f}' must be an object with a 'type'")
        if part["type"] != "text":
            raise DataError(
                f"{where}: field '{f}.type' is {part['type']!r}; only 'text' parts can be "
                "trained (edgetune's models read text)"
            )
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: field '{f}.text' must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(calls: object, where: str, field: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: field '{field}' must be a non-empty list")
    out = []
    for k, call in enumerate(calls):
        f = f"{field}[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: field '{f}.function' must be an object with a 'name'")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: field '{f}.function.arguments' is not valid JSON ({e.msg})"
                ) from None
        if not isinstance(args, dict):
            raise DataError(f"{where}: field '{f}.function.arguments' must be a JSON object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if "id" in call:
            entry["id"] = str(call["id"])
        out.append(entry)
    return out


def parse_message(m: object, where: str, field: str) -> tuple[dict, int]:
    """One message -> (the message a chat template renders, its weight: 1 learns it)."""
    if not isinstance(m, dict) or "role" not in m:
        raise DataError(f"{where}: field '{field}' must be an object with 'role' and 'content'")
    role = m["role"]
    if role not in ROLES:
        raise DataError(
            f"{where}: field '{field}.role' is {role!r}; expected one of {', '.join(ROLES)}"
        )
    out: dict = {"role": RENDERED_ROLE.get(role, role)}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise DataError(f"{where}: field '{field}.tool_calls' is only for assistant turns")
        out["tool_calls"] = _tool_calls(calls, where, f"{field}.tool_calls")
    if m.get("content") is None:
        if calls is None:
            raise DataError(f"{where}: field '{field}' must be an object with 'role' and 'content'")
        out["content"] = ""
    else:
        out["content"] = _text(m["content"], where, f"{field}.content")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if key in m:
                out[key] = str(m[key])
    weight = m.get("weight", 1)
    if "weight" in m and role != "assistant":
        raise DataError(f"{where}: field '{field}.weight' is only for assistant turns")
    if weight not in (0, 1) or isinstance(weight, bool):
        raise DataError(f"{where}: field '{field}.weight' must be 0 or 1, got {weight!r}")
    return out, int(weight)


def parse_tools(tools: object, where: str) -> tuple[dict, ...]:
    """The line's ``tools``: function definitions, handed to the template as they are."""
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list")
    for k, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: field 'tools[{k}].function' must be an object with a 'name'")
    return tuple(tools)
