# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Layout passes around the generated kernels (hand-written, O(size of a tensor)).

* pad_phase:   input -> padded, stride-phase-split planes the kernels read (all four
               padding modes; every kernel load is then contiguous and in bounds).
* extend:      grad_output -> rows of a wider grid with a zero border (what the
               input-gradient and weight-gradient kernels read).
* fold_phases: input gradient on the padded phase planes -> gradient of the input,
               adding what padding copied back into its source pixels.
* windows:     input <-> its non-overlapping windows as channels (layers that run as
               1x1 layers: see convgen._engine.patch_pointwise).
* threads:     OpenMP thread count, and the denormal mode the kernels' threads run in.

The arrays come validated and C-contiguous from convgen._engine, so these take raw
pointers (no buffer acquisition: this is on the path of every small call too).
"""

from cython.parallel cimport prange
from libc.string cimport memcpy, memset
cimport numpy as cnp
cimport openmp

cnp.import_array()

cdef extern from "convgen_simd.h" nogil:
    # (the width the kernels were generated for: see codegen.target)
    const int CG_VECTOR_BYTES
    const int CG_LANES_F32
    const int CG_LANES_F64
    ctypedef struct cg_vf32:
        pass
    ctypedef struct cg_vf64:
        pass
    cg_vf32 cg_load_f32(const float* p)
    cg_vf64 cg_load_f64(const double* p)
    cg_vf32 cg_load_partial_f32(const float* p, int n)
    cg_vf64 cg_load_partial_f64(const double* p, int n)
    cg_vf32 cg_splat_f32(float a)
    cg_vf64 cg_splat_f64(double a)
    cg_vf32 cg_fma_f32(cg_vf32 acc, cg_vf32 x, float w)
    cg_vf64 cg_fma_f64(cg_vf64 acc, cg_vf64 x, double w)
    float cg_hsum_f32(cg_vf32 v)
    double cg_hsum_f64(cg_vf64 v)
    void cg_add_widened_f32(cg_vf64* lo, cg_vf64* hi, cg_vf32 v)
    void cg_store_f32(float* p, cg_vf32 v)
    void cg_store_f64(double* p, cg_vf64 v)
    void cg_store_partial_f32(float* p, cg_vf32 v, int n)
    void cg_store_partial_f64(double* p, cg_vf64 v, int n)
    void cg_load_transposed_f32(const float* src, Py_ssize_t stride, int n_rows, int n_cols, cg_vf32* out)
    void cg_load_transposed_f64(const double* src, Py_ssize_t stride, int n_rows, int n_cols, cg_vf64* out)
    void cg_copy_f32(float* dst, const float* src, Py_ssize_t n)
    void cg_copy_over_f32(float* dst, const float* src, Py_ssize_t n)
    void cg_copy_over_f64(double* dst, const double* src, Py_ssize_t n)
    void cg_copy_f64(double* dst, const double* src, Py_ssize_t n)
    int cg_nonfinite_f32(const float* p, Py_ssize_t n)
    void cg_deinterleave_f32(float* even, float* odd, const float* src, Py_ssize_t n)
    void cg_deinterleave_f64(double* even, double* odd, const double* src, Py_ssize_t n)
    int cg_nonfinite_f64(const double* p, Py_ssize_t n)

ctypedef fused real:
    float
    double

# Whether zero padding at stride 1 takes _pad_zero_s1 (see use_pad_zero_s1).
cdef bint _pad_zero_s1_on = True


def use_pad_zero_s1(bint on):
    """Switch _pad_zero_s1 on or off (for A/B runs and tests); returns the old setting."""
    global _pad_zero_s1_on
    old = _pad_zero_s1_on
    _pad_zero_s1_on = on
    return old


# Bytes of one vector, as compiled (convgen._dispatch checks it against the kernels').
VECTOR_BYTES = CG_VECTOR_BYTES

# Padding modes, as codes (see convgen._engine.PADDING_MODES).
cdef enum:
    ZEROS = 0
    REFLECT = 1
    REPLICATE = 2
    CIRCULAR = 3


cdef struct WindowPlan:
    Py_ssize_t H, W, OH, OW, KH, KW, sh, sw, dh, dw


cdef inline Py_ssize_t source_index(Py_ssize_t i, Py_ssize_t n, int mode) noexcept nogil:
    """Index into a dimension of size n that padded position i copies, or -1 for a zero."""
    if 0 <= i < n:
        return i
    if mode == ZEROS:
        return -1
    if mode == REFLECT:
        if n == 1:
            return 0
        while i < 0 or i >= n:
            if i < 0:
                i = -i
            if i >= n:
                i = 2 * (n - 1) - i
        return i
    if mode == REPLICATE:
        return 0 if i < 0 else n - 1
    i = i % n  # circular
    return i + n if i < 0 else i


def has_nonfinite(cnp.ndarray a):
    """Whether the C-contiguous float32 or float64 array a holds an infinity or a NaN
    (no temporary, no floating-point warnings)."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        return bool(cg_nonfinite_f32(<const float*>cnp.PyArray_DATA(a), n))
    return bool(cg_nonfinite_f64(<const double*>cnp.PyArray_DATA(a), n))


def source_indices(Py_ssize_t start, Py_ssize_t count, Py_ssize_t n, int mode, Py_ssize_t step=1):
    """Source index of padded positions start, start+step, ... (-1 where zero)."""
    out = cnp.PyArray_EMPTY(1, [count], cnp.NPY_INTP, 0)
    cdef Py_ssize_t* p = <Py_ssize_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t i
    for i in range(count):
        p[i] = source_index(start + i * step, n, mode)
    return out


cdef inline void* _ptr(cnp.ndarray a) noexcept:
    return cnp.PyArray_DATA(a)


cdef inline int _nonfinite(const real* p, Py_ssize_t n) noexcept nogil:
    """1 if p[0:n] holds an infinity or a NaN: an all-ones exponent, found with an
    integer max over the exponent bits (which gcc vectorises; a float test does not).
    (convgen_simd.h's cg_nonfinite, the same test with AVX-512 intrinsics, measured
    slower here, after the long rows' copy: 64 channels at 56x56 padded in 66 us against
    56, one thread; short rows use it.)"""
    cdef Py_ssize_t j
    cdef unsigned int m32 = 0
    cdef unsigned long long m64 = 0
    if real is float:
        for j in range(n):
            m32 = max(m32, (<const unsigned int*>p)[j] & 0x7f800000u)
        return m32 == 0x7f800000u
    else:
        for j in range(n):
            m64 = max(m64, (<const unsigned long long*>p)[j] & 0x7ff0000000000000ull)
        return m64 == 0x7ff0000000000000ull


cdef inline int _pad_channel(const real* x, real* xin, const PadPlan* pp, bint check=True) noexcept nogil:
    """_pad_rows of all of a channel's rows, checking the whole channel at once: one pass
    over contiguous values rather than a partial vector per short row (7x7 maps).  (Not
    measured apart: the training forward of MobileNetV2's 960 channels at 7x7, half of it
    padding, came out the same with the rest of a88e3e4.)  Pixels that no plane reads
    are checked too: an infinity there only sends the weight gradient down its exact
    path."""
    cdef int bad = _nonfinite(x, pp.H * pp.W) if check else 0
    if _whole_rows(pp, CG_LANES_F32 if real is float else CG_LANES_F64):
        _pad_zero_s1(x, xin, pp)
        return bad
    return _pad_rows(x, xin, pp, 0, pp.Hq, True, False) | bad


cdef inline bint _whole_rows(const PadPlan* pp, Py_ssize_t lanes) noexcept nogil:
    """Whether a channel is padded by _pad_zero_s1: zero padding at stride 1 (switched on),
    in planes with a vector of `lanes` values' room past their last row."""
    return pp.zero_s1 and _pad_zero_s1_on and pp.plane_len >= pp.Hq * pp.We + lanes


cdef inline void _copy_whole(real* dst, const real* src, Py_ssize_t n) noexcept nogil:
    """n values by whole vectors, reading and writing up to a vector past them."""
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64, i = 0
    while i < n:
        if real is float:
            cg_store_f32(dst + i, cg_load_f32(src + i))
        else:
            cg_store_f64(dst + i, cg_load_f64(src + i))
        i = i + lanes


cdef inline void _zeros(real* p, Py_ssize_t n, bint over) noexcept nogil:
    """p[0:n] = 0 by whole vectors; over: the last one whole too, writing up to a vector
    past p + n (which the caller rewrites after), else value by value."""
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64, i = 0
    if real is float:
        while i + lanes <= n or (over and i < n):
            cg_store_f32(p + i, cg_splat_f32(0))
            i = i + lanes
    else:
        while i + lanes <= n or (over and i < n):
            cg_store_f64(p + i, cg_splat_f64(0))
            i = i + lanes
    while i < n:
        p[i] = 0
        i = i + 1


cdef inline void _pad_zero_s1(const real* x, real* xin, const PadPlan* pp) noexcept nogil:
    """_pad_rows of a whole channel padded with zeros at stride 1 (PadPlan.zero_s1): the
    zeros before its first row, then each row whole and the zeros between it and the next
    (the right padding and the next row's left padding) as whole vectors, each writing past
    its end what the next one rewrites; rows with a vector's worth of the channel after them
    read whole vectors too, a masked load only near the channel's end (a 7x7 map's rows
    spent a fifth of the table-driven padding on their masked loads).  The zeros after the
    last row end exactly at the plane's end."""
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64
    cdef Py_ssize_t H = pp.H, W = pp.W, We = pp.We, gap = pp.We - pp.W, i
    cdef Py_ssize_t whole = (W + lanes - 1) // lanes * lanes   # (a row's values, in whole vectors)
    cdef const real* s = x
    cdef real* d = xin + pp.top * We + pp.left
    _zeros(xin, pp.top * We + pp.left, True)
    for i in range(H):
        if (H - i) * W >= whole:   # (the channel's values reach past the row's last vector)
            _copy_whole(d, s, W)
        else:
            _copy(d, s, W, True)
        if i < H - 1:
            _zeros(d + W, gap, True)
        s = s + W
        d = d + We
    _zeros(d - We + W, pp.plane_len - (pp.top + H - 1) * We - pp.left - W, False)


cdef inline int _pad_rows(const real* x, real* xin, const PadPlan* pp, Py_ssize_t i0, Py_ssize_t i1,
                          bint tail, bint check=True) noexcept nogil:
    """One channel: x (H, W) -> rows [i0, i1) of its padded phase planes at xin, and
    with `tail` the zeros past each plane's last row.  Plain loops rather
    than memcpy/memset: rows are often short (7x7 maps), where a call costs more
    than the copy.  Returns 1 if the planes hold an infinity or a NaN (the weight
    gradient then takes its exact path; check=False: 0, unchecked, for planes that
    no weight gradient reads); checking the unpadded middles suffices, as padding
    only repeats pixels that some middle also copies.  Rows outermost: each source
    row is read from memory once, for all of its phases."""
    cdef Py_ssize_t a, b, i, j, r, s, n, We = pp.We, sw = pp.sw, Hq = pp.Hq
    cdef int bad = 0
    cdef bint split
    cdef real* dst
    cdef const real* src
    cdef const Py_ssize_t* cb
    cdef const Py_ssize_t* lo = pp.interior   # (lo[2 * b], lo[2 * b + 1]: phase b's [lo, hi))
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64
    for i in range(i0, i1):
        for a in range(pp.sh):
            r = pp.rows[a * Hq + i]
            dst = xin + a * sw * pp.plane_len + i * We   # (phase b's row: b * plane_len on)
            if r < 0:
                for b in range(sw):
                    for j in range(We):
                        dst[b * pp.plane_len + j] = 0
                continue
            src = x + r * pp.W
            if check:
                # (The check reads the source row, once for all its phases, before the copies:
                # reading back the values just stored stalls on store forwarding, and loads
                # after AVX2's masked stores wait for them.)
                if sw == 1 and lo[1] > lo[0]:
                    bad |= _nonfinite_row(src + pp.cols[lo[0]], lo[1] - lo[0])
                else:
                    bad |= _nonfinite_row(src, pp.W)
            # The middles: plain copies, or at stride 2 both phases in one pass where they
            # take alternate source columns (zero, replicate and circular padding do).
            split = (sw == 2 and lo[1] > lo[0] and lo[1] - lo[0] == lo[3] - lo[2]
                     and pp.cols[We + lo[2]] - pp.cols[lo[0]] in (1, -1))
            if split:
                n = lo[1] - lo[0]
                if pp.cols[lo[0]] < pp.cols[We + lo[2]]:
                    _deinterleave(dst + lo[0], dst + pp.plane_len + lo[2], src + pp.cols[lo[0]], n)
                else:
                    _deinterleave(dst + pp.plane_len + lo[2], dst + lo[0], src + pp.cols[We + lo[2]], n)
            for b in range(sw):
                cb = pp.cols + b * We
                n = lo[2 * b + 1] - lo[2 * b]
                if not split and n > 0:   # (an empty middle's start may be past the tables)
                    if sw == 1:
                        # (the rest of this row and the call's next rows are written after it)
                        _copy(dst + lo[0], src + cb[lo[0]], n, lo[1] + lanes - 1 <= We * (i1 - i))
                    else:
                        for j in range(n):
                            dst[b * pp.plane_len + lo[2 * b] + j] = src[cb[lo[2 * b]] + j * sw]
                for j in range(lo[2 * b]):
                    s = cb[j]
                    dst[b * pp.plane_len + j] = src[s] if s >= 0 else 0
                for j in range(lo[2 * b + 1], We):
                    s = cb[j]
                    dst[b * pp.plane_len + j] = src[s] if s >= 0 else 0
    if tail:
        for a in range(pp.sh):
            for b in range(sw):
                dst = xin + (a * sw + b) * pp.plane_len + Hq * We
                for j in range(pp.plane_len - Hq * We):
                    dst[j] = 0
    return bad


cdef inline void _copy(real* dst, const real* src, Py_ssize_t n, bint over) noexcept nogil:
    """n values, in vectors (gcc's loop copies short rows, 7x7 and 14x14 maps', one value
    at a time, and costs its alias checks on longer ones).  over: the last, partial
    vector may write up to a vector past dst + n (see cg_copy_over)."""
    if real is float:
        if over:
            cg_copy_over_f32(dst, src, n)
        else:
            cg_copy_f32(dst, src, n)
    else:
        if over:
            cg_copy_over_f64(dst, src, n)
        else:
            cg_copy_f64(dst, src, n)


cdef inline int _nonfinite_row(const real* p, Py_ssize_t n) noexcept nogil:
    """_nonfinite, short rows (up to 16 values) by convgen_simd.h's vector test."""
    if n > 16:
        return _nonfinite(p, n)
    if real is float:
        return cg_nonfinite_f32(p, n)
    else:
        return cg_nonfinite_f64(p, n)


cdef inline void _deinterleave(real* even, real* odd, const real* src, Py_ssize_t n) noexcept nogil:
    if real is float:
        cg_deinterleave_f32(even, odd, src, n)
    else:
        cg_deinterleave_f64(even, odd, src, n)


cdef int pad_channel_f32(const float* src, float* dst, const PadPlan* pp, bint check) noexcept nogil:
    return _pad_channel(src, dst, pp, check)


cdef int pad_channel_f64(const double* src, double* dst, const PadPlan* pp, bint check) noexcept nogil:
    return _pad_channel(src, dst, pp, check)


cdef (bint, Py_ssize_t, Py_ssize_t) _zero_s1(const PadPlan* pp) noexcept:
    """Whether pp pads with zeros at stride 1, each input row whole (PadPlan.zero_s1; the
    room past the last row is checked per dtype), and where its first row goes."""
    cdef Py_ssize_t top = 0, left, i
    if pp.sh != 1 or pp.sw != 1 or pp.H < 1 or pp.W < 1:
        return False, 0, 0
    left = pp.interior[0]
    if pp.interior[1] - left != pp.W:
        return False, 0, 0
    while top < pp.Hq and pp.rows[top] < 0:
        top = top + 1
    if top + pp.H > pp.Hq:
        return False, 0, 0
    for i in range(pp.Hq):
        if pp.rows[i] != (i - top if top <= i < top + pp.H else -1):
            return False, 0, 0
    for i in range(pp.We):
        if pp.cols[i] != (i - left if left <= i < left + pp.W else -1):
            return False, 0, 0
    return True, top, left


cdef PadPlan pad_plan(cnp.ndarray rows, cnp.ndarray cols, cnp.ndarray interior, Py_ssize_t H,
                     Py_ssize_t W, Py_ssize_t plane_len):
    """The PadPlan of source tables rows (sh, Hq) / cols (sw, We) / interior (sw, 2) for
    an (H, W) channel into planes plane_len apart (the arrays must outlive it)."""
    cdef PadPlan pp
    pp.H, pp.W = H, W
    pp.sh, pp.sw = rows.shape[0], cols.shape[0]
    pp.Hq, pp.We = rows.shape[1], cols.shape[1]
    pp.plane_len = plane_len
    pp.rows = <Py_ssize_t*>_ptr(rows)
    pp.cols = <Py_ssize_t*>_ptr(cols)
    pp.interior = <Py_ssize_t*>_ptr(interior)
    pp.zero_s1, pp.top, pp.left = _zero_s1(&pp)
    return pp


def pads_whole_rows(cnp.ndarray rows, cnp.ndarray cols, cnp.ndarray interior, Py_ssize_t H, Py_ssize_t W,
                    Py_ssize_t plane_len, int itemsize):
    """Whether pad_phase (outside bands) pads these tables' planes by whole-row copies
    (_pad_zero_s1), for values of `itemsize` bytes."""
    cdef PadPlan pp = pad_plan(rows, cols, interior, H, W, plane_len)
    return bool(_whole_rows(&pp, CG_VECTOR_BYTES // itemsize))


def pad_phase(cnp.ndarray x, cnp.ndarray xin, cnp.ndarray rows, cnp.ndarray cols,
              cnp.ndarray interior, Py_ssize_t plane_len, int threads, cnp.ndarray band_rows=None,
              bint check=True):
    """xin[c, p * plane_len + i * We + j] = x[c, rows[a, i], cols[b, j]] (zero where -1)
    for phase p = a * sw + b; x is (N*C, H, W), rows (sh, Hq), cols (sw, We).
    interior (sw, 2): per column phase, the [lo, hi) of positions that copy the input
    itself (source cols[b, lo] + sw * (j - lo)), copied without the table.  The tail
    of each plane is zeroed.  band_rows (intp, bands + 1; see BandSplit): thread
    b pads the rows [band_rows[b], band_rows[b + 1]) of every plane.  Returns whether any
    value is infinite or NaN (check=False: False, unchecked, for planes that no weight
    gradient reads)."""
    cdef Py_ssize_t nc = x.shape[0], c
    cdef int bad = 0
    cdef PadPlan pp = pad_plan(rows, cols, interior, x.shape[1], x.shape[2], plane_len)
    cdef Py_ssize_t src_chan = pp.H * pp.W, dst_chan = pp.sh * pp.sw * plane_len
    cdef void* src = _ptr(x)
    cdef void* dst = _ptr(xin)
    cdef bint single = cnp.PyArray_ITEMSIZE(x) == 4
    cdef Py_ssize_t band, bands, tail_band
    cdef const Py_ssize_t* bounds
    if band_rows is not None:
        # Band b pads plane rows [band_rows[b], band_rows[b + 1]) of every channel on
        # thread b (static, one band each): the thread whose tiles then read those rows.
        bands = band_rows.shape[0] - 1
        bounds = <const Py_ssize_t*>_ptr(band_rows)
        tail_band = bands - 1
        for band in prange(bands, nogil=True, schedule="static", chunksize=1, num_threads=bands):
            for c in range(nc):
                if single:
                    bad += _pad_rows(<float*>src + c * src_chan, <float*>dst + c * dst_chan, &pp,
                                     bounds[band], bounds[band + 1], band == tail_band, check)
                else:
                    bad += _pad_rows(<double*>src + c * src_chan, <double*>dst + c * dst_chan, &pp,
                                     bounds[band], bounds[band + 1], band == tail_band, check)
        return bad > 0
    if threads == 1:  # a plain loop: no parallel region to open and join
        with nogil:
            for c in range(nc):
                if single:
                    bad += _pad_channel(<float*>src + c * src_chan, <float*>dst + c * dst_chan, &pp, check)
                else:
                    bad += _pad_channel(<double*>src + c * src_chan, <double*>dst + c * dst_chan, &pp, check)
    elif single:
        for c in prange(nc, nogil=True, schedule="dynamic", chunksize=1 + nc // (8 * threads), num_threads=threads):
            bad += _pad_channel(<float*>src + c * src_chan, <float*>dst + c * dst_chan, &pp, check)
    else:
        for c in prange(nc, nogil=True, schedule="dynamic", chunksize=1 + nc // (8 * threads), num_threads=threads):
            bad += _pad_channel(<double*>src + c * src_chan, <double*>dst + c * dst_chan, &pp, check)
    return bad > 0


cdef inline void _extend_range(const real* src, real* dst, Py_ssize_t H, Py_ssize_t W, Py_ssize_t width,
                               Py_ssize_t top, Py_ssize_t left, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """dst[lo:hi] of one channel's extended copy: src's row i from (i + top) * width + left
    on, zeros everywhere else."""
    # Plain loops, not memcpy/memset calls: rows are short (a call per 7-pixel row
    # costs more than its copy), and gcc vectorises these in place.
    cdef Py_ssize_t i, j, start, stop, first, end = lo   # everything in [lo, end) is written
    cdef const real* s
    cdef real* d
    for i in range(H):
        start = (i + top) * width + left
        if start >= hi:
            break
        stop = min(start + W, hi)
        if stop <= lo:
            continue
        first = max(start, lo)
        for j in range(end, first):
            dst[j] = 0
        s = src + i * W + (first - start)
        d = dst + first
        for j in range(stop - first):
            d[j] = s[j]
        end = stop
    for j in range(end, hi):
        dst[j] = 0


cdef inline void _extend_channel(const real* src, real* dst, Py_ssize_t H, Py_ssize_t W, Py_ssize_t L,
                                 Py_ssize_t width, Py_ssize_t top, Py_ssize_t left) noexcept nogil:
    # Values that would land at L or past it are left out: no kernel reads them (an input
    # gradient padded by more than its kernel's span never reads grad_output's last rows).
    _extend_range(src, dst, H, W, width, top, left, 0, L)


cdef void _extend(const real* g, real* gext, Py_ssize_t nc, Py_ssize_t H, Py_ssize_t W, Py_ssize_t L,
                  Py_ssize_t width, Py_ssize_t top, Py_ssize_t left, int threads,
                  const Py_ssize_t* bounds) noexcept nogil:
    cdef Py_ssize_t c, band
    if bounds != NULL:   # thread b: rows [bounds[b], bounds[b + 1]) of every channel
        for band in prange(threads, schedule="static", chunksize=1, num_threads=threads):
            for c in range(nc):
                _extend_range(g + c * H * W, gext + c * L, H, W, width, top, left, min(L, bounds[band] * width),
                              min(L, bounds[band + 1] * width))
        return
    if threads == 1:  # a plain loop: no parallel region to open and join
        for c in range(nc):
            _extend_channel(g + c * H * W, gext + c * L, H, W, L, width, top, left)
    else:
        for c in prange(nc, schedule="dynamic", chunksize=1 + nc // (8 * threads), num_threads=threads):
            _extend_channel(g + c * H * W, gext + c * L, H, W, L, width, top, left)


def extend(cnp.ndarray g, cnp.ndarray gext, Py_ssize_t width, Py_ssize_t top, Py_ssize_t left, int threads,
           cnp.ndarray band_rows=None):
    """gext[c, (i + top) * width + j + left] = g[c, i, j] where that is before L; zero
    everywhere else.  g is (channels, H, W), gext (channels, L).
    band_rows (intp, threads + 1, ending at ceil(L / width) or past it): thread b writes
    the rows (of `width` values) [band_rows[b], band_rows[b + 1]) of every channel."""
    cdef Py_ssize_t nc = g.shape[0], H = g.shape[1], W = g.shape[2], L = gext.shape[1]
    cdef void* src = _ptr(g)
    cdef void* dst = _ptr(gext)
    cdef const Py_ssize_t* bounds = NULL
    if band_rows is not None:
        bounds = <const Py_ssize_t*>_ptr(band_rows)
        threads = band_rows.shape[0] - 1
    if g.dtype.itemsize == 4:
        with nogil:
            _extend(<float*>src, <float*>dst, nc, H, W, L, width, top, left, threads, bounds)
    else:
        with nogil:
            _extend(<double*>src, <double*>dst, nc, H, W, L, width, top, left, threads, bounds)


cdef inline void _fold_interleaved(real* dst, const real* even, const real* odd, Py_ssize_t W,
                                   Py_ssize_t pad_left, bint once) noexcept nogil:
    """Stride 2: input column s of a row gets padded column s + pad_left, which is
    column (s + pad_left) // 2 of phase (s + pad_left) % 2.  Both phases in one pass
    over the row, so the adds vectorise (an interleave rather than strided stores).
    once: the row gets nothing else (zero padding), so the values are stored."""
    cdef Py_ssize_t m, half = pad_left // 2
    cdef const real* first
    cdef const real* second
    cdef Py_ssize_t c0, c1
    if pad_left % 2 == 0:
        first, c0, second, c1 = even, half, odd, half
    else:
        first, c0, second, c1 = odd, half, even, half + 1
    if once:
        for m in range(W // 2):
            dst[2 * m] = first[m + c0]
            dst[2 * m + 1] = second[m + c1]
        if W % 2:
            dst[W - 1] = first[W // 2 + c0]
        return
    for m in range(W // 2):
        dst[2 * m] += first[m + c0]
        dst[2 * m + 1] += second[m + c1]
    if W % 2:
        dst[W - 1] += first[W // 2 + c0]


cdef inline void _fold_channel(Py_ssize_t c, const real* gxph, real* gx, Py_ssize_t H, Py_ssize_t W,
                       const Py_ssize_t* rows, const Py_ssize_t* cols, const Py_ssize_t* interior,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t Hq, Py_ssize_t Wq, Py_ssize_t width,
                       Py_ssize_t out_len, Py_ssize_t pad_left, bint once) noexcept nogil:
    """once: each input pixel has one padded position (zero padding), so its
    gradient is stored there rather than summed into a zeroed channel."""
    cdef Py_ssize_t a, b, i, j, r, s, lo, hi
    cdef real* dst
    cdef real* mid
    cdef const real* src
    cdef const Py_ssize_t* cb
    if not once:
        for i in range(H * W):
            gx[c * H * W + i] = 0
    for a in range(sh):
        for b in range(sw):
            cb = cols + b * Wq
            lo = interior[2 * b]
            hi = interior[2 * b + 1]
            src = gxph + c * sh * sw * out_len + (a * sw + b) * out_len
            for i in range(Hq):
                r = rows[a * Hq + i]
                if r >= 0:
                    dst = gx + (c * H + r) * W
                    for j in range(lo):
                        s = cb[j]
                        if s >= 0:
                            dst[s] += src[j]
                    if sw == 1:  # the unpadded middle of the row: a vectorisable add
                        mid = dst + cb[lo] - lo
                        if once:
                            for j in range(lo, hi):
                                mid[j] = src[j]
                        else:
                            for j in range(lo, hi):
                                mid[j] += src[j]
                    elif sw == 2:
                        pass     # both column phases at once, below
                    elif once:
                        for j in range(lo, hi):
                            dst[cb[lo] + (j - lo) * sw] = src[j]
                    else:
                        for j in range(lo, hi):
                            dst[cb[lo] + (j - lo) * sw] += src[j]
                    for j in range(hi, Wq):
                        s = cb[j]
                        if s >= 0:
                            dst[s] += src[j]
                    if sw == 2 and b == 1:
                        _fold_interleaved(dst, src - out_len, src, W, pad_left, once)
                src = src + width


cdef void _fold_phases(const real* gxph, real* gx, Py_ssize_t nc, Py_ssize_t H, Py_ssize_t W,
                       const Py_ssize_t* rows, const Py_ssize_t* cols, const Py_ssize_t* interior,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t Hq, Py_ssize_t Wq, Py_ssize_t width,
                       Py_ssize_t out_len, Py_ssize_t pad_left, bint once, int threads) noexcept nogil:
    cdef Py_ssize_t c
    if threads == 1:  # a plain loop: no parallel region to open and join
        for c in range(nc):
            _fold_channel(c, gxph, gx, H, W, rows, cols, interior, sh, sw, Hq, Wq, width, out_len, pad_left,
                          once)
    else:
        for c in prange(nc, schedule="dynamic", chunksize=1 + nc // (8 * threads), num_threads=threads):
            _fold_channel(c, gxph, gx, H, W, rows, cols, interior, sh, sw, Hq, Wq, width, out_len, pad_left,
                          once)


cdef void extend_channel_f32(const float* src, float* dst, Py_ssize_t H, Py_ssize_t W, Py_ssize_t L,
                             Py_ssize_t width, Py_ssize_t top, Py_ssize_t left) noexcept nogil:
    _extend_channel(src, dst, H, W, L, width, top, left)


cdef void extend_channel_f64(const double* src, double* dst, Py_ssize_t H, Py_ssize_t W, Py_ssize_t L,
                             Py_ssize_t width, Py_ssize_t top, Py_ssize_t left) noexcept nogil:
    _extend_channel(src, dst, H, W, L, width, top, left)


cdef void fold_channel_f32(const float* gxph, float* gx, const FoldPlan* f) noexcept nogil:
    _fold_channel(0, gxph, gx, f.H, f.W, f.rows, f.cols, f.interior, f.sh, f.sw, f.Hq, f.Wq, f.width,
                  f.out_len, f.pad_left, f.once)


cdef void fold_channel_f64(const double* gxph, double* gx, const FoldPlan* f) noexcept nogil:
    _fold_channel(0, gxph, gx, f.H, f.W, f.rows, f.cols, f.interior, f.sh, f.sw, f.Hq, f.Wq, f.width,
                  f.out_len, f.pad_left, f.once)


def fold_phases(cnp.ndarray gxph, cnp.ndarray gx, cnp.ndarray rows, cnp.ndarray cols,
                cnp.ndarray interior, Py_ssize_t width, Py_ssize_t out_len, Py_ssize_t pad_left,
                bint once, int threads):
    """gx[c, rows[a, i], cols[b, j]] += gxph[c, p * out_len + i * width + j]: the adjoint
    of pad_phase, so padding's copies send their gradient back to the pixel they copied.
    gx is (channels, H, W); interior as for pad_phase; pad_left: the padding's left
    columns (stride 2 folds both column phases of a row together); once: zero padding,
    where each pixel has one source (stored, without zeroing gx first)."""
    cdef Py_ssize_t nc = gx.shape[0], H = gx.shape[1], W = gx.shape[2]
    cdef Py_ssize_t sh = rows.shape[0], sw = cols.shape[0], Hq = rows.shape[1], Wq = cols.shape[1]
    cdef const Py_ssize_t* pr = <Py_ssize_t*>_ptr(rows)
    cdef const Py_ssize_t* pc = <Py_ssize_t*>_ptr(cols)
    cdef const Py_ssize_t* pi = <Py_ssize_t*>_ptr(interior)
    cdef void* src = _ptr(gxph)
    cdef void* dst = _ptr(gx)
    if gx.dtype.itemsize == 4:
        with nogil:
            _fold_phases(<float*>src, <float*>dst, nc, H, W, pr, pc, pi, sh, sw, Hq, Wq, width, out_len, pad_left, once,
                         threads)
    else:
        with nogil:
            _fold_phases(<double*>src, <double*>dst, nc, H, W, pr, pc, pi, sh, sw, Hq, Wq, width, out_len, pad_left, once,
                         threads)


cdef void _transposed_row(const real* src, Py_ssize_t plane, Py_ssize_t C, Py_ssize_t W, real* dst,
                          Py_ssize_t Cp) noexcept nogil:
    """dst[j * Cp + c] = src[c * plane + j] for c < C, j < W: blocks of a vector's lanes
    of channels x as many pixels through an in-register transpose, each pixel's channels
    leaving as whole vectors (zeros past C up to the next multiple of the lanes)."""
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64
    cdef Py_ssize_t c0, j0, j, n
    cdef cg_vf32 c32[16]   # (room for the most lanes, AVX-512's)
    cdef cg_vf64 c64[8]
    c0 = 0
    while c0 < C:   # (a while loop: range() with a run-time step would be Python's)
        j0 = 0
        while j0 < W:
            n = min(lanes, W - j0)
            if real is float:
                cg_load_transposed_f32(src + c0 * plane + j0, plane, <int>min(lanes, C - c0), <int>n, c32)
                for j in range(n):
                    cg_store_f32(dst + (j0 + j) * Cp + c0, c32[j])
            else:
                cg_load_transposed_f64(src + c0 * plane + j0, plane, <int>min(lanes, C - c0), <int>n, c64)
                for j in range(n):
                    cg_store_f64(dst + (j0 + j) * Cp + c0, c64[j])
            j0 = j0 + lanes
        c0 = c0 + lanes


cdef void _transpose_strip(const real* src, real* dst, Py_ssize_t R, Py_ssize_t S, Py_ssize_t j0) noexcept nogil:
    """Rows j0 .. j0 + 2 * lanes - 1 (past S: none) of dst = src.T (src (R, S)): a cache
    line's width of src's columns, down src's rows, a block of lanes x lanes at a time
    through an in-register transpose (both of a line's blocks before the next rows: each
    line read once), each column stored as a whole vector along its row of dst (partial
    at the row's end)."""
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64
    cdef Py_ssize_t i0, j, jb, n, m
    cdef cg_vf32 c32[16]   # (room for the most lanes, AVX-512's)
    cdef cg_vf64 c64[8]
    i0 = 0
    while i0 < R:
        m = min(lanes, R - i0)
        jb = j0
        while jb < min(S, j0 + 2 * lanes):
            n = min(lanes, S - jb)
            if real is float:
                cg_load_transposed_f32(src + i0 * S + jb, S, <int>m, <int>n, c32)
                for j in range(n):
                    if m == lanes:
                        cg_store_f32(dst + (jb + j) * R + i0, c32[j])
                    else:
                        cg_store_partial_f32(dst + (jb + j) * R + i0, c32[j], <int>m)
            else:
                cg_load_transposed_f64(src + i0 * S + jb, S, <int>m, <int>n, c64)
                for j in range(n):
                    if m == lanes:
                        cg_store_f64(dst + (jb + j) * R + i0, c64[j])
                    else:
                        cg_store_partial_f64(dst + (jb + j) * R + i0, c64[j], <int>m)
            jb = jb + lanes
        i0 = i0 + lanes


cdef void _transpose(const real* src, real* dst, Py_ssize_t R, Py_ssize_t S, int threads) noexcept nogil:
    cdef Py_ssize_t strip = 2 * (CG_LANES_F32 if real is float else CG_LANES_F64)
    cdef Py_ssize_t strips = (S + strip - 1) // strip, k
    if threads == 1:  # a plain loop: no parallel region to open and join
        for k in range(strips):
            _transpose_strip(src, dst, R, S, k * strip)
    else:
        for k in prange(strips, schedule="static", num_threads=threads):
            _transpose_strip(src, dst, R, S, k * strip)


def transpose(cnp.ndarray src, cnp.ndarray dst, int threads):
    """dst = src.T for C-contiguous matrices src (R, S) and dst (S, R) of one dtype (a 1x1
    layer's weight, for its input gradient as a forward: 5-10x faster than NumPy's copy of
    a transposed view, which reads a column at a time)."""
    cdef Py_ssize_t R = src.shape[0], S = src.shape[1]
    cdef void* s = _ptr(src)
    cdef void* d = _ptr(dst)
    if src.dtype.itemsize == 4:
        with nogil:
            _transpose(<float*>s, <float*>d, R, S, threads)
    else:
        with nogil:
            _transpose(<double*>s, <double*>d, R, S, threads)


cdef void _copy_rows(const char* src, char* dst, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n,
                     Py_ssize_t width) noexcept nogil:
    """Rows [r0, r1) of copy_rows, in bytes."""
    cdef Py_ssize_t r
    for r in range(r0, r1):
        memcpy(dst + r * width, src + r * n, n)
        memset(dst + r * width + n, 0, width - n)


def copy_rows(cnp.ndarray src, cnp.ndarray dst, int threads):
    """dst[:, :L] = src and dst[:, L:] = 0, src (R, L) and dst (R, M >= L) C-contiguous of
    one dtype, each thread a run of rows (a training forward's copy of a 1x1 layer's input
    as the planes its weight gradient reads: pad_phase's row loop and infinity check cost
    3-10x a copy on 7x7 and 14x14 maps)."""
    cdef Py_ssize_t R = src.shape[0], n = src.nbytes // max(1, R), width = dst.nbytes // max(1, R), t
    cdef char* s = <char*>_ptr(src)
    cdef char* d = <char*>_ptr(dst)
    if threads == 1 or R < threads:
        with nogil:
            _copy_rows(s, d, 0, R, n, width)
        return
    for t in prange(threads, nogil=True, schedule="static", chunksize=1, num_threads=threads):
        _copy_rows(s, d, t * R // threads, (t + 1) * R // threads, n, width)


cdef void _extend_transposed_rows(const real* g, real* gT, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                                  Py_ssize_t width, Py_ssize_t qlen, Py_ssize_t blocks, Py_ssize_t block,
                                  Py_ssize_t group_blocks, Py_ssize_t out_per_group, Py_ssize_t item,
                                  Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Row (image, row) `item` of extend_transposed, its blocks [b0, b1)."""
    cdef Py_ssize_t lanes = CG_LANES_F32 if real is float else CG_LANES_F64
    cdef Py_ssize_t n = item // H, i = item % H, b, k, j, c, real_channels, written
    cdef real* dst
    for b in range(b0, b1):
        k = b % group_blocks * block                 # the block's first channel within its group
        real_channels = min(block, out_per_group - k)
        dst = gT + ((n * blocks + b) * qlen + i * width) * block
        _transposed_row(g + ((n * C + b // group_blocks * out_per_group + k) * H + i) * W, H * W, real_channels,
                        W, dst, block)
        # A group's last block: zeros in the lanes past its channels' vectors too, which
        # the tiles multiply but never store (stale data could be denormals, which slow
        # the multiply-adds).
        written = (real_channels + lanes - 1) // lanes * lanes
        for j in range(W):
            for c in range(written, block):
                dst[j * block + c] = 0


cdef void _extend_transposed(const real* g, real* gT, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H,
                             Py_ssize_t W, Py_ssize_t width, Py_ssize_t qlen, Py_ssize_t blocks,
                             Py_ssize_t block, Py_ssize_t groups, int threads, bint banded) noexcept nogil:
    # In parallel over (image, row): one image is most layers' case.  (A channel-outer
    # scatter wrote a line per value: 3 GB/s.)  banded: thread t writes the t-th share of
    # the blocks instead, every row (the weight gradient's bands: see its ocvec).
    cdef Py_ssize_t item, t, group_blocks = blocks // groups, out_per_group = C // groups
    if banded:
        for t in prange(threads, schedule="static", chunksize=1, num_threads=threads):
            for item in range(N * H):
                _extend_transposed_rows(g, gT, C, H, W, width, qlen, blocks, block, group_blocks, out_per_group,
                                        item, t * blocks // threads, (t + 1) * blocks // threads)
        return
    for item in prange(N * H, schedule="dynamic", chunksize=1 + N * H // (8 * threads), num_threads=threads):
        _extend_transposed_rows(g, gT, C, H, W, width, qlen, blocks, block, group_blocks, out_per_group, item,
                                0, blocks)


def extend_transposed(cnp.ndarray g, cnp.ndarray gT, Py_ssize_t width, int threads, Py_ssize_t groups=1,
                      bint banded=False):
    """grad_output transposed in blocks of channels, each group's own:
    gT[n, b, i * width + j, c] = g[n, b // B * OCg + b % B * block + c, i, j] where that
    channel is in the group (B = blocks // groups blocks a group, OCg = C // groups
    channels, c < block).  g is (N, C, H, W), gT (N, blocks, qlen, block), block a
    multiple of the lanes.  A block's pixels are contiguous, each a run of `block`
    channels: what the channel-vectorised weight gradient's tiles read, one run of pixels
    per tile (AVX2, 2 threads: its kernel 1.3-1.5x faster than from grad_output
    transposed whole, whose pixels lay a row of all channels apart).  Only the pixels of
    g are written (a group's last block zero past its channels): the tiles read no other
    pixel, and store no sum of the lanes past a group's channels.  banded: thread t
    writes the t-th share of the blocks."""
    cdef void* src = _ptr(g)
    cdef void* dst = _ptr(gT)
    cdef Py_ssize_t N = g.shape[0], C = g.shape[1], H = g.shape[2], W = g.shape[3]
    cdef Py_ssize_t blocks = gT.shape[1], qlen = gT.shape[2], block = gT.shape[3]
    if g.dtype.itemsize == 4:
        with nogil:
            _extend_transposed(<float*>src, <float*>dst, N, C, H, W, width, qlen, blocks, block, groups, threads,
                               banded)
    else:
        with nogil:
            _extend_transposed(<double*>src, <double*>dst, N, C, H, W, width, qlen, blocks, block, groups, threads,
                               banded)


cdef void _windows_rows(const real* src, real* dst, Py_ssize_t i0, Py_ssize_t i1, const WindowPlan* wp,
                        bint scatter) noexcept nogil:
    """Output rows i0..i1 - 1 of one input channel's KH * KW window channels: pixel (i, j)
    of window channel t = ti * KW + tj is input pixel (i * sh + ti * dh, j * sw + tj * dw).
    Gathers src (H, W) -> dst (KH * KW, OH, OW), or (scatter) puts src (KH * KW, OH, OW)
    back into dst (H, W), first zeroing the input rows these output rows own (i0 * sh up
    to i1 * sh, the last output row's to H: the windows do not overlap, so they are their
    windows' rows).  (AVX-512's gather and scatter instructions took 15-25% less time on
    ViT's patches and as long or longer on a strided 1x1 layer's pixels: at most 13 us of
    a layer taking a millisecond or more.)"""
    # (the geometry in locals: stores through dst may alias *wp as far as gcc knows)
    cdef Py_ssize_t H = wp.H, W = wp.W, OH = wp.OH, OW = wp.OW, KH = wp.KH, KW = wp.KW
    cdef Py_ssize_t sh = wp.sh, sw = wp.sw, dh = wp.dh, dw = wp.dw
    cdef Py_ssize_t i, k, ti, tj, j, r, plane = OH * OW
    cdef const real* s
    cdef real* d
    # (A strided 1x1 layer's pixels take loops without the taps': on small maps the
    # general ones took a fifth longer, 0.5-1 us.)
    if scatter and KH == KW == 1:
        for r in range(i0 * sh, H if i1 == OH else i1 * sh):
            d = dst + r * W
            for j in range(W):
                d[j] = 0
            if r % sh == 0:
                s = src + r // sh * OW
                for j in range(OW):
                    d[j * sw] = s[j]
        return
    if scatter:   # each input row zeroed, then given the window pixels it holds (while in L1)
        for i in range(i0, i1):
            for k in range(H - i * sh if i == OH - 1 else sh):   # (row k of window row i)
                d = dst + (i * sh + k) * W
                for j in range(W):
                    d[j] = 0
                if k >= KH * dh or (dh > 1 and k % dh):
                    continue
                for tj in range(KW):
                    s = src + (k // dh * KW + tj) * plane + i * OW
                    for j in range(OW):
                        d[j * sw + tj * dw] = s[j]
        return
    if KH == KW == 1:
        for i in range(i0, i1):
            s = src + i * sh * W
            d = dst + i * OW
            for j in range(OW):
                d[j] = s[j * sw]
        return
    for i in range(i0, i1):
        for ti in range(KH):
            r = i * sh + ti * dh
            for tj in range(KW):
                s = src + r * W + tj * dw
                d = dst + (ti * KW + tj) * plane + i * OW
                for j in range(OW):
                    d[j] = s[j * sw]


cdef void _windows(const real* src, real* dst, Py_ssize_t nc, const WindowPlan* wp, bint scatter,
                   int threads) noexcept nogil:
    """_windows_rows over every channel, each in `parts` runs of rows: enough work items
    for the threads where there are few channels (an RGB image's patches)."""
    cdef Py_ssize_t item, c, part, windows = wp.KH * wp.KW * wp.OH * wp.OW, pixels = wp.H * wp.W
    cdef Py_ssize_t src_chan = windows if scatter else pixels, dst_chan = pixels if scatter else windows
    cdef Py_ssize_t parts = min(wp.OH, max(1, (4 * threads + nc - 1) // nc))
    if threads == 1:  # a plain loop: no parallel region to open and join
        for c in range(nc):
            _windows_rows(src + c * src_chan, dst + c * dst_chan, 0, wp.OH, wp, scatter)
    else:
        for item in prange(nc * parts, schedule="static", num_threads=threads):
            c = item // parts
            part = item % parts
            _windows_rows(src + c * src_chan, dst + c * dst_chan, part * wp.OH // parts,
                          (part + 1) * wp.OH // parts, wp, scatter)


def windows(cnp.ndarray x, cnp.ndarray out, tuple geometry, bint scatter, int threads):
    """The input's non-overlapping windows as channels (a patch embedding's, or a strided
    1x1 layer's pixels): geometry = (H, W, OH, OW, KH, KW, sh, sw, dh, dw).
    scatter=False: x (N*C, H, W) -> out (N*C*KH*KW, OH, OW), window channel
    c * KH * KW + ti * KW + tj holding pixels (i * sh + ti * dh, j * sw + tj * dw).
    scatter=True: the reverse, x (N*C*KH*KW, OH, OW) -> out (N*C, H, W), the pixels no
    window reads zero."""
    cdef WindowPlan wp
    wp.H, wp.W, wp.OH, wp.OW, wp.KH, wp.KW, wp.sh, wp.sw, wp.dh, wp.dw = geometry
    cdef Py_ssize_t nc = out.shape[0] if scatter else x.shape[0]
    cdef void* s = _ptr(x)
    cdef void* d = _ptr(out)
    if x.dtype.itemsize == 4:
        with nogil:
            _windows(<float*>s, <float*>d, nc, &wp, scatter, threads)
    else:
        with nogil:
            _windows(<double*>s, <double*>d, nc, &wp, scatter, threads)


cdef real _channel_sum(const real* g, Py_ssize_t N, Py_ssize_t stride, Py_ssize_t L) noexcept nogil:
    """Sum of N rows of L values, `stride` apart, in a fixed order (independent of
    threads): a float32 vector's lanes of running sums (element i adds into sum i % lanes), then a tree, in
    registers (an array of sums in memory stalls on store forwarding: 7x7 maps of
    960 channels spent as long on the bias gradient as on the input gradient).  Float32
    sums go on in float64 (in float32 alone, a sum over a 56x56 map of two images was off
    by up to 5e-5 of the largest sum, ten times PyTorch's)."""
    cdef Py_ssize_t n, i, end
    cdef const real* row
    cdef cg_vf32 s
    cdef cg_vf64 lo, hi
    cdef Py_ssize_t lanes = CG_LANES_F32, half = CG_LANES_F64
    lo = cg_splat_f64(0)   # sums 0 .. half - 1
    hi = cg_splat_f64(0)   # sums half .. lanes - 1
    if real is float:
        # (each block of 16 vectors of a row (256 values in AVX-512's lanes) summed in
        # float32, then added in float64: widening every vector ran 1.3-1.9x slower)
        for n in range(N):
            row = g + n * stride
            i = 0
            while i < L:
                end = min(L, i + 16 * lanes)
                s = cg_splat_f32(0)
                while i + lanes <= end:
                    s = cg_fma_f32(s, cg_load_f32(row + i), 1)
                    i = i + lanes
                if i < end:
                    s = cg_fma_f32(s, cg_load_partial_f32(row + i, <int>(end - i)), 1)
                    i = end
                cg_add_widened_f32(&lo, &hi, s)
        return <float>cg_hsum_f64(cg_fma_f64(lo, hi, 1))
    else:
        for n in range(N):
            row = g + n * stride
            i = 0
            while i + lanes <= L:
                lo = cg_fma_f64(lo, cg_load_f64(row + i), 1)
                hi = cg_fma_f64(hi, cg_load_f64(row + i + half), 1)
                i = i + lanes
            if i + half <= L:
                lo = cg_fma_f64(lo, cg_load_f64(row + i), 1)
                i = i + half
                if i < L:
                    hi = cg_fma_f64(hi, cg_load_partial_f64(row + i, <int>(L - i)), 1)
            elif i < L:
                lo = cg_fma_f64(lo, cg_load_partial_f64(row + i, <int>(L - i)), 1)
        return cg_hsum_f64(cg_fma_f64(lo, hi, 1))


cdef void _channel_sums(const real* g, real* out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                        int threads) noexcept nogil:
    cdef Py_ssize_t c
    if threads == 1:  # a plain loop: no parallel region to open and join
        for c in range(C):
            out[c] = _channel_sum(g + c * L, N, C * L, L)
    else:
        for c in prange(C, schedule="dynamic", chunksize=1 + C // (8 * threads), num_threads=threads):
            out[c] = _channel_sum(g + c * L, N, C * L, L)


def channel_sums(cnp.ndarray g, cnp.ndarray out, Py_ssize_t N, Py_ssize_t C, int threads):
    """out[c] = sum over n and i of g[n * C + c, i] (the bias gradient), in a fixed order."""
    cdef Py_ssize_t L = g.shape[1]
    cdef void* src = _ptr(g)
    cdef void* dst = _ptr(out)
    if g.dtype.itemsize == 4:
        with nogil:
            _channel_sums(<float*>src, <float*>dst, N, C, L, threads)
    else:
        with nogil:
            _channel_sums(<double*>src, <double*>dst, N, C, L, threads)


cdef inline void _taps_last_row(const real* src, real* dst, Py_ssize_t o, Py_ssize_t kk, Py_ssize_t C,
                                bint accumulate) noexcept nogil:
    """Output channel o of taps_last."""
    cdef Py_ssize_t t, c
    cdef const real* s
    cdef real* d
    for t in range(kk):
        s = src + (o * kk + t) * C
        d = dst + o * kk * C + t
        if accumulate:
            for c in range(C):
                d[c * kk] += s[c]
        else:
            for c in range(C):
                d[c * kk] = s[c]


cdef void _taps_last(const real* src, real* dst, Py_ssize_t rows, Py_ssize_t kk, Py_ssize_t C,
                     bint accumulate, int threads) noexcept nogil:
    cdef Py_ssize_t o
    if threads == 1:  # a plain loop: no parallel region to open and join
        for o in range(rows):
            _taps_last_row(src, dst, o, kk, C, accumulate)
    else:
        for o in prange(rows, schedule="static", num_threads=threads):
            _taps_last_row(src, dst, o, kk, C, accumulate)


def taps_last(cnp.ndarray src, cnp.ndarray dst, Py_ssize_t kk, bint accumulate, int threads):
    """dst[o, c, t] = src[o, t, c] (or +=): a weight gradient summed tap-major, (rows,
    kk, C), into the weight's layout (rows, C, kk).  Both C-contiguous."""
    cdef Py_ssize_t rows = dst.shape[0], C = dst.size // (rows * kk)
    cdef void* s = _ptr(src)
    cdef void* d = _ptr(dst)
    if src.dtype.itemsize == 4:
        with nogil:
            _taps_last(<float*>s, <float*>d, rows, kk, C, accumulate, threads)
    else:
        with nogil:
            _taps_last(<double*>s, <double*>d, rows, kk, C, accumulate, threads)


def address(cnp.ndarray a):
    """The address of a's data (what a.ctypes.data gives, without building a ctypes object)."""
    return <Py_ssize_t>cnp.PyArray_DATA(a)


cdef extern from "convgen_fpmode.h" nogil:
    int cg_flush_denormal_supported()
    unsigned long cg_flush_bits()
    void cg_set_flush_bits(unsigned long bits)
    unsigned long CG_FLUSH_BITS
    unsigned long cg_followed_bits
    int cg_followed_threads

# The threads set_num_threads last asked for, from whichever Python thread (convgen's
# count is process-wide; follow_flush_denormal covers them too), or 0 until it is first
# called (convgen then follows OpenMP's setting everywhere).
cdef int _convgen_threads = 0
# OpenMP's setting at start-up: a calling thread whose own setting differs from it
# (threadpoolctl's limits, omp_set_num_threads) keeps its own.
cdef int _openmp_default = openmp.omp_get_max_threads()


def set_num_threads(int n):
    """convgen.set_num_threads: process-wide, and this thread's OpenMP setting too (as
    threadpoolctl sees it)."""
    global _convgen_threads
    _convgen_threads = n
    openmp.omp_set_num_threads(n)


def get_num_threads():
    """convgen.get_num_threads: the threads each parallel loop gets (see set_num_threads).
    In C: it is on the path of every call."""
    cdef int here = openmp.omp_get_max_threads()
    return _convgen_threads if _convgen_threads and here == _openmp_default else here


def openmp_default_threads():
    """OpenMP's thread count at start-up."""
    return _openmp_default


def set_flush_denormal(bint mode):
    """Set the calling thread's denormal mode (flush to zero, read as zero); False where
    this CPU has no such mode (then nothing changes)."""
    if not cg_flush_denormal_supported():
        return False
    cg_set_flush_bits(CG_FLUSH_BITS if mode else 0)
    return True


def flush_denormal():
    """Whether the calling thread flushes denormals to zero."""
    return cg_flush_bits() != 0


def follow_flush_denormal():
    """Give the OpenMP threads that run this thread's kernels its denormal mode (each
    thread has its own control register): a parallel region where each sets it, run
    only when the mode changed since the last one or more threads may run now.  Pool
    threads that OpenMP starts later copy the calling thread's mode as they start."""
    global cg_followed_bits, cg_followed_threads   # (thread-local: convgen_fpmode.h)
    cdef unsigned long bits = cg_flush_bits()
    cdef int threads = max(openmp.omp_get_max_threads(), _convgen_threads), t
    if bits == cg_followed_bits and threads <= cg_followed_threads:
        return
    for t in prange(threads, nogil=True, schedule="static", chunksize=1, num_threads=threads):
        cg_set_flush_bits(bits)
    cg_followed_bits = bits
    cg_followed_threads = threads


# ---- gradient mode (convgen.grad_mode) ----
# Whether forwards keep what a backward needs, per thread (each Python thread is one OS
# thread).  In C, with the context managers' entry and exit, so that a forward under
# `with convgen.no_grad():` runs no Python for them: after a kernel has swept the caches,
# every Python call costs microseconds.

cdef extern from *:
    """
    static __thread int cg_grad_off = 0;
    """
    int cg_grad_off


def grad_enabled():
    """Whether Conv2d.forward keeps what its backward needs (True unless in no_grad)."""
    return not cg_grad_off


cdef class GradMode:
    """Base of convgen.grad_mode's context managers: inside a with block (or a function
    it decorates) the mode is the instance's `enabled`; leaving puts back the mode found
    on entering (a stack, so that a decorated function may recurse)."""

    cdef list _outer
    cdef object _first_outer   # (set_grad_enabled) what the first with block puts back

    def __cinit__(self):
        self._outer = []
        self._first_outer = None

    def _set_now(self, bint mode):
        """Set the mode at once (set_grad_enabled): the first with block puts back the
        mode found here."""
        global cg_grad_off
        self._first_outer = not cg_grad_off
        cg_grad_off = not mode

    def __enter__(self):
        global cg_grad_off
        if self._first_outer is not None:
            self._outer.append(self._first_outer)
            self._first_outer = None
        else:
            self._outer.append(not cg_grad_off)
        cg_grad_off = not self.enabled
        return self

    def __exit__(self, *exc):
        global cg_grad_off
        cg_grad_off = not self._outer.pop()
        return False


# ---- Conv2d's check that a call may reuse what the last one validated ----

cdef inline bint _array_of(object a, tuple shape, object dtype, bint exact):
    """a is a C-contiguous ndarray (exactly, not a subclass, if `exact`) of this shape and
    dtype (the same dtype object)."""
    if not (cnp.PyArray_CheckExact(a) if exact else cnp.PyArray_Check(a)):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int nd = cnp.PyArray_NDIM(arr), i
    if <object>cnp.PyArray_DESCR(arr) is not dtype or nd != len(shape) or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        return False
    for i in range(nd):
        if cnp.PyArray_DIM(arr, i) != <Py_ssize_t>shape[i]:
            return False
    return True


def any_writeable(a, b):
    """Whether ndarray a, or b (an ndarray or None), is writeable: a frozen Conv2d's
    test, every call, that its parameters are still read-only (ndarray.flags builds an
    object each time: on the smallest layers two of them cost 5% of a call)."""
    return cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a) or (b is not None and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>b))


def same_arrays(x, tuple x_shape, dtype, weight, tuple w_shape, bias, b_shape):
    """Whether x (an ndarray itself), weight and bias (None where b_shape is None) are
    C-contiguous arrays of these shapes and dtype: Conv2d's test that a call may skip the
    checks its last call made, in C (every Python step costs microseconds next to a
    kernel)."""
    if not (_array_of(x, x_shape, dtype, True) and _array_of(weight, w_shape, dtype, False)):
        return False
    if b_shape is None:
        return bias is None
    return _array_of(bias, b_shape, dtype, False)
