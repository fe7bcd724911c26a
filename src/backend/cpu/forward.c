/* The Llama forward pass on the CPU, one batch of tokens at a time:
 *
 *   x = embed(tokens)
 *   for each layer:
 *       h = rmsnorm(x) ; q, k, v = h Wq, h Wk, h Wv ; rope(q, k)
 *       store k, v into the KV cache at positions [pos0, pos0 + n)
 *       x += attention(q, cache[0, pos0 + n)) Wo
 *       h = rmsnorm(x) ; x += (silu(h Wgate) * (h Wup)) Wdown
 *           (Gemma: embeddings times sqrt(dim), GELU for silu, and the
 *           attention and FFN outputs RMS-normed before they are added;
 *           Gemma 2 soft-caps the scores and the logits; Granite scales
 *           the embeddings, the scores, the two residual branches and the
 *           logits)
 *           (or, with experts, the weighted sum of that FFN over the
 *           experts the router picks for the token, plus a gated shared
 *           expert in qwen2moe: moe_ffn)
 *   logits = rmsnorm(x[last]) Wout
 *
 * Every step computes each token's row independently of the other rows of the
 * batch (attention only reads the cache), which is why a prompt split into any
 * chunks gives the same result as one pass, and why one pass may carry the
 * tokens of several sequences (a server's batch): the matmuls run over all
 * their rows at once, while RoPE, the KV writes and attention run per
 * sequence, on its own positions and its own KV cache. */
#include <math.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "engine/context.h"
#include "model/dequant.h"
#include "util/f16.h"

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
        case CAKE_DTYPE_BF16:
            cake_bf16_to_f32_row((const cake_bf16 *)w->data + row, dst, dim);
            break;
        default: /* quantized */
            cake_dequant_to_f32(w->dtype, w->data, row, dst, dim);
            break;
        }
    }
}

static void matmul(float *y, const float *x, const cake_weight *w, int n, cake_threadpool *pool) {
    /* The dtype was checked at model load, and a quantized matrix has its CPU copy
     * (cake_model_prepare_cpu ran at context init), so this cannot fail. */
    if (w->x16)
        (void)cake_matmul(y, x, w->x16, w->x16_dtype, n, w->n_in, w->n_out, pool);
    else
        (void)cake_matmul(y, x, w->data, w->dtype, n, w->n_in, w->n_out, pool);
}

/* The per-token steps between the matmuls run over the thread pool in tasks
 * of token rows: each token's arithmetic is the same whatever the split, so
 * the bits are too. (Left on one thread they were ~3% of a two-thread
 * prefill's CPU time, which would cost 16 threads ~30% of their speed.) */
#define ROWS_PER_TASK 8
/* ROWS_QKV's tasks: the positions of an f16 key block's cache line (64
 * bytes), aligned, so that no two threads write one line (which moved it
 * from core to core for each task's every write: ~1.5% of a prefill). */
#define QKV_ROWS 32

/* Writes n (at most QKV_ROWS) position-major rows of new keys/values
 * (f32) into the cache at position pos0 (layout: kv_cache.h). An f32 cache
 * takes them as they are (cake_kv_put), a Q8_0 or Q4_0 one quantized block
 * by block; for f16 each value row is converted into its run, and a head's
 * key rows are converted and transposed in L1, then written dim by dim: the
 * rows' values of a dim sit side by side in the transposed block, a cache
 * line's worth of them written at once (written a value at a time, row by
 * row, the fresh lines' misses stalled the stores: 4-6% of a prefill). */
static void store_kv(const cake_kv_cache *kv, int layer, const float *k, const float *v, int n,
                     cake_pos pos0) {
    if (kv->type == CAKE_KV_F32) {
        cake_kv_put(kv, layer, pos0, n, k, v);
        return;
    }
    if (cake_kv_quantized(kv->type)) {
        cake_kv_quantize_put(kv, layer, pos0, n, k, v);
        return;
    }
    const int hd = kv->head_dim, hc = kv->head_ctx;
    const size_t row = (size_t)kv->kv_dim;
    cake_f16 kh[QKV_ROWS][16], kt[16][QKV_ROWS] __attribute__((aligned(64)));
    for (int h = 0; h < kv->n_kv_heads; h++) {
        for (int t = 0; t < n; t++) {
            const size_t vo = cake_kv_v_index(hc, hd, h, pos0 + t, 0);
            cake_f32_to_f16_row(v + t * row + (size_t)h * hd, (cake_f16 *)cake_kv_v(kv, layer) + vo,
                                hd);
        }
        for (int t0 = 0; t0 < n;) { /* (a run of positions within one key block) */
            const int j = (pos0 + t0) % CAKE_KV_KBLOCK;
            const int run = n - t0 < CAKE_KV_KBLOCK - j ? n - t0 : CAKE_KV_KBLOCK - j;
            cake_f16 *kc =
                (cake_f16 *)cake_kv_k(kv, layer) + cake_kv_k_index(hc, hd, h, pos0 + t0, 0);
            for (int d0 = 0; d0 < hd; d0 += 16) {
                const int nd = hd - d0 < 16 ? hd - d0 : 16;
                for (int t = 0; t < run; t++)
                    cake_f32_to_f16_row(k + (size_t)(t0 + t) * row + (size_t)h * hd + d0, kh[t],
                                        (size_t)nd);
                for (int d = 0; d < nd; d++) /* (transposed in L1, then a line at a store) */
                    for (int t = 0; t < run; t++) kt[d][t] = kh[t][d];
                for (int d = 0; d < nd; d++) {
                    cake_f16 *line = kc + (size_t)(d0 + d) * CAKE_KV_KBLOCK;
                    if (run == QKV_ROWS)
                        memcpy(line, kt[d], sizeof(kt[d]));
                    else
                        memcpy(line, kt[d], (size_t)run * sizeof(cake_f16));
                }
            }
            t0 += run;
        }
    }
}

typedef enum {
    ROWS_QKV,      /* biases, RoPE on q and k, k and v into the KV cache */
    ROWS_ADD_NORM, /* xb = rmsnorm(xb) * post (post != NULL), x += xb (add), then
                      xb = rmsnorm(x) * norm (norm != NULL) */
    ROWS_SWIGLU,   /* g = silu(g) * u, or gelu(g) * u */
} rows_step;

typedef struct {
    cake_context *c; /* the engine: model and scratch */
    const cake_layer *L;
    int layer, n;
    int row0;                /* the first row in the scratch (a sequence's, for ROWS_QKV) */
    const cake_kv_cache *kv; /* ROWS_QKV: the sequence's cache */
    cake_pos pos0;           /* ROWS_QKV: the sequence's first position */
    rows_step step;
    int add;           /* ROWS_ADD_NORM: add xb to x first */
    const float *norm; /* ROWS_ADD_NORM: the norm's weights, NULL for none */
    const float *post; /* ROWS_ADD_NORM: xb's own norm before the add (Gemma 3), or NULL */
    int width;         /* ROWS_SWIGLU: the rows' width; 0 = ffn_dim */
} rows_job;

/* h = act(g) * u over n values: GELU (Gemma) or SiLU. */
static void gated(const cake_hparams *hp, float *g, const float *u, size_t n) {
    if (hp->gelu)
        cake_geglu(g, g, u, n);
    else
        cake_swiglu(g, g, u, n);
}

/* The rows of a job's task: [*t0, *t0 + *nt), ROWS_PER_TASK of them, or for
 * ROWS_QKV those of a run of QKV_ROWS aligned positions. How many tasks. */
static int task_rows(const rows_job *j, int task, int *t0, int *nt) {
    const int size = j->step == ROWS_QKV ? QKV_ROWS : ROWS_PER_TASK;
    const int first = j->step == ROWS_QKV ? QKV_ROWS - (int)(j->pos0 % QKV_ROWS) : size;
    const int start = task ? first + (task - 1) * size : 0, end = first + task * size;
    *t0 = start;
    *nt = (end < j->n ? end : j->n) - start;
    return j->n <= first ? 1 : 1 + (j->n - first + size - 1) / size;
}

static void rows_task(void *ctx, int task, int tid) {
    (void)tid;
    const rows_job *j = ctx;
    const cake_hparams *hp = &j->c->model->hp;
    const cake_scratch *s = &j->c->s;
    int t0, nt;
    task_rows(j, task, &t0, &nt);
    const int r0 = j->row0 + t0; /* the first row in the scratch */
    const size_t dim = (size_t)hp->dim, kv_dim = (size_t)hp->n_kv_heads * hp->head_dim;
    switch (j->step) {
    case ROWS_QKV: {
        const size_t q_dim = (size_t)hp->q_dim;
        float *q = s->q + r0 * q_dim, *k = s->k + r0 * kv_dim, *v = s->v + r0 * kv_dim;
        if (j->L->bq) cake_add_bias(q, j->L->bq, nt, (int)q_dim);
        if (j->L->bk) cake_add_bias(k, j->L->bk, nt, (int)kv_dim);
        if (j->L->bv) cake_add_bias(v, j->L->bv, nt, (int)kv_dim);
        /* qwen3: each head of q and k RMS-normed (eps as the layers') before RoPE */
        if (j->L->q_norm) {
            cake_rmsnorm(q, q, j->L->q_norm, nt * hp->n_heads, hp->head_dim, hp->rms_eps);
            cake_rmsnorm(k, k, j->L->k_norm, nt * hp->n_kv_heads, hp->head_dim, hp->rms_eps);
        }
        const double *freqs = j->L->rope_freqs;
        if (hp->rope_neox) {
            cake_rope_neox(q, nt, hp->n_heads, hp->head_dim, hp->rope_dims, j->pos0 + t0, freqs);
            cake_rope_neox(k, nt, hp->n_kv_heads, hp->head_dim, hp->rope_dims, j->pos0 + t0, freqs);
        } else {
            cake_rope(q, nt, hp->n_heads, hp->head_dim, j->pos0 + t0, freqs);
            cake_rope(k, nt, hp->n_kv_heads, hp->head_dim, j->pos0 + t0, freqs);
        }
        /* LongRoPE's attention factor (llama.cpp turns q and k by cos and
         * sin times it; here q takes both: the scores are the same) and
         * Gemma 3 27B's score scale, on q before the kernel's 1/sqrt(hd) */
        const float qs = hp->rope_attn_factor * hp->rope_attn_factor * hp->q_scale;
        if (qs != 1.0f)
            for (size_t i = 0; i < (size_t)nt * q_dim; i++) q[i] *= qs;
        /* Llama 4's attention temperature (Ministral 3), 1 below its length */
        for (int t = 0; hp->attn_temp_scale != 0 && t < nt; t++) {
            const double p = j->pos0 + t0 + t, steps = floor(p / hp->attn_temp_length);
            const float ts = (float)(log(steps + 1.0) * hp->attn_temp_scale + 1.0);
            for (size_t i = 0; ts != 1.0f && i < q_dim; i++) q[(size_t)t * q_dim + i] *= ts;
        }
        store_kv(j->kv, j->layer, k, v, nt, j->pos0 + t0);
        break;
    }
    case ROWS_ADD_NORM: {
        float *x = s->x + r0 * dim, *xb = s->xb + r0 * dim;
        if (j->post) cake_rmsnorm(xb, xb, j->post, nt, (int)dim, hp->rms_eps);
        const float rs = hp->residual_scale; /* (Granite's) */
        if (j->add && rs != 1.0f)
            for (size_t i = 0; i < (size_t)nt * dim; i++) x[i] += rs * xb[i];
        else if (j->add)
            for (size_t i = 0; i < (size_t)nt * dim; i++) x[i] += xb[i];
        if (j->norm) cake_rmsnorm(xb, x, j->norm, nt, (int)dim, hp->rms_eps);
        break;
    }
    case ROWS_SWIGLU: {
        const size_t ffn = (size_t)(j->width ? j->width : hp->ffn_dim);
        gated(hp, s->g + r0 * ffn, s->u + r0 * ffn, (size_t)nt * ffn);
        break;
    }
    }
}

static void run_rows(rows_job j) {
    int t0, nt;
    const int n_tasks = task_rows(&j, 0, &t0, &nt);
    if (n_tasks == 1)
        rows_task(&j, 0, 0); /* decode: not worth waking the pool */
    else
        cake_threadpool_run(j.c->pool, n_tasks, rows_task, &j);
}

/* A token's experts from its router logits: the softmax, its n_pick largest
 * (ties to the lower expert), their probabilities as weights, scaled to
 * sum to 1 when `norm` (llama.cpp's build_moe_ffn, softmax gating). */
static void pick_experts(const float *logit, int n_experts, int n_pick, bool norm, int *pick,
                         float *weight) {
    float max = logit[0], sum = 0, picked = 0;
    for (int e = 1; e < n_experts; e++) max = logit[e] > max ? logit[e] : max;
    for (int e = 0; e < n_experts; e++) sum += expf(logit[e] - max);
    for (int k = 0; k < n_pick; k++) {
        int best = -1;
        for (int e = 0; e < n_experts; e++) {
            bool taken = false;
            for (int j = 0; j < k; j++) taken |= pick[j] == e;
            if (!taken && (best < 0 || logit[e] > logit[best])) best = e;
        }
        pick[k] = best;
        picked += weight[k] = expf(logit[best] - max) / sum;
    }
    for (int k = 0; norm && k < n_pick; k++) weight[k] /= picked;
}

/* Expert e's FFN over its rows (slots by_expert[first ..][0 .. rows)):
 * their x into rows at.. of moe_in, the expert's output into rows at.. of
 * moe_out (g and u likewise). pool NULL: all on the calling thread. */
static void expert_ffn(cake_context *c, const cake_layer *L, int e, int first, int rows, int at,
                       cake_threadpool *pool) {
    const cake_hparams *hp = &c->model->hp;
    const cake_scratch *s = &c->s;
    const size_t dim = (size_t)hp->dim, ffn = (size_t)hp->ffn_dim;
    float *in = s->moe_in + (size_t)at * dim, *g = s->g + (size_t)at * ffn,
          *u = s->u + (size_t)at * ffn;
    for (int r = 0; r < rows; r++)
        memcpy(in + r * dim, s->xb + (size_t)(s->by_expert[first + r] / hp->n_experts_used) * dim,
               dim * sizeof(float));
    matmul(g, in, &L->expert[3 * e], rows, pool);
    matmul(u, in, &L->expert[3 * e + 1], rows, pool);
    if (pool)
        run_rows((rows_job){.c = c, .n = rows, .row0 = at, .step = ROWS_SWIGLU});
    else
        gated(hp, g, u, (size_t)rows * ffn);
    matmul(s->moe_out + (size_t)at * dim, g, &L->expert[3 * e + 2], rows, pool);
}

/* Adds expert e's outputs (rows at.. of moe_out) into its tokens' sums,
 * each times the token's weight for it. */
static void add_expert(const cake_scratch *s, size_t dim, int K, int first, int rows, int at) {
    for (int r = 0; r < rows; r++) {
        const int slot = s->by_expert[first + r];
        const float w = s->pick_w[slot], *y = s->moe_out + (size_t)(at + r) * dim;
        float *sum = s->moe_sum + (size_t)(slot / K) * dim;
        for (size_t i = 0; i < dim; i++) sum[i] += w * y[i];
    }
}

typedef struct {
    cake_context *c;
    const cake_layer *L;
    const int *active, *count; /* the experts with rows; where each one's rows start */
} experts_job;

static void experts_task(void *ctx, int task, int tid) {
    (void)tid;
    const experts_job *j = ctx;
    const int e = j->active[task], first = j->count[e];
    expert_ffn(j->c, j->L, e, first, j->count[e + 1] - first, first, NULL);
}

/* The FFN of a layer of experts over the n rows of xb, into xb. Tokens are
 * grouped by expert, so each expert's matrices are read once for all the
 * tokens that picked it. A few tokens (decode) with at least as many
 * experts picked as threads: the experts run side by side, each on one
 * thread (a thread streams whole matrices, and a layer waits on the pool
 * once, not three times an expert); otherwise one after another, each
 * matmul over the pool. Either way each token's sum adds its experts in
 * expert order, then the shared expert (qwen2moe) times its gate, so a
 * token's bits do not depend on the other rows of the batch or on the
 * threads (the same promise as the dense FFN's). */
static void moe_ffn(cake_context *c, const cake_layer *L, int n) {
    const cake_hparams *hp = &c->model->hp;
    const cake_scratch *s = &c->s;
    const int E = hp->n_experts, K = hp->n_experts_used;
    const size_t dim = (size_t)hp->dim;
    matmul(s->router, s->xb, &L->router, n, c->pool);
    int count[1025] = {0}; /* (E + 1): tokens per expert, then where each group starts */
    for (int t = 0; t < n; t++) {
        pick_experts(s->router + (size_t)t * E, E, K, hp->experts_norm, s->pick + t * K,
                     s->pick_w + t * K);
        for (int k = 0; k < K; k++) count[s->pick[t * K + k] + 1]++;
    }
    for (int e = 0; e < E; e++) count[e + 1] += count[e];
    /* by_expert: the slots t K + k, grouped by expert, tokens in order */
    int fill[1024], active[1024], n_active = 0;
    memcpy(fill, count, (size_t)E * sizeof(int));
    for (int t = 0; t < n; t++)
        for (int k = 0; k < K; k++) s->by_expert[fill[s->pick[t * K + k]]++] = t * K + k;
    for (int e = 0; e < E; e++)
        if (count[e + 1] > count[e]) active[n_active++] = e;
    memset(s->moe_sum, 0, (size_t)n * dim * sizeof(float));
    /* side by side: every expert's rows in the scratch at once (n K rows) */
    if (n <= 16 && n_active >= cake_threadpool_size(c->pool) && n_active > 1 &&
        n * K <= c->params.max_batch) {
        cake_threadpool_run(c->pool, n_active, experts_task,
                            &(experts_job){.c = c, .L = L, .active = active, .count = count});
        for (int a = 0; a < n_active; a++) {
            const int e = active[a];
            add_expert(s, dim, K, count[e], count[e + 1] - count[e], count[e]);
        }
    } else {
        for (int a = 0; a < n_active; a++) {
            const int e = active[a];
            expert_ffn(c, L, e, count[e], count[e + 1] - count[e], 0, c->pool);
            add_expert(s, dim, K, count[e], count[e + 1] - count[e], 0);
        }
    }
    if (hp->shared_ffn_dim) {
        matmul(s->g, s->xb, &L->shared[0], n, c->pool);
        matmul(s->u, s->xb, &L->shared[1], n, c->pool);
        run_rows((rows_job){.c = c, .n = n, .step = ROWS_SWIGLU, .width = hp->shared_ffn_dim});
        matmul(s->moe_out, s->g, &L->shared[2], n, c->pool);
        for (int t = 0; t < n; t++) {
            const float *x = s->xb + (size_t)t * dim, *y = s->moe_out + (size_t)t * dim;
            float gate = 0, *sum = s->moe_sum + (size_t)t * dim;
            for (size_t i = 0; i < dim; i++) gate += x[i] * L->shared_gate[i];
            gate = 1.0f / (1.0f + expf(-gate));
            for (size_t i = 0; i < dim; i++) sum[i] += gate * y[i];
        }
    }
    memcpy(s->xb, s->moe_sum, (size_t)n * dim * sizeof(float));
}

/* Granite's logits: l / scale, as a product by 1 / scale (llama.cpp's);
 * Gemma 2's: c tanh(l / c) (cap 0: none). */
static void finish_logits(float *l, size_t n, const cake_hparams *hp) {
    const float inv = 1.0f / hp->logit_scale, cap = hp->logit_softcap;
    for (size_t i = 0; inv != 1.0f && i < n; i++) l[i] *= inv;
    for (size_t i = 0; cap > 0 && i < n; i++) l[i] = cap * tanhf(l[i] / cap);
}

void cake_cpu_forward(cake_context *c, const cake_batch_seq *seqs, int n_seqs, int n,
                      float *logit_rows) {
    const cake_model *m = c->model;
    const cake_hparams *hp = &m->hp;
    const cake_scratch *s = &c->s;
    cake_threadpool *pool = c->pool;
    const int dim = hp->dim;

    for (int i = 0, row = 0; i < n_seqs; row += seqs[i++].n)
        embed_rows(&m->tok_embd, seqs[i].tokens, seqs[i].n, s->x + (size_t)row * dim);
    if (hp->embed_scale != 1.0f)
        for (size_t i = 0; i < (size_t)n * dim; i++) s->x[i] *= hp->embed_scale;
    /* xb = rmsnorm(x) for layer 0 */
    run_rows((rows_job){.c = c, .n = n, .step = ROWS_ADD_NORM, .norm = m->layers[0].attn_norm});

    for (int l = 0; l < hp->n_layers; l++) {
        const cake_layer *L = &m->layers[l];

        matmul(s->q, s->xb, &L->wq, n, pool);
        matmul(s->k, s->xb, &L->wk, n, pool);
        matmul(s->v, s->xb, &L->wv, n, pool);
        for (int i = 0, row = 0; i < n_seqs; row += seqs[i++].n) {
            const cake_kv_cache *kv = &seqs[i].seq->kv;
            run_rows((rows_job){.c = c,
                                .L = L,
                                .layer = l,
                                .n = seqs[i].n,
                                .row0 = row,
                                .kv = kv,
                                .pos0 = seqs[i].pos0,
                                .step = ROWS_QKV});
            cake_attn_args a = {
                .n_tokens = seqs[i].n,
                .pos0 = seqs[i].pos0,
                .n_heads = hp->n_heads,
                .n_kv_heads = hp->n_kv_heads,
                .head_dim = hp->head_dim,
                .kv_type = kv->type,
                .kv_ctx = kv->head_ctx,
                .window = L->window,
                .softcap = hp->attn_softcap,
                .q = s->q + (size_t)row * hp->q_dim,
                .k = cake_kv_k(kv, l),
                .v = cake_kv_v(kv, l),
                .k_scales = cake_kv_quantized(kv->type) ? cake_kv_k_scales(kv, l) : NULL,
                .v_scales = cake_kv_quantized(kv->type) ? cake_kv_v_scales(kv, l) : NULL,
                .out = s->att + (size_t)row * hp->q_dim,
            };
            cake_attention(&a, pool);
        }
        matmul(s->xb, s->att, &L->wo, n, pool);
        /* x += attention out; xb = rmsnorm(x) */
        run_rows((rows_job){.c = c,
                            .n = n,
                            .step = ROWS_ADD_NORM,
                            .add = 1,
                            .norm = L->ffn_norm,
                            .post = L->post_attn_norm});

        if (hp->n_experts) {
            moe_ffn(c, L, n);
        } else {
            matmul(s->g, s->xb, &L->w_gate, n, pool);
            matmul(s->u, s->xb, &L->w_up, n, pool);
            run_rows((rows_job){.c = c, .n = n, .step = ROWS_SWIGLU});
            matmul(s->xb, s->g, &L->w_down, n, pool);
        }
        /* x += ffn out; xb = the next layer's rmsnorm(x) (none after the last) */
        const float *next_norm = l + 1 < hp->n_layers ? m->layers[l + 1].attn_norm : NULL;
        run_rows((rows_job){.c = c,
                            .n = n,
                            .step = ROWS_ADD_NORM,
                            .add = 1,
                            .norm = next_norm,
                            .post = L->post_ffn_norm});
    }

    /* A sequence that wants every row's logits (a prompt's scoring) gets
     * them straight into its buffer, one matmul of its rows; */
    const size_t n_vocab = (size_t)hp->n_vocab;
    for (int i = 0, row = 0; i < n_seqs; row += seqs[i++].n)
        if (seqs[i].logits && seqs[i].all_logits) {
            cake_rmsnorm(s->xb, s->x + (size_t)row * dim, m->output_norm, seqs[i].n, dim,
                         hp->rms_eps);
            matmul(seqs[i].logits, s->xb, &m->output, seqs[i].n, pool);
            finish_logits(seqs[i].logits, (size_t)seqs[i].n * n_vocab, hp);
        }
    /* the others the output head over their last rows, gathered (normed)
     * into xb: one matmul for all of them. */
    int n_out = 0;
    for (int i = 0, row = 0; i < n_seqs; row += seqs[i++].n)
        if (seqs[i].logits && !seqs[i].all_logits) {
            const float *last = s->x + (size_t)(row + seqs[i].n - 1) * dim;
            cake_rmsnorm(s->xb + (size_t)n_out++ * dim, last, m->output_norm, 1, dim, hp->rms_eps);
        }
    if (!n_out) return;
    if (n_out == 1) { /* straight into the caller's buffer */
        for (int i = 0; i < n_seqs; i++)
            if (seqs[i].logits && !seqs[i].all_logits) {
                matmul(seqs[i].logits, s->xb, &m->output, 1, pool);
                finish_logits(seqs[i].logits, n_vocab, hp);
            }
        return;
    }
    matmul(logit_rows, s->xb, &m->output, n_out, pool);
    finish_logits(logit_rows, (size_t)n_out * n_vocab, hp);
    for (int i = 0, k = 0; i < n_seqs; i++)
        if (seqs[i].logits && !seqs[i].all_logits)
            memcpy(seqs[i].logits, logit_rows + n_vocab * (size_t)k++, n_vocab * sizeof(float));
}
