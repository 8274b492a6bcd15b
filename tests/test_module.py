"""convgen.Conv2d as torch.nn.Conv2d: attributes, defaults, initialisation,
repr, gradients that start as None and accumulate, zero_grad, parameters."""

import math

import numpy as np
import pytest

import convgen
from convgen import _reference as ref
from conftest import assert_close, make_rng, need_torch, torch_forward_backward, torch_module

CONFIGS = [
    dict(args=(3, 4, 3)),
    dict(args=(3, 4, 3), kw=dict(padding=1)),
    dict(args=(3, 6, (3, 5)), kw=dict(stride=(2, 1), padding=(1, 2))),
    dict(args=(4, 8, 3), kw=dict(groups=4, bias=False)),
    dict(args=(4, 4, 2), kw=dict(dilation=2, padding="same", padding_mode="reflect")),
    dict(args=(2, 2, 1), kw=dict(padding="valid", padding_mode="circular")),
    dict(args=(6, 3, [3, 1]), kw=dict(stride=[1, 2], padding=[0, 1], dilation=[2, 1], groups=3,
                                     padding_mode="replicate")),
    dict(args=(1, 1, 7), kw=dict(stride=2, padding=(0, 0), dilation=(1, 1), bias=True)),
]
CONFIG_IDS = [f"cfg{i}" for i in range(len(CONFIGS))]


@pytest.mark.parametrize("c", CONFIGS, ids=CONFIG_IDS)
def test_attributes_like_torch(c):
    torch = need_torch()
    ours = convgen.Conv2d(*c["args"], **c.get("kw", {}))
    theirs = torch.nn.Conv2d(*c["args"], **c.get("kw", {}))
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.weight.shape == tuple(theirs.weight.shape)
    assert (ours.bias is None) == (theirs.bias is None)
    if ours.bias is not None:
        assert ours.bias.shape == tuple(theirs.bias.shape)


@pytest.mark.parametrize("c", CONFIGS, ids=CONFIG_IDS)
def test_repr_like_torch(c):
    torch = need_torch()
    ours = convgen.Conv2d(*c["args"], **c.get("kw", {}))
    theirs = torch.nn.Conv2d(*c["args"], **c.get("kw", {}))
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)


def test_defaults():
    conv = convgen.Conv2d(3, 8, 3)
    assert conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
    assert conv.groups == 1 and conv.padding_mode == "zeros"
    assert conv.weight.dtype == np.float32 and conv.bias.dtype == np.float32
    assert conv.weight.shape == (8, 3, 3, 3) and conv.bias.shape == (8,)
    assert isinstance(conv.weight, convgen.Parameter) and isinstance(conv.weight, np.ndarray)
    assert isinstance(conv.bias, convgen.Parameter)
    assert conv.weight.grad is None and conv.bias.grad is None
    conv64 = convgen.Conv2d(3, 8, 3, dtype=np.float64, bias=False)
    assert conv64.weight.dtype == np.float64 and conv64.bias is None
    assert repr(conv) == "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))"


def test_call_is_forward():
    conv = convgen.Conv2d(2, 3, 3, seed=0)
    x = make_rng("call").standard_normal((1, 2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(conv(x), conv.forward(x))


# ---- default initialisation --------------------------------------------------

def test_seed_reproducible():
    a = convgen.Conv2d(4, 6, 3, seed=7)
    b = convgen.Conv2d(4, 6, 3, seed=7)
    c = convgen.Conv2d(4, 6, 3, seed=8)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)
    assert not np.array_equal(a.bias, c.bias)
    g1 = convgen.Conv2d(4, 6, 3, seed=np.random.default_rng(3))
    g2 = convgen.Conv2d(4, 6, 3, seed=np.random.default_rng(3))
    np.testing.assert_array_equal(g1.weight, g2.weight)
    np.testing.assert_array_equal(g1.bias, g2.bias)
    # A shared generator advances: two layers drawn from it differ.
    gen = np.random.default_rng(3)
    l1, l2 = convgen.Conv2d(4, 6, 3, seed=gen), convgen.Conv2d(4, 6, 3, seed=gen)
    assert not np.array_equal(l1.weight, l2.weight)
    # Without a seed, fresh entropy.
    assert not np.array_equal(convgen.Conv2d(4, 6, 3).weight, convgen.Conv2d(4, 6, 3).weight)


@pytest.mark.parametrize("in_c, out_c, k, groups", [(16, 64, 3, 1), (32, 64, (5, 3), 4), (64, 512, 3, 64)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_init_bounds_like_torch(in_c, out_c, k, groups, dtype):
    """kaiming_uniform_(a=sqrt(5)) makes the weight uniform in +-1/sqrt(fan_in); the bias
    is uniform in the same range; fan_in = in_channels / groups * kH * kW."""
    conv = convgen.Conv2d(in_c, out_c, k, groups=groups, dtype=dtype, seed=0)
    kh, kw = (k, k) if isinstance(k, int) else k
    fan_in = in_c // groups * kh * kw
    bound = 1 / math.sqrt(fan_in)
    w = np.asarray(conv.weight, dtype=np.float64)
    b = np.asarray(conv.bias, dtype=np.float64)
    assert conv.weight.dtype == np.dtype(dtype)
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.95 * bound            # fills the range...
    assert abs(w.std() - bound / math.sqrt(3)) < 0.08 * bound   # ... uniformly
    assert abs(w.mean()) < 0.05 * bound
    assert np.abs(b).max() <= bound * (1 + 1e-6)
    assert np.abs(b).max() > 0.5 * bound
    torch = pytest.importorskip("torch")
    theirs = torch.nn.Conv2d(in_c, out_c, k, groups=groups)
    torch_bound = float(theirs.weight.detach().abs().max())
    assert torch_bound <= bound * (1 + 1e-6) and torch_bound > 0.9 * bound


def test_reset_parameters():
    conv = convgen.Conv2d(3, 4, 3, seed=1)
    w = conv.weight.copy()
    conv.reset_parameters(seed=1)
    np.testing.assert_array_equal(conv.weight, w)
    conv.reset_parameters(seed=2)
    assert not np.array_equal(conv.weight, w)


# ---- gradients -------------------------------------------------------------------

def test_grad_none_until_backward_then_accumulates_like_torch():
    torch = need_torch()
    conv = convgen.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="replicate", dtype=np.float64, seed=2)
    m = torch_module(conv, torch)
    rng = make_rng("accumulate")
    x1, x2 = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((2, 3, 7, 6))
    assert conv.weight.grad is None and conv.bias.grad is None
    y1 = conv(x1)
    assert conv.weight.grad is None and conv.bias.grad is None   # forward alone leaves them alone
    g1 = rng.standard_normal(y1.shape)
    conv.backward(g1)
    _, _, tgw1, tgb1 = torch_forward_backward(m, x1, g1)
    assert_close(conv.weight.grad, tgw1, np.float64)
    assert_close(conv.bias.grad, tgb1, np.float64)
    first = conv.weight.grad.copy()
    y2 = conv(x2)
    g2 = rng.standard_normal(y2.shape)
    gx2 = conv.backward(g2)
    ty2, tgx2, tgw2, tgb2 = torch_forward_backward(m, x2, g2)   # torch accumulates too
    assert_close(gx2, tgx2, np.float64, "backward returns this call's input gradient only")
    assert_close(conv.weight.grad, tgw2, np.float64, "weight grad accumulated")
    assert_close(conv.bias.grad, tgb2, np.float64, "bias grad accumulated")
    assert not np.allclose(conv.weight.grad, first)
    assert conv.weight.grad.shape == conv.weight.shape and conv.weight.grad.dtype == np.float64


def test_backward_twice_on_one_forward_accumulates():
    conv = convgen.Conv2d(2, 2, 3, dtype=np.float64, seed=0)
    x = make_rng("twice").standard_normal((1, 2, 4, 4))
    gy = np.ones_like(conv(x))
    gx1 = conv.backward(gy)
    gw1, gb1 = conv.weight.grad.copy(), conv.bias.grad.copy()
    gx2 = conv.backward(gy)
    np.testing.assert_array_equal(gx1, gx2)
    np.testing.assert_allclose(conv.weight.grad, 2 * gw1)
    np.testing.assert_allclose(conv.bias.grad, 2 * gb1)


def test_zero_grad_and_parameters():
    conv = convgen.Conv2d(2, 3, 3, seed=0)
    params = list(conv.parameters())
    assert len(params) == 2 and params[0] is conv.weight and params[1] is conv.bias
    x = np.ones((1, 2, 5, 5), np.float32)
    conv.backward(np.ones_like(conv(x)))
    assert conv.weight.grad is not None and conv.bias.grad is not None
    conv.zero_grad()
    assert conv.weight.grad is None and conv.bias.grad is None
    nobias = convgen.Conv2d(2, 3, 3, bias=False, seed=0)
    assert [p is nobias.weight for p in nobias.parameters()] == [True]
    y = nobias(x)
    nobias.backward(np.ones_like(y))
    assert nobias.bias is None and nobias.weight.grad is not None
    nobias.zero_grad()
    assert nobias.weight.grad is None


def test_gradients_kept_past_zero_grad_stay_as_they_were():
    """zero_grad() sets .grad to None, as torch's: a gradient the caller still holds keeps
    its values through the next backward (whose fresh gradients may reuse only arrays
    nobody holds), and a gradient nobody holds is reused."""
    conv = convgen.Conv2d(2, 3, 3, seed=0)
    x = make_rng("kept-grads").standard_normal((1, 2, 6, 6)).astype(np.float32)
    conv.backward(np.ones_like(conv(x)))
    kept_w, kept_b = conv.weight.grad, conv.bias.grad
    before_w, before_b = kept_w.copy(), kept_b.copy()
    conv.zero_grad()
    conv.backward(2 * np.ones_like(conv(x)))
    assert conv.weight.grad is not kept_w and conv.bias.grad is not kept_b
    np.testing.assert_array_equal(kept_w, before_w)
    np.testing.assert_array_equal(kept_b, before_b)
    np.testing.assert_allclose(conv.weight.grad, 2 * before_w, rtol=1e-5)
    ids = id(conv.weight.grad), id(conv.bias.grad)
    del kept_w, kept_b
    conv.zero_grad()
    conv.backward(np.ones_like(conv(x)))
    assert (id(conv.weight.grad), id(conv.bias.grad)) == ids   # (nobody held them: reused)
    np.testing.assert_allclose(conv.weight.grad, before_w, rtol=1e-5)


def test_sgd_step_through_parameters():
    """Updating the parameters in place (as an optimiser does) changes the next forward."""
    conv = convgen.Conv2d(2, 3, 3, padding=1, dtype=np.float64, seed=0)
    x = make_rng("sgd").standard_normal((2, 2, 5, 5))
    loss0 = float((conv(x) ** 2).sum())
    conv.backward(2 * conv(x))
    for p in conv.parameters():
        p -= 1e-3 * p.grad
    assert isinstance(conv.weight, convgen.Parameter)
    assert float((conv(x) ** 2).sum()) < loss0


def test_assigned_weights_are_used():
    conv = convgen.Conv2d(2, 3, (2, 3), dtype=np.float64, seed=0)
    rng = make_rng("assign")
    w = rng.standard_normal((3, 2, 2, 3))
    conv.weight = w
    assert isinstance(conv.weight, convgen.Parameter) and conv.weight.grad is None
    x = rng.standard_normal((1, 2, 4, 5))
    assert_close(conv(x), ref.conv2d(x, w, conv.bias), np.float64)
    w[...] = 0   # the module holds its own copy
    assert np.abs(conv.weight).sum() > 0
    conv.bias = None
    assert_close(conv(x), ref.conv2d(x, conv.weight), np.float64)


def test_repeated_calls_recheck_what_changed():
    """A call like the last one skips the checks; any change to the input or the
    parameters that the checks would catch, or that changes the result, still counts."""
    rng = make_rng("repeat")
    conv = convgen.Conv2d(3, 4, 3, padding=1, seed=0)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)

    def expect(y, x_, w=None, b="module"):
        w = conv.weight if w is None else w
        assert_close(y, ref.conv2d(x_.astype(np.float64), w.astype(np.float64),
                                   None if b is None else conv.bias.astype(np.float64),
                                   padding=1), np.float32)

    for _ in range(2):
        expect(conv(x), x)
    conv.weight[0] += 1                         # values changed in place: used
    expect(conv(x), x)
    x2 = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    expect(conv(x2), x2)                        # another shape
    expect(conv(x[0]), x[0])                    # unbatched, then batched again
    expect(conv(x), x)
    xt = np.asfortranarray(x)
    expect(conv(xt), x)                         # same shape, not contiguous
    expect(conv(convgen.Parameter(x)), x)       # an ndarray subclass
    with pytest.raises(TypeError):
        conv(x.astype(np.float64))              # same shape, other dtype
    bias = conv.bias
    conv.bias = None
    expect(conv(x), x, b=None)                  # bias dropped
    conv.bias = bias
    expect(conv(x), x)
    w = conv.weight
    with pytest.raises(ValueError, match="weight must have shape"):
        conv.weight = np.zeros((4, 3, 3, 2), np.float32)
        conv(x)
    conv.weight = w
    w.shape = (4, 3, 9)                         # reshaped in place
    with pytest.raises(ValueError):
        conv(x)
    w.shape = (4, 3, 3, 3)
    expect(conv(x), x)
    strided = np.zeros((4, 3, 3, 6), np.float32)[..., ::2]
    strided[...] = w
    conv.weight = w
    object.__setattr__(conv, "weight", strided)  # a non-contiguous weight
    expect(conv(x), x, w=strided)
    # depthwise inference hands the input itself to the kernel
    dw = convgen.Conv2d(16, 16, 3, groups=16, seed=0)
    x = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    with convgen.no_grad():
        for xi in (x, np.asfortranarray(x), x):
            y = dw(xi)
            assert_close(y, ref.conv2d(x.astype(np.float64), dw.weight.astype(np.float64),
                                       dw.bias.astype(np.float64), groups=16), np.float32)


def test_kernel_name():
    conv = convgen.Conv2d(8, 16, 3, padding=1)
    assert conv.kernel_name == "conv2d_fwd_f32_k3x3_s1_d1_dense"
    assert conv.kernel_name == convgen.kernel_for(8, 16, 3, 1, 1, 1, 1, np.float32, "fwd")
    dw = convgen.Conv2d(8, 16, 5, stride=2, groups=8, dtype=np.float64)
    assert dw.kernel_name == "conv2d_fwd_f64_k5x5_s2_d1_depthwise"
    odd = convgen.Conv2d(8, 16, (3, 1), groups=2)
    assert odd.kernel_name == "conv2d_fwd_f32_kany_sany_dany_grouped"
    assert convgen.kernel_for(8, 16, 3, 2, 1, 1, 1, np.float32, "bwd_data") == "conv2d_bwd_data_f32_k3x3_s2_d1_dense"
    assert (convgen.kernel_for(8, 8, 3, 1, 2, 2, 8, np.float64, "bwd_weight")
            == "conv2d_bwd_weight_f64_kany_sany_dany_depthwise")


def test_parameter():
    p = convgen.Parameter(np.arange(6.0).reshape(2, 3))
    assert p.grad is None and isinstance(p, np.ndarray) and p.flags.c_contiguous
    q = p * 2
    assert type(q) is np.ndarray   # arithmetic gives plain arrays
    import pickle
    p.grad = np.ones((2, 3))
    r = pickle.loads(pickle.dumps(p))
    assert isinstance(r, convgen.Parameter)
    np.testing.assert_array_equal(r, p)
    np.testing.assert_array_equal(r.grad, p.grad)


CHANGES_IN_PLACE = {
    "operator": lambda w: w.__isub__(0.5),
    "operator on a view": lambda w: w[1].__imul__(2),
    "ufunc out=": lambda w: np.multiply(w, -1, out=w),
    "item assignment": lambda w: w.__setitem__((0, 0, 0, 0), 3.0),
    "fill": lambda w: w.fill(0.25),
}


@pytest.mark.parametrize("change", CHANGES_IN_PLACE, ids=list(CHANGES_IN_PLACE))
def test_weight_changed_in_place_after_forward_is_caught(change):
    """The input gradient reads the weight at the backward: a change in place since the
    forward raises there, as torch's autograd does (its version counter), rather than
    returning the gradient of another layer; a new forward then backward runs on the new
    values."""
    conv = convgen.Conv2d(3, 4, 3, padding=1, dtype=np.float64, seed=0)
    rng = make_rng("version", change)
    x = rng.standard_normal((2, 3, 6, 5))
    gy = rng.standard_normal((2, 4, 6, 5))
    conv(x)
    before = conv.weight._version
    CHANGES_IN_PLACE[change](conv.weight)
    assert conv.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        conv.backward(gy)
    assert conv.weight.grad is None   # (nothing accumulated by the failed call)
    conv(x)
    assert_close(conv.backward(gy), ref.conv2d_input(x.shape, conv.weight, gy, padding=1), np.float64)
    assert_close(conv.weight.grad, ref.conv2d_weight(x, conv.weight.shape, gy, padding=1), np.float64)


def test_what_does_not_change_the_forwards_weight_is_not_caught():
    """No false alarms: changes before the forward, to the bias (which no gradient reads),
    or to the weight after the backward pass it belongs to; a new weight assigned between
    forward and backward (the forward's own is the one differentiated, as in torch); and a
    module pickled and loaded between them."""
    import pickle
    conv = convgen.Conv2d(3, 4, 3, padding=1, dtype=np.float64, seed=0)
    rng = make_rng("version-ok")
    x = rng.standard_normal((1, 3, 5, 5))
    gy = rng.standard_normal((1, 4, 5, 5))
    conv.weight -= 0.1
    conv(x)
    conv.bias += 1
    assert_close(conv.backward(gy), ref.conv2d_input(x.shape, conv.weight, gy, padding=1), np.float64)
    conv.weight -= 0.1 * conv.weight.grad   # (an optimiser's step) ...
    conv.zero_grad()
    conv(x)                                 # ... then the next step
    conv.backward(gy)
    old = conv.weight.copy()
    conv(x)
    conv.weight = rng.standard_normal(conv.weight.shape)
    assert_close(conv.backward(gy), ref.conv2d_input(x.shape, old, gy, padding=1), np.float64)
    conv.weight *= 3
    conv(x)
    twin = pickle.loads(pickle.dumps(conv))
    assert twin.weight._version == conv.weight._version > 0
    assert_close(twin.backward(gy), ref.conv2d_input(x.shape, conv.weight, gy, padding=1), np.float64)


def test_parameter_counts_its_changes_in_place():
    """Parameter._version counts what NumPy's in-place operators, item assignment and
    fill do to the parameter or to a view of it (on the parameter that owns the memory),
    not arithmetic that makes a new array, nor writes that go around these (np.copyto)."""
    p = convgen.Parameter(np.zeros((2, 3)))
    assert p._version == 0 and convgen.parameter.owner(p[1]) is p and convgen.parameter.owner(np.zeros(2)) is None
    steps = [lambda: p.__iadd__(1), lambda: p[1].__imul__(2), lambda: np.add(p, 1, out=p),
             lambda: p.__setitem__(0, 5), lambda: p.reshape(3, 2).__setitem__((0, 0), 1), lambda: p.fill(2)]
    for n, step in enumerate(steps, 1):
        step()
        assert p._version >= n, n
    counted = p._version
    q = p * 2 + p.sum()
    np.copyto(p, q)
    assert p._version == counted and type(q) is np.ndarray


def test_in_place_update_keeps_the_parameter():
    conv = convgen.Conv2d(2, 3, 3, seed=0)
    w = conv.weight
    conv.backward(np.ones_like(conv(np.ones((1, 2, 5, 5), np.float32))))
    grad = conv.weight.grad
    conv.weight -= 0.1 * conv.weight.grad
    assert conv.weight is w                    # what parameters() handed out is still the weight
    assert conv.weight.grad is grad            # and keeps its gradient, as in torch
    p = convgen.Parameter(np.zeros(3))
    p += 1
    assert isinstance(p, convgen.Parameter)


# ---- gradient mode ------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 6])
def test_no_grad_forward_keeps_nothing(groups):
    conv = convgen.Conv2d(6, 6, 3, padding=1, groups=groups, seed=0)
    x = make_rng("no_grad", groups).standard_normal((2, 6, 9, 9)).astype(np.float32)
    expected = ref.conv2d(x, conv.weight, conv.bias, padding=1, groups=groups)
    with convgen.no_grad():
        assert not convgen.is_grad_enabled()
        y = conv(x)
    assert convgen.is_grad_enabled()
    assert_close(y, expected, np.float32)
    with pytest.raises(RuntimeError, match="no_grad"):
        conv.backward(np.ones_like(y))
    assert conv.weight.grad is None
    y = conv(x)   # a forward outside no_grad can be differentiated again
    assert_close(y, expected, np.float32)
    conv.backward(np.ones_like(y))
    assert conv.weight.grad is not None


def test_grad_mode_nests_decorates_and_restores():
    @convgen.no_grad()
    def inference():
        with convgen.enable_grad():
            inner = convgen.is_grad_enabled()
        return inner, convgen.is_grad_enabled()

    assert inference() == (True, False)
    assert convgen.is_grad_enabled()
    with pytest.raises(ValueError):
        with convgen.no_grad():
            raise ValueError("the mode is restored on the way out")
    assert convgen.is_grad_enabled()
    convgen.set_grad_enabled(False)
    assert not convgen.is_grad_enabled()
    convgen.set_grad_enabled(True)
    with convgen.set_grad_enabled(False):
        assert not convgen.is_grad_enabled()
    assert convgen.is_grad_enabled()
    with pytest.raises(TypeError):
        convgen.set_grad_enabled(0)


def test_grad_mode_belongs_to_the_thread():
    import threading
    seen = []
    with convgen.no_grad():
        t = threading.Thread(target=lambda: seen.append(convgen.is_grad_enabled()))
        t.start()
        t.join()
        assert not convgen.is_grad_enabled()
    assert seen == [True]


# ---- freeze -------------------------------------------------------------------------

def _frozen_case():
    conv = convgen.Conv2d(40, 48, 3, padding=1, seed=0)
    x = make_rng("freeze").standard_normal((1, 40, 7, 7)).astype(np.float32)
    return conv, x


def test_freeze_makes_the_parameters_read_only_copies():
    conv, x = _frozen_case()
    conv.weight.grad = np.ones_like(conv.weight)
    weight, bias = conv.weight, conv.bias
    assert conv.freeze() is conv and conv.frozen
    assert conv.weight is not weight and conv.bias is not bias   # (views of the old ones stay writable)
    np.testing.assert_array_equal(conv.weight, weight)
    np.testing.assert_array_equal(conv.bias, bias)
    assert conv.weight.grad is weight.grad
    for param in conv.parameters():
        assert isinstance(param, convgen.Parameter) and not param.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            param[...] = 0
        with pytest.raises(ValueError):
            param.flags.writeable = True
        with pytest.raises(ValueError, match="read-only"):
            param.reshape(-1)[0] = 0   # (its views are read-only too)
    weight[...] = 0   # the old arrays change nothing now
    with convgen.no_grad():
        assert_close(conv(x), ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)
    assert conv.unfreeze() is conv and not conv.frozen
    assert conv.weight.flags.writeable and conv.bias.flags.writeable and conv.weight.grad is weight.grad
    conv.weight[:, :, 1, 1] += 1   # (an in-place update, seen by the next call)
    with convgen.no_grad():
        assert_close(conv(x), ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)


def test_frozen_forward_uses_the_parameters_it_has():
    """The packed weights are kept only while the frozen parameters are the module's and
    read-only: assigning a new weight, or making the frozen one writable behind freeze's
    back, packs again from what is there."""
    conv, x = _frozen_case()
    conv.freeze()
    with convgen.no_grad():
        y = conv(x)
        assert len(conv._frozen) == 1   # (this layer's packed weights)
        assert_close(y, ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)
        conv.weight = conv.weight * 2
        assert not conv.frozen
        assert_close(conv(x), ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)
        conv.freeze()
        conv(x)
        conv.weight.base.flags.writeable = True
        conv.weight.flags.writeable = True
        conv.weight[...] *= -1
        assert_close(conv(x), ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)
        assert not conv.frozen


def test_frozen_module_keeps_a_few_shapes_packed():
    conv, _ = _frozen_case()
    conv.freeze()
    rng = make_rng("freeze-shapes")
    with convgen.no_grad():
        for size in range(5, 12):
            x = rng.standard_normal((1, 40, size, size)).astype(np.float32)
            assert_close(conv(x), ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)
            assert 1 <= len(conv._frozen) <= convgen._engine.FROZEN_PACKS


def test_frozen_module_still_differentiates():
    """Outside no_grad a frozen module is differentiated as before (the input gradient of a
    frozen feature extractor); an optimiser step on it raises."""
    conv, x = _frozen_case()
    gy = make_rng("freeze-grad").standard_normal((1, 48, 7, 7)).astype(np.float32)
    conv.freeze()
    y = conv(x)
    gx = conv.backward(gy)
    assert_close(y, ref.conv2d(x, conv.weight, conv.bias, padding=1), np.float32)
    assert_close(gx, ref.conv2d_input(x.shape, conv.weight, gy, padding=1), np.float32)
    assert_close(conv.weight.grad, ref.conv2d_weight(x, conv.weight.shape, gy, padding=1), np.float32)
    with pytest.raises(ValueError, match="read-only"):
        conv.weight -= 0.1 * conv.weight.grad


def test_frozen_module_pickles_and_copies_frozen():
    import copy
    import pickle
    conv, x = _frozen_case()
    conv.freeze()
    with convgen.no_grad():
        y = conv(x)
        for twin in (pickle.loads(pickle.dumps(conv)), copy.deepcopy(conv)):
            assert twin.frozen and not twin.weight.flags.writeable and not twin.bias.flags.writeable
            np.testing.assert_array_equal(twin(x), y)
    conv.unfreeze()
    twin = pickle.loads(pickle.dumps(conv))
    assert not twin.frozen and twin.weight.flags.writeable


def test_frozen_backward_of_a_forward_before_freeze():
    """A backward whose forward ran before freeze() reads the weight that forward saw, and
    must leave the frozen module's packed weights alone: here that weight, no longer the
    module's, is changed after freeze() (by np.copyto, which its version does not count:
    an in-place operator would make the backward raise, as the second forward shows), and a
    later frozen backward still uses the frozen values."""
    conv = convgen.Conv2d(64, 64, 3, padding=1, seed=0)
    x = make_rng("freeze-before").standard_normal((1, 64, 32, 32)).astype(np.float32)
    gy = make_rng("freeze-before-gy").standard_normal((1, 64, 32, 32)).astype(np.float32)
    assert convgen._engine.backward_data_plan(conv._cfg.problem(x.shape, x.dtype)).cvec is not None
    weight = conv.weight
    conv(x)
    conv.freeze()
    np.copyto(weight, 2 * weight)   # (the array the saved forward holds)
    assert_close(conv.backward(gy), ref.conv2d_input(x.shape, weight, gy, padding=1), np.float32)
    conv.unfreeze()
    weight = conv.weight
    conv(x)
    conv.freeze()
    weight *= 2
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        conv.backward(gy)
    conv(x)
    assert_close(conv.backward(gy), ref.conv2d_input(x.shape, conv.weight, gy, padding=1), np.float32)


# ---- state_dict / load_state_dict, as torch.nn.Module's ----------------------

@pytest.mark.parametrize("c", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_state_dict_takes_a_torch_layers_weights(c, dtype):
    """A trained torch.nn.Conv2d's state_dict (tensors, float32) loaded into a module of
    either dtype: the module then computes torch's layer (forward and gradients)."""
    torch = need_torch()
    args, kw = c["args"], c.get("kw", {})
    theirs = torch.nn.Conv2d(*args, **kw)
    ours = convgen.Conv2d(*args, **kw, dtype=dtype, seed=1)
    result = ours.load_state_dict(theirs.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == [] and repr(result) == repr(
        theirs.load_state_dict(theirs.state_dict()))
    assert ours.weight.dtype == dtype and isinstance(ours.weight, convgen.Parameter)
    assert np.array_equal(ours.weight, theirs.weight.detach().numpy().astype(dtype))
    rng = make_rng(0)
    x = rng.standard_normal((2, args[0], 9, 8)).astype(dtype)
    y = ours(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = ours.backward(gy)
    want = torch_forward_backward(theirs.to(torch.float64), x.astype(np.float64), gy.astype(np.float64))
    for got, ref_value in zip((y, gx, ours.weight.grad, None if ours.bias is None else ours.bias.grad), want):
        if ref_value is not None:
            assert_close(got, ref_value, dtype)


def test_state_dict_like_torchs():
    """Keys, order, shared memory and keep_vars as torch's state_dict; the values load
    back into a torch.nn.Conv2d (through torch.from_numpy) and into another module."""
    torch = need_torch()
    ours = convgen.Conv2d(4, 6, 3, padding=1, groups=2, seed=3)
    sd = ours.state_dict()
    theirs = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert list(sd) == list(theirs.state_dict()) == ["weight", "bias"]
    assert all(type(v) is np.ndarray for v in sd.values())
    assert np.shares_memory(sd["weight"], ours.weight) and np.shares_memory(sd["bias"], ours.bias)
    assert ours.state_dict(keep_vars=True)["weight"] is ours.weight
    assert list(ours.state_dict(prefix="conv1.")) == ["conv1.weight", "conv1.bias"]
    assert [(n, p is getattr(ours, n)) for n, p in ours.named_parameters()] == [("weight", True), ("bias", True)]
    assert list(convgen.Conv2d(4, 6, 3, bias=False).state_dict()) == ["weight"]
    assert repr(theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})) == "<All keys matched successfully>"
    x = make_rng(1).standard_normal((1, 4, 7, 7)).astype(np.float32)
    assert_close(ours(x), theirs(torch.from_numpy(x)).detach().numpy(), np.float32)
    other = convgen.Conv2d(4, 6, 3, padding=1, groups=2, seed=4)
    other.load_state_dict(sd)
    assert np.array_equal(other(x), ours(x))
    assert not np.shares_memory(other.weight, ours.weight)   # (copied in, not shared)


def test_load_state_dict_errors_like_torchs_and_change_nothing():
    """Missing and unexpected keys (strict), shapes, and values that are no numbers raise
    RuntimeError with torch's words; nothing is copied then, not even the entries that
    were fine; strict=False loads what matches and returns what did not."""
    torch = need_torch()
    ours = convgen.Conv2d(3, 4, 3, seed=0)
    before, version = [np.array(p) for p in ours.parameters()], ours.weight._version
    theirs = torch.nn.Conv2d(3, 4, 3)
    cases = [
        ({"weight": theirs.weight}, ['Missing key(s) in state_dict: "bias". ']),
        ({**theirs.state_dict(), "running_mean": torch.zeros(4)}, ['Unexpected key(s) in state_dict: "running_mean". ']),
        ({"weight": theirs.weight, "bias": torch.zeros(5)},
         ["size mismatch for bias: copying a param with shape (5,) from checkpoint, the shape in current model is (4,)."]),
        ({"weight": theirs.weight, "bias": np.array(["a"] * 4)}, ['While copying the parameter named "bias"']),
        ({"weight": theirs.weight, "bias": np.zeros(4, np.complex64)}, ['While copying the parameter named "bias"']),
    ]
    for state, words in cases:
        with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict for Conv2d") as info:
            ours.load_state_dict(state)
        for w in words:
            assert w in str(info.value)
        for p, b in zip(ours.parameters(), before):
            assert np.array_equal(p, b)   # (the weight, which was fine, is not copied either)
        assert ours.weight._version == version
    expected = torch.nn.Conv2d(3, 4, 3).load_state_dict({"weight": theirs.weight, "extra": 1}, strict=False)
    result = ours.load_state_dict({"weight": theirs.weight, "extra": 1}, strict=False)
    assert result == (["bias"], ["extra"]) == tuple(expected)
    assert np.array_equal(ours.weight, theirs.weight.detach().numpy()) and np.array_equal(ours.bias, before[1])
    with pytest.raises(RuntimeError, match="size mismatch for weight"):   # (strict or not)
        ours.load_state_dict({"weight": np.zeros((4, 3, 2, 3))}, strict=False)
    with pytest.raises(TypeError, match="dict-like"):
        ours.load_state_dict([("weight", np.zeros((4, 3, 3, 3)))])


def test_load_state_dict_counts_as_a_change_in_place():
    """As torch's in-place copy bumps the version: a backward of a forward before the
    load raises; a frozen module's read-only parameters refuse it until unfreeze(); the
    caller's arrays are copied, not kept."""
    conv = convgen.Conv2d(2, 3, 3, padding=1, seed=0)
    x = make_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    y = conv(x)
    state = {"weight": np.ones((3, 2, 3, 3)), "bias": np.zeros(3)}
    conv.load_state_dict(state)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        conv.backward(np.ones_like(y))
    state["weight"][...] = 2   # (the module copied it)
    assert np.all(conv.weight == 1) and conv.weight.dtype == np.float32
    conv.freeze()
    with pytest.raises(RuntimeError, match="frozen.*unfreeze"):
        conv.load_state_dict(state)
    assert np.all(conv.weight == 1)
    conv.unfreeze().load_state_dict(state)
    assert np.all(conv.weight == 2)
    y = conv(x)
    assert_close(y, ref.conv2d(x, state["weight"], state["bias"], padding=1), np.float32)


# ---- computing only the gradients asked for -----------------------------------

@pytest.mark.parametrize("c", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("frozen", ["input", "weight", "bias", "weight+bias"])
def test_only_the_gradients_asked_for_like_torch(c, frozen):
    """backward(input_grad=False) and requires_grad=False on a parameter against torch's
    autograd with the same tensors not requiring grad: no input gradient (None), the
    parameter's .grad left as it was, the others torch's."""
    torch = need_torch()
    args, kw = c["args"], c.get("kw", {})
    ours = convgen.Conv2d(*args, **kw, dtype=np.float64, seed=2)
    theirs = torch_module(ours, torch)
    if ours.bias is None and "bias" in frozen and frozen != "weight+bias":
        pytest.skip("no bias")
    rng = make_rng(3)
    x = rng.standard_normal((2, args[0], 8, 9))
    for name in ("weight", "bias"):
        if name in frozen and getattr(ours, name) is not None:
            getattr(ours, name).requires_grad_(False)
            getattr(theirs, name).requires_grad_(False)
    earlier = np.full(ours.weight.shape, 7.0)
    ours.weight.grad = earlier
    with torch.no_grad():
        theirs.weight.grad = torch.from_numpy(earlier.copy())
    xt = torch.from_numpy(x).requires_grad_(frozen != "input")
    y = ours(x)
    yt = theirs(xt)
    gy = rng.standard_normal(y.shape)
    gx = ours.backward(gy, input_grad=frozen != "input")
    yt.backward(torch.from_numpy(gy))
    if frozen == "input":
        assert gx is None
    else:
        assert_close(gx, xt.grad.numpy(), np.float64)
    assert_close(ours.weight.grad, theirs.weight.grad.numpy(), np.float64)
    if "weight" in frozen:
        assert np.all(ours.weight.grad == 7.0)   # (left as it was)
    if ours.bias is not None:
        if theirs.bias.grad is None:
            assert ours.bias.grad is None
        else:
            assert_close(ours.bias.grad, theirs.bias.grad.numpy(), np.float64)


def test_requires_grad_is_kept():
    """requires_grad_ on the module and its parameters returns self, and the flag stays
    through freeze/unfreeze, pickling and load_state_dict (which keeps the parameters)."""
    import pickle
    conv = convgen.Conv2d(2, 3, 3)
    assert conv.weight.requires_grad and conv.bias.requires_grad
    assert conv.requires_grad_(False) is conv and not conv.weight.requires_grad and not conv.bias.requires_grad
    assert conv.weight.requires_grad_() is conv.weight and conv.weight.requires_grad
    for copy in (conv.freeze(), pickle.loads(pickle.dumps(conv)), conv.unfreeze()):
        assert copy.weight.requires_grad and not copy.bias.requires_grad
    conv.load_state_dict(conv.state_dict())
    assert conv.weight.requires_grad and not conv.bias.requires_grad
    assert convgen.Parameter(np.zeros(2)).requires_grad   # (a fresh parameter does)


def test_weight_gradient_alone_does_not_need_the_forwards_weight():
    """Without the input gradient a backward reads no weight, so a weight changed in
    place since the forward does not stop it; the weight gradient is the forward's
    input's (it never depends on the weight)."""
    conv = convgen.Conv2d(3, 4, 3, padding=1, seed=0)
    x = make_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    y = conv(x)
    conv.weight *= 2
    gy = np.ones_like(y)
    assert conv.backward(gy, input_grad=False) is None
    want = ref.conv2d_weight(x.astype(np.float64), conv.weight.shape, gy.astype(np.float64), padding=1)
    assert_close(conv.weight.grad, want, np.float32)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        conv.backward(gy)


@pytest.mark.parametrize("c", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_torch_is_the_same_layer(c, dtype):
    """Conv2d.from_torch: torch's configuration (repr included), dtype and a copy of its
    weights; the same forward."""
    torch = need_torch()
    args, kw = c["args"], c.get("kw", {})
    theirs = torch.nn.Conv2d(*args, **kw, dtype={np.float32: torch.float32, np.float64: torch.float64}[dtype])
    ours = convgen.Conv2d.from_torch(theirs)
    assert repr(ours) == repr(theirs) and ours.dtype == dtype
    assert np.array_equal(ours.weight, theirs.weight.detach().numpy())
    assert not np.shares_memory(ours.weight, theirs.weight.detach().numpy())
    x = make_rng(5).standard_normal((2, args[0], 9, 10)).astype(dtype)
    assert_close(ours(x), theirs(torch.from_numpy(x)).detach().numpy(), dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        convgen.Conv2d.from_torch(theirs.half())


def test_weight_frozen_at_the_forward_keeps_no_input_like_torch():
    """A weight that does not require grad at the forward gets no gradient from it, even
    if it asks for one before the backward (torch's graph is made at the forward); that
    forward keeps no copy of its input, and the input and bias gradients are the same."""
    torch = need_torch()
    ours = convgen.Conv2d(3, 4, 3, padding=1, dtype=np.float64, seed=0)
    theirs = torch_module(ours, torch)
    x = make_rng(0).standard_normal((2, 3, 7, 7))
    ours.weight.requires_grad_(False)
    theirs.weight.requires_grad_(False)
    y = ours(x)
    assert ours._saved.x is None
    xt = torch.from_numpy(x).requires_grad_()
    yt = theirs(xt)
    ours.weight.requires_grad_(True)
    theirs.weight.requires_grad_(True)
    gy = make_rng(1).standard_normal(y.shape)
    gx = ours.backward(gy)
    yt.backward(torch.from_numpy(gy))
    assert ours.weight.grad is None and theirs.weight.grad is None
    assert_close(gx, xt.grad.numpy(), np.float64)
    assert_close(ours.bias.grad, theirs.bias.grad.numpy(), np.float64)
    ours.zero_grad()
    ours(x)   # (a forward with the weight requiring grad again keeps its input)
    ours.backward(gy)
    assert_close(ours.weight.grad, ref.conv2d_weight(x, ours.weight.shape, gy, padding=1), np.float64)
