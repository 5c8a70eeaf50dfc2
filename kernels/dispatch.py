"""The one dispatcher: which backend runs a kernel of the traits table, and running it.

``EDGETUNE_KERNELS=reference|numba|cython`` (or ``forced_backend``) picks the first backend
to try; a backend that lacks the kernel falls to the next, fastest first.
"""

from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager
from functools import lru_cache

from .traits import TABLE

BACKENDS = ("cython", "numba", "reference")


@lru_cache(maxsize=None)
def _load(name: str):
    """Import a backend module, or return None when it is not built or not installed (the
    C extension is optional at install time, numba an optional extra: a missing compiled
    module is said once, on one line)."""
    try:
        if name == "cython":  # the compiled module (setup.py builds it; no stub for mypy)
            return importlib.import_module(f"{__package__}._ckernels")
        if name == "numba":
            from . import numba_kernels

            return numba_kernels
    except ImportError:
        if name == "cython":
            fallback = (
                "numba"
                if _load("numba") is not None
                else "numpy (pip install 'edgetune[numba]' for more)"
            )
            logging.getLogger("edgetune").warning(
                "edgetune: the compiled kernels are not built (no C compiler when edgetune was "
                f"installed); kernels run on {fallback}, slower"
            )
        return None
    from . import reference

    return reference


def available_backends() -> list[str]:
    return [b for b in BACKENDS if _load(b) is not None]


def isa() -> str:
    """The x86 instruction set the C core's Q4 x Q8 kernels run ("scalar", "avx2", "avx_vnni",
    "avx512_vnni"; the best the CPU and OS support, capped by EDGETUNE_ISA), or "none" when
    the compiled module is missing."""
    mod = _load("cython")
    return "none" if mod is None else mod.ISA_NAMES[mod.ISA]


def backend(kernel: str = "") -> str:
    """Backend that runs ``kernel`` (a name of the traits table; any other name is looked up
    as a module attribute): the fastest available that has it, starting from the one
    EDGETUNE_KERNELS forces (a forced backend without that kernel falls to the next)."""
    return _resolve(os.environ.get("EDGETUNE_KERNELS", ""), kernel)


@contextmanager
def forced_backend(name: str):
    """Run a block with EDGETUNE_KERNELS=name (then restore what was set before): how the
    benchmarks and tests pick one implementation of every kernel."""
    old = os.environ.get("EDGETUNE_KERNELS")
    os.environ["EDGETUNE_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDGETUNE_KERNELS", None)
        else:
            os.environ["EDGETUNE_KERNELS"] = old


def _has(name: str, mod, kernel: str) -> bool:
    if kernel not in TABLE:
        return hasattr(mod, kernel)
    entry = TABLE[kernel].entries.get(name)
    return entry is not None and hasattr(mod, entry.symbol)


@lru_cache(maxsize=256)
def _resolve(env: str, kernel: str) -> str:
    """``backend`` for one value of EDGETUNE_KERNELS (cached: every kernel call asks, and
    the lookup cost ~3 us, ~1 % of a 3072x3072 GEMV)."""
    forced = env.strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"EDGETUNE_KERNELS must be one of {', '.join(BACKENDS)}, got {forced!r}"
            )
        if _load(forced) is None:
            raise ValueError(
                f"EDGETUNE_KERNELS={forced} but that backend is not available "
                f"(available: {', '.join(available_backends())})"
            )
    for name in BACKENDS[BACKENDS.index(forced) :] if forced else BACKENDS:
        mod = _load(name)
        if mod is not None and (not kernel or name == "reference" or _has(name, mod, kernel)):
            return name
    return "reference"


def entry_point(kernel: str, name: str | None = None):
    """(backend, function, entry) that runs ``kernel`` now, or on backend ``name``."""
    name = name or backend(kernel)
    entry = TABLE[kernel].entries[name]
    return name, getattr(_load(name), entry.symbol), entry


def run(kernel: str, *args):
    """Run ``kernel`` of the traits table on the backend ``backend(kernel)`` picks, with the
    public arguments ``args`` (already checked by the public function)."""
    _, fn, entry = entry_point(kernel)
    return entry.call(fn, *args)
