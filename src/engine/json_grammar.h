/* Structured output: a sampler constraint under which a model can only
 * write JSON, either any one object (OpenAI's response_format {"type":
 * "json_object"}) or a value a JSON Schema describes (json_schema, compiled
 * into the nodes below by server/json_schema.c). A pushdown automaton reads
 * the answer byte by byte; before each token the tokens whose text would
 * break it get a logit of -INFINITY, and once the value is whole only the
 * end tokens (EOS, a chat's end of turn) are left. Strict JSON (RFC 8259):
 * no trailing commas, no comments, no leading zeros, control characters
 * escaped in strings, strings valid UTF-8 (RFC 3629: no overlong forms,
 * no surrogates). Whitespace runs are capped, so that a model cannot pad forever. */
#ifndef CAKE_ENGINE_JSON_GRAMMAR_H
#define CAKE_ENGINE_JSON_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cake.h"
#include "model/tokenizer.h"

#define CAKE_JSON_MAX_DEPTH 64 /* nesting of objects and arrays */
#define CAKE_JSON_MAX_SPACE 64 /* whitespace bytes in a row */
#define CAKE_JSON_MAX_PROPS 64 /* declared properties of an object */

/* What a value may be. */
typedef enum {
    CAKE_JSON_ANY,     /* any JSON value */
    CAKE_JSON_OBJECT,  /* names/sub: its properties; more: other keys' values */
    CAKE_JSON_ARRAY,   /* sub: the first n items' (a tuple); more: the others' (NULL:
                          none); min/max: how many */
    CAKE_JSON_STRING,  /* min/max: how many characters (an escape is one) */
    CAKE_JSON_NUMBER,  /* any JSON number */
    CAKE_JSON_INTEGER, /* a number without fraction or exponent; bounded: in [minimum, maximum] */
    CAKE_JSON_ENUM,    /* names: the values, as compact JSON (true/false/null too); a part
                          of a sequence with sub: a tag, names[i] followed by a value of
                          sub[i] (Mistral's [TOOL_CALLS]name[ARGS]{...}) */
    CAKE_JSON_UNION,   /* sub: alternatives that differ in their first byte */
    CAKE_JSON_SEQUENCE /* the root only: sub, one after the other (a literal is an enum of
                          one: text around a value, as a tool call's tags) */
} cake_json_kind;

typedef struct cake_json_node cake_json_node;

/* An object that is one of several (anyOf of objects, at most 64): its node
 * holds every name of any of them (sub[i]: the schema of names[i]'s value,
 * or NULL where they differ and cannot be told apart by its first byte:
 * then it is the alternative's own, alt_sub[i * n + a], known once one
 * alternative is left that declares it); a key narrows the alternatives
 * to those that declare it (or take other keys), a value whose schema tells
 * them apart (`alts` below) to those it fits. */
typedef struct {
    int n;                                /* alternatives */
    const uint64_t *declared_by;          /* per name: the alternatives that declare it */
    const uint64_t *required;             /* per alternative: the names it requires */
    uint64_t open;                        /* the alternatives that take other keys (more) */
    const cake_json_node *const *alt_sub; /* per name and alternative */
    const cake_json_node *const *objects; /* the alternatives as given (plain objects) */
} cake_json_choice;

struct cake_json_node {
    cake_json_kind kind;
    int n; /* names (and, for objects, sub) of an object or enum; sub of a union or tuple */
    /* Sorted by strcmp: the mask narrows them as a range, byte by byte.
     * Property names as written between the quotes (JSON-escaped). */
    const char *const *names;
    const cake_json_node *const *sub; /* an object's property schemas; a union's
                                         alternatives; a tuple's items */
    uint64_t required;                /* object: bit i, names[i] must be given */
    const cake_json_node *more;       /* object: other keys (NULL: none); array: items */
    int min, max;                     /* array items, string characters; max < 0: no cap */
    bool bounded;
    int64_t minimum, maximum;
    const cake_json_choice *choice; /* object: one of several (NULL: plain) */
    /* The value of a property of a choice that tells its alternatives apart:
     * per alternative of a union, or value of an enum, the alternatives of
     * the object it fits (bits). NULL otherwise. */
    const uint64_t *alts;
};

/* Any value, and any object (the JSON mode's root). */
extern const cake_json_node cake_json_any, cake_json_any_object;

/* Whether a value of n can begin with byte c. */
bool cake_json_can_start(const cake_json_node *n, unsigned char c);

/* One open object or array. */
typedef struct {
    const cake_json_node *node;
    uint64_t seen;  /* object: bit i, property i given; array: items begun */
    uint64_t alive; /* object: the alternatives it can still be (bit 0 for a plain one) */
} cake_json_frame;

/* The parse state: copied for every token tried (json_grammar.c copies
 * only the frames in use). */
typedef struct {
    unsigned char mode;  /* what may come next (json_grammar.c) */
    unsigned char space; /* whitespace bytes in a row */
    unsigned char in_key;
    unsigned char hex;       /* hex digits of a \u escape read */
    unsigned char utf8_need; /* a string's UTF-8: continuation bytes to come, */
    unsigned char utf8_lo;   /* the range the next one is in */
    unsigned char utf8_hi;
    int len;                    /* a string's characters, or the bytes of a key or enum value */
    unsigned char negative;     /* a bounded integer's sign, */
    uint64_t magnitude;         /* and its digits so far (saturating) */
    int lo, hi;                 /* the names a key or enum value can still be */
    const cake_json_node *node; /* the schema of the value being read, or the next one */
    const cake_json_node *root;
    int part; /* of a sequence root: the one being read */
    int depth;
    cake_json_frame stack[CAKE_JSON_MAX_DEPTH];
} cake_json_state;

/* A state at the start of an answer that must be one value of root (NULL:
 * any object). */
void cake_json_start(cake_json_state *s, const cake_json_node *root);
/* Reads n bytes; false (and s undefined) when they cannot continue. */
bool cake_json_feed(cake_json_state *s, const char *bytes, size_t n);
/* The value is whole: the answer may end here. */
bool cake_json_complete(const cake_json_state *s);

/* A vocabulary's texts as the mask reads them (in byte order, to walk them
 * as a trie): made once per model, shared by its requests' grammars, read
 * only. NULL on out of memory. */
typedef struct cake_json_vocab cake_json_vocab;
cake_json_vocab *cake_json_vocab_new(const cake_tokenizer *t);
/* The same, with tokens kept[0..n_kept) read as kept_text[k] (not copied;
 * they outlive the vocabulary) rather than as the nothing a control token
 * prints: a tool call's tags that are such tokens (Mistral's [TOOL_CALLS],
 * [ARGS]), for the grammars of requests whose answers print them. At most
 * CAKE_JSON_MAX_KEPT. */
#define CAKE_JSON_MAX_KEPT 4
cake_json_vocab *cake_json_vocab_new_keeping(const cake_tokenizer *t, const cake_token *kept,
                                             const char *const *kept_text, int n_kept);
void cake_json_vocab_free(cake_json_vocab *v); /* accepts NULL */

/* A request's constraint: the state, and room for the mask's work. */
typedef struct cake_json_grammar cake_json_grammar;
/* root: as for cake_json_start; v and root are not copied (they outlive
 * the grammar); end, end2: the tokens that end the answer (EOS, a chat's
 * end of turn; -1 for none). NULL on out of memory. */
cake_json_grammar *cake_json_grammar_new(const cake_json_vocab *v, const cake_json_node *root,
                                         cake_token end, cake_token end2);
/* A grammar that holds only once the answer writes `trigger` (a tool call's
 * tag: root is what follows it), and again at each such tag after the last
 * value closed; before, any text. trigger "": when the answer's first byte
 * that is not white space is '{', the whole answer is a value of root.
 * NULL on out of memory. */
cake_json_grammar *cake_json_grammar_new_lazy(const cake_json_vocab *v, const cake_json_node *root,
                                              const char *trigger, cake_token end, cake_token end2);
void cake_json_grammar_free(cake_json_grammar *g); /* accepts NULL */
/* The sampler hooks (cake_sampler_params.constrain / .accept; ud = g). */
void cake_json_grammar_mask(void *g, float *logits, int n_vocab);
void cake_json_grammar_accept(void *g, cake_token id);
/* Sets p's hooks to g's. */
void cake_json_grammar_constrain(cake_json_grammar *g, cake_sampler_params *p);

#endif
