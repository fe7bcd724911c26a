#include "server/json_schema.h"

#include <limits.h>
#include <stdbool.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"

#define MAX_NESTING 64 /* schemas inside schemas */
#define MAX_REFS    256
#define MAX_ENUM    4096

/* Everything a compiled schema holds is allocated in one list of blocks,
 * freed together. */
typedef struct block {
    struct block *next;
    max_align_t data[];
} block;

struct json_schema {
    atomic_int refs;
    const cake_json_node *root;
    block *blocks;
};

typedef struct {
    json_schema *out;
    const cJSON *doc; /* the whole schema, which "$ref": "#/..." points into */
    struct {
        const cJSON *at;
        cake_json_node *node;
        int busy; /* being compiled: a $ref inside it refers to itself */
    } refs[MAX_REFS];
    int n_refs;
    char *err;
    size_t errlen;
} compiler;

static void *alloc(compiler *c, size_t n) {
    block *b = calloc(1, sizeof(block) + n);
    if (!b) {
        cake_err(c->err, c->errlen, "out of memory compiling the JSON schema");
        return NULL;
    }
    b->next = c->out->blocks;
    c->out->blocks = b;
    return b->data;
}

static cake_json_node *new_node(compiler *c, cake_json_kind kind) {
    cake_json_node *n = alloc(c, sizeof(*n));
    if (n) n->kind = kind, n->max = -1;
    return n;
}

/* v's compact JSON (a string's without its quotes: a property name as
 * written), in the schema's blocks. */
static const char *compact_json(compiler *c, const cJSON *v, int unquote) {
    char *text = cJSON_PrintUnformatted(v);
    if (!text) return cake_err(c->err, c->errlen, "out of memory compiling the JSON schema"), NULL;
    size_t len = strlen(text);
    if (unquote) len -= 2;
    char *out = alloc(c, len + 1);
    if (out) memcpy(out, text + (unquote ? 1 : 0), len);
    cJSON_free(text);
    return out;
}

static const char *property_name(compiler *c, const char *name) {
    cJSON *s = cJSON_CreateString(name);
    const char *out = s ? compact_json(c, s, 1) : NULL;
    if (!s) cake_err(c->err, c->errlen, "out of memory compiling the JSON schema");
    cJSON_Delete(s);
    return out;
}

/* Keywords that constrain values in ways the automaton does not follow. */
static const char *const refused[] = {"pattern",
                                      "multipleOf",
                                      "contains",
                                      "minContains",
                                      "maxContains",
                                      "patternProperties",
                                      "propertyNames",
                                      "minProperties",
                                      "maxProperties",
                                      "dependentRequired",
                                      "dependentSchemas",
                                      "dependencies",
                                      "unevaluatedProperties",
                                      "unevaluatedItems",
                                      "not",
                                      "if",
                                      "then",
                                      "else",
                                      "additionalItems",
                                      "$dynamicRef",
                                      "$recursiveRef"};

/* Keywords of one type's values, and what they tell the type to be when
 * "type" is absent. */
static const struct {
    const char *keyword, *type;
} typed[] = {{"properties", "object"},
             {"required", "object"},
             {"additionalProperties", "object"},
             {"items", "array"},
             {"prefixItems", "array"},
             {"minItems", "array"},
             {"maxItems", "array"},
             {"minLength", "string"},
             {"maxLength", "string"},
             {"minimum", "number"},
             {"maximum", "number"},
             {"exclusiveMinimum", "number"},
             {"exclusiveMaximum", "number"}};

static cake_json_node *compile(compiler *c, const cJSON *s, int depth);

static int count_of(const cJSON *s, const char *key, int *out, compiler *c) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, key);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > INT_MAX ||
        v->valuedouble != (double)(int)v->valuedouble)
        return cake_err(c->err, c->errlen, "'%s' must be a non-negative integer", key);
    *out = (int)v->valuedouble;
    return 0;
}

/* minKEY and maxKEY into n->min, n->max. */
static int bounds(compiler *c, const cJSON *s, const char *min_key, const char *max_key,
                  cake_json_node *n) {
    if (count_of(s, min_key, &n->min, c) || count_of(s, max_key, &n->max, c)) return -1;
    if (n->max >= 0 && n->min > n->max)
        return cake_err(c->err, c->errlen, "'%s' is above '%s': no value fits", min_key, max_key);
    return 0;
}

typedef struct {
    const char *name; /* as written */
    const char *raw;  /* as in the schema, for "required" */
    const cake_json_node *node;
} property;

static int by_name(const void *a, const void *b) {
    return strcmp(((const property *)a)->name, ((const property *)b)->name);
}

static cake_json_node *compile_object(compiler *c, const cJSON *s, int depth) {
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *more = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    if (props && !cJSON_IsObject(props))
        return cake_err(c->err, c->errlen, "'properties' must be an object"), NULL;
    if (req && !cJSON_IsArray(req))
        return cake_err(c->err, c->errlen, "'required' must be an array of names"), NULL;
    const int n = props ? cJSON_GetArraySize(props) : 0;
    if (n > CAKE_JSON_MAX_PROPS)
        return cake_err(c->err, c->errlen, "an object with more than %d properties",
                        CAKE_JSON_MAX_PROPS),
               NULL;
    cake_json_node *o = new_node(c, CAKE_JSON_OBJECT);
    property *p = alloc(c, (size_t)(n ? n : 1) * sizeof(*p));
    if (!o || !p) return NULL;
    int i = 0;
    for (const cJSON *v = props ? props->child : NULL; v; v = v->next, i++) {
        for (int k = 0; k < i; k++)
            if (!strcmp(p[k].raw, v->string))
                return cake_err(c->err, c->errlen, "property '%.60s' is declared twice", v->string),
                       NULL;
        p[i].raw = v->string;
        if (!(p[i].name = property_name(c, v->string))) return NULL;
        if (!(p[i].node = compile(c, v, depth + 1))) return NULL;
    }
    qsort(p, (size_t)n, sizeof(*p), by_name);
    const char **names = alloc(c, (size_t)(n ? n : 1) * sizeof(*names));
    const cake_json_node **sub = alloc(c, (size_t)(n ? n : 1) * sizeof(*sub));
    if (!names || !sub) return NULL;
    for (i = 0; i < n; i++) names[i] = p[i].name, sub[i] = p[i].node;
    for (const cJSON *r = req ? req->child : NULL; r; r = r->next) {
        if (!cJSON_IsString(r))
            return cake_err(c->err, c->errlen, "'required' must be an array of names"), NULL;
        for (i = 0; i < n && strcmp(p[i].raw, r->valuestring); i++) continue;
        if (i == n)
            return cake_err(c->err, c->errlen,
                            "'required' names '%.60s', which is not in 'properties'",
                            r->valuestring),
                   NULL;
        o->required |= 1ull << i;
    }
    o->n = n;
    o->names = names;
    o->sub = sub;
    /* No additionalProperties beside properties: none (as vLLM's xgrammar
     * and OpenAI's strict mode have it); an object without either: any. */
    if (!more)
        o->more = props ? NULL : &cake_json_any;
    else if (cJSON_IsBool(more))
        o->more = cJSON_IsTrue(more) ? &cake_json_any : NULL;
    else if (!(o->more = compile(c, more, depth + 1)))
        return NULL;
    return o;
}

static cake_json_node *compile_array(compiler *c, const cJSON *s, int depth) {
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
    const cJSON *tuple = cJSON_GetObjectItemCaseSensitive(s, "prefixItems");
    cake_json_node *a = new_node(c, CAKE_JSON_ARRAY);
    if (!a || bounds(c, s, "minItems", "maxItems", a)) return NULL;
    if (tuple) {
        if (!cJSON_IsArray(tuple))
            return cake_err(c->err, c->errlen, "'prefixItems' must be an array of schemas"), NULL;
        const int n = cJSON_GetArraySize(tuple);
        const cake_json_node **sub = alloc(c, (size_t)(n ? n : 1) * sizeof(*sub));
        if (!sub) return NULL;
        int i = 0;
        for (const cJSON *t = tuple->child; t; t = t->next)
            if (!(sub[i++] = compile(c, t, depth + 1))) return NULL;
        a->n = n;
        a->sub = sub;
    }
    /* No items beside prefixItems: no more items (as with properties). */
    if (!items || cJSON_IsBool(items))
        a->more = (items ? cJSON_IsTrue(items) : !tuple) ? &cake_json_any : NULL;
    else if (cJSON_IsArray(items))
        return cake_err(c->err, c->errlen, "'items' as an array: use 'prefixItems'"), NULL;
    else if (!(a->more = compile(c, items, depth + 1)))
        return NULL;
    if (!a->more && a->min > a->n)
        return cake_err(c->err, c->errlen, "'minItems' asks for more items than the tuple has"),
               NULL;
    return a;
}

static int by_text(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* An enum of the given values (compact JSON; sorted and made unique here). */
static cake_json_node *enum_node(compiler *c, const char **values, int n) {
    qsort(values, (size_t)n, sizeof(*values), by_text);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!k || strcmp(values[k - 1], values[i])) values[k++] = values[i];
    cake_json_node *e = new_node(c, CAKE_JSON_ENUM);
    if (!e) return NULL;
    e->n = k;
    e->names = values;
    return e;
}

/* Whether v is of JSON Schema type `type`. */
static int of_type(const cJSON *v, const char *type) {
    if (!strcmp(type, "integer"))
        return cJSON_IsNumber(v) && v->valuedouble == (double)(long long)v->valuedouble;
    return (!strcmp(type, "number") && cJSON_IsNumber(v)) ||
           (!strcmp(type, "string") && cJSON_IsString(v)) ||
           (!strcmp(type, "boolean") && cJSON_IsBool(v)) ||
           (!strcmp(type, "null") && cJSON_IsNull(v)) ||
           (!strcmp(type, "object") && cJSON_IsObject(v)) ||
           (!strcmp(type, "array") && cJSON_IsArray(v));
}

static int type_allows(const cJSON *type, const cJSON *v) {
    if (!type) return 1;
    if (cJSON_IsString(type)) return of_type(v, type->valuestring);
    for (const cJSON *t = type->child; t; t = t->next)
        if (cJSON_IsString(t) && of_type(v, t->valuestring)) return 1;
    return 0;
}

/* enum or const, with the values "type" allows. */
static cake_json_node *compile_enum(compiler *c, const cJSON *s) {
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *cn = cJSON_GetObjectItemCaseSensitive(s, "const");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (en && !cJSON_IsArray(en))
        return cake_err(c->err, c->errlen, "'enum' must be an array"), NULL;
    const int n = en ? cJSON_GetArraySize(en) : 1;
    if (n > MAX_ENUM)
        return cake_err(c->err, c->errlen, "an 'enum' of more than %d values", MAX_ENUM), NULL;
    const char **values = alloc(c, (size_t)(n ? n : 1) * sizeof(*values));
    if (!values) return NULL;
    int k = 0;
    for (const cJSON *v = en ? en->child : cn; v; v = en ? v->next : NULL)
        if (type_allows(type, v) && !(values[k++] = compact_json(c, v, 0))) return NULL;
    if (!k)
        return cake_err(c->err, c->errlen, "'%s' allows no value%s", en ? "enum" : "const",
                        type ? " of its 'type'" : ""),
               NULL;
    return enum_node(c, values, k);
}

static int is_busy(const compiler *c, const cake_json_node *n) {
    for (int i = 0; i < c->n_refs; i++)
        if (c->refs[i].node == n && c->refs[i].busy) return 1;
    return 0;
}

/* Whether a and b are the same schema (the same nodes, or nodes alike). */
static bool same_schema(const cake_json_node *a, const cake_json_node *b, int depth) {
    if (a == b) return true;
    if (!a || !b || depth > 16 || a->kind != b->kind || a->n != b->n ||
        a->required != b->required || a->min != b->min || a->max != b->max ||
        a->bounded != b->bounded || a->minimum != b->minimum || a->maximum != b->maximum ||
        a->choice || b->choice || a->alts || b->alts || !same_schema(a->more, b->more, depth + 1))
        return false;
    for (int i = 0; i < a->n; i++)
        if ((a->names && strcmp(a->names[i], b->names[i])) ||
            (a->sub && !same_schema(a->sub[i], b->sub[i], depth + 1)))
            return false;
    return true;
}

typedef struct {
    const char *value;
    uint64_t alts;
} masked_value;

static int by_value(const void *a, const void *b) {
    return strcmp(((const masked_value *)a)->value, ((const masked_value *)b)->value);
}

/* The schema of a property that the alternatives (bits of `declared`) of an
 * object choice give as own[a]: theirs when they agree; else a union of
 * what they differ in, each part (or enum value) with the alternatives it
 * fits, when those differ in their first byte; else NULL (the value's
 * schema is known once one alternative is left). */
static const cake_json_node *choice_value(compiler *c, const cake_json_node *const *own,
                                          uint64_t declared) {
    const cake_json_node *parts[64];
    uint64_t masks[64];
    int n = 0;
    for (uint64_t d = declared; d; d &= d - 1) {
        const int a = __builtin_ctzll(d);
        int i = 0;
        while (i < n && !same_schema(parts[i], own[a], 0)) i++;
        if (i == n) parts[n] = own[a], masks[n++] = 0;
        masks[i] |= 1ull << a;
    }
    if (n == 1) return parts[0];
    /* the parts' alternatives (a union's, one each) and enum values */
    int n_branches = 0, n_values = 0;
    for (int i = 0; i < n; i++) {
        if (parts[i]->kind == CAKE_JSON_ANY) return NULL;
        const int m = parts[i]->kind == CAKE_JSON_UNION ? parts[i]->n : 1;
        for (int j = 0; j < m; j++) {
            const cake_json_node *b =
                parts[i]->kind == CAKE_JSON_UNION ? parts[i]->sub[j] : parts[i];
            if (b->kind == CAKE_JSON_ENUM)
                n_values += b->n;
            else
                n_branches++;
        }
    }
    const cake_json_node **sub = alloc(c, (size_t)(n_branches + 1) * sizeof(*sub));
    uint64_t *alts = alloc(c, (size_t)(n_branches + 1) * sizeof(*alts));
    masked_value *values = alloc(c, (size_t)(n_values + 1) * sizeof(*values));
    if (!sub || !alts || !values) return NULL;
    int k = 0, v = 0;
    for (int i = 0; i < n; i++) {
        const int m = parts[i]->kind == CAKE_JSON_UNION ? parts[i]->n : 1;
        for (int j = 0; j < m; j++) {
            const cake_json_node *b =
                parts[i]->kind == CAKE_JSON_UNION ? parts[i]->sub[j] : parts[i];
            if (b->kind != CAKE_JSON_ENUM) {
                sub[k] = b, alts[k++] = masks[i];
                continue;
            }
            for (int e = 0; e < b->n; e++) values[v++] = (masked_value){b->names[e], masks[i]};
        }
    }
    if (v) { /* one enum: its values sorted, each with the alternatives that have it */
        qsort(values, (size_t)v, sizeof(*values), by_value);
        const char **names = alloc(c, (size_t)v * sizeof(*names));
        uint64_t *fits = alloc(c, (size_t)v * sizeof(*fits));
        cake_json_node *e = new_node(c, CAKE_JSON_ENUM);
        if (!names || !fits || !e) return NULL;
        int u = 0;
        for (int i = 0; i < v; i++) {
            if (u && !strcmp(names[u - 1], values[i].value)) {
                fits[u - 1] |= values[i].alts;
                continue;
            }
            names[u] = values[i].value, fits[u++] = values[i].alts;
        }
        e->n = u, e->names = names, e->alts = fits;
        uint64_t all = 0;
        for (int i = 0; i < u; i++) all |= fits[i];
        sub[k] = e, alts[k++] = all;
    }
    for (int ch = 1; ch < 256; ch++) { /* told apart by their first byte */
        int starts = 0;
        for (int i = 0; i < k; i++) starts += cake_json_can_start(sub[i], (unsigned char)ch);
        if (starts > 1) return NULL;
    }
    if (k == 1) return sub[0]; /* (the enum) */
    cake_json_node *u = new_node(c, CAKE_JSON_UNION);
    if (!u) return NULL;
    u->n = k, u->sub = sub, u->alts = alts;
    return u;
}

/* Whether every value of v (a choice_value) fits one alternative only. */
static bool tells_apart(const cake_json_node *v) {
    if (!v->alts) return false;
    for (int i = 0; i < v->n; i++) {
        const cake_json_node *part = v->kind == CAKE_JSON_UNION ? v->sub[i] : NULL;
        if (part && part->alts) { /* the enum part: its values, each */
            if (!tells_apart(part)) return false;
        } else if (!v->alts[i] || v->alts[i] & (v->alts[i] - 1)) {
            return false;
        }
    }
    return true;
}

/* An object that is one of the plain objects given (anyOf): every name of
 * theirs, which declare and require each, and how a property's value
 * narrows them (choice_value). Where a property's schema is known only once
 * one alternative is left, a property that all declare and require and
 * whose value tells each apart (a discriminator: a "type" const in each)
 * must exist: with it, no answer can reach an object that takes no key. */
static cake_json_node *object_choice(compiler *c, const cake_json_node **objects, int k) {
    if (k > 64) return cake_err(c->err, c->errlen, "an anyOf of more than 64 objects"), NULL;
    const char *all[64 * CAKE_JSON_MAX_PROPS];
    int n = 0;
    for (int a = 0; a < k; a++)
        for (int i = 0; i < objects[a]->n; i++) all[n++] = objects[a]->names[i];
    qsort(all, (size_t)n, sizeof(*all), by_text);
    int names_n = 0;
    for (int i = 0; i < n; i++)
        if (!names_n || strcmp(all[names_n - 1], all[i])) all[names_n++] = all[i];
    if (names_n > CAKE_JSON_MAX_PROPS)
        return cake_err(c->err, c->errlen, "an anyOf of objects with more than %d names in all",
                        CAKE_JSON_MAX_PROPS),
               NULL;
    cake_json_choice *ch = alloc(c, sizeof(*ch));
    cake_json_node *o = new_node(c, CAKE_JSON_OBJECT);
    const char **names = alloc(c, (size_t)(names_n + 1) * sizeof(*names));
    const cake_json_node **sub = alloc(c, (size_t)(names_n + 1) * sizeof(*sub));
    uint64_t *declared = alloc(c, (size_t)(names_n + 1) * sizeof(*declared));
    uint64_t *required = alloc(c, (size_t)k * sizeof(*required));
    const cake_json_node **alt_sub = alloc(c, (size_t)(names_n * k + 1) * sizeof(*alt_sub));
    if (!ch || !o || !names || !sub || !declared || !required || !alt_sub) return NULL;
    memcpy(names, all, (size_t)names_n * sizeof(*names));
    for (int a = 0; a < k; a++) {
        const cake_json_node *obj = objects[a];
        if (obj->more) {
            if (o->more && !same_schema(o->more, obj->more, 0))
                return cake_err(c->err, c->errlen,
                                "an anyOf of objects whose other keys differ is not supported"),
                       NULL;
            o->more = obj->more;
            ch->open |= 1ull << a;
        }
        for (int i = 0; i < obj->n; i++) {
            int x = 0;
            while (strcmp(names[x], obj->names[i])) x++;
            declared[x] |= 1ull << a;
            alt_sub[x * k + a] = obj->sub[i];
            if (obj->required >> i & 1) required[a] |= 1ull << x;
        }
    }
    const uint64_t everyone = k == 64 ? ~0ull : (1ull << k) - 1;
    int unknown = -1, discriminator = -1;
    for (int x = 0; x < names_n; x++) {
        sub[x] = choice_value(c, alt_sub + x * k, declared[x]);
        if (!sub[x]) unknown = x;
        int required_by_all = declared[x] == everyone;
        for (int a = 0; a < k; a++) required_by_all &= (int)(required[a] >> x & 1);
        if (required_by_all && sub[x] && tells_apart(sub[x])) discriminator = x;
    }
    if (unknown >= 0 && discriminator < 0)
        return cake_err(c->err, c->errlen,
                        "an anyOf of objects whose property '%.40s' differs between them needs "
                        "a property that tells them apart (as a 'type' with a different const "
                        "in each, given by all)",
                        names[unknown]),
               NULL;
    ch->n = k, ch->declared_by = declared, ch->required = required, ch->alt_sub = alt_sub;
    ch->objects = objects;
    o->n = names_n, o->names = names, o->sub = sub, o->choice = ch;
    return o;
}

/* A value that is one of n alternatives (anyOf, oneOf, a list of types).
 * The automaton picks the alternative by a value's first byte, so they
 * must differ there; enums are merged into one. */
static cake_json_node *union_of(compiler *c, const cake_json_node **alts, int n, int one_of) {
    int n_flat = 1, n_values = 0;
    for (int i = 0; i < n; i++) {
        const cake_json_node *a = alts[i];
        if (is_busy(c, a))
            return cake_err(c->err, c->errlen,
                            "a '$ref' to a schema that holds it, directly inside 'anyOf' or "
                            "'oneOf', is not supported"),
                   NULL;
        if (a->kind == CAKE_JSON_ANY) {
            if (one_of)
                return cake_err(c->err, c->errlen,
                                "'oneOf' with an alternative that allows "
                                "any value is not supported"),
                       NULL;
            return (cake_json_node *)&cake_json_any;
        }
        for (int j = 0; j < (a->kind == CAKE_JSON_UNION ? a->n : 1); j++) {
            const cake_json_node *b = a->kind == CAKE_JSON_UNION ? a->sub[j] : a;
            n_flat++;
            n_values += b->kind == CAKE_JSON_ENUM ? b->n : 0;
        }
    }
    if (n_values > MAX_ENUM)
        return cake_err(c->err, c->errlen, "an 'enum' of more than %d values", MAX_ENUM), NULL;
    const cake_json_node **flat = alloc(c, (size_t)n_flat * sizeof(*flat));
    const char **values = alloc(c, (size_t)(n_values + 1) * sizeof(*values));
    if (!flat || !values) return NULL;
    int k = 0;
    n_values = 0;
    for (int i = 0; i < n; i++) {
        const cake_json_node *a = alts[i];
        for (int j = 0; j < (a->kind == CAKE_JSON_UNION ? a->n : 1); j++) {
            const cake_json_node *b = a->kind == CAKE_JSON_UNION ? a->sub[j] : a;
            if (b->kind != CAKE_JSON_ENUM) flat[k++] = b;
            for (int v = 0; b->kind == CAKE_JSON_ENUM && v < b->n; v++)
                values[n_values++] = b->names[v];
        }
    }
    if (n_values && !(flat[k++] = enum_node(c, values, n_values))) return NULL;
    /* Objects: one node that is one of them. */
    int n_objects = 0;
    for (int i = 0; i < k; i++)
        if (flat[i]->kind == CAKE_JSON_OBJECT)
            n_objects += flat[i]->choice ? flat[i]->choice->n : 1;
    if (n_objects > 1) {
        const cake_json_node **objects = alloc(c, (size_t)n_objects * sizeof(*objects));
        if (!objects) return NULL;
        int o = 0, kept = 0;
        for (int i = 0; i < k; i++) {
            const cake_json_node *b = flat[i];
            if (b->kind != CAKE_JSON_OBJECT) {
                flat[kept++] = b;
                continue;
            }
            for (int j = 0; j < (b->choice ? b->choice->n : 1); j++)
                objects[o++] = b->choice ? b->choice->objects[j] : b;
        }
        k = kept;
        if (!(flat[k++] = object_choice(c, objects, n_objects))) return NULL;
    }
    if (k == 1) return (cake_json_node *)flat[0];
    for (int ch = 1; ch < 256; ch++) {
        int starts = 0;
        for (int i = 0; i < k; i++) starts += cake_json_can_start(flat[i], (unsigned char)ch);
        if (starts > 1)
            return cake_err(c->err, c->errlen,
                            "alternatives (anyOf, oneOf or a list of types) that can begin "
                            "alike (with '%c') are not supported",
                            ch),
                   NULL;
    }
    cake_json_node *u = new_node(c, CAKE_JSON_UNION);
    if (!u) return NULL;
    u->n = k;
    u->sub = flat;
    return u;
}

static cake_json_node *compile_alternatives(compiler *c, const cJSON *list, const char *key,
                                            int depth) {
    if (!cJSON_IsArray(list) || !cJSON_GetArraySize(list))
        return cake_err(c->err, c->errlen, "'%s' must be a non-empty array of schemas", key), NULL;
    const int n = cJSON_GetArraySize(list);
    const cake_json_node **alts = alloc(c, (size_t)n * sizeof(*alts));
    if (!alts) return NULL;
    int i = 0;
    for (const cJSON *a = list->child; a; a = a->next)
        if (!(alts[i++] = compile(c, a, depth + 1))) return NULL;
    return union_of(c, alts, n, !strcmp(key, "oneOf"));
}

static const char *const type_names[] = {"object",  "array",   "string", "number",
                                         "integer", "boolean", "null"};

/* An integer's minimum, maximum and their exclusive forms, as inclusive
 * integer bounds. A number's are refused: the automaton bounds integers
 * only. */
static int integer_bounds(compiler *c, const cJSON *s, cake_json_node *n) {
    static const char *const keys[] = {"minimum", "exclusiveMinimum", "maximum",
                                       "exclusiveMaximum"};
    double lo = -HUGE_VAL, hi = HUGE_VAL;
    for (int i = 0; i < 4; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, keys[i]);
        if (!v) continue;
        if (n->kind != CAKE_JSON_INTEGER)
            return cake_err(c->err, c->errlen, "'%s' is enforced on integers only, not on numbers",
                            keys[i]);
        const double x = v->valuedouble;
        if (!cJSON_IsNumber(v) || !(fabs(x) <= 9007199254740992.0))
            return cake_err(c->err, c->errlen, "'%s' must be a number within +-2^53", keys[i]);
        if (i == 0) lo = fmax(lo, ceil(x));
        if (i == 1) lo = fmax(lo, floor(x) + 1);
        if (i == 2) hi = fmin(hi, floor(x));
        if (i == 3) hi = fmin(hi, ceil(x) - 1);
        n->bounded = true;
    }
    if (!n->bounded) return 0;
    if (lo > hi) return cake_err(c->err, c->errlen, "no integer is within the bounds given");
    n->minimum = isinf(lo) ? INT64_MIN : (int64_t)lo;
    n->maximum = isinf(hi) ? INT64_MAX : (int64_t)hi;
    return 0;
}

static cake_json_node *typed_node(compiler *c, const cJSON *s, const char *type, int depth) {
    static const char *const booleans[] = {"false", "true"}, *const nulls[] = {"null"};
    cake_json_node *n = NULL;
    if (!strcmp(type, "object")) return compile_object(c, s, depth);
    if (!strcmp(type, "array")) return compile_array(c, s, depth);
    if (!strcmp(type, "string")) {
        if ((n = new_node(c, CAKE_JSON_STRING)) && bounds(c, s, "minLength", "maxLength", n))
            return NULL;
    } else if (!strcmp(type, "number") || !strcmp(type, "integer")) {
        n = new_node(c, type[1] == 'u' ? CAKE_JSON_NUMBER : CAKE_JSON_INTEGER);
        if (n && integer_bounds(c, s, n)) return NULL;
    } else if ((n = new_node(c, CAKE_JSON_ENUM))) { /* boolean, null */
        n->n = type[0] == 'b' ? 2 : 1;
        n->names = type[0] == 'b' ? booleans : nulls;
    }
    return n;
}

static int known_type(const cJSON *t) {
    for (size_t i = 0; cJSON_IsString(t) && i < sizeof(type_names) / sizeof(type_names[0]); i++)
        if (!strcmp(t->valuestring, type_names[i])) return 1;
    return 0;
}

/* "type" (a name or a list), or the type its keywords imply. */
static cake_json_node *compile_typed(compiler *c, const cJSON *s, int depth) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (!type) {
        const char *implied = NULL;
        for (size_t i = 0; i < sizeof(typed) / sizeof(typed[0]); i++) {
            if (!cJSON_GetObjectItemCaseSensitive(s, typed[i].keyword)) continue;
            if (implied && strcmp(implied, typed[i].type))
                return cake_err(c->err, c->errlen,
                                "keywords of %s and of %s without a 'type' to choose", implied,
                                typed[i].type),
                       NULL;
            implied = typed[i].type;
        }
        return implied ? typed_node(c, s, implied, depth) : (cake_json_node *)&cake_json_any;
    }
    if (cJSON_IsString(type)) {
        if (!known_type(type))
            return cake_err(c->err, c->errlen, "unknown 'type' '%.40s'", type->valuestring), NULL;
        return typed_node(c, s, type->valuestring, depth);
    }
    const int n = cJSON_IsArray(type) ? cJSON_GetArraySize(type) : 0;
    if (!n) return cake_err(c->err, c->errlen, "'type' must be a name or a list of names"), NULL;
    const cake_json_node **alts = alloc(c, (size_t)n * sizeof(*alts));
    if (!alts) return NULL;
    int k = 0, number = 0;
    for (const cJSON *t = type->child; t; t = t->next)
        number |= cJSON_IsString(t) && !strcmp(t->valuestring, "number");
    for (const cJSON *t = type->child; t; t = t->next) {
        if (!known_type(t)) return cake_err(c->err, c->errlen, "unknown 'type' in the list"), NULL;
        if (number && !strcmp(t->valuestring, "integer")) continue; /* (numbers hold them) */
        if (!(alts[k++] = typed_node(c, s, t->valuestring, depth))) return NULL;
    }
    return union_of(c, alts, k, 0);
}

/* The schema "$ref": "#/..." points to (a JSON pointer into the document). */
static const cJSON *resolve(compiler *c, const char *ref) {
    if (ref[0] != '#' || (ref[1] && ref[1] != '/'))
        return cake_err(c->err, c->errlen,
                        "'$ref' %.60s: only references into the schema (#/...) are supported", ref),
               NULL;
    const cJSON *at = c->doc;
    for (const char *p = ref + 1; *p == '/' && at;) {
        char part[256];
        size_t n = 0;
        for (p++; *p && *p != '/'; p++) {
            char ch = *p;
            if (ch == '~' && (p[1] == '0' || p[1] == '1')) ch = *++p == '0' ? '~' : '/';
            if (n + 1 >= sizeof(part)) return cake_err(c->err, c->errlen, "'$ref' too long"), NULL;
            part[n++] = ch;
        }
        part[n] = 0;
        if (cJSON_IsArray(at)) {
            char *end;
            long i = strtol(part, &end, 10);
            at = *part && !*end ? cJSON_GetArrayItem(at, (int)i) : NULL;
        } else {
            at = cJSON_GetObjectItemCaseSensitive(at, part);
        }
    }
    if (!at) return cake_err(c->err, c->errlen, "'$ref' %.60s points to nothing", ref), NULL;
    return at;
}

static cake_json_node *compile_ref(compiler *c, const cJSON *ref, int depth) {
    if (!cJSON_IsString(ref)) return cake_err(c->err, c->errlen, "'$ref' must be a string"), NULL;
    const cJSON *target = resolve(c, ref->valuestring);
    if (!target) return NULL;
    for (int i = 0; i < c->n_refs; i++)
        if (c->refs[i].at == target) return c->refs[i].node;
    if (c->n_refs == MAX_REFS)
        return cake_err(c->err, c->errlen, "more than %d '$ref' targets", MAX_REFS), NULL;
    /* The node exists before its schema is compiled, so that a $ref inside
     * it (a tree, a linked list) points back to it. */
    const int slot = c->n_refs++;
    cake_json_node *n = new_node(c, CAKE_JSON_ANY);
    if (!n) return NULL;
    c->refs[slot].at = target;
    c->refs[slot].node = n;
    c->refs[slot].busy = 1;
    const cake_json_node *body = compile(c, target, depth + 1);
    if (!body) return NULL;
    if (is_busy(c, body)) /* ($refs all the way round: no schema says what the value is) */
        return cake_err(c->err, c->errlen, "'$ref' %.60s: a cycle of references alone",
                        ref->valuestring),
               NULL;
    *n = *body;
    c->refs[slot].busy = 0;
    return n;
}

static cake_json_node *compile(compiler *c, const cJSON *s, int depth) {
    if (depth > MAX_NESTING)
        return cake_err(c->err, c->errlen, "the schema nests deeper than %d", MAX_NESTING), NULL;
    if (cJSON_IsTrue(s)) return (cake_json_node *)&cake_json_any;
    if (cJSON_IsFalse(s))
        return cake_err(c->err, c->errlen, "a schema 'false' allows no value"), NULL;
    if (!cJSON_IsObject(s))
        return cake_err(c->err, c->errlen, "a schema must be an object or a boolean"), NULL;
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++)
        if (cJSON_GetObjectItemCaseSensitive(s, refused[i]))
            return cake_err(c->err, c->errlen, "the JSON schema keyword '%s' is not supported",
                            refused[i]),
                   NULL;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(s, "uniqueItems")))
        return cake_err(c->err, c->errlen,
                        "the JSON schema keyword 'uniqueItems' is not supported"),
               NULL;

    /* One form of schema: a reference, a conjunction of one, alternatives,
     * fixed values, or a type with its keywords. */
    static const char *const forms[] = {"$ref", "allOf", "anyOf", "oneOf", "enum", "const"};
    const char *form = NULL;
    for (size_t i = 0; i < sizeof(forms) / sizeof(forms[0]); i++) {
        if (!cJSON_GetObjectItemCaseSensitive(s, forms[i])) continue;
        if (form)
            return cake_err(c->err, c->errlen, "'%s' beside '%s' is not supported", forms[i], form),
                   NULL;
        form = form ? form : forms[i];
    }
    const int is_enum = form && (!strcmp(form, "enum") || !strcmp(form, "const"));
    for (size_t i = 0; form && i < sizeof(typed) / sizeof(typed[0]); i++)
        if (cJSON_GetObjectItemCaseSensitive(s, typed[i].keyword))
            return cake_err(c->err, c->errlen, "'%s' beside '%s' is not supported",
                            typed[i].keyword, form),
                   NULL;
    if (form && !is_enum && cJSON_GetObjectItemCaseSensitive(s, "type"))
        return cake_err(c->err, c->errlen, "'type' beside '%s' is not supported", form), NULL;

    if (!form) return compile_typed(c, s, depth);
    if (is_enum) return compile_enum(c, s);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, form);
    if (!strcmp(form, "$ref")) return compile_ref(c, v, depth);
    if (!strcmp(form, "allOf")) {
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 1)
            return cake_err(c->err, c->errlen, "'allOf' of other than one schema is not supported"),
                   NULL;
        return compile(c, v->child, depth + 1);
    }
    return compile_alternatives(c, v, form, depth);
}

json_schema *json_schema_compile(const cJSON *schema, char *err, size_t errlen) {
    json_schema *out = calloc(1, sizeof(*out));
    compiler *c = calloc(1, sizeof(*c));
    if (!out || !c) {
        free(out);
        free(c);
        cake_err(err, errlen, "out of memory compiling the JSON schema");
        return NULL;
    }
    atomic_init(&out->refs, 1);
    c->out = out;
    c->doc = schema;
    c->err = err;
    c->errlen = errlen;
    out->root = compile(c, schema, 0);
    free(c);
    if (!out->root) {
        json_schema_release(out);
        return NULL;
    }
    return out;
}

/* A literal: an enum of one value, its text as written. */
static const cake_json_node *literal(compiler *c, const char *text) {
    const char **names = alloc(c, sizeof(*names));
    char *copy = alloc(c, strlen(text) + 1);
    cake_json_node *n = new_node(c, CAKE_JSON_ENUM);
    if (!names || !copy || !n) return NULL;
    strcpy(copy, text);
    names[0] = copy;
    n->n = 1;
    n->names = names;
    return n;
}

int json_schema_between(json_schema *s, const char *before, const char *after) {
    char err[64];
    compiler c = {.out = s, .err = err, .errlen = sizeof(err)};
    const cake_json_node **parts = alloc(&c, 3 * sizeof(*parts));
    cake_json_node *seq = new_node(&c, CAKE_JSON_SEQUENCE);
    if (!parts || !seq) return -1;
    if (*before && !(parts[seq->n++] = literal(&c, before))) return -1;
    parts[seq->n++] = s->root;
    if (*after && !(parts[seq->n++] = literal(&c, after))) return -1;
    seq->sub = parts;
    s->root = seq;
    return 0;
}

int json_schema_tagged(json_schema *s, const char *const *tags, int n) {
    const cake_json_node *tuple = s->root;
    if (tuple->kind != CAKE_JSON_ARRAY || tuple->n != n || n < 1) return -1;
    char err[64];
    compiler c = {.out = s, .err = err, .errlen = sizeof(err)};
    const char **names = alloc(&c, (size_t)n * sizeof(*names));
    const cake_json_node **values = alloc(&c, (size_t)n * sizeof(*values));
    const cake_json_node **parts = alloc(&c, sizeof(*parts));
    cake_json_node *tag = new_node(&c, CAKE_JSON_ENUM), *seq = new_node(&c, CAKE_JSON_SEQUENCE);
    if (!names || !values || !parts || !tag || !seq) return -1;
    for (int i = 0; i < n; i++) { /* (sorted, as the mask reads names, each with its value) */
        int at = i;
        while (at && strcmp(names[at - 1], tags[i]) > 0) {
            names[at] = names[at - 1];
            values[at] = values[at - 1];
            at--;
        }
        if (at && !strcmp(names[at - 1], tags[i])) return -1;
        names[at] = tags[i];
        values[at] = tuple->sub[i];
    }
    for (int i = 0; i < n; i++) {
        char *copy = alloc(&c, strlen(names[i]) + 1);
        if (!copy) return -1;
        names[i] = strcpy(copy, names[i]);
    }
    tag->n = n;
    tag->names = names;
    tag->sub = values;
    parts[0] = tag;
    seq->n = 1;
    seq->sub = parts;
    s->root = seq;
    return 0;
}

const cake_json_node *json_schema_root(const json_schema *s) {
    return s->root;
}

json_schema *json_schema_retain(json_schema *s) {
    atomic_fetch_add(&s->refs, 1);
    return s;
}

void json_schema_release(json_schema *s) {
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1) return;
    for (block *b = s->blocks, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(s);
}
