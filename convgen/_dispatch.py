"""Dispatch by dictionary on a normalised key, with a generic fallback.

The table itself is generated from codegen/table.py (convgen/_generated/dispatch_table.py);
this module normalises a problem to a key, looks it up, and falls back to the
generic kernel of the same direction, dtype and groups kind.
"""

import importlib
from functools import lru_cache
from typing import Callable, NamedTuple

from . import _layout
from ._generated.dispatch_table import ANY, KERNELS, LANES, TARGET, VECTOR_BYTES


def _check_vector_bytes(module, compiled):
    """The generated code and the header agree on the vector width (a module compiled with
    another CG_VECTOR_BYTES than its kernels were generated for would compute garbage)."""
    if compiled != VECTOR_BYTES:
        raise ImportError(f"{module} was compiled for {compiled}-byte vectors, the kernels generated for "
                          f"{VECTOR_BYTES} ({TARGET}): rebuild convgen (python setup.py build_ext --inplace)")


_check_vector_bytes("convgen._layout", _layout.VECTOR_BYTES)

DIRECTIONS = ("fwd", "bwd_data", "bwd_weight")


class Kernel(NamedTuple):
    name: str
    run: Callable
    tile: tuple     # primary register tile (rows, cols)
    chunk: int      # output pixels per primary tile (fwd / bwd_data); 0 for bwd_weight
    variants: tuple  # (rows, cols, chunk) of every compiled tile, primary first
    fused: Callable  # forward variant with the padding fused in (ForwardPlan.fused), or None
    ocvec: Callable  # channel-vectorised variant (dense weight gradient), or None
    ocvec_chunks: Callable  # the same, split over pixels (weight gradients small beside the data), or None
    cvec: tuple      # (tile index, pixels, channels per block, its narrower twins' pixels, widest
                     # row pair's pixels) of the channel-vector tile (CVEC_TILES), or None
    pack: Callable   # packs weights for the channel-vector tile (its module's pack_weights), or None
    row_blocks: tuple  # (output rows, pixels per row) of each row-block tile (depthwise forward)
    cblock: Callable  # channel-block variant (depthwise forward, nothing kept), or None
    pad_blocked: Callable  # copies input into the channel-vector tile's layout (its module's pad_blocked)
    ocvec_columns: int  # columns per tile of ocvec / ocvec_chunks (0 without them)
    ocvec_fields: tuple  # the fields after the columns in a row of their tile table
    in_place: bool   # its pixel tiles can read a 1x1 layer's input in place (run's in_place)
    icvec: Callable  # the dense weight gradient vectorised over input channels (few output channels), or None
    icvec_tiles: tuple  # (rows, columns) of each tile icvec can run (empty without it)
    bias_sums: bool  # its run() sums the bias gradient too (run's bias_grad: depthwise weight gradients)

    def pick_tile(self, out_rows, pixels):
        """Index of the compiled tile that costs least on `out_rows` output channels by
        `pixels` flat output pixels (rows past the end are repeated, pixels padded to
        whole chunks), the primary on a tie.  Returns (index, chunk).  A tile's cost per
        multiply-add counts its loads: a vector of input (often split over two cache
        lines) as two weight broadcasts.  (Measured, 2 threads: the 8x3 tile as fast as
        the 6x4 or faster, e.g. 1.14x on ResNet's 14x14 3x3 layers, forward and input
        gradient; the 3x8 1.25-1.4x slower.)"""
        best = min(range(len(self.variants)), key=lambda i: (self.tile_cost(i, out_rows, pixels), i))
        return best, self.variants[best][2]

    def tile_cost(self, i, out_rows, pixels, extra_pixels=0):
        """pick_tile's cost of compiled tile i on out_rows x pixels, both rounded up to
        whole tiles, plus extra_pixels (per output row) at the price of a tile's pixel."""
        rows, cols, chunk = self.variants[i]
        padded = -(-out_rows // rows) * rows * (-(-pixels // chunk) * chunk + extra_pixels)
        return padded * (2 * cols + rows) / (rows * cols)

    def pick_tile_leftover(self, out_rows, pixels, max_left, left_price):
        """As pick_tile, for tiles that stop at a plane's last whole chunk, at most max_left
        pixels short of its end, each pixel past it priced as left_price of a tile's (the
        in-place kernels' _leftover dot products).  Returns (index, chunk, cost), or None
        where no compiled tile stops that close."""
        def cost(i):
            left = pixels % self.variants[i][2]
            return self.tile_cost(i, out_rows, pixels - left, left_price * left)
        fits = [i for i, (_, _, chunk) in enumerate(self.variants) if pixels >= chunk and pixels % chunk <= max_left]
        if not fits:
            return None
        best = min(fits, key=lambda i: (cost(i), i))
        return best, self.variants[best][2], cost(best)


def groups_kind(in_channels, groups):
    """'dense' (groups=1), 'depthwise' (groups == in_channels > 1, any channel
    multiplier) or 'grouped'."""
    if groups == 1:
        return "dense"
    return "depthwise" if groups == in_channels else "grouped"


def normalise_key(direction, p):
    """(direction, dtype, kernel, stride, dilation, groups kind); a non-square
    axis becomes ANY, since specialised kernels are square."""
    kernel = p.KH if p.KH == p.KW else ANY
    stride = p.sh if p.sh == p.sw else ANY
    dilation = p.dh if p.dh == p.dw else ANY
    return (direction, p.dtype, kernel, stride, dilation, groups_kind(p.C, p.groups))


def fallback_keys(key):
    """Keys to try, most specialised first: exact; any dilation; any stride and
    dilation (kernels unrolled over a fixed kernel size); fully generic."""
    direction, dtype, k, s, d, groups = key
    return [key, (direction, dtype, k, s, ANY, groups), (direction, dtype, k, ANY, ANY, groups),
            (direction, dtype, ANY, ANY, ANY, groups)]



@lru_cache(maxsize=None)
def _load(key):
    module, name, tile = KERNELS[key]
    mod = importlib.import_module(f"convgen._generated.{module}")
    _check_vector_bytes(mod.__name__, mod.VECTOR_BYTES)
    variants = tuple(mod.TILES[name])
    # (the dense weight gradients of a module share its ocvec / ocvec_chunks)
    ocvec_columns = getattr(mod, "OCVEC_COLUMNS", {}).get(name, 0)
    ocvec = (mod.ocvec, mod.ocvec_chunks) if ocvec_columns else (None, None)
    icvec = (mod.icvec, tuple(mod.ICVEC_TILES)) if ocvec_columns else (None, ())
    return Kernel(name, getattr(mod, name), tile, variants[0][2], variants, getattr(mod, name + "_fused", None),
                  *ocvec, getattr(mod, "CVEC_TILES", {}).get(name), getattr(mod, "pack_weights", None),
                  tuple(getattr(mod, "ROW_BLOCKS", {}).get(name, ())), getattr(mod, name + "_cblock", None),
                  getattr(mod, "pad_blocked", None), ocvec_columns, getattr(mod, "OCVEC_FIELDS", ()),
                  name in getattr(mod, "IN_PLACE", ()), *icvec, name in getattr(mod, "BIAS_SUMS", ()))


def lookup(direction, p):
    """The kernel that runs `direction` for problem p (see convgen._engine.Problem)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    key = next((k for k in fallback_keys(normalise_key(direction, p)) if k in KERNELS), None)
    if key is None:
        supported = sorted({(k[1], k[5]) for k in KERNELS if k[0] == direction})
        kind = groups_kind(p.C, p.groups)
        raise ValueError(f"no {direction} kernel for dtype {p.dtype!r} and groups kind {kind!r}; "
                         f"supported (dtype, groups kind): {supported}")
    return _load(key)
