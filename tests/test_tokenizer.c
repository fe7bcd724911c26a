/* Tokenizer tests: llama.cpp's own test vectors for the Llama 2 SentencePiece
 * vocabulary (and for Llama 3's byte-level BPE one, where the models folder
 * has it), llama2.c's prompt ids for stories260K, detokenization, robustness
 * on malformed input, speed, the synthetic vocabulary of `cake mkmodel`, and
 * byte-level BPE on small vocabularies built here. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "model/gguf.h"
#include "model/synth_vocab.h"
#include "model/tokenizer.h"
#include "testutil.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

/* ---- helpers ---- */

typedef struct {
    cake_gguf *g;
    cake_tokenizer *t;
} loaded;

/* Opens a shared model's vocabulary; false (and a skip message) when absent. */
static bool load_vocab(const char *name, loaded *l) {
    const char *path = test_model_path(name);
    if (!path) return false;
    char err[256];
    int rc = cake_gguf_open(path, &l->g, err, sizeof(err));
    if (rc) fprintf(stderr, "%s: %s\n", path, err);
    assert_int_equal(rc, 0);
    rc = cake_tokenizer_init(l->g, &l->t, err, sizeof(err));
    if (rc) fprintf(stderr, "%s: %s\n", path, err);
    assert_int_equal(rc, 0);
    return true;
}

static void unload(loaded *l) {
    cake_tokenizer_free(l->t);
    cake_gguf_close(l->g);
}

/* Tokenizes into a malloc'ed array (count in *n), checking that the sizing call
 * and the filling call agree. */
static cake_token *tokenize(const cake_tokenizer *t, const char *s, size_t len, bool bos,
                            int64_t *n) {
    int64_t need = cake_tokenize(t, s, len, bos, NULL, 0);
    assert_true(need >= 0);
    cake_token *ids = malloc((size_t)(need + 1) * sizeof(*ids));
    assert_non_null(ids);
    assert_int_equal(cake_tokenize(t, s, len, bos, ids, need), need);
    for (int64_t i = 0; i < need; i++) {
        assert_true(ids[i] >= 0);
        assert_true(ids[i] < cake_tokenizer_n_vocab(t));
    }
    *n = need;
    return ids;
}

/* Concatenated pieces of ids (prev chained as a streaming caller would), into
 * a malloc'ed NUL-terminated buffer; length in *len. */
static char *detokenize(const cake_tokenizer *t, const cake_token *ids, int64_t n, size_t *len) {
    size_t cap = 64, used = 0;
    char *s = malloc(cap);
    assert_non_null(s);
    for (int64_t i = 0; i < n; i++) {
        int k = cake_token_to_piece(t, i ? ids[i - 1] : -1, ids[i], NULL, 0);
        assert_true(k >= 0);
        if (used + (size_t)k + 1 > cap) {
            cap = 2 * (used + (size_t)k + 1);
            s = realloc(s, cap);
            assert_non_null(s);
        }
        assert_int_equal(cake_token_to_piece(t, i ? ids[i - 1] : -1, ids[i], s + used, (size_t)k),
                         k);
        used += (size_t)k;
    }
    s[used] = '\0';
    *len = used;
    return s;
}

static void print_ids(const char *label, const cake_token *ids, int64_t n) {
    fprintf(stderr, "  %s (%lld):", label, (long long)n);
    for (int64_t i = 0; i < n; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "\n");
}

static void assert_round_trip(const cake_tokenizer *t, const char *s, size_t len) {
    int64_t n;
    cake_token *ids = tokenize(t, s, len, false, &n);
    size_t dlen;
    char *d = detokenize(t, ids, n, &dlen);
    if (dlen != len || memcmp(d, s, len) != 0) {
        fprintf(stderr, "round trip failed for '%.*s': got '%s'\n", (int)len, s, d);
        fail();
    }
    free(d);
    free(ids);
}

/* ---- llama.cpp's test vectors ---- */

typedef struct {
    char *inp; /* whole .inp file; cases point into it */
    char *out; /* whole .out file */
    const char **text;
    size_t *len;
    char **expect; /* one line of ids per case (NUL-terminated in out) */
    int n;
} vocab_cases;

/* Splits the files exactly as llama.cpp's test-tokenizer-0 does: cases are
 * separated by "\n__ggml_vocab_test__\n" (so a case never includes the newline
 * before the separator, and the file ends with a separator); the .out file has
 * one line of space-separated ids per case. */
static bool read_cases(const char *vocab, vocab_cases *c) {
    char name[128];
    snprintf(name, sizeof(name), "%s.inp", vocab);
    const char *pin = test_model_path(name);
    if (!pin) return false;
    size_t n_inp;
    c->inp = test_read_file(pin, &n_inp);
    assert_non_null(c->inp);
    snprintf(name, sizeof(name), "%s.out", vocab);
    const char *pout = test_model_path(name);
    if (!pout) return false;
    size_t n_out;
    c->out = test_read_file(pout, &n_out);
    assert_non_null(c->out);
    c->out = realloc(c->out, n_out + 1);
    c->out[n_out] = '\0';

    static const char sep[] = "\n__ggml_vocab_test__\n";
    const size_t seplen = sizeof(sep) - 1;
    c->text = malloc(256 * sizeof(*c->text));
    c->len = malloc(256 * sizeof(*c->len));
    c->expect = malloc(256 * sizeof(*c->expect));
    c->n = 0;
    size_t pos = 0;
    while (pos < n_inp) {
        assert_true(c->n < 256);
        const char *next = memmem(c->inp + pos, n_inp - pos, sep, seplen);
        size_t end = next ? (size_t)(next - c->inp) : n_inp;
        c->text[c->n] = c->inp + pos;
        c->len[c->n] = end - pos;
        c->n++;
        pos = next ? end + seplen : n_inp;
    }
    int lines = 0; /* as std::getline: a final newline does not start another line */
    for (char *p = c->out, *end = c->out + n_out; p < end;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) nl = end;
        *nl = '\0';
        if (lines < 256) c->expect[lines] = p;
        lines++;
        p = nl + 1;
    }
    if (lines != c->n) fprintf(stderr, ".inp has %d cases, .out %d lines\n", c->n, lines);
    assert_int_equal(lines, c->n);
    return true;
}

static void free_cases(vocab_cases *c) {
    free(c->inp);
    free(c->out);
    free(c->text);
    free(c->len);
    free(c->expect);
}

/* Runs llama.cpp's test vectors of one vocabulary; false when its files are
 * absent. */
static bool run_vectors(const char *vocab, int32_t n_vocab) {
    loaded l;
    vocab_cases c;
    if (!load_vocab(vocab, &l)) return false;
    if (!read_cases(vocab, &c)) {
        unload(&l);
        return false;
    }
    assert_int_equal(cake_tokenizer_n_vocab(l.t), n_vocab);
    assert_true(c.n >= 40); /* 46-47 at the time of writing */
    int failed = 0;
    for (int i = 0; i < c.n; i++) {
        cake_token want[4096];
        int64_t nwant = 0;
        for (char *p = c.expect[i], *end;; p = end) {
            long v = strtol(p, &end, 10);
            if (end == p) break;
            assert_true(nwant < 4096);
            want[nwant++] = (cake_token)v;
        }
        /* test-tokenizer-0 tokenizes with add_special = false: no BOS. */
        int64_t n;
        cake_token *got = tokenize(l.t, c.text[i], c.len[i], false, &n);
        if (n != nwant || memcmp(got, want, (size_t)n * sizeof(*got)) != 0) {
            fprintf(stderr, "case %d failed: '%.*s'\n", i, (int)c.len[i], c.text[i]);
            print_ids("expected", want, nwant);
            print_ids("got     ", got, n);
            failed++;
        }
        free(got);
    }
    fprintf(stderr, "%s vectors: %d of %d cases pass\n", vocab, c.n - failed, c.n);
    assert_int_equal(failed, 0);

    /* Every case also detokenizes back to its text: SentencePiece with byte
     * fallback and byte-level BPE are lossless for valid UTF-8 (the space
     * SentencePiece prepends is dropped from the first piece). */
    for (int i = 0; i < c.n; i++) assert_round_trip(l.t, c.text[i], c.len[i]);
    free_cases(&c);
    unload(&l);
    return true;
}

static void test_llama_spm_vectors(void **state) {
    (void)state;
    if (!run_vectors("ggml-vocab-llama-spm.gguf", 32000)) skip();
}

/* Llama 3's vocabulary is not in ../shared/models; where a models folder has
 * llama.cpp's ggml-vocab-llama-bpe.gguf with its .inp/.out, it is checked too. */
static void test_llama_bpe_vectors(void **state) {
    (void)state;
    if (!run_vectors("ggml-vocab-llama-bpe.gguf", 128256)) skip();
}

/* ---- specials, BOS, detokenization ---- */

static void test_bos_and_plain_specials(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    const cake_tokenizer *t = l.t;
    assert_int_equal(cake_tokenizer_bos(t), 1);
    assert_int_equal(cake_tokenizer_eos(t), 2);
    assert_true(cake_tokenizer_add_bos(t));

    int64_t n0, n1;
    cake_token *a = tokenize(t, "Hello world", 11, false, &n0);
    cake_token *b = tokenize(t, "Hello world", 11, true, &n1);
    assert_int_equal(n0, 2);
    assert_int_equal(a[0], 15043); /* from the .out vectors */
    assert_int_equal(a[1], 3186);
    assert_int_equal(n1, n0 + 1);
    assert_int_equal(b[0], 1);
    assert_memory_equal(b + 1, a, (size_t)n0 * sizeof(*a));
    free(a);
    free(b);

    /* Control-token spellings in the text are text, never the control ids. */
    static const char *const specials[] = {"<s>", "</s>", "<unk>", "<s>Hello</s>", " <s> "};
    for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); i++) {
        int64_t n;
        cake_token *ids = tokenize(t, specials[i], strlen(specials[i]), false, &n);
        assert_true(n >= 3);
        for (int64_t k = 0; k < n; k++) {
            assert_int_not_equal(ids[k], 0);
            assert_int_not_equal(ids[k], 1);
            assert_int_not_equal(ids[k], 2);
        }
        free(ids);
        assert_round_trip(t, specials[i], strlen(specials[i]));
    }
    unload(&l);
}

static void test_empty_text(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    cake_token ids[4] = {-7, -7, -7, -7};
    assert_int_equal(cake_tokenize(l.t, "", 0, false, ids, 4), 0);
    assert_int_equal(ids[0], -7);
    /* As SentencePiece: encode('', add_special_tokens=True) == [BOS] */
    assert_int_equal(cake_tokenize(l.t, "", 0, true, ids, 4), 1);
    assert_int_equal(ids[0], 1);
    assert_int_equal(cake_tokenize(l.t, NULL, 0, true, NULL, 0), 1);
    unload(&l);
}

static void test_capacity(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    const char *s = " Hello, world!"; /* 29871 15043 29892 3186 29991 */
    cake_token ids[8];
    for (int i = 0; i < 8; i++) ids[i] = -7;
    assert_int_equal(cake_tokenize(l.t, s, strlen(s), false, ids, 2), 5);
    assert_int_equal(ids[0], 29871);
    assert_int_equal(ids[1], 15043);
    for (int i = 2; i < 8; i++) assert_int_equal(ids[i], -7);
    unload(&l);
}

static void test_token_to_piece(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    const cake_tokenizer *t = l.t;
    char buf[32];
    memset(buf, 'x', sizeof(buf));
    /* 15043 = "▁Hello": a space in the middle of a text */
    assert_int_equal(cake_token_to_piece(t, 3186, 15043, buf, sizeof(buf)), 6);
    assert_memory_equal(buf, " Hello", 6);
    /* the prepended space is dropped at the start and after BOS */
    assert_int_equal(cake_token_to_piece(t, -1, 15043, buf, sizeof(buf)), 5);
    assert_memory_equal(buf, "Hello", 5);
    assert_int_equal(cake_token_to_piece(t, 1, 15043, buf, sizeof(buf)), 5);
    assert_memory_equal(buf, "Hello", 5);
    /* byte tokens: <0x0A> = 13 is a newline, <0x00> = 3 a NUL byte */
    assert_int_equal(cake_token_to_piece(t, 15043, 13, buf, sizeof(buf)), 1);
    assert_int_equal(buf[0], '\n');
    assert_int_equal(cake_token_to_piece(t, 15043, 3, buf, sizeof(buf)), 1);
    assert_int_equal(buf[0], '\0');
    /* control and unknown tokens print nothing */
    assert_int_equal(cake_token_to_piece(t, -1, 1, buf, sizeof(buf)), 0);
    assert_int_equal(cake_token_to_piece(t, 15043, 2, buf, sizeof(buf)), 0);
    assert_int_equal(cake_token_to_piece(t, 15043, 0, buf, sizeof(buf)), 0);
    /* out of range */
    assert_int_equal(cake_token_to_piece(t, -1, -1, buf, sizeof(buf)), -1);
    assert_int_equal(cake_token_to_piece(t, -1, 32000, buf, sizeof(buf)), -1);
    /* a short buffer gets a prefix and the full length */
    memset(buf, 'x', sizeof(buf));
    assert_int_equal(cake_token_to_piece(t, 3186, 15043, buf, 2), 6);
    assert_memory_equal(buf, " Hx", 3);
    unload(&l);
}

/* ---- malformed input ---- */

static void test_invalid_utf8_and_nul(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    /* Each case is tokenized from an exact-size heap copy, so that ASan sees a
     * read past the end. */
    static const struct {
        const char *s;
        size_t len;
        bool round_trips;
    } cases[] = {
        {"\xe2", 1, true},          /* truncated 3-byte sequence at the end */
        {"\xf0\x9f", 2, true},      /* truncated 4-byte sequence */
        {"a\xf0\x9f\xa6", 4, true}, /* truncated at the end after text */
        {"\x80\x80\xbf", 3, true},  /* lone continuation bytes */
        {"\xff\xfe\xf8", 3, true},  /* bytes that never occur in UTF-8 */
        {"\xc3(abc", 5, true},      /* lead byte + non-continuation */
        {"\xe2Xy", 3, true},        /* 3-byte lead swallowing ASCII */
        {"x\xf0", 2, true},         /* 4-byte lead with one byte left */
        {"a\0b", 3, true},          /* NUL inside, length-based */
        {"\0", 1, true},
        {"Hello\0 world\0\0", 14, true},
        /* A lead byte before a space swallows part of the escaped "▁": the
         * bytes e2 96 81 then come back as a raw "▁" instead of a space. This
         * is what llama.cpp does too; the only case where the round trip is
         * not exact. */
        {"\xe2 b", 3, false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *copy = malloc(cases[i].len);
        assert_non_null(copy);
        memcpy(copy, cases[i].s, cases[i].len);
        for (int bos = 0; bos < 2; bos++) {
            int64_t n;
            cake_token *ids = tokenize(l.t, copy, cases[i].len, bos, &n);
            assert_true(n >= 1 + bos);
            free(ids);
        }
        if (cases[i].round_trips) assert_round_trip(l.t, copy, cases[i].len);
        free(copy);
    }
    /* NUL goes through byte fallback as <0x00> (id 3) */
    int64_t n;
    cake_token *ids = tokenize(l.t, "a\0b", 3, false, &n);
    bool has_nul = false;
    for (int64_t k = 0; k < n; k++) has_nul |= ids[k] == 3;
    assert_true(has_nul);
    free(ids);
    unload(&l);
}

/* ---- a plain reference: naive O(n^2) merging, sorted-array lookup ---- */

/* SentencePiece BPE written the obvious way: rescan every adjacent pair, merge
 * the best-scoring one (ties: leftmost), repeat. The heap version must agree
 * with it on any input. */
typedef struct {
    const char *s;
    size_t n;
    cake_token id;
} ref_entry;

typedef struct {
    ref_entry *sorted;       /* by text */
    const float *scores_raw; /* unaligned little-endian f32 in the GGUF map */
    int n;
} ref_vocab;

static int ref_cmp(const void *a, const void *b) {
    const ref_entry *x = a, *y = b;
    size_t m = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->s, y->s, m);
    return c ? c : (x->n > y->n) - (x->n < y->n);
}

static cake_token ref_lookup(const ref_vocab *v, const char *s, size_t n) {
    ref_entry key = {s, n, -1};
    const ref_entry *e = bsearch(&key, v->sorted, (size_t)v->n, sizeof(key), ref_cmp);
    return e ? e->id : -1;
}

static float ref_score(const ref_vocab *v, cake_token id) {
    float f;
    memcpy(&f, (const char *)v->scores_raw + 4 * (size_t)id, 4);
    return f;
}

/* Returns the number of ids written to out (cap must be enough). */
static int ref_tokenize(const ref_vocab *v, const char *text, size_t len, cake_token *out) {
    if (len == 0) return 0;
    char *buf = malloc(3 * len + 3);
    size_t n = 0;
    memcpy(buf, "\xe2\x96\x81", 3);
    n = 3;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(buf + n, "\xe2\x96\x81", 3);
            n += 3;
        } else {
            buf[n++] = text[i];
        }
    }
    size_t *off = malloc((n + 1) * sizeof(*off)); /* symbol i = buf[off[i], off[i+1]) */
    int ns = 0;
    for (size_t p = 0; p < n;) {
        unsigned char c = (unsigned char)buf[p];
        size_t l = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
        off[ns++] = p;
        p += l < n - p ? l : n - p;
    }
    off[ns] = n;
    for (;;) {
        int best = -1;
        float best_score = 0;
        for (int i = 0; i + 1 < ns; i++) {
            cake_token id = ref_lookup(v, buf + off[i], off[i + 2] - off[i]);
            if (id >= 0 && (best < 0 || ref_score(v, id) > best_score)) {
                best = i;
                best_score = ref_score(v, id);
            }
        }
        if (best < 0) break;
        memmove(off + best + 1, off + best + 2, (size_t)(ns - best - 1) * sizeof(*off));
        ns--;
    }
    int k = 0;
    for (int i = 0; i < ns; i++) {
        cake_token id = ref_lookup(v, buf + off[i], off[i + 1] - off[i]);
        if (id >= 0) {
            out[k++] = id;
            continue;
        }
        for (size_t j = off[i]; j < off[i + 1]; j++) {
            char name[8];
            snprintf(name, sizeof(name), "<0x%02X>", (unsigned char)buf[j]);
            out[k++] = ref_lookup(v, name, 6);
        }
    }
    free(off);
    free(buf);
    return k;
}

static void test_matches_reference(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    const cake_gguf_kv *tk = cake_gguf_find_kv(l.g, "tokenizer.ggml.tokens");
    const cake_gguf_kv *sk = cake_gguf_find_kv(l.g, "tokenizer.ggml.scores");
    assert_non_null(tk);
    assert_non_null(sk);
    ref_vocab v = {malloc(tk->arr_n * sizeof(ref_entry)), sk->arr_data, (int)tk->arr_n};
    for (int i = 0; i < v.n; i++)
        v.sorted[i] = (ref_entry){tk->arr_strs[i].ptr, tk->arr_strs[i].len, i};
    qsort(v.sorted, (size_t)v.n, sizeof(ref_entry), ref_cmp);

    /* Random texts from pieces that exercise merging, multi-byte characters,
     * byte fallback and invalid UTF-8. */
    static const char *const parts[] = {"the",
                                        " ",
                                        "  ",
                                        "a",
                                        "in",
                                        "ing",
                                        "er",
                                        "Hello",
                                        ",",
                                        ".",
                                        "\n",
                                        "\t",
                                        "3",
                                        "33",
                                        "é",
                                        "ü",
                                        "нещо",
                                        "世界",
                                        "\xf0\x9f\xa6\x99",
                                        "\xe2",
                                        "\x80",
                                        "\xff",
                                        "\0",
                                        "'s",
                                        "<s>",
                                        "qu",
                                        "x",
                                        "zz"};
    const int n_parts = (int)(sizeof(parts) / sizeof(parts[0]));
    uint32_t rng = 12345;
    char text[256];
    cake_token want[1024], got[1024];
    const int n_texts = SANITIZED ? 300 : 1500;
    for (int it = 0; it < n_texts; it++) {
        size_t len = 0;
        int k = (int)(rng % 24);
        for (int j = 0; j < k; j++) {
            rng = rng * 1664525u + 1013904223u;
            int pi = (int)((rng >> 8) % (uint32_t)n_parts);
            size_t pl = pi == 22 ? 1 : strlen(parts[pi]); /* "\0" is one NUL byte */
            memcpy(text + len, parts[pi], pl);
            len += pl;
        }
        rng = rng * 1664525u + 1013904223u;
        int nw = ref_tokenize(&v, text, len, want);
        int64_t ng = cake_tokenize(l.t, text, len, false, got, 1024);
        if (ng != nw || memcmp(got, want, (size_t)nw * sizeof(*got)) != 0) {
            fprintf(stderr, "text %d differs from the reference: '%.*s'\n", it, (int)len, text);
            print_ids("reference", want, nw);
            print_ids("cake     ", got, ng);
            fail();
        }
    }
    free(v.sorted);
    unload(&l);
}

/* ---- speed ---- */

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void test_speed_100k(void **state) {
    (void)state;
    loaded l;
    vocab_cases c;
    if (!load_vocab("ggml-vocab-llama-spm.gguf", &l)) skip();
    if (!read_cases("ggml-vocab-llama-spm.gguf", &c)) {
        unload(&l);
        skip();
    }
    /* 100 KB of the test texts (English, Cyrillic, Khmer, CJK, emoji, runs of
     * spaces and digits) one after another. */
    const size_t size = 100 * 1024;
    char *text = malloc(size);
    assert_non_null(text);
    size_t used = 0;
    for (int i = 0; used < size; i = (i + 1) % c.n) {
        size_t k = c.len[i] < size - used ? c.len[i] : size - used;
        memcpy(text + used, c.text[i], k);
        used += k;
        if (used < size) text[used++] = '\n';
    }
    double best = 1e9;
    int64_t n = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_ms();
        n = cake_tokenize(l.t, text, size, true, NULL, 0);
        double dt = now_ms() - t0;
        if (dt < best) best = dt;
    }
    fprintf(stderr, "tokenize 100 KB: %lld tokens in %.1f ms (best of 3)%s\n", (long long)n, best,
            SANITIZED ? " [sanitizer build]" : "");
    assert_true(n > 10000);
    assert_true(best < (SANITIZED ? 1000.0 : 100.0));
    free(text);
    free_cases(&c);
    unload(&l);
}

/* ---- stories260K against llama2.c ---- */

/* Reads "<key> id id id" from the golden file into ids; returns the count. */
static int golden_ids(const char *golden, const char *key, cake_token *ids, int cap) {
    const char *p = strstr(golden, key);
    assert_non_null(p);
    p += strlen(key);
    int n = 0;
    for (char *end;; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p || n == cap) break;
        ids[n++] = (cake_token)v;
        if (*end == '\n') break;
    }
    return n;
}

static void test_stories260k(void **state) {
    (void)state;
    loaded l;
    if (!load_vocab("stories260K.gguf", &l)) skip();
    const char *gpath = test_model_path("golden/stories260K-greedy.txt");
    if (!gpath) {
        unload(&l);
        skip();
    }
    size_t glen;
    char *golden = test_read_file(gpath, &glen);
    assert_non_null(golden);
    golden = realloc(golden, glen + 1);
    golden[glen] = '\0';

    cake_token ids[128];
    int np = golden_ids(golden, "\nprompt_ids ", ids, 128);
    assert_int_equal(np, 5); /* 1 403 407 261 378 */
    int64_t n;
    const char *prompt = "Once upon a time";
    cake_token *got = tokenize(l.t, prompt, strlen(prompt), cake_tokenizer_add_bos(l.t), &n);
    if (n != np || memcmp(got, ids, (size_t)n * sizeof(*got)) != 0) {
        print_ids("expected", ids, np);
        print_ids("got     ", got, n);
        fail();
    }
    free(got);

    /* Prompt + greedy continuation detokenizes to llama2.c's printed text (the
     * golden line holds the first sentences, the ids a bit less or more). */
    int ng = golden_ids(golden, "\ngreedy_ids ", ids + np, 128 - np);
    assert_true(ng >= 30);
    size_t dlen;
    char *d = detokenize(l.t, ids, np + ng, &dlen);
    const char *line = strstr(golden, "\n# Once upon a time");
    assert_non_null(line);
    line += 3;
    size_t llen = strcspn(line, "\n");
    size_t m = dlen < llen ? dlen : llen;
    if (m < 100 || memcmp(d, line, m) != 0) {
        fprintf(stderr, "detokenized: '%s'\ngolden:      '%.*s'\n", d, (int)llen, line);
        fail();
    }
    free(d);
    free(golden);
    unload(&l);
}

/* ---- byte-level BPE on small vocabularies ---- */

/* GPT-2's character for byte b (the printable Latin-1 bytes stand for
 * themselves, the other 68 for U+0100 upwards, in order), as UTF-8. Written
 * here again from the scheme, not taken from the tokenizer. */
enum { BPE_EXTRA = 8 };

/* A byte-level vocabulary: ids 0-255 are the bytes' characters, then the
 * extra tokens (in GPT-2 characters), with merge rules and a pre-tokenizer. */
static cake_tokenizer *bpe_vocab(const char *pre, const char *const *extra, int n_extra,
                                 const int32_t *extra_types, const char *const *merges,
                                 int n_merges) {
    const char *tokens[256 + BPE_EXTRA];
    int32_t types[256 + BPE_EXTRA];
    assert_true(n_extra <= BPE_EXTRA);
    for (int b = 0; b < 256; b++) {
        tokens[b] = test_gpt2_byte_char(b);
        types[b] = CAKE_TOKEN_NORMAL;
    }
    for (int i = 0; i < n_extra; i++) {
        tokens[256 + i] = extra[i];
        types[256 + i] = extra_types ? extra_types[i] : CAKE_TOKEN_NORMAL;
    }
    cake_vocab_arrays v = {.n_vocab = 256 + n_extra,
                           .tokens = tokens,
                           .types = types,
                           .bos = -1,
                           .eos = -1,
                           .unk = -1,
                           .merges = merges,
                           .n_merges = n_merges,
                           .pre = pre};
    cake_tokenizer *t = NULL;
    char err[256];
    int rc = cake_tokenizer_init_arrays(&v, &t, err, sizeof(err));
    if (rc) fprintf(stderr, "bpe vocab: %s\n", err);
    assert_int_equal(rc, 0);
    return t;
}

static void assert_ids(const cake_tokenizer *t, const char *text, size_t len,
                       const cake_token *want, int64_t n_want) {
    int64_t n;
    cake_token *got = tokenize(t, text, len, false, &n);
    if (n != n_want || memcmp(got, want, (size_t)n * sizeof(*got)) != 0) {
        fprintf(stderr, "'%.*s':\n", (int)len, text);
        print_ids("expected", want, n_want);
        print_ids("got     ", got, n);
        fail();
    }
    free(got);
}
#define ASSERT_IDS(t, text, ...)                                                                   \
    do {                                                                                           \
        const cake_token want_[] = {__VA_ARGS__};                                                  \
        assert_ids(t, text, sizeof(text) - 1, want_, sizeof(want_) / sizeof(want_[0]));            \
    } while (0)

/* Merges apply by rank, not by position, and equal pairs leftmost first. */
static void test_bpe_merge_order(void **state) {
    (void)state;
    static const char *const extra[] = {"bc", "ab", "aa"};
    static const char *const merges[] = {"b c", "a b", "a a"};
    cake_tokenizer *t = bpe_vocab("qwen2", extra, 3, NULL, merges, 3);
    ASSERT_IDS(t, "abc", 'a', 256); /* "b c" (rank 0) before "a b" (rank 1) */
    ASSERT_IDS(t, "ab", 257);       /* only "a b" applies */
    ASSERT_IDS(t, "aaa", 258, 'a'); /* "a a" twice: the left pair first */
    ASSERT_IDS(t, "aaaa", 258, 258);
    cake_tokenizer_free(t);

    /* The same rules in the other order: "a b" now wins in "abc". */
    static const char *const swapped[] = {"a b", "b c", "a a"};
    t = bpe_vocab("qwen2", extra, 3, NULL, swapped, 3);
    ASSERT_IDS(t, "abc", 257, 'c');
    cake_tokenizer_free(t);
}

/* The Llama 3 pre-tokenizer's words, made visible by ignore_merges: a word
 * that is a token comes out as that one token, whatever the merges. */
static void test_bpe_llama3_words(void **state) {
    (void)state;
    /* "Ġ" is ' ', "Ċ" is '\n' in GPT-2's characters */
    static const char *const extra[] = {"'m",        "123", "45", "\xc4\xa0ok", "\xc4\x8a\xc4\x8a",
                                        "\xc4\xa0x", "xyz", "'M"};
    cake_tokenizer *t = bpe_vocab("llama-bpe", extra, 8, NULL, NULL, 0);
    /* words: "I" "'m" " " "123" "45" " ok" "\n\n" */
    ASSERT_IDS(t, "I'm 12345 ok\n\n", 'I', 256, ' ', 257, 258, 259, 260);
    /* two spaces before a letter: "\s+(?!\S)" keeps the last space for the word */
    ASSERT_IDS(t, "  x", ' ', 261);
    /* "xyz" is a token with no merge rules: ignore_merges finds it */
    ASSERT_IDS(t, "xyz", 262);
    /* the contractions in either case */
    ASSERT_IDS(t, "I'M", 'I', 263);
    cake_tokenizer_free(t);

    /* Qwen2 has no ignore_merges and takes digits one by one. */
    static const char *const merges[] = {"1 2"};
    static const char *const extra2[] = {"12", "xyz"};
    t = bpe_vocab("qwen2", extra2, 2, NULL, merges, 1);
    ASSERT_IDS(t, "12", '1', '2'); /* two words: the rule cannot apply */
    ASSERT_IDS(t, "xyz", 'x', 'y', 'z');
    cake_tokenizer_free(t);
    t = bpe_vocab("llama-bpe", extra2, 2, NULL, merges, 1);
    ASSERT_IDS(t, "12", 256); /* one word ("\p{N}{1,3}"): the rule applies */
    cake_tokenizer_free(t);
    /* tekken (Mistral Nemo, Small 3): capitalised words apart, digits one
     * by one, ignore_merges */
    static const char *const tekken_extra[] = {"Hello", "World", "\xc4\xa0ok"};
    t = bpe_vocab("tekken", tekken_extra, 3, NULL, NULL, 0);
    ASSERT_IDS(t, "HelloWorld 12 ok", 256, 257, ' ', '1', '2', 258);
    cake_tokenizer_free(t);
    /* smollm (SmolLM, StarCoder): digits apart first, then GPT-2's words
     * inside each piece ("ab12 cd": "ab" "1" "2" " cd"), merges only */
    static const char *const gpt2_merges[] = {"a b", "\xc4\xa0 c",
                                              "\xc4\xa0"
                                              "c d",
                                              "1 2"};
    static const char *const gpt2_extra[] = {"ab",
                                             "\xc4\xa0"
                                             "c",
                                             "\xc4\xa0"
                                             "cd",
                                             "12"};
    t = bpe_vocab("smollm", gpt2_extra, 4, NULL, gpt2_merges, 4);
    ASSERT_IDS(t, "ab12 cd", 256, '1', '2', 258);
    ASSERT_IDS(t, "x  cd", 'x', ' ', 258); /* " " before " cd": \s+(?!\S) */
    cake_tokenizer_free(t);
    /* gpt-2: the same words without the digit split */
    t = bpe_vocab("gpt-2", gpt2_extra, 4, NULL, gpt2_merges, 4);
    ASSERT_IDS(t, "ab12 cd", 256, 259, 258);
    cake_tokenizer_free(t);
    /* gpt-4o (Phi-4-mini, o200k): a capital starts a word ("sH" is two
     * words, which Llama 3's pattern keeps as one) */
    static const char *const case_merges[] = {"s H"};
    static const char *const case_extra[] = {"sH"};
    t = bpe_vocab("gpt-4o", case_extra, 1, NULL, case_merges, 1);
    ASSERT_IDS(t, "sH", 's', 'H');
    ASSERT_IDS(t, "12345", '1', '2', '3', '4', '5');
    cake_tokenizer_free(t);
    t = bpe_vocab("llama-bpe", case_extra, 1, NULL, case_merges, 1);
    ASSERT_IDS(t, "sH", 256);
    cake_tokenizer_free(t);
    /* dbrx (Phi-4): Llama 3's words, but merges only (no ignore_merges) */
    t = bpe_vocab("dbrx", extra2, 2, NULL, merges, 1);
    ASSERT_IDS(t, "12", 256);
    ASSERT_IDS(t, "xyz", 'x', 'y', 'z');
    ASSERT_IDS(t, "12 x", 256, ' ', 'x');
    cake_tokenizer_free(t);
}

/* Every byte is a character: valid UTF-8 of any bytes comes back exactly;
 * invalid UTF-8 reads as U+FFFD, as llama.cpp reads it. */
static void test_bpe_bytes(void **state) {
    (void)state;
    cake_tokenizer *t = bpe_vocab("llama-bpe", NULL, 0, NULL, NULL, 0);
    char all[160];
    size_t n = 0;
    for (int b = 0; b < 128; b++) all[n++] = (char)b; /* NUL and control bytes included */
    const char *more = "\xc3\xa9\xc2\xa0\xc2\xad\xe6\x97\xa5\xf0\x9f\x98\x80 \t\r\n";
    memcpy(all + n, more, strlen(more));
    n += strlen(more);
    assert_round_trip(t, all, n);
    int64_t k;
    cake_token *ids = tokenize(t, all, n, false, &k);
    assert_int_equal(k, (int64_t)n); /* no merges: one token per byte */
    for (size_t i = 0; i < n; i++) assert_int_equal(ids[i], (unsigned char)all[i]);
    free(ids);

    /* a stray byte, a truncated character and a lone continuation byte */
    ASSERT_IDS(t, "a\xff", 'a', 0xef, 0xbf, 0xbd);
    ASSERT_IDS(t, "\xe6\x97", 0xef, 0xbf, 0xbd, 0xef, 0xbf, 0xbd);
    /* an overlong NUL is read as NUL, as llama.cpp does */
    ASSERT_IDS(t, "\xc0\x80", 0);
    cake_tokenizer_free(t);
}

/* Pieces: characters back to bytes; user-defined verbatim; control nothing. */
static void test_bpe_pieces(void **state) {
    (void)state;
    static const char *const extra[] = {"\xc4\xa0hello", "<|eot|>", "<tool>"};
    static const int32_t types[] = {CAKE_TOKEN_NORMAL, CAKE_TOKEN_CONTROL, CAKE_TOKEN_USER_DEFINED};
    cake_tokenizer *t = bpe_vocab("llama-bpe", extra, 3, types, NULL, 0);
    char buf[32];
    assert_int_equal(cake_token_to_piece(t, -1, 256, buf, sizeof(buf)), 6);
    assert_memory_equal(buf, " hello", 6); /* no SentencePiece-style space drop */
    assert_int_equal(cake_token_to_piece(t, -1, 257, buf, sizeof(buf)), 0);
    assert_int_equal(cake_token_to_piece(t, -1, 258, buf, sizeof(buf)), 6);
    assert_memory_equal(buf, "<tool>", 6);
    assert_int_equal(cake_token_to_piece(t, -1, 0x0a, buf, sizeof(buf)), 1); /* "Ċ" */
    assert_int_equal(buf[0], '\n');
    /* control strings in the text stay text */
    ASSERT_IDS(t, "<|eot|>", '<', '|', 'e', 'o', 't', '|', '>');
    cake_tokenizer_free(t);

    /* an unknown pre-tokenizer is refused by name */
    const char *tokens[] = {"a"};
    const char *merges[] = {"a a"};
    cake_vocab_arrays v = {.n_vocab = 1,
                           .tokens = tokens,
                           .bos = -1,
                           .eos = -1,
                           .unk = -1,
                           .merges = merges,
                           .n_merges = 1,
                           .pre = "deepseek-coder"};
    char err[256];
    assert_int_equal(cake_tokenizer_init_arrays(&v, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "deepseek-coder"));
}

/* ---- GGUF key handling ---- */

/* Writes a vocabulary-only GGUF with the keys that `build` adds; returns the
 * temp path (static buffer). */
static const char *write_gguf(void (*build)(cake_gguf_writer *w)) {
    static char path[64];
    snprintf(path, sizeof(path), "/tmp/cake_test_tok_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    cake_gguf_writer *w = cake_gguf_writer_init();
    assert_non_null(w);
    build(w);
    char err[256];
    int rc = cake_gguf_writer_write_file(w, path, NULL, NULL, err, sizeof(err));
    if (rc) fprintf(stderr, "writer: %s\n", err);
    assert_int_equal(rc, 0);
    cake_gguf_writer_free(w);
    return path;
}

static const char *const k_small[] = {"<unk>",
                                      "<s>",
                                      "</s>",
                                      "\xe2\x96\x81",
                                      "a",
                                      "b",
                                      "\xe2\x96\x81"
                                      "a",
                                      "ab"};
static const float k_small_scores[] = {0, 0, 0, -1, -2, -3, -4, -5};
static const int32_t k_small_types[] = {2, 3, 3, 1, 1, 1, 1, 1};
#define N_SMALL 8

static void add_tokens(cake_gguf_writer *w) {
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", k_small, N_SMALL);
}
static void add_good(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    add_tokens(w);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", k_small_scores, N_SMALL);
    cake_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", k_small_types, N_SMALL);
}
static void build_good(cake_gguf_writer *w) {
    add_good(w);
}
static void build_minimal(cake_gguf_writer *w) { /* no scores, no types, no ids */
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    add_tokens(w);
    cake_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", false);
    cake_gguf_writer_add_bool(w, "tokenizer.ggml.add_space_prefix", false);
}
static void build_gpt2_no_pre(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2");
    add_tokens(w);
}
static const char *const k_merges[] = {"a b"};
static void build_gpt2(cake_gguf_writer *w) { /* "Ġ" is ' ' */
    static const char *const tokens[] = {"a", "b", "ab", "\xc4\xa0", "<|begin_of_text|>"};
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2");
    cake_gguf_writer_add_str(w, "tokenizer.ggml.pre", "llama-bpe");
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", tokens, 5);
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", k_merges, 1);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 4);
}
static void build_gpt2_other_pre(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2");
    cake_gguf_writer_add_str(w, "tokenizer.ggml.pre", "deepseek-llm");
    add_tokens(w);
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", k_merges, 1);
}
static void build_gpt2_no_merges(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2");
    cake_gguf_writer_add_str(w, "tokenizer.ggml.pre", "llama-bpe");
    add_tokens(w);
}
static void build_gpt2_merges_f32(cake_gguf_writer *w) {
    build_gpt2_no_merges(w);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.merges", k_small_scores, 2);
}
static void build_t5(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "t5");
    add_tokens(w);
}
static void build_no_model(cake_gguf_writer *w) {
    add_tokens(w);
}
static void build_no_tokens(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
}
static void build_tokens_f32(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.tokens", k_small_scores, N_SMALL);
}
static void build_short_scores(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    add_tokens(w);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", k_small_scores, N_SMALL - 1);
}
static void build_short_types(cake_gguf_writer *w) {
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    add_tokens(w);
    cake_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", k_small_types, 3);
}
static void build_bos_range(cake_gguf_writer *w) {
    add_good(w);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", N_SMALL);
}
static void build_unk_range(cake_gguf_writer *w) {
    add_good(w);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 1000);
}
static void build_bool_type(cake_gguf_writer *w) {
    add_good(w);
    cake_gguf_writer_add_str(w, "tokenizer.ggml.add_bos_token", "yes");
}
static void build_duplicate(cake_gguf_writer *w) {
    static const char *const dup[] = {"<unk>", "<s>", "</s>", "a", "b", "a"};
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", dup, 6);
}

static int open_and_init(void (*build)(cake_gguf_writer *w), cake_tokenizer **t, char *err,
                         size_t errlen) {
    const char *path = write_gguf(build);
    cake_gguf *g = NULL;
    int rc = cake_gguf_open(path, &g, err, errlen);
    unlink(path);
    assert_int_equal(rc, 0);
    rc = cake_tokenizer_init(g, t, err, errlen);
    cake_gguf_close(g);
    if (rc) assert_null(*t);
    return rc;
}

static void test_gguf_keys(void **state) {
    (void)state;
    char err[256];
    cake_tokenizer *t = NULL;
    assert_int_equal(open_and_init(build_good, &t, err, sizeof(err)), 0);
    assert_int_equal(cake_tokenizer_n_vocab(t), N_SMALL);
    assert_int_equal(cake_tokenizer_bos(t), 1); /* llama.cpp's SPM defaults */
    assert_int_equal(cake_tokenizer_eos(t), 2);
    assert_true(cake_tokenizer_add_bos(t));
    cake_token ids[8];
    /* "ab" -> "▁a" "b" ("▁a" scores -4, "ab" -5: "▁a" merges first) */
    assert_int_equal(cake_tokenize(t, "ab", 2, true, ids, 8), 3);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 6);
    assert_int_equal(ids[2], 5);
    /* "c" is neither a token nor has a byte token: unk (0) */
    assert_int_equal(cake_tokenize(t, "c", 1, false, ids, 8), 2);
    assert_int_equal(ids[0], 3);
    assert_int_equal(ids[1], 0);
    cake_tokenizer_free(t);

    /* Optional keys absent: scores 0, all NORMAL; add_space_prefix false. */
    assert_int_equal(open_and_init(build_minimal, &t, err, sizeof(err)), 0);
    assert_false(cake_tokenizer_add_bos(t));
    assert_int_equal(cake_tokenize(t, "ab", 2, false, ids, 8), 1); /* "ab", no "▁" prefix */
    assert_int_equal(ids[0], 7);
    char buf[16];
    /* no token types: "<s>" is NORMAL and prints as text, like llama.cpp */
    assert_int_equal(cake_token_to_piece(t, -1, 1, buf, sizeof(buf)), 3);
    cake_tokenizer_free(t);

    /* Byte-level BPE: Llama 3's pre-tokenizer adds BOS by default. */
    assert_int_equal(open_and_init(build_gpt2, &t, err, sizeof(err)), 0);
    assert_true(cake_tokenizer_add_bos(t));
    assert_int_equal(cake_tokenizer_bos(t), 4);
    assert_int_equal(cake_tokenizer_eos(t), -1); /* no key: none */
    assert_int_equal(cake_tokenize(t, "ab ab", 5, true, ids, 8), 4);
    assert_int_equal(ids[0], 4);
    assert_int_equal(ids[1], 2); /* "ab" */
    assert_int_equal(ids[2], 3); /* " ab" is one word, "Ġ" "ab" in tokens */
    assert_int_equal(ids[3], 2);
    cake_tokenizer_free(t);

    static const struct {
        void (*build)(cake_gguf_writer *w);
        const char *key;
    } bad[] = {
        {build_t5, "tokenizer.ggml.model"},
        {build_gpt2_no_pre, "tokenizer.ggml.pre"},
        {build_gpt2_other_pre, "deepseek-llm"},
        {build_gpt2_no_merges, "tokenizer.ggml.merges"},
        {build_gpt2_merges_f32, "tokenizer.ggml.merges"},
        {build_no_model, "tokenizer.ggml.model"},
        {build_no_tokens, "tokenizer.ggml.tokens"},
        {build_tokens_f32, "tokenizer.ggml.tokens"},
        {build_short_scores, "tokenizer.ggml.scores"},
        {build_short_types, "tokenizer.ggml.token_type"},
        {build_bos_range, "tokenizer.ggml.bos_token_id"},
        {build_unk_range, "tokenizer.ggml.unknown_token_id"},
        {build_bool_type, "tokenizer.ggml.add_bos_token"},
        {build_duplicate, "duplicate"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_int_equal(open_and_init(bad[i].build, &t, err, sizeof(err)), -1);
        if (!strstr(err, bad[i].key)) {
            fprintf(stderr, "error for case %zu does not name '%s': %s\n", i, bad[i].key, err);
            fail();
        }
    }
}

/* ---- the synthetic vocabulary ---- */

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static bool valid_utf8(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int n = *p < 0x80 ? 1 : (*p >> 5) == 6 ? 2 : (*p >> 4) == 14 ? 3 : (*p >> 3) == 30 ? 4 : 0;
        if (!n) return false;
        for (int k = 1; k < n; k++)
            if ((p[k] & 0xc0) != 0x80) return false;
        p += n;
    }
    return true;
}

static void test_synth_vocab(void **state) {
    (void)state;
    const int nv = 32000;
    char **tok;
    float *sc;
    int32_t *ty;
    assert_int_equal(cake_synth_vocab_build(nv, &tok, &sc, &ty), 0);
    assert_string_equal(tok[0], "<unk>");
    assert_string_equal(tok[1], "<s>");
    assert_string_equal(tok[2], "</s>");
    assert_int_equal(ty[0], CAKE_TOKEN_UNKNOWN);
    assert_int_equal(ty[1], CAKE_TOKEN_CONTROL);
    assert_int_equal(ty[2], CAKE_TOKEN_CONTROL);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        assert_string_equal(tok[3 + b], name);
        assert_int_equal(ty[3 + b], CAKE_TOKEN_BYTE);
    }
    for (int i = 259; i < nv; i++) {
        assert_non_null(tok[i]);
        assert_true(tok[i][0] != '\0');
        assert_true(valid_utf8(tok[i]));
        assert_int_equal(ty[i], CAKE_TOKEN_NORMAL);
        if (i > 259) assert_true(sc[i] < sc[i - 1]);
    }
    /* all unique */
    char **sorted = malloc((size_t)nv * sizeof(*sorted));
    memcpy(sorted, tok, (size_t)nv * sizeof(*sorted));
    qsort(sorted, (size_t)nv, sizeof(*sorted), cmp_str);
    for (int i = 1; i < nv; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            fprintf(stderr, "duplicate synthetic token '%s'\n", sorted[i]);
            fail();
        }
    free(sorted);

    /* deterministic */
    char **tok2;
    float *sc2;
    int32_t *ty2;
    assert_int_equal(cake_synth_vocab_build(nv, &tok2, &sc2, &ty2), 0);
    for (int i = 0; i < nv; i++) assert_string_equal(tok[i], tok2[i]);
    assert_memory_equal(sc, sc2, (size_t)nv * sizeof(*sc));
    cake_synth_vocab_free(tok2, sc2, ty2, nv);
    char **tk3;
    float *sc3;
    int32_t *ty3;
    assert_int_equal(cake_synth_vocab_build(300, &tk3, &sc3, &ty3), -1); /* too small */
    assert_null(tk3);

    /* A tokenizer over it cuts English into word pieces, not bytes. */
    cake_vocab_arrays v = {.n_vocab = nv,
                           .tokens = (const char *const *)tok,
                           .scores = sc,
                           .types = ty,
                           .bos = 1,
                           .eos = 2,
                           .unk = 0,
                           .add_bos = true,
                           .add_space_prefix = true};
    cake_tokenizer *t;
    char err[256];
    assert_int_equal(cake_tokenizer_init_arrays(&v, &t, err, sizeof(err)), 0);
    const char *text = "Once upon a time, there was a little girl named Lily. She loved to play "
                       "outside in the park with her friends.";
    const size_t len = strlen(text);
    int64_t n;
    cake_token *ids = tokenize(t, text, len, false, &n);
    fprintf(stderr, "synthetic vocab: %zu bytes -> %lld tokens\n", len, (long long)n);
    for (int64_t k = 0; k < n; k++) assert_true(ids[k] >= 259); /* no byte fallback */
    assert_true(n < (int64_t)len / 3);
    assert_round_trip(t, text, len);
    assert_round_trip(t, "Grüße, 世界! \n\t 123", strlen("Grüße, 世界! \n\t 123"));

    /* The same vocabulary through GGUF (as `cake mkmodel` writes it) gives the
     * same ids. */
    char path[64];
    snprintf(path, sizeof(path), "/tmp/cake_test_synth_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    cake_gguf_writer *w = cake_gguf_writer_init();
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tok, nv);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", sc, nv);
    cake_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", ty, nv);
    assert_int_equal(cake_gguf_writer_write_file(w, path, NULL, NULL, err, sizeof(err)), 0);
    cake_gguf_writer_free(w);
    cake_gguf *g;
    assert_int_equal(cake_gguf_open(path, &g, err, sizeof(err)), 0);
    unlink(path);
    cake_tokenizer *t2;
    assert_int_equal(cake_tokenizer_init(g, &t2, err, sizeof(err)), 0);
    cake_gguf_close(g);
    int64_t n2;
    cake_token *ids2 = tokenize(t2, text, len, false, &n2);
    assert_int_equal(n2, n);
    assert_memory_equal(ids2, ids, (size_t)n * sizeof(*ids));
    free(ids2);
    cake_tokenizer_free(t2);

    free(ids);
    cake_tokenizer_free(t);
    cake_synth_vocab_free(tok, sc, ty, nv);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_spm_vectors),
        cmocka_unit_test(test_llama_bpe_vectors),
        cmocka_unit_test(test_bpe_merge_order),
        cmocka_unit_test(test_bpe_llama3_words),
        cmocka_unit_test(test_bpe_bytes),
        cmocka_unit_test(test_bpe_pieces),
        cmocka_unit_test(test_bos_and_plain_specials),
        cmocka_unit_test(test_empty_text),
        cmocka_unit_test(test_capacity),
        cmocka_unit_test(test_token_to_piece),
        cmocka_unit_test(test_invalid_utf8_and_nul),
        cmocka_unit_test(test_matches_reference),
        cmocka_unit_test(test_speed_100k),
        cmocka_unit_test(test_stories260k),
        cmocka_unit_test(test_gguf_keys),
        cmocka_unit_test(test_synth_vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
