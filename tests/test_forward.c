/* The forward pass against a peer implementation (llama2.c run.c golden ids
 * and logits on stories260K), chunked prefill against one-shot prefill, and
 * Llama 3.1's rope scaling (rope_freqs.weight) against linear scaling. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cake.h"
#include "engine/context.h"
#include "engine/generate.h"
#include "engine/json_grammar.h"
#include "backend/cpu/kernels.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "testutil.h"
#include "util/clock.h"
#include "util/f16.h"
#include "util/q8_0.h"

#define MAX_IDS 64

/* Parses the "greedy_ids ..." line of golden/stories260K-greedy.txt. */
static int read_golden_ids(cake_token *ids) {
    const char *path = test_model_path("golden/stories260K-greedy.txt");
    if (!path) return -1;
    size_t size;
    char *text = test_read_file(path, &size);
    assert_non_null(text);
    text = realloc(text, size + 1);
    text[size] = '\0';
    char *line = strstr(text, "\ngreedy_ids ");
    assert_non_null(line);
    int n = 0;
    char *p = line + strlen("\ngreedy_ids ");
    while (*p && *p != '\n' && n < MAX_IDS) {
        ids[n++] = (cake_token)strtol(p, &p, 10);
        while (*p == ' ') p++;
    }
    free(text);
    return n;
}

typedef struct {
    cake_token ids[MAX_IDS];
    int n;
    float *logits;
} run_result;

/* Greedy run of n_predict tokens with the given chunk size and KV type. */
static void run_greedy(const cake_model *m, const cake_token *prompt, int n_prompt, int n_predict,
                       int chunk, enum cake_kv_type kv, int threads, run_result *out) {
    const cake_hparams *hp = cake_model_hparams(m);
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = n_prompt + n_predict;
    cp.kv_type = kv;
    cp.n_threads = threads;
    cake_context *c = NULL;
    char err[256];
    assert_int_equal(cake_context_init(m, cp, &c, err, sizeof(err)), 0);
    cake_sampler *s = cake_sampler_init((cake_sampler_params){.temperature = 0});
    out->logits = malloc((size_t)hp->n_vocab * sizeof(float));
    cake_request r = {.prompt = prompt,
                      .n_prompt = n_prompt,
                      .n_predict = n_predict,
                      .chunk = chunk,
                      .eos = -1,
                      .sampler = s,
                      .first_logits = out->logits};
    cake_request_stats st;
    int rc = cake_request_run(c, &r, out->ids, &st, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    out->n = st.n_generated;
    cake_sampler_free(s);
    cake_context_free(c);
}

static cake_model *load_or_skip(const char *name) {
    const char *path = test_model_path(name);
    if (!path) return NULL;
    cake_model *m = NULL;
    char err[512];
    if (cake_model_load(path, &m, err, sizeof(err))) fprintf(stderr, "%s\n", err);
    assert_non_null(m);
    return m;
}

static void test_golden_greedy_and_logits(void **state) {
    (void)state;
    cake_token golden[MAX_IDS];
    int n_golden = read_golden_ids(golden);
    cake_model *m = load_or_skip("stories260K.gguf");
    if (n_golden < 0 || !m) {
        cake_model_free(m);
        skip();
    }
    assert_int_equal(n_golden, 36);

    const char *text = "Once upon a time";
    cake_token prompt[16];
    const cake_tokenizer *tok = cake_model_tokenizer(m);
    int64_t n_prompt = cake_tokenize(tok, text, strlen(text), true, prompt, 16);
    const cake_token want_prompt[] = {1, 403, 407, 261, 378};
    assert_int_equal(n_prompt, 5);
    assert_memory_equal(prompt, want_prompt, sizeof(want_prompt));

    size_t size;
    float *ref = test_read_file(
        test_model_path("golden/stories260K-once-upon-a-time.last-prompt-logits.f32"), &size);
    assert_non_null(ref);
    assert_int_equal(size, 512 * sizeof(float));

    const struct {
        enum cake_kv_type kv;
        float tol;
    } cases[] = {{CAKE_KV_F32, 1e-4f}, {CAKE_KV_F16, 1e-2f}};
    for (int k = 0; k < 2; k++) {
        run_result r;
        run_greedy(m, prompt, 5, 36, 256, cases[k].kv, 2, &r);
        assert_int_equal(r.n, 36);
        assert_memory_equal(r.ids, golden, 36 * sizeof(cake_token));
        float maxdiff = 0;
        for (int i = 0; i < 512; i++) maxdiff = fmaxf(maxdiff, fabsf(r.logits[i] - ref[i]));
        printf("kv %s: max |logit - llama2.c| = %.3g (tolerance %.0e)\n",
               cases[k].kv == CAKE_KV_F32 ? "f32" : "f16", maxdiff, cases[k].tol);
        assert_true(maxdiff <= cases[k].tol);
        free(r.logits);
    }
    free(ref);
    cake_model_free(m);
}

/* Max relative difference, scaled by the larger magnitude of the whole vector. */
static float max_rel_diff(const float *a, const float *b, int n) {
    float scale = 0, d = 0;
    for (int i = 0; i < n; i++) scale = fmaxf(scale, fmaxf(fabsf(a[i]), fabsf(b[i])));
    for (int i = 0; i < n; i++) d = fmaxf(d, fabsf(a[i] - b[i]));
    return scale > 0 ? d / scale : d;
}

static void check_chunk_invariance(cake_model *m, int n_prompt, int n_predict) {
    const cake_hparams *hp = cake_model_hparams(m);
    cake_token *prompt = malloc((size_t)n_prompt * sizeof(cake_token));
    uint64_t x = 12345;
    prompt[0] = 1;
    for (int i = 1; i < n_prompt; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        prompt[i] = 3 + (cake_token)((x >> 33) % (uint64_t)(hp->n_vocab - 3));
    }
    const int chunks[] = {n_prompt, 1, 7, 64};
    run_result base;
    run_greedy(m, prompt, n_prompt, n_predict, chunks[0], CAKE_KV_F16, 2, &base);
    for (int k = 1; k < 4; k++) {
        for (int threads = 1; threads <= 3; threads += 2) {
            run_result r;
            run_greedy(m, prompt, n_prompt, n_predict, chunks[k], CAKE_KV_F16, threads, &r);
            float d = max_rel_diff(base.logits, r.logits, hp->n_vocab);
            printf("chunk %d, %d threads: %d ids, logits rel diff %.3g\n", chunks[k], threads, r.n,
                   d);
            assert_int_equal(r.n, base.n);
            assert_memory_equal(r.ids, base.ids, (size_t)r.n * sizeof(cake_token));
            assert_true(d <= 1e-5f);
            free(r.logits);
        }
    }
    free(base.logits);
    free(prompt);
}

static void test_chunked_prefill_stories(void **state) {
    (void)state;
    cake_model *m = load_or_skip("stories260K.gguf");
    if (!m) skip();
    check_chunk_invariance(m, 300, 16);
    cake_model_free(m);
}

/* A `cake mkmodel --shape tiny` file at a temp path (static buffer). */
static const char *make_tiny(void) {
    static char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    return path;
}

/* check_chunk_invariance on the model file at path. */
static void check_file_chunk_invariance(const char *path, int n_prompt, int n_predict) {
    cake_model *m = NULL;
    char err[512];
    int rc = cake_model_load(path, &m, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    check_chunk_invariance(m, n_prompt, n_predict);
    cake_model_free(m);
}

/* The same on a GQA model made by `cake mkmodel --shape tiny` (F16 weights). */
static void test_chunked_prefill_mkmodel(void **state) {
    (void)state;
    const char *path = make_tiny();
    check_file_chunk_invariance(path, 200, 8);
    unlink(path);
}

/* ---- several sequences in one forward pass ---- */

static cake_context *batch_test_context(const cake_model *m, int threads, int max_batch) {
    cake_context *c = test_context(m, 128, threads, max_batch);
    assert_non_null(c);
    return c;
}

/* One step of the test below: what each of the three sequences computes. */
typedef struct {
    int n[3];
    int want_logits[3];
} batch_step;

/* cake_forward_batch over three sequences (the engine's own context and two
 * others) at once, in steps that mix prefill pieces and decode tokens, gives
 * each sequence the logits and the KV cache bits of cake_forward on a
 * context of its own; and it refuses what it cannot run, before computing. */
static void test_forward_batch(void **state) {
    (void)state;
    const char *path = make_tiny();
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    const int n_vocab = cake_model_hparams(m)->n_vocab;
    cake_context *engine = batch_test_context(m, 2, 64);
    cake_context *seq[3] = {engine, batch_test_context(m, 1, 1), batch_test_context(m, 1, 1)};
    cake_context *ref[3];
    for (int i = 0; i < 3; i++) ref[i] = batch_test_context(m, 2, 64);

    cake_token tokens[3][100];
    for (int i = 0; i < 3; i++)
        for (int t = 0; t < 100; t++)
            tokens[i][t] = 3 + (cake_token)((t * 7919 + i * 104729) % 900);
    static const batch_step steps[] = {
        {{40, 17, 5}, {1, 0, 1}}, /* three prefills */
        {{1, 23, 1}, {1, 1, 1}},  /* decode, prefill, decode */
        {{1, 1, 1}, {1, 1, 1}},   /* three decode tokens */
        {{1, 0, 30}, {0, 0, 1}},  /* B sits this one out */
    };
    float *got = malloc(3 * (size_t)n_vocab * sizeof(float));
    float *want = malloc((size_t)n_vocab * sizeof(float));
    int pos[3] = {0, 0, 0};
    for (size_t k = 0; k < sizeof(steps) / sizeof(steps[0]); k++) {
        cake_batch_seq b[3];
        int nb = 0;
        for (int i = 0; i < 3; i++)
            if (steps[k].n[i])
                b[nb++] = (cake_batch_seq){seq[i],
                                           tokens[i] + pos[i],
                                           steps[k].n[i],
                                           pos[i],
                                           steps[k].want_logits[i] ? got + i * n_vocab : NULL,
                                           false};
        assert_int_equal(cake_forward_batch(engine, b, nb, err, sizeof(err)), 0);
        for (int i = 0; i < 3; i++) {
            if (!steps[k].n[i]) continue;
            const int lg = steps[k].want_logits[i];
            assert_int_equal(cake_forward(ref[i], tokens[i] + pos[i], steps[k].n[i], pos[i],
                                          lg ? want : NULL, err, sizeof(err)),
                             0);
            if (lg) assert_memory_equal(got + i * n_vocab, want, (size_t)n_vocab * sizeof(float));
            pos[i] += steps[k].n[i];
        }
    }
    for (int i = 0; i < 3; i++)
        for (int l = 0; l < cake_model_hparams(m)->n_layers; l++) {
            assert_memory_equal(cake_context_k(seq[i], l), cake_context_k(ref[i], l),
                                seq[i]->kv.layer_bytes);
            assert_memory_equal(cake_context_v(seq[i], l), cake_context_v(ref[i], l),
                                seq[i]->kv.layer_bytes);
        }

    /* Refused, each with a reason: more tokens than the engine's batch, a
     * sequence twice, a bad token id, positions past the context, another
     * model's context. */
    cake_batch_seq bad[2] = {{seq[1], tokens[1], 40, 0, NULL, false},
                             {seq[2], tokens[2], 40, 0, NULL, false}};
    assert_int_equal(cake_forward_batch(engine, bad, 2, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "exceed the batch"));
    bad[1].seq = seq[1];
    bad[0].n = bad[1].n = 4;
    assert_int_equal(cake_forward_batch(engine, bad, 2, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "twice"));
    const cake_token out_of_range = (cake_token)n_vocab;
    bad[1] = (cake_batch_seq){seq[2], &out_of_range, 1, 0, NULL, false};
    assert_int_equal(cake_forward_batch(engine, bad, 2, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "token id"));
    bad[1] = (cake_batch_seq){seq[2], tokens[2], 1, 128, NULL, false};
    assert_int_equal(cake_forward_batch(engine, bad, 2, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "exceed the context"));
    cake_model *other = NULL;
    assert_int_equal(cake_model_load(path, &other, err, sizeof(err)), 0);
    cake_context *foreign = batch_test_context(other, 1, 1);
    bad[1] = (cake_batch_seq){foreign, tokens[2], 1, 0, NULL, false};
    assert_int_equal(cake_forward_batch(engine, bad, 2, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not of the engine's model"));

    cake_context_free(foreign);
    cake_model_free(other);
    for (int i = 0; i < 3; i++) {
        cake_context_free(ref[i]);
        if (i) cake_context_free(seq[i]);
    }
    cake_context_free(engine);
    free(got);
    free(want);
    cake_model_free(m);
    unlink(path);
}

/* Every token's logits (a prompt's scoring): a sequence asking for them in
 * a batch beside another that wants its last token's gets, row by row, the
 * bits one-token passes give at each position; the other its own. */
static void test_all_logits(void **state) {
    (void)state;
    const char *path = make_tiny();
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    const int n_vocab = cake_model_hparams(m)->n_vocab;
    enum { N = 40, PIECE = 16 };
    cake_context *engine = batch_test_context(m, 2, 64), *other = batch_test_context(m, 1, 1),
                 *ref = batch_test_context(m, 2, 64);
    cake_token prompt[N], other_tokens[N];
    for (int t = 0; t < N; t++)
        prompt[t] = 3 + (cake_token)(t * 7919 % 900), other_tokens[t] = 5 + (cake_token)(t * 31);
    float *rows = malloc((size_t)N * n_vocab * sizeof(float));
    float *last = malloc((size_t)n_vocab * sizeof(float)), *want = malloc((size_t)n_vocab * 4);
    for (int pos = 0; pos < N; pos += PIECE) {
        const int n = N - pos < PIECE ? N - pos : PIECE;
        const cake_batch_seq b[2] = {
            {engine, prompt + pos, n, pos, rows + (size_t)pos * n_vocab, true},
            {other, other_tokens + pos, n, pos, last, false}};
        assert_int_equal(cake_forward_batch(engine, b, 2, err, sizeof(err)), 0);
    }
    for (int t = 0; t < N; t++) {
        assert_int_equal(cake_forward(ref, prompt + t, 1, t, want, err, sizeof(err)), 0);
        if (memcmp(rows + (size_t)t * n_vocab, want, (size_t)n_vocab * sizeof(float)))
            fail_msg("row %d of the scored prompt differs from its one-token pass", t);
    }
    assert_int_equal(cake_forward(ref, other_tokens, N, 0, want, err, sizeof(err)), 0);
    assert_memory_equal(last, want, (size_t)n_vocab * sizeof(float));
    free(rows);
    free(last);
    free(want);
    cake_context_free(ref);
    cake_context_free(other);
    cake_context_free(engine);
    cake_model_free(m);
    unlink(path);
}

/* ---- Llama 3.1's rope scaling ---- */

static void write_variant(const char *src, const char *dst, const test_model_variant *v) {
    char err[256];
    assert_int_equal(test_write_variant(src, dst, v, err, sizeof(err)), 0);
}

/* The 40 token ids the model tests below run. */
static void fixed_prompt(cake_token prompt[40]) {
    for (int i = 0; i < 40; i++) prompt[i] = 3 + (cake_token)(i * 7919 % 1000);
}

/* First-token logits of the fixed prompt on the model at path, and its
 * hyperparameters into *hp when hp is not NULL. */
static float *first_logits(const char *path, cake_hparams *hp) {
    cake_model *m = NULL;
    char err[512];
    int rc = cake_model_load(path, &m, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    if (hp) *hp = *cake_model_hparams(m);
    cake_token prompt[40];
    fixed_prompt(prompt);
    run_result r;
    run_greedy(m, prompt, 40, 1, 16, CAKE_KV_F32, 2, &r);
    cake_model_free(m);
    return r.logits;
}

/* rope_freqs.weight divides pair i's angle by factors[i] (llama.cpp's
 * freq_factors): all 2 must give linear scaling by 2 bit for bit, all 1 the
 * plain model, Llama 3.1-like factors something else. Bad factors are refused. */
static void test_rope_freqs(void **state) {
    (void)state;
    const char *base = make_tiny();
    char variant[96];
    snprintf(variant, sizeof(variant), "%s.variant", base);
    cake_model *m = NULL;
    char err[512];
    assert_int_equal(cake_model_load(base, &m, err, sizeof(err)), 0);
    const int half = cake_model_hparams(m)->head_dim / 2;
    const int n_vocab = cake_model_hparams(m)->n_vocab;
    cake_model_free(m);
    assert_true(half >= 4 && half <= 256);

    float twos[256], ones[256], llama31[256];
    for (int i = 0; i < half; i++) {
        twos[i] = 2.0f;
        ones[i] = 1.0f;
        llama31[i] = i < half / 4 ? 1.0f : i < half / 2 ? 1.0f + (float)i / half : 8.0f;
    }
    float *plain = first_logits(base, NULL);
    write_variant(base, variant, &(test_model_variant){.linear = 2.0f});
    float *linear2 = first_logits(variant, NULL);
    write_variant(base, variant, &(test_model_variant){.rope_factors = twos, .n_factors = half});
    float *factor2 = first_logits(variant, NULL);
    write_variant(base, variant, &(test_model_variant){.rope_factors = ones, .n_factors = half});
    float *factor1 = first_logits(variant, NULL);
    write_variant(base, variant, &(test_model_variant){.rope_factors = llama31, .n_factors = half});
    float *scaled = first_logits(variant, NULL);
    const size_t bytes = (size_t)n_vocab * sizeof(float);
    assert_memory_equal(factor2, linear2, bytes);
    assert_memory_equal(factor1, plain, bytes);
    assert_memory_not_equal(linear2, plain, bytes);
    assert_memory_not_equal(scaled, plain, bytes);
    assert_memory_not_equal(scaled, linear2, bytes);

    /* a zero factor, and one factor too few */
    twos[1] = 0.0f;
    write_variant(base, variant, &(test_model_variant){.rope_factors = twos, .n_factors = half});
    assert_int_equal(cake_model_load(variant, &m, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "rope_freqs.weight"));
    write_variant(base, variant,
                  &(test_model_variant){.rope_factors = ones, .n_factors = half - 1});
    assert_int_equal(cake_model_load(variant, &m, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "rope_freqs.weight"));

    free(plain);
    free(linear2);
    free(factor2);
    free(factor1);
    free(scaled);
    unlink(variant);
    unlink(base);
}

/* ---- qwen2: biases and NeoX RoPE ---- */

/* A qwen2 copy of a llama model (q/k rows in NeoX order, no biases) is the
 * same model: the same logits up to rounding (the attention's dot products
 * add a head's dimensions in the other order). */
static void test_qwen2_matches_llama(void **state) {
    (void)state;
    const char *base = make_tiny();
    char variant[96];
    snprintf(variant, sizeof(variant), "%s.qwen2", base);
    write_variant(base, variant, &(test_model_variant){.qwen2 = true});
    cake_model *m = NULL;
    char err[512];
    assert_int_equal(cake_model_load(variant, &m, err, sizeof(err)), 0);
    assert_true(cake_model_hparams(m)->rope_neox);
    assert_false(cake_model_hparams(m)->qkv_bias);
    const int n_vocab = cake_model_hparams(m)->n_vocab;
    cake_model_free(m);
    float *llama = first_logits(base, NULL), *qwen2 = first_logits(variant, NULL);
    const float d = max_rel_diff(llama, qwen2, n_vocab);
    printf("qwen2 copy vs llama: logits rel diff %.3g\n", d);
    assert_true(d <= 1e-5f);
    free(llama);
    free(qwen2);
    unlink(variant);
    unlink(base);
}

/* The model's tensors as f32, each converted once: F32, F16, and Q8_0 read
 * here from ggml's block layout (an f16 scale, then 32 int8; value d * q);
 * Q4_K, Q5_K and IQ4_XS through the decoder (test_dequant holds it to the
 * blocks' parts). */
typedef struct {
    const cake_gguf *g;
    const cake_gguf_tensor *t[512];
    float *f[512];
    int n;
    bool q8_0; /* the matrices are quantized: so are their inputs */
} ref_tensors;

/* Tensor `what` of layer `layer` (blk.N.what; layer < 0: what itself), or
 * NULL when absent. */
static const float *f32_tensor(ref_tensors *r, int layer, const char *what) {
    char name[96];
    if (layer < 0)
        snprintf(name, sizeof(name), "%s", what);
    else
        snprintf(name, sizeof(name), "blk.%d.%s", layer, what);
    const cake_gguf_tensor *t = cake_gguf_find_tensor(r->g, name);
    if (!t) return NULL;
    for (int i = 0; i < r->n; i++)
        if (r->t[i] == t) return r->f[i];
    size_t n = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) n *= t->ne[d];
    float *f = malloc(n * sizeof(float));
    assert_non_null(f);
    const uint8_t *b = t->data;
    const bool k_quant = cake_kquant_x16_for((int)t->type) != 0;
    if (k_quant) cake_dequant_to_f32((int)t->type, b, 0, f, n);
    for (size_t i = 0; !k_quant && i < n; i++) {
        uint16_t h;
        switch (t->type) {
        case CAKE_DTYPE_F32:
            memcpy(&f[i], b + 4 * i, 4);
            break;
        case CAKE_DTYPE_F16:
            memcpy(&h, b + 2 * i, 2);
            f[i] = cake_f16_to_f32(h);
            break;
        case CAKE_DTYPE_Q8_0:
            memcpy(&h, b + i / 32 * 34, 2);
            f[i] = cake_f16_to_f32(h) * (float)(int8_t)b[i / 32 * 34 + 2 + i % 32];
            break;
        default:
            fail_msg("tensor %s: dtype %d", name, (int)t->type);
        }
    }
    assert_true(r->n < 512);
    r->t[r->n] = t;
    r->f[r->n++] = f;
    return f;
}

/* Whether layer's tensor `what` is quantized (its inputs are rounded to 8
 * bits: ref_linear). */
static bool quantized(const cake_gguf *g, int layer, const char *what) {
    char name[96];
    snprintf(name, sizeof(name), "blk.%d.%s", layer, what);
    const int t = (int)cake_gguf_find_tensor(g, name)->type;
    return t != CAKE_DTYPE_F32 && t != CAKE_DTYPE_F16 && t != CAKE_DTYPE_BF16;
}

/* y = W x + b (W: n_out rows of n_in; b may be NULL), in double. With Q8_0
 * weights x is first rounded as llama.cpp rounds the activations it
 * multiplies them with: per block of 32, d = max |x| / 127, q = round(x / d)
 * (quantize_row_q8_0), x becomes q * d. */
static void ref_linear(double *y, const float *w, const float *b, const double *x, int n_in,
                       int n_out, bool q8_0) {
    double *xq = malloc((size_t)n_in * sizeof(double));
    assert_non_null(xq);
    for (int i = 0; i < n_in; i++) xq[i] = x[i];
    for (int k0 = 0; q8_0 && k0 < n_in; k0 += 32) {
        double amax = 0;
        for (int i = k0; i < k0 + 32; i++) amax = fmax(amax, fabs(x[i]));
        const double d = amax / 127;
        for (int i = k0; i < k0 + 32; i++) xq[i] = d > 0 ? nearbyint(x[i] / d) * d : 0;
    }
    for (int o = 0; o < n_out; o++) {
        double acc = b ? b[o] : 0;
        for (int i = 0; i < n_in; i++) acc += (double)w[(size_t)o * n_in + i] * xq[i];
        y[o] = acc;
    }
    free(xq);
}

static void ref_rmsnorm(double *y, const double *x, const float *w, int n, double eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const double s = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * s * w[i];
}

/* qwen3: each of the n_heads heads of v RMS-normed with w (NULL: none). */
static void ref_head_norms(double *v, const float *w, int n_heads, int hd, double eps) {
    for (int h = 0; w && h < n_heads; h++) ref_rmsnorm(v + h * hd, v + h * hd, w, hd, eps);
}

/* YaRN's parameters (factor 0: none). */
typedef struct {
    double factor, orig, beta_fast, beta_slow;
} ref_yarn;

/* ggml's rope_yarn_corr_dim: the dimension whose pair turns `turns` times
 * over the original context. */
static double ref_corr_dim(int n_rot, double orig, double turns, double base) {
    return n_rot * log(orig / (turns * 2 * M_PI)) / (2 * log(base));
}

/* Turns each head of x by position pos: pairs (2i, 2i+1), or (i, i + hd/2)
 * when neox; with YaRN, ggml's rope_yarn's angle (the interpolated and the
 * extrapolated angle mixed by its ramp over the corrected dimensions). */
static void ref_rope(double *x, int n_heads, int hd, int n_rot, double pos, double theta, bool neox,
                     const ref_yarn *y) {
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < n_rot / 2; i++) {
            double a = pos * pow(theta, -2.0 * i / n_rot);
            if (y && y->factor) {
                const double low =
                    fmax(0, floor(ref_corr_dim(n_rot, y->orig, y->beta_fast, theta)));
                const double high =
                    fmin(n_rot - 1, ceil(ref_corr_dim(n_rot, y->orig, y->beta_slow, theta)));
                const double mix = 1 - fmin(1, fmax(0, (i - low) / fmax(0.001, high - low)));
                a = a / y->factor * (1 - mix) + a * mix;
            }
            double *p0 = x + h * hd + (neox ? i : 2 * i), *p1 = neox ? p0 + n_rot / 2 : p0 + 1;
            const double x0 = *p0, x1 = *p1;
            *p0 = x0 * cos(a) - x1 * sin(a);
            *p1 = x0 * sin(a) + x1 * cos(a);
        }
}

/* The last position's logits of a llama/qwen2 model at path, computed
 * plainly in double from the formulas (llama.cpp's llm_build_llama and
 * llm_build_qwen2): a reference written apart from the engine. */
static double *reference_logits(const char *path, const cake_token *prompt, int n) {
    cake_gguf *g = NULL;
    char err[256];
    assert_int_equal(cake_gguf_open(path, &g, err, sizeof(err)), 0);
    cake_gguf_str arch;
    assert_int_equal(cake_gguf_get_str(g, "general.architecture", &arch, err, sizeof(err)), 0);
    const bool gemma3 = arch.len == 6 && !memcmp(arch.ptr, "gemma3", 6),
               gemma2 = arch.len == 6 && !memcmp(arch.ptr, "gemma2", 6), gemma = gemma2 || gemma3;
    /* qwen2, qwen3(moe), gemma2, gemma3 */
    const bool neox = (arch.len >= 5 && !memcmp(arch.ptr, "qwen", 4)) || gemma;
    float attn_factor = 1.0f; /* LongRoPE's: the scores scale by its square */
    ref_tensors w = {.g = g};
    const int wq_type = (int)cake_gguf_find_tensor(g, "blk.0.attn_q.weight")->type;
    w.q8_0 = wq_type == CAKE_DTYPE_Q8_0 || cake_kquant_x16_for(wq_type);
    char key[96];
    uint32_t dim, n_layers, nh, nkv, ffn;
    float theta = 10000.0f;
#define KEY(s) (snprintf(key, sizeof(key), "%.*s.%s", (int)arch.len, arch.ptr, s), key)
    assert_int_equal(cake_gguf_get_u32(g, KEY("embedding_length"), &dim, err, sizeof(err)), 0);
    assert_int_equal(cake_gguf_get_u32(g, KEY("block_count"), &n_layers, err, sizeof(err)), 0);
    assert_int_equal(cake_gguf_get_u32(g, KEY("attention.head_count"), &nh, err, sizeof(err)), 0);
    assert_int_equal(cake_gguf_get_u32(g, KEY("attention.head_count_kv"), &nkv, err, sizeof(err)),
                     0);
    assert_int_equal(cake_gguf_get_u32(g, KEY("feed_forward_length"), &ffn, err, sizeof(err)), 0);
    cake_gguf_get_f32(g, KEY("rope.freq_base"), &theta, err, sizeof(err));
    uint32_t key_length = dim / nh; /* a head's width: the file's key_length, else dim / nh */
    cake_gguf_get_u32(g, KEY("attention.key_length"), &key_length, err, sizeof(err));
    uint32_t rope_dims = key_length; /* partial RoPE: the first rope_dims of a head */
    cake_gguf_get_u32(g, KEY("rope.dimension_count"), &rope_dims, err, sizeof(err));
    uint32_t n_exp = 0, n_used = 0; /* experts: their width may have a key of its own */
    cake_gguf_get_u32(g, KEY("expert_count"), &n_exp, err, sizeof(err));
    cake_gguf_get_u32(g, KEY("expert_used_count"), &n_used, err, sizeof(err));
    uint32_t shared = 0; /* qwen2moe's shared expert (as wide as the dense FFN unless told) */
    if (arch.len == 8 && !memcmp(arch.ptr, "qwen2moe", 8)) {
        shared = ffn;
        cake_gguf_get_u32(g, KEY("expert_shared_feed_forward_length"), &shared, err, sizeof(err));
    }
    cake_gguf_get_u32(g, KEY("expert_feed_forward_length"), &ffn, err, sizeof(err));
    cake_gguf_get_f32(g, KEY("rope.scaling.attn_factor"), &attn_factor, err, sizeof(err));
    /* YaRN (transformers' formulas): its ramp in ref_rope, its magnitude on
     * the scores as LongRoPE's attn_factor; Ministral 3's temperature */
    ref_yarn yarn = {0, 0, 32, 1};
    cake_gguf_str scaling = {0};
    float yarn_factor = 0, log_mul = 0, temperature = 0;
    uint32_t orig = 0;
    if (cake_gguf_get_str(g, KEY("rope.scaling.type"), &scaling, err, sizeof(err)) == 0 &&
        scaling.len == 4 && !memcmp(scaling.ptr, "yarn", 4)) {
        assert_int_equal(
            cake_gguf_get_f32(g, KEY("rope.scaling.factor"), &yarn_factor, err, sizeof(err)), 0);
        assert_int_equal(cake_gguf_get_u32(g, KEY("rope.scaling.original_context_length"), &orig,
                                           err, sizeof(err)),
                         0);
        cake_gguf_get_f32(g, KEY("rope.scaling.yarn_log_multiplier"), &log_mul, err, sizeof(err));
        yarn.factor = yarn_factor;
        yarn.orig = orig;
        const double mscale = 0.1 * log(yarn_factor) + 1;
        attn_factor = (float)(log_mul ? mscale / (0.1 * log_mul * log(yarn_factor) + 1) : mscale);
    }
    cake_gguf_get_f32(g, KEY("attention.temperature_scale"), &temperature, err, sizeof(err));
    const double temperature_length = orig;
    /* Gemma 3: a window on five layers in six, which turn RoPE at theta
     * 10000 unscaled; the others at the file's base, linearly scaled */
    uint32_t window = 0;
    float linear = 1.0f;
    cake_gguf_get_u32(g, KEY("attention.sliding_window"), &window, err, sizeof(err));
    cake_gguf_get_f32(g, KEY("rope.scaling.factor"), &linear, err, sizeof(err));
    /* Gemma 2: every even layer windowed, scores and logits soft-capped */
    float attn_cap = 50.0f, logit_cap = 30.0f;
    cake_gguf_get_f32(g, KEY("attn_logit_softcapping"), &attn_cap, err, sizeof(err));
    cake_gguf_get_f32(g, KEY("final_logit_softcapping"), &logit_cap, err, sizeof(err));
    /* Granite: embeddings, scores (in place of 1/sqrt(hd)), the residual
     * branches and (divided) the logits scaled */
    float emb_scale = gemma ? sqrtf((float)dim) : 1.0f, attn_scale = 0, res_scale = 1,
          logit_scale = 1;
    if (arch.len >= 7 && !memcmp(arch.ptr, "granite", 7)) {
        cake_gguf_get_f32(g, KEY("embedding_scale"), &emb_scale, err, sizeof(err));
        cake_gguf_get_f32(g, KEY("attention.scale"), &attn_scale, err, sizeof(err));
        cake_gguf_get_f32(g, KEY("residual_scale"), &res_scale, err, sizeof(err));
        cake_gguf_get_f32(g, KEY("logit_scale"), &logit_scale, err, sizeof(err));
    }
#undef KEY
    const int hd = (int)key_length, n_rot = (int)rope_dims, qd = (int)nh * hd, kvd = (int)nkv * hd,
              nv = (int)cake_gguf_find_tensor(g, "token_embd.weight")->ne[1];
    const double eps = 1e-5;
    double *x = calloc((size_t)n * dim, sizeof(double)), *xn = malloc(dim * sizeof(double));
    double *q = malloc(qd * sizeof(double)), *o = malloc(qd * sizeof(double));
    double *k = malloc((size_t)n * kvd * sizeof(double)),
           *v = malloc((size_t)n * kvd * sizeof(double));
    const uint32_t wide = ffn > shared ? ffn : shared;
    double *gate = malloc(wide * sizeof(double)), *up = malloc(wide * sizeof(double)),
           *tmp = malloc((dim > wide ? dim : wide) * sizeof(double));
    double *sc = malloc((size_t)n * sizeof(double));
    const float *embd = f32_tensor(&w, -1, "token_embd.weight");
    for (int t = 0; t < n; t++)
        for (uint32_t i = 0; i < dim; i++)
            x[(size_t)t * dim + i] =
                embd[(size_t)prompt[t] * dim + i] * (gemma ? sqrt((double)dim) : emb_scale);
    for (uint32_t l = 0; l < n_layers; l++) {
        const int L = (int)l;
        const bool local = window && ((gemma3 && l % 6 < 5) || (gemma2 && l % 2 == 0));
        const double l_theta = local && gemma3 ? 10000.0 : theta,
                     l_scale = (local && gemma3) || !gemma ? 1.0 : 1.0 / linear;
        for (int t = 0; t < n; t++) { /* keys and values of every position first */
            ref_rmsnorm(xn, x + (size_t)t * dim, f32_tensor(&w, L, "attn_norm.weight"), dim, eps);
            ref_linear(k + (size_t)t * kvd, f32_tensor(&w, L, "attn_k.weight"),
                       f32_tensor(&w, L, "attn_k.bias"), xn, dim, kvd, w.q8_0);
            ref_linear(v + (size_t)t * kvd, f32_tensor(&w, L, "attn_v.weight"),
                       f32_tensor(&w, L, "attn_v.bias"), xn, dim, kvd, w.q8_0);
            ref_head_norms(k + (size_t)t * kvd, f32_tensor(&w, L, "attn_k_norm.weight"), (int)nkv,
                           hd, eps);
            ref_rope(k + (size_t)t * kvd, (int)nkv, hd, n_rot, t * l_scale, l_theta, neox, &yarn);
        }
        for (int t = 0; t < n; t++) {
            double *xt = x + (size_t)t * dim;
            ref_rmsnorm(xn, xt, f32_tensor(&w, L, "attn_norm.weight"), dim, eps);
            ref_linear(q, f32_tensor(&w, L, "attn_q.weight"), f32_tensor(&w, L, "attn_q.bias"), xn,
                       dim, qd, w.q8_0);
            ref_head_norms(q, f32_tensor(&w, L, "attn_q_norm.weight"), (int)nh, hd, eps);
            ref_rope(q, (int)nh, hd, n_rot, t * l_scale, l_theta, neox, &yarn);
            /* Ministral 3's temperature, after RoPE */
            const double ts =
                temperature ? 1 + temperature * log(1 + floor((double)t / temperature_length)) : 1;
            for (int i = 0; i < qd; i++) q[i] *= ts;
            const int j0 = local && t - (int)window + 1 > 0 ? t - (int)window + 1 : 0;
            for (int h = 0; h < (int)nh; h++) {
                const int kh = h / (int)(nh / nkv);
                double mx = -1e300, sum = 0;
                for (int j = j0; j <= t; j++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++)
                        d += q[h * hd + i] * k[(size_t)j * kvd + kh * hd + i];
                    sc[j] =
                        (attn_scale ? d * attn_scale : d / sqrt(hd)) * attn_factor * attn_factor;
                    if (gemma2) sc[j] = attn_cap * tanh(sc[j] / attn_cap);
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = j0; j <= t; j++) sum += sc[j] = exp(sc[j] - mx);
                for (int i = 0; i < hd; i++) {
                    double acc = 0;
                    for (int j = j0; j <= t; j++) acc += sc[j] * v[(size_t)j * kvd + kh * hd + i];
                    o[h * hd + i] = acc / sum;
                }
            }
            ref_linear(tmp, f32_tensor(&w, L, "attn_output.weight"), NULL, o, qd, dim, w.q8_0);
            const float *post = f32_tensor(&w, L, "post_attention_norm.weight");
            if (post) ref_rmsnorm(tmp, tmp, post, dim, eps);
            for (uint32_t i = 0; i < dim; i++) xt[i] += res_scale * tmp[i];
        }
        for (int t = 0; t < n; t++) {
            double *xt = x + (size_t)t * dim;
            ref_rmsnorm(xn, xt, f32_tensor(&w, L, "ffn_norm.weight"), dim, eps);
            if (!n_exp) {
                ref_linear(gate, f32_tensor(&w, L, "ffn_gate.weight"), NULL, xn, dim, ffn, w.q8_0);
                ref_linear(up, f32_tensor(&w, L, "ffn_up.weight"), NULL, xn, dim, ffn, w.q8_0);
                for (uint32_t i = 0; i < ffn; i++) /* GELU's tanh form for Gemma */
                    gate[i] = gemma ? 0.5 * gate[i] *
                                          (1 + tanh(sqrt(2 / M_PI) *
                                                    (gate[i] + 0.044715 * pow(gate[i], 3)))) *
                                          up[i]
                                    : gate[i] / (1 + exp(-gate[i])) * up[i];
                ref_linear(tmp, f32_tensor(&w, L, "ffn_down.weight"), NULL, gate, ffn, dim, w.q8_0);
                const float *post = f32_tensor(&w, L, "post_ffw_norm.weight");
                if (post) ref_rmsnorm(tmp, tmp, post, dim, eps);
                for (uint32_t i = 0; i < dim; i++) xt[i] += res_scale * tmp[i];
                continue;
            }
            /* experts (llama.cpp's build_moe_ffn, softmax gating, weights
             * normalized but in qwen2moe): the router (f32) picks the
             * n_used likeliest */
            double prob[64], picked = 0;
            int pick[64];
            assert_true(n_exp <= 64);
            ref_linear(prob, f32_tensor(&w, L, "ffn_gate_inp.weight"), NULL, xn, dim, n_exp, false);
            double sum_all = 0;
            for (uint32_t e = 0; e < n_exp; e++) sum_all += prob[e] = exp(prob[e]);
            for (uint32_t u = 0; u < n_used; u++) {
                pick[u] = -1;
                for (int e = 0; e < (int)n_exp; e++) {
                    bool taken = false;
                    for (uint32_t j = 0; j < u; j++) taken |= pick[j] == e;
                    if (!taken && (pick[u] < 0 || prob[e] > prob[pick[u]])) pick[u] = e;
                }
                picked += prob[pick[u]];
            }
            const size_t mat = (size_t)ffn * dim; /* an expert's matrix */
            for (uint32_t u = 0; u < n_used; u++) {
                const size_t e = (size_t)pick[u];
                ref_linear(gate, f32_tensor(&w, L, "ffn_gate_exps.weight") + e * mat, NULL, xn, dim,
                           ffn, quantized(g, L, "ffn_gate_exps.weight"));
                ref_linear(up, f32_tensor(&w, L, "ffn_up_exps.weight") + e * mat, NULL, xn, dim,
                           ffn, quantized(g, L, "ffn_up_exps.weight"));
                for (uint32_t i = 0; i < ffn; i++) gate[i] = gate[i] / (1 + exp(-gate[i])) * up[i];
                ref_linear(tmp, f32_tensor(&w, L, "ffn_down_exps.weight") + e * mat, NULL, gate,
                           ffn, dim, quantized(g, L, "ffn_down_exps.weight"));
                for (uint32_t i = 0; i < dim; i++)
                    xt[i] += res_scale * prob[e] / (shared ? sum_all : picked) * tmp[i];
            }
            if (!shared) continue;
            /* qwen2moe's shared expert, times sigmoid(xn . gate_inp_shexp) */
            const float *sg = f32_tensor(&w, L, "ffn_gate_inp_shexp.weight");
            double s = 0;
            for (uint32_t i = 0; i < dim; i++) s += xn[i] * sg[i];
            s = 1 / (1 + exp(-s));
            ref_linear(gate, f32_tensor(&w, L, "ffn_gate_shexp.weight"), NULL, xn, dim, shared,
                       w.q8_0);
            ref_linear(up, f32_tensor(&w, L, "ffn_up_shexp.weight"), NULL, xn, dim, shared, w.q8_0);
            for (uint32_t i = 0; i < shared; i++) gate[i] = gate[i] / (1 + exp(-gate[i])) * up[i];
            ref_linear(tmp, f32_tensor(&w, L, "ffn_down_shexp.weight"), NULL, gate, shared, dim,
                       w.q8_0);
            for (uint32_t i = 0; i < dim; i++) xt[i] += s * tmp[i];
        }
    }
    ref_rmsnorm(xn, x + (size_t)(n - 1) * dim, f32_tensor(&w, -1, "output_norm.weight"), dim, eps);
    double *logits = malloc((size_t)nv * sizeof(double));
    const float *out = f32_tensor(&w, -1, "output.weight");
    ref_linear(logits, out ? out : embd, NULL, xn, dim, nv, w.q8_0);
    for (int i = 0; i < nv; i++) logits[i] /= logit_scale;
    for (int i = 0; gemma2 && i < nv; i++) logits[i] = logit_cap * tanh(logits[i] / logit_cap);
    free(x);
    free(xn);
    free(q);
    free(o);
    free(k);
    free(v);
    free(gate);
    free(up);
    free(tmp);
    free(sc);
    for (int i = 0; i < w.n; i++) free(w.f[i]);
    cake_gguf_close(g);
    return logits;
}

/* Largest |a - ref| over the vector, relative to its largest |ref|. */
static double rel_to_ref(const float *a, const double *ref, int n) {
    double scale = 0, d = 0;
    for (int i = 0; i < n; i++) scale = fmax(scale, fabs(ref[i]));
    for (int i = 0; i < n; i++) d = fmax(d, fabs(a[i] - ref[i]));
    return d / scale;
}

/* The engine's first-token logits of the fixed prompt on the model at path,
 * checked against the reference (1e-5 relative); hyperparameters into *hp. */
static float *check_vs_reference(const char *path, const char *what, cake_hparams *hp) {
    float *got = first_logits(path, hp);
    cake_token prompt[40];
    fixed_prompt(prompt);
    double *ref = reference_logits(path, prompt, 40);
    const double d = rel_to_ref(got, ref, hp->n_vocab);
    printf("%s: logits vs the reference: %.3g (tolerance 1e-5)\n", what, d);
    assert_true(d <= 1e-5);
    free(ref);
    return got;
}

/* The engine against the reference: the llama model (checks the reference),
 * and its qwen2 copy with q/k/v biases. */
static void test_qwen2_reference(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64];
    assert_int_equal(test_make_model("tiny", "f32", base), 0);
    char variant[96];
    snprintf(variant, sizeof(variant), "%s.qwen2", base);
    write_variant(base, variant, &(test_model_variant){.qwen2 = true, .bias = 0.05f});

    const char *paths[] = {base, variant};
    float *got[2];
    for (int k = 0; k < 2; k++) {
        cake_hparams hp;
        got[k] = check_vs_reference(paths[k], k ? "qwen2 with biases" : "llama", &hp);
        assert_int_equal(hp.qkv_bias, k == 1);
    }
    /* the biases matter */
    assert_memory_not_equal(got[0], got[1], 1000 * sizeof(float));
    free(got[0]);
    free(got[1]);
    unlink(variant);
    unlink(base);
}

/* qwen3 (qwen2's layout without biases, plus an RMSNorm of each q and k
 * head before RoPE): the engine against the reference, the norms matter,
 * and chunked prefill matches one-shot; on heads of dim / heads and on
 * wider ones (tiny-wide: q twice as wide as x, as Qwen3 0.6B's). */
static void check_qwen3(const char *shape) {
    char base[64], qwen2[96], qwen3[96];
    assert_int_equal(test_make_model(shape, "f32", base), 0);
    snprintf(qwen2, sizeof(qwen2), "%s.qwen2", base);
    snprintf(qwen3, sizeof(qwen3), "%s.qwen3", base);
    write_variant(base, qwen2, &(test_model_variant){.qwen2 = true});
    write_variant(base, qwen3, &(test_model_variant){.qwen2 = true, .qk_norm = 0.2f});
    cake_hparams hp;
    float *plain = first_logits(qwen2, NULL), *got = check_vs_reference(qwen3, shape, &hp);
    assert_true(hp.qk_norm && hp.rope_neox && !hp.qkv_bias);
    assert_int_equal(hp.q_dim, hp.n_heads * hp.head_dim);
    assert_memory_not_equal(plain, got, 1000 * sizeof(float));
    check_file_chunk_invariance(qwen3, 100, 4);
    free(plain);
    free(got);
    unlink(qwen3);
    unlink(qwen2);
    unlink(base);
}

static void test_qwen3_reference(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    check_qwen3("tiny");
    check_qwen3("tiny-wide");
}

/* Heads wider than dim / heads (attention.key_length; Qwen3 0.6B, 4B, 32B
 * have them): q and the attention output are wider than x. The engine
 * against the reference, and chunked prefill. */
static void test_wide_heads(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny-wide", "f32", path), 0);
    cake_hparams hp;
    free(check_vs_reference(path, "tiny-wide", &hp));
    assert_int_equal(hp.head_dim, 32);
    assert_int_equal(hp.q_dim, 2 * hp.dim);
    check_file_chunk_invariance(path, 100, 4);
    unlink(path);
}

/* A CUDA context for m is refused (in any build: before the backend is
 * looked for) with a message that has `why` in it. */
static void assert_cuda_refuses(const cake_model *m, const char *why) {
    cake_context_params cp = cake_context_default_params();
    cp.backend = CAKE_BACKEND_CUDA;
    cake_context *c = NULL;
    char err[256];
    assert_int_equal(cake_context_init(m, cp, &c, err, sizeof(err)), -1);
    printf("CUDA backend: %s\n", err);
    assert_non_null(strstr(err, why));
}

/* Mixtures of experts: a llama file with experts (Mixtral's layout, `cake
 * mkmodel --shape tiny-moe`: 8 experts, 2 a token), its qwen3moe copy (q/k
 * norms, NeoX RoPE, the experts' width under its own key) and its Q8_0 twin
 * against the reference, which picks each token's experts apart from the
 * engine; a token's bits do not depend on the chunk it is computed in (the
 * tokens grouped by expert differ); the CUDA backend refuses the model. */
static void test_experts(void **state) {
    (void)state;
    char base[64], q8[64], qwen[96];
    assert_int_equal(test_make_model("tiny-moe", "f32", base), 0);
    assert_int_equal(test_make_model("tiny-moe", "q8_0", q8), 0);
    snprintf(qwen, sizeof(qwen), "%s.qwen3moe", base);
    write_variant(base, qwen, &(test_model_variant){.qwen2 = true, .qk_norm = 0.2f});
    cake_hparams hp;
    float *plain = check_vs_reference(base, "tiny-moe", &hp);
    assert_int_equal(hp.n_experts, 8);
    assert_int_equal(hp.n_experts_used, 2);
    assert_int_equal(hp.ffn_dim, 96);
    assert_true(hp.experts_norm);
    float *qwen_logits = check_vs_reference(qwen, "qwen3moe", &hp);
    assert_true(hp.qk_norm && hp.rope_neox && hp.n_experts == 8 && hp.ffn_dim == 96);
    assert_memory_not_equal(plain, qwen_logits, 1000 * sizeof(float));
    free(check_vs_reference(q8, "tiny-moe q8_0", &hp));
    /* the experts one tensor each (older Mixtral files): the same model */
    char split[96];
    snprintf(split, sizeof(split), "%s.split", q8);
    write_variant(q8, split, &(test_model_variant){.split_experts = true});
    float *q8_logits = first_logits(q8, NULL), *split_logits = first_logits(split, &hp);
    assert_int_equal(hp.n_experts, 8);
    assert_memory_equal(q8_logits, split_logits, (size_t)hp.n_vocab * sizeof(float));
    free(q8_logits);
    free(split_logits);
    unlink(split);
    check_file_chunk_invariance(base, 100, 4);
    check_file_chunk_invariance(qwen, 100, 4);
    check_file_chunk_invariance(q8, 100, 4);

    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(base, &m, err, sizeof(err)), 0);
    assert_cuda_refuses(m, "mixture-of-experts");
    cake_model_free(m);
    free(plain);
    free(qwen_logits);
    unlink(qwen);
    unlink(q8);
    unlink(base);
}

static int shared_q8_0(const char *name, int type) {
    return strstr(name, "shexp") ? CAKE_DTYPE_Q8_0 : type;
}

/* qwen2moe (Qwen1.5-MoE, Qwen2-57B-A14B): qwen2's attention (biases, NeoX
 * RoPE), experts whose weights are the router's probabilities as they are
 * (not scaled to sum to 1), and a shared expert every token goes through,
 * scaled by sigmoid(x . gate): copies of tiny-moe (f32, and Q8_0 with the
 * shared expert Q8_0 too) against the reference; chunk invariance; the
 * CUDA backend refuses. */
static void test_qwen2moe(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], q8[64], qwen[96], qwen_q8[96];
    assert_int_equal(test_make_model("tiny-moe", "f32", base), 0);
    assert_int_equal(test_make_model("tiny-moe", "q8_0", q8), 0);
    snprintf(qwen, sizeof(qwen), "%s.qwen2moe", base);
    snprintf(qwen_q8, sizeof(qwen_q8), "%s.qwen2moe", q8);
    write_variant(base, qwen,
                  &(test_model_variant){.qwen2 = true, .bias = 0.05f, .shared_expert = 160});
    write_variant(q8, qwen_q8,
                  &(test_model_variant){
                      .qwen2 = true, .bias = 0.05f, .shared_expert = 64, .retype = shared_q8_0});
    cake_hparams hp;
    free(check_vs_reference(qwen, "qwen2moe", &hp));
    assert_true(hp.n_experts == 8 && hp.ffn_dim == 96 && hp.shared_ffn_dim == 160);
    assert_true(!hp.experts_norm && hp.rope_neox && hp.qkv_bias);
    free(check_vs_reference(qwen_q8, "qwen2moe q8_0", &hp));
    assert_int_equal(hp.shared_ffn_dim, 64);
    check_file_chunk_invariance(qwen, 100, 4);
    check_file_chunk_invariance(qwen_q8, 100, 4);
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(qwen, &m, err, sizeof(err)), 0);
    assert_cuda_refuses(m, "mixture-of-experts");
    cake_model_free(m);
    unlink(qwen);
    unlink(qwen_q8);
    unlink(q8);
    unlink(base);
}

/* granite and granitemoe (IBM Granite 3): llama's layers (and experts)
 * with the embeddings, the scores (in place of 1/sqrt(head_dim)), the
 * residual branches and the logits scaled: copies of tiny (f32, Q8_0) and
 * tiny-moe with Granite 3 8B's scales but the score's against the
 * reference; each scale matters; chunk invariance; the CUDA backend
 * refuses. */
static void test_granite(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], q8[64], moe[64];
    assert_int_equal(test_make_model("tiny", "f32", base), 0);
    assert_int_equal(test_make_model("tiny", "q8_0", q8), 0);
    assert_int_equal(test_make_model("tiny-moe", "f32", moe), 0);
    const test_model_variant granite = {.granite = true,
                                        .embedding_scale = 12.0f,
                                        .attention_scale = 0.125f,
                                        .residual_scale = 0.22f,
                                        .logit_scale = 16.0f};
    const char *src[] = {base, q8, moe};
    char path[3][96];
    float *got[3];
    cake_hparams hp;
    for (int k = 0; k < 3; k++) {
        snprintf(path[k], sizeof(path[k]), "%s.granite", src[k]);
        write_variant(src[k], path[k], &granite);
        got[k] = check_vs_reference(path[k],
                                    k == 0   ? "granite"
                                    : k == 1 ? "granite q8_0"
                                             : "granitemoe",
                                    &hp);
        assert_true(hp.embed_scale == 12.0f && hp.residual_scale == 0.22f &&
                    hp.logit_scale == 16.0f && !hp.rope_neox);
        assert_float_equal(hp.q_scale, 0.125f * 4.0f, 1e-7); /* tiny's heads are 16 wide */
        assert_int_equal(hp.n_experts, k == 2 ? 8 : 0);
        check_file_chunk_invariance(path[k], 100, 4);
    }
    assert_true(hp.experts_norm);
    /* each scale matters: the plain model, and one scale at a time back to 1 */
    float *plain = first_logits(base, &hp);
    assert_true(max_rel_diff(plain, got[0], hp.n_vocab) > 0.01);
    for (int k = 0; k < 4; k++) {
        test_model_variant one = granite;
        float *scale[] = {&one.embedding_scale, &one.attention_scale, &one.residual_scale,
                          &one.logit_scale};
        *scale[k] = k == 1 ? 0.25f : 1.0f; /* (1/sqrt(16): the default score scale) */
        char other[112];
        snprintf(other, sizeof(other), "%s.one", path[0]);
        write_variant(base, other, &one);
        float *l = first_logits(other, &hp);
        const double d = max_rel_diff(l, got[0], hp.n_vocab);
        printf("granite: scale %d left out: %.3g\n", k, d);
        assert_true(d > 0.01);
        free(l);
        unlink(other);
    }
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(path[0], &m, err, sizeof(err)), 0);
    assert_cuda_refuses(m, "Granite");
    cake_model_free(m);
    /* an attention output bias (llama.cpp takes one where a file has it):
     * refused, not left out */
    char biased[112];
    snprintf(biased, sizeof(biased), "%s.bias", path[0]);
    test_model_variant with_bias = granite;
    with_bias.extra_vector = "blk.1.attn_output.bias";
    write_variant(base, biased, &with_bias);
    assert_int_equal(cake_model_load(biased, &m, err, sizeof(err)), -1);
    printf("granite with an output bias: %s\n", err);
    assert_non_null(strstr(err, "blk.1.attn_output.bias"));
    unlink(biased);
    free(plain);
    for (int k = 0; k < 3; k++) {
        free(got[k]);
        unlink(path[k]);
        unlink(src[k]);
    }
}

/* phi3 (Phi-3, Phi-3.5, Phi-4): qwen2's layer without biases, q/k/v in one
 * tensor (q's rows, k's, v's) and gate/up in one (gate's first). A phi3
 * copy gives its qwen2 twin's logits bit for bit, so does one with
 * LongRoPE's factors the twin with rope_freqs.weight holding the long ones
 * (a context longer than original_context) or the short ones (not
 * longer); attn_factor scales the scores by its square (the reference
 * holds the twin with it); a sliding window applies. */
static void test_phi3(void **state);

/* Ministral 3 (mistral3): llama's layers with YaRN and Llama 4's attention
 * temperature. A plain mistral3 copy is the llama model; with YaRN and the
 * temperature (over a context of 32 and from position 32: the fixed
 * prompt's last positions are scaled) the engine matches the reference,
 * whose YaRN is written as ggml's rope_yarn (the engine's as
 * transformers'), with the magnitude 1 (yarn_log_multiplier 1, as
 * llama.cpp's Ministral 3 files) and without (get_mscale(factor), the plain
 * YaRN of Qwen's files); each part changes the logits; chunked prefill
 * gives the same bits. YaRN's frequencies for Ministral 3's own parameters
 * (theta 1e6, factor 16 over 16384, betas 32 and 1) at a head of 16 are
 * transformers' formula's, computed apart (Python, float64: low 2, high
 * 5). */
static void test_mistral3(void **state) {
    (void)state;
    const char *base = make_tiny();
    char path[96];
    snprintf(path, sizeof(path), "%s.mistral3", base);
    cake_hparams hp;
    cake_model *m = NULL;
    char err[512];
    float *plain = first_logits(base, &hp);
    const size_t bytes = (size_t)hp.n_vocab * sizeof(float);
    write_variant(base, path, &(test_model_variant){.mistral3 = true});
    float *same = first_logits(path, &hp);
    assert_memory_equal(same, plain, bytes);
    assert_false(hp.rope_neox);
    const test_model_variant both = {.mistral3 = true,
                                     .yarn = 4,
                                     .original_context = 32,
                                     .yarn_log_mul = 1,
                                     .temperature = 0.5f};
    write_variant(base, path, &both);
    float *full = check_vs_reference(path, "mistral3, YaRN and temperature", &hp);
    assert_true(hp.rope_yarn_factor == 4 && hp.rope_yarn_orig_ctx == 32);
    assert_true(hp.rope_attn_factor == 1.0f && hp.attn_temp_scale == 0.5f);
    assert_int_equal(hp.attn_temp_length, 32);
    check_file_chunk_invariance(path, 100, 4);
    test_model_variant v = both;
    v.temperature = 0;
    write_variant(base, path, &v);
    float *yarn_only = check_vs_reference(path, "mistral3, YaRN", &hp);
    v.yarn_log_mul = 0;
    write_variant(base, path, &v);
    float *magnitude = check_vs_reference(path, "mistral3, YaRN's magnitude", &hp);
    assert_true(fabsf(hp.rope_attn_factor - (float)(0.1 * log(4.0) + 1)) < 1e-6f);
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    assert_cuda_refuses(m, "RoPE scaling's factor");
    cake_model_free(m);
    write_variant(base, path, &both);
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    assert_cuda_refuses(m, "attention temperature");
    cake_model_free(m);
    assert_memory_not_equal(full, yarn_only, bytes);
    assert_memory_not_equal(yarn_only, plain, bytes);
    assert_memory_not_equal(magnitude, yarn_only, bytes);

    static const double want[8] = {1,
                                   0.17782794100389226,
                                   0.031622776601683791,
                                   0.0038660966106836502,
                                   0.00037500000000000006,
                                   1.1114246312743267e-05,
                                   1.9764235376052372e-06,
                                   3.514633282439682e-07};
    write_variant(base, path,
                  &(test_model_variant){.mistral3 = true,
                                        .yarn = 16,
                                        .original_context = 16384,
                                        .yarn_log_mul = 1,
                                        .rope_base = 1e6f});
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    assert_int_equal(m->hp.rope_dims, 16);
    for (int i = 0; i < 8; i++)
        if (fabs(m->rope_freqs[i] - want[i]) > 1e-12 * want[i])
            fail_msg("pair %d: %.17g, want %.17g", i, m->rope_freqs[i], want[i]);
    cake_model_free(m);
    /* a magnitude that would overflow q: refused, by its key's name */
    write_variant(base, path, &(test_model_variant){.mistral3 = true, .attn_factor = 1e30f});
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "rope.scaling.attn_factor"));
    free(plain);
    free(same);
    free(full);
    free(yarn_only);
    free(magnitude);
    unlink(path);
}

static void test_phi3(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], twin[96], phi3[96];
    assert_int_equal(test_make_model("tiny", "f32", base), 0);
    snprintf(twin, sizeof(twin), "%s.qwen2", base);
    snprintf(phi3, sizeof(phi3), "%s.phi3", base);
    float longf[8], shortf[8]; /* tiny's heads are 16 wide: 8 pairs */
    for (int i = 0; i < 8; i++) longf[i] = 1.0f + (float)i, shortf[i] = 1.0f + 0.25f * (float)i;
    static const struct {
        uint32_t original; /* 0: no LongRoPE */
        int which;         /* the twin's factors: 0 none, 1 long, 2 short */
        float attn_factor;
    } cases[] = {{0, 0, 0}, {1024, 1, 0}, {4096, 2, 0}, {0, 0, 1.25f}};
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        const float *twin_factors = cases[k].which == 1   ? longf
                                    : cases[k].which == 2 ? shortf
                                                          : NULL;
        write_variant(base, twin,
                      &(test_model_variant){.qwen2 = true,
                                            .rope_factors = twin_factors,
                                            .n_factors = 8,
                                            .attn_factor = cases[k].attn_factor});
        write_variant(base, phi3,
                      &(test_model_variant){.qwen2 = true,
                                            .phi3 = true,
                                            .long_factors = cases[k].original ? longf : NULL,
                                            .short_factors = shortf,
                                            .n_factors = 8,
                                            .original_context = cases[k].original,
                                            .attn_factor = cases[k].attn_factor});
        cake_hparams hp;
        float *want = cases[k].attn_factor != 0
                          ? check_vs_reference(twin, "qwen2, attn_factor", &hp)
                          : first_logits(twin, &hp);
        float *got = first_logits(phi3, &hp);
        printf("phi3 case %zu: %s\n", k,
               memcmp(got, want, (size_t)hp.n_vocab * sizeof(float)) ? "differs" : "the same");
        assert_memory_equal(got, want, (size_t)hp.n_vocab * sizeof(float));
        assert_true(hp.rope_neox && !hp.qkv_bias && hp.sliding_window == 0);
        assert_int_equal(hp.n_ctx_train, 4096);
        if (k == 0) check_file_chunk_invariance(phi3, 100, 4);
        free(want);
        free(got);
    }
    /* A sliding window (Phi-3 4K's is 2047 positions, 24 here), applied on
     * the CPU: a token whose window starts after position 0 sees fewer keys
     * than without it, one whose window reaches back to 0 the same; the CUDA
     * backend refuses a context longer than the window */
    write_variant(base, phi3,
                  &(test_model_variant){.qwen2 = true, .phi3 = true, .sliding_window = 24});
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(phi3, &m, err, sizeof(err)), 0);
    assert_int_equal(cake_model_hparams(m)->n_ctx_train, 4096);
    assert_int_equal(cake_model_hparams(m)->sliding_window, 24);
    write_variant(base, twin, &(test_model_variant){.qwen2 = true, .phi3 = true});
    cake_model *plain = NULL; /* the same without the window */
    assert_int_equal(cake_model_load(twin, &plain, err, sizeof(err)), 0);
    cake_token prompt[40];
    fixed_prompt(prompt);
    for (int n = 24; n <= 40; n += 16) {
        run_result w, p;
        run_greedy(m, prompt, n, 1, 7, CAKE_KV_F32, 2, &w);
        run_greedy(plain, prompt, n, 1, 7, CAKE_KV_F32, 2, &p);
        const size_t bytes = (size_t)cake_model_hparams(m)->n_vocab * sizeof(float);
        if (n == 24) /* position 23 sees keys 0..23 either way */
            assert_memory_equal(w.logits, p.logits, bytes);
        else
            assert_memory_not_equal(w.logits, p.logits, bytes);
        free(w.logits);
        free(p.logits);
    }
    cake_model_free(plain);
    check_chunk_invariance(m, 100, 4);
    assert_cuda_refuses(m, "window");
    cake_model_free(m);
    unlink(phi3);
    unlink(twin);
    unlink(base);
}

/* gemma3 (Gemma 3): a copy of a 6-layer tiny model with q/k norms, post
 * norms, a window of 24 on layers 0-4 (RoPE at theta 10000 there) and layer
 * 5 unwindowed at theta 1e6 scaled by 1/8, GELU, embeddings times sqrt(dim),
 * against the reference on a 40-token prompt; chunked prefill; the CUDA
 * backend refuses it. */
static void test_gemma3(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], gemma[96];
    assert_int_equal(test_make_model("tiny-6", "f32", base), 0);
    snprintf(gemma, sizeof(gemma), "%s.gemma3", base);
    write_variant(base, gemma,
                  &(test_model_variant){.qwen2 = true,
                                        .qk_norm = 0.2f,
                                        .gemma = 3,
                                        .sliding_window = 24,
                                        .rope_base = 1e6f,
                                        .linear = 8.0f});
    cake_hparams hp;
    float *got = check_vs_reference(gemma, "gemma3", &hp);
    assert_true(hp.gelu && hp.post_norms && hp.qk_norm && hp.rope_neox);
    assert_int_equal(hp.sliding_window, 24);
    assert_int_equal(hp.swa_pattern, 6);
    assert_true(hp.embed_scale == 8.0f && hp.q_scale == 1.0f);
    check_file_chunk_invariance(gemma, 100, 4);
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(gemma, &m, err, sizeof(err)), 0);
    for (int l = 0; l < 6; l++) {
        assert_int_equal(m->layers[l].window, l < 5 ? 24 : 0);
        assert_ptr_equal(m->layers[l].rope_freqs, l < 5 ? m->rope_freqs_local : m->rope_freqs);
    }
    assert_cuda_refuses(m, "Gemma");
    cake_model_free(m);
    free(got);
    unlink(gemma);
    unlink(base);
}

/* gemma2 (Gemma 2): Gemma 3's layer without q/k norms, every even layer
 * windowed (24 here) at the model's RoPE, scores and logits soft-capped (5
 * and 3 here, where they bend tiny's values), against the reference on a
 * 40-token prompt; the caps matter; chunked prefill; the CUDA backend
 * refuses it. */
static void test_gemma2(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], gemma[96];
    assert_int_equal(test_make_model("tiny-6", "f32", base), 0);
    snprintf(gemma, sizeof(gemma), "%s.gemma2", base);
    float *logits[2];
    for (int capped = 0; capped < 2; capped++) {
        write_variant(base, gemma,
                      &(test_model_variant){.qwen2 = true,
                                            .gemma = 2,
                                            .sliding_window = 24,
                                            .attn_softcap = capped ? 5.0f : 1e30f,
                                            .logit_softcap = capped ? 3.0f : 1e30f});
        cake_hparams hp;
        logits[capped] = check_vs_reference(gemma, capped ? "gemma2" : "gemma2, caps far off", &hp);
        assert_true(hp.gelu && hp.post_norms && !hp.qk_norm && hp.swa_pattern == 2);
        assert_true(hp.attn_softcap == (capped ? 5.0f : 1e30f));
    }
    assert_memory_not_equal(logits[0], logits[1], 1000 * sizeof(float));
    check_file_chunk_invariance(gemma, 100, 4);
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(gemma, &m, err, sizeof(err)), 0);
    for (int l = 0; l < 6; l++) {
        assert_int_equal(m->layers[l].window, l % 2 ? 0 : 24);
        assert_ptr_equal(m->layers[l].rope_freqs, m->rope_freqs);
    }
    assert_cuda_refuses(m, "Gemma");
    cake_model_free(m);
    free(logits[0]);
    free(logits[1]);
    unlink(gemma);
    unlink(base);
}

/* Partial RoPE (Phi-4-mini turns 96 of a head's 128 values): a qwen2 copy
 * turning 8 of tiny's 16 against the reference; it differs from turning
 * all; a llama file (interleaved pairs) with it is refused; the CUDA backend
 * refuses it. */
static void test_partial_rope(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], part[96], llama[96];
    assert_int_equal(test_make_model("tiny", "f32", base), 0);
    snprintf(part, sizeof(part), "%s.partial", base);
    snprintf(llama, sizeof(llama), "%s.llama", base);
    write_variant(base, part, &(test_model_variant){.qwen2 = true, .rope_dims = 8});
    cake_hparams hp;
    float *got = check_vs_reference(part, "partial RoPE", &hp);
    assert_int_equal(hp.rope_dims, 8);
    assert_int_equal(hp.head_dim, 16);
    write_variant(base, part, &(test_model_variant){.qwen2 = true});
    float *whole = first_logits(part, &hp);
    assert_int_equal(hp.rope_dims, 16);
    assert_memory_not_equal(got, whole, 1000 * sizeof(float));
    write_variant(base, llama, &(test_model_variant){.rope_dims = 8});
    cake_model *m = NULL;
    char err[256];
    assert_int_equal(cake_model_load(llama, &m, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "NeoX"));
    write_variant(base, part, &(test_model_variant){.qwen2 = true, .rope_dims = 8});
    assert_int_equal(cake_model_load(part, &m, err, sizeof(err)), 0);
    assert_cuda_refuses(m, "RoPE");
    cake_model_free(m);
    free(got);
    free(whole);
    unlink(llama);
    unlink(part);
    unlink(base);
}

/* The float twin that test_cuda checks the GPU's Q8_0 upload against: each
 * Q8_0 tensor of q8 is F32 in twin with the values d * q, the rest as is. */
static void check_dequantized_twin(const char *q8, const char *twin) {
    cake_gguf *a = NULL, *b = NULL;
    char err[512];
    assert_int_equal(cake_gguf_open(q8, &a, err, sizeof(err)), 0);
    assert_int_equal(cake_gguf_open(twin, &b, err, sizeof(err)), 0);
    assert_int_equal(a->n_tensors, b->n_tensors);
    int n_q8 = 0;
    for (uint64_t i = 0; i < a->n_tensors; i++) {
        const cake_gguf_tensor *ta = &a->tensors[i];
        char name[128];
        snprintf(name, sizeof(name), "%.*s", (int)ta->name.len, ta->name.ptr);
        const cake_gguf_tensor *tb = cake_gguf_find_tensor(b, name);
        assert_non_null(tb);
        if (ta->type != CAKE_DTYPE_Q8_0) {
            assert_int_equal(tb->type, ta->type);
            assert_int_equal(tb->nbytes, ta->nbytes);
            assert_memory_equal(tb->data, ta->data, ta->nbytes);
            continue;
        }
        n_q8++;
        assert_int_equal(tb->type, CAKE_DTYPE_F32);
        const size_t n = tb->nbytes / 4;
        float *want = malloc(n * sizeof(float));
        assert_non_null(want);
        cake_q8_0_to_f32(ta->data, 0, want, n);
        assert_memory_equal(tb->data, want, n * sizeof(float));
        free(want);
    }
    assert_true(n_q8 > 0);
    cake_gguf_close(a);
    cake_gguf_close(b);
}

/* Q8_0 weights (`cake mkmodel --dtype q8_0`): the engine against the
 * reference, and chunked prefill against one-shot. */
static void test_q8_0(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "q8_0", path), 0);
    cake_model *m = NULL;
    char err[512];
    int rc = cake_model_load(path, &m, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    assert_int_equal(cake_model_hparams(m)->weight_dtype, CAKE_DTYPE_Q8_0);
    /* the CPU's repacked copies are made by the first CPU context, not at
     * load (a GPU run never needs them) */
    assert_null(m->packed);
    assert_null(m->layers[0].wq.x16);
    cake_hparams hp;
    free(check_vs_reference(path, "q8_0", &hp));
    check_chunk_invariance(m, 200, 8);
    assert_non_null(m->packed);
    assert_non_null(m->layers[0].wq.x16);
    assert_non_null(m->output.x16);
    assert_ptr_equal(m->layers[0].wq.data,
                     cake_gguf_find_tensor(m->gguf, "blk.0.attn_q.weight")->data);
    cake_model_free(m);
    char twin[96];
    snprintf(twin, sizeof(twin), "%s.f32", path);
    write_variant(path, twin, &(test_model_variant){.dequantize = true});
    check_dequantized_twin(path, twin);
    free(check_vs_reference(twin, "q8_0 as f32", &hp));
    unlink(twin);
    unlink(path);
}

/* What the CPU makes of them: Q3_K, Q4_K, Q5_K, IQ4_XS, Q4_0 and IQ4_NL
 * matrices as they are (their kernel keeps the levels), and Q6_K in the
 * output matrix; the others as Q8_0 (requantized per block of 32), the
 * embedding's rows as their exact values. */
static int as_the_cpu_reads(const char *name, int type) {
    if (!strcmp(name, "token_embd.weight")) return CAKE_DTYPE_F32;
    if (type == CAKE_DTYPE_Q6_K && strcmp(name, "output.weight")) return CAKE_DTYPE_Q8_0;
    return type == CAKE_DTYPE_F32 || cake_kquant_x16_for(type) ? type : CAKE_DTYPE_Q8_0;
}

static int one_iq2_xxs(const char *name, int type) {
    return strcmp(name, "blk.1.ffn_up.weight") ? type : 16; /* IQ2_XXS */
}

/* A matrix in a type cake does not compute with (IQ2_XXS): the file still
 * opens, and its vocabulary works (`cake tokenize`); loading the model says
 * which tensor and which type. */
/* A Q8_0 and a Q4_0 KV cache (tiny-256, head_dim 64; 150 prompt tokens, so
 * that attention spans three key blocks): the first token's logits near
 * the f32 cache's (stated tolerances), yet not f16's bits (the cache is
 * quantized); the same logits and tokens whatever the chunking and threads
 * (a row's quantization is its own); and a head_dim that is not a multiple
 * of 32 (tiny's 16) refused by name. */
static void test_kv_quantized(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny-256", "f32", path), 0);
    cake_model *m = NULL;
    char err[512];
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    const int n_vocab = cake_model_hparams(m)->n_vocab, n = 150;
    cake_token prompt[150];
    prompt[0] = 1;
    for (int i = 1; i < n; i++) prompt[i] = 3 + (cake_token)((i * 7919u) % (uint32_t)(n_vocab - 3));
    run_result f32, f16, q8, q4;
    run_greedy(m, prompt, n, 8, n, CAKE_KV_F32, 2, &f32);
    run_greedy(m, prompt, n, 8, n, CAKE_KV_F16, 2, &f16);
    run_greedy(m, prompt, n, 8, n, CAKE_KV_Q8_0, 2, &q8);
    run_greedy(m, prompt, n, 8, n, CAKE_KV_Q4_0, 2, &q4);
    const float d16 = max_rel_diff(f32.logits, f16.logits, n_vocab),
                d8 = max_rel_diff(f32.logits, q8.logits, n_vocab),
                d4 = max_rel_diff(f32.logits, q4.logits, n_vocab);
    printf("first-token logits against an f32 cache: f16 %.3g, q8_0 %.3g, q4_0 %.3g (relative)\n",
           d16, d8, d4);
    /* measured 1.7e-2 (f16: 6.4e-4); the difference is Q8_0's rounding alone
     * (test_kernels: the kernel equals f32 on the dequantized values) */
    assert_true(d8 <= 3e-2f);
    assert_true(d8 > d16); /* quantized: further off than f16 */
    assert_memory_not_equal(q8.logits, f16.logits, (size_t)n_vocab * sizeof(float));
    assert_true(d4 <= 0.35f); /* measured 0.22: 16x Q8_0's rounding step */
    assert_true(d4 > d8);
    const int chunks[] = {1, 7, 64};
    for (int k = 0; k < 6; k++) {
        const run_result *whole = k < 3 ? &q8 : &q4;
        run_result r;
        run_greedy(m, prompt, n, 8, chunks[k % 3], k < 3 ? CAKE_KV_Q8_0 : CAKE_KV_Q4_0,
                   1 + 2 * (k % 2), &r);
        const float d = max_rel_diff(whole->logits, r.logits, n_vocab);
        printf("%s chunk %d: logits rel diff %.3g\n", k < 3 ? "q8_0" : "q4_0", chunks[k % 3], d);
        assert_true(d <= 1e-5f);
        assert_int_equal(r.n, whole->n);
        assert_memory_equal(r.ids, whole->ids, (size_t)r.n * sizeof(cake_token));
        free(r.logits);
    }
    free(f32.logits);
    free(f16.logits);
    free(q8.logits);
    free(q4.logits);
    cake_model_free(m);
    unlink(path);

    assert_int_equal(test_make_model("tiny", "f32", path), 0);
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = 64;
    cp.kv_type = CAKE_KV_Q8_0;
    cake_context *c = NULL;
    assert_int_not_equal(cake_context_init(m, cp, &c, err, sizeof(err)), 0);
    assert_null(c);
    printf("tiny with q8_0: %s\n", err);
    assert_non_null(strstr(err, "multiple of 32"));
    cake_model_free(m);
    unlink(path);
}

static void test_unsupported_weight_type(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], path[96], err[512];
    assert_int_equal(test_make_model("tiny-256", "f32", base), 0);
    snprintf(path, sizeof(path), "%s.iq2", base);
    write_variant(base, path, &(test_model_variant){.retype = one_iq2_xxs});
    cake_gguf *g = NULL;
    assert_int_equal(cake_gguf_open(path, &g, err, sizeof(err)), 0);
    const cake_gguf_tensor *t = cake_gguf_find_tensor(g, "blk.1.ffn_up.weight");
    assert_non_null(t);
    assert_int_equal(t->type, 16);
    cake_tokenizer *tok = NULL;
    assert_int_equal(cake_tokenizer_init(g, &tok, err, sizeof(err)), 0);
    cake_tokenizer_free(tok);
    cake_gguf_close(g);
    cake_model *m = NULL;
    assert_int_not_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    assert_null(m);
    if (!strstr(err, "tensor 'blk.1.ffn_up.weight': dtype IQ2_XXS is not supported for weights"))
        fail_msg("error: %s", err);
    unlink(path);
    unlink(base);
}

/* Quantized types besides Q8_0 (`tiny-256`: rows of whole k-quant blocks):
 * the CPU multiplies Q3_K, Q4_K, Q5_K, IQ4_XS, Q4_0 and IQ4_NL as they are,
 * and Q6_K in the output matrix, and requantizes the other matrices to Q8_0,
 * so the logits are the bits of the same model written with those as they
 * are, the others as Q8_0 and an f32 embedding, a model the reference checks; chunked prefill
 * matches one-shot. (The reference rounds activations to 8 bits in double, the engine in f32: a
 * value within ~1e-6 of a rounding tie may go either way and move the logits by ~1e-2. Which matrix
 * gets which type decides the values; in test_mixed_quants' mix none lands there. Q3_K on blk.0's
 * ffn_down, or Q4_0 on blk.1's ffn_gate, put one of blk.1's ffn_down
 * inputs 5e-7 from a tie: the check failed by 0.01 while the kernels
 * matched the decoder exactly.) */
static void test_other_quants(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], mixed[96], twin[96];
    assert_int_equal(test_make_model("tiny-256", "f32", base), 0);
    snprintf(mixed, sizeof(mixed), "%s.mixed", base);
    snprintf(twin, sizeof(twin), "%s.twin", base);
    write_variant(base, mixed, &(test_model_variant){.retype = test_mixed_quants});
    write_variant(mixed, twin, &(test_model_variant){.retype = as_the_cpu_reads});
    cake_hparams hp;
    float *got = first_logits(mixed, &hp);
    assert_int_equal(hp.weight_dtype, CAKE_DTYPE_Q4_K);
    cake_hparams twin_hp;
    float *want = check_vs_reference(twin, "mixed quants as the CPU reads them", &twin_hp);
    for (int i = 0; i < hp.n_vocab; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)))
            fail_msg("logit %d: %.9g on the mixed model, %.9g on its twin", i, got[i], want[i]);
    /* the quantized model is still the f32 one, roughly */
    float *f32 = first_logits(base, NULL);
    double diff = 0, norm = 0;
    for (int i = 0; i < hp.n_vocab; i++) {
        diff += ((double)got[i] - f32[i]) * ((double)got[i] - f32[i]);
        norm += (double)f32[i] * f32[i];
    }
    printf("mixed quants vs f32: relative L2 %.3f\n", sqrt(diff / norm));
    assert_true(sqrt(diff / norm) < 0.5);
    cake_model *m = NULL;
    char err[512];
    assert_int_equal(cake_model_load(mixed, &m, err, sizeof(err)), 0);
    int seen = 0; /* each type is in the file */
    for (uint64_t i = 0; i < m->gguf->n_tensors; i++) seen |= 1 << m->gguf->tensors[i].type;
    const int all = 1 << CAKE_DTYPE_Q4_0 | 1 << CAKE_DTYPE_Q4_1 | 1 << CAKE_DTYPE_Q5_0 |
                    1 << CAKE_DTYPE_Q5_1 | 1 << CAKE_DTYPE_Q4_K | 1 << CAKE_DTYPE_Q5_K |
                    1 << CAKE_DTYPE_Q6_K | 1 << CAKE_DTYPE_IQ4_XS | 1 << CAKE_DTYPE_IQ4_NL |
                    1 << CAKE_DTYPE_Q3_K;
    assert_int_equal(seen & all, all);
    check_chunk_invariance(m, 100, 4);
    assert_non_null(m->layers[0].w_down.x16); /* Q5_1: requantized */
    assert_int_equal(m->layers[0].w_down.x16_dtype, CAKE_DTYPE_Q8_0_X16);
    assert_int_equal(m->layers[1].wq.x16_dtype, CAKE_DTYPE_Q4_K_X16);
    assert_int_equal(m->layers[1].wk.x16_dtype, CAKE_DTYPE_Q5_K_X16);
    assert_int_equal(m->layers[1].w_up.x16_dtype, CAKE_DTYPE_IQ4_XS_X16);
    assert_int_equal(m->output.x16_dtype, CAKE_DTYPE_Q6_K_X16);
    assert_int_equal(m->layers[1].wv.x16_dtype, CAKE_DTYPE_Q8_0_X16); /* Q6_K */
    assert_int_equal(m->layers[1].wo.x16_dtype, CAKE_DTYPE_Q4_0_X16);
    assert_int_equal(m->layers[0].w_gate.x16_dtype, CAKE_DTYPE_IQ4_NL_X16);
    assert_int_equal(m->layers[1].w_down.x16_dtype, CAKE_DTYPE_Q3_K_X16);
    cake_model_free(m);
    free(got);
    free(want);
    free(f32);
    unlink(twin);
    unlink(mixed);
    unlink(base);
}

/* Experts in k-quants, as llama-quantize's Q4_K_M makes them (gate Q4_K,
 * up IQ4_XS: kept in their levels; down Q6_K: requantized to Q8_0, as for
 * a dense layer): bit for bit the twin written as the CPU reads them, which
 * the reference holds; chunk invariance; each expert has its layout. */
static int quantize_experts(const char *name, int type) {
    return strstr(name, "ffn_gate_exps")   ? CAKE_DTYPE_Q4_K
           : strstr(name, "ffn_up_exps")   ? CAKE_DTYPE_IQ4_XS
           : strstr(name, "ffn_down_exps") ? CAKE_DTYPE_Q6_K
                                           : type;
}

static void test_experts_kquants(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char base[64], quant[96], twin[96];
    assert_int_equal(test_make_model("tiny-moe-256", "f32", base), 0);
    snprintf(quant, sizeof(quant), "%s.quant", base);
    snprintf(twin, sizeof(twin), "%s.twin", base);
    write_variant(base, quant, &(test_model_variant){.retype = quantize_experts});
    write_variant(quant, twin, &(test_model_variant){.retype = as_the_cpu_reads});
    cake_hparams hp;
    float *got = first_logits(quant, &hp);
    float *want = check_vs_reference(twin, "experts in k-quants as the CPU reads them", &hp);
    for (int i = 0; i < hp.n_vocab; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)))
            fail_msg("logit %d: %.9g on the quantized model, %.9g on its twin", i, got[i], want[i]);
    cake_model *m = NULL;
    char err[512];
    assert_int_equal(cake_model_load(quant, &m, err, sizeof(err)), 0);
    check_chunk_invariance(m, 100, 4);
    for (int e = 0; e < hp.n_experts; e++) {
        assert_int_equal(m->layers[1].expert[3 * e].x16_dtype, CAKE_DTYPE_Q4_K_X16);
        assert_int_equal(m->layers[1].expert[3 * e + 1].x16_dtype, CAKE_DTYPE_IQ4_XS_X16);
        assert_int_equal(m->layers[1].expert[3 * e + 2].x16_dtype, CAKE_DTYPE_Q8_0_X16);
    }
    cake_model_free(m);
    free(got);
    free(want);
    unlink(twin);
    unlink(quant);
    unlink(base);
}

/* Tied output (no output.weight; Llama 3.2 1B/3B and small Qwen2.5 models):
 * the token embedding is the output matrix too. With Q8_0 the output is a
 * repacked copy while the lookups read the file's blocks. */
/* OpenAI's penalties on the tokens chosen so far: token 0 leads token 1 by
 * 0.5 and token 2 trails far behind. */
static void check_penalties(float frequency, float presence, const cake_token *want, int n) {
    const float logits[3] = {3.0f, 2.5f, -5.0f};
    cake_sampler *s = cake_sampler_init((cake_sampler_params){
        .temperature = 0, .frequency_penalty = frequency, .presence_penalty = presence});
    assert_non_null(s);
    for (int i = 0; i < n; i++)
        if (cake_sampler_sample(s, logits, 3) != want[i])
            fail_msg("frequency %g presence %g: token %d is not %d", frequency, presence, i,
                     want[i]);
    cake_sampler_free(s);
}

static void test_sampler_penalties(void **state) {
    (void)state;
    check_penalties(0, 0, (const cake_token[]){0, 0, 0, 0}, 4);
    /* presence: once chosen, 1 below: 0 (2.0), then 1 (1.5), then 0 again */
    check_penalties(0, 1, (const cake_token[]){0, 1, 0, 0}, 4);
    /* frequency, 0.4 per choice: 0, 0 (2.6 > 2.5), 1 (2.2 < 2.5), 0 (2.2 >
     * 2.1), 1 (1.8 < 2.1), 0 (1.8 > 1.7) */
    check_penalties(0.4f, 0, (const cake_token[]){0, 0, 1, 0, 1, 0}, 6);
    /* a negative penalty favours what was chosen */
    check_penalties(-1, 0, (const cake_token[]){0, 0, 0}, 3);
    /* sampled (not greedy): with a large presence penalty no token repeats
     * until all three were chosen */
    const float logits[3] = {1.0f, 0.9f, 0.8f};
    cake_sampler *s = cake_sampler_init(
        (cake_sampler_params){.temperature = 1, .top_p = 1, .seed = 7, .presence_penalty = 100});
    int seen[3] = {0};
    for (int i = 0; i < 3; i++) seen[cake_sampler_sample(s, logits, 3)]++;
    assert_true(seen[0] == 1 && seen[1] == 1 && seen[2] == 1);
    cake_sampler_free(s);

    /* logit biases: the sampler's own copy, added before the penalties */
    cake_logit_bias bias[2] = {{0, -100}, {2, 7.4f}};
    s = cake_sampler_init((cake_sampler_params){
        .temperature = 0, .presence_penalty = 0.5f, .logit_bias = bias, .n_logit_bias = 2});
    bias[1].bias = 0;                           /* (copied at init) */
    const float three[3] = {3.0f, 2.5f, -5.0f}; /* biased: -97, 2.5, 2.4 */
    assert_int_equal(cake_sampler_sample(s, three, 3), 1);
    assert_int_equal(cake_sampler_sample(s, three, 3), 2); /* 2.5 - 0.5 < 2.4 */
    cake_sampler_free(s);
}

/* The repetition penalty (vLLM's, llama.cpp's): greedy over fixed logits,
 * with the prompt and the window given. */
static void check_repetition(const float *logits, int n, float penalty, int last_n,
                             const cake_token *prompt, int n_prompt, float frequency,
                             const cake_token *want, int n_want) {
    cake_token copy[8];
    for (int i = 0; i < n_prompt; i++) copy[i] = prompt[i];
    cake_sampler *s = cake_sampler_init((cake_sampler_params){.temperature = 0,
                                                              .repetition_penalty = penalty,
                                                              .repeat_last_n = last_n,
                                                              .frequency_penalty = frequency,
                                                              .prompt = copy,
                                                              .n_prompt = n_prompt});
    assert_non_null(s);
    for (int i = 0; i < n_prompt; i++) copy[i] = -1; /* (copied at init) */
    for (int i = 0; i < n_want; i++)
        if (cake_sampler_sample(s, logits, n) != want[i])
            fail_msg("penalty %g last %d: token %d is not %d", penalty, last_n, i, want[i]);
    cake_sampler_free(s);
}

static void test_sampler_repetition(void **state) {
    (void)state;
    const float logits[4] = {3.0f, 2.5f, -5.0f, 1.0f};
    const cake_token zero[3] = {0, 0, 0};
    /* off at 1 */
    check_repetition(logits, 4, 1, 0, zero, 1, 0, (const cake_token[]){0, 0}, 2);
    /* the prompt counts: 0 falls to 2.0 < 2.5; once both were seen, 0 leads
     * again (2.0 > 1.67) */
    check_repetition(logits, 4, 1.5f, 0, zero, 1, 0, (const cake_token[]){1, 0, 0}, 3);
    /* a window of one token: only the last is held back */
    check_repetition(logits, 4, 1.5f, 1, zero, 1, 0, (const cake_token[]){1, 0, 1, 0}, 4);
    /* a token three times in the window is penalized once (3 / 1.1 > 2.5;
     * 3 / 1.1^3 would not be) */
    check_repetition(logits, 4, 1.1f, 0, zero, 3, 0, (const cake_token[]){0}, 1);
    /* negative logits are multiplied: -1.5 < -1.2 (divided, -0.67 would win) */
    const float negative[2] = {-1.0f, -1.2f};
    check_repetition(negative, 2, 1.5f, 0, zero, 1, 0, (const cake_token[]){1}, 1);
    /* before the frequency penalty: 3 / 2 - 1 = 0.5 < 0.8 ((3 - 1) / 2 = 1
     * would keep token 0) */
    const float two[2] = {3.0f, 0.8f};
    check_repetition(two, 2, 2, 0, NULL, 0, 1, (const cake_token[]){0, 1}, 2);
}

/* vLLM's min_tokens: the end ids may not come before it; after, they
 * may; a grammar that leaves only an end id still gets it. */
static void test_sampler_min_tokens(void **state) {
    (void)state;
    const float logits[3] = {3.0f, 2.5f, -5.0f};
    const cake_token ends[2] = {0, 7};
    cake_token copy[2] = {0, 7};
    cake_sampler *s = cake_sampler_init(
        (cake_sampler_params){.temperature = 0, .min_tokens = 2, .end_ids = copy, .n_end_ids = 2});
    copy[0] = 1; /* (copied at init) */
    assert_int_equal(cake_sampler_sample(s, logits, 3), 1);
    assert_int_equal(cake_sampler_sample(s, logits, 3), 1);
    assert_int_equal(cake_sampler_sample(s, logits, 3), 0);
    cake_sampler_free(s);
    /* sampled: never an end id among the first 50 draws of 100 tokens */
    s = cake_sampler_init((cake_sampler_params){
        .temperature = 1, .seed = 3, .min_tokens = 50, .end_ids = ends, .n_end_ids = 1});
    for (int i = 0; i < 50; i++) assert_int_not_equal(cake_sampler_sample(s, logits, 3), 0);
    cake_sampler_free(s);
    const float only_end[3] = {1.0f, -INFINITY, -INFINITY};
    s = cake_sampler_init(
        (cake_sampler_params){.temperature = 1, .min_tokens = 5, .end_ids = ends, .n_end_ids = 1});
    assert_int_equal(cake_sampler_sample(s, only_end, 3), 0);
    cake_sampler_free(s);
}

/* top_k and min_p keep only their tokens, and every one of them comes up:
 * 4000 draws each. */
static void check_filter(cake_sampler_params p, const float *logits, int n, const int *allowed) {
    cake_sampler *s = cake_sampler_init(p);
    assert_non_null(s);
    int seen[8] = {0};
    for (int i = 0; i < 4000; i++) seen[cake_sampler_sample(s, logits, n)]++;
    for (int i = 0; i < n; i++)
        if (allowed[i] ? seen[i] == 0 : seen[i] != 0)
            fail_msg("top_k %d min_p %g top_p %g: token %d drawn %d times", p.top_k, p.min_p,
                     p.top_p, i, seen[i]);
    cake_sampler_free(s);
}

static void test_sampler_filters(void **state) {
    (void)state;
    /* probabilities 0.4, 0.3, 0.2, 0.1 (logits their logs) */
    const float logits[4] = {logf(0.4f), logf(0.3f), logf(0.2f), logf(0.1f)};
    const cake_sampler_params base = {.temperature = 1, .top_p = 1, .seed = 3};
    cake_sampler_params p = base;
    check_filter(p, logits, 4, (const int[]){1, 1, 1, 1});
    p.top_k = 1; /* greedy */
    check_filter(p, logits, 4, (const int[]){1, 0, 0, 0});
    p.top_k = 2;
    check_filter(p, logits, 4, (const int[]){1, 1, 0, 0});
    p = base;
    p.min_p = 0.45f; /* at least 0.18 */
    check_filter(p, logits, 4, (const int[]){1, 1, 1, 0});
    p.min_p = 0.6f; /* at least 0.24 */
    check_filter(p, logits, 4, (const int[]){1, 1, 0, 0});
    p = base; /* together: the nucleus of 0.65 is {0, 1}, within the top 3 */
    p.top_p = 0.65f;
    p.top_k = 3;
    p.min_p = 0.1f;
    check_filter(p, logits, 4, (const int[]){1, 1, 0, 0});
}

/* The filters against a sort, on 3,000 tokens of random logits of three
 * sharpnesses: every draw is in the set a full sort gives (the likeliest
 * tokens by probability, then id; the nucleus summed in double, with room
 * for rounding at its edge), and the likeliest token comes up. Then the
 * time of a draw from 32,000 near-flat tokens with top_p 0.95 (the
 * nucleus is most of them). */
static int by_rank(const void *a, const void *b, void *ctx) {
    const double *prob = ctx;
    const int x = *(const int *)a, y = *(const int *)b;
    if (prob[x] != prob[y]) return prob[x] < prob[y] ? 1 : -1;
    return x - y;
}

static void test_sampler_large(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    enum { N = 3000 };
    static float logits[32000];
    static double prob[N];
    static int order[N];
    static char allowed[N];
    uint64_t rng = 99;
    const struct {
        int top_k;
        float top_p, min_p;
    } cases[] = {{0, 0.3f, 0},   {0, 0.9f, 0},  {0, 0.999f, 0},   {10, 1, 0},
                 {200, 0.9f, 0}, {0, 1, 0.01f}, {50, 0.5f, 0.05f}};
    for (int sharp = 0; sharp < 3; sharp++) {
        for (int i = 0; i < N; i++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            logits[i] = (float)(rng >> 40) / (float)(1 << 24) *
                        (sharp == 0   ? 1
                         : sharp == 1 ? 8
                                      : 30);
        }
        float maxl = logits[0];
        for (int i = 1; i < N; i++) maxl = fmaxf(maxl, logits[i]);
        double sum = 0;
        for (int i = 0; i < N; i++) sum += prob[i] = exp((double)(logits[i] - maxl));
        for (int i = 0; i < N; i++) prob[i] /= sum, order[i] = i;
        qsort_r(order, N, sizeof(int), by_rank, prob);
        for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
            /* the reference set, and its edge: with the nucleus's top_p a
             * little higher (the sampler sums in float) */
            int m = 0;
            while (m < N && prob[order[m]] >= cases[c].min_p * prob[order[0]]) m++;
            if (cases[c].top_k && m > cases[c].top_k) m = cases[c].top_k;
            int end = m;
            double mass = 0;
            for (int i = 0; i < m; i++) {
                mass += prob[order[i]];
                if (cases[c].top_p < 1 && mass >= cases[c].top_p * (1 + 1e-5)) {
                    end = i + 1;
                    break;
                }
            }
            memset(allowed, 0, N);
            for (int i = 0; i < end; i++) allowed[order[i]] = 1;
            cake_sampler *smp = cake_sampler_init((cake_sampler_params){.temperature = 1,
                                                                        .top_p = cases[c].top_p,
                                                                        .top_k = cases[c].top_k,
                                                                        .min_p = cases[c].min_p,
                                                                        .seed = (uint64_t)c});
            int top_seen = 0;
            for (int d = 0; d < 2000; d++) {
                const cake_token id = cake_sampler_sample(smp, logits, N);
                if (!allowed[id])
                    fail_msg("sharpness %d, top_k %d top_p %g min_p %g: token %d (rank outside "
                             "the %d allowed) drawn",
                             sharp, cases[c].top_k, cases[c].top_p, cases[c].min_p, id, end);
                top_seen += id == order[0];
            }
            if (!top_seen && prob[order[0]] * 2000 / mass > 20)
                fail_msg("sharpness %d case %zu: the likeliest token never drawn", sharp, c);
            cake_sampler_free(smp);
        }
    }
    for (int i = 0; i < 32000; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        logits[i] = (float)(rng >> 40) / (float)(1 << 24);
    }
    cake_sampler *smp =
        cake_sampler_init((cake_sampler_params){.temperature = 1, .top_p = 0.95f, .seed = 1});
    const double t0 = cake_now_s();
    for (int d = 0; d < 100; d++) cake_sampler_sample(smp, logits, 32000);
    printf("sampler: a top_p 0.95 draw from 32,000 near-flat tokens takes %.0f us\n",
           (cake_now_s() - t0) * 1e4);
    cake_sampler_free(smp);
}

/* ---- JSON mode (engine/json_grammar.h) ---- */

/* Whether text, fed byte by byte, is one complete JSON object. */
static bool json_whole(const char *text) {
    cake_json_state s;
    cake_json_start(&s, NULL);
    for (const char *c = text; *c; c++)
        if (!cake_json_feed(&s, c, 1)) return false;
    return cake_json_complete(&s);
}

static void test_json_grammar(void **state) {
    (void)state;
    static const char *valid[] = {
        "{}",
        " \n{ }",
        "{\"a\":1}",
        "{\"a\": -0.5e+10, \"b\": [1, 2.25, -3, 0, 1E5, 0.0e-1], \"c\": {\"d\": [[], {}]}}",
        "{\"t\": true, \"f\": false, \"n\": null, \"s\": \"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\"}",
        "{\"utf-8\": \"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x8e\x82 \xf4\x8f\xbf\xbf\"}",
        "{\"\": \"\"}",
        "{\"a\":[{\"b\":[{\"c\":\"d\"}]}]}",
        "{\n  \"k\": [\n    1,\n    2\n  ]\n}",
    };
    for (size_t i = 0; i < sizeof(valid) / sizeof(valid[0]); i++)
        if (!json_whole(valid[i])) fail_msg("refused: %s", valid[i]);
    static const char *invalid[] = {
        "",
        "[]",
        "\"a\"",
        "1",
        "{",
        "{\"a\"}",
        "{\"a\":}",
        "{\"a\":1,}",
        "{,}",
        "{\"a\":01}",
        "{\"a\":1.}",
        "{\"a\":.5}",
        "{\"a\":-}",
        "{\"a\":1e}",
        "{\"a\":tru}",
        "{\"a\":nul}",
        "{\"a\":True}",
        "{\"a\":[1,]}",
        "{\"a\":[1 2]}",
        "{a:1}",
        "{'a':1}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12g4\"}",
        "{\"a\":\"\t\"}",
        "{}}",
        "{} ",
        "{}x",
        "{\"a\":1]",
        "{\"a\":[1}",
        "{\"a\" 1}",
        "{\"a\":1 // c\n}",
        "{\"a\":\"\x80\"}",             /* UTF-8: a lone continuation byte, */
        "{\"a\":\"\xc3\"}",             /* a character cut short, */
        "{\"a\":\"\xc0\xaf\"}",         /* an overlong form, */
        "{\"a\":\"\xed\xa0\x80\"}",     /* a surrogate, */
        "{\"a\":\"\xf4\x90\x80\x80\"}", /* past U+10FFFF */
        "{\"\xff\":1}",
    };
    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++)
        if (json_whole(invalid[i])) fail_msg("accepted: %s", invalid[i]);

    /* whitespace and nesting have their limits */
    char text[512] = "{";
    memset(text + 1, ' ', CAKE_JSON_MAX_SPACE);
    strcpy(text + 1 + CAKE_JSON_MAX_SPACE, "}");
    assert_true(json_whole(text));
    memset(text + 1, ' ', CAKE_JSON_MAX_SPACE + 1);
    strcpy(text + 2 + CAKE_JSON_MAX_SPACE, "}");
    assert_false(json_whole(text));
    /* an object holding k nested arrays: k + 1 levels */
    for (int k = CAKE_JSON_MAX_DEPTH - 1; k <= CAKE_JSON_MAX_DEPTH; k++) {
        char deep[2 * CAKE_JSON_MAX_DEPTH + 16] = "{\"a\":";
        for (int d = 0; d < k; d++) strcat(deep, "[");
        for (int d = 0; d < k; d++) strcat(deep, "]");
        strcat(deep, "}");
        assert_int_equal(json_whole(deep), k < CAKE_JSON_MAX_DEPTH);
    }
}

/* The mask over a real vocabulary: at the start only tokens that open the
 * object (after whitespace); no end token until it is closed, then only
 * those. Sampling under it from random logits, however hot, gives JSON. */
static void test_json_mask(void **state) {
    SKIP_UNDER_TSAN();
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    cake_model *m;
    char err[256];
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    const cake_tokenizer *t = cake_model_tokenizer(m);
    const int n = cake_tokenizer_n_vocab(t);
    const cake_token eos = cake_tokenizer_eos(t), brace = cake_tokenizer_find(t, "{", 1);
    const cake_token close = cake_tokenizer_find(t, "}", 1), word = cake_tokenizer_find(t, "a", 1);
    assert_true(brace >= 0 && close >= 0 && word >= 0);
    float *logits = malloc((size_t)n * sizeof(float));
    cake_json_vocab *v = cake_json_vocab_new(t);
    cake_json_grammar *g = cake_json_grammar_new(v, NULL, eos, -1);
    for (int i = 0; i < n; i++) logits[i] = 0;
    cake_json_grammar_mask(g, logits, n);
    int allowed = 0;
    for (int i = 0; i < n; i++) allowed += logits[i] == 0;
    assert_true(allowed > 0 && allowed < 100);
    assert_true(logits[brace] == 0 && isinf(logits[eos]) && isinf(logits[word]));
    cake_json_grammar_accept(g, brace);
    cake_json_grammar_accept(g, close);
    for (int i = 0; i < n; i++) logits[i] = 0;
    cake_json_grammar_mask(g, logits, n);
    for (int i = 0; i < n; i++) assert_true(i == eos ? logits[i] == 0 : isinf(logits[i]));
    cake_json_grammar_free(g);

    /* In every kind of state the mask allows exactly the tokens whose text
     * the automaton reads on from there (the mask skips reading most tokens
     * inside a string). */
    static const char *prefixes[] = {"",
                                     "{",
                                     "{\"ke",
                                     "{\"key\"",
                                     "{\"k\":",
                                     "{\"k\": \"va",
                                     "{\"k\": \"\\",
                                     "{\"k\": 12",
                                     "{\"k\": [",
                                     "{\"k\": t",
                                     "{\"k\": {}"};
    for (size_t p = 0; p < sizeof(prefixes) / sizeof(prefixes[0]); p++) {
        g = cake_json_grammar_new(v, NULL, eos, -1);
        cake_json_state want;
        cake_json_start(&want, NULL);
        for (const char *c = prefixes[p]; *c; c++) { /* byte tokens: id 3 + byte */
            cake_json_grammar_accept(g, 3 + (unsigned char)*c);
            assert_true(cake_json_feed(&want, c, 1));
        }
        for (int i = 0; i < n; i++) logits[i] = 0;
        const double t0 = cake_now_s();
        cake_json_grammar_mask(g, logits, n);
        if (p == 5)
            printf("json mode: the mask inside a string took %.0f us\n", (cake_now_s() - t0) * 1e6);
        if (p == 4)
            printf("json mode: the mask before a value took %.0f us\n", (cake_now_s() - t0) * 1e6);
        int allowed_here;
        const int id = test_mask_mismatch(t, logits, n, eos, &want, &allowed_here);
        if (id >= 0)
            fail_msg("after '%s': token %d %s by the mask", prefixes[p], id,
                     logits[id] == 0 ? "allowed" : "refused");
        cake_json_grammar_free(g);
    }

    /* 20 answers of up to 300 tokens at temperature 2 from random logits:
     * every prefix stays valid JSON (the grammar's own state, re-read from
     * the text) and those that end are whole objects. */
    uint64_t rng = 5;
    int ended = 0;
    for (int a = 0; a < 20; a++) {
        g = cake_json_grammar_new(v, NULL, eos, -1);
        cake_sampler *s =
            cake_sampler_init((cake_sampler_params){.temperature = 2,
                                                    .top_p = 1,
                                                    .seed = (uint64_t)a,
                                                    .constrain = cake_json_grammar_mask,
                                                    .accept = cake_json_grammar_accept,
                                                    .constrain_ud = g});
        char out[4096];
        size_t len = 0;
        for (int k = 0; k < 300; k++) {
            for (int i = 0; i < n; i++) {
                rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                logits[i] = (float)(rng >> 40) / (float)(1 << 24) * 8.0f;
            }
            logits[eos] += 6; /* (ends come sooner) */
            const cake_token id = cake_sampler_sample(s, logits, n);
            if (id == eos) {
                out[len] = 0;
                if (!json_whole(out)) fail_msg("not JSON: %s", out);
                ended++;
                break;
            }
            size_t piece;
            const char *text = cake_token_text(t, id, &piece);
            assert_true(piece > 0 && len + piece < sizeof(out));
            memcpy(out + len, text, piece);
            len += piece;
            cake_json_state st;
            cake_json_start(&st, NULL);
            assert_true(cake_json_feed(&st, out, len));
        }
        cake_sampler_free(s);
        cake_json_grammar_free(g);
    }
    printf("json mode: %d of 20 random answers closed their object\n", ended);
    assert_true(ended > 0);
    cake_json_vocab_free(v);
    free(logits);
    cake_model_free(m);
    unlink(path);
}

static void test_tied_output(void **state) {
    (void)state;
    const char *dtypes[] = {"f32", "q8_0"};
    for (int k = 0; k < 2; k++) {
        char base[64], tied[96];
        assert_int_equal(test_make_model("tiny", dtypes[k], base), 0);
        snprintf(tied, sizeof(tied), "%s.tied", base);
        write_variant(base, tied, &(test_model_variant){.tied = true});
        cake_hparams hp;
        float *got = check_vs_reference(tied, dtypes[k], &hp);
        assert_true(hp.tied_output);
        free(got);
        unlink(tied);
        unlink(base);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_greedy_and_logits),
        cmocka_unit_test(test_chunked_prefill_stories),
        cmocka_unit_test(test_chunked_prefill_mkmodel),
        cmocka_unit_test(test_forward_batch),
        cmocka_unit_test(test_rope_freqs),
        cmocka_unit_test(test_qwen2_matches_llama),
        cmocka_unit_test(test_qwen2_reference),
        cmocka_unit_test(test_qwen3_reference),
        cmocka_unit_test(test_wide_heads),
        cmocka_unit_test(test_experts),
        cmocka_unit_test(test_all_logits),
        cmocka_unit_test(test_qwen2moe),
        cmocka_unit_test(test_granite),
        cmocka_unit_test(test_phi3),
        cmocka_unit_test(test_mistral3),
        cmocka_unit_test(test_gemma3),
        cmocka_unit_test(test_gemma2),
        cmocka_unit_test(test_partial_rope),
        cmocka_unit_test(test_experts_kquants),
        cmocka_unit_test(test_q8_0),
        cmocka_unit_test(test_other_quants),
        cmocka_unit_test(test_unsupported_weight_type),
        cmocka_unit_test(test_kv_quantized),
        cmocka_unit_test(test_tied_output),
        cmocka_unit_test(test_sampler_penalties),
        cmocka_unit_test(test_sampler_repetition),
        cmocka_unit_test(test_sampler_min_tokens),
        cmocka_unit_test(test_sampler_filters),
        cmocka_unit_test(test_sampler_large),
        cmocka_unit_test(test_json_grammar),
        cmocka_unit_test(test_json_mask),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
