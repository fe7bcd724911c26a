/* A sequence context: the model it runs, its KV cache, a thread pool and the
 * scratch activations of one forward pass of up to max_batch tokens. */
#ifndef CAKE_CONTEXT_H
#define CAKE_CONTEXT_H

#include "cake.h"
#include "kv/kv_cache.h"
#include "loader/loader.h"
#include "model/model.h"
#include "util/threadpool.h"

/* Scratch for one batch of T <= max_batch tokens; shapes in tokens x features. */
typedef struct {
    float *x;   /* (T, dim) residual stream */
    float *xb;  /* (T, dim) normed input of a block */
    float *q;   /* (T, dim) queries, then attention output reuses att */
    float *k;   /* (T, kv_dim) new keys (f32, before storing into the cache) */
    float *v;   /* (T, kv_dim) new values */
    float *att; /* (T, dim) attention output */
    float *g;   /* (T, ffn) gate projection, then silu(g) * u */
    float *u;   /* (T, ffn) up projection */
    /* experts only (hp.n_experts > 0; NULL otherwise) */
    float *router;  /* (T, n_experts) router logits */
    int *pick;      /* (T, n_experts_used) each token's experts */
    float *pick_w;  /* (T, n_experts_used) and their weights */
    int *by_expert; /* (T n_experts_used) token rows of expert 0, then 1, ... */
    float *moe_in;  /* (T, dim) one expert's tokens' inputs, gathered */
    float *moe_out; /* (T, dim) and its outputs */
    float *moe_sum; /* (T, dim) each token's weighted sum of its experts' outputs */
} cake_scratch;

typedef int (*cake_route_fn)(void *route, const cake_token *tokens, int n, int pos0, float *logits,
                             char *err, size_t errlen);
typedef int (*cake_turn_fn)(void *route, int n, uint64_t timeout_ns);

struct cake_context {
    const cake_model *model;
    cake_context_params params;
    cake_kv_cache kv;
    cake_threadpool *pool;
    cake_scratch s;
    struct cake_cuda_state *cuda;     /* non-NULL: the CUDA backend runs the forward pass */
    cake_compute_speed compute_speed; /* the loader's estimate, kept across requests */
    cake_staging *staging;            /* the loader's fetch buffers, kept across requests */
    float *logit_rows;                /* cake_forward_batch: several sequences' logits */
    int logit_rows_cap;               /* rows of n_vocab floats */
    /* While set, the loader's compute calls on this context go here instead
     * of cake_forward (a request's forward hook, generate.c). */
    cake_route_fn route_fn;
    cake_turn_fn route_turn; /* the loader engine's wait_turn, when set */
    void *route;
};

/* Sets (fn non-NULL; turn may be NULL) or clears the context's route;
 * before cake_context_loader_engine, whose wait_turn it decides. */
void cake_context_route(cake_context *c, cake_route_fn fn, cake_turn_fn turn, void *route);

/* The CPU backend's forward pass over one batch of n <= max_batch tokens,
 * the sequences' in order, on c's threads and scratch; arguments already
 * validated (cake_forward, cake_forward_batch). logit_rows: room for the
 * logits of every sequence that asks for them, when more than one does. */
void cake_cpu_forward(cake_context *c, const cake_batch_seq *seqs, int n_seqs, int n,
                      float *logit_rows);

#endif
