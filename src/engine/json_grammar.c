#include "engine/json_grammar.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* What may come next. */
enum {
    M_START,        /* the answer's start: whitespace or '{' */
    M_VALUE,        /* a value (after ':', or after ',' in an array) */
    M_VALUE_OR_END, /* after '[': a value or ']' */
    M_KEY_OR_END,   /* after '{': a key or '}' */
    M_KEY,          /* after ',' in an object: a key */
    M_COLON,        /* after a key */
    M_AFTER,        /* after a value in a container: ',' or its close */
    M_STRING,
    M_ESCAPE,  /* after '\' in a string */
    M_UNICODE, /* in \uXXXX: aux hex digits read */
    M_LITERAL, /* in true, false or null: aux letters read */
    M_MINUS,   /* a number's '-': a digit must follow */
    M_ZERO,    /* a number's leading 0: no more integer digits */
    M_INT,
    M_DOT, /* a digit must follow */
    M_FRAC,
    M_EXP,      /* after e or E: a sign or a digit */
    M_EXP_SIGN, /* a digit must follow */
    M_EXP_DIGITS,
    M_DONE /* the object is closed */
};

void cake_json_start(cake_json_state *s) {
    memset(s, 0, sizeof(*s));
    s->mode = M_START;
}

bool cake_json_complete(const cake_json_state *s) {
    return s->mode == M_DONE;
}

static bool is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool is_digit(unsigned char c) {
    return c >= '0' && c <= '9';
}

/* A value ended: the container's next, or the end. */
static bool end_value(cake_json_state *s) {
    s->mode = s->depth ? M_AFTER : M_DONE;
    return true;
}

static bool push(cake_json_state *s, char c) {
    if (s->depth == CAKE_JSON_MAX_DEPTH) return false;
    s->stack[s->depth++] = c;
    s->mode = c == '{' ? M_KEY_OR_END : M_VALUE_OR_END;
    return true;
}

static bool pop(cake_json_state *s, char c) {
    if (!s->depth || s->stack[s->depth - 1] != (c == '}' ? '{' : '[')) return false;
    s->depth--;
    return end_value(s);
}

static bool begin_value(cake_json_state *s, unsigned char c) {
    switch (c) {
    case '{':
    case '[':
        return push(s, (char)c);
    case '"':
        s->in_key = 0, s->mode = M_STRING;
        return true;
    case '-':
        s->mode = M_MINUS;
        return true;
    case '0':
        s->mode = M_ZERO;
        return true;
    case 't':
        s->literal = "true";
        break;
    case 'f':
        s->literal = "false";
        break;
    case 'n':
        s->literal = "null";
        break;
    default:
        if (c < '1' || c > '9') return false;
        s->mode = M_INT;
        return true;
    }
    s->mode = M_LITERAL;
    s->aux = 1;
    return true;
}

static bool step(cake_json_state *s, unsigned char c);

/* A number ends at the first byte that cannot continue it, which is then
 * read as what follows the number. */
static bool end_number(cake_json_state *s, unsigned char c) {
    end_value(s);
    return step(s, c);
}

static bool step(cake_json_state *s, unsigned char c) {
    switch (s->mode) {
    case M_STRING:
        if (c == '"') {
            if (!s->in_key) return end_value(s);
            s->mode = M_COLON;
            return true;
        }
        if (c == '\\') s->mode = M_ESCAPE;
        return c >= 0x20; /* control characters must be escaped */
    case M_ESCAPE:
        if (c == 'u') {
            s->mode = M_UNICODE;
            s->aux = 0;
            return true;
        }
        s->mode = M_STRING;
        return c && strchr("\"\\/bfnrt", c);
    case M_UNICODE:
        if (!is_digit(c) && !((c | 0x20) >= 'a' && (c | 0x20) <= 'f')) return false;
        if (++s->aux == 4) s->mode = M_STRING;
        return true;
    case M_LITERAL:
        if (c != (unsigned char)s->literal[s->aux]) return false;
        if (!s->literal[++s->aux]) end_value(s);
        return true;
    case M_MINUS:
        if (!is_digit(c)) return false;
        s->mode = c == '0' ? M_ZERO : M_INT;
        return true;
    case M_INT:
        if (is_digit(c)) return true; /* else as after a 0: */
        /* fall through */
    case M_ZERO:
        if (c == '.')
            s->mode = M_DOT;
        else if (c == 'e' || c == 'E')
            s->mode = M_EXP;
        else
            return end_number(s, c);
        return true;
    case M_DOT:
        s->mode = M_FRAC;
        return is_digit(c);
    case M_FRAC:
        if (is_digit(c)) return true;
        if (c != 'e' && c != 'E') return end_number(s, c);
        s->mode = M_EXP;
        return true;
    case M_EXP:
        s->mode = c == '+' || c == '-' ? M_EXP_SIGN : M_EXP_DIGITS;
        return c == '+' || c == '-' || is_digit(c);
    case M_EXP_SIGN:
        s->mode = M_EXP_DIGITS;
        return is_digit(c);
    case M_EXP_DIGITS:
        return is_digit(c) || end_number(s, c);
    case M_DONE:
        return false; /* only the end may follow */
    default:
        break;
    }
    /* Between tokens of the JSON: whitespace, up to a point. */
    if (is_space(c)) return ++s->space <= CAKE_JSON_MAX_SPACE;
    s->space = 0;
    switch (s->mode) {
    case M_START:
        return c == '{' && push(s, '{');
    case M_VALUE:
        return begin_value(s, c);
    case M_VALUE_OR_END:
        return c == ']' ? pop(s, ']') : begin_value(s, c);
    case M_KEY_OR_END:
        if (c == '}') return pop(s, '}');
        /* fall through */
    case M_KEY:
        if (c != '"') return false;
        s->in_key = 1;
        s->mode = M_STRING;
        return true;
    case M_COLON:
        s->mode = M_VALUE;
        return c == ':';
    case M_AFTER:
        if (c == ',') {
            s->mode = s->stack[s->depth - 1] == '{' ? M_KEY : M_VALUE;
            return true;
        }
        return (c == '}' || c == ']') && pop(s, (char)c);
    default:
        return false;
    }
}

bool cake_json_feed(cake_json_state *s, const char *bytes, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!step(s, (unsigned char)bytes[i])) return false;
    return true;
}

struct cake_json_grammar {
    cake_json_state s;
    const cake_tokenizer *t;
    cake_token end, end2;
    /* Per token: its text can only be string content (bytes from 0x20 but
     * '"' and '\\'). Inside a string such a token is always allowed and
     * the string goes on: the mask need not read it (most of a vocabulary). */
    int n_vocab;
    uint8_t *plain;
};

cake_json_grammar *cake_json_grammar_new(const cake_tokenizer *t, cake_token end, cake_token end2) {
    cake_json_grammar *g = malloc(sizeof(*g));
    const int n = cake_tokenizer_n_vocab(t);
    uint8_t *plain = g ? malloc((size_t)n) : NULL;
    if (!plain) {
        free(g);
        return NULL;
    }
    for (int id = 0; id < n; id++) {
        size_t len;
        const unsigned char *text = (const unsigned char *)cake_token_text(t, id, &len);
        plain[id] = len > 0;
        for (size_t i = 0; i < len && plain[id]; i++)
            plain[id] = text[i] >= 0x20 && text[i] != '"' && text[i] != '\\';
    }
    cake_json_start(&g->s);
    g->t = t;
    g->end = end;
    g->end2 = end2;
    g->n_vocab = n;
    g->plain = plain;
    return g;
}

void cake_json_grammar_free(cake_json_grammar *g) {
    if (!g) return;
    free(g->plain);
    free(g);
}

static bool is_end(const cake_json_grammar *g, cake_token id) {
    return id >= 0 && (id == g->end || id == g->end2);
}

void cake_json_grammar_mask(void *ud, float *logits, int n_vocab) {
    const cake_json_grammar *g = ud;
    const bool complete = cake_json_complete(&g->s), in_string = g->s.mode == M_STRING;
    int allowed = 0;
    for (int id = 0; id < n_vocab; id++) {
        bool ok;
        if (is_end(g, id)) {
            ok = complete;
        } else if (complete) {
            ok = false;
        } else if (in_string && id < g->n_vocab && g->plain[id]) {
            ok = true;
        } else {
            size_t len;
            const char *text = cake_token_text(g->t, id, &len);
            cake_json_state s = g->s;
            ok = len > 0 && cake_json_feed(&s, text, len); /* (textless tokens never) */
        }
        if (ok)
            allowed++;
        else
            logits[id] = -INFINITY;
    }
    /* A vocabulary that cannot go on (no token has the byte the JSON needs):
     * the answer ends here rather than with a token that breaks it. */
    if (!allowed)
        for (int id = 0; id < n_vocab; id++)
            if (is_end(g, id)) logits[id] = 0.0f;
}

void cake_json_grammar_constrain(cake_json_grammar *g, cake_sampler_params *p) {
    p->constrain = cake_json_grammar_mask;
    p->accept = cake_json_grammar_accept;
    p->constrain_ud = g;
}

void cake_json_grammar_accept(void *ud, cake_token id) {
    cake_json_grammar *g = ud;
    if (is_end(g, id)) return;
    size_t len;
    const char *text = cake_token_text(g->t, id, &len);
    cake_json_state s = g->s;
    if (cake_json_feed(&s, text, len)) g->s = s; /* (the mask allowed no other) */
}
