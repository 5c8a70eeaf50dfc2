"""Atomic, resumable training checkpoints.

A checkpoint is a directory ``RUN/checkpoints/step-NNNNNNN`` holding the
trainable (adapter) weights as safetensors and the optimizer, scheduler and RNG
state as a tensors-only torch file (loaded with ``weights_only=True``). It is
written under a temporary name and renamed into place, so a process killed at
any moment leaves either a complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def latest(run: Path) -> Path | None:
    """The newest complete checkpoint of a run dir, or None."""
    d = _dir(run)
    if not d.is_dir():
        return None
    done = sorted(
        p for p in d.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file()
    )
    return done[-1] if done else None


def path(run: Path, step: int) -> Path:
    """Where checkpoint ``step`` of a run lives."""
    return _dir(run) / f"{PREFIX}{step:07d}"


def write(
    run: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` from full (unsharded) trainable weights and optimizer state
    in ``torch.optim`` form; every strategy and world size writes and reads this one format."""
    d = _dir(run)
    d.mkdir(parents=True, exist_ok=True)
    final = path(run, step)
    tmp = d / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "adapter.safetensors"))
    state = {
        "step": step,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}) + "\n")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in d.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's trainable weights and its state (step, optimizer, scheduler, RNG)."""
    weights = load_file(str(ckpt / "adapter.safetensors"))
    return weights, torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """A checkpoint's trainable weights into the (not yet wrapped or sharded) PEFT model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))


def restore_rng(state: dict) -> None:
    """The RNG state the run had at the checkpoint (dropout continues as uninterrupted)."""
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))
