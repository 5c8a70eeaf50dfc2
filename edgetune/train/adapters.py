"""Wrap a causal LM with a PEFT LoRA / DoRA adapter, over an NF4 base for qlora / qdora."""

from __future__ import annotations

from ..merge import ADAPTER_META  # noqa: F401  (edgetune's note beside a PEFT adapter)
from .config import TrainConfig
from .nf4 import quantize_model_nf4


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    config = LoraConfig(
        r=cfg.rank,
        # peft annotates lora_alpha as int, but takes any number: it is only the scale alpha / r
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules
        if cfg.target_modules == "all-linear"
        else [m.strip() for m in cfg.target_modules.split(",")],
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return for_nf4_base(config) if cfg.quantized else config


def for_nf4_base(config):
    """Give a LoraConfig edgetune's LoRA layer for ``NF4Linear`` bases: PEFT's LoRA, with
    DoRA's weight norm computed for a frozen NF4 weight (see ``edgetune.train.dora``). The
    saved adapter is plain PEFT."""
    from .dora import NF4LoraLinear
    from .nf4 import NF4Linear

    config._register_custom_module({NF4Linear: NF4LoraLinear})
    return config


def load_base(cfg: TrainConfig, dtype=None, device: str = "cpu"):
    """The base model to train. qlora / qdora: NF4-quantized while loading, with the frozen
    embedding and LM head kept in the checkpoint's 16-bit dtype (peak memory: that model plus
    one chunk of one projection; see ``load_model_nf4``). lora / dora: in ``dtype``."""
    from ..models import load_model
    from .nf4 import load_model_nf4

    if not cfg.quantized:
        return load_model(cfg.model, dtype=dtype, device=device)
    return load_model_nf4(
        cfg.model, dtype=dtype, device=device, adapter_targets=adapter_targets(cfg)
    )


def adapter_targets(cfg: TrainConfig) -> tuple[str, ...]:
    """Module names the adapter is asked to wrap beyond PEFT's all-linear (which never takes
    the embedding or the LM head)."""
    if cfg.target_modules == "all-linear":
        return ()
    return tuple(m.strip() for m in cfg.target_modules.split(","))


def wrap_with_adapter(model, cfg: TrainConfig):
    """Freeze the base (NF4-quantize it for q* methods) and add trainable adapters."""
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quantized:
        quantize_model_nf4(model)
    return get_peft_model(model, lora_config(cfg))
