"""Random-weight Hugging Face model dirs of any width and depth, built one tensor at a time.

    make_random_model(out, layers=2)           # Phi-3-mini's width, 2 layers, bf16
    cached_random_model(32)                    # the full Phi-3-mini shape (7.6 GB), built once

``edgetune bench scale`` measures every stage at a few layer counts of a real model's width;
the values do not matter for memory or speed, so the weights are random: N(0, 0.02) as
Hugging Face initialises them (norms 1.0), drawn chunk by chunk from a numpy Generator
seeded per tensor (the same seed gives the same model, whatever the chunking). Each layer
goes to its own shard with ``SafetensorsWriter``, beside an HF ``model.safetensors.index.json``
(embedding first, then one shard per layer, then the final norm and the LM head), so
building the 7.6 GB model holds one tensor, never the model. ``config.json`` is written by
transformers' own ``Phi3Config`` / ``LlamaConfig`` with Phi-3-mini's rope settings (theta
10000, 4096 positions, no rope scaling); the tokenizer is the shipped tiny model's (2048
ids, all inside any vocab of 2048 or more).

A model is written to a temporary sibling and renamed into place when complete; cached
models live under ``$EDGETUNE_CACHE/bench/scale`` (default ``~/.cache/edgetune/bench/scale``)
keyed by their shape.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, OutputExistsError
from ..tensors import INDEX, SafetensorsWriter

FAMILIES = ("phi3", "llama")
FORMAT = "v1"  # bump when the builder's output changes, so stale cache entries are not used
STD = 0.02  # HF's initializer_range
CHUNK = 1 << 22  # values drawn per chunk (16 MB of fp32)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
BOS, EOS, PAD = 0, 5, 1  # the tiny tokenizer's <|endoftext|>, <|end|>, <|pad|>


def layer_tensors(
    family: str, i: int, hidden: int, intermediate: int, heads: int, kv_heads: int
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of decoder layer ``i``'s weights in HF's naming for ``family``."""
    kv = kv_heads * (hidden // heads)
    p = f"model.layers.{i}"
    if family == "phi3":  # fused q|k|v and gate|up, as Phi-3 checkpoints store them
        proj = [
            ("self_attn.qkv_proj", (hidden + 2 * kv, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_up_proj", (2 * intermediate, hidden)),
            ("mlp.down_proj", (hidden, intermediate)),
        ]
    else:
        proj = [
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (kv, hidden)),
            ("self_attn.v_proj", (kv, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (intermediate, hidden)),
            ("mlp.up_proj", (intermediate, hidden)),
            ("mlp.down_proj", (hidden, intermediate)),
        ]
    return [
        (f"{p}.input_layernorm.weight", (hidden,)),
        (f"{p}.post_attention_layernorm.weight", (hidden,)),
    ] + [(f"{p}.{n}.weight", s) for n, s in proj]


def _config(
    family: str,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    dtype: str,
    tie: bool,
):
    from transformers import LlamaConfig, Phi3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        initializer_range=STD,
        tie_word_embeddings=tie,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        dtype={"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
    )
    if family == "phi3":
        return Phi3Config(
            **common, original_max_position_embeddings=4096, architectures=["Phi3ForCausalLM"]
        )
    return LlamaConfig(**common, architectures=["LlamaForCausalLM"])


def _random(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """N(0, STD) float32 of ``shape``, drawn in chunks of rows into one array."""
    out = np.empty(shape, np.float32)
    flat = out.reshape(shape[0], -1)
    step = max(1, CHUNK // flat.shape[1])
    for a in range(0, flat.shape[0], step):
        rng.standard_normal(out=flat[a : a + step], dtype=np.float32)
        flat[a : a + step] *= np.float32(STD)
    return out


def check_shape(
    family: str,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    dtype: str,
) -> None:
    """A ConfigError naming what does not fit (before anything is built)."""
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if dtype not in ("BF16", "F16", "F32"):
        raise ConfigError(f"dtype must be BF16, F16 or F32, got {dtype!r}")
    if min(layers, hidden, intermediate, heads, kv_heads) < 1:
        raise ConfigError("layers, hidden, intermediate, heads and kv_heads must be >= 1")
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ConfigError(
            f"hidden {hidden} must split into {heads} heads of an even size, "
            f"and the heads into {kv_heads} key/value groups"
        )
    if vocab < 2048:
        raise ConfigError(f"vocab must be >= 2048 (the tokenizer's ids), got {vocab}")


def make_random_model(
    out_dir: str | os.PathLike,
    layers: int,
    *,
    hidden: int = 3072,
    intermediate: int = 8192,
    heads: int = 32,
    kv_heads: int = 32,
    vocab: int = 32064,
    family: str = "phi3",
    dtype: str = "BF16",
    seed: int = 0,
    tie: bool = False,
) -> Path:
    """Write a random-weight HF model dir of this shape at ``out_dir`` (which must not exist;
    written beside it and renamed into place when complete); returns ``out_dir``."""
    check_shape(family, layers, hidden, intermediate, heads, kv_heads, vocab, dtype)
    out = Path(out_dir)
    if out.exists():
        raise OutputExistsError(f"{out}: output exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = _config(family, layers, hidden, intermediate, heads, kv_heads, vocab, dtype, tie)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [
        [("model.embed_tokens.weight", (vocab, hidden))]
    ]
    shards += [
        layer_tensors(family, i, hidden, intermediate, heads, kv_heads) for i in range(layers)
    ]
    shards.append(
        [("model.norm.weight", (hidden,))] + ([] if tie else [("lm_head.weight", (vocab, hidden))])
    )
    itemsize = 2 if dtype in ("BF16", "F16") else 4
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map, n_tensor = {}, 0
        for k, tensors in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            with SafetensorsWriter(work / fname, [(n, dtype, s) for n, s in tensors]) as w:
                for name, shape in tensors:
                    if len(shape) == 1:  # RMSNorm weights: 1.0, as HF initialises them
                        w.write(name, np.ones(shape, np.float32))
                    else:
                        w.write(name, _random(shape, np.random.default_rng([seed, n_tensor])))
                    weight_map[name] = fname
                    n_tensor += 1
        total = sum(math.prod(s) for t in shards for _, s in t) * itemsize
        (work / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            + "\n"
        )
        config.save_pretrained(work)  # config.json as transformers writes it
        from ..models import tiny_model_path

        for name in TOKENIZER_FILES:
            if (tiny_model_path() / name).is_file():
                shutil.copy(tiny_model_path() / name, work / name)
        os.chmod(work, 0o755)  # mkdtemp's 0700 is not what a model dir is shared with
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def model_key(
    layers: int,
    *,
    hidden: int = 3072,
    intermediate: int = 8192,
    heads: int = 32,
    kv_heads: int = 32,
    vocab: int = 32064,
    family: str = "phi3",
    dtype: str = "BF16",
    seed: int = 0,
    tie: bool = False,
) -> str:
    """The cache entry's name: every argument that changes the files."""
    return (
        f"{family}-h{hidden}-i{intermediate}-a{heads}-kv{kv_heads}-v{vocab}-L{layers}-"
        f"{dtype.lower()}-s{seed}{'-tied' if tie else ''}-{FORMAT}"
    )


def cache_root() -> Path:
    from .runtime import cache_dir

    return cache_dir() / "scale"


def cached_random_model(layers: int, **shape) -> tuple[Path, bool]:
    """(the cached model of this shape, whether it was already there); built once, under a
    lock so two concurrent runs build it once. ``shape``: ``make_random_model``'s keywords."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / model_key(layers, **shape)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / INDEX).is_file() and (out / "config.json").is_file():
            return out, True
        make_random_model(out, layers, **shape)
        return out, False
