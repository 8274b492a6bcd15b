"""convgen.torch.Conv2d: a drop-in ``torch.nn.Conv2d`` whose forward and backward
run convgen's kernels.

    from convgen.torch import Conv2d
    conv = Conv2d(3, 16, 3, padding=1)            # same constructor as torch.nn.Conv2d
    loss = conv(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()                               # convgen kernels both ways

The module *is* a ``torch.nn.Conv2d`` (same parameters, initialisation, state_dict,
repr, optimisers, hooks); only the arithmetic changes.  Tensors and arrays share
memory both ways (``Tensor.numpy()`` / ``torch.from_numpy``): the only copies are
the padded input planes the kernels read (which the weight gradient reuses; stride-1
1x1 layers without padding keep the input itself, which autograd's version counters
guard) and a contiguous copy of a non-contiguous input or gradient.

convgen computes float32 and float64 on the CPU.  Anything else (another device,
half precision, mismatched dtypes, a malformed input) goes to
``torch.nn.Conv2d``'s own implementation, which computes it or raises PyTorch's
error.  So does a backward that must itself be differentiable (``create_graph=True``:
double backward, gradient penalties): PyTorch's own convolution gives its gradients,
graph and all; and so does a forward that PyTorch records or transforms rather than
runs (torch.export, torch.jit.trace, ONNX export, torch.func's transforms, forward-mode
AD) or casts (CPU autocast).  Under torch.compile the layers run convgen between the
compiled graphs.
``convert(model)`` turns every ``torch.nn.Conv2d`` of an existing model (a torchvision
network, a loaded checkpoint) into this drop-in, in place; ``revert(model)`` turns them
back.
Only this module imports torch; ``import convgen`` does not need it.
"""

import functools

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from . import functional as _F

__all__ = ["Conv2d", "convert", "revert"]

_DTYPES = (torch.float32, torch.float64)

# (torch.compile's, torch.export's, tracing's and torch.func's hooks, torch >= 2.3: see
# Conv2d._conv_forward)
_compiler = getattr(torch, "compiler", None)
_is_compiling = getattr(_compiler, "is_compiling", lambda: False)
_no_compile = getattr(_compiler, "disable", lambda fn: fn)
_is_exporting = getattr(_compiler, "is_exporting", lambda: False)
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_autocast_cpu = functools.partial(torch._C.is_autocast_enabled, "cpu")


def _forward_ad_active():
    """Whether a torch.autograd.forward_ad.dual_level is open (its tangents need PyTorch's
    operators: the autograd node has no jvp)."""
    return getattr(_forward_ad, "_current_level", -1) >= 0


def _array(t):
    """The ndarray viewing tensor t's memory (no copy)."""
    return t.detach().numpy()


def _param_array(t):
    """A weight or bias as the C-contiguous array the kernels read (a view, unless
    the tensor is not contiguous, e.g. a channels_last weight)."""
    return np.ascontiguousarray(t.detach().numpy())


class _Conv2dFunction(torch.autograd.Function):
    """Autograd node: convgen's forward, and convgen's input / weight / bias
    gradients, each only when ``ctx.needs_input_grad`` asks for it; or, where the
    backward must itself be differentiable, PyTorch's (see _differentiable_backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg):
        # Only the weight gradient reads the input (its padded planes): keep them for it
        # alone; where it can read x itself, x (input_guarded: see below).
        y, saved = _F.forward(cfg, _array(x), _param_array(weight),
                              None if bias is None else _param_array(bias), keep_input=ctx.needs_input_grad[1],
                              input_guarded=True)
        ctx.convgen_saved = saved
        # The kernels' saved arrays share memory with x and weight.  Saving the tensors
        # too lets autograd's version counters catch an in-place change between forward
        # and backward, as they do for torch.nn.Conv2d.
        ctx.save_for_backward(x, weight)
        ctx.cfg = cfg
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors   # (raises if x or the weight changed in place since forward)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():   # (create_graph=True: the gradients must carry a graph)
            return (*_differentiable_backward(ctx.cfg, x, weight, grad_output, need_x, need_w, need_b), None)
        gx, gw, gb = _F.backward(ctx.convgen_saved, _array(grad_output), need_x, need_w, need_b)
        return (None if gx is None else torch.from_numpy(gx),
                None if gw is None else torch.from_numpy(gw),
                None if gb is None else torch.from_numpy(gb),
                None)


def _torch_conv(cfg, x, weight):
    """Layer cfg's output without bias by PyTorch's own padding and convolution."""
    top, bottom, left, right = cfg.pads
    mode = "constant" if cfg.padding_mode == "zeros" else cfg.padding_mode
    if top or bottom or left or right:
        x = torch.nn.functional.pad(x, (left, right, top, bottom), mode=mode)
    return torch.nn.functional.conv2d(x, weight, None, cfg.stride, 0, cfg.dilation, cfg.groups)


def _differentiable_backward(cfg, x, weight, grad_output, need_x, need_w, need_b):
    """(input, weight, bias) gradients as PyTorch computes them, with their graph (a
    backward under create_graph=True): autograd differentiates _torch_conv(cfg, x,
    weight), the layer by PyTorch's own convolution, itself differentiable to any
    order.  The bias gradient is grad_output summed over all but the channels."""
    wanted = [t for t, need in ((x, need_x), (weight, need_w)) if need]
    grads = iter(torch.autograd.grad(_torch_conv(cfg, x, weight), wanted, grad_output, create_graph=True)
                 if wanted else ())
    gx = next(grads) if need_x else None
    gw = next(grads) if need_w else None
    channels = grad_output.dim() - 3   # (unbatched (C, H, W) or batched (N, C, H, W))
    gb = grad_output.sum([d for d in range(grad_output.dim()) if d != channels]) if need_b else None
    return gx, gw, gb


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` computed by convgen's generated OpenMP kernels.

    Same constructor, attributes and behaviour as ``torch.nn.Conv2d``; forward and
    backward (input, weight and bias gradients) run convgen for float32 / float64
    CPU tensors, and fall back to PyTorch otherwise.
    """

    def _convgen_config(self):
        """(Config, weight shape) for the module's current attributes: validated once,
        rebuilt only when one of them changes."""
        key = (self.in_channels, self.out_channels, self.kernel_size, self.stride,
               self.padding, self.dilation, self.groups, self.padding_mode)
        cache = self.__dict__.get("_convgen_cache")
        if cache is None or cache[0] != key:
            cfg = _F.Config(*key)
            shape = (cfg.out_channels, cfg.in_channels // cfg.groups, *cfg.kernel_size)
            cache = self.__dict__["_convgen_cache"] = (key, cfg, shape)
        return cache[1], cache[2]

    def _conv_forward(self, input, weight, bias):
        if (_is_exporting() or _is_tracing() or _transforms_active() or _forward_ad_active()
                or _autocast_cpu()):
            # A graph for another runtime (torch.export, ONNX, TorchScript), where convgen's
            # arrays would be constants; a torch.func transform (grad, vmap, jacrev...) or
            # forward-mode AD, which transform PyTorch's operators; or CPU autocast, whose
            # casts PyTorch's convolution makes (bfloat16 out, not float32): PyTorch's own.
            return super()._conv_forward(input, weight, bias)
        if _is_compiling():
            return _uncompiled_forward(self, input, weight, bias)
        return _convgen_forward(self, input, weight, bias)


def _convgen_forward(module, input, weight, bias):
    """Conv2d._conv_forward: convgen's kernels where they apply, else torch.nn.Conv2d's."""
    dtype = weight.dtype
    cfg, wshape = module._convgen_config()
    if (type(input) is not torch.Tensor or input.dtype is not dtype or dtype not in _DTYPES
            or not input.is_cpu or not weight.is_cpu or weight.shape != wshape
            or (bias is not None and (bias.dtype is not dtype or not bias.is_cpu
                                      or bias.shape != wshape[:1]))
            or input.dim() not in (3, 4) or input.shape[-3] != cfg.in_channels
            or input.is_neg() or weight.is_neg()):
        return torch.nn.Conv2d._conv_forward(module, input, weight, bias)
    try:
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _Conv2dFunction.apply(input, weight, bias, cfg)
        # Nothing to differentiate: run the kernels without an autograd node.
        y, _ = _F.forward(cfg, _array(input), _param_array(weight),
                          None if bias is None else _param_array(bias), keep_input=False)
    except ValueError:
        # convgen checks sizes before it computes anything: an input too small for
        # the kernel or the padding.  PyTorch then raises its own error for it.
        return torch.nn.Conv2d._conv_forward(module, input, weight, bias)
    return torch.from_numpy(y)


@_no_compile
def _uncompiled_forward(module, input, weight, bias):
    """_convgen_forward for torch.compile, which runs it as it is, between the graphs it
    compiles around it (a graph break), rather than tracing into convgen's Python and
    NumPy calls (a 3-layer model: compiled in 0.3 s rather than 7-22 s, without warnings).
    (Not Conv2d._conv_forward itself: the wrapper would cost every eager call 2-3 us.)"""
    return _convgen_forward(module, input, weight, bias)


def _swap_class(module, old, new):
    """Make every submodule of `module` (itself included) whose type is exactly `old` a
    `new`, in place.  The drop-in adds no state to torch.nn.Conv2d's (only a cache it
    rebuilds), so changing an instance's class keeps its parameters, buffers, hooks and
    everything an optimiser or a state_dict holds of it."""
    for m in module.modules():
        if type(m) is old:
            m.__class__ = new
            m.__dict__.pop("_convgen_cache", None)


def convert(module):
    """Turn every ``torch.nn.Conv2d`` in `module` (and `module` itself, if it is one) into
    ``convgen.torch.Conv2d``, in place, and return `module`.

    The layers keep their parameters (the same tensors: optimisers built before still
    update them), buffers, hooks and state_dict keys; only their arithmetic changes.
    Subclasses of ``torch.nn.Conv2d`` (quantisation-aware, lazy, your own) are left as
    they are, since their forward may not be ``torch.nn.Conv2d``'s.  ``revert`` undoes it.
    """
    _swap_class(module, torch.nn.Conv2d, Conv2d)
    return module


def revert(module):
    """Turn every ``convgen.torch.Conv2d`` in `module` (and `module` itself) back into
    ``torch.nn.Conv2d``, in place, and return `module` (the inverse of ``convert``)."""
    _swap_class(module, Conv2d, torch.nn.Conv2d)
    return module
