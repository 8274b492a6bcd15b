"""Parameter: an ndarray that carries a gradient, like torch.nn.Parameter."""

import numpy as np


class Parameter(np.ndarray):
    """An ``np.ndarray`` with a ``.grad`` attribute (``None`` until a backward pass).

    Arithmetic on a Parameter returns plain arrays, so ``w - lr * w.grad`` is an
    ordinary ndarray while ``w -= lr * w.grad`` updates the parameter in place.
    """

    # (a class attribute rather than an __array_finalize__ that sets it: views and slices,
    # which the kernels' callers take, then run no Python)
    grad = None

    def __new__(cls, data, dtype=None):
        obj = np.array(data, dtype=dtype, copy=True, order="C").view(cls)
        obj.grad = None
        return obj

    def __array_wrap__(self, array, context=None, return_scalar=False):
        if return_scalar:
            return array[()]
        if array is self:  # an in-place ufunc (w -= lr * w.grad) keeps the Parameter
            return self
        return array.view(np.ndarray) if isinstance(array, Parameter) else array

    def __repr__(self):
        body = np.array2string(self.view(np.ndarray), separator=", ", prefix="Parameter(")
        return f"Parameter({body}, dtype={self.dtype})"

    def __reduce__(self):
        # Pickle as an ndarray plus the gradient.
        return (_rebuild_parameter, (self.view(np.ndarray).copy(), self.grad))


def _rebuild_parameter(data, grad):
    p = Parameter(data)
    p.grad = grad
    return p
