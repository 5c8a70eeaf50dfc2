"""Structured output: ``response_format`` as a token mask at every decoding step (llguidance).

Why llguidance: it is what onnxruntime-genai itself uses for guidance, it compiles a JSON
schema to a grammar in milliseconds with no per-vocabulary precompute (xgrammar spends seconds
per schema on a 32k vocabulary, outlines-core builds an automaton per schema), it reads the
bundle's ``tokenizer.json`` directly (no transformers, so the serve extra stays torch-free),
and it names the JSON-schema keywords it does not implement instead of silently ignoring them.

A ``Constraint`` follows one sequence: ``mask(logits)`` gives the logits with every token
the grammar forbids at -inf (end of sequence is allowed only once the JSON is complete),
``consume(token)`` advances it, ``finished`` says the value is complete and nothing can follow.
The output is compact JSON (no free whitespace: a small model otherwise loops on spaces).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .errors import bad_request

JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions
"""Compact output: ``{"a":1}``; the grammar never lets the model pad with spaces or newlines."""


class Constraint:
    """One sequence's grammar state (an llguidance matcher) and its mask buffer."""

    def __init__(self, matcher, n_vocab: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.n_vocab = n_vocab
        self._bits = allocate_token_bitmask(1, n_vocab)

    def allowed(self) -> np.ndarray:
        """(n_vocab,) bool: the tokens the grammar accepts next."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bits)
        self._check()
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.n_vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every forbidden token at -inf (a copy; ``logits`` is untouched,
        logprobs report the model's own distribution). Padded vocabulary rows beyond the
        tokenizer's are never allowed."""
        allowed = self.allowed()
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        n = min(logits.size, allowed.size)
        keep = np.flatnonzero(allowed[:n])
        out[keep] = logits[keep]
        return out

    def consume(self, token: int) -> None:
        self.matcher.consume_token(int(token))
        self._check()

    @property
    def finished(self) -> bool:
        """The value is complete and the grammar allows nothing more."""
        return bool(self.matcher.is_stopped())

    def _check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"structured output: {self.matcher.get_error()}")


class Grammars:
    """Compiles ``response_format`` objects against one model's tokenizer (built once)."""

    def __init__(self, model):
        self.model = model
        self._tokenizer = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(
                    self.model.tokenizer.to_str(), eos_token=list(self.model.eos_ids) or None
                )
            return self._tokenizer

    def constraint(self, response_format: Any) -> Constraint | None:
        """A Constraint for the request, None for plain text; a 400 naming what is wrong
        (an unsupported keyword, an invalid schema)."""
        if response_format is None or response_format.type == "text":
            return None
        try:
            import llguidance
        except ImportError:  # pragma: no cover - the serve extra installs it
            raise bad_request(
                "response_format needs llguidance: pip install 'edgetune[serve]'",
                param="response_format",
            ) from None
        if response_format.type == "json_object":
            schema: dict = {"type": "object"}
            param = "response_format"
        else:
            spec = response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise bad_request(
                    "response_format.json_schema.schema: required for type json_schema",
                    param="response_format.json_schema.schema",
                )
            schema = spec.schema_
            param = "response_format.json_schema.schema"
        tok = self.tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise bad_request(f"{param}: {e}", param=param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise bad_request(f"{param}: {messages[0]}", param=param)
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise bad_request(f"{param}: {matcher.get_error()}", param=param)
        return Constraint(matcher, tok.vocab_size)
