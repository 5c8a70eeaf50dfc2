"""Data-parallel and sharded training through the engines: torch DDP, FSDP2, DeepSpeed ZeRO.

A worker is a process that torchrun or the DeepSpeed launcher started (``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment); ``edgetune train --nproc N``
starts them itself (``launch.py``). Each worker runs ``train_distributed``: the recipe of
``loop.train`` with the model wrapped by one engine:

    ddp    torch ``DistributedDataParallel``: every rank holds the whole model, gradients
           are all-reduced
    fsdp   FSDP2 ``fully_shard`` per decoder layer and at the root: parameters (the NF4
           packed weights of qlora/qdora included), gradients and optimizer state sharded
    zero1  DeepSpeed ZeRO stage 1: optimizer state sharded
    zero2  ... and gradients
    zero3  ... and parameters

Data: with B sequences per rank and W ranks, micro-batch k is rows
``order[k*B*W:(k+1)*B*W]`` of the single-process order (same seed), split in W contiguous
parts. Each rank backpropagates its summed token loss x W / (labelled tokens of the step
on all ranks); every engine averages gradients over the ranks, so a step is the step of
one process with batch B*W.

Checkpoints and the adapter: trainable weights and AdamW state are gathered to full
tensors (small: adapters only, the base is frozen and re-read from the model dir) and
rank 0 writes them in the single-process format, so any strategy and any number of
processes can resume any checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..config import save_config
from ..data.tokenize import IGNORE, TokenizedExample
from ..errors import ConfigError
from ..models import check_model_dir, load_tokenizer
from . import checkpoint
from .adapters import load_base, wrap_with_adapter
from .config import TrainConfig
from .loop import (
    _prepare_rows,
    check_run_dir,
    collate,
    eval_loss,
    lr_lambda,
    micro_batches,
    plot_loss,
    save_adapter,
    token_loss_sum,
)
from .nf4 import NF4Linear

DEEPSPEED_HINT = "pip install 'edgetune[distributed]' (or pip install deepspeed)"


def in_worker() -> bool:
    """True in a process started by torchrun or the DeepSpeed launcher."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def uses_cuda(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def require_deepspeed(strategy: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"--strategy {strategy} needs DeepSpeed, which is not installed: "
                          f"{DEEPSPEED_HINT}")


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(cfg: TrainConfig) -> World:
    """Join the process group: nccl on GPUs (one per local rank), gloo on CPUs."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if uses_cuda(cfg):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if cfg.strategy.startswith("zero"):
        require_deepspeed(cfg.strategy)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        if device.type == "cpu":
            # On CPUs DeepSpeed probes every op with the compiler and JIT-builds a shared-memory
            # all-reduce for inference when its comm backend starts (minutes on a small box);
            # training needs neither (its collectives go through gloo), so declare no op built.
            deepspeed.ops.__compatible_ops__ = {}
        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    return World(rank, size, local_rank, device)


# ---- settings the engines run with (saved in the run dir) -------------------------------

def deepspeed_config(cfg: TrainConfig, world_size: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config edgetune generates: ZeRO stage, batch sizes, precision."""
    return {
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": int(cfg.strategy[-1])},
        # the optimizer is torch AdamW, as in a single-process run (DeepSpeed's fused Adam
        # needs its CUDA/C++ ops built); the schedule is edgetune's, stepped per step
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def fsdp_settings(model, world_size: int) -> dict:
    """What ``shard_fsdp2`` does, as data (saved beside the run for the record)."""
    return {"api": "torch.distributed.fsdp.fully_shard (FSDP2)", "mesh": [world_size],
            "fully_shard": sorted(_layer_types(model)) + ["root (embeddings, norm, lm_head)"],
            "reshard_after_forward": True, "mixed_precision": None,
            "nf4_weights": "sharded like any parameter (packed uint8 codes); absmax buffers "
                           "replicated"}


def _layer_types(model) -> set[str]:
    return set(getattr(model.get_base_model(), "_no_split_modules", None) or [])


def shard_fsdp2(model, world: World) -> None:
    """FSDP2 over each decoder layer, then the root (which takes the remaining parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    layers = _layer_types(model)
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.share_weight_with_numpy = False
    for m in list(model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ---- the engines: one interface over DDP / FSDP2 and DeepSpeed ---------------------------

def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class TorchEngine:
    """DDP or FSDP2 over the PEFT model, with a torch AdamW over its trainable parameters."""

    def __init__(self, peft_model, cfg: TrainConfig, world: World):
        self.strategy = cfg.strategy
        self.peft = peft_model
        if cfg.strategy == "fsdp":
            shard_fsdp2(peft_model, world)
            self.model = peft_model
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                peft_model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Gradients are reduced across ranks on the step's last micro-batch only."""
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
            loss.backward()
        else:
            with nullcontext() if last else self.model.no_sync():
                loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_weights(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.detach()).cpu().contiguous()
                for n, p in zip(self.names, self.params, strict=True)}

    def full_optimizer_state(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: _full(v).cpu() for k, v in s.items()} for i, s in sd["state"].items()}
        return sd

    def load_optimizer_state(self, sd: dict) -> None:
        if self.strategy == "fsdp":  # full tensors -> this rank's shard, placed like the param
            from torch.distributed.tensor import distribute_tensor

            state = {}
            for i, s in sd["state"].items():
                p = self.params[int(i)]
                state[i] = {k: v if k == "step" else
                            distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                            for k, v in s.items()}
            sd = {**sd, "state": state}
        self.optimizer.load_state_dict(sd)


class DeepSpeedEngine:
    """``deepspeed.initialize`` over the PEFT model with a torch AdamW and ZeRO stage 1/2/3."""

    def __init__(self, peft_model, cfg: TrainConfig, ds_config: dict):
        import deepspeed

        self.peft = peft_model
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.zero, _, _ = deepspeed.initialize(model=peft_model,
                                                           optimizer=self.optimizer,
                                                           config=ds_config)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed counts micro-batches and steps the optimizer at the accumulation boundary;
        # the loss is already divided by the step's token count, not by the accumulation
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()

    def step(self) -> None:
        pass  # done by the engine in ``backward`` of the step's last micro-batch

    def full_weights(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().cpu().contiguous()
                for n, p in zip(self.names, self.params, strict=True)}

    def full_optimizer_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = next(iter(self.optimizer.state.values()))["step"].detach().cpu().clone()
        state = {i: {"step": step.clone(),
                     **{k: safe_get_full_optimizer_state(p, k).detach().cpu()
                        for k in ("exp_avg", "exp_avg_sq")}}
                 for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_optimizer_state(self, sd: dict) -> None:
        """AdamW moments into ZeRO's flat partitions. The inner optimizer has no state before
        its first step, so it is created here (zeros) and filled through DeepSpeed's
        full-tensor setters, which write this rank's fragment."""
        from deepspeed.utils import safe_set_full_optimizer_state

        step = sd["state"][0]["step"]
        for flat in self._flat_partitions():
            self.optimizer.state[flat] = {"step": step.clone().to(flat.device),
                                          "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)}
        if hasattr(self.zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 fragments
            self.zero._lazy_init_hp_params_optimizer_state()
        for i, p in enumerate(self.params):
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, sd["state"][i][k].to(self.model.device), k)
        saved = sd["param_groups"][0]
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions that the inner AdamW steps (ZeRO-3 puts them in its
        param groups only during ``step``)."""
        return list(getattr(self.zero, "single_partition_of_fp32_groups", None) or
                    self.zero.fp32_partitioned_groups_flat)


def build_engine(model, cfg: TrainConfig, world: World, dtype: torch.dtype):
    if cfg.strategy.startswith("zero"):
        return DeepSpeedEngine(model, cfg, deepspeed_config(cfg, world.size, dtype))
    return TorchEngine(model, cfg, world)


# ---- per-rank memory (the benchmark's numbers) --------------------------------------------

def _local(t):
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.to_local()
    return t.ds_tensor if hasattr(t, "ds_tensor") else t  # ZeRO-3: this rank's partition


def _held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views into one flat buffer, as
    DeepSpeed's, count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = _local(t).untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for weights (parameters + buffers), gradients and optimizer
    state (AdamW moments, and ZeRO's fp32 master partitions). Call right after the last
    backward of a step, before the optimizer step, when gradients exist."""
    weights = _held_bytes([*engine.peft.parameters(), *engine.peft.buffers()])
    grads = [p.grad for p in engine.peft.parameters() if p.requires_grad]
    optim = [v for s in engine.optimizer.state.values() for v in s.values()
             if torch.is_tensor(v) and v.dim() > 0]
    zero = getattr(engine, "zero", None)
    if zero is not None:  # ZeRO keeps gradients and fp32 masters in its own flat partitions
        masters = engine._flat_partitions()
        optim += masters
        grads += [m.grad for m in masters]
        for g in (getattr(zero, "averaged_gradients", None) or {}).values():
            grads += g if isinstance(g, list) else [g]
        grads.append(getattr(zero, "grad_partitions_flat_buffer", None))
    return {"weights": weights, "grads": _held_bytes(grads), "optimizer": _held_bytes(optim)}


# ---- the loop -------------------------------------------------------------------------------

def _share(rows: list[TokenizedExample], idx: np.ndarray, world: World) -> list[TokenizedExample]:
    """This rank's contiguous part of a global micro-batch. A rank left without rows (the
    last, short batch of an epoch) gets one row with no labels: it joins the collectives
    and adds nothing to the loss or the gradient."""
    mine = np.array_split(idx, world.size)[world.rank]
    if len(mine):
        return [rows[i] for i in mine]
    r = rows[idx[0]]
    return [TokenizedExample(r.input_ids, [IGNORE] * len(r.input_ids), r.segments)]


def _all_reduce(values: list[float], world: World) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def write_settings(out: Path, cfg: TrainConfig, engine, world: World, dtype) -> None:
    """Rank 0: the engine's settings and the plain-launcher command that re-runs them."""
    n = world.size // max(cfg.nnodes, 1)
    args = f"--module edgetune.cli train --config {out / 'config.yaml'}"
    if cfg.strategy.startswith("zero"):
        (out / "ds_config.json").write_text(
            json.dumps(deepspeed_config(cfg, world.size, dtype), indent=2) + "\n")
        ds = f"deepspeed --num_gpus {n} --num_nodes {cfg.nnodes} --no_local_rank {args}"
    else:
        (out / "fsdp.json" if cfg.strategy == "fsdp" else out / "ddp.json").write_text(
            json.dumps(fsdp_settings(engine.peft, world.size) if cfg.strategy == "fsdp" else
                       {"api": "torch.nn.parallel.DistributedDataParallel",
                        "world_size": world.size}, indent=2) + "\n")
        ds = None
    torchrun = (f"torchrun --nproc-per-node {n} --nnodes {cfg.nnodes} --node-rank $NODE_RANK "
                f"--master-addr $MASTER_ADDR --master-port $MASTER_PORT {args}")
    lines = ["#!/bin/sh", f"# edgetune {cfg.strategy}: {world.size} processes "
             f"({cfg.nnodes} node(s) x {n}). Re-run with the plain launcher; add --resume to",
             "# continue this run, or --out NEW for a new one. Multi-node: run it on every node",
             "# with NODE_RANK set (0 on the node at MASTER_ADDR).",
             ": \"${NODE_RANK:=0}\" \"${MASTER_ADDR:=127.0.0.1}\" \"${MASTER_PORT:=29500}\"",
             torchrun + ' "$@"']
    if ds:
        lines += ["# or DeepSpeed's own launcher (one node; with --hostfile for several):",
                  f"# {ds}"]
    (out / "launch.sh").write_text("\n".join(lines) + "\n")


def train_distributed(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """One worker's part of a data-parallel / sharded run; returns the run dir."""
    world = init_world(cfg)
    try:
        return _train(cfg, resume, progress, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, progress: bool, world: World) -> Path:
    out = check_run_dir(cfg, resume)
    check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    rows = _prepare_rows(cfg, tokenizer, cfg.data)
    eval_rows = _prepare_rows(cfg, tokenizer, cfg.eval_data) if cfg.eval_data else []
    dist.barrier()  # every rank has checked the run dir before rank 0 writes to it

    dtype = torch.bfloat16 if world.device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    model = load_base(cfg, dtype=dtype, device=str(world.device))
    model = wrap_with_adapter(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    start_step, state = 0, None
    if resume:  # weights go in before the engine copies or shards them
        weights, state = checkpoint.read(checkpoint.latest(out))
        checkpoint.load_weights(model, weights)
        start_step = int(state["step"])
    engine = build_engine(model, cfg, world, dtype)
    micro = math.ceil(len(rows) / (cfg.batch_size * world.size))
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * micro / cfg.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_lambda(cfg, total_steps))
    if state is not None:
        engine.load_optimizer_state(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr
        checkpoint.restore_rng(state)

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        write_settings(out, cfg, engine, world, dtype)
        if resume:
            checkpoint.truncate_metrics(out / "metrics.jsonl", start_step)

    pad_id = tokenizer.pad_token_id
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * world.size)
    batches = micro_batches(len(rows), global_cfg, start_step * cfg.grad_accum)
    metrics = (out / "metrics.jsonl").open("a") if world.main else None
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               desc=f"train {cfg.method} {cfg.strategy} x{world.size}",
               disable=None if progress and world.main else True)
    step = start_step
    engine.model.train()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            parts = [collate(_share(rows, idx, world), pad_id, world.device)
                     for _, idx in (next(batches) for _ in range(cfg.grad_accum))]
            n_total, tokens = _all_reduce(
                [sum(int((p["labels"][:, 1:] != IGNORE).sum()) for p in parts),
                 sum(p["n_tokens"] for p in parts)], world)
            scale = world.size / max(n_total, 1)  # engines average over ranks; we want the sum
            loss_sum = 0.0
            for j, p in enumerate(parts):
                loss, _ = token_loss_sum(engine.model, p)
                engine.backward(loss * scale, last=j == len(parts) - 1)
                loss_sum += float(loss.detach())
            engine.step()
            sched.step()
            step += 1
            (loss_sum,) = _all_reduce([loss_sum], world)
            rec = {"step": step, "loss": loss_sum / max(n_total, 1), "lr": sched.get_last_lr()[0],
                   "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if eval_rows and (step % cfg.eval_every == 0 or step == total_steps):
                rec["eval_loss"] = eval_loss(engine.model, eval_rows, cfg, pad_id, world.device)
            if metrics is not None:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(out, step, engine, sched, world, cfg.keep_checkpoints)
    finally:  # on Ctrl-C the ranks stop at different collectives: resume from the last save
        bar.close()
        if metrics is not None:
            metrics.close()

    weights = engine.full_weights()
    if world.main:
        save_adapter(engine.peft, cfg, out, state_dict=weights)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    dist.barrier()
    return out


def save_checkpoint(out: Path, step: int, engine, sched, world: World, keep: int) -> None:
    """Gather (all ranks), write (rank 0), and wait so no rank runs ahead of the save."""
    weights, optimizer = engine.full_weights(), engine.full_optimizer_state()
    if world.main:
        checkpoint.write(out, step, weights, optimizer, sched.state_dict(), keep)
    dist.barrier()
