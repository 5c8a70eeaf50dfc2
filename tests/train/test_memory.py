"""The trainer's allocator setting: memory a step frees goes back to the operating system."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# A 24 MB block freed first raises glibc's mmap threshold to its size; a 16 MB tensor that
# follows then lands on the heap below a small live block, and its memory stays mapped
# after it is freed (a training step does this with activations every step).
CHILD = """
import sys, numpy as np
from edgetune.train.memory import return_freed_memory
if sys.argv[1] == "on":
    assert return_freed_memory()
def anon_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith("RssAnon")) // 1024
a = np.ones(6 << 20, np.float32); del a
base = anon_mb()
b = np.ones(4 << 20, np.float32); pin = np.ones(1 << 16, np.float32); del b
print(anon_mb() - base)
"""


def _retained_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def test_freed_tensors_return_to_the_os():
    assert _retained_mb("off") >= 12  # the control: glibc's default keeps the 16 MB
    assert _retained_mb("on") <= 1
