"""Benchmarks: speed against a baseline measured in the same run."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Callable


def peak_rss_bytes() -> int:
    """Peak resident set of this process's address space (VmHWM; file-backed weight pages
    count too). Not ``ru_maxrss``: Linux carries that across ``execve``, so a spawned child
    would report at least its parent's peak at the time it was started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_round(rounds: list[dict], speed: Callable[[dict], float], peak_key: str) -> dict:
    """One setup's result over alternating rounds: the fastest round (noise on a shared
    machine only ever slows a run down), with the highest ``peak_key`` of all rounds."""
    fastest: dict = max(rounds, key=speed)
    best = dict(fastest)
    best[peak_key] = max(r[peak_key] for r in rounds)
    best["rounds"] = len(rounds)
    return best


def in_fresh_process(target: Callable, *args) -> tuple[dict | None, int]:
    """Run ``target(*args, queue)`` in a freshly spawned interpreter (its own allocator,
    thread pools and peak RSS, nothing inherited from this process) and return (the dict it
    put on the queue, or None if it put none or failed; its exit code). The dict is small:
    the child is joined before the queue is read."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    p.join()
    assert p.exitcode is not None  # join() without a timeout returns once the child has exited
    return (None if p.exitcode != 0 or q.empty() else q.get()), p.exitcode
