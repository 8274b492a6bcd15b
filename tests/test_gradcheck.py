"""Finite-difference gradient checks: every backward kernel (bwd_data and
bwd_weight) against central differences of convgen's own forward pass, in
float64 for the float64 kernels and in float32 (a larger step, a looser
tolerance) for the float32 ones.  For the loss L = sum(conv(x, w) * R), dL/dx is
conv2d_input(R) and dL/dw is conv2d_weight(R)."""

import numpy as np
import pytest

import convgen
from codegen.cases import case_for
from codegen.table import SPECS
from conftest import PADDING_MODES, case_arrays, conv_args, make_rng, spec_dtype

F = convgen.functional
N_ENTRIES = 12      # single entries checked per array (plus random directions)
N_DIRECTIONS = 3
# The loss is linear in x and in w, so central differences are exact up to
# rounding whatever the step: a large step keeps float32's rounding small too.
STEP = {np.dtype(np.float64): dict(eps=1e-3, rtol=1e-9), np.dtype(np.float32): dict(eps=0.5, rtol=2e-5)}

BACKWARD = [s for s in SPECS if s.direction in ("bwd_data", "bwd_weight")]


def _central_differences(loss, a, rng, eps):
    """[(directional derivative by central differences, direction)] for a few
    single entries of `a` and a few random directions."""
    out = []
    flat_idx = rng.choice(a.size, size=min(N_ENTRIES, a.size), replace=False)
    directions = []
    for i in flat_idx:
        e = np.zeros(a.size, a.dtype)
        e[i] = 1
        directions.append(e.reshape(a.shape))
    directions += [rng.standard_normal(a.shape).astype(a.dtype) for _ in range(N_DIRECTIONS)]
    for v in directions:
        out.append(((loss(a + eps * v) - loss(a - eps * v)) / (2 * eps), v))
    return out


def _check(grad, loss, a, rng, what):
    step = STEP[np.dtype(a.dtype)]
    grad = np.asarray(grad, np.float64)
    scale = max(1.0, float(np.abs(grad).max()))
    for fd, v in _central_differences(loss, a, rng, step["eps"]):
        analytic = float(np.sum(grad * v))
        tol = step["rtol"] * scale * max(1.0, float(np.sqrt(np.sum(v.astype(np.float64) ** 2))))
        assert abs(fd - analytic) <= tol, (what, fd, analytic)


def _loss(y, R):
    return float(np.sum(y.astype(np.float64) * R))


@pytest.mark.parametrize("spec", BACKWARD, ids=lambda s: s.name)
def test_gradcheck_spec(spec):
    """float64 specs in float64; float32 specs with their own float32 forward."""
    case = case_for(spec)
    dtype = spec_dtype(spec)
    rng = make_rng("gradcheck", spec.name)
    x, w, b, R = case_arrays(case, dtype, rng, N=1)
    args = conv_args(case)
    assert convgen.kernel_for(case["C"], case["OC"], case["kernel"], case["stride"], case["padding"],
                              case["dilation"], case["groups"], dtype, spec.direction) == spec.name
    if spec.direction == "bwd_data":
        grad = F.conv2d_input(x.shape, w, R, **args)
        _check(grad, lambda xx: _loss(F.conv2d(xx, w, b, **args), R), x, rng, spec.name)
    else:
        grad = F.conv2d_weight(x, w.shape, R, **args)
        _check(grad, lambda ww: _loss(F.conv2d(x, ww, b, **args), R), w, rng, spec.name)


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("padding, stride, kernel", [
    ((2, 1), 1, 3), ("same", 1, 4), (1, 2, (3, 2)),
], ids=["pad2x1", "same-even", "s2-k3x2"])
def test_gradcheck_module_padding_modes(mode, padding, stride, kernel):
    """Conv2d with each padding mode: the input gradient folds the halo back into
    the pixels it was copied from, the weight and bias gradients see the padded input."""
    rng = make_rng("gradcheck-mode", mode, padding, stride, kernel)
    conv = convgen.Conv2d(2, 3, kernel, stride, padding, padding_mode=mode, dtype=np.float64, seed=5)
    x = rng.standard_normal((1, 2, 5, 4))
    R = rng.standard_normal(conv(x).shape)
    gx = conv.backward(R)
    gw, gb = conv.weight.grad.copy(), conv.bias.grad.copy()
    w0, b0 = conv.weight.copy(), conv.bias.copy()

    def loss_x(xx):
        return np.sum(conv(xx) * R)

    def loss_w(ww):
        conv.weight = ww
        try:
            return np.sum(conv(x) * R)
        finally:
            conv.weight = w0

    def loss_b(bb):
        conv.bias = bb
        try:
            return np.sum(conv(x) * R)
        finally:
            conv.bias = b0

    _check(gx, loss_x, x, rng, "input")
    _check(gw, loss_w, np.array(w0), rng, "weight")
    _check(gb, loss_b, np.array(b0), rng, "bias")
