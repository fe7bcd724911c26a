/* libFuzzer target for the tokenizer (see fuzz/README.md).
 *
 * The first input byte picks a vocabulary and whether BOS is added; the rest
 * is the text. Every input must tokenize into ids inside the vocabulary, the
 * sizing call and the filling call must agree, a short buffer must get a
 * prefix of the ids and nothing past its end, and valid UTF-8 must come back
 * unchanged from the pieces (the round trip cake_token_to_piece promises;
 * SentencePiece vocabularies except for text holding "▁" itself, which
 * prints as a space, as in llama.cpp). Then a few (prev, id) pairs taken
 * from the input, in range or not, go through cake_token_to_piece with a
 * short buffer.
 *
 * Vocabularies: llama.cpp's ggml-vocab-llama-spm.gguf from the shared models
 * directory ($CAKE_TEST_MODELS, else the one CMake found; skipped when
 * absent), the synthetic SentencePiece vocabulary of `cake mkmodel`, and two
 * small byte-level BPE ones (the llama-bpe and qwen2 pre-tokenizers) with a
 * few merges. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/gguf.h"
#include "model/synth_vocab.h"
#include "model/tokenizer.h"
#include "fuzz_check.h"
#include "gpt2_bytes.h"

enum { N_VOCABS = 4 };
static cake_tokenizer *g_vocab[N_VOCABS];
static bool g_spm[N_VOCABS]; /* SentencePiece (else byte-level BPE) */

static cake_tokenizer *bpe_vocab(const char *pre) {
    /* "Ġ" is the space's character */
    static const char *const extra[] = {"\xc4\xa0t", "he", "\xc4\xa0the", "in",     "\xc4\xa0\x61",
                                        "er",        "12", "123",         "<|eot|>"};
    static const char *const merges[] = {"\xc4\xa0 t", "h e", "\xc4\xa0t he", "i n",
                                         "\xc4\xa0 a", "e r", "1 2",          "12 3"};
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
        types[256 + i] = CAKE_TOKEN_NORMAL;
    }
    types[256 + N_EXTRA - 1] = CAKE_TOKEN_CONTROL;
    cake_vocab_arrays v = {.n_vocab = 256 + N_EXTRA,
                           .tokens = tokens,
                           .types = types,
                           .bos = 256 + N_EXTRA - 1,
                           .eos = 256 + N_EXTRA - 1,
                           .unk = -1,
                           .add_bos = true,
                           .merges = merges,
                           .n_merges = sizeof(merges) / sizeof(merges[0]),
                           .pre = pre};
    cake_tokenizer *t = NULL;
    char err[256];
    if (cake_tokenizer_init_arrays(&v, &t, err, sizeof(err))) {
        fprintf(stderr, "bpe vocabulary (%s): %s\n", pre, err);
        abort();
    }
    return t;
}

static cake_tokenizer *synth_vocab(void) {
    enum { N = 600 };
    char **tokens;
    float *scores;
    int32_t *types;
    CHECK(cake_synth_vocab_build(N, &tokens, &scores, &types) == 0);
    cake_vocab_arrays v = {.n_vocab = N,
                           .tokens = (const char *const *)tokens,
                           .scores = scores,
                           .types = types,
                           .bos = 1,
                           .eos = 2,
                           .unk = 0,
                           .add_bos = true,
                           .add_space_prefix = true,
                           .pre = NULL};
    cake_tokenizer *t = NULL;
    char err[256];
    if (cake_tokenizer_init_arrays(&v, &t, err, sizeof(err))) {
        fprintf(stderr, "synthetic vocabulary: %s\n", err);
        abort();
    }
    cake_synth_vocab_free(tokens, scores, types, N);
    return t;
}

static cake_tokenizer *file_vocab(void) {
    const char *dir = getenv("CAKE_TEST_MODELS");
#ifdef FUZZ_MODELS_DIR
    if (!dir) dir = FUZZ_MODELS_DIR;
#endif
    if (!dir) return NULL;
    char path[4096];
    snprintf(path, sizeof(path), "%s/ggml-vocab-llama-spm.gguf", dir);
    cake_gguf *g = NULL;
    cake_tokenizer *t = NULL;
    char err[256];
    if (cake_gguf_open(path, &g, err, sizeof(err))) {
        fprintf(stderr, "fuzz_tokenizer: %s: %s (vocabulary skipped)\n", path, err);
        return NULL;
    }
    if (cake_tokenizer_init(g, &t, err, sizeof(err))) {
        fprintf(stderr, "%s: %s\n", path, err);
        abort();
    }
    cake_gguf_close(g);
    return t;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    g_vocab[0] = file_vocab();
    g_vocab[1] = synth_vocab();
    g_vocab[2] = bpe_vocab("llama-bpe");
    g_vocab[3] = bpe_vocab("qwen2");
    g_spm[0] = g_spm[1] = true;
    return 0;
}

/* Strict UTF-8 (no overlongs, no surrogates, at most U+10FFFF). */
static bool valid_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t len = c < 0x80             ? 1
                     : (c & 0xe0) == 0xc0 ? 2
                     : (c & 0xf0) == 0xe0 ? 3
                     : (c & 0xf8) == 0xf0 ? 4
                                          : 0;
        if (!len || len > n - i) return false;
        uint32_t cp = len == 1 ? c : c & (0x7f >> len);
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        static const uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += len;
    }
    return true;
}

/* The pieces of ids concatenated (prev chained as a streaming caller does),
 * each piece written into an exact-size heap buffer; malloc'ed, length in *n. */
static char *detokenize(const cake_tokenizer *t, const cake_token *ids, int64_t n_ids, size_t *n) {
    size_t used = 0, cap = 16;
    char *s = malloc(cap);
    CHECK(s);
    for (int64_t i = 0; i < n_ids; i++) {
        cake_token prev = i ? ids[i - 1] : -1;
        int k = cake_token_to_piece(t, prev, ids[i], NULL, 0);
        CHECK(k >= 0);
        char *piece = malloc((size_t)k + 1);
        CHECK(piece);
        CHECK(cake_token_to_piece(t, prev, ids[i], piece, (size_t)k) == k);
        if (used + (size_t)k > cap) {
            cap = 2 * (used + (size_t)k);
            s = realloc(s, cap);
            CHECK(s);
        }
        memcpy(s + used, piece, (size_t)k);
        used += (size_t)k;
        free(piece);
    }
    *n = used;
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const int which = data[0] % N_VOCABS;
    const bool add_bos = data[0] & 0x80;
    const cake_tokenizer *t = g_vocab[which];
    if (!t) return 0;
    /* an exact-size copy, so that ASan sees any read past the text */
    const size_t len = size - 1;
    char *text = malloc(len ? len : 1);
    CHECK(text);
    memcpy(text, data + 1, len);

    const int32_t n_vocab = cake_tokenizer_n_vocab(t);
    const int64_t need = cake_tokenize(t, text, len, add_bos, NULL, 0);
    CHECK(need >= 0);
    /* at most one id per byte (three for a byte-level BPE's invalid byte, read
     * as U+FFFD), plus BOS and SentencePiece's space prefix */
    CHECK(need <= 3 * (int64_t)len + 2);
    cake_token *ids = malloc(((size_t)need + 1) * sizeof(*ids));
    CHECK(ids);
    CHECK(cake_tokenize(t, text, len, add_bos, ids, need) == need);
    for (int64_t i = 0; i < need; i++) CHECK(ids[i] >= 0 && ids[i] < n_vocab);
    if (add_bos && cake_tokenizer_bos(t) >= 0) CHECK(need >= 1 && ids[0] == cake_tokenizer_bos(t));

    /* a short buffer: the same first ids, nothing written past it */
    if (need > 1) {
        const int64_t cap = need / 2;
        cake_token *part = malloc((size_t)cap * sizeof(*part));
        CHECK(part);
        CHECK(cake_tokenize(t, text, len, add_bos, part, cap) == need);
        CHECK(memcmp(part, ids, (size_t)cap * sizeof(*part)) == 0);
        free(part);
    }

    /* the round trip */
    const bool spm_marker = g_spm[which] && memmem(text, len, "\xe2\x96\x81", 3);
    if (valid_utf8((const uint8_t *)text, len) && !spm_marker) {
        const int64_t skip = add_bos && cake_tokenizer_bos(t) >= 0;
        size_t back_len;
        char *back = detokenize(t, ids + skip, need - skip, &back_len);
        if (back_len != len || memcmp(back, text, len) != 0) {
            fprintf(stderr, "round trip: %zu bytes in, %zu out\n", len, back_len);
            abort();
        }
        free(back);
    }

    /* pieces of ids from the input, in range or not, into short buffers */
    for (size_t i = 1; i + 8 <= size && i < 64; i += 8) {
        int32_t prev, id;
        memcpy(&prev, data + i, 4);
        memcpy(&id, data + i + 4, 4);
        if (data[i] & 1) id = (int32_t)((uint32_t)id % (uint32_t)n_vocab);
        const int k = cake_token_to_piece(t, prev, id, NULL, 0);
        if (id < 0 || id >= n_vocab) {
            CHECK(k == -1);
            continue;
        }
        CHECK(k >= 0);
        const size_t cap = (size_t)k / 2;
        char *piece = malloc(cap ? cap : 1);
        CHECK(piece);
        CHECK(cake_token_to_piece(t, prev, id, piece, cap) == k);
        free(piece);
    }
    free(ids);
    free(text);
    return 0;
}
