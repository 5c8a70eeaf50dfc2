"""Outputs written whole or not at all: a temporary file beside the target (same
filesystem, so the final ``os.replace`` is atomic) with the permissions a plain ``open``
would have given it (``mkstemp`` makes files 0600, which would leave a user's GGUF or
dataset unreadable to the group and the Ollama service)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_beside(out: Path) -> tuple[int, Path]:
    """(open fd, path) of a new empty file in ``out``'s folder, named ``.NAME.*.tmp``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(name)


def write_json(path: Path, obj: object) -> Path:
    """``obj`` as indented JSON at ``path``, whole or not at all."""
    import json

    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
