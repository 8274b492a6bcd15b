"""Conv2d: torch.nn.Conv2d's interface and numbers, on NumPy arrays."""

import math
import sys
from collections import namedtuple

import numpy as np

from . import functional as F
from . import init
from ._layout import any_writeable, same_arrays
from ._validate import dtype_arg, float_array, input_array
from .grad_mode import is_grad_enabled
from .parameter import Parameter

_NO_GRAD = object()   # Conv2d._saved after a forward under no_grad


class IncompatibleKeys(namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])):
    """What load_state_dict returns, as torch's: the keys it missed and those it did not know."""

    __slots__ = ()

    def __repr__(self):
        return "<All keys matched successfully>" if not (self.missing_keys or self.unexpected_keys) else super().__repr__()


def _state_value(value, name):
    """A state_dict entry as a real-valued array (a torch tensor is detached and read
    where it lies, or from a CPU copy), or an error message in torch's words."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):   # (a torch tensor: no import of torch)
        value = value.detach().cpu()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:
        return None, f'While copying the parameter named "{name}", could not read {type(value).__name__}: {e}'
    if array.dtype.kind not in "fiub":
        return None, (f'While copying the parameter named "{name}", expected a real-valued array or tensor '
                      f"but received {type(value).__name__} of dtype {array.dtype}")
    return array, None


def _requires_grad(param):
    """param.requires_grad (True for a plain array set behind __setattr__'s back)."""
    return getattr(param, "requires_grad", True)


class _Checked:
    """The input shape, dtype, parameter shapes and Problem of a validated forward."""

    __slots__ = ("x_shape", "dtype", "w_shape", "b_shape", "batched", "problem")

    def __init__(self, x_shape, weight, bias, batched, problem):
        self.x_shape, self.dtype, self.w_shape = x_shape, weight.dtype, weight.shape
        self.b_shape = None if bias is None else bias.shape
        self.batched, self.problem = batched, problem


def _accumulator(param):
    """param.grad when the kernels can add into it in place (as torch accumulates),
    else None (a new gradient array is made)."""
    g = param.grad
    if (isinstance(g, np.ndarray) and g.shape == param.shape and g.dtype == param.dtype
            and g.flags.c_contiguous and g.flags.writeable):
        return g
    if g is None:
        return None
    g = np.array(g, dtype=param.dtype, order="C")   # accumulate into a fresh copy
    if g.shape != param.shape:
        raise ValueError(f"cannot accumulate a gradient of shape {param.shape} into .grad of shape {g.shape}")
    return g


class Conv2d:
    """2D convolution over (N, C, H, W) or unbatched (C, H, W) arrays.

    Same constructor and defaults as ``torch.nn.Conv2d``, plus ``dtype``
    (float32 or float64) and ``seed`` (int or ``np.random.Generator``) for the
    default initialisation.  ``backward(grad_output)`` returns the input gradient
    of the last forward and accumulates ``weight.grad`` / ``bias.grad`` (RuntimeError if
    the weight was changed in place since that forward: see Parameter._version); its
    ``input_grad=False`` and the parameters' ``requires_grad`` skip what is not needed.
    ``state_dict()`` / ``load_state_dict()`` move weights to and from torch.
    ``freeze()`` makes the parameters read-only, so that inference forwards can keep
    their packed form between calls.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", dtype=np.float32, seed=None):
        cfg = F.Config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._cfg = cfg
        self._frozen = None   # (freeze's packed weights: a dict, see _engine.forward's packs)
        self.dtype = dtype_arg(dtype)
        kh, kw = cfg.kernel_size
        self.weight = Parameter(np.empty((cfg.out_channels, cfg.in_channels // cfg.groups, kh, kw), self.dtype))
        self.bias = Parameter(np.empty(cfg.out_channels, self.dtype)) if bias else None
        self._saved = None
        self._saved_weight = None   # (the weight parameter and its version at the last forward: see forward)
        self._last = None   # see _checked
        self._spare_grads = {}
        self.reset_parameters(seed)

    @classmethod
    def from_torch(cls, module):
        """A Conv2d with a ``torch.nn.Conv2d``'s configuration and a copy of its weights
        (float32 or float64, as the module's), for running it without torch: the same
        outputs, to float rounding.  (torch is not imported here: any object with
        torch.nn.Conv2d's attributes and state_dict will do.)"""
        dtype = str(module.weight.dtype).replace("torch.", "")
        if dtype not in ("float32", "float64"):
            raise TypeError(f"from_torch needs a float32 or float64 module, got {module.weight.dtype}")
        conv = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, module.bias is not None, module.padding_mode, dtype=dtype)
        conv.load_state_dict(module.state_dict())
        return conv

    # torch.nn.Conv2d's attributes
    in_channels = property(lambda self: self._cfg.in_channels)
    out_channels = property(lambda self: self._cfg.out_channels)
    kernel_size = property(lambda self: self._cfg.kernel_size)
    stride = property(lambda self: self._cfg.stride)
    padding = property(lambda self: self._cfg.padding)
    dilation = property(lambda self: self._cfg.dilation)
    groups = property(lambda self: self._cfg.groups)
    padding_mode = property(lambda self: self._cfg.padding_mode)

    def __setattr__(self, name, value):
        if name in ("weight", "bias"):
            if value is not None and not isinstance(value, Parameter):
                value = Parameter(float_array(value, name))
            object.__setattr__(self, "_frozen", None)   # (new parameters: nothing packed for them)
        object.__setattr__(self, name, value)

    def freeze(self):
        """Replace weight and bias with read-only copies (gradients kept) and return
        self.  An inference forward (under ``convgen.no_grad()``) then packs the weights
        for its kernels once and keeps them, as a deployment runtime does, instead of
        packing them every call: small maps with large weights gain most (on 2 AVX2
        cores, 512 channels at 7x7 1.15x, at 4x4 1.4x); so does the input gradient of a
        backward.  Nothing can change them in place (``weight[...] = ...`` raises);
        assigning ``conv.weight`` or calling ``unfreeze()`` ends it."""
        self._copy_parameters(writeable=False)
        self.__dict__["_frozen"] = {}
        return self

    def unfreeze(self):
        """Replace weight and bias with writable copies (gradients kept), dropping what
        freeze() kept; returns self."""
        self._copy_parameters(writeable=True)
        return self

    def _copy_parameters(self, writeable):
        """Replace weight and bias with copies (gradients kept), read-only unless
        `writeable` (their NumPy base too, so that no view of them can be made writable);
        assigning them drops what freeze() kept."""
        for name, param in list(self.named_parameters()):
            copy = Parameter(param)
            copy.grad = param.grad
            if not param.requires_grad:
                copy.requires_grad = False
            if not writeable:
                copy.base.flags.writeable = False
                copy.flags.writeable = False
            setattr(self, name, copy)

    @property
    def frozen(self):
        """Whether freeze() is in force (its read-only weight and bias still the module's)."""
        return self._frozen is not None

    def _frozen_packs(self, weight):
        """freeze()'s packed weights, for a call reading `weight`: None unless it is the
        frozen weight (or a view of it: a backward's forward may predate freeze()) and
        the parameters are still read-only (else freeze() has ended behind its back)."""
        packs, frozen = self._frozen, self.weight
        if packs is None or (weight is not frozen and (weight.base is None or weight.base is not frozen.base)):
            return None
        if any_writeable(frozen, self.bias):
            packs = self.__dict__["_frozen"] = None
        return packs

    def __getstate__(self):
        # (packed weights are keyed by plans, which hold functions: the copy packs anew)
        state = dict(self.__dict__)
        state["_frozen"] = None if self._frozen is None else {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _frozen=None)
        if state.get("_frozen") is not None:
            self.freeze()   # (pickled parameters come back writable)

    def reset_parameters(self, seed=None):
        """PyTorch's default: kaiming_uniform_(a=sqrt(5)) on the weight, and
        uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the bias."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), seed=rng)
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound, seed=rng)

    def _params(self):
        weight = F._weight(self.weight)
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if weight.shape != expected:
            raise ValueError(f"weight must have shape {expected}, got {weight.shape}")
        return weight, F._bias(self.bias, self.out_channels, weight.dtype)

    def _checked(self, x):
        """(x as C-contiguous (N, C, H, W), batched, weight, bias, Problem), validated; or
        what the last call validated, when x and the parameters are still contiguous
        arrays of the shapes and dtype it checked (small layers: the checks and lookups
        cost as much as the convolution)."""
        last, weight, bias = self._last, self.weight, self.bias
        if last is not None and same_arrays(x, last.x_shape, last.dtype, weight, last.w_shape, bias, last.b_shape):
            return (x if last.batched else x[None]), last.batched, weight, bias, last.problem
        weight, bias = self._params()
        x4, batched = input_array(x, self.in_channels, weight.dtype)
        p = self._cfg.problem(x4.shape, x4.dtype)
        self.__dict__["_last"] = _Checked(np.shape(x), weight, bias, batched, p)
        return x4, batched, weight, bias, p

    def forward(self, x):
        x, batched, weight, bias, p = self._checked(x)
        if not is_grad_enabled():
            # Inference (convgen.no_grad): nothing kept, so no copy of the input is made.
            y = F.run_inference(p, x, batched, weight, bias, self._frozen_packs(weight))
            self.__dict__["_saved"] = _NO_GRAD
            return y
        # A new forward ends the previous one's backward: its padded input is reused
        # (only once the input has been validated, so a failed call changes nothing).
        recycle = self._saved if self._saved is not _NO_GRAD else None
        # A weight that does not require grad gets no gradient from this forward (as in
        # torch, whose graph is made at the forward), so nothing is kept for one.
        y, self.__dict__["_saved"] = F.run_forward(p, x, batched, weight, bias, recycle=recycle,
                                                   keep_input=_requires_grad(self.weight))
        # The weight parameter's version (Parameter._version), for backward to check as
        # torch's autograd does: the input gradient reads the weight then, so a change in
        # place since would give the gradient of another layer.  (Only where the forward
        # read the parameter's own memory, itself or a plain view of it, not a copy.)
        param = self.weight
        self.__dict__["_saved_weight"] = (param, param._version) if (
            weight is param or (weight.base is not None and weight.base is param.base)) else None
        return y

    __call__ = forward

    def backward(self, grad_output, input_grad=True):
        """Input gradient of the last forward; adds into weight.grad and bias.grad, for
        the parameters whose requires_grad is True (as torch's).  input_grad=False skips
        the input gradient and returns None: a first layer's, whose input is data, as
        autograd skips it for an input that does not require grad."""
        if self._saved is None:
            raise RuntimeError("backward() called before forward(): there is no input to differentiate")
        if self._saved is _NO_GRAD:
            raise RuntimeError("backward() after a forward under convgen.no_grad(): that forward kept "
                               "nothing to differentiate")
        kept = self._saved_weight
        # (only the input gradient reads the forward's weight)
        if input_grad and kept is not None and kept[0]._version != kept[1]:
            raise RuntimeError(
                "the weight needed for the input gradient has been modified by an inplace operation "
                f"since the forward (its version is {kept[0]._version}; the forward's was {kept[1]}): "
                "run the forward again after changing it, as torch's autograd asks")
        need_weight = _requires_grad(self.weight) and self._saved.x is not None   # (see forward)
        need_bias = self.bias is not None and _requires_grad(self.bias)
        w_out, w_add = self._grad_buffer("weight") if need_weight else (None, False)
        b_out, b_add = self._grad_buffer("bias") if need_bias else (None, False)
        gx, gw, gb = F.backward(self._saved, grad_output, input_grad, need_weight, need_bias,
                                w_out, b_out, w_add, b_add, self._frozen_packs(self._saved.weight))
        if need_weight:
            self.weight.grad = gw    # the same array when it accumulated in place, as torch does
        if need_bias:
            self.bias.grad = gb
        return gx

    def _grad_buffer(self, name):
        """(array, accumulate) for the next gradient of parameter `name`: its .grad to
        add into; else the array zero_grad() took away, to overwrite, when nothing else
        still refers to it (fresh memory costs a page fault per 4 KiB, as much as the
        weight gradient itself on layers with large weights); else (None, False)."""
        param = getattr(self, name)
        spare = self._spare_grads.pop(name, None)
        if param.grad is not None:
            return _accumulator(param), True
        if (spare is not None and sys.getrefcount(spare) <= 2 and spare.shape == param.shape
                and spare.dtype == param.dtype):
            return spare, False
        return None, False

    def zero_grad(self, set_to_none=True):
        for name in ("weight", "bias"):   # (not named_parameters: a generator costs each step 0.25 us)
            p = getattr(self, name)
            if p is None:
                continue
            if set_to_none or p.grad is None:
                if isinstance(p.grad, np.ndarray) and p.grad.flags.c_contiguous and p.grad.flags.writeable:
                    self._spare_grads[name] = p.grad   # reused by backward if nobody keeps it
                p.grad = None
            else:
                p.grad[...] = 0

    def parameters(self):
        for _, param in self.named_parameters():
            yield param

    def requires_grad_(self, requires_grad=True):
        """Set requires_grad on weight and bias, as torch's; returns self."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
        return self

    def named_parameters(self, prefix=""):
        """(name, parameter) pairs: ("weight", ...) and, with a bias, ("bias", ...)."""
        yield prefix + "weight", self.weight
        if self.bias is not None:
            yield prefix + "bias", self.bias

    def state_dict(self, prefix="", keep_vars=False):
        """{"weight": ..., "bias": ...} (no "bias" without one), as torch's: the values
        share the parameters' memory, as plain arrays (the Parameters themselves with
        ``keep_vars=True``).  ``torch_conv.load_state_dict({k: torch.from_numpy(v) ...})``
        gives a torch.nn.Conv2d these weights."""
        return {name: (param if keep_vars else param.view(np.ndarray))
                for name, param in self.named_parameters(prefix)}

    def load_state_dict(self, state_dict, strict=True):
        """Copy "weight" (and "bias") from `state_dict` into the parameters, in place, as
        torch's does: arrays or torch tensors (``torch_conv.state_dict()`` itself), cast to
        the module's dtype.  Missing or unexpected keys raise RuntimeError with ``strict``
        (else they are returned); a shape that does not match raises either way.  Nothing
        is copied unless every entry can be.  The copies count as changes in place
        (Parameter._version: a backward of an earlier forward raises), and a frozen
        module's read-only parameters refuse them.  Returns
        ``IncompatibleKeys(missing_keys, unexpected_keys)``."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict).__name__}.")
        params = dict(self.named_parameters())
        missing = [name for name in params if name not in state_dict]
        unexpected = [key for key in state_dict.keys() if key not in params]
        errors, values = [], {}
        if strict:   # (torch's order: missing keys, unexpected keys, then each entry's error)
            if missing:
                errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ". ")
            if unexpected:
                errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ". ")
        for name, param in params.items():
            if name not in state_dict:
                continue
            value, error = _state_value(state_dict[name], name)
            if error is None and value.shape != param.shape:
                error = (f"size mismatch for {name}: copying a param with shape {value.shape} from checkpoint, "
                         f"the shape in current model is {param.shape}.")
            if error is None and not param.flags.writeable:
                error = (f"{name} is read-only: the module is frozen (Conv2d.freeze); "
                         "call unfreeze() before loading a state_dict")
            if error is not None:
                errors.append(error)
            else:
                values[name] = value
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors))
        for name, value in values.items():
            params[name][...] = value   # (Parameter.__setitem__: casts, and counts the change)
        return IncompatibleKeys(missing, unexpected)

    @property
    def kernel_name(self):
        """The generated forward kernel this module runs (see convgen.kernel_for)."""
        return self._cfg.kernel_name(self.dtype)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"
