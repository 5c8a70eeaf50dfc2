"""``ServeConfig``: what ``edgetune serve`` is started with."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import ConfigError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    """The bundle directory served as the base model."""
    name: str | None = None
    """The base's model id in the API (default: the bundle directory's name)."""
    adapter: tuple[str, ...] = ()
    """NAME=DIR: serve the PEFT adapter in DIR (from edgetune train) unmerged over the base
    as model NAME; several allowed."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs an API key (or --insecure)."""
    port: int = 8000
    """TCP port (0: any free port)."""
    api_key: str | None = None
    """Bearer key every endpoint but /health requires (default: $EDGETUNE_API_KEY)."""
    insecure: bool = False
    """Allow a non-loopback address without an API key."""
    backend: str = "auto"
    """auto (native when the bundle allows: batching and adapters), native, or ort."""
    threads: int | None = None
    """Kernel threads (default: all cores)."""
    max_batch: int = 8
    """Sequences decoded together in one pass."""
    max_queue: int = 32
    """Requests waiting beyond the batch; one more is answered 429."""
    prefill_chunk: int = 64
    """Prompt tokens read per pass: how long a new prompt can hold the others up."""
    max_body_bytes: int = 4 << 20
    """Largest request body accepted (413 above)."""
    base: str | None = None
    """Fine-tuning service: the Hugging Face model dir or Hub id the bundle was exported from
    (jobs train it; needs --state-dir)."""
    base_revision: str | None = None
    """Branch, tag or commit of a Hub id ``base`` (default main), fetched once at start."""
    state_dir: str | None = None
    """Fine-tuning service: where files, jobs and checkpoints live (SQLite + files)."""
    max_concurrent_jobs: int = 1
    """Fine-tuning jobs trained at once (each in its own process)."""
    train_threads: int | None = None
    """torch threads of each training process (default: all cores, shared with inference)."""
    max_upload_bytes: int = 256 << 20
    """Largest file accepted by POST /v1/files (413 above)."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "native", "ort"):
            raise ConfigError(f"backend must be auto, native or ort, got {self.backend!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        for field_, value in (
            ("max_batch", self.max_batch),
            ("max_queue", self.max_queue),
            ("prefill_chunk", self.prefill_chunk),
            ("max_body_bytes", self.max_body_bytes),
            ("max_concurrent_jobs", self.max_concurrent_jobs),
            ("max_upload_bytes", self.max_upload_bytes),
        ):
            if value < 1:
                raise ConfigError(f"{field_} must be >= 1, got {value}")
        if (self.base is None) != (self.state_dir is None):
            raise ConfigError("the fine-tuning service needs both --base MODEL_DIR and --state-dir")
        names = [n for n, _ in self.adapters]  # parses every NAME=DIR: a bad one fails here
        dup = next((n for n in names if names.count(n) > 1 or n == self.name), None)
        if dup:
            raise ConfigError(f"model id {dup!r} is given twice")
        if not is_loopback(self.host) and not self.api_key and not self.insecure:
            raise ConfigError(
                f"refusing to serve on {self.host} without an API key: anyone who can reach "
                "it could use the model. Give --api-key (or EDGETUNE_API_KEY), bind "
                "127.0.0.1, or pass --insecure"
            )

    @property
    def adapters(self) -> list[tuple[str, str]]:
        """(model id, adapter dir) of every ``adapter``."""
        return [parse_adapter(spec) for spec in self.adapter]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_adapter(spec: str) -> tuple[str, str]:
    """'NAME=DIR' -> (NAME, DIR)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter wants NAME=DIR, got {spec!r}")
    return name, path
