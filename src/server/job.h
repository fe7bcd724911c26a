/* One generation request as the server's two sides share it: what was asked
 * (the prompt, how much to generate, sampling, stop strings) and its
 * progress (the text so far, how much of it is final, how it ended). The
 * HTTP side waits on it and may cancel it; a slot (pool.h) runs it. */
#ifndef CAKE_SERVER_JOB_H
#define CAKE_SERVER_JOB_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#include "cake.h"
#include "engine/generate.h"
#include "server/chat.h"
#include "server/json_schema.h"

#define JOB_MAX_STOP         16                     /* (OpenAI's 4; vLLM and llama.cpp take more) */
#define JOB_MAX_STOP_IDS     16                     /* a request's stop_token_ids */
#define JOB_STOP_ID_ROOM     (JOB_MAX_STOP_IDS + 4) /* and a fill in the middle's end tokens */
#define JOB_MAX_TOP_LOGPROBS 20
#define JOB_THINKING         2 /* serve_job.reasoning: the prompt opened <think> */

/* A generated token's log-probability under the model (its logits' log
 * softmax: before temperature and top_p), its most likely alternatives,
 * and where its text ends in the job's text (whole: a stop string may cut
 * the text shorter). */
typedef struct {
    float logprob;
    int rank; /* 1 + the tokens likelier than it */
    size_t text_end;
    int n_top;
    cake_token top_id[JOB_MAX_TOP_LOGPROBS];
    float top_logprob[JOB_MAX_TOP_LOGPROBS];
} job_logprob;

/* What several jobs' waiter waits on (a stream of a request's n choices):
 * each change to one of them is counted here too. Shared by reference. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned long changes; /* under mu */
    atomic_int refs;
} job_waker;

typedef struct serve_job serve_job;
struct serve_job {
    /* The request: set before pool_submit, read-only after. */
    cake_token *prompt; /* owned by the job */
    int n_prompt;
    int max_tokens; /* capped by the pool at the context's end */
    cake_sampler_params sampling;
    cake_logit_bias *logit_bias; /* owned; sampling.logit_bias points at it */
    char *stop[JOB_MAX_STOP];    /* stop strings (owned), n_stop of them */
    int n_stop;
    cake_token end_of_turn; /* stops like EOS (a chat format's end of turn); -1: none */
    cake_token stop_ids[JOB_STOP_ID_ROOM]; /* stop like EOS too (vLLM's stop_token_ids) */
    int n_stop_ids;
    int ignore_eos; /* EOS and the end of turn do not stop it (benchmarks) */
    /* vLLM's min_tokens: neither EOS, the end of turn, stop ids nor stop
     * strings end the answer before it has this many tokens */
    int min_tokens;
    int top_logprobs; /* -1: no log-probabilities; else alternatives per token */
    /* A completion's echo: the answer's text and log-probabilities begin
     * with the prompt's. With log-probabilities the prompt is scored
     * (computed whole: every token's logits; nothing loaded or cached). */
    int echo;
    /* The prompt's tokens' log-probabilities, each with this many
     * alternatives (vLLM's prompt_logprobs, or echo's with logprobs); -1:
     * none. The prompt is then scored (computed whole, every token's
     * logits; nothing loaded or cached). */
    int prompt_top;
    /* Structured output (engine/json_grammar.h): the answer is JSON, one
     * value of schema (owned: one reference), or with schema NULL one object.
     * With tools and not json: a call is a value of schema from its tag on
     * (cake_json_grammar_new_lazy). */
    int json;
    json_schema *schema;
    /* Tools (OpenAI's): the answer is read for calls written as this chat
     * format writes them (chat_calls; CHAT_NONE: no tools), to functions of
     * these names (owned; each NUL-terminated, an empty one last). While it
     * is generated, text that may be a call is held back from streams. */
    chat_format call_format;
    char *tool_names;
    /* A thinking model's chat (its vocabulary has <think>): an answer that
     * opens with <think>...</think> gives that as reasoning_content; the tag
     * and what may be its start are held back from streams. JOB_THINKING:
     * the prompt opened <think> (DeepSeek-R1's and QwQ's templates), so the
     * answer begins inside it. think_brackets: the tags are Mistral's
     * [THINK] and [/THINK] (Magistral, Ministral 3 Reasoning), control
     * tokens that the answer prints as their text. */
    int reasoning;
    bool think_brackets;
    /* vLLM's cache_salt (owned; NULL: none): the prompt's KV is shared, in
     * the store and in the slots' caches, only with requests of the same
     * salt (store/key.h). */
    char *cache_salt;

    /* Progress, under mu; cv is signalled on every change. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *text; /* the generated text so far */
    size_t len, cap;
    /* text[0..ready) is final: no stop string can start in it and it ends on
     * a whole UTF-8 character. Streams send it; the rest waits. */
    size_t ready;
    cake_token *ids; /* generated ids (max_tokens of room) */
    int n_ids;
    job_logprob *logprobs; /* one per generated id, when asked (top_logprobs >= 0) */
    /* with echo and log-probabilities: one per prompt token (the first has
     * no log-probability; text_end is not used) */
    job_logprob *prompt_logprobs;
    int done;        /* the job ended (finished, failed or cancelled) */
    int stopped;     /* it ended at EOS, the end of turn or a stop string */
    int cancelled;   /* cancel was set before it ended */
    char error[256]; /* why it failed; "" when it did not */
    cake_request_stats stats;
    atomic_int cancel; /* set by the HTTP side: stop at the next token */
    job_waker *waker;  /* also signalled on every change (a reference); NULL: none */

    /* Owned by the pool. */
    int refs;
    int prefetched;  /* its chunks were brought into the store's RAM tier (or tried) */
    cake_token prev; /* the last id, for detokenization */
    uint64_t t_arrived, t_started, t_ended; /* CLOCK_MONOTONIC ns, for /metrics */
    serve_job *next;
};

/* A new job holding prompt[0..n) (taken over: the job frees it) and one
 * reference, the caller's. NULL on out of memory (the prompt is freed). */
serve_job *job_create(cake_token *prompt, int n);
/* Another choice of j's request (OpenAI's n): a new job asking what j asks,
 * its sampler's seed moved by `choice` so that the answers differ. NULL on
 * out of memory. */
serve_job *job_clone(const serve_job *j, int choice);
/* The same for another prompt of the request (a completion's list of
 * prompts): prompt[0..n) taken over as job_create takes it; max_tokens is
 * j's (the caller caps it to the context). */
serve_job *job_clone_prompt(const serve_job *j, int choice, cake_token *prompt, int n);
/* Drops a reference; the last one frees the job. Accepts NULL. */
void job_release(serve_job *j);
/* A waker with one reference (NULL on out of memory), one more, one less. */
job_waker *job_waker_new(void);
job_waker *job_waker_retain(job_waker *w);
void job_waker_release(job_waker *w); /* accepts NULL */
/* Wakes whoever waits on j (j->mu held): on its cv, and on its waker's. */
void job_notify(serve_job *j);
/* Copies a stop string into the job. 0, or -1 (too many, out of memory). */
int job_add_stop(serve_job *j, const char *s, size_t len);

/* Appends a piece of generated text (j->mu held): the stop strings are
 * looked for, and j->ready moves on to what no stop string can still start
 * in and no UTF-8 character is unfinished in. Returns 1 when a stop string
 * was completed: the text then ends before it. 0 otherwise, -1 on out of
 * memory (the piece is lost). */
int job_add_text(serve_job *j, const char *piece, size_t n);
/* The first byte from `at` in text[0..len) that is not white space. */
size_t skip_space(const char *text, size_t at, size_t len);
/* The end of text[0..end) with the white space it ends with left out. */
size_t trim_space_back(const char *text, size_t end);
/* A thinking answer's reasoning (job->reasoning; opened by <think> after
 * white space, or by the prompt): its text [*r0, *r1), closed by </think>
 * or the end so far, and where the rest begins (*c0, white space skipped).
 * false (all 0) when there is none. Under the job's lock. */
bool job_reasoning(const serve_job *j, size_t *r0, size_t *r1, size_t *c0);

/* The tags j's answer prints as their text where they are control tokens
 * of t, which print nothing (chat_silent_tokens): its tool calls' (Mistral's
 * [TOOL_CALLS], [ARGS]), its reasoning's ([THINK], [/THINK]). Their ids
 * and texts, at most JOB_PRINTED_TAGS; how many. */
#define JOB_PRINTED_TAGS 5
int job_printed_tags(const serve_job *j, const cake_tokenizer *t, cake_token *ids,
                     const char **texts);
/* Sets how the job ended (error: why it failed, or NULL; whether it was
 * cancelled), and makes the text held back for stop strings final. */
void job_settle(serve_job *j, const char *error);
/* Marks the settled job done and wakes its waiters: from here the HTTP side
 * answers. */
void job_finish(serve_job *j);

#endif
