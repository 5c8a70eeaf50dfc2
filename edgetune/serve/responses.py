"""OpenAI's response objects: chat.completion, chat.completion.chunk, text_completion, model.

Built from the engine's events (``engine.Token``, ``engine.Done``); shapes follow the API
reference field for field, so the official clients parse them into their own types.
"""

from __future__ import annotations

import json
import secrets
import time

from .engine import Done, Token


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokens: list[Token]) -> dict:
    return {
        "content": [
            {
                **_entry(t.piece, t.logprob or 0.0),
                "top_logprobs": [_entry(s, lp) for s, lp in t.top],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[Token], offset: int = 0) -> dict:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.piece)
    return {
        "tokens": [t.piece for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def chat_completion(
    cid: str, model: str, text: str, done: Done, tokens: list[Token] | None
) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs(tokens) if tokens is not None else None,
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": usage(done),
    }


def chat_chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict,
    finish: str | None = None,
    tokens: list[Token] | None = None,
    with_usage: bool = False,
) -> dict:
    chunk = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": chat_logprobs(tokens) if tokens else None,
                "finish_reason": finish,
            }
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(cid: str, model: str, created: int, obj: str, done: Done) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(done),
    }


def text_completion(
    cid: str,
    model: str,
    created: int,
    text: str,
    finish: str | None,
    tokens: list[Token] | None,
    done: Done | None = None,
    offset: int = 0,
) -> dict:
    out = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": completion_logprobs(tokens, offset) if tokens is not None else None,
                "finish_reason": finish,
            }
        ],
    }
    if done is not None:
        out["usage"] = usage(done)
    return out


def model_object(name: str, created: int, parent: str | None) -> dict:
    obj = {"id": name, "object": "model", "created": created, "owned_by": "edgetune"}
    if parent:
        obj["parent"] = parent  # an adapter: the base it runs over (vLLM's field)
    return obj


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
