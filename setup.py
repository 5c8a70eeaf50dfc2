"""Builds edgetune's compiled kernels (Cython glue over kernels/csrc); nothing else.

The C core selects AVX2+FMA code at run time (``__builtin_cpu_supports``), so the
build uses only portable flags: never ``-march=native``.
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

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}))
