/* A Llama-family decoder stack for one small step, in one call. */
#include "common.h"

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
            hallm_head_norm(qkv, S, Hq, D, L->q_norm, L->qk_eps, T, dtype, nthreads);
            hallm_head_norm(qkv_c + qs * esize, S, Hk, D, L->k_norm, L->qk_eps, T, dtype, nthreads);
        }
        hallm_rotary(qkv, S, Hq, qkv_c + qs * esize, S, Hk, D, half, positions, inv_freq, rope_scaling, T, dtype,
                     nthreads);
        hallm_paged_attention(qkv, S, qkv_c + qs * esize, S, qkv_c + (qs + kvs) * esize, S, L->kv_cache,
                              L->num_blocks, slot_mapping, query_start_loc, context_lens, R, block_tables, bt_stride,
                              attn, T, Hq, Hk, D, bs, L->scale, L->soft_cap, L->window, NULL, dtype, nthreads);
        hallm_linear(attn, qs, dtype, L->o_w, L->o_b, dtype, hidden, T, H, qs, nthreads);
        hallm_rms_norm(hidden, H, residual, H, L->post_norm, h, residual, T, H, L->post_eps, dtype, nthreads);
        hallm_linear(h, H, dtype, L->gate_up_w, L->gate_up_b, dtype, gate_up, T, 2 * I, H, nthreads);
        hallm_silu_and_mul(gate_up, 2 * I, act, T, I, dtype, nthreads);
        hallm_linear(act, I, dtype, L->down_w, L->down_b, dtype, hidden, T, H, I, nthreads);
    }
    hallm_rms_norm(hidden, H, residual, H, final_norm, out, residual, T, H, final_eps, dtype, nthreads);
}
