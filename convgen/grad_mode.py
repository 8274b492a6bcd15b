"""Gradient mode, as torch's: ``with convgen.no_grad(): y = conv(x)`` runs a forward
that keeps nothing for a backward (inference), so it skips the copy of the input
that the weight gradient would read.  The mode belongs to the Python thread.
(The state and the context managers' entry and exit are in C: convgen._layout.)"""

import contextlib

from . import _layout

__all__ = ["no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled"]

is_grad_enabled = _layout.grad_enabled


class _GradMode(_layout.GradMode, contextlib.ContextDecorator):
    """Sets the mode to `enabled` inside a with block or a decorated function, and
    puts back the mode it found (a stack, so a decorated function may recurse)."""

    enabled = True


class no_grad(_GradMode):
    """Context manager and decorator: forwards inside keep nothing for a backward."""

    enabled = False


class enable_grad(_GradMode):
    """Context manager and decorator: undoes no_grad inside it."""

    enabled = True


class set_grad_enabled(_GradMode):
    """Sets the mode at once; used as a context manager, restores the previous mode
    on leaving (as torch.set_grad_enabled)."""

    def __init__(self, mode):
        if not isinstance(mode, bool):
            raise TypeError(f"set_grad_enabled() takes a bool, got {type(mode).__name__}")
        self.enabled = mode
        self._set_now(mode)
