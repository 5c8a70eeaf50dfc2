"""Start the workers of a multi-process run: ``edgetune train --nproc N --strategy S``.

ddp and fsdp go through torchrun (``python -m torch.distributed.run``); zero1/2/3 on one
node through DeepSpeed's launcher (``python -m deepspeed.launcher.runner``). Several nodes
use torchrun for every strategy (DeepSpeed reads torchrun's environment), one launcher per
node with the same ``--master-addr``/``--master-port``, as Kubernetes PyTorchJobs and cloud
ML jobs run it. Workers get the resolved config as a YAML file and run
``edgetune.cli train --config FILE``; on a single node they meet on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import save_config
from ..errors import ConfigError, EdgetuneError
from ..models import check_model_dir
from .config import TrainConfig
from .engines import require_deepspeed
from .recipe import check_run_dir, uses_cuda

LOCALHOST = "127.0.0.1"
DEFAULT_PORT = 29500  # torchrun's


class WorkerError(EdgetuneError):
    """A worker process of a distributed run failed (its own output says why)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_launch(cfg: TrainConfig, resume: bool) -> None:
    """Refuse, in one line, what would fail in every worker: too many processes for this
    node, a missing engine, a bad run dir or model dir, a missing data file."""
    if uses_cuda(cfg):
        import torch

        gpus = torch.cuda.device_count()
        if cfg.nproc > gpus:
            raise ConfigError(
                f"--nproc {cfg.nproc} is more than the {gpus} visible CUDA GPU(s) "
                "on this node (one worker per GPU); use --nproc "
                f"{gpus} or fewer, or --device cpu"
            )
    elif cfg.nproc > _cores():
        raise ConfigError(
            f"--nproc {cfg.nproc} is more than the {_cores()} CPU core(s) this "
            f"process may use (one worker per core at most); use --nproc "
            f"{_cores()} or fewer"
        )
    if cfg.strategy.startswith("zero"):
        require_deepspeed(cfg.strategy)
    check_run_dir(cfg, resume)
    check_model_dir(cfg.model)
    for path in (cfg.data, cfg.eval_data):
        if path and not Path(path).is_file():
            raise ConfigError(f"{path}: data file not found")


def launcher_command(
    cfg: TrainConfig, port: int, worker_args: list[str], module: str = "edgetune.cli"
) -> list[str]:
    """The torchrun or DeepSpeed launcher command line that starts this node's workers:
    ``python -m MODULE train WORKER_ARGS`` (``bench dist`` runs its own module)."""
    entry = ["-m", module] + (["train"] if module == "edgetune.cli" else []) + worker_args
    if cfg.strategy.startswith("zero") and cfg.nnodes == 1:
        # no hostfile: DeepSpeed's runner launches locally, on 127.0.0.1
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            os.devnull,
            "--num_gpus",
            str(cfg.nproc),
            "--master_port",
            str(port),
            "--no_local_rank",
            "--module",
        ] + entry[1:]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={cfg.nproc}",
        f"--nnodes={cfg.nnodes}",
        f"--node-rank={cfg.node_rank}",
        f"--master-addr={cfg.master_addr if cfg.nnodes > 1 else LOCALHOST}",
        f"--master-port={port}",
    ] + entry


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """The environment of this node's workers (also ``bench dist``'s)."""
    env = dict(os.environ)
    # CPU workers share the cores instead of each taking all of them
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // cfg.nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["EDGETUNE_LAUNCHED"] = "1"  # the launching process reports the result, not each worker
    if cfg.nnodes == 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's sockets on loopback too
    if cfg.strategy.startswith("zero"):
        env.setdefault("DS_ACCELERATOR", "cuda" if uses_cuda(cfg) else "cpu")
    return env


def launch(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run this node's ``cfg.nproc`` workers to the end; returns the run dir."""
    check_launch(cfg, resume)
    port = cfg.master_port or (free_port() if cfg.nnodes == 1 else DEFAULT_PORT)
    with tempfile.TemporaryDirectory(prefix="edgetune-launch-") as tmp:
        cfg_file = save_config(
            dataclasses.replace(cfg, master_port=port), Path(tmp) / "config.yaml"
        )
        cmd = launcher_command(
            cfg, port, ["--config", str(cfg_file)] + (["--resume"] if resume else [])
        )
        proc = subprocess.Popen(cmd, env=worker_env(cfg))
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the workers too; let them stop
            proc.wait()
            raise
    if rc != 0:
        raise WorkerError(
            f"{cfg.strategy} workers failed (launcher exit code {rc}); their output above says why"
        )
    return Path(cfg.out)


def write_launch_script(out: Path, cfg: TrainConfig, world_size: int) -> Path:
    """``RUN/launch.sh``: the plain-launcher command that re-runs a multi-process run."""
    n = world_size // max(cfg.nnodes, 1)
    args = f"--module edgetune.cli train --config {out / 'config.yaml'}"
    torchrun = (
        f"torchrun --nproc-per-node {n} --nnodes {cfg.nnodes} --node-rank $NODE_RANK "
        f"--master-addr $MASTER_ADDR --master-port $MASTER_PORT {args}"
    )
    lines = [
        "#!/bin/sh",
        f"# edgetune {cfg.strategy}: {world_size} processes "
        f"({cfg.nnodes} node(s) x {n}). Re-run with the plain launcher; add --resume to",
        "# continue this run, or --out NEW for a new one. Multi-node: run it on every node",
        "# with NODE_RANK set (0 on the node at MASTER_ADDR).",
        ': "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"',
        torchrun + ' "$@"',
    ]
    if cfg.strategy.startswith("zero"):
        lines += [
            "# or DeepSpeed's own launcher (one node; with --hostfile for several):",
            f"# deepspeed --num_gpus {n} --num_nodes {cfg.nnodes} --no_local_rank {args}",
        ]
    path = out / "launch.sh"
    path.write_text("\n".join(lines) + "\n")
    return path
