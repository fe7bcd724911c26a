/* Context lifetime and the cake_forward entry point: validates the request and
 * splits a long prefill into batches of at most max_batch tokens. */
#include "engine/context.h"

#include <stdlib.h>
#include <unistd.h>

#include "loader/loader.h"
#include "store/key.h"
#include "util/err.h"
#ifdef CAKE_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

cake_context_params cake_context_default_params(void) {
    cake_context_params p = {0};
    p.kv_type = CAKE_KV_F16;
    return p;
}

/* Fetch buffers kept for the next request: one per I/O worker (io depth 4 by
 * default), with room for a deeper one. */
#define STAGING_KEPT 8

#ifdef CAKE_HAVE_CUDA
/* Pinned host memory, or ordinary memory if the driver refuses to pin more. */
static void *pinned_alloc(size_t size) {
    void *p = cake_cuda_host_alloc(size);
    return p ? p : cake_store_alloc_buffer(size);
}

static void pinned_release(void *p) {
    if (p && !cake_cuda_host_free(p)) cake_store_free_buffer(p);
}
#endif

static void scratch_free(cake_scratch *s) {
    free(s->x);
    free(s->xb);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->att);
    free(s->g);
    free(s->u);
    free(s->router);
    free(s->pick);
    free(s->pick_w);
    free(s->by_expert);
    free(s->moe_in);
    free(s->moe_out);
    free(s->moe_sum);
}

void cake_context_free(cake_context *c) {
    if (!c) return;
    cake_staging_free(c->staging);
#ifdef CAKE_HAVE_CUDA
    cake_cuda_free(c->cuda);
#endif
    scratch_free(&c->s);
    free(c->logit_rows);
    cake_kv_cache_free(&c->kv);
    cake_threadpool_free(c->pool);
    free(c);
}

/* What the CUDA backend has no layers for (they run on the CPU backend):
 * -1 with the reason, or 0. */
static int cuda_refuses(const cake_hparams *hp, int n_ctx, char *err, size_t errlen) {
    if (hp->residual_scale != 1.0f || hp->logit_scale != 1.0f)
        return cake_err(err, errlen,
                        "the CUDA backend does not run Granite's scaled layers: run this model "
                        "on the CPU backend");
    if (hp->embed_scale != 1.0f || hp->gelu || hp->post_norms || hp->q_scale != 1.0f ||
        hp->swa_pattern)
        return cake_err(err, errlen,
                        "the CUDA backend does not run Gemma's layers (GELU, post-norms, soft "
                        "caps, local RoPE): run this model on the CPU backend");
    if (hp->sliding_window && n_ctx > hp->sliding_window)
        return cake_err(err, errlen,
                        "the CUDA backend has no sliding window: a context of %d tokens is longer "
                        "than the model's window (%d): run it on the CPU backend, or in a "
                        "context of at most %d",
                        n_ctx, hp->sliding_window, hp->sliding_window);
    if (hp->rope_dims != hp->head_dim)
        return cake_err(err, errlen,
                        "the CUDA backend turns whole heads by RoPE, this model %d of %d values: "
                        "run it on the CPU backend",
                        hp->rope_dims, hp->head_dim);
    if (hp->rope_attn_factor != 1.0f)
        return cake_err(err, errlen,
                        "the CUDA backend does not scale attention by a RoPE scaling's factor "
                        "(LongRoPE's, YaRN's: %g): run this model on the CPU backend",
                        hp->rope_attn_factor);
    if (hp->attn_temp_scale != 0 && n_ctx > hp->attn_temp_length)
        return cake_err(err, errlen,
                        "the CUDA backend has no attention temperature: a context of %d tokens "
                        "is longer than the %d it leaves alone: run the model on the CPU backend, "
                        "or in a context of at most %d",
                        n_ctx, hp->attn_temp_length, hp->attn_temp_length);
    if (hp->n_experts)
        return cake_err(err, errlen,
                        "the CUDA backend has no mixture-of-experts layers (this model has %d "
                        "experts): run it on the CPU backend",
                        hp->n_experts);
    return 0;
}

int cake_context_init(const cake_model *m, cake_context_params p, cake_context **out, char *err,
                      size_t errlen) {
    *out = NULL;
    const cake_hparams *hp = &m->hp;
    const int sized = p.n_ctx > 0; /* the caller sized the cache (to a request) */
    if (p.n_ctx <= 0) p.n_ctx = hp->n_ctx_train;
    if (p.n_threads <= 0) p.n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (p.n_threads <= 0) p.n_threads = 1;
    if (p.max_batch <= 0) p.max_batch = 512;
    if (p.kv_type != CAKE_KV_F16 && p.kv_type != CAKE_KV_F32 && p.kv_type != CAKE_KV_Q8_0 &&
        p.kv_type != CAKE_KV_Q4_0)
        return cake_err(err, errlen, "unknown KV cache type %d", (int)p.kv_type);

    if (p.backend == CAKE_BACKEND_CUDA && p.kv_type != CAKE_KV_F16)
        return cake_err(err, errlen, "the CUDA backend keeps its KV cache in f16 only");
    if (p.backend == CAKE_BACKEND_CUDA && cuda_refuses(hp, p.n_ctx, err, errlen)) return -1;
#ifndef CAKE_HAVE_CUDA
    if (p.backend == CAKE_BACKEND_CUDA)
        return cake_err(err, errlen, "this build has no CUDA backend (nvcc was not found)");
#endif
    if (p.backend != CAKE_BACKEND_CUDA && cake_model_prepare_cpu(m, err, errlen)) return -1;

    cake_context *c = calloc(1, sizeof(*c));
    if (!c) return cake_err(err, errlen, "out of memory");
    c->model = m;
    c->params = p;
#ifdef CAKE_HAVE_CUDA
    if (p.backend == CAKE_BACKEND_CUDA &&
        cake_cuda_init(m, p.n_ctx, p.max_batch, &c->cuda, err, errlen))
        goto fail;
    /* On the GPU the fetch buffers are pinned: blobs go to the GPU by DMA. */
    static const cake_staging_allocator pinned = {pinned_alloc, pinned_release};
    c->staging = cake_staging_new(c->cuda ? &pinned : NULL, STAGING_KEPT);
#else
    c->staging = cake_staging_new(NULL, STAGING_KEPT);
#endif
    if (!c->staging) {
        cake_err(err, errlen, "out of memory");
        goto fail;
    }
    const size_t T = (size_t)p.max_batch, dim = (size_t)hp->dim, q_dim = (size_t)hp->q_dim,
                 kv_dim = (size_t)hp->n_kv_heads * (size_t)hp->head_dim,
                 ffn =
                     (size_t)(hp->shared_ffn_dim > hp->ffn_dim ? hp->shared_ffn_dim : hp->ffn_dim);
    if (cake_kv_cache_init(&c->kv, hp->n_layers, p.n_ctx, hp->n_kv_heads, hp->head_dim, p.kv_type,
                           err, errlen))
        goto fail;
    /* The CPU backend fills this cache (computed rows, installed chunks):
     * its pages now rather than as faults inside a request, where a loaded
     * chunk's install ran at about half speed for them. Not for the model's
     * whole context length (n_ctx 0), which few requests fill, nor on the
     * GPU, where it stays untouched. */
    if (p.backend == CAKE_BACKEND_CPU && sized) cake_kv_cache_prefault(&c->kv);
    if (!(c->pool = cake_threadpool_create(p.n_threads))) {
        cake_err(err, errlen, "cannot start %d threads", p.n_threads);
        goto fail;
    }
    cake_scratch *s = &c->s;
    s->x = malloc(T * dim * sizeof(float));
    s->xb = malloc(T * dim * sizeof(float));
    s->q = malloc(T * q_dim * sizeof(float));
    s->k = malloc(T * kv_dim * sizeof(float));
    s->v = malloc(T * kv_dim * sizeof(float));
    s->att = malloc(T * q_dim * sizeof(float));
    s->g = malloc(T * ffn * sizeof(float));
    s->u = malloc(T * ffn * sizeof(float));
    bool no_mem = !s->x || !s->xb || !s->q || !s->k || !s->v || !s->att || !s->g || !s->u;
    if (hp->n_experts) {
        const size_t E = (size_t)hp->n_experts, K = (size_t)hp->n_experts_used;
        s->router = malloc(T * E * sizeof(float));
        s->pick = malloc(T * K * sizeof(int));
        s->pick_w = malloc(T * K * sizeof(float));
        s->by_expert = malloc(T * K * sizeof(int));
        s->moe_in = malloc(T * dim * sizeof(float));
        s->moe_out = malloc(T * dim * sizeof(float));
        s->moe_sum = malloc(T * dim * sizeof(float));
        no_mem = no_mem || !s->router || !s->pick || !s->pick_w || !s->by_expert || !s->moe_in ||
                 !s->moe_out || !s->moe_sum;
    }
    if (no_mem) {
        cake_err(err, errlen, "out of memory for a batch of %zu tokens", T);
        goto fail;
    }
    *out = c;
    return 0;
fail:
    cake_context_free(c);
    return -1;
}

int cake_context_n_ctx(const cake_context *c) {
    return c->params.n_ctx;
}

int cake_context_max_batch(const cake_context *c) {
    return c->params.max_batch;
}

void *cake_context_k(cake_context *c, int layer) {
    return cake_kv_k(&c->kv, layer);
}

void *cake_context_v(cake_context *c, int layer) {
    return cake_kv_v(&c->kv, layer);
}

enum cake_kv_type cake_context_kv_type(const cake_context *c) {
    return c->params.kv_type;
}

/* Positions and token ids of one sequence's part of a forward pass. */
static int check_tokens(const cake_context *c, const cake_token *tokens, int n, cake_pos pos0,
                        char *err, size_t errlen) {
    if (n <= 0) return cake_err(err, errlen, "forward: no tokens");
    if (pos0 < 0 || (int64_t)pos0 + n > c->params.n_ctx)
        return cake_err(err, errlen, "forward: positions [%d, %lld) exceed the context of %d", pos0,
                        (long long)pos0 + n, c->params.n_ctx);
    const int n_vocab = c->model->hp.n_vocab;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= n_vocab)
            return cake_err(err, errlen, "forward: token id %d at position %d is not in [0, %d)",
                            tokens[i], pos0 + i, n_vocab);
    return 0;
}

int cake_forward(cake_context *c, const cake_token *tokens, int n, cake_pos pos0, float *logits,
                 char *err, size_t errlen) {
    if (check_tokens(c, tokens, n, pos0, err, errlen)) return -1;
    for (int done = 0; done < n;) {
        int b = n - done < c->params.max_batch ? n - done : c->params.max_batch;
        float *out = done + b == n ? logits : NULL;
#ifdef CAKE_HAVE_CUDA
        if (c->cuda) {
            if (cake_cuda_forward(c->cuda, tokens + done, b, pos0 + done, out, err, errlen))
                return -1;
            done += b;
            continue;
        }
#endif
        const cake_batch_seq one = {c, tokens + done, b, pos0 + done, out, false};
        cake_cpu_forward(c, &one, 1, b, NULL);
        done += b;
    }
    return 0;
}

int cake_forward_batch(cake_context *engine, const cake_batch_seq *seqs, int n_seqs, char *err,
                       size_t errlen) {
    if (n_seqs < 1) return cake_err(err, errlen, "forward: no sequences");
    int n = 0, n_logits = 0;
    for (int i = 0; i < n_seqs; i++) {
        const cake_context *q = seqs[i].seq;
        if (q->model != engine->model || q->params.kv_type != engine->params.kv_type ||
            q->params.backend != engine->params.backend)
            return cake_err(err, errlen,
                            "forward: sequence %d is not of the engine's model, KV "
                            "type and backend",
                            i);
        for (int k = 0; k < i; k++)
            if (seqs[k].seq == q) return cake_err(err, errlen, "forward: sequence %d twice", i);
        if (check_tokens(q, seqs[i].tokens, seqs[i].n, seqs[i].pos0, err, errlen)) return -1;
        n += seqs[i].n;
        n_logits += seqs[i].logits && !seqs[i].all_logits;
        if (seqs[i].all_logits && engine->params.backend != CAKE_BACKEND_CPU)
            return cake_err(err, errlen,
                            "forward: the CUDA backend gives the last token's logits only "
                            "(every token's, as scoring a prompt needs: the CPU backend)");
    }
    if (n > engine->params.max_batch)
        return cake_err(err, errlen, "forward: %d tokens exceed the batch of %d", n,
                        engine->params.max_batch);
    if (engine->params.backend != CAKE_BACKEND_CPU) {
        if (n_seqs > 1 || seqs[0].seq != engine)
            return cake_err(err, errlen, "forward: the CUDA backend batches one sequence only");
        return cake_forward(engine, seqs[0].tokens, seqs[0].n, seqs[0].pos0, seqs[0].logits, err,
                            errlen);
    }
    if (n_logits > 1 && n_logits > engine->logit_rows_cap) {
        /* (16 floats more: the kernels' masked tail stores may span a vector
         * past the last row; see mm_tile in matmul.c) */
        float *rows =
            realloc(engine->logit_rows,
                    ((size_t)n_logits * (size_t)engine->model->hp.n_vocab + 16) * sizeof(float));
        if (!rows) return cake_err(err, errlen, "forward: out of memory for %d logits", n_logits);
        engine->logit_rows = rows;
        engine->logit_rows_cap = n_logits;
    }
    cake_cpu_forward(engine, seqs, n_seqs, n, engine->logit_rows);
    return 0;
}

const cake_model *cake_context_model(const cake_context *c) {
    return c->model;
}

int cake_context_n_threads(const cake_context *c) {
    return c->params.n_threads;
}

/* ---- the loader's view of a context (loader/loader.h) ---- */

void cake_context_route(cake_context *c, cake_route_fn fn, cake_turn_fn turn, void *route) {
    c->route_fn = fn;
    c->route_turn = fn ? turn : NULL;
    c->route = route;
}

static int engine_wait_turn(void *self, int n, uint64_t timeout_ns) {
    cake_context *c = self;
    return c->route_turn ? c->route_turn(c->route, n, timeout_ns) : 1;
}

static int engine_compute(void *self, const cake_token *tokens, int n, int pos0, float *logits,
                          char *err, size_t errlen) {
    cake_context *c = self;
    if (c->route_fn) return c->route_fn(c->route, tokens, n, pos0, logits, err, errlen);
    return cake_forward(c, tokens, n, pos0, logits, err, errlen);
}

/* A chunk blob's payload is, per layer, K rows then V rows of h->n_tokens
 * positions: on the CPU one memcpy each into the cache, on the GPU one copy each. */
static int engine_install(void *self, const void *blob, const cake_chunk_header *h, int pos0,
                          char *err, size_t errlen) {
    cake_context *c = self;
#ifdef CAKE_HAVE_CUDA
    if (c->cuda) {
        const size_t run = (size_t)h->n_tokens * h->n_kv_heads * h->head_dim * 2;
        const char *p = (const char *)blob + CAKE_CHUNK_HEADER_SIZE;
        for (uint32_t l = 0; l < h->n_layers; l++, p += 2 * run)
            if (cake_cuda_kv_write(c->cuda, (int)l, pos0, (int)h->n_tokens, p, p + run, err,
                                   errlen))
                return -1;
        return 0;
    }
#endif
    return cake_chunk_copy_into(blob, h, &c->kv, pos0, err, errlen);
}

static int engine_extract(void *self, cake_chunk_header *h, int pos0, void *blob, size_t cap,
                          char *err, size_t errlen) {
    cake_context *c = self;
#ifdef CAKE_HAVE_CUDA
    if (c->cuda) {
        const size_t run = (size_t)h->n_tokens * h->n_kv_heads * h->head_dim * 2;
        if (cap < cake_chunk_blob_size(h))
            return cake_err(err, errlen, "extract: buffer too small");
        char *p = (char *)blob + CAKE_CHUNK_HEADER_SIZE;
        for (uint32_t l = 0; l < h->n_layers; l++, p += 2 * run)
            if (cake_cuda_kv_read(c->cuda, (int)l, pos0, (int)h->n_tokens, p, p + run, err, errlen))
                return -1;
        return cake_chunk_seal(h, blob, err, errlen);
    }
#endif
    return cake_chunk_encode(h, &c->kv, pos0, blob, cap, err, errlen);
}

void cake_context_loader_engine(cake_context *c, int with_fingerprint, cake_loader_engine *out) {
    *out = (cake_loader_engine){
        .self = c,
        .compute = engine_compute,
        .install = engine_install,
        .extract = engine_extract,
        .wait_turn = c->route_turn ? engine_wait_turn : NULL,
        .hp = &c->model->hp,
        .kv_type = c->params.kv_type,
        .speed = &c->compute_speed,
        /* The CPU kernels keep one reduction order per token whatever the
         * batch (matmul.c, attention.c); cuBLAS picks its kernels by shape. */
        .batch_invariant = c->cuda == NULL,
        .staging = c->staging,
    };
    if (!with_fingerprint) return;
    cake_model_fingerprint(c->model, out->fingerprint);
    if (c->cuda) /* its KV is not the CPU's bits: chunks of its own (store/key.h) */
        cake_key_backend_fingerprint(out->fingerprint, "cuda", out->fingerprint);
}
