"""The vector unit the kernels are generated for, and how the build finds it.

A register tile's shape depends on how wide a vector is and how many registers hold
them: AVX-512 has 32 registers of 64 bytes, AVX2 (and AVX) 16 of 32 bytes.  Tiles sized
for 32 registers spill on a 16-register machine, where gcc also splits every 64-byte
vector in two: the float32 forward module alone then took over 12 minutes to compile on
a 2-core AVX2 machine (AMD Zen 3), against under a minute for AVX-512.  Without AVX at
all the vectors are 16 bytes.  So the build asks
the compiler what the flags it compiles with (``compile_args``) enable, and generates
for that target (``build_target``); the header (convgen_simd.h) and convgen._engine take
the vector width from what was generated.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

ITEMSIZE = {"f32": 4, "f64": 8}


@dataclass(frozen=True)
class Target:
    """A vector unit: its name, the bytes of one vector register and how many there are."""

    name: str
    vector_bytes: int
    registers: int

    def lanes(self, dtype):
        """Values of `dtype` ("f32" / "f64") in one vector."""
        return self.vector_bytes // ITEMSIZE[dtype]

    @property
    def wide(self):
        """32 registers (AVX-512): the tiles of about 24 accumulators; else tiles of about 12."""
        return self.registers >= 32


AVX512 = Target("avx512", 64, 32)
AVX2 = Target("avx2", 32, 16)   # (and AVX)
# Machines without AVX (baseline x86-64's SSE2: CONVGEN_PORTABLE=1; arm64's NEON, whose 32
# registers it leaves half unused): 16-byte vectors.  Generated for AVX2 instead, such a
# build split every vector in two and its tiles spilled: the demo's ResNet 3x3 layer took
# 55 ms against 1.5 ms native on an AVX2 machine.
BASELINE = Target("baseline", 16, 16)
TARGETS = {t.name: t for t in (AVX512, AVX2, BASELINE)}


def compile_args():
    """The C compiler flags of every extension module (setup.py).  CONVGEN_MARCH=<arch>
    targets another instruction set than this machine's (x86-64-v4: any AVX-512 machine,
    x86-64-v3: AVX2); CONVGEN_PORTABLE=1 any x86-64 / arm64."""
    # -fno-tree-loop-distribute-patterns: keep short copy loops (a 7-pixel row) inline
    # rather than calls to memcpy/memset (measured: 7x7 depthwise forward, 5% faster).
    args = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-Wno-unused-function",
            "-Wno-unreachable-code", "-Wno-maybe-uninitialized", "-fno-tree-loop-distribute-patterns"]
    # -g0 (after Python's own -g): debug information for the generated kernels' long
    # unrolled functions took 40% of the compile (the float32 forward module: 79 s -> 46 s)
    # and 90% of the objects' size; it changes no instruction.  CONVGEN_DEBUG=1 keeps it.
    if not _debug():
        args.append("-g0")
    if os.environ.get("CONVGEN_PORTABLE", "0") in ("", "0"):
        args.append("-march=" + (os.environ.get("CONVGEN_MARCH") or "native"))
    return args


def cython_directives():
    """Cython's directives for every module (setup.py): without CONVGEN_DEBUG=1, no copy of
    each .pyx line as a comment in the C.  The generated float32 forward's C shrinks from
    15 MB to 5 MB and gcc compiles it in 52 s instead of 59 s (2 cores, both at once), to the
    same machine code (its disassembly compared); the .pyx files stay beside it to read."""
    return {"emit_code_comments": _debug()}


def _debug():
    """Whether CONVGEN_DEBUG asks for a build to debug (debug information, annotated C)."""
    return os.environ.get("CONVGEN_DEBUG", "0") not in ("", "0")


def target_for_macros(macros):
    """The target of a compiler that predefines `macros` (a set of names)."""
    if "__AVX512F__" in macros:
        return AVX512
    return AVX2 if "__AVX__" in macros else BASELINE


def compiler():
    """The C compiler the build uses (CC, else cc or gcc on the PATH), or None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@lru_cache(maxsize=None)
def compiler_macros(cc, flags):
    """The names of the macros the C compiler cc predefines with `flags` (a tuple), or None
    where it cannot say (no compiler, or flags it does not take)."""
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return frozenset(line.split()[1] for line in out.splitlines() if line.startswith("#define "))


def build_target():
    """The target the build compiles for: CONVGEN_TARGET (avx512 / avx2 / baseline) if set, else
    what the compiler enables with compile_args()'s flags (-march=native: this machine)."""
    name = os.environ.get("CONVGEN_TARGET")
    if name:
        if name not in TARGETS:
            raise ValueError(f"CONVGEN_TARGET must be one of {sorted(TARGETS)}, got {name!r}")
        return TARGETS[name]
    macros = compiler_macros(compiler(), tuple(a for a in compile_args() if a.startswith("-m")))
    return BASELINE if macros is None else target_for_macros(macros)   # (no compiler: nothing is built either)
