"""The one table of generated kernels.

Everything is made from ``SPECS``: the Cython kernels, the dispatch table, the
test parametrisation and the benchmarks.  Add a row here and the rest follows.
"""

from .spec import ANY, DIRECTIONS, DTYPES, KernelSpec

# (kernel, stride, dilation) compiled as constants, per groups kind.  Chosen
# from the layers people run: ResNet/VGG 3x3 and 1x1, strided 3x3 and 1x1
# downsampling, Inception 5x5, the 7x7 stride-2 stem, DeepLab's dilation 2, and
# MobileNet depthwise 3x3/5x5 at stride 1 and 2.  Every other shape runs the
# generic kernel of its groups kind, which takes the taps at run time.
SPECIALISED = {
    "dense": [(1, 1, 1), (1, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2), (5, 1, 1), (7, 2, 1)],
    "depthwise": [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1)],
    "grouped": [(3, 1, 1), (3, 2, 1)],
}


def build_specs():
    specs = []
    for direction in DIRECTIONS:
        for dtype in DTYPES:
            for groups, shapes in SPECIALISED.items():
                for kernel, stride, dilation in shapes:
                    specs.append(KernelSpec(direction, dtype, kernel, stride, dilation, groups))
                specs.append(KernelSpec(direction, dtype, ANY, ANY, ANY, groups))
    return specs


def validate(specs):
    """The table's own invariants: unique names and keys, a generic kernel for
    every (direction, dtype, groups) so dispatch always finds one, and either
    all of kernel/stride/dilation fixed or none (taps are compile-time or not)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate kernel names in the spec table")
    keys = {s.key for s in specs}
    for s in specs:
        fixed = [v is not ANY for v in (s.kernel, s.stride, s.dilation)]
        if any(fixed) and not all(fixed):
            raise ValueError(f"{s.name}: fix all of kernel/stride/dilation or none")
        if (s.direction, s.dtype, ANY, ANY, ANY, s.groups) not in keys:
            raise ValueError(f"{s.name}: no generic fallback for its direction/dtype/groups")
    return specs


SPECS = validate(build_specs())
