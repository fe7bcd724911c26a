/* libFuzzer target for what `cake serve` reads from the network (see
 * fuzz/README.md). The first byte picks the part under test.
 *
 * Even: the rest is a request body for api_parse, completions or chat (bit
 * 1), on a model whose context (bits 2-7) and chat format (the second byte)
 * vary; with bit 3 of the second byte, the body is read as a chat template
 * too, for the system message a ChatML template writes (chat_default_system).
 * A refused body must come with a message and no job; an accepted one must
 * give a job the engine can run as it is: 1 <= prompt < context, every id
 * in the vocabulary, 1 <= max_tokens <= what the context leaves, sampling in
 * range, non-empty stop strings. Its answers (whole, each stream event, an
 * error) must be valid JSON, whatever bytes its text holds.
 *
 * 3 mod 8: bytes for JSON mode's automaton (engine/json_grammar.h). Where
 * it takes them all and calls the object closed, cJSON must read one object
 * from all of them (but for \u escapes, where cJSON also checks surrogate
 * pairs, which the JSON grammar does not ask for).
 *
 * 7 mod 8: a JSON schema, a NUL, then bytes for the automaton on what
 * server/json_schema.c compiles of it (a refusal must come with a
 * message). Where it takes them all and calls the value whole, cJSON must
 * read one value from all of them; an enum's must be one of its values.
 *
 * 1 mod 4: stop strings and pieces of generated text for job_add_text
 * (bits 2-3: with or without tool calls that may be held back; bit 4: a
 * thinking model's tags). The
 * text must always be the pieces so far cut before the first stop string in
 * them (the stop excluded), the final part (ready) must only grow, so never
 * hold the start of a stop string that comes later, and the parts a stream
 * sends, each made valid UTF-8 alone, must add up to the whole answer.
 *
 * The vocabulary: byte-level BPE with the 256 bytes, a few merges and the
 * special tokens of ChatML and Llama 3. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_check.h"
#include "engine/json_grammar.h"
#include "gpt2_bytes.h"
#include "model/tokenizer.h"
#include "server/json_schema.h"
#include "server/openai.h"

static cake_tokenizer *g_tok;

static void init_vocab(void) {
    static const char *const extra[] = {"he",
                                        "in",
                                        "<|im_start|>",
                                        "<|im_end|>",
                                        "<|start_header_id|>",
                                        "<|end_header_id|>",
                                        "<|eot_id|>",
                                        "<s>",
                                        "</s>"};
    static const char *const merges[] = {"h e", "i n"};
    enum { N_EXTRA = sizeof(extra) / sizeof(extra[0]) };
    static char chars[256][3];
    const char *tokens[256 + N_EXTRA];
    int32_t types[256 + N_EXTRA];
    for (int b = 0; b < 256; b++) {
        byte_char(b, chars[b]);
        tokens[b] = chars[b];
        types[b] = CAKE_TOKEN_NORMAL;
    }
    for (int i = 0; i < N_EXTRA; i++) {
        tokens[256 + i] = extra[i];
        types[256 + i] = i >= 2 ? CAKE_TOKEN_CONTROL : CAKE_TOKEN_NORMAL;
    }
    cake_vocab_arrays v = {.n_vocab = 256 + N_EXTRA,
                           .tokens = tokens,
                           .types = types,
                           .bos = 256 + N_EXTRA - 2,
                           .eos = 256 + N_EXTRA - 1,
                           .unk = -1,
                           .add_bos = true,
                           .merges = merges,
                           .n_merges = 2,
                           .pre = "llama-bpe"};
    char err[256];
    if (cake_tokenizer_init_arrays(&v, &g_tok, err, sizeof(err))) {
        fprintf(stderr, "fuzz_api: %s\n", err);
        abort();
    }
}

static void check_json(char *s) {
    CHECK(s);
    cJSON *j = cJSON_Parse(s);
    CHECK(j);
    cJSON_Delete(j);
    free(s);
}

static void check_event(char *ev) {
    CHECK(ev && !strncmp(ev, "data: ", 6));
    const size_t n = strlen(ev);
    CHECK(n >= 8 && !strcmp(ev + n - 2, "\n\n"));
    ev[n - 2] = '\0';
    cJSON *j = cJSON_Parse(ev + 6);
    CHECK(j);
    cJSON_Delete(j);
    free(ev);
}

/* A chat format for fuzz_parse's second byte: Mistral's with tools for
 * 0xf0 and up (v3 from 0xf8, with bit 3: the body read as a template too;
 * else v7-tekken, v11, v13), else one of the first six. */
static chat_format mistral_or(uint8_t b) {
    static const chat_format later[] = {CHAT_MISTRAL_V7_TEKKEN, CHAT_MISTRAL_V11, CHAT_MISTRAL_V13,
                                        CHAT_MISTRAL_V13};
    return b >= 0xf8 ? CHAT_MISTRAL_V3 : b >= 0xf0 ? later[b & 3] : (chat_format)(b % 6);
}

static void fuzz_parse(const uint8_t *data, size_t size) {
    if (size < 2) return;
    const int chat = data[0] >> 1 & 1;
    /* The body read as a chat template too (bit 3 of the second byte): the
     * system message a ChatML template writes, if it holds one, is a
     * non-empty string found in it, and the chats get it. */
    char *tmpl = data[1] & 8 ? strndup((const char *)data + 2, size - 2) : NULL;
    char *system = chat_default_system(tmpl);
    CHECK(!system || (system[0] && strlen(system) < size));
    char *date = chat_llama3_date(tmpl); /* (Llama 3.1's; "" the day's) */
    CHECK(!date || (tmpl && strlen(date) < 32));
    char *dated = chat_dated_default_system(tmpl, 1796000000); /* (Mistral Small 3's) */
    CHECK(!dated || (dated[0] && strlen(dated) < size + 4096));
    free(dated);
    const api_model m = {.tok = g_tok,
                         .n_vocab = cake_tokenizer_n_vocab(g_tok),
                         /* (63: room for a prompt listing tools) */
                         .n_ctx = data[0] >> 2 == 63 ? 8192 : 1 + (data[0] >> 2) * 4,
                         .chat = mistral_or(data[1]),
                         .name = "fuzz",
                         .default_system = system,
                         .llama3_date = date};
    /* /tokenize and /detokenize of the same body */
    char *out = NULL, err[256] = "";
    if (api_tokenize((const char *)data + 2, size - 2, &m, &out, err, sizeof(err)) == 0)
        check_json(out);
    else
        CHECK(err[0] && !out);
    if (api_detokenize((const char *)data + 2, size - 2, &m, &out, err, sizeof(err)) == 0)
        check_json(out);
    else
        CHECK(err[0] && !out);
    err[0] = '\0';
    serve_job *jobs[API_MAX_JOBS] = {(serve_job *)1};
    api_shape shape;
    const int rc =
        api_parse((const char *)data + 2, size - 2, chat, &m, jobs, &shape, err, sizeof(err));
    if (rc) {
        CHECK(rc == -1 && err[0] && !jobs[0]);
        check_json(api_error(400, err));
        free(system);
        free(date);
        free(tmpl);
        return;
    }
    CHECK(shape.n >= 1 && shape.n <= API_MAX_CHOICES && shape.n_prompts >= 1 &&
          shape.n_prompts * shape.n <= API_MAX_JOBS && (!chat || shape.n_prompts == 1));
    for (int k = 0; k < shape.n_prompts; k++) { /* each prompt's job */
        const serve_job *p = jobs[k];
        CHECK(p && p->n_prompt >= 1 && p->n_prompt < m.n_ctx);
        for (int i = 0; i < p->n_prompt; i++) CHECK(p->prompt[i] >= 0 && p->prompt[i] < m.n_vocab);
        /* (an echo may ask for no tokens: the prompt alone) */
        CHECK(p->max_tokens >= !p->echo && p->max_tokens <= m.n_ctx - p->n_prompt);
        CHECK(p->sampling.seed == jobs[0]->sampling.seed && p->echo == jobs[0]->echo);
    }
    for (int k = 1; k < shape.n_prompts; k++) job_release(jobs[k]);
    serve_job *j = jobs[0];
    CHECK(j->n_stop_ids >= 0 && j->n_stop_ids <= JOB_MAX_STOP_IDS);
    for (int i = 0; i < j->n_stop_ids; i++)
        CHECK(j->stop_ids[i] >= 0 && j->stop_ids[i] < m.n_vocab);
    serve_job *clone = job_clone(j, 1); /* another choice: the same request */
    CHECK(clone && clone->n_prompt == j->n_prompt && clone->n_stop == j->n_stop &&
          clone->n_stop_ids == j->n_stop_ids &&
          clone->sampling.n_logit_bias == j->sampling.n_logit_bias &&
          clone->sampling.seed == j->sampling.seed + 1 &&
          !memcmp(clone->prompt, j->prompt, (size_t)j->n_prompt * sizeof(*j->prompt)));
    job_release(clone);
    CHECK(j->sampling.temperature >= 0 && j->sampling.temperature <= 2);
    CHECK(j->sampling.top_p > 0 && j->sampling.top_p <= 1);
    CHECK(fabsf(j->sampling.frequency_penalty) <= 2 && fabsf(j->sampling.presence_penalty) <= 2);
    CHECK(j->sampling.n_logit_bias >= 0 && j->sampling.n_logit_bias <= 1024);
    CHECK(j->sampling.top_k >= 0 && j->sampling.min_p >= 0 && j->sampling.min_p <= 1);
    for (int i = 0; i < j->sampling.n_logit_bias; i++)
        CHECK(j->sampling.logit_bias[i].id >= 0 && j->sampling.logit_bias[i].id < m.n_vocab &&
              fabsf(j->sampling.logit_bias[i].bias) <= 100);
    CHECK(j->n_stop >= 0 && j->n_stop <= JOB_MAX_STOP);
    for (int i = 0; i < j->n_stop; i++) CHECK(j->stop[i][0]);
    CHECK(j->end_of_turn >= -1 && j->end_of_turn < m.n_vocab);
    CHECK(chat || j->end_of_turn == -1);
    CHECK(j->top_logprobs >= -1 && j->top_logprobs <= JOB_MAX_TOP_LOGPROBS);
    CHECK(!j->call_format || (chat && j->tool_names && chat_calls(j->call_format)));

    /* Its answers, with the body's own bytes as the text (any bytes), and
     * when asked, log-probabilities of made-up tokens (the prompt's ids)
     * whose texts end anywhere in it. */
    pthread_mutex_lock(&j->mu);
    job_add_text(j, (const char *)data + 2, size - 2);
    if (j->top_logprobs >= 0) {
        const int n = j->n_prompt < 8 ? j->n_prompt : 8;
        j->ids = calloc((size_t)n, sizeof(*j->ids));
        j->logprobs = calloc((size_t)n, sizeof(*j->logprobs));
        CHECK(j->ids && j->logprobs);
        for (int i = 0; i < n; i++) {
            job_logprob *lp = &j->logprobs[i];
            j->ids[i] = j->prompt[i];
            lp->logprob = -(float)i;
            lp->text_end = (size_t)(i + 1) * j->len / (size_t)n;
            lp->n_top = j->top_logprobs < n ? j->top_logprobs : n;
            for (int k = 0; k < lp->n_top; k++) {
                lp->top_id[k] = j->prompt[k];
                lp->top_logprob[k] = -(float)k;
            }
        }
        j->n_ids = n;
    }
    pthread_mutex_unlock(&j->mu);
    job_settle(j, NULL);
    job_finish(j);
    check_json(api_response(&shape, &j, 1, "cmpl-1", 1, m.name));
    check_event(api_stream_event(&shape, CHUNK_FIRST, 0, "", 0, 0, 0, j, "cmpl-1", 1, m.name));
    const int half = api_answer_tokens(j, j->len / 2), all = api_answer_tokens(j, j->len);
    CHECK(half >= 0 && half <= all && all <= j->n_ids);
    check_event(
        api_stream_event(&shape, CHUNK_TEXT, 0, j->text, j->len, 0, half, j, "cmpl-1", 1, m.name));
    check_event(
        api_stream_event(&shape, CHUNK_FINISH, 0, "", 0, half, all, j, "cmpl-1", 1, m.name));
    check_event(api_stream_usage(&shape, &j, 1, "cmpl-1", 1, m.name));
    CHECK(api_content_end(j) <= j->len);
    if (api_content_end(j) < j->len) /* (calls were read) */
        check_event(api_stream_event(&shape, CHUNK_CALLS, 0, "", 0, 0, 0, j, "cmpl-1", 1, m.name));
    job_release(j);
    free(system);
    free(date);
    free(tmpl);
}

/* Where the first of the stop strings starts in s[0..n), or -1. */
static long first_stop(const serve_job *j, const char *s, size_t n) {
    long first = -1;
    for (int i = 0; i < j->n_stop; i++) {
        const char *hit = memmem(s, n, j->stop[i], strlen(j->stop[i]));
        if (hit && (first < 0 || hit - s < first)) first = hit - s;
    }
    return first;
}

/* Where the first stop string that ends in s[from..n) starts, or -1 (the
 * stops read after min_tokens: those that end in a later token's text). */
static long stop_ending_after(const serve_job *j, const char *s, size_t n, size_t from) {
    long first = -1;
    for (int i = 0; i < j->n_stop; i++) {
        const size_t sl = strlen(j->stop[i]), start = from >= sl - 1 ? from - (sl - 1) : 0;
        const char *hit = memmem(s + start, n - start, j->stop[i], sl);
        if (hit && (first < 0 || hit - s < first)) first = hit - s;
    }
    return first;
}

/* s (of *len bytes) followed by text[0..n) made valid UTF-8. */
static char *append_clean(char *s, size_t *len, const char *text, size_t n) {
    char *clean = api_utf8_clean(text, n);
    CHECK(clean);
    const size_t cn = strlen(clean);
    s = realloc(s, *len + cn + 1);
    CHECK(s);
    memcpy(s + *len, clean, cn + 1);
    *len += cn;
    free(clean);
    return s;
}

static void fuzz_text(const uint8_t *data, size_t size) {
    size_t at = 1;
    cake_token *prompt = malloc(sizeof(*prompt));
    CHECK(prompt);
    prompt[0] = 0;
    serve_job *j = job_create(prompt, 1);
    CHECK(j);
    /* bits 2-3: the text may hold tool calls (held back while generated) */
    const chat_format calls[] = {CHAT_NONE, CHAT_CHATML, CHAT_LLAMA3, CHAT_MISTRAL_V3};
    j->call_format = calls[data[0] >> 2 & 3];
    /* (Mistral's with bit 6: v11's name[CALL_ID]id[ARGS]{...} instead) */
    if (j->call_format == CHAT_MISTRAL_V3 && data[0] >> 6 & 1) j->call_format = CHAT_MISTRAL_V11;
    /* bit 4: <think> and its end held back (with bit 7: opened by the prompt) */
    j->reasoning = data[0] >> 4 & 1 ? (data[0] >> 7 ? JOB_THINKING : 1) : 0;
    /* (with v11's calls, Magistral's [THINK] tags) */
    j->think_brackets = j->reasoning && j->call_format == CHAT_MISTRAL_V11;
    /* bit 5: min_tokens 1..4 (bits 6-7): stop strings not read in the
     * first pieces (each piece is a token, counted as the pool counts) */
    j->min_tokens = data[0] >> 5 & 1 ? (data[0] >> 6) + 1 : 0;
    const int n_stop = at < size ? data[at++] % (JOB_MAX_STOP + 1) : 0;
    for (int i = 0; i < n_stop && at < size; i++) {
        size_t len = data[at++] % 6 + 1;
        if (len > size - at) len = size - at;
        if (!len || memchr(data + at, 0, len)) break; /* stops are C strings */
        CHECK(job_add_stop(j, (const char *)data + at, len) == 0);
        at += len;
    }
    char *all = malloc(size + 1);
    CHECK(all);
    size_t all_len = 0, ready = 0, sent = 0, streamed_len = 0;
    char *streamed = NULL;
    int stopped = 0;
    while (at < size && !stopped) {
        size_t len = data[at++] % 9;
        if (len > size - at) len = size - at;
        memcpy(all + all_len, data + at, len);
        all_len += len;
        pthread_mutex_lock(&j->mu);
        j->n_ids++;
        stopped = job_add_text(j, (const char *)data + at, len);
        pthread_mutex_unlock(&j->mu);
        at += len;
        CHECK(stopped == 0 || stopped == 1);
        const long stop_at = !j->min_tokens ? first_stop(j, all, all_len)
                             : j->n_ids <= j->min_tokens
                                 ? -1
                                 : stop_ending_after(j, all, all_len, all_len - len);
        CHECK(stopped == (stop_at >= 0));
        CHECK(j->len == (stopped ? (size_t)stop_at : all_len));
        CHECK(!memcmp(j->text, all, j->len));
        CHECK(j->ready >= ready && j->ready <= j->len);
        ready = j->ready;
        /* what a stream sends: each final part, made valid UTF-8 alone */
        streamed = append_clean(streamed, &streamed_len, j->text + sent, j->ready - sent);
        sent = j->ready;
    }
    /* (ready only grew and stayed within the text, which ends where a stop
     * string starts: no stop ever started inside what was final) */
    job_settle(j, NULL);
    job_finish(j);
    /* (with tools, a call's text and the white space before it stay back:
     * a finished answer's content ends at api_content_end) */
    CHECK(j->ready >= ready && j->ready <= j->len && j->done);
    CHECK(j->call_format || j->ready == j->len);
    /* The stream's parts add up to the whole answer: no cut split a
     * character that the whole text has. */
    const char *text = j->text ? j->text : ""; /* NULL: no piece came */
    size_t r0, r1, c0;
    if (job_reasoning(j, &r0, &r1, &c0)) CHECK(r0 <= r1 && r1 <= c0 && c0 <= j->len);
    streamed = append_clean(streamed, &streamed_len, text + sent, j->len - sent);
    char *whole = api_utf8_clean(text, j->len);
    CHECK(whole && strlen(whole) == streamed_len && !memcmp(whole, streamed, streamed_len));
    free(whole);
    free(streamed);
    free(all);
    job_release(j);
}

/* text[0..n) through the automaton from root (NULL: any object); when it
 * takes it all as a whole value, cJSON's parse of it (NULL where \u escapes
 * leave cJSON stricter than the grammar). */
static cJSON *json_read(const char *text, size_t n, const cake_json_node *root) {
    cake_json_state s;
    cake_json_start(&s, root);
    for (size_t i = 0; i < n; i++)
        if (!cake_json_feed(&s, text + i, 1)) return NULL;
    CHECK(s.depth >= 0 && s.depth <= CAKE_JSON_MAX_DEPTH);
    if (!cake_json_complete(&s)) return NULL;
    for (size_t i = 0; i + 1 < n; i++)
        if (text[i] == '\\' && text[i + 1] == 'u') return NULL;
    const char *end = NULL;
    cJSON *o = cJSON_ParseWithLengthOpts(text, n, &end, false);
    CHECK(o && end == text + n);
    return o;
}

static void fuzz_json(const uint8_t *data, size_t size) {
    cJSON *o = json_read((const char *)data + 1, size - 1, NULL);
    CHECK(!o || cJSON_IsObject(o));
    cJSON_Delete(o);
}

static void fuzz_schema(const uint8_t *data, size_t size) {
    const char *schema_text = (const char *)data + 1;
    const char *nul = memchr(schema_text, 0, size - 1);
    if (!nul) return;
    cJSON *doc = cJSON_ParseWithLength(schema_text, (size_t)(nul - schema_text));
    if (!doc) return;
    char err[256] = "";
    json_schema *schema = json_schema_compile(doc, err, sizeof(err));
    cJSON_Delete(doc);
    CHECK(schema || err[0]);
    if (!schema) return;
    const cake_json_node *root = json_schema_root(schema);
    const char *text = nul + 1;
    const size_t n = size - 1 - (size_t)(nul + 1 - schema_text);
    cJSON *v = json_read(text, n, root);
    if (v && root->kind == CAKE_JSON_ENUM) { /* its compact form is one of the values */
        char *compact = cJSON_PrintUnformatted(v);
        bool found = false;
        for (int i = 0; compact && i < root->n; i++) found |= !strcmp(root->names[i], compact);
        CHECK(!compact || found);
        cJSON_free(compact);
    }
    cJSON_Delete(v);
    json_schema_release(schema);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_tok) init_vocab();
    if (size < 1) return 0;
    if ((data[0] & 7) == 7)
        fuzz_schema(data, size);
    else if ((data[0] & 3) == 3)
        fuzz_json(data, size);
    else if (data[0] & 1)
        fuzz_text(data, size);
    else
        fuzz_parse(data, size);
    return 0;
}
