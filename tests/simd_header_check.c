/* convgen_simd.h's helpers against plain loops, for the vector width it is compiled with
 * (tests/test_simd_header.py builds it for 64, 32 and 16 bytes, with and without AVX2): the
 * transposed stores and loads for every row and column count, the partial stores and loads
 * for every count, the compressed stores for every lane mask, the de-interleaves and copies
 * for every length up to four vectors and the values around them, the non-finite checks,
 * the horizontal and widened sums.  Prints the number of mismatches; exits 1 on any. */
#include <stdio.h>
#include <stddef.h>
#include "convgen_simd.h"
/* Every lane mask of a compressed store: the set lanes, in order, from p; nothing else. */
#define CHECK_COMPRESSED(SFX, T, V, LANES)                                                   \
    for (unsigned m = 0; m < (1u << LANES); m++) {                                           \
        T dst[LANES + 2], want[LANES + 2]; V v;                                              \
        for (int l = 0; l < LANES; l++) v[l] = 10 + l;                                       \
        for (int i = 0; i < LANES + 2; i++) dst[i] = want[i] = -1;                           \
        for (int l = 0, k = 1; l < LANES; l++) if (m >> l & 1) want[k++] = v[l];             \
        cg_store_compressed_##SFX(dst + 1, v, m);                                            \
        for (int i = 0; i < LANES + 2; i++) if (dst[i] != want[i]) bad++;                   \
    }
/* Every length n up to four vectors: even[k] = src[2k], odd[k] = src[2k + 1] for k < n, and
 * nothing written before or after either; cg_copy_over: the n values, nothing before them,
 * and at most lanes - 1 values after. */
#define CHECK_SPLIT_AND_COPY(SFX, T, LANES)                                                  \
    for (int n = 0; n <= 4 * LANES; n++) {                                                   \
        T src[8 * LANES + 2], even[4 * LANES + 2], odd[4 * LANES + 2], dst[6 * LANES];       \
        for (int i = 0; i < 8 * LANES + 2; i++) src[i] = 3 + i;                              \
        for (int i = 0; i < 4 * LANES + 2; i++) even[i] = odd[i] = -1;                       \
        cg_deinterleave_##SFX(even + 1, odd + 1, src + 1, n);                                \
        for (int i = 0; i < 4 * LANES + 2; i++) {                                            \
            T we = (i >= 1 && i <= n) ? src[2 * i - 1] : -1, wo = (i >= 1 && i <= n) ? src[2 * i] : -1; \
            if (even[i] != we || odd[i] != wo) bad++;                                        \
        }                                                                                    \
        for (int i = 0; i < 6 * LANES; i++) dst[i] = -1;                                     \
        cg_copy_over_##SFX(dst + 1, src + 2, n);                                             \
        for (int i = 0; i < 6 * LANES; i++)                                                  \
            if (i >= 1 && i <= n ? dst[i] != src[i + 1] : (i == 0 || i > n + LANES - 1) && dst[i] != -1) bad++; \
    }
/* Every count n of a partial store and load: the first n lanes stored, nothing before or
 * after them; the first n values loaded, zeros past them. */
#define CHECK_PARTIAL(SFX, T, V, LANES)                                                      \
    for (int n = 0; n <= LANES; n++) {                                                       \
        T dst[LANES + 2], src[LANES]; V v;                                                   \
        for (int l = 0; l < LANES; l++) { v[l] = 10 + l; src[l] = 20 + l; }                  \
        for (int i = 0; i < LANES + 2; i++) dst[i] = -1;                                     \
        cg_store_partial_##SFX(dst + 1, v, n);                                               \
        for (int i = 0; i < LANES + 2; i++) if (dst[i] != (i >= 1 && i <= n ? v[i - 1] : -1)) bad++; \
        V w = cg_load_partial_##SFX(src, n);                                                 \
        for (int l = 0; l < LANES; l++) if (w[l] != (l < n ? src[l] : 0)) bad++;             \
    }
int main(void) {
    int bad = 0;
    for (int nr = 1; nr <= CG_LANES_F32; nr++) for (int nc = 1; nc <= CG_LANES_F32; nc++) for (int acc = 0; acc < 2; acc++) {
        cg_vf32 cols[CG_LANES_F32]; float dst[CG_LANES_F32 * 20]; float want[CG_LANES_F32 * 20];
        for (int c = 0; c < CG_LANES_F32; c++) for (int l = 0; l < CG_LANES_F32; l++) cols[c][l] = c * 100 + l;
        for (int i = 0; i < CG_LANES_F32 * 20; i++) dst[i] = want[i] = i * 0.5f;
        for (int l = 0; l < nr; l++) for (int c = 0; c < nc; c++) want[l * 20 + c] = (acc ? want[l * 20 + c] : 0) + cols[c][l];
        cg_store_transposed_f32(dst, 20, cols, nc, nr, acc);
        for (int i = 0; i < CG_LANES_F32 * 20; i++) if (dst[i] != want[i]) bad++;
        cg_vf32 out[CG_LANES_F32];
        cg_load_transposed_f32(dst, 20, nr, nc, out);
        for (int c = 0; c < CG_LANES_F32; c++) for (int l = 0; l < CG_LANES_F32; l++) {
            float w = (l < nr && c < nc) ? dst[l * 20 + c] : 0;
            if (c < nc && out[c][l] != w) bad++;
        }
    }
    for (int nr = 1; nr <= CG_LANES_F64; nr++) for (int nc = 1; nc <= CG_LANES_F64; nc++) {
        cg_vf64 cols[CG_LANES_F64]; double dst[CG_LANES_F64 * 20], want[CG_LANES_F64 * 20];
        for (int c = 0; c < CG_LANES_F64; c++) for (int l = 0; l < CG_LANES_F64; l++) cols[c][l] = c * 100 + l;
        for (int i = 0; i < CG_LANES_F64 * 20; i++) dst[i] = want[i] = -1;
        for (int l = 0; l < nr; l++) for (int c = 0; c < nc; c++) want[l * 20 + c] = cols[c][l];
        cg_store_transposed_f64(dst, 20, cols, nc, nr, 0);
        for (int i = 0; i < CG_LANES_F64 * 20; i++) if (dst[i] != want[i]) bad++;
        cg_vf64 out[CG_LANES_F64];
        cg_load_transposed_f64(dst, 20, nr, nc, out);
        for (int c = 0; c < nc; c++) for (int l = 0; l < CG_LANES_F64; l++) if (out[c][l] != (l < nr ? dst[l * 20 + c] : 0)) bad++;
    }
    /* the real lanes of a vector of flat-grid pixels from pixel q (negative: lanes before
     * pixel 0 are not real), against a lane-by-lane rule */
    for (int We = 1; We <= 9; We++) for (int OW = 1; OW <= We; OW++) for (int OH = 1; OH <= 3; OH++)
    for (int q = -CG_LANES_F32; q <= 3 * We; q++) {
        ptrdiff_t dest, want_dest = -1;
        unsigned m = cg_real_lanes_before(q, We, OW, OH, CG_LANES_F32, &dest), want = 0;
        for (int l = 0; l < CG_LANES_F32; l++) {
            int pos = q + l;
            if (pos >= 0 && pos % We < OW && pos / We < OH) {
                want |= 1u << l;
                if (want_dest < 0) want_dest = pos / We * OW + pos % We;
            }
        }
        if (m != want || (want && dest != want_dest)) bad++;
    }
    {   /* a vector held in a register keeps its value */
        cg_vf32 v32 = cg_splat_f32(3.5f); cg_vf64 v64 = cg_splat_f64(-2.25);
        cg_in_register(v32); cg_in_register(v64);
        for (int l = 0; l < CG_LANES_F32; l++) if (v32[l] != 3.5f) bad++;
        for (int l = 0; l < CG_LANES_F64; l++) if (v64[l] != -2.25) bad++;
    }
    CHECK_PARTIAL(f32, float, cg_vf32, CG_LANES_F32)
    CHECK_PARTIAL(f64, double, cg_vf64, CG_LANES_F64)
    CHECK_COMPRESSED(f32, float, cg_vf32, CG_LANES_F32)
    CHECK_COMPRESSED(f64, double, cg_vf64, CG_LANES_F64)
    CHECK_SPLIT_AND_COPY(f32, float, CG_LANES_F32)
    CHECK_SPLIT_AND_COPY(f64, double, CG_LANES_F64)
    float f[37]; for (int i = 0; i < 37; i++) f[i] = i; f[36] = 1.0f / 0.0f;
    double d[37]; for (int i = 0; i < 37; i++) d[i] = i; d[33] = 0.0 / 0.0;
    if (!cg_nonfinite_f32(f, 37) || cg_nonfinite_f32(f, 36) || !cg_nonfinite_f64(d, 34) || cg_nonfinite_f64(d, 33)) bad += 1000;
    cg_vf32 v = cg_load_f32(f); if (cg_hsum_f32(v) != (CG_LANES_F32 - 1) * CG_LANES_F32 / 2) bad += 10000;
    cg_vf64 lo = {0}, hi = {0}; cg_add_widened_f32(&lo, &hi, v); if (cg_hsum_f64(lo + hi) != (CG_LANES_F32 - 1) * CG_LANES_F32 / 2) bad += 100000;
    printf("bytes %d bad %d\n", CG_VECTOR_BYTES, bad);
    return bad != 0;
}
