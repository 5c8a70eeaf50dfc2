"""The recipe's pieces that every engine shares: data rows, batches, the loss, the schedule,
eval loss, and the run dir's outputs (PEFT adapter, loss plot).

This module sits under the loop and the engines and imports neither: ``loop.py`` runs
these pieces over an engine (``engines.py``), ``launch.py`` checks a run dir with them.

Data order is a pure function of (seed, epoch): ``micro_batches`` yields the same rows for
micro-batch k in every run, so a resumed run needs only its step count, and a run with W
processes and B rows each sees the rows of one process with B*W.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data import load_examples, tokenize_examples
from ..data.tokenize import IGNORE, TokenizedExample
from ..errors import ConfigError, OutputExistsError
from ..hub import hub_source
from ..merge import ADAPTER_META
from ..models import weights_sha256
from . import checkpoint
from .config import TrainConfig
from .head import logits_only_at


def uses_cuda(cfg: TrainConfig) -> bool:
    """``--device cuda``, or ``auto`` on a machine where torch sees a GPU."""
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPUs (bf16 is many times slower without native support on most)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The one device of a single-process run: CUDA when asked or present, else the CPU."""
    if uses_cuda(cfg):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def prepare_rows(cfg: TrainConfig, tokenizer, path: str) -> list[TokenizedExample]:
    """Validate and tokenize a JSONL file (every line, before anything is written), packed
    into rows of ``seq_len`` when ``cfg.packing``."""
    rows = tokenize_examples(
        tokenizer,
        load_examples(path),
        cfg.seq_len,
        source=path,
        strict=cfg.strict,
        train_on_prompt=cfg.train_on_prompt,
    )
    return pack_examples(rows, cfg.seq_len) if cfg.packing else rows


def pack_examples(examples: list[TokenizedExample], seq_len: int) -> list[TokenizedExample]:
    """Greedy packing into rows of at most ``seq_len`` tokens, order preserved; each row
    keeps its examples' lengths so ``collate`` can stop them attending each other."""
    groups: list[list[TokenizedExample]] = []
    length = 0
    for ex in examples:
        if groups and length + len(ex.input_ids) <= seq_len:
            groups[-1].append(ex)
            length += len(ex.input_ids)
        else:
            groups.append([ex])
            length = len(ex.input_ids)
    return [
        TokenizedExample(
            [t for p in g for t in p.input_ids],
            [t for p in g for t in p.labels],
            tuple(len(p.input_ids) for p in g),
        )
        for g in groups
    ]


def collate(batch: list[TokenizedExample], pad_id: int, device) -> dict:
    """Right-pad a batch. Packed rows get a block-diagonal causal mask (4-D, boolean) and
    position ids that restart at each example, so packed examples never attend each other.
    ``n_tokens``: the batch's tokens, ``n_labels``: the tokens the loss is taken over."""
    T = max(len(b.input_ids) for b in batch)
    B = len(batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    packed = any(len(b.segments) > 1 for b in batch)
    mask4 = torch.zeros((B, 1, T, T), dtype=torch.bool) if packed else None
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        ids[i, :n] = torch.tensor(b.input_ids)
        labels[i, :n] = torch.tensor(b.labels)
        attn[i, :n] = 1
        start = 0
        for seg in b.segments or (n,):
            pos[i, start : start + seg] = torch.arange(seg)
            if mask4 is not None:
                mask4[i, 0, start : start + seg, start : start + seg] = (
                    torch.ones(seg, seg).tril().bool()
                )
            start += seg
        if mask4 is not None:  # padding positions attend to themselves only (no loss there)
            mask4[i, 0, torch.arange(n, T), torch.arange(n, T)] = True
    out = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "attention_mask": mask4 if mask4 is not None else attn,
    }
    moved: dict = {k: v.to(device) for k, v in out.items()}
    moved["n_tokens"] = sum(len(b.input_ids) for b in batch)
    moved["n_labels"] = int((labels[:, 1:] != IGNORE).sum())
    return moved


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count. The LM head
    runs at the labelled positions only: (N, V) logits, not (B, T, V) and a shifted copy
    (at Phi-3's 32064-token vocabulary, 33 MB per 256 positions in fp32, and cross-entropy
    and its gradient each hold another)."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t + 1
    keep = targets != IGNORE
    with logits_only_at(model, keep):
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits  # (N, V)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def total_steps(cfg: TrainConfig, n_rows: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the rows."""
    micro = math.ceil(n_rows / (cfg.batch_size * world_size))
    return cfg.max_steps or math.ceil(cfg.epochs * micro / cfg.grad_accum)


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x lr."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def micro_batches(n_rows: int, batch_size: int, seed: int, first: int):
    """Yield (epoch, row indices) for micro-batch number ``first`` onwards; the order in
    each epoch is a permutation seeded by (seed, epoch)."""
    per_epoch = math.ceil(n_rows / batch_size)
    k = first
    while True:
        epoch, j = divmod(k, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n_rows)
        yield epoch, order[j * batch_size : (j + 1) * batch_size]
        k += 1


def share(
    rows: list[TokenizedExample], idx: np.ndarray, rank: int, size: int
) -> list[TokenizedExample]:
    """Rank ``rank``'s contiguous part of a global micro-batch (all of it in one process).
    A rank left without rows (the last, short batch of an epoch) gets one row with no
    labels: it joins the collectives and adds nothing to the loss or the gradient."""
    mine = np.array_split(idx, size)[rank]
    if len(mine):
        return [rows[i] for i in mine]
    r = rows[idx[0]]
    return [TokenizedExample(r.input_ids, [IGNORE] * len(r.input_ids), r.segments)]


@torch.no_grad()
def eval_loss(model, rows: list[TokenizedExample], cfg: TrainConfig, pad_id: int, device) -> float:
    """Mean next-token loss (nats/token) over ``rows``, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), cfg.batch_size):
        loss, n = token_loss_sum(model, collate(rows[i : i + cfg.batch_size], pad_id, device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def check_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """The run dir, refused in one line if it would be overwritten or has nothing to resume."""
    out = Path(cfg.out)
    if resume:
        if checkpoint.latest(out) is None:
            raise ConfigError(f"{out}: --resume given but no checkpoint found there")
    elif out.exists() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out}: run dir exists and is not empty "
            "(use --resume to continue it, or choose another --out)"
        )
    return out


def resume_pin(cfg: TrainConfig, resume: bool) -> TrainConfig:
    """On ``--resume``, a Hub id given without ``--revision`` continues on the commit the run
    began on (its config.yaml), not on wherever the branch has moved since."""
    saved = Path(cfg.out) / "config.yaml"
    if not resume or cfg.revision or Path(cfg.model).is_dir() or not saved.is_file():
        return cfg
    import yaml

    rec = yaml.safe_load(saved.read_text()) or {}
    if rec.get("model") == cfg.model and rec.get("revision"):
        return replace(cfg, revision=str(rec["revision"]))
    return cfg


def recorded_config(cfg: TrainConfig) -> TrainConfig:
    """The config a run saves: a base from the Hub cache as its repo id and commit hash (the
    same weights again, on any machine), a local dir as it is."""
    src = hub_source(cfg.model)
    return replace(cfg, model=src["repo_id"], revision=src["revision"]) if src else cfg


def save_adapter(model, cfg: TrainConfig, out: Path, state_dict=None) -> Path:
    """PEFT adapter dir, written beside and renamed into place. ``state_dict``: the full
    trainable weights when the model's own are sharded (FSDP, ZeRO-3)."""
    final = out / "adapter"
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    meta = {
        "method": cfg.method,
        "base_quantization": "nf4" if cfg.quantized else "none",
        "base_model": str(Path(cfg.model).resolve()),
        "base_weights_sha256": weights_sha256(cfg.model),
        "rank": cfg.rank,
        "alpha": cfg.alpha,
    }
    src = hub_source(cfg.model)
    if src:  # the Hub repo and commit the base came from
        meta.update(base_repo_id=src["repo_id"], base_revision=src["revision"])
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    cfg_path = tmp / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    # PEFT's fields for where the base lives: a Hub id and its commit, else the local dir
    adapter_cfg["base_model_name_or_path"] = src["repo_id"] if src else meta["base_model"]
    if src:
        adapter_cfg["revision"] = src["revision"]
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def plot_loss(metrics_path: Path, png: Path) -> None:
    """Train (and eval) loss against step, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train")
    ev = [r for r in recs if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
