#include "engine/generate.h"

#include <stdlib.h>
#include <time.h>

#include "util/err.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The loader's engine ops with the forward passes going through the
 * request's forward hook (r->forward), classed by what they are for. */
typedef struct {
    const cake_request *r;
    cake_context *c;
    const cake_prefill_stats *prefill; /* its lookup result says which class a prefill pass is */
    int decoding;
    cake_loader_engine inner; /* the context's own ops: install, extract */
} routed_engine;

static int routed_compute(void *self, const cake_token *tokens, int n, int pos0, float *logits,
                          char *err, size_t errlen) {
    const routed_engine *x = self;
    const cake_pass_kind kind = x->decoding                    ? CAKE_PASS_DECODE
                                : x->prefill->chunks_found > 0 ? CAKE_PASS_CAKE
                                                               : CAKE_PASS_PREFILL;
    return x->r->forward(x->r->forward_ud, x->c, kind, tokens, n, pos0, logits, err, errlen);
}

static int routed_install(void *self, const void *blob, const cake_chunk_header *h, int pos0,
                          char *err, size_t errlen) {
    const routed_engine *x = self;
    return x->inner.install(x->inner.self, blob, h, pos0, err, errlen);
}

static int routed_extract(void *self, cake_chunk_header *h, int pos0, void *blob, size_t cap,
                          char *err, size_t errlen) {
    const routed_engine *x = self;
    return x->inner.extract(x->inner.self, h, pos0, blob, cap, err, errlen);
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
    cake_loader_engine engine;
    cake_context_loader_engine(c, use_store, &engine); /* outside TTFT: done once per model */
    routed_engine routed = {.r = r, .c = c, .prefill = &st->prefill, .inner = engine};
    if (r->forward) {
        engine.self = &routed;
        engine.compute = routed_compute;
        engine.install = routed_install;
        engine.extract = routed_extract;
    }
    cake_prefill_job *pending = NULL;

    const double t0 = now_ms();
    int rc = cake_prefill(&engine, r->prompt, r->n_prompt, &pp, logits, &st->prefill, &pending, err,
                          errlen);
    if (rc) goto done;
    if (r->first_logits)
        for (int i = 0; i < n_vocab; i++) r->first_logits[i] = logits[i];
    if (r->n_predict == 0) {
        st->ttft_ms = now_ms() - t0;
        goto done;
    }
    cake_token tok = cake_sampler_sample(r->sampler, logits, n_vocab);
    st->ttft_ms = now_ms() - t0;
    cake_prefill_finish(pending); /* loads that compute overtook: joined after the first token */
    pending = NULL;
    const double t1 = now_ms();
    routed.decoding = 1;
    for (int i = 0;; i++) {
        generated[st->n_generated++] = tok;
        const int stop = r->on_token && r->on_token(tok, r->ud);
        if (stop || tok == r->eos || i + 1 == r->n_predict) break;
        rc = engine.compute(engine.self, &tok, 1, r->n_prompt + i, logits, err, errlen);
        if (rc) goto done;
        tok = cake_sampler_sample(r->sampler, logits, n_vocab);
    }
    st->decode_ms = now_ms() - t1;
done:
    cake_prefill_finish(pending);
    free(logits);
    return rc;
}
