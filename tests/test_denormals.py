"""Denormals: convgen.set_flush_denormal, like torch.set_flush_denormal.  Off by default;
on, every kernel flushes denormal operands and results to zero on all its threads,
whichever set the calling thread's mode."""

import numpy as np
import pytest

import convgen
from convgen import _layout
from conftest import make_rng

# (in, out, kernel, stride, padding, dilation, groups, size): the kernel families, each
# large enough to run on 2 threads: channel-vector tiles, pixel tiles, 1x1 panels,
# depthwise, grouped, strided, dilated
LAYERS = {
    "dense_3x3": (64, 64, 3, 1, 1, 1, 1, 32),
    "pixel_tiles": (8, 24, 3, 1, 1, 1, 1, 64),
    "pointwise": (128, 64, 1, 1, 0, 1, 1, 32),
    "depthwise": (64, 64, 3, 1, 1, 1, 64, 64),
    "grouped": (64, 64, 3, 1, 1, 1, 16, 48),
    "strided_dilated": (32, 48, 5, 2, 4, 2, 1, 64),
}
TINY = {np.float32: 1e-39, np.float64: 1e-310}   # denormal in each dtype


@pytest.fixture
def flush_off(restore_threads):
    """Leave the process as it was: no flushing, 2 threads."""
    assert not _layout.flush_denormal()
    convgen.set_num_threads(2)
    yield
    convgen.set_flush_denormal(False)


def _layer(name, dtype, rng):
    C, OC, k, s, pad, d, g, size = LAYERS[name]
    m = convgen.Conv2d(C, OC, k, stride=s, padding=pad, dilation=d, groups=g, dtype=dtype)
    m.bias[...] = 0   # (a denormal added to a normal bias would round away)
    x = rng.standard_normal((2, C, size, size)) * TINY[dtype]   # float64 denormals only below 2e-308
    return m, x.astype(dtype)


def _step(m, x, tiny):
    """Module forward and backward from a denormal grad_output (built before any flushing)."""
    y = m(x)
    gx = m.backward(tiny)
    return y, gx, m.weight.grad.copy(), m.bias.grad.copy()


def test_set_flush_denormal_takes_a_bool_only():
    for bad in (1, 0, None, "yes"):
        with pytest.raises(TypeError, match="bool"):
            convgen.set_flush_denormal(bad)
    assert not _layout.flush_denormal()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_flushing_zeroes_denormal_products_on_every_thread(name, dtype, flush_off):
    rng = make_rng(name)
    m, x = _layer(name, dtype, rng)
    gy = (rng.standard_normal(m(x).shape) * TINY[dtype]).astype(dtype)
    # Off (the default): the products of denormals are computed, as PyTorch computes them.
    y0, gx0, gw0, gb0 = _step(m, x, gy)
    assert np.count_nonzero(y0) > 0.9 * y0.size
    assert np.count_nonzero(gx0) > 0.2 * gx0.size   # (stride 2, dilation 2: a quarter of the pixels)
    assert np.count_nonzero(gb0) == gb0.size
    m.weight.grad = m.bias.grad = None

    assert convgen.set_flush_denormal(True) is True
    assert _layout.flush_denormal()
    y1, gx1, gw1, gb1 = _step(m, x, gy)
    # Every output, whichever thread computed it: a denormal input reads as zero.
    np.testing.assert_array_equal(y1, 0)
    np.testing.assert_array_equal(gx1, 0)
    np.testing.assert_array_equal(gw1, 0)
    np.testing.assert_array_equal(gb1, 0)
    m.weight.grad = m.bias.grad = None

    # Off again: every thread computes the denormals again, bitwise as before.
    assert convgen.set_flush_denormal(False) is True
    y2, gx2, gw2, gb2 = _step(m, x, gy)
    for before, after in ((y0, y2), (gx0, gx2), (gw0, gw2), (gb0, gb2)):
        np.testing.assert_array_equal(after, before)


def test_functional_calls_and_more_threads_follow_the_mode(flush_off):
    rng = make_rng("functional")
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    x = (rng.standard_normal((1, 32, 40, 40)) * 1e-39).astype(np.float32)
    assert np.count_nonzero(convgen.functional.conv2d(x, w, padding=1)) > 0
    convgen.set_flush_denormal(True)
    np.testing.assert_array_equal(convgen.functional.conv2d(x, w, padding=1), 0)
    convgen.set_num_threads(3)   # a thread more than any call used yet
    np.testing.assert_array_equal(convgen.functional.conv2d(x, w, padding=1), 0)
    gy = np.ones((1, 32, 40, 40), np.float32)
    np.testing.assert_array_equal(convgen.functional.conv2d_weight(x, w.shape, gy, padding=1), 0)


def test_a_thread_left_out_of_a_mode_change_gets_it_when_it_runs_again(flush_off):
    # (libgomp starts such a thread afresh, copying the caller's mode; follow_flush_denormal
    # would also set it, as it covers every thread a call may run on)
    rng = make_rng("pool")
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    x = (rng.standard_normal((2, 32, 48, 48)) * 1e-39).astype(np.float32)
    convgen.set_num_threads(3)
    assert np.count_nonzero(convgen.functional.conv2d(x, w, padding=1)) > 0.9 * 2 * 32 * 48 * 48
    convgen.set_num_threads(2)
    convgen.set_flush_denormal(True)   # (set while the third thread sits idle)
    np.testing.assert_array_equal(convgen.functional.conv2d(x, w, padding=1), 0)
    convgen.set_num_threads(3)
    np.testing.assert_array_equal(convgen.functional.conv2d(x, w, padding=1), 0)


def test_the_kernels_follow_torch_set_flush_denormal(flush_off):
    torch = pytest.importorskip("torch")
    from convgen.torch import Conv2d

    rng = make_rng("torch")
    m = Conv2d(32, 32, 3, padding=1, bias=False)
    x = torch.from_numpy((rng.standard_normal((1, 32, 40, 40)) * 1e-39).astype(np.float32))
    with torch.no_grad():
        assert torch.count_nonzero(m(x)) > 0.9 * x.numel()
        try:
            assert torch.set_flush_denormal(True)
            assert _layout.flush_denormal()
            assert torch.count_nonzero(m(x)) == 0
        finally:
            torch.set_flush_denormal(False)
        assert torch.count_nonzero(m(x)) > 0.9 * x.numel()
