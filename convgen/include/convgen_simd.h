/* Portable 512-bit vectors for the generated kernels (GCC/Clang vector extensions).
 *
 * Built with -march=native on an AVX-512 machine these are single zmm registers and
 * `acc + x * w` contracts to one vfmadd (with an embedded broadcast when w is a scalar
 * in memory); in a portable build the compiler splits them into narrower vectors.
 * Hand-written, not generated: the templates only call these few helpers.
 */
#ifndef CONVGEN_SIMD_H
#define CONVGEN_SIMD_H

#include <string.h>

typedef float cg_vf32 __attribute__((vector_size(64)));
typedef double cg_vf64 __attribute__((vector_size(64)));

#define CG_DEFINE_VECTOR_OPS(SFX, T, V, LANES)                                   \
    static inline V cg_load_##SFX(const T *p) { V v; memcpy(&v, p, sizeof v); return v; } \
    static inline void cg_store_##SFX(T *p, V v) { memcpy(p, &v, sizeof v); }   \
    static inline V cg_splat_##SFX(T a) { V v = {0}; return v + a; }             \
    /* acc + x * w with w broadcast: one FMA */                                   \
    static inline V cg_fma_##SFX(V acc, V x, T w) { return acc + x * w; }       \
    static inline V cg_fmav_##SFX(V acc, V x, V y) { return acc + x * y; }      \
    /* Horizontal sum in a fixed (tree) order, so results do not depend on threads. */ \
    static inline T cg_hsum_##SFX(V v) {                                          \
        T a[LANES]; memcpy(a, &v, sizeof v);                                       \
        for (int w = LANES / 2; w > 0; w /= 2)                                     \
            for (int i = 0; i < w; i++) a[i] += a[i + w];                          \
        return a[0];                                                               \
    }

/* Tells gcc that memory may have changed, so values read from memory inside a loop
 * are re-read rather than hoisted into (too many) registers. */
static inline void cg_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }

CG_DEFINE_VECTOR_OPS(f32, float, cg_vf32, 16)
CG_DEFINE_VECTOR_OPS(f64, double, cg_vf64, 8)

#endif
