/* How many 512-bit vector operations of each kind the CPU retires per cycle, for the bound in
 * docs/performance.md ("The memory-bandwidth goal"): the AVX-512 scan needs a fixed number of them per
 * 16 probabilities, so their throughput bounds the scan from below whatever the memory does. The
 * clock is estimated from a chain of dependent integer adds (one per cycle). x86-64 with AVX-512 only;
 * scripts/fused_kernel_count.sh builds and runs it. The training path does not use this file. */
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
    return x == 42;
}
