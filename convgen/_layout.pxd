# Declarations the generated kernel modules cimport (see _layout.pyx).

cimport numpy as cnp

cdef struct PadPlan:
    # One channel (H, W) -> sh*sw phase planes of Hq rows x We columns, plane_len apart.
    Py_ssize_t H, W, sh, sw, Hq, We, plane_len
    const Py_ssize_t* rows       # (sh, Hq) source row of each plane row, -1 for zero
    const Py_ssize_t* cols       # (sw, We) source column of each plane column, -1 for zero
    const Py_ssize_t* interior   # (sw, 2) [lo, hi) of plane columns copying input columns
    # Zero padding at stride 1 (one plane: each input row whole, between zeros): the
    # channel is padded by whole-row copies (_pad_zero_s1, where the plane has a vector's
    # room past its last row), its input row i at plane row top + i, column left.
    bint zero_s1
    Py_ssize_t top, left

# The PadPlan of pad_phase's source tables (rows (sh, Hq), cols (sw, We), interior (sw, 2)).
cdef PadPlan pad_plan(cnp.ndarray rows, cnp.ndarray cols, cnp.ndarray interior, Py_ssize_t H,
                      Py_ssize_t W, Py_ssize_t plane_len)

# Both return 1 if the padded planes hold an infinity or a NaN (check=False: 0, unchecked).
cdef int pad_channel_f32(const float* src, float* dst, const PadPlan* pp, bint check) noexcept nogil
cdef int pad_channel_f64(const double* src, double* dst, const PadPlan* pp, bint check) noexcept nogil

# One channel of extend / fold_phases (see _layout.pyx), for kernels that fuse them.
cdef struct FoldPlan:
    Py_ssize_t H, W, sh, sw, Hq, Wq, width, out_len, pad_left
    bint once                    # zero padding: each pixel's gradient is stored, not summed
    const Py_ssize_t* rows
    const Py_ssize_t* cols
    const Py_ssize_t* interior

cdef void extend_channel_f32(const float* src, float* dst, Py_ssize_t H, Py_ssize_t W, Py_ssize_t L,
                             Py_ssize_t width, Py_ssize_t top, Py_ssize_t left) noexcept nogil
cdef void extend_channel_f64(const double* src, double* dst, Py_ssize_t H, Py_ssize_t W, Py_ssize_t L,
                             Py_ssize_t width, Py_ssize_t top, Py_ssize_t left) noexcept nogil
cdef void fold_channel_f32(const float* gxph, float* gx, const FoldPlan* fp) noexcept nogil
cdef void fold_channel_f64(const double* gxph, double* gx, const FoldPlan* fp) noexcept nogil
