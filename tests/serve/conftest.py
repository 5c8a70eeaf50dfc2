"""Real ``edgetune serve`` processes on free loopback ports, and the bundles they serve.

``Running`` is ``edgetune.serve.process.ServerProcess`` (the CLI in a child process on a free
loopback port) with a client: the official ``openai`` client with no retries and a short
timeout, so no request loop is unbounded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetune.serve.process import ServerProcess

pytest.importorskip("fastapi")
pytest.importorskip("openai")

EDGETUNE = shutil.which("edgetune", path=str(Path(sys.executable).parent)) or "edgetune"


class Running(ServerProcess):
    """A server for a test, with the official client pointed at it."""

    def __init__(self, args: list[str], env: dict | None = None):
        super().__init__(args, env=env, timeout=120.0)

    def client(self, api_key: str = "unused", timeout: float = 120.0):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=timeout)

    def rss_mb(self) -> float:
        return self.memory_bytes() / 2**20


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
