"""The server's scheduler: continuous batching of every running request over one decoder.

One worker thread owns the decoder. Each pass it admits waiting requests (up to
``max_batch`` running), then runs one ``NativeDecoder.step`` over all of them: one new token
for every decoding sequence, and the next chunk (at most ``prefill_chunk`` prompt tokens in
all) of prompts still being read, so a long new prompt holds the others up by one chunk at a
time, never by its whole prefill. The batched step reads each weight once for all sequences
(decode is bandwidth-bound) and gives every sequence the logits it would get alone.
Sequences join and leave between passes; a cancelled one (client gone) is dropped at the
next pass and its KV cache freed. The ONNX Runtime backend has no batched step: there each
sequence runs its own forward, in turn, in the same loop.

Requests come from the server's event loop (``submit``) and their tokens go back to it
(``Handle``, an async iterator), a pass's events in one ``call_soon_threadsafe``. A failure in one sequence
(its grammar, its sampling) ends that sequence with an error event; a failing batched pass is
retried sequence by sequence so only the one that fails is dropped (a cache grows only when
its pass completes, so a retry recomputes the same rows).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime.sampling import SamplingConfig, select
from ..runtime.text import TextStream


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8
    """Sequences decoded together in one pass (more wait in the queue)."""
    max_queue: int = 32
    """Requests waiting for a place in the batch; one more is answered 429."""
    prefill_chunk: int = 64
    """Prompt tokens read per pass, in all: what a new prompt delays the others by."""


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``."""


@dataclass
class Job:
    """One generation request, as the handler built it."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    adapter: Any = None  # runtime.adapters.Adapter, or None for the base
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and k others
    grammar: Any = None  # serve.grammar.Constraint, or None
    ignore_eos: bool = False  # decode to max_new_tokens whatever is picked (benchmarks)


@dataclass
class Token:
    """One generated token as the client sees it."""

    id: int
    text: str  # the text it released ('' while held back for UTF-8 or a stop string)
    piece: str  # the token's own text (for logprobs)
    logprob: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Done:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text held back until the end (released now)


class Handle:
    """The event loop's end of a running job: ``async for event in handle`` yields ``Token``
    events then one ``Done``; an ``Exception`` instance ends it with that error."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held: deque = deque()  # events the worker made, not yet handed to the loop
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating (the client went away): the sequence leaves at the next pass."""
        self.cancelled = True

    def _deliver(self) -> None:  # on the event loop (deque append/popleft are thread-safe)
        while self._held:
            self._queue.put_nowait(self._held.popleft())

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event


def _deliver_all(handles) -> None:
    for h in handles:
        h._deliver()


class _Seq:
    """A job inside the worker: its cache, its place in the prompt, its text."""

    def __init__(self, job: Job, handle: Handle, tokenizer, cache):
        self.job = job
        self.handle = handle
        self.cache = cache  # KVCache (native) or the ORT past (None before the first pass)
        self.fed = 0  # prompt tokens already run
        self.context = list(job.prompt_ids)
        self.generated = 0
        self.last = -1
        self.rng = np.random.default_rng(job.sampling.seed)
        self.text = TextStream(tokenizer, job.sampling.stop)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.prompt_ids)


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the k most likely (id, log p), from a (V,) logit row (the model's own
    distribution: before temperature, top-p and any grammar mask, as OpenAI reports it)."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top: list[tuple[int, float]] = []
    if k:
        idx = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[token] - lse), top


class Engine:
    """Continuous batching over a loaded ``runtime.Model``'s decoder."""

    def __init__(self, model, cfg: EngineConfig = EngineConfig()):
        self.model = model
        self.cfg = cfg
        self.decoder = model.decoder
        self.batched = hasattr(self.decoder, "step")  # the native backend
        self.eos = set(model.eos_ids)
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._lock = threading.Condition()
        self._closing = False
        self._touched: set[Handle] = set()  # handles with events held this pass (worker only)
        self.passes = 0
        self.tokens = 0
        self._thread = threading.Thread(target=self._run, name="edgetune-engine", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------------

    def submit(self, job: Job) -> Handle:
        """Queue a job; raises QueueFull when ``max_queue`` jobs already wait."""
        handle = Handle(asyncio.get_running_loop())
        with self._lock:
            if len(self._waiting) >= self.cfg.max_queue:
                raise QueueFull(
                    f"{len(self._active)} requests running and {len(self._waiting)} waiting "
                    f"(--max-queue {self.cfg.max_queue}): try again shortly"
                )
            cache = self.decoder.new_cache() if self.batched else None
            self._waiting.append(_Seq(job, handle, self.model.tokenizer, cache))
            self._lock.notify()
        return handle

    def stats(self) -> dict:
        with self._lock:
            return {
                "running": len(self._active),
                "waiting": len(self._waiting),
                "passes": self.passes,
                "tokens": self.tokens,
            }

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._active and not self._waiting:
                    self._lock.wait()
                if self._closing:
                    break
                while self._waiting and len(self._active) < self.cfg.max_batch:
                    self._active.append(self._waiting.popleft())
                for s in [s for s in self._waiting if s.handle.cancelled]:
                    self._waiting.remove(s)
                    self._emit(s.handle, None)
            self._active = [s for s in self._active if not self._drop_cancelled(s)]
            if self._active:
                self._pass()
            self._flush()
        for s in [*self._active, *self._waiting]:
            self._emit(s.handle, RuntimeError("the server is shutting down"))
        self._flush()

    def _emit(self, handle: Handle, event) -> None:
        """Hold an event for its handle until the pass ends (``_flush``)."""
        handle._held.append(event)
        self._touched.add(handle)

    def _flush(self) -> None:
        """Hand the pass's events to their loops: one wake-up of each loop per pass (not one
        per token), so the event loop's work does not interleave with the pass."""
        by_loop: dict = {}
        for h in self._touched:
            by_loop.setdefault(h._loop, []).append(h)
        self._touched = set()
        for loop, hs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, hs)
            except RuntimeError:  # the loop is closed: nobody is listening
                for h in hs:
                    h.cancelled = True

    def _drop_cancelled(self, s: _Seq) -> bool:
        if s.handle.cancelled:
            self._emit(s.handle, None)
            s.cache = None  # frees the KV cache
            return True
        return False

    def _pass(self) -> None:
        """One step of every running sequence."""
        budget = self.cfg.prefill_chunk
        work: list[tuple[_Seq, list[int]]] = []
        for s in self._active:
            if s.prefilling:
                if budget <= 0:
                    continue
                take = min(budget, len(s.job.prompt_ids) - s.fed)
                work.append((s, s.job.prompt_ids[s.fed : s.fed + take]))
                budget -= take
            else:
                work.append((s, [s.last]))
        logits: list[np.ndarray | None]
        try:
            logits = list(self._forward(work))
        except Exception:  # find the one that fails; the others go on
            logits = []
            for s, ids in work:
                try:
                    logits.extend(self._forward([(s, ids)]))
                except Exception as e:
                    self._fail(s, e)
                    logits.append(None)
        self.passes += 1
        for (s, ids), row in zip(work, logits, strict=True):
            if row is None:
                continue
            if s.prefilling:
                s.fed += len(ids)
                if s.prefilling:
                    continue
            try:
                self._advance(s, row)
            except Exception as e:
                self._fail(s, e)

    def _forward(self, work: list[tuple[_Seq, list[int]]]) -> list[np.ndarray]:
        if self.batched:
            batch = [(np.asarray(ids, np.int64), s.cache) for s, ids in work]
            adapters = [s.job.adapter for s, _ in work]
            if any(a is not None for a in adapters):
                rows = self.decoder.step(batch, adapters=adapters)
            else:
                rows = self.decoder.step(batch)
            return [r[-1] for r in rows]
        out = []
        for s, ids in work:
            lg, s.cache = self.decoder.forward(np.array([ids], np.int64), s.cache, last_only=True)
            out.append(lg[0, -1])
        return out

    def _advance(self, s: _Seq, logits: np.ndarray) -> None:
        """Pick the sequence's next token from its logits and tell the client."""
        job = s.job
        grammar = job.grammar
        masked = logits
        if grammar is not None:
            masked = grammar.mask(logits)
        token = select(masked, s.context, job.sampling, s.rng)
        if (token in self.eos and not job.ignore_eos) or (grammar is not None and grammar.finished):
            self._finish(s, "stop")
            return
        if grammar is not None:
            grammar.consume(token)
        s.context.append(token)
        s.generated += 1
        self.tokens += 1
        event = Token(token, s.text.push(token), "")
        if job.logprobs is not None:
            event.piece = self._piece(s, token)
            event.logprob, top = top_logprobs(logits, token, job.logprobs)
            event.top = [(self.model.token_text(i), lp) for i, lp in top]
        self._emit(s.handle, event)
        budget = min(job.sampling.max_new_tokens, self.model.context_length - len(job.prompt_ids))
        if s.text.stopped or (grammar is not None and grammar.finished):
            self._finish(s, "stop")
        elif s.generated >= budget:
            self._finish(s, "length")
        else:
            s.last = token

    def _piece(self, s: _Seq, token: int) -> str:
        """The token's own text: what it added to the decoded generation (the TextStream
        has just decoded it)."""
        added = s.text.added
        return added if added is not None else self.model.token_text(token)

    def _finish(self, s: _Seq, reason: str) -> None:
        self._emit(s.handle, Done(reason, len(s.job.prompt_ids), s.generated, s.text.finish()))
        self._emit(s.handle, None)
        s.cache = None
        self._active.remove(s)

    def _fail(self, s: _Seq, error: Exception) -> None:
        self._emit(s.handle, error)
        self._emit(s.handle, None)
        s.cache = None
        if s in self._active:
            self._active.remove(s)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing runs or waits (tests, shutdown)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = engine.stats()
        if not st["running"] and not st["waiting"]:
            return True
        time.sleep(0.01)
    return False
