/* cake: an LLM inference engine for fast time-to-first-token on long, repeated
 * prompts. This is the public C API: load a GGUF Llama-family model, create a
 * per-sequence context (KV cache + scratch), run chunked prefill and decode,
 * tokenize, sample.
 *
 * Conventions: functions return 0 on success and -1 on failure, with a one-line
 * reason in the caller's `err` buffer; on failure, outputs are left NULL and no
 * state changes. Ranges are half-open [p0, p1). Objects are opaque; every
 * *_free accepts NULL. */
#ifndef CAKE_H
#define CAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t cake_token;
typedef int32_t cake_pos;

typedef struct cake_model cake_model;
typedef struct cake_context cake_context;
typedef struct cake_tokenizer cake_tokenizer;
typedef struct cake_sampler cake_sampler;

/* Architecture of a loaded model (GGUF `llama.*`, `mistral3.*`, `qwen2.*`,
 * `qwen3.*`, `qwen3moe.*`, `phi3.*`, `gemma2.*` or `gemma3.*` keys). */
typedef struct {
    int n_vocab;
    int n_ctx_train; /* context_length */
    int dim;         /* embedding_length */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;  /* attention.key_length, else dim / n_heads */
    int rope_dims; /* rope.dimension_count: RoPE turns each head's first rope_dims values;
                      head_dim, or fewer (partial RoPE, Phi-4-mini; NeoX models only) */
    int q_dim;     /* n_heads * head_dim: q's and the attention output's width; dim
                      except where heads are wider (Qwen3 0.6B, 4B, 32B) */
    int ffn_dim;
    float rms_eps;
    float rope_theta;
    float rope_freq_scale; /* 1 / linear scaling factor; 1 = none */
    /* YaRN (rope.scaling.type yarn: Ministral 3, Qwen's long-context
     * files): the factor, the original context and the betas that place
     * the ramp between the pairs kept and those interpolated; factor 0 =
     * none */
    float rope_yarn_factor, rope_yarn_beta_fast, rope_yarn_beta_slow;
    int rope_yarn_orig_ctx;
    /* LongRoPE (Phi-3.5, Phi-3 128K), and YaRN's magnitude: attention
     * logits are scaled by its square (llama.cpp scales both q and k by
     * it); 1 = none */
    float rope_attn_factor;
    /* Llama 4's attention temperature (Ministral 3): after RoPE, q at
     * position p is scaled by 1 + attn_temp_scale ln(1 + floor(p /
     * attn_temp_length)); 0 = none */
    float attn_temp_scale;
    int attn_temp_length;
    /* Phi-3 4K models attend over a sliding window of this many positions
     * (the CPU backend applies it; the CUDA backend takes contexts no longer
     * than it, where it masks nothing). 0 = none */
    int sliding_window;
    int swa_pattern; /* with a window: layer l has it when l % swa_pattern < swa_pattern - 1
                        (Gemma 3: 6, the others attend to everything, and the windowed
                        ones turn RoPE at theta 10000); 0 = every layer */
    /* Gemma 3 */
    float embed_scale;      /* token embeddings are multiplied by it (sqrt(dim)); 1 = none */
    float q_scale;          /* the scores' scale over 1/sqrt(head_dim) (Gemma 3 27B); 1 = none */
    float residual_scale;   /* Granite: attention and FFN outputs times it before the add */
    float logit_scale;      /* Granite: the logits are divided by it; 1 = none */
    bool gelu;              /* the FFN gates with GELU (tanh form) instead of SiLU */
    bool post_norms;        /* the attention and FFN outputs are RMS-normed before the residual */
    float rope_theta_local; /* the windowed layers' RoPE base (Gemma 3: 10000, unscaled); 0 = the
                               model's */
    float attn_softcap;     /* Gemma 2: scores become c tanh(s / c); 0 = none */
    float logit_softcap;    /* Gemma 2: so do the output logits */
    int weight_dtype;       /* dtype of the big matrices (cake_dtype numbering) */
    bool tied_output;       /* output.weight absent: token_embd is reused */
    bool rope_neox;         /* RoPE turns pairs (i, i + head_dim/2) (qwen2), not (2i, 2i+1) */
    bool qkv_bias;          /* some layer adds a bias to q, k or v */
    bool qk_norm;           /* q and k are RMS-normed per head before RoPE (qwen3) */
    /* Mixture of experts (qwen3moe; llama files with experts, as Mixtral):
     * each token's FFN is the weighted sum of n_experts_used of n_experts
     * FFNs of width ffn_dim, picked by a router. 0 experts: a dense FFN. */
    int n_experts;
    int n_experts_used;
    bool experts_norm; /* the picked experts' weights are scaled to sum to 1 */
    /* qwen2moe: a shared expert of this width that every token goes
     * through besides its picked ones, its output scaled by a sigmoid
     * gate; 0 = none */
    int shared_ffn_dim;
} cake_hparams;

/* ---- model ---- */

/* Maps and validates a GGUF file (architecture `llama`, `qwen2` or `qwen3`;
 * F32/F16/BF16 or quantized weights, model/dequant.h).
 * Weights stay in the read-only mapping. */
int cake_model_load(const char *path, cake_model **out, char *err, size_t errlen);
void cake_model_free(cake_model *m);
const cake_hparams *cake_model_hparams(const cake_model *m);
/* The model's tokenizer (owned by the model). */
const cake_tokenizer *cake_model_tokenizer(const cake_model *m);
/* Bytes of the weights file. */
uint64_t cake_model_file_size(const cake_model *m);
/* A 16-byte identity of the model: XXH3-128 over the architecture, every
 * tensor's name, shape and dtype, and the weight bytes. The same file gives the
 * same fingerprint on every machine. Computed on first use (it reads every
 * weight once), then cached; thread-safe. */
void cake_model_fingerprint(const cake_model *m, uint8_t out[16]);

/* ---- context: one sequence's KV cache and scratch ---- */

/* Q8_0: each 32 dims of a position's key or value as 32 int8 and an f16
 * scale (ggml's block_q8_0, llama.cpp's --cache-type-k/v q8_0): 53% of the
 * f16 bytes to store, load and read. Q4_0: as 32 4-bit values and an f16
 * scale (block_q4_0): 28%. Both need a head_dim that is a multiple of 32. */
enum cake_kv_type { CAKE_KV_F16 = 0, CAKE_KV_F32 = 1, CAKE_KV_Q8_0 = 2, CAKE_KV_Q4_0 = 3 };
enum cake_backend_kind { CAKE_BACKEND_CPU = 0, CAKE_BACKEND_CUDA = 1 };

typedef struct {
    int n_ctx;     /* KV capacity in tokens (the CPU backend commits its memory up
                    * front); 0 = the model's context length, committed as used */
    int n_threads; /* 0 = number of online CPUs */
    int max_batch; /* most tokens per forward pass; longer prefills are split; 0 = 512 */
    enum cake_kv_type kv_type;      /* default F16; the CUDA backend supports F16 only */
    enum cake_backend_kind backend; /* default CPU */
} cake_context_params;

cake_context_params cake_context_default_params(void);
int cake_context_init(const cake_model *m, cake_context_params p, cake_context **out, char *err,
                      size_t errlen);
void cake_context_free(cake_context *c);
int cake_context_n_ctx(const cake_context *c);
int cake_context_max_batch(const cake_context *c);
const cake_model *cake_context_model(const cake_context *c);
int cake_context_n_threads(const cake_context *c);

/* Computes positions [pos0, pos0 + n) for tokens[0..n), given that the KV cache
 * already holds positions [0, pos0). Writes their K and V into the cache. If
 * logits is not NULL, writes the n_vocab logits of the last token. Returns -1
 * (with err) for a range outside the cache or a token id out of range; the
 * cache beyond pos0 is then unspecified. The result for a position does not
 * depend on how the prompt was split into calls. */
int cake_forward(cake_context *c, const cake_token *tokens, int n, cake_pos pos0, float *logits,
                 char *err, size_t errlen);

/* One sequence's part of a batched forward pass. */
typedef struct {
    cake_context *seq; /* its KV cache holds [0, pos0) and receives the new K and V */
    const cake_token *tokens;
    int n; /* >= 1 */
    cake_pos pos0;
    float *logits;   /* NULL, or where the n_vocab logits of its last token go */
    bool all_logits; /* logits gets every token's, n rows of n_vocab (CPU backend) */
} cake_batch_seq;

/* One forward pass over the tokens of several sequences (a server's batch),
 * on engine's threads and scratch: the matmuls run over all the rows at once,
 * so a decode step of k sequences reads the weights once, not k times; each
 * sequence attends to its own KV cache. Every sequence gets the bits that
 * cake_forward on it alone gives. The sequences are contexts of engine's
 * model and KV type, each at most once (engine may be one of them), with at
 * most engine's max_batch tokens in all. CPU backend; a CUDA engine takes
 * itself alone. Checks everything before computing anything. */
int cake_forward_batch(cake_context *engine, const cake_batch_seq *seqs, int n_seqs, char *err,
                       size_t errlen);

/* Direct access to the KV cache of layer l (CPU backend), f16 or f32
 * elements, head-major: V is (n_kv_heads, head_ctx, head_dim) with head_ctx
 * n_ctx rounded up to 64; K holds the same runs in blocks of 64 positions,
 * each block stored transposed. cake_kv_k_index and cake_kv_v_index
 * (src/kv/kv_cache.h) give an element's offset. */
void *cake_context_k(cake_context *c, int layer);
void *cake_context_v(cake_context *c, int layer);
enum cake_kv_type cake_context_kv_type(const cake_context *c);

/* ---- sampling ---- */

typedef struct {
    cake_token id;
    float bias; /* added to the token's logit (-100 bans it, 100 forces it) */
} cake_logit_bias;

typedef struct {
    float temperature; /* <= 0: greedy (argmax; ties go to the lowest id) */
    float top_p;       /* nucleus mass in (0, 1]; 1 = off */
    int top_k;         /* only the k likeliest tokens; 0 = off */
    float min_p;       /* only tokens at least min_p times the likeliest's probability; 0 = off */
    uint64_t seed;     /* same seed, same logits: same tokens */
    /* OpenAI's penalties (0 = off), over the tokens this sampler chose so
     * far: a token's logit loses frequency_penalty for each time it was
     * chosen, and presence_penalty once if it was at all. */
    float frequency_penalty, presence_penalty;
    /* The repetition penalty (vLLM's repetition_penalty, llama.cpp's
     * repeat_penalty; 1 or 0 = off), over the prompt and the tokens chosen
     * so far, the last repeat_last_n of them (0 = all): a token among them
     * has its logit divided by it when positive, multiplied when not
     * (before the two above). prompt: n_prompt ids (copied by init). */
    float repetition_penalty;
    int repeat_last_n;
    const cake_token *prompt;
    int n_prompt;
    /* vLLM's min_tokens: the first min_tokens tokens are never one of
     * end_ids[0..n_end_ids) (EOS, the end of turn, stop ids; at most 64;
     * copied by init), which get -inf after everything else (unless nothing
     * else is left). */
    int min_tokens;
    const cake_token *end_ids;
    int n_end_ids;
    const cake_logit_bias *logit_bias; /* n_logit_bias of them (copied by init) */
    int n_logit_bias;
    /* Optional: a grammar (the server's JSON mode). constrain sets the
     * logits of the tokens that may not come next to -INFINITY, in the
     * sampler's copy after biases and penalties; accept hears each token
     * chosen. ud is theirs. */
    void (*constrain)(void *ud, float *logits, int n_vocab);
    void (*accept)(void *ud, cake_token id);
    void *constrain_ud;
} cake_sampler_params;

cake_sampler *cake_sampler_init(cake_sampler_params p); /* NULL on out of memory */
void cake_sampler_free(cake_sampler *s);
/* Chooses a token from n_vocab logits (logits are not modified). */
cake_token cake_sampler_sample(cake_sampler *s, const float *logits, int n_vocab);

#ifdef __cplusplus
}
#endif
#endif
