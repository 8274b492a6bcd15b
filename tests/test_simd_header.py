"""The vector helpers of convgen/include/convgen_simd.h, compiled on their own for each
vector width the build may target (codegen.target): 64-byte vectors (AVX-512's width, in
generic vector code where this machine has no AVX-512), 32-byte ones (AVX2) and 16-byte ones
(baseline x86-64), with and without the instructions their fast paths use, against plain
loops (simd_header_check.c)."""

import os
import subprocess

import pytest

from codegen import target

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, os.pardir, "convgen", "include")
CC = target.compiler()


def _avx_macros(march):
    """The __AVX* macros the compiler defines for -march=march, or None if it knows no such
    architecture."""
    macros = target.compiler_macros(CC, (f"-march={march}",))
    return None if macros is None else {m for m in macros if m.startswith("__AVX")}


def _runs(march):
    """Whether this machine runs code built for march (what -march=native enables covers it)."""
    wanted = _avx_macros(march)
    return wanted is not None and wanted <= _avx_macros("native")


@pytest.mark.skipif(CC is None, reason="no C compiler")
@pytest.mark.parametrize("vector_bytes", [64, 32, 16])
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_simd_helpers_against_plain_loops(vector_bytes, march, tmp_path):
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 instruction sets")
    if not _runs(march):
        pytest.skip(f"this machine does not run {march} code")
    exe = tmp_path / "check"
    subprocess.run([CC, "-O2", "-w", f"-march={march}", f"-DCG_VECTOR_BYTES={vector_bytes}", "-I", INCLUDE,
                    os.path.join(HERE, "simd_header_check.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.stdout.strip() == f"bytes {vector_bytes} bad 0" and out.returncode == 0, out.stdout
