"""Infinities and NaNs in the input propagate into the gradients as in PyTorch:
the weight gradient must not turn into NaN where torch's is finite (the kernels'
scratch columns multiply a zero gradient with input pixels, and 0 * inf is NaN)."""

import numpy as np
import pytest

import convgen

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
