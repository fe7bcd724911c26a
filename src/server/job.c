#include "server/job.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

serve_job *job_create(cake_token *prompt, int n) {
    serve_job *j = calloc(1, sizeof(*j));
    if (!j) {
        free(prompt);
        return NULL;
    }
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    j->prompt = prompt;
    j->n_prompt = n;
    j->end_of_turn = -1;
    j->top_logprobs = -1;
    j->prompt_top = -1;
    j->refs = 1;
    return j;
}

serve_job *job_clone(const serve_job *j, int choice) {
    cake_token *prompt = malloc((size_t)j->n_prompt * sizeof(*prompt));
    if (!prompt) return NULL;
    memcpy(prompt, j->prompt, (size_t)j->n_prompt * sizeof(*prompt));
    return job_clone_prompt(j, choice, prompt, j->n_prompt);
}

serve_job *job_clone_prompt(const serve_job *j, int choice, cake_token *prompt, int n) {
    serve_job *c = job_create(prompt, n);
    if (!c) return NULL;
    int ok = 1;
    c->max_tokens = j->max_tokens;
    c->sampling = j->sampling;
    c->sampling.seed += (uint64_t)choice;
    c->end_of_turn = j->end_of_turn;
    memcpy(c->stop_ids, j->stop_ids, sizeof(c->stop_ids));
    c->n_stop_ids = j->n_stop_ids;
    c->ignore_eos = j->ignore_eos;
    c->min_tokens = j->min_tokens;
    c->top_logprobs = j->top_logprobs;
    c->echo = j->echo;
    c->prompt_top = j->prompt_top;
    c->json = j->json;
    c->call_format = j->call_format;
    c->reasoning = j->reasoning;
    c->think_brackets = j->think_brackets;
    if (j->cache_salt) ok &= (c->cache_salt = strdup(j->cache_salt)) != NULL;
    if (j->tool_names) {
        size_t len = 0;
        while (j->tool_names[len]) len += strlen(j->tool_names + len) + 1;
        if ((c->tool_names = malloc(len + 1))) memcpy(c->tool_names, j->tool_names, len + 1);
        ok &= c->tool_names != NULL;
    }
    c->schema = j->schema ? json_schema_retain(j->schema) : NULL;
    for (int i = 0; i < j->n_stop; i++) ok &= job_add_stop(c, j->stop[i], strlen(j->stop[i])) == 0;
    if (j->sampling.n_logit_bias) {
        const size_t size = (size_t)j->sampling.n_logit_bias * sizeof(*c->logit_bias);
        if ((c->logit_bias = malloc(size))) memcpy(c->logit_bias, j->logit_bias, size);
        c->sampling.logit_bias = c->logit_bias;
        ok &= c->logit_bias != NULL;
    }
    if (!ok) {
        job_release(c);
        return NULL;
    }
    return c;
}

void job_release(serve_job *j) {
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    const int last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last) return;
    for (int i = 0; i < j->n_stop; i++) free(j->stop[i]);
    free(j->prompt);
    free(j->text);
    free(j->ids);
    free(j->logprobs);
    free(j->prompt_logprobs);
    free(j->logit_bias);
    json_schema_release(j->schema);
    free(j->tool_names);
    free(j->cache_salt);
    job_waker_release(j->waker);
    pthread_cond_destroy(&j->cv);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

int job_add_stop(serve_job *j, const char *s, size_t len) {
    if (j->n_stop == JOB_MAX_STOP || !(j->stop[j->n_stop] = strndup(s, len))) return -1;
    j->n_stop++;
    return 0;
}

static size_t ready_before_calls(const serve_job *j, size_t ready, bool more_may_come);

void job_settle(serve_job *j, const char *error) {
    pthread_mutex_lock(&j->mu);
    if (error) snprintf(j->error, sizeof(j->error), "%s", error);
    /* What was held back for a stop string is final now; a tool call's
     * text stays back until job_finish (then the answer is read whole) */
    j->ready = ready_before_calls(j, j->len, false);
    j->cancelled = atomic_load(&j->cancel);
    pthread_mutex_unlock(&j->mu);
}

void job_finish(serve_job *j) {
    pthread_mutex_lock(&j->mu);
    j->done = 1;
    job_notify(j);
    pthread_mutex_unlock(&j->mu);
}

job_waker *job_waker_new(void) {
    job_waker *w = calloc(1, sizeof(*w));
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    atomic_init(&w->refs, 1);
    return w;
}

job_waker *job_waker_retain(job_waker *w) {
    atomic_fetch_add(&w->refs, 1);
    return w;
}

void job_waker_release(job_waker *w) {
    if (!w || atomic_fetch_sub(&w->refs, 1) != 1) return;
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

void job_notify(serve_job *j) {
    pthread_cond_broadcast(&j->cv);
    if (!j->waker) return;
    pthread_mutex_lock(&j->waker->mu); /* (lock order: the job's, then its waker's) */
    j->waker->changes++;
    pthread_cond_broadcast(&j->waker->cv);
    pthread_mutex_unlock(&j->waker->mu);
}

/* ---- text as it is generated ---- */

/* The end of text[0..n) backed off to the start of an unfinished UTF-8
 * character, if it ends in one. */
static size_t utf8_whole(const char *text, size_t n) {
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        const unsigned char c = (unsigned char)text[n - back];
        if ((c & 0xC0) == 0x80) continue; /* a continuation byte */
        const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back ? n - back : n;
    }
    return n;
}

static int text_append(serve_job *j, const char *p, size_t n) {
    if (j->len + n + 1 > j->cap) {
        size_t cap = 2 * (j->len + n) + 256;
        char *t = realloc(j->text, cap);
        if (!t) return -1;
        j->text = t;
        j->cap = cap;
    }
    memcpy(j->text + j->len, p, n);
    j->len += n;
    j->text[j->len] = '\0';
    return 0;
}

/* How many bytes at the end of text[0..len) are the start of tag (but not
 * all of it): a tag that the next piece may complete. */
static size_t tag_part_at_end(const char *text, size_t len, const char *tag) {
    for (size_t k = strlen(tag) - 1; k > 0; k--)
        if (k <= len && !memcmp(text + len - k, tag, k)) return k;
    return 0;
}

size_t skip_space(const char *text, size_t at, size_t len) {
    while (at < len &&
           (text[at] == ' ' || text[at] == '\t' || text[at] == '\r' || text[at] == '\n'))
        at++;
    return at;
}

size_t trim_space_back(const char *text, size_t end) {
    while (end && (text[end - 1] == ' ' || text[end - 1] == '\t' || text[end - 1] == '\r' ||
                   text[end - 1] == '\n'))
        end--;
    return end;
}

/* Looks for the stop strings in text that the last piece (from `from`) may
 * have completed. Returns where the earliest match starts, or -1; *hold gets
 * how many bytes at the end could still become one. */
static long find_stop(const serve_job *j, size_t from, size_t *hold) {
    long first = -1;
    *hold = 0;
    for (int i = 0; i < j->n_stop; i++) {
        const size_t sl = strlen(j->stop[i]);
        const size_t start = from >= sl - 1 ? from - (sl - 1) : 0;
        const char *hit = memmem(j->text + start, j->len - start, j->stop[i], sl);
        if (hit && (first < 0 || hit - j->text < first)) first = hit - j->text;
        const size_t part = tag_part_at_end(j->text, j->len, j->stop[i]);
        if (part > *hold) *hold = part;
    }
    return first;
}

/* The reasoning's tags of j. */
static const char *think_open(const serve_job *j) {
    return j->think_brackets ? "[THINK]" : "<think>";
}

static const char *think_close(const serve_job *j) {
    return j->think_brackets ? "[/THINK]" : "</think>";
}

bool job_reasoning(const serve_job *j, size_t *r0, size_t *r1, size_t *c0) {
    const char *text = j->text ? j->text : "", *open = think_open(j), *close = think_close(j);
    *r0 = *r1 = *c0 = 0;
    const size_t i = skip_space(text, 0, j->len), ol = strlen(open), cl = strlen(close);
    if (j->reasoning == JOB_THINKING)
        *r0 = 0; /* (opened by the prompt) */
    else if (!j->reasoning || j->len - i < ol || memcmp(text + i, open, ol))
        return false;
    else
        *r0 = i + ol;
    const char *end = memmem(text + *r0, j->len - *r0, close, cl);
    *r1 = end ? (size_t)(end - text) : j->len;
    *c0 = end ? skip_space(text, *r1 + cl, j->len) : j->len;
    return true;
}

int job_printed_tags(const serve_job *j, const cake_tokenizer *t, cake_token *ids,
                     const char **texts) {
    const chat_call_syntax *c = j->call_format ? chat_calls(j->call_format) : NULL;
    const char *const tags[JOB_PRINTED_TAGS] = {
        c ? c->open : NULL, c ? c->args_tag : NULL, c ? c->id_tag : NULL,
        j->reasoning ? think_open(j) : NULL, j->reasoning ? think_close(j) : NULL};
    return chat_silent_tokens(t, tags, JOB_PRINTED_TAGS, ids, texts);
}

/* Where the text may begin a tool call (held back from streams until the
 * answer is read whole): at its tag, or at a part of the tag the text ends
 * with while more may come; for a call that is the whole answer, from the
 * start while the first byte that is not white space is '{' (or has not
 * come). */
static size_t call_start(const serve_job *j, bool more_may_come) {
    const chat_call_syntax *syntax = j->call_format ? chat_calls(j->call_format) : NULL;
    if (!syntax) return j->len;
    if (!syntax->open[0]) {
        const size_t i = skip_space(j->text, 0, j->len);
        if (i == j->len) return more_may_come ? 0 : j->len;
        return j->text[i] == '{' ? 0 : j->len;
    }
    const char *hit = memmem(j->text, j->len, syntax->open, strlen(syntax->open));
    if (hit) return (size_t)(hit - j->text);
    return j->len - (more_may_come ? tag_part_at_end(j->text, j->len, syntax->open) : 0);
}

/* Where a thinking answer's text may still be a tag: from the start while
 * it is white space and a part of "<think>"; inside the reasoning, at a
 * part of "</think>" the text ends with. (While more may come.) */
static size_t think_start(const serve_job *j, bool more_may_come) {
    if (!j->reasoning || !more_may_come) return j->len;
    size_t r0, r1, c0;
    if (!job_reasoning(j, &r0, &r1, &c0)) { /* not opened: white space and a part of the tag? */
        const size_t i = skip_space(j->text, 0, j->len), rest = j->len - i;
        const char *open = think_open(j);
        return rest < strlen(open) && !memcmp(j->text + i, open, rest) ? 0 : j->len;
    }
    return r1 < j->len ? j->len : j->len - tag_part_at_end(j->text, j->len, think_close(j));
}

/* `ready` held back from where a tool call may begin, and, with tools,
 * from the white space before that: a finished answer's content ends
 * before its calls, white space trimmed (answer_calls). */
static size_t ready_before_calls(const serve_job *j, size_t ready, bool more_may_come) {
    if (!j->text) return 0; /* (no text yet) */
    const size_t call = call_start(j, more_may_come);
    if (ready > call) ready = call;
    return j->call_format ? trim_space_back(j->text, ready) : ready;
}

int job_add_text(serve_job *j, const char *piece, size_t n) {
    const size_t from = j->len;
    if (text_append(j, piece, n)) return -1;
    size_t hold; /* (held back even before min_tokens: a stop string may end after it) */
    long at = find_stop(j, from, &hold);
    if (j->min_tokens > 0 && j->n_ids <= j->min_tokens) at = -1; /* (vLLM's: not read yet) */
    if (at >= 0) {
        j->len = (size_t)at; /* the stop string is not part of the text */
        j->text[j->len] = '\0';
    }
    /* (a stop string ends the text) */
    j->ready = ready_before_calls(j, utf8_whole(j->text, j->len - (at >= 0 ? 0 : hold)), at < 0);
    const size_t think = think_start(j, at < 0);
    if (j->ready > think) j->ready = think;
    return at >= 0;
}
