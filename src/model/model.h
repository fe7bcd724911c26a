/* The in-memory Llama model: hyperparameters, the tokenizer, and pointers to
 * each weight inside the mapped GGUF file (nothing is copied except the small
 * norm vectors, which are kept as f32). */
#ifndef CAKE_MODEL_H
#define CAKE_MODEL_H

#include <pthread.h>
#include <stdbool.h>

#include "cake.h"
#include "model/gguf.h"

/* A weight matrix (n_out, n_in), row-major, in the file's dtype. A
 * quantized matrix that the CPU matmul reads also gets a copy in its layout
 * (CAKE_DTYPE_Q4_K_X16, _Q5_K_X16, _Q6_K_X16, _IQ4_XS_X16 for Q4_K, Q5_K,
 * Q6_K, IQ4_XS; CAKE_DTYPE_Q8_0_X16 for the others: backend/cpu/kernels.h),
 * which the model owns, once a CPU context asks for it
 * (cake_model_prepare_cpu). */
typedef struct {
    const void *data; /* in the file's mapping */
    int dtype;        /* cake_dtype */
    int n_in, n_out;
    const void *x16; /* quantized: the CPU's repacked copy, or NULL before */
    int x16_dtype;   /* its layout */
} cake_weight;

typedef struct {
    float *attn_norm;    /* (dim) */
    cake_weight wq;      /* (q_dim, dim) */
    cake_weight wk;      /* (kv_dim, dim) */
    cake_weight wv;      /* (kv_dim, dim) */
    cake_weight wo;      /* (dim, q_dim) */
    float *bq, *bk, *bv; /* (q_dim), (kv_dim), (kv_dim) biases; NULL when absent */
    float *q_norm,
        *k_norm;        /* (head_dim) each: per-head RMSNorm of q and k (qwen3); NULL when absent */
    float *ffn_norm;    /* (dim) */
    cake_weight w_gate; /* (ffn, dim); data NULL in a layer of experts */
    cake_weight w_up;   /* (ffn, dim) */
    cake_weight w_down; /* (dim, ffn) */
    /* hp.n_experts > 0: the router and each expert's FFN, views into the
     * file's 3-D tensors (expert e is the e-th matrix of each) */
    cake_weight router;  /* (n_experts, dim): a token's expert logits */
    cake_weight *expert; /* (3 n_experts): expert e's gate, up and down at 3e, 3e+1, 3e+2 */
    /* hp.shared_ffn_dim > 0: the shared expert's gate, up and down, and its
     * gate's weights (dim): the output is scaled by sigmoid(x . shared_gate) */
    cake_weight shared[3];
    float *shared_gate;
    float *post_attn_norm, *post_ffn_norm; /* (dim) each, Gemma 3; NULL when absent */
    int window;                            /* this layer's sliding window; 0 = none */
    const double *rope_freqs;              /* the model's rope_freqs, or its local ones */
} cake_layer;

struct cake_model {
    cake_gguf *gguf; /* owns the mapping the weights point into */
    cake_hparams hp;
    cake_tokenizer *tokenizer;
    cake_weight tok_embd; /* (n_vocab, dim): row t is token t's embedding */
    float *output_norm;   /* (dim) */
    cake_weight output;   /* (n_vocab, dim); == tok_embd when tied */
    cake_layer *layers;   /* (n_layers) */
    /* (head_dim / 2): the angle per position of RoPE pair i,
     * rope_theta^(-2i / head_dim) * rope_freq_scale / rope_freqs.weight[i]
     * (the last factor is Llama 3.1's rope scaling, or LongRoPE's; 1 when
     * the file has none). Both backends rotate by these. */
    double *rope_freqs;
    double *rope_freqs_local; /* Gemma 3's windowed layers' (theta 10000, no scaling), or NULL */
    /* which factors divided them: 0 none or rope_freqs.weight, else
     * LongRoPE's rope_factors_short (1) or _long (2) */
    int rope_factor_set;
    bool quantized; /* some matrix the matmul reads is quantized (the CPU: as Q8_0) */
    void *packed;   /* their repacked copies (one mapping), or NULL */
    size_t packed_size;
    pthread_once_t pack_once;
    char pack_err[160]; /* why the repack failed, after pack_once ran; "" if it did not */
    pthread_once_t fingerprint_once;
    uint8_t fingerprint[16]; /* valid after fingerprint_once ran */
};

/* Makes the model ready for the CPU backend: repacks its Q8_0 matrices into
 * the CPU matmul's layout, once (the first call does it, on every core; the
 * others wait for it). The CUDA backend reads the file's blocks, so a GPU
 * run neither waits for this nor holds the copies. 0, or -1 with err. */
int cake_model_prepare_cpu(const cake_model *m, char *err, size_t errlen);

#endif
