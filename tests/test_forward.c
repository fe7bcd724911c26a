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
#include "engine/generate.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "testutil.h"

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
    static char path[] = "/tmp/cake-test-tiny-XXXXXX";
    strcpy(path + strlen(path) - 6, "XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s mkmodel --shape tiny -o %s 2>/dev/null", CAKE_BIN, path);
    assert_int_equal(system(cmd), 0);
    return path;
}

/* The same on a GQA model made by `cake mkmodel --shape tiny` (F16 weights). */
static void test_chunked_prefill_mkmodel(void **state) {
    (void)state;
    const char *path = make_tiny();
    cake_model *m = NULL;
    char err[512];
    int rc = cake_model_load(path, &m, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    check_chunk_invariance(m, 200, 8);
    cake_model_free(m);
    unlink(path);
}

/* ---- Llama 3.1's rope scaling ---- */

typedef struct {
    const cake_gguf *g;
    const float *factors;
} variant_fill;

static int fill_variant(uint64_t i, void *buf, uint64_t nbytes, void *ctx) {
    const variant_fill *v = ctx;
    memcpy(buf, i < v->g->n_tensors ? v->g->tensors[i].data : (const void *)v->factors, nbytes);
    return 0;
}

static char *str_copy(cake_gguf_str s) {
    char *c = malloc(s.len + 1);
    assert_non_null(c);
    memcpy(c, s.ptr, s.len);
    c[s.len] = '\0';
    return c;
}

/* Copies the GGUF at src to dst, adding rope_freqs.weight = factors[0..n)
 * when factors is not NULL, and linear rope scaling by `linear` when > 0.
 * Takes the key types that `cake mkmodel` writes. */
static void write_variant(const char *src, const char *dst, const float *factors, int n,
                          float linear) {
    cake_gguf *g = NULL;
    char err[256];
    assert_int_equal(cake_gguf_open(src, &g, err, sizeof(err)), 0);
    cake_gguf_writer *w = cake_gguf_writer_init();
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        char *key = str_copy(kv->key);
        if (kv->type == CAKE_GGUF_UINT32) {
            cake_gguf_writer_add_u32(w, key, (uint32_t)kv->v.u64);
        } else if (kv->type == CAKE_GGUF_FLOAT32) {
            cake_gguf_writer_add_f32(w, key, (float)kv->v.f64);
        } else if (kv->type == CAKE_GGUF_BOOL) {
            cake_gguf_writer_add_bool(w, key, kv->v.u64 != 0);
        } else if (kv->type == CAKE_GGUF_STRING) {
            char *v = str_copy(kv->v.str);
            cake_gguf_writer_add_str(w, key, v);
            free(v);
        } else if (kv->type == CAKE_GGUF_ARRAY && kv->arr_type == CAKE_GGUF_STRING) {
            char **v = malloc(kv->arr_n * sizeof(*v));
            for (uint64_t j = 0; j < kv->arr_n; j++) v[j] = str_copy(kv->arr_strs[j]);
            cake_gguf_writer_add_arr_str(w, key, (const char *const *)v, kv->arr_n);
            for (uint64_t j = 0; j < kv->arr_n; j++) free(v[j]);
            free(v);
        } else if (kv->type == CAKE_GGUF_ARRAY &&
                   (kv->arr_type == CAKE_GGUF_FLOAT32 || kv->arr_type == CAKE_GGUF_INT32)) {
            void *v = malloc(kv->arr_n * 4);
            memcpy(v, kv->arr_data, kv->arr_n * 4);
            if (kv->arr_type == CAKE_GGUF_FLOAT32)
                cake_gguf_writer_add_arr_f32(w, key, v, kv->arr_n);
            else
                cake_gguf_writer_add_arr_i32(w, key, v, kv->arr_n);
            free(v);
        } else {
            fprintf(stderr, "write_variant: key %s has a type this copy does not take\n", key);
            fail();
        }
        free(key);
    }
    if (linear > 0) {
        cake_gguf_writer_add_str(w, "llama.rope.scaling.type", "linear");
        cake_gguf_writer_add_f32(w, "llama.rope.scaling.factor", linear);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        char *name = str_copy(t->name);
        cake_gguf_writer_add_tensor(w, name, t->type, t->n_dims, t->ne);
        free(name);
    }
    if (factors) {
        const uint64_t ne[1] = {(uint64_t)n};
        cake_gguf_writer_add_tensor(w, "rope_freqs.weight", CAKE_DTYPE_F32, 1, ne);
    }
    variant_fill fill = {g, factors};
    int rc = cake_gguf_writer_write_file(w, dst, fill_variant, &fill, err, sizeof(err));
    if (rc) fprintf(stderr, "write_variant: %s\n", err);
    assert_int_equal(rc, 0);
    cake_gguf_writer_free(w);
    cake_gguf_close(g);
}

/* First-token logits of a fixed 40-token prompt on the model at path. */
static float *first_logits(const char *path) {
    cake_model *m = NULL;
    char err[512];
    int rc = cake_model_load(path, &m, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    cake_token prompt[40];
    for (int i = 0; i < 40; i++) prompt[i] = 3 + (cake_token)(i * 7919 % 1000);
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
    float *plain = first_logits(base);
    write_variant(base, variant, NULL, 0, 2.0f);
    float *linear2 = first_logits(variant);
    write_variant(base, variant, twos, half, 0);
    float *factor2 = first_logits(variant);
    write_variant(base, variant, ones, half, 0);
    float *factor1 = first_logits(variant);
    write_variant(base, variant, llama31, half, 0);
    float *scaled = first_logits(variant);
    const size_t bytes = (size_t)n_vocab * sizeof(float);
    assert_memory_equal(factor2, linear2, bytes);
    assert_memory_equal(factor1, plain, bytes);
    assert_memory_not_equal(linear2, plain, bytes);
    assert_memory_not_equal(scaled, plain, bytes);
    assert_memory_not_equal(scaled, linear2, bytes);

    /* a zero factor, and one factor too few */
    twos[1] = 0.0f;
    write_variant(base, variant, twos, half, 0);
    assert_int_equal(cake_model_load(variant, &m, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "rope_freqs.weight"));
    write_variant(base, variant, ones, half - 1, 0);
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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_greedy_and_logits),
        cmocka_unit_test(test_chunked_prefill_stories),
        cmocka_unit_test(test_chunked_prefill_mkmodel),
        cmocka_unit_test(test_rope_freqs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
