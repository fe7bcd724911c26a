/* The tokenizer of a GGUF vocabulary, read from its tokenizer.ggml.* keys:
 * SentencePiece BPE (model "llama": scores, token types, byte fallback) or
 * byte-level BPE (model "gpt2": merges and the pre-tokenizer of
 * tokenizer.ggml.pre, "llama-bpe" for Llama 3 or "qwen2"). It reproduces
 * llama.cpp's llm_tokenizer_spm and llm_tokenizer_bpe (their test vectors are
 * our tests). */
#ifndef CAKE_TOKENIZER_H
#define CAKE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/gguf.h"

typedef int32_t cake_token;

/* tokenizer.ggml.token_type values (llama.cpp numbering). */
enum cake_token_type {
    CAKE_TOKEN_UNDEFINED = 0,
    CAKE_TOKEN_NORMAL = 1,
    CAKE_TOKEN_UNKNOWN = 2,
    CAKE_TOKEN_CONTROL = 3,
    CAKE_TOKEN_USER_DEFINED = 4,
    CAKE_TOKEN_UNUSED = 5,
    CAKE_TOKEN_BYTE = 6,
};

typedef struct cake_tokenizer cake_tokenizer;

/* Builds a tokenizer from g's tokenizer.ggml.* keys. The tokenizer copies what it
 * needs, so g may be closed afterwards. -1 with a reason in err when the keys are
 * missing or of the wrong type, or the model or pre-tokenizer is not one of
 * those above. */
int cake_tokenizer_init(const cake_gguf *g, cake_tokenizer **out, char *err, size_t errlen);
void cake_tokenizer_free(cake_tokenizer *t); /* accepts NULL */

/* The same tokenizer from plain arrays (what init reads from the GGUF keys), for
 * tests and tools that have a vocabulary in memory (see synth_vocab.h). */
typedef struct {
    int32_t n_vocab;
    const char *const *tokens; /* [n_vocab] NUL-terminated token texts */
    const float *scores;       /* [n_vocab] merge scores, or NULL: all 0 */
    const int32_t *types;      /* [n_vocab] enum cake_token_type, or NULL: all NORMAL */
    cake_token bos, eos, unk;  /* -1: none */
    bool add_bos;              /* tokenizer.ggml.add_bos_token */
    bool add_space_prefix;     /* tokenizer.ggml.add_space_prefix (SentencePiece only) */
    /* Byte-level BPE when merges is not NULL: tokens are then written in
     * GPT-2's byte characters ("Ġ" for ' '), scores are unused. */
    const char *const *merges; /* [n_merges] "left right", first merges first */
    int32_t n_merges;
    const char *pre; /* pre-tokenizer name, as tokenizer.ggml.pre */
} cake_vocab_arrays;

/* Copies what it needs from v. 0, or -1 with a reason in err (empty vocabulary,
 * duplicate token, special id out of range). */
int cake_tokenizer_init_arrays(const cake_vocab_arrays *v, cake_tokenizer **out, char *err,
                               size_t errlen);

int32_t cake_tokenizer_n_vocab(const cake_tokenizer *t);
cake_token cake_tokenizer_bos(const cake_tokenizer *t); /* -1 if none */
cake_token cake_tokenizer_eos(const cake_tokenizer *t); /* -1 if none */
/* Whether BOS is prepended by default (tokenizer.ggml.add_bos_token, default true). */
bool cake_tokenizer_add_bos(const cake_tokenizer *t);

/* The id of the token whose text is exactly text[0..len) (as the vocabulary
 * writes it: "<|im_end|>", "<s>"), or -1. For the special tokens of chat
 * templates, which tokenization never produces from text. */
cake_token cake_tokenizer_find(const cake_tokenizer *t, const char *text, size_t len);

/* Tokenizes len bytes of text. Control-token strings in the text are plain text.
 * (Byte-level BPE reads the text as UTF-8: an invalid byte is taken as U+FFFD,
 * as llama.cpp does, so only valid UTF-8 comes back unchanged.)
 * add_bos prepends BOS when the vocabulary has one. Writes at most cap ids to out
 * and returns the total number of ids the text needs (call again with a bigger
 * buffer if it is > cap), or -1 on failure (out of memory). */
int64_t cake_tokenize(const cake_tokenizer *t, const char *text, size_t len, bool add_bos,
                      cake_token *out, int64_t cap);

/* The text of one token as it should be printed: "▁" becomes a space, byte
 * tokens <0xNN> become that raw byte (byte-level BPE: each character becomes
 * the byte it stands for), control, unknown and unused tokens print nothing,
 * user-defined tokens print verbatim (llama.cpp's token_to_piece with
 * special = false). Writes at most cap bytes and returns the full length, or -1
 * for an id out of range. prev is the preceding token (-1 if none): when the
 * vocabulary adds a space prefix, the leading space of the first piece of a
 * sequence (prev -1) and of the first piece after BOS is dropped, as llama2.c
 * and SentencePiece's decoder do. So concatenating the pieces of
 * cake_tokenize(text) gives back text (when text is valid UTF-8). */
int cake_token_to_piece(const cake_tokenizer *t, cake_token prev, cake_token id, char *out,
                        size_t cap);
/* A token's text as cake_token_to_piece gives it after another token (its
 * leading space kept), in place: *len bytes, not NUL-terminated; "" for an
 * id out of range. */
const char *cake_token_text(const cake_tokenizer *t, cake_token id, size_t *len);

#endif
