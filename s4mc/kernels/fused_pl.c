/* The paper-default S4MC pseudo-labelling call on CPU as one single-threaded C function
 * (docs/performance.md, "The fused CPU kernel"): 3x3 neighbourhood, k = 1, max selection, independent
 * joint, max or margin confidence, DPA or a fixed threshold, and the pl/... statistics.
 *
 * Eager PyTorch runs this call as ~60 kernels, ten of them full passes over B x C x H x W; this reads
 * the probabilities once. It has two bodies with the same results. Where the compiler targets
 * AVX-512 (F, BW, VL, DQ), fused_pl_avx512.h keeps each 16-pixel strip's running maxima of all classes
 * in registers and takes the neighbour maxima from a three-row ring of row maxima that stays in L1;
 * its DPA quantile is a bisection on the keys counted sixteen at a time, and its counting is
 * vectorised too. Elsewhere (or built with -DS4MC_PORTABLE, which the tests also do) plain loops that
 * the compiler vectorises do the same with per-image row maxima and a radix selection.
 * s4mc/fused_cpu.py compiles and loads it; s4mc/pseudo_label.py uses it where it applies.
 *
 * Every output equals the eager path's bit for bit (tests/test_fused_cpu.py, both bodies, on random,
 * tied, saturated and masked inputs): maxima and minima select values (x86 max(a, b) is a > b ? a : b,
 * as vmax below; the AVX-512 body takes them on the bits as unsigned integers, which order [+0, 1] as
 * floats do), p + m - p m is rounded as three operations (built with -ffp-contract=off), the DPA
 * quantile is an order statistic and the ratios are the same float32 divisions of exact counts. Input
 * outside [+0, 1] (NaN, and -0.0, whose order against +0.0 is the sorting algorithm's choice, included)
 * is reported, and the caller computes that call eagerly. Because probabilities are then >= +0 and the
 * neighbour maximum is clamped at 0, an invalid or out-of-image neighbour may count as +0, not -inf.
 *
 * Layout: probs B x C x H x W float32, valid and keep B x H x W uint8 (0 / 1), gt (or NULL) and label
 * B x H x W int64, all contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    !defined(S4MC_PORTABLE)
#define S4MC_AVX512 1
#include <immintrin.h>
#endif

#define R restrict

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline float vmax(float a, float b) { return a > b ? a : b; }
static inline float vmin(float a, float b) { return a < b ? a : b; }

/* Order-preserving map of a float onto uint32 (negatives reversed), for the selections. */
static inline uint32_t order_key(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float key_value(uint32_t k)
{
    uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The float32 bits of 1.0f. A float lies in [+0, 1] exactly when its bits, read as an unsigned
 * integer, are at most these: negatives (-0.0 among them) and NaN have larger bit patterns. */
#define ONE_BITS 0x3F800000u

static inline int in_unit(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u <= ONE_BITS;
}

/* The six counts behind the pl/... ratios: kept (refined, raw), kept and correct, kept and measurable. */
typedef struct { int64_t kf_n, kf_c, kf_m, kr_n, kr_c, kr_m; } counts_t;

#ifndef S4MC_AVX512
/* ---- The portable body ---------------------------------------------------------------------------- */

/* One class plane's contribution to one row: the neighbour maximum from the row maxima above and
 * below (hc, centre column included) and the own row's two sides (hx), the refined score, and the
 * running top-2 (and argmax) of the raw and the refined scores. */
static void accumulate_row(const float *R p, const float *R hx, const float *R up, const float *R dn,
                           float *R t1, float *R t2, float *R u1, float *R u2, int32_t *R lab, int32_t c,
                           int64_t n)
{
    for (int64_t x = 0; x < n; x++) {
        /* -inf (no existing neighbour) becomes 0, as in the library; probabilities are >= 0. */
        float m = vmax(vmax(vmax(hx[x], up[x]), dn[x]), 0.0f);
        float pv = p[x], a1 = t1[x], b1 = u1[x];
        float rf = (m - pv * m) + pv;
        lab[x] = (pv <= a1) ? lab[x] : c;
        t2[x] = vmax(t2[x], vmin(a1, pv));
        t1[x] = vmax(a1, pv);
        u2[x] = vmax(u2[x], vmin(b1, rf));
        u1[x] = vmax(b1, rf);
    }
}

/* Counts of one 11-bit (or narrower) digit of keys into four interleaved histograms, summed into the
 * first: a run of keys in one bin (saturated confidences share their top bits) would otherwise make
 * each count wait for the previous one's store, which cost 0.13 ms of 32k keys (measured,
 * docs/performance.md). */
static void count_digit(uint32_t *R hist, const uint32_t *R keys, const uint8_t *R take, int64_t n, int shift,
                        uint32_t mask)
{
    memset(hist, 0, 4 * 2048 * sizeof(uint32_t));
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++)
            hist[j * 2048 + ((keys[i + j] >> shift) & mask)] += take ? take[i + j] : 1;
    for (; i < n; i++)
        hist[(keys[i] >> shift) & mask] += take ? take[i] : 1;
    for (uint32_t d = 0; d <= mask; d++)
        hist[d] += hist[2048 + d] + hist[4096 + d] + hist[6144 + d];
}

static uint32_t pick_digit(const uint32_t *R hist, int64_t *rank)
{
    uint32_t d = 0;
    while ((int64_t)hist[d] <= *rank) *rank -= hist[d++];
    return d;
}

/* The rank-th smallest of kappa over valid pixels by a three-digit (11 / 11 / 10 bit) radix selection
 * on order-preserving keys: equal to numpy's partition, which the library uses, because equal keys are
 * equal floats. The keys of the top digit's bin are gathered once, so the last digit reads only them. */
static float select_rank(const float *R kappa, const uint8_t *R valid, int64_t n, int64_t rank,
                         uint32_t *R hist, uint32_t *R keys, uint32_t *R bin)
{
    for (int64_t i = 0; i < n; i++)
        keys[i] = order_key(kappa[i]);
    count_digit(hist, keys, valid, n, 21, 0x7FFu);
    const uint32_t top = pick_digit(hist, &rank);
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {  /* branch-free gather of the valid keys in the top bin */
        bin[m] = keys[i];
        m += valid[i] & ((keys[i] >> 21) == top);
    }
    count_digit(hist, bin, NULL, m, 10, 0x7FFu);
    const uint32_t mid = pick_digit(hist, &rank);
    int64_t m2 = 0;
    for (int64_t i = 0; i < m; i++) {
        bin[m2] = bin[i];
        m2 += ((bin[i] >> 10) & 0x7FFu) == mid;
    }
    count_digit(hist, bin, NULL, m2, 0, 0x3FFu);
    const uint32_t low = pick_digit(hist, &rank);
    return key_value(top << 21 | mid << 10 | low);
}

/* Scratch: the scan's buffers, (H+2) (W+2) + 2 C (H+2) W + 5 W floats (row_floats), then the
 * selection's 4 x 2048 + 2 B H W uint32. */
static int64_t row_floats(int64_t C, int64_t H, int64_t W)
{
    return (H + 2) * (W + 2) + 2 * C * (H + 2) * W + 5 * W;
}

static int64_t scratch_floats(int64_t B, int64_t C, int64_t H, int64_t W)
{
    return row_floats(C, H, W) + 4 * 2048 + 2 * B * H * W;
}

/* label and both confidences of every pixel, and the number of valid pixels; 1 if some p is not in [+0, 1]. */
static int scan(const float *R p, const uint8_t *R valid, int64_t B, int64_t C, int64_t H, int64_t W, int margin,
                int64_t *R label, float *R kappa_raw, float *R kappa_ref, int64_t *R n_valid, float *R scratch)
{
    const int64_t HP = H + 2, WP = W + 2, HW = H * W, XS = HP * W;
    float *q = scratch, *hx = q + HP * WP, *hc = hx + C * XS;
    float *t1 = hc + C * XS, *t2 = t1 + W, *u1 = t2 + W, *u2 = u1 + W;
    int32_t *lab = (int32_t *)(u2 + W);
    int bad = 0;
    for (int64_t i = 0; i < HP * WP; i++) q[i] = -INFINITY;  /* the border stays -inf: no neighbour */
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *vb = valid + b * HW;
        for (int64_t c = 0; c < C; c++) {
            const float *pc = p + (b * C + c) * HW;
            for (int64_t y = 0; y < H; y++) {
                float *R qr = q + (y + 1) * WP + 1;
                const float *R pr = pc + y * W;
                const uint8_t *R vr = vb + y * W;
                for (int64_t x = 0; x < W; x++) {
                    qr[x] = pr[x] + (vr[x] ? 0.0f : -INFINITY);  /* invalid pixels are nobody's neighbour */
                    bad |= !in_unit(pr[x]);
                }
            }
            for (int64_t y = 0; y < HP; y++) {
                const float *R qr = q + y * WP;
                float *R hxr = hx + c * XS + y * W, *R hcr = hc + c * XS + y * W;
                for (int64_t x = 0; x < W; x++) {
                    float h = vmax(qr[x], qr[x + 2]);
                    hxr[x] = h;
                    hcr[x] = vmax(h, qr[x + 1]);
                }
            }
        }
        for (int64_t y = 0; y < H; y++) {
            for (int64_t x = 0; x < W; x++) {
                t1[x] = t2[x] = u1[x] = u2[x] = -INFINITY;
                lab[x] = 0;
            }
            for (int64_t c = 0; c < C; c++) {
                const float *hcc = hc + c * XS;
                accumulate_row(p + (b * C + c) * HW + y * W, hx + c * XS + (y + 1) * W, hcc + y * W,
                               hcc + (y + 2) * W, t1, t2, u1, u2, lab, (int32_t)c, W);
            }
            float *R kr = kappa_raw + b * HW + y * W, *R kf = kappa_ref + b * HW + y * W;
            int64_t *R lb = label + b * HW + y * W;
            for (int64_t x = 0; x < W; x++) {
                kr[x] = margin ? t1[x] - t2[x] : t1[x];
                kf[x] = margin ? u1[x] - u2[x] : u1[x];
                lb[x] = lab[x];
            }
        }
    }
    int64_t nv = 0;
    for (int64_t i = 0; i < B * HW; i++)
        nv += valid[i];
    *n_valid = nv;
    return bad;
}

static float select_quantile(const float *R kappa_raw, const uint8_t *R valid, int64_t n, int64_t n_valid,
                             int64_t rank, float *R scratch, int64_t B, int64_t C, int64_t H, int64_t W)
{
    (void)n_valid; (void)B;
    uint32_t *hist = (uint32_t *)(scratch + row_floats(C, H, W));
    return select_rank(kappa_raw, valid, n, rank, hist, hist + 4 * 2048, hist + 4 * 2048 + n);
}

static counts_t count(const float *R kappa_raw, const float *R kappa_ref, const uint8_t *R valid,
                      const int64_t *R gt, const int64_t *R label, int64_t n, float gamma, int64_t ignore_index,
                      int refine_enabled, uint8_t *R keep)
{
    counts_t k = {0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) {
        int v = valid[i], meas = gt ? gt[i] != ignore_index : 0, corr = gt ? meas & (label[i] == gt[i]) : 0;
        int keep_ref = (kappa_ref[i] > gamma) & v, keep_raw = (kappa_raw[i] > gamma) & v;
        k.kf_n += keep_ref; k.kr_n += keep_raw;
        k.kf_c += corr & keep_ref; k.kf_m += meas & keep_ref;
        k.kr_c += corr & keep_raw; k.kr_m += meas & keep_raw;
        keep[i] = (uint8_t)(refine_enabled ? keep_ref : keep_raw);
    }
    return k;
}
#define VARIANT 0
#else
#include "fused_pl_avx512.h"
#define VARIANT 512
#endif

/* 512 when the AVX-512 body was compiled, 0 for the portable one (the bench and the tests report it). */
int s4mc_fused_variant(void) { return VARIANT; }

/* The float32 scratch elements s4mc_fused_pseudo_label needs for this shape (s4mc/fused_cpu.py). */
int64_t s4mc_fused_scratch_floats(int64_t B, int64_t C, int64_t H, int64_t W)
{
    return scratch_floats(B, C, H, W);
}

/* Returns 0, or 1 when some probability is outside [+0, 1] (then nothing else is meaningful).
 * gamma_fixed: the threshold when use_dpa is 0, else DPA's alpha-quantile of the raw confidence.
 * gt may be NULL: the quality ratios are then 0 / 0 = NaN, as in the library.
 * stats: pl/quantity, pl/quality, pl/quantity_no_refine, pl/quality_no_refine, pl/threshold as float32,
 * each a float32 count over a float32 count as in the library (exact counts below 2^24, one rounding).
 * phase_s: the seconds spent in the scan, the selection and the counting, for the bench's breakdown.
 * scratch: s4mc_fused_scratch_floats(B, C, H, W) floats, 64-byte aligned. */
int s4mc_fused_pseudo_label(const float *R p, const uint8_t *R valid, const int64_t *R gt,
                            int64_t B, int64_t C, int64_t H, int64_t W, int margin, int use_dpa, double alpha,
                            float gamma_fixed, int refine_enabled, int64_t ignore_index, int64_t *R label, uint8_t *R keep,
                            float *R kappa_raw, float *R kappa_ref, float *R stats, double *R phase_s,
                            float *R scratch)
{
    const int64_t n = B * H * W;
    int64_t n_valid = 0;
    const double start = seconds();
    const int bad = scan(p, valid, B, C, H, W, margin, label, kappa_raw, kappa_ref, &n_valid, scratch);
    const double scanned = seconds();
    if (bad)
        return 1;
    float gamma = use_dpa ? INFINITY : gamma_fixed;  /* DPA with no valid pixel keeps nothing */
    if (use_dpa && n_valid > 0) {
        int64_t rank = (int64_t)floor((double)(n_valid - 1) * alpha);
        gamma = select_quantile(kappa_raw, valid, n, n_valid, rank, scratch, B, C, H, W);
    }
    const double selected = seconds();
    const counts_t k = count(kappa_raw, kappa_ref, valid, gt, label, n, gamma, ignore_index, refine_enabled, keep);
    const float nv = (float)n_valid;
    stats[0] = (float)k.kf_n / nv;
    stats[1] = (float)k.kf_c / (float)k.kf_m;  /* 0 / 0 = NaN: nothing kept is measurable */
    stats[2] = (float)k.kr_n / nv;
    stats[3] = (float)k.kr_c / (float)k.kr_m;
    stats[4] = gamma;
    phase_s[0] = scanned - start;
    phase_s[1] = selected - scanned;
    phase_s[2] = seconds() - selected;
    return 0;
}
