/* The server's batch scheduler: one thread runs the engine in steps, each
 * step one forward pass (cake_forward_batch) over the passes the requests'
 * threads have asked for, up to a token budget, filled in the Cake paper's
 * priority order: decode tokens first, then prompt chunks of requests
 * without a cache hit (and every prompt's last pass, after its loads), then
 * the compute side of requests whose cached chunks are loading. Their I/O
 * side runs regardless, so a busy engine simply moves their meeting point
 * toward more loading. A pass longer than what is left of a step's budget
 * goes in pieces over several steps. */
#ifndef CAKE_SERVER_SCHED_H
#define CAKE_SERVER_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "cake.h"
#include "engine/generate.h"

typedef struct sched sched;

typedef enum {
    SCHED_PRIORITY, /* the paper's order (above) */
    SCHED_FCFS,     /* by request arrival alone, whatever the kind (the paper's baseline) */
} sched_policy;

/* Totals since start, for /metrics. */
typedef struct {
    uint64_t steps;        /* forward passes run */
    uint64_t shared_steps; /* of them, with more than one sequence */
    uint64_t tokens[3];    /* computed, by cake_pass_kind */
    int max_sequences;     /* the most sequences one step carried */
} sched_counters;

/* The scheduler runs engine's forward passes (engine's threads and scratch;
 * its max_batch is the step's token budget). */
int sched_create(cake_context *engine, sched_policy policy, sched **out, char *err, size_t errlen);
int sched_policy_parse(const char *s, sched_policy *out); /* 0 ok, -1 unknown */
/* Computes positions [pos0, pos0 + n) of sequence seq (a context of the
 * engine's model, engine itself included) in the coming steps and returns
 * when they are done: cake_forward's contract and results (kind
 * CAKE_PASS_SCORE: a prefill whose logits are every token's, n rows). order: when its
 * request arrived (earlier requests go first, within a kind under the
 * priority policy, overall under FCFS). Thread-safe; a sequence has one
 * pass at a time. */
int sched_forward(sched *s, cake_context *seq, uint64_t order, cake_pass_kind kind,
                  const cake_token *tokens, int n, cake_pos pos0, float *logits, char *err,
                  size_t errlen);
/* Waits at most timeout_ns until a pass of n tokens of the compute side of
 * a cached prompt (CAKE_PASS_CAKE) would be picked: a step has room for it
 * after the passes before it. Returns 1 then, and that step waits (a
 * little, as for a decode) for seq's pass: the compute side claims its
 * chunk in between (loader.h, wait_turn). 0 on the timeout. */
int sched_turn(sched *s, cake_context *seq, uint64_t order, int n, uint64_t timeout_ns);
/* seq's request is over: the next step need not wait for its next pass. */
void sched_release(sched *s, const cake_context *seq);
void sched_counters_get(sched *s, sched_counters *out);
/* Stops the thread; no pass may be waiting. Accepts NULL. */
void sched_free(sched *s);

#endif
