"""Bad input gets a clear ValueError or TypeError naming the problem: never a
crash, never a silently wrong result.  Each case also checks that a valid
neighbour of the bad input works, so the error is about that input."""

import numpy as np
import pytest

import convgen

F = convgen.functional
X = np.zeros((2, 4, 6, 6), np.float32)
W = np.zeros((6, 4, 3, 3), np.float32)


# ---- construction ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), ValueError, "divisible by groups"),
    (dict(in_channels=5, out_channels=6, kernel_size=3, groups=2), ValueError, "divisible by groups"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=0), ValueError, "groups"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=-2), ValueError, "groups"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=1.0), TypeError, "groups"),
    (dict(in_channels=0, out_channels=6, kernel_size=3), ValueError, "in_channels"),
    (dict(in_channels=4, out_channels=-1, kernel_size=3), ValueError, "out_channels"),
    (dict(in_channels=4.0, out_channels=6, kernel_size=3), TypeError, "in_channels"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding="same"), ValueError, "same"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=(1, 2), padding="same"), ValueError, "same"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding="full"), ValueError, "padding"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding="SAME"), ValueError, "padding"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding_mode="symmetric"), ValueError, "padding_mode"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding_mode="constant"), ValueError, "padding_mode"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding_mode=None), ValueError, "padding_mode"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=-1), ValueError, "padding"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=(1, -1)), ValueError, "padding"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=0), ValueError, "stride"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=(1, -1)), ValueError, "stride"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, dilation=0), ValueError, "dilation"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, dilation=(-2, 1)), ValueError, "dilation"),
    (dict(in_channels=4, out_channels=6, kernel_size=0), ValueError, "kernel_size"),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
    (dict(in_channels=4, out_channels=6, kernel_size=2.5), TypeError, "kernel_size"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=None), TypeError, "stride"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, dtype=np.int32), TypeError, "dtype"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, dtype=np.float16), TypeError, "dtype"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, dtype="complex128"), TypeError, "dtype"),
])
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convgen.Conv2d(**kwargs)


def test_good_neighbours_construct():
    convgen.Conv2d(4, 6, 3, groups=2)
    convgen.Conv2d(4, 8, 3, groups=4)
    convgen.Conv2d(4, 6, 3, padding="same", stride=1)
    convgen.Conv2d(4, 6, 3, padding=0, padding_mode="circular", dtype="float64")


# ---- calling -----------------------------------------------------------------------

def test_wrong_channel_count():
    conv = convgen.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="channels"):
        conv(np.zeros((2, 3, 6, 6), np.float32))
    with pytest.raises(ValueError, match="channels"):
        conv(np.zeros((5, 6, 6), np.float32))
    with pytest.raises(ValueError, match="channels"):
        F.conv2d(np.zeros((2, 3, 6, 6), np.float32), W)
    with pytest.raises(ValueError, match="channels"):
        F.conv2d(X, W, groups=2)          # weight (6, 4) with groups 2 expects 8 channels
    with pytest.raises(ValueError, match="channels"):
        F.conv2d_input((2, 5, 6, 6), W, np.zeros((2, 6, 4, 4), np.float32))
    with pytest.raises(ValueError, match="channels"):
        F.conv2d_weight(np.zeros((2, 5, 6, 6), np.float32), W.shape, np.zeros((2, 6, 4, 4), np.float32))
    assert conv(X).shape == (2, 6, 4, 4)


@pytest.mark.parametrize("shape", [(6, 6), (4,), (), (1, 2, 4, 6, 6)])
def test_wrong_rank(shape):
    conv = convgen.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="3D|4D"):
        conv(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="3D|4D"):
        F.conv2d(np.zeros(shape, np.float32), W)


def test_weight_and_bias_shapes():
    with pytest.raises(ValueError, match="weight"):
        F.conv2d(X, W[0])
    with pytest.raises(ValueError, match="bias"):
        F.conv2d(X, W, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="bias"):
        F.conv2d(X, W, np.zeros((6, 1), np.float32))
    with pytest.raises(ValueError, match="weight"):
        F.conv2d(X, np.zeros((0, 4, 3, 3), np.float32))
    conv = convgen.Conv2d(4, 6, 3)
    conv.weight = np.zeros((6, 4, 2, 2), np.float32)   # not the configured kernel size
    with pytest.raises(ValueError, match="weight"):
        conv(X)


@pytest.mark.parametrize("groups", [0, -1, 3, 1.5, None])
def test_functional_bad_groups(groups):
    with pytest.raises((ValueError, TypeError), match="groups"):
        F.conv2d(X, W, groups=groups)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stride=2, padding="same"), "same"),
    (dict(padding="full"), "padding"),
    (dict(padding=-1), "padding"),
    (dict(stride=0), "stride"),
    (dict(dilation=(1, 0)), "dilation"),
])
def test_functional_bad_arguments(kwargs, match):
    gy = np.zeros((2, 6, 4, 4), np.float32)
    with pytest.raises(ValueError, match=match):
        F.conv2d(X, W, **kwargs)
    with pytest.raises(ValueError, match=match):
        F.conv2d_input(X.shape, W, gy, **kwargs)
    with pytest.raises(ValueError, match=match):
        F.conv2d_weight(X, W.shape, gy, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(stride=1.0), TypeError, "stride"),
    (dict(stride=True), TypeError, "stride"),
    (dict(padding=(1, 1.0)), TypeError, "padding"),
    (dict(groups=True), ValueError, "groups"),
    (dict(dilation=np.array([1, 1])), TypeError, "dilation"),
])
def test_functional_remembered_arguments_still_checked(kwargs, exc, match):
    """Functional calls remember their validated arguments (functional._config_for); an
    argument equal to a remembered one but of another type is still checked."""
    F.conv2d(X, W, stride=1, padding=(1, 1), dilation=(1, 1), groups=1)
    F.conv2d(X, W, stride=[1, 1], padding=1)   # lists: remembered as tuples of their items
    with pytest.raises(exc, match=match):
        F.conv2d(X, W, **{**dict(stride=1, padding=(1, 1), dilation=(1, 1), groups=1), **kwargs})


@pytest.mark.parametrize("hw, kernel, padding, dilation", [
    ((2, 6), 3, 0, 1), ((6, 2), 3, 0, 1), ((4, 4), 7, 1, 1), ((5, 5), 3, 0, 3), ((1, 1), 2, 0, 1),
])
def test_kernel_larger_than_padded_input(hw, kernel, padding, dilation):
    conv = convgen.Conv2d(1, 1, kernel, padding=padding, dilation=dilation)
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv(np.zeros((1, 1) + hw, np.float32))
    w = np.zeros((1, 1, kernel, kernel), np.float32)
    with pytest.raises(ValueError, match="larger than the padded input"):
        F.conv2d(np.zeros((1, 1) + hw, np.float32), w, padding=padding, dilation=dilation)
    with pytest.raises(ValueError, match="larger"):
        F.conv2d_input((1, 1) + hw, w, np.zeros((1, 1, 1, 1), np.float32), padding=padding, dilation=dilation)
    # One more pixel of padding each side (when that is enough) and it runs.
    extra = (dilation * (kernel - 1) + 1 - min(hw) + 1) // 2
    ok = convgen.Conv2d(1, 1, kernel, padding=padding + extra, dilation=dilation)
    assert ok(np.zeros((1, 1) + hw, np.float32)).shape[2:] >= (1, 1)


def test_reflect_padding_must_be_smaller_than_input():
    x = np.zeros((1, 1, 3, 5), np.float32)
    with pytest.raises(ValueError, match="reflect"):
        convgen.Conv2d(1, 1, 3, padding=3, padding_mode="reflect")(x)
    with pytest.raises(ValueError, match="reflect"):
        convgen.Conv2d(1, 1, 3, padding=(0, 5), padding_mode="reflect")(x)
    assert convgen.Conv2d(1, 1, 3, padding=(2, 4), padding_mode="reflect")(x).shape == (1, 1, 5, 11)
    with pytest.raises(ValueError, match="reflect"):   # 'same' 7x1 on 3 rows needs 3 rows of reflection
        convgen.Conv2d(1, 1, (7, 1), padding="same", padding_mode="reflect")(x)


def test_circular_padding_must_not_exceed_input():
    x = np.zeros((1, 1, 3, 5), np.float32)
    with pytest.raises(ValueError, match="circular"):
        convgen.Conv2d(1, 1, 3, padding=4, padding_mode="circular")(x)
    with pytest.raises(ValueError, match="circular"):
        convgen.Conv2d(1, 1, 3, padding=(0, 6), padding_mode="circular")(x)
    assert convgen.Conv2d(1, 1, 3, padding=(3, 5), padding_mode="circular")(x).shape == (1, 1, 7, 13)
    # zeros and replicate have no such limit
    assert convgen.Conv2d(1, 1, 3, padding=9, padding_mode="replicate")(x).shape == (1, 1, 19, 21)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.complex128, object,
                                   np.float16, np.uint8])
def test_bad_input_dtype(dtype):
    conv = convgen.Conv2d(4, 6, 3)
    x = np.zeros((2, 4, 6, 6), dtype)
    with pytest.raises(TypeError, match="dtype"):
        conv(x)
    with pytest.raises(TypeError, match="dtype"):
        F.conv2d(x, W)
    with pytest.raises(TypeError, match="dtype"):
        F.conv2d(X, W.astype(dtype))
    with pytest.raises(TypeError, match="dtype"):
        F.conv2d_weight(x, W.shape, np.zeros((2, 6, 4, 4), np.float32))


def test_non_array_input():
    conv = convgen.Conv2d(4, 6, 3)
    with pytest.raises(TypeError):
        conv("an image")
    with pytest.raises(TypeError):
        conv(None)
    with pytest.raises(TypeError):
        F.conv2d(X, None)


def test_mixed_dtypes():
    conv = convgen.Conv2d(4, 6, 3, dtype=np.float32)
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64"):
        conv(X.astype(np.float64))
    with pytest.raises(TypeError, match="dtype"):
        F.conv2d(X.astype(np.float64), W)
    with pytest.raises(TypeError, match="dtype"):
        F.conv2d(X, W, np.zeros(6, np.float64))
    with pytest.raises(TypeError, match="dtype"):
        F.conv2d_input(X.shape, W, np.zeros((2, 6, 4, 4), np.float64))


@pytest.mark.parametrize("shape", [(2, 4, 0, 6), (2, 4, 6, 0), (4, 0, 6), (1, 0, 6, 6)])
def test_zero_size_non_batch_dims(shape):
    in_c = shape[-3] if shape[-3] else 4
    conv = convgen.Conv2d(in_c, 6, 1)
    with pytest.raises(ValueError):
        conv(np.zeros(shape, np.float32))
    with pytest.raises(ValueError):
        F.conv2d(np.zeros(shape, np.float32), np.zeros((6, in_c, 1, 1), np.float32))


def test_backward_before_forward():
    conv = convgen.Conv2d(4, 6, 3)
    with pytest.raises(RuntimeError, match="forward"):
        conv.backward(np.zeros((2, 6, 4, 4), np.float32))
    assert conv.weight.grad is None


def test_bad_grad_output():
    conv = convgen.Conv2d(4, 6, 3)
    y = conv(X)
    for shape in [(2, 6, 4, 5), (2, 6, 4), (1, 6, 4, 4), (2, 5, 4, 4), (6, 4, 4)]:
        with pytest.raises(ValueError, match="shape"):
            conv.backward(np.zeros(shape, np.float32))
    with pytest.raises(TypeError, match="dtype"):
        conv.backward(np.zeros(y.shape, np.float64))
    with pytest.raises(TypeError, match="dtype"):
        conv.backward(np.zeros(y.shape, np.int32))
    with pytest.raises(ValueError, match="shape"):
        F.conv2d_input(X.shape, W, np.zeros((2, 6, 3, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        F.conv2d_weight(X, W.shape, np.zeros((2, 6, 5, 4), np.float32))
    assert conv.weight.grad is None   # nothing accumulated by the failed calls
    conv.backward(np.zeros(y.shape, np.float32))
    assert conv.weight.grad is not None


def test_unbatched_module_grad_output_rank():
    conv = convgen.Conv2d(4, 6, 3)
    y = conv(X[0])
    assert y.shape == (6, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        conv.backward(np.zeros((1,) + y.shape, np.float32))


def test_failed_call_leaves_module_usable():
    conv = convgen.Conv2d(4, 6, 3, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5))
    y = conv(x)
    with pytest.raises(ValueError):
        conv(np.zeros((1, 3, 5, 5)))
    # backward still refers to the last successful forward
    assert conv.backward(np.ones_like(y)).shape == x.shape


@pytest.mark.parametrize("bad", [(0, 5), (5, -1), "big", (3, 3, 3), 0])
def test_output_size_errors(bad):
    with pytest.raises((ValueError, TypeError)):
        convgen.output_size(bad, 3)


def test_kernel_for_errors():
    with pytest.raises(ValueError, match="direction"):
        convgen.kernel_for(4, 6, 3, direction="backward")
    with pytest.raises(ValueError):
        convgen.kernel_for(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="same"):
        convgen.kernel_for(4, 6, 3, stride=2, padding="same")


@pytest.mark.parametrize("dtype", [np.int64, np.float16, "complex64"])
def test_kernel_for_bad_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        convgen.kernel_for(4, 6, 3, dtype=dtype)
