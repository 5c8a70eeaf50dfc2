"""Benchmarks: speed against a baseline measured in the same run."""

from __future__ import annotations

from pathlib import Path


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
