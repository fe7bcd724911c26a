/* The server's batch scheduler (src/server/sched.c) on a real engine: the
 * paper's priority order and FCFS, a long pass in pieces beside others,
 * turns, and results equal to cake_forward's. A long prefill (4000 tokens
 * in steps of 8: 500 steps) keeps the scheduler busy while the other
 * passes arrive, so their order does not depend on timing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cake.h"
#include "server/sched.h"
#include "testutil.h"

enum { N_LONG = 4000, BUDGET = 8, N_CTX = 4096 };

typedef struct {
    char path[64];
    cake_model *m;
    cake_context *engine, *b, *c;
    int n_vocab;
    cake_token tokens[N_LONG];
} fixture;

static cake_context *context(const cake_model *m, int threads, int max_batch) {
    cake_context *c = test_context(m, N_CTX, threads, max_batch);
    assert_non_null(c);
    return c;
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof(*f));
    char err[256];
    assert_int_equal(test_make_model("tiny", "f16", f->path), 0);
    assert_int_equal(cake_model_load(f->path, &f->m, err, sizeof(err)), 0);
    f->n_vocab = cake_model_hparams(f->m)->n_vocab;
    f->engine = context(f->m, 2, BUDGET);
    f->b = context(f->m, 1, 1);
    f->c = context(f->m, 1, 1);
    for (int i = 0; i < N_LONG; i++) f->tokens[i] = 3 + (cake_token)(i * 7919 % 900);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    cake_context_free(f->engine);
    cake_context_free(f->b);
    cake_context_free(f->c);
    cake_model_free(f->m);
    unlink(f->path);
    free(f);
    return 0;
}

/* One sched_forward on a thread of its own, and the scheduler's counters
 * when it returned: what had been computed by then. */
typedef struct {
    sched *s;
    cake_context *seq;
    uint64_t order;
    cake_pass_kind kind;
    const cake_token *tokens;
    int n;
    float *logits;
    int rc;
    sched_counters at_return;
    pthread_t thread;
} call;

static void *call_main(void *arg) {
    call *c = arg;
    char err[256];
    c->rc = sched_forward(c->s, c->seq, c->order, c->kind, c->tokens, c->n, 0, c->logits, err,
                          sizeof(err));
    sched_counters_get(c->s, &c->at_return);
    return NULL;
}

static void start(call *c) {
    assert_int_equal(pthread_create(&c->thread, NULL, call_main, c), 0);
}

/* Returns once the scheduler has run at least n steps. */
static void wait_steps(sched *s, uint64_t n) {
    for (sched_counters t;; usleep(100)) {
        sched_counters_get(s, &t);
        if (t.steps >= n) return;
    }
}

/* A long prefill (request 1), then a Cake compute-side pass (request 2)
 * and a decode token (request 3) while it runs. Every result is
 * cake_forward's; the caller checks the order. */
static void run_three(fixture *f, sched_policy policy, call calls[3]) {
    sched *s;
    char err[256];
    assert_int_equal(sched_create(f->engine, policy, &s, err, sizeof(err)), 0);
    float *got = malloc(3 * (size_t)f->n_vocab * sizeof(float));
    calls[0] = (call){.s = s,
                      .seq = f->engine,
                      .order = 1,
                      .kind = CAKE_PASS_PREFILL,
                      .tokens = f->tokens,
                      .n = N_LONG,
                      .logits = got};
    calls[1] = (call){.s = s,
                      .seq = f->b,
                      .order = 2,
                      .kind = CAKE_PASS_CAKE,
                      .tokens = f->tokens + 7,
                      .n = BUDGET,
                      .logits = got + f->n_vocab};
    calls[2] = (call){.s = s,
                      .seq = f->c,
                      .order = 3,
                      .kind = CAKE_PASS_DECODE,
                      .tokens = f->tokens + 11,
                      .n = 1,
                      .logits = got + 2 * (size_t)f->n_vocab};
    start(&calls[0]);
    wait_steps(s, 2);
    start(&calls[1]);
    start(&calls[2]);
    for (int i = 0; i < 3; i++) pthread_join(calls[i].thread, NULL);
    for (int i = 0; i < 3; i++) assert_int_equal(calls[i].rc, 0);
    sched_counters t;
    sched_counters_get(s, &t);
    assert_int_equal(t.tokens[CAKE_PASS_PREFILL], N_LONG);
    assert_int_equal(t.tokens[CAKE_PASS_CAKE], BUDGET);
    assert_int_equal(t.tokens[CAKE_PASS_DECODE], 1);
    assert_true(t.steps >= N_LONG / BUDGET + 1);

    /* each sequence's logits are those of cake_forward on a context of its own */
    float *want = malloc((size_t)f->n_vocab * sizeof(float));
    for (int i = 0; i < 3; i++) {
        cake_context *ref = context(f->m, 2, 512);
        assert_int_equal(cake_forward(ref, calls[i].tokens, calls[i].n, 0, want, err, sizeof(err)),
                         0);
        assert_memory_equal(calls[i].logits, want, (size_t)f->n_vocab * sizeof(float));
        cake_context_free(ref);
    }
    free(want);
    free(got);
    sched_free(s);
}

/* Priority: the decode token goes in the next step, beside the prefill's
 * pieces (it returns while the prefill has hundreds of steps to go); the
 * Cake pass gets room only in the prefill's last step, and ends after it. */
static void test_priority(void **state) {
    call c[3];
    run_three(*state, SCHED_PRIORITY, c);
    assert_true(c[2].at_return.tokens[CAKE_PASS_PREFILL] < N_LONG);
    assert_int_equal(c[2].at_return.tokens[CAKE_PASS_CAKE], 0);
    assert_int_equal(c[1].at_return.tokens[CAKE_PASS_PREFILL], N_LONG);
}

/* FCFS: by arrival, whatever the kind: the decode token waits for the
 * prefill, then for the Cake pass. */
static void test_fcfs(void **state) {
    call c[3];
    run_three(*state, SCHED_FCFS, c);
    assert_int_equal(c[2].at_return.tokens[CAKE_PASS_PREFILL], N_LONG);
    assert_int_equal(c[2].at_return.tokens[CAKE_PASS_CAKE], BUDGET);
    assert_int_equal(c[1].at_return.tokens[CAKE_PASS_PREFILL], N_LONG);
}

/* A turn: none while a prefill takes every step's room (the wait times
 * out), granted at once on an idle engine, and the step after waits for the
 * granted pass. */
static void test_turns(void **state) {
    fixture *f = *state;
    sched *s;
    char err[256];
    assert_int_equal(sched_create(f->engine, SCHED_PRIORITY, &s, err, sizeof(err)), 0);
    call busy = {.s = s,
                 .seq = f->engine,
                 .order = 1,
                 .kind = CAKE_PASS_PREFILL,
                 .tokens = f->tokens,
                 .n = N_LONG};
    start(&busy);
    wait_steps(s, 2);
    assert_int_equal(sched_turn(s, f->b, 2, BUDGET, 1000000), 0);
    pthread_join(busy.thread, NULL);
    assert_int_equal(busy.rc, 0);
    assert_int_equal(sched_turn(s, f->b, 2, BUDGET, 1000000000), 1);
    float *l = malloc((size_t)f->n_vocab * sizeof(float));
    assert_int_equal(
        sched_forward(s, f->b, 2, CAKE_PASS_CAKE, f->tokens, BUDGET, 0, l, err, sizeof(err)), 0);
    sched_counters t;
    sched_counters_get(s, &t);
    assert_int_equal(t.tokens[CAKE_PASS_CAKE], BUDGET);
    /* a bad pass fails alone, with cake_forward's reason */
    const cake_token bad = (cake_token)f->n_vocab;
    assert_int_equal(sched_forward(s, f->c, 3, CAKE_PASS_DECODE, &bad, 1, 0, l, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "token id"));
    free(l);
    sched_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_priority),
        cmocka_unit_test(test_fcfs),
        cmocka_unit_test(test_turns),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
