"""Merge a LoRA / DoRA adapter into its base: ``merge(model_dir, adapter_dir, out) -> out``.

For an adapter trained on an NF4 base (qlora / qdora) the base is first
quantized and dequantized exactly as training saw it, then the adapter's delta
is added in fp32 by PEFT's own merge. Merging into the original fp weights
instead (or into a 4-bit model) gives a model that differs measurably from the
one that was trained.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import ModelError, OutputExistsError
from .models import check_model_dir, load_model, load_tokenizer

BASE_QUANTIZATIONS = ("auto", "nf4", "none")


def adapter_base_quantization(adapter_dir: Path) -> str:
    """'nf4' or 'none', from edgetune's note beside the adapter (absent: a plain PEFT adapter)."""
    from .train.adapters import ADAPTER_META

    meta = adapter_dir / ADAPTER_META
    if meta.is_file():
        return json.loads(meta.read_text()).get("base_quantization", "none")
    return "none"


def check_adapter_dir(adapter_dir: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise ModelError(f"{adapter_dir / name}: missing (not a PEFT adapter directory)")


def load_adapted(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                 base_quantization: str = "auto", merged_base: bool = False):
    """The base with the adapter applied. ``base_quantization`` nf4 puts the base in the same
    NF4 form as training: NF4 layers (``merged_base=False``) or their fp32 dequantization
    (``merged_base=True``, what merging adds the delta to)."""
    from peft import PeftModel

    from .train.nf4 import nf4_roundtrip_weights, quantize_model_nf4

    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    if base_quantization == "auto":
        base_quantization = adapter_base_quantization(adapter_dir)
    model = load_model(model_dir)
    if base_quantization == "nf4":
        (nf4_roundtrip_weights if merged_base else quantize_model_nf4)(model)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{adapter_dir}: adapter does not fit the model in {model_dir} ({e})") from None


def merge(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike,
          base_quantization: str = "auto", force: bool = False) -> Path:
    """Write a plain Hugging Face model dir (safetensors) with the adapter merged in."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
    check_model_dir(model_dir)
    peft_model = load_adapted(model_dir, adapter_dir, base_quantization, merged_base=True)
    merged = peft_model.merge_and_unload()
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(str(tmp))
        src_gen = Path(model_dir) / "generation_config.json"
        if src_gen.is_file():
            shutil.copy(src_gen, tmp / "generation_config.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
