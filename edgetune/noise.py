"""Third-party noise off by default: log lines of libraries edgetune uses that tell its user
nothing they can act on, and make a working run look broken.

Each entry was seen on edgetune's own commands (``edgetune quickstart``'s output has no
warning line: tests/test_pipeline.py) and is silenced only below ERROR; ``edgetune
--verbose`` leaves every library as it is.
"""

from __future__ import annotations

import logging

#: logger -> what it says, and why it is noise here
NOISY_LOGGERS = {
    # "Failed to load CPU gemm_4bit_forward from kernels-community": bitsandbytes' CPU
    # backend, on a CPU with AVX512-BF16, when the optional `kernels` package is absent.
    # PEFT imports bitsandbytes whenever it is installed; edgetune's NF4 is its own.
    "bitsandbytes": logging.ERROR,
}


def quiet(verbose: bool = False) -> None:
    """Raise the noisy loggers to their level (before the libraries are imported)."""
    if verbose:
        return
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
