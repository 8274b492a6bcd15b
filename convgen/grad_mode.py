"""Gradient mode, as torch's: ``with convgen.no_grad(): y = conv(x)`` runs a forward
that keeps nothing for a backward (inference), so it skips the copy of the input
that the weight gradient would read.  The mode belongs to the Python thread."""

import contextlib
import threading

__all__ = ["no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled"]

_state = threading.local()


def is_grad_enabled():
    """Whether Conv2d.forward keeps what its backward needs (True unless in no_grad)."""
    return getattr(_state, "enabled", True)


class _GradMode(contextlib.ContextDecorator):
    """Sets the mode to `enabled` inside a with block or a decorated function, and
    puts back the mode it found (a stack, so a decorated function may recurse)."""

    enabled = True

    def __enter__(self):
        self.__dict__.setdefault("_outer", []).append(self._mode_to_restore())
        _state.enabled = self.enabled
        return self

    def _mode_to_restore(self):
        return is_grad_enabled()

    def __exit__(self, *exc):
        _state.enabled = self._outer.pop()
        return False


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
        self._before = is_grad_enabled()   # what the first with block restores
        _state.enabled = mode

    def _mode_to_restore(self):
        before = self.__dict__.pop("_before", None)
        return is_grad_enabled() if before is None else before
