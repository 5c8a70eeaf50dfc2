"""The ASGI app: OpenAI's chat completions, completions and models endpoints over an Engine.

FastAPI parses and validates the bodies (``schemas``); every failure, including FastAPI's own
(a malformed body, an unknown route), is answered with OpenAI's error object (``errors``).
Two plain ASGI middlewares run first: the body limit (413, counted on the bytes received,
so a chunked body cannot slip past a Content-Length check) and the bearer key (401).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EdgetuneError
from ..runtime.sampling import SamplingConfig
from . import responses as R
from .engine import Done, Engine, Job, QueueFull, Token
from .errors import (
    APIError,
    bad_request,
    model_not_found,
    pydantic_param,
    queue_full,
    server_error,
    too_large,
    unauthorized,
)
from .schemas import (
    MAX_STOP,
    ChatRequest,
    CompletionRequest,
    Sampling,
    message_text,
    stop_strings,
    unsupported,
)


@dataclass
class Server:
    """What the app serves: one model, its engine, and the model ids (base and adapters)."""

    model: Any  # runtime.Model
    engine: Engine
    base: str
    adapters: dict[str, Any] = field(default_factory=dict)  # id -> runtime.adapters.Adapter
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    grammars: Any = None  # serve.grammar.Grammars (built from the model when not given)
    runner: Any = None  # serve.finetune.JobRunner: the fine-tuning service, when started
    max_upload_bytes: int = 256 << 20
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if self.grammars is None:
            from .grammar import Grammars

            self.grammars = Grammars(self.model)

    @property
    def names(self) -> list[str]:
        return [self.base, *self.adapters]

    def adapter(self, name: str):
        if name == self.base:
            return None
        if name in self.adapters:
            return self.adapters[name]
        raise model_not_found(name, self.names)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Guard:
    """ASGI middleware: body size limit, then the API key (every path but /health)."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = self.server.api_key
        if key and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await error_response(unauthorized())(scope, receive, send)
        limit = self.server.max_body_bytes
        if scope["path"] == "/v1/files" and scope["method"] == "POST":
            limit = self.server.max_upload_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(too_large(limit))(scope, receive, send)
        parts: list[bytes] = []
        size, more = 0, True
        while more:  # read the body here, counting what arrives, then hand it on
            msg = await receive()
            if msg["type"] != "http.request":
                return
            parts.append(msg.get("body", b""))
            size += len(parts[-1])
            more = msg.get("more_body", False)
            if size > limit:
                return await error_response(too_large(limit))(scope, receive, send)
        body = b"".join(parts)
        del parts
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def sampling_config(req: Sampling, max_tokens: int | None, budget: int) -> SamplingConfig:
    stops = stop_strings(req.stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop: at most {MAX_STOP} sequences", param="stop")
    return SamplingConfig(
        max_new_tokens=max_tokens or budget,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        stop=stops,
        seed=req.seed,
    )


def check_length(server: Server, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """Tokens left for the completion; a 400 naming the limit when the request cannot fit."""
    context = server.model.context_length
    if n_prompt >= context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens; the prompt has "
            f"{n_prompt} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and n_prompt + max_tokens > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens; you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for "
            "the completion)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return context - n_prompt


async def watch_disconnect(request: Request, handle) -> None:
    """Cancel the job the moment the client goes away (non-streaming requests)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            handle.cancel()
            return


def checked(server: Server, body: Sampling):
    """The request's adapter (None: the base), after refusing fields edgetune does not do."""
    refused = unsupported(body)
    if refused:
        raise bad_request(f"{refused}: not supported by edgetune serve", param=refused)
    return server.adapter(body.model)


def usage(body: Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


async def collect(request: Request, server: Server, job: Job) -> tuple[str, Done, list[Token]]:
    """Run a job to the end: (text, done, tokens); a job's failure as an APIError."""
    try:
        return await _collect(request, server, job)
    except Exception as e:
        raise job_error(e) from None


async def _collect(request: Request, server: Server, job: Job) -> tuple[str, Done, list[Token]]:
    handle = submit(server, job)
    watcher = asyncio.create_task(watch_disconnect(request, handle))
    tokens: list[Token] = []
    done: Done | None = None
    try:
        async for ev in handle:
            if isinstance(ev, Exception):
                raise ev
            if isinstance(ev, Done):
                done = ev
            else:
                tokens.append(ev)
    finally:
        watcher.cancel()
        handle.cancel()
    if done is None:
        raise server_error("generation ended without a result")
    return "".join(t.text for t in tokens) + done.text, done, tokens


def submit(server: Server, job: Job):
    try:
        return server.engine.submit(job)
    except QueueFull as e:
        raise queue_full(str(e)) from None


def job_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, (EdgetuneError, ValueError)):
        return bad_request(str(e))
    return server_error(f"generation failed: {type(e).__name__}: {e}")


def create_app(server: Server) -> Guard:
    """The ASGI app: FastAPI's routes behind the Guard middleware."""
    app = FastAPI(title="edgetune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = pydantic_param(tuple(first.get("loc", ())))
        where = f"{param}: " if param else ""
        return error_response(bad_request(f"{where}{first.get('msg', 'invalid body')}", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(APIError(e.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return error_response(server_error(f"{type(e).__name__}: {e}"))

    if server.runner is not None:
        from .ft_api import add_routes

        add_routes(app, server.runner.store, server.runner, server.base, server.max_upload_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.stats()}

    @app.get("/v1/models")
    async def models():
        data = [R.model_object(server.base, server.created, None)]
        data += [R.model_object(n, server.created, server.base) for n in server.adapters]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.adapter(name)
        return R.model_object(name, server.created, None if name == server.base else server.base)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        adapter = checked(server, body)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
            for m in body.messages
        ]
        try:
            ids = server.model.encode(server.model.render_chat(messages))
        except EdgetuneError as e:
            raise bad_request(str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        budget = check_length(server, len(ids), max_tokens, "messages")
        job = Job(
            ids,
            sampling_config(body, max_tokens, budget),
            adapter,
            (body.top_logprobs or 0) if body.logprobs else None,
            await asyncio.to_thread(server.grammars.constraint, body.response_format),
            body.ignore_eos,
        )
        cid = R.new_id("chatcmpl")
        if body.stream:
            return sse_response(chat_stream(submit(server, job), job, cid, body.model, usage(body)))
        text, done, tokens = await collect(request, server, job)
        return R.chat_completion(cid, body.model, text, done, tokens if body.logprobs else None)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = checked(server, body)
        ids = prompt_ids(server, body.prompt)
        budget = check_length(server, len(ids), body.max_tokens, "prompt")
        max_tokens = body.max_tokens or min(16, budget)  # OpenAI's default for completions
        job = Job(
            ids,
            sampling_config(body, max_tokens, budget),
            adapter,
            body.logprobs,
            ignore_eos=body.ignore_eos,
        )
        cid = R.new_id("cmpl")
        if body.stream:
            events = completion_stream(submit(server, job), job, cid, body.model, usage(body))
            return sse_response(events)
        text, done, tokens = await collect(request, server, job)
        logprobs = tokens if body.logprobs is not None else None
        return R.text_completion(
            cid, body.model, int(time.time()), text, done.finish_reason, logprobs, done
        )

    return Guard(app, server)


def prompt_ids(server: Server, prompt: str | list) -> list[int]:
    if isinstance(prompt, list):
        if len(prompt) != 1 and all(isinstance(p, str) for p in prompt):
            raise bad_request("prompt: one prompt per request", param="prompt")
        if prompt and all(isinstance(p, int) for p in prompt):
            vocab = server.model.tokenizer.get_vocab_size(with_added_tokens=True)
            bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary", "prompt")
            return [int(t) for t in prompt]
        prompt = prompt[0] if prompt else ""
    try:
        return server.model.encode(prompt)
    except EdgetuneError as e:
        raise bad_request(str(e), param="prompt") from None


async def _events(handle) -> AsyncIterator[Token | Done]:
    """A submitted job's events; the job is cancelled when the stream is closed early (the
    client went away: Starlette cancels the response, which ends here)."""
    try:
        async for ev in handle:
            if isinstance(ev, Exception):
                raise ev
            yield ev
    finally:
        handle.cancel()


async def chat_stream(handle, job: Job, cid: str, model: str, include_usage: bool):
    created = int(time.time())
    want_lp = job.logprobs is not None
    events = _events(handle)
    try:
        first = await anext(events)
    except Exception as e:  # nothing sent yet: the whole error as the only event
        yield R.sse(job_error(e).body())
        yield R.sse("[DONE]")
        return
    yield R.sse(
        R.chat_chunk(
            cid, model, created, {"role": "assistant", "content": ""}, None, None, include_usage
        )
    )
    try:
        ev: Token | Done = first
        while True:
            if isinstance(ev, Done):
                if ev.text:
                    yield R.sse(
                        R.chat_chunk(
                            cid, model, created, {"content": ev.text}, None, None, include_usage
                        )
                    )
                yield R.sse(
                    R.chat_chunk(cid, model, created, {}, ev.finish_reason, None, include_usage)
                )
                if include_usage:
                    yield R.sse(R.usage_chunk(cid, model, created, "chat.completion.chunk", ev))
                break
            if ev.text or want_lp:
                lp = [ev] if want_lp else None
                yield R.sse(
                    R.chat_chunk(cid, model, created, {"content": ev.text}, None, lp, include_usage)
                )
            ev = await anext(events)
    except Exception as e:
        yield R.sse(job_error(e).body())
    yield R.sse("[DONE]")


async def completion_stream(handle, job: Job, cid: str, model: str, include_usage: bool):
    created = int(time.time())
    want_lp = job.logprobs is not None
    offset = 0
    try:
        async for ev in _events(handle):
            if isinstance(ev, Done):
                if ev.text:
                    yield R.sse(R.text_completion(cid, model, created, ev.text, None, None))
                yield R.sse(R.text_completion(cid, model, created, "", ev.finish_reason, None))
                if include_usage:
                    yield R.sse(R.usage_chunk(cid, model, created, "text_completion", ev))
            elif ev.text or want_lp:
                lp = [ev] if want_lp else None
                yield R.sse(
                    R.text_completion(cid, model, created, ev.text, None, lp, offset=offset)
                )
                offset += len(ev.piece)
    except Exception as e:
        yield R.sse(job_error(e).body())
    yield R.sse("[DONE]")
