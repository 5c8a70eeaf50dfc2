"""Ctrl-C in tests: start a training run that SIGINT can stop, and wait until it has a
checkpoint to resume from."""

import signal
import subprocess
import time
from pathlib import Path


def start_interruptible(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen with SIGINT's default disposition, as a terminal's foreground process has: a
    shell without job control starts `cmd &` with SIGINT ignored, an ignored signal is
    inherited, and Python then installs no KeyboardInterrupt handler (a backgrounded test
    suite would see Ctrl-C do nothing)."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **popen_kwargs,
    )


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float) -> None:
    """Until ``run`` has any checkpoint (not one by name: rotation deletes the early ones),
    failing clearly if the run ends first."""
    deadline = time.time() + timeout
    while (
        not list((run / "checkpoints").glob("step-*"))
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
