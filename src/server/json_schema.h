/* JSON Schema (OpenAI's response_format json_schema, vLLM's guided_json,
 * llama.cpp's json_schema) compiled into the nodes the structured-output
 * automaton reads (engine/json_grammar.h). What is taken, what is ignored
 * and what is refused: docs/SERVER.md "Structured output". A schema cake
 * cannot enforce is refused with a message naming the keyword, never
 * loosened. */
#ifndef CAKE_SERVER_JSON_SCHEMA_H
#define CAKE_SERVER_JSON_SCHEMA_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "engine/json_grammar.h"

typedef struct json_schema json_schema;

/* A compiled schema holding one reference. NULL with a message in err (a
 * schema it refuses, or out of memory). */
json_schema *json_schema_compile(const cJSON *schema, char *err, size_t errlen);
const cake_json_node *json_schema_root(const json_schema *s);
/* The value of s with fixed text before and after it ("" for none): a tool
 * call between its tags. 0, or -1 on out of memory. */
int json_schema_between(json_schema *s, const char *before, const char *after);
/* s, compiled from {"prefixItems": [v_0, ..., v_n-1]}, made one value of
 * v_i after the text tags[i], which tells which (Mistral's
 * [TOOL_CALLS]name[ARGS]{...}: tags that differ, none a prefix of
 * another). 0, or -1 (out of memory, s not such a tuple, two tags alike). */
int json_schema_tagged(json_schema *s, const char *const *tags, int n);
json_schema *json_schema_retain(json_schema *s); /* returns s */
void json_schema_release(json_schema *s);        /* accepts NULL */

#endif
