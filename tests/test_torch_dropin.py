"""convgen.torch.Conv2d against torch.nn.Conv2d: same numbers forward and backward,
same autograd behaviour, and tensors that share memory with the kernels' arrays."""

import copy
import io
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.utils.prune as prune  # noqa: E402
import convgen.torch as cgt  # noqa: E402
from convgen.torch import Conv2d  # noqa: E402
from convgen import _engine  # noqa: E402
from conftest import PINNED_GEOMETRY  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def close(actual, expected, what=""):
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    tol = TOL[expected.dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=what)


def pair(*args, dtype=torch.float32, **kwargs):
    """(convgen drop-in, torch.nn.Conv2d) with the same weights."""
    torch.manual_seed(0)
    ours = Conv2d(*args, dtype=dtype, **kwargs)
    ref = torch.nn.Conv2d(*args, dtype=dtype, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


class Spy:
    """Records the arrays convgen.functional.forward / backward see and return."""

    def __init__(self, monkeypatch):
        self.forward, self.backward = [], []
        fwd, bwd = cgt._F.forward, cgt._F.backward

        def forward(cfg, x, weight, bias, keep_input=True, input_guarded=False):
            y, saved = fwd(cfg, x, weight, bias, keep_input=keep_input, input_guarded=input_guarded)
            self.forward.append(dict(cfg=cfg, x=x, weight=weight, bias=bias, y=y, saved=saved,
                                     keep_input=keep_input, input_guarded=input_guarded))
            return y, saved

        def backward(saved, gy, need_input, need_weight, need_bias):
            out = bwd(saved, gy, need_input, need_weight, need_bias)
            self.backward.append(dict(need=(need_input, need_weight, need_bias), out=out))
            return out

        monkeypatch.setattr(cgt._F, "forward", forward)
        monkeypatch.setattr(cgt._F, "backward", backward)


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def ptr(a):
    return a.__array_interface__["data"][0]


# (constructor args, constructor kwargs, input shape)
CASES = {
    "seed": ((3, 16, 3), dict(padding=1), (2, 3, 12, 12)),
    "reflect": ((3, 4, 3), dict(padding=(1, 2), padding_mode="reflect"), (2, 3, 7, 9)),
    "replicate": ((3, 4, (3, 2)), dict(padding=2, padding_mode="replicate"), (2, 3, 6, 5)),
    "circular": ((2, 4, 3), dict(padding=(2, 1), padding_mode="circular"), (1, 2, 5, 8)),
    "same_even_kernel": ((3, 5, 4), dict(padding="same"), (2, 3, 9, 7)),
    "same_dilated_reflect": ((2, 3, 3), dict(padding="same", dilation=(2, 3), padding_mode="reflect"),
                             (1, 2, 9, 11)),
    "valid": ((3, 4, (2, 5)), dict(padding="valid"), (2, 3, 6, 9)),
    "groups": ((4, 6, 3), dict(padding=1, groups=2), (2, 4, 7, 6)),
    "depthwise": ((6, 6, 3), dict(padding=1, groups=6), (2, 6, 9, 9)),
    "depthwise_x2_strided": ((3, 6, 5), dict(padding=2, groups=3, stride=2), (2, 3, 11, 10)),
    "dilation": ((3, 4, 3), dict(dilation=(2, 1), padding=1), (2, 3, 9, 8)),
    "stride2": ((3, 8, 3), dict(stride=2, padding=1), (2, 3, 13, 11)),
    "stride_2x3_odd": ((3, 4, (3, 5)), dict(stride=(2, 3), padding=(0, 2)), (3, 3, 11, 13)),
    "pointwise_nobias": ((5, 7, 1), dict(bias=False), (2, 5, 5, 3)),
    "unbatched": ((3, 4, 3), dict(padding=1), (3, 6, 7)),
    "unbatched_circular_stride": ((3, 4, 3), dict(padding=1, stride=2, padding_mode="circular"), (3, 7, 6)),
    "empty_batch": ((3, 4, 3), dict(padding=1), (0, 3, 5, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_torch_both_ways(case, dtype, spy):
    args, kwargs, shape = CASES[case]
    ours, ref = pair(*args, dtype=dtype, **kwargs)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    close(ya, yb, "output")
    gy = torch.randn(yb.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    ya.backward(gy)
    yb.backward(gy)
    close(xa.grad, xb.grad, "input gradient")
    close(ours.weight.grad, ref.weight.grad, "weight gradient")
    if ref.bias is not None:
        close(ours.bias.grad, ref.bias.grad, "bias gradient")
    # convgen computed all of it: one forward, one backward asking for everything
    assert len(spy.forward) == 1 and len(spy.backward) == 1
    assert spy.backward[0]["need"] == (True, True, ref.bias is not None)


def test_is_a_torch_conv2d():
    m = Conv2d(3, 16, 3, padding=1)
    assert isinstance(m, torch.nn.Conv2d) and isinstance(m, torch.nn.Module)
    assert repr(m) == repr(torch.nn.Conv2d(3, 16, 3, padding=1))
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]


def test_seed_examples_verbatim(capsys):
    conv = Conv2d(3, 16, 3, padding=1)
    print(conv(torch.randn(1, 3, 32, 32)).shape)
    output = conv(torch.randn(1, 3, 32, 32))
    loss = output.sum()
    loss.backward()
    print(conv.weight.grad.shape)
    assert capsys.readouterr().out == "torch.Size([1, 16, 32, 32])\ntorch.Size([16, 3, 3, 3])\n"


def test_same_default_initialisation():
    torch.manual_seed(5)
    a = Conv2d(4, 8, 3)
    torch.manual_seed(5)
    b = torch.nn.Conv2d(4, 8, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_no_grad_and_inference_mode(spy):
    ours, ref = pair(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.no_grad():
        y = ours(x)
    assert y.grad_fn is None and not y.requires_grad
    close(y, ref(x).detach())
    with torch.inference_mode():
        y = ours(x.detach())
    assert not y.requires_grad
    close(y, ref(x).detach())
    assert len(spy.forward) == 2 and not spy.backward


def test_input_without_requires_grad_skips_input_gradient(spy):
    ours, ref = pair(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert x.grad is None
    assert spy.backward[0]["need"] == (False, True, True)
    assert spy.backward[0]["out"][0] is None
    close(ours.weight.grad, ref.weight.grad)
    close(ours.bias.grad, ref.bias.grad)


def test_frozen_weight_skips_weight_gradient(spy):
    ours, ref = pair(3, 5, 3, padding=1)
    for m in (ours, ref):
        m.weight.requires_grad_(False)
    xa = torch.randn(2, 3, 8, 8, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    ours(xa).sum().backward()
    ref(xb).sum().backward()
    assert spy.backward[0]["need"] == (True, False, True)
    assert spy.forward[0]["saved"].xin is None  # the padded input is not kept for nothing
    assert ours.weight.grad is None
    close(xa.grad, xb.grad)
    close(ours.bias.grad, ref.bias.grad)


def test_nothing_requires_grad_builds_no_graph(spy):
    ours, _ = pair(3, 5, 3, padding=1)
    ours.requires_grad_(False)
    y = ours(torch.randn(1, 3, 6, 6))
    assert y.grad_fn is None and len(spy.forward) == 1


def test_gradient_accumulation():
    ours, ref = pair(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(3):
        ours(x).sum().backward()
        ref(x).sum().backward()
    close(ours.weight.grad, ref.weight.grad)
    close(ours.bias.grad, ref.bias.grad)
    ours.zero_grad()
    ours(x).sum().backward()
    close(ours.weight.grad * 3, ref.weight.grad)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.Adam(p, lr=1e-2)], ids=["sgd", "adam"])
def test_optimizer_steps_match(make_opt):
    ours, ref = pair(3, 6, 3, padding=1, dtype=torch.float64)
    opts = make_opt(ours.parameters()), make_opt(ref.parameters())
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(4, 3, 7, 7, dtype=torch.float64, generator=gen)
        target = torch.randn(4, 6, 7, 7, dtype=torch.float64, generator=gen)
        for m, opt in zip((ours, ref), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), target).backward()
            opt.step()
    close(ours.weight.detach(), ref.weight.detach())
    close(ours.bias.detach(), ref.bias.detach())


def test_in_a_network_with_other_layers():
    torch.manual_seed(0)
    net_a = torch.nn.Sequential(Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                Conv2d(4, 8, 3, groups=4), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 3))
    net_b = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(4, 8, 3, groups=4), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 3))
    net_b.load_state_dict(net_a.state_dict())
    x = torch.randn(5, 1, 12, 12)
    for net in (net_a, net_b):
        torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        close(a.grad, b.grad, name)


def test_shares_memory_with_tensors(spy):
    m = Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    y = m(x)
    seen = spy.forward[0]
    assert ptr(seen["x"]) == x.data_ptr()            # the input is not copied
    assert ptr(seen["weight"]) == m.weight.data_ptr()  # nor the weight and bias
    assert ptr(seen["bias"]) == m.bias.data_ptr()
    assert y.data_ptr() == ptr(seen["y"])            # the output is the kernel's array
    gy = torch.randn(y.shape)
    y.backward(gy)
    gx, gw, gb = spy.backward[0]["out"]
    assert x.grad.data_ptr() == ptr(gx)              # gradients are the kernels' arrays
    assert m.weight.grad.data_ptr() == ptr(gw)
    assert m.bias.grad.data_ptr() == ptr(gb)
    # no_grad path too
    with torch.no_grad():
        y = m(x)
    assert ptr(spy.forward[1]["x"]) == x.data_ptr() and y.data_ptr() == ptr(spy.forward[1]["y"])


def test_non_contiguous_input_and_channels_last_weight():
    ours, ref = pair(4, 6, 3, padding=1)
    for m in (ours, ref):
        m.to(memory_format=torch.channels_last)
    base = torch.randn(2, 9, 4, 8).permute(0, 2, 3, 1)[..., ::2]  # (2, 4, 8, 5), strided
    xa, xb = base.clone().requires_grad_(), base.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    close(ya, yb.contiguous())
    ya.sum().backward()
    yb.sum().backward()
    close(xa.grad.contiguous(), xb.grad.contiguous())
    close(ours.weight.grad.contiguous(), ref.weight.grad.contiguous())


def test_expanded_grad_output():
    """sum().backward() hands an expanded (stride-0) gradient; it is made contiguous."""
    ours, ref = pair(2, 3, 3)
    xa = torch.randn(1, 2, 5, 5, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    ours(xa).sum().backward()
    ref(xb).sum().backward()
    close(xa.grad, xb.grad)


def test_config_is_cached_and_follows_attribute_changes(spy):
    m = Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    m(x)
    m(x)
    assert spy.forward[0]["cfg"] is spy.forward[1]["cfg"]
    m.padding = (0, 0)
    m.stride = (2, 2)
    assert m(x).shape == (1, 4, 3, 3)
    assert spy.forward[2]["cfg"] is not spy.forward[0]["cfg"]
    ref = torch.nn.Conv2d(3, 4, 3, stride=2)
    ref.load_state_dict(m.state_dict())
    close(m(x), ref(x))


def test_weight_modified_in_place_after_forward_is_caught():
    m = Conv2d(3, 4, 3)
    y = m(torch.randn(1, 3, 5, 5, requires_grad=True))
    with torch.no_grad():
        m.weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_input_modified_in_place_after_forward_is_caught():
    m = Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 5)
    y = m(x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("in_place, out_channels", [(True, 32), (False, 32), (True, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_layer_keeps_its_input_itself(dtype, in_place, out_channels, monkeypatch):
    """A stride-1 1x1 layer without padding keeps the input tensor's own memory for its
    weight gradient (no copy: autograd guards it), a padded one a copy; both give
    PyTorch's gradients, also with an infinity and a NaN in the input, and an input
    changed in place after the forward is caught.  Its forward reads the input in place
    too: through the pixel tiles (_engine.IN_PLACE), or else through the panels.  (With 17
    output channels, the float32 weight gradient is the transposed one of the layer the
    other way round: ForwardPlan.wgrad_transposed.)"""
    monkeypatch.setattr(_engine, "IN_PLACE", in_place)
    _engine.forward_plan.cache_clear()
    p = _engine.Problem(2, 40, 9, 11, out_channels, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, "zeros",
                        "f32" if dtype == torch.float32 else "f64")
    fp = _engine.forward_plan(p)
    assert (fp.in_place is not None) == in_place and fp.panels and fp.wgrad_reads_input
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert (fp.wgrad_transposed is not None) == (out_channels == 17 and dtype == torch.float32)
    ours, ref = pair(40, out_channels, 1, dtype=dtype)
    x = torch.randn(2, 40, 9, 11, dtype=dtype)
    x[0, 3, 2, 4], x[1, 7, 0, 0] = float("inf"), float("nan")
    for m, shares in ((ours, True), (Conv2d(40, out_channels, 1, padding=1, dtype=dtype), False)):
        y = m(x)
        assert np.shares_memory(y.grad_fn.convgen_saved.xin, x.numpy()) == shares
    y, y_ref = ours(x), ref(x)
    gy = torch.randn(y.shape, dtype=dtype)
    y.backward(gy)
    y_ref.backward(gy)
    for got, want in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        close(torch.where(finite, got, 0), torch.where(finite, want, 0))
    y = ours(x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    _engine.forward_plan.cache_clear()


# (constructor args, constructor kwargs, input shape): small, for gradgradcheck's finite differences
DOUBLE_BACKWARD_CASES = {
    "zeros": ((2, 3, 3), dict(padding=1), (2, 2, 5, 4)),
    "reflect_dilated_same": ((2, 2, 3), dict(padding="same", dilation=(2, 1), padding_mode="reflect"), (1, 2, 5, 6)),
    "circular_stride_2x3": ((2, 3, (3, 2)), dict(stride=(2, 3), padding=(1, 2), padding_mode="circular"), (2, 2, 5, 7)),
    "depthwise_replicate": ((3, 3, 3), dict(padding=1, groups=3, padding_mode="replicate"), (1, 3, 4, 5)),
}


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD_CASES))
def test_double_backward(name, spy):
    """A backward under create_graph=True (double backward) gives gradients that carry
    PyTorch's graph: gradgradcheck passes on convgen's forward (float64, batched and
    unbatched, with and without bias), and they equal those of a plain backward, which
    still runs convgen's own."""
    args, kwargs, shape = DOUBLE_BACKWARD_CASES[name]
    torch.manual_seed(1)
    for bias, x_shape in ((False, shape), (True, shape[1:])):
        m = Conv2d(*args, dtype=torch.float64, **dict(kwargs, bias=bias))
        names = [n for n, _ in m.named_parameters()]
        x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)

        def f(x, *params):
            return torch.func.functional_call(m, dict(zip(names, params)), (x,))

        calls = len(spy.forward)
        assert torch.autograd.gradgradcheck(f, (x, *m.parameters()))
        assert len(spy.forward) > calls and not spy.backward   # (convgen's forward, PyTorch's gradients)
        # ... the same first-order gradients as convgen's backward, which a plain one runs
        gy = torch.randn_like(m(x))
        with_graph = torch.autograd.grad(m(x), (x, *m.parameters()), gy, create_graph=True)
        plain = torch.autograd.grad(m(x), (x, *m.parameters()), gy)
        assert len(spy.backward) == 1 and with_graph[0].requires_grad and with_graph[1].requires_grad
        for got, want in zip(with_graph, plain):
            close(got.detach(), want)
        spy.backward.clear()


def test_gradient_penalty_matches_torch(spy):
    """A WGAN-GP style gradient penalty (the norm of d output / d input, differentiated
    again) gives torch.nn.Conv2d's parameter and input gradients, with only the input
    gradient asked for in the first pass or every gradient."""
    for wanted in ("x", "all"):
        ours, ref = pair(3, 5, 3, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64)
        grads = {}
        for m in (ours, ref):
            x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                            requires_grad=True)
            y = torch.tanh(m(x)).sum()
            inputs = (x,) if wanted == "x" else (x, *m.parameters())
            gx = torch.autograd.grad(y, inputs, create_graph=True)[0]
            penalty = (gx.flatten(1).norm(dim=1) - 1).square().mean()
            penalty.backward()
            grads[m] = (x.grad, m.weight.grad, m.bias.grad)
        for got, want, what in zip(grads[ours], grads[ref], ("x", "weight", "bias")):
            close(got, want, f"{wanted}: {what}")
    assert spy.forward   # (convgen's forward; the penalty's own backward runs convgen's too, through tanh')


def _two_layers(conv):
    """Two layers of `conv` (the drop-in or torch.nn.Conv2d) with a ReLU between, the second
    reflect-padded and strided."""
    return torch.nn.Sequential(conv(3, 8, 3, padding=1), torch.nn.ReLU(),
                               conv(8, 4, 3, stride=2, padding=1, padding_mode="reflect"))


def test_torch_compile_runs_convgen_between_compiled_graphs(spy):
    """torch.compile leaves the drop-in's convolutions to convgen, run as they are between
    the graphs it compiles around them (it does not trace into convgen's Python: no
    warning from it about convgen's code), with torch.nn.Conv2d's numbers forward and
    backward."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    ours, ref = _two_layers(Conv2d), _two_layers(torch.nn.Conv2d)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 10, 9)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(ours, backend="eager")(xs[0])
        y.square().sum().backward()
    assert not [w for w in caught if "convgen" in str(w.message) or "convgen" in (w.filename or "")]
    want = ref(xs[1])
    want.square().sum().backward()
    close(y, want)
    close(xs[0].grad, xs[1].grad, "input gradient")
    for a, b in zip(ours.parameters(), ref.parameters()):
        close(a.grad, b.grad, "parameter gradient")
    assert len(spy.forward) == 2 and len(spy.backward) == 2
    torch._dynamo.reset()


def _export_model():
    """(drop-in model, input, its eager output): _two_layers of the drop-in."""
    torch.manual_seed(4)
    model = _two_layers(Conv2d).eval()
    x = torch.randn(1, 3, 12, 10)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # (torch.jit's own notices)
def test_traces_and_exports_as_pytorch_convolution(spy):
    """torch.jit.trace and torch.export (strict or not) record PyTorch's own convolution,
    the operator other runtimes know (convgen's arrays would be recorded as constants, or
    not at all), and the traced and exported programs compute the eager model's numbers."""
    model, x, want = _export_model()
    traced = torch.jit.trace(model, x)   # (its check runs the model eagerly again: convgen)
    calls = len(spy.forward)
    exported = [torch.export.export(model, (x,), strict=strict) for strict in (False, True)]
    assert len(spy.forward) == calls
    kinds = {n.kind() for n in torch.jit.freeze(traced).graph.nodes()}
    assert "prim::PythonOp" not in kinds and kinds & {"aten::_convolution", "aten::conv2d"}
    with torch.no_grad():
        close(traced(x), want, "traced")
        for program in exported:
            targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
            assert sum("conv2d" in t for t in targets) == 2
            close(program.module()(x), want, "exported")
        model(x)
    assert len(spy.forward) == calls + 2   # (eager calls run convgen again: two layers)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # (forward_ad's own torch.jit notices)
def test_torch_func_transforms(spy):
    """torch.func's transforms (grad, per-sample gradients by vmap over grad, vmap of the
    forward, jacrev) and forward-mode AD (torch.autograd.forward_ad) work on drop-in
    layers, through PyTorch's own convolution (they transform PyTorch's operators), with
    torch.nn.Conv2d's numbers; eager calls after them run convgen."""
    ours, ref = pair(3, 4, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    x = torch.randn(5, 3, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(params, xi, module):
        return torch.func.functional_call(module, params, (xi[None],)).square().sum()

    transforms = {
        "grad": lambda m: torch.func.grad(loss)(dict(m.named_parameters()), x[0], m),
        "per-sample grad": lambda m: torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(
            dict(m.named_parameters()), x, m),
        "vmap": lambda m: torch.func.vmap(m)(x),
        "jacrev": lambda m: torch.func.jacrev(lambda xi: m(xi[None]).sum(dim=(0, 2, 3)))(x[0]),
    }
    for name, transform in transforms.items():
        got, want = transform(ours), transform(ref)
        for key in (got if isinstance(got, dict) else [None]):
            close(got if key is None else got[key], want if key is None else want[key], f"{name} {key or ''}")
    tangent = torch.randn_like(x)

    def output_tangent(m):
        with fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, tangent))).tangent

    close(output_tangent(ours), output_tangent(ref), "forward-mode AD")
    assert not spy.forward and not spy.backward
    ours(x).sum().backward()
    assert len(spy.forward) == len(spy.backward) == 1


def test_cpu_autocast_is_pytorch_s(spy):
    """Under CPU autocast the layers give what torch.nn.Conv2d gives (bfloat16, by
    PyTorch's own convolution after its casts), forward and backward; outside it, convgen."""
    ours, ref = pair(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(6))
    for m in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
    assert y.dtype is torch.bfloat16 and ours(x).dtype is torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert len(spy.forward) == 1 and not spy.backward


def _spectral_norm(m):
    torch.manual_seed(7)   # (its power iteration's random start, the same for both layers)
    return torch.nn.utils.parametrizations.spectral_norm(m)


def _hooked(m):
    m.register_forward_hook(lambda mod, args, out: 2 * out)
    return m


# what wraps a layer -> the callable that runs it
WRAPPERS = {
    "weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "spectral_norm": _spectral_norm,
    "pruned": lambda m: prune.l1_unstructured(m, "weight", 0.5),
    "forward_hook": _hooked,
    "checkpointed": lambda m: (lambda x: torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_as_torch_wraps_its_conv(wrapper, spy):
    """What PyTorch wraps a Conv2d in (weight_norm and spectral_norm parametrizations,
    pruning's mask, forward hooks, activation checkpointing) works on the drop-in, which
    then computes with convgen's kernels: output, input and parameter gradients as
    torch.nn.Conv2d's."""
    ours, ref = pair(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(8))
    got = {}
    for m in (ours, ref):
        run = WRAPPERS[wrapper](m)
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.square().sum().backward()
        got[m] = [y, xi.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(got[ours], got[ref]):
        close(a, b, wrapper)
    assert spy.forward and spy.backward


def test_exports_to_onnx():
    """A model of drop-in layers exports to ONNX (the TorchScript exporter) as standard
    Conv (and Pad) nodes, which onnxruntime runs to the eager model's numbers."""
    ort = pytest.importorskip("onnxruntime")
    model, x, want = _export_model()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (the TorchScript exporter's deprecation notice)
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    close(torch.from_numpy(got), want, "onnxruntime")


def test_falls_back_to_torch_for_what_convgen_does_not_compute(spy):
    ours, ref = pair(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    for m in (ours, ref):
        m.to(torch.bfloat16)
    torch.testing.assert_close(ours(x.bfloat16()), ref(x.bfloat16()))  # PyTorch computed it
    assert not spy.forward
    ours.float()
    with pytest.raises(RuntimeError):  # dtype mismatch: PyTorch's own error
        ours(x.double())
    with pytest.raises(RuntimeError):  # wrong number of channels
        ours(torch.randn(1, 5, 6, 6))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        Conv2d(3, 4, 5)(torch.randn(1, 3, 2, 2))
    with pytest.raises(RuntimeError, match="Padding size should be less"):
        Conv2d(3, 4, 3, padding=3, padding_mode="reflect")(torch.randn(1, 3, 3, 3))
    assert not spy.forward


def test_state_dict_copy_and_pickle_round_trip():
    m = Conv2d(3, 4, 3, padding="same", padding_mode="circular")
    x = torch.randn(1, 3, 6, 6)
    y = m(x)  # fills the config cache
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is Conv2d
        close(clone(x), y)
    ref = torch.nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular")
    ref.load_state_dict(m.state_dict())
    close(ref(x), y)


def test_convgen_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
            "import numpy as np, convgen\n"
            "print(convgen.Conv2d(3, 4, 3, padding=1)(np.zeros((1, 3, 5, 5), np.float32)).shape)\n"
            "try:\n    import convgen.torch\nexcept ImportError:\n    print('no torch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1,", "4,", "5,", "5)", "no", "torch"]


# ---------------------------------------------------------------------------- OpenMP
def test_one_openmp_runtime_with_torch():
    """convgen and torch run on the same OpenMP runtime (one thread pool): a thread
    count set through either is the other's too.  Two runtimes make each slower by
    up to two orders of magnitude on a small machine (examples/OPENMP.md)."""
    import convgen
    before_torch, before_convgen = torch.get_num_threads(), convgen.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert convgen.get_num_threads() == 1
        convgen.set_num_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        convgen.set_num_threads(before_convgen)
        torch.set_num_threads(before_torch)
    assert (convgen.get_num_threads(), torch.get_num_threads()) == (before_convgen, before_torch)


def test_adopts_a_renamed_libgomp_vendored_by_torch(tmp_path):
    """With a torch that vendors libgomp under another name (libgomp-<hash>.so.1),
    `import convgen` (even before torch) binds convgen to that copy."""
    with open("/proc/self/maps") as f:
        source = next(line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1])
    lib = tmp_path / "torch" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('a stand-in torch')\n")
    fake = lib / "libgomp-0123abcd.so.1"
    shutil.copy(source, fake)
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
            "import ctypes, numpy as np, convgen\n"
            f"runtime = ctypes.CDLL({str(fake)!r})\n"
            "convgen.set_num_threads(3)\n"
            "print(runtime.omp_get_max_threads())\n"
            "print(convgen.Conv2d(2, 3, 3, seed=0)(np.ones((2, 2, 6, 6), np.float32)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["3", "(2, 3, 4, 4)"], out


def test_forward_keeps_the_input_only_for_a_weight_gradient(spy):
    ours, _ = pair(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    with torch.no_grad():
        ours(x)
    ours.weight.requires_grad_(False)
    ours(x).sum().backward()
    ours.weight.requires_grad_(True)
    ours(x).sum().backward()
    assert [f["keep_input"] for f in spy.forward] == [False, False, True]
    assert spy.forward[1]["saved"].x is None and spy.forward[2]["saved"].x is not None


class _OwnConv(torch.nn.Conv2d):
    """A subclass with a forward of its own, which convert must leave alone."""

    def forward(self, x):
        return super().forward(x) * 2


def _model():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 1, padding_mode="zeros"))
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"),
                               torch.nn.ReLU(), block, _OwnConv(16, 4, 3, padding=1),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_convert_an_existing_model_and_revert_it(spy):
    """convert swaps every exact torch.nn.Conv2d of a model for the drop-in in place (the
    same parameter tensors, buffers, hooks and state_dict keys), which then computes the
    model's numbers through convgen both ways; subclasses are left alone; revert swaps
    them back to PyTorch's own convolution."""
    ref, model = _model(), _model()
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooked = []
    model[0].register_forward_hook(lambda m, i, o: hooked.append(o.shape))
    assert cgt.convert(model) is model
    kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kinds == [Conv2d, Conv2d, Conv2d, _OwnConv]
    assert list(model.parameters())[0] is params[0] and all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 12, 12)
    for net in (ref, model):
        torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 2])).backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        close(a.grad, b.grad, name)
    assert len(spy.forward) == 3 and len(spy.backward) == 3   # (the subclass ran PyTorch's)
    assert hooked == [torch.Size([2, 8, 6, 6])]
    opt.step()   # (the optimiser made before convert updates the converted layers' weights)
    assert not torch.equal(model[0].weight, ref[0].weight)
    assert cgt.revert(model) is model
    assert [type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [torch.nn.Conv2d] * 3 + [_OwnConv]
    spy.forward.clear()
    model(x)
    assert spy.forward == []
    single = torch.nn.Conv2d(2, 3, 3)
    assert type(cgt.convert(single)) is Conv2d and type(cgt.revert(single)) is torch.nn.Conv2d
