/* How many 512-bit vector operations of each kind the CPU retires per cycle, and how many 64-byte
 * stores and loads to L1, for the bound in docs/performance.md ("The memory-bandwidth goal"): the
 * AVX-512 scan needs a fixed number of them per 16 probabilities, so their throughput bounds the scan
 * from below whatever the memory does. Float and integer forms both, because the kernel compares
 * scores in [+0, 1] as unsigned integers. Then the AVX-512 body's class step
 * (s4mc/kernels/fused_pl_avx512.h, emit_row) on values held in registers, in the kernel's integer form
 * and in the float form it replaced: its arithmetic alone, without loads, ring or row ends. The clock
 * is estimated from a chain of dependent integer adds (one per cycle). x86-64 with AVX-512 only (build
 * with -march=native); scripts/fused_kernel_count.sh builds and runs it. The training path does not use this file. */
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

/* Per ns is what was measured; per cycle divides by the clock estimate, which in a VM varied from
 * 1.9 to 3.3 GHz between runs of this program while the per-ns rates stayed within 15%. */
static void rate(const char *name, double per_s, double ghz)
{
    printf("  %-34s %.2f per ns = %.2f per cycle\n", name, per_s * 1e-9, per_s * 1e-9 / ghz);
}

#define N 50000000L
/* twelve independent accumulators, so the throughput, not the latency, is measured */
#define X12(op, r) op " %%" r "16,%%" r "0,%%" r "0\n" op " %%" r "16,%%" r "1,%%" r "1\n" op " %%" r "16,%%" r "2,%%" r "2\n" \
    op " %%" r "16,%%" r "3,%%" r "3\n" op " %%" r "16,%%" r "4,%%" r "4\n" op " %%" r "16,%%" r "5,%%" r "5\n" \
    op " %%" r "16,%%" r "6,%%" r "6\n" op " %%" r "16,%%" r "7,%%" r "7\n" op " %%" r "16,%%" r "8,%%" r "8\n" \
    op " %%" r "16,%%" r "9,%%" r "9\n" op " %%" r "16,%%" r "10,%%" r "10\n" op " %%" r "16,%%" r "11,%%" r "11\n"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm16"
/* N runs of an asm body of twelve operations, with the registers it clobbers */
#define TIMED(name, body, ...)                                                            \
    do {                                                                                  \
        double t = now();                                                                 \
        for (long n = 0; n < N; n++) __asm__ volatile(body ::: __VA_ARGS__);              \
        rate(name, 12.0 * N / (now() - t), ghz);                                          \
    } while (0)
#define PER_CYCLE(name, body) TIMED(name, body, CLOBBER)

/* emit_row's class loop, operation for operation, with the neighbour rows and p in registers: the
 * kernel's integer form (maxima, minima and the argmax compare on the bits) */
static double class_step_ns(void)
{
    const long strips = 20000000L;
    const int C = 11;
    __m512i hx = _mm512_castps_si512(_mm512_set1_ps(0.3f)), hu = _mm512_castps_si512(_mm512_set1_ps(0.2f));
    __m512i hd = _mm512_castps_si512(_mm512_set1_ps(0.1f));
    const __m512 p0 = _mm512_set1_ps(0.05f), step = _mm512_set1_ps(1e-9f);
    const __m512i one = _mm512_set1_epi32(1);
    __m512i acc = _mm512_setzero_si512(), lacc = acc;
    double t = now();
    for (long n = 0; n < strips; n++) {
        __m512i t1 = _mm512_setzero_si512(), t2 = t1, u1 = t1, u2 = t1, lab = t1, cv = t1;
        __m512 pv = p0;
        for (int c = 0; c < C; c++) {
            __asm__ volatile("" : "+v"(pv), "+v"(hx), "+v"(hu), "+v"(hd));  /* no hoisting out of the loop */
            const __m512 m = _mm512_castsi512_ps(_mm512_max_epu32(_mm512_max_epu32(hx, hu), hd));
            const __m512i pi = _mm512_castps_si512(pv);
            const __m512i rf = _mm512_castps_si512(_mm512_add_ps(_mm512_sub_ps(m, _mm512_mul_ps(pv, m)), pv));
            lab = _mm512_mask_mov_epi32(lab, _mm512_cmpgt_epu32_mask(pi, t1), cv);
            t2 = _mm512_max_epu32(t2, _mm512_min_epu32(t1, pi));
            t1 = _mm512_max_epu32(t1, pi);
            u2 = _mm512_max_epu32(u2, _mm512_min_epu32(u1, rf));
            u1 = _mm512_max_epu32(u1, rf);
            cv = _mm512_add_epi32(cv, one);
            pv = _mm512_add_ps(pv, step);  /* a new p each class, as loaded in the kernel */
        }
        acc = _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_sub_epi32(t1, t2), _mm512_sub_epi32(u1, u2)));
        lacc = _mm512_add_epi32(lacc, lab);
    }
    const double ns = (now() - t) / (double)(strips * C) * 1e9;
    return ns + 0.0 * (double)(_mm512_reduce_add_epi32(acc) + _mm512_reduce_add_epi32(lacc));
}

/* the same step in the float form the kernel used before (vmaxps, vminps, vcmpps) */
static double class_step_float_ns(void)
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
            __asm__ volatile("" : "+v"(pv), "+v"(hx), "+v"(hu), "+v"(hd));
            const __m512 m = _mm512_max_ps(_mm512_max_ps(hx, hu), hd);
            const __m512 rf = _mm512_add_ps(_mm512_sub_ps(m, _mm512_mul_ps(pv, m)), pv);
            lab = _mm512_mask_mov_epi32(lab, _mm512_cmp_ps_mask(pv, t1, _CMP_NLE_UQ), cv);
            t2 = _mm512_max_ps(t2, _mm512_min_ps(t1, pv));
            t1 = _mm512_max_ps(t1, pv);
            u2 = _mm512_max_ps(u2, _mm512_min_ps(u1, rf));
            u1 = _mm512_max_ps(u1, rf);
            cv = _mm512_add_epi32(cv, one);
            pv = _mm512_add_ps(pv, step);
        }
        acc = _mm512_add_ps(acc, _mm512_add_ps(_mm512_sub_ps(t1, t2), _mm512_sub_ps(u1, u2)));
        lacc = _mm512_add_epi32(lacc, lab);
    }
    const double ns = (now() - t) / (double)(strips * C) * 1e9;
    return ns + 0.0 * (double)(_mm512_reduce_add_ps(acc) + (float)_mm512_reduce_add_epi32(lacc));
}

/* 64-byte stores and loads (each load feeding an integer max) within 4 kB, which stays in L1 */
static float l1_buf[1024] __attribute__((aligned(64)));

static void l1_throughput(double ghz)
{
    const long reps = 20000000L;
    const __m512i v = _mm512_set1_epi32(1);
    double t = now();
    for (long n = 0; n < reps; n++) {
        for (int j = 0; j < 64; j++)
            _mm512_store_si512(l1_buf + 16 * j, v);
        __asm__ volatile("" ::"r"(l1_buf) : "memory");
    }
    rate("64-byte stores (vmovdqa32)", 64.0 * reps / (now() - t), ghz);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    t = now();
    for (long n = 0; n < reps; n++) {
        for (int j = 0; j < 64; j += 4) {
            a0 = _mm512_max_epu32(a0, _mm512_load_si512(l1_buf + 16 * j));
            a1 = _mm512_max_epu32(a1, _mm512_load_si512(l1_buf + 16 * j + 16));
            a2 = _mm512_max_epu32(a2, _mm512_load_si512(l1_buf + 16 * j + 32));
            a3 = _mm512_max_epu32(a3, _mm512_load_si512(l1_buf + 16 * j + 48));
        }
        __asm__ volatile("" ::"r"(l1_buf) : "memory");
    }
    rate("64-byte loads", 64.0 * reps / (now() - t), ghz);
    l1_buf[0] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

/* six independent compares into mask registers, twice per iteration */
#define K6(op) op " %%zmm16,%%zmm0,%%k1\n" op " %%zmm16,%%zmm1,%%k2\n" op " %%zmm16,%%zmm2,%%k3\n" \
    op " %%zmm16,%%zmm3,%%k4\n" op " %%zmm16,%%zmm4,%%k5\n" op " %%zmm16,%%zmm5,%%k6\n"
#define CLOBBER_K "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm16", "k1", "k2", "k3", "k4", "k5", "k6"
#define COMPARES_PER_CYCLE(name, body) TIMED(name, body body, CLOBBER_K)

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
    PER_CYCLE("vpmaxud zmm (unsigned max)", X12("vpmaxud", "zmm"));
    PER_CYCLE("vpminud zmm (unsigned min)", X12("vpminud", "zmm"));
    PER_CYCLE("vpaddd zmm", X12("vpaddd", "zmm"));
    PER_CYCLE("valignd zmm (lane shift)", X12("valignd $1,", "zmm"));
    PER_CYCLE("vmaxps ymm", X12("vmaxps", "ymm"));
    COMPARES_PER_CYCLE("vcmpps zmm -> k", K6("vcmpps $14,"));
    COMPARES_PER_CYCLE("vpcmpud zmm -> k", K6("vpcmpud $6,"));
    l1_throughput(ghz);
    const double ns = class_step_ns(), nsf = class_step_float_ns();
    printf("  the class step from registers (16 vector operations), integer form: %.2f ns = %.1f cycles per 16 "
           "probabilities\n", ns, ns * ghz);
    printf("  the same step in float form: %.2f ns = %.1f cycles\n", nsf, nsf * ghz);
    return x == 42;
}
