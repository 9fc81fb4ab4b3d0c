/* The paper-default S4MC pseudo-labelling call on CPU as one single-threaded C function
 * (docs/performance.md, "The fused CPU kernel"): 3x3 neighbourhood, k = 1, max selection, independent
 * joint, max or margin confidence, DPA or a fixed threshold, and the pl/* statistics.
 *
 * Eager PyTorch runs this call as ~60 kernels, ten of them full passes over B x C x H x W, whose
 * working set spills out of L2; this reads the probabilities once and keeps per image only row maxima
 * that fit in L2. s4mc/fused_cpu.py compiles and loads it; s4mc/pseudo_label.py uses it where it
 * applies. Every output equals the eager path's bit for bit (tests/test_fused_cpu.py on random, tied,
 * saturated and masked inputs): maxima and minima select values, p + m - p m is rounded as three
 * operations (built with -ffp-contract=off), the DPA quantile is an order statistic and the ratios
 * are the same float32 divisions of exact counts. Plain max / min are exact for finite input, so
 * input outside [0, 1] (NaN included) is reported, and the caller computes that call eagerly.
 *
 * Layout: probs B x C x H x W float32, valid and keep B x H x W uint8 (0 / 1), gt (or NULL) and label
 * B x H x W int64, all contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define R restrict

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline float vmax(float a, float b) { return a > b ? a : b; }
static inline float vmin(float a, float b) { return a < b ? a : b; }

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

/* Order-preserving map of a float onto uint32 (negatives reversed), for the radix selection. */
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

/* Returns 0, or 1 when some probability is outside [0, 1] (then nothing else is meaningful).
 * gamma_fixed: the threshold when use_dpa is 0, else DPA's alpha-quantile of the raw confidence.
 * gt may be NULL: the quality ratios are then 0 / 0 = NaN, as in the library.
 * stats: pl/quantity, pl/quality, pl/quantity_no_refine, pl/quality_no_refine, pl/threshold as float32,
 * each a float32 count over a float32 count as in the library (exact counts below 2^24, one rounding).
 * phase_s: the seconds spent in the scan, the selection and the counting, for the bench's breakdown.
 * scratch: (H+2) (W+2) + 2 C (H+2) W + 5 W floats, then 4 x 2048 + 2 B H W uint32 (s4mc/fused_cpu.py). */
int s4mc_fused_pseudo_label(const float *R p, const uint8_t *R valid, const int64_t *R gt,
                            int64_t B, int64_t C, int64_t H, int64_t W, int margin, int use_dpa, double alpha,
                            float gamma_fixed, int refine_enabled, int64_t ignore_index, int64_t *R label, uint8_t *R keep,
                            float *R kappa_raw, float *R kappa_ref, float *R stats, double *R phase_s,
                            float *R scratch)
{
    const int64_t HP = H + 2, WP = W + 2, HW = H * W, XS = HP * W;
    float *q = scratch, *hx = q + HP * WP, *hc = hx + C * XS;
    float *t1 = hc + C * XS, *t2 = t1 + W, *u1 = t2 + W, *u2 = u1 + W;
    int32_t *lab = (int32_t *)(u2 + W);
    uint32_t *hist = (uint32_t *)(lab + W), *keys = hist + 4 * 2048, *bin = keys + B * HW;
    int bad = 0;
    const double start = seconds();
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
                    bad |= ((pr[x] >= 0.0f) & (pr[x] <= 1.0f)) ? 0 : 1;
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
    const double scanned = seconds();
    if (bad)
        return 1;
    const int64_t n = B * HW;
    int64_t n_valid = 0;
    for (int64_t i = 0; i < n; i++)
        n_valid += valid[i];
    float gamma = use_dpa ? INFINITY : gamma_fixed;  /* DPA with no valid pixel keeps nothing */
    if (use_dpa && n_valid > 0) {
        int64_t rank = (int64_t)floor((double)(n_valid - 1) * alpha);
        gamma = select_rank(kappa_raw, valid, n, rank, hist, keys, bin);
    }
    const double selected = seconds();
    int64_t kr_n = 0, kf_n = 0, kf_c = 0, kf_m = 0, kr_c = 0, kr_m = 0;
    for (int64_t i = 0; i < n; i++) {
        int v = valid[i], meas = gt ? gt[i] != ignore_index : 0, corr = gt ? meas & (label[i] == gt[i]) : 0;
        int keep_ref = (kappa_ref[i] > gamma) & v, keep_raw = (kappa_raw[i] > gamma) & v;
        kf_n += keep_ref; kr_n += keep_raw;
        kf_c += corr & keep_ref; kf_m += meas & keep_ref;
        kr_c += corr & keep_raw; kr_m += meas & keep_raw;
        keep[i] = (uint8_t)(refine_enabled ? keep_ref : keep_raw);
    }
    const float nv = (float)n_valid;
    stats[0] = (float)kf_n / nv;
    stats[1] = (float)kf_c / (float)kf_m;  /* 0 / 0 = NaN: nothing kept is measurable */
    stats[2] = (float)kr_n / nv;
    stats[3] = (float)kr_c / (float)kr_m;
    stats[4] = gamma;
    phase_s[0] = scanned - start;
    phase_s[1] = selected - scanned;
    phase_s[2] = seconds() - selected;
    return 0;
}
