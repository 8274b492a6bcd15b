"""In-place initialisers, as torch.nn.init: each fills its array and returns it.

The random ones take ``seed=``: an int, an ``np.random.Generator``, or None (fresh
entropy).  Fans follow PyTorch: fan_in = in_channels/groups * kH * kW and
fan_out = out_channels * kH * kW for a conv weight of shape (out, in/groups, kH, kW).
"""

import math

import numpy as np

__all__ = ["calculate_gain", "uniform_", "normal_", "constant_", "zeros_", "ones_",
           "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_"]


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _fill(array, values):
    array[...] = values
    return array


def _fans(array):
    if array.ndim < 2:
        raise ValueError("fan in and fan out can not be computed for an array with fewer than 2 dimensions")
    receptive = int(np.prod(array.shape[2:])) if array.ndim > 2 else 1
    return array.shape[1] * receptive, array.shape[0] * receptive


def calculate_gain(nonlinearity, param=None):
    """Recommended gain for a nonlinearity (same table as torch.nn.init.calculate_gain)."""
    linear = ["linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "sigmoid"]
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise ValueError(f"negative_slope {slope} not a valid number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def uniform_(array, a=0.0, b=1.0, seed=None):
    return _fill(array, _rng(seed).uniform(a, b, size=array.shape))


def normal_(array, mean=0.0, std=1.0, seed=None):
    return _fill(array, _rng(seed).normal(mean, std, size=array.shape))


def constant_(array, val):
    return _fill(array, val)


def zeros_(array):
    return _fill(array, 0)


def ones_(array):
    return _fill(array, 1)


def xavier_uniform_(array, gain=1.0, seed=None):
    fan_in, fan_out = _fans(array)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(array, -bound, bound, seed=seed)


def xavier_normal_(array, gain=1.0, seed=None):
    fan_in, fan_out = _fans(array)
    return normal_(array, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), seed=seed)


def _kaiming_std(array, a, mode, nonlinearity):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of fan_in, fan_out")
    fan_in, fan_out = _fans(array)
    fan = fan_in if mode == "fan_in" else fan_out
    if fan == 0:
        raise ValueError("Initializing zero-element arrays is a no-op")
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", seed=None):
    bound = math.sqrt(3.0) * _kaiming_std(array, a, mode, nonlinearity)
    return uniform_(array, -bound, bound, seed=seed)


def kaiming_normal_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", seed=None):
    return normal_(array, 0.0, _kaiming_std(array, a, mode, nonlinearity), seed=seed)
