"""A plain NumPy float64 reference for 2D convolution and its gradients.

Written for clarity, independently of convgen's engine, geometry and kernels
(nothing here imports them), so that the tests compare two different
derivations of the same numbers.  Semantics are PyTorch's (``nn.Conv2d`` with
``padding_mode``, ``torch.nn.functional.conv2d``, ``torch.nn.grad``):

* padding is ``np.pad`` with mode constant / reflect / edge / wrap for
  ``"zeros"`` / ``"reflect"`` / ``"replicate"`` / ``"circular"``;
* ``"same"`` puts ``total // 2`` at the top/left and the rest at the bottom/right,
  with ``total = dilation * (kernel - 1)``;
* the convolution is a cross-correlation summed over the taps: for tap
  ``(i, j)`` the strided window of the padded input starting at
  ``(i * dilation_h, j * dilation_w)`` is contracted with ``weight[..., i, j]``
  over the input channels of each group (``einsum``).

The backward pass is the adjoint of each step, tap by tap: the input gradient
scatters ``grad_output`` through each tap's window into a padded-size buffer,
then applies the transpose of the padding (for reflect/replicate/circular the
halo adds back into the source pixels it was copied from).  That transpose is
built by padding an identity matrix with ``np.pad``, so it is the exact adjoint
of the padding used in the forward pass, whatever the mode.

Everything is computed in float64 and returned as float64.
"""

import numpy as np

__all__ = ["NP_PAD_MODES", "pads_for", "pad", "pad_matrix", "unpad_adjoint", "output_hw",
           "conv2d", "conv2d_backward", "conv2d_input", "conv2d_weight", "conv2d_bias"]

NP_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _pair(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def pads_for(padding, kernel_size, dilation=1):
    """(top, bottom, left, right) for an int, a pair, 'valid' or 'same'."""
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def pad(x, pads, mode="zeros"):
    """Pad the last two axes of x by pads = (top, bottom, left, right)."""
    top, bottom, left, right = pads
    widths = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return np.pad(x, widths, mode=NP_PAD_MODES[mode])


def pad_matrix(n, before, after, mode="zeros"):
    """The (n + before + after, n) 0/1 matrix P with pad(v) == P @ v along one axis."""
    return np.pad(np.eye(n), ((before, after), (0, 0)), mode=NP_PAD_MODES[mode])


def unpad_adjoint(g, hw, pads, mode="zeros"):
    """Transpose of ``pad``: a gradient over the padded plane -> over the input plane.
    Halo pixels add into the pixels they were copied from (zeros: dropped)."""
    H, W = hw
    top, bottom, left, right = pads
    ph = pad_matrix(H, top, bottom, mode)
    pw = pad_matrix(W, left, right, mode)
    return ph.T @ g @ pw   # sum over p, q of ph[p, h] * g[..., p, q] * pw[q, w]


def output_hw(hw, kernel_size, stride, pads, dilation):
    """PyTorch's output-size formula."""
    (H, W), (kh, kw), (sh, sw), (dh, dw) = hw, _pair(kernel_size), _pair(stride), _pair(dilation)
    top, bottom, left, right = pads
    return ((H + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (W + left + right - dw * (kw - 1) - 1) // sw + 1)


class _Geometry:
    """Shapes of one convolution, and the window each tap reads."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups, padding_mode):
        self.N, self.C, self.H, self.W = x_shape
        self.OC, cg, self.KH, self.KW = w_shape
        self.G = int(groups)
        if self.C != cg * self.G or self.OC % self.G:
            raise ValueError(f"channels do not match: input {x_shape}, weight {w_shape}, groups {groups}")
        self.Cg, self.OCg = cg, self.OC // self.G
        self.sh, self.sw = _pair(stride)
        self.dh, self.dw = _pair(dilation)
        self.pads = pads_for(padding, (self.KH, self.KW), (self.dh, self.dw))
        self.mode = padding_mode
        self.OH, self.OW = output_hw((self.H, self.W), (self.KH, self.KW), (self.sh, self.sw),
                                     self.pads, (self.dh, self.dw))
        if self.OH < 1 or self.OW < 1:
            raise ValueError("the kernel is larger than the padded input")
        top, bottom, left, right = self.pads
        self.padded_hw = (self.H + top + bottom, self.W + left + right)

    def taps(self):
        """(i, j, window): window indexes the padded plane's rows/cols read by tap (i, j)."""
        for i in range(self.KH):
            r0 = i * self.dh
            rows = slice(r0, r0 + self.sh * (self.OH - 1) + 1, self.sh)
            for j in range(self.KW):
                c0 = j * self.dw
                cols = slice(c0, c0 + self.sw * (self.OW - 1) + 1, self.sw)
                yield i, j, (Ellipsis, rows, cols)

    def grouped_x(self, a):
        """(N, C, h, w) -> (N, G, C/G, h, w)."""
        return a.reshape(a.shape[0], self.G, self.Cg, *a.shape[2:])

    def grouped_y(self, a):
        """(N, OC, h, w) -> (N, G, OC/G, h, w)."""
        return a.reshape(a.shape[0], self.G, self.OCg, *a.shape[2:])

    def grouped_w(self, w):
        """(OC, C/G, KH, KW) -> (G, OC/G, C/G, KH, KW)."""
        return w.reshape(self.G, self.OCg, self.Cg, self.KH, self.KW)


def _batched(x):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        return x[None], False
    if x.ndim != 4:
        raise ValueError(f"expected a 3D or 4D array, got shape {x.shape}")
    return x, True


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Forward pass: (N, C, H, W) or (C, H, W) -> (N, OC, OH, OW) or (OC, OH, OW), float64."""
    x, batched = _batched(x)
    w = np.asarray(weight, dtype=np.float64)
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation, groups, padding_mode)
    xp = geo.grouped_x(pad(x, geo.pads, padding_mode))
    wg = geo.grouped_w(w)
    y = np.zeros((geo.N, geo.G, geo.OCg, geo.OH, geo.OW))
    for i, j, window in geo.taps():
        y += np.einsum("ngchw,goc->ngohw", xp[window], wg[..., i, j])
    y = y.reshape(geo.N, geo.OC, geo.OH, geo.OW)
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return y if batched else y[0]


def conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros"):
    """Gradient with respect to the input, shape input_size (3 or 4 entries)."""
    size = tuple(int(s) for s in input_size)
    batched = len(size) == 4
    if not batched:
        size = (1,) + size
    gy, _ = _batched(grad_output)
    w = np.asarray(weight, dtype=np.float64)
    geo = _Geometry(size, w.shape, stride, padding, dilation, groups, padding_mode)
    if gy.shape != (geo.N, geo.OC, geo.OH, geo.OW):
        raise ValueError(f"grad_output has shape {gy.shape}, expected {(geo.N, geo.OC, geo.OH, geo.OW)}")
    gyg = geo.grouped_y(gy)
    wg = geo.grouped_w(w)
    gxp = np.zeros((geo.N, geo.G, geo.Cg) + geo.padded_hw)
    for i, j, window in geo.taps():
        gxp[window] += np.einsum("ngohw,goc->ngchw", gyg, wg[..., i, j])
    gxp = gxp.reshape((geo.N, geo.C) + geo.padded_hw)
    gx = unpad_adjoint(gxp, (geo.H, geo.W), geo.pads, padding_mode)
    return gx if batched else gx[0]


def conv2d_weight(x, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1,
                  padding_mode="zeros"):
    """Gradient with respect to the weight, shape weight_size."""
    x, _ = _batched(x)
    gy, _ = _batched(grad_output)
    wsize = tuple(int(s) for s in weight_size)
    geo = _Geometry(x.shape, wsize, stride, padding, dilation, groups, padding_mode)
    if gy.shape != (geo.N, geo.OC, geo.OH, geo.OW):
        raise ValueError(f"grad_output has shape {gy.shape}, expected {(geo.N, geo.OC, geo.OH, geo.OW)}")
    xp = geo.grouped_x(pad(x, geo.pads, padding_mode))
    gyg = geo.grouped_y(gy)
    gw = np.zeros((geo.G, geo.OCg, geo.Cg, geo.KH, geo.KW))
    for i, j, window in geo.taps():
        gw[..., i, j] = np.einsum("ngohw,ngchw->goc", gyg, xp[window])
    return gw.reshape(wsize)


def conv2d_bias(grad_output):
    """Gradient with respect to the bias: grad_output summed over batch and pixels."""
    gy, _ = _batched(grad_output)
    return gy.sum(axis=(0, 2, 3))


def conv2d_backward(x, weight, grad_output, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros"):
    """(grad_input, grad_weight, grad_bias) of conv2d at x, weight for grad_output."""
    x64 = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    args = (stride, padding, dilation, groups, padding_mode)
    gx = conv2d_input(x64.shape, w, grad_output, *args)
    gw = conv2d_weight(x64, w.shape, grad_output, *args)
    return gx, gw, conv2d_bias(grad_output)
