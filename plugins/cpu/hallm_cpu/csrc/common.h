/* hallm-cpu native kernels, shared by every source file: linear.c (small-M GEMM/GEMV), elementwise.c
 * (RMSNorm, rotary, SiLU-and-mul), attention.c (paged attention), decoder.c (a whole decoder stack).
 *
 * Built at first use by hallm_cpu.native (cc -O3 -march=native -fopenmp -shared) and called through
 * ctypes with raw pointers; torch owns every buffer. Threads come from the OpenMP runtime torch already
 * loaded (same soname, so one pool), sized per call by the caller (torch.get_num_threads()).
 *
 * dtype codes: 0 = float32, 1 = bfloat16. Arithmetic is float32; results are rounded to the activation
 * dtype where hallm.core.layers rounds (the residual sum, the normalized activations before the weight,
 * the rotary cos/sin, the SiLU output), so bf16 runs track the eager path.
 *
 * Why hand-written: with few cores, MKL's GEMV streams weights at well under half the copy bandwidth,
 * and a bf16 GEMM without native bf16 instructions is emulated; the kernels below stream
 * fp32 weights at copy speed and convert bf16 weights in registers, or, built for AVX512-BF16, multiply
 * them with its dot-product instructions. The reference paged attention gathers
 * every request's K/V into a padded tensor per layer; the kernel here reads the blocks in place.
 */
#ifndef HALLM_CPU_COMMON_H
#define HALLM_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };


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

static inline void load_f32(const void *src, int dtype, int64_t offset, float *dst, int n) {
    if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + offset;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    }
}

static inline void store_f32(void *dst, int dtype, int64_t offset, const float *src, int n) {
    if (dtype == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + offset, src, (size_t)n * sizeof(float));
    }
}

static inline void *alloc_floats(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* e^x for x <= 0 (softmax and sigmoid arguments), Cephes' expf polynomial: ~1 ulp. libm's scalar
 * expf per (token, head, position) was most of a batch-32 decode step's attention time. */
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

/* Entry points one source file calls in another (the ctypes ones are listed in hallm_cpu.native). */
void hallm_linear(const void *x, int64_t x_stride, int x_dtype, const void *packed, const void *bias, int w_dtype,
                  void *y, int64_t M, int64_t N, int64_t K, int nthreads);
void hallm_rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t r_stride, const void *weight,
                    void *out, void *res_out, int64_t T, int64_t H, float eps, int dtype, int nthreads);
void hallm_head_norm(void *base, int64_t stride, int64_t heads, int64_t D, const void *w, float eps, int64_t T,
                     int dtype, int nthreads);
void hallm_rotary(void *q, int64_t q_stride, int64_t Hq, void *k, int64_t k_stride, int64_t Hk, int64_t D,
                  int64_t half, const int64_t *positions, const float *inv_freq, float scaling, int64_t T, int dtype,
                  int nthreads);
void hallm_silu_and_mul(const void *gu, int64_t gu_stride, void *out, int64_t T, int64_t I, int dtype, int nthreads);
void hallm_paged_attention(const void *q, int64_t q_stride, const void *k_new, int64_t k_stride, const void *v_new,
                           int64_t v_stride, void *cache, int64_t num_blocks, const int64_t *slot_mapping,
                           const int32_t *query_start_loc, const int32_t *context_lens, int64_t R,
                           const int32_t *block_tables, int64_t bt_stride, void *out, int64_t T, int64_t Hq, int64_t Hk,
                           int64_t D, int64_t bs, float scale, float soft_cap, int64_t window, const float *sinks, int dtype, int nthreads);

#endif
