/* Linear layers on packed weights (see the section comment). */
#include "common.h"

/* ------------------------------------------------------------------------------------------------ */
/* Linear: y[M, N] = x[M, K] W[N, K]^T (+ bias[N]), on weights packed once at load.                  */
/*
 * Packed layout: panels of NR = 16 output features, P[p][k][j] = W[16 p + j][k] (zero rows past N),
 * in the weight's dtype. One layout serves every row count: a panel is a sequential stream (the
 * batch-1 GEMV reads memory front to back), and the 6 x 16 register tile (12 accumulators, 6
 * broadcasts and 2 panel loads per k) runs the batched case without repacking per call; at decode
 * batch sizes it measured faster than MKL's sgemm on the unpacked [N, K] weight. bf16 panels are
 * widened in registers, never in memory.
 */
#define NR 16
#define MR 6

#ifdef __AVX2__

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

/* ---- bf16 dot-product instructions (AVX512-BF16, on recent AMD and Intel server CPUs) -------------- */
/*
 * Where the compiler targets AVX512-BF16, bf16 weights are packed in k-pairs instead:
 * P[p][k/2][j][2] = W[16 p + j][k, k+1] (K padded to even with zeros), so one 512-bit load holds a
 * panel's 16 features x 2 k, and VDPBF16PS multiplies it by a broadcast pair of x and adds both
 * products into 16 fp32 accumulators: 32 multiply-adds per instruction, on bf16 operands as they
 * are, against 8 per FMA after widening. x is taken as bf16 (fp32 activations are rounded to bf16,
 * as a bf16 matmul does). bf16 products are exact in fp32; denormal inputs count as zero. It
 * measured well ahead of the widened panels at decode batch sizes.
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
