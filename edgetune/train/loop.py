"""The training loop: ``train(cfg) -> run dir``.

setup (validate data, load model, NF4-quantize the base for qlora/qdora, wrap
with PEFT) -> train (gradient accumulation, cosine schedule, eval loss,
checkpoints) -> save (PEFT adapter, metrics, loss plot, resolved config).

Data order is a pure function of (seed, epoch), so a resumed run needs only the
step count, optimizer/scheduler state and RNG state to continue exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import save_config
from ..data import load_examples, tokenize_examples
from ..data.tokenize import IGNORE, TokenizedExample
from ..errors import ConfigError, OutputExistsError
from ..models import check_model_dir, load_tokenizer
from . import checkpoint
from .adapters import ADAPTER_META, load_base, wrap_with_adapter
from .config import TrainConfig
from .head import logits_only_at
from .memory import return_freed_memory


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16) when present, else CPU (fp32: bf16 is many times slower without native
    support on most CPUs)."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


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
    return [TokenizedExample([t for p in g for t in p.input_ids], [t for p in g for t in p.labels],
                             tuple(len(p.input_ids) for p in g)) for g in groups]


def collate(batch: list[TokenizedExample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Packed rows get a block-diagonal causal mask (4-D, boolean) and
    position ids that restart at each example, so packed examples never attend each other."""
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
            pos[i, start:start + seg] = torch.arange(seg)
            if mask4 is not None:
                mask4[i, 0, start:start + seg, start:start + seg] = torch.ones(seg, seg).tril().bool()
            start += seg
        if mask4 is not None:  # padding positions attend to themselves only (no loss there)
            mask4[i, 0, torch.arange(n, T), torch.arange(n, T)] = True
    out = {"input_ids": ids, "labels": labels, "position_ids": pos,
           "attention_mask": mask4 if mask4 is not None else attn}
    out = {k: v.to(device) for k, v in out.items()}
    out["n_tokens"] = sum(len(b.input_ids) for b in batch)
    return out


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count. The LM head
    runs at the labelled positions only: (N, V) logits, not (B, T, V) and a shifted copy
    (at Phi-3's 32064-token vocabulary, 33 MB per 256 positions in fp32, and cross-entropy
    and its gradient each hold another)."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t + 1
    keep = targets != IGNORE
    with logits_only_at(model, keep):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits  # (N, V)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine
    return f


def micro_batches(n_rows: int, cfg: TrainConfig, first: int):
    """Yield (epoch, row indices) for micro-batch number ``first`` onwards; the order in
    each epoch is a permutation seeded by (seed, epoch)."""
    per_epoch = math.ceil(n_rows / cfg.batch_size)
    k = first
    while True:
        epoch, j = divmod(k, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_rows)
        yield epoch, order[j * cfg.batch_size:(j + 1) * cfg.batch_size]
        k += 1


@torch.no_grad()
def eval_loss(model, rows: list[TokenizedExample], cfg: TrainConfig, pad_id: int, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), cfg.batch_size):
        loss, n = token_loss_sum(model, collate(rows[i:i + cfg.batch_size], pad_id, device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _prepare_rows(cfg: TrainConfig, tokenizer, path: str) -> list[TokenizedExample]:
    rows = tokenize_examples(tokenizer, load_examples(path), cfg.seq_len, source=path,
                             strict=cfg.strict, train_on_prompt=cfg.train_on_prompt)
    return pack_examples(rows, cfg.seq_len) if cfg.packing else rows


def check_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    out = Path(cfg.out)
    if resume:
        if checkpoint.latest(out) is None:
            raise ConfigError(f"{out}: --resume given but no checkpoint found there")
    elif out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out}: run dir exists and is not empty "
                                "(use --resume to continue it, or choose another --out)")
    return out


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data``; returns the run dir (adapter in RUN/adapter).
    With ``cfg.nproc``/``nnodes`` > 1 it starts the workers (torchrun / DeepSpeed), which run
    ``distributed.train_distributed``."""
    from . import distributed, launch

    return_freed_memory()  # this process and, through this function, every worker
    if distributed.in_worker():
        return distributed.train_distributed(cfg, resume, progress)
    if cfg.distributed:
        return launch.launch(cfg, resume)
    out = check_run_dir(cfg, resume)
    check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    rows = _prepare_rows(cfg, tokenizer, cfg.data)  # validates every line before writing
    eval_rows = _prepare_rows(cfg, tokenizer, cfg.eval_data) if cfg.eval_data else []

    device, dtype = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    model = load_base(cfg, dtype=dtype, device=str(device))
    model = wrap_with_adapter(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or math.ceil(
        cfg.epochs * math.ceil(len(rows) / cfg.batch_size) / cfg.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start_step = 0
    if resume:
        start_step = checkpoint.load(checkpoint.latest(out), model, opt, sched)
        checkpoint.truncate_metrics(out / "metrics.jsonl", start_step)

    pad_id = tokenizer.pad_token_id
    batches = micro_batches(len(rows), cfg, start_step * cfg.grad_accum)
    metrics = (out / "metrics.jsonl").open("a")
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.method}", unit="step",
               disable=None if progress else True, dynamic_ncols=True)
    step = start_step
    model.train()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            parts = [collate([rows[i] for i in idx], pad_id, device)
                     for _, idx in (next(batches) for _ in range(cfg.grad_accum))]
            n_total = sum(int((p["labels"][:, 1:] != IGNORE).sum()) for p in parts)
            loss_sum = 0.0
            for p in parts:
                loss, _ = token_loss_sum(model, p)
                (loss / max(n_total, 1)).backward()
                loss_sum += float(loss.detach())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(p["n_tokens"] for p in parts)
            rec = {"step": step, "loss": loss_sum / max(n_total, 1), "lr": sched.get_last_lr()[0],
                   "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if eval_rows and (step % cfg.eval_every == 0 or step == total_steps):
                rec["eval_loss"] = eval_loss(model, eval_rows, cfg, pad_id, device)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if step % cfg.save_every == 0 and step < total_steps:
                checkpoint.save(out, step, model, opt, sched, cfg.keep_checkpoints)
    except KeyboardInterrupt:
        checkpoint.save(out, step, model, opt, sched, cfg.keep_checkpoints)
        raise
    finally:
        bar.close()
        metrics.close()

    save_adapter(model, cfg, out)
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    return out


def save_adapter(model, cfg: TrainConfig, out: Path, state_dict=None) -> Path:
    """PEFT adapter dir, written beside and renamed into place. ``state_dict``: the full
    trainable weights when the model's own are sharded (FSDP, ZeRO-3)."""
    final = out / "adapter"
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    meta = {"method": cfg.method, "base_quantization": "nf4" if cfg.quantized else "none",
            "base_model": str(Path(cfg.model).resolve()), "rank": cfg.rank, "alpha": cfg.alpha}
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    cfg_path = tmp / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str(Path(cfg.model).resolve())
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def plot_loss(metrics_path: Path, png: Path) -> None:
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
