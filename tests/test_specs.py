"""Every generated kernel in codegen.table.SPECS: its representative problem
(codegen.cases.case_for) really dispatches to it, and it computes the same
numbers as the float64 NumPy reference and as PyTorch."""

import numpy as np
import pytest

import convgen
from codegen.cases import case_for
from codegen.table import SPECS
from conftest import (assert_close, case_arrays, conv_args, convgen_functional, make_rng,
                      reference_functional, spec_dtype, torch_functional)


# Channel counts that are multiples of nothing a register tile might use, so the
# tail rows of every tile variant run (dense: an RGB-like input; grouped: 5 -> 7
# per group; depthwise: channel multiplier 3).
# "wide": many output channels (not a multiple of any vector width) on a small
# feature map.  (tests/test_channel_tiles.py forces the channel-vectorised paths.)
VARIANTS = {
    "odd": {"dense": dict(C=3, OC=13, groups=1), "grouped": dict(C=10, OC=14, groups=2),
            "depthwise": dict(C=5, OC=15, groups=5)},
    "wide": {"dense": dict(C=5, OC=37, groups=1), "grouped": dict(C=6, OC=40, groups=2),
             "depthwise": dict(C=4, OC=36, groups=4)},
}


def _case(spec, variant):
    if variant in VARIANTS:
        case = case_for(spec)
        case.update(VARIANTS[variant][spec.groups])
        return case
    return case_for(spec, multiplier=int(variant[1:]))


def _spec_cases():
    params = []
    for spec in SPECS:
        variants = ["x1", "x2", "odd", "wide"] if spec.groups in ("depthwise", "grouped") else ["x1", "odd", "wide"]
        for v in variants:
            suffix = "" if v == "x1" else f"-{v}"
            params.append(pytest.param(spec, v, id=spec.name + suffix))
    return params


SPEC_CASES = _spec_cases()


def _dispatched(spec, case):
    return convgen.kernel_for(case["C"], case["OC"], case["kernel"], case["stride"], case["padding"],
                              case["dilation"], case["groups"], dtype=spec_dtype(spec),
                              direction=spec.direction)


def test_every_spec_has_a_case():
    # The parametrisation below covers the whole table, generic kernels included.
    assert len({p.values[0].name for p in SPEC_CASES}) == len(SPECS)
    assert any(s.is_generic for s in SPECS) and any(not s.is_generic for s in SPECS)


@pytest.mark.parametrize("spec, variant", SPEC_CASES)
def test_case_dispatches_to_spec(spec, variant):
    case = _case(spec, variant)
    assert _dispatched(spec, case) == spec.name


@pytest.mark.parametrize("spec, variant", SPEC_CASES)
def test_spec_matches_reference_and_torch(spec, variant):
    case = _case(spec, variant)
    assert _dispatched(spec, case) == spec.name
    dtype = spec_dtype(spec)
    rng = make_rng(spec.name, variant)
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    got = convgen_functional(spec.direction, x, w, b, gy, **args)
    expected = reference_functional(spec.direction, x, w, b, gy, **args)
    assert_close(got, expected, dtype, f"{spec.name} vs reference")
    expected_torch = torch_functional(spec.direction, x, w, b, gy, **args)
    assert_close(got, expected_torch, dtype, f"{spec.name} vs torch")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.direction == "fwd"], ids=lambda s: s.name)
def test_spec_module_round_trip(spec):
    """Conv2d.forward runs the spec's kernel, and its backward (which reuses the
    forward's padded input) agrees with the reference."""
    case = case_for(spec)
    dtype = spec_dtype(spec)
    conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], case["stride"], case["padding"],
                          case["dilation"], case["groups"], dtype=dtype, seed=0)
    assert conv.kernel_name == spec.name
    rng = make_rng("module", spec.name)
    x, _, _, gy = case_arrays(case, dtype, rng, bias=False)
    y = conv(x)
    args = conv_args(case)
    assert_close(y, reference_functional("fwd", x, conv.weight, conv.bias, None, **args), dtype, "y")
    gx = conv.backward(gy)
    assert_close(gx, reference_functional("bwd_data", x, conv.weight, None, gy, **args), dtype, "gx")
    assert_close(conv.weight.grad, reference_functional("bwd_weight", x, conv.weight, None, gy, **args),
                 dtype, "gw")
    assert_close(conv.bias.grad, gy.astype(np.float64).sum(axis=(0, 2, 3)), dtype, "gb")


# Kernels with a fixed kernel size but stride and/or dilation taken at run time
# serve every (stride, dilation) that no more specialised kernel claims: dispatch
# tries exact, then any dilation, then any stride and dilation, then generic.
PARTLY_FIXED = [s for s in SPECS if s.is_generic and s.kernel is not None]
STRIDE_DILATION = [(1, 1), (1, 2), (1, 6), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (4, 3)]


def _expected_kernel(direction, dtype, k, s, d, groups):
    keys = {sp.key: sp for sp in SPECS}
    for key in [(direction, dtype, k, s, d, groups), (direction, dtype, k, s, None, groups),
                (direction, dtype, k, None, None, groups), (direction, dtype, None, None, None, groups)]:
        if key in keys:
            return keys[key]
    raise AssertionError("no generic fallback")


def _partly_fixed_cases():
    params = []
    for spec in PARTLY_FIXED:
        for s, d in STRIDE_DILATION:
            if _expected_kernel(spec.direction, spec.dtype, spec.kernel, s, d, spec.groups) == spec:
                params.append(pytest.param(spec, s, d, id=f"{spec.name}-s{s}-d{d}"))
    return params


@pytest.mark.parametrize("spec, stride, dilation", _partly_fixed_cases())
def test_partly_fixed_spec_any_stride_dilation(spec, stride, dilation):
    case = case_for(spec)
    k = spec.kernel
    case.update(stride=(stride, stride), dilation=(dilation, dilation),
                padding=(dilation * (k - 1) // 2, dilation * (k - 1) // 2), H=13, W=11)
    assert _dispatched(spec, case) == spec.name
    dtype = spec_dtype(spec)
    x, w, b, gy = case_arrays(case, dtype, make_rng("partly", spec.name, stride, dilation))
    args = conv_args(case)
    got = convgen_functional(spec.direction, x, w, b, gy, **args)
    assert_close(got, reference_functional(spec.direction, x, w, b, gy, **args), dtype, spec.name)
