"""Find, validate and load local Hugging Face causal-LM directories.

Only the Llama / Phi-3 / Mistral / Qwen2 families are supported end to end
(trainer, export, native runtime). Weights load from safetensors only and
``trust_remote_code`` stays off: a model dir is data, never code.
"""

from __future__ import annotations

import os
from pathlib import Path

from .bundle import read_json
from .errors import ModelError

SUPPORTED = ("llama", "phi3", "mistral", "qwen2")

_TINY = Path(__file__).parent / "assets" / "tiny-phi3"


#: the files that carry a model dir's tokenizer and chat template
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def tiny_model_path() -> Path:
    """The shipped tiny Phi-3-architecture base model (see examples/pretrain_tiny_model.py)."""
    return _TINY


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src``'s tokenizer and chat template (TOKENIZER_FILES) into ``dst``: how a
    random-weight model dir gets the shipped tiny tokenizer (ids < 2048)."""
    import shutil

    for name in TOKENIZER_FILES:
        shutil.copy(Path(src) / name, Path(dst) / name)


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 over the model dir's safetensors files (name and SHA-256 of each, in name
    order): which weights a bundle was exported from, or an adapter trained on, so serving an
    adapter over another base is caught (``runtime.adapters``). Reads every weight byte once
    (about 5 s for Phi-3-mini's 7.6 GB from the page cache)."""
    import hashlib

    from .bundle import sha256_file

    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a model dir, checked for presence and a supported architecture."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"{d}: model directory not found")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing (not a Hugging Face model directory)")
    cfg = read_json(cfg_path, ModelError)
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED:
        raise ModelError(
            f"{cfg_path}: model_type {mtype!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    return cfg


def check_model_dir(model_dir: str | os.PathLike) -> dict:
    """Validate a model dir (config, tokenizer, readable safetensors) and return its config."""
    d = Path(model_dir)
    cfg = read_config(d)
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        if list(d.glob("*.bin")) or list(d.glob("*.pt")):
            raise ModelError(
                f"{d}: only pickle weights (.bin/.pt) found; edgetune loads "
                "safetensors only (convert with save_pretrained(safe_serialization=True))"
            )
        raise ModelError(f"{d}: no *.safetensors weights found")
    from .tensors import SafetensorsSource

    SafetensorsSource(d)  # every header parsed and checked: truncation, shards, dtypes
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        raise ModelError(f"{d}: no tokenizer (tokenizer.json) found")
    return cfg


def load_model(model_dir: str | os.PathLike, dtype=None, device: str = "cpu"):
    """Load a validated causal LM in ``dtype`` (fp32 by default) for training or export."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype or torch.float32,
            use_safetensors=True,
            trust_remote_code=False,
            low_cpu_mem_usage=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{model_dir}: could not load the model ({e})") from None
    # transformers wraps PreTrainedModel.to with functools.wraps, whose typeshed _Wrapped
    # does not bind self (no __get__), so mypy takes ``device`` for the model argument
    return model.to(device)  # type: ignore[arg-type]


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
