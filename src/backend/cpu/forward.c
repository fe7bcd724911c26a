/* The Llama forward pass on the CPU, one batch of tokens at a time:
 *
 *   x = embed(tokens)
 *   for each layer:
 *       h = rmsnorm(x) ; q, k, v = h Wq, h Wk, h Wv ; rope(q, k)
 *       store k, v into the KV cache at positions [pos0, pos0 + n)
 *       x += attention(q, cache[0, pos0 + n)) Wo
 *       h = rmsnorm(x) ; x += (silu(h Wgate) * (h Wup)) Wdown
 *   logits = rmsnorm(x[last]) Wout
 *
 * Every step computes each token's row independently of the other rows of the
 * batch (attention only reads the cache), which is why a prompt split into any
 * chunks gives the same result as one pass. */
#include <string.h>

#include "backend/cpu/kernels.h"
#include "engine/context.h"
#include "util/f16.h"
#include "util/q8_0.h"

static void embed_rows(const cake_weight *w, const cake_token *tokens, int n, float *x) {
    const size_t dim = (size_t)w->n_in;
    for (int t = 0; t < n; t++) {
        const size_t row = (size_t)tokens[t] * dim;
        float *dst = x + (size_t)t * dim;
        switch (w->dtype) {
        case CAKE_DTYPE_F32:
            memcpy(dst, (const float *)w->data + row, dim * sizeof(float));
            break;
        case CAKE_DTYPE_F16:
            cake_f16_to_f32_row((const cake_f16 *)w->data + row, dst, dim);
            break;
        case CAKE_DTYPE_Q8_0:
            cake_q8_0_to_f32(w->data, row, dst, dim);
            break;
        default:
            cake_bf16_to_f32_row((const cake_bf16 *)w->data + row, dst, dim);
            break;
        }
    }
}

static void matmul(float *y, const float *x, const cake_weight *w, int n, cake_threadpool *pool) {
    /* The dtype was checked at model load, and a Q8_0 matrix has its CPU copy
     * (cake_model_prepare_cpu ran at context init), so this cannot fail. */
    if (w->x16)
        (void)cake_matmul(y, x, w->x16, CAKE_DTYPE_Q8_0_X16, n, w->n_in, w->n_out, pool);
    else
        (void)cake_matmul(y, x, w->data, w->dtype, n, w->n_in, w->n_out, pool);
}

/* Writes n position-major rows of new keys/values (f32) into the cache at
 * position pos0: one run per KV head (the cache is head-major, kv_cache.h). */
static void store_kv(const cake_kv_cache *kv, int layer, const float *k, const float *v, int n,
                     cake_pos pos0) {
    const size_t hd = (size_t)kv->head_dim;
    for (int h = 0; h < kv->n_kv_heads; h++)
        for (int t = 0; t < n; t++) {
            const size_t src = (size_t)t * (size_t)kv->kv_dim + (size_t)h * hd;
            const size_t dst = cake_kv_at(kv, h, pos0 + t);
            if (kv->type == CAKE_KV_F16) {
                cake_f32_to_f16_row(k + src, (cake_f16 *)cake_kv_k(kv, layer) + dst, hd);
                cake_f32_to_f16_row(v + src, (cake_f16 *)cake_kv_v(kv, layer) + dst, hd);
            } else {
                memcpy((float *)cake_kv_k(kv, layer) + dst, k + src, hd * sizeof(float));
                memcpy((float *)cake_kv_v(kv, layer) + dst, v + src, hd * sizeof(float));
            }
        }
}

void cake_cpu_forward_batch(cake_context *c, const cake_token *tokens, int n, cake_pos pos0,
                            float *logits) {
    const cake_model *m = c->model;
    const cake_hparams *hp = &m->hp;
    const cake_scratch *s = &c->s;
    cake_threadpool *pool = c->pool;
    const int dim = hp->dim, ffn = hp->ffn_dim;

    embed_rows(&m->tok_embd, tokens, n, s->x);

    for (int l = 0; l < hp->n_layers; l++) {
        const cake_layer *L = &m->layers[l];

        cake_rmsnorm(s->xb, s->x, L->attn_norm, n, dim, hp->rms_eps);
        matmul(s->q, s->xb, &L->wq, n, pool);
        matmul(s->k, s->xb, &L->wk, n, pool);
        matmul(s->v, s->xb, &L->wv, n, pool);
        if (L->bq) cake_add_bias(s->q, L->bq, n, dim);
        if (L->bk) cake_add_bias(s->k, L->bk, n, hp->n_kv_heads * hp->head_dim);
        if (L->bv) cake_add_bias(s->v, L->bv, n, hp->n_kv_heads * hp->head_dim);
        if (hp->rope_neox) {
            cake_rope_neox(s->q, n, hp->n_heads, hp->head_dim, pos0, m->rope_freqs);
            cake_rope_neox(s->k, n, hp->n_kv_heads, hp->head_dim, pos0, m->rope_freqs);
        } else {
            cake_rope(s->q, n, hp->n_heads, hp->head_dim, pos0, m->rope_freqs);
            cake_rope(s->k, n, hp->n_kv_heads, hp->head_dim, pos0, m->rope_freqs);
        }
        store_kv(&c->kv, l, s->k, s->v, n, pos0);

        cake_attn_args a = {
            .n_tokens = n,
            .pos0 = pos0,
            .n_heads = hp->n_heads,
            .n_kv_heads = hp->n_kv_heads,
            .head_dim = hp->head_dim,
            .kv_f16 = c->kv.type == CAKE_KV_F16,
            .kv_ctx = c->kv.n_ctx,
            .q = s->q,
            .k = cake_kv_k(&c->kv, l),
            .v = cake_kv_v(&c->kv, l),
            .out = s->att,
        };
        cake_attention(&a, pool);
        matmul(s->xb, s->att, &L->wo, n, pool);
        for (size_t i = 0; i < (size_t)n * (size_t)dim; i++) s->x[i] += s->xb[i];

        cake_rmsnorm(s->xb, s->x, L->ffn_norm, n, dim, hp->rms_eps);
        matmul(s->g, s->xb, &L->w_gate, n, pool);
        matmul(s->u, s->xb, &L->w_up, n, pool);
        cake_swiglu(s->g, s->g, s->u, (size_t)n * (size_t)ffn);
        matmul(s->xb, s->g, &L->w_down, n, pool);
        for (size_t i = 0; i < (size_t)n * (size_t)dim; i++) s->x[i] += s->xb[i];
    }

    if (logits) {
        const float *last = s->x + (size_t)(n - 1) * (size_t)dim;
        cake_rmsnorm(s->xb, last, m->output_norm, 1, dim, hp->rms_eps);
        matmul(logits, s->xb, &m->output, 1, pool);
    }
}
