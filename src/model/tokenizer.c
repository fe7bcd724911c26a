/* SentencePiece BPE tokenizer for GGUF vocabularies with tokenizer.ggml.model =
 * "llama", ported from llama.cpp's llm_tokenizer_spm so that both engines give
 * the same ids for the same text (llama.cpp's own test vectors are our tests).
 *
 * How llama.cpp tokenizes (and so do we), for a text without special-token
 * parsing:
 *   1. An empty text gives no ids (only BOS when asked).
 *   2. Otherwise one space is prepended (tokenizer.ggml.add_space_prefix, true
 *      by default) and every ' ' (0x20 only) becomes U+2581 "▁".
 *   3. The text is cut into symbols of one UTF-8 character each. The length
 *      comes from the lead byte's high nibble alone (0xC/0xD: 2, 0xE: 3, 0xF: 4,
 *      anything else 1), clamped at the end of the text; continuation bytes are
 *      not checked. Invalid UTF-8 therefore never reads out of bounds, it just
 *      makes odd symbols that end up as byte tokens.
 *   4. Every adjacent pair whose concatenation is a vocabulary entry goes into
 *      a max-heap keyed by that entry's score (ties: leftmost first). The best
 *      pair is merged, stale entries are skipped (a side was merged away or
 *      grew), and the new neighbours are pushed, until the heap is empty.
 *   5. Each final symbol is emitted as its id when it is in the vocabulary,
 *      else byte by byte as <0xNN> tokens (byte fallback), else as unk.
 *      (llama.cpp's resegment() also consults a "rev_merge" map, but only for
 *      symbols that are not vocabulary entries; merged symbols always are, so
 *      that branch only ever sees single characters, which are never in it.)
 *
 * Lookups go through an open-addressing hash of the token texts, so tokenizing
 * is O(n log n) in the text length. */
#include "model/tokenizer.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"

struct cake_tokenizer {
    int32_t n_vocab;
    char *text;        /* token texts back to back, as in the vocabulary */
    size_t *text_off;  /* [n_vocab + 1]: token i is text[text_off[i], text_off[i+1]) */
    char *piece;       /* printable pieces back to back (see token_piece()) */
    size_t *piece_off; /* [n_vocab + 1] */
    float *scores;     /* [n_vocab] merge priority: higher merges first */
    int32_t *types;    /* [n_vocab] enum cake_token_type (unknown values -> UNDEFINED) */
    int32_t *hash;     /* [hash_mask + 1] token id + 1, 0 = empty slot; linear probing */
    uint32_t hash_mask;
    size_t max_token_len;     /* longest token text: longer pairs need no lookup */
    cake_token byte_tok[256]; /* id of byte b for byte fallback, -1 if none */
    cake_token bos, eos, unk; /* -1: none */
    bool add_bos, add_space_prefix;
};

/* ---- vocabulary hash ---- */

static uint32_t hash_bytes(const char *p, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 16777619u;
    }
    return h;
}

/* Token id whose text is exactly p[0..n), or -1. */
static cake_token tok_lookup(const cake_tokenizer *t, const char *p, size_t n) {
    for (uint32_t h = hash_bytes(p, n) & t->hash_mask;; h = (h + 1) & t->hash_mask) {
        int32_t v = t->hash[h];
        if (v == 0) return -1;
        cake_token id = v - 1;
        size_t len = t->text_off[id + 1] - t->text_off[id];
        if (len == n && memcmp(t->text + t->text_off[id], p, n) == 0) return id;
    }
}

/* ---- construction ---- */

static size_t hex_digit(char c) {
    if (c >= '0' && c <= '9') return (size_t)(c - '0');
    if (c >= 'A' && c <= 'F') return (size_t)(c - 'A' + 10);
    if (c >= 'a' && c <= 'f') return (size_t)(c - 'a' + 10);
    return 16;
}

/* What token_to_piece prints for a token, as llama.cpp's token_to_piece with
 * special = false: NORMAL tokens with "▁" turned into ' ', BYTE tokens <0xNN>
 * as the raw byte, USER_DEFINED tokens verbatim, and nothing for CONTROL,
 * UNKNOWN, UNUSED and UNDEFINED tokens. Writes into dst (room for n bytes) and
 * returns the length. */
static size_t token_piece(int32_t type, const char *s, size_t n, char *dst) {
    switch (type) {
    case CAKE_TOKEN_NORMAL: {
        size_t k = 0;
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
                dst[k++] = ' ';
                i += 3;
            } else {
                dst[k++] = s[i++];
            }
        }
        return k;
    }
    case CAKE_TOKEN_BYTE:
        /* llama.cpp reads the two hex digits of "<0xNN>"; a byte token spelled
         * any other way (never seen in practice) prints its text. */
        if (n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' && hex_digit(s[3]) < 16 &&
            hex_digit(s[4]) < 16) {
            dst[0] = (char)(hex_digit(s[3]) * 16 + hex_digit(s[4]));
            return 1;
        }
        memcpy(dst, s, n);
        return n;
    case CAKE_TOKEN_USER_DEFINED:
        memcpy(dst, s, n);
        return n;
    default:
        return 0;
    }
}

/* Builds the tokenizer from token texts (views, not NUL-terminated), optional
 * scores and types (NULL: 0 and NORMAL), and special ids (-1: none). Names the
 * GGUF key in errors because that is where the arrays come from. */
static int tok_build(int32_t n, const cake_gguf_str *strs, const float *scores,
                     const int32_t *types, cake_token bos, cake_token eos, cake_token unk,
                     bool add_bos, bool add_space_prefix, cake_tokenizer **out, char *err,
                     size_t errlen) {
    *out = NULL;
    if (n <= 0) return cake_err(err, errlen, "tokenizer.ggml.tokens: empty vocabulary");
    if (n > (1 << 28)) /* keeps the hash size in range; real vocabularies are < 1M */
        return cake_err(err, errlen, "tokenizer.ggml.tokens: %d tokens is too many", n);
    const struct {
        const char *key;
        cake_token id;
    } ids[] = {{"tokenizer.ggml.bos_token_id", bos},
               {"tokenizer.ggml.eos_token_id", eos},
               {"tokenizer.ggml.unknown_token_id", unk}};
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++)
        if (ids[i].id < -1 || ids[i].id >= n)
            return cake_err(err, errlen, "%s = %d is out of range (vocabulary has %d tokens)",
                            ids[i].key, ids[i].id, n);

    cake_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) return cake_err(err, errlen, "out of memory building the tokenizer");
    t->n_vocab = n;
    t->bos = bos;
    t->eos = eos;
    t->unk = unk;
    t->add_bos = add_bos;
    t->add_space_prefix = add_space_prefix;

    /* llama.cpp renames empty tokens to "[EMPTY_<id>]"; do the same so that
     * lookups and duplicate detection agree with it. */
    char empty_name[32];
    size_t total = 0;
    for (int32_t i = 0; i < n; i++)
        total += strs[i].len ? strs[i].len
                             : (size_t)snprintf(empty_name, sizeof(empty_name), "[EMPTY_%d]", i);

    uint32_t cap = 1;
    while (cap < 2u * (uint32_t)n) cap <<= 1;
    t->hash_mask = cap - 1;
    t->text = malloc(total ? total : 1);
    t->piece = malloc(total ? total : 1); /* a piece is never longer than its text */
    t->text_off = malloc(((size_t)n + 1) * sizeof(*t->text_off));
    t->piece_off = malloc(((size_t)n + 1) * sizeof(*t->piece_off));
    t->scores = malloc((size_t)n * sizeof(*t->scores));
    t->types = malloc((size_t)n * sizeof(*t->types));
    t->hash = calloc(cap, sizeof(*t->hash));
    if (!t->text || !t->piece || !t->text_off || !t->piece_off || !t->scores || !t->types ||
        !t->hash) {
        cake_tokenizer_free(t);
        return cake_err(err, errlen, "out of memory building the tokenizer (%d tokens)", n);
    }

    size_t off = 0, poff = 0;
    for (int32_t i = 0; i < n; i++) {
        const char *s = strs[i].ptr;
        size_t len = (size_t)strs[i].len;
        if (len == 0) {
            len = (size_t)snprintf(empty_name, sizeof(empty_name), "[EMPTY_%d]", i);
            s = empty_name;
        }
        memcpy(t->text + off, s, len);
        t->text_off[i] = off;
        int32_t type = types ? types[i] : CAKE_TOKEN_NORMAL;
        if (type < CAKE_TOKEN_UNDEFINED || type > CAKE_TOKEN_BYTE) type = CAKE_TOKEN_UNDEFINED;
        t->types[i] = type;
        t->scores[i] = scores ? scores[i] : 0.0f;
        t->piece_off[i] = poff;
        poff += token_piece(type, t->text + off, len, t->piece + poff);
        off += len;
        if (len > t->max_token_len) t->max_token_len = len;
    }
    t->text_off[n] = off;
    t->piece_off[n] = poff;

    for (int32_t i = 0; i < n; i++) {
        const char *s = t->text + t->text_off[i];
        size_t len = t->text_off[i + 1] - t->text_off[i];
        uint32_t h = hash_bytes(s, len) & t->hash_mask;
        for (; t->hash[h]; h = (h + 1) & t->hash_mask) {
            cake_token j = t->hash[h] - 1;
            if (t->text_off[j + 1] - t->text_off[j] == len &&
                memcmp(t->text + t->text_off[j], s, len) == 0) {
                cake_err(err, errlen,
                         "tokenizer.ggml.tokens: duplicate token '%.*s' at ids %d and %d",
                         (int)(len < 64 ? len : 64), s, j, i);
                cake_tokenizer_free(t);
                return -1;
            }
        }
        t->hash[h] = i + 1;
    }

    /* Byte fallback as llama.cpp's byte_to_token: "<0xNN>" (upper-case hex),
     * else the one-byte string itself. */
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        cake_token id = tok_lookup(t, name, 6);
        if (id < 0) {
            char c = (char)b;
            id = tok_lookup(t, &c, 1);
        }
        t->byte_tok[b] = id;
    }
    *out = t;
    return 0;
}

int cake_tokenizer_init_arrays(const cake_vocab_arrays *v, cake_tokenizer **out, char *err,
                               size_t errlen) {
    *out = NULL;
    if (!v || v->n_vocab <= 0 || !v->tokens)
        return cake_err(err, errlen, "tokenizer: no vocabulary given");
    cake_gguf_str *strs = malloc((size_t)v->n_vocab * sizeof(*strs));
    if (!strs) return cake_err(err, errlen, "out of memory building the tokenizer");
    for (int32_t i = 0; i < v->n_vocab; i++) {
        if (!v->tokens[i]) {
            free(strs);
            return cake_err(err, errlen, "tokenizer: token %d is NULL", i);
        }
        strs[i] = (cake_gguf_str){v->tokens[i], strlen(v->tokens[i])};
    }
    int rc = tok_build(v->n_vocab, strs, v->scores, v->types, v->bos, v->eos, v->unk, v->add_bos,
                       v->add_space_prefix, out, err, errlen);
    free(strs);
    return rc;
}

/* Reads an optional u32 token id: absent -> def, present -> must fit the vocab. */
static int read_id(const cake_gguf *g, const char *key, cake_token def, int32_t n, cake_token *out,
                   char *err, size_t errlen) {
    uint32_t v;
    int rc = cake_gguf_get_u32(g, key, &v, err, errlen);
    if (rc == -1) {
        /* As llama.cpp: a default that does not fit the vocabulary means "none". */
        *out = def < n ? def : -1;
        return 0;
    }
    if (rc != 0) return -1;
    if (v >= (uint32_t)n)
        return cake_err(err, errlen, "%s = %u is out of range (vocabulary has %d tokens)", key, v,
                        n);
    *out = (cake_token)v;
    return 0;
}

static int read_bool(const cake_gguf *g, const char *key, bool def, bool *out, char *err,
                     size_t errlen) {
    int rc = cake_gguf_get_bool(g, key, out, err, errlen);
    if (rc == -1) {
        *out = def;
        return 0;
    }
    return rc == 0 ? 0 : -1;
}

int cake_tokenizer_init(const cake_gguf *g, cake_tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    cake_gguf_str model;
    int rc = cake_gguf_get_str(g, "tokenizer.ggml.model", &model, err, errlen);
    if (rc == -1) return cake_err(err, errlen, "missing key tokenizer.ggml.model");
    if (rc != 0) return -1;
    if (model.len != 5 || memcmp(model.ptr, "llama", 5) != 0)
        return cake_err(err, errlen,
                        "tokenizer.ggml.model is '%.*s': only 'llama' (SentencePiece) is supported",
                        (int)(model.len < 64 ? model.len : 64), model.ptr);

    const cake_gguf_kv *tk = cake_gguf_find_kv(g, "tokenizer.ggml.tokens");
    if (!tk) return cake_err(err, errlen, "missing key tokenizer.ggml.tokens");
    if (tk->type != CAKE_GGUF_ARRAY || tk->arr_type != CAKE_GGUF_STRING)
        return cake_err(err, errlen,
                        "tokenizer.ggml.tokens has type %s, expected an array of string",
                        tk->type == CAKE_GGUF_ARRAY ? cake_gguf_type_name(tk->arr_type)
                                                    : cake_gguf_type_name(tk->type));
    if (tk->arr_n == 0 || tk->arr_n > INT32_MAX)
        return cake_err(err, errlen, "tokenizer.ggml.tokens has %llu entries",
                        (unsigned long long)tk->arr_n);
    const int32_t n = (int32_t)tk->arr_n;

    /* Scores and types: optional, at least one per token (llama.cpp accepts
     * longer arrays and ignores the rest). The elements sit unaligned in the
     * file, hence memcpy. */
    const cake_gguf_kv *sk = cake_gguf_find_kv(g, "tokenizer.ggml.scores");
    const cake_gguf_kv *yk = cake_gguf_find_kv(g, "tokenizer.ggml.token_type");
    if (sk && (sk->type != CAKE_GGUF_ARRAY ||
               (sk->arr_type != CAKE_GGUF_FLOAT32 && sk->arr_type != CAKE_GGUF_INT32)))
        return cake_err(err, errlen,
                        "tokenizer.ggml.scores has type %s, expected an array of float32",
                        sk->type == CAKE_GGUF_ARRAY ? cake_gguf_type_name(sk->arr_type)
                                                    : cake_gguf_type_name(sk->type));
    if (sk && sk->arr_n < (uint64_t)n)
        return cake_err(err, errlen, "tokenizer.ggml.scores has %llu entries for %d tokens",
                        (unsigned long long)sk->arr_n, n);
    if (yk && (yk->type != CAKE_GGUF_ARRAY || yk->arr_type != CAKE_GGUF_INT32))
        return cake_err(err, errlen,
                        "tokenizer.ggml.token_type has type %s, expected an array of int32",
                        yk->type == CAKE_GGUF_ARRAY ? cake_gguf_type_name(yk->arr_type)
                                                    : cake_gguf_type_name(yk->type));
    if (yk && yk->arr_n < (uint64_t)n)
        return cake_err(err, errlen, "tokenizer.ggml.token_type has %llu entries for %d tokens",
                        (unsigned long long)yk->arr_n, n);

    cake_token bos, eos, unk;
    bool add_bos, add_space_prefix;
    if (read_id(g, "tokenizer.ggml.bos_token_id", 1, n, &bos, err, errlen) ||
        read_id(g, "tokenizer.ggml.eos_token_id", 2, n, &eos, err, errlen) ||
        read_id(g, "tokenizer.ggml.unknown_token_id", 0, n, &unk, err, errlen) ||
        read_bool(g, "tokenizer.ggml.add_bos_token", true, &add_bos, err, errlen) ||
        read_bool(g, "tokenizer.ggml.add_space_prefix", true, &add_space_prefix, err, errlen))
        return -1;

    float *scores = sk ? malloc((size_t)n * sizeof(*scores)) : NULL;
    int32_t *types = yk ? malloc((size_t)n * sizeof(*types)) : NULL;
    if ((sk && !scores) || (yk && !types)) {
        free(scores);
        free(types);
        return cake_err(err, errlen, "out of memory reading the vocabulary (%d tokens)", n);
    }
    for (int32_t i = 0; sk && i < n; i++) {
        const char *src = (const char *)sk->arr_data + (size_t)i * 4;
        if (sk->arr_type == CAKE_GGUF_FLOAT32) {
            memcpy(&scores[i], src, 4);
        } else {
            int32_t v;
            memcpy(&v, src, 4);
            scores[i] = (float)v;
        }
    }
    if (yk) memcpy(types, yk->arr_data, (size_t)n * sizeof(*types));

    rc = tok_build(n, tk->arr_strs, scores, types, bos, eos, unk, add_bos, add_space_prefix, out,
                   err, errlen);
    free(scores);
    free(types);
    return rc;
}

void cake_tokenizer_free(cake_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->scores);
    free(t->types);
    free(t->hash);
    free(t);
}

int32_t cake_tokenizer_n_vocab(const cake_tokenizer *t) {
    return t->n_vocab;
}
cake_token cake_tokenizer_bos(const cake_tokenizer *t) {
    return t->bos;
}
cake_token cake_tokenizer_eos(const cake_tokenizer *t) {
    return t->eos;
}
bool cake_tokenizer_add_bos(const cake_tokenizer *t) {
    return t->add_bos;
}

/* ---- tokenization ---- */

typedef struct {
    int prev, next; /* neighbours in the live chain, -1 at the ends */
    size_t off;     /* into the escaped text */
    size_t n;       /* bytes; 0 once merged into its left neighbour */
} spm_sym;

typedef struct {
    int left, right;
    float score;
    size_t size; /* bytes of left + right when pushed: detects stale entries */
} spm_bigram;

typedef struct {
    spm_bigram *v;
    size_t n, cap;
} spm_heap;

/* llama.cpp's order: higher score first, then the leftmost pair. */
static bool bigram_before(const spm_bigram *a, const spm_bigram *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static int heap_push(spm_heap *h, spm_bigram b) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        spm_bigram *v = realloc(h->v, cap * sizeof(*v));
        if (!v) return -1;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_before(&b, &h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = b;
    return 0;
}

static spm_bigram heap_pop(spm_heap *h) {
    spm_bigram top = h->v[0];
    spm_bigram last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && bigram_before(&h->v[c + 1], &h->v[c])) c++;
        if (!bigram_before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

typedef struct {
    const cake_tokenizer *t;
    const char *buf; /* escaped text */
    spm_sym *sym;
    spm_heap heap;
} spm_session;

static int try_add_bigram(spm_session *s, int left, int right) {
    if (left < 0 || right < 0) return 0;
    size_t size = s->sym[left].n + s->sym[right].n;
    if (size > s->t->max_token_len) return 0;
    cake_token id = tok_lookup(s->t, s->buf + s->sym[left].off, size);
    if (id < 0) return 0;
    return heap_push(&s->heap, (spm_bigram){left, right, s->t->scores[id], size});
}

static void emit(cake_token id, cake_token *out, int64_t cap, int64_t *count) {
    if (*count < cap) out[*count] = id;
    (*count)++;
}

int64_t cake_tokenize(const cake_tokenizer *t, const char *text, size_t len, bool add_bos,
                      cake_token *out, int64_t cap) {
    int64_t count = 0;
    if (!out) cap = 0;
    if (add_bos && t->bos >= 0) emit(t->bos, out, cap, &count);
    if (len == 0) return count;
    /* Symbol indices are ints, like llama.cpp's. */
    if (len > (size_t)(INT_MAX - 3) / 3) return -1;

    /* 2. escape: optional leading "▁", every ' ' -> "▁" */
    char *buf = malloc(3 * len + 3);
    spm_session s = {.t = t, .buf = buf};
    if (!buf) return -1;
    size_t n = 0;
    if (t->add_space_prefix) {
        memcpy(buf, "\xe2\x96\x81", 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(buf + n, "\xe2\x96\x81", 3);
            n += 3;
        } else {
            buf[n++] = text[i];
        }
    }

    /* 3. one symbol per UTF-8 character (by lead byte, clamped at the end) */
    static const unsigned char utf8_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    s.sym = malloc(n * sizeof(*s.sym));
    if (!s.sym) goto oom;
    int nsym = 0;
    for (size_t off = 0; off < n;) {
        size_t l = utf8_len[(unsigned char)buf[off] >> 4];
        if (l > n - off) l = n - off;
        s.sym[nsym] = (spm_sym){nsym - 1, off + l == n ? -1 : nsym + 1, off, l};
        off += l;
        nsym++;
    }

    /* 4. merge the best-scoring adjacent pair until none is in the vocabulary */
    for (int i = 1; i < nsym; i++)
        if (try_add_bigram(&s, i - 1, i)) goto oom;
    while (s.heap.n) {
        spm_bigram b = heap_pop(&s.heap);
        spm_sym *l = &s.sym[b.left], *r = &s.sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) s.sym[r->next].prev = b.left;
        if (try_add_bigram(&s, l->prev, b.left) || try_add_bigram(&s, b.left, l->next)) goto oom;
    }

    /* 5. emit: vocabulary entry, else byte tokens, else unk */
    for (int i = 0; i != -1; i = s.sym[i].next) {
        const spm_sym *sy = &s.sym[i];
        cake_token id = tok_lookup(t, buf + sy->off, sy->n);
        if (id >= 0) {
            emit(id, out, cap, &count);
            continue;
        }
        for (size_t j = 0; j < sy->n; j++) {
            cake_token b = t->byte_tok[(unsigned char)buf[sy->off + j]];
            if (b < 0) b = t->unk;
            if (b >= 0) emit(b, out, cap, &count); /* no byte token and no unk: dropped */
        }
    }
    free(s.heap.v);
    free(s.sym);
    free(buf);
    return count;
oom:
    free(s.heap.v);
    free(s.sym);
    free(buf);
    return -1;
}

/* ---- detokenization ---- */

int cake_token_to_piece(const cake_tokenizer *t, cake_token prev, cake_token id, char *out,
                        size_t cap) {
    if (id < 0 || id >= t->n_vocab) return -1;
    const char *p = t->piece + t->piece_off[id];
    size_t n = t->piece_off[id + 1] - t->piece_off[id];
    /* The space that tokenization prepended is not part of the text: drop it
     * from the first piece of a sequence, and from the first piece after BOS
     * (as llama2.c and SentencePiece's decoder do; llama.cpp's detokenize drops
     * it only when the sequence does not start with BOS). */
    if (t->add_space_prefix && (prev < 0 || prev == t->bos) && n > 0 && p[0] == ' ') {
        p++;
        n--;
    }
    if (n > INT_MAX) return -1;
    if (out) memcpy(out, p, n < cap ? n : cap);
    return (int)n;
}
