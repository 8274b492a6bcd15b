"""The textbook NumPy convolution, written plainly: unfold patches (im2col), one
batched BLAS matmul; the backward pass multiplies by the transposes and folds
the column gradient back (col2im).  It is the "what you would write in NumPy"
baseline of the benchmarks, and a second, independent reference in the tests.

Shapes follow torch: x (N, C, H, W), w (OC, C/groups, kH, kW), pairs (h, w) for
stride, padding (symmetric, as nn.Conv2d's int/tuple padding) and dilation.
Non-zero padding modes pad with ``np.pad`` (reflect, edge, wrap) and fold the
gradient of the padding back into its source pixels.
"""

import numpy as np

# nn.Conv2d padding_mode -> np.pad mode
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Geometry:
    """Sizes of one convolution; everything the passes below need."""

    def __init__(self, x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
        self.N, self.C, self.H, self.W = x_shape
        self.OC, self.Cg, self.KH, self.KW = w_shape
        self.sh, self.sw = _pair(stride)
        self.ph, self.pw = _pair(padding)
        self.dh, self.dw = _pair(dilation)
        self.G = groups
        self.OCg = self.OC // groups
        self.mode = padding_mode
        self.Hp, self.Wp = self.H + 2 * self.ph, self.W + 2 * self.pw
        self.OH = (self.Hp - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.OW = (self.Wp - self.dw * (self.KW - 1) - 1) // self.sw + 1
        self.K = self.Cg * self.KH * self.KW   # rows of one group's column matrix
        self.L = self.OH * self.OW             # columns: output pixels


def pad(x, g):
    if g.ph == 0 and g.pw == 0:
        return x
    widths = ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw))
    return np.pad(x, widths, mode=PAD_MODES[g.mode])


def im2col(x, g):
    """x (N, C, H, W) -> columns (N, G, Cg*kH*kW, OH*OW), a contiguous copy."""
    xp = np.ascontiguousarray(pad(x, g))
    s0, s1, s2, s3 = xp.strides
    view = np.lib.stride_tricks.as_strided(
        xp, shape=(g.N, g.C, g.KH, g.KW, g.OH, g.OW),
        strides=(s0, s1, g.dh * s2, g.dw * s3, g.sh * s2, g.sw * s3), writeable=False)
    return view.reshape(g.N, g.G, g.K, g.L)  # reshape of a strided view copies


def col2im(cols, g):
    """Adjoint of im2col: columns (N, G, K, L) -> gradient of x (N, C, H, W)."""
    c = cols.reshape(g.N, g.C, g.KH, g.KW, g.OH, g.OW)
    gxp = np.zeros((g.N, g.C, g.Hp, g.Wp), dtype=cols.dtype)
    for i in range(g.KH):
        for j in range(g.KW):
            r0, c0 = i * g.dh, j * g.dw
            gxp[:, :, r0:r0 + g.sh * (g.OH - 1) + 1:g.sh, c0:c0 + g.sw * (g.OW - 1) + 1:g.sw] += c[:, :, i, j]
    return unpad(gxp, g)


def unpad(gxp, g):
    """Gradient on the padded input -> gradient of the input (padding folded back)."""
    if g.ph == 0 and g.pw == 0:
        return gxp
    if g.mode == "zeros":
        return np.ascontiguousarray(gxp[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W])
    # Which source pixel each padded position copies: pad an index grid the same way.
    src = pad(np.arange(g.H * g.W).reshape(1, 1, g.H, g.W), g).ravel()
    planes = g.N * g.C
    index = (np.arange(planes)[:, None] * (g.H * g.W) + src[None, :]).ravel()
    gx = np.bincount(index, weights=gxp.reshape(-1), minlength=planes * g.H * g.W)
    return gx.astype(gxp.dtype).reshape(g.N, g.C, g.H, g.W)


def _wmat(w, g):
    return w.reshape(g.G, g.OCg, g.K)


def forward(x, w, b, g):
    """y (N, OC, OH, OW) and the columns (kept for the weight gradient)."""
    cols = im2col(x, g)
    y = np.matmul(_wmat(w, g), cols)            # (N, G, OCg, L)
    y = y.reshape(g.N, g.OC, g.OH, g.OW)
    if b is not None:
        y += b.reshape(1, g.OC, 1, 1)
    return y, cols


def backward_data(gy, w, g):
    gyg = gy.reshape(g.N, g.G, g.OCg, g.L)
    gcols = np.matmul(_wmat(w, g).transpose(0, 2, 1), gyg)     # (N, G, K, L)
    return col2im(gcols, g)


def backward_weight(cols, gy, g):
    gyg = gy.reshape(g.N, g.G, g.OCg, g.L)
    gw = np.matmul(gyg, cols.transpose(0, 1, 3, 2)).sum(axis=0)  # (G, OCg, K)
    return gw.reshape(g.OC, g.Cg, g.KH, g.KW)


def backward(gy, w, cols, g):
    """(input, weight, bias) gradients, given the forward's columns."""
    return backward_data(gy, w, g), backward_weight(cols, gy, g), gy.sum(axis=(0, 2, 3))


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """One-call forward (for tests)."""
    g = Geometry(x.shape, w.shape, stride, padding, dilation, groups, padding_mode)
    return forward(x, w, b, g)[0]
