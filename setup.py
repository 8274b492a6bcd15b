"""Build: generate the kernels from templates (write-if-changed), then cythonize
and compile them with OpenMP.

The build is native (-march=native) by default.  CONVGEN_MARCH=<arch> targets another
instruction set (e.g. x86-64-v4 for any AVX-512 machine, x86-64-v3 for AVX2);
CONVGEN_PORTABLE=1 builds for any x86-64 / arm64 (baseline instructions: correct, but
the 512-bit kernels then run many times slower).  CONVGEN_BUILD_JOBS sets how many
extensions compile in parallel (default: all cores).  CONVGEN_DEBUG=1 compiles with
debug information (Python's -g; left out by default: it makes the build much longer).
"""

import os
import sys

import numpy
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from codegen import emit  # noqa: E402  (the generator lives beside this file)


def compile_args():
    # -fno-tree-loop-distribute-patterns: keep short copy loops (a 7-pixel row) inline
    # rather than calls to memcpy/memset (measured: 7x7 depthwise forward, 5% faster).
    args = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-Wno-unused-function",
            "-Wno-unreachable-code", "-Wno-maybe-uninitialized", "-fno-tree-loop-distribute-patterns"]
    # -g0 (after Python's own -g): debug information for the generated kernels' long
    # unrolled functions took 40% of the compile (the float32 forward module: 79 s -> 46 s)
    # and 90% of the objects' size; it changes no instruction.  CONVGEN_DEBUG=1 keeps it.
    if os.environ.get("CONVGEN_DEBUG", "0") in ("", "0"):
        args.append("-g0")
    if os.environ.get("CONVGEN_PORTABLE", "0") in ("", "0"):
        args.append("-march=" + (os.environ.get("CONVGEN_MARCH") or "native"))
    return args


def extensions():
    emit.write_all()  # stage 4: only changed files are rewritten, so make-style rebuilds stay cheap
    common = dict(
        include_dirs=[numpy.get_include(), os.path.join("convgen", "include")],
        extra_compile_args=compile_args(),
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        # (rebuild every module when a header changes)
        depends=[os.path.join("convgen", "include", h) for h in ("convgen_simd.h", "convgen_fpmode.h")],
    )
    exts = [Extension("convgen._layout", ["convgen/_layout.pyx"], **common)]
    modules = [m for m, _direction, _dtype in emit.extension_modules()] + emit.support_modules()
    for module in modules:
        exts.append(Extension(f"convgen._generated.{module}", [f"convgen/_generated/{module}.pyx"], **common))
    from Cython.Build import cythonize
    return cythonize(exts, language_level=3, include_path=[ROOT], nthreads=int(os.environ.get("CONVGEN_BUILD_JOBS", os.cpu_count() or 1)))


class ParallelBuildExt(build_ext):
    """Compile the extension modules in parallel (they are independent)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = int(os.environ.get("CONVGEN_BUILD_JOBS", os.cpu_count() or 1))


setup(ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
