"""Sweeps over the shapes where convolution code goes off by one: tiny and odd
images, kernels as large as the padded input, strides larger than the kernel
(phases of the input gradient with no taps), non-square everything, every
padding mode with 'same' / 'valid' / explicit padding, unbatched and empty
batches, groups and channel multipliers, with and without bias.  Each runs
Conv2d forward and backward, against PyTorch's nn.Conv2d and the float64 reference."""

import numpy as np
import pytest

import convgen
from convgen import _reference as ref
from conftest import (DTYPES, PADDING_MODES, assert_close, make_rng, need_torch, torch_forward_backward,
                      torch_module)


def cfg(name, C=2, OC=3, H=5, W=6, kernel=3, stride=1, padding=0, dilation=1, groups=1, bias=True,
        mode="zeros", N=2):
    return pytest.param(dict(C=C, OC=OC, H=H, W=W, kernel=kernel, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias=bias, mode=mode, N=N), id=name)


SHAPES = [
    # tiny and odd images
    cfg("1x1-image-1x1-kernel", H=1, W=1, kernel=1),
    cfg("1x1-image-3x3-pad1", H=1, W=1, kernel=3, padding=1),
    cfg("1x1-image-pad2-stride2", H=1, W=1, kernel=3, padding=2, stride=2),
    cfg("1xW-image", H=1, W=7, kernel=(1, 3), padding=(0, 1)),
    cfg("Hx1-image", H=7, W=1, kernel=(3, 1), stride=(2, 1)),
    cfg("odd-7x5-s2", H=7, W=5, kernel=3, stride=2, padding=1),
    cfg("odd-13x3-s3", H=13, W=3, kernel=3, stride=3),
    cfg("prime-11x13-k5", H=11, W=13, kernel=5, padding=2, C=3, OC=5),
    # the (dilated) kernel exactly as large as the padded input: a single output pixel
    cfg("kernel-eq-padded-input", H=4, W=4, kernel=6, padding=1),
    cfg("kernel-eq-input", H=5, W=3, kernel=(5, 3)),
    cfg("dilated-kernel-eq-input", H=5, W=7, kernel=3, dilation=(2, 3)),
    # strides: larger than the kernel, larger than the image, leftover rows
    cfg("stride-gt-kernel-1x1", H=7, W=8, kernel=1, stride=2),
    cfg("stride3-kernel2", H=8, W=9, kernel=2, stride=3),
    cfg("stride-gt-image", H=2, W=3, kernel=1, stride=4),
    cfg("stride2-dilation2-empty-phases", H=9, W=9, kernel=3, stride=2, dilation=2, padding=2),
    cfg("stride4-k3-leftover", H=10, W=11, kernel=3, stride=4, padding=1),
    # non-square kernels, strides, dilations and padding
    cfg("kernel-2x3", kernel=(2, 3)),
    cfg("kernel-1x4-pad0x2", kernel=(1, 4), padding=(0, 2)),
    cfg("stride-1x2", kernel=3, stride=(1, 2), padding=1),
    cfg("stride-3x1", H=9, kernel=(2, 2), stride=(3, 1)),
    cfg("dilation-2x1", H=7, kernel=3, dilation=(2, 1), padding=(2, 1)),
    cfg("dilation-1x3", W=9, kernel=(2, 3), dilation=(1, 3)),
    cfg("pad-1x0", kernel=3, padding=(1, 0)),
    cfg("everything-non-square", H=9, W=8, kernel=(3, 2), stride=(2, 3), dilation=(1, 2), padding=(2, 1)),
    # square shapes with no specialised kernel (generic path) and big zero padding
    cfg("square-generic-k4-s1", kernel=4, padding=2),
    cfg("square-generic-k3-d3", H=8, W=8, kernel=3, dilation=3, padding=3),
    cfg("pad-larger-than-kernel", H=3, W=3, kernel=3, padding=4),
    # (the input gradient reads none of grad_output's last rows, which its planes do not hold)
    cfg("pad-beyond-dilated-span", H=5, W=9, kernel=3, dilation=2, padding=(7, 6)),
    # 3x3 with strides / dilations outside the specialised table
    cfg("k3-s1-d6-aspp", H=14, W=13, kernel=3, dilation=6, padding=6),
    cfg("k3-s3", H=10, W=11, kernel=3, stride=3, padding=1),
    cfg("k3-s2-d3", H=12, W=12, kernel=3, stride=2, dilation=3, padding=3),
    cfg("k3-s1x2-d2x3", H=9, W=12, kernel=3, stride=(1, 2), dilation=(2, 3), padding=(2, 3)),
    cfg("k3-depthwise-d4", C=4, OC=8, groups=4, H=10, W=10, kernel=3, dilation=4, padding=4, mode="reflect"),
    cfg("k3-grouped-s3-d2", C=4, OC=6, groups=2, H=11, W=12, kernel=3, stride=3, dilation=2, padding=2),
    cfg("even-kernel-valid", kernel=2, padding="valid"),
    # groups and depthwise, with channel multipliers
    cfg("grouped-2", C=4, OC=6, groups=2, padding=1),
    cfg("grouped-3-s2", C=6, OC=3, groups=3, stride=2, padding=1, H=7, W=7),
    cfg("depthwise", C=4, OC=4, groups=4, padding=1),
    cfg("depthwise-multiplier-3", C=3, OC=9, groups=3, padding=1),
    cfg("depthwise-multiplier-2-k5s2", C=4, OC=8, groups=4, kernel=5, stride=2, padding=2, H=9, W=9),
    cfg("depthwise-generic-2x3", C=4, OC=8, groups=4, kernel=(2, 3), dilation=(2, 1)),
    cfg("grouped-full-in-1", C=2, OC=4, groups=2, kernel=1),
    # bias or not, batch sizes, unbatched
    cfg("no-bias", bias=False, padding=1),
    cfg("no-bias-grouped", C=4, OC=4, groups=2, bias=False),
    cfg("batch-1", N=1, padding=1),
    cfg("batch-5", N=5, kernel=1, stride=2),
    cfg("unbatched", N=None, padding=1),
    cfg("unbatched-depthwise-s2", N=None, C=3, OC=6, groups=3, stride=2, padding=1),
    cfg("many-channels", C=19, OC=17, H=4, W=4, padding=1),
    # many output channels on small maps (weight gradient vectorised over channels)
    cfg("wide-7x7", N=3, C=7, OC=70, H=7, W=7, padding=1, mode="reflect"),
    cfg("wide-s2", N=2, C=3, OC=33, H=13, W=12, stride=2, padding=1),
    cfg("wide-1x1-64", N=4, C=16, OC=64, H=5, W=6, kernel=1),
    cfg("wide-generic", N=2, C=5, OC=48, H=8, W=9, kernel=(3, 2), dilation=(1, 2), padding=(1, 0),
        mode="circular"),
    cfg("wide-16x16", N=1, C=4, OC=35, H=16, W=14, padding=1),
]

# Every padding mode crossed with 'same' (odd, even -> asymmetric, dilated),
# 'valid' and explicit padding, including the largest padding each mode allows.
for _mode in PADDING_MODES:
    SHAPES += [
        cfg(f"{_mode}-same-k3", mode=_mode, padding="same"),
        cfg(f"{_mode}-same-even-k4", mode=_mode, padding="same", kernel=4),
        cfg(f"{_mode}-same-even-k2x4", mode=_mode, padding="same", kernel=(2, 4), H=6, W=7),
        cfg(f"{_mode}-same-dilated-k2d3", mode=_mode, padding="same", kernel=2, dilation=(3, 1)),
        cfg(f"{_mode}-valid", mode=_mode, padding="valid"),
        cfg(f"{_mode}-pad-1x2-s2", mode=_mode, padding=(1, 2), stride=2),
        cfg(f"{_mode}-pad-2-dilated", mode=_mode, padding=2, dilation=2, H=6, W=6),
        cfg(f"{_mode}-grouped-pad1", mode=_mode, padding=1, C=4, OC=4, groups=2),
        cfg(f"{_mode}-unbatched-pad1", mode=_mode, padding=1, N=None, H=4, W=3),
        cfg(f"{_mode}-max-pad", mode=_mode, H=4, W=3, kernel=3, stride=(1, 2),
            padding=(3, 2) if _mode == "reflect" else (4, 3)),
    ]


def _arrays(c, dtype, rng):
    shape = (c["C"], c["H"], c["W"]) if c["N"] is None else (c["N"], c["C"], c["H"], c["W"])
    return rng.standard_normal(shape).astype(dtype)


def _module(c, dtype):
    return convgen.Conv2d(c["C"], c["OC"], c["kernel"], c["stride"], c["padding"], c["dilation"],
                          c["groups"], c["bias"], c["mode"], dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("c", SHAPES)
def test_forward_backward(c, dtype):
    _forward_backward(c, dtype, against_torch=True)


def _forward_backward(c, dtype, against_torch):
    rng = make_rng(sorted(c.items()), dtype)
    conv = _module(c, dtype)
    x = _arrays(c, dtype, rng)
    y = conv(x)
    args = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"],
                padding_mode=c["mode"])
    expected_y = ref.conv2d(x, conv.weight, conv.bias, **args)
    assert_close(y, expected_y, dtype, "forward vs reference")
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = conv.backward(gy)
    gx_ref, gw_ref, gb_ref = ref.conv2d_backward(x, conv.weight, gy, **args)
    assert_close(gx, gx_ref, dtype, "input grad vs reference")
    assert_close(conv.weight.grad, gw_ref, dtype, "weight grad vs reference")
    if c["bias"]:
        assert_close(conv.bias.grad, gb_ref, dtype, "bias grad vs reference")

    if not against_torch:
        return
    torch = need_torch()
    m = torch_module(conv, torch)
    ty, tgx, tgw, tgb = torch_forward_backward(m, x, gy)
    assert_close(y, ty, dtype, "forward vs torch")
    assert_close(gx, tgx, dtype, "input grad vs torch")
    assert_close(conv.weight.grad, tgw, dtype, "weight grad vs torch")
    if c["bias"]:
        assert_close(conv.bias.grad, tgb, dtype, "bias grad vs torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("padding", [0, 1, "same"], ids=["pad0", "pad1", "same"])
@pytest.mark.parametrize("C, OC, groups", [(3, 4, 1), (4, 8, 4)], ids=["dense", "depthwise-x2"])
def test_zero_batch(C, OC, groups, mode, padding, dtype):
    """An empty batch gives an empty output of the right shape, zero weight and
    bias gradients, and an empty input gradient, as PyTorch does."""
    conv = convgen.Conv2d(C, OC, 3, padding=padding, groups=groups, padding_mode=mode, dtype=dtype, seed=0)
    x = np.zeros((0, C, 5, 6), dtype)
    y = conv(x)
    expected_hw = (5, 6) if padding in (1, "same") else (3, 4)
    assert y.shape == (0, OC) + expected_hw and y.dtype == np.dtype(dtype)
    with convgen.no_grad():   # (inference runs its own path)
        y0 = conv(x)
    assert y0.shape == y.shape and y0.dtype == y.dtype
    y = conv(x)
    gx = conv.backward(np.zeros(y.shape, dtype))
    assert gx.shape == x.shape and gx.dtype == np.dtype(dtype)
    assert conv.weight.grad.shape == conv.weight.shape and not conv.weight.grad.any()
    assert conv.bias.grad.shape == (OC,) and not conv.bias.grad.any()
    torch = need_torch()
    ty, _, tgw, _ = torch_forward_backward(torch_module(conv, torch), x, np.zeros(y.shape, dtype))
    assert y.shape == ty.shape
    np.testing.assert_array_equal(conv.weight.grad, tgw)


def test_zero_batch_functional():
    F = convgen.functional
    w = np.ones((4, 3, 3, 3))
    assert F.conv2d(np.zeros((0, 3, 5, 5)), w, padding=1).shape == (0, 4, 5, 5)
    assert F.conv2d_input((0, 3, 5, 5), w, np.zeros((0, 4, 3, 3))).shape == (0, 3, 5, 5)
    gw = F.conv2d_weight(np.zeros((0, 3, 5, 5)), w.shape, np.zeros((0, 4, 3, 3)))
    assert gw.shape == w.shape and not gw.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_unbatched_matches_batch_of_one(dtype):
    conv = convgen.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="reflect", dtype=dtype, seed=3)
    rng = make_rng("unbatched", dtype)
    x = rng.standard_normal((3, 7, 6)).astype(dtype)
    y = conv(x)
    assert y.ndim == 3
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = conv.backward(gy)
    gw = conv.weight.grad.copy()
    conv.zero_grad()
    y4 = conv(x[None])
    gx4 = conv.backward(gy[None])
    np.testing.assert_array_equal(y, y4[0])
    np.testing.assert_array_equal(gx, gx4[0])
    np.testing.assert_array_equal(gw, conv.weight.grad)


# Layers big enough that convgen splits its reductions to stay in cache: the
# forward over blocks of input channels, the input gradient over blocks of output
# channels, the weight gradient over segments of pixels or of images, resuming
# from partial sums each time.  Every split has to add up to the unsplit sum, also
# for the last, partial register tiles (channel counts that are multiples of nothing).
LARGE = [
    cfg("in-channel-blocks-k3", N=1, C=80, OC=8, H=62, W=62, kernel=3, padding=1),
    cfg("out-channel-blocks-k3", N=1, C=8, OC=80, H=62, W=62, kernel=3, padding=1),
    cfg("image-segments-k3", N=9, C=80, OC=4, H=20, W=20, kernel=3, padding=1, bias=False),
    cfg("blocks-stride2-generic", N=2, C=72, OC=8, H=64, W=60, kernel=(3, 2), stride=2, padding=(1, 0)),
    cfg("grouped-blocks", N=1, C=160, OC=16, H=62, W=62, kernel=3, padding=1, groups=2,
        mode="reflect"),
    cfg("depthwise-large", N=2, C=64, OC=64, H=40, W=40, kernel=3, padding=1, groups=64,
        mode="circular"),
]
LARGE_ODD = [
    cfg("odd-in-channel-blocks-k3", N=1, C=79, OC=7, H=62, W=62, kernel=3, padding=1),
    cfg("odd-out-channel-blocks-k3", N=1, C=7, OC=79, H=62, W=62, kernel=3, padding=1),
    cfg("odd-image-segments-k3", N=8, C=35, OC=5, H=30, W=30, kernel=3, padding=1),
    cfg("odd-blocks-stride2-generic", N=2, C=71, OC=6, H=64, W=60, kernel=(3, 2), stride=2, padding=(1, 0)),
    cfg("odd-grouped-blocks", N=1, C=158, OC=14, H=62, W=62, kernel=3, padding=1, groups=2,
        mode="replicate"),
    cfg("odd-depthwise-multiplier", N=3, C=37, OC=74, H=40, W=41, kernel=3, padding=1, groups=37),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("c", LARGE + LARGE_ODD)
def test_large_reductions(c, dtype):
    # Against the reference only: it is exact in float64 and was checked against
    # PyTorch above, which is slow on some of these layers (depthwise x2 in float64).
    _forward_backward(c, dtype, against_torch=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_weight_grad_split_reduction_partial_tiles(dtype):
    """Regression test (fixed in 510d4c8): the weight-gradient kernel repeats the last
    row/column of a partial register tile, and once it accumulates over a second
    reduction segment those repeats must not add again.  35 input channels x 9 taps =
    315 weight columns and 5 output channels; 8 images of 30x30 take several segments."""
    F = convgen.functional
    rng = make_rng("wgrad-segments", dtype)
    x = rng.standard_normal((8, 35, 30, 30)).astype(dtype)
    gy = rng.standard_normal((8, 5, 30, 30)).astype(dtype)
    gw = F.conv2d_weight(x, (5, 35, 3, 3), gy, padding=1)
    assert_close(gw, ref.conv2d_weight(x, (5, 35, 3, 3), gy, padding=1), dtype)
