"""Stage 2: spec -> the flat dict a template receives.

All index arithmetic and naming happens here (and in spec.py / convgen._geometry),
so the templates only substitute values and loop over lists.
"""

import importlib.util
import os

from .spec import ANY, C_TYPES, DTYPES, NUMPY_DTYPES

_GEOMETRY_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "convgen", "_geometry.py")


def _load_geometry():
    # Loaded by path: the build must not import the convgen package, whose
    # extension modules do not exist yet.  The runtime imports the same file.
    spec = importlib.util.spec_from_file_location("convgen_geometry", _GEOMETRY_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


geometry = _load_geometry()

# The fields after the columns in a row of the dense weight gradient's tile table
# (emitted into the modules as OCVEC_FIELDS; convgen._engine._wgrad_tiles fills it): the
# columns used, the column of the gradient's row where the first is stored (the others
# after it), the output pixels' rectangle [h0, h1) x [w0, w1).
OCVEC_FIELDS = ("used", "store", "h0", "h1", "w0", "w1")
# The channel-vector tiles prefetch the packed weights this many taps ahead (a tap's are
# lanes x width values): streamed from L2 (ASPP's 512 channels: 590 KB a tile), they
# otherwise stall the FMAs.  One tap ahead: module forward 1.02-1.08x (ASPP 1.08x,
# DeepLab rate 2 1.07x); two: another 1.00-1.02x.  One prefetch per cache line of a
# channel's weights (AVX-512: two, one per vector; AVX2: its two vectors share one line).
CVEC_PREFETCH_TAPS = 2
# The pixel tiles of kernels that read a 1x1 layer's input in place (KernelSpec.in_place)
# prefetch each cache line of their chunk this many channels ahead: each channel's chunk is
# a short piece of a plane (64 or 96 bytes of 196-1568) that the hardware prefetchers
# barely start on, so the tile waited on L2 for every channel.  (AMD Zen 3, in-process
# kernel calls: ResNet's 1024 -> 256 at 10x10 on one thread 49-71 -> 77-82 GFLOP/s; 2
# threads, 1024 -> 256 at 14x14 139 -> 165, 2048 -> 512 at 7x7 125 -> 149, float64
# 1024 -> 256 at 7x7 46-65 -> 71-78, 256 -> 64 at 56x56 137 -> 154; 4 channels ahead gave
# about half of that, 16 the same as 8.)
IN_PLACE_PREFETCH_CHANNELS = 8
# The pixel tiles keep the reduction's strides (x_chan, w_si) in locals, which the
# compiler barrier in their reduction loop does not make them re-read from the
# arguments, on kernels of up to this many taps.  (AVX2, 2 threads, module forward,
# separate processes, 8 rounds, median / fastest round: 1x1 layers 1.03-1.09x, ResNet's
# 3x3 512 at 7x7 1.07x / 1.06x, 5x5 and 3x3 on RGB inputs 1.00x; the 7x7 stride-2 stem,
# whose 49 unrolled taps gcc then schedules otherwise, 0.94-0.96x, so not there.)
LOCAL_STRIDES_MAX_TAPS = 25
CACHE_LINE_BYTES = 64

TEMPLATES = {
    "fwd": "conv2d_fwd.pyx.j2",
    "bwd_data": "conv2d_bwd_data.pyx.j2",
    "bwd_weight": "conv2d_bwd_weight.pyx.j2",
}


def _taps(taps):
    return [dict(i=i, w_index=t.w_index, plane=t.plane, dy=t.dy, dx=t.dx) for i, t in enumerate(taps)]


def _row_blocks(spec):
    """Each row-block tile's loads: every distinct (plane, row, column) input vector the
    block reads, with the multiply-adds that use it (output row, weight index).  Output
    row i reads tap (plane, dy, dx) at plane row dy + i, so rows share loads."""
    blocks = []
    for index, (rows, vectors) in enumerate(spec.row_blocks):
        k, s, d = spec.kernel, spec.stride, spec.dilation
        taps = geometry.forward_taps(k, k, s, s, d, d)
        loads = {}
        for t in taps:
            for i in range(rows):
                loads.setdefault((t.plane, t.dy + i, t.dx), []).append(dict(row=i, w_index=t.w_index))
        blocks.append(dict(index=index, suffix=f"_rb{rows}x{vectors}", rows=list(range(rows)),
                           vectors=[dict(index=v, offset=v * spec.lanes) for v in range(vectors)],
                           width=vectors * spec.lanes, ntaps=k * k,
                           loads=[dict(plane=p, drow=r, dx=x, fmas=f) for (p, r, x), f in sorted(loads.items())]))
    return blocks


def _weight_vectors(spec):
    """Vectors a channel-block tile keeps its taps in: whole transposed blocks of lanes taps."""
    return -(-spec.kernel ** 2 // spec.lanes) * spec.lanes


def _channel_block(spec):
    """The forward's channel-block tile's loads, per tap row: each distinct input column
    that the tile's pixels read (pixel j, tap column kx reads column j * stride + kx *
    dilation of the pixel-major copy), with the multiply-adds that use it.  (The
    input gradient's: see _input_gradient_channel_block.)"""
    if spec.channel_block is None:
        return None
    if spec.direction == "bwd_data":
        return _input_gradient_channel_block(spec)
    if spec.direction == "bwd_weight":
        lanes, taps = spec.channel_block
        tap_list = [dict(i=t) for t in range(taps)]
        # (a transposed store takes at most `lanes` taps: one per column)
        return dict(suffix=f"_cb{lanes}", taps=tap_list,
                    tap_groups=[dict(start=g, taps=tap_list[g:g + lanes]) for g in range(0, taps, lanes)])
    pixels, _ = spec.channel_block
    k, s, d = spec.kernel, spec.stride, spec.dilation
    rows = []
    for ky in range(k):
        loads = {}
        for kx in range(k):
            for j in range(pixels):
                loads.setdefault(j * s + kx * d, []).append(dict(pixel=j, tap=ky * k + kx))
        rows.append(dict(dy=ky * d, loads=[dict(offset=c * spec.lanes, fmas=f) for c, f in sorted(loads.items())]))
    return dict(suffix=f"_cb{pixels}", pixels=list(range(pixels)), stride=s, span=(k - 1) * d, tap_rows=rows,
                weight_vectors=_weight_vectors(spec), columns=_store_columns(pixels, spec.lanes),
                # vectors a last, partial row tile may read past the copy's end
                slack=(pixels - 1) * s + (k - 1) * d + 1)


def _input_gradient_channel_block(spec):
    """The stride-2 depthwise input gradient's channel-block tile, per parity of the
    padded input row (ra) and of the left padding (e): input pixel j of a tile gets
    tap (ky, kx) where ky has ra's parity and kx that of j + e, from grad_output row
    (ra - ky) / 2 and column (j + e - kx) / 2 relative to the tile's (both may be
    negative: the copy has a zero border).  Each column loaded once per tap row."""
    pixels, _ = spec.channel_block
    k, lanes = spec.kernel, spec.lanes
    if k % 2 == 0:
        raise ValueError(f"{spec.name}: the stride-2 channel-block tile takes odd kernels (border (k - 1) / 2)")
    variants = []
    for ra in (0, 1):
        for e in (0, 1):
            rows = []
            for ky in range(ra % 2, k, 2):
                loads = {}
                for kx in range(k):
                    for j in range(pixels):
                        if (j + e - kx) % 2 == 0:
                            loads.setdefault((j + e - kx) // 2, []).append(dict(pixel=j, tap=ky * k + kx))
                rows.append(dict(dy=(ra - ky) // 2,
                                 loads=[dict(offset=c * lanes, fmas=f) for c, f in sorted(loads.items())]))
            variants.append(dict(ra=ra, e=e, suffix=f"_{ra}{e}", tap_rows=rows,
                                 row_parity=("even", "odd")[ra], pad_parity=("even", "odd")[e]))
    return dict(suffix=f"_cb{pixels}", pixels=list(range(pixels)), variants=variants, border=k // 2,
                weight_vectors=_weight_vectors(spec), columns=_store_columns(pixels, lanes))


def _store_columns(pixels, lanes):
    """Length of the array of column vectors that a tile of `pixels` pixels hands to the
    transposed store, `lanes` columns at a time: whole blocks, so that gcc sees no read
    past its end (it cannot tell that the store reads only the first n_cols)."""
    return geometry.round_up(pixels, lanes)


def _cvec_form(row_pixels, rows, lanes, vectors, name=""):
    """A channel-vector tile's form: row_pixels pixels of each of `rows` (1 or 2) output
    rows, one flat row apart (the second row reads its input from xr2 and keeps its
    partial sums in part2, the slot of the chunk a row below), pixel p being row
    p // row_pixels's pixel p % row_pixels.  name: its function's suffix (the wide
    tile's is given by the template)."""
    width = vectors * lanes
    pixels = range(row_pixels * rows)
    base = ("", "2")
    return dict(name=name, row_pixels=row_pixels,
                pixels=list(pixels),
                rows=[dict(index=h, first=h * row_pixels) for h in range(rows)],
                broadcasts=[dict(pixel=p, base="xr" + base[p // row_pixels], offset=p % row_pixels * lanes)
                            for p in pixels],
                slots=[dict(pixel=p, base="part" + base[p // row_pixels], offset=p % row_pixels * width)
                       for p in pixels],
                # (a later row's stores read `lanes` columns from its first)
                columns=_store_columns(row_pixels * (rows - 1) + (lanes if rows > 1 else row_pixels), lanes))


def _phase_runs(phases):
    """The input gradient's runs of its tiles: one per stride phase that has taps, named
    by a suffix and picked at run time by the phase's index; a kernel whose phases come
    at run time (phases None) has one run for all of them, its taps in a loop."""
    if phases is None:
        return [dict(index=None, suffix="", taps=None)]
    return [dict(index=ph["index"], suffix=f"_phase{ph['index']}", taps=ph["taps"]) for ph in phases if ph["taps"]]


def kernel_context(spec):
    """Template values for one kernel."""
    rows, cols = spec.tile
    lanes = spec.lanes
    ctx = dict(
        name=spec.name,
        groups=spec.groups,
        rows=list(range(rows)),
        chunk=cols * lanes,
        taps=None,
        phases=None,
        in_place=spec.in_place,
    )
    if spec.direction == "bwd_weight":
        ctx["channel_block"] = _channel_block(spec)
        # Depthwise kernels also sum the bias gradient as their pixel loop reads grad_output
        # (memory-bound: the sums cost next to nothing there, a pass of their own did not).
        ctx["bias_sums"] = spec.groups == "depthwise"
        ctx["cols"] = [dict(index=c) for c in range(cols)]
        ctx["tiles"] = [dict(index=0, suffix="", rows=ctx["rows"], chunk=0, cols=ctx["cols"])]
        # Dense layers also get the channel-vectorised variant (see ForwardPlan for when):
        # vectors of output channels x columns, no horizontal sums (see the template).
        ctx["ocvec"] = None
        if spec.ocvec_tile is not None:
            vectors, ncols = spec.ocvec_tile
            cols = [dict(index=c) for c in range(ncols)]
            ctx["ocvec"] = dict(vectors=[dict(index=v, offset=v * lanes) for v in range(vectors)],
                                cols=cols, width=vectors * lanes,
                                # where each field sits in a row of the tiles' table
                                field={f: ncols + i for i, f in enumerate(OCVEC_FIELDS)},
                                # columns stored together by one transposed store (<= lanes)
                                col_groups=[dict(start=g, cols=cols[g:g + lanes])
                                            for g in range(0, len(cols), lanes)])
        # ... and, for too few output channels for that, the form vectorised over input
        # channels: output channels x columns (a vector of input channels at one tap each).
        ctx["icvec"] = [dict(index=i, suffix=f"_{nrows}x{ncols}", rows=list(range(nrows)),
                             # (a row of its table, convgen._engine._icvec_table: each column's
                             # offset in the window of input pixels, then each one's in a row
                             # of the partial sums, then how many columns are real)
                             cols=[dict(index=c, x=c, s=ncols + c) for c in range(ncols)], used=2 * ncols,
                             steps=_icvec_pixel_steps(nrows, ncols))
                        for i, (nrows, ncols) in enumerate(spec.icvec_tiles)] or None
        return ctx
    ctx["cols"] = [dict(index=v, offset=v * lanes) for v in range(cols)]
    local_strides = spec.kernel == ANY or spec.kernel * spec.kernel <= LOCAL_STRIDES_MAX_TAPS
    ctx["tiles"] = [dict(index=i, suffix=f"_t{r}x{c}", rows=list(range(r)), chunk=c * lanes,
                         cols=[dict(index=v, offset=v * lanes) for v in range(c)], local_strides=local_strides,
                         prefetch=_in_place_prefetch(spec, c * lanes), prefetch_ahead=IN_PLACE_PREFETCH_CHANNELS)
                    for i, (r, c) in enumerate(spec.tiles)]
    ctx["cvec"] = None
    if spec.cvec_tile is not None:
        pixels, vectors = spec.cvec_tile
        # (the input is in blocks of `lanes` channels, pixel-major: pixel p's value of a
        # channel is p * lanes values after pixel 0's)
        ctx["cvec"] = dict(index=len(ctx["tiles"]), suffix=f"_c{pixels}x{vectors}",
                           **_cvec_form(pixels, 1, lanes, vectors),
                           narrow=[_cvec_form(n, 1, lanes, vectors, f"_narrow{n}") for n in spec.cvec_narrow],
                           narrow_pixels=tuple(spec.cvec_narrow),   # (CVEC_TILES' entry)
                           pairs=[_cvec_form(n, 2, lanes, vectors, f"_pair{n}") for n in spec.cvec_pairs],
                           widest_pair=max(spec.cvec_pairs, default=0),
                           slot=pixels * vectors * lanes,   # one tile's partial sums
                           panel=spec.kernel == 1,          # 1x1: may read its input in place (panel_item)
                           vectors=[dict(index=v, offset=v * lanes) for v in range(vectors)],
                           # where a channel's prefetches read: each cache line of its weights,
                           # CVEC_PREFETCH_TAPS taps on
                           prefetch=[CVEC_PREFETCH_TAPS * lanes * vectors * lanes + line
                                     for line in range(0, vectors * lanes, CACHE_LINE_BYTES // spec.itemsize)],
                           width=vectors * lanes)
    ctx["row_blocks"] = _row_blocks(spec)
    ctx["channel_block"] = _channel_block(spec)
    if spec.unrolls_taps:
        k, s, d = spec.kernel, spec.stride, spec.dilation
        if not spec.is_generic:
            if spec.direction == "fwd":
                ctx["taps"] = _taps(geometry.forward_taps(k, k, s, s, d, d))
            else:
                ctx["phases"] = [dict(index=p, taps=_taps(taps))
                                 for p, taps in enumerate(geometry.bwd_data_phases(k, k, s, s, d, d))]
        else:
            # Stride / dilation at run time: the taps come in weight order (as the runtime's
            # geometry lists them), their offsets from the table the kernel receives.
            any_taps = [dict(i=i, w_index=i, plane="any", dy="any", dx="any") for i in range(k * k)]
            if spec.direction == "fwd":
                ctx["taps"] = any_taps
            else:
                ctx["phases"] = [dict(index=0, taps=[dict(t, plane=0) for t in any_taps])]
    if spec.direction == "bwd_data":
        ctx["phase_runs"] = _phase_runs(ctx["phases"])
        # The input gradient with extend and fold fused in (BackwardDataPlan.fused_len): per
        # channel (depthwise) or per image (dense), for kernels whose taps are unrolled.
        ctx["fused"] = spec.groups in ("depthwise", "dense") and ctx["phases"] is not None
    return ctx


def _in_place_prefetch(spec, chunk):
    """Where an in-place pixel tile's prefetches read, in values from its chunk's start: the
    first value of each cache line of a chunk of `chunk` values starting on a line, and its
    last value (a chunk off a line reaches into one more).  Empty for other kernels."""
    if not spec.in_place:   # (the 1x1 input gradient's tiles, on grad_output's planes: 0.88-1.10x)
        return []
    per_line = CACHE_LINE_BYTES // spec.itemsize
    return list(range(0, chunk, per_line)) + [chunk - 1]


def _icvec_pixel_steps(nrows, ncols):
    """The icvec tile's steps at one pixel, in order: dict(col=c) loads column c's input
    vector, dict(row=j, col=c) is the multiply-add of row j's broadcast into it.  The
    fewer of (the columns' input vectors, the rows' broadcasts) stay in registers beside
    the sums and one of the others: every column's load first where the columns are
    fewer (rows outer), else each column's load then its rows.  (Otherwise 4 x 3 on 16
    registers held the 4 broadcasts and reloaded each input vector for every row: 16
    loads per 12 FMAs, not 7.)"""
    fma = lambda j, c: dict(row=j, col=c)
    if ncols < nrows:
        return [dict(col=c) for c in range(ncols)] + [fma(j, c) for j in range(nrows) for c in range(ncols)]
    return [step for c in range(ncols) for step in [dict(col=c)] + [fma(j, c) for j in range(nrows)]]


def module_context(direction, dtype, specs, template=None):
    """Template values for one extension module: every kernel of a direction and dtype."""
    template = template or TEMPLATES[direction]
    specs = [s for s in specs if s.direction == direction and s.dtype == dtype]
    kernels = [kernel_context(s) for s in sorted(specs, key=lambda s: s.name)]
    target = _target(specs)
    return dict(
        banner=banner(template),
        template=template,
        direction=direction,
        dtype=dtype,
        numpy_dtype=NUMPY_DTYPES[dtype],
        ctype=C_TYPES[dtype],
        vec=f"cg_v{dtype}",
        sfx=dtype,
        lanes=target.lanes(dtype),
        target=target.name,
        ocvec_fields=repr(OCVEC_FIELDS),
        ocvec=_shared(kernels, "ocvec"),
        icvec=_shared(kernels, "icvec"),
        kernels=kernels,
    )


def _target(specs):
    """The one target (codegen.target) that specs are generated for."""
    targets = {s.target for s in specs}
    if len(targets) != 1:
        raise ValueError(f"a module's kernels must share one target, got {sorted(t.name for t in targets)}")
    return targets.pop()


def _shared(kernels, form):
    """A weight-gradient form shared by a module's dense kernels ("ocvec" or "icvec"),
    generated once per module for every kernel that has it (it takes its columns and
    their taps from a table at run time, so nothing in it depends on the kernel), or
    None."""
    tiles = [k[form] for k in kernels if k.get(form)]
    if any(t != tiles[0] for t in tiles):
        raise ValueError(f"the dense weight-gradient kernels of a module must share one {form} tile")
    return tiles[0] if tiles else None


def banner(template):
    return (f"# Generated by convgen's codegen from templates/{template}: DO NOT EDIT.\n"
            f"# Change the template or codegen/table.py, then rebuild (python -m codegen --write).")


def dispatch_context(specs):
    """Template values for the dispatch table: normalised key -> module and kernel."""
    rows = []
    for s in sorted(specs, key=lambda s: s.name):
        rows.append(dict(key=repr(s.key), module=s.module, name=s.name, tile=repr(s.tile)))
    target = _target(specs)
    return dict(banner=banner("dispatch_table.py.j2"), rows=rows, dtypes=DTYPES, any=repr(ANY),
                target=repr(target.name), vector_bytes=target.vector_bytes,
                lanes=repr({t: target.lanes(t) for t in DTYPES}))
