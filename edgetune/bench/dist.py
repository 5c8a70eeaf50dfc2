"""``edgetune bench dist``: per-rank memory and step time of ddp / fsdp / zero1-3 side by side.

The same Phi-3-shaped model as ``bench train`` (random weights), LoRA r=16 on every linear
projection, trained a few steps by N processes (gloo on CPUs, nccl on GPUs) with each
strategy, every strategy in its own torchrun job. Each rank reports the bytes it holds
right after the step's backward, before the optimizer step:

* weights    parameters + buffers (ZeRO-3 and FSDP: this rank's shard)
* grads      gradient tensors (ZeRO-2/3, FSDP: this rank's partition)
* optimizer  AdamW moments (+ ZeRO's fp32 master partitions)

With LoRA the frozen base dominates, so zero1/zero2 save little (they shard only what is
trained) and zero3 / fsdp bring each rank to about 1/N of ddp. Run directly by a worker as
``python -m edgetune.bench.dist --worker STRATEGY ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..train.config import Strategy

STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp", "zero1", "zero2", "zero3")
QUICK: tuple[Strategy, ...] = ("ddp", "zero2", "zero3")


def _worker(
    strategy: Strategy,
    hidden: int,
    layers: int,
    vocab: int,
    batch: int,
    seq: int,
    steps: int,
    out: str,
) -> None:
    import torch
    import torch.distributed as dist

    from ..train.adapters import wrap_with_adapter
    from ..train.config import TrainConfig
    from ..train.engines import build_engine, init_world, leave_world, state_bytes
    from ..train.recipe import compute_dtype
    from .train import _model

    cfg = TrainConfig(
        model="-",
        data="-",
        out="-",
        method="lora",
        rank=16,
        alpha=32,
        batch_size=batch,
        strategy=strategy,
        nproc=int(os.environ["WORLD_SIZE"]),
    )
    world = init_world(cfg)
    dtype = compute_dtype(world.device)
    model = _model(hidden, layers, vocab).to(device=world.device, dtype=dtype)
    engine = build_engine(wrap_with_adapter(model, cfg), cfg, world, dtype)
    torch.manual_seed(world.rank)
    ids = torch.randint(3, vocab, (batch, seq), device=world.device)
    times, mem = [], None
    for _ in range(steps + 1):  # the trainer's calls: backward (one micro-batch), step
        dist.barrier()
        t0 = time.perf_counter()
        engine.backward(engine.model(input_ids=ids, labels=ids).loss, last=True)
        mem = state_bytes(engine)
        engine.step()
        times.append(time.perf_counter() - t0)
    per_rank = [None] * world.size
    dist.all_gather_object(per_rank, mem)
    if world.main:
        ms = 1e3 * sorted(times[1:])[len(times[1:]) // 2]
        Path(out).write_text(json.dumps({"ms": ms, "per_rank": per_rank}))
    leave_world(world)


def _launch(strategy: Strategy, nproc: int, args: list[str], log) -> dict | None:
    from ..train.config import TrainConfig
    from ..train.launch import free_port, launcher_command, worker_env

    # the trainer's own launcher and worker environment (threads split over the cores this
    # process may use, gloo on loopback, DeepSpeed's accelerator): the benchmark runs what
    # it measures
    cfg = TrainConfig(model="-", data="-", out="-", strategy=strategy, nproc=nproc)
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp:
        res = Path(tmp) / "result.json"
        cmd = launcher_command(
            cfg,
            free_port(),
            ["--worker", strategy, "--out", str(res)] + args,
            module="edgetune.bench.dist",
        )
        p = subprocess.run(cmd, env=worker_env(cfg), capture_output=True, text=True)
        if p.returncode != 0 or not res.is_file():
            log(f"{strategy}: failed (exit code {p.returncode})\n{p.stderr[-3000:]}")
            return None
        return json.loads(res.read_text())


def bench(
    nproc: int = 2,
    quick: bool = False,
    hidden: int = 1024,
    layers: int = 8,
    vocab: int = 32064,
    batch: int = 1,
    seq: int = 128,
    steps: int = 3,
    log=print,
) -> list[dict]:
    """One torchrun job per strategy; ratios are against ddp's per-rank bytes and step time."""
    if quick:
        hidden, layers, vocab = 512, 4, 8192
    from ..train.engines import require_deepspeed

    strategies = QUICK if quick else STRATEGIES
    require_deepspeed("zero3")
    args = [
        "--hidden",
        str(hidden),
        "--layers",
        str(layers),
        "--vocab",
        str(vocab),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
    ]
    results = []
    for s in strategies:
        r = _launch(s, nproc, args, log)
        if r is None:
            continue
        top = max(r["per_rank"], key=lambda m: sum(m.values()))
        row = {
            "name": f"{s} x{nproc}",
            "strategy": s,
            "nproc": nproc,
            "ms": r["ms"],
            "weights_bytes": top["weights"],
            "grads_bytes": top["grads"],
            "optimizer_bytes": top["optimizer"],
            "total_bytes": sum(top.values()),
            "per_rank": r["per_rank"],
            "hidden": hidden,
            "layers": layers,
            "vocab": vocab,
            "batch_per_rank": batch,
            "seq": seq,
        }
        log(
            f"{row['name']}: {row['ms']:.0f} ms/step, {row['total_bytes'] / 2**20:.1f} MiB "
            "per rank (weights + grads + optimizer)"
        )
        results.append(row)
    ddp = next((r for r in results if r["strategy"] == "ddp"), None)
    for r in results:
        if ddp is not None and r is not ddp:
            r.update(
                baseline=ddp["name"],
                ratio=ddp["ms"] / r["ms"],
                bytes_vs_ddp=r["total_bytes"] / ddp["total_bytes"],
            )
    return results


def format_results(results: list[dict]) -> str:
    mib = 2**20
    lines = [
        f"{'strategy':<10}{'ms/step':>9}{'weights MiB':>13}{'grads MiB':>11}"
        f"{'optim MiB':>11}{'total MiB':>11}{'vs ddp (bytes)':>16}{'vs ddp (speed)':>16}"
    ]
    for r in results:
        lines.append(
            f"{r['name']:<10}{r['ms']:>9.0f}{r['weights_bytes'] / mib:>13.2f}"
            f"{r['grads_bytes'] / mib:>11.2f}{r['optimizer_bytes'] / mib:>11.2f}"
            f"{r['total_bytes'] / mib:>11.2f}{r.get('bytes_vs_ddp', 1.0):>16.2f}"
            f"{r.get('ratio', 1.0):>16.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=STRATEGIES, required=True)
    ap.add_argument("--out", required=True)
    for name, default in (
        ("hidden", 1024),
        ("layers", 8),
        ("vocab", 32064),
        ("batch", 1),
        ("seq", 128),
        ("steps", 3),
    ):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args(argv)
    _worker(a.worker, a.hidden, a.layers, a.vocab, a.batch, a.seq, a.steps, a.out)


if __name__ == "__main__":
    main()
