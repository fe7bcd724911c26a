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
} cake_scratch;

struct cake_context {
    const cake_model *model;
    cake_context_params params;
    cake_kv_cache kv;
    cake_threadpool *pool;
    cake_scratch s;
    struct cake_cuda_state *cuda;     /* non-NULL: the CUDA backend runs the forward pass */
    cake_compute_speed compute_speed; /* the loader's estimate, kept across requests */
    cake_staging *staging;            /* the loader's fetch buffers, kept across requests */
};

/* The CPU backend's forward pass over one batch (n <= max_batch), arguments
 * already validated by cake_forward. */
void cake_cpu_forward_batch(cake_context *c, const cake_token *tokens, int n, cake_pos pos0,
                            float *logits);

#endif
