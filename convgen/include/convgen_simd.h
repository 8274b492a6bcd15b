/* Portable vectors for the generated kernels (GCC/Clang vector extensions).
 *
 * CG_VECTOR_BYTES (64: AVX-512, 32: AVX2, 16: baseline x86-64 or arm64) is the width the
 * kernels were generated for (codegen.target; setup.py defines it).  Built with
 * -march=native on such a machine these are single zmm / ymm / xmm registers and
 * `acc + x * w` contracts to one vfmadd where there is one (with an embedded broadcast
 * when w is a scalar in memory).
 * Hand-written, not generated: the templates only call these few helpers.
 */
#ifndef CONVGEN_SIMD_H
#define CONVGEN_SIMD_H

#include <string.h>

#ifndef CG_VECTOR_BYTES
#error "CG_VECTOR_BYTES (64, 32 or 16) must be defined: setup.py defines it from codegen.target"
#endif
#if CG_VECTOR_BYTES != 64 && CG_VECTOR_BYTES != 32 && CG_VECTOR_BYTES != 16
#error "CG_VECTOR_BYTES must be 64 (AVX-512), 32 (AVX2) or 16 (baseline x86-64 / arm64)"
#endif
#define CG_LANES_F32 (CG_VECTOR_BYTES / 4)
#define CG_LANES_F64 (CG_VECTOR_BYTES / 8)
/* AVX-512's masked loads and stores, compress and gathers, where the vectors are its zmm */
#if CG_VECTOR_BYTES == 64 && defined(__AVX512F__)
#define CG_AVX512 1
#endif
#if CG_VECTOR_BYTES == 32 && defined(__AVX2__)
#define CG_AVX2 1
#endif
#if defined(CG_AVX512) || defined(CG_AVX2)
#include <immintrin.h>
#endif

typedef float cg_vf32 __attribute__((vector_size(CG_VECTOR_BYTES)));
typedef double cg_vf64 __attribute__((vector_size(CG_VECTOR_BYTES)));

#define CG_DEFINE_VECTOR_OPS(SFX, T, V, LANES)                                   \
    static inline V cg_load_##SFX(const T *p) { V v; memcpy(&v, p, sizeof v); return v; } \
    static inline void cg_store_##SFX(T *p, V v) { memcpy(p, &v, sizeof v); }   \
    static inline V cg_splat_##SFX(T a) { V v = {0}; return v + a; }             \
    /* acc + x * w with w broadcast: one FMA */                                   \
    static inline V cg_fma_##SFX(V acc, V x, T w) { return acc + x * w; }       \
    static inline V cg_fmav_##SFX(V acc, V x, V y) { return acc + x * y; }      \
    static inline V cg_add_##SFX(V a, V b) { return a + b; }                      \

typedef int cg_vi32 __attribute__((vector_size(CG_VECTOR_BYTES)));
typedef long long cg_vi64 __attribute__((vector_size(CG_VECTOR_BYTES)));

/* Horizontal sums in a fixed tree order (lane i += lane i + w, for w = lanes/2 .. 1),
 * so results do not depend on threads; each round is one shuffle and one add. */
#if CG_VECTOR_BYTES == 64
static inline float cg_hsum_f32(cg_vf32 v) {
    v += __builtin_shuffle(v, (cg_vi32){8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
    v += __builtin_shuffle(v, (cg_vi32){4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (cg_vi32){2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
    v += __builtin_shuffle(v, (cg_vi32){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
    return v[0];
}

static inline double cg_hsum_f64(cg_vf64 v) {
    v += __builtin_shuffle(v, (cg_vi64){4, 5, 6, 7, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (cg_vi64){2, 3, 2, 3, 2, 3, 2, 3});
    v += __builtin_shuffle(v, (cg_vi64){1, 1, 1, 1, 1, 1, 1, 1});
    return v[0];
}
#elif CG_VECTOR_BYTES == 32
static inline float cg_hsum_f32(cg_vf32 v) {
    v += __builtin_shuffle(v, (cg_vi32){4, 5, 6, 7, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (cg_vi32){2, 3, 2, 3, 2, 3, 2, 3});
    v += __builtin_shuffle(v, (cg_vi32){1, 1, 1, 1, 1, 1, 1, 1});
    return v[0];
}

static inline double cg_hsum_f64(cg_vf64 v) {
    v += __builtin_shuffle(v, (cg_vi64){2, 3, 2, 3});
    v += __builtin_shuffle(v, (cg_vi64){1, 1, 1, 1});
    return v[0];
}
#else
static inline float cg_hsum_f32(cg_vf32 v) {
    v += __builtin_shuffle(v, (cg_vi32){2, 3, 2, 3});
    v += __builtin_shuffle(v, (cg_vi32){1, 1, 1, 1});
    return v[0];
}

static inline double cg_hsum_f64(cg_vf64 v) {
    v += __builtin_shuffle(v, (cg_vi64){1, 1});
    return v[0];
}
#endif

/* The first n (< lanes) values at p, zeros after: AVX-512's or AVX2's masked load where
 * the build has it (it reads nothing past p + n), else through a zeroed buffer. */
#if defined(CG_AVX512)
static inline cg_vf32 cg_load_partial_f32(const float *p, int n) {
    return (cg_vf32)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline cg_vf64 cg_load_partial_f64(const double *p, int n) {
    return (cg_vf64)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1), p);
}
/* ... and the first n lanes of v stored at p (nothing written past p + n). */
static inline void cg_store_partial_f32(float *p, cg_vf32 v, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
}
static inline void cg_store_partial_f64(double *p, cg_vf64 v, int n) {
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
}
#elif defined(CG_AVX2)
static inline __m256i cg_mask_f32(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline __m256i cg_mask_f64(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
static inline cg_vf32 cg_load_partial_f32(const float *p, int n) { return (cg_vf32)_mm256_maskload_ps(p, cg_mask_f32(n)); }
static inline cg_vf64 cg_load_partial_f64(const double *p, int n) { return (cg_vf64)_mm256_maskload_pd(p, cg_mask_f64(n)); }
/* The stores by pieces of 4, 2 and 1 lanes: AVX2's masked store is slow on AMD's cores,
 * and the transposed stores of the channel-vector tiles and of the weight gradient's tiles
 * write most of their rows through this (Zen 3, 2 threads: the weight gradient of ResNet's
 * 3x3 512 at 7x7, whose tiles store rows of 6 columns, 1.34x faster than by masked stores). */
static inline void cg_store_partial_f32(float *p, cg_vf32 v, int n) {
    __m128 h = _mm256_castps256_ps128((__m256)v);
    if (n >= 8) { _mm256_storeu_ps(p, (__m256)v); return; }
    if (n & 4) { _mm_storeu_ps(p, h); h = _mm256_extractf128_ps((__m256)v, 1); p += 4; }
    if (n & 2) { _mm_storel_pi((__m64 *)p, h); h = _mm_movehl_ps(h, h); p += 2; }
    if (n & 1) _mm_store_ss(p, h);
}
static inline void cg_store_partial_f64(double *p, cg_vf64 v, int n) {
    __m128d h = _mm256_castpd256_pd128((__m256d)v);
    if (n >= 4) { _mm256_storeu_pd(p, (__m256d)v); return; }
    if (n & 2) { _mm_storeu_pd(p, h); h = _mm256_extractf128_pd((__m256d)v, 1); p += 2; }
    if (n & 1) _mm_store_sd(p, h);
}
#else
static inline void cg_store_partial_f32(float *p, cg_vf32 v, int n) { memcpy(p, &v, n * sizeof(float)); }
static inline void cg_store_partial_f64(double *p, cg_vf64 v, int n) { memcpy(p, &v, n * sizeof(double)); }
static inline cg_vf32 cg_load_partial_f32(const float *p, int n) {
    float t[CG_LANES_F32] = {0}; memcpy(t, p, n * sizeof(float)); cg_vf32 v; memcpy(&v, t, sizeof v); return v;
}
static inline cg_vf64 cg_load_partial_f64(const double *p, int n) {
    double t[CG_LANES_F64] = {0}; memcpy(t, p, n * sizeof(double)); cg_vf64 v; memcpy(&v, t, sizeof v); return v;
}
#endif

/* Copies n values (n >= 0) from src to dst, which do not overlap: whole vectors, then
 * one partial vector (the rows of the padded copies in convgen._layout).  cg_copy_over
 * stores that last vector whole: it writes up to lanes - 1 values past dst + n, which the
 * caller rewrites after.  (AVX2's masked stores are slow on AMD's cores, and the loads
 * after them wait: a 7x7 map's rows spent half their padding time there.) */
#define CG_DEFINE_COPY(SFX, T, LANES)                                               \
    static inline ptrdiff_t cg_copy_whole_##SFX(T *dst, const T *src, ptrdiff_t n) { \
        ptrdiff_t i = 0;                                                            \
        for (; i + LANES <= n; i += LANES) cg_store_##SFX(dst + i, cg_load_##SFX(src + i)); \
        return i;                                                                   \
    }                                                                               \
    static inline void cg_copy_##SFX(T *dst, const T *src, ptrdiff_t n) {           \
        ptrdiff_t i = cg_copy_whole_##SFX(dst, src, n);                             \
        if (i < n) cg_store_partial_##SFX(dst + i, cg_load_partial_##SFX(src + i, (int)(n - i)), (int)(n - i)); \
    }                                                                               \
    static inline void cg_copy_over_##SFX(T *dst, const T *src, ptrdiff_t n) {      \
        ptrdiff_t i = cg_copy_whole_##SFX(dst, src, n);                             \
        if (i < n) cg_store_##SFX(dst + i, cg_load_partial_##SFX(src + i, (int)(n - i))); \
    }

/* 1 if p[0:n] (n >= 0) holds an infinity or a NaN, whose exponent bits are all ones:
 * whole vectors, then one partial vector (zeros past n, which are finite). */
#if defined(CG_AVX512)
#define CG_DEFINE_NONFINITE(SFX, T, IV, EXP, LANES, MASK, CMP)                      \
    static inline int cg_nonfinite_##SFX(const T *p, ptrdiff_t n) {                \
        const __m512i exp = (__m512i)((IV){0} + EXP);                               \
        MASK found = 0;                                                             \
        ptrdiff_t i = 0;                                                            \
        for (; i + LANES <= n; i += LANES)                                          \
            found |= CMP(_mm512_and_si512((__m512i)cg_load_##SFX(p + i), exp), exp); \
        if (i < n)                                                                  \
            found |= CMP(_mm512_and_si512((__m512i)cg_load_partial_##SFX(p + i, (int)(n - i)), exp), exp); \
        return found != 0;                                                          \
    }
#else
/* (vector compares of the exponent bits, any lane's found at the end) */
#define CG_DEFINE_NONFINITE(SFX, T, IV, EXP, LANES, MASK, CMP)                      \
    static inline int cg_nonfinite_##SFX(const T *p, ptrdiff_t n) {                \
        const IV exp = (IV){0} + EXP;                                               \
        IV found = {0}, bits;                                                       \
        ptrdiff_t i = 0;                                                            \
        for (; i + LANES <= n; i += LANES) {                                        \
            memcpy(&bits, p + i, sizeof bits);                                      \
            found |= (bits & exp) == exp;                                           \
        }                                                                           \
        if (i < n) {                                                                \
            cg_v##SFX v = cg_load_partial_##SFX(p + i, (int)(n - i));               \
            memcpy(&bits, &v, sizeof bits);                                         \
            found |= (bits & exp) == exp;                                           \
        }                                                                           \
        for (int l = 0; l < LANES; l++) if (found[l]) return 1;                     \
        return 0;                                                                   \
    }
#endif

/* The first of the next n items of a share's counter (see the kernels' _run_claimed):
 * nothing is published through it (a share's input was written before the parallel
 * region, and each item writes its own outputs), so relaxed. */
static inline ptrdiff_t cg_claim(ptrdiff_t *next, ptrdiff_t n) { return __atomic_fetch_add(next, n, __ATOMIC_RELAXED); }
/* Tells gcc that memory may have changed, so values read from memory inside a loop
 * are re-read rather than hoisted into (too many) registers. */
static inline void cg_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }
/* cg_in_register(v): v stays in a register from here on.  gcc otherwise folds the weight
 * loads of a channel-vector tile with few accumulators (3 or 4 pixels on AVX2) into every
 * multiply-add as a memory operand, so the tile loads each weight vector once per pixel
 * instead of once per channel and waits on its loads.  (Only where a vector is one
 * register; elsewhere it does nothing.) */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(CG_AVX512) || defined(CG_AVX2) || CG_VECTOR_BYTES == 16)
#define cg_in_register(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__) && CG_VECTOR_BYTES == 16
#define cg_in_register(v) __asm__("" : "+w"(v))
#else
#define cg_in_register(v) ((void)0)
#endif
static inline void cg_prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

CG_DEFINE_VECTOR_OPS(f32, float, cg_vf32, CG_LANES_F32)
CG_DEFINE_VECTOR_OPS(f64, double, cg_vf64, CG_LANES_F64)
CG_DEFINE_COPY(f32, float, CG_LANES_F32)
CG_DEFINE_COPY(f64, double, CG_LANES_F64)
CG_DEFINE_NONFINITE(f32, float, cg_vi32, 0x7f800000, CG_LANES_F32, __mmask16, _mm512_cmpeq_epi32_mask)
CG_DEFINE_NONFINITE(f64, double, cg_vi64, 0x7ff0000000000000LL, CG_LANES_F64, __mmask8, _mm512_cmpeq_epi64_mask)

/* even[k] = src[2k], odd[k] = src[2k + 1] for k < n: a row split into its two column
 * phases (stride-2 layers' padded planes, see convgen._layout), reading each source
 * vector once for both.  AVX2: two in-lane shuffles and two 64-bit permutes per pair
 * of output vectors (gcc's own two-source shuffles of the plain loop took two
 * permutes and a blend per output vector, and a second pass over the row). */
#if defined(CG_AVX2)
static inline void cg_deinterleave_f32(float *even, float *odd, const float *src, ptrdiff_t n) {
    ptrdiff_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 a = _mm256_loadu_ps(src + 2 * k), b = _mm256_loadu_ps(src + 2 * k + 8);
        __m256d e = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), o = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd));
        _mm256_storeu_ps(even + k, _mm256_castpd_ps(_mm256_permute4x64_pd(e, 0xd8)));
        _mm256_storeu_ps(odd + k, _mm256_castpd_ps(_mm256_permute4x64_pd(o, 0xd8)));
    }
    for (; k < n; k++) { even[k] = src[2 * k]; odd[k] = src[2 * k + 1]; }
}
static inline void cg_deinterleave_f64(double *even, double *odd, const double *src, ptrdiff_t n) {
    ptrdiff_t k = 0;
    for (; k + 4 <= n; k += 4) {
        __m256d a = _mm256_loadu_pd(src + 2 * k), b = _mm256_loadu_pd(src + 2 * k + 4);
        _mm256_storeu_pd(even + k, _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xd8));
        _mm256_storeu_pd(odd + k, _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), 0xd8));
    }
    for (; k < n; k++) { even[k] = src[2 * k]; odd[k] = src[2 * k + 1]; }
}
#else
/* (two-source shuffles: AVX-512's vpermt2ps, one per output vector) */
#define CG_DEFINE_DEINTERLEAVE(SFX, T, IV, LANES)                                   \
    static inline void cg_deinterleave_##SFX(T *even, T *odd, const T *src, ptrdiff_t n) { \
        IV ie, io;                                                                  \
        for (int l = 0; l < LANES; l++) { ie[l] = 2 * l; io[l] = 2 * l + 1; }       \
        ptrdiff_t k = 0;                                                            \
        for (; k + LANES <= n; k += LANES) {                                        \
            cg_v##SFX a = cg_load_##SFX(src + 2 * k), b = cg_load_##SFX(src + 2 * k + LANES); \
            cg_store_##SFX(even + k, __builtin_shuffle(a, b, ie));                   \
            cg_store_##SFX(odd + k, __builtin_shuffle(a, b, io));                    \
        }                                                                           \
        for (; k < n; k++) { even[k] = src[2 * k]; odd[k] = src[2 * k + 1]; }       \
    }
CG_DEFINE_DEINTERLEAVE(f32, float, cg_vi32, CG_LANES_F32)
CG_DEFINE_DEINTERLEAVE(f64, double, cg_vi64, CG_LANES_F64)
#endif

/* The lanes of a vector of flat-grid pixels (the first at row oh, column ow of rows We
 * wide; ow may be >= We) that are real output pixels (column < OW, row < OH), as a bit
 * mask; *dest: the dense index oh * OW + ow of the first of them.  Consecutive real
 * pixels have consecutive dense indices, so the masked lanes, compressed, are one run. */
static inline unsigned cg_real_lanes(ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t We, ptrdiff_t OW, ptrdiff_t OH,
                                     int lanes, ptrdiff_t *dest) {
    unsigned m = 0;
    ptrdiff_t l = 0;
    *dest = 0;
    while (ow >= We) { ow -= We; oh++; }
    while (l < lanes && oh < OH) {
        if (ow < OW) {
            ptrdiff_t n = OW - ow < lanes - l ? OW - ow : lanes - l;
            if (!m) *dest = oh * OW + ow;
            m |= ((1u << n) - 1) << l;
        }
        l += We - ow; ow = 0; oh++;
    }
    return m;
}

/* cg_real_lanes for the vector whose first lane is flat pixel q, which may be negative:
 * lanes before pixel 0 are not real (a 1x1 layer's input read in place from the cache
 * line before its first pixel: see CorrArgs.x_shift). */
static inline unsigned cg_real_lanes_before(ptrdiff_t q, ptrdiff_t We, ptrdiff_t OW, ptrdiff_t OH, int lanes,
                                            ptrdiff_t *dest) {
    *dest = 0;
    if (q >= 0) return cg_real_lanes(q / We, q % We, We, OW, OH, lanes, dest);
    if (q + lanes <= 0) return 0;
    return cg_real_lanes(0, 0, We, OW, OH, lanes + (int)q, dest) << (-q);
}

/* The lanes of v that mask m names, in order, stored as one run at p: a whole vector
 * when m names them all, else AVX-512's compress and one masked store (AVX2: a permute
 * from a table and one masked store; baseline: lane by lane). */
#if defined(CG_AVX512)
static inline void cg_store_compressed_f32(float *p, cg_vf32 v, unsigned m) {
    if (m == 0xFFFFu) cg_store_f32(p, v);
    else if (m) _mm512_mask_storeu_ps(p, (__mmask16)((1u << __builtin_popcount(m)) - 1),
                                      _mm512_maskz_compress_ps((__mmask16)m, (__m512)v));
}
static inline void cg_store_compressed_f64(double *p, cg_vf64 v, unsigned m) {
    if (m == 0xFFu) cg_store_f64(p, v);
    else if (m) _mm512_mask_storeu_pd(p, (__mmask8)((1u << __builtin_popcount(m)) - 1),
                                      _mm512_maskz_compress_pd((__mmask8)m, (__m512d)v));
}
#elif defined(CG_AVX2)
/* AVX2 has no compress: a permute from a table brings the set lanes to the front (each
 * entry, one per mask, packs their indices a byte each; the float64 lanes move as pairs
 * of float32 lanes), then one masked store of as many lanes.  (A masked store per run
 * of set lanes took two for a vector across a row's end; lane by lane, the 7x7 stem's
 * tiles spent a fifth of their time in stores.) */
#define CG_CI_F32(m, l) (((m) >> (l) & 1) ? (unsigned long long)(l) << (8 * __builtin_popcount((m) & ((1u << (l)) - 1))) : 0ull)
#define CG_CI_F64(m, l) (((m) >> (l) & 1) ? (unsigned long long)(2 * (l) | (2 * (l) + 1) << 8) \
                                             << (16 * __builtin_popcount((m) & ((1u << (l)) - 1))) : 0ull)
#define CG_CI32(m) (CG_CI_F32(m, 0) | CG_CI_F32(m, 1) | CG_CI_F32(m, 2) | CG_CI_F32(m, 3) | \
                    CG_CI_F32(m, 4) | CG_CI_F32(m, 5) | CG_CI_F32(m, 6) | CG_CI_F32(m, 7))
#define CG_CI64(m) (CG_CI_F64(m, 0) | CG_CI_F64(m, 1) | CG_CI_F64(m, 2) | CG_CI_F64(m, 3))
#define CG_CI32_2(m) CG_CI32(m), CG_CI32((m) + 1)
#define CG_CI32_4(m) CG_CI32_2(m), CG_CI32_2((m) + 2)
#define CG_CI32_8(m) CG_CI32_4(m), CG_CI32_4((m) + 4)
#define CG_CI32_16(m) CG_CI32_8(m), CG_CI32_8((m) + 8)
#define CG_CI32_32(m) CG_CI32_16(m), CG_CI32_16((m) + 16)
#define CG_CI32_64(m) CG_CI32_32(m), CG_CI32_32((m) + 32)
#define CG_CI32_128(m) CG_CI32_64(m), CG_CI32_64((m) + 64)
static const unsigned long long cg_compress_f32_idx[256] = {CG_CI32_128(0), CG_CI32_128(128)};
static const unsigned long long cg_compress_f64_idx[16] = {
    CG_CI64(0), CG_CI64(1), CG_CI64(2), CG_CI64(3), CG_CI64(4), CG_CI64(5), CG_CI64(6), CG_CI64(7),
    CG_CI64(8), CG_CI64(9), CG_CI64(10), CG_CI64(11), CG_CI64(12), CG_CI64(13), CG_CI64(14), CG_CI64(15)};
#define CG_DEFINE_STORE_COMPRESSED(SFX, T, V, FULL, REG, PERMUTE_AS, MASKSTORE)             \
    static inline void cg_store_compressed_##SFX(T *p, V v, unsigned m) {                  \
        if (m == FULL) { cg_store_##SFX(p, v); return; }                                   \
        if (!m) return;                                                                    \
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)&cg_compress_##SFX##_idx[m])); \
        REG packed = (REG)_mm256_permutevar8x32_ps((__m256)(PERMUTE_AS)v, idx);          \
        MASKSTORE(p, cg_mask_##SFX(__builtin_popcount(m)), packed);                       \
    }
CG_DEFINE_STORE_COMPRESSED(f32, float, cg_vf32, 0xFFu, __m256, __m256, _mm256_maskstore_ps)
CG_DEFINE_STORE_COMPRESSED(f64, double, cg_vf64, 0xFu, __m256d, __m256d, _mm256_maskstore_pd)
#undef CG_CI_F32
#undef CG_CI_F64
#undef CG_CI32
#undef CG_CI64
#undef CG_CI32_2
#undef CG_CI32_4
#undef CG_CI32_8
#undef CG_CI32_16
#undef CG_CI32_32
#undef CG_CI32_64
#undef CG_CI32_128
#undef CG_DEFINE_STORE_COMPRESSED
#else
#define CG_DEFINE_STORE_COMPRESSED(SFX, T, V, LANES)                               \
    static inline void cg_store_compressed_##SFX(T *p, V v, unsigned m) {          \
        int k = 0;                                                                 \
        for (int l = 0; l < LANES; l++) if (m >> l & 1) p[k++] = v[l];             \
    }
CG_DEFINE_STORE_COMPRESSED(f32, float, cg_vf32, CG_LANES_F32)
CG_DEFINE_STORE_COMPRESSED(f64, double, cg_vf64, CG_LANES_F64)
#endif

/* Transposed store of a block held as column vectors: cols[c] holds column c, lane l
 * being row l.  Writes (or, with accumulate, adds to) dst[l * stride + c] for
 * l < n_rows and c < n_cols (both <= the lane count).  The transpose runs in
 * registers as log2(lanes) rounds of two-vector shuffles (round b swaps bit b of the
 * row with bit b of the lane), so each row leaves as one contiguous store instead
 * of n_cols scattered scalar stores. */
#define CG_MASKS_16(S) \
    {(0&S)?16+0-S:0, (1&S)?16+1-S:1, (2&S)?16+2-S:2, (3&S)?16+3-S:3, (4&S)?16+4-S:4, (5&S)?16+5-S:5, \
     (6&S)?16+6-S:6, (7&S)?16+7-S:7, (8&S)?16+8-S:8, (9&S)?16+9-S:9, (10&S)?16+10-S:10, (11&S)?16+11-S:11, \
     (12&S)?16+12-S:12, (13&S)?16+13-S:13, (14&S)?16+14-S:14, (15&S)?16+15-S:15}, \
    {(0&S)?16+0:0+S, (1&S)?16+1:1+S, (2&S)?16+2:2+S, (3&S)?16+3:3+S, (4&S)?16+4:4+S, (5&S)?16+5:5+S, \
     (6&S)?16+6:6+S, (7&S)?16+7:7+S, (8&S)?16+8:8+S, (9&S)?16+9:9+S, (10&S)?16+10:10+S, (11&S)?16+11:11+S, \
     (12&S)?16+12:12+S, (13&S)?16+13:13+S, (14&S)?16+14:14+S, (15&S)?16+15:15+S}
#define CG_MASKS_8(S) \
    {(0&S)?8+0-S:0, (1&S)?8+1-S:1, (2&S)?8+2-S:2, (3&S)?8+3-S:3, (4&S)?8+4-S:4, (5&S)?8+5-S:5, \
     (6&S)?8+6-S:6, (7&S)?8+7-S:7}, \
    {(0&S)?8+0:0+S, (1&S)?8+1:1+S, (2&S)?8+2:2+S, (3&S)?8+3:3+S, (4&S)?8+4:4+S, (5&S)?8+5:5+S, \
     (6&S)?8+6:6+S, (7&S)?8+7:7+S}
#define CG_MASKS_4(S) \
    {(0&S)?4+0-S:0, (1&S)?4+1-S:1, (2&S)?4+2-S:2, (3&S)?4+3-S:3}, \
    {(0&S)?4+0:0+S, (1&S)?4+1:1+S, (2&S)?4+2:2+S, (3&S)?4+3:3+S}
#define CG_MASKS_2(S) {(0&S)?2+0-S:0, (1&S)?2+1-S:1}, {(0&S)?2+0:0+S, (1&S)?2+1:1+S}

#define CG_TRANSPOSE_ROUND(V, r, S, LO, HI, LANES)                               \
    for (int i_ = 0; i_ < LANES; i_++) if (!(i_ & S)) {                         \
        V lo_ = __builtin_shuffle(r[i_], r[i_ + S], LO);                         \
        V hi_ = __builtin_shuffle(r[i_], r[i_ + S], HI);                         \
        r[i_] = lo_; r[i_ + S] = hi_;                                           \
    }

/* The columns, zero past n_cols, as the rows of the block to transpose (a full
 * block has its own copy of the loop, free of per-column tests). */
#define CG_LOAD_COLUMNS(V, r, LANES)                                            \
    V r[LANES];                                                                 \
    if (n_cols == LANES) for (int c = 0; c < LANES; c++) r[c] = cols[c];        \
    else for (int c = 0; c < LANES; c++) r[c] = c < n_cols ? cols[c] : (V){0};

/* The transposed block's rows, n_cols values each, stored (or added) stride apart:
 * whole vectors, or masked ones (a variable-length memcpy would be a libc call). */
#define CG_STORE_ROWS(SFX, r, LANES)                                            \
    if (n_rows == LANES && n_cols == LANES && !accumulate) {                    \
        for (int l = 0; l < LANES; l++) cg_store_##SFX(dst + l * stride, r[l]); \
        return;                                                                 \
    }                                                                           \
    for (int l = 0; l < n_rows; l++) {                                          \
        if (n_cols == LANES) {                                                  \
            cg_store_##SFX(dst + l * stride, accumulate ? cg_load_##SFX(dst + l * stride) + r[l] : r[l]); \
        } else {                                                                \
            cg_store_partial_##SFX(dst + l * stride, accumulate ?               \
                cg_load_partial_##SFX(dst + l * stride, n_cols) + r[l] : r[l], n_cols); \
        }                                                                       \
    }

/* The rounds of a LANES x LANES transpose of r, in place (IV: the integer vector of the
 * same width, for the shuffles' masks). */
#define CG_TRANSPOSE_16(V, IV, r) {                                             \
    static const IV m1[2] = {CG_MASKS_16(1)}, m2[2] = {CG_MASKS_16(2)},         \
                    m4[2] = {CG_MASKS_16(4)}, m8[2] = {CG_MASKS_16(8)};         \
    CG_TRANSPOSE_ROUND(V, r, 1, m1[0], m1[1], 16)                               \
    CG_TRANSPOSE_ROUND(V, r, 2, m2[0], m2[1], 16)                               \
    CG_TRANSPOSE_ROUND(V, r, 4, m4[0], m4[1], 16)                               \
    CG_TRANSPOSE_ROUND(V, r, 8, m8[0], m8[1], 16)                               \
}
#define CG_TRANSPOSE_8(V, IV, r) {                                              \
    static const IV m1[2] = {CG_MASKS_8(1)}, m2[2] = {CG_MASKS_8(2)}, m4[2] = {CG_MASKS_8(4)}; \
    CG_TRANSPOSE_ROUND(V, r, 1, m1[0], m1[1], 8)                                \
    CG_TRANSPOSE_ROUND(V, r, 2, m2[0], m2[1], 8)                                \
    CG_TRANSPOSE_ROUND(V, r, 4, m4[0], m4[1], 8)                                \
}
#define CG_TRANSPOSE_4(V, IV, r) {                                              \
    static const IV m1[2] = {CG_MASKS_4(1)}, m2[2] = {CG_MASKS_4(2)};           \
    CG_TRANSPOSE_ROUND(V, r, 1, m1[0], m1[1], 4)                                \
    CG_TRANSPOSE_ROUND(V, r, 2, m2[0], m2[1], 4)                                \
}
#define CG_TRANSPOSE_2(V, IV, r) {                                              \
    static const IV m1[2] = {CG_MASKS_2(1)};                                    \
    CG_TRANSPOSE_ROUND(V, r, 1, m1[0], m1[1], 2)                                \
}
/* ... the one for each dtype's lanes (a literal: the macros above are named by it) */
#if CG_VECTOR_BYTES == 64
#define CG_TRANSPOSE_F32(r) CG_TRANSPOSE_16(cg_vf32, cg_vi32, r)
#define CG_TRANSPOSE_F64(r) CG_TRANSPOSE_8(cg_vf64, cg_vi64, r)
#elif CG_VECTOR_BYTES == 32 && defined(CG_AVX2)
/* AVX2's own: gcc builds the generic rounds' two-source shuffles from two or three
 * instructions each (67 shuffles and blends per 8x8 block, objdump), where unpacks,
 * in-lane shuffles and 128-bit permutes take 24 (float32) and 8 (float64).  The
 * transposes pack the input into pixel-major blocks (the depthwise strided forward
 * spent 42% of its time there) and store the channel-vector tiles' results. */
static inline void cg_transpose_f32_avx2(cg_vf32 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps((__m256)r[i], (__m256)r[i + 1]);       /* a0 b0 a1 b1 | a4 b4 a5 b5 */
        t[i + 1] = _mm256_unpackhi_ps((__m256)r[i], (__m256)r[i + 1]);   /* a2 b2 a3 b3 | a6 b6 a7 b7 */
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);       /* a0 b0 c0 d0 | a4 b4 c4 d4 */
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);   /* a1 b1 c1 d1 | a5 .. */
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = (cg_vf32)_mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = (cg_vf32)_mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
static inline void cg_transpose_f64_avx2(cg_vf64 *r) {
    __m256d t0 = _mm256_unpacklo_pd((__m256d)r[0], (__m256d)r[1]);   /* a0 b0 | a2 b2 */
    __m256d t1 = _mm256_unpackhi_pd((__m256d)r[0], (__m256d)r[1]);   /* a1 b1 | a3 b3 */
    __m256d t2 = _mm256_unpacklo_pd((__m256d)r[2], (__m256d)r[3]);
    __m256d t3 = _mm256_unpackhi_pd((__m256d)r[2], (__m256d)r[3]);
    r[0] = (cg_vf64)_mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = (cg_vf64)_mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = (cg_vf64)_mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = (cg_vf64)_mm256_permute2f128_pd(t1, t3, 0x31);
}
#define CG_TRANSPOSE_F32(r) { cg_transpose_f32_avx2(r); }
#define CG_TRANSPOSE_F64(r) { cg_transpose_f64_avx2(r); }
#elif CG_VECTOR_BYTES == 32
#define CG_TRANSPOSE_F32(r) CG_TRANSPOSE_8(cg_vf32, cg_vi32, r)
#define CG_TRANSPOSE_F64(r) CG_TRANSPOSE_4(cg_vf64, cg_vi64, r)
#else
#define CG_TRANSPOSE_F32(r) CG_TRANSPOSE_4(cg_vf32, cg_vi32, r)
#define CG_TRANSPOSE_F64(r) CG_TRANSPOSE_2(cg_vf64, cg_vi64, r)
#endif

#define CG_STORE_TRANSPOSED(SFX, V, LANES, TRANSPOSE) {                         \
    CG_LOAD_COLUMNS(V, r, LANES)                                                \
    TRANSPOSE(r)                                                                \
    CG_STORE_ROWS(SFX, r, LANES)                                                \
}
#define CG_STORE_TRANSPOSED_F32 CG_STORE_TRANSPOSED(f32, cg_vf32, CG_LANES_F32, CG_TRANSPOSE_F32)
#define CG_STORE_TRANSPOSED_F64 CG_STORE_TRANSPOSED(f64, cg_vf64, CG_LANES_F64, CG_TRANSPOSE_F64)

static inline void cg_store_transposed_f32(float *dst, ptrdiff_t stride, const cg_vf32 *cols,
                                           int n_cols, int n_rows, int accumulate) CG_STORE_TRANSPOSED_F32
static inline void cg_store_transposed_f64(double *dst, ptrdiff_t stride, const cg_vf64 *cols,
                                           int n_cols, int n_rows, int accumulate) CG_STORE_TRANSPOSED_F64

/* The same, always inlined: for the weight gradient's channel-vectorised tile, where gcc
 * otherwise makes it a call per tile (5% slower on 7x7 maps).  (Forced into every tile,
 * the forward and input-gradient modules' among them, it made the build about 40 s longer.) */
static inline __attribute__((always_inline)) void
cg_store_transposed_inlined_f32(float *dst, ptrdiff_t stride, const cg_vf32 *cols, int n_cols, int n_rows,
                                int accumulate) CG_STORE_TRANSPOSED_F32
static inline __attribute__((always_inline)) void
cg_store_transposed_inlined_f64(double *dst, ptrdiff_t stride, const cg_vf64 *cols, int n_cols, int n_rows,
                                int accumulate) CG_STORE_TRANSPOSED_F64

/* The reverse: rows[l] (l < n_rows) holds n_cols values at src + l * stride (zero past
 * them); out[c] receives column c, lane l being row l.  Used to turn lanes-many
 * channels' pixel rows into per-pixel vectors of channels.  (A full block has its own
 * copy of the loads, free of per-row tests.) */
#define CG_LOAD_ROWS(SFX, V, r, LANES)                                          \
    if (n_rows == LANES && n_cols == LANES)                                     \
        for (int l = 0; l < LANES; l++) r[l] = cg_load_##SFX(src + l * stride); \
    else for (int l = 0; l < LANES; l++)                                        \
        r[l] = l >= n_rows ? (V){0} : n_cols == LANES ? cg_load_##SFX(src + l * stride) \
                                                      : cg_load_partial_##SFX(src + l * stride, n_cols);

static inline void cg_load_transposed_f32(const float *src, ptrdiff_t stride, int n_rows, int n_cols,
                                          cg_vf32 *r) {
    CG_LOAD_ROWS(f32, cg_vf32, r, CG_LANES_F32)
    CG_TRANSPOSE_F32(r)
}

static inline void cg_load_transposed_f64(const double *src, ptrdiff_t stride, int n_rows, int n_cols,
                                          cg_vf64 *r) {
    CG_LOAD_ROWS(f64, cg_vf64, r, CG_LANES_F64)
    CG_TRANSPOSE_F64(r)
}

/* The first n (<= lanes) values p[0], p[stride], p[2 * stride], ... (zeros after): an
 * AVX-512 masked gather where the build has it, else element by element.  (The input
 * gradient's weight pack: each output channel's taps are contiguous, so a vector of
 * channels for one tap lies `taps` values apart.)  stride * lanes must fit an int. */
#if defined(CG_AVX512)
static inline cg_vf32 cg_load_strided_f32(const float *p, ptrdiff_t stride, int n) {
    __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int)stride));
    return (cg_vf32)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)((1u << n) - 1), idx, p, 4);
}
static inline cg_vf64 cg_load_strided_f64(const double *p, ptrdiff_t stride, int n) {
    __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)stride));
    return (cg_vf64)_mm512_mask_i32gather_pd(_mm512_setzero_pd(), (__mmask8)((1u << n) - 1), idx, p, 8);
}
#else
static inline cg_vf32 cg_load_strided_f32(const float *p, ptrdiff_t stride, int n) {
    cg_vf32 v = {0};
    for (int l = 0; l < n; l++) v[l] = p[l * stride];
    return v;
}
static inline cg_vf64 cg_load_strided_f64(const double *p, ptrdiff_t stride, int n) {
    cg_vf64 v = {0};
    for (int l = 0; l < n; l++) v[l] = p[l * stride];
    return v;
}
#endif

/* v's floats added, each widened to a double, into lo (the first half of its lanes) and
 * hi (the second): long float32 sums kept in float64 (the bias gradient's: see _layout's
 * channel sums). */
#if defined(CG_AVX512)
static inline void cg_add_widened_f32(cg_vf64 *lo, cg_vf64 *hi, cg_vf32 v) {
    __m512 w = (__m512)v;
    *lo += (cg_vf64)_mm512_cvtps_pd(_mm512_castps512_ps256(w));
    *hi += (cg_vf64)_mm512_cvtps_pd((__m256)_mm512_extractf64x4_pd((__m512d)w, 1));
}
#else
typedef float cg_vf32_half __attribute__((vector_size(CG_VECTOR_BYTES / 2)));
static inline void cg_add_widened_f32(cg_vf64 *lo, cg_vf64 *hi, cg_vf32 v) {
#if CG_VECTOR_BYTES == 64
    cg_vf32_half a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    cg_vf32_half b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif CG_VECTOR_BYTES == 32
    cg_vf32_half a = __builtin_shufflevector(v, v, 0, 1, 2, 3);
    cg_vf32_half b = __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
    cg_vf32_half a = __builtin_shufflevector(v, v, 0, 1);
    cg_vf32_half b = __builtin_shufflevector(v, v, 2, 3);
#endif
    *lo += __builtin_convertvector(a, cg_vf64);
    *hi += __builtin_convertvector(b, cg_vf64);
}
#endif

/* A long sum kept in float64 (the depthwise weight gradient's bias sums, summed as it
 * reads grad_output): vectors of float32 or float64 added in, float32 lanes widened. */
typedef struct { cg_vf64 lo, hi; } cg_wide_sum;
static inline cg_wide_sum cg_wide_zero(void) { cg_wide_sum s = {{0}, {0}}; return s; }
static inline void cg_wide_add_f32(cg_wide_sum *s, cg_vf32 v) { cg_add_widened_f32(&s->lo, &s->hi, v); }
static inline void cg_wide_add_f64(cg_wide_sum *s, cg_vf64 v) { s->lo += v; }
static inline double cg_wide_total(cg_wide_sum s) { return cg_hsum_f64(s.lo + s.hi); }

#endif
