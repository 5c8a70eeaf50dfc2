"""``Model``: load a bundle, then ``generate`` / ``stream`` / ``chat``. Torch-free.

from edgetune.runtime import Model
m = Model.load("bundle/")
print(m.chat([{"role": "user", "content": "dim the kitchen lights to 30%"}]))
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from ..bundle import read_manifest, verify
from ..errors import BundleError, ConfigError
from .chat_template import PromptError, render
from .ort_backend import OrtDecoder
from .sampling import SamplingConfig, select
from .text import TextStream

BACKENDS = ("auto", "native", "native-int", "ort")


class Decoder(Protocol):
    """What ``Model`` needs of a backend (``OrtDecoder``, ``native.NativeDecoder``): logits of
    new tokens after a past it hands back; the past is the backend's own (opaque here)."""

    def forward(
        self, input_ids: np.ndarray, past: Any = None, last_only: bool = False
    ) -> tuple[np.ndarray, Any]: ...


class Model:
    """A loaded bundle with its tokenizer and one decoding backend."""

    def __init__(self, path: Path, manifest: dict, decoder: Decoder, backend: str):
        from tokenizers import Tokenizer

        self.path = path
        self.manifest = manifest
        self.decoder = decoder
        self.backend = backend
        tok = manifest["tokenizer"]
        self.tokenizer = Tokenizer.from_file(str(path / tok["file"]))
        self.eos_ids: list[int] = list(tok.get("eos_token_ids") or [])  # first: the model's own
        self.context_length = int(manifest["decoder"]["context_length"])
        self._template = tok.get("chat_template")
        self.last_stats: dict[str, float] = {}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backend: str = "auto",
        threads: int | None = None,
        verify_hashes: bool = True,
    ) -> "Model":
        """Verify the bundle (structure and SHA-256 of every file) and open it."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = Path(path)
        manifest = verify(path) if verify_hashes else read_manifest(path)
        if backend == "auto":
            backend = "ort"
        if backend in ("native", "native-int"):
            from .native import NativeDecoder

            native = NativeDecoder(path, manifest, threads=threads, integer=backend == "native-int")
            return cls(path, manifest, native, backend)
        try:
            decoder = OrtDecoder(str(path / manifest["decoder"]["filename"]), threads=threads)
        except Exception as e:  # onnxruntime raises its own exception types for bad models
            raise BundleError(
                f"{path / manifest['decoder']['filename']}: ONNX Runtime could not "
                f"load the decoder ({e})"
            ) from None
        return cls(path, manifest, decoder, "ort")

    # -- text <-> tokens ------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"prompt is not valid UTF-8 ({e.reason})") from None
        if not isinstance(text, str):
            raise PromptError(f"prompt must be text, got {type(text).__name__}")
        try:  # undecodable bytes from argv or a file arrive as lone surrogates
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"prompt is not valid UTF-8 ({e.reason})") from None
        if not text.strip():
            raise PromptError("prompt is empty")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text on its own (a logprobs entry): its piece with the tokenizer's
        word-boundary mark as a space and a byte-fallback token as its byte."""
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        if "\u0120" in piece or "\u010a" in piece:  # byte-level BPE (GPT-2, Llama-3, Qwen2)
            return self.tokenizer.decode([token], skip_special_tokens=False)
        return piece.replace("\u2581", " ")

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text for ``messages`` (and ``tools``, JSON schemas), exactly as the
        training side's ``apply_chat_template(..., tokenize=False)`` renders it."""
        if not self._template:
            raise BundleError(f"{self.path}: bundle has no chat template")
        if not messages or not all(
            isinstance(m, dict)
            and "role" in m
            and ("content" in m or (m["role"] == "assistant" and m.get("tool_calls")))
            for m in messages
        ):
            raise PromptError(
                "messages must be a non-empty list of {'role', 'content'} dicts "
                "(an assistant's may have 'tool_calls' instead of 'content')"
            )
        # what apply_chat_template passes besides the messages; bundles before it: none
        special = self.manifest["tokenizer"].get("special_tokens") or {}
        return render(
            self._template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            special_tokens=special,
        )

    # -- generation -----------------------------------------------------------------------

    def generate_ids(self, prompt_ids: list[int], cfg: SamplingConfig) -> Iterator[int]:
        """Yield generated token ids until eos, ``max_new_tokens`` or the context is full."""
        if not prompt_ids:
            raise PromptError("prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise PromptError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length}"
            )
        rng = np.random.default_rng(cfg.seed)
        eos = set(self.eos_ids)
        budget = min(cfg.max_new_tokens, self.context_length - len(prompt_ids))
        context = list(prompt_ids)
        t0 = time.perf_counter()
        logits, past = self.decoder.forward(np.array([prompt_ids], np.int64), last_only=True)
        t_first = time.perf_counter()
        n = 0
        try:
            for n in range(1, budget + 1):
                nxt = select(logits[0, -1], context, cfg, rng)
                if nxt in eos:
                    break
                context.append(nxt)
                yield nxt
                if n == budget:
                    break
                logits, past = self.decoder.forward(np.array([[nxt]], np.int64), past)
        finally:
            t_end = time.perf_counter()
            self.last_stats = {
                "prompt_tokens": len(prompt_ids),
                "new_tokens": n,
                "first_token_s": t_first - t0,
                "decode_tokens_per_s": (n - 1) / (t_end - t_first)
                if n > 1 and t_end > t_first
                else 0.0,
            }

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated (stops before any stop string)."""
        cfg = SamplingConfig(**sampling)
        text = TextStream(self.tokenizer, cfg.stop)
        for tok in self.generate_ids(self.encode(prompt), cfg):
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail

    def generate(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat(self, messages: list[dict], tools: list[dict] | None = None, **sampling) -> str:
        """The reply to ``messages`` (with ``tools``: JSON-schema function definitions)."""
        return self.generate(self.render_chat(messages, tools=tools), **sampling)

    def stream_chat(
        self, messages: list[dict], tools: list[dict] | None = None, **sampling
    ) -> Iterator[str]:
        """``chat``, yielding text pieces as they are generated."""
        return self.stream(self.render_chat(messages, tools=tools), **sampling)

    def fit_chat(self, messages: list[dict], reserve: int = 0) -> tuple[list[dict], int]:
        """(messages, how many were dropped): the oldest turns after a leading system message
        dropped until the rendered chat plus ``reserve`` new tokens fits the context. Keeps at
        least the last message; raises PromptError when that alone does not fit."""
        system = messages[:1] if messages and messages[0].get("role") == "system" else []
        rest = list(messages[len(system) :])
        dropped = 0
        while True:
            n = len(self.encode(self.render_chat(system + rest)))
            if n + reserve <= self.context_length or len(rest) <= 1:
                break
            cut = 2 if len(rest) > 2 and rest[1].get("role") == "assistant" else 1  # a turn
            rest, dropped = rest[cut:], dropped + cut
        if n >= self.context_length:
            raise PromptError(
                f"message too long: {n} tokens with the chat template"
                f"{' and system message' if system else ''}; the model's context "
                f"is {self.context_length}"
            )
        return system + rest, dropped
