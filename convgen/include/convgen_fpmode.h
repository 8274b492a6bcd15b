/* The calling thread's denormal mode: whether its floating-point unit flushes denormal
 * (subnormal) numbers to zero.  convgen.set_flush_denormal sets it, like
 * torch.set_flush_denormal, and _layout.follow_flush_denormal copies it to the OpenMP
 * threads that run the kernels (each thread has its own control register).
 * Hand-written, not generated.
 */
#ifndef CONVGEN_FPMODE_H
#define CONVGEN_FPMODE_H

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* MXCSR bit 15 (FTZ) flushes denormal results to zero; bit 6 (DAZ) reads denormal
 * operands as zero.  Multiplying a denormal costs a microcode assist of ~100 cycles
 * otherwise. */
#define CG_FLUSH_BITS 0x8040ul
static inline int cg_flush_denormal_supported(void) { return 1; }
static inline unsigned long cg_flush_bits(void) { return _mm_getcsr() & CG_FLUSH_BITS; }
static inline void cg_set_flush_bits(unsigned long bits) {
    _mm_setcsr((unsigned int)((_mm_getcsr() & ~CG_FLUSH_BITS) | (bits & CG_FLUSH_BITS)));
}
#elif defined(__aarch64__)
/* FPCR bit 24 (FZ) flushes denormal operands and results to zero. */
#define CG_FLUSH_BITS (1ul << 24)
static inline unsigned long cg_fpcr(void) {
    unsigned long r;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(r));
    return r;
}
static inline int cg_flush_denormal_supported(void) { return 1; }
static inline unsigned long cg_flush_bits(void) { return cg_fpcr() & CG_FLUSH_BITS; }
static inline void cg_set_flush_bits(unsigned long bits) {
    unsigned long r = (cg_fpcr() & ~CG_FLUSH_BITS) | (bits & CG_FLUSH_BITS);
    __asm__ __volatile__("msr fpcr, %0" : : "r"(r));
}
#else
#define CG_FLUSH_BITS 0ul
static inline int cg_flush_denormal_supported(void) { return 0; }
static inline unsigned long cg_flush_bits(void) { return 0; }
static inline void cg_set_flush_bits(unsigned long bits) { (void)bits; }
#endif

/* What follow_flush_denormal last copied to this thread's OpenMP threads, and to how
 * many (0: nothing yet).  Per calling thread: each has its own pool of OpenMP threads. */
static __thread unsigned long cg_followed_bits = 0;
static __thread int cg_followed_threads = 0;

#endif
