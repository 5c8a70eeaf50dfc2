"""LoRA / DoRA adapters applied unmerged over a bundle's int4 base (native backend).

    y = W_q x + s B (A x)                      LoRA (s = alpha / r, or alpha / sqrt(r))
    y = g * (W_q x + s B (A x)),  g = m / ||W_q + s B A||_row      DoRA

One base serves many adapters: the 4-bit weights are shared and read once per pass for every
sequence, and each sequence's rows get its own adapter's low-rank update (two small
matmuls, r x (in + out) values per projection: about 5 % of the int4 bytes at rank 16).
DoRA's magnitude is folded into one gain per output, computed once at load from the base
weights the bundle actually holds (its int4 blocks dequantized): the merged bundle computes
g * (W + s B A) before quantizing it, so the two differ by int4 rounding, as any merge does.

The adapter is read with PEFT's own layout and checked by the same code that checks a merge
(``edgetune.merge.read_plan``), against the bundle's projections instead of a checkpoint's
headers, so a module the bundle lacks or a shape that does not fit is refused naming the
tensor. When both sides record it, the SHA-256 of the weights the adapter was trained on must
equal that of the weights the bundle was exported from: serving an adapter over another
model, or over a bundle it is already merged into, is refused. torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import kernels
from ..errors import ModelError
from ..merge import ADAPTER_META, check_adapter_dir, read_plan
from .weights import Linear, held


@dataclass(frozen=True)
class LowRank:
    """One projection's update: y += (x @ a) @ b, then y *= gain (DoRA)."""

    a: np.ndarray  # (in, r) fp32: lora_A transposed
    b: np.ndarray  # (r, out) fp32: lora_B transposed, times the scale
    gain: np.ndarray | None = None  # (out,) DoRA: m / ||W + s B A||_row

    def apply(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y += (x @ self.a) @ self.b
        if self.gain is not None:
            y *= self.gain
        return y


@dataclass
class Adapter:
    """An adapter ready to serve: updates by bundle projection name."""

    name: str
    path: Path
    modules: dict[str, LowRank] = field(default_factory=dict)
    method: str = "lora"  # "lora" | "dora"

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


class BundleSource:
    """The bundle's projections in the form ``merge.read_plan`` checks an adapter against
    (a checkpoint's {tensor: shape}): '<module>.weight' is (out, in) for every projection,
    and the embedding table."""

    def __init__(self, bundle: Path, linears: dict[str, Linear], embed_shape: tuple[int, int]):
        self.dir = bundle
        self.shapes = {f"{name}.weight": (lin.n, lin.k) for name, lin in linears.items()}
        self.shapes["model.embed_tokens.weight"] = embed_shape

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def info(self, name: str) -> _Shape:
        return _Shape(self.shapes[name])


def dense(lin: Linear) -> np.ndarray:
    """The (K, N) fp32 weight a projection computes with."""
    if lin.kind == "q4":
        return kernels.q4_dequantize(held(lin.q4))
    if lin.kind == "q8":
        codes, scales = held(lin.q8_codes), held(lin.q8_scales)
        w = (codes.astype(np.float32) - 128.0) * scales[:, :, None]  # (N, K/b, b)
        return w.reshape(lin.n, lin.k).T
    return held(lin.f32)


def dora_gain(lin: Linear, a: np.ndarray, b: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """m / ||W + s B A|| per output, W the bundle's own weight; ``b`` already scaled, both
    transposed as in ``LowRank``. A block of outputs at a time."""
    w = dense(lin)  # (K, N)
    norms = np.empty(lin.n, np.float32)
    step = max(1, (1 << 20) // max(1, lin.k))
    for j in range(0, lin.n, step):
        cols = w[:, j : j + step] + a @ b[:, j : j + step]  # (K, c)
        norms[j : j + step] = np.sqrt(np.einsum("kc,kc->c", cols, cols))
    return (magnitude / norms).astype(np.float32)


def base_fingerprint(manifest: dict) -> str | None:
    return (manifest.get("source") or {}).get("weights_sha256")


def adapter_fingerprint(adapter_dir: Path) -> str | None:
    meta = adapter_dir / ADAPTER_META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("base_weights_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{meta}: not valid JSON ({e})") from None


def load_adapter(adapter_dir: Path, decoder, manifest: dict, name: str = "") -> Adapter:
    """Read, check and prepare a PEFT adapter for ``decoder`` (a NativeDecoder). Raises
    ModelError naming the adapter file and the first thing that does not fit."""
    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    label = f"adapter {name!r} ({adapter_dir})" if name else str(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ModelError(f"{label}: task_type {task}; a causal-LM bundle serves CAUSAL_LM adapters")
    trained_on, exported_from = adapter_fingerprint(adapter_dir), base_fingerprint(manifest)
    if trained_on and exported_from and trained_on != exported_from:
        raise ModelError(
            f"{label}: trained on base weights with SHA-256 {trained_on[:16]}..., but the "
            f"bundle was exported from weights with SHA-256 {exported_from[:16]}... (another "
            "model, or a bundle this adapter is already merged into): export the adapter's "
            "base model and serve the adapter over that bundle"
        )
    source = BundleSource(decoder.w.path.parent, decoder.lin, decoder.embed.shape)
    plan = read_plan(adapter_dir, source)  # type: ignore[arg-type]
    if plan.replaced or plan.biases:
        what = next(iter(plan.replaced or plan.biases))
        raise ModelError(
            f"{label}: replaces or biases {what} (modules_to_save / lora_bias): such "
            "adapters cannot run unmerged; merge it (edgetune merge) and serve the merged bundle"
        )
    out = Adapter(name, adapter_dir)
    for upd in plan.updates.values():
        if upd.embedding:
            raise ModelError(
                f"{label}: adapts the embedding table ({upd.module}): serve it merged "
                "(edgetune merge), the native backend applies adapters to projections only"
            )
        lin = decoder.lin[upd.module]
        a = np.ascontiguousarray(plan.adapter.array(upd.a).T, dtype=np.float32)  # (in, r)
        b = np.ascontiguousarray(plan.adapter.array(upd.b).T * upd.scale, dtype=np.float32)
        gain = None
        if upd.magnitude is not None:
            gain = dora_gain(lin, a, b, plan.adapter.array(upd.magnitude).astype(np.float32))
            out.method = "dora"
        out.modules[upd.module] = LowRank(a, b, gain)
    if not out.modules:
        raise ModelError(f"{label}: has no LoRA tensors")
    return out
