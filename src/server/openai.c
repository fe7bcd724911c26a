#include "server/openai.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/tokenizer.h"
#include "util/err.h"
#include "util/utf8.h"

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 character at s[0..n), or 0 (NUL counts as
 * invalid: cJSON strings end at it). */
static size_t utf8_char(const unsigned char *s, size_t n) {
    return s[0] == 0 ? 0 : s[0] < 0x80 ? 1 : utf8_char_len(s, n);
}

char *api_utf8_clean(const char *text, size_t len) {
    char *out = malloc(3 * len + 1); /* a bad byte becomes 3 */
    if (!out) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        const size_t k = utf8_char((const unsigned char *)text + i, len - i);
        if (k) {
            memcpy(out + o, text + i, k);
            o += k, i += k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3); /* U+FFFD */
            o += 3, i++;
        }
    }
    out[o] = '\0';
    return out;
}

/* ---- requests ---- */

static const cJSON *field(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return v && !cJSON_IsNull(v) ? v : NULL; /* null means "not given" */
}

/* An integer-valued number in [lo, hi]. */
static int int_field(const cJSON *o, const char *key, double lo, double hi, double *out, char *err,
                     size_t errlen) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < lo ||
        v->valuedouble > hi)
        return cake_err(err, errlen, "'%s' must be an integer in [%.0f, %.0f]", key, lo, hi);
    *out = v->valuedouble;
    return 0;
}

static int num_field(const cJSON *o, const char *key, double lo, double hi, double *out, char *err,
                     size_t errlen) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
        return cake_err(err, errlen, "'%s' must be a number in [%g, %g]", key, lo, hi);
    *out = v->valuedouble;
    return 0;
}

static int bool_field(const cJSON *o, const char *key, int *out, char *err, size_t errlen) {
    const cJSON *v = field(o, key);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) return cake_err(err, errlen, "'%s' must be true or false", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* Fields that would change the answer in ways cake does not do: refused
 * rather than ignored. Their "off" values (null, false, 0, []) pass. */
static int unsupported(const cJSON *o, char *err, size_t errlen) {
    static const char *keys[] = {"functions",    "best_of",       "grammar",
                                 "guided_regex", "guided_choice", "guided_grammar"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        const cJSON *v = field(o, keys[i]);
        if (!v || cJSON_IsFalse(v) || (cJSON_IsNumber(v) && v->valuedouble == 0) ||
            (!strcmp(keys[i], "best_of") && cJSON_IsNumber(v) && v->valuedouble == 1) ||
            ((cJSON_IsArray(v) || cJSON_IsObject(v)) && cJSON_GetArraySize(v) == 0))
            continue;
        return cake_err(err, errlen, "'%s' is not supported", keys[i]);
    }
    /* llama.cpp's other samplers: sent by some clients at their neutral
     * values, which pass */
    static const struct {
        const char *key;
        double neutral;
    } samplers[] = {{"typical_p", 1},       {"tfs_z", 1},          {"top_a", 0},
                    {"mirostat", 0},        {"mirostat_mode", 0},  {"dry_multiplier", 0},
                    {"xtc_probability", 0}, {"dynatemp_range", 0}, {"smoothing_factor", 0}};
    for (size_t i = 0; i < sizeof(samplers) / sizeof(samplers[0]); i++) {
        const cJSON *v = field(o, samplers[i].key);
        if (v && !(cJSON_IsNumber(v) && v->valuedouble == samplers[i].neutral))
            return cake_err(err, errlen, "'%s' is not supported (only its neutral value %g)",
                            samplers[i].key, samplers[i].neutral);
    }
    return 0;
}

/* A completion's echo (the prompt's text, and with logprobs its tokens'
 * log-probabilities, before the answer's); not in streams, nor in chats
 * (vLLM's chat echo repeats the last message: not done). */
static int echo_asked(const cJSON *o, int chat, int stream, int *echo, char *err, size_t errlen) {
    if (bool_field(o, "echo", echo, err, errlen)) return -1;
    if (*echo && chat) return cake_err(err, errlen, "'echo' is for /v1/completions");
    if (*echo && stream) return cake_err(err, errlen, "'echo' with 'stream' is not supported");
    return 0;
}

/* vLLM's prompt_logprobs: k alternatives for each prompt token (0-20); not
 * in streams. */
static int prompt_logprobs_asked(const cJSON *o, int stream, int *k, char *err, size_t errlen) {
    double v = -1;
    if (int_field(o, "prompt_logprobs", 0, JOB_MAX_TOP_LOGPROBS, &v, err, errlen)) return -1;
    if (v >= 0 && stream)
        return cake_err(err, errlen, "'prompt_logprobs' with 'stream' is not supported");
    *k = (int)v;
    return 0;
}

/* The repetition penalty, as vLLM's repetition_penalty (over the whole
 * prompt and answer) or as llama.cpp's repeat_penalty (over the last
 * repeat_last_n tokens of them: 64 unless told, -1 all, 0 off). */
static int repetition_asked(const cJSON *o, float *penalty, int *last_n, char *err, size_t errlen) {
    double vllm = 1, llama = 1, n = -2;
    if (num_field(o, "repetition_penalty", 0.01, 100, &vllm, err, errlen) ||
        num_field(o, "repeat_penalty", 0.01, 100, &llama, err, errlen) ||
        int_field(o, "repeat_last_n", -1, 1 << 30, &n, err, errlen))
        return -1;
    const int llama_style = field(o, "repeat_penalty") != NULL;
    if (llama_style && field(o, "repetition_penalty"))
        return cake_err(err, errlen,
                        "'repetition_penalty' (vLLM's) and 'repeat_penalty' (llama.cpp's) are "
                        "the same penalty: give one");
    if (n == -2) n = llama_style ? 64 : -1;
    *penalty = n == 0 ? 1.0f : (float)(llama_style ? llama : vllm);
    *last_n = n < 0 ? 0 : (int)n;
    return 0;
}

/* Structured output: response_format text (the default), json_object (the
 * answer is one JSON object) or json_schema (a value of the schema); or the
 * schema as vLLM (guided_json) or llama.cpp (json_schema) take it. */
static int json_asked(const cJSON *o, int *json, json_schema **schema, char *err, size_t errlen) {
    const cJSON *rf = field(o, "response_format"), *type = rf ? field(rf, "type") : NULL;
    const cJSON *guided = field(o, "guided_json"), *llama = field(o, "json_schema");
    const cJSON *given = NULL;
    if (guided && cJSON_IsNull(guided)) guided = NULL;
    if (llama && cJSON_IsNull(llama)) llama = NULL;
    if (rf && !cJSON_IsNull(rf)) {
        if (!cJSON_IsObject(rf) || !cJSON_IsString(type) ||
            (strcmp(type->valuestring, "text") && strcmp(type->valuestring, "json_object") &&
             strcmp(type->valuestring, "json_schema")))
            return cake_err(err, errlen,
                            "'response_format' must be {\"type\": \"text\"}, {\"type\": "
                            "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                            "{\"name\": ..., \"schema\": {...}}}");
        *json = strcmp(type->valuestring, "text") != 0;
        if (!strcmp(type->valuestring, "json_schema")) {
            const cJSON *js = field(rf, "json_schema");
            if (!cJSON_IsObject(js))
                return cake_err(err, errlen,
                                "'response_format' json_schema needs a "
                                "'json_schema' object holding the 'schema'");
            given = field(js, "schema"); /* (none: any object, as json_object) */
        }
    }
    if ((guided != NULL) + (llama != NULL) + (*json != 0) > 1)
        return cake_err(err, errlen,
                        "give one of 'response_format', 'guided_json' and "
                        "'json_schema'");
    cJSON *parsed = NULL; /* guided_json may be the schema's text */
    if (guided &&
        !(given = cJSON_IsString(guided) ? (parsed = cJSON_Parse(guided->valuestring)) : guided))
        return cake_err(err, errlen, "'guided_json' is not JSON");
    if (llama) given = llama;
    if (guided || llama) *json = 1;
    if (given && !(*schema = json_schema_compile(given, err, errlen))) {
        char why[200];
        snprintf(why, sizeof(why), "%s", err);
        cake_err(err, errlen, "the JSON schema: %s", why);
    }
    cJSON_Delete(parsed);
    return given && !*schema ? -1 : 0;
}

/* Log-probabilities asked for: how many alternatives per token (-1: none).
 * A completion's `logprobs` is that number; a chat's is true or false, with
 * `top_logprobs` the number. */
static int logprobs_asked(const cJSON *o, int chat, int *top, char *err, size_t errlen) {
    double k = -1;
    if (!chat) {
        if (int_field(o, "logprobs", 0, JOB_MAX_TOP_LOGPROBS, &k, err, errlen)) return -1;
        *top = (int)k;
        return 0;
    }
    int on = 0;
    if (bool_field(o, "logprobs", &on, err, errlen) ||
        int_field(o, "top_logprobs", 0, JOB_MAX_TOP_LOGPROBS, &k, err, errlen))
        return -1;
    if (!on && k > 0) return cake_err(err, errlen, "'top_logprobs' needs 'logprobs': true");
    *top = on ? (k > 0 ? (int)k : 0) : -1;
    return 0;
}

/* "logit_bias": {"token id": bias in [-100, 100], ...}, as OpenAI's. */
#define MAX_LOGIT_BIAS 1024
static int add_logit_bias(const cJSON *o, const api_model *m, serve_job *j, char *err,
                          size_t errlen) {
    const cJSON *v = field(o, "logit_bias"), *b;
    if (!v) return 0;
    const int n = cJSON_GetArraySize(v);
    if (!cJSON_IsObject(v) || n > MAX_LOGIT_BIAS)
        return cake_err(err, errlen, "'logit_bias' must be an object of up to %d token ids",
                        MAX_LOGIT_BIAS);
    if (!n) return 0;
    if (!(j->logit_bias = malloc((size_t)n * sizeof(*j->logit_bias))))
        return cake_err(err, errlen, "out of memory");
    int k = 0;
    cJSON_ArrayForEach(b, v) {
        char *end;
        const long id = strtol(b->string, &end, 10);
        if (b->string[0] < '0' || b->string[0] > '9' || *end || id < 0 || id >= m->n_vocab)
            return cake_err(err, errlen, "'logit_bias': '%.40s' is not a token id (0..%d)",
                            b->string, m->n_vocab - 1);
        if (!cJSON_IsNumber(b) || !(b->valuedouble >= -100 && b->valuedouble <= 100))
            return cake_err(err, errlen, "'logit_bias' values must be numbers in [-100, 100]");
        j->logit_bias[k++] = (cake_logit_bias){(cake_token)id, (float)b->valuedouble};
    }
    j->sampling.logit_bias = j->logit_bias;
    j->sampling.n_logit_bias = k;
    return 0;
}

static int add_stops(const cJSON *o, serve_job *j, char *err, size_t errlen) {
    const cJSON *v = field(o, "stop");
    if (!v) return 0;
    if (cJSON_IsString(v)) {
        if (!v->valuestring[0]) return cake_err(err, errlen, "'stop' must not be empty");
        return job_add_stop(j, v->valuestring, strlen(v->valuestring))
                   ? cake_err(err, errlen, "out of memory")
                   : 0;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > JOB_MAX_STOP)
        return cake_err(err, errlen, "'stop' must be a string or an array of up to %d strings",
                        JOB_MAX_STOP);
    const cJSON *s;
    cJSON_ArrayForEach(s, v) {
        if (!cJSON_IsString(s) || !s->valuestring[0])
            return cake_err(err, errlen, "'stop' must hold non-empty strings");
        if (job_add_stop(j, s->valuestring, strlen(s->valuestring)))
            return cake_err(err, errlen, "out of memory");
    }
    return 0;
}

/* A JSON number that is a token id of m's vocabulary. */
static bool is_token_id(const cJSON *v, const api_model *m) {
    return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && v->valuedouble >= 0 &&
           v->valuedouble < m->n_vocab;
}

/* "stop_token_ids" (vLLM's): tokens that end the answer as EOS does. */
static int add_stop_ids(const cJSON *o, const api_model *m, serve_job *j, char *err,
                        size_t errlen) {
    const cJSON *v = field(o, "stop_token_ids"), *id;
    if (!v) return 0;
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > JOB_MAX_STOP_IDS)
        return cake_err(err, errlen, "'stop_token_ids' must be an array of up to %d token ids",
                        JOB_MAX_STOP_IDS);
    cJSON_ArrayForEach(id, v) {
        if (!is_token_id(id, m))
            return cake_err(err, errlen, "'stop_token_ids' must hold token ids (0..%d)",
                            m->n_vocab - 1);
        j->stop_ids[j->n_stop_ids++] = (cake_token)id->valuedouble;
    }
    return 0;
}

static int tokenize_text(const api_model *m, const char *s, size_t len, cake_token **ids, int *n,
                         char *err, size_t errlen) {
    const bool bos = cake_tokenizer_add_bos(m->tok);
    const int64_t count = cake_tokenize(m->tok, s, len, bos, NULL, 0);
    if (count < 0 || count > INT32_MAX) return cake_err(err, errlen, "tokenization failed");
    if (count == 0) return cake_err(err, errlen, "the prompt is empty (no tokens)");
    if (!(*ids = malloc((size_t)count * sizeof(**ids))))
        return cake_err(err, errlen, "out of memory");
    cake_tokenize(m->tok, s, len, bos, *ids, count);
    *n = (int)count;
    return 0;
}

/* One prompt: a string, or an array of token ids. */
static int completion_prompt(const cJSON *p, const api_model *m, cake_token **ids, int *n,
                             char *err, size_t errlen) {
    if (p && cJSON_IsString(p))
        return tokenize_text(m, p->valuestring, strlen(p->valuestring), ids, n, err, errlen);
    if (!p || !cJSON_IsArray(p))
        return cake_err(err, errlen, "'prompt' must be a string or an array of token ids");
    const int count = cJSON_GetArraySize(p);
    if (count == 0) return cake_err(err, errlen, "the prompt is empty (no tokens)");
    if (!(*ids = malloc((size_t)count * sizeof(**ids))))
        return cake_err(err, errlen, "out of memory");
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, p) {
        if (!is_token_id(v, m)) {
            free(*ids);
            *ids = NULL;
            return cake_err(err, errlen,
                            "'prompt' item %d is not a token id of this model (0..%d); several "
                            "prompts are a list of strings or of lists of token ids",
                            i, m->n_vocab - 1);
        }
        (*ids)[i++] = (cake_token)v->valuedouble;
    }
    *n = count;
    return 0;
}

/* A completion's prompts: one (a string, or token ids) or a list of them
 * (strings, or lists of token ids, as lm-eval sends them), each fitting
 * the context; their ids into ids[0 .. *count) (malloc'd), at most
 * API_MAX_JOBS. On an error none are left. */
static int completion_prompts(const cJSON *o, const api_model *m, cake_token **ids, int *ns,
                              int *count, char *err, size_t errlen) {
    const cJSON *p = field(o, "prompt");
    const int list =
        p && cJSON_IsArray(p) && p->child && (cJSON_IsString(p->child) || cJSON_IsArray(p->child));
    const int total = list ? cJSON_GetArraySize(p) : 1;
    if (total > API_MAX_JOBS)
        return cake_err(err, errlen, "%d prompts: at most %d a request", total, API_MAX_JOBS);
    *count = 0;
    for (const cJSON *one = list ? p->child : p; *count < total; one = one->next) {
        ids[*count] = NULL;
        int bad;
        if (list && !cJSON_IsString(one) && !cJSON_IsArray(one))
            bad = cake_err(err, errlen,
                           "'prompt' %d: a list of prompts holds strings or lists of ids", *count);
        else
            bad = completion_prompt(one, m, &ids[*count], &ns[*count], err, errlen) ||
                  (ns[*count] >= m->n_ctx &&
                   cake_err(err, errlen,
                            "the prompt has %d tokens; the context holds %d (prompt and "
                            "completion)",
                            ns[*count], m->n_ctx));
        if (bad) {
            free(ids[*count]);
            while (*count > 0) free(ids[--*count]);
            return -1;
        }
        (*count)++;
    }
    return 0;
}

/* Fill in the middle (a completion's `suffix`, as code editors send it):
 * the vocabulary's prefix, suffix and middle tokens, found by their texts
 * as llama.cpp finds them (Qwen2.5-Coder, StarCoder, CodeLlama, DeepSeek
 * Coder), and the tokens that end a middle besides EOS. */
static const char *const fim_texts[][3] = {
    {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"},
    {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"},
    {"<fim-prefix>", "<fim-suffix>", "<fim-middle>"},
    {"\xe2\x96\x81<PRE>", "\xe2\x96\x81<SUF>", "\xe2\x96\x81<MID>"}, /* ▁<PRE> ... */
    {"<PRE>", "<SUF>", "<MID>"},
    {"<\xef\xbd\x9c"
     "fim\xe2\x96\x81"
     "begin\xef\xbd\x9c>", /* <｜fim▁begin｜> ... */
     "<\xef\xbd\x9c"
     "fim\xe2\x96\x81"
     "hole\xef\xbd\x9c>",
     "<\xef\xbd\x9c"
     "fim\xe2\x96\x81"
     "end\xef\xbd\x9c>"}};
static const char *const fim_enders[] = {"<|fim_pad|>",  "<fim_pad>",     "<fim-pad>",
                                         "<|file_sep|>", "<|endoftext|>", "\xe2\x96\x81<EOT>",
                                         "<EOT>"};

/* The prompt of prefix and suffix: [BOS] PRE prefix SUF suffix MID (as
 * llama.cpp's infill builds it), into *ids (malloc'd); *enders: the end
 * tokens the vocabulary has (up to 4). */
static int fim_prompt(const api_model *m, const char *prefix, const char *suffix, cake_token **ids,
                      int *n, cake_token *enders, int *n_enders, char *err, size_t errlen) {
    cake_token f[3];
    bool found = false; /* the first set the vocabulary has whole */
    for (size_t k = 0; k < sizeof(fim_texts) / sizeof(fim_texts[0]) && !found; k++) {
        found = true;
        for (int i = 0; i < 3; i++) {
            f[i] = cake_tokenizer_find(m->tok, fim_texts[k][i], strlen(fim_texts[k][i]));
            found &= f[i] >= 0;
        }
    }
    if (!found)
        return cake_err(err, errlen,
                        "'suffix' (fill in the middle): this model's vocabulary has no prefix, "
                        "suffix and middle tokens");
    *n_enders = 0;
    for (size_t k = 0; k < sizeof(fim_enders) / sizeof(fim_enders[0]) && *n_enders < 4; k++) {
        const cake_token t = cake_tokenizer_find(m->tok, fim_enders[k], strlen(fim_enders[k]));
        if (t >= 0) enders[(*n_enders)++] = t;
    }
    const bool bos = cake_tokenizer_add_bos(m->tok) && cake_tokenizer_bos(m->tok) >= 0;
    const int64_t np = cake_tokenize(m->tok, prefix, strlen(prefix), false, NULL, 0),
                  ns = cake_tokenize(m->tok, suffix, strlen(suffix), false, NULL, 0);
    if (np < 0 || ns < 0 || np + ns > INT32_MAX / 2)
        return cake_err(err, errlen, "tokenization failed");
    const int64_t total = bos + 3 + np + ns;
    cake_token *p = malloc((size_t)total * sizeof(*p));
    if (!p) return cake_err(err, errlen, "out of memory");
    int at = 0;
    if (bos) p[at++] = cake_tokenizer_bos(m->tok);
    p[at++] = f[0];
    at += (int)cake_tokenize(m->tok, prefix, strlen(prefix), false, p + at, np);
    p[at++] = f[1];
    at += (int)cake_tokenize(m->tok, suffix, strlen(suffix), false, p + at, ns);
    p[at++] = f[2];
    *ids = p;
    *n = at;
    return 0;
}

/* A message's content: a string, or an array of {"type":"text","text":...}
 * parts, joined by sep. *buf holds what had to be joined. */
static int message_text(const cJSON *c, int i, const char *sep, chat_message *out, char **buf,
                        char *err, size_t errlen) {
    if (!c) {
        out->content = "";
        out->content_len = 0;
        return 0;
    }
    if (cJSON_IsString(c)) {
        out->content = c->valuestring;
        out->content_len = strlen(c->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(c))
        return cake_err(err, errlen, "message %d: 'content' must be a string or an array of parts",
                        i);
    size_t total = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, c) {
        const cJSON *type = field(part, "type"), *text = field(part, "text");
        if (!cJSON_IsObject(part) || !cJSON_IsString(type) || strcmp(type->valuestring, "text") ||
            !cJSON_IsString(text))
            return cake_err(err, errlen, "message %d: only text parts are supported", i);
        total += strlen(text->valuestring) + strlen(sep);
    }
    if (!(*buf = malloc(total + 1))) return cake_err(err, errlen, "out of memory");
    size_t o = 0;
    cJSON_ArrayForEach(part, c) {
        const char *t = field(part, "text")->valuestring;
        if (part != c->child) {
            memcpy(*buf + o, sep, strlen(sep));
            o += strlen(sep);
        }
        memcpy(*buf + o, t, strlen(t));
        o += strlen(t);
    }
    (*buf)[o] = '\0';
    out->content = *buf;
    out->content_len = o;
    return 0;
}

/* ---- tools (OpenAI's function calling) ---- */

/* v as JSON the way Python's json.dumps writes it, which chat templates'
 * tojson is: ", " and ": " between items (indent 0; Qwen's), or each item
 * on a line of its own, `indent` spaces deeper a level, items ending ","
 * (Llama 3.1's tojson(indent=4)). The scalars as cJSON writes them. */
static void py_json_write(FILE *f, const cJSON *v, int indent, int depth, int *failed) {
    if (!cJSON_IsArray(v) && !cJSON_IsObject(v)) {
        char *s = cJSON_PrintUnformatted(v);
        if (s) fputs(s, f);
        *failed |= !s;
        cJSON_free(s);
        return;
    }
    const int object = cJSON_IsObject(v);
    fputc(object ? '{' : '[', f);
    const cJSON *c;
    int first = 1;
    cJSON_ArrayForEach(c, v) {
        if (!first) fputs(indent ? "," : ", ", f);
        if (indent) fprintf(f, "\n%*s", indent * (depth + 1), "");
        if (object) {
            cJSON *key = cJSON_CreateStringReference(c->string);
            py_json_write(f, key, indent, depth + 1, failed);
            cJSON_Delete(key);
            fputs(": ", f);
        }
        py_json_write(f, c, indent, depth + 1, failed);
        first = 0;
    }
    if (indent && !first) fprintf(f, "\n%*s", indent * depth, "");
    fputc(object ? '}' : ']', f);
}

/* py_json_write's text, malloc'd; NULL on out of memory. */
static char *py_json(const cJSON *v, int indent) {
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    if (!f) return NULL;
    int failed = 0;
    py_json_write(f, v, indent, 0, &failed);
    failed |= fclose(f) != 0;
    if (failed) {
        free(out);
        return NULL;
    }
    return out;
}

/* A function f as Mistral's templates (7B v0.3, Nemo) list it: {"type":
 * "function", "function": {...}} with f's members in their order but
 * "return", strings between quotes as they are (not escaped: the templates
 * write '"' + val + '"'), other values as tojson. malloc'd; NULL on out of
 * memory. */
static char *mistral_tool_json(const cJSON *f) {
    char *out = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&out, &len);
    if (!mem) return NULL;
    int failed = 0, first = 1;
    fputs("{\"type\": \"function\", \"function\": {", mem);
    const cJSON *c;
    cJSON_ArrayForEach(c, f) {
        if (!strcmp(c->string, "return")) continue;
        fprintf(mem, "%s\"%s\": ", first ? "" : ", ", c->string);
        if (cJSON_IsString(c))
            fprintf(mem, "\"%s\"", c->valuestring);
        else
            py_json_write(mem, c, 0, 0, &failed);
        first = 0;
    }
    fputs("}}", mem);
    failed |= fclose(mem) != 0;
    if (failed) {
        free(out);
        return NULL;
    }
    return out;
}

enum { TOOLS_NONE, TOOLS_AUTO, TOOLS_REQUIRED, TOOLS_NAMED };

/* A request's tools and tool_choice. */
typedef struct {
    const cJSON *list; /* the request's "tools" (n entries) */
    int n;
    char **json; /* each as the prompt lists it (owned) */
    int choice;  /* TOOLS_* */
    int named;   /* the function tool_choice names (TOOLS_NAMED) */
} request_tools;

static void tools_free(request_tools *rt) {
    for (int i = 0; rt->json && i < rt->n; i++) free(rt->json[i]);
    free(rt->json);
}

static const cJSON *tool_function(const request_tools *rt, int i) {
    return field(cJSON_GetArrayItem(rt->list, i), "function");
}

static const char *tool_name(const request_tools *rt, int i) {
    return field(tool_function(rt, i), "name")->valuestring;
}

static int valid_name(const char *s) { /* OpenAI's: [a-zA-Z0-9_-]{1,64} */
    size_t n = strlen(s);
    if (n < 1 || n > 64) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '-'))
            return 0;
    return 1;
}

/* tools, tool_choice and parallel_tool_calls. */
static int tools_asked(const cJSON *o, int chat, request_tools *rt, char *err, size_t errlen) {
    const cJSON *tools = field(o, "tools"), *choice = field(o, "tool_choice");
    int parallel = 1;
    if (bool_field(o, "parallel_tool_calls", &parallel, err, errlen)) return -1;
    if (tools && cJSON_IsNull(tools)) tools = NULL;
    if (tools && (!cJSON_IsArray(tools) || cJSON_GetArraySize(tools) > 128))
        return cake_err(err, errlen, "'tools' must be an array of at most 128 functions");
    rt->list = tools;
    rt->n = tools ? cJSON_GetArraySize(tools) : 0;
    if (rt->n && !chat) return cake_err(err, errlen, "'tools' are for /v1/chat/completions");
    for (int i = 0; i < rt->n; i++) {
        const cJSON *t = cJSON_GetArrayItem(tools, i), *type = field(t, "type");
        const cJSON *f = field(t, "function"), *name = field(f, "name");
        const cJSON *params = field(f, "parameters");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "function") || !cJSON_IsObject(f) ||
            !cJSON_IsString(name) || !valid_name(name->valuestring) ||
            (params && !cJSON_IsObject(params)))
            return cake_err(err, errlen,
                            "tool %d must be {\"type\": \"function\", \"function\": {\"name\": "
                            "[a-zA-Z0-9_-]{1,64}, \"parameters\": {...}}}",
                            i);
        for (int k = 0; k < i; k++)
            if (!strcmp(tool_name(rt, k), name->valuestring))
                return cake_err(err, errlen, "two tools are named '%s'", name->valuestring);
    }
    rt->choice = rt->n ? TOOLS_AUTO : TOOLS_NONE;
    if (!choice || cJSON_IsNull(choice)) return 0;
    const cJSON *fn = field(field(choice, "function"), "name");
    if (cJSON_IsString(choice) && !strcmp(choice->valuestring, "none")) {
        rt->choice = TOOLS_NONE;
    } else if (cJSON_IsString(choice) && !strcmp(choice->valuestring, "auto")) {
        rt->choice = rt->n ? TOOLS_AUTO : TOOLS_NONE;
    } else if (cJSON_IsString(choice) && !strcmp(choice->valuestring, "required")) {
        rt->choice = TOOLS_REQUIRED;
    } else if (cJSON_IsObject(choice) && cJSON_IsString(fn)) {
        rt->choice = TOOLS_NAMED;
        for (rt->named = 0; rt->named < rt->n && strcmp(tool_name(rt, rt->named), fn->valuestring);
             rt->named++)
            continue;
        if (rt->named == rt->n)
            return cake_err(err, errlen, "'tool_choice' names '%.64s', which is not in 'tools'",
                            fn->valuestring);
    } else {
        return cake_err(err, errlen,
                        "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": "
                        "\"function\", \"function\": {\"name\": ...}}");
    }
    if (rt->choice >= TOOLS_REQUIRED && !rt->n)
        return cake_err(err, errlen, "'tool_choice' asks for a call: give 'tools'");
    return 0;
}

/* A function's parameters as a schema: a copy, or for NULL any object. */
static cJSON *params_schema(const cJSON *params) {
    if (params) return cJSON_Duplicate(params, 1);
    cJSON *any = cJSON_CreateObject();
    cJSON_AddStringToObject(any, "type", "object");
    return any;
}

/* {"name": <name>, ARGS: <params>} as a schema (params NULL: any object). */
static cJSON *call_object(const char *name, const char *args, const cJSON *params) {
    cJSON *o = cJSON_CreateObject(), *props;
    cJSON_AddStringToObject(o, "type", "object");
    props = cJSON_AddObjectToObject(o, "properties");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(props, "name"), "const", name);
    cJSON_AddItemToObject(props, args, params_schema(params));
    cJSON *req = cJSON_AddArrayToObject(o, "required");
    cJSON_AddItemToArray(req, cJSON_CreateString("name"));
    cJSON_AddItemToArray(req, cJSON_CreateString(args));
    return o;
}

/* The schema of a call as the format writes it (call_schema): {"name":
 * ..., ARGS: {...}} (an anyOf of the functions' calls, told apart by their
 * name, unless one is named; the format's list of them), or for Mistral
 * v11's and v13's name[ARGS]{...} a tuple of the functions' arguments
 * (json_schema_tagged's input); the arguments of the functions' parameters
 * where exact, else any object. *strict: a function is strict. */
static cJSON *calls_json(const request_tools *rt, const chat_call_syntax *syntax, int with_open,
                         int exact, int *strict) {
    cJSON *calls = cJSON_CreateArray();
    *strict = 0;
    for (int i = 0; i < rt->n; i++) {
        if (rt->choice == TOOLS_NAMED && i != rt->named) continue;
        const cJSON *f = tool_function(rt, i), *params = exact ? field(f, "parameters") : NULL;
        *strict |= cJSON_IsTrue(field(f, "strict"));
        cJSON_AddItemToArray(calls, syntax->args_tag
                                        ? params_schema(params)
                                        : call_object(tool_name(rt, i), syntax->args, params));
    }
    cJSON *sch;
    if (syntax->args_tag) {
        sch = cJSON_CreateObject();
        cJSON_AddItemToObject(sch, "prefixItems", calls);
    } else if (cJSON_GetArraySize(calls) == 1) {
        sch = cJSON_DetachItemFromArray(calls, 0);
        cJSON_Delete(calls);
    } else {
        sch = cJSON_CreateObject();
        cJSON_AddItemToObject(sch, "anyOf", calls);
    }
    if (syntax->list) { /* a list of calls: one when the answer must be a call */
        cJSON *list = cJSON_CreateObject();
        cJSON_AddStringToObject(list, "type", "array");
        cJSON_AddItemToObject(list, "items", sch);
        cJSON_AddNumberToObject(list, "minItems", 1);
        if (with_open) cJSON_AddNumberToObject(list, "maxItems", 1);
        sch = list;
    }
    return sch;
}

/* s, compiled from calls_json, with the format's tags: between them (the
 * opening one only with_open; the newlines around the JSON are white space
 * to it), or each function's arguments after its name and args tag
 * (Mistral v11, v13). 0, or -1 on out of memory. */
static int add_call_tags(json_schema *s, const request_tools *rt, const chat_call_syntax *syntax,
                         int with_open) {
    if (!syntax->args_tag)
        return json_schema_between(s, with_open ? syntax->open : "", syntax->close);
    const char *tags[128];
    int n = 0, failed = 0;
    for (int i = 0; i < rt->n; i++) {
        if (rt->choice == TOOLS_NAMED && i != rt->named) continue;
        char *tag = NULL;
        if (asprintf(&tag, "%s%s%s", with_open ? syntax->open : "", tool_name(rt, i),
                     syntax->args_tag) < 0)
            tag = NULL, failed = 1;
        tags[n++] = tag;
    }
    failed = failed || json_schema_tagged(s, tags, n);
    for (int i = 0; i < n; i++) free((char *)tags[i]);
    return failed ? -1 : 0;
}

/* What a call must be: calls_json between the format's tags (with_open: the
 * opening one too; else it has been written, tool_choice auto). Where cake
 * cannot enforce some parameters' schema, the arguments are any object,
 * unless a function is strict (then NULL with err). */
static json_schema *call_schema(const request_tools *rt, const chat_call_syntax *syntax,
                                int with_open, char *err, size_t errlen) {
    json_schema *out = NULL;
    for (int exact = 1; exact >= 0 && !out; exact--) {
        int strict;
        cJSON *sch = calls_json(rt, syntax, with_open, exact, &strict);
        char why[200];
        out = json_schema_compile(sch, why, sizeof(why));
        cJSON_Delete(sch);
        if (!out && (!exact || strict)) return cake_err(err, errlen, "'tools': %s", why), NULL;
    }
    if (out && add_call_tags(out, rt, syntax, with_open)) {
        json_schema_release(out);
        out = NULL;
        cake_err(err, errlen, "out of memory");
    }
    return out;
}

/* The functions' names, each NUL-terminated, an empty one last. */
static char *tool_names(const request_tools *rt) {
    size_t len = 1;
    for (int i = 0; i < rt->n; i++) len += strlen(tool_name(rt, i)) + 1;
    char *names = malloc(len), *p = names;
    for (int i = 0; names && i < rt->n; i++) {
        strcpy(p, tool_name(rt, i));
        p += strlen(p) + 1;
    }
    if (names) *p = '\0';
    return names;
}

/* A tool call's id as Mistral's prompt takes it: its last 9 characters
 * (vLLM's; cake's own are 9); NULL when it has fewer or is not a string. */
static const char *call_id_of(const cJSON *id) {
    if (!cJSON_IsString(id)) return NULL;
    const size_t len = strlen(id->valuestring);
    return len >= 9 ? id->valuestring + len - 9 : NULL;
}

/* An assistant message's tool_calls, for the prompt. */
static int message_calls(const cJSON *calls, int i, chat_message *out, char ***texts, char *err,
                         size_t errlen) {
    if (!calls || cJSON_IsNull(calls)) return 0;
    const int n = cJSON_IsArray(calls) ? cJSON_GetArraySize(calls) : -1;
    if (n < 0 || n > 64)
        return cake_err(err, errlen, "message %d: 'tool_calls' must be an array (of at most 64)",
                        i);
    chat_tool_call *c = calloc((size_t)(n ? n : 1), sizeof(*c));
    *texts = calloc((size_t)n + 1, sizeof(**texts));
    out->calls = c;
    if (!c || !*texts) return cake_err(err, errlen, "out of memory");
    for (int k = 0; k < n; k++) {
        const cJSON *call = cJSON_GetArrayItem(calls, k), *f = field(call, "function");
        const cJSON *name = field(f, "name"), *args = field(f, "arguments");
        if (!cJSON_IsString(name) || !cJSON_IsString(args))
            return cake_err(err, errlen,
                            "message %d: tool call %d needs a function's 'name' and "
                            "'arguments' (a string)",
                            i, k);
        /* ("" as {}, as Mistral's templates write it) */
        cJSON *parsed = cJSON_Parse(args->valuestring[0] ? args->valuestring : "{}");
        if (!cJSON_IsObject(parsed)) {
            cJSON_Delete(parsed);
            return cake_err(err, errlen,
                            "message %d: tool call %d's 'arguments' is not a JSON object", i, k);
        }
        (*texts)[k] = py_json(parsed, 0);
        cJSON_Delete(parsed);
        if (!(*texts)[k]) return cake_err(err, errlen, "out of memory");
        c[k] = (chat_tool_call){name->valuestring, (*texts)[k], call_id_of(field(call, "id"))};
        out->n_calls = k + 1;
    }
    return 0;
}

static int chat_prompt_of(const cJSON *o, const api_model *m, request_tools *rt, cake_token **ids,
                          int *n, cake_token *end_of_turn, char *err, size_t errlen) {
    if (m->chat == CHAT_NONE)
        return cake_err(err, errlen,
                        "this model has no chat template cake knows (ChatML, Llama 3, Llama 2, "
                        "Mistral, Zephyr): use /v1/completions");
    const cJSON *msgs = field(o, "messages");
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0)
        return cake_err(err, errlen, "'messages' must be a non-empty array");
    const int count = cJSON_GetArraySize(msgs);
    chat_message *cm = calloc((size_t)count, sizeof(*cm));
    char **bufs = calloc((size_t)count, sizeof(*bufs));
    char ***call_texts = calloc((size_t)count, sizeof(*call_texts));
    int rc = -1;
    if (!cm || !bufs || !call_texts) {
        cake_err(err, errlen, "out of memory");
        goto done;
    }
    int i = 0;
    const cJSON *msg;
    cJSON_ArrayForEach(msg, msgs) {
        const cJSON *role = field(msg, "role");
        if (!cJSON_IsObject(msg) || !cJSON_IsString(role)) {
            cake_err(err, errlen, "message %d must be an object with a 'role'", i);
            goto done;
        }
        cm[i].role = role->valuestring;
        cm[i].call_id = call_id_of(field(msg, "tool_call_id"));
        if (message_text(field(msg, "content"), i, chat_parts_separator(m->chat), &cm[i], &bufs[i],
                         err, errlen) ||
            message_calls(field(msg, "tool_calls"), i, &cm[i], &call_texts[i], err, errlen))
            goto done;
        i++;
    }
    /* The functions as the format's template lists them: Llama 3.1's
     * indented by 4, Qwen's and Mistral v7's and later on one line (tojson),
     * Mistral v3's (7B v0.3, Nemo) its own way */
    if (rt->n && !rt->json && !(rt->json = calloc((size_t)rt->n, sizeof(*rt->json)))) {
        cake_err(err, errlen, "out of memory");
        goto done;
    }
    const int by_hand = m->chat == CHAT_MISTRAL_V3 || m->chat == CHAT_MISTRAL_TEKKEN;
    for (int k = 0; k < rt->n; k++) {
        if (rt->json[k]) continue;
        if (!(rt->json[k] = by_hand ? mistral_tool_json(tool_function(rt, k))
                                    : py_json(cJSON_GetArrayItem(rt->list, k),
                                              m->chat == CHAT_LLAMA3 ? 4 : 0))) {
            cake_err(err, errlen, "out of memory");
            goto done;
        }
    }
    const chat_tools tools = {(const char *const *)rt->json, rt->n};
    /* chat_template_kwargs (vLLM's): Qwen 3's enable_thinking */
    int thinking = 1;
    const cJSON *kwargs = field(o, "chat_template_kwargs");
    if (kwargs && !cJSON_IsNull(kwargs) && !cJSON_IsObject(kwargs)) {
        cake_err(err, errlen, "'chat_template_kwargs' must be an object");
        goto done;
    }
    if (kwargs && bool_field(kwargs, "enable_thinking", &thinking, err, errlen)) goto done;
    /* (the day's date as strftime_now writes it: "%d %b %Y", local time) */
    char today[32] = "";
    const time_t now = time(NULL);
    struct tm tm;
    if (m->llama3_date && !m->llama3_date[0] && localtime_r(&now, &tm))
        strftime(today, sizeof(today), "%d %b %Y", &tm);
    char *dated = chat_dated_default_system(m->dated_system_template, now);
    const chat_options opt = {rt->choice != TOOLS_NONE ? &tools : NULL,
                              !thinking,
                              dated ? dated : m->default_system,
                              m->llama3_date && !m->llama3_date[0] ? today : m->llama3_date,
                              m->open_thinking,
                              m->strip_reasoning};
    rc = chat_prompt(m->chat, m->tok, cm, count, &opt, ids, n, end_of_turn, err, errlen);
    free(dated);
done:
    for (int k = 0; k < count; k++) {
        if (bufs) free(bufs[k]);
        if (cm) free((void *)cm[k].calls);
        for (int c = 0; call_texts && call_texts[k] && call_texts[k][c]; c++)
            free(call_texts[k][c]);
        if (call_texts) free(call_texts[k]);
    }
    free(bufs);
    free(call_texts);
    free(cm);
    return rc;
}

/* Whether a prompt ends with <think> and white space: the template opened
 * the answer's reasoning (chat_opens_thinking). */
static bool opens_thinking(const cake_tokenizer *t, const cake_token *ids, int n,
                           cake_token think) {
    for (int i = n - 1; i >= 0 && i >= n - 4; i--) {
        if (ids[i] == think) return true;
        char piece[16];
        const int len =
            cake_token_to_piece(t, ids[i - 1 >= 0 ? i - 1 : 0], ids[i], piece, sizeof(piece));
        if (len < 0 || len > (int)sizeof(piece)) return false;
        for (int k = 0; k < len; k++)
            if (!strchr(" \t\r\n", piece[k])) return false;
    }
    return false;
}

static uint64_t fresh_seed(void) {
    static atomic_uint_fast64_t counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000007u ^ (uint64_t)ts.tv_nsec ^
           (atomic_fetch_add(&counter, 1) << 40);
}

/* vLLM's cache_salt: a non-empty string of at most API_MAX_SALT bytes. */
#define API_MAX_SALT 1024
static int add_cache_salt(const cJSON *o, serve_job *j, char *err, size_t errlen) {
    const cJSON *s = field(o, "cache_salt");
    if (!s) return 0;
    if (!cJSON_IsString(s) || !s->valuestring[0] || strlen(s->valuestring) > API_MAX_SALT)
        return cake_err(err, errlen, "'cache_salt' must be a non-empty string of at most %d bytes",
                        API_MAX_SALT);
    if (!(j->cache_salt = strdup(s->valuestring))) return cake_err(err, errlen, "out of memory");
    return 0;
}

/* The body as a JSON object, or NULL with err. */
/* Whether the body holds a NUL, as a byte or as \u0000 in a string: the
 * parsed string would end there, silently cutting a prompt or a stop
 * string short. */
static int has_nul(const char *body, size_t len) {
    if (memchr(body, '\0', len)) return 1;
    for (const char *p = body; (p = memmem(p, len - (size_t)(p - body), "\\u0000", 6)); p += 6) {
        size_t escapes = 0; /* (an even run of them before it: an escaped backslash each) */
        while (p - escapes > body && p[-1 - (long)escapes] == '\\') escapes++;
        if (escapes % 2 == 0) return 1;
    }
    return 0;
}

static cJSON *body_object(const char *body, size_t len, char *err, size_t errlen) {
    const char *end = NULL;
    cJSON *o = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (o && cJSON_IsObject(o) && skip_space(body, (size_t)(end - body), len) == len) {
        if (!has_nul(body, len)) return o;
        cJSON_Delete(o);
        cake_err(err, errlen, "strings must not hold NUL (\\u0000)");
        return NULL;
    }
    cJSON_Delete(o);
    cake_err(err, errlen, "the body must be a JSON object (and nothing after it)");
    return NULL;
}

int api_parse(const char *body, size_t len, int chat, const api_model *m, serve_job **out,
              api_shape *shape, char *err, size_t errlen) {
    *shape = (api_shape){.chat = chat, .tok = m->tok, .n_prompts = 1};
    out[0] = NULL;
    cJSON *o = body_object(body, len, err, errlen);
    if (!o) return -1;
    serve_job *j = NULL;
    cake_token *prompts[API_MAX_JOBS] = {0}; /* a completion's prompts, after the first */
    int lens[API_MAX_JOBS], n_prompts = 1;
    cake_token *ids = NULL;
    int n = 0;
    cake_token eot = -1;
    double max_tokens = -1, temperature = 1, top_p = 1, seed = -1, frequency = 0, presence = 0,
           top_k = 0, min_p = 0, choices = 1, min_tokens = 0;
    int rc = -1, ignore_eos = 0, top_logprobs = -1, json = 0, repeat_last_n = 0, echo = 0,
        prompt_top = -1;
    float repetition = 1;
    json_schema *schema = NULL;
    request_tools rt = {0};
    if (unsupported(o, err, errlen) || tools_asked(o, chat, &rt, err, errlen) ||
        logprobs_asked(o, chat, &top_logprobs, err, errlen) ||
        json_asked(o, &json, &schema, err, errlen) ||
        repetition_asked(o, &repetition, &repeat_last_n, err, errlen) ||
        bool_field(o, "stream", &shape->stream, err, errlen) ||
        bool_field(o, "ignore_eos", &ignore_eos, err, errlen) ||
        echo_asked(o, chat, shape->stream, &echo, err, errlen) ||
        prompt_logprobs_asked(o, shape->stream, &prompt_top, err, errlen) ||
        int_field(o, "max_tokens", echo ? 0 : 1, 1 << 30, &max_tokens, err, errlen) ||
        int_field(o, "max_completion_tokens", echo ? 0 : 1, 1 << 30, &max_tokens, err, errlen) ||
        num_field(o, "temperature", 0, 2, &temperature, err, errlen) ||
        num_field(o, "top_p", 1e-6, 1, &top_p, err, errlen) ||
        int_field(o, "top_k", -1, 1 << 30, &top_k, err, errlen) ||
        num_field(o, "min_p", 0, 1, &min_p, err, errlen) ||
        num_field(o, "frequency_penalty", -2, 2, &frequency, err, errlen) ||
        num_field(o, "presence_penalty", -2, 2, &presence, err, errlen) ||
        int_field(o, "seed", 0, 9007199254740991.0, &seed, err, errlen) ||
        int_field(o, "min_tokens", 0, 1 << 30, &min_tokens, err, errlen) ||
        int_field(o, "n", 1, API_MAX_CHOICES, &choices, err, errlen))
        goto done;
    shape->n = (int)choices;
    shape->prompt_logprobs = prompt_top >= 0;
    /* (a completion's max_tokens is 16 unless given) */
    const double most = max_tokens >= 0 ? max_tokens : chat ? -1 : 16;
    if (most >= 0 && min_tokens > most) {
        cake_err(err, errlen, "'min_tokens' (%.0f) is more than 'max_tokens' (%.0f%s)", min_tokens,
                 most, max_tokens >= 0 ? "" : ", the default");
        goto done;
    }
    const cJSON *so = field(o, "stream_options");
    if (so && cJSON_IsNull(so)) so = NULL;
    if (so && (!cJSON_IsObject(so) || !shape->stream ||
               bool_field(so, "include_usage", &shape->include_usage, err, errlen))) {
        if (!cJSON_IsObject(so))
            cake_err(err, errlen, "'stream_options' must be an object");
        else if (!shape->stream)
            cake_err(err, errlen, "'stream_options' is for \"stream\": true");
        goto done;
    }
    if (json && rt.choice != TOOLS_NONE) { /* (a call is not the format's JSON) */
        cake_err(err, errlen,
                 "'tools' and a JSON 'response_format' (or 'json_schema'): give one of them, "
                 "or 'tool_choice' \"none\"");
        goto done;
    }
    const cJSON *suffix = field(o, "suffix"), *prompt = field(o, "prompt");
    cake_token enders[4];
    int n_enders = 0;
    if (suffix) { /* fill in the middle */
        if (chat || !cJSON_IsString(suffix) || !prompt || !cJSON_IsString(prompt) || echo) {
            cake_err(err, errlen,
                     chat                      ? "'suffix' is for /v1/completions"
                     : !cJSON_IsString(suffix) ? "'suffix' must be a string"
                     : echo                    ? "'suffix' with 'echo' is not supported"
                                               : "'suffix' needs one 'prompt' string (the text "
                                                 "before the middle)");
            goto done;
        }
        if (fim_prompt(m, prompt->valuestring, suffix->valuestring, &prompts[0], &lens[0], enders,
                       &n_enders, err, errlen))
            goto done;
    } else if (chat ? chat_prompt_of(o, m, &rt, &ids, &n, &eot, err, errlen)
                    : completion_prompts(o, m, prompts, lens, &n_prompts, err, errlen)) {
        goto done;
    }
    if (!chat) { /* the first prompt's job is made here, the others' from it */
        ids = prompts[0];
        n = lens[0];
        prompts[0] = NULL;
    }
    if (n_prompts * shape->n > API_MAX_JOBS) {
        cake_err(err, errlen, "%d prompts x n %d: at most %d answers a request", n_prompts,
                 shape->n, API_MAX_JOBS);
        goto done;
    }
    if (n >= m->n_ctx) {
        cake_err(err, errlen,
                 "the prompt has %d tokens; the context holds %d (prompt and completion)", n,
                 m->n_ctx);
        goto done;
    }
    if (!(j = job_create(ids, n))) {
        cake_err(err, errlen, "out of memory");
        goto done_ids_freed;
    }
    ids = NULL;
    if (add_stops(o, j, err, errlen) || add_stop_ids(o, m, j, err, errlen)) goto done;
    /* a middle ends at them too (JOB_STOP_ID_ROOM has room for them) */
    for (int k = 0; k < n_enders; k++) j->stop_ids[j->n_stop_ids++] = enders[k];
    /* Completions default to 16 tokens as OpenAI's do; chat runs to the end
     * of the turn (or of the context). */
    const int want = max_tokens >= 0 ? (int)max_tokens : chat ? m->n_ctx : 16;
    j->max_tokens = want > m->n_ctx - n ? m->n_ctx - n : want;
    j->sampling = (cake_sampler_params){.temperature = (float)temperature,
                                        .top_p = (float)top_p,
                                        .top_k = top_k > 0 ? (int)top_k : 0,
                                        .min_p = (float)min_p,
                                        .seed = seed >= 0 ? (uint64_t)seed : fresh_seed(),
                                        .frequency_penalty = (float)frequency,
                                        .presence_penalty = (float)presence,
                                        .repetition_penalty = repetition,
                                        .repeat_last_n = repeat_last_n};
    j->end_of_turn = eot;
    /* a thinking model's chat: its reasoning is read apart (<think>, or
     * Mistral's [THINK]) */
    cake_token think = cake_tokenizer_find(m->tok, "<think>", 7);
    j->reasoning = chat && think >= 0 && cake_tokenizer_find(m->tok, "</think>", 8) >= 0;
    if (chat && !j->reasoning && (think = cake_tokenizer_find(m->tok, "[THINK]", 7)) >= 0 &&
        cake_tokenizer_find(m->tok, "[/THINK]", 8) >= 0)
        j->reasoning = j->think_brackets = true;
    if (j->reasoning && opens_thinking(m->tok, j->prompt, j->n_prompt, think))
        j->reasoning = JOB_THINKING; /* (the answer begins inside it) */
    j->ignore_eos = ignore_eos;
    j->min_tokens = (int)min_tokens;
    j->top_logprobs = top_logprobs;
    j->echo = echo;
    /* (echo's arrays take the top_logprobs first of them) */
    j->prompt_top = echo && top_logprobs > prompt_top ? top_logprobs : prompt_top;
    if (rt.choice != TOOLS_NONE) {
        j->call_format = m->chat;
        if (!(j->tool_names = tool_names(&rt))) {
            cake_err(err, errlen, "out of memory");
            goto done;
        }
        /* a call is constrained: the whole answer, or (auto) from its tag on */
        const int must_call = rt.choice >= TOOLS_REQUIRED;
        if (!(schema = call_schema(&rt, chat_calls(m->chat), must_call, err, errlen))) goto done;
        json = must_call;
    }
    j->json = json;
    j->schema = schema;
    schema = NULL;
    if (add_logit_bias(o, m, j, err, errlen) || add_cache_salt(o, j, err, errlen)) goto done;
    /* the other prompts: the same request (choice 0 each) */
    for (int k = 1; k < n_prompts; k++) {
        if (!(out[k] = job_clone_prompt(j, 0, prompts[k], lens[k]))) {
            prompts[k] = NULL; /* (freed) */
            while (--k > 0) job_release(out[k]);
            cake_err(err, errlen, "out of memory");
            goto done;
        }
        prompts[k] = NULL;
        out[k]->max_tokens = want > m->n_ctx - lens[k] ? m->n_ctx - lens[k] : want;
    }
    out[0] = j;
    j = NULL;
    shape->n_prompts = n_prompts;
    rc = 0;
done:
    free(ids);
done_ids_freed:
    for (int k = 0; k < n_prompts; k++) free(prompts[k]);
    json_schema_release(schema);
    tools_free(&rt);
    job_release(j);
    cJSON_Delete(o);
    return rc;
}

/* ---- responses ---- */

static cJSON *response_head(const api_shape *s, const char *id, long created, const char *model,
                            int chunk) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "id", id);
    cJSON_AddStringToObject(r, "object",
                            s->chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                    : "text_completion");
    cJSON_AddNumberToObject(r, "created", (double)created);
    cJSON_AddStringToObject(r, "model", model);
    return r;
}

/* The usage of a request's n jobs: each prompt once (its first choice's
 * job), all their tokens. */
static void add_usage(cJSON *r, const api_shape *s, serve_job *const *jobs, int n) {
    int completion = 0, prompt = 0, computed = 0;
    for (int i = 0; i < n; i++) {
        completion += jobs[i]->n_ids;
        if (i % s->n) continue;
        prompt += jobs[i]->n_prompt;
        computed += jobs[i]->stats.prefill.tokens_computed;
    }
    cJSON *u = cJSON_AddObjectToObject(r, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", completion);
    cJSON_AddNumberToObject(u, "total_tokens", prompt + completion);
    /* OpenAI's (and vLLM's): prompt tokens whose KV was not computed for
     * the (first) choice, whether the slot held it or the store gave it. */
    cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    cJSON_AddNumberToObject(d, "cached_tokens", prompt - computed);
}

/* What cake did for the request: TTFT and where the prompt's KV came from. */
static void add_cake(cJSON *r, const serve_job *j) {
    const cake_request_stats *st = &j->stats;
    const cake_prefill_stats *ps = &st->prefill;
    cJSON *c = cJSON_AddObjectToObject(r, "cake");
    cJSON_AddNumberToObject(c, "ttft_ms", st->ttft_ms);
    cJSON_AddNumberToObject(c, "decode_ms", st->decode_ms);
    cJSON_AddStringToObject(c, "mode", cake_mode_name(ps->mode));
    cJSON_AddNumberToObject(c, "chunk", ps->chunk);
    cJSON_AddNumberToObject(c, "chunks_total", ps->chunks_total);
    cJSON_AddNumberToObject(c, "chunks_computed", ps->chunks_computed);
    cJSON_AddNumberToObject(c, "chunks_loaded", ps->chunks_loaded);
    cJSON_AddNumberToObject(c, "chunks_cached", ps->chunks_cached);
    cJSON_AddNumberToObject(c, "tokens_computed", ps->tokens_computed);
    cJSON_AddNumberToObject(c, "chunks_missing", ps->chunks_missing);
    cJSON_AddNumberToObject(c, "chunks_corrupt", ps->chunks_corrupt);
    cJSON_AddNumberToObject(c, "chunks_awaited", ps->chunks_awaited);
    cJSON_AddBoolToObject(c, "knew_speed", ps->knew_speed);
    cJSON_AddBoolToObject(c, "knew_rate", ps->knew_rate);
    cJSON_AddNumberToObject(c, "meet_chunk", ps->meet_chunk);
    cJSON_AddNumberToObject(c, "bytes_loaded", (double)ps->bytes_loaded);
    if (ps->store_error[0])
        cJSON_AddStringToObject(c, "store_error", ps->store_error);
    else
        cJSON_AddNullToObject(c, "store_error");
    cJSON_AddItemToObject(c, "generated_ids", cJSON_CreateIntArray(j->ids, j->n_ids));
}

/* ---- log-probabilities ---- */

int api_answer_tokens(const serve_job *j, size_t sent) {
    if (!j->logprobs) return 0;
    int n = 0;
    if (!j->done) {
        while (n < j->n_ids && j->logprobs[n].text_end <= sent) n++;
        return n;
    }
    /* (a token whose text is empty, EOS, counts where it stands) */
    while (n < j->n_ids) {
        const size_t start = n ? j->logprobs[n - 1].text_end : 0;
        if (start > j->len || (start == j->len && j->logprobs[n].text_end > start)) break;
        n++;
    }
    return n;
}

/* Token id's text after token prev: malloc'd, *len bytes (not cleaned). */
static char *piece_of(const cake_tokenizer *tok, cake_token prev, cake_token id, int *len) {
    const int n = cake_token_to_piece(tok, prev, id, NULL, 0);
    char *p = malloc(n > 0 ? (size_t)n + 1 : 1);
    if (!p) return NULL;
    if (n > 0) cake_token_to_piece(tok, prev, id, p, (size_t)n);
    *len = n > 0 ? n : 0;
    p[*len] = '\0';
    return p;
}

/* The tags a job's answer prints as their text (job_printed_tags). */
typedef struct {
    cake_token ids[JOB_PRINTED_TAGS];
    const char *texts[JOB_PRINTED_TAGS];
    int n;
} printed_tags;

/* Token id as an answer printed it (pool.c): its tags (Mistral's
 * [TOOL_CALLS], [THINK]) as their text, else piece_of. tags NULL: none. */
static char *answer_piece(const api_shape *s, const printed_tags *tags, cake_token prev,
                          cake_token id, int *len) {
    for (int k = 0; tags && k < tags->n; k++)
        if (id == tags->ids[k]) {
            *len = (int)strlen(tags->texts[k]);
            return strdup(tags->texts[k]);
        }
    return piece_of(s->tok, prev, id, len);
}

/* A JSON string of piece's text, made valid UTF-8 ("" when out of memory). */
static cJSON *clean_string(const char *piece, int len) {
    char *clean = api_utf8_clean(piece, (size_t)len);
    cJSON *s = cJSON_CreateString(clean ? clean : "");
    free(clean);
    return s;
}

/* A chat's entry for one token or alternative: token, logprob, bytes. */
static cJSON *chat_token(const char *piece, int len, float logprob) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddItemToObject(t, "token", clean_string(piece, len));
    cJSON_AddNumberToObject(t, "logprob", logprob);
    cJSON *bytes = cJSON_AddArrayToObject(t, "bytes");
    for (int i = 0; i < len; i++)
        cJSON_AddItemToArray(bytes, cJSON_CreateNumber((unsigned char)piece[i]));
    return t;
}

/* An echoed prompt's text: its tokens' pieces one after another (which
 * give back a prompt sent as text); malloc'd, *len bytes, NULL when out of
 * memory. */
static char *prompt_text(const api_shape *s, const serve_job *j, size_t *len) {
    size_t cap = 64, n = 0;
    char *text = malloc(cap);
    for (int i = 0; text && i < j->n_prompt; i++) {
        int plen;
        char *piece = piece_of(s->tok, i ? j->prompt[i - 1] : -1, j->prompt[i], &plen);
        if (piece && n + (size_t)plen + 1 > cap) {
            char *t = realloc(text, cap = 2 * (n + (size_t)plen + 1));
            if (!t) free(text);
            text = t;
        }
        if (!piece || !text) {
            free(piece);
            free(text);
            return NULL;
        }
        memcpy(text + n, piece, (size_t)plen);
        n += (size_t)plen;
        free(piece);
    }
    if (text) text[n] = '\0';
    *len = n;
    return text;
}

/* The alternatives of lp after token prev (of an answer printing tags;
 * NULL: a prompt's): a completion's {text: logprob} (the likelier of two
 * with the same text), a chat's list. */
static cJSON *top_json(const api_shape *s, const printed_tags *tags, const job_logprob *lp,
                       cake_token prev) {
    cJSON *top = s->chat ? cJSON_CreateArray() : cJSON_CreateObject();
    for (int k = 0; k < lp->n_top; k++) {
        int alen;
        char *alt = answer_piece(s, tags, prev, lp->top_id[k], &alen);
        if (!alt) break;
        if (s->chat) {
            cJSON_AddItemToArray(top, chat_token(alt, alen, lp->top_logprob[k]));
        } else {
            char *clean = api_utf8_clean(alt, (size_t)alen);
            if (clean && !cJSON_GetObjectItemCaseSensitive(top, clean)) /* (first: likelier) */
                cJSON_AddNumberToObject(top, clean, lp->top_logprob[k]);
            free(clean);
        }
        free(alt);
    }
    return top;
}

/* An echoed prompt's part of a completion's four arrays (its first token
 * has no log-probability: null, as OpenAI's and vLLM's; the offsets are
 * into prompt_text's text). */
static void add_prompt_logprobs(const api_shape *s, const serve_job *j, cJSON *tokens, cJSON *lps,
                                cJSON *tops, cJSON *offsets) {
    size_t start = 0;
    for (int i = 0; i < j->n_prompt; i++) {
        job_logprob lp = j->prompt_logprobs[i];
        if (lp.n_top > j->top_logprobs) lp.n_top = j->top_logprobs; /* (prompt_logprobs' more) */
        int len;
        char *p = piece_of(s->tok, i ? j->prompt[i - 1] : -1, j->prompt[i], &len);
        if (!p) break;
        cJSON_AddItemToArray(tokens, clean_string(p, len));
        free(p);
        cJSON_AddItemToArray(lps, i ? cJSON_CreateNumber(lp.logprob) : cJSON_CreateNull());
        cJSON_AddItemToArray(tops,
                             i ? top_json(s, NULL, &lp, j->prompt[i - 1]) : cJSON_CreateNull());
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)start));
        start += (size_t)len;
    }
}

/* The log-probabilities of the job's tokens [from, to): a chat's `content`
 * list, or a completion's four arrays (an echoed prompt's first, from 0;
 * then the answer's offsets follow the prompt's text, echo_len bytes). */
static cJSON *logprobs_json(const api_shape *s, const serve_job *j, int from, int to,
                            size_t echo_len) {
    cJSON *r = cJSON_CreateObject();
    cJSON *content = s->chat ? cJSON_AddArrayToObject(r, "content") : NULL;
    cJSON *tokens = s->chat ? NULL : cJSON_AddArrayToObject(r, "tokens"),
          *lps = s->chat ? NULL : cJSON_AddArrayToObject(r, "token_logprobs"),
          *tops = s->chat ? NULL : cJSON_AddArrayToObject(r, "top_logprobs"),
          *offsets = s->chat ? NULL : cJSON_AddArrayToObject(r, "text_offset");
    if (!s->chat && j->echo && j->prompt_logprobs && from == 0)
        add_prompt_logprobs(s, j, tokens, lps, tops, offsets);
    printed_tags tags;
    tags.n = job_printed_tags(j, s->tok, tags.ids, tags.texts);
    for (int i = from; i < to; i++) {
        const job_logprob *lp = &j->logprobs[i];
        const cake_token prev = i ? j->ids[i - 1] : j->prompt[j->n_prompt - 1];
        int len;
        char *piece = answer_piece(s, &tags, prev, j->ids[i], &len);
        if (!piece) break;
        cJSON *top = top_json(s, &tags, lp, prev);
        if (s->chat) {
            cJSON *t = chat_token(piece, len, lp->logprob);
            cJSON_AddItemToObject(t, "top_logprobs", top);
            cJSON_AddItemToArray(content, t);
        } else {
            cJSON_AddItemToArray(tokens, clean_string(piece, len));
            cJSON_AddItemToArray(lps, cJSON_CreateNumber(lp->logprob));
            cJSON_AddItemToArray(tops, top);
            cJSON_AddItemToArray(offsets,
                                 cJSON_CreateNumber((double)echo_len +
                                                    (i ? (double)j->logprobs[i - 1].text_end : 0)));
        }
        free(piece);
    }
    return r;
}

/* {"id": {"logprob", "rank", "decoded_token"}} for token id after prev. */
static void add_ranked(cJSON *d, const api_shape *s, cake_token prev, cake_token id, float logprob,
                       int rank) {
    char key[16];
    int len;
    snprintf(key, sizeof(key), "%d", id);
    char *piece = piece_of(s->tok, prev, id, &len);
    if (!piece || cJSON_GetObjectItemCaseSensitive(d, key)) {
        free(piece);
        return;
    }
    cJSON *e = cJSON_AddObjectToObject(d, key);
    cJSON_AddNumberToObject(e, "logprob", logprob);
    cJSON_AddNumberToObject(e, "rank", rank);
    cJSON_AddItemToObject(e, "decoded_token", clean_string(piece, len));
    free(piece);
}

/* vLLM's prompt_logprobs: null for the first token, then for each token
 * its entry and its alternatives', by token id. */
static cJSON *prompt_logprobs_json(const api_shape *s, const serve_job *j) {
    if (!j->prompt_logprobs) return cJSON_CreateNull();
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < j->n_prompt; i++) {
        if (!i) {
            cJSON_AddItemToArray(a, cJSON_CreateNull());
            continue;
        }
        const job_logprob *lp = &j->prompt_logprobs[i];
        cJSON *d = cJSON_CreateObject();
        add_ranked(d, s, j->prompt[i - 1], j->prompt[i], lp->logprob, lp->rank);
        for (int k = 0; k < lp->n_top; k++)
            add_ranked(d, s, j->prompt[i - 1], lp->top_id[k], lp->top_logprob[k], k + 1);
        cJSON_AddItemToArray(a, d);
    }
    return a;
}

/* A choice's `logprobs`: null unless the job asked for them. */
static void add_logprobs(cJSON *choice, const api_shape *s, const serve_job *j, int from, int to,
                         size_t echo_len) {
    if (j->top_logprobs >= 0 && j->logprobs)
        cJSON_AddItemToObject(choice, "logprobs", logprobs_json(s, j, from, to, echo_len));
    else
        cJSON_AddNullToObject(choice, "logprobs");
}

static char *print_free(cJSON *r) {
    char *s = cJSON_PrintUnformatted(r);
    cJSON_Delete(r);
    return s;
}

/* ---- tool calls in an answer ---- */

static int is_tool(const serve_job *j, const char *name) {
    for (const char *p = j->tool_names; p && *p; p += strlen(p) + 1)
        if (!strcmp(p, name)) return 1;
    return 0;
}

/* A new call id: "call_" and 16 hex digits, or for Mistral's prompt (which
 * takes 9 letters or digits: mistral_ids) 9 of those. */
static void new_call_id(char *id, size_t cap, int mistral_ids) {
    static atomic_uint_fast64_t counter;
    uint64_t r = fresh_seed() ^ atomic_fetch_add(&counter, 1) << 32;
    if (!mistral_ids) {
        snprintf(id, cap, "call_%016llx", (unsigned long long)r);
        return;
    }
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    r *= 0x9e3779b97f4a7c15ull; /* (the counter's bits into all of them) */
    for (int k = 0; k < 9 && (size_t)k + 1 < cap; k++, r /= 62) id[k] = digits[r % 62];
    id[cap > 9 ? 9 : cap - 1] = '\0';
}

/* v as OpenAI's tool call, added to calls, when it is one as the format
 * writes it ({"name": <a tool>, ARGS: {...}}); 0 when it is not. */
static int add_call(const serve_job *j, const chat_call_syntax *syntax, const cJSON *v,
                    cJSON *calls) {
    const cJSON *name = field(v, "name"), *args = field(v, syntax->args);
    if (!args) args = field(v, "arguments"); /* (as some models write it) */
    cJSON *call = NULL;
    char *printed = NULL, *clean = NULL;
    if (cJSON_IsObject(v) && cJSON_IsString(name) && is_tool(j, name->valuestring) &&
        cJSON_IsObject(args) && (printed = cJSON_PrintUnformatted(args)) &&
        (clean = api_utf8_clean(printed, strlen(printed)))) {
        char id[40];
        new_call_id(id, sizeof(id), syntax->list || syntax->args_tag);
        call = cJSON_CreateObject();
        cJSON_AddStringToObject(call, "id", id);
        cJSON_AddStringToObject(call, "type", "function");
        cJSON *f = cJSON_AddObjectToObject(call, "function");
        cJSON_AddStringToObject(f, "name", name->valuestring);
        cJSON_AddStringToObject(f, "arguments", clean);
        cJSON_AddItemToArray(calls, call);
    }
    cJSON_free(printed);
    free(clean);
    return call != NULL;
}

/* Mistral v11's and v13's call after its opening tag: the name, the id tag
 * and an id where the model writes one (cake gives its own), the args tag,
 * the arguments' object. As read_calls. */
static int read_tagged_call(const serve_job *j, const chat_call_syntax *syntax, const char *text,
                            size_t len, cJSON *calls, size_t *used) {
    const size_t at = skip_space(text, 0, len), tl = strlen(syntax->args_tag);
    const char *tag = memmem(text + at, len - at, syntax->args_tag, tl), *end = NULL;
    if (!tag) return 0;
    const char *id = syntax->id_tag ? memmem(text + at, (size_t)(tag - text) - at, syntax->id_tag,
                                             strlen(syntax->id_tag))
                                    : NULL;
    const size_t name_len = (size_t)((id ? id : tag) - (text + at));
    char *name = strndup(text + at, name_len);
    const char *args = tag + tl;
    cJSON *v = cJSON_CreateObject();
    cJSON *parsed = cJSON_ParseWithLengthOpts(args, len - (size_t)(args - text), &end, false);
    if (name) cJSON_AddStringToObject(v, "name", name);
    if (parsed && !cJSON_AddItemToObject(v, syntax->args, parsed)) cJSON_Delete(parsed);
    const int ok = name && parsed && add_call(j, syntax, v, calls);
    if (ok) *used = (size_t)(end - text);
    cJSON_Delete(v);
    free(name);
    return ok;
}

/* The call at the start of text[0..len) (white space before it), or with
 * the format's list, the calls of a non-empty JSON array there, added to
 * calls; *used: the bytes they took. 0 when they are not all calls. */
static int read_calls(const serve_job *j, const chat_call_syntax *syntax, const char *text,
                      size_t len, cJSON *calls, size_t *used) {
    if (syntax->args_tag) return read_tagged_call(j, syntax, text, len, calls, used);
    const char *end = NULL;
    const size_t at = skip_space(text, 0, len);
    cJSON *v = cJSON_ParseWithLengthOpts(text + at, len - at, &end, false);
    int ok = v != NULL;
    if (syntax->list) {
        ok = cJSON_IsArray(v) && cJSON_GetArraySize(v) > 0;
        const cJSON *item;
        cJSON_ArrayForEach(item, v) ok = ok && add_call(j, syntax, item, calls);
    } else {
        ok = ok && add_call(j, syntax, v, calls);
    }
    if (ok) *used = (size_t)(end - text);
    cJSON_Delete(v);
    return ok;
}

/* The tool calls a job's answer makes (OpenAI's tool_calls; NULL: none, or
 * one that does not read as a call: then the whole answer is content), and
 * where its content ends (before the first call, white space trimmed). A
 * call is read as JSON from its tag on, so tags inside its strings are
 * text; white space may follow it, and its closing tag (which the end of
 * the answer may stand for). */
static cJSON *answer_calls(const serve_job *j, size_t *content_end) {
    const chat_call_syntax *syntax = j->call_format ? chat_calls(j->call_format) : NULL;
    const char *text = j->text ? j->text : "";
    const size_t len = j->len;
    size_t r0, r1, c0; /* (calls come after the reasoning) */
    job_reasoning(j, &r0, &r1, &c0);
    *content_end = len;
    if (!syntax) return NULL;
    const size_t ol = strlen(syntax->open), cl = strlen(syntax->close);
    cJSON *calls = cJSON_CreateArray();
    const char *p = ol ? memmem(text + c0, len - c0, syntax->open, ol) : text + c0;
    const size_t first = p ? (size_t)(p - text) : 0;
    while (p) {
        const size_t body = (size_t)(p - text) + ol;
        size_t used = 0;
        const int ok = read_calls(j, syntax, text + body, len - body, calls, &used);
        size_t after = ok ? skip_space(text, body + used, len) : 0;
        if (ok && cl && len - after >= cl && !memcmp(text + after, syntax->close, cl))
            after = skip_space(text, after + cl, len);
        if (!ok || (!ol && after < len)) { /* (a whole-answer call is all of it) */
            cJSON_Delete(calls);
            return NULL;
        }
        p = ol && after < len ? memmem(text + after, len - after, syntax->open, ol) : NULL;
    }
    if (!cJSON_GetArraySize(calls)) {
        cJSON_Delete(calls);
        return NULL;
    }
    *content_end = trim_space_back(text, first);
    return calls;
}

size_t api_content_end(const serve_job *j) {
    size_t end;
    cJSON_Delete(answer_calls(j, &end));
    return end;
}

int api_next_piece(const serve_job *j, size_t sent, size_t *from, size_t *to) {
    /* (with tools, a finished answer's content ends before its calls) */
    const size_t ready = j->done && j->call_format ? api_content_end(j) : j->ready;
    size_t r0, r1, c0;
    if (job_reasoning(j, &r0, &r1, &c0)) {
        if (sent < r0) sent = r0; /* (past the tag) */
        const size_t end = r1 < ready ? r1 : ready;
        if (sent < end) {
            *from = sent, *to = end;
            return 1;
        }
        if (r1 == j->len && !j->done) return 0; /* (still thinking) */
        if (sent < c0) sent = c0;
    }
    if (ready <= sent) return 0;
    *from = sent, *to = ready;
    return 2;
}

static const char *finish_reason(const serve_job *j) {
    size_t end;
    cJSON *calls = j->stopped ? answer_calls(j, &end) : NULL;
    cJSON_Delete(calls);
    return calls ? "tool_calls" : j->stopped ? "stop" : "length";
}

char *api_response(const api_shape *s, serve_job *const *jobs, int n, const char *id, long created,
                   const char *model) {
    cJSON *r = response_head(s, id, created, model, 0);
    cJSON *choices = cJSON_AddArrayToObject(r, "choices");
    for (int i = 0; i < n; i++) {
        const serve_job *j = jobs[i];
        size_t content_end = j->len, r0, r1, c0;
        cJSON *calls = s->chat ? answer_calls(j, &content_end) : NULL;
        job_reasoning(j, &r0, &r1, &c0);
        const char *all = j->text ? j->text : "";
        /* an echo: the prompt's text, then the answer's */
        size_t echo_len = 0;
        char *echoed = j->echo && !s->chat ? prompt_text(s, j, &echo_len) : NULL;
        char *joined = echoed ? realloc(echoed, echo_len + content_end + 1) : NULL;
        if (joined) {
            memcpy(joined + echo_len, all, content_end);
            all = joined;
            content_end += echo_len;
        } else {
            free(echoed);
        }
        char *text = (j->echo && !s->chat && !joined)
                         ? NULL
                         : api_utf8_clean(all + c0, content_end > c0 ? content_end - c0 : 0);
        free(joined);
        if (!text) {
            cJSON_Delete(calls);
            cJSON_Delete(r);
            return NULL;
        }
        cJSON *choice = cJSON_CreateObject();
        cJSON_AddNumberToObject(choice, "index", i);
        if (s->chat) {
            cJSON *msg = cJSON_AddObjectToObject(choice, "message");
            cJSON_AddStringToObject(msg, "role", "assistant");
            if (calls && content_end <= c0)
                cJSON_AddNullToObject(msg, "content");
            else
                cJSON_AddStringToObject(msg, "content", text);
            while (r1 > r0 && strchr(" \t\r\n", all[r1 - 1])) r1--;
            r0 = skip_space(all, r0, r1); /* (0 when there is none: r1 is 0) */
            if (r1 > r0)
                cJSON_AddItemToObject(msg, "reasoning_content",
                                      clean_string(all + r0, (int)(r1 - r0)));
            if (calls) cJSON_AddItemToObject(msg, "tool_calls", calls);
        } else {
            cJSON_AddStringToObject(choice, "text", text);
        }
        add_logprobs(choice, s, j, 0, api_answer_tokens(j, j->len), echo_len);
        /* vLLM's: a completion's choices each their prompt's, a chat's once */
        if (s->prompt_logprobs && !s->chat)
            cJSON_AddItemToObject(choice, "prompt_logprobs", prompt_logprobs_json(s, j));
        cJSON_AddStringToObject(choice, "finish_reason", finish_reason(j));
        cJSON_AddItemToArray(choices, choice);
        free(text);
    }
    add_usage(r, s, jobs, n);
    if (s->prompt_logprobs && s->chat)
        cJSON_AddItemToObject(r, "prompt_logprobs", prompt_logprobs_json(s, jobs[0]));
    add_cake(r, jobs[0]);
    return print_free(r);
}

char *api_stream_usage(const api_shape *s, serve_job *const *jobs, int n, const char *id,
                       long created, const char *model) {
    cJSON *r = response_head(s, id, created, model, 1);
    cJSON_AddArrayToObject(r, "choices");
    add_usage(r, s, jobs, n);
    return api_sse_event(print_free(r));
}

char *api_stream_event(const api_shape *s, api_chunk_kind kind, int index, const char *text,
                       size_t text_len, int tok_from, int tok_to, const serve_job *j,
                       const char *id, long created, const char *model) {
    char *clean =
        api_utf8_clean(kind == CHUNK_FINISH ? "" : text, kind == CHUNK_FINISH ? 0 : text_len);
    if (!clean) return NULL;
    cJSON *r = response_head(s, id, created, model, 1);
    cJSON *choices = cJSON_AddArrayToObject(r, "choices");
    cJSON *choice = cJSON_CreateObject();
    cJSON_AddNumberToObject(choice, "index", index);
    if (s->chat) {
        cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
        if (kind == CHUNK_FIRST) cJSON_AddStringToObject(delta, "role", "assistant");
        if (kind == CHUNK_REASONING) {
            cJSON_AddStringToObject(delta, "reasoning_content", clean);
        } else if (kind == CHUNK_CALLS) {
            size_t end;
            cJSON *calls = answer_calls(j, &end), *c;
            int k = 0;
            cJSON_ArrayForEach(c, calls) cJSON_AddNumberToObject(c, "index", k++);
            cJSON_AddItemToObject(delta, "tool_calls", calls ? calls : cJSON_CreateArray());
        } else if (kind != CHUNK_FINISH) {
            cJSON_AddStringToObject(delta, "content", clean);
        }
    } else {
        cJSON_AddStringToObject(choice, "text", clean);
    }
    if (kind == CHUNK_FIRST || kind == CHUNK_CALLS)
        cJSON_AddNullToObject(choice, "logprobs");
    else
        add_logprobs(choice, s, j, tok_from, tok_to, 0);
    if (kind == CHUNK_FINISH)
        cJSON_AddStringToObject(choice, "finish_reason", finish_reason(j));
    else
        cJSON_AddNullToObject(choice, "finish_reason");
    cJSON_AddItemToArray(choices, choice);
    if (kind == CHUNK_FINISH) add_cake(r, j);
    free(clean);
    return api_sse_event(print_free(r));
}

char *api_sse_event(char *json) {
    if (!json) return NULL;
    const size_t n = strlen(json);
    char *ev = malloc(n + 9);
    if (ev) {
        memcpy(ev, "data: ", 6);
        memcpy(ev + 6, json, n);
        memcpy(ev + 6 + n, "\n\n", 3);
    }
    free(json);
    return ev;
}

/* ---- /tokenize and /detokenize ---- */

int api_tokenize(const char *body, size_t len, const api_model *m, char **out, char *err,
                 size_t errlen) {
    *out = NULL;
    cJSON *o = body_object(body, len, err, errlen);
    if (!o) return -1;
    cake_token *ids = NULL, eot;
    int n = 0, rc = -1;
    const cJSON *p = field(o, "prompt");
    request_tools rt = {0}; /* (a chat's tools are part of its prompt) */
    if (field(o, "messages")) {
        if (tools_asked(o, 1, &rt, err, errlen) ||
            chat_prompt_of(o, m, &rt, &ids, &n, &eot, err, errlen))
            goto done;
    } else if (!cJSON_IsString(p)) {
        cake_err(err, errlen, "'prompt' must be a string (or give 'messages')");
        goto done;
    } else if (tokenize_text(m, p->valuestring, strlen(p->valuestring), &ids, &n, err, errlen)) {
        goto done;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddItemToObject(r, "tokens", cJSON_CreateIntArray(ids, n));
    cJSON_AddNumberToObject(r, "count", n);
    cJSON_AddNumberToObject(r, "max_model_len", m->n_ctx);
    *out = print_free(r);
    rc = 0;
done:
    tools_free(&rt);
    free(ids);
    cJSON_Delete(o);
    return rc;
}

int api_detokenize(const char *body, size_t len, const api_model *m, char **out, char *err,
                   size_t errlen) {
    *out = NULL;
    cJSON *o = body_object(body, len, err, errlen);
    if (!o) return -1;
    const cJSON *tokens = field(o, "tokens"), *t;
    int rc = -1;
    char *text = NULL;
    size_t n = 0, cap = 0;
    if (!cJSON_IsArray(tokens)) {
        cake_err(err, errlen, "'tokens' must be an array of token ids");
        goto done;
    }
    cake_token prev = -1;
    cJSON_ArrayForEach(t, tokens) {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) || t->valuedouble < 0 ||
            t->valuedouble >= m->n_vocab) {
            cake_err(err, errlen, "'tokens' holds something that is not a token id (0..%d)",
                     m->n_vocab - 1);
            goto done;
        }
        const cake_token id = (cake_token)t->valuedouble;
        const int k = cake_token_to_piece(m->tok, prev, id, NULL, 0);
        if (k > 0 && n + (size_t)k >= cap) {
            cap = 2 * (n + (size_t)k) + 64;
            char *b = realloc(text, cap);
            if (!b) {
                cake_err(err, errlen, "out of memory");
                goto done;
            }
            text = b;
        }
        if (k > 0) n += (size_t)cake_token_to_piece(m->tok, prev, id, text + n, (size_t)k);
        prev = id;
    }
    char *clean = api_utf8_clean(text ? text : "", n);
    if (clean) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "prompt", clean);
        *out = print_free(r);
        free(clean);
    }
    rc = 0;
done:
    free(text);
    cJSON_Delete(o);
    return rc;
}

char *api_models(const char *name) {
    char *clean = api_utf8_clean(name, strlen(name));
    if (!clean) return NULL;
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "object", "list");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", clean);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "cake");
    cJSON_AddItemToArray(cJSON_AddArrayToObject(r, "data"), m);
    free(clean);
    return print_free(r);
}

char *api_error(int status, const char *message) {
    const char *type = status == 401 ? "authentication_error"
                       : status == 400 || status == 404 || status == 405 || status == 413
                           ? "invalid_request_error"
                       : status == 503 ? "server_busy"
                                       : "server_error";
    cJSON *r = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(r, "error");
    char *clean = api_utf8_clean(message, strlen(message));
    cJSON_AddStringToObject(e, "message", clean ? clean : "error");
    cJSON_AddStringToObject(e, "type", type);
    cJSON_AddNumberToObject(e, "code", status);
    free(clean);
    return print_free(r);
}
