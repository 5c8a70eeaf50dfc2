"""``export_gguf_lora(adapter_dir, base_dir, out) -> FILE.gguf``: a PEFT LoRA adapter as a
GGUF LoRA, which llama.cpp (``--lora FILE.gguf``) and Ollama (``ADAPTER ./FILE.gguf``) apply
over a stock GGUF of the base model without a merge.

Layout (llama.cpp's ``convert_lora_to_gguf.py``): ``general.type = "adapter"``,
``adapter.type = "lora"``, one ``adapter.lora.alpha``; for each adapted weight ``W`` named
as in the base GGUF, ``W.lora_a`` = A (r, in) and ``W.lora_b`` = B (out, r), fp32. llama.cpp
scales every module by alpha / r with r read from the tensor, so a module whose PEFT
scale differs (rank_pattern / alpha_pattern, rsLoRA's alpha / sqrt r) has the ratio folded
into its B. Llama / Mistral B rows get the same q/k permutation as the base weights.

What GGUF LoRA cannot hold is refused before anything is written: DoRA (its magnitude
vector), LoRA on the embedding, trained biases and modules_to_save (merge and export the
model instead). An adapter trained with QLoRA learned its update over the NF4-rounded
base: applied over a full-precision base it is close to, but not exactly, the merged model.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelError, OutputExistsError
from ..files import temp_beside
from ..merge import read_plan
from ..models import check_model_dir
from ..tensors import SafetensorsSource
from .families import Dims
from .gguf import ARCH, _permute


def export_gguf_lora(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    force: bool = False,
    log=print,
) -> Path:
    """Write the adapter at ``adapter_dir`` (trained over ``base_dir``) as a GGUF LoRA."""
    adapter_dir, base_dir, out = Path(adapter_dir), Path(base_dir), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
    cfg = check_model_dir(base_dir)
    d = Dims.of(cfg)
    p = read_plan(adapter_dir, SafetensorsSource(base_dir))
    if p.replaced or p.biases:
        what = sorted(p.replaced) + sorted(p.biases)
        raise ModelError(
            f"{adapter_dir}: {what[0]} (and {len(what) - 1} more) replace or shift base "
            "tensors, which a GGUF LoRA cannot hold: merge and export the model instead"
        )
    updates = list(p.updates.values())
    if not updates:
        raise ModelError(f"{adapter_dir}: the adapter adapts no weight")
    for u in updates:
        if u.magnitude is not None:
            raise ModelError(
                f"{adapter_dir}: {u.module} is a DoRA module; GGUF LoRA has no magnitude "
                "vector: merge and export the model (edgetune merge, export --format gguf)"
            )
        if u.embedding:
            raise ModelError(f"{adapter_dir}: {u.module}: LoRA on the embedding is not supported")
    names = gguf.get_tensor_name_map(ARCH[d.family], d.layers)
    ranks = {u.module: p.adapter.info(u.a).shape[0] for u in updates}
    first = updates[0]
    alpha = first.scale * ranks[first.module]  # llama.cpp: scale = alpha / r per module
    tensors: list[tuple[str, np.ndarray]] = []
    for u in updates:
        mapped = names.get_name(u.module)
        if mapped is None:
            raise ModelError(f"{adapter_dir}: {u.module} has no GGUF name for {d.family}")
        a = p.adapter.array(u.a)
        b = p.adapter.array(u.b) * np.float32(u.scale * ranks[u.module] / alpha)
        if d.family in ("llama", "mistral") and u.module.endswith((".q_proj", ".k_proj")):
            b = _permute(b, d.heads if u.module.endswith(".q_proj") else d.kv_heads)
        tensors += [(f"{mapped}.weight.lora_a", a), (f"{mapped}.weight.lora_b", b)]

    fd, tmp = temp_beside(out)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH[d.family]])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(adapter_dir.parent.name or adapter_dir.name)
        for name, x in tensors:  # adapters are small: A and B of every module at once
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"{out}: GGUF LoRA, {len(updates)} modules, alpha {alpha:g}")
    return out
