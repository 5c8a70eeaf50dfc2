"""Real ``edgetune serve`` processes on free loopback ports, and the bundles they serve.

``Running`` starts the CLI in a child process with ``--port 0``, reads the address from the
line it prints, and stops it at the end; its output is drained in a thread (so the child
never blocks on a full pipe) and shown when a start fails. Clients are the official
``openai`` client with no retries and a short timeout, so no request loop is unbounded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

EDGETUNE = shutil.which("edgetune", path=str(Path(sys.executable).parent)) or "edgetune"


class Running:
    """One ``edgetune serve`` child process: ``.url`` (…/v1), ``.pid``, ``.output``."""

    url: str | None = None

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 120.0):
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [EDGETUNE, "serve", *args, "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
        self._seen = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._seen.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"edgetune serve did not start:\n{self.output}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"on (http://\S+/v1)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._seen.set()
        self._seen.set()  # exited

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def root(self) -> str:
        assert self.url is not None
        return self.url[: -len("/v1")]

    def client(self, api_key: str = "unused", timeout: float = 120.0):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=timeout)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EDGETUNE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def export(model_dir, out: Path, *flags: str) -> Path:
    done = run_cli("export", str(model_dir), "--out", str(out), *flags, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def base_int4(tmp_path_factory, tiny_model):
    """The shipped tiny model (the quickstart's base) exported with the default int4
    settings: what a user serves adapters over."""
    return export(tiny_model, tmp_path_factory.mktemp("serve") / "tiny-int4")


@pytest.fixture(scope="session")
def base_fp32(tmp_path_factory, tiny_model):
    """The same base unquantized: an adapter over it must equal the fp32 merged bundle."""
    return export(tiny_model, tmp_path_factory.mktemp("serve") / "tiny-fp32", "--quant", "none")


@pytest.fixture(scope="session")
def server(base_int4):
    """The int4 base alone, served as ``tiny``."""
    s = Running([str(base_int4), "--name", "tiny"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def adapter_server(base_fp32, trained_adapter):
    """The fp32 base as ``tiny`` with the quickstart's adapter, unmerged, as ``home``."""
    s = Running([str(base_fp32), "--name", "tiny", "--adapter", f"home={trained_adapter}"])
    yield s
    s.stop()


def wait_for(predicate, timeout: float = 10.0, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False
