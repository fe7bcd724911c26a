#include "engine/generate.h"

#include <stdlib.h>

#include "engine/context.h"
#include "util/clock.h"
#include "util/err.h"

static double now_ms(void) {
    return (double)cake_now_ns() / 1e6;
}

/* A request's forward passes, routed to its forward hook (r->forward) and
 * classed by what they are for. The context holds the route while the
 * request runs (context.h), so that the loader's engine stays the context
 * itself: write-backs outlive the request and must not point into it. */
typedef struct {
    const cake_request *r;
    cake_context *c;
    const cake_prefill_stats *prefill; /* its lookup result says which class a prefill pass is */
    int decoding;
} routed_request;

static int routed_compute(void *route, const cake_token *tokens, int n, int pos0, float *logits,
                          char *err, size_t errlen) {
    const routed_request *x = route;
    /* The pass with the prompt's last token comes after every load is in:
     * the request has no other way forward then. */
    const int loading = x->prefill->chunks_found > 0 && pos0 + n < x->r->n_prompt;
    const cake_pass_kind kind = x->decoding ? CAKE_PASS_DECODE
                                : loading   ? CAKE_PASS_CAKE
                                            : CAKE_PASS_PREFILL;
    return x->r->forward(x->r->forward_ud, x->c, kind, tokens, n, pos0, logits, err, errlen);
}

static int routed_turn(void *route, int n, uint64_t timeout_ns) {
    const routed_request *x = route;
    return x->r->forward_turn(x->r->forward_ud, x->c, n, timeout_ns);
}

/* The prompt scored (r->on_prompt_logits): computed from position 0 in
 * passes of at most SCORE_ROWS tokens, each giving every token's logits;
 * the last row's into logits (the first token's). */
#define SCORE_ROWS 64

static int score_prompt(cake_context *c, const cake_request *r, int n_vocab, float *logits,
                        cake_prefill_stats *st, char *err, size_t errlen) {
    int rows = SCORE_ROWS < cake_context_max_batch(c) ? SCORE_ROWS : cake_context_max_batch(c);
    float *out = malloc((size_t)rows * (size_t)n_vocab * sizeof(float));
    if (!out) return cake_err(err, errlen, "out of memory for %d rows of logits", rows);
    *st = (cake_prefill_stats){.mode = CAKE_MODE_COMPUTE,
                               .chunk = r->chunk,
                               .chunks_total = (r->n_prompt + r->chunk - 1) / r->chunk,
                               .chunks_computed = (r->n_prompt + r->chunk - 1) / r->chunk,
                               .tokens_computed = r->n_prompt,
                               .meet_chunk = -1};
    const double t0 = now_ms();
    int rc = 0;
    for (int pos = 0; !rc && pos < r->n_prompt; pos += rows) {
        const int n = r->n_prompt - pos < rows ? r->n_prompt - pos : rows;
        rc = r->forward ? r->forward(r->forward_ud, c, CAKE_PASS_SCORE, r->prompt + pos, n, pos,
                                     out, err, errlen)
                        : cake_forward_batch(c,
                                             &(cake_batch_seq){.seq = c,
                                                               .tokens = r->prompt + pos,
                                                               .n = n,
                                                               .pos0 = pos,
                                                               .logits = out,
                                                               .all_logits = true},
                                             1, err, errlen);
        if (rc) break;
        r->on_prompt_logits(out, n, pos, n_vocab, r->ud);
        if (pos + n == r->n_prompt)
            for (int i = 0; i < n_vocab; i++) logits[i] = out[(size_t)(n - 1) * n_vocab + i];
    }
    st->compute_ms = now_ms() - t0;
    free(out);
    return rc;
}

int cake_request_run(cake_context *c, const cake_request *r, cake_token *generated,
                     cake_request_stats *st, char *err, size_t errlen) {
    *st = (cake_request_stats){0};
    if (r->n_prompt < 1 || r->chunk < 1 || r->n_predict < 0)
        return cake_err(err, errlen, "request: empty prompt or bad chunk size");
    if ((int64_t)r->n_prompt + r->n_predict > cake_context_n_ctx(c))
        return cake_err(err, errlen, "request: %d prompt + %d new tokens exceed the context of %d",
                        r->n_prompt, r->n_predict, cake_context_n_ctx(c));
    const int n_vocab = cake_model_hparams(cake_context_model(c))->n_vocab;
    float *logits = malloc((size_t)n_vocab * sizeof(float));
    if (!logits) return cake_err(err, errlen, "out of memory");

    cake_prefill_params pp = r->loader ? *r->loader : (cake_prefill_params){0};
    pp.chunk = r->chunk;
    const int use_store = pp.store || pp.writeback;
    routed_request routed = {.r = r, .c = c, .prefill = &st->prefill};
    if (r->forward)
        cake_context_route(c, routed_compute, r->forward_turn ? routed_turn : NULL, &routed);
    cake_loader_engine engine;
    cake_context_loader_engine(c, use_store, &engine); /* outside TTFT: done once per model */
    if (use_store) cake_loader_engine_salt(&engine, pp.cache_salt);
    cake_prefill_job *pending = NULL;

    const double t0 = now_ms();
    int rc = r->on_prompt_logits ? score_prompt(c, r, n_vocab, logits, &st->prefill, err, errlen)
                                 : cake_prefill(&engine, r->prompt, r->n_prompt, &pp, logits,
                                                &st->prefill, &pending, err, errlen);
    if (rc) goto done;
    if (r->first_logits)
        for (int i = 0; i < n_vocab; i++) r->first_logits[i] = logits[i];
    if (r->n_predict == 0) {
        st->ttft_ms = now_ms() - t0;
        goto done;
    }
    cake_token tok = cake_sampler_sample(r->sampler, logits, n_vocab);
    st->ttft_ms = now_ms() - t0;
    if (r->on_logits) r->on_logits(logits, n_vocab, tok, r->ud);
    /* (loads that compute overtook are joined at the end, pending: the
     * tokens go out meanwhile, the first of them at once) */
    const double t1 = now_ms();
    routed.decoding = 1;
    for (int i = 0;; i++) {
        generated[st->n_generated++] = tok;
        const int stop = r->on_token && r->on_token(tok, r->ud);
        if (stop || tok == r->eos || i + 1 == r->n_predict) break;
        rc = engine.compute(engine.self, &tok, 1, r->n_prompt + i, logits, err, errlen);
        if (rc) goto done;
        tok = cake_sampler_sample(r->sampler, logits, n_vocab);
        if (r->on_logits) r->on_logits(logits, n_vocab, tok, r->ud);
    }
    st->decode_ms = now_ms() - t1;
done:
    cake_prefill_finish(pending);
    cake_context_route(c, NULL, NULL, NULL);
    free(logits);
    return rc;
}
