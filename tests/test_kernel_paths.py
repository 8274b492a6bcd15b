"""Kernel paths that the engine (convgen._engine) picks for some shapes only, forced
here on every spec that has them, each test asserting that the path really ran:

* the dense forward's channel-vector tile (packed weights, row-aligned tiles, partial
  sums between reduction passes);
* the dense weight gradient vectorised over output channels (reduction segments,
  scratch columns skipped, both tile orders: consecutive columns, or one tap of a block
  of channels visiting only the pixels where it reads data);
* 1x1 kernels running the channel tiles of a pixel chunk back to back, and at stride 1
  without padding reading their input in place through per-thread panels;
* the depthwise forward's row-block tile (every padding mode, channel multipliers,
  partial blocks and vectors);
* the depthwise forward's channel-block tile, when nothing is kept for a backward
  (every padding mode, partial channel blocks and row tiles, strips or the whole of a
  narrow map, 1 and 2 threads),
  the stride-1 input gradient computed by it, and the stride-2 input gradient's own;
* the grouped forward, each group's channels padded just before its tiles run.
"""

import ctypes
import mmap

import numpy as np
import pytest

from codegen.cases import case_for
from codegen.spec import ANY
from codegen.table import SPECS
from conftest import (BASELINE_BUILD, PINNED_GEOMETRY, assert_close, case_arrays, conv_args, convgen_functional, make_rng,
                      reference_functional, spec_dtype, torch_functional)
import convgen
from convgen import _dispatch, _engine, _geometry, _layout
from convgen import _reference as ref

CVEC_SPECS = [s for s in SPECS if s.cvec_tile is not None]
WGRAD_SPECS = [s for s in SPECS if s.direction == "bwd_weight" and s.groups == "dense"]


def _force_channel_vectors(monkeypatch, row_tiles):
    """Thresholds that send every dense test problem down the channel-vector paths,
    its tiles starting at each row or running along the flat grid, with a cache
    budget small enough to split reductions into several passes."""
    monkeypatch.setattr(_engine, "CVEC_MIN_CHANNELS", 1)
    monkeypatch.setattr(_engine, "CVEC_MIN_PIXELS", 0)
    monkeypatch.setattr(_engine, "CVEC_CHANNEL_WASTE", 100.0)
    monkeypatch.setattr(_engine, "ROW_TILE_SAVING", 100.0 if row_tiles else 0.0)
    monkeypatch.setattr(_engine, "ROW_PRICE_SAVING", 100.0 if row_tiles else 0.0)
    monkeypatch.setattr(_engine, "CACHE_BUDGET", 4096)
    monkeypatch.setattr(_engine, "PASS_MIN_MACS", 1)   # passes of a few channels on 1x1 kernels too
    monkeypatch.setattr(_engine, "CVEC_PASS_BLOCKS", 1)
    monkeypatch.setattr(_engine, "CVEC_IMAGE_BUDGET", 4096)   # one image per pass
    monkeypatch.setattr(_engine, "ROW_BLOCK_WASTE", 100.0)
    # (weights packed per call, not a block at a time in one pass: test_weights_packed_by_block_*)
    monkeypatch.setattr(_engine, "PACK_BLOCK_WEIGHT_RATIO", float("inf"))
    monkeypatch.setattr(_engine, "IN_PLACE", False)   # (1x1 forwards: test_one_by_one_in_place)
    # (1x1 forwards that widen the channels in passes, not panels: test_one_by_one_panels)
    monkeypatch.setattr(_engine, "TILES_INNER_ALL_POINTWISE", False)
    # (1x1 input gradients by their own kernels: test_one_by_one_input_gradient_from_transposed_copy)
    monkeypatch.setattr(_engine, "INPUT_AS_FORWARD_COPY_BYTES", 0)
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


@pytest.fixture(params=["row tiles", "flat tiles"])
def forced(monkeypatch, request):
    _force_channel_vectors(monkeypatch, request.param == "row tiles")
    yield
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


@pytest.fixture
def forced_rows(monkeypatch):
    _force_channel_vectors(monkeypatch, True)
    yield
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


@pytest.fixture
def forced_flat(monkeypatch):
    _force_channel_vectors(monkeypatch, False)
    yield
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


@pytest.fixture
def pixel_tile_passes(monkeypatch):
    """Pixel tiles (no channel-vector tile) whose reductions split into passes of a few
    channels, 1x1 kernels' too; the plans made under these settings are dropped after."""
    monkeypatch.setattr(_engine, "CVEC_MIN_CHANNELS", 1 << 30)
    monkeypatch.setattr(_engine, "CACHE_BUDGET", 4096)
    monkeypatch.setattr(_engine, "PASS_MIN_MACS", 1)
    monkeypatch.setattr(_engine, "IN_PLACE", False)
    monkeypatch.setattr(_engine, "INPUT_AS_FORWARD_COPY_BYTES", 0)   # (1x1 input gradients by their kernels)
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()
    yield
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


def _case(spec, C, OC):
    case = case_for(spec)
    case.update(C=C, OC=OC, groups=1)
    return case


def _plan(case, dtype):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (pair(case[k]) for k in ("kernel", "stride", "dilation", "padding"))
    p = _engine.Problem(case["N"], case["C"], case["H"], case["W"], case["OC"], kh, kw, sh, sw, dh, dw,
                        ph, ph, pw, pw, case["groups"], case.get("padding_mode", "zeros"),
                        "f32" if dtype == np.float32 else "f64")
    return _engine.forward_plan(p)


def _scratch_names(monkeypatch):
    """The names of the scratch buffers the engine asks for from now on, in order (so a
    test can tell which path ran)."""
    used, scratch = [], _engine.scratch
    monkeypatch.setattr(_engine, "scratch", lambda name, *a: used.append(name) or scratch(name, *a))
    monkeypatch.setattr(_engine, "scratches", lambda names_shapes, dtype: [
        used.append(name) or scratch(name, shape, dtype) for name, shape in names_shapes])
    return used


def _check(spec, case):
    dtype = spec_dtype(spec)
    rng = make_rng("kernel-paths", spec.name, case["C"], case["OC"], case.get("padding_mode"))
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    got = convgen_functional(spec.direction, x, w, b, gy, **args)
    assert_close(got, reference_functional(spec.direction, x, w, b, gy, **args), dtype, f"{spec.name} vs reference")
    assert_close(got, torch_functional(spec.direction, x, w, b, gy, **args), dtype, f"{spec.name} vs torch")


def _check_directions(case, dtype, rng, with_torch=False):
    """Forward, input and weight gradients of `case` on 1 and 2 threads against the
    reference (and torch); returns the arrays (x, w, b, gy)."""
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        for direction in ("fwd", "bwd_data", "bwd_weight"):
            got = convgen_functional(direction, x, w, b, gy, **args)
            what = f"{direction}, {threads} thread(s)"
            assert_close(got, reference_functional(direction, x, w, b, gy, **args), dtype, f"{what} vs reference")
            if with_torch:
                assert_close(got, torch_functional(direction, x, w, b, gy, **args), dtype, f"{what} vs torch")
    return x, w, b, gy


# 37 channels: one full block of a channel-vector tile and a partial one, and
# several reduction passes under the forced cache budget.
@pytest.mark.parametrize("spec", CVEC_SPECS, ids=lambda s: s.name)
def test_channel_vector_tile(spec, forced):
    """Forward and input gradient: the input in pixel-major blocks of channels, packed
    weights, row-aligned tiles (here wider than a row, so a tile also computes the
    start of the next row) or tiles along the flat grid, partial blocks of channels,
    and partial sums between reduction passes."""
    case = _case(spec, 37, 37)
    fp = _plan(case, spec_dtype(spec))
    plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
    assert plan.kernel.name == spec.name
    assert plan.cvec is not None and (plan.row_tiles > 0) == (_engine.ROW_TILE_SAVING > 1)
    assert plan.rblock < (fp.Cg if spec.direction == "fwd" else fp.OCg)
    assert (fp.images if spec.direction == "fwd" else plan.block[0]) < case["N"]   # passes per image
    _check(spec, case)


# The pixel tiles of dense and grouped forward and input-gradient kernels, with a cache
# budget that splits the reduction into passes: partial sums in the flat grid between
# passes, the last pass into y (forward) or, at stride 1 with zero padding, straight into
# gx (input gradient).
PIXEL_TILE_SPECS = [s for s in SPECS if s.direction in ("fwd", "bwd_data") and s.groups != "depthwise"]


@pytest.mark.parametrize("spec", PIXEL_TILE_SPECS, ids=lambda s: s.name)
def test_pixel_tile_reduction_passes(spec, pixel_tile_passes):
    case = case_for(spec)
    case.update(C=case["C"] * 6, OC=case["OC"] * 6)   # (36 channels: several passes of 8 or more)
    fp = _plan(case, spec_dtype(spec))
    plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
    assert plan.kernel.name == spec.name and plan.cvec is None
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert plan.rblock < (fp.Cg if spec.direction == "fwd" else fp.OCg)
    _check(spec, case)


# Shapes that took the 1x1 panel paths wrongly (found by a fuzz run): a zero-padded 1x1
# layer's input gradient with more output than input channels, on rows the row tiles do
# not pay on (29 columns); a 1x1 kernel with a dilation, whose dilation changes nothing.
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", [
    dict(N=1, C=32, OC=64, H=29, W=29, kernel=(1, 1), stride=(1, 1), padding=(1, 2), dilation=(1, 1), groups=1),
    dict(N=1, C=64, OC=32, H=32, W=32, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(2, 3), groups=1),
], ids=["padded-1x1-input-gradient", "dilated-1x1"])
def test_pointwise_panel_paths(case, dtype):
    rng = make_rng("pointwise-panels", case["C"], case["OC"])
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    for direction in ("fwd", "bwd_data", "bwd_weight"):
        got = convgen_functional(direction, x, w, b, gy, **args)
        assert_close(got, reference_functional(direction, x, w, b, gy, **args), dtype, f"{direction} vs reference")
        assert_close(got, torch_functional(direction, x, w, b, gy, **args), dtype, f"{direction} vs torch")


# Row tiles skip the taps through which they read only zero padding: the forward's, and
# the input gradient's where it stores into gx (stride 1, zero padding).
SKIP_SPECS = [s for s in CVEC_SPECS if s.kernel != 1 and (s.direction == "fwd" or s.stride == 1)]


@pytest.mark.parametrize("spec", SKIP_SPECS, ids=lambda s: s.name)
def test_channel_vector_tiles_skip_padding_taps(spec, forced_rows):
    """A wide zero padding (every tap of the first and last rows and of some row tiles
    reads only padding): same results as without the skipping, against the reference
    and torch.  In the forward an infinite or NaN weight turns the skipping off, so
    0 * inf is NaN at the border as in the reference; the input gradient, which has no
    padding terms in its definition, then has NaN and infinities where torch's has
    (see _engine.backward_data)."""
    d = spec.dilation or 3
    case = _case(spec, 37, 37)
    kh, kw = case["kernel"]
    # (the input gradient reads grad_output's border where the forward pads little;
    # rows of 33: two row tiles and a tail)
    case.update(padding=(d * (kh - 1), d * (kw - 1)) if spec.direction == "fwd" else 0, dilation=d, H=10, W=33)
    fp = _plan(case, spec_dtype(spec))
    plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
    skip = plan.tap_skip if spec.direction == "fwd" else plan.tap_skips[0]
    assert plan.kernel.name == spec.name and plan.row_tiles > 1
    assert skip is not None and 0.1 < skip.mean() < 0.9
    _check(spec, case)
    dtype = spec_dtype(spec)
    x, w, b, gy = case_arrays(case, dtype, make_rng("skip", spec.name))
    w[0, 0, 0, 0], w[1, 2, kh - 1, kw - 1] = np.inf, np.nan
    args = conv_args(case)
    got = convgen_functional(spec.direction, x, w, b, gy, **args)[0]
    peer = reference_functional if spec.direction == "fwd" else torch_functional
    want = peer(spec.direction, x, w, b, gy, **args)[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert_close(got[finite], want[finite], dtype, f"{spec.name}, non-finite weights")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extend_stays_in_its_planes(dtype):
    """extend writes nothing past its planes' length L, even where grad_output's last
    rows would land there (an input gradient padded by more than its kernel's span
    reads none of them; they used to be written past the planes' end)."""
    g = np.arange(1, 2 * 6 * 7 + 1, dtype=dtype).reshape(2, 6, 7)
    width, top, left, L = 10, 2, 1, 47   # row 4 of g starts at 61, row 3 is cut at 47
    big = np.full((2, L + 32), -7.0, dtype)
    for c in range(2):
        gext = big[c, :L].reshape(1, L)   # (contiguous: one channel at a time)
        _layout.extend(g[c:c + 1], gext, width, top, left, 1)
    want = np.zeros((2, 8 * width), dtype)
    for i in range(6):
        want[:, (i + top) * width + left:(i + top) * width + left + 7] = g[:, i]
    np.testing.assert_array_equal(big[:, :L], want[:, :L])
    assert (big[:, L:] == -7.0).all()


def test_padding_masks():
    """The masks of a 3x3 kernel, dilation 2, padding 2, on 4 output rows of 5 pixels:
    output (i, o) reads padded input (i + 2 dy, o + 2 dx)."""
    rows = np.array([[-1, -1, 0, 1, 2, 3, -1, -1]], np.intp)           # padded rows -> source
    cols = np.array([[-1, -1, 0, 1, 2, 3, 4, -1, -1]], np.intp)        # padded columns -> source
    taps = [(0, 0, 2 * ky, 2 * kx) for ky in range(3) for kx in range(3)]
    masks = _engine._padding_masks(taps, rows, cols, 4, 5)
    for t, (_, _, dy, dx) in enumerate(taps):
        for i in range(4):
            for o in range(5):
                assert masks[t, i, o] == (rows[0, i + dy] < 0 or cols[0, o + dx] < 0), (t, i, o)
    assert masks[0, 0, 0] and not masks[4, 0, 0]     # row 0 reads the top padding through dy = 0


def _square_3x3_masks(size, d):
    """_padding_masks of a 3x3 kernel at dilation d, padding d ('same'), on a size x size
    map: d = 6 on 33 x 33 is DeepLab's ASPP."""
    sources = np.array([[i - d if 0 <= i - d < size else -1 for i in range(size + 2 * d)]], np.intp)
    taps = [(0, 0, d * ky, d * kx) for ky in range(3) for kx in range(3)]
    return _engine._padding_masks(taps, sources, sources, size, size)


def _check_tiling(tile_cols, skip, masks, forms):
    """tile_cols covers each row's columns in order, each tile within the widest form;
    skip marks exactly the (row, tile, tap) that read only padding."""
    starts, pixels = tile_cols[:, 0], tile_cols[:, 1]
    assert starts[0] == 0 and (starts[1:] == starts[:-1] + pixels[:-1]).all()
    assert starts[-1] + pixels[-1] == masks.shape[2] and (pixels >= 1).all() and (pixels <= max(forms)).all()
    want = np.array([[masks[t, i, s:s + n].all() for t in range(len(masks))]
                     for i in range(masks.shape[1]) for s, n in tile_cols], np.uint8)
    if want.any():
        np.testing.assert_array_equal(skip, want)
    else:
        assert skip is None


def test_row_tiling():
    """Without padding the row tiles are the widest that fit (33 columns: 14 + 14 + 5);
    with a dilation-6 padding (DeepLab's ASPP) they split where a column of taps starts
    and stops reading padding, and the edge tiles skip those taps."""
    forms = (14, 7, 6)
    plain = np.zeros((9, 4, 33), bool)
    tile_cols, skip, _ = _engine._row_tiling(plain, forms)
    assert tile_cols.tolist() == [[0, 14], [14, 14], [28, 5]] and skip is None
    masks = _square_3x3_masks(33, 6)
    tile_cols, skip, _ = _engine._row_tiling(masks, forms)
    assert tile_cols.tolist() == [[0, 6], [6, 14], [20, 7], [27, 6]]
    _check_tiling(tile_cols, skip, masks, forms)
    # (random masks: still a cover, and an exact skip table)
    rng = np.random.default_rng(0)
    for out_cols in (1, 5, 29, 40):
        masks = rng.random((4, 3, out_cols)) < 0.7
        for pair_width in (0, 7):
            _check_tiling(*_engine._row_tiling(masks, forms, pair_width)[:2], masks, forms)
    # Narrow tiles priced as row pairs: 32 columns split 14 + 6 + 6 + 6 rather than 14 +
    # 14 + 4 (which computes 6), and the price is the split's: 4 rows x (9 taps + 1) runs.
    plain = np.zeros((9, 4, 32), bool)
    tile_cols, _, price = _engine._row_tiling(plain, forms, 7)
    assert tile_cols.tolist() == [[0, 14], [14, 6], [20, 6], [26, 6]]
    paired = 6 + _engine.ROW_TILE_OVERHEAD / 2 + _engine.ROW_PAIR_PRICE
    assert price == pytest.approx(4 * 10 * (14 + _engine.ROW_TILE_OVERHEAD + 3 * paired))
    assert _engine._row_tiling(plain, forms)[0].tolist() == [[0, 14], [14, 14], [28, 4]]


def test_row_tiling_prices_latency_bound_tiles():
    """AVX2's forms (6, 5, 4, 3): a tile of 3 pixels holds 6 sums, too few to hide the
    multiply-adds' latency, so with a floor of 4 pixels 14 columns split 6 + 4 + 4, not
    6 + 5 + 3 (the same pixels); the float32 forward, whose 3-pixel tiles run as row
    pairs, has no floor, and the input gradient (no pairs) has one."""
    forms = (6, 5, 4, 3)
    plain = np.zeros((9, 4, 14), bool)
    assert sorted(n for _, n in _engine._row_tiling(plain, forms)[0]) == [3, 5, 6]
    assert sorted(n for _, n in _engine._row_tiling(plain, forms, 0, 4)[0]) == [4, 4, 6]
    lanes = _engine.LANES["f32"]
    fp = _plan(dict(N=1, C=256, OC=256, H=14, W=14, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1), np.float32)
    if fp.cvec is None or fp.cvec[2] // lanes != 2 or fp.cvec[1] != 6:
        pytest.skip("AVX2's channel-vector tile (6 pixels x 2 vectors) only")
    floor = _engine._latency_pixels(fp.cvec, "f32", False)
    assert floor == 4 and _engine._latency_pixels(fp.cvec, "f32", True) == 0
    bp = _engine.backward_data_plan(fp.problem)
    assert min(n for _, n in bp.tile_cols) >= floor
    assert 3 in [n for _, n in fp.tile_cols]   # (a row pair)


def test_row_pairs():
    """Narrow row tiles pair rows from the top while both rows skip the same taps; wide
    tiles and a last odd row run alone; no narrow tile, no pairs."""
    tile_cols = np.array([[0, 6], [6, 14], [20, 7], [27, 6]], np.intp)
    pairs = _engine._row_pairs(tile_cols, None, 5, 7).reshape(5, 4)
    assert pairs[:, 1].tolist() == [0] * 5
    for j in (0, 2, 3):
        assert pairs[:, j].tolist() == [1, 2, 1, 2, 0]
    assert _engine._row_pairs(tile_cols, None, 5, 5) is None
    assert _engine._row_pairs(np.array([[0, 14], [14, 14]], np.intp), None, 8, 7) is None
    # DeepLab's ASPP: rows 0-5 and 27-32 read padding through their own taps
    masks = _square_3x3_masks(33, 6)
    tile_cols, skip, _ = _engine._row_tiling(masks, (14, 7, 6))
    pairs = _engine._row_pairs(tile_cols, skip, 33, 7).reshape(33, len(tile_cols))
    taps = skip.reshape(33, len(tile_cols), -1)
    for j, (_, n) in enumerate(tile_cols):
        col = pairs[:, j]
        if n > 7:
            assert not col.any()
            continue
        heads = np.flatnonzero(col == 1)
        assert (col[heads + 1] == 2).all() and (col == 2).sum() == len(heads)
        assert all(np.array_equal(taps[h, j], taps[h + 1, j]) for h in heads)
        assert len(heads) == 16   # 33 rows: one left alone
        single = np.flatnonzero(col == 0)
        assert len(single) == 1


# Small maps with wide zero padding, whose flat grids compute many scratch columns and
# every tap through padding, run row tiles priced by _row_tiling instead (ROW_PRICE_SAVING):
# the float32 forward's with narrow tiles as row pairs (or, on 16-pixel rows, two 8-pixel
# twins); the float64 forward's and the input
# gradient's (no row pairs) where skipping taps alone pays.  Rows whose flat grid costs
# little more (CIFAR's 32x32) keep it.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layer", ["5x5 at 9x9", "3x3 rate 2 at 16x16", "3x3 at 12x12"])
@pytest.mark.parametrize("threads", [1, 2])
def test_priced_row_tiles_on_small_maps(layer, dtype, threads):
    kernel, dilation, size = {"5x5 at 9x9": (5, 1, 9), "3x3 rate 2 at 16x16": (3, 2, 16),
                              "3x3 at 12x12": (3, 1, 12)}[layer]
    pad = dilation * (kernel - 1) // 2
    case = dict(N=4, C=64, OC=64, H=size, W=size, kernel=kernel, stride=1, padding=pad, dilation=dilation, groups=1)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    assert fp.cvec is not None and fp.We > fp.OW and bp.cvec is not None
    if dtype == np.float32 and layer == "3x3 rate 2 at 16x16":   # (rows of two 8-pixel twins)
        if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
            assert fp.tile_cols[:, 1].tolist() == [8, 8] and fp.row_pairs is None
    elif dtype == np.float32:
        if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
            assert fp.row_tiles > 1 and fp.row_pairs is not None and (fp.tile_cols[:, 1] <= 7).any()
    else:   # (no row pairs: skipping taps alone pays on the two maps with wider padding)
        if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
            assert fp.row_pairs is None and (fp.row_tiles > 1) == (layer != "3x3 at 12x12")
    if fp.row_tiles:
        assert fp.tap_skip is not None
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert (bp.row_tiles > 1) == (layer != "3x3 at 12x12")
    if bp.row_tiles:
        assert bp.tap_skips is not None
    cifar = _plan(dict(case, N=32, H=32, W=32, kernel=3, padding=1, dilation=1), dtype)
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert cifar.cvec is not None and cifar.row_tiles == 0
        assert _engine.backward_data_plan(cifar.problem).row_tiles == 0
    x, w, b, gy = case_arrays(case, dtype, make_rng("priced-rows", layer, dtype))
    args = conv_args(case)
    convgen.set_num_threads(threads)
    for direction in ("fwd", "bwd_data"):
        got = convgen_functional(direction, x, w, b, gy, **args)
        assert_close(got, reference_functional(direction, x, w, b, gy, **args), dtype, f"{layer} {direction}")


# The forward's row pairs (f32 kernels), forced row tiles whose rows end in a 7- or a
# 6-pixel tile or carry wide zero padding (whose narrow tiles skip taps), several
# reduction passes (the second row's partial sums in the next row's slot), two images a
# pass, an odd number of rows, 1 to 3 threads (bands).
PAIR_SPECS = [s for s in CVEC_SPECS if s.cvec_pairs]


@pytest.mark.parametrize("threads", [1, 2, 3, "2 dynamic"])
@pytest.mark.parametrize("shape", ["tail", "short tail", "padding"])
@pytest.mark.parametrize("spec", PAIR_SPECS, ids=lambda s: s.name)
def test_channel_vector_row_pairs(spec, shape, threads, forced_rows, banded, monkeypatch):
    """Row pairs match the reference and, bit for bit, the same tiles one row at a time
    (in bands, or "dynamic": work items handed out one run at a time, no bands)."""
    if threads == "2 dynamic":
        threads = 2
        monkeypatch.setattr(_engine, "BAND_MIN_CHUNKS", 1 << 30)
    dtype = spec_dtype(spec)
    case = _case(spec, 37, 37)
    kh, kw = case["kernel"]
    d = spec.dilation or 3
    width = {"tail": spec.cvec_tile[0] + max(spec.cvec_pairs), "short tail": spec.cvec_tile[0] + 3, "padding": 33}[shape]
    pad = (max(1, d * (kh - 1)), max(1, d * (kw - 1))) if shape == "padding" else 0
    stride = case["stride"] if isinstance(case["stride"], int) else case["stride"][1]
    case.update(N=2, dilation=d, padding=pad, H=9 * stride + d * (kh - 1), W=width * stride + d * (kw - 1))
    if shape == "padding":
        case.update(H=11, W=31)   # (rows that end in a 6- or 7-pixel tile, not an 8: no pairs)
    args = conv_args(case)
    x, w, b, _ = case_arrays(case, dtype, make_rng("row-pairs", spec.name, shape))
    fp = _plan(case, dtype)
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert fp.kernel.name == spec.name and fp.row_pairs is not None and fp.rblock < fp.Cg
        assert (fp.row_pairs == 1).any() and (fp.row_pairs == 0).any()   # (an odd row, or wide tiles)
    assert (fp.bands(threads) is None) == (threads == 1 or _engine.BAND_MIN_CHUNKS > 1)
    if shape == "padding":
        assert fp.tap_skip is not None
    convgen.set_num_threads(threads)
    got = convgen_functional("fwd", x, w, b, None, **args)
    assert_close(got, reference_functional("fwd", x, w, b, None, **args), dtype, f"{spec.name} vs reference")
    monkeypatch.setattr(_engine, "ROW_PAIRS", False)
    _engine.forward_plan.cache_clear()
    assert _plan(case, dtype).row_pairs is None
    assert np.array_equal(got, convgen_functional("fwd", x, w, b, None, **args))


# Every compiled pixel tile of each forward and input-gradient kernel (dense ones have
# 6x4 and 8x3 tiles, their input gradients a 3x8 as well), each forced in turn:
# partial row tiles (13 output channels), partial chunks, one and several passes.
MULTI_TILE_SPECS = [s for s in PIXEL_TILE_SPECS if len(s.tiles) > 1]


@pytest.mark.parametrize("spec", MULTI_TILE_SPECS, ids=lambda s: s.name)
def test_every_pixel_tile(spec, monkeypatch):
    monkeypatch.setattr(_engine, "CVEC_MIN_CHANNELS", 1 << 30)   # no channel-vector tile
    monkeypatch.setattr(_engine, "forward_plan", _engine.forward_plan.__wrapped__)   # no plans kept
    monkeypatch.setattr(_engine, "backward_data_plan", _engine.backward_data_plan.__wrapped__)
    forced, pick = {}, _dispatch.Kernel.pick_tile

    def pick_forced(kernel, rows, pixels):   # (this spec's kernel only: the input gradient's forward plan picks its own)
        return (forced["i"], kernel.variants[forced["i"]][2]) if kernel.name == spec.name else pick(kernel, rows, pixels)
    monkeypatch.setattr(_dispatch.Kernel, "pick_tile", pick_forced)
    monkeypatch.setattr(_engine, "PASS_MIN_MACS", 1)   # passes of a few channels on 1x1 kernels too
    for budget in (1 << 20, 2048):   # one reduction pass, several
        monkeypatch.setattr(_engine, "CACHE_BUDGET", budget)
        for i, (rows, cols) in enumerate(spec.tiles):
            forced["i"] = i
            case = case_for(spec)
            case.update(C=13, OC=13)
            fp = _plan(case, spec_dtype(spec))
            plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
            assert plan.kernel.name == spec.name and plan.cvec is None and plan.tile == i
            assert plan.kernel.variants[i][:2] == (rows, cols)
            assert (plan.rblock < (fp.Cg if spec.direction == "fwd" else fp.OCg)) == (budget == 2048)
            _check(spec, case)


def test_three_row_tile_for_few_output_channels():
    """The float32 dense forwards of output layers (1x1, 3x3 at stride and dilation 1, the
    generic kernel) pick their 3-row tile for 1-3 output channels, the primary tiles from
    4; other kernels and float64 have none."""
    for spec in SPECS:
        if spec.direction != "fwd" or spec.groups != "dense":
            continue
        kernel = _dispatch.lookup("fwd", _plan(case_for(spec), spec_dtype(spec)).problem)
        three = [i for i, (rows, cols, _) in enumerate(kernel.variants) if rows == 3]   # (3x8 on AVX-512, 3x4 on AVX2)
        output_layer = spec.kernel in (1, ANY) or (spec.kernel, spec.stride, spec.dilation) == (3, 1, 1)
        assert bool(three) == (spec.dtype == "f32" and output_layer), spec.name
        for out in range(1, 8):
            index, _ = kernel.pick_tile(out, 1024)
            assert (index in three) == (bool(three) and out <= 3), (spec.name, out)


@pytest.mark.parametrize("spec, twin", [(s, n) for s in CVEC_SPECS for n in s.cvec_narrow],
                         ids=lambda v: f"narrow{v}" if isinstance(v, int) else v.name)
def test_channel_vector_narrow_tiles(spec, twin, forced_rows, monkeypatch):
    """Each narrower twin runs the row tiles of at most its pixels (and more than the
    next narrower one's): the first width from 16 whose rows' tiling has such a tile
    (rows of 14 + 8, 8 + 8, 14 + 7, 14 + 14 + 6, ...).  (Without the price of tiles too
    narrow to hide the latency, which keeps AVX2's 3-pixel twin to rows such as 4 + 3.)"""
    monkeypatch.setattr(_engine, "CVEC_MIN_ACCUMULATORS", 0)
    narrower = [n for n in spec.cvec_narrow if n < twin]
    low, high = max(narrower, default=0) + 1, twin
    for W in range(16, 64):
        case = _case(spec, 37, 21)
        case.update(W=W)
        fp = _plan(case, spec_dtype(spec))
        plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
        assert plan.cvec is not None and plan.tile_cols is not None
        if any(low <= n <= high for _, n in plan.tile_cols):
            break
    else:
        raise AssertionError(f"no width has a tile of {low}..{high} pixels")
    _check(spec, case)


@pytest.mark.parametrize("spec", WGRAD_SPECS, ids=lambda s: s.name)
def test_weight_gradient_by_channel(spec, forced, monkeypatch):
    monkeypatch.setattr(_engine, "_wgrad_chunks", lambda *a: None)   # split over tiles, not pixels
    case = _case(spec, 17, 37)
    case.update(N=3, H=37, W=35)  # more pixels than one segment holds, at every stride
    fp = _plan(case, spec_dtype(spec))
    assert fp.wgrad_kernel.name == spec.name
    assert fp.wgrad_by_channel and fp.wgrad_chunks is None
    # several reduction segments, each adding into the gradient
    assert fp.ocvec_images * fp.ocvec_pixels < case["N"] * fp.grad_len
    _check(spec, case)


@pytest.fixture
def no_icvec_instead(monkeypatch):
    """The weight gradient by input channel only where by output channel cannot run
    (ICVEC_INSTEAD off); the plans made meanwhile are dropped after."""
    monkeypatch.setattr(_engine, "ICVEC_INSTEAD", False)
    _engine.forward_plan.cache_clear()
    yield
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("spec", [s for s in WGRAD_SPECS if s.kernel != 1], ids=lambda s: s.name)
def test_weight_gradient_by_channel_from_few_channels(spec, no_icvec_instead):
    """First layers with fewer input channels than WGRAD_MIN_CHANNELS take the weight
    gradient by output channel where they have WGRAD_MIN_COLUMNS columns (input channels
    x taps): the fewest channels that reach it, against the reference and torch; one
    fewer does not.  (By input channel instead, which float64's 8 channels may take on
    small maps, switched off.)"""
    case = _case(spec, 1, 40)
    kh, kw = case["kernel"] if isinstance(case["kernel"], tuple) else (case["kernel"],) * 2
    C = -(-_engine.WGRAD_MIN_COLUMNS // (kh * kw))
    assert C < _engine.WGRAD_MIN_CHANNELS
    case.update(C=C, N=2)
    fp = _plan(case, spec_dtype(spec))
    assert fp.wgrad_kernel.name == spec.name and fp.wgrad_by_channel
    assert C == 1 or not _plan(dict(case, C=C - 1), spec_dtype(spec)).wgrad_by_channel
    grouped = dict(case, C=2 * C, OC=4 * spec.lanes, groups=2)   # (two whole vectors a group)
    assert not _plan(grouped, spec_dtype(spec)).wgrad_by_channel   # (dense only)
    assert _plan(dict(grouped, C=2 * _engine.WGRAD_MIN_CHANNELS), spec_dtype(spec)).wgrad_by_channel
    _check(spec, case)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_by_channel_in_one_partial_block(dtype, kernel, no_icvec_instead, restore_threads):
    """Dense layers with 1.5 vectors of output channels (WGRAD_MIN_OUT_VECTORS), one partial
    block of the tile's two, take the weight gradient by channel (unless by input channel
    instead, here switched off); fewer do not: against the reference and torch, on 1 and
    2 threads."""
    dtype = np.dtype(dtype)
    lanes = _engine.LANES[_engine.DTYPE_SUFFIX[dtype]]
    case = dict(N=2, C=40, OC=lanes * 3 // 2, H=13, W=11, kernel=(kernel, kernel), stride=(1, 1),
                padding=(kernel // 2, kernel // 2), dilation=(1, 1), groups=1)
    assert _plan(case, dtype).wgrad_by_channel
    assert not _plan(dict(case, OC=lanes * 3 // 2 - 1), dtype).wgrad_by_channel
    _check_directions(case, dtype, make_rng("wgrad-partial-block", dtype.name, kernel), with_torch=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.skipif(not PINNED_GEOMETRY, reason="AVX2's 8 lanes leave no output count below the by-channel "
                    "form's 12 whose transposed layer (as many input channels) reaches its 16")
def test_weight_gradient_transposed(threads, monkeypatch, restore_threads):
    """A narrowing stride-1 1x1 layer without padding with too few output channels for the
    weight gradient by channel (17 in float32) takes the transposed gradient of the layer
    the other way round (ForwardPlan.wgrad_transposed) from the input itself (functional),
    against the reference and torch, also with an infinity in the input, whose pattern
    matches torch's; a module, whose training forward (in place) keeps padded planes, takes
    the pixel-vectorised kernel from them (accumulating into .grad)."""
    convgen.set_num_threads(threads)
    dtype = np.dtype(np.float32)
    case = dict(N=2, C=40, OC=17, H=11, W=9, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    fp = _plan(case, dtype)
    q = fp.wgrad_transposed
    assert not fp.wgrad_by_channel and q == fp.problem._replace(C=17, OC=40)
    assert _engine.forward_plan(q).wgrad_by_channel and fp.wgrad_reads_input
    x, w, b, gy = case_arrays(case, dtype, make_rng("wgrad-transposed", threads))
    args = conv_args(case)
    want = reference_functional("bwd_weight", x, w, b, gy, **args)
    calls = []
    backward_params = _engine.backward_params
    monkeypatch.setattr(_engine, "backward_params", lambda gy, xin, p, *a, **k: calls.append(p) or
                        backward_params(gy, xin, p, *a, **k))
    assert_close(convgen_functional("bwd_weight", x, w, b, gy, **args), want, dtype, "functional")
    assert calls == [fp.problem, q]
    monkeypatch.undo()
    assert_close(convgen_functional("bwd_weight", x, w, b, gy, **args), torch_functional("bwd_weight", x, w, b, gy,
                                                                                         **args), dtype, "vs torch")
    conv = convgen.Conv2d(40, 17, 1, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    for step in (1, 2):
        conv(x)
        conv.backward(gy)
        assert conv._saved.xin.shape == (2 * 40, fp.x_chan) and fp.x_chan > 11 * 9
        assert_close(conv.weight.grad, step * want, dtype, f"module, step {step}")
    xi = x.copy()
    xi[1, 5, 3, 4] = np.inf
    got = convgen_functional("bwd_weight", xi, w, b, gy, **args)
    ref = torch_functional("bwd_weight", xi, w, b, gy, **args)
    real = np.isfinite(ref)
    assert not real.all() and np.array_equal(got[~real], ref[~real], equal_nan=True)
    assert_close(np.where(real, got, 0), np.where(real, ref, 0), dtype, "with an infinity, finite values")


@pytest.fixture(params=[1, 2], ids=["an image per item", "two images per item"])
def chunks(monkeypatch, request):
    """(output rows, images) per work item of the weight gradient split over pixels, forced."""
    forced = (5, request.param)
    monkeypatch.setattr(_engine, "_wgrad_chunks", lambda *a: forced)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    _engine.forward_plan.cache_clear()
    yield forced
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("spec", WGRAD_SPECS, ids=lambda s: s.name)
def test_weight_gradient_pixel_chunks(spec, chunks, monkeypatch, restore_threads):
    """The dense weight gradient split over pixels (its module's ocvec_chunks): three
    images in items of 5 output rows, the last of each image partial, of one image or of
    two (the last item one); 37 output channels, so the last tile's second vector lies past
    the last channel; accumulating into a gradient; on 1 and 2 threads, with the same bits."""
    dtype = spec_dtype(spec)
    case = _case(spec, 17, 37)
    case.update(N=3, H=37, W=35)
    fp = _plan(case, dtype)
    rows, images = chunks
    assert fp.wgrad_kernel.name == spec.name and fp.wgrad_chunks == chunks
    assert fp.OH % rows and fp.OH > rows
    used = _scratch_names(monkeypatch)
    _check(spec, case)
    assert "wgrad_partial" in used and "gT" not in used
    _check_threads_agree(spec, case, fp, make_rng("pixel-chunks", spec.name), accumulate=True)


@pytest.fixture(params=["row chunks", "image pairs"])
def icvec_items(monkeypatch, request):
    """The work items of the weight gradient vectorised over input channels, forced:
    5 output rows (several an image, the last partial), or two whole images (the last
    item one)."""
    def chunking(N, OH, We, C, OC, kk, max_off, itemsize, lanes):
        rows, images = (5, 1) if request.param == "row chunks" else (OH, 2)
        return rows, rows * We + max_off, images
    monkeypatch.setattr(_engine, "_icvec_chunking", chunking)
    monkeypatch.setattr(_engine, "ICVEC_WINDOW_RATIO", 1 << 30)   # (windows of 5 rows on every spec)
    _engine.forward_plan.cache_clear()
    yield request.param
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("tile", [0, 1], ids=["8-row tile", "3-row tile"])
@pytest.mark.parametrize("spec", [s for s in WGRAD_SPECS if s.kernel != 1], ids=lambda s: s.name)
def test_weight_gradient_by_input_channel(spec, tile, icvec_items, monkeypatch, restore_threads):
    """Dense layers with too few output channels for the by-channel form sum their weight
    gradient vectorised over input channels (the module's icvec; 1x1 layers do not): 27
    channels, a partial last vector, and 23 output channels in float32, 8 in float64 (the
    8-row tile; float64 runs 9-11 on the 3-row one) or 2 (the 3-row tile, partial), in
    items of a few rows or of two images; against the reference and torch, and on 1 and 2
    threads with the same bits, accumulating into .grad.  (AVX2's lanes, half as many:
    8 and 4 output channels, its 4-row tile.)"""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    dtype = spec_dtype(spec)
    lanes = spec.lanes
    case = _case(spec, 27, {16: 23, 8: 8, 4: 4, 2: 2}[lanes] if tile == 0 else 2)
    case.update(N=3, H=23, W=21)
    fp = _plan(case, dtype)
    assert fp.wgrad_kernel.name == spec.name and fp.wgrad_by_input and not fp.wgrad_by_channel
    if lanes > 2:   # (float64 in 16-byte vectors: 2 channels fit the 3-row tile best either way)
        assert fp.wgrad_kernel.icvec_tiles[fp.icvec_shape] == spec.icvec_tiles[tile]
    rows, _, images = fp.icvec_chunking
    assert fp.OH % rows if icvec_items == "row chunks" else case["N"] % images
    used = _scratch_names(monkeypatch)
    _check(spec, case)
    assert "wgrad_windows" in used and "gT" not in used
    _check_threads_agree(spec, case, fp, make_rng("by-input-channel", spec.name), accumulate=True)


@pytest.mark.skipif(not PINNED_GEOMETRY, reason="the rule's thresholds in channels, spelled out for AVX-512's lanes")
def test_weight_gradient_by_input_channel_rule():
    """Which dense layers take the weight gradient by input channel (WGRAD_BY_INPUT), and
    its work items: never fewer than WGRAD_CHUNKS, images grouped on small maps."""
    def plan(N=8, C=16, H=32, OC=16, k=3, s=1, groups=1, dtype=np.float32):
        return _plan(dict(N=N, C=C, H=H, W=H, OC=OC, kernel=k, stride=s, padding=k // 2, dilation=1,
                          groups=groups), dtype)
    assert plan().wgrad_by_input and plan(OC=4).wgrad_by_input and plan(C=27, k=5).wgrad_by_input
    assert plan(OC=8, dtype=np.float64).wgrad_by_input and not plan(dtype=np.float64).wgrad_by_input
    assert not plan(OC=32, H=40).wgrad_by_input    # (by output channel)
    assert plan(OC=3).wgrad_by_input and plan(C=64, OC=2).wgrad_by_input   # (the 3-row tile)
    assert not plan(k=1).wgrad_by_input and not plan(C=16, OC=8, k=1).wgrad_by_input   # (1x1)
    assert not plan(OC=1).wgrad_by_input
    shape = lambda **kw: plan(**kw).wgrad_kernel.icvec_tiles[plan(**kw).icvec_shape]
    assert shape() == (8, 3) and shape(OC=3) == (3, 8) and shape(C=64, OC=5) == (3, 8)   # (least waste)
    assert not plan(C=8).wgrad_by_input and not plan(C=20).wgrad_by_input   # (idle input lanes)
    assert plan(C=8, OC=8, dtype=np.float64).wgrad_by_input   # (one vector of float64)
    assert not plan(C=32, groups=2).wgrad_by_input
    assert not plan(C=32, OC=16, k=1).wgrad_by_input   # (transposed: 16 -> 32's by output channel)
    # Instead of by output channel (ICVEC_INSTEAD): 24 output channels, batches of small maps
    assert plan(OC=24).wgrad_by_input and not plan(OC=24).wgrad_by_channel
    assert not plan(OC=28).wgrad_by_input and plan(OC=28).wgrad_by_channel
    assert not plan(OC=24, s=2).wgrad_by_input and not plan(OC=24, k=1).wgrad_by_input
    assert plan(N=128, C=64, H=8, OC=64).wgrad_by_input and plan(N=32, C=32, H=16, OC=32).wgrad_by_input
    assert not plan(N=8, C=128, H=8, OC=128).wgrad_by_input   # (a gradient per item beside 512 pixels)
    assert not plan(N=32, C=64, H=32, OC=64).wgrad_by_input   # (larger maps)
    single = plan(N=1, H=56)
    rows, span, images = single.icvec_chunking
    assert images == 1 and -(-56 // rows) >= _engine.WGRAD_CHUNKS and span == rows * 58 + 2 * 58 + 2
    small = plan(N=32, H=8)
    rows, _, images = small.icvec_chunking
    assert rows == 8 and images > 1 and -(-32 // images) >= _engine.WGRAD_CHUNKS


def _check_threads_agree(spec, case, fp, rng, accumulate=False):
    """The module's weight gradient on 1 and on 2 threads: the same bits (and, with
    accumulate, a second backward adding the same again into .grad)."""
    dtype = spec_dtype(spec)
    x, w, b, gy = case_arrays(case, dtype, rng)
    grads = []
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        assert _engine.threads_for(fp.work, fp.values) == threads
        conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], **conv_args(case), dtype=dtype)
        conv.weight[...] = w
        conv(x)
        conv.backward(gy)
        grads.append(conv.weight.grad.copy())
        if accumulate:
            conv(x)
            conv.backward(gy)   # adds into .grad
            assert_close(conv.weight.grad, 2 * grads[-1], dtype, f"{spec.name}: accumulated")
    assert np.array_equal(grads[0], grads[1]), "differs between 1 and 2 threads"


@pytest.fixture(params=["consecutive", "by tap"])
def wgrad_order(monkeypatch, request):
    """The dense weight gradient's tile order (see _engine._wgrad_tiles), forced."""
    by_tap = request.param == "by tap"
    monkeypatch.setattr(_engine, "WGRAD_TAP_ORDER_SAVING", 1e9 if by_tap else 0.0)
    _engine.forward_plan.cache_clear()
    yield by_tap
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("split", ["tiles", "pixel chunks"])
@pytest.mark.parametrize("spec", WGRAD_SPECS, ids=lambda s: s.name)
def test_weight_gradient_tile_orders(spec, split, wgrad_order, monkeypatch, restore_threads):
    """Both tile orders of the dense weight gradient, split over tiles or over pixels,
    with a padding so wide that some taps read only padding on whole rows and columns
    of the output (their tiles visit a rectangle of it, or none of it): 17 channels, so
    the last block of channels is partial; against the reference and torch, and with
    the same bits on 1 and 2 threads."""
    dtype = spec_dtype(spec)
    monkeypatch.setattr(_engine, "_wgrad_chunks", lambda *a: (5, 1) if split == "pixel chunks" else None)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    case = _case(spec, 17, 37)
    kh, kw = case["kernel"]
    d = case["dilation"] if isinstance(case["dilation"], int) else case["dilation"][0]
    case.update(N=2, H=13, W=11, padding=(d * (kh - 1) + 1, d * (kw - 1)))
    fp = _plan(case, dtype)
    tiles = fp.wgrad_tiles
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert fp.wgrad_kernel.name == spec.name and fp.wgrad_by_channel and tiles is not None
    f = {name: fp.wgrad_kernel.ocvec_columns + i for i, name in enumerate(fp.wgrad_kernel.ocvec_fields)}
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert fp.wgrad_tap_major == (wgrad_order and fp.kk > 1)
    if fp.wgrad_tap_major:
        areas = (tiles[:, f["h1"]] - tiles[:, f["h0"]]) * (tiles[:, f["w1"]] - tiles[:, f["w0"]])
        assert areas.min() < fp.OH * fp.OW
    used = _scratch_names(monkeypatch)
    _check(spec, case)
    assert ("wgrad_tap_major" in used) == fp.wgrad_tap_major
    _check_threads_agree(spec, case, fp, make_rng("wgrad-order", spec.name))


# Grouped layers with wide groups sum their weight gradient with the dense kernels'
# channel-vectorised tiles, a call per group (ForwardPlan.wgrad_ocvec).
GROUPED_WGRAD_SPECS = [s for s in SPECS if s.direction == "bwd_weight" and s.groups == "grouped"]


@pytest.mark.parametrize("groups, out_per_group", [(2, 32), (3, 40), (2, 56)])
@pytest.mark.parametrize("spec", GROUPED_WGRAD_SPECS, ids=lambda s: s.name)
def test_grouped_weight_gradient_by_channel(spec, groups, out_per_group, wgrad_order, monkeypatch,
                                            restore_threads):
    """Groups of 16 input channels and 2 or more vectors of output channels, their blocks
    little idle (float32: 32 and 56, a partial block reading the next group's columns of
    grad_output, not 40; float64: all three), both tile orders, wide zero padding: against
    the reference and torch, the same bits on 1 and 2 threads, a module's .grad accumulating."""
    dtype = spec_dtype(spec)
    lanes = _engine.LANES[_engine.DTYPE_SUFFIX[np.dtype(dtype)]]
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    case = _case(spec, 16 * groups, out_per_group * groups)
    kh, kw = case["kernel"]
    d = case["dilation"] if isinstance(case["dilation"], int) else case["dilation"][0]
    case.update(N=2, H=13, W=11, groups=groups, padding=(d * (kh - 1) + 1, d * (kw - 1)))
    fp = _plan(case, dtype)
    assert fp.wgrad_kernel.name == spec.name
    block = 2 * lanes
    assert fp.wgrad_by_channel == (out_per_group >= block and -(-out_per_group // block) * block <= 1.2 * out_per_group)
    if not fp.wgrad_by_channel:
        return
    assert fp.wgrad_ocvec.name == spec.name.replace("grouped", "dense")
    assert fp.wgrad_tap_major == (wgrad_order and fp.kk > 1)
    _check(spec, case)
    _check_threads_agree(spec, case, fp, make_rng("grouped-wgrad", spec.name, groups), accumulate=True)


@pytest.mark.parametrize("case, input_too", [
    (dict(N=1, C=2 * 40, OC=2 * 64, H=15, W=13, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=2), False),
    (dict(N=2, C=3 * 64, OC=3 * 64, H=45, W=44, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=3), True),
    (dict(N=3, C=2 * 64, OC=2 * 64, H=9, W=9, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=2), True),
], ids=["one image", "a batch, strided", "1x1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_wide_groups_run_as_dense_layers(case, input_too, dtype, monkeypatch, restore_threads):
    """Grouped layers whose groups would each run the dense channel-vector tile run the
    forward (and, where a group's input gradient would too, with 64 input channels a
    group, the input gradient) a group at a time as dense layers (ForwardPlan.groupwise /
    groupwise_input): every direction against the reference and torch, and a module's
    training step in zeros and reflect padding (planes kept for the grouped weight
    gradient), on 1 and 2 threads; ResNeXt's narrow groups keep the grouped kernel."""
    dtype = np.dtype(dtype)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    _engine.forward_plan.cache_clear()
    case = dict(case, dilation=(1, 1))
    fp = _plan(case, dtype)
    assert fp.groupwise is not None and fp.groupwise.groups == 1 and fp.groupwise.C == fp.Cg
    assert (fp.groupwise_input is not None) == input_too
    calls = []
    forward = _engine.forward
    monkeypatch.setattr(_engine, "forward", lambda x, w, b, p, *a, **k: calls.append(p) or forward(x, w, b, p, *a, **k))
    run_in_place = _engine._run_in_place
    monkeypatch.setattr(_engine, "_run_in_place", lambda fp, *a, weight_transposed=False: (
        weight_transposed and calls.append(fp.problem)) or run_in_place(fp, *a, weight_transposed=weight_transposed))
    rng = make_rng("groupwise", case["N"], case["C"], dtype.name)
    x, w, b, gy = _check_directions(case, dtype, rng, with_torch=True)
    # (a forward per group, on 1 and on 2 threads; and per group's input gradient, where that
    # runs as the forward of a 1x1 layer with the same channels, its weight read transposed:
    # input_gradient_as_forward)
    as_forward = fp.groupwise_input is not None and _engine.input_gradient_as_forward(fp.groupwise_input)
    assert calls.count(fp.groupwise) == 2 * fp.G * (2 if as_forward == fp.groupwise else 1)
    for mode in ("zeros", "reflect"):
        for threads in (1, 2):
            convgen.set_num_threads(threads)
            conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], **conv_args(case), padding_mode=mode,
                                  dtype=dtype)
            conv.weight[...], conv.bias[...] = w, b
            y = conv(x)
            gx = conv.backward(gy)
            args = dict(conv_args(case), padding_mode=mode)
            what = f"module, {mode}, {threads} thread(s)"
            assert_close(y, reference_functional("fwd", x, w, b, gy, **args), dtype, f"{what}: forward")
            assert_close(gx, reference_functional("bwd_data", x, w, b, gy, **args), dtype, f"{what}: input grad")
            assert_close(conv.weight.grad, reference_functional("bwd_weight", x, w, b, gy, **args), dtype,
                         f"{what}: weight grad")
    assert _plan(dict(case, C=128, OC=128, groups=32), dtype).groupwise is None
    _engine.forward_plan.cache_clear()


def test_wgrad_tiles(monkeypatch):
    """Every (channel, tap) column in exactly one tile, stored at its place in the
    weight's layout or, by tap, in the tap-major one; DeepLab's ASPP (rate 6, 33x33)
    takes one tap of 12 channels per tile, each visiting that tap's rectangle (its
    corner taps 27 x 27 pixels), and so would 17 channels if forced (a partial block);
    ResNet's 14x14 3x3 layer keeps consecutive columns."""
    fields = ("used", "store", "h0", "h1", "w0", "w1")
    f = {name: 12 + i for i, name in enumerate(fields)}
    masks = _square_3x3_masks(33, 6)
    span = {0: (6, 33), 1: (0, 33), 2: (0, 27)}
    for C in (512, 17):
        if C == 17:
            monkeypatch.setattr(_engine, "WGRAD_TAP_ORDER_SAVING", 1e9)
        tiles, tap_major = _engine._wgrad_tiles(masks, C, 9, 12, fields)
        assert tap_major and len(tiles) == -(-C // 12) * 9
        assert sorted(c for t in tiles for c in t[:t[f["used"]]]) == list(range(C * 9))
        for t in tiles:
            tap, c0 = t[0] % 9, t[0] // 9
            assert list(t[:t[f["used"]]]) == list(range(t[0], t[0] + 9 * t[f["used"]], 9))
            assert t[f["store"]] == tap * C + c0   # (tap-major: (OC, 9, C))
            ky, kx = divmod(tap, 3)
            assert (t[f["h0"]], t[f["h1"]]) == span[ky] and (t[f["w0"]], t[f["w1"]]) == span[kx]
    monkeypatch.undo()
    masks = _square_3x3_masks(14, 1)
    tiles, tap_major = _engine._wgrad_tiles(masks, 256, 9, 12, fields)
    assert not tap_major and len(tiles) == 256 * 9 // 12
    assert [c for t in tiles for c in t[:t[f["used"]]]] == list(range(256 * 9))
    assert (tiles[:, f["store"]] == tiles[:, 0]).all()
    # (without padding, or a tap reading only padding: the full map, or nothing)
    tiles, tap_major = _engine._wgrad_tiles(np.zeros((9, 5, 5), bool), 24, 9, 12, fields)
    assert not tap_major and (tiles[:, f["h0"]:] == [0, 5, 0, 5]).all()
    masks = np.zeros((9, 5, 5), bool)
    masks[0] = True
    monkeypatch.setattr(_engine, "WGRAD_TAP_ORDER_SAVING", 1e9)
    tiles, tap_major = _engine._wgrad_tiles(masks, 24, 9, 12, fields)
    empty = tiles[:, 0] % 9 == 0
    assert tap_major and (tiles[empty, f["h0"]:] == 0).all() and (tiles[~empty, f["h0"]:] == [0, 5, 0, 5]).all()


def test_taps_last():
    """_layout.taps_last turns a tap-major (rows, kk, C) gradient into (rows, C, kk),
    or adds it there."""
    for dtype in (np.float32, np.float64):
        src = np.arange(5 * 9 * 7, dtype=dtype).reshape(5, 9, 7)
        dst = np.empty((5, 7, 3, 3), dtype)
        _layout.taps_last(src, dst, 9, False, 2)
        np.testing.assert_array_equal(dst, src.transpose(0, 2, 1).reshape(5, 7, 3, 3))
        _layout.taps_last(src, dst, 9, True, 1)
        np.testing.assert_array_equal(dst, 2 * src.transpose(0, 2, 1).reshape(5, 7, 3, 3))


def _assert_nonfinite_pattern(got, want, dtype):
    """got has want's NaNs and infinities where want has them (want holding NaNs
    and finite values), and its finite values within dtype's tolerance."""
    assert np.isnan(want).any() and np.isfinite(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert_close(np.where(finite, got, 0), np.where(finite, want, 0), dtype, "with infinities and NaNs")


@pytest.mark.parametrize("split", ["tiles", "pixel chunks", "two groups"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_weight_gradient_reads_the_input_in_place(dtype, split, monkeypatch, restore_threads):
    """F.conv2d_weight of a stride-1 1x1 layer without padding hands the channel-vector
    tiles the input itself as its planes (planes_in_place), copying nothing: split over
    tiles or over pixel chunks, or a call per group, from an input that does not start
    on a cache line, against the reference and torch on 1 and 2 threads; then with
    infinities and NaNs in the input, which no longer divert it to the exact path,
    against torch's pattern of them (each product of real pixels only, as torch's)."""
    dtype = np.dtype(dtype)
    monkeypatch.setattr(_engine, "_wgrad_chunks", lambda *a: (5, 2) if split == "pixel chunks" else None)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    _engine.forward_plan.cache_clear()
    case = dict(N=3, C=19, OC=37, H=13, W=11, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    if split == "two groups":
        case.update(C=2 * 17, OC=2 * 32, groups=2)
    fp = _plan(case, dtype)
    assert fp.wgrad_reads_input and fp.wgrad_by_channel and (fp.wgrad_chunks is not None) == (split == "pixel chunks")
    rng = make_rng("in place", split, dtype.name)
    x, w, b, gy = case_arrays(case, dtype, rng)
    buf = np.empty(x.size + 1, dtype)
    x = buf[1:].reshape(x.shape)   # (off the cache lines: the tiles broadcast its values)
    x[...] = rng.standard_normal(x.shape)
    assert np.shares_memory(_engine.planes_in_place(x, fp.problem), x)
    args = conv_args(case)
    used = _scratch_names(monkeypatch)
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        got = convgen_functional("bwd_weight", x, w, b, gy, **args)
        assert_close(got, reference_functional("bwd_weight", x, w, b, gy, **args), dtype, f"{threads} thread(s)")
        assert_close(got, torch_functional("bwd_weight", x, w, b, gy, **args), dtype, f"{threads} thread(s), torch")
    assert "temporary_planes" not in used and ("wgrad_partial" in used) == (split == "pixel chunks")
    x[0, 3, 2, 4], x[1, 0, 12, 10], x[2, 18, 0, 0] = np.inf, -np.inf, np.nan
    gy[0, :5, 2, 4] = 0   # (0 * inf: NaN in torch too)
    got = convgen_functional("bwd_weight", x, w, b, gy, **args)
    want = torch_functional("bwd_weight", x, w, b, gy, **args)
    _assert_nonfinite_pattern(got, want, dtype)
    _engine.forward_plan.cache_clear()


def test_weight_gradient_in_place_rule():
    """Only stride-1 1x1 layers without padding whose weight gradient runs the
    channel-vector tiles read their input in place."""
    def in_place(C=64, OC=64, k=1, stride=1, pad=0, H=14):
        case = dict(N=1, C=C, OC=OC, H=H, W=H, kernel=(k, k), stride=(stride, stride), padding=(pad, pad),
                    dilation=(1, 1), groups=1)
        return _plan(case, np.dtype(np.float32)).wgrad_reads_input
    assert in_place() and in_place(C=256, OC=64, H=56) and in_place(C=512, OC=2048, H=7)
    assert not in_place(pad=1) and not in_place(k=3, pad=1) and not in_place(stride=2)
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert not in_place(OC=8)   # (the pixel-vectorised kernel: it reads whole vectors past a row's end)


def test_weight_gradient_pixel_chunk_rule(monkeypatch):
    """Split over pixels where the partial gradients are small beside the data, in
    WGRAD_CHUNKS items per image (or one per image in a batch), WGRAD_MAX_CHUNKS at
    most, never one item only.  (Those two as on 2 cores: they grow with OpenMP's
    default threads.)"""
    monkeypatch.setattr(_engine, "WGRAD_CHUNKS", 4)
    monkeypatch.setattr(_engine, "WGRAD_MAX_CHUNKS", 16)
    def chunks(N, OH, C, OC, k):   # square maps, stride 1, 'same' padding
        return _engine._wgrad_chunks(N, OH, OH, C, OC, k * k, (OH + k - 1) ** 2, 4)
    assert chunks(1, 56, 256, 64, 1) == (14, 1)     # ResNet's 1x1: 4 items of 14 rows
    assert chunks(1, 56, 64, 64, 3) == (14, 1)      # ResNet's 56x56 3x3
    assert chunks(16, 32, 64, 64, 3) == (32, 1)     # an image per item ...
    assert chunks(32, 32, 64, 64, 3) == (32, 2)     # ... CIFAR's batch of 32: two, 16 items
    assert chunks(256, 32, 64, 64, 3) == (32, 16)
    assert chunks(1, 128, 64, 64, 3) == (15, 1)     # 128x128, 8 MB: items of at most 1 MB
    assert chunks(8, 128, 64, 64, 3) == (15, 8)     # ... 9 row ranges of 8 images
    assert chunks(1, 14, 256, 256, 3) is None       # partials 20x the data
    assert chunks(1, 28, 128, 128, 3) is None       # ~1x: not yet
    assert chunks(1, 1, 64, 64, 1) is None          # one row: one item


# 1x1 kernels reducing over more channels than they output run their work items
# channel tiles innermost (ForwardPlan / BackwardDataPlan.tiles_inner).
ONE_BY_ONE = [s for s in SPECS if s.kernel == 1 and s.direction in ("fwd", "bwd_data")]


@pytest.mark.parametrize("spec", ONE_BY_ONE, ids=lambda s: s.name)
def test_one_by_one_channel_tiles_inner(spec, monkeypatch):
    # forward reduces over C, the input gradient over OC
    C, OC = (40, 13) if spec.direction == "fwd" else (13, 40)
    case = _case(spec, C, OC)
    fp = _plan(case, spec_dtype(spec))
    plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
    assert plan.kernel.name == spec.name
    assert plan.tiles_inner
    _check(spec, case)
    if spec.direction == "fwd":   # ... and forwards widening the channels where TILES_INNER_ALL_POINTWISE
        for every in (False, True):
            monkeypatch.setattr(_engine, "TILES_INNER_ALL_POINTWISE", every)
            _engine.forward_plan.cache_clear()
            assert _plan(_case(spec, OC, C), spec_dtype(spec)).tiles_inner == every
        _engine.forward_plan.cache_clear()


# ... and those of them at stride 1 without padding that run the channel-vector tile read
# their input (grad_output) in place, a run of pixel chunks at a time copied into a panel.
PANEL_SPECS = [s for s in ONE_BY_ONE if s.stride == 1 and s.cvec_tile is not None]


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("panel_chunks", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec, widening", [(s, False) for s in PANEL_SPECS] + [
    (s, True) for s in PANEL_SPECS if s.direction == "fwd"], ids=lambda v: v.name if hasattr(v, "name") else
    ("widening" if v else "narrowing"))
def test_one_by_one_panels(spec, widening, threads, panel_chunks, images, forced_flat, monkeypatch,
                           restore_threads):
    """Images of 11 x 9 pixels: the last chunk of each image is partial and, at 3 chunks
    per panel, so is its last panel (two chunks of 3).  A single image on 2 threads
    shares its 8 chunks out again, as 4 panels of 2, an even number of work items.  The
    layers reduce over more channels than they output, or, forwards, fewer
    (TILES_INNER_ALL_POINTWISE, AVX2's rule, forced on)."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    monkeypatch.setattr(_engine, "TILES_INNER_ALL_POINTWISE", widening)
    convgen.set_num_threads(threads)
    C, OC = (40, 21) if spec.direction == "fwd" else (21, 40)   # a partial block of channels
    if widening:
        C, OC = 40, 53   # (still 40 channels reduced over, a partial block of them output)
    lanes, itemsize = spec.lanes, spec_dtype(spec).itemsize
    chunk = spec.cvec_tile[0]
    monkeypatch.setattr(_engine, "PANEL_MIN_ITEMS", 1)
    monkeypatch.setattr(_engine, "CVEC_MIN_PIXELS_1X1", 0)   # (else one 11 x 9 map takes the pixel tiles)
    # (the panel holds the 40 channels reduced over, rounded up to a vector)
    budget = panel_chunks * chunk * _geometry.round_up(40, lanes) * itemsize
    monkeypatch.setattr(_engine, "PANEL_BUDGET", {"f32": budget, "f64": budget})
    case = _case(spec, C, OC)
    case.update(N=images)
    fp = _plan(case, spec_dtype(spec))
    plan = fp if spec.direction == "fwd" else _engine.backward_data_plan(fp.problem)
    assert plan.kernel.name == spec.name
    assert plan.panels and _engine.threads_for(fp.work) == threads
    # (an odd number of cache lines: see _panel_pixels)
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert plan.panel_pixels // chunk == panel_chunks and plan.panel_pixels * lanes * itemsize // 64 % 2 == 1
    assert (case["H"], case["W"]) == (11, 9) and _geometry.ceil_div(11 * 9, chunk) % panel_chunks == (panel_chunks - 1)
    _check(spec, case)


# ... and, where ForwardPlan.in_place says, their forwards at stride 1 without padding
# run the pixel tiles over the input itself, each plane's last chunks through the
# tiles' twins that load no further than its last pixel.
IN_PLACE_SPECS = [s for s in SPECS if s.in_place]


def _beside_unreadable_page(a, after=None):
    """A copy of `a` beside a page that may not be read (so a kernel that reads outside
    the array crashes rather than passes): its last byte ending where that page starts
    (after None: reads past the array), or its first `after` bytes into the page that
    follows it (reads before the array's cache line); and a function that makes that
    page readable again."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    pages = -(-(a.nbytes + (after or 0)) // page) + 1
    buf = mmap.mmap(-1, pages * page)
    guard_page = pages - 1 if after is None else 0
    guard = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + guard_page * page
    start = (pages - 1) * page - a.nbytes if after is None else page + after
    copy = np.frombuffer(buf, a.dtype, a.size, start).reshape(a.shape)
    copy[...] = a
    assert libc.mprotect(guard, page, 0) == 0, ctypes.get_errno()   # (PROT_NONE)
    return copy, lambda: libc.mprotect(guard, page, mmap.PROT_READ | mmap.PROT_WRITE)


@pytest.mark.parametrize("leftover", [True, False], ids=["leftover", "chunks-past-the-end"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", IN_PLACE_SPECS, ids=lambda s: s.name)
def test_one_by_one_in_place(spec, threads, leftover, monkeypatch, restore_threads):
    """Narrow 1x1 layers' inference forward reads the input itself (no scratch memory asked
    for but, with leftover, the copy of each plane's last 3 pixels that its dot products
    read), its last byte just before an unreadable page: 2 images of 11 x 9 pixels (planes
    ending 3 pixels past a chunk: with IN_PLACE_LEFTOVER 0, the last chunks load no further
    than the plane) and 3 of 4 x 6 (every plane shorter than a chunk, so vectors with nothing
    to load), against the reference and torch."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    monkeypatch.setattr(_engine, "IN_PLACE_PIXEL_WASTE", float("inf"))
    if not leftover:
        monkeypatch.setattr(_engine, "IN_PLACE_LEFTOVER", 0)
    _engine.forward_plan.cache_clear()
    convgen.set_num_threads(threads)
    dtype = spec_dtype(spec)
    for N, C, OC, H, W in ((2, 40, 13, 11, 9), (3, 24, 32, 4, 6)):
        case = _case(spec, C, OC)
        case.update(N=N, H=H, W=W)
        fp = _plan(case, dtype)
        assert fp.kernel.name == spec.name and fp.in_place is not None
        left = 3 if leftover and H * W == 99 else 0
        if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
            assert fp.in_place[2] == left and (left == 0 or fp.in_place[1] + left == H * W)
        assert _engine.threads_for(fp.work, fp.values) == threads
        rng = make_rng("in-place", spec.name, N)
        x, w, b, gy = case_arrays(case, dtype, rng)
        guarded, release = _beside_unreadable_page(x)
        used = _scratch_names(monkeypatch)
        try:
            got = convgen_functional("fwd", guarded, w, b, gy, **conv_args(case))
        finally:
            release()
        if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
            assert used == (["fwd_leftover"] if left else [])
        used.clear()
        args = conv_args(case)
        assert_close(got, reference_functional("fwd", x, w, b, gy, **args), dtype, f"{spec.name} vs reference")
        assert_close(got, torch_functional("fwd", x, w, b, gy, **args), dtype, f"{spec.name} vs torch")
        # A module's training forward too, keeping its padded planes for the backward.
        conv = convgen.Conv2d(C, OC, 1, dtype=dtype)
        conv.weight[...], conv.bias[...] = w, b
        y = conv(x)
        assert conv._saved.xin.shape == (N * C, fp.x_chan)
        if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
            assert used == (["fwd_leftover"] if left else [])
        assert_close(y, got, dtype, "module forward")
        conv.backward(gy)
        assert_close(conv.weight.grad, reference_functional("bwd_weight", x, w, b, gy, **args), dtype, "module gw")
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "weight-transposed"])
@pytest.mark.parametrize("rblock", [40, 16], ids=["one-pass", "passes"])
@pytest.mark.parametrize("tiles_inner", [True, False], ids=["tiles-inner", "chunks-inner"])
@pytest.mark.parametrize("spec", IN_PLACE_SPECS, ids=lambda s: s.name)
def test_one_by_one_in_place_orders(spec, tiles_inner, rblock, transposed, monkeypatch, restore_threads):
    """_run_in_place in either order of channel tiles and pixel chunks, its 40 channels in
    one pass or in passes of 16, 16 and 8 (the dot products past the chunks summed over the
    passes too), with the pixels past the chunks (IN_PLACE_LEFTOVER) and without, its
    weight as it is or read transposed (an input gradient's), on 2 threads: against the
    reference.  (31 output channels: a last channel tile of fewer rows, which the passes'
    dot products add into once.)"""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    _engine.forward_plan.cache_clear()
    convgen.set_num_threads(2)
    dtype = spec_dtype(spec)
    for H, W in ((11, 9), (8, 12)):   # (99 pixels: 3 past a chunk; 96: none)
        case = _case(spec, 40, 31)
        case.update(N=2, H=H, W=W)
        fp = _plan(case, dtype)
        tile, out_len, left, _ = fp.in_place
        if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
            assert fp.kernel.name == spec.name and left == (3 if H * W == 99 else 0)
        x, w, b, gy = case_arrays(case, dtype, make_rng("in-place-orders", spec.name, H))
        y = np.empty(fp.y_shape, dtype)
        if transposed:   # (the (C, OC) weight of a layer from OC to C channels)
            weight = np.ascontiguousarray(w.reshape(31, 40).T).reshape(40, 31, 1, 1)
            want = reference_functional("fwd", x, w, None, gy, **conv_args(case))
        else:
            weight, want = w, reference_functional("fwd", x, w, b, gy, **conv_args(case))
        plan = _engine.InPlacePlan(tile, out_len, left, tiles_inner)
        _engine._run_in_place(fp, plan, x, weight, None if transposed else b, y, 2, weight_transposed=transposed,
                              rblock=rblock)
        assert_close(y, want, dtype, f"{spec.name}, {H}x{W}")
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_by_one_inference_in_place_on_batches(dtype, monkeypatch, restore_threads):
    """An inference forward (no_grad) of a 1x1 layer on a batch of small maps reads its input
    in place where the rule for them says so (IN_PLACE_INFERENCE_MAX_PIXELS, AVX2's; here on
    any target), through inference_plan's twin, while the training forward keeps its own
    plan: 5 images of 512 -> 128 at 10x10 (2^25 multiply-adds, 500 pixels: beyond the
    other rules), against the reference and torch."""
    monkeypatch.setattr(_engine, "IN_PLACE_INFERENCE_MAX_PIXELS", 196)
    monkeypatch.setattr(_engine, "IN_PLACE_PIXEL_WASTE", float("inf"))
    _engine.forward_plan.cache_clear()
    convgen.set_num_threads(2)
    dtype = np.dtype(dtype)
    case = dict(N=5, C=512, OC=128, H=10, W=10, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    fp = _plan(case, dtype)
    assert fp.in_place is None and _engine.inference_plan(fp.problem).in_place is not None
    x, w, b, gy = case_arrays(case, dtype, make_rng("inference-in-place", dtype.name))
    args = conv_args(case)
    want = reference_functional("fwd", x, w, b, gy, **args)
    conv = convgen.Conv2d(512, 128, 1, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    run_in_place = _engine._run_in_place
    calls = []
    monkeypatch.setattr(_engine, "_run_in_place", lambda fq, *a, **k: calls.append(fq) or run_in_place(fq, *a, **k))
    with convgen.no_grad():
        y = conv(x)
    assert len(calls) == 1 and calls[0] is _engine.inference_plan(fp.problem)
    assert_close(y, want, dtype, "inference forward vs reference")
    assert_close(y, torch_functional("fwd", x, w, b, gy, **args), dtype, "inference forward vs torch")
    assert_close(conv(x), want, dtype, "training forward")   # (its own plan: not in place)
    assert len(calls) == 1
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("spec", IN_PLACE_SPECS, ids=lambda s: s.name)
def test_one_by_one_in_place_keeping_the_input(spec, monkeypatch):
    """A forward that keeps the input itself for the weight gradient (the drop-in's, whose
    input autograd guards: share_input) reads it in place too: no scratch memory, the
    input returned as the planes (no scratch memory but the copy of each plane's last
    pixels that IN_PLACE_LEFTOVER's dot products read).  (32 output channels: in place, and
    enough for the weight gradient by channel, which reads the input itself.)"""
    dtype = spec_dtype(spec)
    case = _case(spec, 40, 32)
    case.update(N=2, H=11, W=9)
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.in_place is not None and fp.wgrad_reads_input
    x, w, b, gy = case_arrays(case, dtype, make_rng("in-place-kept", spec.name))
    used = _scratch_names(monkeypatch)
    y, xin, nonfinite = _engine.forward(x, w, b, fp.problem, keep=True, share_input=True)
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert used == ["fwd_leftover"] and fp.in_place[2] == 3
    assert np.shares_memory(xin, x) and not nonfinite
    assert_close(y, reference_functional("fwd", x, w, b, gy, **conv_args(case)), dtype, "forward")


def _input_gradients_with_an_infinite_weight(case, dtype, seed, route):
    """The input gradient of `case` against the reference and torch, for its weight and for
    that weight with one value infinite (the exact path: NaN where torch's is, the rest
    close); route(weight, finite) checks, after each call, which way it ran.  Returns the
    arrays (x, weight, bias, grad_output)."""
    x, w, b, gy = case_arrays(case, dtype, make_rng(seed, dtype.name))
    args = conv_args(case)
    for weight in (w, np.where(np.arange(w.size).reshape(w.shape) == 7, np.inf, w).astype(dtype)):
        got = convgen_functional("bwd_data", x, weight, b, gy, **args)
        finite = np.isfinite(weight).all()
        route(weight, finite)
        want = torch_functional("bwd_data", x, weight, b, gy, **args)
        if finite:   # (the reference folds its padding by matrix products: 0 * inf gives it NaNs)
            assert_close(got, reference_functional("bwd_data", x, weight, b, gy, **args), dtype, "vs reference")
            assert_close(got, want, dtype, "vs torch")
        else:
            real = np.isfinite(want)
            assert not real.all() and np.array_equal(got[~real], want[~real], equal_nan=True)
            assert_close(np.where(real, got, 0), np.where(real, want, 0), dtype, "vs torch, finite values")
    return x, w, b, gy


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_by_one_input_gradient_as_forward(dtype, threads, monkeypatch, restore_threads):
    """A stride-1 1x1 layer's input gradient without padding runs as the forward of the
    1x1 layer from its output channels to its input channels, its weight read transposed
    (not copied), reading grad_output in place: against the reference and torch, with an
    infinite weight too (the exact path); not where the weight is large, or with padding or
    a stride.  (11 x 9 maps: the forward's dot products past its chunks read the weight
    transposed too.)"""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    convgen.set_num_threads(threads)
    dtype = np.dtype(dtype)
    case = dict(N=2, C=40, OC=13, H=11, W=9, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    p = _plan(case, dtype).problem
    q = _engine.input_gradient_as_forward(p)
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert q == p._replace(C=13, OC=40) and _engine.forward_plan(q).in_place[2] == 3
    calls = []
    run_in_place = _engine._run_in_place
    monkeypatch.setattr(_engine, "_run_in_place", lambda fp, plan, x, w, *a, **k: calls.append(
        (fp.problem, w, k)) or run_in_place(fp, plan, x, w, *a, **k))

    def route(weight, finite):
        assert len(calls) == finite
        if finite:
            assert calls[0][0] == q and calls[0][1] is weight and calls[0][2] == dict(weight_transposed=True)
        calls.clear()
    _input_gradients_with_an_infinite_weight(case, dtype, "input-as-forward", route)

    def transposed(N, C, OC, H, W):   # (the weight read as it is, transposed)
        p = _engine.Problem(N, C, H, W, OC, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, "zeros", "f32")
        return _engine.reads_weight_transposed(p, p._replace(C=OC, OC=C))
    assert transposed(1, 144, 24, 56, 56) and transposed(1, 24, 144, 56, 56) and transposed(1, 16, 96, 112, 112)
    assert not transposed(1, 960, 160, 7, 7)      # its weight 2.8x grad_output and the gradient together
    assert not transposed(1, 2048, 512, 7, 7) and not transposed(1, 512, 512, 10, 10)
    # (a forward from 64 to 256 channels at 56x56: in place by the any-address rule, AVX2's and
    # the 16-byte baseline's only)
    assert transposed(1, 256, 64, 56, 56) == _engine.IN_PLACE_ANY_ADDRESS
    assert not transposed(1, 128, 512, 28, 28)    # (its weight 0.13 of the values: over that rule's share)
    for pad, stride in ((1, 1), (0, 2)):
        assert _engine.input_gradient_as_forward(_engine.Problem(1, 144, 56, 56, 24, 1, 1, stride, stride, 1, 1, pad,
                                                                 pad, pad, pad, 1, "zeros", "f32")) is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_by_one_input_gradient_from_transposed_copy(dtype, threads, monkeypatch, restore_threads):
    """Where the weight is too large to read transposed in place, a stride-1 1x1 layer's
    input gradient without padding is the forward of the layer from its output channels
    to its input channels on the weight's transposed copy (_layout.transpose), whatever
    route that forward takes: against the reference and torch, with an infinite weight
    too (the exact path), and from a frozen module, whose copy is made once.  Up to
    INPUT_AS_FORWARD_COPY_BYTES of weight (AVX2's 4 MB, set here on any target), on maps
    whose planes do not alias."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    monkeypatch.setattr(_engine, "INPUT_AS_FORWARD_COPY_BYTES", 4 << 20)
    _engine.forward_plan.cache_clear()   # (which hold the input gradients' routes)
    convgen.set_num_threads(threads)
    dtype = np.dtype(dtype)
    # (45 x 90: neither a multiple of the transpose's blocks; 7x7 maps, as ResNet's last stage)
    case = dict(N=2, C=45, OC=90, H=7, W=7, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    p = _plan(case, dtype).problem
    q = _engine.input_gradient_as_forward(p)
    assert q == p._replace(C=90, OC=45) and not _engine.reads_weight_transposed(p, q)
    forwards, transposes = [], []
    forward, transpose = _engine.forward, _layout.transpose
    monkeypatch.setattr(_engine, "forward", lambda x, w, b, p, *a, **k: forwards.append((p, w.copy())) or forward(
        x, w, b, p, *a, **k))
    monkeypatch.setattr(_layout, "transpose", lambda *a: transposes.append(a) or transpose(*a))

    def route(weight, finite):
        assert len(forwards) == finite
        if finite:
            assert forwards[0][0] == q and np.array_equal(forwards[0][1], weight.transpose(1, 0, 2, 3))
        forwards.clear()
    x, w, b, gy = _input_gradients_with_an_infinite_weight(case, dtype, "input-from-copy", route)
    args = conv_args(case)
    # a frozen module's backward: the same gradient, the weight transposed by the first call only
    conv = convgen.Conv2d(45, 90, 1, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    conv.freeze()
    transposes.clear()
    for _ in range(2):
        conv(x)
        conv.zero_grad()
        got = conv.backward(gy)
        assert_close(got, reference_functional("bwd_data", x, w, b, gy, **args), dtype, "frozen module")
    assert len(transposes) == 1
    sizes = [(C * OC * dtype.itemsize, _engine.input_gradient_as_forward(_engine.Problem(
        1, C, 7, 7, OC, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, "zeros", "f32" if dtype == np.float32 else "f64")))
        for C, OC in ((512, 2048), (2048, 2048))]
    assert [q is not None for _, q in sizes] == [size <= _engine.INPUT_AS_FORWARD_COPY_BYTES for size, _ in sizes]
    # (not on maps whose planes alias: 16x16 and 32x32 float32 planes are 1 and 4 KB)
    routed = {H: _engine.input_gradient_as_forward(_engine.Problem(1, 588, H, H, 1024, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1,
                                                                   "zeros", "f32")) is not None
              for H in (7, 10, 12, 14, 16, 28, 32)}
    assert routed == {7: True, 10: True, 12: True, 14: True, 16: False, 28: True, 32: False}
    _engine.forward_plan.cache_clear()


def test_transpose_against_numpy():
    """_layout.transpose: dst = src.T for shapes on and off its blocks' multiples, 1 and 2
    threads, both dtypes, writing nothing past dst."""
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        for R, S in ((1, 1), (1, 9), (9, 1), (8, 16), (37, 70), (70, 37), (64, 17), (130, 260)):
            src = rng.standard_normal((R, S)).astype(dtype)
            for threads in (1, 2):
                buf = np.full(R * S + 32, np.nan, dtype)
                dst = buf[:R * S].reshape(S, R)
                _layout.transpose(src, dst, threads)
                assert np.array_equal(dst, src.T) and np.isnan(buf[R * S:]).all(), (R, S, threads)


def test_copy_rows_against_numpy():
    """_layout.copy_rows: every row into wider (or as wide) rows, zeros past it, row
    counts on and off the threads' multiples, 1 to 3 threads, both dtypes, writing nothing
    past dst."""
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        for R, L, M in ((1, 1, 1), (1, 7, 16), (5, 16, 16), (7, 49, 80), (64, 196, 208), (3, 100, 101)):
            src = rng.standard_normal((R, L)).astype(dtype)
            for threads in (1, 2, 3):
                buf = np.full(R * M + 32, np.nan, dtype)
                dst = buf[:R * M].reshape(R, M)
                _layout.copy_rows(src, dst, threads)
                assert np.array_equal(dst[:, :L], src) and not dst[:, L:].any(), (R, L, M, threads)
                assert np.isnan(buf[R * M:]).all(), (R, L, M, threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_module_keeps_a_copy_of_a_one_by_one_input(dtype, threads, monkeypatch, restore_threads):
    """A module's training forward of a stride-1 1x1 layer without padding whose forward
    kernels read no planes and whose weight gradient runs the channel-vector tiles keeps
    its planes by a plain copy of the input's rows (_layout.copy_rows: no pad_phase, no
    infinity check, as where they are the input itself): a copy (the caller may change x
    after the forward), recycled by the next forward, on the threads (COPY_MIN_BYTES 0);
    gradients against the reference and torch, then with infinities and NaNs in the
    input, against torch's pattern of them."""
    dtype = np.dtype(dtype)
    convgen.set_num_threads(threads)
    monkeypatch.setattr(_engine, "COPY_MIN_BYTES", 0)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    _engine.forward_plan.cache_clear()
    case = dict(N=2, C=40, OC=48, H=9, W=11, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    fp = _plan(case, dtype)
    assert fp.wgrad_reads_input and fp.wgrad_by_channel and fp.x_chan > 9 * 11
    rng = make_rng("kept copy", dtype.name, threads)
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    conv = convgen.Conv2d(40, 48, 1, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    calls, copy_rows, pad_phase = [], _layout.copy_rows, _layout.pad_phase
    monkeypatch.setattr(_layout, "copy_rows", lambda src, dst, t: calls.append(("copy_rows", t)) or copy_rows(src, dst, t))
    monkeypatch.setattr(_layout, "pad_phase", lambda *a, **k: calls.append("pad_phase") or pad_phase(*a, **k))
    y = conv(x)
    assert calls == [("copy_rows", threads)]
    kept = conv._saved.xin
    assert kept.shape == (2 * 40, fp.x_chan) and not np.shares_memory(kept, x)
    x_then = x.copy()
    assert np.array_equal(kept[:, :9 * 11], x_then.reshape(80, 99)) and not kept[:, 9 * 11:].any()
    x[...] = rng.standard_normal(x.shape)   # the caller reuses its buffer
    gx = conv.backward(gy)
    assert_close(y, reference_functional("fwd", x_then, w, b, gy, **args), dtype, "forward")
    want = reference_functional("bwd_weight", x_then, w, b, gy, **args)
    assert_close(conv.weight.grad, want, dtype, "weight gradient vs reference")
    assert_close(conv.weight.grad, torch_functional("bwd_weight", x_then, w, b, gy, **args), dtype, "vs torch")
    assert_close(gx, reference_functional("bwd_data", x_then, w, b, gy, **args), dtype, "input gradient")
    x[0, 3, 2, 4], x[1, 0, 8, 10], x[1, 39, 0, 0] = np.inf, -np.inf, np.nan
    gy[0, :5, 2, 4] = 0   # (0 * inf: NaN in torch too)
    conv.zero_grad()
    conv(x)
    assert conv._saved.xin is kept   # (recycled)
    conv.backward(gy)
    got, want = conv.weight.grad, torch_functional("bwd_weight", x, w, b, gy, **args)
    _assert_nonfinite_pattern(got, want, dtype)
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("threads", [1, 2])
def test_one_by_one_input_gradient_in_place_at_any_address(threads, monkeypatch, restore_threads):
    """Where the forward from the output channels runs in place only by the rule for inputs
    at any address (AVX2: ForwardPlan.in_place_aligned, IN_PLACE_ANY_ADDRESS), the input
    gradient runs it too, on grad_output wherever it starts (ResNet's 256 -> 64 at 56x56,
    grad_output one value off its allocation's start): against the reference and torch."""
    convgen.set_num_threads(threads)
    dtype = np.dtype(np.float32)
    case = dict(N=1, C=256, OC=64, H=56, W=56, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1)
    p = _plan(case, dtype).problem
    q = _engine.input_gradient_as_forward(p)
    if _engine.IN_PLACE_ANY_ADDRESS and not BASELINE_BUILD:
        fq = _engine.forward_plan(q)
        assert fq.in_place is None and fq.in_place_aligned is not None
    calls = []
    run_in_place = _engine._run_in_place
    monkeypatch.setattr(_engine, "_run_in_place", lambda fp, plan, *a, **k: calls.append(plan)
                        or run_in_place(fp, plan, *a, **k))
    x, w, b, gy = case_arrays(case, dtype, make_rng("input-in-place-any-address"))
    gy = np.concatenate([np.zeros(1, dtype), gy.ravel()])[1:].reshape(gy.shape)   # (off a cache line)
    args = conv_args(case)
    got = convgen_functional("bwd_data", x, w, b, gy, **args)
    assert (len(calls) == 1 and calls[0] == _engine.forward_plan(q).in_place_aligned) == (q is not None)
    assert_close(got, reference_functional("bwd_data", x, w, b, gy, **args), dtype, "vs reference")
    assert_close(got, torch_functional("bwd_data", x, w, b, gy, **args), dtype, "vs torch")


def test_forward_steps_worked_out_once_per_kind_of_call(monkeypatch, restore_threads, forced_rows):
    """forward() works out its steps once per plan and kind of call (keep, share_input,
    threads, alignment: _forward_route) and reuses them: repeated calls on 2 and 1
    threads, inference and training, weights changed in place and made infinite in
    between all give the reference's results, from one route per kind of call."""
    built = []
    route = _engine._forward_route
    monkeypatch.setattr(_engine, "_forward_route", lambda fp, *kind: built.append(kind) or route(fp, *kind))
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # (every call on the threads set)
    _engine.forward_plan.cache_clear()
    conv = convgen.Conv2d(32, 40, 3, padding=2, seed=0)
    x = make_rng("routes").standard_normal((2, 32, 10, 33)).astype(np.float32)
    fp = _engine.inference_plan(conv._cfg.problem(x.shape, x.dtype))
    assert fp.cvec is not None and fp.tap_skip is not None   # (weights packed per call; padding taps skipped)
    for step, threads in enumerate((2, 2, 1, 1, 2)):
        convgen.set_num_threads(threads)
        conv.weight[step % 40] *= -1.5
        if step == 3:
            conv.weight[0, 0, 0, 0] = np.inf
        want = ref.conv2d(x, conv.weight, conv.bias, padding=2)
        with convgen.no_grad():
            got = conv(x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert_close(got[np.isfinite(want)], want[np.isfinite(want)], np.float32, f"inference, step {step}")
        got = conv(x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert_close(got[np.isfinite(want)], want[np.isfinite(want)], np.float32, f"training, step {step}")
    assert built == [(False, False, 2, False), (True, False, 2, False), (False, False, 1, False),
                     (True, False, 1, False)]
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("groups", [1, 4])
def test_backward_steps_worked_out_once_per_thread_count(groups, monkeypatch, restore_threads):
    """The input gradient's and the weight gradient's steps, like the forward's, are worked
    out once per plan and thread count and reused: repeated module backwards on 2 and 1
    threads with weights changed in place (one made infinite) in between match torch's
    input gradient and the reference's weight and bias gradients each time."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # (every call on the threads set)
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()
    conv = convgen.Conv2d(32, 48, 3, stride=2 if groups == 1 else 1, padding=1, groups=groups, seed=1)
    rng = make_rng("backward-routes", groups)
    x = rng.standard_normal((2, 32, 17, 19)).astype(np.float32)
    args = dict(stride=conv.stride, padding=1, groups=groups)
    for step, threads in enumerate((2, 2, 1, 1, 2)):
        convgen.set_num_threads(threads)
        conv.weight[step % 48] *= -1.5
        if step == 3:
            conv.weight[1, 0, 1, 1] = np.inf
        y = conv(x)
        gy = rng.standard_normal(y.shape).astype(np.float32)
        conv.zero_grad()
        gx = conv.backward(gy)
        # (torch's: where the weights are infinite, its NaN and infinities, as the reference's
        # padding adjoint has more NaN: see _engine.backward_data)
        want = torch_functional("bwd_data", x, conv.weight, None, gy, dilation=1, **args)
        np.testing.assert_array_equal(np.isnan(gx), np.isnan(want))
        assert_close(gx[np.isfinite(want)], want[np.isfinite(want)], np.float32, f"input gradient, step {step}")
        assert_close(conv.weight.grad, ref.conv2d_weight(x, conv.weight.shape, gy, **args), np.float32,
                     f"weight gradient, step {step}")
        assert_close(conv.bias.grad, gy.sum(axis=(0, 2, 3)), np.float32, f"bias gradient, step {step}")
    fp = _engine.forward_plan(conv._cfg.problem(x.shape, x.dtype))
    assert set(fp.input_gradient_routes) == set(fp.weight_gradient_routes) == {1, 2}
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


@pytest.mark.parametrize("spec", IN_PLACE_SPECS, ids=lambda s: s.name)
def test_one_by_one_in_place_where_aligned(spec, monkeypatch, restore_threads):
    """A 1x1 layer beyond IN_PLACE's rule (here every such layer) whose planes are whole
    cache lines reads its input in place where the input starts on one, and through the
    panels where it does not (AVX-512; elsewhere in place wherever it starts:
    IN_PLACE_ANY_ADDRESS); both give the same bits."""
    monkeypatch.setattr(_engine, "IN_PLACE_MAX_OUT", 0)
    monkeypatch.setattr(_engine, "IN_PLACE_MAX_WORK", 0)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    _engine.forward_plan.cache_clear()
    convgen.set_num_threads(2)
    dtype = spec_dtype(spec)
    case = _case(spec, 48, 40)
    case.update(N=2, H=16, W=8)   # (planes of 128 values: whole lines in either dtype)
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.panels and fp.in_place is None and fp.in_place_aligned is not None
    x, w, b, gy = case_arrays(case, dtype, make_rng("in-place-aligned", spec.name))
    buf = _engine.aligned_empty((x.size + 64,), dtype)
    outputs = []
    for offset, in_place in ((0, True), (16 // dtype.itemsize, _engine.IN_PLACE_ANY_ADDRESS)):   # (16 bytes past a line)
        xs = buf[offset:offset + x.size].reshape(x.shape)
        xs[...] = x
        used = _scratch_names(monkeypatch)
        outputs.append(convgen_functional("fwd", xs, w, b, gy, **conv_args(case)))
        if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
            assert (used == []) == in_place and ("fwd_panels" in used) != in_place
    if not BASELINE_BUILD:   # (the same bits where the two calls take the paths asserted above)
        assert np.array_equal(outputs[0], outputs[1])
    assert_close(outputs[0], reference_functional("fwd", x, w, b, gy, **conv_args(case)), dtype, "vs reference")
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("spec", IN_PLACE_SPECS, ids=lambda s: s.name)
def test_one_by_one_in_place_from_every_offset_in_a_line(spec, monkeypatch, restore_threads):
    """A 1x1 layer read in place from an input that starts anywhere in a cache line (its
    planes whole lines): the chunks start on the line before each plane (IN_PLACE_SHIFT),
    and the outputs are the aligned input's, bit for bit, written nowhere but y; so is the
    input gradient of a layer run as such a forward (its weight read transposed), from a
    grad_output at each offset.  1 and 2 threads."""
    monkeypatch.setattr(_engine, "IN_PLACE_MAX_OUT", 0)
    monkeypatch.setattr(_engine, "IN_PLACE_MAX_WORK", 0)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    monkeypatch.setattr(_engine, "IN_PLACE_ANY_ADDRESS", True)
    monkeypatch.setattr(_engine, "INPUT_AS_FORWARD_COPY_BYTES", 0)   # (the weight read as it is, transposed)
    _engine.forward_plan.cache_clear()
    dtype = spec_dtype(spec)
    case = _case(spec, 48, 40)
    case.update(N=2, H=16, W=8)   # (planes of 128 values: whole lines in either dtype)
    x, w, b, gy = case_arrays(case, dtype, make_rng("in-place-offsets", spec.name))
    p = _plan(case, dtype).problem
    assert _plan(case, dtype).in_place_aligned is not None
    want = reference_functional("fwd", x, w, b, gy, **conv_args(case))
    shifts = []
    run_in_place = _engine._run_in_place
    monkeypatch.setattr(_engine, "_run_in_place", lambda fp, plan, x, *a, **k: shifts.append(
        _layout.address(x) % _engine.ALIGN // x.itemsize) or run_in_place(fp, plan, x, *a, **k))
    buf = _engine.aligned_empty((x.size + 64,), dtype)
    guard = _engine.aligned_empty((want.size + 128,), dtype)
    lanes_in_line = _engine.ALIGN // dtype.itemsize
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        first = None
        for offset in range(lanes_in_line):
            xs = buf[offset:offset + x.size].reshape(x.shape)
            xs[...] = x
            guard[...] = np.nan
            out = guard[64:64 + want.size].reshape(want.shape)
            y = _engine.forward(xs, w, b, p, keep=False, out=out)[0]
            assert y is out and np.isnan(guard[:64]).all() and np.isnan(guard[64 + want.size:]).all()
            assert_close(y, want, dtype, f"offset {offset}, {threads} thread(s)")
            first = y.copy() if first is None else first
            assert np.array_equal(y, first), (offset, threads)
    assert sorted(set(shifts)) == list(range(lanes_in_line))
    # (the line before the first pixel is in the same page: the page before may be unreadable)
    for offset in (dtype.itemsize, 48):
        xs, release = _beside_unreadable_page(x, after=offset)
        try:
            assert_close(_engine.forward(xs, w, b, p, keep=False)[0], want, dtype, f"after a guard page, {offset} bytes")
        finally:
            release()
    # the input gradient of the layer the other way round (C -> OC), its weight transposed
    q = p._replace(C=p.OC, OC=p.C)
    if _engine.input_gradient_as_forward(q):
        gyq = x   # (N, C = q.OC, H, W): a grad_output for q
        wantq = reference_functional("bwd_data", np.zeros((p.N, q.C, p.H, p.W), dtype), w.transpose(1, 0, 2, 3).copy(),
                                     None, gyq, **conv_args(case))
        for offset in (0, 1, lanes_in_line - 1):
            gs = buf[offset:offset + gyq.size].reshape(gyq.shape)
            gs[...] = gyq
            got = convgen_functional("bwd_data", np.zeros((p.N, q.C, p.H, p.W), dtype),
                                     w.transpose(1, 0, 2, 3).copy(), None, gs, **conv_args(case))
            assert_close(got, wantq, dtype, f"input gradient, offset {offset}")
        assert len(shifts) > 2 * lanes_in_line + 2
    _engine.forward_plan.cache_clear()


def test_in_place_rule():
    """Which stride-1 1x1 forwards without padding read their input in place (IN_PLACE)."""
    def forward_plan(N, C, OC, H, W, dtype="f32", pad=0, stride=1, groups=1):
        return _engine.forward_plan(_engine.Problem(N, C, H, W, OC, 1, 1, stride, stride, 1, 1, pad, pad, pad, pad,
                                                    groups, "zeros", dtype))

    def in_place(*args, **kwargs):
        return forward_plan(*args, **kwargs).in_place is not None
    assert in_place(1, 144, 24, 56, 56) and in_place(4, 144, 24, 56, 56, "f64")   # few output channels
    assert in_place(1, 32, 16, 112, 112) and in_place(8, 256, 32, 56, 56)
    assert in_place(1, 960, 160, 7, 7) and in_place(1, 64, 64, 56, 56)         # 2^23 multiply-adds or fewer
    assert in_place(1, 8, 8, 20, 20) and in_place(1, 160, 960, 7, 7)          # no channel-vector tile
    assert in_place(1, 16, 96, 112, 112) and in_place(1, 2048, 512, 7, 7)
    assert not in_place(1, 256, 64, 56, 56) and not in_place(2, 1024, 256, 14, 14)   # the panels
    assert not in_place(1, 64, 256, 56, 56)
    assert not in_place(2, 64, 64, 56, 56)                                     # 2^24.6 multiply-adds
    assert in_place(4, 2048, 512, 7, 7) and in_place(2, 512, 512, 10, 10)      # maps of 100 pixels or fewer
    assert in_place(8, 512, 2048, 7, 7) and not in_place(16, 2048, 512, 7, 7)   # ... in batches of 400 or fewer
    assert not in_place(2, 256, 1024, 14, 14)
    assert not in_place(1, 960, 240, 1, 1)                                     # 1x1 maps: 63 of 64 lanes idle

    def plan(*args):
        return forward_plan(*args).in_place[1:4]
    # (chunks, then pixels past them: IN_PLACE_LEFTOVER; whether each chunk runs every channel
    # tile, but on one 14x14 map, IN_PLACE_CHUNKS_INNER_PIXELS, and where the weights outweigh
    # the input, IN_PLACE_WEIGHT_MAJOR)
    # (... but on AVX2 tiles inner where the input outgrows L2 and a plane holds 4 chunks or
    # more: IN_PLACE_TILES_INNER, 750 and 800 KB here)
    inner = _engine.IN_PLACE_TILES_INNER
    assert plan(1, 2048, 512, 7, 7) == (48, 1, False) and plan(2, 960, 160, 7, 7, "f64") == (48, 1, inner)
    assert plan(4, 960, 160, 7, 7) == (48, 1, True)                             # 160 channels, 196 pixels
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert plan(1, 96, 576, 14, 14) == (192, 4, False) and plan(1, 384, 64, 14, 14) == (192, 4, True)
        assert plan(1, 1024, 256, 10, 10) == (96, 4, False)                     # 400 KB: in L2
        assert plan(1, 32, 16, 10, 10) == (96, 4, True) and plan(1, 144, 24, 14, 14) == (192, 4, True)
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert plan(1, 64, 64, 56, 56) == (3168, 0, True) and plan(1, 16, 8, 9, 9) == (96, 0, True)   # 16 or 33 past 48
    assert plan(1, 1024, 256, 14, 14) == (192, 4, inner) and plan(1, 256, 1024, 14, 14) == (192, 4, False)
    assert not in_place(1, 512, 128, 28, 28)

    if inner:   # (float32 7x7 maps: 2 chunks of 24 pixels)
        assert not forward_plan(4, 1024, 256, 7, 7).in_place.tiles_inner

    # (... and, on AVX2, inference forwards on batches of maps of up to 196 pixels:
    # IN_PLACE_INFERENCE_MAX_PIXELS)
    batch = forward_plan(2, 1024, 256, 14, 14).problem
    assert _engine.forward_plan(batch).in_place is None
    assert (_engine.inference_plan(batch).in_place is not None) == (_engine.IN_PLACE_INFERENCE_MAX_PIXELS >= 196)

    def where_aligned(*args):
        return forward_plan(*args).in_place_aligned is not None
    assert where_aligned(1, 256, 64, 56, 56) and where_aligned(1, 512, 128, 28, 28)   # 4 MB and 2 MB
    assert not where_aligned(2, 1024, 256, 14, 14)   # 784-byte planes: most start mid-line
    assert not where_aligned(8, 256, 64, 56, 56) and not where_aligned(1, 64, 128, 112, 112)   # 32 and 9.6 MB
    assert not where_aligned(1, 144, 24, 56, 56)     # in place wherever it starts
    assert not in_place(1, 144, 24, 56, 56, pad=1) and not in_place(1, 144, 24, 56, 56, stride=2)
    assert not in_place(1, 144, 24, 56, 56, groups=2)

    # (... but, on AVX2, not from planes that alias in L2: whole 4 KB pages, and more channels
    # than its 8 ways times the planes' offsets within a 64 KB way, IN_PLACE_ALIASING)
    def anyhow(*args):
        plan = forward_plan(*args)
        return plan.in_place is not None or plan.in_place_aligned is not None
    alias = _engine.IN_PLACE_ALIASING
    assert anyhow(1, 128, 512, 32, 32) and anyhow(1, 96, 24, 112, 112) and anyhow(1, 256, 64, 56, 56)
    assert anyhow(1, 1024, 256, 16, 16) and anyhow(1, 8, 16, 64, 64)   # (1 KB planes; 32 channels at 4 offsets)
    assert anyhow(1, 512, 32, 16, 16, "f64")
    for args in ((1, 256, 1024, 32, 32), (1, 1024, 256, 32, 32), (1, 256, 64, 64, 64), (1, 64, 16, 128, 128),
                 (1, 128, 32, 32, 32, "f64")):   # (f64: 8 KB planes, 8 offsets)
        assert anyhow(*args) != alias, args


ROW_BLOCK_SPECS = [s for s in SPECS if s.row_blocks]


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("spec", ROW_BLOCK_SPECS, ids=lambda s: s.name)
def test_depthwise_row_blocks(spec, multiplier, mode, forced):
    """Every row-block tile of the spec, on maps narrower and wider than it: partial
    blocks and partial vectors."""
    dtype = spec_dtype(spec)
    used = set()
    for W in (9, 70, 133):
        case = case_for(spec, multiplier=multiplier)
        case.update(W=W, padding_mode=mode)
        fp = _plan(case, dtype)
        assert fp.kernel.name == spec.name and fp.row_block is not None
        used.add(fp.row_block)
        rng = make_rng("row-blocks", spec.name, multiplier, mode, W)
        x, w, b, _ = case_arrays(case, dtype, rng)
        conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], stride=case["stride"],
                              padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                              padding_mode=mode, dtype=dtype)
        conv.weight[...] = w
        conv.bias[...] = b
        args = conv_args(case)
        y = conv(x)
        assert_close(y, ref.conv2d(x, w, b, padding_mode=mode, **args), dtype, f"{spec.name} W={W} vs reference")
        if mode == "zeros":  # (the reference covers the other modes; it is checked against torch's)
            assert_close(y, torch_functional("fwd", x, w, b, None, **args), dtype, f"{spec.name} W={W} vs torch")
    assert used == set(range(len(spec.row_blocks)))


# Depthwise input gradients fuse extend, the phases' tiles and fold per (image, channel),
# each thread in its own slice of scratch.
FUSED_BWD_SPECS = [s for s in SPECS if s.direction == "bwd_data" and s.groups == "depthwise" and not s.is_generic]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("spec", FUSED_BWD_SPECS, ids=lambda s: s.name)
def test_depthwise_input_gradient_fused(spec, multiplier, threads, monkeypatch, restore_threads):
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    convgen.set_num_threads(threads)
    case = case_for(spec, multiplier=multiplier)
    fp = _plan(case, spec_dtype(spec))
    bp = _engine.backward_data_plan(fp.problem)
    assert bp.kernel.name == spec.name and bp.fused_len is not None
    assert _engine.threads_for(fp.work) == threads
    _check(spec, case)


# Depthwise and grouped weight gradients read grad_output's rows directly (each row's
# last vector masked), in segments of rows under the forced cache budget.
ROW_WGRAD_SPECS = [s for s in SPECS if s.direction == "bwd_weight" and s.groups != "dense"]


@pytest.mark.parametrize("spec", ROW_WGRAD_SPECS, ids=lambda s: s.name)
def test_weight_gradient_by_rows(spec, forced):
    case = case_for(spec, multiplier=2)
    case.update(N=3, H=37, W=35)     # rows of 35 (or 18): a partial last vector
    fp = _plan(case, spec_dtype(spec))
    assert fp.wgrad_kernel.name == spec.name and not fp.wgrad_flat
    images, rows, cols = fp.wgrad_segments
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert rows < fp.OH and cols == fp.OW and fp.OW % spec.lanes
    _check(spec, case)


# Depthwise forwards that keep nothing for a backward (convgen.no_grad, functional
# conv2d) run the channel-block tile per (image, block of channels, strip of rows).
CHANNEL_BLOCK_SPECS = [s for s in SPECS if s.channel_block and s.direction == "fwd"]


@pytest.mark.parametrize("keeps", [False, True], ids=["planes-by-tiles", "planes-apart"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("spec", CHANNEL_BLOCK_SPECS, ids=lambda s: s.name)
def test_depthwise_channel_block(spec, mode, threads, keeps, monkeypatch, restore_threads):
    """21 channels (a partial block), rows of 37 pixels (a partial row tile), two
    images, and a copy budget that cuts each image into strips; the forward that
    keeps its planes (by the channel-block tile too where `keeps`, at stride 1) must
    agree with it."""
    monkeypatch.setattr(_engine, "CHANNEL_BLOCK_KEEP_PIXELS", 1 << 30 if keeps else 0)
    monkeypatch.setattr(_engine, "CHANNEL_BLOCK_KEEP_TAPS", None)
    monkeypatch.setattr(_engine, "CHANNEL_BLOCK_MAX_BYTES", (1 << 15) * _engine.LANES["f32"] // 16)   # (per lane)
    monkeypatch.setattr(_engine, "CHANNEL_BLOCK_MAP_SHARE", 0.0)   # (the strips, not the whole map)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    _engine.forward_plan.cache_clear()
    monkeypatch.setattr(_engine, "forward_plan", _engine.forward_plan.__wrapped__)   # no plans kept
    used = _scratch_names(monkeypatch)
    convgen.set_num_threads(threads)
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=2, C=21, OC=21, groups=21, H=23, W=37, padding_mode=mode)
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.channel_block_map is None
    strip, _ = _engine.channel_block_strip(fp, threads)
    assert strip < fp.OH   # several strips per image
    _check_channel_block_forward(spec, case, mode, used)


# ... and on maps narrower than a tile, at stride 1, the whole map at once along one
# flat grid (ForwardPlan.channel_block_map).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
# (Not float64 7x7: its 6 columns of padding make the flat grid wider than the whole-map
# rule allows on every map that reflect padding accepts; its strips are tested above.)
@pytest.mark.parametrize("spec", [s for s in CHANNEL_BLOCK_SPECS if s.stride == 1
                                  and not (s.kernel == 7 and s.dtype == "f64")], ids=lambda s: s.name)
def test_depthwise_channel_block_whole_map(spec, mode, threads, monkeypatch, restore_threads):
    """21 channels (a partial block), two images of 4 x 3 pixels (5 x 4 for 7x7 kernels:
    reflect padding must be smaller than the map)."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    _engine.forward_plan.cache_clear()
    monkeypatch.setattr(_engine, "forward_plan", _engine.forward_plan.__wrapped__)
    used = _scratch_names(monkeypatch)
    convgen.set_num_threads(threads)
    case = case_for(spec)
    H, W = (4, 3) if spec.kernel <= 5 else (5, 4)
    case.update(N=2, C=21, OC=21, groups=21, H=H, W=W, padding=spec.kernel // 2 * spec.dilation, padding_mode=mode)
    fp = _plan(case, spec_dtype(spec))
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert fp.kernel.name == spec.name and fp.channel_block_map is not None
    _check_channel_block_forward(spec, case, mode, used)


def test_depthwise_training_forward_picks_its_tile():
    """Which tile a depthwise forward that keeps its planes runs (ForwardPlan.
    channel_block_keeps): on AVX-512 the channel-block tile on maps of up to 28x28; on AVX2
    the row-block tile on 3x3 layers over maps larger than 8x8 that it covers, the
    channel-block tile on the rest (larger kernels at any size, 10x10 maps)."""
    def keeps(C, H, k, stride=1):
        p = _engine.Problem(1, C, H, H, C, k, k, stride, stride, 1, 1, k // 2, k // 2, k // 2, k // 2, C, "zeros",
                            "f32")
        return _engine.forward_plan(p).channel_block_keeps
    if BASELINE_BUILD:
        pytest.skip("16-byte vectors: other tiles")
    if _dispatch.VECTOR_BYTES == 64:
        assert keeps(960, 7, 3) and keeps(192, 28, 3) and not keeps(144, 56, 3)
        return
    assert keeps(960, 7, 3) and keeps(512, 8, 3) and keeps(256, 10, 3)
    assert not keeps(256, 12, 3) and not keeps(384, 14, 3) and not keeps(192, 28, 3) and not keeps(144, 56, 3)
    assert keeps(480, 14, 5) and keeps(144, 56, 5) and keeps(96, 56, 7)
    assert not keeps(96, 112, 3, stride=2) and not keeps(144, 56, 5, stride=2)   # (stride 1 only)


def _check_channel_block_forward(spec, case, mode, used):
    """A Conv2d's forward under no_grad (the channel-block tile) against the reference
    (and torch, zero padding); the forward that keeps its planes must agree with it
    (through the channel-block tile where the plan says so, fp.channel_block_keeps, else
    the pixel or row-block tiles), and those planes give the reference's weight gradient."""
    dtype = spec_dtype(spec)
    fp = _plan(case, dtype)
    x, w, b, gy = case_arrays(case, dtype, make_rng("channel-block", spec.name, mode, case["W"]))
    conv = convgen.Conv2d(21, 21, case["kernel"], stride=case["stride"], padding=case["padding"],
                          dilation=case["dilation"], groups=21, padding_mode=mode, dtype=dtype)
    conv.weight[...] = w
    conv.bias[...] = b
    with convgen.no_grad():
        y = conv(x)
    assert "fwd_pixel_major" in used
    args = conv_args(case)
    expected = ref.conv2d(x, w, b, padding_mode=mode, **args)
    assert_close(y, expected, dtype, f"{spec.name} vs reference")
    if mode == "zeros":  # (the reference covers the other modes; it is checked against torch's)
        assert_close(y, torch_functional("fwd", x, w, b, None, **args), dtype, f"{spec.name} vs torch")
    used.clear()
    assert_close(conv(x), expected, dtype, f"{spec.name}, planes kept, vs reference")
    assert ("fwd_pixel_major" in used) == fp.channel_block_keeps
    conv.backward(gy)
    assert_close(conv.weight.grad, ref.conv2d_weight(x, w.shape, gy, padding_mode=mode, **args), dtype,
                 f"{spec.name}, weight gradient from the kept planes, vs reference")


# The zero-padded stride-1 depthwise input gradient runs as a forward correlation of
# grad_output with flipped taps (convgen._engine.input_gradient_as_forward).
DW_GRAD_AS_FORWARD = [s for s in SPECS if s.direction == "bwd_data" and s.groups == "depthwise"
                      and s.stride == 1 and not s.is_generic]


@pytest.mark.parametrize("padding", [0, 1, (2, 0)])
@pytest.mark.parametrize("spec", DW_GRAD_AS_FORWARD, ids=lambda s: s.name)
def test_depthwise_input_gradient_as_forward(spec, padding, monkeypatch):
    used = _scratch_names(monkeypatch)
    case = case_for(spec)
    case.update(N=2, C=21, OC=21, groups=21, H=23, W=37, padding=padding)
    fp = _plan(case, spec_dtype(spec))
    assert _engine.input_gradient_as_forward(fp.problem) is not None
    _check(spec, case)
    assert "fwd_pixel_major" in used


def test_channel_vector_tile_rule():
    """When the dense layers run the channel-vector tile (enough channels both ways,
    enough output pixels per packed weight), and whether its tiles start at each row
    (where that computes fewer pixels than the flat grid's rows)."""
    cvec = (1, 14, 32, (6, 7, 8), 7)
    rule = _engine._cvec_layout
    assert rule(cvec, 64, 64, 9, 1, 128, 128, 130) == 0            # 128x128: 140 of 130 columns: flat
    assert rule(cvec, 64, 64, 9, 1, 56, 56, 58) == 4               # 56x56: 56 of 58 columns
    assert rule(cvec, 256, 512, 9, 1, 33, 33, 45) == 3             # ASPP: 14 + 14 + a twin of 6 of 45 columns
    assert rule(cvec, 64, 48, 25, 1, 35, 35, 39) == 3              # 14 + 14 + 7 of 39 columns
    assert rule(cvec, 64, 64, 9, 1, 32, 32, 34) == 0               # 14 + 14 + 6 = 34 columns: flat
    assert rule(cvec, 64, 64, 9, 128, 8, 8, 10) == 1               # a batch of 8x8 maps: 8 of 10 columns
    assert rule(cvec, 64, 64, 9, 128, 22, 22, 24) == 2             # 14 + 8 of 24 columns
    assert rule(cvec, 64, 256, 1, 1, 56, 56, 56) == 0              # 1x1: no scratch columns
    assert rule(cvec, 256, 256, 9, 1, 14, 14, 16) is None          # 14x14: too few pixels per weight
    assert rule(cvec, 128, 128, 7, 1, 17, 17, 23) == 2             # ... unless rows 1.3x wider (1x7, Inception)
    assert rule(cvec, 64, 64, 25, 1, 16, 16, 20) is None           # (5x5 at 16x16: 1.25x)
    assert rule(cvec, 128, 128, 7, 1, 15, 15, 21) is None          # (... and 225 pixels)
    assert rule(cvec, 256, 1024, 1, 1, 14, 14, 14) == 0            # ... but 1x1: 14 tiles of 14 pixels
    assert rule(cvec, 512, 2048, 1, 1, 7, 7, 7) is None            # ... down to 7x7
    assert rule(cvec, 512, 2048, 1, 4, 7, 7, 7) == 0               # ... a batch of four of them
    assert rule(cvec, 64, 16, 9, 1, 128, 128, 130) is None         # too few reduced channels
    assert rule(cvec, 16, 64, 9, 1, 128, 128, 130) is None         # too few output channels
    assert rule(cvec, 48, 64, 9, 1, 35, 35, 39) is None            # 48 channels in 2 blocks of 32
    assert rule(cvec, 24, 144, 1, 1, 56, 56, 56, 16, float("inf")) == 0   # ... but a narrowing 1x1's forward
    assert rule(None, 64, 64, 9, 1, 128, 128, 130) is None         # no such tile


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("out_channels", [16, 24, 40])
def test_channel_vector_tile_on_narrowing_1x1(dtype, out_channels, restore_threads, monkeypatch):
    """1x1 layers narrowing the channels run the channel-vector tile through the panels
    from 16 output channels, with idle lanes in their blocks of output channels (24 of 32,
    40 of 64): against the reference, on 1 and 2 threads, a training step included.
    (Their inference forwards up to 32 output channels read the input in place instead:
    test_one_by_one_in_place; not here.  Nor do their input gradients run as forwards:
    test_one_by_one_input_gradient_from_transposed_copy.)"""
    monkeypatch.setattr(_engine, "IN_PLACE", False)
    monkeypatch.setattr(_engine, "INPUT_AS_FORWARD_COPY_BYTES", 0)
    _engine.forward_plan.cache_clear()
    dtype = np.dtype(dtype)
    case = dict(N=2, C=72, OC=out_channels, H=19, W=17, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), groups=1)
    fp = _plan(case, dtype)
    assert fp.cvec is not None and fp.panels
    x, w, b, gy = _check_directions(case, dtype, make_rng("narrowing", out_channels, dtype.name))
    args = conv_args(case)
    conv = convgen.Conv2d(72, out_channels, 1, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    assert_close(conv(x), reference_functional("fwd", x, w, b, gy, **args), dtype, "module forward")
    assert_close(conv.backward(gy), reference_functional("bwd_data", x, w, b, gy, **args), dtype, "module gx")
    _engine.forward_plan.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_vector_tile_on_wide_rows(dtype, restore_threads):
    """Small maps whose flat rows are much wider than their pixels (Inception's 1x7 at 17x17,
    23 columns for 17) run the channel-vector row tiles, which skip the scratch columns:
    forward, input and weight gradients against the reference, on 1 and 2 threads."""
    dtype = np.dtype(dtype)
    case = dict(N=1, C=64, OC=32, H=17, W=17, kernel=(1, 7), stride=(1, 1), padding=(0, 3), dilation=(1, 1),
                groups=1)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert fp.cvec is not None and fp.row_tiles == 2 and bp.cvec is not None
    _check_directions(case, dtype, make_rng("wide-rows", dtype.name))


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_zero_padding_fold_stores_every_pixel_once(stride, padding):
    """With zero padding each input pixel has exactly one padded position, so the
    input gradient's fold stores it there without zeroing gx first: starting from NaN,
    every pixel must be written, with the same values as the summing fold."""
    p = _engine.Problem(2, 3, 11, 13, 4, 3, 3, stride, stride, 1, 1, padding, padding, padding, padding, 1,
                        "zeros", "f64")
    fp, bp = _engine.forward_plan(p), _engine.backward_data_plan(p)
    gxph = make_rng("fold", stride, padding).standard_normal((p.N * p.C, bp.n_planes * bp.out_len))
    folded = []
    for once in (False, True):
        gx = np.full((p.N * p.C, p.H, p.W), np.nan)
        _engine._layout.fold_phases(gxph, gx, bp.fold_rows, bp.fold_cols, bp.fold_interior, bp.width,
                                    bp.out_len, bp.fold_pad_left, once, 1)
        folded.append(gx)
    assert not np.isnan(folded[1]).any()
    np.testing.assert_array_equal(folded[0], folded[1])


# Stride-2 depthwise input gradients (zero padding) run their own channel-block tile.
GRAD_BLOCK_SPECS = [s for s in SPECS if s.channel_block and s.direction == "bwd_data"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, (2, 1), (1, 2)])
@pytest.mark.parametrize("spec", GRAD_BLOCK_SPECS, ids=lambda s: s.name)
def test_depthwise_stride2_input_gradient_channel_block(spec, padding, threads, monkeypatch, restore_threads):
    """Both parities of padded rows and of the left padding, a partial channel block
    (21 channels), partial row tiles (37 and 38 columns), and strips of rows."""
    monkeypatch.setattr(_engine, "CHANNEL_BLOCK_MAX_BYTES", (1 << 14) * _engine.LANES["f32"] // 16)   # (per lane)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    monkeypatch.setattr(_engine, "backward_data_plan", _engine.backward_data_plan.__wrapped__)   # no plans kept
    used = _scratch_names(monkeypatch)
    convgen.set_num_threads(threads)
    for W in (37, 38):
        case = case_for(spec)
        case.update(N=2, C=21, OC=21, groups=21, H=23, W=W, padding=padding)
        fp = _plan(case, spec_dtype(spec))
        bp = _engine.backward_data_plan(fp.problem)
        assert bp.kernel.name == spec.name and bp.channel_block is not None
        strip, _ = _engine.channel_block_strip(bp, threads)
        assert strip < case["H"]   # several strips
        used.clear()
        _check(spec, case)
        assert "bwd_pixel_major" in used


# Depthwise weight gradients on small maps run by blocks of channels; larger maps keep
# the per-channel rows.
WGRAD_BLOCK_SPECS = [s for s in SPECS if s.channel_block and s.direction == "bwd_weight"]
DEPTHWISE_WGRAD_SPECS = [s for s in SPECS if s.direction == "bwd_weight" and s.groups == "depthwise"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", WGRAD_BLOCK_SPECS, ids=lambda s: s.name)
def test_depthwise_weight_gradient_channel_block(spec, threads, monkeypatch, restore_threads):
    """A partial channel block (21 channels), two images, a non-square map, and the
    module's gradient accumulating into .grad (non-zero padding modes too)."""
    monkeypatch.setattr(_engine, "WGRAD_CHANNEL_BLOCK_PIXELS", 1 << 30)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    monkeypatch.setattr(_engine, "forward_plan", _engine.forward_plan.__wrapped__)   # no plans kept
    used = _scratch_names(monkeypatch)
    convgen.set_num_threads(threads)
    case = case_for(spec)
    case.update(N=2, C=21, OC=21, groups=21, H=13, W=10)
    fp = _plan(case, spec_dtype(spec))
    assert fp.wgrad_kernel.name == spec.name and fp.wgrad_channel_block
    _check(spec, case)
    assert "wgrad_pixel_major" in used
    dtype = spec_dtype(spec)
    rng = make_rng("wgrad-channel-block", spec.name)
    k = case["kernel"][0]
    conv = convgen.Conv2d(21, 21, k, stride=case["stride"], padding=k // 2, groups=21,
                          padding_mode="reflect", dtype=dtype, seed=0)
    x = rng.standard_normal((2, 21, 13, 10)).astype(dtype)
    y = conv(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    used.clear()
    conv.backward(gy)
    conv.backward(gy)   # accumulates
    assert "wgrad_pixel_major" in used
    want = ref.conv2d_weight(ref.pad(x.astype(np.float64), (k // 2,) * 4, "reflect"), conv.weight.shape,
                             gy.astype(np.float64), stride=case["stride"], groups=21)
    assert_close(conv.weight.grad, 2 * want, dtype, f"{spec.name}: accumulated .grad vs reference")


@pytest.mark.parametrize("spec", DEPTHWISE_WGRAD_SPECS, ids=lambda s: s.name)
def test_depthwise_weight_gradient_rows(spec, monkeypatch, restore_threads):
    """The per-channel rows, which large maps keep, on every depthwise spec."""
    monkeypatch.setattr(_engine, "WGRAD_CHANNEL_BLOCK_PIXELS", 0)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    monkeypatch.setattr(_engine, "forward_plan", _engine.forward_plan.__wrapped__)
    convgen.set_num_threads(2)
    case = case_for(spec)
    case.update(C=21, OC=21, groups=21)
    fp = _plan(case, spec_dtype(spec))
    assert fp.wgrad_kernel.name == spec.name and not fp.wgrad_channel_block
    _check(spec, case)


def test_reduction_passes_do_enough_work():
    """A reduction pass (its partial sums stored and reloaded) fits its input in
    CACHE_BUDGET, but does at least PASS_MIN_MACS multiply-adds per output."""
    plane = 3144 * 8   # bytes of a float64 channel of ResNet's 56x56 maps
    assert _engine.CACHE_BUDGET // plane == 41
    assert _engine._reduction_block(64, plane, 1) == 64     # 1x1: one pass of 64
    assert _engine._reduction_block(64, plane, 9) == 32     # 3x3: two of 32
    assert _engine._reduction_block(512, plane, 9) == 40    # 13 even passes of 39-40 ...
    assert _engine._reduction_block(512, plane, 1) == 64    # ... but 1x1 passes of 64
    assert _engine._reduction_block(40, plane, 9) == 40     # fits: one pass


@pytest.mark.parametrize("blocks, expected", [(4, 64), (1, 16)])
def test_channel_vector_passes_cover_blocks(blocks, expected, monkeypatch):
    """The channel-vector tile's passes (forward and input gradient) hold at least
    CVEC_PASS_BLOCKS blocks of channels where the cache budget alone would give fewer:
    64 channels of 128x128 maps, 13 per pass by the budget (16: a whole block)."""
    monkeypatch.setattr(_engine, "CVEC_PASS_BLOCKS", blocks)
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()
    try:
        case = dict(N=1, C=64, OC=64, H=128, W=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1)
        fp = _plan(case, np.float32)
        bp = _engine.backward_data_plan(fp.problem)
        assert fp.cvec is not None and bp.cvec is not None
        assert _engine._reduction_block(64, fp.x_chan * 4, 9) == 13
        if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
            assert fp.rblock == bp.rblock == expected
    finally:
        _engine.forward_plan.cache_clear()
        _engine.backward_data_plan.cache_clear()


# Layers without padding whose windows do not overlap run as a stride-1 1x1 layer over
# their windows gathered as channels (convgen._engine.patch_pointwise): strided 1x1 layers
# (any groups), patch embeddings (dense).  Gathered for the forward and the weight
# gradient's planes, the input gradient scattered back with zeros between.
# (C, OC), groups, kernel, stride, dilation, (H, W); the small windows run this way with
# PATCH_MIN_TAPS lowered (patch_taps), which tests their geometry on small arrays.
PATCH_CASES = {
    "1x1-s2-dense": ((40, 48), 1, (1, 1), (2, 2), (1, 1), (13, 11)),
    "1x1-s3x1-grouped": ((12, 18), 3, (1, 1), (3, 1), (1, 1), (13, 11)),
    "1x1-s2x3-depthwise": ((16, 16), 16, (1, 1), (2, 3), (1, 1), (13, 11)),
    "16x16-s16": ((3, 40), 1, (16, 16), (16, 16), (1, 1), (35, 50)),   # a patch embedding, as it runs by default
    "2x2-s2": ((24, 40), 1, (2, 2), (2, 2), (1, 1), (13, 11)),    # ConvNeXt's downsampling
    "4x4-s4": ((3, 20), 1, (4, 4), (4, 4), (1, 1), (13, 11)),     # ConvNeXt's stem
    "3x2-s4x3-gaps": ((8, 16), 1, (3, 2), (4, 3), (1, 1), (13, 11)),   # pixels no window reads
    "2x2-s3-dilated": ((6, 12), 1, (2, 2), (3, 3), (2, 2), (13, 11)),  # dilated windows that just fit
}


@pytest.fixture
def patch_taps():
    """Sets _engine.PATCH_MIN_TAPS and PATCH_MIN_TAPS_INFERENCE for a test (and drops the
    plans made under them)."""
    defaults = _engine.PATCH_MIN_TAPS, _engine.PATCH_MIN_TAPS_INFERENCE

    def set_taps(n, inference=None):
        _engine.PATCH_MIN_TAPS, _engine.PATCH_MIN_TAPS_INFERENCE = n, n if inference is None else inference
        _engine.patch_pointwise.cache_clear()
    yield set_taps
    set_taps(*defaults)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case_name", list(PATCH_CASES))
def test_patch_pointwise(dtype, case_name, monkeypatch, restore_threads, patch_taps):
    (C, OC), groups, kernel, stride, dilation, (H, W) = PATCH_CASES[case_name]
    dtype = np.dtype(dtype)
    if case_name != "16x16-s16":
        patch_taps(1)
    case = dict(N=2, C=C, OC=OC, H=H, W=W, kernel=kernel, stride=stride, padding=(0, 0), dilation=dilation,
                groups=groups)
    fp = _plan(case, dtype)
    q = _engine.patch_pointwise(fp.problem)
    assert q is not None and (q.H, q.W) == fp.problem.output_hw and (q.KH, q.KW, q.sh, q.sw) == (1, 1, 1, 1)
    assert q.C == C * kernel[0] * kernel[1]
    called = []
    real = _engine._layout.windows
    monkeypatch.setattr(_engine._layout, "windows",
                        lambda *a: called.append("scatter" if a[3] else "gather") or real(*a))
    x, w, b, gy = _check_directions(case, dtype, make_rng("patch-pointwise", case_name, dtype.name), True)
    args = conv_args(case)
    assert called.count("gather") >= 4 and called.count("scatter") == 2   # (forward, weight planes; input grad)
    # The module: a training step, .grad accumulating in place, and an infinity the layer never reads.
    conv = convgen.Conv2d(C, OC, kernel, stride=stride, dilation=dilation, groups=groups, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    OH, OW = fp.problem.output_hw
    read = np.zeros((H, W), bool)
    for ti in range(kernel[0]):
        for tj in range(kernel[1]):
            read[ti * dilation[0]:ti * dilation[0] + stride[0] * (OH - 1) + 1:stride[0],
                 tj * dilation[1]:tj * dilation[1] + stride[1] * (OW - 1) + 1:stride[1]] = True
    assert read.sum() == OH * OW * kernel[0] * kernel[1]   # (no pixel read twice)
    unread = np.argwhere(~read)
    assert len(unread)
    x[(0, 0, *unread[0])] = np.inf
    y = conv(x)
    assert np.isfinite(y).all()
    assert_close(y, reference_functional("fwd", x, w, b, gy, **args), dtype, "module forward")
    for step in (1, 2):
        gx = conv.backward(gy)
        assert_close(gx, reference_functional("bwd_data", x, w, b, gy, **args), dtype, "module input gradient")
        grad = conv.weight.grad
        assert grad.shape == w.shape
        assert_close(grad, step * reference_functional("bwd_weight", x, w, b, gy, **args), dtype,
                     f"module weight grad, step {step}")
        assert conv.weight.grad is grad   # (the second step added into the first's array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_patch_pointwise_inference_takes_its_own_route(dtype, monkeypatch):
    """ConvNeXt's 4x4 stem: a forward that keeps its input (a module's training step) and the
    gradients run as the 1x1 layer over the gathered windows, an inference forward
    (no_grad) on the layer's own kernel, which gathers nothing; all against the reference."""
    dtype = np.dtype(dtype)
    case = dict(N=2, C=3, OC=20, H=17, W=21, kernel=(4, 4), stride=(4, 4), padding=(0, 0), dilation=(1, 1),
                groups=1)
    p = _plan(case, dtype).problem
    assert _engine.patch_pointwise(p) is not None and _engine.patch_pointwise(p, inference=True) is None
    calls = []
    real = _engine._layout.windows
    monkeypatch.setattr(_engine._layout, "windows", lambda *a: calls.append("scatter" if a[3] else "gather") or real(*a))
    x, w, b, gy = case_arrays(case, dtype, make_rng("patch-inference", dtype.name))
    args = conv_args(case)
    conv = convgen.Conv2d(3, 20, 4, stride=4, dtype=dtype)
    conv.weight[...], conv.bias[...] = w, b
    with convgen.no_grad():
        y = conv(x)
    assert calls == []
    assert_close(y, reference_functional("fwd", x, w, b, gy, **args), dtype, "inference forward")
    y = conv(x)
    assert calls == ["gather"]
    assert_close(y, reference_functional("fwd", x, w, b, gy, **args), dtype, "training forward")
    gx = conv.backward(gy)
    assert calls == ["gather", "scatter"]
    assert_close(gx, reference_functional("bwd_data", x, w, b, gy, **args), dtype, "input gradient")
    assert_close(conv.weight.grad, reference_functional("bwd_weight", x, w, b, gy, **args), dtype, "weight gradient")


def test_patch_pointwise_only_where_windows_do_not_overlap(patch_taps):
    """Padding, overlapping windows, windows of fewer than PATCH_MIN_TAPS pixels, or a
    grouped layer with windows of more than a pixel run their own kernels, and kernel_for
    names the kernel that really runs."""
    def problem(**kw):
        case = dict(N=1, C=8, OC=8, H=33, W=33, kernel=(1, 1), stride=(2, 2), padding=(0, 0), dilation=(1, 1),
                    groups=1)
        return _plan({**case, **kw}, np.float32).problem
    assert _engine.patch_pointwise(problem()) is not None
    assert _engine.patch_pointwise(problem(kernel=(16, 16), stride=(16, 16))) is not None
    assert _engine.patch_pointwise(problem(kernel=(4, 4), stride=(4, 4))) is not None
    assert _engine.patch_pointwise(problem(kernel=(3, 3), stride=(3, 3))) is None       # 9 < PATCH_MIN_TAPS
    assert _engine.patch_pointwise(problem(kernel=(4, 4), stride=(4, 4)), inference=True) is None   # 16 < 64 or 256
    eight = _engine.patch_pointwise(problem(kernel=(8, 8), stride=(8, 8)), inference=True)   # (AVX2: from 64)
    assert (eight is None) == (_engine.PATCH_MIN_TAPS_INFERENCE > 64)
    assert _engine.patch_pointwise(problem(kernel=(16, 16), stride=(16, 16)), inference=True) is not None
    assert _engine.patch_pointwise(problem(kernel=(16, 16), stride=(16, 16), groups=2)) is None
    patch_taps(1)
    assert _engine.patch_pointwise(problem(kernel=(2, 2))) is not None
    assert _engine.patch_pointwise(problem(padding=(1, 1))) is None
    assert _engine.patch_pointwise(problem(kernel=(3, 3))) is None                      # overlapping
    assert _engine.patch_pointwise(problem(kernel=(2, 2), dilation=(2, 2))) is None     # 3 pixels wide
    assert _engine.patch_pointwise(problem(kernel=(2, 2), groups=2)) is None
    assert _engine.patch_pointwise(problem(stride=(1, 1))) is None                      # a 1x1 layer already
    for direction in ("fwd", "bwd_data", "bwd_weight"):
        assert convgen.kernel_for(64, 64, 1, 2, 0, direction=direction) == f"conv2d_{direction}_f32_k1x1_s1_d1_dense"
        assert convgen.kernel_for(3, 768, 16, 16, 0, direction=direction) == \
            f"conv2d_{direction}_f32_k1x1_s1_d1_dense"
        assert convgen.kernel_for(64, 64, 1, 2, 1, direction=direction) == f"conv2d_{direction}_f32_kany_sany_dany_dense"
    x = make_rng("padded-strided-1x1").standard_normal((1, 8, 9, 9)).astype(np.float32)
    w = np.ones((8, 8, 1, 1), np.float32)
    y = convgen.functional.conv2d(x, w, stride=2, padding=1)
    assert_close(y, ref.conv2d(x, w, None, stride=2, padding=1), np.float32, "padded strided 1x1")


# Grouped forwards pad each group's channels just before its tiles run (the fused path).
GROUPED_FWD_SPECS = [s for s in SPECS if s.direction == "fwd" and s.groups == "grouped"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("spec", GROUPED_FWD_SPECS, ids=lambda s: s.name)
def test_grouped_forward_fused(spec, mode, threads, monkeypatch, restore_threads):
    """3 groups of 5 channels, 7 output channels each (a partial tile), two images: the
    forward without and with its planes kept, and the weight gradient from those planes,
    against the reference."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    convgen.set_num_threads(threads)
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=2, C=15, OC=21, groups=3, H=11, W=13, padding_mode=mode)
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.kernel.fused is not None and not fp.one_pass
    x, w, b, gy = case_arrays(case, dtype, make_rng("grouped-fused", spec.name, mode))
    args = conv_args(case)
    conv = convgen.Conv2d(15, 21, case["kernel"], padding_mode=mode, dtype=dtype, **args)
    conv.weight[...] = w
    conv.bias[...] = b
    expected = ref.conv2d(x, w, b, padding_mode=mode, **args)
    with convgen.no_grad():
        assert_close(conv(x), expected, dtype, f"{spec.name} vs reference")
    assert_close(conv(x), expected, dtype, f"{spec.name}, planes kept, vs reference")
    conv.backward(gy)
    assert_close(conv.weight.grad, ref.conv2d_weight(x, w.shape, gy, padding_mode=mode, **args), dtype,
                 f"{spec.name}, weight gradient from the kept planes, vs reference")


def test_fused_forms_share_images_evenly():
    """Dense layers run their fused forms (an image per work item) only where the images
    keep the threads evenly busy, or are many (DENSE_FUSED_UNEVEN_IMAGES)."""
    assert _engine._shared_evenly(4, 2) and _engine._shared_evenly(5, 1) and _engine._shared_evenly(6, 3)
    assert not _engine._shared_evenly(5, 2) and not _engine._shared_evenly(7, 2)
    assert _engine._shared_evenly(_engine.DENSE_FUSED_UNEVEN_IMAGES + 1, 2)


def test_fused_forms_skipped_where_images_share_unevenly(monkeypatch, restore_threads):
    """Five images of a dense layer on the pixel tiles: both directions run their fused
    forms on one thread but not on two (_runs_fused), with the same results either way.
    A grouped layer's fused forward runs on both."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    dtype = np.dtype(np.float32)
    case = dict(N=5, C=6, OC=11, H=11, W=13, kernel=(3, 3), stride=(1, 1), padding=1, dilation=1, groups=1)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    assert fp.fused and bp.fused_len is not None
    forward, backward = [], []
    _spy_on_kernel(monkeypatch, fp, "fused", forward)
    _spy_on_kernel(monkeypatch, bp, "fused", backward)
    args = conv_args(case)
    x, w, b, gy = case_arrays(case, dtype, make_rng("uneven", "fused"))
    results = []
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        y = convgen_functional("fwd", x, w, b, gy, **args)
        gx = convgen_functional("bwd_data", x, w, b, gy, **args)
        assert_close(y, reference_functional("fwd", x, w, b, gy, **args), dtype, f"forward, {threads} threads")
        assert_close(gx, reference_functional("bwd_data", x, w, b, gy, **args), dtype, f"input gradient, {threads}")
        results.append((y, gx))
    assert forward == [1] and backward == [1]
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
    grouped = _plan(dict(case, C=12, OC=12, groups=2), dtype)
    assert grouped.fused and _engine._runs_fused(grouped.fused, grouped.problem, 2)


def _spy_on_kernel(monkeypatch, plan, field, calls, fused_kwarg=False):
    """Make plan.kernel.<field> record its thread counts in `calls` (with fused_kwarg: only
    the calls given a `fused` argument), so a test can tell that the fused form ran."""
    inner = getattr(plan.kernel, field)

    def recording(*args, **kwargs):
        if not fused_kwarg or kwargs.get("fused") is not None:
            calls.append(convgen.get_num_threads())
        return inner(*args, **kwargs)
    monkeypatch.setattr(plan, "kernel", plan.kernel._replace(**{field: recording}))


def _check_forward_on_both_thread_counts(spec, case, dtype, label):
    """The module's forward without and with its planes kept, and the weight gradient from
    those planes, against the reference, and bit for bit the same on 1 and 2 threads."""
    x, w, b, gy = case_arrays(case, dtype, make_rng(label, spec.name, case["padding_mode"]))
    args = conv_args(case)
    mode = case["padding_mode"]
    expected = ref.conv2d(x, w, b, padding_mode=mode, **args)
    expected_gw = ref.conv2d_weight(x, w.shape, gy, padding_mode=mode, **args)
    results = []
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], padding_mode=mode, dtype=dtype, **args)
        conv.weight[...] = w
        conv.bias[...] = b
        with convgen.no_grad():
            y = conv(x)
        assert_close(y, expected, dtype, f"{spec.name} vs reference")
        y_kept = conv(x)
        assert_close(y_kept, expected, dtype, f"{spec.name}, planes kept, vs reference")
        conv.backward(gy)
        assert_close(conv.weight.grad, expected_gw, dtype, f"{spec.name}, weight gradient from the kept planes")
        results.append((y, y_kept, conv.weight.grad))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def _check_kept_planes(fp, case, dtype):
    """A training forward's kept planes are the whole padded input (pad_phase's), and an
    infinity in the last image's last channel is reported."""
    x, w, b, _ = case_arrays(case, dtype, make_rng("kept-planes", fp.kernel.name))
    y, xin, nonfinite = _engine.forward(x, w, b, fp.problem)
    planes = np.zeros_like(xin)
    _layout.pad_phase(x.reshape(fp.x3_shape), planes, *fp.pad_args, 1)
    assert np.array_equal(xin, planes) and not nonfinite
    x[-1, -1, -1, -1] = np.inf
    assert _engine.forward(x, w, b, fp.problem)[2]


def _check_input_gradient_on_both_thread_counts(spec, case, dtype, problem, label):
    """The input gradient of `problem` against the reference, and bit for bit the same on
    1 and 2 threads."""
    mode = case.get("padding_mode", "zeros")
    x, w, b, gy = case_arrays(case, dtype, make_rng(label, spec.name, mode))
    expected = ref.conv2d_input(x.shape, w, gy, padding_mode=mode, **conv_args(case))
    results = []
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        gx = _engine.backward_data(gy, w, problem)
        assert_close(gx, expected, dtype, f"{spec.name} vs reference")
        results.append(gx)
    np.testing.assert_array_equal(results[0], results[1])


# Dense forwards on the pixel tiles over a batch of small images run fused too: each
# work item pads one image's planes, then runs every tile over them.
DENSE_FWD_SPECS = [s for s in SPECS if s.direction == "fwd" and s.groups == "dense"]


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("spec", DENSE_FWD_SPECS, ids=lambda s: s.name)
def test_dense_forward_fused(spec, mode, monkeypatch, restore_threads):
    """Six images of 6 channels, 11 output channels (a partial tile): the plan runs the
    fused form (three images do not, nor 1x1 layers that read their input in place), and
    the forward without and with its planes kept, and the weight gradient from those
    planes, match the reference, bit for bit the same on 1 and 2 threads."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=6, C=6, OC=11, groups=1, H=11, W=13, padding_mode=mode)
    if spec.kernel == 1:
        case["padding"] = 1   # (a 1x1 layer without padding reads its input in place instead)
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.fused and fp.cvec is None
    assert not _plan(dict(case, N=_engine.DENSE_FUSED_MIN_IMAGES - 1), dtype).fused
    if spec.kernel == 1 and spec.stride == 1:
        assert not _plan(dict(case, padding=0), dtype).fused
    calls = []
    _spy_on_kernel(monkeypatch, fp, "fused", calls)
    _check_forward_on_both_thread_counts(spec, case, dtype, "dense-fused")
    assert calls == [1, 1, 2, 2]   # (inference and training forwards, 1 and 2 threads)
    _check_kept_planes(fp, case, dtype)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("spec", DENSE_FWD_SPECS, ids=lambda s: s.name)
def test_dense_forward_fused_channel_vectors(spec, mode, monkeypatch, restore_threads):
    """The same on the channel-vector tile: six images of 40 channels (a partial block) to
    56 (a partial block of output channels), each image padded into its thread's blocks
    just before its tiles run (three images are padded as one batch)."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=6, C=40, OC=56, groups=1, H=17, W=19, padding_mode=mode)
    if spec.kernel == 1:
        case["padding"] = 1
    if spec.kernel == 3 and spec.stride == 2:
        case.update(H=33, W=35)   # (smaller maps pack their weights a block at a time instead)
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.cvec is not None and fp.cvec_fused
    assert not _plan(dict(case, N=_engine.DENSE_FUSED_MIN_IMAGES - 1), dtype).cvec_fused
    calls = []
    _spy_on_kernel(monkeypatch, fp, "run", calls, fused_kwarg=True)
    _check_forward_on_both_thread_counts(spec, case, dtype, "dense-fused-cvec")
    assert calls == [1, 1, 2, 2]
    _check_kept_planes(fp, case, dtype)


# Inference forwards (no planes kept for a backward) of kernels larger than 1x1 run the
# channel-vector tile from fewer input channels than training forwards do.
@pytest.mark.parametrize("images", [3, 6])   # (6: one image per work item)
@pytest.mark.parametrize("spec", [s for s in DENSE_FWD_SPECS if s.kernel != 1], ids=lambda s: s.name)
def test_inference_forward_channel_vectors(spec, images, monkeypatch, restore_threads):
    """16 input channels to 56: the inference plan runs the channel-vector tile, the
    training plan the pixel tiles (and 15 channels neither); both forwards and the weight
    gradient match the reference, bit for bit the same on 1 and 2 threads."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=images, C=_engine.CVEC_MIN_CHANNELS_INFERENCE, OC=56, groups=1, H=17, W=19,
                padding_mode="zeros")
    fp = _plan(case, dtype)
    ip = _engine.inference_plan(fp.problem)
    assert fp.kernel.name == spec.name and fp.cvec is None and ip.cvec is not None
    fewer = _plan(dict(case, C=case["C"] - 1), dtype)
    assert _engine.inference_plan(fewer.problem) is fewer and fewer.cvec is None
    calls = []
    _spy_on_kernel(monkeypatch, ip, "run", calls)
    _check_forward_on_both_thread_counts(spec, case, dtype, "inference-cvec")
    assert calls == [1, 2]   # (the inference forwards only, on 1 and 2 threads)


# So do their input gradients (kernels whose taps are unrolled): each work item extends
# one image's grad_output, runs every phase's tiles and folds them into its input gradient.
DENSE_FUSED_BWD_SPECS = [s for s in SPECS if s.direction == "bwd_data" and s.groups == "dense" and not s.is_generic]


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("spec", DENSE_FUSED_BWD_SPECS, ids=lambda s: s.name)
def test_dense_input_gradient_fused(spec, mode, monkeypatch, restore_threads):
    """Six images, 11 output channels reduced into 6 input channels (a partial tile of
    rows): the plan fuses them (three images do not), and the input gradient matches the
    reference, bit for bit the same on 1 and 2 threads."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # several threads even on a small problem
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=6, C=6, OC=11, groups=1, H=11, W=13, padding_mode=mode)
    if spec.kernel == 1:
        case["padding"] = 1   # (without padding, a 1x1 layer's runs as the transposed layer's forward)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    assert bp.kernel.name == spec.name and bp.fused_len is not None and bp.cvec is None
    assert _engine.backward_data_plan(_plan(dict(case, N=_engine.DENSE_FUSED_MIN_IMAGES - 1), dtype).problem
                                      ).fused_len is None
    calls = []
    _spy_on_kernel(monkeypatch, bp, "fused", calls)
    _check_input_gradient_on_both_thread_counts(spec, case, dtype, fp.problem, "dense-fused-input")
    assert calls == [1, 2]


# ... and on the channel-vector tile where it stores straight into the input gradient
# (stride 1, zero padding): each work item borders one image's grad_output into its
# thread's blocks.
DENSE_STRIDE1_BWD_SPECS = [s for s in SPECS if s.direction == "bwd_data" and s.groups == "dense"
                           and s.stride in (1, None)]   # (None: any stride, taken at run time)


@pytest.mark.parametrize("spec", DENSE_STRIDE1_BWD_SPECS, ids=lambda s: s.name)
def test_dense_input_gradient_fused_channel_vectors(spec, monkeypatch, restore_threads):
    """Six images, 40 output channels (a partial block) reduced into 56 input channels:
    the plan fuses them (three images do not), and the input gradient matches the
    reference, bit for bit the same on 1 and 2 threads."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=6, C=56, OC=40, groups=1, H=17, W=19, stride=1)
    if spec.kernel == 1:
        case["padding"] = 1   # (as above)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    assert bp.kernel.name == spec.name and bp.cvec is not None and bp.direct and bp.cvec_fused
    assert not _engine.backward_data_plan(_plan(dict(case, N=_engine.DENSE_FUSED_MIN_IMAGES - 1), dtype).problem
                                          ).cvec_fused
    calls = []
    _spy_on_kernel(monkeypatch, bp, "run", calls, fused_kwarg=True)
    _check_input_gradient_on_both_thread_counts(spec, case, dtype, fp.problem, "dense-fused-cvec-input")
    assert calls == [1, 2]


# The input gradient of a dense layer whose input channels fit one tile of rows (first
# layers: 3 channels) hands its pixel runs out statically, through reduction passes.
DENSE_BWD_DATA_SPECS = [s for s in SPECS if s.direction == "bwd_data" and s.groups == "dense"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", DENSE_BWD_DATA_SPECS, ids=lambda s: s.name)
def test_input_gradient_one_channel_tile_static(spec, threads, pixel_tile_passes, monkeypatch, restore_threads):
    """3 input channels (one tile of rows) and 20 output channels in reduction passes: the
    plan takes the static schedule even above STATIC_WORK, and the gradient matches the
    reference and, bit for bit, the one-thread result; with more channels than a tile's
    rows it stays dynamic."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)     # several threads even on a small problem
    monkeypatch.setattr(_engine, "STATIC_WORK", 0)    # the size rule alone would say dynamic
    dtype = spec_dtype(spec)
    case = case_for(spec)
    case.update(N=2, C=3, OC=20, groups=1)
    bp = _engine.backward_data_plan(_plan(case, dtype).problem)
    assert bp.kernel.name == spec.name and bp.cvec is None and bp.rblock < 20
    assert bp.static_schedule and 3 <= bp.kernel.variants[bp.tile][0]
    rows = max(r for r, _, _ in bp.kernel.variants)
    wide = dict(case, C=rows + 1)
    assert not _engine.backward_data_plan(_plan(wide, dtype).problem).static_schedule
    x, w, b, gy = case_arrays(case, dtype, make_rng("bwd-data-static", spec.name))
    args = conv_args(case)
    convgen.set_num_threads(threads)
    got = convgen_functional("bwd_data", x, w, b, gy, **args)
    assert_close(got, reference_functional("bwd_data", x, w, b, gy, **args), dtype, f"{spec.name} vs reference")
    convgen.set_num_threads(1)
    assert np.array_equal(got, convgen_functional("bwd_data", x, w, b, gy, **args))


def _poison_scratch(monkeypatch):
    """Every scratch array the engine asks for from now on starts as NaN, so a region a
    kernel should have written but did not shows in its output."""
    scratch = _engine.scratch

    def poisoned(name, shape, dtype):
        buf = scratch(name, shape, dtype)
        buf.fill(np.nan)
        return buf
    monkeypatch.setattr(_engine, "scratch", poisoned)


@pytest.fixture
def banded(monkeypatch, restore_threads):
    """Bands on every call that has a chunk per thread, small ones included, with
    scratch memory poisoned (see _poison_scratch).  (The steps a plan keeps for its calls
    are worked out under the settings of the time: the plans go, before and after.)"""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)     # several threads even on a small problem
    monkeypatch.setattr(_engine, "BAND_MIN_CHUNKS", 1)
    _poison_scratch(monkeypatch)
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()
    yield
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


def _assert_band_rows(rows, threads, last):
    """A band split's rows: one band per thread, in order, ending at the planes' last row."""
    assert rows is not None and len(rows) == threads + 1 and rows[-1] == last and np.all(np.diff(rows) >= 0)


def _banded_matches_one_thread(direction, x, w, b, gy, args, dtype, threads, name):
    """`direction` on `threads` threads matches the reference and, bit for bit, one
    thread's result, which it returns."""
    convgen.set_num_threads(1)
    alone = convgen_functional(direction, x, w, b, gy, **args)
    convgen.set_num_threads(threads)
    got = convgen_functional(direction, x, w, b, gy, **args)
    assert_close(got, reference_functional(direction, x, w, b, gy, **args), dtype, f"{name} vs reference")
    assert np.array_equal(got, alone), f"{name}: the bands' result differs from one thread's"
    return alone


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spec", DENSE_FWD_SPECS, ids=lambda s: s.name)
def test_one_pass_forward_in_bands(spec, threads, banded, monkeypatch):
    """A one-pass forward on several threads runs in bands (each thread pads the plane
    rows its share of the pixel chunks starts on, then runs every channel tile there):
    the output matches the reference and, bit for bit, the one-thread result; the
    planes kept for the weight gradient are the whole padded input, and an infinity in
    the last band's rows is still reported."""
    monkeypatch.setattr(_engine, "CVEC_MIN_CHANNELS", 1 << 30)   # pixel tiles
    dtype = spec_dtype(spec)
    case = dict(case_for(spec), H=47, W=29)
    args = conv_args(case)
    x, w, b, _ = case_arrays(case, dtype, make_rng("fwd-bands", spec.name))
    try:
        _engine.forward_plan.cache_clear()
        fp = _plan(case, dtype)
        assert fp.kernel.name == spec.name and fp.one_pass
        _assert_band_rows(fp.bands(threads), threads, fp.Hq)
        assert fp.bands(1) is None
        _banded_matches_one_thread("fwd", x, w, b, None, args, dtype, threads, spec.name)
        _check_kept_planes(fp, case, dtype)
    finally:
        _engine.forward_plan.cache_clear()


def test_no_bands_past_band_max_threads(banded):
    """Bands on up to BAND_MAX_THREADS threads; past that the tiles go to the threads
    dynamically, with the same bits as one thread's (forward and input gradient)."""
    dtype = np.dtype(np.float32)
    case = dict(N=1, C=64, OC=64, H=30, W=30, kernel=(3, 3), stride=(1, 1), padding=1, dilation=1, groups=1)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    most = _engine.BAND_MAX_THREADS
    for plan, last in ((fp, fp.Hq), (bp, None)):
        assert plan.cvec is not None
        rows = plan.bands(most)
        assert rows is not None and len(rows) == most + 1 and (last is None or rows[-1] == last)
        assert plan.bands(most + 1) is None
    args = conv_args(case)
    x, w, b, gy = case_arrays(case, dtype, make_rng("no-bands", "many threads"))
    for direction in ("fwd", "bwd_data"):
        _banded_matches_one_thread(direction, x, w, b, gy, args, dtype, most + 1, f"{direction} on {most + 1} threads")


CVEC_FWD_SPECS = [s for s in CVEC_SPECS if s.direction == "fwd"]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spec", CVEC_FWD_SPECS, ids=lambda s: s.name)
def test_channel_vector_forward_in_bands(spec, threads, forced, banded, monkeypatch):
    """The channel-vector forward in bands (pad_blocked's band_rows, each thread its
    own copy of the packed weights, then its share of every image's pixel chunks), over
    several images a pass and several reduction passes: the output matches the
    reference and, bit for bit, one thread's (1x1 layers at stride 1 without padding
    run panels instead, as before)."""
    monkeypatch.setattr(_engine, "PANELS", False)
    dtype = spec_dtype(spec)
    case = dict(_case(spec, 37, 37), H=19, W=23)
    args = conv_args(case)
    x, w, b, _ = case_arrays(case, dtype, make_rng("cvec-bands", spec.name))
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.cvec is not None and fp.rblock < fp.Cg
    _assert_band_rows(fp.bands(threads), threads, fp.Hq)
    _banded_matches_one_thread("fwd", x, w, b, None, args, dtype, threads, spec.name)
    # (each thread packed its own copy of the weights; a NaN in them still reaches the output)
    w[-1, -1, 0, 0] = np.nan
    got = convgen_functional("fwd", x, w, b, None, **args)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(reference_functional("fwd", x, w, b, None, **args)))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("spec", CVEC_FWD_SPECS, ids=lambda s: s.name)
def test_channel_vector_row_tiles_in_sub_bands(spec, rows, threads, forced_rows, banded, monkeypatch):
    """Row tiles in bands (one thread: its one band) run every channel tile over
    BAND_SUB_ROWS rows of the band at a time, then the next rows (a band's last run
    fewer), an image at a time: the output matches the reference and, bit for bit, one
    thread's (and, on one thread, the same tiles' without sub-bands)."""
    monkeypatch.setattr(_engine, "PANELS", False)
    monkeypatch.setattr(_engine, "BAND_SUB_ROWS", rows)
    monkeypatch.setattr(_engine, "DENSE_FUSED_CVEC", False)   # (both images in one pass, in bands)
    monkeypatch.setattr(_engine, "CVEC_IMAGE_BUDGET", 1 << 30)
    dtype = spec_dtype(spec)
    case = dict(_case(spec, 37, 37), N=2, H=31, W=23)
    args = conv_args(case)
    x, w, b, _ = case_arrays(case, dtype, make_rng("cvec-sub-bands", spec.name))
    fp = _plan(case, dtype)
    assert fp.kernel.name == spec.name and fp.cvec is not None and fp.row_tiles > 0 and fp.images == 2
    assert rows < fp.OH // threads   # (each band has more rows than a run)
    if threads > 1:
        _assert_band_rows(fp.bands(threads), threads, fp.Hq)
    alone = _banded_matches_one_thread("fwd", x, w, b, None, args, dtype, threads, spec.name)
    if threads == 1:   # (a new plan: the calls' steps are kept on it)
        monkeypatch.setattr(_engine, "BAND_SUB_ROWS", 0)
        _engine.forward_plan.cache_clear()
        assert np.array_equal(convgen_functional("fwd", x, w, b, None, **args), alone)


CVEC_BWD_DATA_SPECS = [s for s in CVEC_SPECS if s.direction == "bwd_data"]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spec", CVEC_BWD_DATA_SPECS, ids=lambda s: s.name)
def test_channel_vector_input_gradient_in_bands(spec, threads, forced, banded, monkeypatch):
    """The channel-vector input gradient in bands (grad_output's blocks padded with
    band_rows, each thread its share of the pixel chunks, every stride phase), over
    several images and reduction passes: it matches the reference and, bit for bit,
    one thread's."""
    monkeypatch.setattr(_engine, "PANELS", False)
    dtype = spec_dtype(spec)
    case = dict(_case(spec, 37, 37), H=19, W=23)
    args = conv_args(case)
    x, w, b, gy = case_arrays(case, dtype, make_rng("cvec-bwd-bands", spec.name))
    bp = _engine.backward_data_plan(_plan(case, dtype).problem)
    assert bp.kernel.name == spec.name and bp.cvec is not None and not bp.panels
    _assert_band_rows(bp.bands(threads), threads, bp.block_tables[0].shape[1])
    _banded_matches_one_thread("bwd_data", x, w, b, gy, args, dtype, threads, spec.name)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("spec", WGRAD_SPECS, ids=lambda s: s.name)
def test_weight_gradient_by_channel_in_bands(spec, threads, forced, banded, monkeypatch):
    """The channel-vectorised weight gradient in bands of output channels (each thread
    transposes the columns of grad_output its tiles read), over several reduction
    segments: it matches the reference and, bit for bit, one thread's and the dynamic
    schedule's; with blocks that do not split evenly it keeps the dynamic schedule."""
    monkeypatch.setattr(_engine, "_wgrad_chunks", lambda *a: None)   # split over tiles, not pixels
    dtype = spec_dtype(spec)
    width = 2 * _engine.LANES["f32" if dtype == np.float32 else "f64"]
    case = dict(_case(spec, 17, 4 * width - 3), N=3, H=37, W=35)   # 4 blocks of output channels
    args = conv_args(case)
    fp = _plan(case, dtype)
    assert fp.wgrad_by_channel and fp.wgrad_chunks is None
    assert fp.ocvec_images * fp.ocvec_pixels < case["N"] * fp.grad_len
    x, w, b, gy = case_arrays(case, dtype, make_rng("wgrad-bands", spec.name))
    alone = _banded_matches_one_thread("bwd_weight", x, w, b, gy, args, dtype, threads, spec.name)
    monkeypatch.setattr(_engine, "WGRAD_BANDS", False)
    _engine.forward_plan.cache_clear()   # (its steps were worked out with the bands)
    assert np.array_equal(convgen_functional("bwd_weight", x, w, b, gy, **args), alone)
    convgen.set_num_threads(3)   # (4 blocks: not split into bands)
    assert np.array_equal(convgen_functional("bwd_weight", x, w, b, gy, **args), alone)


@pytest.mark.parametrize("flat", [True, False], ids=["flat grid", "own rows"])
@pytest.mark.parametrize("spec", WGRAD_SPECS, ids=lambda s: s.name)
def test_dense_weight_gradient_flat_or_rows(spec, flat, monkeypatch):
    """The dense pixel-vectorised weight gradient over grad_output extended onto the flat
    grid, or over its own rows (first layers: few multiply-adds per value), with rows of 35
    (a partial last vector) and segments of rows under a small cache budget: both match
    the reference."""
    monkeypatch.setattr(_engine, "WGRAD_FLAT_MIN_MACS", 0 if flat else 1 << 30)
    monkeypatch.setattr(_engine, "CACHE_BUDGET", 4096)
    _engine.forward_plan.cache_clear()
    try:
        case = dict(_case(spec, 3, 5), N=2, H=37, W=35)
        fp = _plan(case, spec_dtype(spec))
        if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
            assert fp.wgrad_kernel.name == spec.name and not fp.wgrad_by_channel and fp.wgrad_flat == flat
        if not flat:
            images, rows, cols = fp.wgrad_segments
            assert rows < fp.OH and cols == fp.OW
        _check(spec, case)
    finally:
        _engine.forward_plan.cache_clear()


PIXEL_BWD_DATA_SPECS = [s for s in PIXEL_TILE_SPECS if s.direction == "bwd_data"]


@pytest.mark.parametrize("channels", [3, 20], ids=["one-tile", "several-tiles"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spec", PIXEL_BWD_DATA_SPECS, ids=lambda s: s.name)
def test_pixel_tile_input_gradient_in_bands(spec, threads, channels, pixel_tile_passes, banded):
    """The pixel tiles' input gradient in bands (grad_output extended with band_rows, each
    thread its share of the pixel chunks, every stride phase and reduction pass, folded or
    stored straight into gx), on 3 input channels (a first layer: one tile of rows) or 20
    (several): it matches the reference and, bit for bit, one thread's."""
    dtype = spec_dtype(spec)
    case = case_for(spec)
    groups = case["groups"]
    case.update(C=channels * groups, OC=12 * groups, N=2, H=37, W=29)
    args = conv_args(case)
    x, w, b, gy = case_arrays(case, dtype, make_rng("pixel-bwd-bands", spec.name, channels))
    bp = _engine.backward_data_plan(_plan(case, dtype).problem)
    assert bp.kernel.name == spec.name and bp.cvec is None and bp.rblock < 12
    _assert_band_rows(bp.bands(threads), threads, bp.bands.plane_rows)
    _banded_matches_one_thread("bwd_data", x, w, b, gy, args, dtype, threads, spec.name)


@pytest.fixture
def small_maps(monkeypatch):
    """Every test map counts as small for the channel-vector tiles, which then pack their
    own blocks of weights (ForwardPlan.pack_blocks); the plans made here are dropped after."""
    monkeypatch.setattr(_engine, "CVEC_MIN_PIXELS", 1 << 30)
    monkeypatch.setattr(_engine, "CVEC_MIN_PIXELS_WIDE", 1 << 30)
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()
    yield
    _engine.forward_plan.cache_clear()
    _engine.backward_data_plan.cache_clear()


# (the input gradient's at stride 1 only)
PACK_BLOCK_SPECS = [s for s in CVEC_SPECS if s.kernel != 1 and (s.direction == "fwd" or case_for(s)["stride"] == (1, 1))]


@pytest.mark.parametrize("spec", PACK_BLOCK_SPECS, ids=lambda s: s.name)
def test_weights_packed_by_block_on_small_maps(spec, small_maps, restore_threads):
    """Small maps: each work item packs its block of output channels' weights itself
    (_run_block_packed; the input gradient's output channels are the layer's input
    channels).  90 of them make three blocks in float32 (six in float64), the last
    partial; two threads share three in two parts each (each part packing its block
    again).  37 channels to reduce make a full block and a partial one.  The spec's
    direction on 1, 2 and 3 threads against the reference and torch, the same bits on
    each; then an infinite weight in the second block, which must not skip its
    padding-only taps (0 * inf is NaN) while the other blocks still may (the input
    gradient: NaN and infinities where torch's has them, see _engine.backward_data)."""
    dtype = spec_dtype(spec)
    fwd = spec.direction == "fwd"
    case = _case(spec, 37, 90) if fwd else _case(spec, 90, 37)
    case.update(N=2, H=13, W=11)
    fp = _plan(case, dtype)
    plan = fp if fwd else _engine.backward_data_plan(fp.problem)
    assert plan.kernel.name == spec.name and plan.cvec is not None and plan.pack_blocks
    assert plan.rblock == (fp.Cg if fwd else fp.OCg)
    assert plan.blocks >= 3 and 90 % plan.cvec[2]   # (a partial last block)
    rng = make_rng("pack-blocks", spec.name)
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    want = reference_functional(spec.direction, x, w, b, gy, **args)
    first = None
    for threads in (1, 2, 3):
        convgen.set_num_threads(threads)
        got = convgen_functional(spec.direction, x, w, b, gy, **args)
        assert_close(got, want, dtype, f"{threads} thread(s) vs reference")
        if first is None:
            first = got
            assert_close(got, torch_functional(spec.direction, x, w, b, gy, **args), dtype, "vs torch")
        np.testing.assert_array_equal(got, first)
    w = w.copy()
    o = plan.cvec[2] + 3   # an output channel of the second block
    if fwd:
        w[o, 5, 0, 0] = np.inf
    else:
        w[5, o, 0, 0] = np.inf
    got = convgen_functional(spec.direction, x, w, b, gy, **args)
    # (the input gradient: torch's, a sum over real output pixels only; see
    # _engine.backward_data)
    want = (reference_functional if fwd else torch_functional)(spec.direction, x, w, b, gy, **args)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert_close(np.where(finite, got, 0), np.where(finite, want, 0), dtype, "with an infinite weight")


# Inference forwards pack blocks of weights on smaller maps than other directions do
# (PACK_BLOCK_MIN_PIXELS_INFERENCE: on AVX2 only, where it paid).
@pytest.mark.parametrize("spec", [s for s in PACK_BLOCK_SPECS if s.direction == "fwd"], ids=lambda s: s.name)
def test_inference_forward_packs_blocks_on_smaller_maps(spec, monkeypatch, restore_threads):
    """A map of as many output pixels as the inference rule's bound, one fewer than the
    others': the inference plan packs blocks of weights (a twin of the training plan,
    which keeps the pixel tiles, and so does the input gradient's); a bound one pixel
    higher leaves the inference forward on the training plan.  Both forwards and the
    weight gradient against the reference, bit for bit the same on 1 and 2 threads."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    dtype = spec_dtype(spec)
    case = _case(spec, 40, 90)
    case.update(N=1, H=9, W=8, padding_mode="zeros")
    pixels = int(np.prod(convgen.output_size((9, 8), case["kernel"], case["stride"], case["padding"],
                                             case["dilation"])))

    def plans(bound):
        monkeypatch.setattr(_engine, "PACK_BLOCK_MIN_PIXELS", pixels + 1)
        monkeypatch.setattr(_engine, "PACK_BLOCK_MIN_PIXELS_INFERENCE", bound)
        _engine.forward_plan.cache_clear()
        _engine.backward_data_plan.cache_clear()
        fp = _plan(case, dtype)
        return fp, _engine.inference_plan(fp.problem)

    try:
        fp, ip = plans(pixels + 1)
        assert ip is fp and fp.cvec is None and fp.kernel.name == spec.name
        fp, ip = plans(pixels)
        assert ip is not fp and ip.cvec is not None and ip.pack_blocks and fp.cvec is None
        assert not _engine.backward_data_plan(fp.problem).pack_blocks
        calls = []
        _spy_on_kernel(monkeypatch, ip, "run", calls)
        _check_forward_on_both_thread_counts(spec, case, dtype, "inference-small-map")
        assert calls == [1, 2]   # (the inference forwards only, on 1 and 2 threads)
    finally:
        _engine.forward_plan.cache_clear()
        _engine.backward_data_plan.cache_clear()


# A frozen module (Conv2d.freeze) packs its weights for the channel-vector tile once,
# whatever its map's size, and its inference forwards reuse them (_engine.frozen_plan,
# forward's packs).
FROZEN_SPECS = [s for s in CVEC_SPECS if s.direction == "fwd" and s.kernel != 1]


@pytest.mark.parametrize("pixels", [4, 13])
@pytest.mark.parametrize("spec", FROZEN_SPECS, ids=lambda s: s.name)
def test_frozen_forward_packs_once(spec, pixels, monkeypatch, restore_threads):
    """37 -> 90 channels (a partial block of each) on two images, a small and a larger
    map: the frozen plan runs the spec's channel-vector tile over weights packed whole
    (not a block per work item), packed by the first call only, then reused on 1, 2
    and 3 threads, against the reference and torch and the same bits each call; then
    an infinite weight, which must not skip padding-only taps (0 * inf is NaN)."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    dtype = spec_dtype(spec)
    case = _case(spec, 37, 90)
    (kh, kw), (dh, dw) = (c if isinstance(c, tuple) else (c, c) for c in (case["kernel"], case["dilation"]))
    case.update(N=2, H=dh * (kh - 1) + pixels, W=dw * (kw - 1) + pixels + 1, padding_mode="zeros")
    fp = _plan(case, dtype)
    plan = _engine.frozen_plan(fp.problem)
    assert plan.frozen and plan.kernel.name == spec.name and plan.cvec is not None and not plan.pack_blocks
    packs = []
    _spy_on_kernel(monkeypatch, plan, "pack", packs)
    x, w, b, _ = case_arrays(case, dtype, make_rng("frozen", spec.name, pixels))
    args = conv_args(case)
    want = ref.conv2d(x, w, b, **args)
    conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], dtype=dtype, **args)
    conv.weight[...] = w
    conv.bias[...] = b
    conv.freeze()
    first = None
    with convgen.no_grad():
        for threads in (1, 2, 3):
            convgen.set_num_threads(threads)
            for _ in range(2):
                got = conv(x)
                assert_close(got, want, dtype, f"{threads} thread(s) vs reference")
                if first is None:
                    first = got
                    assert_close(got, torch_functional("fwd", x, w, b, None, **args), dtype, "vs torch")
                np.testing.assert_array_equal(got, first)
    assert packs == [1]   # (the first call's, on one thread)
    w = w.copy()
    w[plan.cvec[2] + 3, 5, 0, 0] = np.inf   # (an output channel of the second block)
    conv.weight = w
    conv.freeze()
    with convgen.no_grad():
        got = conv(x)
    want = ref.conv2d(x, w, b, **args)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert_close(np.where(finite, got, 0), np.where(finite, want, 0), dtype, "with an infinite weight")


@pytest.mark.parametrize("spec", [s for s in CVEC_SPECS if s.direction == "bwd_data"], ids=lambda s: s.name)
def test_frozen_input_gradient_packs_once(spec, forced_rows, monkeypatch, restore_threads):
    """A frozen module's backward: the input gradient's channel-vector tile packs each
    stride phase's weights by the first backward only, then reuses them on 1, 2 and 3
    threads; the input gradients against the reference and torch, the same bits each
    call, and the weight gradient against the reference."""
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)
    dtype = spec_dtype(spec)
    case = _case(spec, 37, 90)
    case.update(N=2, H=13, W=11, padding_mode="zeros")
    if spec.kernel == 1:
        case["padding"] = 1   # (without padding, a 1x1 layer's runs as the transposed layer's forward)
    fp = _plan(case, dtype)
    bp = _engine.backward_data_plan(fp.problem)
    assert bp.kernel.name == spec.name and bp.cvec is not None and not bp.pack_blocks
    packs = []
    _spy_on_kernel(monkeypatch, bp, "pack", packs)
    x, w, b, gy = case_arrays(case, dtype, make_rng("frozen-input-gradient", spec.name))
    args = conv_args(case)
    want = ref.conv2d_input(x.shape, w, gy, **args)
    want_gw = ref.conv2d_weight(x, w.shape, gy, **args)
    conv = convgen.Conv2d(case["C"], case["OC"], case["kernel"], dtype=dtype, **args)
    conv.weight[...] = w
    conv.bias[...] = b
    conv.freeze()
    first = None
    for threads in (1, 2, 3):
        convgen.set_num_threads(threads)
        for _ in range(2):
            conv(x)
            conv.zero_grad()
            got = conv.backward(gy)
            assert_close(got, want, dtype, f"{threads} thread(s) vs reference")
            assert_close(conv.weight.grad, want_gw, dtype, "weight gradient")
            if first is None:
                first = got
                assert_close(got, torch_functional("bwd_data", x, w, b, gy, **args), dtype, "vs torch")
            np.testing.assert_array_equal(got, first)
    assert packs == [1] * sum(1 for ws in bp.phase_ws if len(ws))   # (the first backward's, per phase)


def test_inference_small_map_rule():
    """The rule on ResNet-50's 3x3 512 at 7x7: on AVX2 its inference forward packs blocks
    of weights, its training forward and input gradient keep the pixel tiles; elsewhere
    all three keep them."""
    fp = _plan(dict(N=1, C=512, OC=512, H=7, W=7, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                    groups=1), np.float32)
    ip = _engine.inference_plan(fp.problem)
    assert fp.cvec is None and _engine.backward_data_plan(fp.problem).cvec is None
    assert (ip.cvec is not None and ip.pack_blocks) == (_dispatch.TARGET == "avx2")


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_packed_by_block_where_they_outweigh_the_input(dtype, k, restore_threads):
    """Maps too large for the small-map rule whose weights hold at least PACK_BLOCK_WEIGHT_RATIO times as many values
    as the input's blocked copy pack them a block at a time in the forward (the input
    gradient keeps pack_weights): every direction against the reference on 1 and 2
    threads, and the rule on ResNet-like layers."""
    dtype = np.dtype(dtype)
    case = dict(N=1, C=40, OC=160, H=22, W=23, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                groups=1)
    if k == 1:   # (a 1x1 expansion)
        case.update(OC=480, H=12, W=13, kernel=(1, 1), padding=(0, 0))
    fp = _plan(case, dtype)
    assert fp.cvec is not None and fp.pack_blocks and fp.rblock == fp.Cg and fp.bands(2) is None
    assert not _engine.backward_data_plan(fp.problem).pack_blocks
    _check_directions(case, dtype, make_rng("outweigh", k, dtype.name))

    def rule(N, C, H, OC, stride=1, k=3):
        return _plan(dict(N=N, C=C, OC=OC, H=H, W=H, kernel=(k, k), stride=(stride, stride), padding=(k // 2,) * 2,
                          dilation=(1, 1), groups=1), np.dtype(np.float32)).pack_blocks

    assert rule(1, 256, 28, 256) and rule(1, 512, 28, 512)
    assert not rule(1, 128, 28, 128) and not rule(4, 256, 28, 256) and not rule(1, 128, 56, 128, 2)
    assert not rule(1, 64, 56, 64)
    # 1x1 expansions; not narrowing layers, which read their input through the panels
    assert rule(1, 96, 14, 576, k=1) and rule(1, 256, 14, 1024, k=1)
    assert not rule(1, 128, 28, 512, k=1) and not rule(1, 1024, 14, 256, k=1) and not rule(1, 576, 14, 96, k=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_gradient_l1_passes(dtype, monkeypatch, restore_threads):
    """1x1 layers whose weights outgrow L2 run their input gradient's pixel tiles in even
    passes of at most L1_PASS_BYTES of grad_output (checked on 1 and 2 threads, against
    the reference, on a small weight budget); the rule on ResNet's and MobileNetV2's
    layers.  (Which run as forwards from the weight's transposed copy up to
    INPUT_AS_FORWARD_COPY_BYTES: not here.)"""
    monkeypatch.setattr(_engine, "INPUT_AS_FORWARD_COPY_BYTES", 0)
    def plan(C, OC, H, N=1, k=1, dt="f32"):
        p = _engine.Problem(N, C, H, H, OC, k, k, 1, 1, 1, 1, k // 2, k // 2, k // 2, k // 2, 1, "zeros", dt)
        return _engine.backward_data_plan(p)

    bp = plan(512, 2048, 7)   # ResNet's 512 -> 2048 at 7x7: 13 passes of 158 channels
    if not BASELINE_BUILD:   # (16-byte vectors take other paths on these shapes)
        assert bp.cvec is None and bp.rblock == 158 and bp.rblock * bp.plane_len * 4 <= _engine.L1_PASS_BYTES
    assert bp.static_schedule   # (each thread the same tiles in every pass)
    if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
        assert plan(2048, 512, 7).rblock == 128 and plan(512, 2048, 7, dt="f64").rblock == 79
    assert plan(160, 960, 7).rblock == 960      # (0.6 MB of weights: one pass)
    assert plan(512, 512, 7, k=3).rblock == 512   # (3x3: one pass)
    monkeypatch.setattr(_engine, "L1_PASS_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(_engine, "L1_PASS_BYTES", 100 * 64 * np.dtype(dtype).itemsize)
    monkeypatch.setattr(_engine, "SMALL_WORK", 0)   # (2 threads even on a small problem)
    _engine.forward_plan.cache_clear()   # (which hold the input gradients' routes)
    _engine.backward_data_plan.cache_clear()
    try:
        case = dict(N=2, C=45, OC=300, H=7, W=7, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                    groups=1)
        p = _plan(case, dtype).problem
        bp = _engine.backward_data_plan(p)
        assert _engine.input_gradient_as_forward(p) is None   # (the pixel tiles run it)
        if PINNED_GEOMETRY:   # (the path these shapes take on AVX-512's tiles)
            assert bp.cvec is None and bp.plane_len == 64 and bp.rblock == 100   # (3 passes of 100)
        _check_directions(case, np.dtype(dtype), make_rng("l1-passes", np.dtype(dtype).name))
    finally:
        _engine.forward_plan.cache_clear()
        _engine.backward_data_plan.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pad_phase_against_indexing(stride, mode, dtype):
    """_layout.pad_phase's planes against NumPy indexing by the same source tables, for
    rows 1-21 values wide (a partial vector each, or whole ones), 1 or 5 rows, strides 1-3
    (stride 2's columns split in one pass where both phases take alternate source columns,
    reflect's not always), every padding mode, one or two threads, with and without the
    check, and in bands (each band's rows; its copies may not write into the next band's),
    in planes with and without a vector's room past the last row (zeros at stride 1 then
    take the whole-row copies, _pad_zero_s1, where not in bands; also with it switched
    off): the values, zero tails, nothing written past the planes, and the infinity
    reported only when checked."""
    rng = make_rng("pad-phase", stride, mode, np.dtype(dtype).name)
    kernel_mode = _engine.PADDING_MODES[mode]
    lanes = _engine.LANES["f32" if dtype == np.float32 else "f64"]
    for H, W in [(5, W) for W in (1, 2, 3, 7, 8, 9, 14, 16, 17, 21)] + [(1, 7), (1, 9), (2, 3)]:
        pad = min(2, W - 1, H - 1) if mode != "zeros" else 2
        hp, wp = H + 2 * pad, W + 2 * pad
        Hq, We = _geometry.ceil_div(hp, stride), _geometry.ceil_div(wp, stride)
        rows = _engine._phase_sources(-pad, Hq, stride, H, hp, kernel_mode)
        cols = _engine._phase_sources(-pad, We, stride, W, wp, kernel_mode)
        interior = _engine._interior(pad, We, stride, W)
        x = rng.standard_normal((3, H, W)).astype(dtype)
        for plane_len in (Hq * We + 3, Hq * We + lanes + 3):
            whole_rows = (mode == "zeros" or pad == 0) and stride == 1 and plane_len >= Hq * We + lanes
            assert _layout.pads_whole_rows(rows, cols, interior, H, W, plane_len, x.itemsize) == whole_rows
            want = np.zeros((3, stride * stride, plane_len), dtype)
            for a in range(stride):
                for b in range(stride):
                    got_rows = x[:, np.maximum(rows[a], 0)][:, :, np.maximum(cols[b], 0)]
                    mask = (rows[a] >= 0)[:, None] & (cols[b] >= 0)[None, :]
                    want[:, a * stride + b, :Hq * We] = np.where(mask, got_rows, 0).reshape(3, -1)
            for threads, band_rows, whole in ((1, None, True), (2, None, True), (1, None, False),
                                              (2, np.array([0, Hq // 2, Hq], np.intp), True),
                                              (3, np.array([0, 1, 2, Hq], np.intp), True)):
                if band_rows is not None and Hq < 3:
                    continue
                old = _layout.use_pad_zero_s1(whole)
                # (x's last byte against a page that may not be read: whole-row copies read
                # whole vectors only where the channel goes on past them)
                guarded, release = _beside_unreadable_page(x)
                try:
                    for check in (True, False):
                        out = np.full(want.size + 9, 7.0, dtype)
                        xin = out[:want.size].reshape(3, -1)
                        bad = _layout.pad_phase(guarded, xin, rows, cols, interior, plane_len, threads, band_rows,
                                                check=check)
                        assert not bad
                        np.testing.assert_array_equal(xin.reshape(want.shape), want,
                                                      err_msg=f"H={H} W={W} bands={band_rows} {plane_len}")
                        assert (out[want.size:] == 7).all()
                finally:
                    release()
                    _layout.use_pad_zero_s1(old)
        x[1, H // 2, W - 1] = np.inf
        for plane_len in (Hq * We + 3, Hq * We + lanes + 3):
            for check in (True, False):
                assert _layout.pad_phase(x, np.empty((3, stride * stride * plane_len), dtype), rows, cols, interior,
                                         plane_len, 1, check=check) == check


# The dense weight gradient's channel-vector tiles read grad_output transposed in blocks
# of output channels (_layout.extend_transposed), which writes grad_output's pixels only:
# partial blocks (a group's last channels), groups, bands on 2 threads, scratch columns,
# a stride and a dilation, and batches of two.
@pytest.mark.parametrize("shape, dtype", [
    ((1, 80, 12, 12, 80, 1, 1, 1, 2), np.float32),    # 40 a group: blocks of 16, 16 and 8
    ((1, 80, 12, 12, 80, 1, 1, 1, 2), np.float64),
    ((1, 72, 12, 12, 72, 1, 1, 1, 2), np.float64),    # 36 a group: four blocks of 8 and one of 4
    ((1, 64, 14, 14, 64, 1, 1, 1, 1), np.float32),    # bands: each thread transposes its own blocks
    ((1, 64, 14, 14, 64, 1, 1, 1, 1), np.float64),
    ((2, 64, 12, 12, 64, 1, 1, 1, 1), np.float32),    # bands over a batch of two
    ((2, 64, 10, 9, 48, 1, 2, 2, 1), np.float32),     # rows wider than the map: scratch columns
    ((2, 64, 10, 9, 48, 1, 2, 2, 1), np.float64),
    ((2, 48, 13, 11, 40, 2, 1, 1, 1), np.float32),    # strided, a partial block
    ((2, 48, 13, 11, 40, 2, 1, 1, 1), np.float64),
])
def test_weight_gradient_reads_only_grad_outputs_pixels(shape, dtype, monkeypatch, restore_threads):
    """The transposed grad_output's memory holds NaN before each call everywhere but the
    pixels extend_transposed writes: the weight gradient (by channel vectors, scratch "gT")
    still matches the reference and torch on 1 and 2 threads."""
    N, C, H, W, OC, stride, padding, dilation, groups = shape
    case = dict(N=N, C=C, H=H, W=W, OC=OC, kernel=3, stride=stride, padding=padding, dilation=dilation,
                groups=groups)
    rng = make_rng("transposed-blocks", *shape, np.dtype(dtype).name)
    x, w, b, gy = case_arrays(case, dtype, rng)
    args = conv_args(case)
    want = reference_functional("bwd_weight", x, w, b, gy, **args)
    used, scratch = _scratch_names(monkeypatch), _engine.scratch

    def poisoned(name, shape, dtype):
        view = scratch(name, shape, dtype)
        if name == "gT":
            _engine._scratch_pool.__dict__[(name, dtype)][0][:] = np.nan   # (the whole buffer)
        return view
    monkeypatch.setattr(_engine, "scratch", poisoned)
    for threads in (1, 2):
        convgen.set_num_threads(threads)
        got = convgen_functional("bwd_weight", x, w, b, gy, **args)
        assert_close(got, want, dtype, f"{threads} thread(s) vs reference")
        assert_close(got, torch_functional("bwd_weight", x, w, b, gy, **args), dtype, f"{threads} thread(s) vs torch")
    assert "gT" in used
