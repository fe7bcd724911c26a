/* A synthetic SentencePiece-style vocabulary for `cake mkmodel`: random-weight
 * benchmark models need a tokenizer that both cake and llama.cpp accept and that
 * cuts English into word-sized pieces, like Llama 2's. Deterministic: the same
 * n_vocab always gives the same vocabulary. */
#ifndef CAKE_SYNTH_VOCAB_H
#define CAKE_SYNTH_VOCAB_H

#include <stdint.h>

/* Layout (as Llama 2's): 0 "<unk>" (UNKNOWN), 1 "<s>" and 2 "</s>" (CONTROL),
 * 3..258 "<0x00>".."<0xFF>" (BYTE), then n_vocab - 259 unique NORMAL pieces:
 * single characters, common English words with a "▁" prefix (and every prefix
 * of them, so that merging can reach them), then letter strings. Scores are 0
 * for the first 259 ids and -(id - 258) after, so earlier pieces merge first.
 * Needs 354 (259 + 95 single characters) <= n_vocab <= 4194304. On success (0) the three arrays
 * ([n_vocab] each, token texts NUL-terminated UTF-8) belong to the caller, who
 * frees them with cake_synth_vocab_free. -1 on bad n_vocab or out of memory,
 * with nothing allocated. */
int cake_synth_vocab_build(int n_vocab, char ***tokens, float **scores, int32_t **types);
/* Accepts NULLs and partly filled token arrays (NULL entries). */
void cake_synth_vocab_free(char **tokens, float *scores, int32_t *types, int n_vocab);

#endif
