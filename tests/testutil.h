/* Helpers shared by the unit tests. */
#ifndef CAKE_TESTUTIL_H
#define CAKE_TESTUTIL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/json_grammar.h"
#include "loader/staging.h"

/* GPT-2's character for byte b (byte-level BPE vocabularies write their
 * tokens in them), as UTF-8 in a static buffer per byte: the printable
 * Latin-1 bytes stand for themselves, the other 68 for U+0100 upwards. */
const char *test_gpt2_byte_char(int b);

/* ThreadSanitizer (scripts/test.sh runs the threaded tests under it, ~10x
 * slower) looks for races, which depend on how work is split over threads,
 * not on the arithmetic. A test whose threads split the work as another
 * test's do (a model variant, a weight type, the sampler) starts with this:
 * TSan skips it, every other build runs it. */
#ifdef __SANITIZE_THREAD__
#define SKIP_UNDER_TSAN()                                                                          \
    do {                                                                                           \
        print_message("skip under TSan: its threads work as another test's\n");                    \
        skip();                                                                                    \
    } while (0)
#else
#define SKIP_UNDER_TSAN() ((void)0)
#endif

/* Directory of the shared test models (env CAKE_TEST_MODELS, else the build's
 * default ../shared/models). */
const char *test_models_dir(void);
/* "<models dir>/<name>" in a static buffer, or NULL when the file is absent
 * (the caller then skips with a message). */
const char *test_model_path(const char *name);
/* Reads a whole file; caller frees. NULL on failure. */
void *test_read_file(const char *path, size_t *size);

/* A CPU context of m: n_ctx positions, threads, at most max_batch tokens a
 * forward pass. NULL on failure (the reason on stderr). */
struct cake_model;
struct cake_context *test_context(const struct cake_model *m, int n_ctx, int threads,
                                  int max_batch);

/* `cake mkmodel --shape SHAPE --dtype DTYPE` into a new temp file, whose path
 * goes into path (room for 64). 0, or -1 when the command failed. */
int test_make_model(const char *shape, const char *dtype, char path[64]);

/* What test_write_variant changes in a copy of a `cake mkmodel` model. */
typedef struct {
    const float *rope_factors; /* rope_freqs.weight, n_factors values; NULL: none */
    int n_factors;
    float linear; /* linear RoPE scaling by this factor; 0: none */
    /* qwen2: architecture and keys renamed, each head's q/k rows put back in
     * the NeoX order that llama.cpp's converter permutes Llama's out of
     * (llama row 2i + b is qwen2 row b * head_dim/2 + i). */
    bool qwen2;
    float bias; /* q/k/v biases of (j % 7 - 3) * bias at index j; 0: none */
    /* with qwen2: a qwen3 copy (qwen3moe where the source has experts), with
     * per-head q/k norms of weights 1 + (j % 5 - 2) * qk_norm at index j;
     * 0: none */
    float qk_norm;
    bool tied; /* without output.weight: the output is the token embedding */
    /* Q8_0 tensors written as F32 with their exact values d * q: the same
     * model in floats (not with qwen2) */
    bool dequantize;
    /* NULL, or the type each matrix (2-D or 3-D tensor) gets, from its name and
     * type: F32 or quantized sources only, converted through f32
     * (test_quantize_row; a type cake cannot compute with gets zero
     * blocks; not with qwen2) */
    int (*retype)(const char *name, int type);
    const char *chat_template; /* tokenizer.chat_template; NULL: none */
    /* NULL, or texts (NULL-terminated) that become the vocabulary's last
     * tokens, of type control: a chat format's special tokens */
    const char *const *special_tokens;
    uint32_t context_length; /* <arch>.context_length; 0: the source's */
    /* with qwen2: a phi3 copy (q/k/v in one attn_qkv, gate and up in one
     * ffn_up; no other changes but these), with the key
     * attention.sliding_window, and with long_factors LongRoPE's
     * rope_factors_long (long_factors) and _short (short_factors, both
     * n_factors) and rope.scaling.original_context_length */
    bool phi3;
    int sliding_window;
    const float *long_factors, *short_factors;
    uint32_t original_context;
    float attn_factor; /* <arch>.rope.scaling.attn_factor; 0: none */
    int rope_dims;     /* <arch>.rope.dimension_count (partial RoPE); 0: the source's */
    /* with qwen2: a gemma2 or gemma3 copy (gemma3 with qk_norm), with
     * post-attention and post-FFN norms (weights 1 + (j % 5 - 2) / 4), the
     * window sliding_window (0: none), rope.freq_base rope_base (0: the
     * source's) and Gemma 2's soft caps (0: the key absent) */
    int gemma;
    float rope_base;
    float attn_softcap, logit_softcap;
    /* each expert's matrix as a tensor of its own (blk.L.ffn_gate.E.weight,
     * as older Mixtral conversions have them), not with other changes */
    bool split_experts;
    /* with qwen2 (not qk_norm) and a source with experts: a qwen2moe copy
     * with a shared expert this wide (random F32 matrices, or retype's type;
     * its gate a [dim, 1] F32 row) and the key expert_shared_feed_forward_length */
    int shared_expert;
    /* not with qwen2: a granite copy (granitemoe where the source has
     * experts; keys renamed, nothing else changed) with the keys
     * embedding_scale, attention.scale, residual_scale and logit_scale
     * (each where not 0) */
    bool granite;
    float embedding_scale, attention_scale, residual_scale, logit_scale;
    const char *extra_vector; /* NULL, or one more tensor of this name: [dim] F32 zeros */
    /* not with qwen2: a mistral3 copy (Ministral 3; keys renamed, nothing
     * else changed), with YaRN of factor yarn (0: none) over the context
     * original_context and rope.scaling.yarn_log_multiplier yarn_log_mul
     * (0: absent), and attention.temperature_scale temperature (0: absent) */
    bool mistral3;
    float yarn, yarn_log_mul, temperature;
} test_model_variant;

/* Copies the GGUF at src (a llama model with the key types `cake mkmodel`
 * writes) to dst with the changes of v. 0, or -1 with the reason in err
 * (also printed on stderr). */
int test_write_variant(const char *src, const char *dst, const test_model_variant *v, char *err,
                       size_t errlen);

/* Quantized blocks in ggml's layouts (model/dequant.h reads them), from
 * their parts: Q4_0/Q4_1/Q5_0/Q5_1 from d, m (with a min) and 32 levels q
 * (0..15 or 0..31); Q4_K/Q5_K from d, dmin, 8 6-bit scales and mins and 256
 * levels; Q6_K from d, 16 int8 scales and 256 levels in -32..31. */
void test_encode_q4_q5(int type, float d, float m, const int *q, uint8_t *b);
void test_encode_q4_q5_k(int type, float d, float dmin, const int *sc, const int *m, const int *q,
                         uint8_t *b);
void test_encode_q6_k(float d, const int *sc, const int *q, uint8_t *b);
/* Q2_K from d, dmin, 16 4-bit scales and mins, 256 levels 0..3; Q3_K from d,
 * 16 scales in -32..31 and 256 levels in -4..3 (dmin, m unused). */
void test_encode_q2_q3_k(int type, float d, float dmin, const int *sc, const int *m, const int *q,
                         uint8_t *b);
/* IQ4_NL (32 values) and IQ4_XS (256; 8 scales in -32..31) from d and 4-bit
 * indices into ggml's kvalues_iq4nl table. */
void test_encode_iq4(int type, float d, const int *sc, const int *idx, uint8_t *b);

/* x[0..n) (whole blocks) quantized to `type` into dst by plain rounding (not
 * llama.cpp's search for the best scales); returns the bytes written. */
size_t test_quantize_row(int type, const float *x, size_t n, uint8_t *dst);

/* For test_model_variant.retype: a Q4_K_M-like mix with each quantized type
 * on some matrix (the token embedding Q4_K, the output Q6_K); needs rows of
 * whole k-quant blocks (shape tiny-256). */
int test_mixed_quants(const char *name, int type);

/* An answer sampled under grammar g (engine/json_grammar.h) from random
 * logits (uniform in [0, spread), the end token `boost` higher: ends come
 * sooner), up to max tokens: its text into out (NUL-terminated; cap bytes
 * of room). Returns whether it ended with the end token. */
bool test_sample_constrained(const cake_tokenizer *t, cake_json_grammar *g, cake_token end,
                             float temperature, uint64_t seed, float spread, float boost, int max,
                             char *out, size_t cap);

/* A grammar's mask (logits[0..n): 0 allowed, -inf not) against the
 * automaton in state `want`, token by token (a token is allowed when the
 * automaton reads its text on; the end token when the value is whole): the
 * first token they disagree on, or -1. *allowed: how many the automaton
 * allows. */
int test_mask_mismatch(const cake_tokenizer *t, const float *logits, int n, cake_token end,
                       const cake_json_state *want, int *allowed);

/* A staging allocator (the store's aligned buffers) that counts its calls. */
extern const cake_staging_allocator test_counting_allocator;
extern atomic_int test_counted_allocs, test_counted_releases;

#endif
