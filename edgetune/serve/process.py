"""``edgetune serve`` in a child process on a free loopback port: for benchmarks and tests.

The child is started with ``--host 127.0.0.1 --port 0``; the address comes from the line it
prints once it listens. Its output is drained by a thread (so the child never blocks on a
full pipe) and kept, to show when a start fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path


class ServerProcess:
    """One ``edgetune serve`` child: ``.url`` (…/v1), ``.root``, ``.pid``, ``.output``."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 300.0):
        self.args = args
        self.lines: list[str] = []
        self.url: str | None = None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgetune.cli",
                "serve",
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"edgetune serve did not start:\n{self.output}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"on (http://\S+/v1)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # exited

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def root(self) -> str:
        """The address without /v1 (where /health is)."""
        assert self.url is not None
        return self.url.removesuffix("/v1")

    def memory_bytes(self, field: str = "VmRSS") -> int:
        """The child's resident memory now (VmRSS) or at its peak (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/{self.pid}/status has no {field}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
