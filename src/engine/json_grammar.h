/* JSON mode: a sampler constraint under which a model can only write one
 * JSON object (OpenAI's response_format {"type": "json_object"}). A
 * pushdown automaton reads the answer byte by byte; before each token the
 * tokens whose text would break the JSON get a logit of -INFINITY, and once
 * the object is closed only the end tokens (EOS, a chat's end of turn) are
 * left. Strict JSON (RFC 8259): no trailing commas, no comments, no
 * leading zeros, control characters escaped in strings; bytes from 0x80 are
 * taken as they come (the model's UTF-8). Whitespace runs are capped, so
 * that a model cannot pad forever. */
#ifndef CAKE_ENGINE_JSON_GRAMMAR_H
#define CAKE_ENGINE_JSON_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>

#include "cake.h"
#include "model/tokenizer.h"

#define CAKE_JSON_MAX_DEPTH 64 /* nesting of objects and arrays */
#define CAKE_JSON_MAX_SPACE 64 /* whitespace bytes in a row */

/* The parse state: small, copied for every token tried. */
typedef struct {
    unsigned char mode;  /* what may come next (json_grammar.c) */
    unsigned char aux;   /* hex digits of a \u escape, or letters of a literal so far */
    unsigned char space; /* whitespace bytes in a row */
    unsigned char in_key;
    const char *literal; /* "true", "false" or "null" while one is read */
    int depth;
    char stack[CAKE_JSON_MAX_DEPTH]; /* '{' or '[' */
} cake_json_state;

/* A state at the start of an answer that must be one JSON object. */
void cake_json_start(cake_json_state *s);
/* Reads n bytes; false (and s undefined) when they cannot continue the JSON. */
bool cake_json_feed(cake_json_state *s, const char *bytes, size_t n);
/* The object is closed: only the end may follow. */
bool cake_json_complete(const cake_json_state *s);

/* A request's constraint: the state and the vocabulary's texts. */
typedef struct cake_json_grammar cake_json_grammar;
/* end, end2: the tokens that end the answer (EOS, a chat's end of turn; -1
 * for none). NULL on out of memory. */
cake_json_grammar *cake_json_grammar_new(const cake_tokenizer *t, cake_token end, cake_token end2);
void cake_json_grammar_free(cake_json_grammar *g); /* accepts NULL */
/* The sampler hooks (cake_sampler_params.constrain / .accept; ud = g). */
void cake_json_grammar_mask(void *g, float *logits, int n_vocab);
void cake_json_grammar_accept(void *g, cake_token id);
/* Sets p's hooks to g's. */
void cake_json_grammar_constrain(cake_json_grammar *g, cake_sampler_params *p);

#endif
