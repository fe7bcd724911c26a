/* The forward pass against a peer implementation (llama2.c run.c golden ids
 * and logits on stories260K), and chunked prefill against one-shot prefill. */
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

/* The same on a GQA model made by `cake mkmodel --shape tiny` (F16 weights). */
static void test_chunked_prefill_mkmodel(void **state) {
    (void)state;
    char path[] = "/tmp/cake-test-tiny-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s mkmodel --shape tiny -o %s 2>/dev/null", CAKE_BIN, path);
    assert_int_equal(system(cmd), 0);
    cake_model *m = NULL;
    char err[512];
    int rc = cake_model_load(path, &m, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    check_chunk_invariance(m, 200, 8);
    cake_model_free(m);
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_greedy_and_logits),
        cmocka_unit_test(test_chunked_prefill_stories),
        cmocka_unit_test(test_chunked_prefill_mkmodel),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
