"""Parameter: an ndarray that carries a gradient, like torch.nn.Parameter."""

import numpy as np


class Parameter(np.ndarray):
    """An ``np.ndarray`` with a ``.grad`` attribute (``None`` until a backward pass).

    Arithmetic on a Parameter returns plain arrays, so ``w - lr * w.grad`` is an
    ordinary ndarray while ``w -= lr * w.grad`` updates the parameter in place (and
    counts in ``_version``: a module's backward raises if its forward's weight has been
    changed in place since, as torch's autograd does).
    """

    # (a class attribute rather than an __array_finalize__ that sets it: views and slices,
    # which the kernels' callers take, then run no Python)
    grad = None
    # Whether a module's backward computes this parameter's gradient (torch's flag: False
    # leaves .grad as it is, e.g. for a layer frozen while others train).
    requires_grad = True
    # How many times its values were changed in place through NumPy's in-place operators
    # (``w -= lr * w.grad``, ``np.add(w, d, out=w)``), item assignment (``w[0] = 0``) or
    # ``fill``, on the parameter or on a view of it: torch's version counter, which a
    # module's backward checks (see Conv2d.backward).  Writes that go around these
    # (``np.copyto``, another array over the same memory) are not counted.
    _version = 0

    def __new__(cls, data, dtype=None):
        obj = np.array(data, dtype=dtype, copy=True, order="C").view(cls)
        obj.grad = None
        return obj

    def __array_wrap__(self, array, context=None, return_scalar=False):
        if return_scalar:
            return array[()]
        if array is self:  # an in-place ufunc (w -= lr * w.grad) keeps the Parameter
            _changed(self)
            return self
        return array.view(np.ndarray) if isinstance(array, Parameter) else array

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        _changed(self)

    def fill(self, value):
        super().fill(value)
        _changed(self)

    def requires_grad_(self, requires_grad=True):
        """Set requires_grad, as torch's; returns self."""
        self.requires_grad = bool(requires_grad)
        return self

    def __repr__(self):
        body = np.array2string(self.view(np.ndarray), separator=", ", prefix="Parameter(")
        return f"Parameter({body}, dtype={self.dtype})"

    def __reduce__(self):
        # Pickle as an ndarray plus the gradient and the version (a module's pickled
        # forward compares its weight's version at the backward).
        return (_rebuild_parameter, (self.view(np.ndarray).copy(), self.grad, owner(self)._version,
                                     self.requires_grad))


def owner(a):
    """The Parameter whose memory a is (a itself, or the one a Parameter view of it was
    taken from), or None for any other array: the one whose _version counts its changes."""
    found = None
    while a is not None:
        if isinstance(a, Parameter):
            found = a
        a = getattr(a, "base", None)
    return found


def _changed(p):
    """Count a change in place of Parameter p's values (on its owner, if p is a view)."""
    p = owner(p)
    p._version += 1


def _rebuild_parameter(data, grad, version=0, requires_grad=True):
    p = Parameter(data)
    p.grad = grad
    if not requires_grad:
        p.requires_grad = False
    if version:
        p._version = version
    return p
