"""Builds edgetune's compiled kernels (Cython glue over kernels/csrc); nothing else.

The C core selects AVX2+FMA code at run time (``__builtin_cpu_supports``), so the
build uses only portable flags: never ``-march=native``. The extension is optional: without
a C compiler (or OpenMP) pip still installs edgetune, whose kernels then run on numba or
numpy (kernels/dispatch.py says so once, on one line, when they are first used).
"""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

ext = Extension(
    "edgetune.kernels._ckernels",
    sources=[
        "kernels/_ckernels.pyx",
        "kernels/csrc/edgetune_kernels.c",
        "kernels/csrc/gemm.c",
        "kernels/csrc/q4q8.c",
        "kernels/csrc/ops.c",
    ],
    include_dirs=["kernels/csrc", np.get_include()],
    extra_compile_args=["-O3", "-std=c11", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)
exts = cythonize([ext], compiler_directives={"language_level": 3})
for e in exts:  # cythonize builds new Extension objects: mark what it returns
    e.optional = True

setup(ext_modules=exts)
