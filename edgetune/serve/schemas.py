"""Request bodies of the OpenAI endpoints edgetune serves, as pydantic models.

Field names, types and ranges are OpenAI's (platform.openai.com/docs/api-reference/chat/create,
/completions/create). A field OpenAI has and edgetune does not implement (tools, n > 1,
audio, ...) is a 400 naming it, never silently ignored; an unknown field is a 400 as at
OpenAI. ``top_k`` and ``repetition_penalty`` are accepted as extras (vLLM and llama.cpp take
them too).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI: up to 4 stop sequences
MAX_TOP_LOGPROBS = 20  # chat; completions allows 5


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class JsonSchemaSpec(Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted (the openai client may send it)


class Sampling(Strict):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: str | None = None
    # extras (vLLM, llama.cpp)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False  # vLLM's: decode max_tokens even past end of sequence (benchmarks)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # OpenAI fields edgetune refuses by name when set (see unsupported())
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logit_bias: dict[str, float] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    prediction: Any = None
    web_search_options: Any = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None


#: fields that, set to anything but these values, are a 400 naming them
_REFUSED = {
    "n": 1,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "logit_bias": None,
    "modalities": None,
    "audio": None,
    "parallel_tool_calls": None,
    "prediction": None,
    "web_search_options": None,
    "echo": False,
    "suffix": None,
    "best_of": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def unsupported(req: BaseModel) -> str | None:
    """The first field set to something edgetune does not implement, or None."""
    for name, ok in _REFUSED.items():
        if name in type(req).model_fields and getattr(req, name) not in (ok, None):
            return name
    return None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def message_text(m: Message) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
