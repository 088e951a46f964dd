/* Paged attention over the block cache. */
#include "common.h"

/* ------------------------------------------------------------------------------------------------ */
/* Paged attention: write the step's keys/values, then causal attention read from the blocks in place. */

#ifdef __AVX2__
static inline __m256 load8_kv(const void *kv, int dtype, int64_t off) {
    if (dtype == DT_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)kv + off))), 16));
    return _mm256_loadu_ps((const float *)kv + off);
}
#endif

static inline float dot_kv(const float *q, const void *kv, int dtype, int64_t off, int D) {
    int d = 0;
    float s = 0.0f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; d + 16 <= D; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8_kv(kv, dtype, off + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8_kv(kv, dtype, off + d + 8), a1);
    }
    for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8_kv(kv, dtype, off + d), a0);
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    if (dtype == DT_BF16) {
        const uint16_t *k = (const uint16_t *)kv + off;
        for (; d < D; d++) s += q[d] * bf16_to_f32(k[d]);
    } else {
        const float *k = (const float *)kv + off;
        for (; d < D; d++) s += q[d] * k[d];
    }
    return s;
}

/* acc[D] += sum_i p[i] * v_i, v_i the D values at kv + off + i * row (i < cnt): d-outer so each
 * 8-wide slice of acc stays in registers across the block's positions, with 4 partial sums so the
 * FMA chain is not latency-bound. */
static inline void accumulate_kv(float *acc, const float *p, int64_t cnt, const void *kv, int dtype, int64_t off,
                                 int64_t row, int D) {
    int d = 0;
#ifdef __AVX2__
    for (; d + 8 <= D; d += 8) {
        __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_setzero_ps(), a2 = a1, a3 = a1;
        int64_t i = 0;
        for (; i + 4 <= cnt; i += 4) {
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), load8_kv(kv, dtype, off + i * row + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(p[i + 1]), load8_kv(kv, dtype, off + (i + 1) * row + d), a1);
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(p[i + 2]), load8_kv(kv, dtype, off + (i + 2) * row + d), a2);
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(p[i + 3]), load8_kv(kv, dtype, off + (i + 3) * row + d), a3);
        }
        for (; i < cnt; i++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), load8_kv(kv, dtype, off + i * row + d), a0);
        _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
#endif
    for (int64_t i = 0; i < cnt; i++) {
        if (dtype == DT_BF16) {
            const uint16_t *v = (const uint16_t *)kv + off + i * row;
            for (int dd = d; dd < D; dd++) acc[dd] += p[i] * bf16_to_f32(v[dd]);
        } else {
            const float *v = (const float *)kv + off + i * row;
            for (int dd = d; dd < D; dd++) acc[dd] += p[i] * v[dd];
        }
    }
}

/* s[i] = dot(q, k_i) for the cnt positions at kv + off + i * row; 4 positions at a time with
 * independent accumulators and one combined horizontal reduction. */
static inline void scores_kv(const float *q, const void *kv, int dtype, int64_t off, int64_t row, int64_t cnt, int D,
                             float *s) {
    int64_t i = 0;
#ifdef __AVX2__
    if (D % 8 == 0) {
        for (; i + 4 <= cnt; i += 4) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const int64_t o = off + i * row;
            for (int d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                a0 = _mm256_fmadd_ps(qv, load8_kv(kv, dtype, o + d), a0);
                a1 = _mm256_fmadd_ps(qv, load8_kv(kv, dtype, o + row + d), a1);
                a2 = _mm256_fmadd_ps(qv, load8_kv(kv, dtype, o + 2 * row + d), a2);
                a3 = _mm256_fmadd_ps(qv, load8_kv(kv, dtype, o + 3 * row + d), a3);
            }
            /* [a0 a1 a2 a3] -> 4 sums: pairwise hadds, then the two 128-bit halves. */
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            _mm_storeu_ps(s + i, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        }
    }
#endif
    for (; i < cnt; i++) s[i] = dot_kv(q, kv, dtype, off + i * row, D);
}

#define QUERY_CHUNK 16

/* s[i] = exp(s[i] - m) for i < n; returns their sum. */
static float exp_shifted(float *s, int64_t n, float m) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_neg256(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    return sum;
}

/* q: [T, Hq, D] (token stride q_stride, heads D apart); k_new/v_new: [T, Hk, D] (token strides
 * k_stride/v_stride, heads D apart); cache: [2, num_blocks, bs, Hk, D] contiguous; slot_mapping int64 [T] (< 0: not written);
 * query_start_loc int32 [R + 1]; context_lens int32 [R]; block_tables int32 [R, bt_stride];
 * out: [T, Hq, D] contiguous. Query token j of request r sits at position context_lens[r] + j and sees
 * positions max(0, pos - window + 1) .. pos (window <= 0: all). soft_cap <= 0: none. sinks: NULL, or
 * float [Hq]: head h's sink logit joins its softmax denominator with no value (the online softmax
 * starts from it: max = sink, denominator = 1, accumulator = 0). */
void hallm_paged_attention(const void *q, int64_t q_stride, const void *k_new, int64_t k_stride, const void *v_new, int64_t v_stride,
                           void *cache, int64_t num_blocks, const int64_t *slot_mapping,
                           const int32_t *query_start_loc, const int32_t *context_lens,
                           int64_t R, const int32_t *block_tables, int64_t bt_stride, void *out, int64_t T,
                           int64_t Hq, int64_t Hk, int64_t D, int64_t bs, float scale, float soft_cap,
                           int64_t window, const float *sinks, int dtype, int nthreads) {
    const size_t esize = dtype == DT_BF16 ? 2 : 4;
    const int64_t plane = num_blocks * bs * Hk * D; /* elements from the K plane to the V plane */
    const int64_t row = Hk * D;
    char *kc = (char *)cache, *vc = (char *)cache + plane * esize;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(kc + slot * row * esize, (const char *)k_new + t * k_stride * esize, row * esize);
        memcpy(vc + slot * row * esize, (const char *)v_new + t * v_stride * esize, row * esize);
    }
    /* Padding tokens past the last request get zeros. */
    const int64_t covered = query_start_loc[R];
    if (covered < T) memset((char *)out + covered * Hq * D * esize, 0, (size_t)(T - covered) * Hq * D * esize);

    /* Work items: (request, chunk of QUERY_CHUNK query tokens, range of KV heads). A whole request's
     * heads in one item read each cached position's row [Hk, D] contiguously, block after block,
     * while the next block is prefetched: the blocks of a request sit anywhere in the pool, and
     * per-head items striding through them ran far below copy bandwidth. With fewer requests than
     * threads x 4, the heads are split so every thread has work. */
    const int64_t want = 4 * (int64_t)nthreads;
    const int64_t head_groups = R >= want ? 1 : (Hk < (want + R - 1) / R ? Hk : (want + R - 1) / R);
    int64_t items = 0;
    for (int64_t r = 0; r < R; r++) items += (query_start_loc[r + 1] - query_start_loc[r] + QUERY_CHUNK - 1) / QUERY_CHUNK;
    items *= head_groups;
    int64_t *item_req = malloc((size_t)(items ? items : 1) * sizeof(int64_t));
    int64_t *item_tok = malloc((size_t)(items ? items : 1) * sizeof(int64_t));
    int64_t *item_grp = malloc((size_t)(items ? items : 1) * sizeof(int64_t));
    int64_t n = 0;
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = query_start_loc[r]; j < query_start_loc[r + 1]; j += QUERY_CHUNK)
            for (int64_t hg = 0; hg < head_groups; hg++) {
                item_req[n] = r;
                item_tok[n] = j;
                item_grp[n] = hg;
                n++;
            }
    const int64_t G = Hq / Hk;
#pragma omp parallel num_threads(nthreads)
    {
        float *qf = alloc_floats((size_t)Hq * D), *acc = alloc_floats((size_t)Hq * D);
        float *mx = alloc_floats((size_t)Hq), *den = alloc_floats((size_t)Hq), *sc = alloc_floats((size_t)bs);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t r = item_req[it], t_end = query_start_loc[r + 1];
            const int64_t t_last = item_tok[it] + QUERY_CHUNK < t_end ? item_tok[it] + QUERY_CHUNK : t_end;
            const int64_t h0 = item_grp[it] * Hk / head_groups, h1 = (item_grp[it] + 1) * Hk / head_groups;
            const int64_t nh = (h1 - h0) * G; /* query heads of this item: h0*G .. h1*G */
            const int32_t *bt = block_tables + r * bt_stride;
            for (int64_t t = item_tok[it]; t < t_last; t++) {
                const int64_t pos = context_lens[r] + (t - query_start_loc[r]);
                const int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
                for (int64_t j = 0; j < nh; j++) {
                    load_f32(q, dtype, t * q_stride + (h0 * G + j) * D, qf + j * D, (int)D);
                    for (int64_t d = 0; d < D; d++) qf[j * D + d] *= scale;
                    mx[j] = sinks ? sinks[h0 * G + j] : -INFINITY;
                    den[j] = sinks ? 1.0f : 0.0f;
                    memset(acc + j * D, 0, (size_t)D * sizeof(float));
                }
                for (int64_t b = lo / bs; b <= pos / bs; b++) {
#ifdef __AVX2__
                    if (b < pos / bs) { /* the next block's rows of these heads, K and V */
                        const int64_t nb = ((int64_t)bt[b + 1] * bs) * row + h0 * D;
                        const int64_t span = ((bs - 1) * row + (h1 - h0) * D) * (int64_t)esize;
                        for (int64_t o = 0; o < span; o += 64) {
                            _mm_prefetch(kc + nb * (int64_t)esize + o, _MM_HINT_T0);
                            _mm_prefetch(vc + nb * (int64_t)esize + o, _MM_HINT_T0);
                        }
                    }
#endif
                    const int64_t first = b * bs > lo ? b * bs : lo;
                    const int64_t last = b * bs + bs - 1 < pos ? b * bs + bs - 1 : pos;
                    const int64_t cnt = last - first + 1;
                    for (int64_t j = 0; j < nh; j++) {
                        const int64_t base = ((int64_t)bt[b] * bs + (first - b * bs)) * row + (h0 + j / G) * D;
                        float *a = acc + j * D, m_new = mx[j];
                        scores_kv(qf + j * D, kc, dtype, base, row, cnt, (int)D, sc);
                        for (int64_t i = 0; i < cnt; i++) {
                            if (soft_cap > 0.0f) sc[i] = soft_cap * tanhf(sc[i] / soft_cap);
                            if (sc[i] > m_new) m_new = sc[i];
                        }
                        const float corr = expf(mx[j] - m_new); /* exp(-inf) = 0 on the first block */
                        if (corr != 1.0f) {
                            den[j] *= corr;
                            for (int64_t d = 0; d < D; d++) a[d] *= corr;
                        }
                        mx[j] = m_new;
                        den[j] += exp_shifted(sc, cnt, m_new);
                        accumulate_kv(a, sc, cnt, vc, dtype, base, row, (int)D);
                    }
                }
                for (int64_t j = 0; j < nh; j++) {
                    const float inv = 1.0f / den[j];
                    for (int64_t d = 0; d < D; d++) acc[j * D + d] *= inv;
                    store_f32(out, dtype, (t * Hq + h0 * G + j) * D, acc + j * D, (int)D);
                }
            }
        }
        free(qf);
        free(acc);
        free(mx);
        free(den);
        free(sc);
    }
    free(item_req);
    free(item_tok);
    free(item_grp);
}
