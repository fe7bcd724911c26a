/* The two tokenizers of Llama-family GGUF files, ported from llama.cpp so that
 * both engines give the same ids for the same text (llama.cpp's own test
 * vectors are our tests):
 *   - SentencePiece BPE, tokenizer.ggml.model = "llama" (Llama 1/2, TinyLlama,
 *     Mistral): llm_tokenizer_spm;
 *   - byte-level BPE, tokenizer.ggml.model = "gpt2" (Llama 3, Qwen2):
 *     llm_tokenizer_bpe, with the pre-tokenizer of tokenizer.ggml.pre.
 * Both merge adjacent symbols by priority with the same loop (steps 3-4
 * below); they differ in how the text is cut before and how symbols become
 * ids after.
 *
 * SentencePiece, for a text without special-token parsing:
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
 * Byte-level BPE (GPT-2's scheme, as Llama 3 uses it):
 *   1. The text is read as UTF-8 the way llama.cpp reads it (lead byte decides
 *      the length, continuation bytes must be 10xxxxxx, no overlong check);
 *      each invalid byte becomes U+FFFD, as in llama.cpp.
 *   2. A pre-tokenizer regex (PCRE2, Unicode properties) cuts the text into
 *      words: its matches, and any text between them. Merges never cross a
 *      word boundary.
 *   3. Each byte of a word becomes one printable character (GPT-2's
 *      bytes_to_unicode: the printable Latin-1 bytes stand for themselves, the
 *      other 68 get U+0100 upwards, so ' ' is "Ġ"). Token texts and merges are
 *      written in these characters.
 *   4. With ignore_merges (the Llama 3 pre-tokenizer), a word that is itself a
 *      vocabulary entry is that token. Otherwise the word starts as one symbol
 *      per character and the merge loop runs with a pair's priority = minus its
 *      rank in tokenizer.ggml.merges (first merges first; ties leftmost).
 *   5. Each symbol is emitted as its id; one that is not in the vocabulary (a
 *      malformed vocabulary) as its single bytes that are, like llama.cpp.
 *   Decoding maps the characters back to bytes.
 *
 * Lookups go through open-addressing hashes of the token texts and of the
 * merge pairs, so tokenizing is O(n log n) in the text length. */
#include "model/tokenizer.h"

#include <limits.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"

enum { MAX_PRE_PATTERNS = 2 }; /* the most patterns of a pre-tokenizer */

/* One merge rule "left right" of a byte-level BPE vocabulary. */
typedef struct {
    size_t left, right;       /* offsets into merge_text */
    uint32_t left_n, right_n; /* bytes */
} bpe_merge;

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

    /* Byte-level BPE only (bpe = true) */
    bool bpe;
    bool ignore_merges;                /* a word that is a token is that token */
    pcre2_code *pre[MAX_PRE_PATTERNS]; /* the pre-tokenizer's patterns, applied in turn */
    int n_pre;
    char *merge_text;    /* merge pairs' texts back to back */
    bpe_merge *merges;   /* [n_merges], rank = index */
    int32_t *merge_hash; /* [merge_mask + 1] rank + 1, 0 = empty slot */
    uint32_t merge_mask;
    char byte_char[256][2]; /* byte b as its UTF-8 character (1 or 2 bytes) */
    uint8_t byte_char_len[256];
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

/* ---- byte-level BPE: characters, merges, pre-tokenizers ---- */

/* GPT-2's bytes_to_unicode: the printable Latin-1 bytes stand for themselves,
 * the other 68 bytes, in order, for U+0100 upwards. */
static bool byte_is_printable(int b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
}

enum { BPE_CHARS = 256 + 68 }; /* code points that stand for a byte */

/* byte_of_cp[cp] = the byte that code point cp stands for, -1 for none. */
static void bpe_byte_table(int16_t byte_of_cp[BPE_CHARS]) {
    for (int cp = 0; cp < BPE_CHARS; cp++) byte_of_cp[cp] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) byte_of_cp[byte_is_printable(b) ? b : 256 + extra++] = (int16_t)b;
}

/* One code point at s[0..n) (n >= 1), read as llama.cpp's unicode_cpt_from_utf8
 * reads it: the lead byte gives the length, the continuation bytes must be
 * 10xxxxxx, overlong forms are accepted. Returns its length, or 0 when the
 * bytes there are not a character. */
static size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    const unsigned c = s[0];
    if (!(c & 0x80)) {
        *cp = c;
        return 1;
    }
    const size_t len = !(c & 0x40) ? 0 : !(c & 0x20) ? 2 : !(c & 0x10) ? 3 : !(c & 0x08) ? 4 : 0;
    if (len == 0 || len > n) return 0;
    uint32_t v = c & (0x7fu >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = v << 6 | (s[i] & 0x3fu);
    }
    *cp = v;
    return len;
}

/* Writes cp as UTF-8 (1-4 bytes) and returns the length. Surrogates and code
 * points past U+10FFFF, which are not characters, become U+FFFD. */
static size_t utf8_put(uint32_t cp, char *dst) {
    if ((cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) cp = 0xfffd;
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (char)(0xc0 | cp >> 6);
        dst[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xe0 | cp >> 12);
        dst[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        dst[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    dst[0] = (char)(0xf0 | cp >> 18);
    dst[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    dst[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    dst[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

static uint32_t pair_hash(const char *l, size_t ln, const char *r, size_t rn) {
    uint32_t h = hash_bytes(l, ln);
    for (size_t i = 0; i < rn; i++) {
        h ^= (unsigned char)r[i];
        h *= 16777619u;
    }
    return h ^ (uint32_t)ln; /* "ab"+"c" and "a"+"bc" land apart */
}

/* Rank of the merge rule (l, r) (its index in tokenizer.ggml.merges), or -1. */
static int32_t merge_rank(const cake_tokenizer *t, const char *l, size_t ln, const char *r,
                          size_t rn) {
    for (uint32_t h = pair_hash(l, ln, r, rn) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        const int32_t v = t->merge_hash[h];
        if (v == 0) return -1;
        const bpe_merge *m = &t->merges[v - 1];
        if (m->left_n == ln && m->right_n == rn && memcmp(t->merge_text + m->left, l, ln) == 0 &&
            memcmp(t->merge_text + m->right, r, rn) == 0)
            return v - 1;
    }
}

/* The pre-tokenizers of tokenizer.ggml.pre that we know: llama.cpp's patterns
 * (its llm_tokenizer_bpe), which spell out the case-insensitive contractions
 * of the originals in tokenizer.json. Where there are several, each splits
 * the pieces the one before made (llama.cpp's unicode_regex_split). llama.cpp
 * sets ignore_merges and a default add_bos for Llama 3's and tekken only. */
#define LLAMA3_PATTERN                                                                             \
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"     \
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define GPT2_PATTERN "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
static const struct {
    const char *names[8]; /* as tokenizer.ggml.pre spells them */
    const char *patterns[MAX_PRE_PATTERNS];
    bool ignore_merges, add_bos;
} k_pretokenizers[] = {
    {.names = {"llama3", "llama-v3", "llama-bpe", "falcon3"},
     .patterns = {LLAMA3_PATTERN},
     .ignore_merges = true,
     .add_bos = true},
    /* Llama 3's pattern with the merges applied (Phi-4's vocabulary is
     * written as dbrx's) */
    {.names = {"dbrx", "smaug-bpe"},
     .patterns = {LLAMA3_PATTERN},
     .ignore_merges = false,
     .add_bos = false},
    /* Mistral Nemo, Small 3, Ministral: capitalised words apart, digits one
     * by one */
    {.names = {"tekken"},
     .patterns =
         {"[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}"
          "\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
          "[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     .ignore_merges = true,
     .add_bos = true},
    /* GPT-2's words, after digits one by one (SmolLM, StarCoder, ...) */
    {.names = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"},
     .patterns = {"\\p{N}", GPT2_PATTERN},
     .ignore_merges = false,
     .add_bos = false},
    {.names = {"gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"},
     .patterns = {GPT2_PATTERN},
     .ignore_merges = false,
     .add_bos = false},
    /* GPT-4o's o200k words (Phi-4-mini): tokenizer.json's own pattern */
    {.names = {"gpt-4o"},
     .patterns = {"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}"
                  "\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}"
                  "\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|"
                  "'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|"
                  "\\s+(?!\\S)|\\s+"},
     .ignore_merges = false,
     .add_bos = false},
    {.names = {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"},
     .patterns = {"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?"
                  "\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     .ignore_merges = false,
     .add_bos = false},
};
enum { N_PRETOKENIZERS = sizeof(k_pretokenizers) / sizeof(k_pretokenizers[0]) };

/* Index in k_pretokenizers of the one named name[0..n), or -1. */
static int find_pretokenizer(const char *name, size_t n) {
    for (int i = 0; i < N_PRETOKENIZERS; i++)
        for (int j = 0; j < 8 && k_pretokenizers[i].names[j]; j++)
            if (strlen(k_pretokenizers[i].names[j]) == n &&
                memcmp(k_pretokenizers[i].names[j], name, n) == 0)
                return i;
    return -1;
}

static int unknown_pretokenizer(const char *name, size_t n, char *err, size_t errlen) {
    return cake_err(err, errlen,
                    "tokenizer.ggml.pre is '%.*s': the supported byte-level BPE pre-tokenizers "
                    "are llama-bpe (Llama 3), dbrx (Phi-4), gpt-4o (Phi-4-mini), tekken "
                    "(Mistral), smollm, gpt-2 and qwen2 (and their aliases)",
                    (int)(n < 64 ? n : 64), name);
}

/* Reads the merge rules "left right" (split at the first space after the first
 * byte, as llama.cpp does; a rule without one can never apply) into t's table.
 * A repeated pair keeps its first rank. */
static int build_merges(cake_tokenizer *t, const cake_gguf_str *rules, int32_t n, char *err,
                        size_t errlen) {
    if (n > (1 << 24)) /* ranks must be exact as float priorities (merge loop) */
        return cake_err(err, errlen, "tokenizer.ggml.merges: %d rules is too many", n);
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) total += rules[i].len;
    uint32_t cap = 1;
    while (cap < 2u * (uint32_t)n + 2) cap <<= 1;
    t->merge_mask = cap - 1;
    t->merge_text = malloc(total ? total : 1);
    t->merges = malloc(((size_t)n + 1) * sizeof(*t->merges));
    t->merge_hash = calloc(cap, sizeof(*t->merge_hash));
    if (!t->merge_text || !t->merges || !t->merge_hash)
        return cake_err(err, errlen, "out of memory reading %d merge rules", n);
    size_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        const char *s = rules[i].ptr;
        const size_t len = rules[i].len;
        memcpy(t->merge_text + off, s, len);
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        bpe_merge *m = &t->merges[i];
        const size_t ln = sp ? (size_t)(sp - s) : 0;
        *m = (bpe_merge){off, off + ln + 1, (uint32_t)ln, sp ? (uint32_t)(len - ln - 1) : 0};
        off += len;
        if (!sp) continue;
        const char *l = t->merge_text + m->left, *r = t->merge_text + m->right;
        uint32_t h = pair_hash(l, m->left_n, r, m->right_n) & t->merge_mask;
        bool repeated = false;
        for (; t->merge_hash[h] && !repeated; h = (h + 1) & t->merge_mask) {
            const bpe_merge *o = &t->merges[t->merge_hash[h] - 1];
            repeated = o->left_n == m->left_n && o->right_n == m->right_n &&
                       memcmp(t->merge_text + o->left, l, m->left_n) == 0 &&
                       memcmp(t->merge_text + o->right, r, m->right_n) == 0;
        }
        if (!repeated) t->merge_hash[h] = i + 1;
    }
    return 0;
}

/* Compiles pre-tokenizer `pre` (an index in k_pretokenizers) for t. */
static int build_pretokenizer(cake_tokenizer *t, int pre, char *err, size_t errlen) {
    for (int k = 0; k < MAX_PRE_PATTERNS && k_pretokenizers[pre].patterns[k]; k++) {
        int code;
        PCRE2_SIZE at;
        t->pre[k] = pcre2_compile((PCRE2_SPTR)k_pretokenizers[pre].patterns[k],
                                  PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &code, &at, NULL);
        if (!t->pre[k]) {
            PCRE2_UCHAR msg[128];
            pcre2_get_error_message(code, msg, sizeof(msg));
            return cake_err(err, errlen, "pre-tokenizer %s: %s at %zu",
                            k_pretokenizers[pre].names[0], (const char *)msg, (size_t)at);
        }
        t->n_pre = k + 1;
        pcre2_jit_compile(t->pre[k], PCRE2_JIT_COMPLETE); /* where JIT is missing, it interprets */
    }
    t->ignore_merges = k_pretokenizers[pre].ignore_merges;
    return 0;
}

/* ---- construction ---- */

static size_t hex_digit(char c) {
    if (c >= '0' && c <= '9') return (size_t)(c - '0');
    if (c >= 'A' && c <= 'F') return (size_t)(c - 'A' + 10);
    if (c >= 'a' && c <= 'f') return (size_t)(c - 'a' + 10);
    return 16;
}

/* What token_to_piece prints for a SentencePiece token, as llama.cpp's
 * token_to_piece with special = false: NORMAL tokens with "▁" turned into ' ',
 * BYTE tokens <0xNN> as the raw byte, USER_DEFINED tokens verbatim, and
 * nothing for CONTROL, UNKNOWN, UNUSED and UNDEFINED tokens. Writes into dst
 * (room for n bytes) and returns the length. */
static size_t spm_piece(int32_t type, const char *s, size_t n, char *dst) {
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

/* The same for a byte-level BPE token: NORMAL tokens with each character
 * turned back into the byte it stands for (one that stands for none is
 * printed as it is), USER_DEFINED tokens verbatim, nothing for the others
 * (llama.cpp prints no other type of a BPE vocabulary either). */
static size_t bpe_piece(int32_t type, const char *s, size_t n, const int16_t *byte_of_cp,
                        char *dst) {
    if (type == CAKE_TOKEN_USER_DEFINED) {
        memcpy(dst, s, n);
        return n;
    }
    if (type != CAKE_TOKEN_NORMAL) return 0;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_next((const unsigned char *)s + i, n - i, &cp);
        if (len && cp < BPE_CHARS && byte_of_cp[cp] >= 0) {
            dst[k++] = (char)byte_of_cp[cp];
        } else {
            if (!len) len = 1;
            memcpy(dst + k, s + i, len);
            k += len;
        }
        i += len;
    }
    return k;
}

/* What a tokenizer is built from: the GGUF keys' arrays, or the caller's. */
typedef struct {
    int32_t n;                 /* tokens */
    const cake_gguf_str *strs; /* [n] token texts (views, not NUL-terminated) */
    const float *scores;       /* [n] or NULL: all 0 */
    const int32_t *types;      /* [n] or NULL: all NORMAL */
    cake_token bos, eos, unk;  /* -1: none */
    bool add_bos, add_space_prefix;
    int pre;                     /* byte-level BPE: index in k_pretokenizers; -1: SentencePiece */
    const cake_gguf_str *merges; /* [n_merges] BPE merge rules */
    int32_t n_merges;
} vocab_source;

/* Builds the tokenizer. Names the GGUF key in errors because that is where
 * the arrays come from. */
static int tok_build(const vocab_source *v, cake_tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    const int32_t n = v->n;
    const cake_gguf_str *strs = v->strs;
    if (n <= 0) return cake_err(err, errlen, "tokenizer.ggml.tokens: empty vocabulary");
    if (n > (1 << 28)) /* keeps the hash size in range; real vocabularies are < 1M */
        return cake_err(err, errlen, "tokenizer.ggml.tokens: %d tokens is too many", n);
    const struct {
        const char *key;
        cake_token id;
    } ids[] = {{"tokenizer.ggml.bos_token_id", v->bos},
               {"tokenizer.ggml.eos_token_id", v->eos},
               {"tokenizer.ggml.unknown_token_id", v->unk}};
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++)
        if (ids[i].id < -1 || ids[i].id >= n)
            return cake_err(err, errlen, "%s = %d is out of range (vocabulary has %d tokens)",
                            ids[i].key, ids[i].id, n);

    cake_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) return cake_err(err, errlen, "out of memory building the tokenizer");
    t->n_vocab = n;
    t->bos = v->bos;
    t->eos = v->eos;
    t->unk = v->unk;
    t->add_bos = v->add_bos;
    t->bpe = v->pre >= 0;
    t->add_space_prefix = v->add_space_prefix && !t->bpe; /* SentencePiece's only */
    int16_t byte_of_cp[BPE_CHARS];
    if (t->bpe) {
        bpe_byte_table(byte_of_cp);
        for (int cp = 0; cp < BPE_CHARS; cp++)
            if (byte_of_cp[cp] >= 0)
                t->byte_char_len[byte_of_cp[cp]] =
                    (uint8_t)utf8_put((uint32_t)cp, t->byte_char[byte_of_cp[cp]]);
        if (build_merges(t, v->merges, v->n_merges, err, errlen) ||
            build_pretokenizer(t, v->pre, err, errlen)) {
            cake_tokenizer_free(t);
            return -1;
        }
    }
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
        int32_t type = v->types ? v->types[i] : CAKE_TOKEN_NORMAL;
        if (type < CAKE_TOKEN_UNDEFINED || type > CAKE_TOKEN_BYTE) type = CAKE_TOKEN_UNDEFINED;
        t->types[i] = type;
        t->scores[i] = v->scores ? v->scores[i] : 0.0f;
        t->piece_off[i] = poff;
        poff += t->bpe ? bpe_piece(type, t->text + off, len, byte_of_cp, t->piece + poff)
                       : spm_piece(type, t->text + off, len, t->piece + poff);
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

/* Views of n NUL-terminated strings; NULL (with the reason in err) when one
 * is NULL or memory runs out. what names the array in errors. */
static cake_gguf_str *string_views(const char *const *a, int32_t n, const char *what, char *err,
                                   size_t errlen) {
    cake_gguf_str *v = malloc(((size_t)n + 1) * sizeof(*v));
    if (!v) {
        cake_err(err, errlen, "out of memory building the tokenizer");
        return NULL;
    }
    for (int32_t i = 0; i < n; i++) {
        if (!a[i]) {
            free(v);
            cake_err(err, errlen, "tokenizer: %s %d is NULL", what, i);
            return NULL;
        }
        v[i] = (cake_gguf_str){a[i], strlen(a[i])};
    }
    return v;
}

int cake_tokenizer_init_arrays(const cake_vocab_arrays *v, cake_tokenizer **out, char *err,
                               size_t errlen) {
    *out = NULL;
    if (!v || v->n_vocab <= 0 || !v->tokens)
        return cake_err(err, errlen, "tokenizer: no vocabulary given");
    vocab_source src = {.n = v->n_vocab,
                        .scores = v->scores,
                        .types = v->types,
                        .bos = v->bos,
                        .eos = v->eos,
                        .unk = v->unk,
                        .add_bos = v->add_bos,
                        .add_space_prefix = v->add_space_prefix,
                        .pre = -1,
                        .n_merges = v->pre ? v->n_merges : 0};
    if (v->pre) {
        src.pre = find_pretokenizer(v->pre, strlen(v->pre));
        if (src.pre < 0) return unknown_pretokenizer(v->pre, strlen(v->pre), err, errlen);
        if (v->n_merges < 0 || (v->n_merges > 0 && !v->merges))
            return cake_err(err, errlen, "tokenizer: %d merges, %s", v->n_merges,
                            v->merges ? "given" : "none given");
    }
    cake_gguf_str *strs = string_views(v->tokens, v->n_vocab, "token", err, errlen);
    cake_gguf_str *merges = string_views(v->merges, src.n_merges, "merge", err, errlen);
    int rc = -1;
    if (strs && merges) {
        src.strs = strs;
        src.merges = merges;
        rc = tok_build(&src, out, err, errlen);
    }
    free(strs);
    free(merges);
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

/* Key `key`, an array of strings with at least min_n and at most INT32_MAX
 * entries; NULL with the reason in err otherwise. */
static const cake_gguf_kv *string_array(const cake_gguf *g, const char *key, uint64_t min_n,
                                        char *err, size_t errlen) {
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, key);
    if (!kv) {
        cake_err(err, errlen, "missing key %s", key);
        return NULL;
    }
    if (kv->type != CAKE_GGUF_ARRAY || kv->arr_type != CAKE_GGUF_STRING) {
        cake_err(err, errlen, "%s has type %s, expected an array of string", key,
                 kv->type == CAKE_GGUF_ARRAY ? cake_gguf_type_name(kv->arr_type)
                                             : cake_gguf_type_name(kv->type));
        return NULL;
    }
    if (kv->arr_n < min_n || kv->arr_n > INT32_MAX) {
        cake_err(err, errlen, "%s has %llu entries", key, (unsigned long long)kv->arr_n);
        return NULL;
    }
    return kv;
}

int cake_tokenizer_init(const cake_gguf *g, cake_tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    cake_gguf_str model;
    int rc = cake_gguf_get_str(g, "tokenizer.ggml.model", &model, err, errlen);
    if (rc == -1) return cake_err(err, errlen, "missing key tokenizer.ggml.model");
    if (rc != 0) return -1;
    const bool spm = model.len == 5 && memcmp(model.ptr, "llama", 5) == 0;
    const bool bpe = model.len == 4 && memcmp(model.ptr, "gpt2", 4) == 0;
    if (!spm && !bpe)
        return cake_err(err, errlen,
                        "tokenizer.ggml.model is '%.*s': 'llama' (SentencePiece) and 'gpt2' "
                        "(byte-level BPE) are supported",
                        (int)(model.len < 64 ? model.len : 64), model.ptr);

    /* Byte-level BPE: the pre-tokenizer's name and the merge rules. */
    int pre = -1;
    const cake_gguf_kv *mk = NULL;
    if (bpe) {
        cake_gguf_str name;
        rc = cake_gguf_get_str(g, "tokenizer.ggml.pre", &name, err, errlen);
        if (rc == -1)
            return cake_err(err, errlen,
                            "missing key tokenizer.ggml.pre (which pre-tokenizer a byte-level BPE "
                            "vocabulary needs; files from llama.cpp's current converter have it)");
        if (rc != 0) return -1;
        pre = find_pretokenizer(name.ptr, name.len);
        if (pre < 0) return unknown_pretokenizer(name.ptr, name.len, err, errlen);
        if (!(mk = string_array(g, "tokenizer.ggml.merges", 0, err, errlen))) return -1;
    }

    const cake_gguf_kv *tk = string_array(g, "tokenizer.ggml.tokens", 1, err, errlen);
    if (!tk) return -1;
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
    /* SentencePiece's defaults are llama.cpp's; a BPE vocabulary without the
     * keys has no BOS, EOS or unk (llama.cpp's default of 11 for both is a
     * token of no meaning), and adds BOS by its pre-tokenizer's default. */
    if (read_id(g, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, n, &bos, err, errlen) ||
        read_id(g, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, n, &eos, err, errlen) ||
        read_id(g, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, n, &unk, err, errlen) ||
        read_bool(g, "tokenizer.ggml.add_bos_token", spm || k_pretokenizers[pre].add_bos, &add_bos,
                  err, errlen) ||
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

    const vocab_source src = {.n = n,
                              .strs = tk->arr_strs,
                              .scores = scores,
                              .types = types,
                              .bos = bos,
                              .eos = eos,
                              .unk = unk,
                              .add_bos = add_bos,
                              .add_space_prefix = add_space_prefix,
                              .pre = pre,
                              .merges = mk ? mk->arr_strs : NULL,
                              .n_merges = mk ? (int32_t)mk->arr_n : 0};
    rc = tok_build(&src, out, err, errlen);
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
    for (int k = 0; k < t->n_pre; k++) pcre2_code_free(t->pre[k]);
    free(t->merge_text);
    free(t->merges);
    free(t->merge_hash);
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
} symbol;

typedef struct {
    int left, right;
    float priority; /* higher merges first */
    size_t size;    /* bytes of left + right when pushed: detects stale entries */
} bigram;

typedef struct {
    bigram *v;
    size_t n, cap;
} bigram_heap;

/* llama.cpp's order: higher priority first, then the leftmost pair. */
static bool bigram_before(const bigram *a, const bigram *b) {
    return a->priority > b->priority || (a->priority == b->priority && a->left < b->left);
}

static int heap_push(bigram_heap *h, bigram b) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        bigram *v = realloc(h->v, cap * sizeof(*v));
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

static bigram heap_pop(bigram_heap *h) {
    bigram top = h->v[0];
    bigram last = h->v[--h->n];
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
    char *buf;   /* the text being merged */
    symbol *sym; /* room for one per character of buf */
    size_t room; /* BPE: bytes of a word buf and sym take (grown to the longest) */
    bigram_heap heap;
} merge_session;

/* Pushes the pair (left, right) when it can merge: SentencePiece, when their
 * concatenation is a token (priority: its score); BPE, when they are a merge
 * rule (priority: minus its rank, exact in a float below 2^24 rules). */
static int try_add_bigram(merge_session *s, int left, int right) {
    if (left < 0 || right < 0) return 0;
    const symbol *l = &s->sym[left], *r = &s->sym[right];
    const size_t size = l->n + r->n;
    float priority;
    if (s->t->bpe) {
        const int32_t rank = merge_rank(s->t, s->buf + l->off, l->n, s->buf + r->off, r->n);
        if (rank < 0) return 0;
        priority = -(float)rank;
    } else {
        if (size > s->t->max_token_len) return 0;
        const cake_token id = tok_lookup(s->t, s->buf + l->off, size);
        if (id < 0) return 0;
        priority = s->t->scores[id];
    }
    return heap_push(&s->heap, (bigram){left, right, priority, size});
}

/* Steps 3-4: cuts buf[0..n) (n >= 1) into one symbol per UTF-8 character (by
 * lead byte, clamped at the end) and merges the best pair until none can.
 * The symbols left are the chain from s->sym[0]. -1 when out of memory. */
static int merge_symbols(merge_session *s, size_t n) {
    static const unsigned char utf8_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    int nsym = 0;
    for (size_t off = 0; off < n;) {
        size_t l = utf8_len[(unsigned char)s->buf[off] >> 4];
        if (l > n - off) l = n - off;
        s->sym[nsym] = (symbol){nsym - 1, off + l == n ? -1 : nsym + 1, off, l};
        off += l;
        nsym++;
    }
    s->heap.n = 0;
    for (int i = 1; i < nsym; i++)
        if (try_add_bigram(s, i - 1, i)) return -1;
    while (s->heap.n) {
        bigram b = heap_pop(&s->heap);
        symbol *l = &s->sym[b.left], *r = &s->sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) s->sym[r->next].prev = b.left;
        if (try_add_bigram(s, l->prev, b.left) || try_add_bigram(s, b.left, l->next)) return -1;
    }
    return 0;
}

static void emit(cake_token id, cake_token *out, int64_t cap, int64_t *count) {
    if (*count < cap) out[*count] = id;
    (*count)++;
}

/* SentencePiece, steps 2-5 above, for len >= 1 bytes of text. */
static int spm_tokenize(const cake_tokenizer *t, const char *text, size_t len, cake_token *out,
                        int64_t cap, int64_t *count) {
    /* Symbol indices are ints, like llama.cpp's. */
    if (len > (size_t)(INT_MAX - 3) / 3) return -1;
    /* 2. escape: optional leading "▁", every ' ' -> "▁" */
    char *buf = malloc(3 * len + 3);
    merge_session s = {.t = t, .buf = buf, .sym = malloc((3 * len + 3) * sizeof(symbol))};
    int rc = -1;
    if (!buf || !s.sym) goto done;
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
    if (merge_symbols(&s, n)) goto done;

    /* 5. emit: vocabulary entry, else byte tokens, else unk */
    for (int i = 0; i != -1; i = s.sym[i].next) {
        const symbol *sy = &s.sym[i];
        cake_token id = tok_lookup(t, buf + sy->off, sy->n);
        if (id >= 0) {
            emit(id, out, cap, count);
            continue;
        }
        for (size_t j = 0; j < sy->n; j++) {
            cake_token b = t->byte_tok[(unsigned char)buf[sy->off + j]];
            if (b < 0) b = t->unk;
            if (b >= 0) emit(b, out, cap, count); /* no byte token and no unk: dropped */
        }
    }
    rc = 0;
done:
    free(s.heap.v);
    free(s.sym);
    free(buf);
    return rc;
}

/* Byte-level BPE, steps 3-5 above, for one word of n >= 1 bytes. */
static int bpe_word(merge_session *s, const char *word, size_t n, cake_token *out, int64_t cap,
                    int64_t *count) {
    const cake_tokenizer *t = s->t;
    if (n > s->room) { /* a character per byte, of 2 bytes at most */
        char *buf = realloc(s->buf, 2 * n);
        if (buf) s->buf = buf;
        symbol *sym = realloc(s->sym, n * sizeof(*sym));
        if (sym) s->sym = sym;
        if (!buf || !sym) return -1;
        s->room = n;
    }
    char *enc = s->buf;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char b = (unsigned char)word[i];
        memcpy(enc + m, t->byte_char[b], t->byte_char_len[b]);
        m += t->byte_char_len[b];
    }
    if (t->ignore_merges) {
        const cake_token id = tok_lookup(t, enc, m);
        if (id >= 0) {
            emit(id, out, cap, count);
            return 0;
        }
    }
    if (merge_symbols(s, m)) return -1;
    for (int i = 0; i != -1; i = s->sym[i].next) {
        const symbol *sy = &s->sym[i];
        const cake_token id = tok_lookup(t, enc + sy->off, sy->n);
        if (id >= 0) {
            emit(id, out, cap, count);
            continue;
        }
        for (size_t j = 0; j < sy->n; j++) { /* a malformed vocabulary: as llama.cpp */
            const cake_token b = tok_lookup(t, enc + sy->off + j, 1);
            if (b >= 0) emit(b, out, cap, count);
        }
    }
    return 0;
}

/* The words of the n bytes at p under patterns k and after (step 2): pattern
 * k's matches and the text between them, each split by the next pattern in
 * turn, as a text of its own; the last ones go to bpe_word. */
static int split_words(merge_session *s, const char *p, size_t n, int k, pcre2_match_data *md,
                       cake_token *out, int64_t cap, int64_t *count) {
    const cake_tokenizer *t = s->t;
    if (k == t->n_pre) return bpe_word(s, p, n, out, cap, count);
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    for (size_t at = 0; at < n;) {
        size_t ms = n, me = n;
        const int m = pcre2_match(t->pre[k], (PCRE2_SPTR)p, n, at,
                                  PCRE2_NO_UTF_CHECK | PCRE2_NOTEMPTY, md, NULL);
        if (m >= 0) { /* (0: a match, with too few pairs for its groups) */
            ms = ov[0];
            me = ov[1];
        } else if (m != PCRE2_ERROR_NOMATCH) {
            return -1; /* the matcher ran out of memory or hit its limits */
        }
        if ((ms > at && split_words(s, p + at, ms - at, k + 1, md, out, cap, count)) ||
            (me > ms && split_words(s, p + ms, me - ms, k + 1, md, out, cap, count)))
            return -1;
        at = me;
    }
    return 0;
}

/* Byte-level BPE, steps 1-5 above, for len >= 1 bytes of text. */
static int bpe_tokenize(const cake_tokenizer *t, const char *text, size_t len, cake_token *out,
                        int64_t cap, int64_t *count) {
    if (len > (size_t)(INT_MAX - 3) / 3) return -1;
    /* 1. valid UTF-8: each byte that is not part of a character becomes U+FFFD */
    char *clean = malloc(3 * len);
    merge_session s = {.t = t};
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    int rc = -1;
    if (!clean || !md) goto done;
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp = 0xfffd;
        size_t l = utf8_next((const unsigned char *)text + i, len - i, &cp);
        n += utf8_put(cp, clean + n);
        i += l ? l : 1;
    }

    /* 2. words: the patterns' matches and the text between them */
    if (split_words(&s, clean, n, 0, md, out, cap, count)) goto done;
    rc = 0;
done:
    pcre2_match_data_free(md);
    free(s.heap.v);
    free(s.sym);
    free(s.buf);
    free(clean);
    return rc;
}

cake_token cake_tokenizer_find(const cake_tokenizer *t, const char *text, size_t len) {
    return tok_lookup(t, text, len);
}

int64_t cake_tokenize(const cake_tokenizer *t, const char *text, size_t len, bool add_bos,
                      cake_token *out, int64_t cap) {
    int64_t count = 0;
    if (!out) cap = 0;
    if (add_bos && t->bos >= 0) emit(t->bos, out, cap, &count);
    if (len == 0) return count;
    const int rc = t->bpe ? bpe_tokenize(t, text, len, out, cap, &count)
                          : spm_tokenize(t, text, len, out, cap, &count);
    return rc ? -1 : count;
}

/* ---- detokenization ---- */

const char *cake_token_text(const cake_tokenizer *t, cake_token id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        *len = 0;
        return "";
    }
    *len = t->piece_off[id + 1] - t->piece_off[id];
    return t->piece + t->piece_off[id];
}

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
