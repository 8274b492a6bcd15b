# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Layout passes around the generated kernels (hand-written, O(size of a tensor)).

* pad_phase:  input -> padded, stride-phase-split planes the kernels read (all four
              padding modes; every kernel load is then contiguous and in bounds).
* extend:     grad_output -> rows of a wider grid with a zero border (what the
              input-gradient and weight-gradient kernels read).
* compact:    the kernels' extended output grid -> the dense (OH, OW) result.
* fold_phases: input gradient on the padded phase planes -> gradient of the
              input, adding what padding copied back into its source pixels.
* threads:    OpenMP thread count.
"""

from cython.parallel cimport prange
cimport numpy as cnp
cimport openmp

cnp.import_array()

ctypedef fused real:
    float
    double

# Padding modes, as codes (see convgen._engine.PADDING_MODES).
cdef enum:
    ZEROS = 0
    REFLECT = 1
    REPLICATE = 2
    CIRCULAR = 3


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


def source_indices(Py_ssize_t start, Py_ssize_t count, Py_ssize_t n, int mode, Py_ssize_t step=1):
    """Source index of padded positions start, start+step, ... (-1 where zero)."""
    out = cnp.PyArray_EMPTY(1, [count], cnp.NPY_INTP, 0)
    cdef Py_ssize_t* p = <Py_ssize_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t i
    for i in range(count):
        p[i] = source_index(start + i * step, n, mode)
    return out


def pad_phase(real[:, :, ::1] x, real[:, ::1] xin, Py_ssize_t[:, ::1] rows,
              Py_ssize_t[:, ::1] cols, Py_ssize_t Hq, Py_ssize_t We, Py_ssize_t plane_len):
    """xin[c, p * plane_len + i * We + j] = x[c, rows[a, i], cols[b, j]] (zero where -1)
    for phase p = a * len(cols) + b.  x is (channels, H, W); rows is (sh, Hq), cols (sw, We).
    Everything else in xin (the tail of each plane) is zeroed."""
    cdef Py_ssize_t nc = x.shape[0], sh = rows.shape[0], sw = cols.shape[0]
    cdef Py_ssize_t c, a, b, i, j, r, s, base
    for c in prange(nc, nogil=True, schedule="static"):
        for a in range(sh):
            for b in range(sw):
                base = (a * sw + b) * plane_len
                for i in range(Hq):
                    r = rows[a, i]
                    if r < 0:
                        for j in range(We):
                            xin[c, base + i * We + j] = 0
                    else:
                        for j in range(We):
                            s = cols[b, j]
                            xin[c, base + i * We + j] = x[c, r, s] if s >= 0 else 0
                for j in range(Hq * We, plane_len):
                    xin[c, base + j] = 0


def extend(real[:, :, ::1] g, real[:, ::1] gext, Py_ssize_t width, Py_ssize_t top, Py_ssize_t left):
    """gext[c, (i + top) * width + j + left] = g[c, i, j]; zero everywhere else."""
    cdef Py_ssize_t nc = g.shape[0], H = g.shape[1], W = g.shape[2], L = gext.shape[1]
    cdef Py_ssize_t c, i, j, start
    for c in prange(nc, nogil=True, schedule="static"):
        for j in range(L):
            gext[c, j] = 0
        for i in range(H):
            start = (i + top) * width + left
            for j in range(W):
                gext[c, start + j] = g[c, i, j]


def compact(real[:, ::1] yext, real[:, :, ::1] y, Py_ssize_t width):
    """y[c, i, j] = yext[c, i * width + j]: drop the scratch columns of the extended grid."""
    cdef Py_ssize_t nc = y.shape[0], H = y.shape[1], W = y.shape[2]
    cdef Py_ssize_t c, i, j
    for c in prange(nc, nogil=True, schedule="static"):
        for i in range(H):
            for j in range(W):
                y[c, i, j] = yext[c, i * width + j]


def fold_phases(real[:, ::1] gxph, real[:, :, ::1] gx, Py_ssize_t[:, ::1] rows,
                Py_ssize_t[:, ::1] cols, Py_ssize_t width, Py_ssize_t out_len):
    """gx[c, rows[a, i], cols[b, j]] += gxph[c, p * out_len + i * width + j], the adjoint
    of pad_phase: padding's copies send their gradient back to the pixel they copied."""
    cdef Py_ssize_t nc = gx.shape[0], sh = rows.shape[0], sw = cols.shape[0]
    cdef Py_ssize_t Hq = rows.shape[1], Wq = cols.shape[1]
    cdef Py_ssize_t c, a, b, i, j, r, s, base
    for c in prange(nc, nogil=True, schedule="static"):
        for i in range(gx.shape[1]):
            for j in range(gx.shape[2]):
                gx[c, i, j] = 0
        for a in range(sh):
            for b in range(sw):
                base = (a * sw + b) * out_len
                for i in range(Hq):
                    r = rows[a, i]
                    if r < 0:
                        continue
                    for j in range(Wq):
                        s = cols[b, j]
                        if s >= 0:
                            gx[c, r, s] += gxph[c, base + i * width + j]


def set_num_threads(int n):
    openmp.omp_set_num_threads(n)


def get_num_threads():
    return openmp.omp_get_max_threads()
