"""The float64 NumPy reference (convgen._reference) is itself checked: by hand
on tiny cases, by adjoint identities (which need no oracle), and against PyTorch
on random configurations.  The other tests trust it."""

import numpy as np
import pytest

from convgen import _reference as ref
from conftest import PADDING_MODES, TORCH_PAD, make_rng, need_torch


def test_by_hand():
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    w = np.ones((1, 1, 2, 2))
    np.testing.assert_array_equal(ref.conv2d(x, w), [[[[8, 12], [20, 24]]]])
    np.testing.assert_array_equal(ref.conv2d(x, w, stride=2), [[[[8]]]])
    np.testing.assert_array_equal(ref.conv2d(x, w, np.array([0.5]), dilation=2), [[[[16.5]]]])  # corners 0+2+6+8
    # cross-correlation, not convolution: the kernel is not flipped
    w = np.array([[[[1.0, 0.0], [0.0, 0.0]]]])
    np.testing.assert_array_equal(ref.conv2d(x, w), x[:, :, :2, :2])
    # groups: each output channel sees its own input channel
    x2 = np.stack([np.ones((3, 3)), 2 * np.ones((3, 3))])[None]
    w2 = np.ones((2, 1, 1, 1))
    np.testing.assert_array_equal(ref.conv2d(x2, w2, groups=2), x2)
    np.testing.assert_array_equal(ref.conv2d(x2, np.ones((1, 2, 1, 1))), 3 * np.ones((1, 1, 3, 3)))


def test_padding_by_hand():
    v = np.array([[1.0, 2.0, 3.0]])
    assert ref.pad(v, (0, 0, 2, 1), "zeros").tolist() == [[0, 0, 1, 2, 3, 0]]
    assert ref.pad(v, (0, 0, 2, 1), "reflect").tolist() == [[3, 2, 1, 2, 3, 2]]
    assert ref.pad(v, (0, 0, 2, 1), "replicate").tolist() == [[1, 1, 1, 2, 3, 3]]
    assert ref.pad(v, (0, 0, 2, 1), "circular").tolist() == [[2, 3, 1, 2, 3, 1]]
    # the input gradient of padding: each halo pixel adds into its source
    g = np.ones((1, 6))
    assert ref.unpad_adjoint(g[None], (1, 3), (0, 0, 2, 1), "zeros").tolist() == [[[1, 1, 1]]]
    assert ref.unpad_adjoint(g[None], (1, 3), (0, 0, 2, 1), "reflect").tolist() == [[[1, 3, 2]]]
    assert ref.unpad_adjoint(g[None], (1, 3), (0, 0, 2, 1), "replicate").tolist() == [[[3, 1, 2]]]
    assert ref.unpad_adjoint(g[None], (1, 3), (0, 0, 2, 1), "circular").tolist() == [[[2, 2, 2]]]


def test_same_padding_split():
    assert ref.pads_for("same", 3) == (1, 1, 1, 1)
    assert ref.pads_for("same", 4) == (1, 2, 1, 2)
    assert ref.pads_for("same", (2, 5), (3, 1)) == (1, 2, 2, 2)
    assert ref.pads_for("valid", 7) == (0, 0, 0, 0)
    assert ref.pads_for((1, 2), 3) == (1, 1, 2, 2)


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_pad_matrix_is_np_pad_and_adjoint(mode):
    rng = make_rng("pad", mode)
    x = rng.standard_normal((2, 3, 5, 4))
    pads = (2, 1, 3, 0)
    xp = ref.pad(x, pads, mode)
    P_h = ref.pad_matrix(5, 2, 1, mode)
    P_w = ref.pad_matrix(4, 3, 0, mode)
    np.testing.assert_array_equal(np.einsum("ph,nchw,qw->ncpq", P_h, x, P_w), xp)
    g = rng.standard_normal(xp.shape)
    np.testing.assert_allclose(np.sum(xp * g), np.sum(x * ref.unpad_adjoint(g, (5, 4), pads, mode)), rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_adjoint_identities(seed):
    """<conv(x, w), g> == <x, conv2d_input(g)> == <w, conv2d_weight(x, g)>, for any padding mode."""
    rng = make_rng("adjoint", seed)
    G = int(rng.integers(1, 3))
    C, OC = G * int(rng.integers(1, 3)), G * int(rng.integers(1, 3))
    kh, kw = (int(v) for v in rng.integers(1, 4, 2))
    stride = tuple(int(v) for v in rng.integers(1, 3, 2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
    mode = PADDING_MODES[seed % 4]
    padding = (1, 2)
    x = rng.standard_normal((2, C, 6, 7))
    w = rng.standard_normal((OC, C // G, kh, kw))
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=G, padding_mode=mode)
    y = ref.conv2d(x, w, **args)
    g = rng.standard_normal(y.shape)
    gx, gw, gb = ref.conv2d_backward(x, w, g, **args)
    inner = np.sum(y * g)
    np.testing.assert_allclose(np.sum(x * gx), inner, rtol=1e-10)
    np.testing.assert_allclose(np.sum(w * gw), inner, rtol=1e-10)
    np.testing.assert_allclose(gb, g.sum(axis=(0, 2, 3)))


def test_unbatched():
    rng = make_rng("ref-unbatched")
    x, w = rng.standard_normal((2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    y = ref.conv2d(x, w, padding=1, padding_mode="circular")
    np.testing.assert_array_equal(y, ref.conv2d(x[None], w, padding=1, padding_mode="circular")[0])
    gx = ref.conv2d_input(x.shape, w, y, padding=1, padding_mode="circular")
    assert gx.shape == x.shape


@pytest.mark.parametrize("trial", range(40))
def test_reference_like_torch(trial):
    torch = need_torch()
    rng = make_rng("ref-torch", trial)
    mode = PADDING_MODES[trial % 4]
    while True:   # draw until the configuration is a valid convolution
        G = int(rng.integers(1, 4))
        C, OC = G * int(rng.integers(1, 3)), G * int(rng.integers(1, 3))
        kh, kw = (int(v) for v in rng.integers(1, 5, 2))
        sh, sw = (int(v) for v in rng.integers(1, 4, 2))
        dh, dw = (int(v) for v in rng.integers(1, 3, 2))
        H, W = (int(v) for v in rng.integers(4, 9, 2))
        if trial % 5 == 0:
            sh = sw = 1
            padding = "same"
        else:
            padding = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        top, bottom, left, right = ref.pads_for(padding, (kh, kw), (dh, dw))
        if (H + top + bottom >= dh * (kh - 1) + 1 and W + left + right >= dw * (kw - 1) + 1
                and not (mode == "reflect" and (max(top, bottom) >= H or max(left, right) >= W))):
            break
    x = rng.standard_normal((2, C, H, W))
    w = rng.standard_normal((OC, C // G, kh, kw))
    b = rng.standard_normal(OC)
    args = dict(stride=(sh, sw), padding=padding, dilation=(dh, dw), groups=G, padding_mode=mode)
    y = ref.conv2d(x, w, b, **args)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    xp = torch.nn.functional.pad(xt, (left, right, top, bottom), mode=TORCH_PAD[mode])
    yt = torch.nn.functional.conv2d(xp, wt, bt, (sh, sw), 0, (dh, dw), G)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    gx, gw, gb = ref.conv2d_backward(x, w, g, **args)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_reference_imports_nothing_from_the_engine():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(ref))
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"numpy"}, imported
