/* JSON Schema structured output: the compiler (server/json_schema.c) and the
 * automaton on its nodes (engine/json_grammar.c). For each schema, JSON
 * texts it allows and ones it does not, read byte by byte as the mask
 * reads tokens; schemas cake refuses, with the keyword named; and answers
 * sampled from random logits over a real vocabulary under the mask, which
 * must parse (cJSON) and hold what their schema asks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/json_grammar.h"
#include "model/gguf.h"
#include "model/model.h"
#include "server/json_schema.h"
#include "testutil.h"
#include "util/clock.h"

static json_schema *compile_text(const char *schema_json, char *err, size_t errlen) {
    cJSON *doc = cJSON_Parse(schema_json);
    if (!doc) fail_msg("test schema is not JSON: %s", schema_json);
    json_schema *s = json_schema_compile(doc, err, errlen);
    cJSON_Delete(doc);
    return s;
}

static json_schema *must_compile(const char *schema_json) {
    char err[256];
    json_schema *s = compile_text(schema_json, err, sizeof(err));
    if (!s) fail_msg("refused %s: %s", schema_json, err);
    return s;
}

/* Whether text, fed byte by byte, is one whole value of the schema. */
static bool allows(const json_schema *s, const char *text) {
    cake_json_state st;
    cake_json_start(&st, json_schema_root(s));
    for (const char *c = text; *c; c++)
        if (!cake_json_feed(&st, c, 1)) return false;
    return cake_json_complete(&st);
}

typedef struct {
    const char *schema;
    const char *valid[8];
    const char *invalid[12];
} schema_case;

static const schema_case cases[] = {
    {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":"
     "\"integer\"}},\"required\":[\"name\"]}",
     {"{\"name\":\"Ann\"}", "{\"name\":\"Ann\",\"age\":31}", "{ \"age\" : -4 , \"name\" : \"\" }"},
     {"{}", "{\"age\":31}", "{\"name\":1}", "{\"name\":\"A\",\"age\":3.5}",
      "{\"name\":\"A\",\"age\":1e3}", "{\"name\":\"A\",\"nam\":\"B\"}",
      "{\"name\":\"A\",\"name\":\"B\"}", "{\"name\":\"A\",\"x\":1}", "[]", "\"Ann\""}},
    /* other keys when additionalProperties allows them; none beside
     * properties when it is absent; any when there are no properties */
    {"{\"properties\":{\"a\":{\"type\":\"boolean\"}},\"additionalProperties\":{\"type\":\"null\"}}",
     {"{}", "{\"a\":true}", "{\"b\":null,\"a\":false}", "{\"ab\":null}", "{\"\":null}"},
     {"{\"a\":null}", "{\"b\":true}", "{\"a\":true,\"a\":true}"}},
    {"{\"type\":\"object\"}", {"{}", "{\"x\":[1,{\"y\":null}]}"}, {"[]", "1"}},
    {"{\"type\":\"object\",\"properties\":{}}", {"{}"}, {"{\"a\":1}"}},
    /* arrays and their bounds, strings and theirs (an escape, a UTF-8
     * character: one each) */
    {"{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":3,\"minLength\":1},"
     "\"minItems\":1,\"maxItems\":2}",
     {"[\"a\"]", "[\"abc\",\"\\n\\u00e9\xc3\xa9\"]"},
     {"[]", "[\"a\",\"b\",\"c\"]", "[\"abcd\"]", "[\"\"]", "[1]", "{}"}},
    {"{\"type\":\"array\",\"maxItems\":0}", {"[]", "[ ]"}, {"[1]"}},
    {"{\"type\":\"array\",\"items\":false}", {"[]"}, {"[1]"}},
    /* tuples: their own items first, then items' (none when absent) */
    {"{\"prefixItems\":[{\"type\":\"integer\"},{\"type\":\"string\"}],\"minItems\":2}",
     {"[1,\"a\"]", "[ -3 , \"\" ]"},
     {"[1]", "[\"a\",1]", "[1,\"a\",2]", "[]"}},
    {"{\"prefixItems\":[{\"type\":\"null\"}],\"items\":{\"type\":\"boolean\"}}",
     {"[null,true,false]", "[null]", "[]"},
     {"[true]", "[null,null]"}},
    {"{\"type\":\"string\",\"minLength\":2}",
     {"\"ab\"", "\"\xc3\xa9\\n\"", "\"abcdefgh\""},
     {"\"a\"", "\"\xc3\xa9\""}},
    /* integer bounds (inclusive, exclusive; "-0" is refused where they are) */
    {"{\"type\":\"integer\",\"minimum\":-5,\"maximum\":120}",
     {"-5", "0", "7", "120", "99"},
     {"-6", "121", "1200", "-0", "00", "1.0", "1e2", "-50"}},
    {"{\"type\":\"integer\",\"exclusiveMinimum\":0.5}", {"1", "99999999999999999"}, {"0", "-1"}},
    {"{\"type\":\"integer\",\"minimum\":10,\"maximum\":12}",
     {"10", "11", "12"},
     {"1", "13", "9", "100"}},
    {"{\"type\":\"integer\",\"minimum\":-20,\"exclusiveMaximum\":-9}",
     {"-15", "-20", "-10"},
     {"-9", "-21", "-1", "5", "-200"}},
    {"{\"properties\":{\"n\":{\"type\":\"integer\",\"maximum\":9}}}",
     {"{\"n\":9}", "{\"n\":-90}"},
     {"{\"n\":10}"}},
    /* enums (sorted, prefixes of each other), const, a type filter */
    {"{\"enum\":[\"red\",\"redder\",1,10,null,{\"a\":[1]},true]}",
     {"\"red\"", "\"redder\"", "1", "10", "null", "{\"a\":[1]}", "true"},
     {"\"re\"", "\"redd\"", "100", "0", "\"blue\"", "{\"a\": [1]}", "false", "nul"}},
    {"{\"type\":\"object\",\"properties\":{\"c\":{\"const\":\"x\"}},\"required\":[\"c\"]}",
     {"{\"c\":\"x\"}"},
     {"{\"c\":\"y\"}", "{}"}},
    {"{\"type\":\"string\",\"enum\":[\"a\",1]}", {"\"a\""}, {"1"}},
    /* unions: a list of types, anyOf with null, enums merged */
    {"{\"type\":[\"integer\",\"null\",\"string\"]}", {"5", "null", "\"s\""}, {"5.5", "true", "[]"}},
    {"{\"type\":[\"number\",\"integer\"]}", {"5", "5.5", "-1e-3"}, {"\"5\""}},
    {"{\"anyOf\":[{\"type\":\"array\",\"items\":{\"type\":\"integer\"}},{\"type\":\"null\"},"
     "{\"enum\":[\"a\"]},{\"const\":\"b\"}]}",
     {"[1,2]", "null", "\"a\"", "\"b\""},
     {"[1.5]", "\"c\"", "{}"}},
    /* anyOf of objects: told apart by a "type" (a discriminator), by their
     * keys, by a value's first byte; the discriminator comes before a
     * property whose schema only it tells */
    {"{\"anyOf\":[{\"properties\":{\"type\":{\"const\":\"cat\"},\"meow\":{\"type\":\"integer\"}},"
     "\"required\":[\"type\"]},{\"properties\":{\"type\":{\"const\":\"dog\"},\"bark\":{\"type\":"
     "\"string\"}},\"required\":[\"type\",\"bark\"]}]}",
     {"{\"type\":\"cat\"}", "{\"type\":\"cat\",\"meow\":3}", "{\"meow\":3,\"type\":\"cat\"}",
      "{\"type\":\"dog\",\"bark\":\"w\"}", "{\"bark\":\"w\",\"type\":\"dog\"}"},
     {"{\"type\":\"dog\"}", "{\"type\":\"cat\",\"bark\":\"w\"}", "{\"meow\":3,\"type\":\"dog\"}",
      "{\"type\":\"fox\"}", "{}", "{\"type\":\"cat\",\"type\":\"cat\"}"}},
    {"{\"anyOf\":[{\"properties\":{\"x\":{\"type\":\"integer\"}},\"required\":[\"x\"]},{"
     "\"properties\":{\"y\":{\"type\":\"string\"}},\"required\":[\"y\"]},{\"type\":\"null\"}]}",
     {"{\"x\":1}", "{\"y\":\"s\"}", "null"},
     {"{\"x\":1,\"y\":\"s\"}", "{}", "{\"x\":\"s\"}"}},
    {"{\"anyOf\":[{\"properties\":{\"v\":{\"type\":\"integer\"},\"k\":{\"const\":1}},\"required\":"
     "[\"v\"]},{\"properties\":{\"v\":{\"type\":\"string\"},\"k\":{\"const\":2}},\"required\":["
     "\"v\"]}]}",
     {"{\"v\":1}", "{\"v\":\"a\",\"k\":2}", "{\"v\":1,\"k\":1}"},
     {"{\"v\":1,\"k\":2}", "{\"k\":2,\"v\":1}", "{\"k\":3,\"v\":1}"}},
    {"{\"anyOf\":[{\"properties\":{\"name\":{\"const\":\"f\"},\"arguments\":{\"properties\":{\"a\":"
     "{"
     "\"type\":\"integer\"}},\"required\":[\"a\"]}},\"required\":[\"name\",\"arguments\"]},{"
     "\"properties\":{\"name\":{\"const\":\"g\"},\"arguments\":{\"properties\":{\"b\":{\"type\":"
     "\"string\"}},\"required\":[\"b\"]}},\"required\":[\"name\",\"arguments\"]}]}",
     {"{\"name\":\"f\",\"arguments\":{\"a\":1}}", "{\"name\":\"g\",\"arguments\":{\"b\":\"x\"}}"},
     {"{\"name\":\"f\",\"arguments\":{\"b\":\"x\"}}", "{\"arguments\":{\"a\":1},\"name\":\"f\"}",
      "{\"name\":\"f\"}"}},
    /* $ref into $defs, recursion (a tree), allOf of one */
    {"{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},"
     "\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/node\"}}},\"required\":[\"v\"]}},"
     "\"allOf\":[{\"$ref\":\"#/$defs/node\"}]}",
     {"{\"v\":1}", "{\"v\":1,\"kids\":[{\"v\":2,\"kids\":[]},{\"kids\":[{\"v\":4}],\"v\":3}]}"},
     {"{\"v\":1,\"kids\":[{}]}", "{\"v\":1,\"kids\":[{\"v\":\"2\"}]}"}},
    /* names that need escaping, matched as written */
    {"{\"properties\":{\"a\\\"b\":{\"type\":\"null\"},\"\\u00e9\":{\"type\":\"null\"}},"
     "\"required\":[\"a\\\"b\"]}",
     {"{\"a\\\"b\":null}", "{\"a\\\"b\":null,\"\xc3\xa9\":null}"},
     {"{\"ab\":null}", "{\"\\u00e9\":null}"}},
    /* true, {} and annotations: any value */
    {"{\"title\":\"t\",\"description\":\"d\",\"format\":\"date\"}",
     {"1", "\"x\"", "[{}]"},
     {"", "x"}},
    {"true", {"{\"a\":[]}", "-0.5"}, {"01"}},
};

static void test_schema_cases(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        json_schema *s = must_compile(cases[i].schema);
        for (int k = 0; k < 8 && cases[i].valid[k]; k++)
            if (!allows(s, cases[i].valid[k]))
                fail_msg("schema %s refused %s", cases[i].schema, cases[i].valid[k]);
        for (int k = 0; k < 12 && cases[i].invalid[k]; k++)
            if (allows(s, cases[i].invalid[k]))
                fail_msg("schema %s allowed %s", cases[i].schema, cases[i].invalid[k]);
        json_schema_release(s);
    }
}

/* No dead ends: a state the automaton takes always has a way on. With every
 * declared property given, the object takes no more keys, not even a ',';
 * with maxItems reached, the array no ','. */
static void test_schema_no_dead_ends(void **state) {
    (void)state;
    json_schema *s = must_compile("{\"properties\":{\"a\":{\"type\":\"null\"},\"b\":{\"type\":"
                                  "\"array\",\"maxItems\":1}}}");
    cake_json_state st;
    cake_json_start(&st, json_schema_root(s));
    assert_true(cake_json_feed(&st, "{\"a\":null,\"b\":[1", 16));
    cake_json_state t = st;
    assert_false(cake_json_feed(&t, ",", 1));
    assert_true(cake_json_feed(&st, "]", 1));
    t = st;
    assert_false(cake_json_feed(&t, ",", 1));
    assert_true(cake_json_feed(&st, "}", 1) && cake_json_complete(&st));
    json_schema_release(s);
}

static void test_schema_refused(void **state) {
    (void)state;
    static const struct {
        const char *schema, *says;
    } bad[] = {
        {"{\"type\":\"string\",\"pattern\":\"^a\"}", "'pattern'"},
        {"{\"type\":\"number\",\"minimum\":0}", "integers only"},
        {"{\"maximum\":1}", "integers only"},
        {"{\"type\":\"integer\",\"minimum\":1,\"exclusiveMaximum\":1}", "no integer"},
        {"{\"type\":\"integer\",\"minimum\":1e300}", "2^53"},
        {"{\"type\":\"array\",\"uniqueItems\":true}", "'uniqueItems'"},
        {"{\"not\":{}}", "'not'"},
        {"{\"type\":\"strin\"}", "unknown 'type'"},
        {"{\"anyOf\":[{\"properties\":{\"a\":{\"properties\":{\"x\":{}}}}},{\"properties\":{\"a\":{"
         "\"properties\":{\"y\":{}}}}}]}",
         "tells them apart"},
        {"{\"anyOf\":[{\"type\":\"string\"},{\"const\":\"a\"}]}", "alike"},
        {"{\"oneOf\":[{},{\"type\":\"null\"}]}", "'oneOf'"},
        {"{\"allOf\":[{},{}]}", "'allOf'"},
        {"{\"$ref\":\"#/$defs/none\"}", "points to nothing"},
        {"{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/a\"}},\"$ref\":\"#/$defs/a\"}", "cycle"},
        {"{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/b\"},\"b\":{\"$ref\":\"#/$defs/a\"}},"
         "\"$ref\":\"#/$defs/a\"}",
         "cycle"},
        {"{\"$ref\":\"#\"}", "cycle"},
        {"{\"$ref\":\"http://example.com/s.json\"}", "only references"},
        {"{\"$ref\":\"#\",\"type\":\"object\"}", "'type' beside '$ref'"},
        {"{\"enum\":[]}", "allows no value"},
        {"{\"type\":\"integer\",\"enum\":[\"a\"]}", "allows no value"},
        {"{\"properties\":{\"a\":{}},\"required\":[\"b\"]}", "'b'"},
        {"{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}", "'minItems' is above"},
        {"{\"type\":\"string\",\"maxLength\":-1}", "'maxLength'"},
        {"{\"type\":\"array\",\"items\":[{}]}", "prefixItems"},
        {"{\"prefixItems\":[{}],\"minItems\":2}", "more items than the tuple"},
        {"false", "allows no value"},
        {"[]", "object or a boolean"},
        {"{\"properties\":{},\"items\":{}}", "without a 'type'"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char err[256] = "";
        json_schema *s = compile_text(bad[i].schema, err, sizeof(err));
        if (s) fail_msg("compiled %s", bad[i].schema);
        if (!strstr(err, bad[i].says))
            fail_msg("%s: '%s' does not say %s", bad[i].schema, err, bad[i].says);
    }
    /* 65 properties: over the cap */
    char big[4096] = "{\"properties\":{";
    for (int i = 0; i <= CAKE_JSON_MAX_PROPS; i++)
        sprintf(big + strlen(big), "%s\"p%d\":{}", i ? "," : "", i);
    strcat(big, "}}");
    char err[256];
    assert_null(compile_text(big, err, sizeof(err)));
    /* a schema nested past the cap */
    char deep[2048] = "";
    for (int i = 0; i < 70; i++) strcat(deep, "{\"items\":");
    strcat(deep, "{}");
    for (int i = 0; i < 70; i++) strcat(deep, "}");
    assert_null(compile_text(deep, err, sizeof(err)));
    assert_non_null(strstr(err, "deeper"));
}

/* Characters of valid UTF-8 (-1 when it is not). */
static int utf8_length(const char *text) {
    cake_json_state st;
    cake_json_start(&st, &cake_json_any);
    int n = 0;
    if (!cake_json_feed(&st, "\"", 1)) return -1;
    for (const char *c = text; *c; c++) {
        n += (*c & 0xc0) != 0x80;
        if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20) continue; /* (decoded escapes) */
        if (!cake_json_feed(&st, c, 1)) return -1;
    }
    return cake_json_feed(&st, "\"", 1) ? n : -1;
}

static const char *record_schema =
    "{\"type\":\"object\",\"properties\":{\"id\":{\"type\":\"integer\",\"minimum\":-9,"
    "\"maximum\":999},\"tag\":{\"enum\":["
    "\"alpha\",\"beta\"]},\"ok\":{\"type\":\"boolean\"},\"xs\":{\"type\":\"array\",\"items\":"
    "{\"type\":\"string\",\"maxLength\":4},\"maxItems\":3}},\"required\":[\"id\",\"tag\"]}";

/* A call of f or g, told apart by its name (a tool_choice of required). */
static const char *call_schema =
    "{\"anyOf\":[{\"properties\":{\"name\":{\"const\":\"f\"},\"arguments\":{\"properties\":{\"a\":{"
    "\"type\":\"integer\"}},\"required\":[\"a\"]}},\"required\":[\"name\",\"arguments\"]},{"
    "\"properties\":{\"name\":{\"const\":\"g\"},\"arguments\":{\"properties\":{\"b\":{\"type\":"
    "\"string\"}},\"required\":[\"b\"]}},\"required\":[\"name\",\"arguments\"]}]}";

/* In every kind of state the mask allows exactly the tokens whose text the
 * automaton reads on from there (the mask skips reading most tokens inside
 * a string, not inside a key with declared names, a capped string or a
 * character cut short). */
static void check_mask(const cake_tokenizer *t, const char *vocab) {
    const int n = cake_tokenizer_n_vocab(t);
    const cake_token eos = cake_tokenizer_eos(t);
    json_schema *s = must_compile(record_schema), *calls = must_compile(call_schema);
    cake_json_vocab *v = cake_json_vocab_new(t);
    static const struct {
        int which; /* 0 the record schema, 1 json_object, 2 a call of one of two functions */
        const char *prefix;
    } states[] = {{2, "{\""},
                  {2, "{\"name\":\""},
                  {2, "{\"name\":\"f\",\""},
                  {2, "{\"name\":\"g\",\"arguments\":{\""},
                  {2, "{\"name\":\"g\",\"arguments\":{\"b\":\"x\"}"},
                  {0, ""},
                  {0, "{\""},
                  {0, "{\"t"},
                  {0, "{\"tag\":"},
                  {0, "{\"tag\":\"al"},
                  {0, "{\"id\":1"},
                  {0, "{\"id\":99"},
                  {0, "{\"id\":-"},
                  {0, "{\"xs\":[\"ab"},
                  {0, "{\"xs\":[\"\xc3"},
                  {0, "{\"xs\":[\"a\",\"b\",\"c\""},
                  {0, "{\"id\":1,\"tag\":\"beta\""},
                  {1, "{\"k\":\"\xe2\x82"},
                  {1, "{\"k\xc3"},
                  {1, "{\"k\":\"v"}};
    float *logits = malloc((size_t)n * sizeof(float));
    int quoted = 0; /* tokens with a quote and more: read whole by the mask */
    for (int id = 0; id < n; id++) {
        size_t len;
        const char *text = cake_token_text(t, id, &len);
        quoted += len > 1 && memchr(text, '"', len);
    }
    for (size_t p = 0; p < sizeof(states) / sizeof(states[0]); p++) {
        const cake_json_node *root = states[p].which == 1   ? NULL
                                     : states[p].which == 2 ? json_schema_root(calls)
                                                            : json_schema_root(s);
        cake_json_grammar *g = cake_json_grammar_new(v, root, eos, -1);
        cake_json_state want;
        cake_json_start(&want, root);
        for (const char *c = states[p].prefix; *c; c++) { /* byte tokens: id 3 + byte */
            cake_json_grammar_accept(g, 3 + (unsigned char)*c);
            assert_true(cake_json_feed(&want, c, 1));
        }
        for (int i = 0; i < n; i++) logits[i] = 0;
        const double t0 = cake_now_s();
        cake_json_grammar_mask(g, logits, n);
        if (p == 8 || p == 19)
            printf("json schema: on %s the mask %s took %.0f us\n", vocab,
                   p == 8 ? "before a value" : "inside a string", (cake_now_s() - t0) * 1e6);
        int allowed;
        const int id = test_mask_mismatch(t, logits, n, eos, &want, &allowed);
        if (id >= 0)
            fail_msg("%s, after '%s': token %d %s by the mask", vocab, states[p].prefix, id,
                     logits[id] == 0 ? "allowed" : "refused");
        assert_true(allowed > 0);
        cake_json_grammar_free(g);
    }
    printf("json schema: the mask checked on %s (%d tokens, %d with a quote and more)\n", vocab, n,
           quoted);
    cake_json_vocab_free(v);
    json_schema_release(s);
    json_schema_release(calls);
    free(logits);
}

static void test_schema_mask(void **state) {
    (void)state;
    char path[64], err[256];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    cake_model *m;
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    check_mask(cake_model_tokenizer(m), "the tiny model's vocabulary");
    cake_model_free(m);
    unlink(path);
    /* Llama's own 32,000 tokens: '",', '":', '"}' and the like */
    const char *vocab = test_model_path("ggml-vocab-llama-spm.gguf");
    if (!vocab) {
        printf("skip: the Llama vocabulary check (ggml-vocab-llama-spm.gguf missing)\n");
        return;
    }
    cake_gguf *g;
    cake_tokenizer *t;
    assert_int_equal(cake_gguf_open(vocab, &g, err, sizeof(err)), 0);
    assert_int_equal(cake_tokenizer_init(g, &t, err, sizeof(err)), 0);
    check_mask(t, "Llama's vocabulary");
    cake_tokenizer_free(t);
    cake_gguf_close(g);
}

/* Sampled answers under the mask, over the tiny model's 32,000 tokens with
 * random logits (hot): every one that ends parses and holds the schema. */
static void test_schema_sampled(void **state) {
    (void)state;
    char path[64];
    assert_int_equal(test_make_model("tiny", "f16", path), 0);
    cake_model *m;
    char err[256];
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    const cake_tokenizer *t = cake_model_tokenizer(m);
    const cake_token eos = cake_tokenizer_eos(t);
    json_schema *s = must_compile(record_schema);
    cake_json_vocab *vocab = cake_json_vocab_new(t);
    int ended = 0;
    for (int a = 0; a < 20; a++) {
        cake_json_grammar *g = cake_json_grammar_new(vocab, json_schema_root(s), eos, -1);
        char out[4096];
        if (test_sample_constrained(t, g, eos, 2, (uint64_t)a, 8, 6, 400, out, sizeof(out))) {
            cJSON *v = cJSON_Parse(out);
            if (!v) fail_msg("not JSON: %s", out);
            const cJSON *idv = cJSON_GetObjectItemCaseSensitive(v, "id");
            const cJSON *tag = cJSON_GetObjectItemCaseSensitive(v, "tag");
            const cJSON *xs = cJSON_GetObjectItemCaseSensitive(v, "xs");
            if (!cJSON_IsNumber(idv) || idv->valuedouble != floor(idv->valuedouble) ||
                idv->valuedouble < -9 || idv->valuedouble > 999 || !cJSON_IsString(tag) ||
                (strcmp(tag->valuestring, "alpha") && strcmp(tag->valuestring, "beta")) ||
                (xs && (!cJSON_IsArray(xs) || cJSON_GetArraySize(xs) > 3)))
                fail_msg("not of the schema: %s", out);
            for (const cJSON *x = xs ? xs->child : NULL; x; x = x->next)
                if (!cJSON_IsString(x) || utf8_length(x->valuestring) > 4)
                    fail_msg("not of the schema: %s", out);
            for (const cJSON *f = v->child; f; f = f->next)
                if (strcmp(f->string, "id") && strcmp(f->string, "tag") &&
                    strcmp(f->string, "ok") && strcmp(f->string, "xs"))
                    fail_msg("an undeclared key: %s", out);
            cJSON_Delete(v);
            ended++;
        }
        cake_json_grammar_free(g);
    }
    printf("json schema: %d of 20 random answers closed their object\n", ended);
    assert_true(ended > 0);
    cake_json_vocab_free(vocab);
    json_schema_release(s);
    cake_model_free(m);
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schema_cases),   cmocka_unit_test(test_schema_no_dead_ends),
        cmocka_unit_test(test_schema_refused), cmocka_unit_test(test_schema_mask),
        cmocka_unit_test(test_schema_sampled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
