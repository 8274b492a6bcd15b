"""Argument checking, done once in Python so that kernels can assume valid,
C-contiguous input.  Errors name what was wrong and what was expected."""

import numbers

import numpy as np

PADDING_STRINGS = ("same", "valid")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(value, name, minimum):
    """An int or a pair of ints -> (h, w), each >= minimum."""
    if _is_int(value):
        result = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(result) < minimum:
        what = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return result


def padding_arg(padding):
    """'same', 'valid', an int or a pair (non-negative)."""
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"Invalid padding string {padding!r}, should be one of {list(PADDING_STRINGS)}")
        return padding
    return pair(padding, "padding", 0)


def resolve_padding(padding, kernel, stride, dilation):
    """(top, bottom, left, right).  'same' follows PyTorch: total dilation*(k-1),
    top/left get total // 2 and the odd one goes bottom/right."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    return (padding[0], padding[0], padding[1], padding[1])


def padding_mode_arg(mode):
    if not isinstance(mode, str) or mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {list(PADDING_MODES)}, got {mode!r}")
    return mode


def groups_arg(groups, in_channels, out_channels):
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if in_channels % groups:
        raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
    if out_channels % groups:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    return int(groups)


def channels_arg(value, name):
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def dtype_arg(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def float_array(a, name, dtype=None):
    """a as a float32/float64 ndarray (no copy when it already is one)."""
    if not isinstance(a, np.ndarray):
        if hasattr(a, "__array__") or isinstance(a, (list, tuple)):
            a = np.asarray(a)
        else:
            raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the weight has dtype {dtype}; "
                        f"convert one of them (e.g. x.astype(np.{dtype}))")
    return a


def input_array(x, in_channels, dtype, name="input"):
    """x as a C-contiguous (N, C, H, W) array, and whether it was batched."""
    x = float_array(x, name, dtype)
    if x.ndim not in (3, 4):
        raise ValueError(f"Expected 3D (unbatched) or 4D (batched) {name} to conv2d, "
                         f"but got {name} of shape {x.shape}")
    batched = x.ndim == 4
    if not batched:
        x = x[None]
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} has {x.shape[1]} channels (shape {x.shape}), "
                         f"but the convolution expects {in_channels}")
    if 0 in x.shape[1:]:
        raise ValueError(f"{name} of shape {x.shape} has a zero-size dimension; only the batch may be empty")
    return np.ascontiguousarray(x), batched


def check_padded_size(hw, pads, kernel, dilation, padding_mode):
    """The (dilated) kernel must fit in the padded input; reflect/circular need
    enough input to copy from."""
    H, W = hw
    top, bottom, left, right = pads
    if padding_mode == "reflect" and (max(top, bottom) >= H or max(left, right) >= W):
        raise ValueError(f"reflect padding {pads} (top, bottom, left, right) must be smaller than "
                         f"the input size {(H, W)}")
    if padding_mode == "circular" and (max(top, bottom) > H or max(left, right) > W):
        raise ValueError(f"circular padding {pads} (top, bottom, left, right) must not exceed "
                         f"the input size {(H, W)}")
    eff = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    padded = (H + top + bottom, W + left + right)
    if eff[0] > padded[0] or eff[1] > padded[1]:
        raise ValueError(f"the kernel (size {tuple(kernel)}, dilation {tuple(dilation)}, so {eff} "
                         f"in effect) is larger than the padded input {padded}")

