/* The server's batch scheduler: one thread runs the engine in steps, each
 * step one forward pass (cake_forward_batch) over the passes the requests'
 * threads have asked for, up to a token budget, filled in the Cake paper's
 * priority order: decode tokens first, then prompt chunks of requests
 * without a cache hit, then the compute side of requests whose cached
 * chunks are loading. Their I/O side runs regardless, so a busy engine
 * simply moves their meeting point toward more loading. A pass longer than
 * what is left of a step's budget goes in pieces over several steps. */
#ifndef CAKE_SERVER_SCHED_H
#define CAKE_SERVER_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "cake.h"
#include "engine/generate.h"

typedef struct sched sched;

/* Totals since start, for /metrics. */
typedef struct {
    uint64_t steps;        /* forward passes run */
    uint64_t shared_steps; /* of them, with more than one sequence */
    uint64_t tokens[3];    /* computed, by cake_pass_kind */
    int max_sequences;     /* the most sequences one step carried */
} sched_counters;

/* The scheduler runs engine's forward passes (engine's threads and scratch;
 * its max_batch is the step's token budget). */
int sched_create(cake_context *engine, sched **out, char *err, size_t errlen);
/* Computes positions [pos0, pos0 + n) of sequence seq (a context of the
 * engine's model, engine itself included) in the coming steps and returns
 * when they are done: cake_forward's contract and results. Thread-safe; a
 * sequence has one pass at a time. */
int sched_forward(sched *s, cake_context *seq, cake_pass_kind kind, const cake_token *tokens, int n,
                  cake_pos pos0, float *logits, char *err, size_t errlen);
/* seq's request is over: the next step need not wait for its next pass. */
void sched_release(sched *s, const cake_context *seq);
void sched_counters_get(sched *s, sched_counters *out);
/* Stops the thread; no pass may be waiting. Accepts NULL. */
void sched_free(sched *s);

#endif
