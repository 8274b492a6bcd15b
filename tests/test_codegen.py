"""The code generator's stages, each on its own: spec -> table -> context ->
render -> emit, and the `python -m codegen` command line."""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import jinja2
import pytest

from codegen import context, emit, render, table, target
from codegen.spec import ANY, DIRECTIONS, DTYPES, GROUPS_KINDS, KernelSpec
from codegen.target import AVX2, AVX512, BASELINE

# The generated text is checked for the reference target, AVX-512, whatever this machine
# builds (its tile shapes are the ones spelled out below); BUILT, the table this build
# generated (codegen.target.build_target()), where the test reads the built modules.
SPECS = table.validate(table.build_specs(AVX512))
BUILT = table.SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- spec: validation and naming ------------------------------------------------

@pytest.mark.parametrize("args, name", [
    (("fwd", "f32", 3, 1, 1, "dense"), "conv2d_fwd_f32_k3x3_s1_d1_dense"),
    (("bwd_data", "f64", 7, 2, 1, "grouped"), "conv2d_bwd_data_f64_k7x7_s2_d1_grouped"),
    (("bwd_weight", "f32", 5, 2, 3, "depthwise"), "conv2d_bwd_weight_f32_k5x5_s2_d3_depthwise"),
    (("bwd_data", "f64", ANY, ANY, ANY, "grouped"), "conv2d_bwd_data_f64_kany_sany_dany_grouped"),
    (("fwd", "f32", 3, ANY, 2, "dense"), "conv2d_fwd_f32_k3x3_sany_d2_dense"),
    (("fwd", "f64", ANY, 1, ANY, "depthwise"), "conv2d_fwd_f64_kany_s1_dany_depthwise"),
])
def test_spec_name(args, name):
    assert KernelSpec(*args).name == name


@pytest.mark.parametrize("field, value", [
    ("direction", "bwd"), ("direction", "forward"), ("dtype", "f16"), ("dtype", "float32"),
    ("groups", "separable"), ("kernel", 0), ("kernel", -3), ("kernel", 3.0), ("kernel", "3"),
    ("stride", 0), ("stride", 1.5), ("dilation", -1), ("dilation", "any"),
])
def test_spec_rejects(field, value):
    args = dict(direction="fwd", dtype="f32", kernel=3, stride=1, dilation=1, groups="dense")
    args[field] = value
    with pytest.raises(ValueError, match=field):
        KernelSpec(**args)


def test_spec_properties():
    s = KernelSpec("bwd_weight", "f64", 3, 2, 1, "depthwise")
    assert s.key == ("bwd_weight", "f64", 3, 2, 1, "depthwise")
    assert s.module == "_bwd_weight_f64"
    assert not s.is_generic
    assert s.lanes == AVX512.lanes("f64") == 8 and s.ctype == "double"
    for generic in [KernelSpec("fwd", "f32", ANY, ANY, ANY, "dense"), KernelSpec("fwd", "f32", 3, ANY, 1, "dense")]:
        assert generic.is_generic
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.kernel = 5
    # Equal specs are equal and hash alike (they are dictionary keys in the dispatch table).
    assert s == KernelSpec("bwd_weight", "f64", 3, 2, 1, "depthwise")
    assert len({s, KernelSpec("bwd_weight", "f64", 3, 2, 1, "depthwise")}) == 1


@pytest.mark.parametrize("s", SPECS, ids=lambda s: s.name)
def test_spec_tile_and_name_parse_back(s):
    rows, cols = s.tile
    assert isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1
    # The name is predictable: its fields can be read back.
    prefix = f"conv2d_{s.direction}_{s.dtype}_"
    assert s.name.startswith(prefix) and s.name.endswith("_" + s.groups)
    k, st, d = s.name[len(prefix):-len(s.groups) - 1].split("_")
    assert k == ("kany" if s.kernel is ANY else f"k{s.kernel}x{s.kernel}")
    assert st == f"s{'any' if s.stride is ANY else s.stride}"
    assert d == f"d{'any' if s.dilation is ANY else s.dilation}"


# ---- table: invariants, and validate() rejecting broken tables -----------------

def test_table_invariants():
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))
    assert len({s.key for s in SPECS}) == len(SPECS)
    for direction in DIRECTIONS:
        for dtype in DTYPES:
            for groups in GROUPS_KINDS:
                assert KernelSpec(direction, dtype, ANY, ANY, ANY, groups) in SPECS, (direction, dtype, groups)
    # Every fully specialised shape exists in all three directions (a forward kernel always
    # has its two backward kernels); partly fixed specs exist only where they unroll.
    shapes = {d: {(s.dtype, s.kernel, s.stride, s.dilation, s.groups) for s in SPECS
                  if s.direction == d and not (s.is_generic and s.kernel is not ANY)}
              for d in DIRECTIONS}
    assert shapes["fwd"] == shapes["bwd_data"] == shapes["bwd_weight"]
    assert all(s.unrolls_taps for s in SPECS if s.is_generic and s.kernel is not ANY)
    assert table.validate(list(SPECS)) == list(SPECS)


def test_validate_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate"):
        table.validate(list(SPECS) + [SPECS[0]])


def test_validate_rejects_missing_fallback():
    generic = KernelSpec("bwd_data", "f32", ANY, ANY, ANY, "grouped")
    broken = [s for s in SPECS if s != generic]
    with pytest.raises(ValueError, match="generic fallback"):
        table.validate(broken)


def test_validate_rejects_partly_fixed_spec_that_cannot_unroll():
    # the input gradient's phases depend on the stride; the weight gradient never unrolls taps
    for bad in [KernelSpec("bwd_data", "f32", 3, ANY, 1, "dense"),
                KernelSpec("bwd_data", "f32", 3, 2, ANY, "dense"),
                KernelSpec("bwd_weight", "f32", 3, ANY, ANY, "dense")]:
        with pytest.raises(ValueError, match="all of kernel/stride/dilation"):
            table.validate(list(SPECS) + [bad])
    extra = KernelSpec("fwd", "f32", 5, ANY, ANY, "dense")   # forward: any kernel size unrolls
    assert extra.unrolls_taps and table.validate(list(SPECS) + [extra])[-1] == extra


def test_dispatch_table_holds_every_spec():
    from convgen._generated.dispatch_table import KERNELS, LANES, TARGET, VECTOR_BYTES
    assert set(KERNELS) == {s.key for s in BUILT}
    for s in BUILT:
        module, name, tile = KERNELS[s.key]
        assert (module, name, tuple(tile)) == (s.module, s.name, s.tile)
    built = BUILT[0].target
    assert (TARGET, VECTOR_BYTES, LANES) == (built.name, built.vector_bytes, {t: built.lanes(t) for t in DTYPES})


# ---- context: the values a template receives -----------------------------------

def test_context_forward_taps_3x3_stride2():
    ctx = context.kernel_context(KernelSpec("fwd", "f32", 3, 2, 1, "dense"))
    # Padded row 2*oh + i lives in phase plane i % 2, at row oh + i // 2 (same for columns).
    expected = [dict(i=i * 3 + j, w_index=i * 3 + j, plane=(i % 2) * 2 + j % 2, dy=i // 2, dx=j // 2)
                for i in range(3) for j in range(3)]
    assert ctx["taps"] == expected
    assert ctx["phases"] is None
    assert ctx["name"] == "conv2d_fwd_f32_k3x3_s2_d1_dense"
    rows, cols = KernelSpec("fwd", "f32", 3, 2, 1, "dense").tile
    assert ctx["rows"] == list(range(rows)) and len(ctx["cols"]) == cols
    assert ctx["chunk"] == cols * 16


def test_context_bwd_data_phases_3x3_stride2():
    ctx = context.kernel_context(KernelSpec("bwd_data", "f64", 3, 2, 1, "dense"))
    phases = ctx["phases"]
    assert [p["index"] for p in phases] == [0, 1, 2, 3]
    # Phase (a, b) gets the taps with i % 2 == a and j % 2 == b: 4, 2, 2 and 1 of them.
    got = [sorted(t["w_index"] for t in p["taps"]) for p in phases]
    assert got == [[0, 2, 6, 8], [1, 7], [3, 5], [4]]
    assert ctx["taps"] is None
    # its tiles run once per phase, each named and picked by the phase's index
    assert [(r["index"], r["suffix"], r["taps"]) for r in ctx["phase_runs"]] == [
        (p["index"], f"_phase{p['index']}", p["taps"]) for p in phases]
    # (a phase without taps gets no run: stride 2, dilation 2 reads only phase 0)
    ctx = context.kernel_context(KernelSpec("bwd_data", "f32", 3, 2, 2, "dense"))
    assert [r["suffix"] for r in ctx["phase_runs"]] == ["_phase0"]


SHAPES = sorted({(sp.kernel, sp.stride, sp.dilation) for sp in SPECS if not sp.is_generic}
                | {(3, 3, 2), (2, 3, 1), (4, 2, 3), (1, 4, 1)})


@pytest.mark.parametrize("k, s, d", SHAPES)
def test_context_forward_taps_read_the_right_pixel(k, s, d):
    """Independent of the formula: tap (i, j) of output (oh, ow) must read padded
    pixel (s*oh + i*d, s*ow + j*d), through plane (row % s, col % s) at (row // s, col // s)."""
    taps = [dict(w_index=t.w_index, plane=t.plane, dy=t.dy, dx=t.dx)
            for t in context.geometry.forward_taps(k, k, s, s, d, d)]
    assert sorted(t["w_index"] for t in taps) == list(range(k * k))
    for t in taps:
        i, j = divmod(t["w_index"], k)
        for oh in range(3):
            row, col = s * oh + i * d, s * oh + j * d
            assert t["plane"] == (row % s) * s + col % s
            assert oh + t["dy"] == row // s and oh + t["dx"] == col // s
    for sp in SPECS:  # the context hands exactly these taps to the specialised kernels
        if sp.direction == "fwd" and (sp.kernel, sp.stride, sp.dilation) == (k, s, d):
            got = [{key: v for key, v in t.items() if key != "i"} for t in context.kernel_context(sp)["taps"]]
            assert got == taps


@pytest.mark.parametrize("k, s, d", SHAPES)
def test_context_bwd_data_phases_cover_every_tap(k, s, d):
    """Phase (a, b) of the padded input gradient, row r, gets tap (i, j) from the
    grad_output row oh with s*oh + i*d == s*r + a, read at halo-shifted row r + dy."""
    top, left = context.geometry.bwd_data_halo(k, k, s, s, d, d)
    phases = context.geometry.bwd_data_phases(k, k, s, s, d, d)
    assert len(phases) == s * s
    assert sorted(t.w_index for taps in phases for t in taps) == list(range(k * k))
    for p, taps in enumerate(phases):
        a, b = divmod(p, s)
        for t in taps:
            i, j = divmod(t.w_index, k)
            assert t.dy >= 0 and t.dx >= 0
            for r in range(3):
                assert s * (r + t.dy - top) + i * d == s * r + a
                assert s * (r + t.dx - left) + j * d == s * r + b
    for sp in SPECS:
        if sp.direction == "bwd_data" and (sp.kernel, sp.stride, sp.dilation) == (k, s, d):
            got = [[t["w_index"] for t in ph["taps"]] for ph in context.kernel_context(sp)["phases"]]
            assert got == [[t.w_index for t in taps] for taps in phases]


@pytest.mark.parametrize("s", [spec_ for spec_ in SPECS if not spec_.unrolls_taps], ids=lambda s: s.name)
def test_context_generic_has_no_taps(s):
    ctx = context.kernel_context(s)
    assert ctx["taps"] is None and ctx["phases"] is None
    if s.direction == "bwd_data":   # one run of its tiles for every phase, taps in a loop
        assert ctx["phase_runs"] == [dict(index=None, suffix="", taps=None)]


def test_module_and_dispatch_context():
    ctx = context.module_context("fwd", "f64", SPECS)
    names = [k["name"] for k in ctx["kernels"]]
    expected = sorted(s.name for s in SPECS if s.direction == "fwd" and s.dtype == "f64")
    assert names == expected
    assert ctx["ctype"] == "double" and ctx["numpy_dtype"] == "float64"
    assert "templates/conv2d_fwd.pyx.j2" in ctx["banner"]
    d = context.dispatch_context(SPECS)
    assert len(d["rows"]) == len(SPECS)
    assert [r["name"] for r in d["rows"]] == sorted(s.name for s in SPECS)


# ---- render: the text that comes out -------------------------------------------

@pytest.fixture(scope="module")
def env():
    return render.environment()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_render_kernel_module(env, direction, dtype):
    template = context.TEMPLATES[direction]
    ctx = context.module_context(direction, dtype, SPECS)
    text = render.render(template, ctx, env)
    first = text.splitlines()[:6]
    assert any("DO NOT EDIT" in line and f"templates/{template}" in line for line in first), first
    assert "prange(" in text
    assert "{{" not in text and "{%" not in text and "{#" not in text
    for s in SPECS:
        if s.direction == direction and s.dtype == dtype:
            assert f"def {s.name}(" in text
        else:
            assert f"def {s.name}(" not in text
    assert render.render(template, ctx, env) == text
    assert render.render(template, context.module_context(direction, dtype, SPECS)) == text


def test_channel_vector_tiles_only_for_dense_forward_and_input_gradient(env):
    """Dense forward and input-gradient kernels (the generic ones too) get a
    channel-vector tile (and the module a weight packer, a blocked-input copier and a
    CVEC_TILES entry); nothing else does."""
    for s in SPECS:
        ctx = context.kernel_context(s)
        expect = s.groups == "dense" and s.direction in ("fwd", "bwd_data")
        assert (s.cvec_tile is not None) == expect, s.name
        assert (ctx.get("cvec") is not None) == expect, s.name
        if expect:
            pixels, vectors = s.cvec_tile
            assert ctx["cvec"]["width"] == vectors * s.lanes
            assert ctx["cvec"]["index"] == len(ctx["tiles"])  # after the pixel tiles
    text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", "f32", SPECS), env)
    assert "def pack_weights(" in text and "def pad_blocked(" in text
    dense3 = KernelSpec("fwd", "f32", 3, 1, 1, "dense")
    suffix = "_c{}x{}".format(*dense3.cvec_tile)
    assert f"cdef void _{dense3.name}{suffix}_item(" in text
    assert (f'"{dense3.name}": ({len(dense3.tiles)}, {dense3.cvec_tile[0]}, {dense3.cvec_tile[1] * 16}, '
            f'(6, 7, 8), {max(dense3.cvec_pairs)}),') in text
    for n in dense3.cvec_narrow:
        assert f"cdef inline void _{dense3.name}{suffix}_narrow{n}(" in text
    generic = KernelSpec("fwd", "f32", ANY, ANY, ANY, "dense")   # (its taps in a loop: no unrolled tap)
    generic_tile = text[text.index(f"cdef inline void _{generic.name}{suffix}_tile("):]
    generic_tile = generic_tile[:generic_tile.index("cdef inline void", 10)]
    assert "for t in range(a.ntaps):" in generic_tile and "# tap 0:" not in generic_tile
    assert dense3.cvec_narrow == (6, 7, 8) and max(dense3.cvec_narrow) < dense3.cvec_tile[0]
    assert KernelSpec("bwd_data", "f64", 3, 1, 1, "dense").cvec_narrow == (6, 7)   # (float32 only has the 8)
    for n in dense3.cvec_narrow:   # (n pixels: accumulators up to a_{n-1}, no further)
        twin = text[text.index(f"cdef inline void _{dense3.name}{suffix}_narrow{n}("):]
        twin = twin[:twin.index("\ncdef ")]
        assert f"a_{n - 1}_1 = " in twin and f"a_{n}_0" not in twin
    # The item runs the narrowest twin that holds a row tile's pixels, else the wide tile.
    item = text[text.index(f"cdef void _{dense3.name}{suffix}_item("):]
    item = item[:item.index("\ncdef ")]
    assert item.index("if npix <= 6:") < item.index("elif npix <= 7:") < item.index("elif npix <= 8:")
    assert f"_{dense3.name}{suffix}_narrow8(a, " in item and f"_{dense3.name}{suffix}_tile(a, " in item
    # The generic input gradient: one tile for every phase, its taps in a loop; run()
    # sends any phase to it (a kernel of fixed stride has one per phase).
    text = render.render("conv2d_bwd_data.pyx.j2", context.module_context("bwd_data", "f32", SPECS), env)
    generic = KernelSpec("bwd_data", "f32", ANY, ANY, ANY, "dense")
    tile = text[text.index(f"cdef inline void _{generic.name}{suffix}_tile("):]
    tile = tile[:tile.index("cdef inline void", 10)]
    assert "for t in range(a.ntaps):" in tile and "# tap 0:" not in tile
    run = text[text.index(f"def {generic.name}("):]
    run = run[:run.index("\n# ---- ")]
    assert f"        elif tile == {len(generic.tiles)}:\n" in run and "_item" in run and "_phase0_item" not in run
    strided = KernelSpec("bwd_data", "f32", 3, 2, 1, "dense")
    assert f"cdef void _{strided.name}{suffix}_phase3_item(" in text


@pytest.mark.parametrize("tgt", [AVX512, AVX2])
def test_channel_vector_tiles_prefetch_weights_taps_ahead(env, tgt):
    """Each channel of each tap prefetches each cache line of its packed weights
    CVEC_PREFETCH_TAPS taps on (a tap's weights are lanes x width values): on AVX-512 one
    line per weight vector, on AVX2 one line for both."""
    for dtype in ("f32", "f64"):
        specs = table.build_specs(tgt)
        text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", dtype, specs), env)
        dense3 = next(s for s in specs if s.key == KernelSpec("fwd", dtype, 3, 1, 1, "dense").key)
        tile = text[text.index(f"cdef inline void _{dense3.name}_c"):]
        tile = tile[:tile.index("\ncdef ")]
        lanes, (_, vectors) = dense3.lanes, dense3.cvec_tile
        width = lanes * vectors
        ahead = context.CVEC_PREFETCH_TAPS * lanes * width
        lines = {AVX512: vectors, AVX2: 1}[tgt]
        for tap in range(9):
            for v in range(vectors):
                load = f"cg_load_{dtype}(wr + {tap * lanes * width + v * lanes} + ic * {width})"
                assert load in tile, (dtype, tap, v)
            for line in range(lines):
                fetch = f"cg_prefetch(wr + {tap * lanes * width + ahead + line * 64 // dense3.itemsize} + ic * {width})"
                assert fetch in tile, (dtype, tap, line)
        assert tile.count("cg_prefetch(") == 9 * lines


@pytest.mark.parametrize("tgt", [AVX512, AVX2])
def test_channel_vector_tiles_keep_their_weights_in_registers(env, tgt):
    """Every channel-vector tile (wide, narrow and row pairs, forward and input gradient)
    pins each weight vector it loads in a register (cg_in_register) right after the loads,
    so gcc cannot fold the load into each of the tile's multiply-adds instead."""
    specs = table.build_specs(tgt)
    for direction, template in (("fwd", "conv2d_fwd.pyx.j2"), ("bwd_data", "conv2d_bwd_data.pyx.j2")):
        for dtype in ("f32", "f64"):
            text = render.render(template, context.module_context(direction, dtype, specs), env)
            starts = [m.start() for m in re.finditer(r"cdef inline void \w+_c\d+x\d+_\w+\(", text)]
            assert len(starts) >= 4, (direction, dtype)
            for start in starts:
                tile = text[start:text.find("\ncdef ", start + 1)]
                # (the loads in the reduction; the bias loads before it are not reused)
                loads = [line.strip() for line in tile.splitlines() if line.lstrip().startswith("w_")
                         and "= cg_load_" in line and "a.bp" not in line]
                assert loads, tile[:120]
                for load in loads:
                    var = load.split(" = ")[0]
                    after = tile[tile.index(load):]
                    block = after[:after.index("cg_fma_")]
                    assert f"cg_in_register({var})" in block, (direction, dtype, tile[:80], var)


def test_pixel_tiles_keep_the_reduction_strides_in_locals_up_to_a_kernel_size(env):
    """The pixel tiles of kernels of up to LOCAL_STRIDES_MAX_TAPS taps (and the generic
    ones) step through the reduction with strides read once into locals; larger kernels
    (the 7x7 stem's) read them from the arguments in the loop, as before."""
    specs = table.build_specs(AVX512)
    text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", "f32", specs), env)
    for spec in specs:
        if spec.direction != "fwd" or spec.dtype != "f32" or spec.groups != "dense":
            continue
        tile = text[text.index(f"cdef inline void _{spec.name}_t"):]
        tile = tile[:tile.index("\ncdef ")]
        local = spec.kernel == ANY or spec.kernel ** 2 <= context.LOCAL_STRIDES_MAX_TAPS
        assert ("xr = xc + r * x_chan" in tile) == local and ("xr = xc + r * a.x_chan" in tile) != local, spec.name
    assert context.LOCAL_STRIDES_MAX_TAPS < 49   # (the stem's 7x7 keeps the old loop)


def test_channel_vector_row_pairs_only_in_float32_forward(env):
    """The f32 forward's channel-vector tiles have row-pair twins (the 6- and 7-pixel
    twins, two rows; 8 would need every register): the second row broadcasts from xr2, a flat row on,
    and keeps its partial sums in part2; the item runs them where a.pairs says so.
    Nothing else has them."""
    for s in SPECS:
        want = [6, 7] if (s.cvec_tile and s.direction == "fwd" and s.dtype == "f32") else []
        assert s.cvec_pairs == want, s.name
    text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", "f32", SPECS), env)
    dense3 = KernelSpec("fwd", "f32", 3, 1, 1, "dense")
    fn = f"_{dense3.name}_c{dense3.cvec_tile[0]}x{dense3.cvec_tile[1]}"
    for n in dense3.cvec_pairs:
        tile = text[text.index(f"cdef inline void {fn}_pair{n}("):]
        tile = tile[:tile.index("\ncdef ")]
        assert "xr2 = xr + a.width * 16" in tile and "part2 = part + a.row_tiles * " in tile
        assert f"a_{n - 1}_1, w_1, xr[o + ic + {(n - 1) * 16}])" in tile
        assert f"a_{n}_0, w_0, xr2[o + ic + 0])" in tile and f"a_{2 * n - 1}_1, w_1, xr2[o + ic + {(n - 1) * 16}])" in tile
        assert f"a_{2 * n}_0" not in tile
        assert f"cg_load_f32(part2 + {(n - 1) * 32 + 16})" in tile
    item = text[text.index(f"cdef void {fn}_item("):]
    item = item[:item.index("\ncdef ")]
    assert "if a.pairs != NULL and a.pairs[chunk]:" in item and f"{fn}_pair7(a, " in item and f"{fn}_pair6(a, " in item
    for direction, dtype in (("fwd", "f64"), ("bwd_data", "f32")):
        text = render.render(f"conv2d_{direction}.pyx.j2", context.module_context(direction, dtype, SPECS), env)
        assert "_pair7(" not in text and "a.pairs[chunk]" not in text


def test_in_place_tail_tiles_only_for_pointwise_forward(env):
    """Dense 1x1 stride-1 forward kernels (and nothing else) list themselves in IN_PLACE
    and have, for each pixel tile, a twin loading at most a.x_valid pixels of a plane
    (masked loads, counts fixed before the reduction), which their items run for a
    plane's last chunks, and dot products for the tile's rows at the pixels past its
    chunks (a.left_n), which their items run after a plane's last chunk."""
    for s in SPECS:
        want = s.direction == "fwd" and s.groups == "dense" and s.kernel == 1 and s.stride == 1
        assert s.in_place == want and context.kernel_context(s)["in_place"] == want, s.name
    assert any(s.in_place for s in SPECS)
    for s in SPECS:   # (python -m codegen lists them)
        assert ("masked twins and dot products (input in place)" in s.other_tiles) == s.in_place, s.name
    for dtype in ("f32", "f64"):
        text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", dtype, SPECS), env)
        pointwise = KernelSpec("fwd", dtype, 1, 1, 1, "dense")
        table_text = text[text.index("IN_PLACE = ("):]
        assert table_text[:table_text.index(")")].split() == ["IN_PLACE", "=", "(", f'"{pointwise.name}",']
        lanes = pointwise.lanes
        for rows, cols in pointwise.tiles:
            fn = f"_{pointwise.name}_t{rows}x{cols}"
            twin = text[text.index(f"cdef inline void {fn}_tail_tile("):]
            twin = twin[:twin.index("\ncdef ")]
            for v in range(cols):
                assert f"cdef int n_{v} = <int>max(0, min({lanes}, a.x_valid - q0 - {v * lanes}))" in twin
                assert f"x_{v} = cg_load_partial_{dtype}(xr + o + {v * lanes}, n_{v})" in twin
            assert f"cg_load_{dtype}(xr" not in twin
            tile = text[text.index(f"cdef inline void {fn}_tile("):]
            tile = tile[:tile.index("\ncdef ")]
            assert "cg_load_partial" not in tile
            # Each channel prefetches its chunk's cache lines IN_PLACE_PREFETCH_CHANNELS
            # channels ahead (the first value of each line and the chunk's last); its masked
            # twin, a plane's last chunk, does not.
            ahead, per_line = context.IN_PLACE_PREFETCH_CHANNELS, 64 // pointwise.itemsize
            lines = [*range(0, cols * lanes, per_line), cols * lanes - 1]
            assert [f"cg_prefetch(xr + o + {v} + {ahead} * x_chan)" for v in lines] == [
                line.strip() for line in tile.splitlines() if "cg_prefetch(" in line]
            assert "cg_prefetch(" not in twin
            item = text[text.index(f"cdef void {fn}_item("):]
            item = item[:item.index("\ncdef ")]
            assert f"if (chunk + 1) * {cols * lanes} > a.x_valid:" in item and f"{fn}_tail_tile(a, " in item
            assert "if a.left_n > 0 and chunk == a.chunks - 1:" in item and f"{fn}_leftover(a, rest, ot)" in item
            dots = text[text.index(f"cdef void {fn}_leftover("):]
            dots = dots[:dots.index("\ncdef ")]
            assert f"cdef Py_ssize_t q0 = a.chunks * {cols * lanes}" in dots
            # (this pass's channels, from a.r0: whole vectors, then the rest masked)
            assert f"for c in range(a.r0, whole, {lanes}):" in dots
            for j in range(rows):   # (each row added to the earlier passes' sums, a repeated last row once)
                assert f"s_{j} = cg_fmav_{dtype}(s_{j}, xv, cg_load_{dtype}(w_{j} + c))" in dots
                assert f"s_{j} = cg_fmav_{dtype}(s_{j}, xv, cg_load_partial_{dtype}(w_{j} + whole, <int>n))" in dots
                assert f"y_{j}[l] = (y_{j}[l] if a.accumulate else b_{j}) + cg_hsum_{dtype}(s_{j})" in dots
                assert (f"if ot * {rows} + {j} < a.O:" in dots) == (j > 0)
            assert f"s_{rows} " not in dots
        assert text.count("_tail_tile(") == 2 * len(pointwise.tiles)   # (each defined and called once)
        assert text.count("_leftover(a, ") == len(pointwise.tiles) and text.count("_copy_leftover(a.x") == 1
    for direction in ("fwd", "bwd_data"):
        text = render.render(f"conv2d_{direction}.pyx.j2", context.module_context(direction, "f32", SPECS), env)
        assert "a.x_valid = ANY_CHUNK" in text
        # (only the in-place tiles prefetch their input; the channel-vector tiles their weights)
        pointwise = KernelSpec("fwd", "f32", 1, 1, 1, "dense")
        lanes = pointwise.lanes
        prefetches = sum(len(range(0, cols * lanes, 16)) + 1 for _, cols in pointwise.tiles)
        assert text.count("cg_prefetch(xr + o + ") == (prefetches if direction == "fwd" else 0)
        if direction == "bwd_data":
            assert "_tail_tile(" not in text and "_leftover(a, " not in text and "IN_PLACE = (\n)" in text


def test_channel_block_tiles_only_for_fixed_depthwise_forward_and_gradients(env):
    """Depthwise forward kernels with every axis fixed get a channel-block tile (and a
    `_cblock` entry point); each multiply-add of a pixel reads the input column
    pixel * stride + kx * dilation of its tap row, once per tap.  So do stride-2
    input-gradient kernels: pixel j of a row of parity ra, left padding of parity e,
    gets every tap (ky, kx) of its parities once, from grad_output row (ra - ky) / 2
    and column (j + e - kx) / 2.  Weight-gradient kernels up to 5x5 keep every tap in a
    register, stored in groups of at most a vector's lanes."""
    for s in SPECS:
        ctx = context.kernel_context(s)
        grad = s.direction == "bwd_data" and s.stride == 2 and s.dilation == 1
        wgrad = s.direction == "bwd_weight" and s.kernel is not None and s.kernel <= 5
        expect = (s.direction == "fwd" or grad or wgrad) and s.groups == "depthwise" and not s.is_generic
        assert (ctx.get("channel_block") is not None) == expect, s.name
        if not expect:
            continue
        if wgrad:
            cb = ctx["channel_block"]
            assert [t["i"] for t in cb["taps"]] == list(range(s.kernel ** 2))
            groups = [[t["i"] for t in g["taps"]] for g in cb["tap_groups"]]
            assert sum(groups, []) == list(range(s.kernel ** 2)) and max(map(len, groups)) <= s.lanes
            assert all(g["start"] == g["taps"][0]["i"] for g in cb["tap_groups"])
            continue
        if grad:
            k, cb = s.kernel, ctx["channel_block"]
            for v in cb["variants"]:
                got = sorted((row["dy"], load["offset"], f["pixel"], f["tap"])
                             for row in v["tap_rows"] for load in row["loads"] for f in load["fmas"])
                want = sorted(((v["ra"] - ky) // 2, (j + v["e"] - kx) // 2 * s.lanes, j, ky * k + kx)
                              for ky in range(k) for kx in range(k) for j in cb["pixels"]
                              if (v["ra"] - ky) % 2 == 0 and (j + v["e"] - kx) % 2 == 0)
                assert got == want, (s.name, v["suffix"])
            continue
        cb, k = ctx["channel_block"], s.kernel
        assert cb["pixels"] == list(range(s.lanes)) and cb["weight_vectors"] % s.lanes == 0
        fmas = sorted((row["dy"], load["offset"], f["pixel"], f["tap"])
                      for row in cb["tap_rows"] for load in row["loads"] for f in load["fmas"])
        assert fmas == sorted((ky * s.dilation, (j * s.stride + kx * s.dilation) * s.lanes, j, ky * k + kx)
                              for ky in range(k) for kx in range(k) for j in range(s.lanes))
        for row in cb["tap_rows"]:   # each input vector is loaded once per tap row
            offsets = [load["offset"] for load in row["loads"]]
            assert len(offsets) == len(set(offsets))
    text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", "f32", SPECS), env)
    dw = KernelSpec("fwd", "f32", 3, 2, 1, "depthwise")
    assert f"def {dw.name}_cblock(" in text and f"cdef void _{dw.name}_cb16_item(" in text
    assert "cg_load_transposed_f32(" in text
    generic = KernelSpec("fwd", "f32", 3, ANY, ANY, "depthwise")
    assert f"def {generic.name}(" in text and f"def {generic.name}_cblock(" not in text
    text = render.render("conv2d_bwd_weight.pyx.j2", context.module_context("bwd_weight", "f64", SPECS), env)
    wg = KernelSpec("bwd_weight", "f64", 5, 1, 1, "depthwise")   # 25 taps: 4 transposed stores of <= 8
    assert f"def {wg.name}_cblock(" in text and f"cdef void _{wg.name}_cb8_item(" in text
    item = text[text.index(f"cdef void _{wg.name}_cb8_item("):text.index(f"def {wg.name}_cblock(")]
    assert item.count("cg_store_transposed_f64(") == 4 and item.count("cg_fmav_f64(") == 25
    assert "a_24 = cg_fmav_f64(a_24, g, cg_load_f64(xr + ow * 8 + o_24))" in item
    generic = KernelSpec("bwd_weight", "f64", ANY, ANY, ANY, "depthwise")
    assert f"def {generic.name}(" in text and f"def {generic.name}_cblock(" not in text
    # Dense weight gradients: one channel-vectorised tile per module, shared by every dense
    # kernel, run by two entry points (split over tiles, or over pixels into partial
    # gradients) that differ in grad_output's layout.
    dense = KernelSpec("bwd_weight", "f64", 1, 1, 1, "dense")
    tile = "cdef void _ocvec_tile("
    assert "def ocvec(" in text and "def ocvec_chunks(" in text
    # defined once, called by each entry point (ocvec through _ocvec_item, in bands through
    # _ocvec_band_item)
    assert text.count(tile) == 1 and text.count("_ocvec_tile(") == 3
    assert text.count("cdef void _ocvec_band_item(") == 1
    assert text.count("a_1_11 = cg_fma_f64(a_1_11, g_1, xs)") == 1
    shared = ("_ocvec_tile", "_ocvec_item", "_ocvec_band_item")
    assert "_ocvec" not in functools.reduce(lambda t, name: t.replace(name, ""), shared, text)   # no per-kernel copies
    # Its tile table's layout: the fields' order from codegen, their places in the tile
    # after the columns (12 of them), each tile's columns stored from its `store` field.
    assert f"OCVEC_FIELDS = {context.OCVEC_FIELDS!r}" in text
    columns = text[text.index("OCVEC_COLUMNS = {"):]
    columns = columns[:columns.index("}")]
    assert f'    "{dense.name}": 12,' in columns and f'"{wg.name}"' not in columns
    body = text[text.index(tile):text.index("def ocvec(")]
    assert "store = tile[13]" in body and "h0 = tile[14], h1 = tile[15]" in body
    assert "cg_store_transposed_inlined_f64(gw + (o0 + 8) * ncols + store + 8," in body
    # ... and two tiles vectorised over input channels (8 output channels x 3 columns, 3 x
    # 8), each column's window offset, store offset and the count of real ones from the
    # table, each called by icvec for its shape.
    assert "def icvec(" in text and "ICVEC_TILES = [(8, 3), (3, 8), ]" in text
    assert "dense_icvec" not in text   # (no per-kernel copies)
    for suffix, used, fmas, last in (("_8x3", 6, "a_7_2 = cg_fma_f64(a_7_2, v_2, g_7[ow])", "o_7 * row_len + tile[5]"),
                                     ("_3x8", 16, "a_2_7 = cg_fma_f64(a_2_7, v_7, g_2[ow])", "o_2 * row_len + tile[15]")):
        tile = f"cdef inline void _icvec{suffix}_tile("
        assert text.count(tile) == 1 and text.count(f"_icvec{suffix}_tile(") == 2
        body = text[text.index(tile):]
        body = body[:body.index("\n\n\n")]
        assert f"used = tile[{used}]" in body and body.count("cg_fma_f64(") == 24 and fmas in body
        assert f"cg_store_f64(part + {last}," in body
        # Per pixel the fewer side stays in registers: 8 x 3 loads its 3 columns' vectors
        # first, then broadcasts each row once; 3 x 8 loads a column at a time against the
        # rows' 3 broadcasts.  Each loaded vector is kept in a register (not folded into
        # every multiply-add as a memory operand).
        ncols = int(suffix.split("x")[1])
        loads = [body.index(f"v_{c} = cg_load_f64(x_{c} + ow * 8)") for c in range(ncols)]
        assert all(f"cg_in_register(v_{c})" in body for c in range(ncols))
        assert (max(loads) < body.index("= cg_fma_f64(")) == (suffix == "_8x3")


def test_render_dispatch_table_is_python(env):
    text = render.render("dispatch_table.py.j2", context.dispatch_context(SPECS), env)
    assert "DO NOT EDIT" in text and "dispatch_table.py.j2" in text
    namespace = {}
    exec(compile(text, "dispatch_table.py", "exec"), namespace)
    assert set(namespace["KERNELS"]) == {s.key for s in SPECS}


def test_render_is_strict_about_missing_values(env):
    ctx = context.module_context("fwd", "f32", SPECS)
    del ctx["ctype"]
    with pytest.raises(jinja2.UndefinedError):
        render.render(context.TEMPLATES["fwd"], ctx, env)


def test_render_small_table(env):
    """A one-kernel table renders a module with just that kernel (and its form with the
    padding fused in)."""
    only = [KernelSpec("fwd", "f32", ANY, ANY, ANY, "dense")]
    text = render.render("conv2d_fwd.pyx.j2", context.module_context("fwd", "f32", only), env)
    assert f"def {only[0].name}(" in text and f"def {only[0].name}_fused(" in text
    assert text.count("\ndef conv2d_") == 2


# ---- emit: files, written only when changed -------------------------------------

def test_write_if_changed(tmp_path):
    path = str(tmp_path / "sub" / "a.pyx")
    assert emit.write_if_changed(path, "x = 1\n") is True
    mtime = os.stat(path).st_mtime_ns
    assert emit.write_if_changed(path, "x = 1\n") is False
    assert os.stat(path).st_mtime_ns == mtime
    assert emit.write_if_changed(path, "x = 2\n") is True
    with open(path) as f:
        assert f.read() == "x = 2\n"
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.pyx"]   # no temporary left behind


def test_generated_files_and_write_all(tmp_path):
    files = emit.generated_files()
    modules = emit.extension_modules()
    assert {m for m, _, _ in modules} == {f"_{d}_{t}" for d in DIRECTIONS for t in DTYPES}
    assert set(files) >= {"__init__.py", "dispatch_table.py"} | {m + ".pyx" for m, _, _ in modules}
    for name, text in files.items():
        head = "\n".join(text.splitlines()[:6])
        assert "DO NOT EDIT" in head, name
        if name.endswith(".pyx"):
            assert "from templates/" in head and ".j2" in head, name
    written = emit.write_all(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(files)
    for name, text in files.items():
        with open(tmp_path / name) as f:
            assert f.read() == text
    assert emit.write_all(str(tmp_path)) == []
    # Touch one file: only it is rewritten.
    (tmp_path / "dispatch_table.py").write_text("# stale\n")
    assert emit.write_all(str(tmp_path)) == [str(tmp_path / "dispatch_table.py")]


def test_generated_files_are_deterministic():
    assert emit.generated_files() == emit.generated_files()


# ---- python -m codegen --------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "codegen", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_list():
    out = _cli("--list")
    assert out.returncode == 0, out.stderr
    for s in BUILT:
        assert s.name in out.stdout
    assert f"{len(BUILT)} kernels in {len(emit.extension_modules())} modules" in out.stdout
    assert _cli().stdout == out.stdout   # --list is the default


def test_cli_files_and_show():
    out = _cli("--files")
    assert out.returncode == 0 and "_fwd_f32.pyx" in out.stdout and "dispatch_table.py" in out.stdout
    out = _cli("--show", "_bwd_data_f64.pyx")
    assert out.returncode == 0
    assert out.stdout == emit.generated_files()["_bwd_data_f64.pyx"]
    bad = _cli("--show", "nope.pyx")
    assert bad.returncode == 2 and "nope.pyx" in bad.stderr


def test_transposed_store_helper_in_header():
    """The channel-vectorised weight gradient stores through cg_store_transposed_*,
    in groups of at most one vector's lanes of columns."""
    for dtype in DTYPES:
        text = render.render("conv2d_bwd_weight.pyx.j2", context.module_context("bwd_weight", dtype, SPECS))
        assert f"cg_store_transposed_{dtype}(" in text
        for s in SPECS:
            ctx = context.kernel_context(s)
            if ctx.get("ocvec"):
                groups = ctx["ocvec"]["col_groups"]
                assert all(len(g["cols"]) <= s.lanes for g in groups)
                assert sum(len(g["cols"]) for g in groups) == len(ctx["ocvec"]["cols"])


def test_weight_gradient_forms_of_dense_kernels_only():
    """Only dense weight-gradient specs have the channel-vectorised forms; the module
    context gives each once."""
    for s in SPECS:
        dense_wgrad = s.direction == "bwd_weight" and s.groups == "dense"
        assert (s.ocvec_tile is not None) == dense_wgrad and bool(s.icvec_tiles) == dense_wgrad
    ctx = context.module_context("bwd_weight", "f32", SPECS)
    assert [(len(t["rows"]), len(t["cols"]), t["used"]) for t in ctx["icvec"]] == [(8, 3, 6), (3, 8, 16)]
    for t in ctx["icvec"]:   # (per pixel: each column loaded once, each multiply-add after its load)
        steps = [(st.get("row"), st["col"]) for st in t["steps"]]
        nrows, ncols = len(t["rows"]), len(t["cols"])
        assert sorted(steps, key=repr) == sorted([(None, c) for c in range(ncols)]
                                                 + [(j, c) for j in range(nrows) for c in range(ncols)], key=repr)
        assert all(steps.index((None, c)) < steps.index((j, c)) for j in range(nrows) for c in range(ncols))
        # (the fewer side held per pixel: fewer columns load every vector first, fewer rows
        # load each vector just before its rows' multiply-adds)
        if ncols < nrows:
            assert steps[:ncols + 1] == [(None, c) for c in range(ncols)] + [(0, 0)]
        else:
            assert steps[:nrows + 2] == [(None, 0)] + [(j, 0) for j in range(nrows)] + [(None, 1)]
    assert [c["s"] for c in ctx["icvec"][0]["cols"]] == [3, 4, 5]
    assert context.module_context("bwd_data", "f32", SPECS)["icvec"] is None


def test_weight_gradient_module_shares_one_ocvec_tile():
    """The dense weight gradients of a module share one channel-vectorised tile: the
    context gives it once, and refuses kernels whose tiles differ."""
    ctx = context.module_context("bwd_weight", "f32", SPECS)
    dense = [k for k in ctx["kernels"] if k["ocvec"]]
    assert len(dense) > 1 and all(k["ocvec"] == ctx["ocvec"] for k in dense)
    assert context.module_context("fwd", "f32", SPECS)["ocvec"] is None
    odd = dict(dense[0], ocvec=dict(dense[0]["ocvec"], width=1))
    with pytest.raises(ValueError, match="share one ocvec tile"):
        context._shared([odd, dense[1]], "ocvec")


def test_depthwise_weight_gradients_sum_the_bias(env):
    """Depthwise weight-gradient kernels (and only they) sum the bias gradient in their
    pixel loop: the context says so, their items add grad_output's rows into float64
    sums, and the module lists them in BIAS_SUMS."""
    for s in SPECS:
        if s.direction == "bwd_weight":
            assert context.kernel_context(s)["bias_sums"] == (s.groups == "depthwise"), s.name
    text = render.render("conv2d_bwd_weight.pyx.j2", context.module_context("bwd_weight", "f32", SPECS), env)
    summing = [s.name for s in SPECS if s.direction == "bwd_weight" and s.dtype == "f32" and s.groups == "depthwise"]
    listed = text.split("BIAS_SUMS = (")[1].split(")")[0]
    assert sorted(n.strip().strip('",') for n in listed.split() if n.strip()) == sorted(summing)
    for s in SPECS:
        if s.direction == "bwd_weight" and s.dtype == "f32":
            item = text.split(f"cdef inline void _{s.name}_item(")[1].split("\ncdef ")[0]
            assert ("cg_wide_add_f32(&bias_0, row_0)" in item) == (s.groups == "depthwise"), s.name


# ---- targets: the vector unit sizes the tiles --------------------------------------

def _registers_needed(s):
    """Vector registers the largest of s's register tiles keeps live: its accumulators, plus
    the operands one multiply-add step holds (a broadcast and the smaller side's vectors)."""
    needs = [r * c + min(r, c) + 1 for r, c in s.tiles]
    if s.cvec_tile:
        pixels, vectors = s.cvec_tile
        needs += [pixels * vectors + vectors + 1] + [2 * n * vectors + vectors + 1 for n in s.cvec_pairs]
    if s.ocvec_tile:
        vectors, cols = s.ocvec_tile
        needs.append(vectors * cols + vectors + 1)
    needs += [r * c + min(r, c) + 1 for r, c in s.icvec_tiles]
    needs += [r * v + v + 1 for r, v in s.row_blocks]
    if s.channel_block and s.direction == "bwd_weight":
        needs.append(s.channel_block[1] + 2)   # (a sum per tap, a vector of each operand)
    return max(needs)


@pytest.mark.parametrize("tgt", [AVX512, AVX2, BASELINE], ids=lambda t: t.name)
def test_tiles_fit_the_targets_registers(tgt):
    specs = table.validate(table.build_specs(tgt))
    assert {s.target for s in specs} == {tgt}
    for s in specs:
        assert s.lanes == tgt.vector_bytes // {"f32": 4, "f64": 8}[s.dtype]
        assert _registers_needed(s) <= tgt.registers, (s.name, s.tiles, s.cvec_tile)
    # AVX2's tiles are the smaller ones (16 registers), and its modules are generated for its lanes.
    if tgt is AVX2:
        dense3 = next(s for s in specs if s.key == ("fwd", "f32", 3, 1, 1, "dense"))
        assert dense3.tile == (6, 2) and dense3.cvec_tile == (6, 2) and max(dense3.cvec_narrow) < 6
        ctx = context.module_context("fwd", "f32", specs)
        assert ctx["lanes"] == 8 and ctx["target"] == "avx2"
        assert context.dispatch_context(specs)["vector_bytes"] == 32


def test_build_target_follows_the_compiler(monkeypatch):
    assert target.target_for_macros({"__AVX512F__", "__AVX2__", "__AVX__"}) is AVX512
    assert target.target_for_macros({"__AVX__", "__AVX2__", "__FMA__"}) is AVX2
    assert target.target_for_macros({"__SSE2__"}) is BASELINE and target.target_for_macros(set()) is BASELINE
    monkeypatch.setenv("CONVGEN_TARGET", "avx2")
    assert target.build_target() is AVX2
    monkeypatch.setenv("CONVGEN_TARGET", "sse")
    with pytest.raises(ValueError, match="CONVGEN_TARGET"):
        target.build_target()


def test_debug_builds_keep_what_a_release_build_drops(monkeypatch):
    # A release build: no debug information, no .pyx lines copied into the C as comments
    # (two thirds of the generated C's bytes); CONVGEN_DEBUG=1 keeps both.
    monkeypatch.delenv("CONVGEN_DEBUG", raising=False)
    assert "-g0" in target.compile_args() and target.cython_directives() == {"emit_code_comments": False}
    monkeypatch.setenv("CONVGEN_DEBUG", "1")
    assert "-g0" not in target.compile_args() and target.cython_directives() == {"emit_code_comments": True}


def test_spec_table_has_one_target():
    with pytest.raises(ValueError, match="mixes targets"):
        specs = table.build_specs(AVX512)
        table.validate([dataclasses.replace(specs[0], target=AVX2)] + specs[1:])
