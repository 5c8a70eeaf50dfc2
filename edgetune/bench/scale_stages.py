"""``edgetune bench scale``'s stages, each run in a freshly spawned process (its peak RSS is
its own), and the inputs they need (a random PEFT adapter for the merge).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

from . import in_fresh_process, peak_rss_bytes

# -- the stages, each run in a fresh process -------------------------------------------------


def _export(model: str, out: str):
    from ..bundle import dir_bytes
    from ..export import ExportConfig, export

    def run() -> dict:
        export(model, out, ExportConfig(), force=True, log=lambda s: None)
        return {"bundle_bytes": dir_bytes(out)}

    return run


def _merge(model: str, adapter: str, out: str):
    from ..bundle import dir_bytes
    from ..merge import merge

    write_random_adapter(Path(model), Path(adapter))  # one small tensor at a time

    def run() -> dict:
        merge(model, adapter, out, force=True)
        return {"merged_bytes": dir_bytes(out)}

    return run


def _qlora_step(model: str, data: str, out: str):
    from ..train import TrainConfig, train

    cfg = TrainConfig(
        model=model,
        data=data,
        out=out,
        method="qlora",
        rank=16,
        alpha=32.0,
        max_steps=1,
        seq_len=256,
        packing=True,
        batch_size=1,
        warmup_steps=1,
        gradient_checkpointing=True,
        device="cpu",
        seed=0,
    )

    def run() -> dict:
        run_dir = train(cfg, progress=False)
        rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        return {"loss": rec["loss"], "train_tokens_per_s": rec["tokens_per_s"]}

    return run


class _Box:
    """Stands in for the queue ``bench.runtime._measure`` puts its result on."""

    def put(self, item: dict) -> None:
        self.item = item


def _decode(backend: str, bundle: str, threads: int, prompt_tokens: int, new_tokens: int):
    from .runtime import _measure

    def run() -> dict:
        box = _Box()
        _measure(backend, bundle, threads, prompt_tokens, new_tokens, 1, box)
        return {k: v for k, v in box.item.items() if k not in ("name", "peak_rss_bytes")}

    return run


# stage -> (its arguments) -> the timed call, returning the stage's fields
_STAGE_FNS: dict[str, Callable[..., Callable[[], dict]]] = {
    "export": _export,
    "merge": _merge,
    "qlora-step": _qlora_step,
    "decode": _decode,
}


def _stage_child(stage: str, kwargs: dict, q: mp.Queue) -> None:
    """One stage in this fresh process: its setup (imports, inputs), then the timed call;
    {fields, wall_s, peak_rss_bytes} or {"error"} on the queue."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run = _STAGE_FNS[stage](**kwargs)
        t0 = time.perf_counter()
        out = run()
        out["wall_s"] = time.perf_counter() - t0
    except Exception as e:  # a failing stage is reported in the table; the rest go on
        q.put({"error": f"{type(e).__name__}: {e}"[:800]})
        return
    q.put({**out, "peak_rss_bytes": peak_rss_bytes()})


def bandwidth_child(threads: int, nbytes: int, q: mp.Queue) -> None:
    from .kernels import read_bandwidth

    q.put({"read_bandwidth_gb_s": read_bandwidth(threads, nbytes)[0]})


def build_child(layer_counts: list[int], model_args: dict, q: mp.Queue) -> None:
    """Find or build the model of every layer count (one process: one transformers import);
    {"models": [{layers, path, cached, build_s}], "build_peak_rss_bytes"} or {"error"}."""
    from .random_model import cached_random_model

    models = []
    try:
        for layers in layer_counts:
            t0 = time.perf_counter()
            path, cached = cached_random_model(layers, **model_args)
            models.append(
                {
                    "layers": layers,
                    "path": str(path),
                    "cached": cached,
                    "build_s": time.perf_counter() - t0,
                }
            )
    except Exception as e:
        q.put({"error": f"{type(e).__name__}: {e}"[:800]})
        return
    q.put({"models": models, "build_peak_rss_bytes": peak_rss_bytes()})


def in_child(target, *args) -> dict:
    result, code = in_fresh_process(target, *args)
    return result if result is not None else {"error": f"the process died (exit code {code})"}


def run_stage(stage: str, **kwargs) -> dict:
    """One stage in a fresh process: {fields, wall_s, peak_rss_bytes, process_s (the whole
    child: start, imports, the stage)} or {"error"}."""
    t0 = time.perf_counter()
    r = in_child(_stage_child, stage, kwargs)
    return {**r, "process_s": time.perf_counter() - t0}


# -- inputs ----------------------------------------------------------------------------------


def write_random_adapter(
    model_dir: Path, out: Path, rank: int = 16, alpha: float = 32.0, seed: int = 0
) -> Path:
    """A PEFT LoRA adapter of rank ``rank`` over every projection of ``model_dir``, random
    A ~ N(0, 1/in) and B ~ N(0, 0.02²) (so the merge has a delta to add), with edgetune's
    note that it was trained on an NF4 base, so merging it is a qlora merge."""
    import numpy as np

    from ..merge import ADAPTER_META
    from ..tensors import SafetensorsSource, SafetensorsWriter

    src = SafetensorsSource(model_dir)
    mods = [
        n[: -len(".weight")]
        for n in src.names()
        if n.startswith("model.layers.") and n.endswith("_proj.weight")
    ]
    targets = sorted({m.rsplit(".", 1)[1] for m in mods})
    specs = []
    for m in mods:
        n_out, n_in = src.info(f"{m}.weight").shape
        specs += [
            (f"base_model.model.{m}.lora_A.weight", "F32", (rank, n_in)),
            (f"base_model.model.{m}.lora_B.weight", "F32", (n_out, rank)),
        ]
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with SafetensorsWriter(out / "adapter_model.safetensors", specs) as w:
        for name, _, shape in specs:
            std = 1 / math.sqrt(shape[1]) if ".lora_A." in name else 0.02
            w.write(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": str(model_dir),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {
        "method": "qlora",
        "base_quantization": "nf4",
        "base_model": str(model_dir),
        "rank": rank,
        "alpha": alpha,
    }
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out
