/* Elementwise layers: RMSNorm (+ residual), per-head RMSNorm, rotary, SiLU-and-mul. */
#include "common.h"

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
            int64_t i = 0;
#ifdef __AVX2__
            /* silu(x) = x * sigmoid(x), sigmoid from e = exp(-|x|) <= 1 (never overflows): 1 / (1 + e)
             * for x >= 0, e / (1 + e) below. libm's scalar expf made this a large share of a bf16 prefill. */
            const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
            for (; i + 8 <= I; i += 8) {
                const __m256 x = _mm256_loadu_ps(g + i);
                const __m256 e = exp_neg256(_mm256_or_ps(x, sign));
                const __m256 num = _mm256_blendv_ps(one, e, x);  /* sign bit of x set: e */
                _mm256_storeu_ps(g + i, _mm256_div_ps(_mm256_mul_ps(x, num), _mm256_add_ps(one, e)));
            }
#endif
            for (; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i]));
            for (i = 0; i < I; i++) g[i] = round_to(g[i], dtype) * u[i];
            store_f32(out, dtype, t * I, g, (int)I);
        }
        free(g);
        free(u);
    }
}

/* Per-head RMSNorm of `heads` heads of D at base + t*stride + h*D, in place (Qwen3's q/k norm). */
void hallm_head_norm(void *base, int64_t stride, int64_t heads, int64_t D, const void *w, float eps, int64_t T,
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
