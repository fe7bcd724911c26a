#include "engine/json_grammar.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* What may come next. */
enum {
    M_VALUE,        /* a value of s->node (at the start, after ':', after ',' in an array) */
    M_VALUE_OR_END, /* after '[': an item or ']' */
    M_KEY_OR_END,   /* after '{': a key or '}' */
    M_KEY,          /* after ',' in an object: a key */
    M_COLON,        /* after a key */
    M_AFTER,        /* after a value in a container: ',' or its close */
    M_STRING,
    M_ESCAPE,  /* after '\' in a string */
    M_UNICODE, /* in \uXXXX: hex digits read */
    M_MATCH,   /* in one of an enum's values: len bytes of names[lo..hi) matched */
    M_MINUS,   /* a number's '-': a digit must follow */
    M_ZERO,    /* a number's leading 0: no more integer digits */
    M_INT,
    M_DOT, /* a digit must follow */
    M_FRAC,
    M_EXP,      /* after e or E: a sign or a digit */
    M_EXP_SIGN, /* a digit must follow */
    M_EXP_DIGITS,
    M_DONE /* the value is whole */
};

/* The nodes a value of CAKE_JSON_ANY takes, by its first byte. */
static const char *const boolean_names[] = {"false", "true"}, *const null_names[] = {"null"};
const cake_json_node cake_json_any = {.kind = CAKE_JSON_ANY};
const cake_json_node cake_json_any_object = {.kind = CAKE_JSON_OBJECT, .more = &cake_json_any};
static const cake_json_node any_array = {
    .kind = CAKE_JSON_ARRAY, .more = &cake_json_any, .max = -1};
static const cake_json_node any_string = {.kind = CAKE_JSON_STRING, .max = -1};
static const cake_json_node any_number = {.kind = CAKE_JSON_NUMBER};
static const cake_json_node boolean = {.kind = CAKE_JSON_ENUM, .n = 2, .names = boolean_names};
static const cake_json_node null = {.kind = CAKE_JSON_ENUM, .n = 1, .names = null_names};

void cake_json_start(cake_json_state *s, const cake_json_node *root) {
    memset(s, 0, offsetof(cake_json_state, stack));
    s->mode = M_VALUE;
    s->root = root ? root : &cake_json_any_object;
    s->node = s->root->kind == CAKE_JSON_SEQUENCE ? s->root->sub[0] : s->root;
}

static bool is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool is_digit(unsigned char c) {
    return c >= '0' && c <= '9';
}

/* Narrows names[lo..hi), which share their first len bytes (sorted), to
 * those whose next byte is c. */
static void narrow(const char *const *names, int *lo, int *hi, int len, unsigned char c) {
    int i = *lo;
    while (i < *hi && (unsigned char)names[i][len] < c) i++;
    int j = i;
    while (j < *hi && (unsigned char)names[j][len] == c) j++;
    *lo = i;
    *hi = j;
}

bool cake_json_can_start(const cake_json_node *n, unsigned char c) {
    switch (n->kind) {
    case CAKE_JSON_ANY:
        return c && strchr("{[\"-0123456789tfn", c);
    case CAKE_JSON_OBJECT:
        return c == '{';
    case CAKE_JSON_ARRAY:
        return c == '[';
    case CAKE_JSON_STRING:
        return c == '"';
    case CAKE_JSON_NUMBER:
    case CAKE_JSON_INTEGER:
        return c == '-' || is_digit(c);
    case CAKE_JSON_ENUM: {
        int lo = 0, hi = n->n;
        if (c) narrow(n->names, &lo, &hi, 0, c);
        return c && lo < hi;
    }
    case CAKE_JSON_UNION:
        for (int i = 0; i < n->n; i++)
            if (cake_json_can_start(n->sub[i], c)) return true;
        return false;
    case CAKE_JSON_SEQUENCE:
        return cake_json_can_start(n->sub[0], c);
    }
    return false;
}

/* The node a value of n starting with c is read as (NULL: none). */
static const cake_json_node *value_node(const cake_json_node *n, unsigned char c) {
    if (n->kind == CAKE_JSON_UNION) {
        for (int i = 0; i < n->n; i++) /* (they differ in their first byte) */
            if (cake_json_can_start(n->sub[i], c)) return value_node(n->sub[i], c);
        return NULL;
    }
    if (n->kind != CAKE_JSON_ANY) return n;
    switch (c) {
    case '{':
        return &cake_json_any_object;
    case '[':
        return &any_array;
    case '"':
        return &any_string;
    case 't':
    case 'f':
        return &boolean;
    case 'n':
        return &null;
    default:
        return &any_number;
    }
}

/* Whether s reads a sequence's tag whose value picks what follows it. */
static bool in_tag(const cake_json_state *s) {
    const cake_json_node *part = s->root->kind == CAKE_JSON_SEQUENCE ? s->root->sub[s->part] : NULL;
    return part && part->kind == CAKE_JSON_ENUM && part->sub && s->node == part;
}

/* A value ended: the container's next, or the end. */
static bool end_value(cake_json_state *s) {
    s->mode = s->depth ? M_AFTER : M_DONE;
    if (s->mode == M_DONE && in_tag(s)) { /* (the value its tag names) */
        s->node = s->node->sub[s->lo];
        s->mode = M_VALUE;
    } else if (s->mode == M_DONE && s->root->kind == CAKE_JSON_SEQUENCE &&
               s->part + 1 < s->root->n) {
        s->node = s->root->sub[++s->part];
        s->mode = M_VALUE;
    }
    return true;
}

static cake_json_frame *top(cake_json_state *s) {
    return &s->stack[s->depth - 1];
}

/* An object's alternatives (one for a plain object): the names each
 * declares, requires, and which take other keys. */
static uint64_t all_alts(const cake_json_node *n) {
    const int k = n->choice ? n->choice->n : 1;
    return k == 64 ? ~0ull : (1ull << k) - 1;
}

static uint64_t declared_by(const cake_json_node *n, int name) {
    return n->choice ? n->choice->declared_by[name] : 1;
}

static uint64_t open_alts(const cake_json_node *n) {
    return n->choice ? n->choice->open : n->more != NULL;
}

/* The schema of names[name]'s value in the open object f: its own, or the
 * one alternative's left that declares it (NULL: not known yet). */
static const cake_json_node *value_of(const cake_json_frame *f, int name) {
    const cake_json_node *n = f->node;
    if (n->sub[name]) return n->sub[name];
    const uint64_t d = declared_by(n, name) & f->alive;
    if (!d || d & (d - 1)) return NULL; /* (none, or several) */
    return n->choice->alt_sub[name * n->choice->n + __builtin_ctzll(d)];
}

/* Whether the open object f can take names[name] as its next key. */
static bool key_takes(const cake_json_frame *f, int name) {
    return !(f->seen >> name & 1) && declared_by(f->node, name) & f->alive && value_of(f, name);
}

/* Whether the open object f can close: an alternative left has all it
 * requires. */
static bool closable(const cake_json_frame *f) {
    const cake_json_node *n = f->node;
    for (uint64_t a = f->alive; a; a &= a - 1) {
        const uint64_t req = n->choice ? n->choice->required[__builtin_ctzll(a)] : n->required;
        if ((f->seen & req) == req) return true;
    }
    return false;
}

/* A value of a choice's property that tells its alternatives apart: f's
 * alternatives narrow to those it fits (mask); false when none is left. */
static bool narrow_alive(cake_json_state *s, uint64_t mask) {
    cake_json_frame *f = top(s);
    f->alive &= mask;
    return f->alive != 0;
}

/* Whether an enum value in names[lo..hi) fits an alternative left. */
static bool enum_fits(const cake_json_state *s, int lo, int hi) {
    if (!s->node->alts) return true;
    for (int i = lo; i < hi; i++)
        if (s->node->alts[i] & s->stack[s->depth - 1].alive) return true;
    return false;
}

static bool push(cake_json_state *s, const cake_json_node *n) {
    if (s->depth == CAKE_JSON_MAX_DEPTH) return false;
    s->stack[s->depth++] = (cake_json_frame){n, 0, all_alts(n)};
    s->mode = n->kind == CAKE_JSON_OBJECT ? M_KEY_OR_END : M_VALUE_OR_END;
    return true;
}

static bool pop(cake_json_state *s, unsigned char c) {
    if (!s->depth) return false;
    const cake_json_frame *f = top(s);
    const cake_json_node *n = f->node;
    if (c == '}' ? n->kind != CAKE_JSON_OBJECT || !closable(f)
                 : n->kind != CAKE_JSON_ARRAY || f->seen < (uint64_t)n->min)
        return false;
    s->depth--;
    return end_value(s);
}

/* Whether the open object can take another key: other keys are allowed,
 * or a declared property is not given yet. */
static bool key_possible(const cake_json_frame *f) {
    if (open_alts(f->node) & f->alive) return true;
    for (int i = 0; i < f->node->n; i++)
        if (key_takes(f, i)) return true;
    return false;
}

static bool begin_key(cake_json_state *s) {
    if (!key_possible(top(s))) return false;
    s->in_key = 1;
    s->mode = M_STRING;
    s->len = 0;
    s->lo = 0;
    s->hi = top(s)->node->n;
    return true;
}

/* A byte of a key, as written: narrows the properties it can still name. */
static bool key_byte(cake_json_state *s, unsigned char c) {
    const cake_json_frame *f = top(s);
    const cake_json_node *n = f->node;
    narrow(n->names, &s->lo, &s->hi, s->len++, c);
    if (open_alts(n) & f->alive) return true; /* (a key no property has is one of the others) */
    for (int i = s->lo; i < s->hi; i++)
        if (key_takes(f, i)) return true;
    return false;
}

/* The key's closing quote: the property it names, or another key. */
static bool end_key(cake_json_state *s) {
    cake_json_frame *f = top(s);
    const cake_json_node *n = f->node;
    const int name = s->lo < s->hi && !n->names[s->lo][s->len] ? s->lo : -1;
    if (name >= 0 && declared_by(n, name) & f->alive) { /* a property */
        if (!key_takes(f, name)) return false;          /* (given already, or not known yet) */
        s->node = value_of(f, name);
        f->alive &= declared_by(n, name);
        f->seen |= 1ull << name;
    } else if (open_alts(n) & f->alive) { /* another key */
        f->alive &= open_alts(n);
        if (name >= 0) f->seen |= 1ull << name;
        s->node = n->more;
    } else {
        return false;
    }
    s->in_key = 0;
    s->mode = M_COLON;
    return true;
}

/* A bounded integer's magnitudes in [*a, *b] give values within its
 * bounds, for its sign; false when none does. */
static bool magnitudes(const cake_json_node *n, bool negative, uint64_t *a, uint64_t *b) {
    if (!negative) { /* 0 <= v */
        if (n->maximum < 0) return false;
        *a = n->minimum > 0 ? (uint64_t)n->minimum : 0;
        *b = (uint64_t)n->maximum;
        return *a <= *b;
    }
    if (n->minimum > -1) return false; /* v = -m, m >= 1 */
    *a = n->maximum < -1 ? (uint64_t)(-(n->maximum + 1)) + 1 : 1;
    *b = (uint64_t)(-(n->minimum + 1)) + 1;
    return *a <= *b;
}

/* Whether the integer read so far can still end within its node's bounds:
 * as it is, or with more digits (none after a leading 0). */
static bool integer_reachable(const cake_json_state *s, bool more_digits) {
    uint64_t a, b, m = s->magnitude;
    if (!magnitudes(s->node, s->negative, &a, &b)) return false;
    for (uint64_t p = 1;; p *= 10) { /* m followed by k digits: [m p, m p + p - 1], p = 10^k */
        if (m > b / p) return false;
        if (m * p + (p - 1) >= a) return true;
        if (!more_digits || p > UINT64_MAX / 10) return false;
    }
}

/* A digit of an integer: the magnitude goes on, within the bounds. */
static bool integer_digit(cake_json_state *s, unsigned char c, bool more_digits) {
    if (!s->node->bounded || s->node->kind != CAKE_JSON_INTEGER) return true;
    const uint64_t d = (uint64_t)(c - '0');
    s->magnitude = s->magnitude > (UINT64_MAX - d) / 10 ? UINT64_MAX : s->magnitude * 10 + d;
    return integer_reachable(s, more_digits);
}

/* A bounded integer is whole: it must be within them. */
static bool integer_within(const cake_json_state *s) {
    uint64_t a, b;
    if (!s->node->bounded || s->node->kind != CAKE_JSON_INTEGER) return true;
    return magnitudes(s->node, s->negative, &a, &b) && s->magnitude >= a && s->magnitude <= b;
}

static bool begin_value(cake_json_state *s, unsigned char c) {
    if (s->node->kind == CAKE_JSON_UNION && s->node->alts) /* (its branch narrows the object's) */
        for (int i = 0; i < s->node->n; i++)
            if (cake_json_can_start(s->node->sub[i], c) && !narrow_alive(s, s->node->alts[i]))
                return false;
    const cake_json_node *n = value_node(s->node, c);
    if (!n) return false;
    s->node = n;
    switch (n->kind) {
    case CAKE_JSON_OBJECT:
        return c == '{' && push(s, n);
    case CAKE_JSON_ARRAY:
        return c == '[' && push(s, n);
    case CAKE_JSON_STRING:
        s->in_key = 0, s->len = 0, s->mode = M_STRING;
        return c == '"';
    case CAKE_JSON_NUMBER:
    case CAKE_JSON_INTEGER:
        s->mode = c == '-' ? M_MINUS : c == '0' ? M_ZERO : M_INT;
        s->negative = c == '-';
        s->magnitude = 0;
        if (c == '-') /* (a bounded integer: some negative value must be within) */
            return !n->bounded || n->kind != CAKE_JSON_INTEGER || n->minimum < 0;
        return is_digit(c) && integer_digit(s, c, c != '0');
    case CAKE_JSON_ENUM:
        s->lo = 0, s->hi = n->n, s->len = 1, s->mode = M_MATCH;
        narrow(n->names, &s->lo, &s->hi, 0, c);
        return c && s->lo < s->hi && enum_fits(s, s->lo, s->hi);
    default:
        return false;
    }
}

/* A byte of a string's UTF-8: false when it cannot go on valid (RFC 3629:
 * no overlong forms, no surrogates, nothing past U+10FFFF). */
static bool utf8_byte(cake_json_state *s, unsigned char c) {
    if (s->utf8_need) {
        if (c < s->utf8_lo || c > s->utf8_hi) return false;
        s->utf8_need--;
        s->utf8_lo = 0x80, s->utf8_hi = 0xbf;
        return true;
    }
    if (c < 0x80) return true;
    if (c < 0xc2 || c > 0xf4) return false;
    s->utf8_need = c < 0xe0 ? 1 : c < 0xf0 ? 2 : 3;
    s->utf8_lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
    s->utf8_hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
    return true;
}

/* Another item of the open array f: its schema (a tuple's own for its
 * first items, then `more`), unless the array is full. */
static bool next_item(cake_json_state *s, cake_json_frame *f) {
    const cake_json_node *a = f->node;
    if (a->max >= 0 && f->seen >= (uint64_t)a->max) return false;
    s->node = f->seen < (uint64_t)a->n ? a->sub[f->seen] : a->more;
    f->seen++;
    return s->node != NULL;
}

static bool step(cake_json_state *s, unsigned char c);

/* A number or an enum's value ends at the first byte that cannot continue
 * it, which is then read as what follows it. */
static bool end_then(cake_json_state *s, unsigned char c) {
    end_value(s);
    return step(s, c);
}

/* An enum value's bytes so far are one of its values. */
static bool match_whole(const cake_json_state *s) {
    return s->lo < s->hi && !s->node->names[s->lo][s->len];
}

static bool step(cake_json_state *s, unsigned char c) {
    switch (s->mode) {
    case M_STRING: {
        const bool starts = !s->utf8_need; /* c begins a character */
        if (starts && c == '"') {
            if (s->in_key) return end_key(s);
            return s->len >= s->node->min && end_value(s);
        }
        /* control characters must be escaped */
        if (c < 0x20 || !utf8_byte(s, c)) return false;
        if (starts && c == '\\') s->mode = M_ESCAPE;
        if (s->in_key) return key_byte(s, c);
        if (!starts) return true;
        return s->len++ < s->node->max || s->node->max < 0;
    }
    case M_ESCAPE:
        if (s->in_key && !key_byte(s, c)) return false;
        if (c == 'u') {
            s->mode = M_UNICODE;
            s->hex = 0;
            return true;
        }
        s->mode = M_STRING;
        return c && strchr("\"\\/bfnrt", c);
    case M_UNICODE:
        if (s->in_key && !key_byte(s, c)) return false;
        if (!is_digit(c) && !((c | 0x20) >= 'a' && (c | 0x20) <= 'f')) return false;
        if (++s->hex == 4) s->mode = M_STRING;
        return true;
    case M_MATCH: {
        int lo = s->lo, hi = s->hi;
        if (c) narrow(s->node->names, &lo, &hi, s->len, c);
        if (c && lo < hi && enum_fits(s, lo, hi)) {
            s->lo = lo, s->hi = hi, s->len++;
            return true;
        }
        if (!match_whole(s)) return false;
        if (s->node->alts && !narrow_alive(s, s->node->alts[s->lo])) return false;
        return end_then(s, c);
    }
    case M_MINUS:
        if (!is_digit(c)) return false;
        s->mode = c == '0' ? M_ZERO : M_INT;
        return integer_digit(s, c, c != '0');
    case M_INT:
        if (is_digit(c)) return integer_digit(s, c, true); /* else as after a 0: */
        /* fall through */
    case M_ZERO:
        if (s->node->kind == CAKE_JSON_INTEGER) return integer_within(s) && end_then(s, c);
        if (c == '.')
            s->mode = M_DOT;
        else if (c == 'e' || c == 'E')
            s->mode = M_EXP;
        else
            return end_then(s, c);
        return true;
    case M_DOT:
        s->mode = M_FRAC;
        return is_digit(c);
    case M_FRAC:
        if (is_digit(c)) return true;
        if (c != 'e' && c != 'E') return end_then(s, c);
        s->mode = M_EXP;
        return true;
    case M_EXP:
        s->mode = c == '+' || c == '-' ? M_EXP_SIGN : M_EXP_DIGITS;
        return c == '+' || c == '-' || is_digit(c);
    case M_EXP_SIGN:
        s->mode = M_EXP_DIGITS;
        return is_digit(c);
    case M_EXP_DIGITS:
        return is_digit(c) || end_then(s, c);
    case M_DONE:
        return false; /* only the end may follow */
    default:
        break;
    }
    /* Between tokens of the JSON: whitespace, up to a point. */
    if (is_space(c)) return ++s->space <= CAKE_JSON_MAX_SPACE;
    s->space = 0;
    cake_json_frame *f = s->depth ? top(s) : NULL;
    switch (s->mode) {
    case M_VALUE:
        return begin_value(s, c);
    case M_VALUE_OR_END:
        if (c == ']') return pop(s, c);
        return next_item(s, f) && begin_value(s, c);
    case M_KEY_OR_END:
        if (c == '}') return pop(s, c);
        /* fall through */
    case M_KEY:
        return c == '"' && begin_key(s);
    case M_COLON:
        s->mode = M_VALUE;
        return c == ':';
    case M_AFTER:
        if (c != ',') return (c == '}' || c == ']') && pop(s, c);
        if (f->node->kind == CAKE_JSON_OBJECT) {
            s->mode = M_KEY;
            return key_possible(f);
        }
        s->mode = M_VALUE;
        return next_item(s, f);
    default:
        return false;
    }
}

bool cake_json_complete(const cake_json_state *s) {
    if (s->mode == M_DONE) return true;
    if (s->depth || (s->root->kind == CAKE_JSON_SEQUENCE && s->part + 1 < s->root->n)) return false;
    switch (s->mode) { /* a number or enum value at the root ends with the answer */
    case M_ZERO:
    case M_INT:
        return integer_within(s);
    case M_FRAC:
    case M_EXP_DIGITS:
        return true;
    case M_MATCH:
        return match_whole(s) && !in_tag(s);
    default:
        return false;
    }
}

/* *dst = *src, but for the frames not in use. */
static void copy_state(cake_json_state *dst, const cake_json_state *src) {
    memcpy(dst, src,
           offsetof(cake_json_state, stack) + (size_t)src->depth * sizeof(cake_json_frame));
}

bool cake_json_feed(cake_json_state *s, const char *bytes, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!step(s, (unsigned char)bytes[i])) return false;
    return true;
}

/* A vocabulary's token texts in byte order: the mask walks them as a trie
 * (a prefix read once for all the tokens that share it; a prefix the JSON
 * cannot take rules out every token after it that shares it, unread). */
struct cake_json_vocab {
    const cake_tokenizer *t;
    int n;
    /* Per token: its text can only be string content (bytes from 0x20 but
     * '"' and '\\', whole UTF-8 characters). Inside a string, between
     * characters, such a token is always allowed and the string goes on:
     * the mask need not read it (most of a vocabulary). */
    uint8_t *plain;
    cake_token *sorted; /* the tokens with text, by text */
    int *shared;        /* bytes sorted[i]'s text shares with sorted[i - 1]'s */
    int n_sorted;
    size_t longest; /* bytes of the longest text */
    /* control tokens read as their kept_text */
    cake_token kept[CAKE_JSON_MAX_KEPT];
    const char *kept_text[CAKE_JSON_MAX_KEPT];
    int n_kept;
};

/* A token's text as the grammar reads it. */
static const char *vocab_text(const cake_json_vocab *v, cake_token id, size_t *len) {
    for (int k = 0; k < v->n_kept; k++)
        if (id == v->kept[k]) {
            *len = strlen(v->kept_text[k]);
            return v->kept_text[k];
        }
    return cake_token_text(v->t, id, len);
}

typedef struct {
    const char *text;
    size_t len;
    cake_token id;
} token_text;

static int by_bytes(const void *a, const void *b) {
    const token_text *x = a, *y = b;
    const int c = memcmp(x->text, y->text, x->len < y->len ? x->len : y->len);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

cake_json_vocab *cake_json_vocab_new(const cake_tokenizer *t) {
    return cake_json_vocab_new_keeping(t, NULL, NULL, 0);
}

cake_json_vocab *cake_json_vocab_new_keeping(const cake_tokenizer *t, const cake_token *kept,
                                             const char *const *kept_text, int n_kept) {
    if (n_kept > CAKE_JSON_MAX_KEPT) return NULL;
    const int n = cake_tokenizer_n_vocab(t);
    cake_json_vocab *v = calloc(1, sizeof(*v));
    token_text *all = malloc((size_t)n * sizeof(*all));
    if (v) {
        v->plain = malloc((size_t)n);
        v->sorted = malloc((size_t)n * sizeof(*v->sorted));
        v->shared = malloc((size_t)n * sizeof(*v->shared));
    }
    if (!v || !all || !v->plain || !v->sorted || !v->shared) {
        free(all);
        cake_json_vocab_free(v);
        return NULL;
    }
    v->t = t;
    v->n = n;
    for (int k = 0; k < n_kept; k++) {
        v->kept[k] = kept[k];
        v->kept_text[k] = kept_text[k];
    }
    v->n_kept = n_kept;
    int k = 0;
    for (int id = 0; id < n; id++) {
        size_t len;
        const unsigned char *text = (const unsigned char *)vocab_text(v, id, &len);
        cake_json_state s = {.mode = M_STRING, .node = &any_string};
        v->plain[id] = len > 0;
        for (size_t i = 0; i < len && v->plain[id]; i++)
            v->plain[id] = text[i] != '"' && text[i] != '\\' && step(&s, text[i]);
        v->plain[id] = v->plain[id] && !s.utf8_need;
        if (len) all[k++] = (token_text){(const char *)text, len, id};
        if (len > v->longest) v->longest = len;
    }
    qsort(all, (size_t)k, sizeof(*all), by_bytes);
    for (int i = 0; i < k; i++) {
        size_t same = 0;
        while (i && same < all[i].len && same < all[i - 1].len &&
               all[i].text[same] == all[i - 1].text[same])
            same++;
        v->sorted[i] = all[i].id;
        v->shared[i] = (int)same;
    }
    v->n_sorted = k;
    free(all);
    return v;
}

void cake_json_vocab_free(cake_json_vocab *v) {
    if (!v) return;
    free(v->plain);
    free(v->sorted);
    free(v->shared);
    free(v);
}

struct cake_json_grammar {
    cake_json_state s;
    const cake_json_vocab *v;
    cake_token end, end2;
    uint8_t *ok;            /* the mask's verdict per token */
    cake_json_state *after; /* after[d]: the state after d bytes of a token */
    /* Lazy (cake_json_grammar_new_lazy): the trigger, whether the grammar
     * holds now, and the free text's last bytes (a trigger may span tokens). */
    const cake_json_node *root;
    const char *trigger; /* NULL: not lazy */
    bool active, free_for_good;
    cake_token *cands; /* the tokens with the trigger's last byte ('{' for "") */
    int n_cands;
    char tail[32];
    size_t tail_len;
};

cake_json_grammar *cake_json_grammar_new(const cake_json_vocab *v, const cake_json_node *root,
                                         cake_token end, cake_token end2) {
    cake_json_grammar *g = calloc(1, sizeof(*g));
    if (!g || !(g->ok = malloc((size_t)v->n)) ||
        !(g->after = malloc((v->longest + 1) * sizeof(*g->after)))) {
        cake_json_grammar_free(g);
        return NULL;
    }
    cake_json_start(&g->s, root);
    g->v = v;
    g->end = end;
    g->end2 = end2;
    return g;
}

cake_json_grammar *cake_json_grammar_new_lazy(const cake_json_vocab *v, const cake_json_node *root,
                                              const char *trigger, cake_token end,
                                              cake_token end2) {
    cake_json_grammar *g = cake_json_grammar_new(v, root, end, end2);
    if (!g || !(g->cands = malloc((size_t)v->n * sizeof(*g->cands)))) {
        cake_json_grammar_free(g);
        return NULL;
    }
    g->root = root, g->trigger = trigger;
    const char last = trigger[0] ? trigger[strlen(trigger) - 1] : '{';
    for (int id = 0; id < v->n; id++) {
        size_t len;
        const char *text = vocab_text(v, id, &len);
        if (len && memchr(text, last, len)) g->cands[g->n_cands++] = id;
    }
    return g;
}

void cake_json_grammar_free(cake_json_grammar *g) {
    if (!g) return;
    free(g->ok);
    free(g->after);
    free(g->cands);
    free(g);
}

static bool is_end(const cake_json_grammar *g, cake_token id) {
    return id >= 0 && (id == g->end || id == g->end2);
}

/* ok[id] for every token with text: whether the state takes its text. The
 * tokens in byte order; after[d] holds the state after the first d bytes
 * of the current one, `valid` of them still those of its prefix; a token
 * sharing more than `dead` bytes with the last one read shares a prefix the
 * state did not take. */
static void read_tokens(cake_json_grammar *g) {
    const cake_json_vocab *v = g->v;
    copy_state(&g->after[0], &g->s);
    size_t valid = 0, dead = SIZE_MAX;
    for (int i = 0; i < v->n_sorted; i++) {
        const cake_token id = v->sorted[i];
        const size_t shared = (size_t)v->shared[i];
        if (shared > dead) {
            g->ok[id] = 0;
            continue;
        }
        dead = SIZE_MAX;
        size_t len;
        const char *text = vocab_text(v, id, &len);
        size_t d = valid < shared ? valid : shared;
        for (; d < len; d++) {
            copy_state(&g->after[d + 1], &g->after[d]);
            if (!step(&g->after[d + 1], (unsigned char)text[d])) {
                dead = d;
                break;
            }
        }
        g->ok[id] = d == len;
        valid = d;
    }
}

/* Free text before a trigger: where the tail and then text complete it
 * (the first time), how many bytes of text are left after it; -1 when they
 * do not. For trigger "": the bytes from text's '{' when the answer has
 * been white space so far and text's first other byte is '{'. */
static long after_trigger(const cake_json_grammar *g, const char *text, size_t len) {
    if (!g->trigger[0]) {
        size_t i = 0;
        while (i < len && is_space((unsigned char)text[i])) i++;
        return i < len && text[i] == '{' ? (long)(len - i) : -1;
    }
    const size_t tl = strlen(g->trigger), seen = len < 256 ? len : 256; /* (its first bytes) */
    char joined[sizeof(g->tail) + 256];
    memcpy(joined, g->tail, g->tail_len);
    memcpy(joined + g->tail_len, text, seen);
    const char *hit = memmem(joined, g->tail_len + seen, g->trigger, tl);
    if (!hit || (size_t)(hit - joined) + tl <= g->tail_len) return -1;
    return (long)(len - ((size_t)(hit - joined) + tl - g->tail_len));
}

/* The mask of a lazy grammar while it does not hold: any token, but one
 * that completes the trigger (one of those with its last byte) must go on
 * as root's value may. */
static void free_mask(const cake_json_grammar *g, float *logits, int n_vocab) {
    for (int i = 0; i < g->n_cands && !g->free_for_good; i++) {
        const cake_token id = g->cands[i];
        size_t len;
        const char *text = vocab_text(g->v, id, &len);
        const long rest = after_trigger(g, text, len);
        cake_json_state s;
        cake_json_start(&s, g->root);
        if (rest >= 0 && id < n_vocab && !is_end(g, id) &&
            !cake_json_feed(&s, text + len - (size_t)rest, (size_t)rest))
            logits[id] = -INFINITY;
    }
}

void cake_json_grammar_mask(void *ud, float *logits, int n_vocab) {
    cake_json_grammar *g = ud;
    if (g->trigger && !g->active) {
        free_mask(g, logits, n_vocab);
        return;
    }
    const cake_json_vocab *v = g->v;
    const cake_json_state *now = &g->s;
    const bool complete = cake_json_complete(now), done = now->mode == M_DONE;
    /* Between characters of a string that any text continues (a value's
     * without a length cap, or a key that no declared property's name
     * begins) */
    const bool open_string = now->mode == M_STRING && !now->utf8_need &&
                             (now->in_key ? now->lo >= now->hi : now->node->max < 0);
    if (done) {
        memset(g->ok, 0, (size_t)v->n);
    } else if (open_string) { /* most tokens are plain: no trie walk */
        cake_json_state s;
        for (int id = 0; id < v->n; id++) {
            size_t len;
            const char *text = v->plain[id] ? NULL : vocab_text(v, id, &len);
            if (text) copy_state(&s, now);
            g->ok[id] = v->plain[id] || (len > 0 && cake_json_feed(&s, text, len));
        }
    } else {
        memset(g->ok, 0, (size_t)v->n); /* (textless tokens never) */
        read_tokens(g);
    }
    int allowed = 0;
    for (int id = 0; id < n_vocab; id++) {
        const bool ok = is_end(g, id) ? complete : id < v->n && g->ok[id];
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
    const char *text = vocab_text(g->v, id, &len);
    if (g->trigger && !g->active) { /* free text: does it start the value? */
        const long rest = g->free_for_good ? -1 : after_trigger(g, text, len);
        if (rest < 0) {
            size_t i = 0; /* (trigger "": the answer began otherwise) */
            while (i < len && is_space((unsigned char)text[i])) i++;
            if (!g->trigger[0] && i < len) g->free_for_good = true;
            for (size_t k = 0; k < len; k++) { /* the last bytes */
                if (g->tail_len == sizeof(g->tail)) memmove(g->tail, g->tail + 1, --g->tail_len);
                g->tail[g->tail_len++] = text[k];
            }
            return;
        }
        cake_json_start(&g->s, g->root);
        g->active = true;
        g->tail_len = 0;
        text += len - (size_t)rest;
        len = (size_t)rest;
    }
    cake_json_state s;
    copy_state(&s, &g->s);
    if (cake_json_feed(&s, text, len)) copy_state(&g->s, &s); /* (the mask allowed no other) */
    /* a tagged value closed: free text again (a whole-answer one ends it) */
    if (g->trigger && g->trigger[0] && cake_json_complete(&g->s)) g->active = false;
}
