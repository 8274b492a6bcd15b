"""Index arithmetic shared by the code generator and the runtime.

Every kernel in convgen is a *flat correlation*: output pixel ``q`` of an
"extended" grid (rows of a fixed width, the columns past the true output width
are scratch) reads input element ``q + offset(tap)`` of a plane.  Strides and
dilations are turned into that form by splitting the padded input into
``stride_h * stride_w`` phase planes, so every load in a kernel is contiguous.

This module is pure Python with no imports from convgen, so that ``codegen``
can load it by path at build time (before any extension is compiled).
"""

from collections import namedtuple

# One term of a flat correlation: weight tap index (kh * KW + kw), input phase
# plane, and the row / column offset inside that plane.
Tap = namedtuple("Tap", "w_index plane dy dx")


def forward_taps(kh, kw, sh, sw, dh, dw):
    """Taps of the forward pass: padded input row s*oh + k*d lives in phase
    plane (k*d) % s at row oh + (k*d) // s."""
    taps = []
    for i in range(kh):
        for j in range(kw):
            plane = (i * dh % sh) * sw + (j * dw % sw)
            taps.append(Tap(i * kw + j, plane, i * dh // sh, j * dw // sw))
    return taps


def bwd_data_halo(kh, kw, sh, sw, dh, dw):
    """Rows/columns of zeros put above/left of grad_output so that every
    input-gradient tap reads at a non-negative offset."""
    return (kh - 1) * dh // sh, (kw - 1) * dw // sw


def bwd_data_phases(kh, kw, sh, sw, dh, dw):
    """Taps of the input gradient, one list per phase (a, b) of the padded
    input: gx_pad[s*i + a, s*j + b] sums w[.., kh, kw] * gy[i - (kh*d)//s, ...]
    over the taps with (kh*d) % s == a and (kw*d) % s == b.  No zeros are
    inserted between grad_output pixels; a phase may have no taps at all."""
    top, left = bwd_data_halo(kh, kw, sh, sw, dh, dw)
    phases = []
    for a in range(sh):
        for b in range(sw):
            taps = []
            for i in range(kh):
                if i * dh % sh != a:
                    continue
                for j in range(kw):
                    if j * dw % sw != b:
                        continue
                    taps.append(Tap(i * kw + j, 0, top - i * dh // sh, left - j * dw // sw))
            phases.append(taps)
    return phases


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def ceil_div(a, b):
    return -(-a // b)
