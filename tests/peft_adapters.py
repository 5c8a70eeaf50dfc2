"""PEFT adapters with random (non-zero) updates, for the merge and unmerged-adapter tests."""

import json

import torch

from edgetune.merge import ADAPTER_META
from edgetune.models import load_model


def random_adapter(model_dir, out, method="lora", rank=4, targets="all-linear", seed=0, **kw):
    """A PEFT adapter over ``model_dir`` with random B (DoRA magnitudes and modules_to_save off
    their initial values), so every adapted weight really changes; edgetune's note marks q*
    as NF4-trained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(model_dir),
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=targets,
            use_dora=method.endswith("dora"),
            task_type="CAUSAL_LM",
            **kw,
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the ones PEFT zeroes
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "modules_to_save" in name:  # a trained head differs from the base's
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(out))
    (out / ADAPTER_META).write_text(
        json.dumps(
            {"method": method, "base_quantization": "nf4" if method.startswith("q") else "none"}
        )
    )
    return out
