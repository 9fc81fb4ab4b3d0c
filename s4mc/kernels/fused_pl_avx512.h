/* The AVX-512 body of s4mc/kernels/fused_pl.c (included there, and only where the compiler targets
 * AVX-512 F/BW/VL/DQ): the same four functions as the portable body, with the same results, written
 * with intrinsics so that a strip of 16 pixels keeps its running maxima of all classes in registers
 * (docs/performance.md, "The fused CPU kernel").
 *
 * Every value the scan compares lies in [+0, 1] (probabilities, their neighbour maxima and the refined
 * scores p + m - p m), and there the order of floats is the order of their bits read as unsigned
 * integers, ties included. So the maxima, minima and compares are integer operations: on the AMD EPYC
 * (Zen 4) machine they run twice as many per cycle as their float forms (docs/performance.md). The
 * running raw maximum of a pixel is then above the bits of 1.0f exactly when one of its probabilities
 * is outside [+0, 1] (negative, -0.0, NaN or above 1), which is the range check.
 *
 * Scratch: a ring of three image rows, each holding per class its row maxima without and with the
 * centre (3 x 2 C WS floats, 16.9 kB for 11 classes x 64 columns, so it stays in L1), one zero row for
 * the rows outside the image, the valid pixels' order keys (B H WS, so that a whole 16-lane store never
 * leaves them), and two mask arrays. */

#define LANES 16

static inline int64_t strips(int64_t W) { return (W + LANES - 1) / LANES; }

/* Three ring slots of 2 C rows and one zero row; the keys start after them. */
static inline int64_t ring_floats(int64_t C, int64_t W)
{
    return (6 * C + 1) * LANES * strips(W);
}

static int64_t scratch_floats(int64_t B, int64_t C, int64_t H, int64_t W)
{
    /* the ring, the keys (whole strips), and two mask arrays of strips + 1 entries */
    return ring_floats(C, W) + B * H * LANES * strips(W) + strips(W) + 1;
}

static inline __mmask16 lanes_of(int64_t left)  /* the first min(left, 16) lanes, none if left <= 0 */
{
    return left >= LANES ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
}

static inline __mmask16 valid_mask(const uint8_t *R v, __mmask16 lanes)
{
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, v);
    return _mm_test_epi8_mask(bytes, bytes);
}

/* Row r of every class into its ring slot, as two rows per class: hx, the larger of the left and the
 * right neighbour, and hc, the largest of left, centre and right, where a neighbour is the probability
 * of a valid pixel in the image and +0 otherwise. The neighbours come from the strip before and after
 * by lane shifts (valignd), not by unaligned loads. lm and vm hold each strip's lanes inside the row
 * and valid lanes, with one empty strip after the last (a masked load of no lane reads nothing). */
static void ring_row(const float *R pc, float *R hx, const __mmask16 *R lm, const __mmask16 *R vm, int64_t C,
                     int64_t HW, int64_t NV)
{
    const int64_t WS = LANES * NV;
    for (int64_t c = 0; c < C; c++, pc += HW, hx += 2 * WS) {
        __m512i prev = _mm512_setzero_si512(), cur = _mm512_maskz_loadu_epi32(lm[0], pc);
        cur = _mm512_maskz_mov_epi32(vm[0], cur);
        for (int64_t j = 0; j < NV; j++) {
            __m512i next = _mm512_maskz_loadu_epi32(lm[j + 1], pc + (j + 1) * LANES);
            next = _mm512_maskz_mov_epi32(vm[j + 1], next);
            const __m512i h = _mm512_max_epu32(_mm512_alignr_epi32(cur, prev, 15),
                                               _mm512_alignr_epi32(next, cur, 1));
            _mm512_storeu_si512(hx + j * LANES, h);
            _mm512_storeu_si512(hx + WS + j * LANES, _mm512_max_epu32(h, cur));
            prev = cur;
            cur = next;
        }
    }
}

/* One image row: for each strip of 16 pixels, every class's neighbour maximum (the row's hx and the
 * hc above and below: values in [+0, 1] only, so any order gives the same maximum, which is already
 * vmax(m, 0)), refined score, and the running top-2 and argmax of both scores; then label,
 * confidences and the valid pixels' order keys (compressed, counted into *nv). The keys are compressed
 * in a register and stored whole: on the AMD EPYC machine the store form of vpcompressd made the scan
 * 1.3x and the DPA selection 6x slower (docs/performance.md). Returns the lanes whose running raw
 * maximum is not in [+0, 1]. */
static __mmask16 emit_row(const float *R pr, const float *R up, const float *R mid, const float *R dn, int64_t up_cs,
                          int64_t dn_cs, const __mmask16 *R lm, const __mmask16 *R vm, int64_t C, int64_t HW,
                          int64_t NV, int margin, int64_t *R lb, float *R kr, float *R kf, uint32_t *R keys,
                          int64_t *R nv)
{
    const int64_t WS = LANES * NV;
    const __m512i one = _mm512_set1_epi32(1), sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512i unit = _mm512_set1_epi32((int)ONE_BITS);
    __mmask16 bad = 0;
    for (int64_t j = 0; j < NV; j++) {
        const int64_t x0 = j * LANES;
        const __mmask16 lanes = lm[j];
        __m512i t1 = _mm512_setzero_si512(), t2 = t1, u1 = t1, u2 = t1;  /* +0: every score is >= +0 */
        __m512i lab = _mm512_setzero_si512(), cv = _mm512_setzero_si512();
        const float *R a = up + x0, *R s = mid + x0, *R d = dn + x0, *R q = pr + x0;
        for (int64_t c = 0; c < C; c++, a += up_cs, s += 2 * WS, d += dn_cs, q += HW) {
            const __m512i hm = _mm512_max_epu32(_mm512_loadu_si512(s), _mm512_loadu_si512(a));
            const __m512 m = _mm512_castsi512_ps(_mm512_max_epu32(hm, _mm512_loadu_si512(d)));
            const __m512i pi = _mm512_maskz_loadu_epi32(lanes, q);
            const __m512 pv = _mm512_castsi512_ps(pi);
            const __m512i rf = _mm512_castps_si512(_mm512_add_ps(_mm512_sub_ps(m, _mm512_mul_ps(pv, m)), pv));
            lab = _mm512_mask_mov_epi32(lab, _mm512_cmpgt_epu32_mask(pi, t1), cv);  /* first maximum wins */
            t2 = _mm512_max_epu32(t2, _mm512_min_epu32(t1, pi));
            t1 = _mm512_max_epu32(t1, pi);
            u2 = _mm512_max_epu32(u2, _mm512_min_epu32(u1, rf));
            u1 = _mm512_max_epu32(u1, rf);
            cv = _mm512_add_epi32(cv, one);
        }
        bad |= _mm512_mask_cmpgt_epu32_mask(lanes, t1, unit);
        const __m512 f1 = _mm512_castsi512_ps(t1), g1 = _mm512_castsi512_ps(u1);
        const __m512 raw = margin ? _mm512_sub_ps(f1, _mm512_castsi512_ps(t2)) : f1,
                     ref = margin ? _mm512_sub_ps(g1, _mm512_castsi512_ps(u2)) : g1;
        _mm512_mask_storeu_ps(kr + x0, lanes, raw);
        _mm512_mask_storeu_ps(kf + x0, lanes, ref);
        _mm512_mask_storeu_epi64(lb + x0, (__mmask8)lanes, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lab)));
        _mm512_mask_storeu_epi64(lb + x0 + 8, (__mmask8)(lanes >> 8),
                                 _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lab, 1)));
        const __m512i u = _mm512_castps_si512(raw);  /* order_key, sixteen at a time */
        const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
        _mm512_storeu_si512(keys + *nv, _mm512_maskz_compress_epi32(vm[j], key));
        *nv += __builtin_popcount((unsigned)vm[j]);
    }
    return bad;
}

static void valid_masks(const uint8_t *R vr, const __mmask16 *R lm, __mmask16 *R vm, int64_t NV)
{
    for (int64_t j = 0; j < NV; j++)
        vm[j] = valid_mask(vr + j * LANES, lm[j]);
    vm[NV] = 0;
}

static int scan(const float *R p, const uint8_t *R valid, int64_t B, int64_t C, int64_t H, int64_t W, int margin,
                int64_t *R label, float *R kappa_raw, float *R kappa_ref, int64_t *R n_valid, float *R scratch)
{
    const int64_t NV = strips(W), WS = LANES * NV, HW = H * W, slot = 2 * C * WS;
    float *ring = scratch, *zero = ring + 3 * slot;
    uint32_t *keys = (uint32_t *)(scratch + ring_floats(C, W));
    __mmask16 *lm = (__mmask16 *)(keys + B * H * WS), *vm = lm + NV + 1;
    __mmask16 bad = 0;
    int64_t nv = 0;
    memset(zero, 0, sizeof(float) * (size_t)WS);
    for (int64_t j = 0; j <= NV; j++)
        lm[j] = lanes_of(W - j * LANES);
    for (int64_t b = 0; b < B; b++) {
        const float *pb = p + b * C * HW;
        const uint8_t *vb = valid + b * HW;
        /* Row r enters slot r % 3 just before row r - 1 is emitted, which needs rows r - 2 .. r. */
        for (int64_t r = 0; r <= H; r++) {
            if (r < H) {
                valid_masks(vb + r * W, lm, vm, NV);
                ring_row(pb + r * W, ring + (r % 3) * slot, lm, vm, C, HW, NV);
            }
            if (r == 0)
                continue;
            const int64_t y = r - 1, o = b * HW + y * W;
            valid_masks(vb + y * W, lm, vm, NV);
            /* hc of class 0 above and below (or the zero row, with stride 0), hx of class 0 here */
            const float *up = y > 0 ? ring + ((y - 1) % 3) * slot + WS : zero;
            const float *dn = y + 1 < H ? ring + ((y + 1) % 3) * slot + WS : zero;
            bad |= emit_row(pb + y * W, up, ring + (y % 3) * slot, dn, y > 0 ? 2 * WS : 0, y + 1 < H ? 2 * WS : 0, lm,
                            vm, C, HW, NV, margin, label + o, kappa_raw + o, kappa_ref + o, keys, &nv);
        }
    }
    *n_valid = nv;
    return bad != 0;
}

/* How many of the n keys are <= v, sixteen at a time in four accumulators. */
static int64_t count_le(const uint32_t *R keys, int64_t n, uint32_t v)
{
    const __m512i vv = _mm512_set1_epi32((int)v), one = _mm512_set1_epi32(1);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        a0 = _mm512_mask_add_epi32(a0, _mm512_cmple_epu32_mask(_mm512_loadu_si512(keys + i), vv), a0, one);
        a1 = _mm512_mask_add_epi32(a1, _mm512_cmple_epu32_mask(_mm512_loadu_si512(keys + i + 16), vv), a1, one);
        a2 = _mm512_mask_add_epi32(a2, _mm512_cmple_epu32_mask(_mm512_loadu_si512(keys + i + 32), vv), a2, one);
        a3 = _mm512_mask_add_epi32(a3, _mm512_cmple_epu32_mask(_mm512_loadu_si512(keys + i + 48), vv), a3, one);
    }
    for (; i < n; i += LANES) {
        const __mmask16 lanes = lanes_of(n - i);
        const __m512i k = _mm512_maskz_loadu_epi32(lanes, keys + i);
        a0 = _mm512_mask_add_epi32(a0, _mm512_mask_cmple_epu32_mask(lanes, k, vv), a0, one);
    }
    const __m512i s = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
    return (int64_t)(uint32_t)_mm512_reduce_add_epi32(s);
}

/* Keeps, in place, the keys in [lo, hi]; *below gains the number under lo. Returns how many are kept. */
static int64_t keep_between(uint32_t *R keys, int64_t n, uint32_t lo, uint32_t hi, int64_t *R below)
{
    const __m512i vlo = _mm512_set1_epi32((int)lo), vhi = _mm512_set1_epi32((int)hi);
    int64_t w = 0, under = 0;
    for (int64_t i = 0; i < n; i += LANES) {  /* w <= i: each store lands on keys already read */
        const __mmask16 lanes = lanes_of(n - i);
        const __m512i k = _mm512_maskz_loadu_epi32(lanes, keys + i);
        const __mmask16 ge = _mm512_mask_cmpge_epu32_mask(lanes, k, vlo);
        const __mmask16 in = _mm512_mask_cmple_epu32_mask(ge, k, vhi);
        under += __builtin_popcount((unsigned)(lanes & (__mmask16)~ge));
        _mm512_storeu_si512(keys + w, _mm512_maskz_compress_epi32(in, k));  /* ends <= i + 15, in the keys */
        w += __builtin_popcount((unsigned)in);
    }
    *below += under;
    return w;
}

/* The rank-th smallest valid key, as a float: bisection on the key between the least and the largest,
 * keeping only the keys still in range every fourth step. An order statistic, like numpy's partition,
 * which the library uses, because equal keys are equal floats. The keys are consumed. */
static float select_quantile(const float *R kappa_raw, const uint8_t *R valid, int64_t n, int64_t n_valid,
                             int64_t rank, float *R scratch, int64_t B, int64_t C, int64_t H, int64_t W)
{
    (void)kappa_raw; (void)valid; (void)n; (void)B; (void)H;  /* scan left the valid keys in the scratch */
    uint32_t *keys = (uint32_t *)(scratch + ring_floats(C, W));
    int64_t m = n_valid;
    __m512i lo_v = _mm512_set1_epi32(-1), hi_v = _mm512_setzero_si512();
    for (int64_t i = 0; i < m; i += LANES) {
        const __mmask16 lanes = lanes_of(m - i);
        const __m512i k = _mm512_maskz_loadu_epi32(lanes, keys + i);
        lo_v = _mm512_mask_min_epu32(lo_v, lanes, lo_v, k);
        hi_v = _mm512_mask_max_epu32(hi_v, lanes, hi_v, k);
    }
    uint32_t lo = _mm512_reduce_min_epu32(lo_v), hi = _mm512_reduce_max_epu32(hi_v);
    int64_t below = 0;
    for (int step = 1; lo < hi; step++) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (count_le(keys, m, mid) + below > rank)
            hi = mid;
        else
            lo = mid + 1;
        if (step % 4 == 0 && lo < hi) {
            int64_t under = 0;
            m = keep_between(keys, m, lo, hi, &under);
            below += under;
        }
    }
    return key_value(lo);
}

static counts_t count(const float *R kappa_raw, const float *R kappa_ref, const uint8_t *R valid,
                      const int64_t *R gt, const int64_t *R label, int64_t n, float gamma, int64_t ignore_index,
                      int refine_enabled, uint8_t *R keep)
{
    const __m512 g = _mm512_set1_ps(gamma);
    const __m512i ign = _mm512_set1_epi64(ignore_index);
    const __m128i ones = _mm_set1_epi8(1);
    counts_t k = {0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i += LANES) {
        const __mmask16 lanes = lanes_of(n - i), v = valid_mask(valid + i, lanes);
        const __mmask16 ref = _mm512_mask_cmp_ps_mask(v, _mm512_maskz_loadu_ps(lanes, kappa_ref + i), g, _CMP_GT_OQ);
        const __mmask16 raw = _mm512_mask_cmp_ps_mask(v, _mm512_maskz_loadu_ps(lanes, kappa_raw + i), g, _CMP_GT_OQ);
        if (gt) {
            const __mmask8 l0 = (__mmask8)lanes, l1 = (__mmask8)(lanes >> 8);
            const __m512i g0 = _mm512_maskz_loadu_epi64(l0, gt + i), g1 = _mm512_maskz_loadu_epi64(l1, gt + i + 8);
            const __m512i b0 = _mm512_maskz_loadu_epi64(l0, label + i), b1 = _mm512_maskz_loadu_epi64(l1, label + i + 8);
            const __mmask16 meas = _mm512_kunpackb(_mm512_mask_cmpneq_epi64_mask(l1, g1, ign),
                                                   _mm512_mask_cmpneq_epi64_mask(l0, g0, ign));
            const __mmask16 corr = meas & _mm512_kunpackb(_mm512_cmpeq_epi64_mask(b1, g1), _mm512_cmpeq_epi64_mask(b0, g0));
            k.kf_c += __builtin_popcount((unsigned)(corr & ref));
            k.kf_m += __builtin_popcount((unsigned)(meas & ref));
            k.kr_c += __builtin_popcount((unsigned)(corr & raw));
            k.kr_m += __builtin_popcount((unsigned)(meas & raw));
        }
        k.kf_n += __builtin_popcount((unsigned)ref);
        k.kr_n += __builtin_popcount((unsigned)raw);
        _mm_mask_storeu_epi8(keep + i, lanes, _mm_maskz_mov_epi8(refine_enabled ? ref : raw, ones));
    }
    return k;
}
