"""A representative problem for each kernel spec, so that the tests and the
benchmarks can exercise every generated kernel (and check that dispatch really
picks it).  Derived from the spec alone: add a spec and it gets its cases."""


# Shapes the generic kernels get: non-square, so no specialised kernel matches.
GENERIC = dict(kernel=(3, 2), stride=(2, 1), dilation=(1, 2))
# (a spec with only some axes fixed gets stride 1 / dilation 6 on its free axes)

SCALES = {
    # (channels, spatial size, batch): small for tests, a real layer for benchmarks
    "test": dict(C=6, H=11, W=9, N=2),
    "bench": dict(C=64, H=56, W=56, N=1),
}


def case_for(spec, scale="test", multiplier=1):
    """dict(N, C, H, W, OC, kernel, stride, padding, dilation, groups) that
    dispatches to `spec` (for any direction).  `multiplier` sets out/in channels."""
    base = SCALES[scale]
    C, H, W, N = base["C"], base["H"], base["W"], base["N"]
    if spec.groups == "depthwise":
        groups = C
    elif spec.groups == "grouped":
        groups = 2 if scale == "test" else 32
    else:
        groups = 1
    if spec.kernel is None:
        kernel, stride, dilation = GENERIC["kernel"], GENERIC["stride"], GENERIC["dilation"]
    else:
        # A kernel size with stride / dilation at run time: a DeepLab-style dilated
        # layer (stride 1, dilation 6), which no fully specialised kernel covers.
        kernel = (spec.kernel, spec.kernel)
        stride = (spec.stride or 1, spec.stride or 1)
        dilation = (spec.dilation or 6, spec.dilation or 6)
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    if scale == "bench" and spec.kernel == 7 and spec.stride == 2:
        C, H, W = 3, 224, 224  # the stem layer this kernel exists for
    return dict(N=N, C=C, H=H, W=W, OC=C * multiplier, kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups)


