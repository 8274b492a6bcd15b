"""Build: generate the kernels from templates (write-if-changed), then cythonize
and compile them with OpenMP.

The build is native (-march=native) by default, its kernels generated for the vector
unit that enables (codegen.target: AVX-512's 64-byte vectors and 32 registers, AVX2's
32-byte vectors and 16, else 16-byte vectors).  CONVGEN_MARCH=<arch> targets another
instruction set (e.g. x86-64-v4 for any AVX-512 machine, x86-64-v3 for AVX2);
CONVGEN_PORTABLE=1 builds for any x86-64 / arm64 (baseline instructions, 16-byte vectors:
correct, about 3x slower than AVX2 code).  CONVGEN_BUILD_JOBS sets how many
extensions compile in parallel (default: all cores).  CONVGEN_DEBUG=1 compiles with
debug information (Python's -g; left out by default: it makes the build much longer) and
keeps Cython's copy of each .pyx line as a comment in the generated C.
"""

import os
import sys

import numpy
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from codegen import emit, target  # noqa: E402  (the generator lives beside this file)


def extensions():
    # The vector unit to generate for: what the compiler flags enable (codegen.target).
    build = target.build_target()
    print(f"convgen: generating kernels for {build.name} ({build.vector_bytes}-byte vectors, "
          f"{build.registers} registers)")
    emit.write_all()  # stage 4: only changed files are rewritten, so make-style rebuilds stay cheap
    common = dict(
        include_dirs=[numpy.get_include(), os.path.join("convgen", "include")],
        extra_compile_args=target.compile_args(),
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("CG_VECTOR_BYTES", str(build.vector_bytes))],
        # (rebuild every module when a header changes)
        depends=[os.path.join("convgen", "include", h) for h in ("convgen_simd.h", "convgen_fpmode.h")],
    )
    exts = [Extension("convgen._layout", ["convgen/_layout.pyx"], **common)]
    modules = [m for m, _direction, _dtype in emit.extension_modules()] + emit.support_modules()
    for module in modules:
        exts.append(Extension(f"convgen._generated.{module}", [f"convgen/_generated/{module}.pyx"], **common))
    from Cython.Build import cythonize
    return cythonize(exts, language_level=3, include_path=[ROOT], compiler_directives=target.cython_directives(),
                     nthreads=int(os.environ.get("CONVGEN_BUILD_JOBS", os.cpu_count() or 1)))


class ParallelBuildExt(build_ext):
    """Compile the extension modules in parallel (they are independent)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = int(os.environ.get("CONVGEN_BUILD_JOBS", os.cpu_count() or 1))


setup(ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
