#include "server/chat.h"

#include <stdlib.h>
#include <string.h>

#include "util/err.h"

chat_format chat_detect(const char *tmpl, const cake_tokenizer *t) {
    if (tmpl) {
        if (strstr(tmpl, "<|im_start|>")) return CHAT_CHATML;
        if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|end_header_id|>"))
            return CHAT_LLAMA3;
        if (strstr(tmpl, "[INST]")) return strstr(tmpl, "<<SYS>>") ? CHAT_LLAMA2 : CHAT_MISTRAL;
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

const char *chat_format_name(chat_format f) {
    static const char *names[] = {"none", "chatml", "llama3", "llama2", "mistral", "zephyr"};
    return names[f];
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

/* A message's text with leading and trailing white space removed, as the
 * Llama templates do ({{ message['content'] | trim }}). */
static void put_trimmed(builder *b, const chat_message *m) {
    const char *s = m->content;
    size_t len = m->content_len;
    while (len && strchr(" \t\r\n", s[0])) s++, len--;
    while (len && strchr(" \t\r\n", s[len - 1])) len--;
    put_text(b, s, len);
}

static int known_role(const char *r) {
    return !strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant");
}

int chat_prompt(chat_format f, const cake_tokenizer *t, const chat_message *m, int n,
                cake_token **ids, int *n_ids, cake_token *end_of_turn, char *err, size_t errlen) {
    if (f == CHAT_NONE) return cake_err(err, errlen, "no chat format");
    for (int i = 0; i < n; i++)
        if (!known_role(m[i].role))
            return cake_err(err, errlen,
                            "message %d: role '%.40s' is not system, user or assistant", i,
                            m[i].role);
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
        for (int i = 0; i < n; i++) {
            put_special(&b, "<|im_start|>");
            put_str(&b, m[i].role);
            put_str(&b, "\n");
            put_text(&b, m[i].content, m[i].content_len);
            put_special(&b, "<|im_end|>");
            put_str(&b, "\n");
        }
        put_special(&b, "<|im_start|>");
        put_str(&b, "assistant\n");
        *end_of_turn = cake_tokenizer_find(t, "<|im_end|>", 10);
        break;
    case CHAT_LLAMA3:
        for (int i = 0; i < n; i++) {
            put_special(&b, "<|start_header_id|>");
            put_str(&b, m[i].role);
            put_special(&b, "<|end_header_id|>");
            put_str(&b, "\n\n");
            put_trimmed(&b, &m[i]);
            put_special(&b, "<|eot_id|>");
        }
        put_special(&b, "<|start_header_id|>");
        put_str(&b, "assistant");
        put_special(&b, "<|end_header_id|>");
        put_str(&b, "\n\n");
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
    case CHAT_MISTRAL: {
        /* Mistral Instruct's: <s>[INST] {system}\n\n{user} [/INST]{answer}</s>[INST] ... */
        const chat_message *sys = NULL;
        for (int i = 0; i < n; i++) {
            if (!strcmp(m[i].role, "system")) {
                sys = &m[i];
            } else if (!strcmp(m[i].role, "user")) {
                put_str(&b, "[INST] ");
                if (sys) {
                    put_text(&b, sys->content, sys->content_len);
                    put_str(&b, "\n\n");
                    sys = NULL;
                }
                put_trimmed(&b, &m[i]);
                put_str(&b, " [/INST]");
            } else {
                put_trimmed(&b, &m[i]);
                if (eos >= 0) put_id(&b, eos);
            }
        }
        break;
    }
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
