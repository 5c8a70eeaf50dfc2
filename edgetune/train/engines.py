"""The engines the one training loop runs over: one process, torch DDP / FSDP2, DeepSpeed ZeRO.

An engine wraps the PEFT model and its AdamW and answers the loop's few questions:

    model                    what the forward pass runs through (the PEFT model, DDP's
                             wrapper, or DeepSpeed's engine)
    peft                     the PEFT model itself (``save_pretrained``)
    optimizer                the torch AdamW over the trainable parameters (the scheduler's)
    backward(loss, last)     one micro-batch's backward; ``last`` marks the accumulation
                             boundary, where gradients are reduced across ranks
    step()                   the optimizer step at that boundary, gradients zeroed
    weights(), state_dict()  full (unsharded) trainable weights / + AdamW state, on every
                             rank (a collective), in ``torch.optim`` form
    load_state_dict(sd)      AdamW state from such a dict, into this rank's shards
    is_main, barrier()       rank 0, and a wait for every rank

Strategies (``--strategy``), every one started by ``launch.py`` with ``--nproc N``:

    ddp    ``DistributedDataParallel``: every rank holds the whole model, gradients are
           all-reduced
    fsdp   FSDP2 ``fully_shard`` per decoder layer and at the root: parameters (the NF4
           packed weights of qlora/qdora included), gradients and optimizer state sharded
    zero1  DeepSpeed ZeRO stage 1: optimizer state sharded
    zero2  ... and gradients
    zero3  ... and parameters

Weights of a resumed run go into the model before the engine copies or shards it
(``build_engine(..., state)``), AdamW state after. Every engine writes and reads the one
checkpoint format of ``checkpoint.py``, so any strategy and any number of processes can
resume any checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from contextlib import nullcontext
from typing import Protocol

import torch

from ..errors import ConfigError
from . import checkpoint
from .config import TrainConfig
from .nf4 import NF4Linear
from .recipe import resolve_device, uses_cuda

DEEPSPEED_HINT = "pip install 'edgetune[distributed]' (or pip install deepspeed)"


def in_worker() -> bool:
    """True in a process started by torchrun or the DeepSpeed launcher."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def require_deepspeed(strategy: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"--strategy {strategy} needs DeepSpeed, which is not installed: {DEEPSPEED_HINT}"
        )


# ---- the world: this process's place among the ranks -------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    """Rank, number of ranks and this rank's device; one process is the world of size 1."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums over the ranks (float64), for the step's token counts and loss."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def local_world(cfg: TrainConfig) -> World:
    return World(0, 1, 0, resolve_device(cfg))


def init_world(cfg: TrainConfig) -> World:
    """Join the process group (a worker): nccl on GPUs (one per local rank), gloo on CPUs."""
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
        torch.distributed.init_process_group(backend)
    return World(rank, size, local_rank, device)


def leave_world(world: World) -> None:
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- the interface ------------------------------------------------------------------------


class Engine(Protocol):
    world: World
    model: torch.nn.Module
    peft: torch.nn.Module
    optimizer: torch.optim.AdamW

    def backward(self, loss: torch.Tensor, last: bool) -> None: ...
    def step(self) -> None: ...
    def weights(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, sd: dict) -> None: ...
    def settings(self) -> dict[str, dict]: ...

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


class _Common:
    """What every engine does alike: the trainable parameters, AdamW over them, the world."""

    def __init__(self, peft_model, cfg: TrainConfig, world: World):
        self.world = world
        self.peft = peft_model
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    @property
    def is_main(self) -> bool:
        return self.world.main

    def barrier(self) -> None:
        self.world.barrier()

    def state_dict(self) -> dict:
        return {"weights": self.weights(), "optimizer": self.full_optimizer_state()}

    def load_state_dict(self, sd: dict) -> None:
        """AdamW state (``sd["optimizer"]``); the weights went in before the wrap."""
        self.load_optimizer_state(sd["optimizer"])

    def settings(self) -> dict[str, dict]:
        return {}

    def weights(self) -> dict[str, torch.Tensor]:
        return {
            n: _full(p.detach()).cpu().contiguous()
            for n, p in zip(self.names, self.params, strict=True)
        }

    def full_optimizer_state(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: _full(v).cpu() for k, v in s.items()} for i, s in sd["state"].items()}
        return sd

    def load_optimizer_state(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


class LocalEngine(_Common):
    """One process: the PEFT model as it is."""

    def __init__(self, peft_model, cfg: TrainConfig, world: World):
        super().__init__(peft_model, cfg, world)
        self.model = peft_model

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _layer_types(model) -> set[str]:
    return set(getattr(model.get_base_model(), "_no_split_modules", None) or [])


def fsdp_settings(model, world_size: int) -> dict:
    """What ``shard_fsdp2`` does, as data (saved beside the run for the record)."""
    return {
        "api": "torch.distributed.fsdp.fully_shard (FSDP2)",
        "mesh": [world_size],
        "fully_shard": sorted(_layer_types(model)) + ["root (embeddings, norm, lm_head)"],
        "reshard_after_forward": True,
        "mixed_precision": None,
        "nf4_weights": "sharded like any parameter (packed uint8 codes); absmax buffers replicated",
    }


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


class TorchDistributedEngine(_Common):
    """DDP or FSDP2 over the PEFT model, with a torch AdamW over its trainable parameters."""

    def __init__(self, peft_model, cfg: TrainConfig, world: World):
        self.strategy = cfg.strategy
        if cfg.strategy == "fsdp":
            shard_fsdp2(peft_model, world)
            self.model = peft_model
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                peft_model, device_ids=[world.local_rank] if world.device.type == "cuda" else None
            )
        super().__init__(peft_model, cfg, world)  # after sharding: AdamW over the shards

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

    def load_optimizer_state(self, sd: dict) -> None:
        if self.strategy == "fsdp":  # full tensors -> this rank's shard, placed like the param
            from torch.distributed.tensor import distribute_tensor

            state = {}
            for i, s in sd["state"].items():
                p = self.params[int(i)]
                state[i] = {
                    k: v
                    if k == "step"
                    else distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                    for k, v in s.items()
                }
            sd = {**sd, "state": state}
        self.optimizer.load_state_dict(sd)

    def settings(self) -> dict[str, dict]:
        if self.strategy == "fsdp":
            return {"fsdp.json": fsdp_settings(self.peft, self.world.size)}
        return {
            "ddp.json": {
                "api": "torch.nn.parallel.DistributedDataParallel",
                "world_size": self.world.size,
            }
        }


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


class DeepSpeedEngine(_Common):
    """``deepspeed.initialize`` over the PEFT model with a torch AdamW and ZeRO stage 1/2/3.

    DeepSpeed counts micro-batches and its ``step()`` must follow every ``backward``; it
    steps the optimizer at the accumulation boundary only. ``backward`` makes that call
    for the micro-batches before the boundary, ``step`` for the boundary's, so the loop
    (and a benchmark) sees the same two calls as with any other engine."""

    def __init__(self, peft_model, cfg: TrainConfig, world: World, dtype: torch.dtype):
        import deepspeed

        super().__init__(peft_model, cfg, world)
        self.ds_config = deepspeed_config(cfg, world.size, dtype)
        self.model, self.zero, _, _ = deepspeed.initialize(
            model=peft_model, optimizer=self.optimizer, config=self.ds_config
        )

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # the loss is already divided by the step's token count, not by the accumulation
        self.model.backward(loss, scale_wrt_gas=False)
        if not last:
            self.model.step()  # counts the micro-batch; no optimizer step before the boundary

    def step(self) -> None:
        self.model.step()  # the boundary: optimizer step, gradients zeroed

    def settings(self) -> dict[str, dict]:
        return {"ds_config.json": self.ds_config}

    def weights(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return {
            n: safe_get_full_fp32_param(p).detach().cpu().contiguous()
            for n, p in zip(self.names, self.params, strict=True)
        }

    def full_optimizer_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = next(iter(self.optimizer.state.values()))["step"].detach().cpu().clone()
        state = {
            i: {
                "step": step.clone(),
                **{
                    k: safe_get_full_optimizer_state(p, k).detach().cpu()
                    for k in ("exp_avg", "exp_avg_sq")
                },
            }
            for i, p in enumerate(self.params)
        }
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return {
            "state": state,
            "param_groups": [{**group, "params": list(range(len(self.params)))}],
        }

    def load_optimizer_state(self, sd: dict) -> None:
        """AdamW moments into ZeRO's flat partitions. The inner optimizer has no state before
        its first step, so it is created here (zeros) and filled through DeepSpeed's
        full-tensor setters, which write this rank's fragment."""
        from deepspeed.utils import safe_set_full_optimizer_state

        step = sd["state"][0]["step"]
        for flat in self.flat_partitions():
            self.optimizer.state[flat] = {
                "step": step.clone().to(flat.device),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        if hasattr(self.zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 fragments
            self.zero._lazy_init_hp_params_optimizer_state()
        for i, p in enumerate(self.params):
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, sd["state"][i][k].to(self.model.device), k)
        saved = sd["param_groups"][0]
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in saved.items() if k != "params"})

    def flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions that the inner AdamW steps (ZeRO-3 puts them in its
        param groups only during ``step``)."""
        return list(
            getattr(self.zero, "single_partition_of_fp32_groups", None)
            or self.zero.fp32_partitioned_groups_flat
        )


def build_engine(
    model, cfg: TrainConfig, world: World, dtype: torch.dtype, state: dict | None = None
) -> Engine:
    """Wrap the PEFT model for ``cfg.strategy`` (one process: as it is). ``state``: a
    checkpoint's ``{"weights", "optimizer"}`` to resume from."""
    if state is not None:  # before the engine copies (DDP, ZeRO) or shards (FSDP) them
        checkpoint.load_weights(model, state["weights"])
    engine: Engine
    if world.size == 1:
        engine = LocalEngine(model, cfg, world)
    elif cfg.strategy.startswith("zero"):
        engine = DeepSpeedEngine(model, cfg, world, dtype)
    else:
        engine = TorchDistributedEngine(model, cfg, world)
    if state is not None:
        engine.load_state_dict(state)
    return engine


# ---- per-rank memory (``bench dist``'s numbers) --------------------------------------------


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


def state_bytes(engine: Engine) -> dict[str, int]:
    """Bytes this rank holds for weights (parameters + buffers), gradients and optimizer
    state (AdamW moments, and ZeRO's fp32 master partitions). Call right after the last
    backward of a step, before ``step()``, when gradients exist."""
    weights = _held_bytes([*engine.peft.parameters(), *engine.peft.buffers()])
    grads = [p.grad for p in engine.peft.parameters() if p.requires_grad]
    optim = [
        v
        for s in engine.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    ]
    if isinstance(engine, DeepSpeedEngine):  # ZeRO's own flat gradient and master partitions
        masters = engine.flat_partitions()
        optim += masters
        grads += [m.grad for m in masters]
        for g in (getattr(engine.zero, "averaged_gradients", None) or {}).values():
            grads += g if isinstance(g, list) else [g]
        grads.append(getattr(engine.zero, "grad_partitions_flat_buffer", None))
    return {"weights": weights, "grads": _held_bytes(grads), "optimizer": _held_bytes(optim)}
