"""The tokenizer and chat template of a model dir as GGUF metadata, the way llama.cpp's
``convert_hf_to_gguf.py`` writes them.

Two tokenizer kinds, the ones the four families ship:

- **byte-level BPE** (tokenizer.json with a ByteLevel pre-tokenizer: GPT-2 style, Llama-3,
  Qwen2, Phi-4, edgetune's tiny model) -> ``tokenizer.ggml.model = "gpt2"`` with the token
  strings as the tokenizer stores them, the merges, and the pre-tokenizer named by its split
  pattern (llama.cpp picks its regex by that name);
- **SentencePiece** (``tokenizer.model``: Phi-3-mini, Mistral, Llama-2) ->
  ``"llama"`` with the pieces' scores and types, read by the ``gguf`` package's own
  ``SentencePieceVocab``.

Special-token ids, add-bos/eos flags, merges and the chat template come from the ``gguf``
package's ``SpecialVocab`` (the same reader the converter uses); the add-bos/eos flags are
then set from what the Hugging Face tokenizer actually does to a text, so llama.cpp adds
exactly the tokens training saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ..errors import ModelError

# llama.cpp's pre-tokenizer names for the split patterns the supported families ship.
GPT2_PATTERN = None  # ByteLevel(use_regex=True) alone: the GPT-2 regex
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}


def _split_pattern(pre: dict | None) -> str | None:
    """The byte-level tokenizer's split regex; None for ByteLevel's built-in GPT-2 regex."""
    if pre is None:
        raise ModelError("tokenizer.json: no pre_tokenizer; GGUF needs a known split pattern")
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    patterns = [
        p["pattern"].get("Regex") or p["pattern"].get("String")
        for p in parts
        if p.get("type") == "Split"
    ]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not byte_level:
        raise ModelError("tokenizer.json: not a byte-level BPE tokenizer (no ByteLevel step)")
    if not patterns and byte_level[0].get("use_regex", True):
        return GPT2_PATTERN
    if len(patterns) == 1:
        return patterns[0]
    raise ModelError(f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:200]} is not supported")


def _byte_level_tokens(tok_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    vocab = tok_json["model"]["vocab"]
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, a in added.items():
        if i >= vocab_size:
            raise ModelError(
                f"tokenizer.json: added token {a['content']!r} has id {i}, past "
                f"the model's vocab_size {vocab_size}"
            )
        tokens[i] = a["content"]
        types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, [int(t) for t in types]


def add_vocab(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int, tokenizer, template) -> None:
    """Write the tokenizer, special tokens, add-bos/eos flags and chat template into ``w``."""
    tj_path = model_dir / "tokenizer.json"
    if (model_dir / "tokenizer.model").is_file():
        try:
            sp = gguf.SentencePieceVocab(model_dir)
        except ImportError:
            raise ModelError(
                f"{model_dir}/tokenizer.model: a SentencePiece tokenizer needs the "
                "sentencepiece package (pip install sentencepiece)"
            ) from None
        tokens, scores, types = [], [], []
        for text, score, typ in sp.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(typ))
        while len(tokens) < vocab_size:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        # tokens added on top of tokenizer.model (Phi-3's <|user|>, <|end|>, ...) live in
        # tokenizer.json when transformers saved the dir (added_tokens.json only for slow
        # tokenizers): as llama.cpp's converter, control if special, else user-defined
        added = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
        for a in added.get("added_tokens", []):
            i = int(a["id"])
            if i >= vocab_size:
                raise ModelError(
                    f"{tj_path}: added token {a['content']!r} has id {i}, past the model's "
                    f"vocab_size {vocab_size}"
                )
            tokens[i] = a["content"].encode()
            scores[i] = -1000.0
            special = a.get("special")
            types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        tc_path = model_dir / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
        if tc.get("add_prefix_space") is not None:  # as llama.cpp's converter; else its default
            w.add_add_space_prefix(bool(tc["add_prefix_space"]))
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        load_merges = False
    elif tj_path.is_file():
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        if tj.get("model", {}).get("type") != "BPE":
            raise ModelError(
                f"{tj_path}: tokenizer model {tj.get('model', {}).get('type')!r}: "
                "GGUF export supports BPE (tokenizer.json) and SentencePiece"
            )
        pattern = _split_pattern(tj.get("pre_tokenizer"))
        if pattern not in PRE_TOKENIZERS:
            raise ModelError(
                f"{tj_path}: split pattern {pattern!r} is not one llama.cpp names "
                f"(supported: GPT-2, Llama-3, Qwen2 byte-level BPE)"
            )
        tokens_s, types = _byte_level_tokens(tj, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZERS[pattern])
        w.add_token_list(tokens_s)
        w.add_token_types(types)
        load_merges = True
    else:
        raise ModelError(f"{model_dir}: no tokenizer.json or tokenizer.model")

    special = gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=vocab_size)
    special.chat_template = None  # written below, from the tokenizer edgetune loaded
    special.add_special_token = {}
    special.add_to_gguf(w, quiet=True)
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    w.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    if template:
        w.add_chat_template(template)
