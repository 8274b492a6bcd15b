"""Infinities and NaNs in the input propagate into the gradients as in PyTorch:
the weight gradient must not turn into NaN where torch's is finite (the kernels'
scratch columns multiply a zero gradient with input pixels, and 0 * inf is NaN).
Nor may the input gradient with infinite or NaN weights (the kernels multiply
grad_output's zero border by them)."""

import numpy as np
import pytest

import convgen
from convgen import _engine

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("mode, stride, dilation, groups", [
    ("zeros", 1, 1, 1), ("reflect", 2, 1, 1), ("circular", 1, 2, 2), ("zeros", 2, 1, 4),
    ("replicate", 1, 1, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_nonfinite_input_gradients_match_torch(mode, stride, dilation, groups, dtype):
    rng = np.random.default_rng(7)
    x = rng.random((2, 4, 7, 6)).astype(dtype)
    x[0, 0, 2, 5], x[1, 3, 6, 0], x[1, 1, 3, 3] = np.inf, -np.inf, np.nan
    conv = convgen.Conv2d(4, 8, 3, stride=stride, padding=1, dilation=dilation, groups=groups,
                          padding_mode=mode, dtype=dtype, seed=0)
    y = conv(x)
    gy = rng.random(y.shape).astype(dtype)
    gx = conv.backward(gy)
    ref = torch.nn.Conv2d(4, 8, 3, stride=stride, padding=1, dilation=dilation, groups=groups,
                          padding_mode=mode, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(conv.weight)))
        ref.bias.copy_(torch.from_numpy(np.asarray(conv.bias)))
    xt = torch.from_numpy(x).requires_grad_(True)
    ref(xt).backward(torch.from_numpy(gy))
    for ours, theirs in [(y, ref(torch.from_numpy(x)).detach().numpy()), (gx, xt.grad.numpy()),
                         (conv.weight.grad, ref.weight.grad.numpy()), (conv.bias.grad, ref.bias.grad.numpy())]:
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


def test_nonfinite_weight_gradient_accumulates():
    x = np.ones((1, 1, 5, 5), np.float32)
    x[0, 0, 0, 4] = np.inf
    conv = convgen.Conv2d(1, 1, 3, padding=1, bias=False, seed=0)
    gy = np.ones_like(conv(x))
    conv.backward(gy)
    first = conv.weight.grad.copy()
    conv.backward(gy)
    np.testing.assert_array_equal(conv.weight.grad, first + first)
    assert np.isnan(first).sum() == 0 and np.isinf(first).sum() > 0


_LAYERS = {
    "dense": dict(C=40, OC=48, k=3, stride=1, padding=1, groups=1, H=20),           # channel-vector tile
    "small map": dict(C=40, OC=40, k=3, stride=1, padding=1, groups=1, H=5),        # weights larger than gx
    "pixel tiles": dict(C=6, OC=5, k=5, stride=2, padding=2, groups=1, H=13),       # stride phases
    "stem": dict(C=3, OC=8, k=7, stride=2, padding=3, groups=1, H=24),
    "depthwise": dict(C=16, OC=16, k=3, stride=1, padding=1, groups=16, H=12),      # as a forward
    "depthwise x2": dict(C=16, OC=32, k=3, stride=2, padding=1, groups=16, H=12),   # multiplier 2, stride 2
    "grouped": dict(C=12, OC=12, k=3, stride=1, padding=2, groups=4, H=9, dilation=2),
    "wide groups": dict(C=128, OC=128, k=3, stride=1, padding=1, groups=2, H=12),   # a group at a time
    "patches": dict(C=6, OC=10, k=4, stride=4, padding=0, groups=1, H=16),          # no border at all
}


@pytest.mark.parametrize("name, mode", [(name, mode) for name in _LAYERS for mode in ("zeros", "reflect", "circular")
                                        if _LAYERS[name]["padding"] or mode == "zeros"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_nonfinite_weights_input_gradient_matches_torch(name, mode, dtype):
    """Infinite and NaN weights: the input gradient has NaN and infinities exactly where
    PyTorch's has (its sum runs over real output pixels only; the kernels' border would
    add 0 * inf), whichever of the weights and the gradient backward_data looks at."""
    layer = dict(_LAYERS[name])
    H = layer.pop("H")
    rng = np.random.default_rng(11)
    conv = convgen.Conv2d(layer.pop("C"), layer.pop("OC"), layer.pop("k"), **layer, padding_mode=mode,
                          dtype=dtype, seed=1)
    w = conv.weight
    w[0, 0, 0, 0], w[-1, -1, -1, -1] = np.inf, -np.inf
    w[w.shape[0] // 2, 0, w.shape[2] // 2, 0] = np.nan
    x = rng.standard_normal((2, conv.in_channels, H, H - 1)).astype(dtype)
    y = conv(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gy[0, :, 0, 0] = 0   # (a real 0 * inf: NaN in torch too)
    gx = conv.backward(gy)
    ref = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, padding_mode=mode,
                          dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w.astype(np.float64)))
        ref.bias.copy_(torch.from_numpy(conv.bias.astype(np.float64)))
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    ref(xt).backward(torch.from_numpy(gy.astype(np.float64)))
    want = xt.grad.numpy()
    assert np.isfinite(want).any() and not np.isfinite(want).all()
    np.testing.assert_array_equal(np.isnan(gx), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(gx), np.isinf(want))
    finite = np.isfinite(want)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(gx[finite], want[finite], rtol=tol, atol=tol * max(1, np.abs(want[finite]).max()))


def test_input_gradient_looks_at_the_smaller_of_weights_and_gradient(monkeypatch):
    """backward_data checks the weights first where they are no larger than the input
    gradient, else the gradient first (and the weights only when it holds a NaN)."""
    looked = []
    has = _engine._layout.has_nonfinite
    monkeypatch.setattr(_engine._layout, "has_nonfinite", lambda a: looked.append(a.size) or has(a))
    for C, H in ((8, 20), (256, 3)):   # weights 576 < gx 6400; weights 590k > gx 4608
        w = np.ones((C, C, 3, 3), np.float32)
        gy = np.ones((2, C, H, H), np.float32)
        looked.clear()
        convgen.functional.conv2d_input((2, C, H, H), w, gy, padding=1)
        assert looked == ([w.size] if C == 8 else [2 * C * H * H])
