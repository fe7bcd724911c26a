#include "server/chat.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"

chat_format chat_detect(const char *tmpl, const cake_tokenizer *t) {
    if (tmpl) {
        if (strstr(tmpl, "<|im_sep|>")) return CHAT_PHI4; /* before ChatML, whose tags it has */
        if (strstr(tmpl, "<start_of_turn>")) return CHAT_GEMMA;
        if (strstr(tmpl, "<|start_of_role|>")) return CHAT_GRANITE;
        if (strstr(tmpl, "<|im_start|>")) return CHAT_CHATML;
        if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|end_header_id|>"))
            return CHAT_LLAMA3;
        /* Mistral's versions as llama.cpp tells them apart: v7 by its system
         * prompt tags, v3-tekken by "[INST]" quoted in its official template */
        /* v7 with spaces after its markers (Large 2411), v7-tekken without
         * (Small 3, 3.1, 3.2: '[INST]' + message['content'] + '[/INST]') */
        /* (and the later tool calls, name[ARGS]{...}, with [CALL_ID] in v11) */
        if (strstr(tmpl, "[INST]") && strstr(tmpl, "[SYSTEM_PROMPT]")) {
            if (strstr(tmpl, "[INST] ")) return CHAT_MISTRAL_V7;
            if (!strstr(tmpl, "[ARGS]")) return CHAT_MISTRAL_V7_TEKKEN;
            return strstr(tmpl, "[CALL_ID]") ? CHAT_MISTRAL_V11 : CHAT_MISTRAL_V13;
        }
        if (strstr(tmpl, "[AVAILABLE_TOOLS]") && strstr(tmpl, "\"[INST]\""))
            return CHAT_MISTRAL_TEKKEN;
        /* v3 (7B v0.3): tools, and no space before its "[INST] " */
        if (strstr(tmpl, "[INST]") && strstr(tmpl, "[AVAILABLE_TOOLS]") && !strstr(tmpl, " [INST]"))
            return CHAT_MISTRAL_V3;
        if (strstr(tmpl, "[INST]") && strstr(tmpl, "<<SYS>>")) return CHAT_LLAMA2;
        /* v0.2's later template: ' [INST] ' + system_message */
        if (strstr(tmpl, "[INST]"))
            return strstr(tmpl, " [INST] ") ? CHAT_MISTRAL_V1 : CHAT_MISTRAL;
        if (strstr(tmpl, "<|assistant|>") && strstr(tmpl, "<|end|>")) return CHAT_PHI3;
        if (strstr(tmpl, "<｜User｜>") && strstr(tmpl, "<｜Assistant｜>")) return CHAT_DEEPSEEK;
        if (strstr(tmpl, "<|user|>") && strstr(tmpl, "<|assistant|>")) return CHAT_ZEPHYR;
        return CHAT_NONE;
    }
    if (cake_tokenizer_find(t, "<|im_start|>", 12) >= 0 &&
        cake_tokenizer_find(t, "<|im_end|>", 10) >= 0)
        return CHAT_CHATML;
    if (cake_tokenizer_find(t, "<|start_header_id|>", 19) >= 0 &&
        cake_tokenizer_find(t, "<|eot_id|>", 10) >= 0)
        return CHAT_LLAMA3;
    return CHAT_NONE;
}

/* The template's text after `head` up to <|im_end|> where both are in one
 * string literal; NULL: there is none. */
static char *system_literal(const char *tmpl, const char *head) {
    for (const char *p = strstr(tmpl, head); p; p = strstr(p + 1, head)) {
        const char quote = p > tmpl ? p[-1] : 0;
        if (quote != '\'' && quote != '"') continue;
        const char *text = p + strlen(head), *end = strstr(text, "<|im_end|>");
        if (!end) return NULL;
        char *out = malloc((size_t)(end - text) + 1), *o = out;
        if (!out) return NULL;
        const char *c = text;
        for (; c < end && *c != quote; c++) { /* (a quote: the literal ends before it) */
            if (*c != '\\') {
                *o++ = *c;
                continue;
            }
            if (++c == end) { /* (a dangling escape: no literal) */
                c = NULL;
                break;
            }
            *o++ = *c == 'n' ? '\n' : *c == 't' ? '\t' : *c; /* \' \" \\ are themselves */
        }
        *o = '\0';
        if (c == end && o > out) return out;
        free(out);
    }
    return NULL;
}

/* A Jinja string literal at *p ('...' or "..."), unescaped onto out
 * (\n, \t, \" and the like; a backslash before a line break is a break, as
 * copies of templates written out with their escapes expanded have it);
 * *p moves past it. false when it is not one. */
static bool read_literal(const char **p, char *out, size_t cap, size_t *len) {
    const char quote = **p;
    if (quote != '\'' && quote != '"') return false;
    const char *c = *p + 1;
    for (; *c && *c != quote; c++) {
        char ch = *c;
        if (ch == '\\' && c[1]) {
            ch = *++c == 'n' ? '\n' : *c == 't' ? '\t' : *c; /* (\<newline>: the newline) */
        }
        if (*len + 1 >= cap) return false;
        out[(*len)++] = ch;
    }
    if (*c != quote) return false;
    *p = c + 1;
    return true;
}

/* text with {today} and {yesterday} as the days of `now` (local time),
 * YYYY-MM-DD. malloc'd; NULL on out of memory. */
static char *fill_days(const char *text, time_t now) {
    char days[2][16] = {"", ""};
    struct tm tm;
    for (int k = 0; k < 2; k++) {
        const time_t t = now - k * 86400;
        if (localtime_r(&t, &tm)) strftime(days[k], sizeof(days[k]), "%Y-%m-%d", &tm);
    }
    static const char *const names[] = {"{today}", "{yesterday}"};
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    if (!f) return NULL;
    for (const char *p = text; *p;) {
        int hit = -1;
        for (int k = 0; k < 2 && hit < 0; k++)
            if (!strncmp(p, names[k], strlen(names[k]))) hit = k;
        if (hit < 0) {
            fputc(*p++, f);
            continue;
        }
        fputs(days[hit], f);
        p += strlen(names[hit]);
    }
    if (fclose(f)) {
        free(out);
        return NULL;
    }
    return out;
}

char *chat_dated_default_system(const char *tmpl, time_t now) {
    const char *at = tmpl ? strstr(tmpl, "set default_system_message") : NULL;
    if (!at || !(at = strchr(at, '='))) return NULL;
    /* (the literals are the template's text; the days a few bytes each) */
    size_t cap = strlen(tmpl) + 4096, len = 0;
    char *out = malloc(cap);
    if (!out) return NULL;
    for (const char *p = at + 1;;) {
        while (*p == ' ' || *p == '\n' || *p == '\t') p++;
        if (*p == '\'' || *p == '"') {
            if (!read_literal(&p, out, cap, &len)) break;
        } else { /* a variable: one the template sets to strftime_now("FMT") */
            char name[64], set[96], fmt[64] = "";
            size_t n = strspn(p, "abcdefghijklmnopqrstuvwxyz_0123456789");
            if (!n || n >= sizeof(name)) break;
            memcpy(name, p, n);
            name[n] = '\0';
            p += n;
            snprintf(set, sizeof(set), "set %s = strftime_now(", name);
            const char *f = strstr(tmpl, set);
            size_t fl = 0;
            if (!f || !read_literal((f += strlen(set), &f), fmt, sizeof(fmt), &fl)) break;
            fmt[fl] = '\0';
            struct tm tm;
            char day[64];
            /* (the template's format: strftime reads no arguments past tm) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
            const size_t dl = localtime_r(&now, &tm) ? strftime(day, sizeof(day), fmt, &tm) : 0;
#pragma GCC diagnostic pop
            if (!dl || len + dl >= cap) break;
            memcpy(out + len, day, dl);
            len += dl;
        }
        while (*p == ' ' || *p == '\n' || *p == '\t') p++;
        if (*p == '+') {
            p++;
            continue;
        }
        if (len && (!strncmp(p, "%}", 2) || !strncmp(p, "-%}", 3))) {
            out[len] = '\0';
            char *filled = fill_days(out, now);
            free(out);
            return filled;
        }
        break;
    }
    free(out);
    return NULL;
}

char *chat_default_system(const char *tmpl) {
    if (!tmpl) return NULL;
    /* (the newline as the Jinja source escapes it, or as a newline) */
    char *s = system_literal(tmpl, "<|im_start|>system\\n");
    return s ? s : system_literal(tmpl, "<|im_start|>system\n");
}

int chat_strips_reasoning(const char *tmpl) {
    return tmpl && (strstr(tmpl, "split('</think>')") || strstr(tmpl, "split(\"</think>\")"));
}

int chat_opens_thinking(const char *tmpl) {
    /* (the newline as the Jinja source escapes it, or as a newline) */
    static const char *const opens[] = {"<｜Assistant｜><think>\\n", "<｜Assistant｜><think>\n",
                                        "assistant\\n<think>\\n", "assistant\n<think>\n"};
    for (size_t k = 0; tmpl && k < sizeof(opens) / sizeof(opens[0]); k++)
        if (strstr(tmpl, opens[k])) return 1;
    return 0;
}

char *chat_llama3_date(const char *tmpl) {
    if (!tmpl || !strstr(tmpl, "Cutting Knowledge Date")) return NULL;
    if (strstr(tmpl, "strftime_now")) return strdup("");
    /* the template's own: {%- set date_string = "26 Jul 2024" %} */
    static const char set[] = "set date_string = \"";
    const char *at = strstr(tmpl, set), *end;
    if (at && (end = strchr(at += sizeof(set) - 1, '"')) && end - at < 32)
        return strndup(at, (size_t)(end - at));
    return strdup("26 Jul 2024");
}

static const char *const format_names[] = {
    "none",       "chatml",      "llama3",         "llama2",     "mistral",
    "zephyr",     "phi3",        "mistral-tekken", "mistral-v7", "phi4",
    "gemma",      "granite",     "mistral-v3",     "deepseek",   "mistral-v7-tekken",
    "mistral-v1", "mistral-v11", "mistral-v13"};

const char *chat_format_name(chat_format f) {
    return format_names[f];
}

int chat_format_parse(const char *name, chat_format *out) {
    for (size_t f = 1; f < sizeof(format_names) / sizeof(format_names[0]); f++)
        if (!strcmp(name, format_names[f])) {
            *out = (chat_format)f;
            return 0;
        }
    return -1;
}

/* The prompt as it grows: text is collected until the next special token
 * and tokenized as one fragment, as llama.cpp tokenizes a rendered template
 * (split at special tokens). The first failure sticks. */
typedef struct {
    const cake_tokenizer *t;
    cake_token *ids;
    int n, cap;
    char *text; /* the pending fragment */
    size_t text_len, text_cap;
    char *err;
    size_t errlen;
    int failed;
} builder;

static int oom(builder *b) {
    if (!b->failed) b->failed = cake_err(b->err, b->errlen, "out of memory");
    return -1;
}

static int reserve_ids(builder *b, int64_t more) {
    if (b->n + more <= b->cap) return 0;
    if (b->n + more > 1 << 28) return oom(b);
    int cap = b->cap ? b->cap : 256;
    while (cap < b->n + more) cap *= 2;
    cake_token *p = realloc(b->ids, (size_t)cap * sizeof(*p));
    if (!p) return oom(b);
    b->ids = p;
    b->cap = cap;
    return 0;
}

static void flush_text(builder *b) {
    if (b->failed || b->text_len == 0) return;
    int64_t n = cake_tokenize(b->t, b->text, b->text_len, false, NULL, 0);
    if (n < 0) {
        oom(b);
        return;
    }
    if (reserve_ids(b, n)) return;
    cake_tokenize(b->t, b->text, b->text_len, false, b->ids + b->n, n);
    b->n += (int)n;
    b->text_len = 0;
}

static void put_id(builder *b, cake_token id) {
    flush_text(b);
    if (b->failed || reserve_ids(b, 1)) return;
    b->ids[b->n++] = id;
}

static void put_special(builder *b, const char *text) {
    cake_token id = cake_tokenizer_find(b->t, text, strlen(text));
    if (id < 0 && !b->failed)
        b->failed = cake_err(b->err, b->errlen, "the vocabulary has no %s token", text);
    put_id(b, id);
}

static void put_text(builder *b, const char *s, size_t len) {
    if (b->failed) return;
    if (b->text_len + len + 1 > b->text_cap) {
        size_t cap = 2 * (b->text_len + len) + 256;
        char *p = realloc(b->text, cap);
        if (!p) {
            oom(b);
            return;
        }
        b->text = p;
        b->text_cap = cap;
    }
    memcpy(b->text + b->text_len, s, len);
    b->text_len += len;
}

static void put_str(builder *b, const char *s) {
    put_text(b, s, strlen(s));
}

/* A template's marker ([INST], ...): its token where the vocabulary has one
 * (Mistral v0.3 and later), as llama.cpp reads special tokens in a rendered
 * template; else text (Mistral v0.1, v0.2). */
static void put_marker(builder *b, const char *s) {
    if (cake_tokenizer_find(b->t, s, strlen(s)) >= 0)
        put_special(b, s);
    else
        put_str(b, s);
}

/* A message's text with leading and trailing white space removed, as the
 * Llama templates do ({{ message['content'] | trim }}). */
static void put_trimmed(builder *b, const chat_message *m) {
    const char *s = m->content;
    size_t len = m->content_len;
    while (len && strchr(" \t\r\n", s[0])) s++, len--;
    while (len && strchr(" \t\r\n", s[len - 1])) len--;
    put_text(b, s, len);
}

/* s[0..len) as a JSON string, as Python's json.dumps(ensure_ascii=False)
 * writes it (templates' tojson), which is how cJSON prints one: quotes,
 * backslashes and control bytes escaped, the rest as it is. */
static void put_json_string(builder *b, const char *s, size_t len) {
    char *text = strndup(s, len);
    cJSON *str = text ? cJSON_CreateStringReference(text) : NULL;
    char *json = str ? cJSON_PrintUnformatted(str) : NULL;
    if (json)
        put_str(b, json);
    else
        oom(b);
    cJSON_free(json);
    cJSON_Delete(str);
    free(text);
}

/* Template text with a tool call's tags: each tag as its own token where
 * the vocabulary has one (Qwen's <tool_call>), else as text. (Never used on
 * the messages' own text.) */
static void put_tagged(builder *b, const char *s) {
    static const char *const tags[] = {"<tool_call>",      "</tool_call>", "<tool_response>",
                                       "</tool_response>", "<think>",      "</think>"};
    while (*s) {
        const char *hit = NULL;
        size_t len = 0;
        for (size_t k = 0; k < sizeof(tags) / sizeof(tags[0]); k++) {
            const char *h = strstr(s, tags[k]);
            if (h && (!hit || h < hit)) hit = h, len = strlen(tags[k]);
        }
        if (!hit) {
            put_str(b, s);
            return;
        }
        put_text(b, s, (size_t)(hit - s));
        const cake_token id = cake_tokenizer_find(b->t, hit, len);
        if (id >= 0)
            put_id(b, id);
        else
            put_text(b, hit, len);
        s = hit + len;
    }
}

static int known_role(const char *r) {
    return !strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant") ||
           !strcmp(r, "tool");
}

/* The Mistral formats with tools: 7B v0.3's and Nemo's templates (v3), and
 * those of mistral-common's v7 and later (Small 3 on) */
static bool mistral_tools(chat_format f) {
    return f == CHAT_MISTRAL_V3 || f == CHAT_MISTRAL_TEKKEN || f == CHAT_MISTRAL_V7_TEKKEN ||
           f == CHAT_MISTRAL_V11 || f == CHAT_MISTRAL_V13;
}

/* Those whose calls and results carry the call's id (all but v13's) */
static bool mistral_ids(chat_format f) {
    return mistral_tools(f) && f != CHAT_MISTRAL_V13;
}

const chat_call_syntax *chat_calls(chat_format f) {
    /* Qwen 2.5 and 3 (Hermes), Llama 3.1's JSON tool calls, Mistral's
     * [TOOL_CALLS] with a list (7B v0.3, Nemo, Small 3, 3.1), and its
     * name[ARGS]{...} (v11, with [CALL_ID] where the model writes one;
     * v13) */
    static const chat_call_syntax hermes = {"<tool_call>", "</tool_call>", "arguments", 0, NULL,
                                            NULL};
    static const chat_call_syntax llama3 = {"", "", "parameters", 0, NULL, NULL};
    static const chat_call_syntax mistral = {"[TOOL_CALLS]", "", "arguments", 1, NULL, NULL};
    static const chat_call_syntax v11 = {"[TOOL_CALLS]", "", "arguments", 0, "[ARGS]", "[CALL_ID]"};
    static const chat_call_syntax v13 = {"[TOOL_CALLS]", "", "arguments", 0, "[ARGS]", NULL};
    return f == CHAT_CHATML        ? &hermes
           : f == CHAT_LLAMA3      ? &llama3
           : f == CHAT_MISTRAL_V11 ? &v11
           : f == CHAT_MISTRAL_V13 ? &v13
           : mistral_tools(f)      ? &mistral
                                   : NULL;
}

const char *chat_parts_separator(chat_format f) {
    return f == CHAT_MISTRAL_V7_TEKKEN || f == CHAT_MISTRAL_V11 || f == CHAT_MISTRAL_V13 ? "\n\n"
                                                                                         : "";
}

int chat_silent_tokens(const cake_tokenizer *t, const char *const *texts, int n, cake_token *ids,
                       const char **out) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        const cake_token id = texts[i] ? cake_tokenizer_find(t, texts[i], strlen(texts[i])) : -1;
        if (id >= 0 && cake_token_to_piece(t, -1, id, NULL, 0) == 0)
            ids[k] = id, out[k++] = texts[i];
    }
    return k;
}

int chat_silent_tags(const chat_call_syntax *c, const cake_tokenizer *t, cake_token *ids,
                     const char **texts) {
    const char *const tags[CHAT_CALL_TAGS] = {c ? c->open : NULL, c ? c->args_tag : NULL,
                                              c ? c->id_tag : NULL};
    return chat_silent_tokens(t, tags, CHAT_CALL_TAGS, ids, texts);
}

/* A call as the format writes it, {"name": ..., ARGS: {...}}, between its
 * tags (on lines of their own) where it has them. */
static void put_call(builder *b, const chat_tool_call *c, const chat_call_syntax *syntax) {
    if (syntax->open[0]) {
        put_str(b, "\n");
        put_tagged(b, syntax->open);
        put_str(b, "\n");
    }
    put_str(b, "{\"name\": \"");
    put_str(b, c->name);
    put_str(b, "\", \"");
    put_str(b, syntax->args);
    put_str(b, "\": ");
    put_str(b, c->arguments);
    put_str(b, "}");
    if (syntax->close[0]) {
        put_str(b, "\n");
        put_tagged(b, syntax->close);
    }
}

/* An answer's text after its reasoning: after its last </think>, if any
 * (as templates that drop an earlier answer's reasoning cut it). */
static void after_reasoning(const char **text, size_t *len) {
    const char *s = *text, *end = s + *len;
    for (const char *c; (c = memmem(s, (size_t)(end - s), "</think>", 8));) s = c + 8;
    *text = s;
    *len = (size_t)(end - s);
}

/* ChatML with Qwen's tool prompt (its template's words): the functions in
 * the system turn, calls in <tool_call> tags, results in <tool_response>
 * tags in a user turn. */
static void chatml(builder *b, const chat_message *m, int n, const chat_tools *tools,
                   const char *default_system, bool strip_reasoning) {
    int i = 0, last_user = -1;
    for (int k = 0; k < n; k++)
        if (!strcmp(m[k].role, "user")) last_user = k;
    const bool has_system = n && !strcmp(m[0].role, "system");
    if (tools) {
        put_special(b, "<|im_start|>");
        put_str(b, "system\n");
        if (has_system || default_system) {
            if (has_system)
                put_text(b, m[0].content, m[0].content_len);
            else
                put_str(b, default_system);
            put_str(b, "\n\n");
            i = has_system;
        }
        put_str(b, "# Tools\n\nYou may call one or more functions to assist with the user "
                   "query.\n\nYou are provided with function signatures within <tools></tools> "
                   "XML tags:\n<tools>");
        for (int k = 0; k < tools->n; k++) {
            put_str(b, "\n");
            put_str(b, tools->json[k]);
        }
        put_tagged(b,
                   "\n</tools>\n\nFor each function call, return a json object with function "
                   "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
        put_special(b, "<|im_end|>");
        put_str(b, "\n");
    } else if (!has_system && default_system) {
        put_special(b, "<|im_start|>");
        put_str(b, "system\n");
        put_str(b, default_system);
        put_special(b, "<|im_end|>");
        put_str(b, "\n");
    }
    for (; i < n; i++) {
        if (!strcmp(m[i].role, "tool")) { /* a run of results: one user turn */
            if (!i || strcmp(m[i - 1].role, "tool")) {
                put_special(b, "<|im_start|>");
                put_str(b, "user");
            }
            put_tagged(b, "\n<tool_response>\n");
            put_text(b, m[i].content, m[i].content_len);
            put_tagged(b, "\n</tool_response>");
            if (i + 1 < n && !strcmp(m[i + 1].role, "tool")) continue;
            put_special(b, "<|im_end|>");
            put_str(b, "\n");
            continue;
        }
        const char *text = m[i].content;
        size_t len = m[i].content_len;
        if (strip_reasoning && i < last_user && !strcmp(m[i].role, "assistant")) {
            after_reasoning(&text, &len); /* (Qwen 3's: .split('</think>')[-1].lstrip('\n')) */
            while (len && *text == '\n') text++, len--;
        }
        put_special(b, "<|im_start|>");
        put_str(b, m[i].role);
        if (!m[i].n_calls || len) put_str(b, "\n");
        put_text(b, text, len);
        for (int k = 0; k < m[i].n_calls; k++) put_call(b, &m[i].calls[k], chat_calls(CHAT_CHATML));
        put_special(b, "<|im_end|>");
        put_str(b, "\n");
    }
    put_special(b, "<|im_start|>");
    put_str(b, "assistant\n");
}

static void llama3_header(builder *b, const char *role) {
    put_special(b, "<|start_header_id|>");
    put_str(b, role);
    put_special(b, "<|end_header_id|>");
    put_str(b, "\n\n");
}

/* Llama 3, with Llama 3.1's tool prompt (its template's words, its default
 * date): the functions before the first user message, a call as the
 * answer's JSON, results in ipython turns. With a date (Llama 3.1 and
 * later), or with tools, the system turn its template writes in every chat:
 * the knowledge cutoff and the date, then the system message. */
static void llama3(builder *b, const chat_message *m, int n, const chat_tools *tools,
                   const char *date) {
    int i = 0, listed = 0;
    if (tools && !date) date = "26 Jul 2024";
    if (date) {
        llama3_header(b, "system");
        if (tools) put_str(b, "Environment: ipython\n");
        put_str(b, "Cutting Knowledge Date: December 2023\nToday Date: ");
        put_str(b, date);
        put_str(b, "\n\n");
        if (n && !strcmp(m[0].role, "system")) put_trimmed(b, &m[i++]);
        put_special(b, "<|eot_id|>");
    }
    for (; i < n; i++) {
        llama3_header(b, !strcmp(m[i].role, "tool") ? "ipython" : m[i].role);
        if (tools && !listed && !strcmp(m[i].role, "user")) {
            listed = 1;
            put_str(b, "Given the following functions, please respond with a JSON for a function "
                       "call with its proper arguments that best answers the given prompt.\n\n"
                       "Respond in the format {\"name\": function name, \"parameters\": dictionary "
                       "of argument name and its value}.Do not use variables.\n\n");
            for (int k = 0; k < tools->n; k++) {
                put_str(b, tools->json[k]);
                put_str(b, "\n\n");
            }
        }
        if (!strcmp(m[i].role, "tool")) /* (3.1's template: a result's text as tojson) */
            put_json_string(b, m[i].content, m[i].content_len);
        else
            put_trimmed(b, &m[i]);
        for (int k = 0; k < m[i].n_calls; k++) put_call(b, &m[i].calls[k], chat_calls(CHAT_LLAMA3));
        put_special(b, "<|eot_id|>");
    }
    llama3_header(b, "assistant");
}

/* Mistral's tool prompt, as 7B v0.3's and Nemo's templates write it (v3
 * with a space after the markers, tekken without): the functions before
 * the last user message, an assistant's calls as [TOOL_CALLS] and a JSON
 * list of them with their ids, a result as [TOOL_RESULTS] {"content": ...,
 * "call_id": ...}[/TOOL_RESULTS] (its content as text, unquoted). */
static void mistral_functions(builder *b, const chat_tools *tools, bool spaced) {
    put_marker(b, "[AVAILABLE_TOOLS]");
    put_str(b, spaced ? " [" : "[");
    for (int k = 0; k < tools->n; k++) {
        if (k) put_str(b, ", ");
        put_str(b, tools->json[k]);
    }
    put_str(b, "]");
    put_marker(b, "[/AVAILABLE_TOOLS]");
}

/* An assistant's calls: v11's [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} and
 * v13's [TOOL_CALLS]name[ARGS]{...} for each; else one [TOOL_CALLS] and
 * the list. */
static void mistral_calls(builder *b, const chat_message *m, chat_format f, bool spaced) {
    if (f == CHAT_MISTRAL_V11 || f == CHAT_MISTRAL_V13) {
        for (int k = 0; k < m->n_calls; k++) {
            put_marker(b, "[TOOL_CALLS]");
            put_str(b, m->calls[k].name);
            if (f == CHAT_MISTRAL_V11) {
                put_marker(b, "[CALL_ID]");
                put_str(b, m->calls[k].id);
            }
            put_marker(b, "[ARGS]");
            put_str(b, m->calls[k].arguments);
        }
        return;
    }
    put_marker(b, "[TOOL_CALLS]");
    put_str(b, spaced ? " [" : "[");
    for (int k = 0; k < m->n_calls; k++) {
        if (k) put_str(b, ", ");
        put_str(b, "{\"name\": \"");
        put_str(b, m->calls[k].name);
        put_str(b, "\", \"arguments\": ");
        put_str(b, m->calls[k].arguments);
        put_str(b, ", \"id\": \"");
        put_str(b, m->calls[k].id);
        put_str(b, "\"}");
    }
    put_str(b, "]");
}

/* A tool's result: v3's [TOOL_RESULTS] {"content": ..., "call_id":
 * ...}[/TOOL_RESULTS], v7's and v11's [TOOL_RESULTS]id[TOOL_CONTENT]...,
 * v13's [TOOL_RESULTS]...[/TOOL_RESULTS]. */
static void mistral_result(builder *b, const chat_message *m, chat_format f, bool spaced) {
    put_marker(b, "[TOOL_RESULTS]");
    if (f == CHAT_MISTRAL_V7_TEKKEN || f == CHAT_MISTRAL_V11) {
        put_str(b, m->call_id);
        put_marker(b, "[TOOL_CONTENT]");
        put_text(b, m->content, m->content_len);
    } else if (f == CHAT_MISTRAL_V13) {
        put_text(b, m->content, m->content_len);
    } else {
        put_str(b, spaced ? " {\"content\": " : "{\"content\": ");
        put_text(b, m->content, m->content_len);
        put_str(b, ", \"call_id\": \"");
        put_str(b, m->call_id);
        put_str(b, "\"}");
    }
    put_marker(b, "[/TOOL_RESULTS]");
}

/* Mistral's formats, as their templates write them but with the system
 * messages before the first user message after them (as llama.cpp's: a
 * prefix that stays put from turn to turn; several joined by blank lines):
 * v0.1's <s>[INST] {system}\n\n{user} [/INST]{answer}</s>;
 * v1 (v0.2's later template) <s> [INST] {system}\n\n{user} [/INST] {answer}</s>;
 * v3 [INST] {system}\n\n{user}[/INST] {answer}</s> (answers trimmed);
 * llama.cpp's v3-tekken [INST]{system}\n\n{user}[/INST]{answer}</s>;
 * v7 [SYSTEM_PROMPT] {system}[/SYSTEM_PROMPT][INST] {user}[/INST] {answer}</s>,
 * v7-tekken, v11 and v13 the same without the spaces, and (as
 * mistral-common's) a run of user messages, or of answers, joined into one
 * by blank lines (the answers' text, then their calls).
 * With tools, mistral_functions' prompt: before the last user message, or
 * v13's before the first (mistral-common's templates); v3's (and Nemo's)
 * calls stand for the answer's text, the later ones follow it. */
static void mistral(builder *b, const chat_message *m, int n, chat_format f,
                    const chat_tools *tools, const char *default_system, cake_token eos) {
    const bool plain = f == CHAT_MISTRAL, v1 = f == CHAT_MISTRAL_V1, v7 = f == CHAT_MISTRAL_V7,
               v3 = f == CHAT_MISTRAL_V3;
    const bool later = f == CHAT_MISTRAL_V7_TEKKEN || f == CHAT_MISTRAL_V11 ||
                       f == CHAT_MISTRAL_V13; /* (v7 and on: mistral-common's tekken ones) */
    const bool system_prompt = v7 || later;   /* ([SYSTEM_PROMPT]) */
    /* the last user message (the later formats': the first of the last run
     * of them, which they join), and the first */
    int last_user = -1, first_user = -1, systems_from = 0, has_system = 0;
    for (int i = 0; i < n; i++) {
        const bool user = !strcmp(m[i].role, "user");
        if (user && (!later || !i || strcmp(m[i - 1].role, "user"))) last_user = i;
        if (user && first_user < 0) first_user = i;
        has_system |= !strcmp(m[i].role, "system");
    }
    const int tools_at = !tools ? -1 : f == CHAT_MISTRAL_V13 ? first_user : last_user;
    if (system_prompt && !has_system && default_system) { /* (Small 3's, with its date) */
        put_marker(b, "[SYSTEM_PROMPT]");
        if (v7) put_str(b, " ");
        put_str(b, default_system);
        put_marker(b, "[/SYSTEM_PROMPT]");
    }
    for (int i = 0; i < n; i++) {
        if (i == tools_at) mistral_functions(b, tools, v3);
        if (m[i].n_calls && !later && mistral_tools(f)) {
            mistral_calls(b, &m[i], f, v3);
            if (eos >= 0) put_id(b, eos);
        } else if (!strcmp(m[i].role, "tool")) {
            mistral_result(b, &m[i], f, v3);
        } else if (!strcmp(m[i].role, "system") && system_prompt) {
            put_marker(b, "[SYSTEM_PROMPT]");
            if (v7) put_str(b, " ");
            put_text(b, m[i].content, m[i].content_len);
            put_marker(b, "[/SYSTEM_PROMPT]");
        } else if (!strcmp(m[i].role, "user")) {
            if (v1) put_str(b, " ");
            put_marker(b, "[INST]");
            if (plain || v1 || v7 || v3) put_str(b, " ");
            for (int k = system_prompt ? i : systems_from; k < i; k++) {
                if (strcmp(m[k].role, "system")) continue;
                put_text(b, m[k].content, m[k].content_len);
                put_str(b, "\n\n");
            }
            systems_from = i + 1;
            put_text(b, m[i].content, m[i].content_len);
            for (; later && i + 1 < n && !strcmp(m[i + 1].role, "user"); i++) {
                put_str(b, "\n\n");
                put_text(b, m[i + 1].content, m[i + 1].content_len);
            }
            if (plain || v1) put_str(b, " ");
            put_marker(b, "[/INST]");
        } else if (!strcmp(m[i].role, "assistant")) {
            if (v1 || v7 || v3) put_str(b, " ");
            if (v3)
                put_trimmed(b, &m[i]);
            else
                put_text(b, m[i].content, m[i].content_len);
            int end = i + 1; /* (the later formats: a run of answers is one) */
            for (bool text = m[i].content_len;
                 later && end < n && !strcmp(m[end].role, "assistant"); end++) {
                if (!m[end].content_len) continue;
                if (text) put_str(b, "\n\n");
                put_text(b, m[end].content, m[end].content_len);
                text = true;
            }
            for (; i < end; i++)
                if (m[i].n_calls) mistral_calls(b, &m[i], f, false);
            i--;
            if (eos >= 0) put_id(b, eos);
        }
    }
}

/* DeepSeek-R1's distills (their template's): the last system message
 * first, then <｜User｜>{user} and <｜Assistant｜>{answer}EOS, an answer's
 * reasoning (up to its last </think>) left out, as the template does; then
 * <｜Assistant｜>. */
static void deepseek(builder *b, const chat_message *m, int n, cake_token eos) {
    for (int i = n - 1; i >= 0; i--)
        if (!strcmp(m[i].role, "system")) {
            put_text(b, m[i].content, m[i].content_len);
            break;
        }
    for (int i = 0; i < n; i++) {
        if (!strcmp(m[i].role, "user")) {
            put_special(b, "<｜User｜>");
            put_text(b, m[i].content, m[i].content_len);
        } else if (!strcmp(m[i].role, "assistant")) {
            const char *s = m[i].content;
            size_t len = m[i].content_len;
            after_reasoning(&s, &len);
            put_special(b, "<｜Assistant｜>");
            put_text(b, s, len);
            if (eos >= 0) put_id(b, eos);
        }
    }
    put_special(b, "<｜Assistant｜>");
}

int chat_prompt(chat_format f, const cake_tokenizer *t, const chat_message *m, int n,
                const chat_options *opt, cake_token **ids, int *n_ids, cake_token *end_of_turn,
                char *err, size_t errlen) {
    const chat_tools *tools = opt ? opt->tools : NULL;
    if (f == CHAT_NONE) return cake_err(err, errlen, "no chat format");
    const int with_tools = chat_calls(f) != NULL;
    for (int i = 0; i < n; i++) {
        if (!known_role(m[i].role))
            return cake_err(err, errlen,
                            "message %d: role '%.40s' is not system, user, assistant or tool", i,
                            m[i].role);
        if (!with_tools && (m[i].n_calls || !strcmp(m[i].role, "tool")))
            return cake_err(err, errlen,
                            "message %d: tool calls and results need a chat format with tools "
                            "(ChatML, Llama 3, Mistral v3, tekken, v7-tekken, v11 or v13), not "
                            "%s",
                            i, chat_format_name(f));
        if (f == CHAT_LLAMA3 && m[i].n_calls > 1)
            return cake_err(err, errlen, "message %d: Llama 3 takes one tool call a message", i);
        for (int k = 0; mistral_ids(f) && k < m[i].n_calls; k++)
            if (!m[i].calls[k].id)
                return cake_err(err, errlen,
                                "message %d: Mistral's tool calls need their 'id' (9 letters or "
                                "digits, or the last 9 of a longer one)",
                                i);
        if (mistral_ids(f) && !strcmp(m[i].role, "tool") && !m[i].call_id)
            return cake_err(err, errlen,
                            "message %d: Mistral's tool results need their call's "
                            "'tool_call_id'",
                            i);
    }
    if (tools && !with_tools)
        return cake_err(err, errlen,
                        "'tools' need a chat format with tools (ChatML, Llama 3, Mistral v3, "
                        "tekken, v7-tekken, v11 or v13), not %s",
                        chat_format_name(f));
    int has_user = 0;
    for (int i = 0; i < n; i++) has_user |= !strcmp(m[i].role, "user");
    if (tools && (f == CHAT_LLAMA3 || mistral_tools(f)) && !has_user)
        return cake_err(err, errlen, "%s lists the tools with a user message: there is none",
                        f == CHAT_LLAMA3 ? "Llama 3" : "Mistral");
    const cake_token bos = cake_tokenizer_bos(t);
    const cake_token eos = cake_tokenizer_eos(t);
    if (f == CHAT_LLAMA2 && bos < 0)
        return cake_err(err, errlen, "the vocabulary has no BOS token");
    if (f == CHAT_ZEPHYR && eos < 0)
        return cake_err(err, errlen, "the vocabulary has no EOS token");
    builder b = {.t = t, .err = err, .errlen = errlen};
    if (f != CHAT_LLAMA2 && cake_tokenizer_add_bos(t) && bos >= 0) put_id(&b, bos);
    *end_of_turn = -1;
    switch (f) {
    case CHAT_CHATML:
        chatml(&b, m, n, tools, opt ? opt->default_system : NULL, opt && opt->strip_reasoning);
        if (opt && opt->no_thinking && cake_tokenizer_find(t, "<think>", 7) >= 0)
            put_tagged(&b, "<think>\n\n</think>\n\n");
        else if (opt && opt->open_thinking)
            put_tagged(&b, "<think>\n");
        *end_of_turn = cake_tokenizer_find(t, "<|im_end|>", 10);
        break;
    case CHAT_DEEPSEEK:
        deepseek(&b, m, n, eos);
        if (opt && opt->open_thinking) put_tagged(&b, "<think>\n");
        break;
    case CHAT_LLAMA3:
        llama3(&b, m, n, tools, opt ? opt->date : NULL);
        *end_of_turn = cake_tokenizer_find(t, "<|eot_id|>", 10);
        break;
    case CHAT_LLAMA2: {
        /* Llama 2's own template: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user}
         * [/INST] {answer} </s><s>[INST] {user} [/INST] */
        const chat_message *sys = NULL;
        for (int i = 0; i < n; i++) {
            if (!strcmp(m[i].role, "system")) {
                sys = &m[i];
            } else if (!strcmp(m[i].role, "user")) {
                put_id(&b, bos);
                put_str(&b, "[INST] ");
                if (sys) {
                    put_str(&b, "<<SYS>>\n");
                    put_text(&b, sys->content, sys->content_len);
                    put_str(&b, "\n<</SYS>>\n\n");
                    sys = NULL;
                }
                put_trimmed(&b, &m[i]);
                put_str(&b, " [/INST]");
            } else {
                put_str(&b, " ");
                put_trimmed(&b, &m[i]);
                put_str(&b, " ");
                if (eos >= 0) put_id(&b, eos);
            }
        }
        break;
    }
    case CHAT_MISTRAL:
    case CHAT_MISTRAL_TEKKEN:
    case CHAT_MISTRAL_V7:
    case CHAT_MISTRAL_V3:
    case CHAT_MISTRAL_V7_TEKKEN:
    case CHAT_MISTRAL_V1:
    case CHAT_MISTRAL_V11:
    case CHAT_MISTRAL_V13:
        mistral(&b, m, n, f, tools, opt ? opt->default_system : NULL, eos);
        break;
    case CHAT_ZEPHYR:
        /* <|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n */
        for (int i = 0; i < n; i++) {
            put_str(&b, "<|");
            put_str(&b, m[i].role);
            put_str(&b, "|>\n");
            put_text(&b, m[i].content, m[i].content_len);
            put_id(&b, eos);
            put_str(&b, "\n");
        }
        put_str(&b, "<|assistant|>\n");
        break;
    case CHAT_PHI3:
        /* each message <|role|>\n{content}<|end|>\n, the tags as tokens */
        for (int i = 0; i < n; i++) {
            char tag[32];
            snprintf(tag, sizeof(tag), "<|%s|>", m[i].role);
            put_special(&b, tag);
            put_str(&b, "\n");
            put_text(&b, m[i].content, m[i].content_len);
            put_special(&b, "<|end|>");
            put_str(&b, "\n");
        }
        put_special(&b, "<|assistant|>");
        put_str(&b, "\n");
        *end_of_turn = cake_tokenizer_find(t, "<|end|>", 7);
        break;
    case CHAT_PHI4:
        /* ChatML with <|im_sep|> after the role and no newlines */
        for (int i = 0; i < n; i++) {
            put_special(&b, "<|im_start|>");
            put_str(&b, m[i].role);
            put_special(&b, "<|im_sep|>");
            put_text(&b, m[i].content, m[i].content_len);
            put_special(&b, "<|im_end|>");
        }
        put_special(&b, "<|im_start|>");
        put_str(&b, "assistant");
        put_special(&b, "<|im_sep|>");
        *end_of_turn = cake_tokenizer_find(t, "<|im_end|>", 10);
        break;
    case CHAT_GEMMA: {
        /* llama.cpp's: messages trimmed, "assistant" is "model", the system
         * message goes before the first user message's text */
        const chat_message *sys = NULL;
        for (int i = 0; i < n; i++) {
            if (!strcmp(m[i].role, "system")) {
                sys = &m[i];
                continue;
            }
            const bool model = !strcmp(m[i].role, "assistant");
            put_special(&b, "<start_of_turn>");
            put_str(&b, model ? "model\n" : "user\n");
            if (sys && !model) {
                put_text(&b, sys->content, sys->content_len); /* (not trimmed) */
                put_str(&b, "\n\n");
                sys = NULL;
            }
            put_trimmed(&b, &m[i]);
            put_special(&b, "<end_of_turn>");
            put_str(&b, "\n");
        }
        put_special(&b, "<start_of_turn>");
        put_str(&b, "model\n");
        *end_of_turn = cake_tokenizer_find(t, "<end_of_turn>", 13);
        break;
    }
    case CHAT_GRANITE:
        /* each message <|start_of_role|>role<|end_of_role|>{content}
         * <|end_of_text|>\n; the answer's header without the newline
         * llama.cpp's copy adds (Granite's own template has none) */
        for (int i = 0; i <= n; i++) {
            put_special(&b, "<|start_of_role|>");
            put_str(&b, i < n ? m[i].role : "assistant");
            put_special(&b, "<|end_of_role|>");
            if (i == n) break;
            put_text(&b, m[i].content, m[i].content_len);
            put_special(&b, "<|end_of_text|>");
            put_str(&b, "\n");
        }
        *end_of_turn = cake_tokenizer_find(t, "<|end_of_text|>", 15);
        break;
    case CHAT_NONE:
        break;
    }
    flush_text(&b);
    free(b.text);
    if (!b.failed && b.n == 0) b.failed = cake_err(err, errlen, "the chat prompt is empty");
    if (b.failed) {
        free(b.ids);
        return -1;
    }
    *ids = b.ids;
    *n_ids = b.n;
    return 0;
}
