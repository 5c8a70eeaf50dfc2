"""Wrap a causal LM with a PEFT LoRA / DoRA adapter, over an NF4 base for qlora / qdora."""

from __future__ import annotations

from .config import TrainConfig
from .nf4 import quantize_model_nf4

#: edgetune's note beside a PEFT adapter: method and how the base was quantized in training.
ADAPTER_META = "edgetune_adapter.json"


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules if cfg.target_modules == "all-linear"
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
    """The base model to train: NF4-quantized tensor by tensor while loading for qlora /
    qdora (peak memory: the NF4 model plus one fp32 projection), as stored otherwise."""
    from ..models import load_model
    from .nf4 import load_model_nf4

    return (load_model_nf4 if cfg.quantized else load_model)(cfg.model, dtype=dtype, device=device)


def wrap_with_adapter(model, cfg: TrainConfig):
    """Freeze the base (NF4-quantize it for q* methods) and add trainable adapters."""
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quantized:
        quantize_model_nf4(model)
    return get_peft_model(model, lora_config(cfg))
