"""convgen.init, as torch.nn.init: in place, same gains and fans, same
distributions (checked by bounds and statistics), reproducible with seed=."""

import math

import numpy as np
import pytest

import convgen
from convgen import init

SHAPE = (128, 32, 3, 3)          # fan_in 288, fan_out 1152; 36864 entries
FAN_IN, FAN_OUT = 32 * 9, 128 * 9

RANDOM = {
    "uniform_": dict(kw=dict(a=-0.5, b=2.0)),
    "normal_": dict(kw=dict(mean=1.5, std=0.25)),
    "xavier_uniform_": dict(kw=dict(gain=2.0)),
    "xavier_normal_": dict(kw=dict(gain=0.5)),
    "kaiming_uniform_": dict(kw=dict(a=math.sqrt(5))),
    "kaiming_normal_": dict(kw=dict(mode="fan_out", nonlinearity="relu")),
}


@pytest.mark.parametrize("name", list(RANDOM))
def test_in_place_and_returns_array(name):
    a = np.zeros(SHAPE, np.float32)
    out = getattr(init, name)(a, **RANDOM[name]["kw"], seed=0)
    assert out is a and a.dtype == np.float32 and np.any(a != 0)
    p = convgen.Parameter(np.zeros((4, 3, 2, 2)))
    out = getattr(init, name)(p, **RANDOM[name]["kw"], seed=0)
    assert out is p and isinstance(p, convgen.Parameter) and np.any(p != 0)


@pytest.mark.parametrize("name", list(RANDOM))
def test_seed_reproducible(name):
    fn = getattr(init, name)
    kw = RANDOM[name]["kw"]
    a, b, c = (np.empty((8, 4, 3, 3)) for _ in range(3))
    fn(a, **kw, seed=11)
    fn(b, **kw, seed=11)
    fn(c, **kw, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    fn(a, **kw, seed=np.random.default_rng(4))
    fn(b, **kw, seed=np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    fn(a, **kw)
    fn(b, **kw)
    assert not np.array_equal(a, b)    # no seed: fresh entropy


@pytest.mark.parametrize("name", list(RANDOM))
def test_statistics_like_torch(name):
    torch = pytest.importorskip("torch")
    kw = RANDOM[name]["kw"]
    ours = getattr(init, name)(np.empty(SHAPE), **kw, seed=0)
    theirs = getattr(torch.nn.init, name)(torch.empty(SHAPE, dtype=torch.float64), **kw).numpy()
    assert abs(ours.mean() - theirs.mean()) < 0.03 * theirs.std() + 1e-12
    assert abs(ours.std() / theirs.std() - 1) < 0.03
    if name.endswith("uniform_"):
        assert abs(ours.min() / theirs.min() - 1) < 0.01 and abs(ours.max() / theirs.max() - 1) < 0.01


@pytest.mark.parametrize("kw, expected_bound", [
    (dict(), math.sqrt(3) * math.sqrt(2) / math.sqrt(FAN_IN)),                        # leaky_relu, a=0
    (dict(a=math.sqrt(5)), 1 / math.sqrt(FAN_IN)),                                    # Conv2d's default
    (dict(mode="fan_out", nonlinearity="relu"), math.sqrt(3) * math.sqrt(2) / math.sqrt(FAN_OUT)),
    (dict(nonlinearity="tanh"), math.sqrt(3) * 5 / 3 / math.sqrt(FAN_IN)),
    (dict(nonlinearity="linear"), math.sqrt(3) / math.sqrt(FAN_IN)),
])
def test_kaiming_uniform_bound(kw, expected_bound):
    a = init.kaiming_uniform_(np.empty(SHAPE), **kw, seed=1)
    assert np.abs(a).max() <= expected_bound
    assert np.abs(a).max() > 0.999 * expected_bound
    assert abs(a.std() - expected_bound / math.sqrt(3)) < 0.02 * expected_bound


def test_other_bounds_and_stds():
    a = init.xavier_uniform_(np.empty(SHAPE), gain=3.0, seed=2)
    bound = 3.0 * math.sqrt(6 / (FAN_IN + FAN_OUT))
    assert bound * 0.999 < np.abs(a).max() <= bound
    a = init.xavier_normal_(np.empty(SHAPE), seed=2)
    assert abs(a.std() / math.sqrt(2 / (FAN_IN + FAN_OUT)) - 1) < 0.02
    a = init.kaiming_normal_(np.empty(SHAPE), a=0.2, seed=2)
    assert abs(a.std() / (math.sqrt(2 / 1.04) / math.sqrt(FAN_IN)) - 1) < 0.02
    a = init.uniform_(np.empty(SHAPE), seed=3)            # torch's default range [0, 1)
    assert 0 <= a.min() < 0.001 and 0.999 < a.max() < 1
    a = init.normal_(np.empty(SHAPE), seed=3)             # standard normal by default
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02


def test_constant_zeros_ones():
    a = np.full((3, 2, 2, 2), 7.0, np.float32)
    assert init.zeros_(a) is a and not a.any()
    assert init.ones_(a) is a and np.all(a == 1)
    assert init.constant_(a, -2.5) is a and np.all(a == -2.5) and a.dtype == np.float32
    p = convgen.Parameter(np.zeros(5))
    init.constant_(p, 3)
    assert isinstance(p, convgen.Parameter) and np.all(p == 3)


GAINS = [("linear", None), ("conv2d", None), ("sigmoid", None), ("tanh", None), ("relu", None),
         ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 0), ("selu", None), ("conv_transpose2d", None)]


@pytest.mark.parametrize("nonlinearity, param", GAINS)
def test_calculate_gain_like_torch(nonlinearity, param):
    torch = pytest.importorskip("torch")
    assert init.calculate_gain(nonlinearity, param) == pytest.approx(
        torch.nn.init.calculate_gain(nonlinearity, param), rel=1e-12)


def test_init_errors():
    with pytest.raises(ValueError):
        init.calculate_gain("softmax")
    with pytest.raises(ValueError):
        init.kaiming_uniform_(np.empty((3, 3)), mode="fan_avg")
    with pytest.raises(ValueError):
        init.xavier_uniform_(np.empty(5))          # fans need 2 dimensions
