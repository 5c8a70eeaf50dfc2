"""OpenAI's error object, and the status each kind of failure answers with.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

400 a bad body or too long a prompt, 401 a missing or wrong key, 404 an unknown model or
route, 413 a body over the limit, 429 the queue full, 500 a failure of edgetune's own (the
server goes on serving the other requests).
"""

from __future__ import annotations

import json


class APIError(Exception):
    """An error the client gets as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the "
        "server was started with (--api-key or EDGETUNE_API_KEY)",
        code="invalid_api_key",
    )


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(
        404,
        f"The model '{name}' does not exist on this server (served: {', '.join(served)})",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
        code="request_too_large",
    )


def queue_full(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded")


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error")


def pydantic_param(loc: tuple) -> str | None:
    """'messages[0].content' from pydantic's ('body', 'messages', 0, 'content')."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not p.startswith(("function-", "list[", "str", "int")):
            out += ("." if out else "") + p
    return out or None
