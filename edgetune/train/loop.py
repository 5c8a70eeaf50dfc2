"""The training loop: ``train(cfg) -> run dir``, once, over any engine.

setup (validate data, load model, NF4-quantize the base for qlora/qdora, wrap with PEFT,
hand it to an engine) -> train (gradient accumulation, cosine schedule, eval loss,
metrics, checkpoint rotation, Ctrl-C) -> save (PEFT adapter, loss plot, resolved config).

One process runs it over ``LocalEngine``; ``--nproc N`` starts N workers (``launch.py``)
that each run it over a DDP, FSDP2 or DeepSpeed engine (``engines.py``). With B rows per
rank and W ranks, micro-batch k is rows ``order[k*B*W:(k+1)*B*W]`` of the one-process
order (same seed), split in W contiguous parts; each rank backpropagates its summed token
loss x W / (labelled tokens of the step on all ranks), every engine averages gradients over
the ranks, so a step is the step of one process with batch B*W. A resumed run restores
step, weights, AdamW, schedule and RNG from the checkpoint and continues exactly.

    edgetune train --model MODEL_DIR --data train.jsonl --out RUN --method qlora
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config
from ..hub import resolve_model
from ..models import check_model_dir, load_tokenizer
from . import checkpoint, engines, launch
from .adapters import load_base, wrap_with_adapter
from .config import TrainConfig
from .memory import return_freed_memory
from .recipe import (
    check_run_dir,
    collate,
    compute_dtype,
    eval_loss,
    lr_lambda,
    micro_batches,
    plot_loss,
    prepare_rows,
    recorded_config,
    resume_pin,
    save_adapter,
    share,
    token_loss_sum,
    total_steps,
)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data``; returns the run dir (adapter in RUN/adapter).
    With ``cfg.nproc``/``nnodes`` > 1 it starts the workers (torchrun / DeepSpeed), which
    come back here as ranks of the world. A Hub id ``cfg.model`` is resolved (downloaded)
    once, here: the workers get its snapshot dir."""
    return_freed_memory()  # this process and, through this function, every worker
    cfg = resume_pin(cfg, resume)
    cfg = replace(cfg, model=str(resolve_model(cfg.model, cfg.revision)), revision=None)
    if engines.in_worker():
        world = engines.init_world(cfg)
        try:
            return run(cfg, world, resume, progress)
        finally:
            engines.leave_world(world)
    if cfg.distributed:
        return launch.launch(cfg, resume)
    return run(cfg, engines.local_world(cfg), resume, progress)


def run(
    cfg: TrainConfig, world: engines.World, resume: bool = False, progress: bool = True
) -> Path:
    """This rank's part of the run (all of it in one process)."""
    out = check_run_dir(cfg, resume)
    check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_rows(cfg, tokenizer, cfg.data)  # validates every line before writing
    eval_rows = prepare_rows(cfg, tokenizer, cfg.eval_data) if cfg.eval_data else []
    world.barrier()  # every rank has checked the run dir before rank 0 writes to it

    dtype = compute_dtype(world.device)
    torch.manual_seed(cfg.seed)
    model = wrap_with_adapter(load_base(cfg, dtype=dtype, device=str(world.device)), cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    start_step, state = 0, None
    if resume:
        ckpt = checkpoint.latest(out)
        assert ckpt is not None  # check_run_dir refused a run dir without one
        weights, state = checkpoint.read(ckpt)
        state["weights"] = weights
        start_step = int(state["step"])
    engine = engines.build_engine(model, cfg, world, dtype, state)
    steps = total_steps(cfg, len(rows), world.size)
    sched = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_lambda(cfg, steps))
    if state is not None:
        sched.load_state_dict(state["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr
        checkpoint.restore_rng(state)

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(recorded_config(cfg), out / "config.yaml")
        for name, settings in engine.settings().items():
            (out / name).write_text(json.dumps(settings, indent=2) + "\n")
        if world.size > 1:
            launch.write_launch_script(out, cfg, world.size)
        if resume:
            checkpoint.truncate_metrics(out / "metrics.jsonl", start_step)

    pad_id = tokenizer.pad_token_id
    batches = micro_batches(
        len(rows), cfg.batch_size * world.size, cfg.seed, start_step * cfg.grad_accum
    )
    metrics = (out / "metrics.jsonl").open("a") if world.main else None
    where = f" {cfg.strategy} x{world.size}" if world.size > 1 else ""
    bar = tqdm(
        total=steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        desc=f"train {cfg.method}{where}",
        disable=None if progress and world.main else True,
    )
    step = start_step
    engine.model.train()
    try:
        while step < steps:
            t0 = time.perf_counter()
            parts = [
                collate(share(rows, idx, world.rank, world.size), pad_id, world.device)
                for _, idx in (next(batches) for _ in range(cfg.grad_accum))
            ]
            n_total, tokens = world.all_reduce(
                [sum(p["n_labels"] for p in parts), sum(p["n_tokens"] for p in parts)]
            )
            loss_sum = 0.0
            for j, p in enumerate(parts):
                loss, _ = token_loss_sum(engine.model, p)
                # the engines average gradients over the ranks; the step's loss is the sum
                # over all ranks' labelled tokens, divided by their count
                engine.backward(loss * world.size / max(n_total, 1), last=j == len(parts) - 1)
                loss_sum += float(loss.detach())
            engine.step()
            sched.step()
            step += 1
            (loss_sum,) = world.all_reduce([loss_sum])
            rec = {
                "step": step,
                "loss": loss_sum / max(n_total, 1),
                "lr": sched.get_last_lr()[0],
                "tokens_per_s": tokens / (time.perf_counter() - t0),
                "tokens": int(tokens),
            }
            if eval_rows and (step % cfg.eval_every == 0 or step == steps):
                rec["eval_loss"] = eval_loss(engine.model, eval_rows, cfg, pad_id, world.device)
            if metrics is not None:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if step % cfg.save_every == 0 and step < steps:
                save_checkpoint(out, step, engine, sched, cfg.keep_checkpoints)
    except KeyboardInterrupt:
        # one process saves where it stopped; ranks of a world stop at different collectives,
        # so they resume from their last save
        if world.size == 1:
            save_checkpoint(out, step, engine, sched, cfg.keep_checkpoints)
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    full = engine.weights() if world.size > 1 else None  # sharded: gather (all ranks)
    if world.main:
        save_adapter(engine.peft, cfg, out, state_dict=full)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    world.barrier()
    return out


def save_checkpoint(out: Path, step: int, engine: engines.Engine, sched, keep: int) -> Path:
    """Gather (all ranks), write (rank 0), and wait so no rank runs ahead of the save."""
    sd = engine.state_dict()
    path = checkpoint.path(out, step)
    if engine.is_main:
        checkpoint.write(out, step, sd["weights"], sd["optimizer"], sched.state_dict(), keep)
    engine.barrier()
    return path
