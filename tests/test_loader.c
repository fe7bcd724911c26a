/* The Cake loader: first-token logits bit-identical across compute, load and
 * cake modes, with holes, corrupt chunks, a dead or dying Redis, and a stress
 * run of random chunk presence, link speeds and faults. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>

#include "cake.h"
#include "engine/generate.h"
#include "loader/loader.h"
#include "store/chunk.h"
#include "test_store_common.h"
#include "testutil.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#else
#define SANITIZED 0
#endif

typedef struct {
    cake_model *m;
    cake_context *c;
    int n_vocab;
} fixture;

static int fixture_init_kv(fixture *f, const char *path, int n_ctx, enum cake_kv_type kv_type) {
    char err[512];
    memset(f, 0, sizeof(*f));
    if (cake_model_load(path, &f->m, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_threads = 2;
    cp.kv_type = kv_type;
    if (cake_context_init(f->m, cp, &f->c, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    f->n_vocab = cake_model_hparams(f->m)->n_vocab;
    return 0;
}

static int fixture_init(fixture *f, const char *path, int n_ctx) {
    return fixture_init_kv(f, path, n_ctx, CAKE_KV_F16);
}

static void fixture_free(fixture *f) {
    cake_context_free(f->c);
    cake_model_free(f->m);
}

/* One request (prefill + 1 greedy token) with the loader's params lp;
 * logits (n_vocab) of the first token. */
static cake_prefill_stats run_with(fixture *f, const cake_token *prompt, int n, int chunk,
                                   cake_prefill_params lp, float *logits, cake_token *first) {
    cake_sampler *s = cake_sampler_init((cake_sampler_params){.temperature = 0});
    cake_request r = {.prompt = prompt,
                      .n_prompt = n,
                      .n_predict = 1,
                      .chunk = chunk,
                      .eos = -1,
                      .sampler = s,
                      .first_logits = logits,
                      .loader = &lp};
    cake_request_stats st;
    char err[256];
    int rc = cake_request_run(f->c, &r, first, &st, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    if (lp.writeback) cake_writeback_drain(lp.writeback, 30000);
    cake_sampler_free(s);
    return st.prefill;
}

/* One request whose first n_cached positions are in the KV cache already. */
static cake_prefill_stats run_cached(fixture *f, const cake_token *prompt, int n, int n_cached,
                                     int chunk, cake_store *store, cake_writeback *wb,
                                     cake_mode mode, float *logits, cake_token *first) {
    cake_prefill_params lp = {
        .store = store, .writeback = wb, .mode = mode, .io_depth = 3, .n_cached = n_cached};
    return run_with(f, prompt, n, chunk, lp, logits, first);
}

static cake_prefill_stats run(fixture *f, const cake_token *prompt, int n, int chunk,
                              cake_store *store, cake_writeback *wb, cake_mode mode, float *logits,
                              cake_token *first) {
    return run_cached(f, prompt, n, 0, chunk, store, wb, mode, logits, first);
}

static void random_prompt(cake_token *t, int n, int n_vocab, uint64_t seed) {
    t[0] = 1;
    for (int i = 1; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = 3 + (cake_token)((seed >> 33) % (uint64_t)(n_vocab - 3));
    }
}

static cake_store *open_store(const char *uri) {
    cake_store *s = NULL;
    char err[256];
    if (cake_store_open(uri, &s, err, sizeof(err))) fprintf(stderr, "%s: %s\n", uri, err);
    assert_non_null(s);
    return s;
}

/* Keys of a prompt's full chunks, as the loader computes them. */
static void prompt_keys(fixture *f, const cake_token *p, int n, int chunk, cake_chunk_key *keys) {
    uint8_t fp[16];
    cake_model_fingerprint(f->m, fp);
    cake_key_chain(fp, (uint32_t)chunk, cake_context_kv_type(f->c), p, (size_t)n, keys);
}

static void assert_same(const float *a, const float *b, int n, const char *what) {
    if (memcmp(a, b, (size_t)n * sizeof(float))) {
        fprintf(stderr, "logits differ: %s\n", what);
        fail();
    }
}

/* compute-only (no store) vs compute/cake/load against a store that was
 * filled by the compute run's write-back; then with a hole and a corrupt chunk. */
static void check_modes(fixture *f, const char *uri, int n, int chunk) {
    cake_token *p = malloc((size_t)n * sizeof(cake_token));
    random_prompt(p, n, f->n_vocab, (uint64_t)n * 31 + (uint64_t)chunk);
    float *base = malloc((size_t)f->n_vocab * sizeof(float));
    float *got = malloc((size_t)f->n_vocab * sizeof(float));
    cake_token t0, t;
    run(f, p, n, chunk, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);

    cake_store *s = open_store(uri);
    char err[256];
    cake_writeback *wb = cake_writeback_create(s, 256, err, sizeof(err));
    assert_non_null(wb);
    const int n_loadable = cake_prefill_loadable_chunks(n, chunk);
    cake_prefill_stats st = run(f, p, n, chunk, s, wb, CAKE_MODE_COMPUTE, got, &t);
    assert_same(base, got, f->n_vocab, "compute with a store");
    cake_writeback_counters wc;
    cake_writeback_counters_get(wb, &wc);
    assert_true(wc.written + wc.already_present >= (uint64_t)n_loadable);

    const cake_mode modes[] = {CAKE_MODE_LOAD, CAKE_MODE_CAKE};
    for (int k = 0; k < 2; k++) {
        st = run(f, p, n, chunk, s, wb, modes[k], got, &t);
        printf("%s %s: %d computed, %d loaded, meet %d\n", uri, cake_mode_name(modes[k]),
               st.chunks_computed, st.chunks_loaded, st.meet_chunk);
        assert_same(base, got, f->n_vocab, cake_mode_name(modes[k]));
        assert_int_equal(t, t0);
        assert_int_equal(st.chunks_computed + st.chunks_loaded, st.chunks_total);
        assert_int_equal(st.chunks_missing, 0);
        assert_string_equal(st.store_error, "");
        if (modes[k] == CAKE_MODE_LOAD) assert_int_equal(st.chunks_loaded, n_loadable);
        /* After the loads, only what follows them is computed: the partial tail, or
         * for a prompt that ends on a chunk boundary its last token, again. */
        if (modes[k] == CAKE_MODE_LOAD)
            assert_int_equal(st.chunks_computed, n_loadable * chunk == n ? 0 : 1);
        assert_true(st.tail_ms > 0 || st.chunks_computed == st.chunks_total);
    }

    /* A hole and a corrupt chunk (one flipped payload byte) further up. */
    assert_true(n_loadable >= 3);
    const int hole = n_loadable / 3, bad = 2 * n_loadable / 3;
    cake_chunk_key *keys = calloc((size_t)n / chunk + 1, sizeof(*keys));
    prompt_keys(f, p, n, chunk, keys);
    assert_int_equal(cake_store_del(s, &keys[hole], err, sizeof(err)), 0);
    size_t cap = 64 << 20, len = 0;
    uint8_t *blob = malloc(cap);
    assert_int_equal(cake_store_get(s, &keys[bad], blob, cap, &len, err, sizeof(err)), 0);
    blob[len - 7] ^= 0x10;
    assert_int_equal(cake_store_put(s, &keys[bad], blob, len, err, sizeof(err)), 0);
    st = run(f, p, n, chunk, s, NULL, CAKE_MODE_LOAD, got, &t);
    assert_same(base, got, f->n_vocab, "load with a hole and a corrupt chunk");
    assert_int_equal(st.chunks_missing, 1);
    assert_int_equal(st.chunks_corrupt, 1);
    assert_int_equal(st.chunks_loaded, n_loadable - 2);
    char want[32];
    snprintf(want, sizeof(want), "chunk %d (key ", bad);
    assert_non_null(strstr(st.store_error, want)); /* the reason is kept, the chunk named once */
    assert_null(strstr(st.store_error + 1, "chunk "));
    /* (a get that missed without a reason: the chunk went since the lookup) */
    char why[64];
    cake_chunk_error(why, sizeof(why), 3, "");
    assert_string_equal(why, "chunk 3: gone since the lookup");
    cake_chunk_error(why, sizeof(why), 3, "redis down");
    assert_string_equal(why, "chunk 3: redis down");
    /* The corrupt chunk was removed by the store; put a hole and a corrupt one again for cake. */
    const int bad2 = n_loadable - 1 != bad ? n_loadable - 1 : 0;
    assert_int_equal(cake_store_get(s, &keys[bad2], blob, cap, &len, err, sizeof(err)), 0);
    blob[40] ^= 1; /* a header byte */
    assert_int_equal(cake_store_put(s, &keys[bad2], blob, len, err, sizeof(err)), 0);
    st = run(f, p, n, chunk, s, NULL, CAKE_MODE_CAKE, got, &t);
    assert_same(base, got, f->n_vocab, "cake with holes and a corrupt chunk");
    assert_int_equal(t, t0);

    free(blob);
    free(keys);
    cake_writeback_free(wb);
    cake_store_close(s);
    free(p);
    free(base);
    free(got);
}

/* A request whose KV cache holds a prefix from the request before (what a
 * server slot reuses): its cached positions are neither computed nor loaded
 * (down to the token, inside a chunk), the positions after them are
 * overwritten, and its logits are those of a fresh context, bit for bit, in
 * every mode. Claiming one position more than is shared makes them differ:
 * the cached positions are not computed again. */
/* The loader's compute model counts the keys each query sees: all before
 * it, or its window's in the windowed layers (Gemma 3's five in six) -
 * against a plain sum over the positions. */
static void test_chunk_flops_window(void **state) {
    (void)state;
    cake_hparams hp = {
        .dim = 64, .n_layers = 6, .n_heads = 4, .n_kv_heads = 2, .head_dim = 16, .ffn_dim = 192};
    const double per_key = 4.0 * hp.n_heads * hp.head_dim;
    const int cases[][3] = {{0, 100, 24}, {10, 7, 24}, {30, 64, 24}, {0, 1, 1}, {500, 256, 1024}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const int pos0 = cases[c][0], n = cases[c][1], w = cases[c][2];
        hp.sliding_window = 0;
        hp.swa_pattern = 0;
        const double plain = cake_chunk_flops(&hp, pos0, n);
        double all = 0, win = 0;
        for (int p = pos0; p < pos0 + n; p++) all += p + 1, win += p + 1 < w ? p + 1 : w;
        hp.sliding_window = w; /* every layer windowed */
        assert_true(fabs(plain - cake_chunk_flops(&hp, pos0, n) - 6 * per_key * (all - win)) < 1);
        hp.swa_pattern = 6; /* five of six */
        assert_true(fabs(plain - cake_chunk_flops(&hp, pos0, n) - 5 * per_key * (all - win)) < 1);
    }
}

/* A prompt of one token in chunks of one (fuzz_model found it): nothing is
 * cached, so load mode loads its chunk (then computes the token again) and
 * says so, rather than counting it as held by the KV cache. */
static void test_one_token_prompt(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    fixture f;
    assert_int_equal(fixture_init(&f, path, 64), 0);
    float *base = malloc((size_t)f.n_vocab * sizeof(float));
    float *got = malloc((size_t)f.n_vocab * sizeof(float));
    const cake_token p[1] = {1};
    cake_token t0, t;
    cake_store *s = open_store("mem:");
    char err[256];
    cake_writeback *wb = cake_writeback_create(s, 4, err, sizeof(err));
    assert_non_null(wb);
    cake_prefill_stats st = run(&f, p, 1, 1, s, wb, CAKE_MODE_COMPUTE, base, &t0);
    assert_int_equal(st.chunks_cached, 0);
    st = run(&f, p, 1, 1, s, NULL, CAKE_MODE_LOAD, got, &t);
    assert_int_equal(st.chunks_loaded, 1);
    assert_int_equal(st.chunks_cached, 0);
    assert_same(base, got, f.n_vocab, "one token, loaded");
    assert_int_equal(t, t0);
    cake_writeback_free(wb);
    cake_store_close(s);
    free(base);
    free(got);
    fixture_free(&f);
    unlink(path);
}

/* A request run on a thread of its own (as another slot's). */
typedef struct {
    fixture *f;
    const cake_token *prompt;
    int n, chunk;
    cake_prefill_params lp;
    float *logits;
    cake_token first;
    cake_prefill_stats st;
} follower;

static void *follower_main(void *arg) {
    follower *w = arg;
    w->st = run_with(w->f, w->prompt, w->n, w->chunk, w->lp, w->logits, &w->first);
    return NULL;
}

/* Chunks computed while a slow lookup runs, with other requests about
 * (cake_inflight): each is promised while computed, so that a request
 * with the same prefix waits for it rather than computing it too; one that
 * another request is computing stops the overlap (the plan awaits it).
 * Prompt p (of n) is in the store (s, with a lookup slower than a chunk). */
static void check_promised_early(fixture *f, const cake_token *p, int n, int chunk, cake_store *s,
                                 cake_writeback *wb, const float *base) {
    float *got = malloc((size_t)f->n_vocab * sizeof(float));
    cake_inflight *reg = cake_inflight_create();
    cake_chunk_key keys[16];
    prompt_keys(f, p, n, chunk, keys);
    const cake_prefill_params lp = {
        .store = s, .writeback = wb, .mode = CAKE_MODE_CAKE, .io_depth = 3, .inflight = reg};
    /* chunk 0 promised by another: nothing computed during the lookup; the
     * promise ends, and the chunk (in the store) is loaded */
    int8_t r;
    cake_inflight_promise(reg, &keys[0], 1, &r);
    assert_int_equal(r, 1);
    follower run = {.f = f, .prompt = p, .n = n, .chunk = chunk, .lp = lp, .logits = got};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, follower_main, &run), 0);
    usleep(20000);
    cake_inflight_release(reg, &keys[0]);
    pthread_join(th, NULL);
    assert_same(base, got, f->n_vocab, "chunk 0 promised by another");
    assert_int_equal(run.st.chunks_during_lookup, 0);
    /* alone: its chunks computed during the lookup are promised meanwhile
     * (seen from here), and no promise is left after it */
    int seen = 0;
    run = (follower){.f = f, .prompt = p, .n = n, .chunk = chunk, .lp = lp, .logits = got};
    assert_int_equal(pthread_create(&th, NULL, follower_main, &run), 0);
    for (int k = 0; k < 200 && !seen; k++) {
        seen = cake_inflight_pending(reg, &keys[0]);
        usleep(1000);
    }
    pthread_join(th, NULL);
    assert_same(base, got, f->n_vocab, "chunks promised while computed during the lookup");
    assert_true(run.st.chunks_during_lookup >= 1);
    assert_true(seen);
    for (int i = 0; i < 6; i++) assert_int_equal(cake_inflight_pending(reg, &keys[i]), 0);
    cake_inflight_free(reg);
    free(got);
}

/* A store whose lookups take longer than a chunk's compute (lat=): Cake
 * computes chunks from the front while the lookup runs, instead of waiting
 * for it, and the logits stay those of compute-only; chunks computed so
 * that the store lacks are written back (all of them here: the tiny
 * model computes the whole prompt within one lookup, which is then not
 * waited for). A store that answers at once: nothing is computed during
 * the lookup. */
static void test_compute_during_lookup(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    fixture f;
    assert_int_equal(fixture_init(&f, path, 256), 0);
    enum { N = 200, C = 32, LOADABLE = 6 };
    float *base = malloc((size_t)f.n_vocab * sizeof(float));
    float *got = malloc((size_t)f.n_vocab * sizeof(float));
    cake_token p[N], q[N], t0, t;
    random_prompt(p, N, f.n_vocab, 77);
    random_prompt(q, N, f.n_vocab, 78);
    char err[256];
    for (int slow = 1; slow >= 0; slow--) {
        cake_store *s = open_store(slow ? "mem:?lat=100" : "mem:");
        cake_writeback *wb = cake_writeback_create(s, 16, err, sizeof(err));
        assert_non_null(wb);
        /* compute-only fills the store (the engine's speed is known from
         * then on), a Cake run learns the store's lookup time */
        run(&f, p, N, C, s, wb, CAKE_MODE_COMPUTE, base, &t0);
        cake_prefill_stats st = run(&f, p, N, C, s, wb, CAKE_MODE_CAKE, got, &t);
        assert_same(base, got, f.n_vocab, "cake, first run");
        assert_true(slow ? cake_store_lookup_ns(s) >= 100000000u : cake_store_lookup_ns(s) > 0);
        st = run(&f, p, N, C, s, wb, CAKE_MODE_CAKE, got, &t);
        assert_same(base, got, f.n_vocab, "cake, chunks computed during the lookup");
        assert_int_equal(t, t0);
        if (slow ? st.chunks_during_lookup < 1 : st.chunks_during_lookup != 0)
            fail_msg("%s store: %d chunks computed during the lookup", slow ? "slow" : "fast",
                     st.chunks_during_lookup);
        assert_int_equal(st.chunks_computed + st.chunks_loaded, LOADABLE + 1);
        /* a prompt the store lacks: what is computed during the lookup goes
         * to the store as any computed chunk */
        run(&f, q, N, C, s, NULL, CAKE_MODE_COMPUTE, base, &t0);
        st = run(&f, q, N, C, s, wb, CAKE_MODE_CAKE, got, &t);
        assert_same(base, got, f.n_vocab, "cake, a new prompt");
        assert_true(slow ? st.chunks_during_lookup >= 1 : st.chunks_during_lookup == 0);
        st = run(&f, q, N, C, s, NULL, CAKE_MODE_LOAD, got, &t);
        assert_int_equal(st.chunks_loaded, LOADABLE);
        assert_same(base, got, f.n_vocab, "load, what the cake run wrote");
        if (slow) check_promised_early(&f, q, N, C, s, wb, base);
        cake_writeback_free(wb);
        cake_store_close(s);
    }
    free(base);
    free(got);
    fixture_free(&f);
    unlink(path);
}

static void test_cached_prefix(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    fixture fresh, reused;
    assert_int_equal(fixture_init(&fresh, path, 512), 0);
    assert_int_equal(fixture_init(&reused, path, 512), 0);
    enum { C = 16, NA = 100, SHARED = 70, NB = 120 };
    cake_token a[NA], b[NB + 8];
    random_prompt(a, NA, fresh.n_vocab, 7);
    random_prompt(b, NB + 8, fresh.n_vocab, 8);
    memcpy(b, a, SHARED * sizeof(cake_token));
    float *base = malloc((size_t)fresh.n_vocab * sizeof(float));
    float *got = malloc((size_t)fresh.n_vocab * sizeof(float));
    cake_token t0, t;
    cake_store *s = open_store("mem:");
    char err[256];
    cake_writeback *wb = cake_writeback_create(s, 64, err, sizeof(err));
    assert_non_null(wb);
    const cake_mode modes[] = {CAKE_MODE_COMPUTE, CAKE_MODE_LOAD, CAKE_MODE_CAKE};
    for (int k = 0; k < 3; k++) {
        /* b, then b cut at a chunk boundary (every chunk cached: the last
         * token is computed again) */
        const int nb = k == 2 ? 112 : NB;
        run(&fresh, b, nb, C, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);
        run(&reused, a, NA, C, s, wb, CAKE_MODE_COMPUTE, got, &t);
        cake_prefill_stats st = run_cached(&reused, b, nb, SHARED, C, s, wb, modes[k], got, &t);
        assert_same(base, got, fresh.n_vocab, cake_mode_name(modes[k]));
        assert_int_equal(t, t0);
        assert_int_equal(st.chunks_cached, SHARED / C);
        assert_int_equal(st.chunks_cached + st.chunks_computed + st.chunks_loaded, st.chunks_total);
        /* from the position after the shared ones (less what was loaded) */
        if (modes[k] == CAKE_MODE_COMPUTE) assert_int_equal(st.tokens_computed, nb - SHARED);
        assert_true(st.tokens_computed <= nb - SHARED && st.tokens_computed > 0);
        /* the whole of b is cached now (its KV from the run just done): only
         * its last token is computed, for the logits */
        st = run_cached(&reused, b, nb, nb, C, s, wb, modes[k], got, &t);
        assert_same(base, got, fresh.n_vocab, "all cached");
        assert_int_equal(st.chunks_cached, cake_prefill_loadable_chunks(nb, C));
        assert_int_equal(st.chunks_loaded, 0);
        assert_int_equal(st.chunks_computed, nb % C ? 1 : 0);
        assert_int_equal(st.tokens_computed, 1);
    }
    /* One position too many claimed: a's token at SHARED stays in the KV. */
    assert_true(a[SHARED] != b[SHARED]);
    run(&reused, a, NA, C, NULL, NULL, CAKE_MODE_COMPUTE, got, &t);
    run_cached(&reused, b, NB, SHARED + 1, C, NULL, NULL, CAKE_MODE_COMPUTE, got, &t);
    run(&fresh, b, NB, C, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);
    assert_true(memcmp(base, got, (size_t)fresh.n_vocab * sizeof(float)) != 0);
    cake_writeback_free(wb);
    cake_store_close(s);
    free(base);
    free(got);
    fixture_free(&fresh);
    fixture_free(&reused);
    unlink(path);
}

static void test_stories_modes(void **state) {
    (void)state;
    const char *path = test_model_path("stories260K.gguf");
    if (!path) skip();
    fixture f;
    assert_int_equal(fixture_init(&f, path, 512), 0);
    check_modes(&f, "mem:", 470, 32);
    check_modes(&f, "mem:", 448, 32); /* ends on a chunk boundary */
    char *dir = t_mkdtemp(), uri[512];
    snprintf(uri, sizeof(uri), "file:%s", dir);
    check_modes(&f, uri, 470, 32);
    t_rm_rf(dir);
    free(dir);
    fixture_free(&f);
}

/* Q8_0 and Q4_0 KV caches (tiny-256: head_dim 64): the same bits in every
 * mode, a hole and a corrupt chunk, in a RAM and (but under the sanitizers)
 * a file store (Q4_0 once with chunks of 16 tokens, installed side by side
 * into key blocks of 64 positions); and their chunks are 34/64 and 18/64 of
 * f16's bytes. */
static void test_quantized_modes(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny-256", "f16", path), 0);
    for (int q4 = 0; q4 < 2; q4++) {
        const enum cake_kv_type type = q4 ? CAKE_KV_Q4_0 : CAKE_KV_Q8_0;
        fixture f;
        assert_int_equal(fixture_init_kv(&f, path, 512, type), 0);
        check_modes(&f, "mem:", 470, q4 ? 16 : 32);
        if (!SANITIZED) { /* the same threads and kernels as the first (slow under sanitizers) */
            check_modes(&f, "mem:", 448, 32);
            char *dir = t_mkdtemp(), uri[512];
            snprintf(uri, sizeof(uri), "file:%s", dir);
            check_modes(&f, uri, 470, 32);
            t_rm_rf(dir);
            free(dir);
        }
        const cake_hparams *hp = cake_model_hparams(f.m);
        const uint32_t L = (uint32_t)hp->n_layers, H = (uint32_t)hp->n_kv_heads,
                       D = (uint32_t)hp->head_dim;
        assert_true(cake_chunk_payload_size(32, L, H, D, type) * 64 ==
                    cake_chunk_payload_size(32, L, H, D, CAKE_KV_F16) * (q4 ? 18 : 34));
        fixture_free(&f);
    }
    unlink(path);
}

/* The mha-160m shape (MHA, 12 layers) with a 4096-token prompt and chunk 256
 * (136 tokens in chunks of 32 under the sanitizers). */
static void test_mha160m_modes(void **state) {
    (void)state;
    char path[] = "/tmp/cake-test-mha-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s mkmodel --shape mha-160m -o %s 2>/dev/null", CAKE_BIN, path);
    assert_int_equal(system(cmd), 0);
    fixture f;
    /* Under the sanitizers the kernels run ~200x slower (ASan checks every
     * 64-byte vector access in a call: a 136-token prefill took 30 s on a
     * 2-core Xeon VM): 4 chunks of 8 and a partial one still cover every
     * path (holes, a corrupt chunk, each mode). */
    const int n = SANITIZED ? 36 : 4096, chunk = SANITIZED ? 8 : 256;
    assert_int_equal(fixture_init(&f, path, n + 8), 0);
    char *dir = t_mkdtemp(), uri[512];
    snprintf(uri, sizeof(uri), "file:%s", dir);
    check_modes(&f, uri, n, chunk);
    t_rm_rf(dir);
    free(dir);
    fixture_free(&f);
    unlink(path);
}

typedef struct {
    t_redis *r;
    int after_ms;
} killer;

static void *kill_later(void *arg) {
    killer *k = arg;
    usleep((useconds_t)k->after_ms * 1000);
    t_redis_stop(k->r);
    return NULL;
}

/* Redis down from the start, and Redis killed in the middle of a request. */
static void test_redis_faults(void **state) {
    (void)state;
    const char *path = test_model_path("stories260K.gguf");
    if (!path || !t_redis_available()) {
        fprintf(stderr, "skip: stories260K.gguf or redis-server missing\n");
        skip();
    }
    fixture f;
    assert_int_equal(fixture_init(&f, path, 512), 0);
    const int n = 470, chunk = 32;
    cake_token p[470], t0, t;
    random_prompt(p, n, f.n_vocab, 99);
    float *base = malloc((size_t)f.n_vocab * sizeof(float));
    float *got = malloc((size_t)f.n_vocab * sizeof(float));
    run(&f, p, n, chunk, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);

    /* Down from the start: a port nobody listens on. */
    char uri[384];
    snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d?timeout=200", t_free_port());
    cake_store *dead = open_store(uri);
    char err[256];
    cake_writeback *wb = cake_writeback_create(dead, 64, err, sizeof(err));
    cake_prefill_stats st = run(&f, p, n, chunk, dead, wb, CAKE_MODE_CAKE, got, &t);
    assert_same(base, got, f.n_vocab, "redis down");
    assert_int_equal(st.chunks_loaded, 0);
    assert_non_null(strstr(st.store_error, "lookup: "));
    cake_writeback_drain(wb, 30000);
    cake_writeback_counters wc;
    cake_writeback_counters_get(wb, &wc);
    assert_true(wc.failed > 0);
    assert_true(wc.first_error[0] != '\0');
    cake_writeback_free(wb);
    cake_store_close(dead);

    /* Killed mid-request: fill it, then load over a slow emulated link and kill it. */
    t_redis r = {0};
    assert_int_equal(t_redis_start(&r, 0), 0);
    snprintf(uri, sizeof(uri), "%s?timeout=300", r.uri);
    cake_store *s = open_store(uri);
    wb = cake_writeback_create(s, 64, err, sizeof(err));
    run(&f, p, n, chunk, s, wb, CAKE_MODE_COMPUTE, got, &t);
    cake_writeback_free(wb);
    cake_store_close(s);
    snprintf(uri, sizeof(uri), "%s?timeout=300&bw=20Mbit", r.uri); /* ~8 ms per chunk */
    s = open_store(uri);
    killer k = {&r, 30};
    pthread_t th;
    pthread_create(&th, NULL, kill_later, &k);
    st = run(&f, p, n, chunk, s, NULL, CAKE_MODE_LOAD, got, &t);
    pthread_join(th, NULL);
    printf("redis killed mid-request: %d loaded, %d corrupt/failed, %d computed\n",
           st.chunks_loaded, st.chunks_corrupt, st.chunks_computed);
    assert_same(base, got, f.n_vocab, "redis killed mid-request");
    assert_int_equal(t, t0);
    assert_true(st.chunks_loaded < cake_prefill_loadable_chunks(n, chunk));
    cake_store_close(s);
    t_redis_stop(&r);
    free(base);
    free(got);
    fixture_free(&f);
}

/* 1,000 requests on a tiny GQA model: random prompts sharing prefixes, random
 * chunk presence (evictions), random corrupt chunks, random link speeds and
 * I/O depths, random modes. Every first token's logits must equal compute-only. */
static void test_stress(void **state) {
    (void)state;
    char path[] = "/tmp/cake-test-stress-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s mkmodel --shape tiny -o %s 2>/dev/null", CAKE_BIN, path);
    assert_int_equal(system(cmd), 0);
    fixture f;
    assert_int_equal(fixture_init(&f, path, 256), 0);
    const int chunk = 8, n_requests = SANITIZED ? 200 : 1000;
    const char *uris[] = {"mem:", "mem:?bw=2Gbit", "mem:?bw=200Mbit&lat=0.2", "mem:?bw=50Mbit"};
    cake_store *stores[4];
    for (int i = 0; i < 4; i++) stores[i] = open_store(uris[i]);
    char err[256];
    float *base = malloc((size_t)f.n_vocab * sizeof(float));
    float *got = malloc((size_t)f.n_vocab * sizeof(float));
    uint8_t *blob = malloc(1 << 20);
    uint64_t rng = 7;
    int loaded = 0, corrupt = 0;
    for (int q = 0; q < n_requests; q++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        const int si = (int)((rng >> 33) % 4), n = 9 + (int)((rng >> 40) % 120);
        cake_store *s = stores[si];
        cake_token p[128], t, t0;
        random_prompt(p, n, f.n_vocab, (rng >> 50) % 5); /* 5 prompt families: shared prefixes */
        cake_writeback *wb = cake_writeback_create(s, 8, err, sizeof(err));
        /* faults: evict or corrupt a random chunk of this prompt */
        cake_chunk_key keys[16];
        prompt_keys(&f, p, n, chunk, keys);
        const int nk = n / chunk, victim = nk ? (int)((rng >> 20) % (uint64_t)nk) : 0;
        if (nk && (rng & 3) == 0) cake_store_del(s, &keys[victim], err, sizeof(err));
        size_t len;
        if (nk && (rng & 3) == 1 &&
            cake_store_get(s, &keys[victim], blob, 1 << 20, &len, err, sizeof(err)) == 0) {
            blob[(rng >> 8) % len] ^= (uint8_t)(1 + (rng >> 16) % 255);
            cake_store_put(s, &keys[victim], blob, len, err, sizeof(err));
        }
        const cake_mode mode = (cake_mode)((rng >> 12) % 3);
        cake_prefill_stats st = run(&f, p, n, chunk, s, wb, mode, got, &t);
        run(&f, p, n, chunk, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);
        if (memcmp(base, got, (size_t)f.n_vocab * sizeof(float))) {
            fprintf(stderr, "request %d (%s, %s, %d tokens): logits differ\n", q, uris[si],
                    cake_mode_name(mode), n);
            fail();
        }
        assert_int_equal(t, t0);
        loaded += st.chunks_loaded;
        corrupt += st.chunks_corrupt;
        cake_writeback_free(wb);
    }
    printf("stress: %d requests, %d chunks loaded, %d corrupt chunks caught\n", n_requests, loaded,
           corrupt);
    assert_true(loaded > 0);
    assert_true(corrupt > 0);
    for (int i = 0; i < 4; i++) cake_store_close(stores[i]);
    free(blob);
    free(base);
    free(got);
    fixture_free(&f);
    unlink(path);
}

/* ---- an engine shared with other requests (a server's scheduler) ---- */

typedef struct {
    int grant;           /* the engine has room for the compute side */
    int turns;           /* wait_turn calls */
    int tokens[3];       /* computed, by cake_pass_kind */
    uint64_t timeout_ns; /* of the last wait_turn */
} busy_engine;

static int busy_forward(void *ud, cake_context *c, cake_pass_kind kind, const cake_token *t, int n,
                        cake_pos pos0, float *logits, char *err, size_t errlen) {
    busy_engine *b = ud;
    b->tokens[kind] += n;
    return cake_forward(c, t, n, pos0, logits, err, errlen);
}

static int busy_turn(void *ud, cake_context *c, int n, uint64_t timeout_ns) {
    (void)c, (void)n;
    busy_engine *b = ud;
    b->turns++;
    b->timeout_ns = timeout_ns;
    if (b->grant) return 1;
    nanosleep(&(struct timespec){0, (long)timeout_ns}, NULL);
    return 0;
}

static cake_prefill_stats run_busy(fixture *f, const cake_token *prompt, int n, cake_store *store,
                                   busy_engine *b, float *logits) {
    cake_sampler *s = cake_sampler_init((cake_sampler_params){.temperature = 0});
    cake_prefill_params lp = {.store = store, .mode = CAKE_MODE_CAKE, .io_depth = 2};
    cake_request r = {.prompt = prompt,
                      .n_prompt = n,
                      .n_predict = 1,
                      .chunk = 16,
                      .eos = -1,
                      .sampler = s,
                      .first_logits = logits,
                      .loader = &lp,
                      .forward = busy_forward,
                      .forward_turn = busy_turn,
                      .forward_ud = b};
    cake_request_stats st;
    cake_token first;
    char err[256];
    const int rc = cake_request_run(f->c, &r, &first, &st, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    cake_sampler_free(s);
    return st.prefill;
}

/* Through a request's forward hooks, each pass is classed (the compute side
 * of a cached prompt, or a prefill: the tail after the loads is one), and
 * the compute side waits for a turn before it claims a chunk: an engine
 * that never has room leaves every chunk to the loads, and the result is
 * the same bits. */
static void test_busy_engine(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    fixture f;
    assert_int_equal(fixture_init(&f, path, 512), 0);
    enum { C = 16, N = 10 * C + 5 };
    cake_token p[N], t0, t;
    random_prompt(p, N, f.n_vocab, 99);
    float *base = malloc((size_t)f.n_vocab * sizeof(float));
    float *got = malloc((size_t)f.n_vocab * sizeof(float));
    run(&f, p, N, C, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);

    /* no store: every pass is an ordinary prefill, no turn is asked for */
    busy_engine b = {.grant = 1};
    cake_prefill_stats st = run_busy(&f, p, N, NULL, &b, got);
    assert_same(base, got, f.n_vocab, "hooks, no store");
    assert_int_equal(b.tokens[CAKE_PASS_PREFILL], N);
    assert_int_equal(b.tokens[CAKE_PASS_CAKE] + b.tokens[CAKE_PASS_DECODE], 0);
    assert_int_equal(b.turns, 0);

    cake_store *s = open_store("mem:?lat=20");
    char err[256];
    cake_writeback *wb = cake_writeback_create(s, 64, err, sizeof(err));
    run(&f, p, N, C, s, wb, CAKE_MODE_COMPUTE, got, &t);
    cake_writeback_free(wb); /* drained: the store holds the 10 chunks */

    /* never room: every chunk is loaded, the tail computed as a prefill */
    b = (busy_engine){.grant = 0};
    st = run_busy(&f, p, N, s, &b, got);
    assert_same(base, got, f.n_vocab, "no turn");
    assert_int_equal(st.chunks_loaded, 10);
    assert_int_equal(st.chunks_computed, 1);
    assert_int_equal(b.tokens[CAKE_PASS_CAKE], 0);
    assert_int_equal(b.tokens[CAKE_PASS_PREFILL], N - 10 * C);
    assert_true(b.turns >= 1 && b.timeout_ns > 0);
    assert_true(st.turn_wait_ms > 0);

    /* always room: chunks computed before the meet are the Cake class, but
     * those computed while the lookup ran (lat=20 is longer than a chunk's
     * compute), which were a plain prefill then */
    b = (busy_engine){.grant = 1};
    st = run_busy(&f, p, N, s, &b, got);
    assert_same(base, got, f.n_vocab, "always a turn");
    assert_int_equal(b.tokens[CAKE_PASS_CAKE] + b.tokens[CAKE_PASS_PREFILL] + C * st.chunks_loaded,
                     N);
    assert_int_equal(b.tokens[CAKE_PASS_CAKE],
                     C * (st.chunks_computed - 1 - st.chunks_during_lookup));
    assert_true(b.turns >= st.chunks_computed - 1);

    cake_store_close(s);
    free(base);
    free(got);
    fixture_free(&f);
    unlink(path);
}

/* ---- chunks another request is computing (cake_inflight) ---- */

static void promise_all(cake_inflight *reg, const cake_chunk_key *keys, int n) {
    int8_t got[16];
    cake_inflight_promise(reg, keys, n, got);
    for (int i = 0; i < n; i++) assert_int_equal(got[i], 1);
}

/* A request that finds its chunks promised by another waits for them and
 * loads them as the other's write-back puts them in the store; a promise
 * that ends without the chunk, or never ends, leaves it to compute (and
 * to promise in turn, to a third request). The
 * same bits every time. The "other" is played here: it promises, and queues
 * each chunk's write-back from a context that computed the prompt. */
static void test_awaited_chunks(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    fixture other, f;
    assert_int_equal(fixture_init(&other, path, 512), 0);
    assert_int_equal(fixture_init(&f, path, 512), 0); /* no compute speed known yet */
    enum { C = 16, N = 6 * C + 4, L = 6 };
    cake_token p[N], t0, t;
    random_prompt(p, N, f.n_vocab, 5);
    float *base = malloc((size_t)f.n_vocab * sizeof(float));
    float *got = malloc((size_t)f.n_vocab * sizeof(float));
    run(&other, p, N, C, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0); /* its KV: the chunks */
    cake_loader_engine e;
    cake_context_loader_engine(other.c, 1, &e);
    cake_chunk_key keys[L + 1];
    prompt_keys(&f, p, N, C, keys);

    cake_inflight *reg = cake_inflight_create();
    assert_non_null(reg);
    cake_store *s = open_store("mem:");
    char err[256];
    cake_writeback *wb = cake_writeback_create(s, 64, err, sizeof(err));
    promise_all(reg, keys, L);
    memset(&keys[L], 0xab, sizeof(keys[L])); /* a key nobody holds */
    int8_t again[3];
    cake_inflight_promise(reg, keys + L - 2, 3, again); /* two held, one new */
    assert_int_equal(again[0], 0);
    assert_int_equal(again[1], 0);
    assert_int_equal(again[2], 1);
    cake_inflight_release(reg, &keys[L]);
    const cake_prefill_params lp = {
        .store = s, .mode = CAKE_MODE_CAKE, .io_depth = 2, .inflight = reg};

    /* the chunks come, one by one, after the request has looked them up */
    follower w = {.f = &f, .prompt = p, .n = N, .chunk = C, .lp = lp, .logits = got};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, follower_main, &w), 0);
    usleep(30000);
    for (int i = 0; i < L; i++) {
        const cake_chunk_header h =
            cake_chunk_header_for(e.fingerprint, &keys[i], (uint32_t)i, C, e.hp, e.kv_type);
        assert_int_equal(cake_writeback_enqueue(wb, &e, &h, i * C, 1, reg), 0);
        usleep(5000);
    }
    pthread_join(th, NULL);
    assert_same(base, got, f.n_vocab, "awaited chunks");
    assert_int_equal(w.first, t0);
    assert_int_equal(w.st.chunks_awaited, L);
    assert_int_equal(w.st.chunks_loaded, L);
    assert_int_equal(w.st.chunks_computed, 1); /* the tail */
    assert_true(w.st.await_ms > 0);
    for (int i = 0; i < L; i++) assert_int_equal(cake_inflight_pending(reg, &keys[i]), 0);

    /* promises that end without their chunks: computed */
    random_prompt(p, N, f.n_vocab, 6);
    run(&other, p, N, C, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);
    prompt_keys(&f, p, N, C, keys);
    promise_all(reg, keys, L);
    w = (follower){.f = &f, .prompt = p, .n = N, .chunk = C, .lp = lp, .logits = got};
    assert_int_equal(pthread_create(&th, NULL, follower_main, &w), 0);
    usleep(20000);
    for (int i = 0; i < L; i++) cake_inflight_release(reg, &keys[i]);
    pthread_join(th, NULL);
    assert_same(base, got, f.n_vocab, "promises ended");
    assert_int_equal(w.st.chunks_awaited, 0);
    assert_int_equal(w.st.chunks_computed, L + 1);

    /* promises that never end (a stalled request): each chunk is waited
     * for about twice its compute time (known now), then computed */
    promise_all(reg, keys, L);
    cake_prefill_stats st = run_with(&f, p, N, C, lp, got, &t);
    assert_same(base, got, f.n_vocab, "promises stalled");
    assert_int_equal(st.chunks_computed, L + 1);
    assert_true(st.await_ms >= L * 50.0);
    /* a store that fails its lookup: nothing is awaited (it would neither
     * keep nor give the chunks), and the promises held stay the holder's */
    cake_store *dead = open_store("redis://127.0.0.1:1?timeout=100");
    cake_prefill_params dead_lp = lp;
    dead_lp.store = dead;
    st = run_with(&f, p, N, C, dead_lp, got, &t);
    assert_same(base, got, f.n_vocab, "store down");
    assert_int_equal(st.chunks_computed, L + 1);
    assert_true(st.await_ms == 0);
    assert_true(st.store_error[0] != 0);
    for (int i = 0; i < L; i++) assert_int_equal(cake_inflight_pending(reg, &keys[i]), 1);
    cake_store_close(dead);
    for (int i = 0; i < L; i++) cake_inflight_release(reg, &keys[i]);

    /* two requests await chunks whose promise ends without them: the first
     * to see it promises them in turn and computes them, the other awaits
     * and loads them (new contexts: no compute speed known, no early end) */
    random_prompt(p, N, f.n_vocab, 7);
    run(&other, p, N, C, NULL, NULL, CAKE_MODE_COMPUTE, base, &t0);
    prompt_keys(&f, p, N, C, keys);
    promise_all(reg, keys, L);
    fixture fa, fb;
    assert_int_equal(fixture_init(&fa, path, 512), 0);
    assert_int_equal(fixture_init(&fb, path, 512), 0);
    float *got_b = malloc((size_t)f.n_vocab * sizeof(float));
    cake_writeback *wa = cake_writeback_create(s, 64, err, sizeof(err));
    cake_writeback *wbb = cake_writeback_create(s, 64, err, sizeof(err));
    follower a = {.f = &fa, .prompt = p, .n = N, .chunk = C, .lp = lp, .logits = got};
    follower b = {.f = &fb, .prompt = p, .n = N, .chunk = C, .lp = lp, .logits = got_b};
    a.lp.writeback = wa;
    b.lp.writeback = wbb;
    pthread_t tb;
    assert_int_equal(pthread_create(&th, NULL, follower_main, &a), 0);
    assert_int_equal(pthread_create(&tb, NULL, follower_main, &b), 0);
    usleep(20000);
    for (int i = 0; i < L; i++) cake_inflight_release(reg, &keys[i]);
    pthread_join(th, NULL);
    pthread_join(tb, NULL);
    assert_same(base, got, f.n_vocab, "taken over, a");
    assert_same(base, got_b, f.n_vocab, "taken over, b");
    assert_int_equal(a.st.chunks_computed + b.st.chunks_computed, L + 2);
    assert_int_equal(a.st.chunks_awaited + b.st.chunks_awaited, L);
    for (int i = 0; i < L; i++) assert_int_equal(cake_inflight_pending(reg, &keys[i]), 0);
    cake_writeback_free(wa);
    cake_writeback_free(wbb);
    free(got_b);
    fixture_free(&fa);
    fixture_free(&fb);

    cake_writeback_free(wb);
    cake_store_close(s);
    cake_inflight_free(reg);
    free(base);
    free(got);
    fixture_free(&other);
    fixture_free(&f);
    unlink(path);
}

/* ---- a prompt that ends on a chunk boundary, on an engine that is not
 * batch-invariant: the CPU engine, made to give a token computed alone other
 * bits (the lowest bit of its K and V flipped, its logits nudged up), as
 * cuBLAS may on the GPU. ---- */

typedef struct {
    cake_loader_engine inner;
    int alone_calls; /* compute calls of one token */
    int hold_ms;     /* how long such a call keeps its own bits in the KV cache */
} variant_engine;

static int variant_install(void *self, const void *blob, const cake_chunk_header *h, int pos0,
                           char *err, size_t errlen) {
    const variant_engine *v = self;
    return v->inner.install(v->inner.self, blob, h, pos0, err, errlen);
}

static int variant_extract(void *self, cake_chunk_header *h, int pos0, void *blob, size_t cap,
                           char *err, size_t errlen) {
    const variant_engine *v = self;
    return v->inner.extract(v->inner.self, h, pos0, blob, cap, err, errlen);
}

/* The KV of positions [pos0, pos0 + n) as a blob (malloc'ed). */
static uint8_t *kv_blob(const cake_loader_engine *e, int pos0, int n, size_t *size) {
    cake_chunk_header h = cake_chunk_header_for(e->fingerprint, &(cake_chunk_key){{0}}, 0,
                                                (uint32_t)n, e->hp, e->kv_type);
    *size = cake_chunk_blob_size(&h);
    uint8_t *blob = malloc(*size);
    char err[256];
    assert_non_null(blob);
    assert_int_equal(e->extract(e->self, &h, pos0, blob, *size, err, sizeof(err)), 0);
    return blob;
}

static int variant_compute(void *self, const cake_token *t, int n, int pos0, float *logits,
                           char *err, size_t errlen) {
    variant_engine *v = self;
    if (v->inner.compute(v->inner.self, t, n, pos0, logits, err, errlen)) return -1;
    if (n > 1) return 0;
    v->alone_calls++;
    size_t size;
    uint8_t *blob = kv_blob(&v->inner, pos0, 1, &size);
    for (size_t b = CAKE_CHUNK_HEADER_SIZE; b < size; b += 2) blob[b] ^= 1; /* f16, little-endian */
    cake_chunk_header h;
    assert_int_equal(cake_chunk_parse_header(blob, size, &h, err, errlen), 0);
    const int rc = v->inner.install(v->inner.self, blob, &h, pos0, err, errlen);
    free(blob);
    nanosleep(&(struct timespec){0, v->hold_ms * 1000000L}, NULL);
    if (logits)
        for (int i = 0; i < v->inner.hp->n_vocab; i++) logits[i] = nextafterf(logits[i], INFINITY);
    return rc;
}

static void variant_prefill(const cake_loader_engine *e, const cake_token *p, int n, int chunk,
                            cake_store *s, cake_writeback *wb, cake_mode mode, float *logits,
                            cake_prefill_stats *st) {
    cake_prefill_params lp = {
        .store = s, .writeback = wb, .mode = mode, .chunk = chunk, .io_depth = 3};
    char err[256];
    const int rc = cake_prefill(e, p, n, &lp, logits, st, NULL, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    if (wb) assert_int_equal(cake_writeback_drain(wb, 30000), 0);
}

/* Every mode computes the last token again, alone, and takes the logits from
 * that call; the KV cache and the store keep the chunk's own bits. */
static void test_batch_variant_boundary(void **state) {
    (void)state;
    const char *path = test_model_path("stories260K.gguf");
    if (!path) skip();
    fixture f;
    const int chunk = 32, n = 14 * chunk;
    assert_int_equal(fixture_init(&f, path, 512), 0);
    cake_token p[14 * 32];
    random_prompt(p, n, f.n_vocab, 77);
    const size_t nv = (size_t)f.n_vocab;
    float *base = malloc(nv * sizeof(float)), *first = malloc(nv * sizeof(float)),
          *got = malloc(nv * sizeof(float));
    variant_engine v = {0};
    cake_context_loader_engine(f.c, 1, &v.inner);
    assert_true(v.inner.batch_invariant);
    cake_loader_engine e = v.inner;
    e.self = &v;
    e.compute = variant_compute;
    e.install = variant_install;
    e.extract = variant_extract;
    e.batch_invariant = false;

    /* The CPU engine as it is: the chunks' KV and the logits of the last chunk. */
    cake_prefill_stats st;
    variant_prefill(&v.inner, p, n, chunk, NULL, NULL, CAKE_MODE_COMPUTE, base, &st);
    size_t kv_size, size;
    uint8_t *kv = kv_blob(&v.inner, 0, n, &kv_size), *now;

    /* The store's 5 ms a request keep the write-back busy with the first
     * chunks while the last token's pass holds its own bits (400 ms): a
     * write-back of the last chunk queued before that pass would store them. */
    char err[256];
    cake_store *s = open_store("mem:?lat=5");
    cake_writeback *wb = cake_writeback_create(s, 64, err, sizeof(err));
    assert_non_null(wb);
    const cake_mode modes[] = {CAKE_MODE_COMPUTE, CAKE_MODE_LOAD, CAKE_MODE_CAKE};
    for (int k = 0; k < 3; k++) {
        const int calls = v.alone_calls;
        v.hold_ms = modes[k] == CAKE_MODE_COMPUTE ? 400 : 0;
        variant_prefill(&e, p, n, chunk, s, modes[k] == CAKE_MODE_COMPUTE ? wb : NULL, modes[k],
                        k ? got : first, &st);
        printf("batch-variant %s: %d computed, %d loaded, tail %.2f ms\n", cake_mode_name(modes[k]),
               st.chunks_computed, st.chunks_loaded, st.tail_ms);
        assert_int_equal(v.alone_calls, calls + 1);
        assert_true(st.tail_ms > 0);
        if (k) assert_same(first, got, f.n_vocab, cake_mode_name(modes[k]));
        if (modes[k] == CAKE_MODE_LOAD) {
            assert_int_equal(st.chunks_loaded, n / chunk);
            assert_int_equal(st.chunks_computed, 0);
        }
        /* The last token's own bits are gone again; the chunk's are back (in
         * load mode, from the store: the write-back stored the chunk's). */
        now = kv_blob(&v.inner, 0, n, &size);
        assert_int_equal(memcmp(now + CAKE_CHUNK_HEADER_SIZE, kv + CAKE_CHUNK_HEADER_SIZE,
                                kv_size - CAKE_CHUNK_HEADER_SIZE),
                         0);
        free(now);
    }
    /* The logits came from the nudged one-token call, not from the chunk. */
    for (size_t i = 0; i < nv; i++) assert_true(first[i] == nextafterf(base[i], INFINITY));

    /* A batch-variant engine's decode KV is not a prefill's bits: its
     * answers' chunks are not stored (a batch-invariant one's are). */
    cake_store *s2 = open_store("mem:");
    cake_writeback *wb2 = cake_writeback_create(s2, 64, err, sizeof(err));
    assert_non_null(wb2);
    assert_int_equal(cake_writeback_tokens(wb2, &e, p, n, chunk, 0), 0);
    assert_int_equal(cake_writeback_tokens(wb2, &v.inner, p, n, chunk, n / chunk - 2), 2);
    assert_int_equal(cake_writeback_drain(wb2, 30000), 0);
    cake_writeback_counters wc;
    cake_writeback_counters_get(wb2, &wc);
    assert_int_equal(wc.written, 2);
    cake_writeback_free(wb2);
    cake_store_close(s2);

    cake_writeback_free(wb);
    cake_store_close(s);
    free(kv);
    free(base);
    free(first);
    free(got);
    fixture_free(&f);
}

/* ---- the claim decisions, on a fake engine whose compute takes a fixed time ---- */

typedef struct {
    cake_hparams hp;
    cake_compute_speed speed; /* the engine's memory, read by the loader */
    int compute_ms;           /* per call */
} fake_engine;

static int fake_compute(void *self, const cake_token *t, int n, int pos0, float *logits, char *err,
                        size_t errlen) {
    (void)t, (void)n, (void)pos0, (void)err, (void)errlen;
    const fake_engine *e = self;
    struct timespec ts = {e->compute_ms / 1000, (long)(e->compute_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    if (logits) logits[0] = 0;
    return 0;
}

static int fake_install(void *self, const void *blob, const cake_chunk_header *h, int pos0,
                        char *err, size_t errlen) {
    (void)self, (void)blob, (void)h, (void)pos0, (void)err, (void)errlen;
    return 0;
}

static int fake_extract(void *self, cake_chunk_header *h, int pos0, void *blob, size_t cap,
                        char *err, size_t errlen) {
    (void)self, (void)pos0, (void)cap;
    memset((char *)blob + CAKE_CHUNK_HEADER_SIZE, 0x5a,
           cake_chunk_blob_size(h) - CAKE_CHUNK_HEADER_SIZE);
    return cake_chunk_seal(h, blob, err, errlen);
}

static cake_loader_engine fake_ops(fake_engine *fe) {
    cake_loader_engine e = {.self = fe,
                            .compute = fake_compute,
                            .install = fake_install,
                            .extract = fake_extract,
                            .hp = &fe->hp,
                            .kv_type = CAKE_KV_F16,
                            .speed = &fe->speed};
    memset(e.fingerprint, 0xfa, sizeof(e.fingerprint));
    return e;
}

static cake_prefill_stats fake_prefill(const cake_loader_engine *e, const cake_token *p, int n,
                                       int chunk, cake_store *s, cake_writeback *wb,
                                       cake_mode mode) {
    cake_prefill_params lp = {
        .store = s, .writeback = wb, .mode = mode, .chunk = chunk, .io_depth = 3};
    cake_prefill_stats st;
    cake_prefill_job *job = NULL;
    float logit;
    char err[256];
    int rc = cake_prefill(e, p, n, &lp, &logit, &st, &job, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    cake_prefill_finish(job);
    return st;
}

/* Workers leave alone the chunks the compute side will reach before they
 * could arrive (a fetch there would only be discarded, and on a shared link
 * slow down the chunks above it); they fetch freely when loads are what pays. */
static void test_claims(void **state) {
    (void)state;
    fake_engine fe = {.hp = {.dim = 128,
                             .n_layers = 2,
                             .n_heads = 2,
                             .n_kv_heads = 2,
                             .head_dim = 64,
                             .ffn_dim = 256}};
    const cake_loader_engine e = fake_ops(&fe);
    const int chunk = 16, n = 8 * chunk + 1; /* 8 loadable chunks */
    cake_token p[8 * 16 + 1];
    for (int i = 0; i < n; i++) p[i] = 3 + i;
    char *dir = t_mkdtemp(), uri[4200], err[256];

    /* Fill the store: a compute run with write-back. */
    snprintf(uri, sizeof(uri), "file:%s", dir);
    cake_store *fill = open_store(uri);
    cake_writeback *wb = cake_writeback_create(fill, 16, err, sizeof(err));
    assert_non_null(wb);
    fe.compute_ms = 1;
    fake_prefill(&e, p, n, chunk, fill, wb, CAKE_MODE_COMPUTE);
    assert_int_equal(cake_writeback_drain(wb, 30000), 0);
    cake_writeback_free(wb);
    cake_store_close(fill);

    /* A slow link: a chunk takes a second to load, computing all of them 80 ms.
     * Nothing is worth fetching: no transfer starts, none is discarded. */
    const size_t blob = CAKE_CHUNK_HEADER_SIZE + (size_t)chunk * 2 * 2 * 2 * 64 * 2;
    snprintf(uri, sizeof(uri), "file:%s?bw=%zuB", dir, blob);
    cake_store *slow = open_store(uri);
    cake_store_set_rate_hint(slow, (double)blob / 1e9); /* as an earlier request measured */
    fe.compute_ms = 10;
    fe.speed = (cake_compute_speed){{10e6 / cake_chunk_flops(&fe.hp, 0, chunk)}, 1};
    cake_prefill_stats st = fake_prefill(&e, p, n, chunk, slow, NULL, CAKE_MODE_CAKE);
    assert_int_equal(st.chunks_loaded, 0);
    assert_int_equal(st.chunks_discarded, 0);
    assert_int_equal(st.meet_chunk, 8);
    cake_store_close(slow);

    /* An unthrottled link and a slow compute: everything is loaded. The
     * compute is slow enough (1.5 s a chunk) that 16 KB reads under TSan on
     * a busy 2-core machine still look faster: with 100 ms, one CI run
     * computed chunk 0, and with 400 ms one run of the TSan suite with other
     * tests beside it (stop 19). */
    snprintf(uri, sizeof(uri), "file:%s", dir);
    cake_store *fast = open_store(uri);
    fe.compute_ms = 1500;
    fe.speed = (cake_compute_speed){{1500e6 / cake_chunk_flops(&fe.hp, 0, chunk)}, 1};
    st = fake_prefill(&e, p, n, chunk, fast, NULL, CAKE_MODE_CAKE); /* measures the rate */
    assert_true(st.chunks_loaded >= 7);
    st = fake_prefill(&e, p, n, chunk, fast, NULL, CAKE_MODE_CAKE);
    assert_int_equal(st.chunks_loaded, 8);
    assert_int_equal(st.meet_chunk, 0);
    cake_store_close(fast);
    t_rm_rf(dir);
    free(dir);
}

/* The I/O workers' buffers come from the engine's staging pool and go back
 * to it: a second load request allocates none. */
static void test_staging_reuse(void **state) {
    (void)state;
    fake_engine fe = {.hp = {.dim = 64,
                             .n_layers = 2,
                             .n_heads = 2,
                             .n_kv_heads = 2,
                             .head_dim = 32,
                             .ffn_dim = 128}};
    cake_loader_engine e = fake_ops(&fe);
    e.staging = cake_staging_new(&test_counting_allocator, 8);
    assert_non_null(e.staging);
    const int chunk = 8, n = 6 * chunk + 1; /* 6 loadable chunks and a 1-token tail */
    cake_token p[6 * 8 + 1];
    for (int i = 0; i < n; i++) p[i] = 3 + i;
    char err[256];
    cake_store *store = open_store("mem:");
    cake_writeback *wb = cake_writeback_create(store, 8, err, sizeof(err));
    assert_non_null(wb);
    fake_prefill(&e, p, n, chunk, store, wb, CAKE_MODE_COMPUTE);
    assert_int_equal(cake_writeback_drain(wb, 30000), 0);
    cake_writeback_free(wb);
    assert_int_equal(atomic_load(&test_counted_allocs), 0); /* compute mode fetches nothing */

    cake_prefill_stats st = fake_prefill(&e, p, n, chunk, store, NULL, CAKE_MODE_LOAD);
    assert_int_equal(st.chunks_loaded, 6);
    const int first = atomic_load(&test_counted_allocs);
    assert_true(first >= 1 && first <= 3); /* one per I/O worker */
    st = fake_prefill(&e, p, n, chunk, store, NULL, CAKE_MODE_LOAD);
    assert_int_equal(st.chunks_loaded, 6);
    assert_int_equal(atomic_load(&test_counted_allocs), first); /* the kept ones, no new ones */
    assert_int_equal(atomic_load(&test_counted_releases), 0);
    cake_store_close(store);
    cake_staging_free(e.staging);
    assert_int_equal(atomic_load(&test_counted_releases), first);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunk_flops_window),
        cmocka_unit_test(test_cached_prefix),
        cmocka_unit_test(test_busy_engine),
        cmocka_unit_test(test_awaited_chunks),
        cmocka_unit_test(test_stories_modes),
        cmocka_unit_test(test_mha160m_modes),
        cmocka_unit_test(test_one_token_prompt),
        cmocka_unit_test(test_compute_during_lookup),
        cmocka_unit_test(test_quantized_modes),
        cmocka_unit_test(test_redis_faults),
        cmocka_unit_test(test_stress),
        cmocka_unit_test(test_claims),
        cmocka_unit_test(test_staging_reuse),
        cmocka_unit_test(test_batch_variant_boundary),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
