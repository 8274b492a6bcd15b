"""The one table of generated kernels.

Everything is made from ``SPECS``: the Cython kernels, the dispatch table, the
test parametrisation and the benchmarks.  Add a row here and the rest follows.
"""

from .spec import ANY, DIRECTIONS, DTYPES, KernelSpec
from .target import build_target

# (kernel, stride, dilation) compiled as constants, per groups kind.  Chosen
# from the layers people run: ResNet/VGG 3x3 and 1x1, strided 3x3 downsampling,
# Inception 5x5, the 7x7 stride-2 stem, DeepLab's dilation 2, and MobileNet
# depthwise 3x3/5x5 at stride 1 and 2, and ConvNeXt's depthwise 7x7 (2 threads, against
# the generic kernel: 96 channels at 56x56 forward 2.1x, backward 1.55x; 384 at 14x14
# 2.9x, 1.7x).  (Layers without padding whose windows do not overlap, ResNet's strided
# 1x1 downsampling and patch embeddings such as ViT's 16x16 at stride 16, run the
# stride-1 1x1 kernels on their windows gathered as channels: see
# convgen._engine.patch_pointwise.)
# Every other shape runs the generic kernel of its groups kind, which takes the taps
# at run time.
SPECIALISED = {
    "dense": [(1, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2), (5, 1, 1), (7, 2, 1)],
    "depthwise": [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (7, 1, 1)],
    "grouped": [(3, 1, 1), (3, 2, 1)],
}

# Kernels unrolled over the taps of a fixed kernel size whose stride / dilation
# only move the taps' offsets (read from a table at run time): any stride and
# dilation for the forward pass (the phase planes absorb both), any dilation for a
# stride-1 input gradient (one phase).  They serve 3x3 layers outside the table
# above, e.g. DeepLab's ASPP rates 6, 12, 18, at close to the specialised speed.
TAPS_UNROLLED = {
    "fwd": {"dense": [(3, ANY, ANY)], "depthwise": [(3, ANY, ANY)], "grouped": [(3, ANY, ANY)]},
    "bwd_data": {"dense": [(3, 1, ANY)]},
}


def build_specs(target=None):
    """Every kernel of the table, for `target` (codegen.target; the build's by default)."""
    target = target or build_target()
    specs = []
    for direction in DIRECTIONS:
        for dtype in DTYPES:
            for groups, shapes in SPECIALISED.items():
                shapes = shapes + TAPS_UNROLLED.get(direction, {}).get(groups, [])
                for kernel, stride, dilation in shapes:
                    specs.append(KernelSpec(direction, dtype, kernel, stride, dilation, groups, target))
                specs.append(KernelSpec(direction, dtype, ANY, ANY, ANY, groups, target))
    return specs


def validate(specs):
    """The table's own invariants: unique names and keys, a generic kernel for
    every (direction, dtype, groups) so dispatch always finds one, and partly fixed
    specs only where their taps can still be unrolled (see KernelSpec.unrolls_taps)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate kernel names in the spec table")
    keys = {s.key for s in specs}
    for s in specs:
        fixed = [v is not ANY for v in (s.kernel, s.stride, s.dilation)]
        if any(fixed) and not all(fixed) and not s.unrolls_taps:
            raise ValueError(f"{s.name}: fix all of kernel/stride/dilation, or a kernel size whose "
                             f"taps unroll for any stride/dilation (see KernelSpec.unrolls_taps)")
        if (s.direction, s.dtype, ANY, ANY, ANY, s.groups) not in keys:
            raise ValueError(f"{s.name}: no generic fallback for its direction/dtype/groups")
    if len({s.target for s in specs}) > 1:
        raise ValueError("the spec table mixes targets: a build generates for one")
    return specs


SPECS = validate(build_specs())
