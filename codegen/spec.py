"""KernelSpec: what one generated kernel is specialised on, and its name.

Naming lives here and only here: ``conv2d_fwd_f32_k3x3_s1_d1_dense``, with ``any``
for an axis the kernel takes at run time (``conv2d_bwd_data_f64_kany_sany_dany_grouped``).
The generator, the dispatch table, the test ids and the benchmarks all use it.
"""

from dataclasses import dataclass, field
from typing import Optional

from .target import AVX512, ITEMSIZE, Target

DIRECTIONS = ("fwd", "bwd_data", "bwd_weight")
DTYPES = ("f32", "f64")
GROUPS_KINDS = ("dense", "depthwise", "grouped")

# The C / NumPy names of each dtype (a vector's lanes: KernelSpec.lanes, from its target).
C_TYPES = {"f32": "float", "f64": "double"}
NUMPY_DTYPES = {"f32": "float32", "f64": "float64"}

ANY = None  # an axis the kernel receives at run time


def _axis(value):
    return "any" if value is ANY else str(value)


@dataclass(frozen=True)
class KernelSpec:
    """One generated kernel.  ``kernel``, ``stride`` and ``dilation`` are square
    (the same along H and W) compile-time constants, or ``ANY``.  ``target``: the vector
    unit it is generated for (codegen.target), which sizes its register tiles; not part
    of its name or key (a build has one target)."""

    direction: str
    dtype: str
    kernel: Optional[int]
    stride: Optional[int]
    dilation: Optional[int]
    groups: str
    target: Target = field(default=AVX512, compare=False, repr=False)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.groups not in GROUPS_KINDS:
            raise ValueError(f"groups must be one of {GROUPS_KINDS}, got {self.groups!r}")
        for axis in ("kernel", "stride", "dilation"):
            value = getattr(self, axis)
            if value is not ANY and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{axis} must be a positive int or ANY, got {value!r}")

    @property
    def name(self):
        k = "kany" if self.kernel is ANY else f"k{self.kernel}x{self.kernel}"
        return (f"conv2d_{self.direction}_{self.dtype}_{k}"
                f"_s{_axis(self.stride)}_d{_axis(self.dilation)}_{self.groups}")

    @property
    def key(self):
        """The normalised dispatch key (see convgen._dispatch.normalise_key)."""
        return (self.direction, self.dtype, self.kernel, self.stride, self.dilation, self.groups)

    @property
    def is_generic(self):
        """Some axis is taken at run time."""
        return self.kernel is ANY or self.stride is ANY or self.dilation is ANY

    @property
    def unrolls_taps(self):
        """Whether the kernel's loop over taps is unrolled at compile time: the taps'
        weight indices and their order must be known.  Forward: a fixed kernel size
        (stride and dilation only change the offsets).  Input gradient: a fixed kernel
        and stride, and a fixed dilation unless stride is 1 (a single phase).  The
        weight gradient reads its taps at run time in every case."""
        if self.direction == "fwd":
            return self.kernel is not ANY
        if self.direction == "bwd_data":
            return (self.kernel is not ANY and self.stride is not ANY
                    and (self.stride == 1 or self.dilation is not ANY))
        return False

    @property
    def module(self):
        """Extension module that holds this kernel: one per direction and dtype."""
        return f"_{self.direction}_{self.dtype}"

    @property
    def tile(self):
        """Register tile (rows, cols) of accumulators.

        fwd / bwd_data: rows = output channels, cols = vectors of output pixels;
        the weight is broadcast and the input loaded contiguously.
        bwd_weight: rows = output channels, cols = (input channel, tap) pairs;
        both operands are vectors of pixels, reduced horizontally at the end.
        """
        kk = None if self.kernel is ANY else self.kernel * self.kernel
        # (16 registers, AVX2: about 12 accumulators, half the columns)
        wide = self.target.wide
        if self.direction == "bwd_weight":
            if self.groups == "depthwise":
                if kk is None:
                    return (1, 8)
                return (1, kk if kk <= (16 if wide else 9) else self.kernel)
            return (4, 6 if wide else 3)
        if self.groups == "depthwise":
            return (1, 4)
        if self.groups == "grouped":
            return (4, 6 if wide else 3)   # ResNeXt-style groups have few output channels each
        return (6, 4 if wide else 2)

    @property
    def tiles(self):
        """Every register tile compiled for this kernel, the primary (``tile``) first.
        Dense bwd_data kernels also get a 3-row tile, which the runtime picks when
        the output channels (e.g. an RGB input's gradient) would leave most rows of
        the primary tile idle; so do the float32 dense forward kernels that output layers
        use, for 1-3 output channels (an RGB or one-channel output layer, a head of few
        classes): 1x1, 3x3 at stride and dilation 1 and the generic kernel (64 -> 3 3x3 at
        128x128 1.28x faster, 32 -> 3 9x9 at 256x256 1.43x, one output channel 1.30x, 2
        threads).  (The variant costs the cold build about 5% per dtype on every such
        kernel: float64 has none, nor do the other fixed kernels, which run those layers
        on their primary tiles.)"""
        few, many = ((3, 8), (8, 3)) if self.target.wide else ((3, 4), (4, 3))
        if self.direction == "bwd_data" and self.groups == "dense":
            return [self.tile, few, many]
        if self.direction == "fwd" and self.groups == "dense":
            output_layer = self.kernel == 1 or self.kernel is ANY or (self.kernel, self.stride, self.dilation) == (3, 1, 1)
            return [self.tile, many] + ([few] if output_layer and self.dtype == "f32" else [])
        return [self.tile]

    @property
    def in_place(self):
        """Whether the pixel tiles can read a 1x1 layer's input itself rather than padded
        planes (dense forward, 1x1, stride 1): each tile then has a twin whose loads stop
        at a plane's last pixel, for the last chunks, since the input has no slack past
        its planes (see convgen._engine.IN_PLACE), and dot products over the channels for
        the few pixels past a plane's whole chunks (IN_PLACE_LEFTOVER)."""
        return self.direction == "fwd" and self.groups == "dense" and self.kernel == 1 and self.stride == 1

    @property
    def cvec_tile(self):
        """Channel-vector register tile (pixels, vectors) of dense forward and input-gradient
        kernels, or None: `pixels` output pixels, each broadcast from the input (held in
        blocks of `lanes` channels, pixel-major), times `vectors` vectors of output
        channels from weights packed per call.  Its tiles can start at each output row,
        skipping the flat grid's scratch columns (see convgen._engine for when it runs).
        The generic kernels loop over their taps at run time (the input gradient's over
        each phase's)."""
        if self.groups != "dense" or self.direction == "bwd_weight":
            return None
        return (14, 2) if self.target.wide else (6, 2)

    @property
    def cvec_narrow(self):
        """Pixels of the channel-vector tile's narrower twins, narrowest first, or ().  A
        row tile runs the narrowest twin that holds its pixels: 6 for the edge columns
        whose taps read padding (DeepLab's ASPP at rate 6, 33-pixel rows: 6 + 14 + 7 + 6,
        its edge tiles skipping a column of taps) and a row's last few pixels, 7 for
        Inception's 35-pixel rows (14 + 14 + 7) and 7x7 maps, 8 for whole rows of 8x8
        maps (CIFAR ResNet's last stage: 64 pixels computed where the flat grid of
        10-pixel rows computes 84; forward 1.28x, backward 1.13x on 2 threads).  float32
        only has the 8: each twin costs the cold build about 3% per dtype."""
        if self.cvec_tile is None:
            return ()
        if not self.target.wide:
            return (3, 4, 5) if self.dtype == "f32" else (3, 4)   # (AVX2's 6-pixel tile)
        return (6, 7, 8) if self.dtype == "f32" else (6, 7)

    @property
    def cvec_pairs(self):
        """Pixels per row of the channel-vector tile's row-pair twins (forward only): a
        narrow twin that runs two rows at once, so that each packed weight vector it
        loads feeds as many pixels as the wide tile's (DeepLab's ASPP: its 6- and 7-pixel
        edge tiles, half of each row; its kernel 1.04x on 2 threads).  Only the twins
        whose two rows fit the wide tile's accumulators (8 would need 32 of the 32
        registers).  float32 only: the twins cost the cold build 10% per dtype."""
        if self.cvec_tile is None or self.direction != "fwd" or self.dtype != "f32":
            return []
        return [n for n in self.cvec_narrow if 2 * n <= self.cvec_tile[0]]

    @property
    def ocvec_tile(self):
        """Register tile (vectors of output channels, columns) of the dense weight
        gradient's channel-vectorised form (``_ocvec``), or None."""
        if self.direction != "bwd_weight" or self.groups != "dense":
            return None
        return (2, 12 if self.target.wide else 6)

    @property
    def icvec_tiles(self):
        """Register tiles (output channels, columns) of the dense weight gradient's form
        vectorised over input channels (``_icvec``), for layers with too few output
        channels for ``ocvec_tile``; empty elsewhere.  Each column is a vector of input
        channels at one tap; the output channels' gradients are broadcast.  The 3-row
        tile serves layers with few output channels (an RGB output layer's 3), whose rows
        the 8-row one would mostly leave idle: the plan takes the one that wastes least."""
        if self.direction != "bwd_weight" or self.groups != "dense":
            return []
        return [(8, 3), (3, 8)] if self.target.wide else [(4, 3), (3, 4)]

    @property
    def other_tiles(self):
        """The tiles besides ``tile`` that the runtime may pick, as short labels."""
        labels = []
        if self.cvec_tile:
            labels.append("channel-vector {}x{} (narrow {})".format(*self.cvec_tile, ", ".join(map(str, self.cvec_narrow))))
        if self.ocvec_tile:
            labels.append("by-channel {}x{}".format(*self.ocvec_tile))
        labels += ["by-input-channel {}x{}".format(*t) for t in self.icvec_tiles]
        labels += ["rows {}x{}".format(*b) for b in self.row_blocks]
        if self.channel_block:
            labels.append("channel-block {}x{}".format(*self.channel_block))
        labels += ["{}x{}".format(*t) for t in self.tiles[1:]]
        if self.in_place:
            labels.append("masked twins and dot products (input in place)")
        return labels

    @property
    def row_blocks(self):
        """Row-block tiles (rows, vectors) of depthwise forward kernels with every axis
        fixed (empty elsewhere): `rows` output rows x `vectors` vectors along a row, one
        channel.  Adjacent rows share input rows, so each input vector loaded serves
        every tap row that reads it (a pixel tile loads one vector per multiply-add).
        (A narrow 8x1 block for small maps measured no faster than the pixel tiles.  AVX2's
        is 4x1: 4x2, with the taps as vectors too, measured 0.91-0.98x in training forwards
        of MobileNetV2's 3x3 layers.)"""
        if self.direction != "fwd" or self.groups != "depthwise" or self.is_generic:
            return []
        return [(4, 4 if self.target.wide else 1)]

    @property
    def channel_block(self):
        """Channel-block tile (pixels, vectors) of depthwise forward kernels with every
        axis fixed, or None: `pixels` output pixels along a row x one vector of
        channels, from a per-thread copy of lanes-many channels laid out pixel-major
        (each pixel a vector of channels).  Every multiply-add is a full vector whatever
        the map's width, where the per-channel tiles spend most of a 7x7 map's time
        on overhead; it runs when nothing is kept for a backward (see ForwardPlan).
        Stride-2 input-gradient kernels have one too: each input pixel sums the taps
        its parity reaches, from grad_output's pixel-major copy.  Weight-gradient
        kernels of up to 5x5 have (lanes, taps): every tap's sum over the pixels for a
        vector of channels, in registers, from both operands' pixel-major copies."""
        if self.groups != "depthwise" or self.is_generic:
            return None
        if self.direction == "bwd_weight":
            # (a sum per tap in registers: 25 for 5x5 in AVX-512's 32, 9 in AVX2's 16)
            return (self.lanes, self.kernel ** 2) if self.kernel <= (5 if self.target.wide else 3) else None
        if self.direction == "bwd_data" and (self.stride != 2 or self.dilation != 1):
            return None  # (stride 1 runs as the forward's, see convgen._engine)
        return (self.lanes, 1)

    @property
    def lanes(self):
        return self.target.lanes(self.dtype)

    @property
    def itemsize(self):
        return ITEMSIZE[self.dtype]

    @property
    def ctype(self):
        return C_TYPES[self.dtype]
