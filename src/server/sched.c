#include "server/sched.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/clock.h"
#include "util/err.h"

#define N_KINDS 3 /* cake_pass_kind, in priority order */

/* How long a step waits for the sequences whose pass the last step
 * finished: each asks for its next pass (a decode token after sampling, a
 * prompt's next chunk) within tens of microseconds. A step started without
 * them would carry one sequence while the others queue for the step after,
 * and a later request's chunk would slip in before an older one's. */
#define GATHER_NS 1000000

/* A forward pass a request's thread waits on. */
typedef struct pass {
    cake_context *seq;
    cake_pass_kind kind;
    uint64_t order; /* its request's arrival */
    int turn;       /* not a pass but a wait for one's turn (sched_turn) */
    const cake_token *tokens;
    int n, done; /* tokens in all; computed so far (earlier steps) */
    cake_pos pos0;
    float *logits;
    bool all_logits; /* logits gets every token's (CAKE_PASS_SCORE) */
    int finished, rc;
    char *err;
    size_t errlen;
    struct pass *next;
} pass;

struct sched {
    cake_context *engine;
    int budget;
    size_t n_vocab; /* (a scored pass's pieces write their rows of logits) */
    sched_policy policy;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* a pass was queued, or stop */
    pthread_cond_t done_cv; /* a step finished passes */
    /* Waiting passes by kind (FCFS: all in queue[0]), each queue in the
     * order of their requests' arrival. */
    pass *queue[N_KINDS];
    int stop;
    /* The step being run (the scheduler thread's): a piece has at least one
     * token, so a step carries at most budget pieces. */
    pass **picked;
    cake_batch_seq *pieces;
    /* The sequences the last step finished a pass of, that have neither
     * asked for their next pass nor left (sched_release) yet. */
    cake_context **owed;
    int n_owed;
    uint64_t gather_until; /* CLOCK_MONOTONIC ns */
    sched_counters totals;
};

/* Runs the picked pieces as one forward pass. Should the pass be refused
 * (a sequence's tokens or positions out of range), each piece is run alone,
 * so that only the bad one fails. */
static void run_step(sched *s, pass **picked, cake_batch_seq *b, int nb) {
    char err[256];
    if (!cake_forward_batch(s->engine, b, nb, err, sizeof(err))) return;
    for (int i = 0; i < nb; i++)
        if (nb == 1 || cake_forward_batch(s->engine, &b[i], 1, err, sizeof(err))) {
            picked[i]->rc = -1;
            cake_err(picked[i]->err, picked[i]->errlen, "%s", err);
        }
}

/* Takes seq off the owed list, if it is there (under the mutex). */
static void settle_owed(sched *s, const cake_context *seq) {
    for (int i = 0; i < s->n_owed; i++)
        if (s->owed[i] == seq) {
            s->owed[i] = s->owed[--s->n_owed];
            pthread_cond_signal(&s->work_cv);
            return;
        }
}

/* Takes the finished passes off the queues and wakes their threads. */
static void retire_finished(sched *s) {
    for (int k = 0; k < N_KINDS; k++)
        for (pass **pp = &s->queue[k]; *pp;)
            if ((*pp)->finished)
                *pp = (*pp)->next;
            else
                pp = &(*pp)->next;
    pthread_cond_broadcast(&s->done_cv);
}

/* Fills the next step from the queues, in their order, up to the budget:
 * the pieces into s->pieces. A turn (sched_turn) that fits is granted
 * instead: its room is kept, its thread will ask for the pass itself.
 * Returns the number of pieces; *granted tells whether a turn was. */
static int pick_step(sched *s, int *granted) {
    int nb = 0, left = s->budget;
    *granted = 0;
    for (int k = 0; k < N_KINDS; k++)
        for (pass *p = s->queue[k]; p && left > 0; p = p->next) {
            const int take = p->n - p->done < left ? p->n - p->done : left;
            left -= take;
            if (p->turn) {
                p->finished = 1;
                s->owed[s->n_owed++] = p->seq;
                *granted = 1;
                continue;
            }
            float *logits = p->all_logits            ? p->logits + (size_t)p->done * s->n_vocab
                            : p->done + take == p->n ? p->logits
                                                     : NULL;
            s->pieces[nb] = (cake_batch_seq){p->seq, p->tokens + p->done, take, p->pos0 + p->done,
                                             logits, p->all_logits};
            s->picked[nb++] = p;
        }
    return nb;
}

static void *sched_main(void *arg) {
    sched *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (s->n_owed > 0) { /* wait for them, a little */
            if (cake_now_ns() < s->gather_until) {
                const struct timespec until = cake_timespec_ns(s->gather_until);
                pthread_cond_timedwait(&s->work_cv, &s->mu, &until);
                continue;
            }
            s->n_owed = 0;
        }
        int granted;
        const int nb = pick_step(s, &granted);
        if (granted) { /* the step waits for the granted passes */
            s->gather_until = cake_now_ns() + GATHER_NS;
            retire_finished(s);
            continue;
        }
        if (!nb) {
            if (s->stop) break;
            pthread_cond_wait(&s->work_cv, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        run_step(s, s->picked, s->pieces, nb);
        pthread_mutex_lock(&s->mu);
        sched_counters *t = &s->totals;
        t->steps++;
        t->shared_steps += nb > 1;
        if (nb > t->max_sequences) t->max_sequences = nb;
        for (int i = 0; i < nb; i++) {
            pass *p = s->picked[i];
            p->done += s->pieces[i].n;
            t->tokens[p->kind] += (uint64_t)s->pieces[i].n;
            p->finished = p->done == p->n || p->rc;
            if (p->finished) s->owed[s->n_owed++] = p->seq;
        }
        s->gather_until = cake_now_ns() + GATHER_NS;
        retire_finished(s);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int sched_policy_parse(const char *s, sched_policy *out) {
    if (!strcmp(s, "priority"))
        *out = SCHED_PRIORITY;
    else if (!strcmp(s, "fcfs"))
        *out = SCHED_FCFS;
    else
        return -1;
    return 0;
}

/* Frees s (its thread not running). */
static void destroy(sched *s) {
    pthread_cond_destroy(&s->done_cv);
    pthread_cond_destroy(&s->work_cv);
    pthread_mutex_destroy(&s->mu);
    free(s->picked);
    free(s->pieces);
    free(s->owed);
    free(s);
}

int sched_create(cake_context *engine, sched_policy policy, sched **out, char *err, size_t errlen) {
    *out = NULL;
    sched *s = calloc(1, sizeof(*s));
    if (!s) return cake_err(err, errlen, "out of memory");
    s->engine = engine;
    s->policy = policy;
    s->budget = cake_context_max_batch(engine);
    s->n_vocab = (size_t)cake_model_hparams(cake_context_model(engine))->n_vocab;
    s->picked = malloc((size_t)s->budget * sizeof(*s->picked));
    s->pieces = malloc((size_t)s->budget * sizeof(*s->pieces));
    s->owed = malloc((size_t)s->budget * sizeof(*s->owed));
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->work_cv, &ca);
    pthread_cond_init(&s->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (!s->picked || !s->pieces || !s->owed) {
        cake_err(err, errlen, "out of memory");
        goto fail;
    }
    if (pthread_create(&s->thread, NULL, sched_main, s)) {
        cake_err(err, errlen, "cannot start the scheduler thread");
        goto fail;
    }
    *out = s;
    return 0;
fail:
    destroy(s);
    return -1;
}

/* Queues p in its place and waits until the scheduler is done with it, or
 * timeout_ns (0: no limit) have passed: then p leaves the queue unserved.
 * Returns whether it was served. */
static int enqueue_and_wait(sched *s, pass *p, uint64_t timeout_ns) {
    const struct timespec until = cake_deadline_ns(timeout_ns);
    pthread_mutex_lock(&s->mu);
    pass **q = &s->queue[s->policy == SCHED_FCFS ? 0 : (int)p->kind], **pp = q;
    while (*pp && (*pp)->order <= p->order) pp = &(*pp)->next;
    p->next = *pp;
    *pp = p;
    settle_owed(s, p->seq);
    pthread_cond_signal(&s->work_cv);
    while (!p->finished)
        if (!timeout_ns)
            pthread_cond_wait(&s->done_cv, &s->mu);
        else if (pthread_cond_timedwait(&s->done_cv, &s->mu, &until) == ETIMEDOUT && !p->finished) {
            for (pp = q; *pp != p;) pp = &(*pp)->next; /* (only a turn times out: never picked) */
            *pp = p->next;
            break;
        }
    const int served = p->finished;
    pthread_mutex_unlock(&s->mu);
    return served;
}

int sched_forward(sched *s, cake_context *seq, uint64_t order, cake_pass_kind kind,
                  const cake_token *tokens, int n, cake_pos pos0, float *logits, char *err,
                  size_t errlen) {
    if (n < 1) return cake_err(err, errlen, "forward: no tokens");
    const bool all_logits = kind == CAKE_PASS_SCORE; /* (queued as a prefill) */
    if ((unsigned)kind >= N_KINDS) kind = CAKE_PASS_PREFILL;
    pass p = {.seq = seq,
              .kind = kind,
              .all_logits = all_logits,
              .order = order,
              .tokens = tokens,
              .n = n,
              .pos0 = pos0,
              .logits = logits,
              .err = err,
              .errlen = errlen};
    enqueue_and_wait(s, &p, 0);
    return p.rc;
}

int sched_turn(sched *s, cake_context *seq, uint64_t order, int n, uint64_t timeout_ns) {
    pass p = {.seq = seq, .kind = CAKE_PASS_CAKE, .order = order, .n = n > 0 ? n : 1, .turn = 1};
    return enqueue_and_wait(s, &p, timeout_ns ? timeout_ns : 1);
}

void sched_release(sched *s, const cake_context *seq) {
    pthread_mutex_lock(&s->mu);
    settle_owed(s, seq);
    pthread_mutex_unlock(&s->mu);
}

void sched_counters_get(sched *s, sched_counters *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->totals;
    pthread_mutex_unlock(&s->mu);
}

void sched_free(sched *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    destroy(s);
}
