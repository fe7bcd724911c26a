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
    float *logit_rows;                /* cake_forward_batch: several sequences' logits */
    int logit_rows_cap;               /* rows of n_vocab floats */
};

/* The CPU backend's forward pass over one batch of n <= max_batch tokens,
 * the sequences' in order, on c's threads and scratch; arguments already
 * validated (cake_forward, cake_forward_batch). logit_rows: room for the
 * logits of every sequence that asks for them, when more than one does. */
void cake_cpu_forward(cake_context *c, const cake_batch_seq *seqs, int n_seqs, int n,
                      float *logit_rows);

#endif
