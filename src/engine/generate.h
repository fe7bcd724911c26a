/* One request: chunked prefill of a prompt, the first token, then decode.
 * This is the compute-only path; the Cake loader (later) replaces the prefill
 * part with compute-from-the-front / load-from-the-back. */
#ifndef CAKE_GENERATE_H
#define CAKE_GENERATE_H

#include "cake.h"
#include "loader/loader.h"

/* Which part of a request a forward pass is (a batch scheduler's priority). */
typedef enum {
    CAKE_PASS_DECODE,  /* a generated token, fed back */
    CAKE_PASS_PREFILL, /* a chunk of a prompt the store has no chunk of, or a prompt's last
                          pass (its tail, after the loads) */
    CAKE_PASS_CAKE,    /* the compute side of a prompt whose cached chunks are loading */
    CAKE_PASS_SCORE,   /* a prompt's pass whose every token's logits are wanted (n rows of
                          logits; on_prompt_logits): a prefill otherwise */
} cake_pass_kind;

typedef struct {
    const cake_token *prompt;
    int n_prompt;  /* >= 1 */
    int n_predict; /* tokens to generate; 0 = prefill only */
    int chunk;     /* prefill chunk in tokens (> 0) */
    /* optional: the store, mode, write-back queue, I/O depth, trace and
     * cached prefix of the Cake loader (its chunk field is ignored: chunk
     * above is used). NULL = compute only, from position 0. */
    const cake_prefill_params *loader;
    cake_token eos; /* stop after generating this id (-1: never) */
    cake_sampler *sampler;
    float *first_logits; /* optional out: n_vocab logits that chose the first token */
    /* optional: called with each generated token as soon as it is chosen;
     * nonzero stops the generation after this token (a stop string, a
     * client that went away) */
    int (*on_token)(cake_token id, void *ud);
    /* optional: called with the n_vocab logits each generated token was
     * chosen from, just before on_token gets that token (log-probabilities) */
    void (*on_logits)(const float *logits, int n_vocab, cake_token id, void *ud);
    /* optional: the prompt is scored: computed from position 0 (nothing
     * loaded, cached or written back) in passes that give every token's
     * logits, called with rows [pos0, pos0 + n) of them (row i: the logits
     * after prompt[0..i], which token i + 1 was drawn from). CPU backend. */
    void (*on_prompt_logits)(const float *rows, int n, int pos0, int n_vocab, void *ud);
    void *ud;
    /* optional: runs each forward pass in place of cake_forward(c, ...), with
     * the same results: a server's batch scheduler (server/sched.h) */
    int (*forward)(void *forward_ud, cake_context *c, cake_pass_kind kind, const cake_token *tokens,
                   int n, cake_pos pos0, float *logits, char *err, size_t errlen);
    void *forward_ud;
    /* optional, with forward: waits at most timeout_ns until the engine
     * could run n tokens of the compute side of a prompt whose cached chunks
     * are loading; 1 when it could, 0 on the timeout (the loader's
     * wait_turn, loader.h) */
    int (*forward_turn)(void *forward_ud, cake_context *c, int n, uint64_t timeout_ns);
} cake_request;

typedef struct {
    double ttft_ms;   /* prefill + choosing the first token */
    double decode_ms; /* everything after the first token */
    int n_generated;  /* tokens in generated[] */
    cake_prefill_stats prefill;
} cake_request_stats;

/* Runs r on c, whose KV cache must hold n_prompt + n_predict positions.
 * generated (capacity n_predict) receives the new ids. 0 ok, -1 with err. */
int cake_request_run(cake_context *c, const cake_request *r, cake_token *generated,
                     cake_request_stats *stats, char *err, size_t errlen);

#endif
