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
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_freed_tensors_return_to_the_os():
    assert _retained_mb("off") >= 12  # the control: glibc's default keeps the 16 MB
    assert _retained_mb("on") <= 1


# ---- loading a QLoRA base: NF4 while reading, never the model in fp32 ----------------------

LOAD_CHILD = """
import sys
import accelerate, transformers.models.phi3.modeling_phi3  # imports out of the measurement
from edgetune.train.memory import return_freed_memory
from edgetune.train.nf4 import load_model_nf4
return_freed_memory()  # as train() does
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS from here
before = kb("VmRSS")
model = load_model_nf4(sys.argv[1])
print((kb("VmHWM") - before) // 1024)
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Linear weights dominate: 50M projection values (201 MB in fp32, 26 MB in NF4) against
    a 2048-token vocabulary (8 MB in bf16 for embedding and LM head together)."""
    from edgetune.bench.random_model import make_random_model

    return make_random_model(
        tmp_path_factory.mktemp("wide") / "model",
        3,
        hidden=1024,
        intermediate=4096,
        heads=16,
        kv_heads=16,
        vocab=2048,
    )


def test_qlora_load_never_holds_the_model_in_fp32(wide_model):
    """Peak RSS of load_model_nf4 above what the process held before: the NF4 model and the
    bf16 vocabulary tables (34 MB) plus one chunk being quantized, well under the 201 MB the
    projections take in fp32 (the old load peaked at ~250 MB here: one projection's fp32
    copy plus the reference quantizer's temporaries, ~24 bytes a value)."""
    fp32_mb = 3 * (3 + 1 + 8 + 4) * 1024 * 1024 * 4 / 2**20
    out = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, str(wide_model)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mb = int(out.stdout.split()[-1])
    assert peak_mb <= 0.4 * fp32_mb, f"loading peaked {peak_mb} MB above start ({fp32_mb:.0f} fp32)"
