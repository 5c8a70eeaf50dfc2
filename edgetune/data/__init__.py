"""Datasets: JSONL loading and validation, tokenization with loss masks, the bundled task."""

from .jsonl import Example, load_examples, write_jsonl
from .tokenize import TokenizedExample, tokenize_examples

__all__ = ["Example", "load_examples", "write_jsonl", "TokenizedExample", "tokenize_examples"]
