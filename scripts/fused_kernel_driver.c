/* Drives s4mc/kernels/fused_pl.c alone on the embedded benchmark's shape (8 x 11 x 64 x 64, 10% invalid
 * pixels, peaked random probabilities), for scripts/fused_kernel_count.sh: its time by phase, min of N
 * calls, and, under callgrind, its instruction count (docs/performance.md, the memory-bandwidth goal).
 * The training path does not use this file. */
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
int s4mc_fused_pseudo_label(const float *p, const uint8_t *valid, const int64_t *gt, int64_t B, int64_t C, int64_t H, int64_t W,
    int margin, int use_dpa, double alpha, float gamma_fixed, int refine_enabled, int64_t ignore_index, int64_t *label, uint8_t *keep,
    float *kr, float *kf, float *stats, double *phase, float *scratch);
int64_t s4mc_fused_scratch_floats(int64_t B, int64_t C, int64_t H, int64_t W);
int s4mc_fused_variant(void);
int main(int argc, char **argv) {
    int64_t B = 8, C = 11, H = 64, W = 64, HW = H * W, n = B * HW;
    int reps = argc > 1 ? atoi(argv[1]) : 1;
    float *p = malloc(sizeof(float) * B * C * HW); uint8_t *v = malloc(n), *keep = malloc(n);
    int64_t *gt = malloc(8 * n), *lab = malloc(8 * n); float *kr = malloc(4 * n), *kf = malloc(4 * n), st[5]; double ph[3];
    float *scr = malloc(sizeof(float) * s4mc_fused_scratch_floats(B, C, H, W));
    srand(0);
    for (int64_t b = 0; b < B; b++) for (int64_t i = 0; i < HW; i++) {
        float s = 0; for (int64_t c = 0; c < C; c++) { float e = (float)rand() / RAND_MAX; e = e * e * e * e; p[(b * C + c) * HW + i] = e; s += e; }
        for (int64_t c = 0; c < C; c++) p[(b * C + c) * HW + i] /= s;
        v[b * HW + i] = rand() % 10 != 0; gt[b * HW + i] = rand() % C;
    }
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    for (int r = 0; r < reps; r++) {
        s4mc_fused_pseudo_label(p, v, gt, B, C, H, W, 1, 1, 0.36, 0.f, 1, 255, lab, keep, kr, kf, st, ph, scr);
        double all = ph[0] + ph[1] + ph[2];
        for (int i = 0; i < 3; i++) if (ph[i] < best[i]) best[i] = ph[i];
        if (all < best[3]) best[3] = all;
    }
    printf("%s body: whole call min %.4f ms; phases min: scan %.4f, selection %.4f, counting %.4f ms\n",
           s4mc_fused_variant() == 512 ? "AVX-512" : "portable", best[3] * 1e3, best[0] * 1e3, best[1] * 1e3, best[2] * 1e3);
    return 0;
}
