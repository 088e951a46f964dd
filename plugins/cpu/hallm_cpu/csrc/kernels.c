/* hallm-cpu native kernels: linear (small-M GEMM/GEMV), paged attention, RMSNorm, rotary, SiLU-and-mul.
 *
 * Built at first use by hallm_cpu.native (cc -O3 -march=native -fopenmp -shared) and called through
 * ctypes with raw pointers; torch owns every buffer. Threads come from the OpenMP runtime torch already
 * loaded (same soname, so one pool), sized per call by the caller (torch.get_num_threads()).
 *
 * dtype codes: 0 = float32, 1 = bfloat16. Arithmetic is float32; results are rounded to the activation
 * dtype where hallm.core.layers rounds (the residual sum, the normalized activations before the weight,
 * the rotary cos/sin, the SiLU output), so bf16 runs track the eager path.
 *
 * Why hand-written: on a 2-core AVX2 EPYC, MKL's GEMV streams weights at ~13 GB/s against ~30 GB/s of
 * copy bandwidth, and a bf16 GEMM without native bf16 instructions is emulated; the kernels below stream
 * fp32 weights at copy speed and convert bf16 weights in registers. The reference paged attention gathers
 * every request's K/V into a padded tensor per layer; the kernel here reads the blocks in place.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };
#ifndef PF_BYTES
#define PF_BYTES 1024
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, NaN kept quiet: the same rounding as torch's float -> bfloat16. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_to(float f, int dtype) { return dtype == DT_BF16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static void load_f32(const void *src, int dtype, int64_t offset, float *dst, int n) {
    if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + offset;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    }
}

static void store_f32(void *dst, int dtype, int64_t offset, const float *src, int n) {
    if (dtype == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + offset, src, (size_t)n * sizeof(float));
    }
}

static void *alloc_floats(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

/* ------------------------------------------------------------------------------------------------ */
/* Linear: y[M, N] = x[M, K] W[N, K]^T (+ bias[N]).                                                   */

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

/* 4 fp32 weight rows x MB (1..3) activation rows: out[m][r] = dot(w[r], x[m]). */
static void dot_4xM(const float *const w[4], const float *x, int64_t x_stride, int mb, int K, float out[3][4]) {
    int k = 0;
#ifdef __AVX2__
    __m256 acc[3][4];
    for (int m = 0; m < 3; m++)
        for (int r = 0; r < 4; r++) acc[m][r] = _mm256_setzero_ps();
    if (mb == 3) {
        for (; k + 8 <= K; k += 8) {
            __m256 w0 = _mm256_loadu_ps(w[0] + k), w1 = _mm256_loadu_ps(w[1] + k);
            __m256 w2 = _mm256_loadu_ps(w[2] + k), w3 = _mm256_loadu_ps(w[3] + k);
            for (int m = 0; m < 3; m++) {
                __m256 xv = _mm256_loadu_ps(x + m * x_stride + k);
                acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
                acc[m][2] = _mm256_fmadd_ps(w2, xv, acc[m][2]);
                acc[m][3] = _mm256_fmadd_ps(w3, xv, acc[m][3]);
            }
        }
    } else if (mb == 1) {
        /* The GEMV: named accumulators, or gcc keeps the acc array on the stack. */
        __m256 a0 = acc[0][0], a1 = acc[0][1], a2 = acc[0][2], a3 = acc[0][3];
        for (; k + 8 <= K; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w[0] + k), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w[1] + k), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w[2] + k), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w[3] + k), xv, a3);
        }
        acc[0][0] = a0, acc[0][1] = a1, acc[0][2] = a2, acc[0][3] = a3;
    } else {
        for (; k + 8 <= K; k += 8) {
            for (int m = 0; m < mb; m++) {
                __m256 xv = _mm256_loadu_ps(x + m * x_stride + k);
                for (int r = 0; r < 4; r++) acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k), xv, acc[m][r]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < 4; r++) out[m][r] = hsum8(acc[m][r]);
#else
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < 4; r++) out[m][r] = 0.0f;
#endif
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < 4; r++) {
            float s = 0.0f;
            const float *xm = x + m * x_stride, *wr = w[r];
#pragma omp simd reduction(+ : s)
            for (int kk = k; kk < K; kk++) s += wr[kk] * xm[kk];
            out[m][r] += s;
        }
}

/* One activation row against one weight row: the batch-1 decode path, bandwidth-bound. Rows are
 * walked one after another (a single sequential stream per thread prefetches better than 4
 * interleaved ones: 26 vs 21-24 GB/s here), with 4 accumulators to cover the FMA latency. bf16
 * weights are widened in registers; `xp` holds x with each 16-element chunk reordered to match
 * the order of _mm256_unpack{lo,hi}_epi16 (see hallm_linear). */
static float dot_row_f32(const float *w, const float *x, int K) {
    int k = 0;
    float s = 0.0f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

static float dot_row_bf16(const uint16_t *w, const float *x, const float *xp, int K) {
    int k = 0;
    float s = 0.0f;
#ifdef __AVX2__
    const __m256i zero = _mm256_setzero_si256();
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)(w + k) + PF_BYTES, _MM_HINT_T0);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0)), _mm256_loadu_ps(xp + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0)), _mm256_loadu_ps(xp + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v1)), _mm256_loadu_ps(xp + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v1)), _mm256_loadu_ps(xp + k + 24), a3);
    }
    for (; k + 16 <= K; k += 16) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + k));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0)), _mm256_loadu_ps(xp + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0)), _mm256_loadu_ps(xp + k + 8), a1);
    }
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
    (void)xp;
#endif
    for (; k < K; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}

/* x: [M, K] rows `x_stride` elements apart (dtype x_dtype); w: [N, K] contiguous (w_dtype); bias: [N]
 * (w_dtype) or NULL; y: [M, N] contiguous (x_dtype). */
void hallm_linear(const void *x, int64_t x_stride, int x_dtype, const void *w, const void *bias, int w_dtype,
                  void *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    float *xs = alloc_floats((size_t)M * K);
    float *xp = alloc_floats((size_t)K);
    for (int64_t m = 0; m < M; m++) load_f32(x, x_dtype, m * x_stride, xs + m * K, (int)K);
    /* The unpack order of 16 bf16 weights: lo = elements 0-3, 8-11; hi = 4-7, 12-15. */
    for (int64_t k = 0; k + 16 <= K; k += 16)
        for (int j = 0; j < 4; j++) {
            xp[k + j] = xs[k + j];
            xp[k + 4 + j] = xs[k + 8 + j];
            xp[k + 8 + j] = xs[k + 4 + j];
            xp[k + 12 + j] = xs[k + 12 + j];
        }
    if (M == 1) {
        float *yf = alloc_floats((size_t)N);
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float v = w_dtype == DT_BF16 ? dot_row_bf16((const uint16_t *)w + n * K, xs, xp, (int)K)
                                         : dot_row_f32((const float *)w + n * K, xs, (int)K);
            if (bias) v += w_dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)bias)[n]) : ((const float *)bias)[n];
            yf[n] = v;
        }
        store_f32(y, x_dtype, 0, yf, (int)N);
        free(yf);
        free(xs);
        free(xp);
        return;
    }
    const int64_t nblocks = (N + 3) / 4;
#pragma omp parallel num_threads(nthreads)
    {
        float *wbuf = w_dtype == DT_BF16 ? alloc_floats((size_t)4 * K) : NULL;
        float *yrow = alloc_floats((size_t)4);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < nblocks; nb++) {
            const int64_t n0 = nb * 4;
            const int rows = (int)(N - n0 < 4 ? N - n0 : 4);
            float bias4[4] = {0, 0, 0, 0};
            if (bias)
                for (int r = 0; r < rows; r++)
                    bias4[r] = w_dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)bias)[n0 + r])
                                                  : ((const float *)bias)[n0 + r];
            float out[3][4];
            const float *wr[4];
            for (int r = 0; r < 4; r++) {
                int64_t n = n0 + (r < rows ? r : 0);
                if (wbuf) {
                    load_f32(w, DT_BF16, n * K, wbuf + r * K, (int)K);
                    wr[r] = wbuf + r * K;
                } else {
                    wr[r] = (const float *)w + n * K;
                }
            }
            for (int64_t m = 0; m < M; m += 3) {
                int mb = (int)(M - m < 3 ? M - m : 3);
                dot_4xM(wr, xs + m * K, K, mb, (int)K, out);
                for (int i = 0; i < mb; i++) {
                    for (int r = 0; r < rows; r++) yrow[r] = out[i][r] + bias4[r];
                    store_f32(y, x_dtype, (m + i) * N + n0, yrow, rows);
                }
            }
        }
        free(wbuf);
        free(yrow);
    }
    free(xs);
    free(xp);
}

/* ------------------------------------------------------------------------------------------------ */
/* Elementwise layers.                                                                                 */

/* dst = round(row * rstd) * weight (the caller rounds dst when it stores it). One definition for
 * the layer norms and Qwen3's per-head q/k norms, so both sum in the same order. */
static void rms_row(const float *row, const float *wf, int64_t n, float eps, int dtype, float *dst) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += row[i] * row[i];
    const float rstd = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) dst[i] = round_to(row[i] * rstd, dtype) * wf[i];
}

/* out = round(round(x_r * rstd) * weight) where x_r = round(x + residual) (or x); res_out = x_r.
 * x, residual: [T, H] rows x_stride / r_stride apart; out, res_out: [T, H] contiguous. */
void hallm_rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t r_stride, const void *weight,
                    void *out, void *res_out, int64_t T, int64_t H, float eps, int dtype, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float *row = alloc_floats((size_t)H), *tmp = alloc_floats((size_t)H), *wf = alloc_floats((size_t)H);
        load_f32(weight, dtype, 0, wf, (int)H);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            load_f32(x, dtype, t * x_stride, row, (int)H);
            if (residual) {
                load_f32(residual, dtype, t * r_stride, tmp, (int)H);
                for (int64_t i = 0; i < H; i++) row[i] = round_to(row[i] + tmp[i], dtype);
                store_f32(res_out, dtype, t * H, row, (int)H);
            }
            rms_row(row, wf, H, eps, dtype, tmp);
            store_f32(out, dtype, t * H, tmp, (int)H);
        }
        free(row);
        free(tmp);
        free(wf);
    }
}

/* NeoX rotate-half on the first 2*half dims of every head, in place.
 * q: [T, Hq, D] with token stride q_stride (heads D apart); k likewise; positions int64 [T];
 * inv_freq float32 [half]; cos/sin = round(cos/sin(pos * inv_freq) * scaling) as in RotaryEmbedding. */
void hallm_rotary(void *q, int64_t q_stride, int64_t Hq, void *k, int64_t k_stride, int64_t Hk, int64_t D,
                  int64_t half, const int64_t *positions, const float *inv_freq, float scaling, int64_t T,
                  int dtype, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float *cs = alloc_floats((size_t)half), *sn = alloc_floats((size_t)half), *v = alloc_floats((size_t)2 * half);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const float p = (float)positions[t];
            for (int64_t i = 0; i < half; i++) {
                const float f = p * inv_freq[i];
                cs[i] = round_to(cosf(f) * scaling, dtype);
                sn[i] = round_to(sinf(f) * scaling, dtype);
            }
            for (int which = 0; which < 2; which++) {
                void *base = which ? k : q;
                const int64_t heads = which ? Hk : Hq, stride = which ? k_stride : q_stride;
                for (int64_t h = 0; h < heads; h++) {
                    const int64_t off = t * stride + h * D;
                    load_f32(base, dtype, off, v, (int)(2 * half));
                    float o[2 * half];
                    for (int64_t i = 0; i < half; i++) {
                        o[i] = v[i] * cs[i] - v[half + i] * sn[i];
                        o[half + i] = v[half + i] * cs[i] + v[i] * sn[i];
                    }
                    store_f32(base, dtype, off, o, (int)(2 * half));
                }
            }
        }
        free(cs);
        free(sn);
        free(v);
    }
}

/* out[t, i] = round(silu(gate)) * up with gate = gu[t, i], up = gu[t, I + i]; gu rows gu_stride apart. */
void hallm_silu_and_mul(const void *gu, int64_t gu_stride, void *out, int64_t T, int64_t I, int dtype,
                        int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float *g = alloc_floats((size_t)I), *u = alloc_floats((size_t)I);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            load_f32(gu, dtype, t * gu_stride, g, (int)I);
            load_f32(gu, dtype, t * gu_stride + I, u, (int)I);
            for (int64_t i = 0; i < I; i++) g[i] = round_to(g[i] / (1.0f + expf(-g[i])), dtype) * u[i];
            store_f32(out, dtype, t * I, g, (int)I);
        }
        free(g);
        free(u);
    }
}

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
 * 8-wide slice of acc stays in a register across the block's positions. */
static inline void accumulate_kv(float *acc, const float *p, int64_t cnt, const void *kv, int dtype, int64_t off,
                                 int64_t row, int D) {
    int d = 0;
#ifdef __AVX2__
    for (; d + 8 <= D; d += 8) {
        __m256 a = _mm256_loadu_ps(acc + d);
        for (int64_t i = 0; i < cnt; i++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), load8_kv(kv, dtype, off + i * row + d), a);
        _mm256_storeu_ps(acc + d, a);
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

#define QUERY_CHUNK 16

#ifdef __AVX2__
/* e^x for x <= 0 (softmax arguments), Cephes' expf polynomial: ~1 ulp. libm's scalar expf per
 * (token, head, position) was most of a batch-32 decode step's attention time. */
static inline __m256 exp_neg256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}
#endif

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
 * positions max(0, pos - window + 1) .. pos (window <= 0: all). soft_cap <= 0: none. */
void hallm_paged_attention(const void *q, int64_t q_stride, const void *k_new, int64_t k_stride, const void *v_new, int64_t v_stride,
                           void *cache, int64_t num_blocks, const int64_t *slot_mapping,
                           const int32_t *query_start_loc, const int32_t *context_lens,
                           int64_t R, const int32_t *block_tables, int64_t bt_stride, void *out, int64_t T,
                           int64_t Hq, int64_t Hk, int64_t D, int64_t bs, float scale, float soft_cap,
                           int64_t window, int dtype, int nthreads) {
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

    /* Work items: (request, KV head, chunk of QUERY_CHUNK query tokens). */
    int64_t items = 0;
    for (int64_t r = 0; r < R; r++) items += (query_start_loc[r + 1] - query_start_loc[r] + QUERY_CHUNK - 1) / QUERY_CHUNK;
    int64_t *item_req = malloc((size_t)(items ? items : 1) * sizeof(int64_t));
    int64_t *item_tok = malloc((size_t)(items ? items : 1) * sizeof(int64_t));
    int64_t n = 0;
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = query_start_loc[r]; j < query_start_loc[r + 1]; j += QUERY_CHUNK) {
            item_req[n] = r;
            item_tok[n] = j;
            n++;
        }
    const int64_t G = Hq / Hk;
#pragma omp parallel num_threads(nthreads)
    {
        float *qf = alloc_floats((size_t)G * D), *acc = alloc_floats((size_t)G * D);
        float *mx = alloc_floats((size_t)G), *den = alloc_floats((size_t)G), *sc = alloc_floats((size_t)G * bs);
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t it = 0; it < items; it++)
            for (int64_t kvh = 0; kvh < Hk; kvh++) {
                const int64_t r = item_req[it], t_end = query_start_loc[r + 1];
                const int64_t t_last = item_tok[it] + QUERY_CHUNK < t_end ? item_tok[it] + QUERY_CHUNK : t_end;
                const int32_t *bt = block_tables + r * bt_stride;
                for (int64_t t = item_tok[it]; t < t_last; t++) {
                    const int64_t pos = context_lens[r] + (t - query_start_loc[r]);
                    const int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
                    for (int64_t g = 0; g < G; g++) {
                        load_f32(q, dtype, t * q_stride + (kvh * G + g) * D, qf + g * D, (int)D);
                        for (int64_t d = 0; d < D; d++) qf[g * D + d] *= scale;
                        mx[g] = -INFINITY;
                        den[g] = 0.0f;
                        memset(acc + g * D, 0, (size_t)D * sizeof(float));
                    }
                    for (int64_t b = lo / bs; b <= pos / bs; b++) {
                        const int64_t first = b * bs > lo ? b * bs : lo;
                        const int64_t last = b * bs + bs - 1 < pos ? b * bs + bs - 1 : pos;
                        const int64_t base = ((int64_t)bt[b] * bs) * row + kvh * D;
                        const int64_t cnt = last - first + 1;
                        for (int64_t g = 0; g < G; g++) {
                            float *s = sc + g * bs, m_new = mx[g];
                            for (int64_t i = 0; i < cnt; i++) {
                                float v = dot_kv(qf + g * D, kc, dtype, base + (first - b * bs + i) * row, (int)D);
                                if (soft_cap > 0.0f) v = soft_cap * tanhf(v / soft_cap);
                                s[i] = v;
                                if (v > m_new) m_new = v;
                            }
                            const float corr = expf(mx[g] - m_new); /* exp(-inf) = 0 on the first block */
                            if (corr != 1.0f) {
                                den[g] *= corr;
                                for (int64_t d = 0; d < D; d++) acc[g * D + d] *= corr;
                            }
                            mx[g] = m_new;
                            den[g] += exp_shifted(s, cnt, m_new);
                            accumulate_kv(acc + g * D, s, cnt, vc, dtype, base + (first - b * bs) * row, row, (int)D);
                        }
                    }
                    for (int64_t g = 0; g < G; g++) {
                        const float inv = 1.0f / den[g];
                        for (int64_t d = 0; d < D; d++) acc[g * D + d] *= inv;
                        store_f32(out, dtype, (t * Hq + kvh * G + g) * D, acc + g * D, (int)D);
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
}

/* ------------------------------------------------------------------------------------------------ */
/* The whole decoder stack of a Llama-family model for one small step, in one call.                    */

/* One decoder layer's parameters (bias / q-k norm pointers may be NULL). Mirrored by
 * hallm_cpu.decoder.LayerParams: keep the two in the same order. */
typedef struct {
    const void *input_norm, *post_norm; /* [H] */
    const void *qkv_w, *qkv_b;          /* [Hq*D + 2*Hk*D, H], [Hq*D + 2*Hk*D] */
    const void *q_norm, *k_norm;        /* [D] */
    const void *o_w, *o_b;              /* [H, Hq*D], [H] */
    const void *gate_up_w, *gate_up_b;  /* [2I, H], [2I] */
    const void *down_w, *down_b;        /* [H, I], [H] */
    void *kv_cache;                     /* [2, num_blocks, bs, Hk, D] */
    int64_t num_blocks;
    int64_t window; /* <= 0: none */
    float input_eps, post_eps, qk_eps, scale, soft_cap;
} hallm_layer;

/* Per-head RMSNorm of `heads` heads of D at base + t*stride + h*D, in place (Qwen3's q/k norm). */
static void head_norm(void *base, int64_t stride, int64_t heads, int64_t D, const void *w, float eps, int64_t T,
                      int dtype, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float *row = alloc_floats((size_t)D), *wf = alloc_floats((size_t)D), *tmp = alloc_floats((size_t)D);
        load_f32(w, dtype, 0, wf, (int)D);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * heads; i++) {
            const int64_t off = (i / heads) * stride + (i % heads) * D;
            load_f32(base, dtype, off, row, (int)D);
            rms_row(row, wf, D, eps, dtype, tmp);
            store_f32(base, dtype, off, tmp, (int)D);
        }
        free(row);
        free(wf);
        free(tmp);
    }
}

/* hidden [T, H] holds the step's embeddings on entry; out [T, H] gets the final-normed hidden
 * states. residual [T, H], h [T, H], qkv [T, (Hq + 2 Hk) D], attn [T, Hq D], gate_up [T, 2I] and
 * act [T, I] are scratch, all in the model dtype. The same kernels, in the same order, as the
 * modules of hallm.core.models.llama after hallm_cpu.fused's swap: the results are identical. */
void hallm_decoder_layers(const hallm_layer *layers, int64_t n_layers, const void *final_norm, float final_eps,
                          void *hidden, void *residual, void *h, void *qkv, void *attn, void *gate_up, void *act,
                          void *out, int64_t T, int64_t H, int64_t Hq, int64_t Hk, int64_t D, int64_t I, int64_t bs,
                          const int64_t *positions, const float *inv_freq, int64_t half, float rope_scaling,
                          const int64_t *slot_mapping, const int32_t *query_start_loc, const int32_t *context_lens,
                          int64_t R, const int32_t *block_tables, int64_t bt_stride, int dtype, int nthreads) {
    const size_t esize = dtype == DT_BF16 ? 2 : 4;
    const int64_t qs = Hq * D, kvs = Hk * D, S = qs + 2 * kvs;
    char *qkv_c = (char *)qkv;
    for (int64_t l = 0; l < n_layers; l++) {
        const hallm_layer *L = layers + l;
        if (l == 0) {
            memcpy(residual, hidden, (size_t)(T * H) * esize);
            hallm_rms_norm(hidden, H, NULL, 0, L->input_norm, h, NULL, T, H, L->input_eps, dtype, nthreads);
        } else {
            hallm_rms_norm(hidden, H, residual, H, L->input_norm, h, residual, T, H, L->input_eps, dtype, nthreads);
        }
        hallm_linear(h, H, dtype, L->qkv_w, L->qkv_b, dtype, qkv, T, S, H, nthreads);
        if (L->q_norm) {
            head_norm(qkv, S, Hq, D, L->q_norm, L->qk_eps, T, dtype, nthreads);
            head_norm(qkv_c + qs * esize, S, Hk, D, L->k_norm, L->qk_eps, T, dtype, nthreads);
        }
        hallm_rotary(qkv, S, Hq, qkv_c + qs * esize, S, Hk, D, half, positions, inv_freq, rope_scaling, T, dtype,
                     nthreads);
        hallm_paged_attention(qkv, S, qkv_c + qs * esize, S, qkv_c + (qs + kvs) * esize, S, L->kv_cache,
                              L->num_blocks, slot_mapping, query_start_loc, context_lens, R, block_tables, bt_stride,
                              attn, T, Hq, Hk, D, bs, L->scale, L->soft_cap, L->window, dtype, nthreads);
        hallm_linear(attn, qs, dtype, L->o_w, L->o_b, dtype, hidden, T, H, qs, nthreads);
        hallm_rms_norm(hidden, H, residual, H, L->post_norm, h, residual, T, H, L->post_eps, dtype, nthreads);
        hallm_linear(h, H, dtype, L->gate_up_w, L->gate_up_b, dtype, gate_up, T, 2 * I, H, nthreads);
        hallm_silu_and_mul(gate_up, 2 * I, act, T, I, dtype, nthreads);
        hallm_linear(act, I, dtype, L->down_w, L->down_b, dtype, hidden, T, H, I, nthreads);
    }
    hallm_rms_norm(hidden, H, residual, H, final_norm, out, residual, T, H, final_eps, dtype, nthreads);
}
