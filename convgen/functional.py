"""Functional interface: torch.nn.functional.conv2d and torch.nn.grad's
conv2d_input / conv2d_weight, on NumPy arrays."""

import numpy as np

from . import _dispatch, _engine, _validate
from ._engine import DTYPE_SUFFIX, Problem
from ._layout import follow_flush_denormal

__all__ = ["conv2d", "conv2d_input", "conv2d_weight", "output_size"]


class Config:
    """Validated, normalised convolution hyper-parameters (no array shapes)."""

    __slots__ = ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "run_dilation", "groups", "padding_mode", "pads", "_problems")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, padding_mode="zeros"):
        self.in_channels = _validate.channels_arg(in_channels, "in_channels")
        self.out_channels = _validate.channels_arg(out_channels, "out_channels")
        self.kernel_size = _validate.pair(kernel_size, "kernel_size", 1)
        self.stride = _validate.pair(stride, "stride", 1)
        self.padding = _validate.padding_arg(padding)
        self.dilation = _validate.pair(dilation, "dilation", 1)
        self.groups = _validate.groups_arg(groups, self.in_channels, self.out_channels)
        self.padding_mode = _validate.padding_mode_arg(padding_mode)
        # 'same' with a stride is rejected at construction, as in PyTorch.
        self.pads = _validate.resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        # Along an axis where the kernel is 1 wide its dilation changes nothing: the
        # kernels run it as 1 (so a dilated 1x1 layer runs the 1x1 kernel).
        self.run_dilation = tuple(1 if k == 1 else d for k, d in zip(self.kernel_size, self.dilation))
        self._problems = {}

    def problem(self, shape, dtype):
        """The engine's Problem for an (N, C, H, W) input of this dtype (checks the sizes).
        Remembered per (shape, dtype): on small layers these checks cost as much as the
        convolution."""
        key = (shape, dtype)
        p = self._problems.get(key)
        if p is None:
            N, C, H, W = shape
            _validate.check_padded_size((H, W), self.pads, self.kernel_size, self.dilation, self.padding_mode)
            p = Problem(N, C, H, W, self.out_channels, *self.kernel_size, *self.stride, *self.run_dilation,
                        *self.pads, self.groups, self.padding_mode, DTYPE_SUFFIX[np.dtype(dtype)])
            if len(self._problems) >= 64:
                self._problems.clear()
            self._problems[key] = p
        return p

    def kernel_name(self, dtype, direction="fwd"):
        """Name of the generated kernel that runs this configuration (any input size).
        (Wide groups may run as dense layers, through the dense kernel of the same kernel
        size, stride and dilation, on inputs whose groups suit its channel-vector tile;
        the weight gradient likewise: see _engine.ForwardPlan.groupwise and wgrad_ocvec.
        A patch embedding of windows of 16 to 255 pixels runs the 1x1 kernel where its
        forward keeps its input for a weight gradient, its own kernel under no_grad():
        see _engine.PATCH_MIN_TAPS_INFERENCE.)"""
        shape = (1, self.in_channels, 1, 1)
        p = Problem(*shape, self.out_channels, *self.kernel_size, *self.stride, *self.run_dilation,
                    *self.pads, self.groups, self.padding_mode, DTYPE_SUFFIX[np.dtype(dtype)])
        return _dispatch.lookup(direction, _engine.patch_pointwise(p) or p).name


def _weight(weight, dtype=None):
    weight = _validate.float_array(weight, "weight", dtype)
    if weight.ndim != 4:
        raise ValueError(f"weight must be 4D (out_channels, in_channels/groups, kH, kW), got shape {weight.shape}")
    if 0 in weight.shape:
        raise ValueError(f"weight of shape {weight.shape} has a zero-size dimension")
    return np.ascontiguousarray(weight)


def _bias(bias, out_channels, dtype):
    if bias is None:
        return None
    bias = _validate.float_array(bias, "bias", dtype)
    if bias.shape != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {bias.shape}")
    return np.ascontiguousarray(bias)


def _typed(value):
    """A cache key for an argument that tells apart values equal across types (1 and
    1.0, True and 1), which validation treats differently; TypeError if unhashable."""
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_typed(v) for v in value)
    hash(value)
    return type(value), value


_configs = {}


def _config_for(weight, x_channels, stride, padding, dilation, groups, padding_mode="zeros"):
    """The Config of a functional call, remembered per arguments: on small layers
    validating them anew cost as much as the convolution (the seed example's conv2d:
    25 us a call, of which the module's call takes 13)."""
    try:
        key = _typed((tuple(weight.shape), x_channels, stride, padding, dilation, groups, padding_mode))
    except TypeError:
        return _new_config(weight, x_channels, stride, padding, dilation, groups, padding_mode)
    cfg = _configs.get(key)
    if cfg is None:
        cfg = _new_config(weight, x_channels, stride, padding, dilation, groups, padding_mode)
        if len(_configs) >= 64:
            _configs.clear()
        _configs[key] = cfg
    return cfg


def _new_config(weight, x_channels, stride, padding, dilation, groups, padding_mode):
    out_channels, cg, kh, kw = weight.shape
    if not _validate._is_int(groups) or groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if x_channels != cg * groups:
        raise ValueError(f"weight of shape {weight.shape} with groups={groups} expects "
                         f"{cg * groups} input channels, but the input has {x_channels}")
    return Config(x_channels, out_channels, (kh, kw), stride, padding, dilation, groups, padding_mode)


class Saved:
    """What a forward pass keeps for its backward pass: the (contiguous) input, and
    its padded planes when the forward made them."""

    __slots__ = ("problem", "x", "xin", "weight", "batched", "nonfinite")

    def __init__(self, problem, x, xin, weight, batched, nonfinite=False):
        self.problem, self.x, self.xin, self.weight, self.batched = problem, x, xin, weight, batched
        self.nonfinite = nonfinite   # x holds an infinity or a NaN

    def input_planes(self, temporary=False):
        """The padded planes, made now if the forward did not; temporary: made in scratch
        memory (see _engine.pad_phase), for a Saved that dies with the call using it."""
        if self.x is None:
            raise RuntimeError("the forward pass kept no input, so it has no weight gradient")
        if self.xin is None:
            self.xin, self.nonfinite = _engine.pad_phase(self.x, _engine.forward_plan(self.problem), temporary)
        return self.xin


def forward(cfg, x, weight, bias, recycle=None, keep_input=True, input_guarded=False):
    """Run cfg on validated weight/bias; returns (y, Saved).  recycle: a Saved whose
    backward will not be asked for any more (its buffers may be reused).
    keep_input=False: no weight gradient will be asked for, so the Saved keeps no
    input (and the forward skips writing a copy of it).  input_guarded: x cannot
    change before the backward (autograd's version counters catch it), so where the
    weight gradient can read x itself the Saved keeps x rather than a copy (no recycle
    then: its planes may be x)."""
    x, batched = _validate.input_array(x, cfg.in_channels, weight.dtype)
    return run_forward(cfg.problem(x.shape, x.dtype), x, batched, weight, bias, recycle, keep_input, input_guarded)


def run_forward(p, x, batched, weight, bias, recycle=None, keep_input=True, input_guarded=False):
    """forward() on arguments already checked: x C-contiguous (N, C, H, W), weight and
    bias C-contiguous, of x's dtype, and of the shapes Problem p expects."""
    if p.N == 0:
        y, xin, nonfinite = _empty_output(p, x.dtype), None, False
    else:
        if input_guarded and recycle is not None:
            raise ValueError("a forward that may keep its input itself recycles no planes")
        xin = recycle.xin if recycle is not None else None
        follow_flush_denormal()   # (the kernels' threads compute in this thread's denormal mode)
        y, xin, nonfinite = _engine.forward(x, weight, bias, p, xin, keep=keep_input, share_input=input_guarded)
    return (y if batched else y[0]), Saved(p, x if keep_input else None, xin, weight, batched, nonfinite)


def run_inference(p, x, batched, weight, bias, packs=None):
    """run_forward for a forward that keeps nothing for a backward: only y (small
    layers: the Saved that run_forward makes costs a tenth of the call).  packs: see
    _engine.forward (a frozen Conv2d's)."""
    if p.N == 0:
        y = _empty_output(p, x.dtype)
    else:
        follow_flush_denormal()
        y = _engine.forward(x, weight, bias, p, keep=False, packs=packs)[0]
    return y if batched else y[0]


def _empty_output(p, dtype):
    """The output of an empty batch (the kernels are not called for one)."""
    OH, OW = p.output_hw
    return np.empty((0, p.OC, OH, OW), dtype=dtype)


def backward(saved, grad_output, need_input=True, need_weight=True, need_bias=True,
             weight_grad=None, bias_grad=None, weight_accumulate=True, bias_accumulate=True, packs=None):
    """Gradients (input, weight, bias) of the forward that produced `saved`
    (None for those not asked for).  weight_grad / bias_grad: C-contiguous arrays to
    write the parameter gradients into, adding to what they hold if *_accumulate
    (see _engine.backward_params).  packs: a frozen Conv2d's, whose weight `saved` holds
    (see _engine.backward_data)."""
    p = saved.problem
    y_shape = _engine.forward_plan(p).y_shape   # (N, OC, OH, OW)
    expected = y_shape if saved.batched else y_shape[1:]
    gy = grad_output
    if type(gy) is not np.ndarray or gy.dtype != saved.weight.dtype:   # (else it passes: no call)
        gy = _validate.float_array(grad_output, "grad_output", saved.weight.dtype)
    if gy.shape != expected:
        raise ValueError(f"grad_output must have the forward output's shape {expected}, got {gy.shape}")
    gy = np.ascontiguousarray(gy if saved.batched else gy[None])
    gx = gw = gb = None
    if p.N == 0:
        if need_input:
            gx = np.zeros((p.N, p.C, p.H, p.W), dtype=gy.dtype)
        if need_weight:
            gw = weight_grad if weight_grad is not None else np.zeros_like(saved.weight)
            if not weight_accumulate:
                gw[...] = 0
        if need_bias:
            gb = bias_grad if bias_grad is not None else np.zeros(p.OC, dtype=gy.dtype)
            if not bias_accumulate:
                gb[...] = 0
    else:
        follow_flush_denormal()
        if need_input:
            gx = _engine.backward_data(gy, saved.weight, p, packs)
        if need_weight or need_bias:
            xin = saved.input_planes() if need_weight else None
            gw, gb = _engine.backward_params(gy, xin, p, need_weight, need_bias, weight_grad, bias_grad,
                                             weight_accumulate, bias_accumulate, saved.nonfinite)
    if gx is not None and not saved.batched:
        gx = gx[0]
    return gx, gw, gb


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Same as torch.nn.functional.conv2d (zero padding; see Conv2d for other modes)."""
    weight = _weight(weight)
    x = _validate.float_array(input, "input", weight.dtype)
    if x.ndim not in (3, 4):
        raise ValueError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of shape {x.shape}")
    cfg = _config_for(weight, x.shape[-3], stride, padding, dilation, groups)
    x, batched = _validate.input_array(x, cfg.in_channels, weight.dtype)
    return run_inference(cfg.problem(x.shape, x.dtype), x, batched, weight, _bias(bias, weight.shape[0], weight.dtype))


class _Shape:
    """Stands in for a weight where only its shape is known."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)


def _sizes(size, name, length=4):
    try:
        size = tuple(int(s) for s in size)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {size!r}") from None
    if len(size) == length - 1:
        return size, False
    if len(size) != length:
        raise ValueError(f"{name} must have {length} (or {length - 1}, unbatched) entries, got {size}")
    return size, True


def conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Gradient of conv2d with respect to its input (torch.nn.grad.conv2d_input)."""
    weight = _weight(weight)
    size, batched = _sizes(input_size, "input_size")
    if not batched:
        size = (1,) + size
    cfg = _config_for(weight, size[1], stride, padding, dilation, groups)
    p = cfg.problem(size, weight.dtype)
    gx, _, _ = backward(Saved(p, None, None, weight, batched), grad_output, True, False, False)
    return gx


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """Gradient of conv2d with respect to its weight (torch.nn.grad.conv2d_weight)."""
    wsize, _ = _sizes(weight_size, "weight_size")
    if len(wsize) != 4:
        raise ValueError(f"weight_size must have 4 entries, got {wsize}")
    x = _validate.float_array(input, "input")
    if x.ndim not in (3, 4):
        raise ValueError(f"Expected 3D (unbatched) or 4D (batched) input, but got input of shape {x.shape}")
    cfg = _config_for(_Shape(wsize), x.shape[-3], stride, padding, dilation, groups)
    proto = np.empty(wsize, dtype=x.dtype)
    xc, batched = _validate.input_array(x, cfg.in_channels, x.dtype)
    p = cfg.problem(xc.shape, xc.dtype)
    saved = Saved(p, xc, None, proto, batched)
    if p.N > 0:
        # (the input itself where the weight gradient reads it in place; else planes no one
        # keeps past this call: in scratch memory, which fresh memory's page faults would
        # otherwise make cost as much as the gradient on mid-sized layers)
        saved.xin = _engine.planes_in_place(xc, p)
        if saved.xin is None:
            saved.input_planes(temporary=True)
    _, gw, _ = backward(saved, grad_output, False, True, False)
    return gw


def output_size(input_hw, kernel_size, stride=1, padding=0, dilation=1):
    """(H_out, W_out) of a convolution, by PyTorch's formula."""
    hw = _validate.pair(tuple(input_hw) if not isinstance(input_hw, int) else input_hw, "input_hw", 1)
    k = _validate.pair(kernel_size, "kernel_size", 1)
    s = _validate.pair(stride, "stride", 1)
    d = _validate.pair(dilation, "dilation", 1)
    top, bottom, left, right = _validate.resolve_padding(_validate.padding_arg(padding), k, s, d)
    return ((hw[0] + top + bottom - d[0] * (k[0] - 1) - 1) // s[0] + 1,
            (hw[1] + left + right - d[1] * (k[1] - 1) - 1) // s[1] + 1)
