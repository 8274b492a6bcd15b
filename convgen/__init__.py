"""convgen: PyTorch's nn.Conv2d for NumPy arrays on the CPU, computed by generated,
OpenMP-parallel Cython kernels.  See README.md and the contract in API.md."""

import numpy as np


def _share_torch_openmp():
    """Some torch wheels vendor libgomp renamed (torch/lib/libgomp-<hash>.so.1).  If
    torch loads that copy after convgen, each library runs its own OpenMP thread pool,
    and each pool's idle threads spin on the cores the other's need (see
    examples/OPENMP.md).  Loading torch's copy first, into the global symbol scope,
    binds convgen's extensions to it, and torch reuses it: one runtime, one pool.
    Nothing to do without torch, or when its libgomp keeps the name libgomp.so.1
    (the dynamic loader then shares it with convgen whichever comes first)."""
    import importlib.util
    import os
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        spec = importlib.util.find_spec("torch")
        libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
        names = sorted(n for n in os.listdir(libdir) if n.startswith("libgomp-") and ".so" in n)
    except (ImportError, ValueError, AttributeError, TypeError, IndexError, OSError):
        return
    if names:
        import ctypes
        try:
            ctypes.CDLL(os.path.join(libdir, names[0]), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass


_share_torch_openmp()  # before the first extension module loads

from . import functional, init
from . import _engine, _layout
from .conv import Conv2d
from .functional import output_size
from .grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from ._validate import dtype_arg
from .parameter import Parameter

__version__ = "0.1.0"
__all__ = ["Conv2d", "Parameter", "functional", "init", "output_size", "kernel_for",
           "set_num_threads", "get_num_threads", "set_flush_denormal", "no_grad", "enable_grad",
           "set_grad_enabled", "is_grad_enabled"]


def set_num_threads(n):
    """Threads for convgen's kernels, for every Python thread (like torch.set_num_threads).
    Until it is called, convgen follows OpenMP's setting: OMP_NUM_THREADS, or the
    limits threadpoolctl sets."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be a positive int, got {n!r}")
    _engine.set_num_threads(n)


def get_num_threads():
    """Threads convgen's kernels use (single-thread calls for tiny layers aside)."""
    return _engine.get_num_threads()


def kernel_for(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
               dtype=np.float32, direction="fwd"):
    """Name of the generated kernel that runs a convolution with these parameters.

    direction: "fwd", "bwd_data" (input gradient) or "bwd_weight" (weight gradient).
    """
    cfg = functional.Config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
    return cfg.kernel_name(dtype_arg(dtype), direction)


def set_flush_denormal(mode):
    """Flush denormal (subnormal) numbers to zero, or not, like torch.set_flush_denormal:
    sets the calling thread's floating-point mode (NumPy's and Python's float arithmetic
    on this thread follow it too).  convgen's kernels compute in the mode of the thread
    that calls them, on all their threads, whoever set it (torch.set_flush_denormal too).

    Off by default, as in PyTorch.  On, a layer whose input, weights or gradients hold
    denormals (below 1.2e-38 in float32, 2.2e-308 in float64) runs at its usual speed
    instead of 100-200 times slower, dropping only the terms that are denormal or a
    denormal times a weight.  Returns False, changing nothing, where the CPU has no such
    mode (other than x86 and 64-bit ARM)."""
    if not isinstance(mode, (bool, np.bool_)):
        raise TypeError(f"set_flush_denormal expects a bool, got {type(mode).__name__}")
    return _layout.set_flush_denormal(bool(mode))
