/* One pass of AdamW's moment update fused with what the online merging optimizers need from D.
 *
 * Built at first use by taxfree/optim/cpu_kernel.py (gcc, no torch headers) and called through
 * ctypes on contiguous fp32 CPU tensors. Per entry, with the operation order of torch's AdamW:
 *
 *   p *= decay                              (decoupled weight decay, 1 - lr*wd)
 *   m  = fma(w1, g - m, m)                  (m.lerp_(g, 1 - beta1))
 *   v  = fma(c2 * g, g, v * b2)             (v.mul_(beta2).addcmul_(g, g, value=1 - beta2))
 *   D  = (m * step) / (sqrt(v) / bc2 + eps) (step = -lr / (1 - beta1^t), bc2 = sqrt(1 - beta2^t))
 *
 * Compiled with -ffp-contract=off and without -ffast-math: every operation is one IEEE rounding
 * (sqrt correctly rounded), so an entry's result does not depend on where it sits in the tensor
 * or which chunk a thread ran: vector body and scalar tail agree bit for bit.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 16
#define AHEAD 16 /* scattered reads: prefetch this many positions ahead */
#define APPLY_BLOCK 2048 /* entries whose m, v stay in L1 until their D is read */

typedef struct {
    float w1, b2, c2, decay, step, bc2, eps;
} adam_coefficients;

static inline float adam_d(float m, float v, const adam_coefficients *c) {
    return (m * c->step) / (sqrtf(v) / c->bc2 + c->eps);
}

static void decay_(float *restrict p, int64_t n, float decay) {
    if (p && decay != 1.0f)
        for (int64_t i = 0; i < n; i++) p[i] *= decay;
}

/* Moments in place; D into d_out (if not NULL); sum |D| into *l1 (if not NULL). */
void tf_adam_update(float *restrict p, const float *restrict g, float *restrict m,
                    float *restrict v, int64_t n, const adam_coefficients *c,
                    float *restrict d_out, double *l1) {
    decay_(p, n, c->decay);
    const float w1 = c->w1, b2 = c->b2, c2 = c->c2;
    if (!d_out && !l1) {
        for (int64_t i = 0; i < n; i++) {
            float gi = g[i];
            m[i] = fmaf(w1, gi - m[i], m[i]);
            v[i] = fmaf(c2 * gi, gi, v[i] * b2);
        }
        return;
    }
    double total = 0.0;
    int64_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        float s = 0.0f, d[BLOCK];
        for (int j = 0; j < BLOCK; j++) {
            float gi = g[i + j];
            float mi = fmaf(w1, gi - m[i + j], m[i + j]);
            float vi = fmaf(c2 * gi, gi, v[i + j] * b2);
            m[i + j] = mi;
            v[i + j] = vi;
            d[j] = adam_d(mi, vi, c);
            s += fabsf(d[j]);
        }
        if (d_out)
            for (int j = 0; j < BLOCK; j++) d_out[i + j] = d[j];
        total += s;
    }
    for (; i < n; i++) {
        float gi = g[i];
        float mi = fmaf(w1, gi - m[i], m[i]);
        float vi = fmaf(c2 * gi, gi, v[i] * b2);
        m[i] = mi;
        v[i] = vi;
        float d = adam_d(mi, vi, c);
        if (d_out) d_out[i] = d;
        total += fabsf(d);
    }
    if (l1) *l1 = total;
}

static inline void keep_(int64_t i, float d, float lower, int64_t *idx, float *values,
                         int64_t cap, int64_t *count) {
    if (fabsf(d) >= lower) {
        if (*count < cap) {
            idx[*count] = i;
            values[*count] = d;
        }
        (*count)++;
    }
}

/* The collect test, without square root or division: an entry can only reach |D| >= lower if
 * y = |m*step| * (1 + 2^-19) / lower - eps >= 0 and (y * bc2)^2 >= v * (1 - 2^-19). Both slacks
 * are far above the few roundings (2^-24 each) that separate this from the rounded D, so every
 * entry that reaches `lower` passes; the few others are dropped by the exact test that follows.
 * Where v is tiny (below 1e-30) the squares may be subnormal and lose their relative accuracy:
 * those entries go to the exact test too. */
#define CHUNK 2048

/* Step 1 of a chunk [i, end) of tf_adam_update_collect: the update and the positions (from i)
 * that pass the test; returns how many. */
static int64_t update_pass_(const float *restrict g, float *restrict m, float *restrict v,
                            int64_t i, int64_t end, const adam_coefficients *c, float lower,
                            int32_t *restrict pos, double *l1) {
    const float w1 = c->w1, b2 = c->b2, c2 = c->c2, step = c->step, bc2 = c->bc2, eps = c->eps;
    const int all = !(lower > 0.0f);
    const float c1 = all ? 0.0f : (1.0f + 0x1p-19f) / lower, slack = 1.0f - 0x1p-19f;
    const int64_t start = i;
    int64_t found = 0;
    double total = 0.0;
#ifdef __AVX512F__
    /* The same operations 16 at a time with explicit instructions, so the passing lanes come
     * out as a mask and are compressed in a register (a branch per entry, or a compressing
     * store to memory, costs far more). */
    const __m512 vw1 = _mm512_set1_ps(w1), vb2 = _mm512_set1_ps(b2), vc2 = _mm512_set1_ps(c2);
    const __m512 vstep = _mm512_set1_ps(step), vbc2 = _mm512_set1_ps(bc2), veps = _mm512_set1_ps(eps);
    const __m512 vc1 = _mm512_set1_ps(c1), vslack = _mm512_set1_ps(slack), vtiny = _mm512_set1_ps(1e-30f);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; i + 16 <= end; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i), mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
        mv = _mm512_fmadd_ps(vw1, _mm512_sub_ps(gv, mv), mv);
        vv = _mm512_fmadd_ps(_mm512_mul_ps(vc2, gv), gv, _mm512_mul_ps(vv, vb2));
        _mm512_storeu_ps(m + i, mv);
        _mm512_storeu_ps(v + i, vv);
        __m512 a = _mm512_abs_ps(_mm512_mul_ps(mv, vstep));
        if (l1) {
            __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), vbc2), veps);
            total += _mm512_reduce_add_ps(_mm512_div_ps(a, den));
        }
        __mmask16 pass = 0xFFFF;
        if (!all) {
            __m512 y = _mm512_sub_ps(_mm512_mul_ps(a, vc1), veps), z = _mm512_mul_ps(y, vbc2);
            pass = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ) &
                   (_mm512_cmp_ps_mask(_mm512_mul_ps(z, z), _mm512_mul_ps(vv, vslack), _CMP_GE_OQ) |
                    _mm512_cmp_ps_mask(vv, vtiny, _CMP_LT_OQ));
        }
        __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)(i - start)));
        _mm512_storeu_si512((void *)(pos + found), _mm512_maskz_compress_epi32(pass, at));
        found += __builtin_popcount(pass);
    }
#else
    for (; i + BLOCK <= end; i += BLOCK) {
        unsigned mask = 0;
        float s = 0.0f;
        for (int j = 0; j < BLOCK; j++) {
            float gi = g[i + j];
            float mi = fmaf(w1, gi - m[i + j], m[i + j]);
            float vi = fmaf(c2 * gi, gi, v[i + j] * b2);
            m[i + j] = mi;
            v[i + j] = vi;
            float a = fabsf(mi * step), y = a * c1 - eps, z = y * bc2;
            if (l1) s += a / (sqrtf(vi) / bc2 + eps);
            mask |= (unsigned)(all | ((y >= 0.0f) & ((z * z >= vi * slack) | (vi < 1e-30f)))) << j;
        }
        total += s;
        while (mask) {
            pos[found++] = (int32_t)(i - start) + __builtin_ctz(mask);
            mask &= mask - 1;
        }
    }
#endif
    for (; i < end; i++) { /* the tensor's last entries: all go to the exact test */
        float gi = g[i];
        m[i] = fmaf(w1, gi - m[i], m[i]);
        v[i] = fmaf(c2 * gi, gi, v[i] * b2);
        if (l1) total += fabsf(adam_d(m[i], v[i], c));
        pos[found++] = (int32_t)(i - start);
    }
    if (l1) *l1 += total;
    return found;
}

int64_t tf_adam_update_collect(float *restrict p, const float *restrict g, float *restrict m,
                               float *restrict v, int64_t n, const adam_coefficients *c,
                               float lower, int64_t *restrict idx, float *restrict values,
                               int64_t cap, double *l1) {
    decay_(p, n, c->decay);
    int32_t pos[CHUNK + 16]; /* room for a full 16-lane store past the last position */
    float d[CHUNK];
    int64_t count = 0;
    double total = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t end = n - i0 < CHUNK ? n : i0 + CHUNK;
        int64_t found = update_pass_(g, m, v, i0, end, c, lower, pos, l1 ? &total : 0);
        /* 2. the exact D at those positions (a gather loop the compiler vectorises), kept where
         * it reaches `lower` */
        const float *mc = m + i0, *vc = v + i0;
        for (int64_t t = 0; t < found; t++) d[t] = adam_d(mc[pos[t]], vc[pos[t]], c);
        for (int64_t t = 0; t < found; t++) keep_(i0 + pos[t], d[t], lower, idx, values, cap, &count);
    }
    if (l1) *l1 = total;
    return count;
}

/* D at the positions idx[0..count) of moments already updated. */
void tf_adam_at(const float *restrict m, const float *restrict v, const int64_t *restrict idx,
                int64_t count, const adam_coefficients *c, float *restrict out) {
    for (int64_t k = 0; k < count; k++) {
        if (k + AHEAD < count) {
            __builtin_prefetch(m + idx[k + AHEAD]);
            __builtin_prefetch(v + idx[k + AHEAD]);
        }
        out[k] = adam_d(m[idx[k]], v[idx[k]], c);
    }
}

/* |D| at the positions idx[0..count) as the next update would make it (nothing written but the
 * output): the sample that bounds a top-k threshold before the update pass. */
void tf_adam_peek(const float *restrict g, const float *restrict m, const float *restrict v,
                  const int64_t *restrict idx, int64_t count, const adam_coefficients *c,
                  float *restrict out) {
    for (int64_t k = 0; k < count; k++) {
        if (k + AHEAD < count) {
            __builtin_prefetch(g + idx[k + AHEAD]);
            __builtin_prefetch(m + idx[k + AHEAD]);
            __builtin_prefetch(v + idx[k + AHEAD]);
        }
        int64_t i = idx[k];
        float gi = g[i];
        float mi = fmaf(c->w1, gi - m[i], m[i]);
        float vi = fmaf(c->c2 * gi, gi, v[i] * c->b2);
        out[k] = fabsf(adam_d(mi, vi, c));
    }
}

/* |D| of every entry of moments already updated (the dense fallback of the top-k). */
void tf_adam_dense_abs(const float *restrict m, const float *restrict v, int64_t n,
                       const adam_coefficients *c, float *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = fabsf(adam_d(m[i], v[i], c));
}

/* out[t] = weight * (D / q) at kidx[t] for t < count (a gather loop the compiler vectorises). */
static void kept_values_(const float *restrict m, const float *restrict v,
                         const int64_t *restrict kidx, int64_t count, const adam_coefficients *c,
                         float q, float weight, float *restrict out) {
    const float step = c->step, bc2 = c->bc2, eps = c->eps;
    for (int64_t t = 0; t < count; t++) {
        int64_t j = kidx[t];
        out[t] = weight * (((m[j] * step) / (sqrtf(v[j]) / bc2 + eps)) / q);
    }
}

/* OnDARE's whole step without rescale: decay and moments everywhere, D at the kept positions
 * kidx (ascending) while their m and v are in cache (kval: room for nk values), then
 * p += weight * (D / q) at kidx, then p += alpha * tau at tau's positions tidx (ascending), in
 * that order where both fall (as the torch path adds them). The scattered updates of p run
 * after the stream, not inside it: interleaved, each miss on p stalled the stream (measured on
 * a 2-core VM: the step took about 1.5x as long). */
void tf_adam_update_apply(float *restrict p, const float *restrict g, float *restrict m,
                          float *restrict v, int64_t n, const adam_coefficients *c,
                          const int64_t *restrict kidx, int64_t nk, float q, float weight,
                          const int32_t *restrict tidx, const float *restrict tval, int64_t nt,
                          float alpha, float *restrict kval) {
    int64_t a = 0;
    for (int64_t i = 0; i < n; i += APPLY_BLOCK) {
        int64_t len = n - i < APPLY_BLOCK ? n - i : APPLY_BLOCK, end = i + len;
        tf_adam_update(p + i, g + i, m + i, v + i, len, c, 0, 0);
        int64_t a1 = a;
        while (a1 < nk && kidx[a1] < end) a1++;
        kept_values_(m, v, kidx + a, a1 - a, c, q, weight, kval + a);
        a = a1;
    }
    for (int64_t t = 0; t < nk; t++) {
        if (t + AHEAD < nk) __builtin_prefetch(p + kidx[t + AHEAD], 1);
        p[kidx[t]] += kval[t];
    }
    for (int64_t t = 0; t < nt; t++) {
        if (t + AHEAD < nt) __builtin_prefetch(p + tidx[t + AHEAD], 1);
        p[tidx[t]] += alpha * tval[t];
    }
}

/* OnTIES's sign election and update at the union of the kept positions kidx (D_k = kval) and
 * tau's positions tidx (tau = tval), both ascending; D_k and tau are 0 elsewhere, where the
 * election changes nothing. s = +1 where (tau + D_k) >= 0 (weighted: alpha*tau + (1-alpha)*D_k),
 * else -1 (beta = 1 - alpha); p += uw * D_k where sign(D_k) == s, then p += tw * tau where
 * sign(tau) == s. Two walks, each with its own list in order and the other looked up, keep the
 * branches predictable (one merged walk alternates between the lists at random). */
static inline int elect_(float d, float t, int weighted, float alpha, float beta) {
    float total = weighted ? d * beta + t * alpha : t + d;
    return total >= 0.0f;
}

void tf_ties_apply(float *restrict p, const int64_t *restrict kidx, const float *restrict kval,
                   int64_t nk, const int32_t *restrict tidx, const float *restrict tval,
                   int64_t nt, float uw, float tw, int weighted, float alpha, float beta) {
    int64_t b = 0;
    for (int64_t a = 0; a < nk; a++) {
        if (a + AHEAD < nk) __builtin_prefetch(p + kidx[a + AHEAD], 1);
        int64_t j = kidx[a];
        while (b < nt && tidx[b] < j) b++;
        float t = (b < nt && tidx[b] == j) ? tval[b] : 0.0f, d = kval[a];
        if ((d > 0.0f) == elect_(d, t, weighted, alpha, beta)) p[j] += uw * d;
    }
    if (tw == 0.0f) return;
    int64_t a = 0;
    for (b = 0; b < nt; b++) {
        if (b + AHEAD < nt) __builtin_prefetch(p + tidx[b + AHEAD], 1);
        int64_t j = tidx[b];
        while (a < nk && kidx[a] < j) a++;
        float d = (a < nk && kidx[a] == j) ? kval[a] : 0.0f, t = tval[b];
        if ((t > 0.0f) == elect_(d, t, weighted, alpha, beta)) p[j] += tw * t;
    }
}

/* The k-th smallest (0-based) of in[0..n), NaN counted as +inf; work holds 2n floats. Each
 * round splits the current values around a median-of-3 pivot without a data-dependent branch
 * (both sides are written, only the matching count advances: the smaller side from the front,
 * the larger from the back of the other half of work), then continues on the side holding k. */
static float kth_smallest_(const float *in, int64_t n, int64_t k, float *work) {
    const float *src = in;
    float *dst = work, *spare = work + n;
    int64_t size = n;
    int first = 1;
    for (;;) {
        if (size <= 16) {
            float t[16];
            for (int64_t i = 0; i < size; i++) t[i] = first && isnan(src[i]) ? INFINITY : src[i];
            for (int64_t i = 1; i < size; i++) /* insertion sort */
                for (int64_t j = i; j > 0 && t[j - 1] > t[j]; j--) {
                    float x = t[j];
                    t[j] = t[j - 1];
                    t[j - 1] = x;
                }
            return t[k];
        }
        float a = src[0], b = src[size / 2], c = src[size - 1];
        if (first) {
            a = isnan(a) ? INFINITY : a;
            b = isnan(b) ? INFINITY : b;
            c = isnan(c) ? INFINITY : c;
        }
        float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t below = 0, above = 0;
        for (int64_t i = 0; i < size; i++) {
            float x = src[i];
            x = first && isnan(x) ? INFINITY : x;
            dst[below] = x;
            dst[size - 1 - above] = x;
            below += x < pivot;
            above += x > pivot;
        }
        first = 0;
        if (k < below) {
            src = dst;
            size = below;
        } else if (k < size - above) {
            return pivot;
        } else {
            k -= size - above;
            src = dst + size - above;
            size = above;
        }
        float *t = dst;
        dst = spare;
        spare = t;
    }
}

/* The k-th largest (1-based k, 1 <= k <= n) of values[0..n), NaN counted as +inf (as torch's
 * topk and kthvalue order it); work holds 2n floats. */
float tf_kth_largest(const float *restrict values, int64_t n, int64_t k, float *restrict work) {
    return kth_smallest_(values, n, n - k, work);
}

/* The positions (ascending) of exactly k of values[0..n) (non-negative): every entry above the
 * k-th largest, then the entries equal to it from the lowest position up. work holds 2n floats. */
void tf_take_top_k(const float *restrict values, int64_t n, int64_t k, float *restrict work,
                   int64_t *restrict out) {
    if (k <= 0) return;
    float threshold = tf_kth_largest(values, n, k, work);
    int64_t above = 0;
    for (int64_t i = 0; i < n; i++) above += (isnan(values[i]) ? INFINITY : values[i]) > threshold;
    int64_t ties = k - above, count = 0;
    for (int64_t i = 0; i < n && count < k; i++) {
        float x = isnan(values[i]) ? INFINITY : values[i];
        int keep = x > threshold || (x == threshold && ties > 0);
        ties -= x == threshold && keep;
        out[count] = i;
        count += keep;
    }
}
