"""Shared pieces of the test suite: the one per-dtype tolerance table, random
problems, and PyTorch as an oracle (a test-only dependency: tests that need it
skip without it)."""

import os
import zlib

import numpy as np
import pytest

import convgen

# The tests check the kernels this build holds: codegen's spec table (imported by the test
# modules, after this) is made for the build's target, not for whatever the compiler
# would pick now (a CONVGEN_PORTABLE=1 build tested without that setting had the AVX2
# table set against its baseline kernels).
os.environ["CONVGEN_TARGET"] = convgen._dispatch.TARGET

from codegen.spec import NUMPY_DTYPES  # noqa: E402
from convgen import _reference as ref  # noqa: E402

# The one tolerance table.  `tol` is relative; the absolute part is `tol` times
# the largest magnitude in the expected array, so a kernel summing many terms
# of a random problem is held to the precision of its dtype, while an
# off-by-one (a missing or extra tap, a shifted row) is off by O(1).
TOLERANCES = {
    np.dtype(np.float32): dict(tol=2e-5),    # ~ 170 ulp: float32 sums of a few hundred terms
    np.dtype(np.float64): dict(tol=1e-12),
}
DTYPES = [np.float32, np.float64]
# Whether this build's tiles are the AVX-512 ones (codegen.target) that the path tests'
# shapes were chosen for: 16-lane blocks of channels, 14-pixel channel-vector tiles.  Where
# a test's assertion that its path ran is pinned to those shapes, other targets (AVX2)
# skip that assertion and still check the results.
PINNED_GEOMETRY = convgen._dispatch.TARGET == "avx512"
# ... and whether it is a build for machines without AVX (CONVGEN_PORTABLE=1: 16-byte
# vectors), whose tiles take other paths again on some of the shapes AVX2's share.
BASELINE_BUILD = convgen._dispatch.TARGET == "baseline"
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
TORCH_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def tolerance(dtype):
    return TOLERANCES[np.dtype(dtype)]["tol"]


def assert_close(actual, expected, dtype=None, what=""):
    """actual (a convgen result) against expected, within dtype's tolerance;
    shapes must match exactly and the result must have the expected dtype."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(dtype if dtype is not None else actual.dtype)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    if expected.size == 0:
        return
    tol = tolerance(dtype)
    # (scaled by the finite values: an infinity would make any finite value pass)
    scale = max(1.0, float(np.max(np.abs(expected), where=np.isfinite(expected), initial=0.0)))
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               rtol=tol, atol=tol * scale, err_msg=what)


def spec_dtype(spec):
    return np.dtype(NUMPY_DTYPES[spec.dtype])


def make_rng(*key):
    """A generator seeded from a test's parameters, so each test is reproducible."""
    seed = zlib.crc32(repr(key).encode())  # stable across runs, unlike hash()
    return np.random.default_rng(seed)


@pytest.fixture
def rng(request):
    return make_rng(request.node.nodeid)


def random_problem(rng, N, C, H, W, OC, kernel, groups, dtype, bias=True):
    """(x, weight, bias) with standard-normal entries in dtype."""
    kh, kw = ref._pair(kernel)
    dtype = np.dtype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((OC, C // groups, kh, kw)).astype(dtype)
    b = rng.standard_normal(OC).astype(dtype) if bias else None
    return x, w, b


def case_arrays(case, dtype, rng, bias=True, N=None):
    """Random x, weight, bias and grad_output for a codegen.cases.case_for dict."""
    x, w, b = random_problem(rng, case["N"] if N is None else N, case["C"], case["H"], case["W"],
                             case["OC"], case["kernel"], case["groups"], dtype, bias)
    pads = ref.pads_for(case["padding"], case["kernel"], case["dilation"])
    oh, ow = ref.output_hw((case["H"], case["W"]), case["kernel"], case["stride"], pads, case["dilation"])
    gy = rng.standard_normal((x.shape[0], case["OC"], oh, ow)).astype(dtype)
    return x, w, b, gy


def conv_args(case):
    """The (stride, padding, dilation, groups) keyword arguments of a case."""
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"])


# ---- PyTorch as the oracle --------------------------------------------------

def need_torch():
    return pytest.importorskip("torch")


def torch_dtype(dtype):
    torch = need_torch()
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def torch_module(conv, torch=None):
    """A torch.nn.Conv2d with conv's configuration and (copied) parameters."""
    torch = torch or need_torch()
    m = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                        conv.padding_mode, dtype=torch_dtype(conv.dtype))
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.array(conv.weight)))
        if conv.bias is not None:
            m.bias.copy_(torch.from_numpy(np.array(conv.bias)))
    return m


def torch_forward_backward(module, x, gy):
    """Run a torch module forward and backward; (y, gx, gw, gb) as NumPy arrays
    (gb None without bias).  Gradients accumulate into module's .grad like torch does."""
    torch = need_torch()
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    y = module(xt)
    y.backward(torch.from_numpy(np.array(gy)))
    gb = module.bias.grad.numpy().copy() if module.bias is not None else None
    return y.detach().numpy(), xt.grad.numpy(), module.weight.grad.numpy().copy(), gb


def torch_functional(direction, x, w, b, gy, stride, padding, dilation, groups):
    """torch.nn.functional.conv2d / torch.nn.grad.conv2d_input / conv2d_weight."""
    torch = need_torch()
    t = lambda a: None if a is None else torch.from_numpy(np.array(a))  # noqa: E731
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if direction == "fwd":
        return torch.nn.functional.conv2d(t(x), t(w), t(b), **kw).numpy()
    if isinstance(padding, str):
        # torch.nn.grad takes no 'same'/'valid': differentiate torch's conv2d instead.
        xt, wt = t(x).requires_grad_(True), t(w).requires_grad_(True)
        torch.nn.functional.conv2d(xt, wt, **kw).backward(t(gy))
        return (xt if direction == "bwd_data" else wt).grad.numpy()
    if direction == "bwd_data":
        return torch.nn.grad.conv2d_input(x.shape, t(w), t(gy), **kw).numpy()
    if direction == "bwd_weight":
        return torch.nn.grad.conv2d_weight(t(x), w.shape, t(gy), **kw).numpy()
    raise ValueError(direction)


def convgen_functional(direction, x, w, b, gy, stride, padding, dilation, groups):
    F = convgen.functional
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if direction == "fwd":
        return F.conv2d(x, w, b, **kw)
    if direction == "bwd_data":
        return F.conv2d_input(x.shape, w, gy, **kw)
    if direction == "bwd_weight":
        return F.conv2d_weight(x, w.shape, gy, **kw)
    raise ValueError(direction)


def reference_functional(direction, x, w, b, gy, stride, padding, dilation, groups, padding_mode="zeros"):
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    if direction == "fwd":
        return ref.conv2d(x, w, b, **kw)
    if direction == "bwd_data":
        return ref.conv2d_input(x.shape, w, gy, **kw)
    if direction == "bwd_weight":
        return ref.conv2d_weight(x, w.shape, gy, **kw)
    raise ValueError(direction)


@pytest.fixture
def restore_threads():
    """Put the thread count back after a test that changes it."""
    before = convgen.get_num_threads()
    yield before
    convgen.set_num_threads(before)


def pytest_configure(config):
    # PyTorch (the oracle) warns that it copies the input for an even 'same' kernel; that is fine here.
    config.addinivalue_line("filterwarnings",
                            "ignore:Using padding='same' with even kernel lengths:UserWarning")
