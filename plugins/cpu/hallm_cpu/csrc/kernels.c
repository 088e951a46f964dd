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
 * fp32 weights at copy speed and convert bf16 weights in registers, or, built for AVX512-BF16, multiply
 * them with its dot-product instructions. The reference paged attention gathers
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
/* Linear: y[M, N] = x[M, K] W[N, K]^T (+ bias[N]), on weights packed once at load.                  */
/*
 * Packed layout: panels of NR = 16 output features, P[p][k][j] = W[16 p + j][k] (zero rows past N),
 * in the weight's dtype. One layout serves every row count: a panel is a sequential stream (the
 * batch-1 GEMV reads memory front to back), and the 6 x 16 register tile (12 accumulators, 6
 * broadcasts and 2 panel loads per k) runs the batched case without repacking per call. Measured on
 * the 2-core AVX2 EPYC against MKL's sgemm on [N, K]: 3072 x 576 at 32 rows 128 vs 91 GFLOPS,
 * 576 x 1536 at 32 rows 179 vs 107; bf16 panels are widened in registers, never in memory.
 */
#define NR 16
#define MR 6

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

#define LOAD_PANEL_F32(P, off, b0, b1)                       \
    do {                                                     \
        const float *p_ = (const float *)(P) + (off);        \
        b0 = _mm256_loadu_ps(p_);                            \
        b1 = _mm256_loadu_ps(p_ + 8);                        \
    } while (0)
/* bf16 panel row -> two fp32 vectors by interleaving zeros below each value: b0 holds features
 * 0-3 and 8-11, b1 holds 4-7 and 12-15 (the 128-bit lanes of unpack); `unscramble16` restores the
 * order of a finished tile. One load, two unpacks: fewer uops than widening with vpmovzxwd. */
#define LOAD_PANEL_BF16(P, off, b0, b1)                                                         \
    do {                                                                                        \
        const __m256i v_ = _mm256_loadu_si256((const __m256i *)((const uint16_t *)(P) + (off))); \
        b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v_));          \
        b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v_));          \
    } while (0)

/* C[6][16] = x rows 0..5 (lda apart) times one panel (K x 16). Named accumulators: with an array,
 * gcc spills them every iteration. */
#define TILE_6x16(NAME, LOAD)                                                                              \
    static void NAME(const float *x, int64_t lda, const void *P, int64_t K, float *C) {                   \
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;          \
        __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;                          \
        const float *x0 = x, *x1 = x + lda, *x2 = x + 2 * lda, *x3 = x + 3 * lda, *x4 = x + 4 * lda,      \
                    *x5 = x + 5 * lda;                                                                     \
        for (int64_t k = 0; k < K; k++) {                                                                  \
            __m256 b0, b1, a;                                                                              \
            LOAD(P, k * NR, b0, b1);                                                                       \
            a = _mm256_broadcast_ss(x0 + k), c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01); \
            a = _mm256_broadcast_ss(x1 + k), c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11); \
            a = _mm256_broadcast_ss(x2 + k), c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21); \
            a = _mm256_broadcast_ss(x3 + k), c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31); \
            a = _mm256_broadcast_ss(x4 + k), c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41); \
            a = _mm256_broadcast_ss(x5 + k), c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51); \
        }                                                                                                  \
        _mm256_storeu_ps(C, c00), _mm256_storeu_ps(C + 8, c01), _mm256_storeu_ps(C + 16, c10);             \
        _mm256_storeu_ps(C + 24, c11), _mm256_storeu_ps(C + 32, c20), _mm256_storeu_ps(C + 40, c21);       \
        _mm256_storeu_ps(C + 48, c30), _mm256_storeu_ps(C + 56, c31), _mm256_storeu_ps(C + 64, c40);       \
        _mm256_storeu_ps(C + 72, c41), _mm256_storeu_ps(C + 80, c50), _mm256_storeu_ps(C + 88, c51);       \
    }
TILE_6x16(tile_6x16_f32, LOAD_PANEL_F32)
TILE_6x16(tile_6x16_bf16, LOAD_PANEL_BF16)

/* C[16] = one row x one panel: the GEMV, bandwidth-bound; 4 accumulators (k even/odd x 2 halves)
 * cover the FMA latency. */
#define TILE_1x16(NAME, LOAD)                                                                              \
    static void NAME(const float *x, const void *P, int64_t K, float *C) {                                \
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, b0, b1, b2, b3;                       \
        int64_t k = 0;                                                                                     \
        for (; k + 2 <= K; k += 2) {                                                                       \
            LOAD(P, k * NR, b0, b1);                                                                       \
            LOAD(P, (k + 1) * NR, b2, b3);                                                                 \
            const __m256 a0 = _mm256_broadcast_ss(x + k), a1 = _mm256_broadcast_ss(x + k + 1);            \
            c0 = _mm256_fmadd_ps(a0, b0, c0), c1 = _mm256_fmadd_ps(a0, b1, c1);                            \
            c2 = _mm256_fmadd_ps(a1, b2, c2), c3 = _mm256_fmadd_ps(a1, b3, c3);                            \
        }                                                                                                  \
        if (k < K) {                                                                                       \
            LOAD(P, k * NR, b0, b1);                                                                       \
            const __m256 a0 = _mm256_broadcast_ss(x + k);                                                  \
            c0 = _mm256_fmadd_ps(a0, b0, c0), c1 = _mm256_fmadd_ps(a0, b1, c1);                            \
        }                                                                                                  \
        _mm256_storeu_ps(C, _mm256_add_ps(c0, c2)), _mm256_storeu_ps(C + 8, _mm256_add_ps(c1, c3));       \
    }
TILE_1x16(tile_1x16_f32, LOAD_PANEL_F32)
TILE_1x16(tile_1x16_bf16, LOAD_PANEL_BF16)
#endif

/* A tile row computed from LOAD_PANEL_BF16 holds features 0-3, 8-11, 4-7, 12-15: swap the middle quarters. */
static inline void unscramble16(float *c) {
    float t[4];
    memcpy(t, c + 4, sizeof t);
    memcpy(c + 4, c + 8, sizeof t);
    memcpy(c + 8, t, sizeof t);
}

#ifndef __AVX2__
/* Portable tile: C[mr][16] for mr <= 6 rows. */
static void tile_generic(const float *x, int64_t lda, int mr, const void *P, int dtype, int64_t K, float *C) {
    memset(C, 0, sizeof(float) * MR * NR);
    for (int m = 0; m < mr; m++)
        for (int64_t k = 0; k < K; k++) {
            const float a = x[m * lda + k];
            for (int j = 0; j < NR; j++) {
                const float w = dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)P)[k * NR + j])
                                                 : ((const float *)P)[k * NR + j];
                C[m * NR + j] += a * w;
            }
        }
}
#endif

/* ---- bf16 dot-product instructions (AVX512-BF16: Zen 4, Sapphire Rapids and later) ----------------- */
/*
 * Where the compiler targets AVX512-BF16, bf16 weights are packed in k-pairs instead:
 * P[p][k/2][j][2] = W[16 p + j][k, k+1] (K padded to even with zeros), so one 512-bit load holds a
 * panel's 16 features x 2 k, and VDPBF16PS multiplies it by a broadcast pair of x and adds both
 * products into 16 fp32 accumulators: 32 multiply-adds per instruction, on bf16 operands as they
 * are, against 8 per FMA after widening. x is taken as bf16 (fp32 activations are rounded to bf16,
 * as a bf16 matmul does). bf16 products are exact in fp32; denormal inputs count as zero.
 * Measured on the 2-core Zen 4 EPYC: 576 -> 1536 at 32 rows, 170 GFLOPS widened vs ~300 here.
 */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define BF16_PAIRS 1

/* C[R][32] = x rows 0..R-1 (bf16, lda elements apart, K even) times two consecutive panels, for
 * R = 1..6: one function per row count (named accumulators, the unused ones folded away), so a
 * batch that is not a multiple of 6 rows computes no padding rows (32 rows: 6+6+6+6+6+2, not 36). */
#define PAIR_ROW2(m, c0, c1)                                                                     \
    if (ROWS > (m)) {                                                                            \
        const __m512bh a = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + (m) * lda + 2 * kp)); \
        c0 = _mm512_dpbf16_ps(c0, a, b0), c1 = _mm512_dpbf16_ps(c1, a, b1);                        \
    }
#define STORE_ROW2(m, c0, c1) \
    if (ROWS > (m)) _mm512_storeu_ps(C + (m) * 32, c0), _mm512_storeu_ps(C + (m) * 32 + 16, c1);
#define TILE_PAIRS_32(R)                                                                                 \
    static void tile_##R##x32_pairs(const uint16_t *x, int64_t lda, const uint16_t *P0, const uint16_t *P1, \
                                    int64_t K, float *C) {                                               \
        enum { ROWS = R };                                                                               \
        __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;         \
        __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;                         \
        for (int64_t kp = 0; kp < K / 2; kp++) {                                                         \
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(P0 + kp * 2 * NR);                         \
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(P1 + kp * 2 * NR);                         \
            PAIR_ROW2(0, c00, c01) PAIR_ROW2(1, c10, c11) PAIR_ROW2(2, c20, c21)                         \
            PAIR_ROW2(3, c30, c31) PAIR_ROW2(4, c40, c41) PAIR_ROW2(5, c50, c51)                         \
        }                                                                                                \
        STORE_ROW2(0, c00, c01) STORE_ROW2(1, c10, c11) STORE_ROW2(2, c20, c21)                          \
        STORE_ROW2(3, c30, c31) STORE_ROW2(4, c40, c41) STORE_ROW2(5, c50, c51)                          \
    }
TILE_PAIRS_32(1) TILE_PAIRS_32(2) TILE_PAIRS_32(3) TILE_PAIRS_32(4) TILE_PAIRS_32(5) TILE_PAIRS_32(6)

/* C[R][16]: the same on one panel (the last of an odd count). */
#define PAIR_ROW1(m, c) \
    if (ROWS > (m)) c = _mm512_dpbf16_ps(c, (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + (m) * lda + 2 * kp)), b);
#define STORE_ROW1(m, c) \
    if (ROWS > (m)) _mm512_storeu_ps(C + (m) * 16, c);
#define TILE_PAIRS_16(R)                                                                                 \
    static void tile_##R##x16_pairs(const uint16_t *x, int64_t lda, const uint16_t *P, int64_t K, float *C) { \
        enum { ROWS = R };                                                                               \
        __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;                    \
        for (int64_t kp = 0; kp < K / 2; kp++) {                                                         \
            const __m512bh b = (__m512bh)_mm512_loadu_si512(P + kp * 2 * NR);                            \
            PAIR_ROW1(0, c0) PAIR_ROW1(1, c1) PAIR_ROW1(2, c2) PAIR_ROW1(3, c3) PAIR_ROW1(4, c4) PAIR_ROW1(5, c5) \
        }                                                                                                \
        STORE_ROW1(0, c0) STORE_ROW1(1, c1) STORE_ROW1(2, c2) STORE_ROW1(3, c3) STORE_ROW1(4, c4) STORE_ROW1(5, c5) \
    }
TILE_PAIRS_16(1) TILE_PAIRS_16(2) TILE_PAIRS_16(3) TILE_PAIRS_16(4) TILE_PAIRS_16(5) TILE_PAIRS_16(6)
#undef PAIR_ROW2
#undef STORE_ROW2
#undef PAIR_ROW1
#undef STORE_ROW1

typedef void (*tile32_fn)(const uint16_t *, int64_t, const uint16_t *, const uint16_t *, int64_t, float *);
typedef void (*tile16_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, float *);
static const tile32_fn TILES_32[MR + 1] = {NULL, tile_1x32_pairs, tile_2x32_pairs, tile_3x32_pairs,
                                           tile_4x32_pairs, tile_5x32_pairs, tile_6x32_pairs};
static const tile16_fn TILES_16[MR + 1] = {NULL, tile_1x16_pairs, tile_2x16_pairs, tile_3x16_pairs,
                                           tile_4x16_pairs, tile_5x16_pairs, tile_6x16_pairs};

/* C[16] = one row x one panel (the GEMV, bandwidth-bound): 4 accumulators over consecutive k-pairs. */
static void gemv_16_pairs(const uint16_t *x, const uint16_t *P, int64_t K, float *C) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    const int32_t *xp = (const int32_t *)x;
    const int64_t KP = K / 2;
    int64_t kp = 0;
    for (; kp + 4 <= KP; kp += 4) {
        c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_set1_epi32(xp[kp]), (__m512bh)_mm512_loadu_si512(P + kp * 2 * NR));
        c1 = _mm512_dpbf16_ps(c1, (__m512bh)_mm512_set1_epi32(xp[kp + 1]),
                              (__m512bh)_mm512_loadu_si512(P + (kp + 1) * 2 * NR));
        c2 = _mm512_dpbf16_ps(c2, (__m512bh)_mm512_set1_epi32(xp[kp + 2]),
                              (__m512bh)_mm512_loadu_si512(P + (kp + 2) * 2 * NR));
        c3 = _mm512_dpbf16_ps(c3, (__m512bh)_mm512_set1_epi32(xp[kp + 3]),
                              (__m512bh)_mm512_loadu_si512(P + (kp + 3) * 2 * NR));
    }
    for (; kp < KP; kp++)
        c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_set1_epi32(xp[kp]), (__m512bh)_mm512_loadu_si512(P + kp * 2 * NR));
    _mm512_storeu_ps(C, _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)));
}

/* y[M, N] = x[M, K] W^T + bias with W packed in k-pairs; Kp = K rounded up to even. */
static void linear_bf16_pairs(const void *x, int64_t x_stride, int x_dtype, const uint16_t *packed, const void *bias,
                              void *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t Kp = (K + 1) & ~(int64_t)1;
    /* x as bf16 rows of Kp, zero-padded in k. */
    uint16_t *xb = aligned_alloc(64, (((size_t)(M * Kp) * 2 + 63) & ~(size_t)63) + 64);
    if (Kp > K)
        for (int64_t m = 0; m < M; m++) xb[m * Kp + K] = 0;
    for (int64_t m = 0; m < M; m++) {
        if (x_dtype == DT_BF16) {
            memcpy(xb + m * Kp, (const uint16_t *)x + m * x_stride, (size_t)K * 2);
        } else {
            const float *xf = (const float *)x + m * x_stride;
            for (int64_t k = 0; k < K; k++) xb[m * Kp + k] = f32_to_bf16(xf[k]);
        }
    }
    const int64_t panels = (N + NR - 1) / NR, pairs = (panels + 1) / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t pp = 0; pp < pairs; pp++) {
        const int64_t p0 = 2 * pp, np = p0 + 1 < panels ? 2 : 1;
        float C[MR * 2 * NR], row[2 * NR], bias32[2 * NR] = {0};
        const int64_t n0 = p0 * NR;
        const int nn = (int)(N - n0 < np * NR ? N - n0 : np * NR);
        if (bias)
            for (int j = 0; j < nn; j++) bias32[j] = bf16_to_f32(((const uint16_t *)bias)[n0 + j]);
        const uint16_t *P0 = packed + p0 * Kp * NR, *P1 = P0 + Kp * NR;
        for (int64_t m = 0; m < M; m += MR) {
            const int mr = (int)(M - m < MR ? M - m : MR);
            int64_t ldc = np * NR;
            if (M == 1) {
                gemv_16_pairs(xb, P0, Kp, C);
                if (np == 2) gemv_16_pairs(xb, P1, Kp, C + NR);
            } else if (np == 2) {
                TILES_32[mr](xb + m * Kp, Kp, P0, P1, Kp, C);
            } else {
                TILES_16[mr](xb + m * Kp, Kp, P0, Kp, C);
            }
            for (int i = 0; i < mr; i++) {
                for (int j = 0; j < nn; j++) row[j] = C[i * ldc + j] + bias32[j];
                store_f32(y, x_dtype, (m + i) * N + n0, row, nn);
            }
        }
    }
    free(xb);
}
#else
#define BF16_PAIRS 0
#endif

/* 1 when bf16 weights are packed in k-pairs for the dot-product instructions (see above). */
int hallm_bf16_pairs(void) { return BF16_PAIRS; }

/* K as packed: rounded up to even for k-pair panels, else K. */
int64_t hallm_packed_k(int dtype, int64_t K) { return dtype == DT_BF16 && BF16_PAIRS ? (K + 1) & ~(int64_t)1 : K; }

/* packed [ceil(N/16), Kp, 16] <- w [N, K] (both in `dtype`; Kp = hallm_packed_k): P[p][k][j] =
 * W[16 p + j][k], or for k-pair panels P[p][k/2][j][k%2]; zeros past N and K. */
void hallm_pack_linear(const void *w, int dtype, int64_t N, int64_t K, void *packed) {
    const size_t esize = dtype == DT_BF16 ? 2 : 4;
    const int64_t panels = (N + NR - 1) / NR, Kp = hallm_packed_k(dtype, K);
    const int pairs = dtype == DT_BF16 && BF16_PAIRS;
    memset(packed, 0, (size_t)(panels * Kp * NR) * esize);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t j = n % NR, at = pairs ? (k / 2) * 2 * NR + j * 2 + k % 2 : k * NR + j;
            memcpy((char *)packed + ((n / NR) * Kp * NR + at) * esize, (const char *)w + (n * K + k) * esize, esize);
        }
}

/* x: [M, K] rows `x_stride` elements apart (x_dtype); packed: hallm_pack_linear of W [N, K] (w_dtype);
 * bias: [N] (w_dtype) or NULL; y: [M, N] contiguous (x_dtype). */
void hallm_linear(const void *x, int64_t x_stride, int x_dtype, const void *packed, const void *bias, int w_dtype,
                  void *y, int64_t M, int64_t N, int64_t K, int nthreads) {
#if BF16_PAIRS
    if (w_dtype == DT_BF16) {
        linear_bf16_pairs(x, x_stride, x_dtype, (const uint16_t *)packed, bias, y, M, N, K, nthreads);
        return;
    }
#endif
    /* x widened once, padded to whole 6-row tiles (the padding rows are zeros, their results dropped). */
    const int64_t Mp = M == 1 ? 1 : (M + MR - 1) / MR * MR;
    float *xs = alloc_floats((size_t)(Mp * K));
    for (int64_t m = 0; m < M; m++) load_f32(x, x_dtype, m * x_stride, xs + m * K, (int)K);
    if (Mp > M) memset(xs + M * K, 0, (size_t)((Mp - M) * K) * sizeof(float));
    const size_t esize = w_dtype == DT_BF16 ? 2 : 4;
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const char *P = (const char *)packed + (size_t)(p * K * NR) * esize;
        const int64_t n0 = p * NR;
        const int nn = (int)(N - n0 < NR ? N - n0 : NR);
        float bias16[NR] = {0}, C[MR * NR], row[NR];
        if (bias)
            for (int j = 0; j < nn; j++)
                bias16[j] = w_dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)bias)[n0 + j]) : ((const float *)bias)[n0 + j];
        for (int64_t m = 0; m < Mp; m += MR) {
            const int mr = (int)(M - m < MR ? M - m : MR);
#ifdef __AVX2__
            if (Mp == 1)
                (w_dtype == DT_BF16 ? tile_1x16_bf16 : tile_1x16_f32)(xs, P, K, C);
            else
                (w_dtype == DT_BF16 ? tile_6x16_bf16 : tile_6x16_f32)(xs + m * K, K, P, K, C);
#else
            tile_generic(xs + m * K, K, mr, P, w_dtype, K, C);
#endif
            for (int i = 0; i < mr; i++) {
#ifdef __AVX2__
                if (w_dtype == DT_BF16) unscramble16(C + i * NR);
#endif
                for (int j = 0; j < nn; j++) row[j] = C[i * NR + j] + bias16[j];
                store_f32(y, x_dtype, (m + i) * N + n0, row, nn);
            }
        }
    }
    free(xs);
}

#ifdef __AVX2__
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
             * for x >= 0, e / (1 + e) below. libm's scalar expf made this ~16% of a bf16 prefill. */
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

    /* Work items: (request, chunk of QUERY_CHUNK query tokens, range of KV heads). A whole request's
     * heads in one item read each cached position's row [Hk, D] contiguously, block after block,
     * while the next block is prefetched: the blocks of a request sit anywhere in the pool, and
     * per-head items striding through them ran at ~6 GB/s. With fewer requests than threads x 4,
     * the heads are split so every thread has work. */
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
                    mx[j] = -INFINITY;
                    den[j] = 0.0f;
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

/* ------------------------------------------------------------------------------------------------ */
/* The whole decoder stack of a Llama-family model for one small step, in one call.                    */

/* One decoder layer's parameters (bias / q-k norm pointers may be NULL). Mirrored by
 * hallm_cpu.decoder.LayerParams: keep the two in the same order. */
typedef struct {
    const void *input_norm, *post_norm; /* [H] */
    /* Linear weights are packed (hallm_pack_linear of the [out, in] weight). */
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
