/* How many 512-bit vector operations of each kind the CPU retires per cycle, for the bound in
 * docs/performance.md ("The memory-bandwidth goal"): the AVX-512 scan needs a fixed number of them per
 * 16 probabilities, so their throughput bounds the scan from below whatever the memory does. Then the
 * AVX-512 body's class step (s4mc/kernels/fused_pl_avx512.h, emit_row) on values held in registers:
 * its arithmetic alone, without loads, ring or row ends. The clock is estimated from a chain of
 * dependent integer adds (one per cycle). x86-64 with AVX-512 only (build with -march=native);
 * scripts/fused_kernel_count.sh builds and runs it. The training path does not use this file. */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#define N 50000000L
/* twelve independent accumulators, so the throughput, not the latency, is measured */
#define X12(op, r) op " %%" r "16,%%" r "0,%%" r "0\n" op " %%" r "16,%%" r "1,%%" r "1\n" op " %%" r "16,%%" r "2,%%" r "2\n" \
    op " %%" r "16,%%" r "3,%%" r "3\n" op " %%" r "16,%%" r "4,%%" r "4\n" op " %%" r "16,%%" r "5,%%" r "5\n" \
    op " %%" r "16,%%" r "6,%%" r "6\n" op " %%" r "16,%%" r "7,%%" r "7\n" op " %%" r "16,%%" r "8,%%" r "8\n" \
    op " %%" r "16,%%" r "9,%%" r "9\n" op " %%" r "16,%%" r "10,%%" r "10\n" op " %%" r "16,%%" r "11,%%" r "11\n"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm16"
#define PER_CYCLE(name, body)                                                             \
    do {                                                                                  \
        double t = now();                                                                 \
        for (long n = 0; n < N; n++) __asm__ volatile(body ::: CLOBBER);                  \
        printf("  %-34s %.2f per cycle\n", name, 12.0 * N / ((now() - t) * ghz * 1e9));  \
    } while (0)

/* emit_row's class loop, operation for operation, with the neighbour rows and p in registers */
static double class_step_ns(void)
{
    const long strips = 20000000L;
    const int C = 11;
    __m512 hx = _mm512_set1_ps(0.3f), hu = _mm512_set1_ps(0.2f), hd = _mm512_set1_ps(0.1f);
    const __m512 p0 = _mm512_set1_ps(0.05f), step = _mm512_set1_ps(1e-9f), ninf = _mm512_set1_ps(-INFINITY);
    const __m512i one = _mm512_set1_epi32(1);
    __m512 acc = _mm512_setzero_ps();
    __m512i lacc = _mm512_setzero_si512();
    double t = now();
    for (long n = 0; n < strips; n++) {
        __m512 t1 = ninf, t2 = ninf, u1 = ninf, u2 = ninf, pv = p0;
        __m512i lab = _mm512_setzero_si512(), cv = lab;
        for (int c = 0; c < C; c++) {
            __asm__ volatile("" : "+v"(pv), "+v"(hx), "+v"(hu), "+v"(hd));  /* no hoisting out of the loop */
            const __m512 m = _mm512_max_ps(_mm512_max_ps(hx, hu), hd);
            const __m512 rf = _mm512_add_ps(_mm512_sub_ps(m, _mm512_mul_ps(pv, m)), pv);
            lab = _mm512_mask_mov_epi32(lab, _mm512_cmp_ps_mask(pv, t1, _CMP_NLE_UQ), cv);
            t2 = _mm512_max_ps(t2, _mm512_min_ps(t1, pv));
            t1 = _mm512_max_ps(t1, pv);
            u2 = _mm512_max_ps(u2, _mm512_min_ps(u1, rf));
            u1 = _mm512_max_ps(u1, rf);
            cv = _mm512_add_epi32(cv, one);
            pv = _mm512_add_ps(pv, step);  /* a new p each class, as loaded in the kernel */
        }
        acc = _mm512_add_ps(acc, _mm512_add_ps(_mm512_sub_ps(t1, t2), _mm512_sub_ps(u1, u2)));
        lacc = _mm512_add_epi32(lacc, lab);
    }
    const double ns = (now() - t) / (double)(strips * C) * 1e9;
    return ns + 0.0 * (double)(_mm512_reduce_add_ps(acc) + (float)_mm512_reduce_add_epi32(lacc));
}

int main(void)
{
    long x = 0;
    double t = now();
    for (long i = 0; i < 1000000000L; i++) __asm__ volatile("add $1, %0" : "+r"(x));
    const double ghz = 1.0 / (now() - t);
    printf("clock ~%.2f GHz (10^9 dependent adds)\n", ghz);
    PER_CYCLE("vmaxps zmm (max, min)", X12("vmaxps", "zmm"));
    PER_CYCLE("vmulps zmm", X12("vmulps", "zmm"));
    PER_CYCLE("vaddps zmm (add, sub)", X12("vaddps", "zmm"));
    PER_CYCLE("vpmaxsd zmm (integer max)", X12("vpmaxsd", "zmm"));
    PER_CYCLE("vmaxps ymm", X12("vmaxps", "ymm"));
    const double ns = class_step_ns();
    printf("  the class step from registers (16 vector operations): %.2f ns = %.1f cycles per 16 probabilities\n",
           ns, ns * ghz);
    return x == 42;
}
