"""convgen.functional (conv2d, conv2d_input, conv2d_weight) and output_size
against PyTorch; inputs in any memory layout; the caller's arrays untouched."""

import numpy as np
import pytest

import convgen
from convgen import _engine
from convgen import _reference as ref
from conftest import (DTYPES, assert_close, make_rng, need_torch, torch_dtype, torch_forward_backward,
                      torch_functional, torch_module)

F = convgen.functional

FUNCTIONAL = [
    dict(C=3, OC=4, H=7, W=6, kernel=3, stride=1, padding=0, dilation=1, groups=1),
    dict(C=3, OC=4, H=7, W=6, kernel=3, stride=2, padding=1, dilation=1, groups=1),
    dict(C=4, OC=6, H=8, W=5, kernel=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    dict(C=4, OC=8, H=6, W=6, kernel=3, stride=1, padding="same", dilation=2, groups=4),
    dict(C=2, OC=2, H=5, W=5, kernel=4, stride=1, padding="same", dilation=1, groups=1),
    dict(C=3, OC=3, H=6, W=7, kernel=2, stride=3, padding="valid", dilation=1, groups=3),
]


def _arrays(c, dtype, rng, N=2):
    kh, kw = ref._pair(c["kernel"])
    x = rng.standard_normal((N, c["C"], c["H"], c["W"])).astype(dtype)
    w = rng.standard_normal((c["OC"], c["C"] // c["groups"], kh, kw)).astype(dtype)
    b = rng.standard_normal(c["OC"]).astype(dtype)
    pads = ref.pads_for(c["padding"], c["kernel"], c["dilation"])
    oh, ow = ref.output_hw((c["H"], c["W"]), c["kernel"], c["stride"], pads, c["dilation"])
    gy = rng.standard_normal((N, c["OC"], oh, ow)).astype(dtype)
    return x, w, b, gy


def _args(c):
    return dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("c", FUNCTIONAL, ids=[f"f{i}" for i in range(len(FUNCTIONAL))])
def test_functional_like_torch(c, dtype):
    need_torch()
    x, w, b, gy = _arrays(c, dtype, make_rng("functional", sorted(c.items()), dtype))
    args = _args(c)
    y = F.conv2d(x, w, b, **args)
    assert_close(y, torch_functional("fwd", x, w, b, gy, **args), dtype, "conv2d")
    assert_close(F.conv2d(x, w, **args), torch_functional("fwd", x, w, None, gy, **args), dtype, "no bias")
    assert_close(F.conv2d_input(x.shape, w, gy, **args), torch_functional("bwd_data", x, w, b, gy, **args),
                 dtype, "conv2d_input")
    assert_close(F.conv2d_weight(x, w.shape, gy, **args), torch_functional("bwd_weight", x, w, b, gy, **args),
                 dtype, "conv2d_weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_functional_unbatched(dtype):
    c = FUNCTIONAL[2]
    x, w, b, gy = _arrays(c, dtype, make_rng("unbatched-functional", dtype), N=1)
    args = _args(c)
    y = F.conv2d(x[0], w, b, **args)
    assert y.shape == gy.shape[1:]
    assert_close(y, ref.conv2d(x[0], w, b, **args), dtype)
    gx = F.conv2d_input(x.shape[1:], w, gy[0], **args)
    assert gx.shape == x.shape[1:]
    assert_close(gx, ref.conv2d_input(x.shape, w, gy, **args)[0], dtype)
    gw = F.conv2d_weight(x[0], w.shape, gy[0], **args)
    assert_close(gw, ref.conv2d_weight(x, w.shape, gy, **args), dtype)
    torch = pytest.importorskip("torch")
    ty = torch.nn.functional.conv2d(torch.from_numpy(x[0]), torch.from_numpy(w), torch.from_numpy(b), **args)
    assert_close(y, ty.numpy(), dtype)


@pytest.mark.parametrize("hw, kernel, stride, padding, dilation", [
    ((7, 6), 3, 1, 0, 1), ((7, 6), 3, 2, 1, 1), ((1, 1), 1, 1, 0, 1), ((1, 1), 3, 2, 2, 1),
    ((9, 8), (3, 2), (2, 3), (1, 2), (2, 1)), ((8, 8), 4, 1, "same", 1), ((8, 7), (2, 5), 1, "same", (3, 2)),
    ((8, 7), 3, (3, 2), "valid", 2), ((5, 5), 5, 1, 0, 1), ((224, 224), 7, 2, 3, 1), (6, 3, 1, 1, 1),
])
def test_output_size(hw, kernel, stride, padding, dilation):
    torch = need_torch()
    got = convgen.output_size(hw, kernel, stride, padding, dilation)
    H, W = (hw, hw) if isinstance(hw, int) else hw
    kh, kw = ref._pair(kernel)
    y = torch.nn.functional.conv2d(torch.zeros(1, 1, H, W), torch.zeros(1, 1, kh, kw), stride=stride,
                                   padding=padding, dilation=dilation)
    assert got == tuple(y.shape[2:])
    assert all(isinstance(v, int) for v in got)


def test_output_size_matches_module():
    conv = convgen.Conv2d(1, 1, (3, 4), stride=(2, 1), padding=(2, 0), dilation=(1, 2))
    y = conv(np.zeros((1, 1, 10, 11), np.float32))
    assert y.shape[2:] == convgen.output_size((10, 11), (3, 4), (2, 1), (2, 0), (1, 2)) == (6, 5)


# ---- memory layouts and the caller's arrays ---------------------------------------

def _layouts(a):
    """The same values as `a` in other memory layouts."""
    yield "fortran", np.asfortranarray(a)
    big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
    view = big[tuple(slice(1, 1 + 2 * s, 2) for s in a.shape)]
    view[...] = a
    yield "strided", view
    flipped = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    yield "negative-strides", flipped
    if a.ndim == 4:
        yield "transposed", np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_any_layout_same_result_and_inputs_untouched(dtype):
    c = FUNCTIONAL[2]
    x, w, b, gy = _arrays(c, dtype, make_rng("layouts", dtype))
    args = _args(c)
    y0 = F.conv2d(x, w, b, **args)
    gx0 = F.conv2d_input(x.shape, w, gy, **args)
    gw0 = F.conv2d_weight(x, w.shape, gy, **args)
    for name, xv in _layouts(x):
        for wname, wv in _layouts(w):
            for bname, bv in list(_layouts(b))[:2]:
                keep = [a.copy() for a in (xv, wv, bv)]
                np.testing.assert_array_equal(F.conv2d(xv, wv, bv, **args), y0, err_msg=f"{name}/{wname}/{bname}")
                for k, a in zip(keep, (xv, wv, bv)):
                    np.testing.assert_array_equal(a, k)
        for gname, gv in _layouts(gy):
            keep = [xv.copy(), gv.copy()]
            np.testing.assert_array_equal(F.conv2d_input(x.shape, w, gv, **args), gx0, err_msg=gname)
            np.testing.assert_array_equal(F.conv2d_weight(xv, w.shape, gv, **args), gw0, err_msg=f"{name}/{gname}")
            np.testing.assert_array_equal(xv, keep[0])
            np.testing.assert_array_equal(gv, keep[1])


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_any_layout_and_inputs_untouched(mode):
    conv = convgen.Conv2d(3, 4, 3, stride=(1, 2), padding=(2, 1), padding_mode=mode, dtype=np.float64, seed=0)
    rng = make_rng("module-layout", mode)
    x = rng.standard_normal((2, 3, 6, 7))
    y0 = conv(x)
    gy = rng.standard_normal(y0.shape)
    gx0 = conv.backward(gy)
    gw0 = conv.weight.grad.copy()
    w_before, b_before = conv.weight.copy(), conv.bias.copy()
    for name, xv in _layouts(x):
        for gname, gv in _layouts(gy):
            conv.zero_grad()
            keep_x, keep_g = xv.copy(), gv.copy()
            np.testing.assert_array_equal(conv(xv), y0, err_msg=name)
            np.testing.assert_array_equal(conv.backward(gv), gx0, err_msg=f"{name}/{gname}")
            np.testing.assert_array_equal(conv.weight.grad, gw0, err_msg=f"{name}/{gname}")
            np.testing.assert_array_equal(xv, keep_x)
            np.testing.assert_array_equal(gv, keep_g)
    np.testing.assert_array_equal(conv.weight, w_before)
    np.testing.assert_array_equal(conv.bias, b_before)


def _read_only(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def test_read_only_weight_and_bias():
    rng = make_rng("read-only-w")
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    gy = rng.standard_normal((2, 4, 4, 4))
    np.testing.assert_array_equal(F.conv2d(x, _read_only(w), _read_only(b)), F.conv2d(x, w, b))
    np.testing.assert_array_equal(F.conv2d_input(x.shape, _read_only(w), gy), F.conv2d_input(x.shape, w, gy))


@pytest.mark.parametrize("which", ["conv2d-input", "conv2d_input-grad_output", "conv2d_weight-input",
                                   "conv2d_weight-grad_output", "module-input", "module-grad_output"])
def test_read_only_inputs(which):
    rng = make_rng("read-only", which)
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    gy = rng.standard_normal((2, 4, 4, 4))
    func, arg = which.split("-")
    ro_x = _read_only(x) if arg == "input" else x
    ro_gy = _read_only(gy) if arg == "grad_output" else gy
    if func == "conv2d":
        got, expected = F.conv2d(ro_x, w, b), F.conv2d(x, w, b)
    elif func == "conv2d_input":
        got, expected = F.conv2d_input(x.shape, w, ro_gy), F.conv2d_input(x.shape, w, gy)
    elif func == "conv2d_weight":
        got, expected = F.conv2d_weight(ro_x, w.shape, ro_gy), F.conv2d_weight(x, w.shape, gy)
    else:
        conv = convgen.Conv2d(3, 4, 3, dtype=np.float64, seed=0)
        conv(ro_x)
        got = conv.backward(ro_gy)
        expected = ref.conv2d_input(x.shape, conv.weight, gy)
    assert_close(got, expected, np.float64)


def test_results_do_not_alias_inputs():
    """A 1x1 convolution could be computed in place: it must not be."""
    x = make_rng("alias").standard_normal((1, 2, 3, 3))
    w = np.eye(2).reshape(2, 2, 1, 1)
    y = F.conv2d(x, w)
    assert not np.shares_memory(y, x)
    np.testing.assert_array_equal(y, x)
    conv = convgen.Conv2d(2, 2, 1, bias=False, dtype=np.float64)
    conv.weight = w
    y = conv(x)
    gx = conv.backward(y)
    assert not np.shares_memory(gx, y) and not np.shares_memory(gx, x)
    y[...] = 0
    gx2 = conv.backward(np.ones_like(y))
    np.testing.assert_array_equal(gx2, np.ones_like(x))


@pytest.mark.parametrize("stride", [1, 2])
def test_weight_gradient_calls_share_no_state(stride):
    """F.conv2d_weight pads its input into scratch memory that the next call reuses: each
    result is a fresh array, the same as alone, whatever ran in between (another input,
    another shape, an infinity that sends the next call down the exact path)."""
    rng = make_rng("conv2d_weight scratch", stride)
    x1, x2 = rng.standard_normal((2, 2, 6, 11, 9)).astype(np.float32)
    args = dict(stride=stride, padding=1)
    gy = rng.standard_normal(F.conv2d(x1, np.zeros((5, 6, 3, 3), np.float32), **args).shape).astype(np.float32)
    first = F.conv2d_weight(x1, (5, 6, 3, 3), gy, **args)
    second = F.conv2d_weight(x2, (5, 6, 3, 3), gy, **args)
    assert not np.shares_memory(first, second)
    x3 = x2.copy()
    x3[0, 1, 4, 4] = np.inf
    with np.errstate(invalid="ignore"):
        inf = F.conv2d_weight(x3, (5, 6, 3, 3), gy, **args)
    assert not np.isfinite(inf).all()
    F.conv2d_weight(rng.standard_normal((1, 6, 20, 20)).astype(np.float32), (5, 6, 3, 3),
                    rng.standard_normal((1, 5, 20 // stride, 20 // stride)).astype(np.float32), **args)
    np.testing.assert_array_equal(F.conv2d_weight(x1, (5, 6, 3, 3), gy, **args), first)
    np.testing.assert_array_equal(F.conv2d_weight(x2, (5, 6, 3, 3), gy, **args), second)
    assert_close(first, ref.conv2d_weight(x1, (5, 6, 3, 3), gy, **args), np.dtype(np.float32), "vs reference")


@pytest.mark.parametrize("C, OC, groups, hw, unbatched", [
    pytest.param(2, 3, 1, 5, False, id="dense"),
    pytest.param(4, 6, 2, 5, False, id="grouped"),
    pytest.param(4, 4, 4, 5, False, id="depthwise"),
    pytest.param(4, 8, 4, 40, False, id="depthwise-x2-large"),
    pytest.param(3, 3, 3, 5, True, id="depthwise-unbatched"),
])
def test_module_after_input_changes(C, OC, groups, hw, unbatched):
    """backward uses the input of the forward call, even if the caller reuses its buffer."""
    conv = convgen.Conv2d(C, OC, 3, groups=groups, dtype=np.float64, seed=0)
    rng = make_rng("reuse", C, OC, groups, hw)
    x = rng.standard_normal((C, hw, hw) if unbatched else (2, C, hw, hw))
    x_then = x.copy()
    y = conv(x)
    x[...] = rng.standard_normal(x.shape)      # the caller reuses its buffer
    gy = rng.standard_normal(y.shape)
    gx = conv.backward(gy)
    args = dict(groups=groups)
    xb, gyb = (x_then[None], gy[None]) if unbatched else (x_then, gy)
    assert_close(conv.weight.grad, ref.conv2d_weight(xb, conv.weight.shape, gyb, **args), np.float64)
    assert_close(gx, ref.conv2d_input(x.shape, conv.weight, gy, **args), np.float64)


def test_inputs_as_lists_and_torch_like_objects():
    x = [[[[1.0, 2.0], [3.0, 4.0]]]]
    w = np.ones((1, 1, 2, 2))
    np.testing.assert_array_equal(F.conv2d(np.array(x), w), [[[[10.0]]]])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_module_vs_torch_f32_f64(dtype):
    torch = need_torch()
    conv = convgen.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1), groups=2,
                          padding_mode="reflect", dtype=dtype, seed=0)
    m = torch_module(conv, torch)
    assert m.weight.dtype == torch_dtype(dtype)
    rng = make_rng("module-torch", dtype)
    x = rng.standard_normal((3, 4, 7, 8)).astype(dtype)
    y = conv(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = conv.backward(gy)
    ty, tgx, tgw, tgb = torch_forward_backward(m, x, gy)
    assert_close(y, ty, dtype)
    assert_close(gx, tgx, dtype)
    assert_close(conv.weight.grad, tgw, dtype)
    assert_close(conv.bias.grad, tgb, dtype)


@pytest.mark.parametrize("layer", [(8, 3, 1, 0, 1), (8, 8, 3, 1, 8), (8, 16, 5, 2, 8)],
                         ids=["1x1", "depthwise", "depthwise-5x5-x2"])
def test_float32_bias_gradient_sums_accurately(layer):
    """The bias gradient sums float32 values in float64 past blocks of 16 vectors (256
    values in AVX-512's lanes: _layout's channel sums), or past each row (the depthwise weight gradient's, as it reads
    grad_output): on 25,088 values a channel whose sums cancel (to a few 1e-6), within
    3e-5 of the float64 sum (measured 1.0e-5; PyTorch's float32 sum 3.4e-5; a float32 sum
    throughout, as before, 1.3e-4)."""
    C, OC, k, pad, groups = layer
    rng = np.random.default_rng(7)
    conv = convgen.Conv2d(C, OC, k, padding=pad, groups=groups)
    x = rng.standard_normal((2, C, 112, 112)).astype(np.float32)
    g = rng.standard_normal((2, OC, 112, 112))
    gy = (g - g.mean(axis=(0, 2, 3), keepdims=True)).astype(np.float32)
    conv(x)
    conv.backward(gy)
    want = gy.astype(np.float64).sum(axis=(0, 2, 3))
    # (a portable build's 4 float32 lanes sum a row's 112 values 28 to a lane before
    # widening, where AVX-512's sum 7: measured 3.06e-5 there)
    bound = 3e-5 if _engine.LANES["f32"] >= 8 else 4e-5
    assert np.abs(conv.bias.grad - want).max() <= bound
    conv.backward(gy)   # (accumulated)
    assert np.abs(conv.bias.grad - 2 * want).max() <= 2 * bound
    route = _engine.forward_plan(conv._cfg.problem(x.shape, x.dtype)).weight_gradient_routes
    assert [sums_bias for _, sums_bias in route.values()] == [groups > 1]
