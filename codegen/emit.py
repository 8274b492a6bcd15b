"""Stage 4: the list of generated files, and writing them only when they change
(so an unchanged kernel is not recompiled)."""

import os

from .context import TEMPLATES, banner, dispatch_context, module_context
from .render import environment, render
from .spec import C_TYPES, DIRECTIONS, DTYPES
from .table import SPECS

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
GENERATED_DIR = os.path.join(ROOT, "convgen", "_generated")


def extension_modules(specs=SPECS):
    """(module name, direction, dtype) of every kernel extension module."""
    present = {(s.direction, s.dtype) for s in specs}
    return [(f"_{d}_{t}", d, t) for d in DIRECTIONS for t in DTYPES if (d, t) in present]


def support_modules():
    """Generated extension modules that are not kernels: the FMA-peak probe the
    benchmarks (bench/) divide by."""
    return ["_peak"]


def peak_context(target):
    # (16 independent FMA chains: enough for two FMA units of 4-5 cycles' latency; on 16
    # registers, 12, leaving room for the operands)
    return dict(banner=banner("fma_peak.pyx.j2"), accumulators=list(range(16 if target.wide else 12)),
                dtypes=[dict(sfx=t, ctype=C_TYPES[t], vec=f"cg_v{t}", lanes=target.lanes(t)) for t in DTYPES])


def generated_files(specs=SPECS):
    """Map of file name (inside convgen/_generated) -> rendered text."""
    env = environment()
    files = {"__init__.py": "# Generated package: DO NOT EDIT (see codegen/).\n"}
    for module, direction, dtype in extension_modules(specs):
        files[module + ".pyx"] = render(TEMPLATES[direction], module_context(direction, dtype, specs), env)
    files["dispatch_table.py"] = render("dispatch_table.py.j2", dispatch_context(specs), env)
    files["_peak.pyx"] = render("fma_peak.pyx.j2", peak_context(specs[0].target), env)
    return files


def write_if_changed(path, text):
    """Write text to path unless it already holds exactly that; True if written."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def write_all(out_dir=GENERATED_DIR, specs=SPECS):
    """Render everything and write what changed; returns the written paths."""
    written = []
    for name, text in generated_files(specs).items():
        path = os.path.join(out_dir, name)
        if write_if_changed(path, text):
            written.append(path)
    return written
