/* The OpenAI-compatible request and response bodies of /v1/completions and
 * /v1/chat/completions (JSON through cJSON): parsing a request into a job,
 * and the JSON of a whole response, of a stream's chunks and of an error.
 * Pure functions of their inputs, so the tests can take them apart without
 * a socket. */
#ifndef CAKE_SERVER_OPENAI_H
#define CAKE_SERVER_OPENAI_H

#include <stddef.h>

#include "server/chat.h"
#include "server/pool.h"

typedef struct {
    const cake_tokenizer *tok;
    int n_vocab;
    int n_ctx;                  /* a slot's context: prompt + generation must fit */
    chat_format chat;           /* CHAT_NONE: chat requests are refused */
    const char *name;           /* the model's id in responses */
    const char *default_system; /* ChatML: the template's system message (NULL: none) */
    /* Llama 3.1 and later: the date their system turn writes (chat_llama3_date;
     * "": the day's; NULL: no such turn) */
    const char *llama3_date;
    int open_thinking;   /* the template opens the answer's <think> (chat_opens_thinking) */
    int strip_reasoning; /* it cuts earlier answers' reasoning (chat_strips_reasoning) */
    /* Mistral v7: the template, whose system message for chats without one
     * has the day's date (chat_dated_default_system; NULL: none) */
    const char *dated_system_template;
} api_model;

typedef struct {
    int chat;                  /* /v1/chat/completions */
    int stream;                /* server-sent events */
    int include_usage;         /* stream_options.include_usage: a last chunk with usage */
    const cake_tokenizer *tok; /* the tokens' text, for log-probabilities */
    int n;                     /* choices a prompt: its job and n - 1 clones (job_clone) */
    int n_prompts;             /* prompts (a completion's list; else 1) */
    int prompt_logprobs;       /* vLLM's prompt_logprobs asked: answered with them */
} api_shape;

#define API_MAX_CHOICES 16 /* n */
#define API_MAX_JOBS    64 /* n x prompts */

/* Parses a request body into a new job for each of its prompts (out[0 ..
 * shape->n_prompts): room for API_MAX_JOBS, though a chat, or a completion
 * of one prompt, makes one; the caller releases them) and how to answer.
 * 0, or -1 (out[0] NULL) with a message for a 400 response in err. */
int api_parse(const char *body, size_t len, int chat, const api_model *m, serve_job **out,
              api_shape *shape, char *err, size_t errlen);

/* The JSON of a whole response: the finished jobs of its n choices (in
 * all: n x prompts, a prompt's choices together, index their place), in
 * order. id: "cmpl-..." or "chatcmpl-..."; created: Unix seconds.
 * malloc'd; NULL on out of memory. */
char *api_response(const api_shape *s, serve_job *const *jobs, int n, const char *id, long created,
                   const char *model);
/* One server-sent event of a stream, "data: {...}\n\n", of choice `index`
 * (job j): a piece of text (text_len bytes; the first chunk of a chat also
 * carries the role), the tool calls of a finished job, or its last chunk
 * (finish_reason). A text or last
 * chunk of a job that asked for log-probabilities carries those of its
 * tokens [tok_from, tok_to). */
typedef enum { CHUNK_TEXT, CHUNK_REASONING, CHUNK_FIRST, CHUNK_CALLS, CHUNK_FINISH } api_chunk_kind;
char *api_stream_event(const api_shape *s, api_chunk_kind kind, int index, const char *text,
                       size_t text_len, int tok_from, int tok_to, const serve_job *j,
                       const char *id, long created, const char *model);
/* The usage event of a stream (stream_options.include_usage), after every
 * choice's last chunk. */
char *api_stream_usage(const api_shape *s, serve_job *const *jobs, int n, const char *id,
                       long created, const char *model);
/* The tokens of a job's answer that a stream may report (log-probabilities)
 * once its text up to `sent` bytes is out: those whose text ends there or
 * before, or, once the job is done, every token whose text begins within
 * the answer (not those after a stop string). Under the job's lock. */
int api_answer_tokens(const serve_job *j, size_t sent);
/* Where a finished job's content ends: before the tool calls its answer
 * makes (with tools), else at its end. Under the job's lock. */
size_t api_content_end(const serve_job *j);
/* The next piece of a job's answer a stream may send once `sent` bytes of
 * its text are handled: [*from, *to) (the bytes before *from are tags or
 * white space it skips). 1: reasoning (a thinking model's), 2: content, 0:
 * none is due. Under the job's lock. */
int api_next_piece(const serve_job *j, size_t sent, size_t *from, size_t *to);

/* /tokenize: {"prompt": text} (tokenized as /v1/completions does) or
 * {"messages": [...]} (the prompt /v1/chat/completions builds) gives
 * {"tokens": [...], "count": n, "max_model_len": the context}. /detokenize:
 * {"tokens": [...]} gives {"prompt": text}. 0 with *out (malloc'd JSON;
 * NULL on out of memory), or -1 with a message for a 400 in err. */
int api_tokenize(const char *body, size_t len, const api_model *m, char **out, char *err,
                 size_t errlen);
int api_detokenize(const char *body, size_t len, const api_model *m, char **out, char *err,
                   size_t errlen);

/* The /v1/models list of the one model. */
char *api_models(const char *name);

/* "data: <json>\n\n", a server-sent event (json, malloc'd, is taken over;
 * NULL gives NULL). */
char *api_sse_event(char *json);

/* {"error":{"message":...,"type":...,"code":status}} */
char *api_error(int status, const char *message);

/* text[0..len) as valid UTF-8: bytes that are not become U+FFFD. NUL-ended,
 * malloc'd; NULL on out of memory. */
char *api_utf8_clean(const char *text, size_t len);

#endif
