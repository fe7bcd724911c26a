#include "testutil.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cake.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "store/store.h"
#include "util/err.h"
#include "util/f16.h"
#include "util/q8_0.h"

const char *test_models_dir(void) {
    const char *env = getenv("CAKE_TEST_MODELS");
    return env && *env ? env : CAKE_TEST_MODELS;
}

const char *test_model_path(const char *name) {
    static char path[4096];
    snprintf(path, sizeof(path), "%s/%s", test_models_dir(), name);
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "skip: test model %s not found (set CAKE_TEST_MODELS)\n", path);
        return NULL;
    }
    return path;
}

void *test_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf && size) *size = (size_t)n;
    return buf;
}

atomic_int test_counted_allocs, test_counted_releases;

static void *counting_alloc(size_t size) {
    atomic_fetch_add(&test_counted_allocs, 1);
    return cake_store_alloc_buffer(size);
}

static void counting_release(void *p) {
    atomic_fetch_add(&test_counted_releases, 1);
    cake_store_free_buffer(p);
}

const cake_staging_allocator test_counting_allocator = {counting_alloc, counting_release};

int test_make_model(const char *shape, const char *dtype, char path[64]) {
    snprintf(path, 64, "/tmp/cake-test-%s-XXXXXX", shape);
    const int fd = mkstemp(path);
    if (fd < 0) return -1;
    close(fd);
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "%s mkmodel --shape %s --dtype %s -o %s 2>/dev/null", CAKE_BIN,
             shape, dtype, path);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---- model variants ---- */

typedef struct {
    const cake_gguf *g;
    const test_model_variant *v;
    int head_dim;
    const uint64_t *src;   /* tensor i of the copy is the source's src[i] */
    const uint64_t *part;  /* its part[i]-th matrix (split_experts), else 0 */
    const int *fused;      /* phi3: 1 attn_qkv (src: attn_q), 2 ffn_up of gate and up (src: gate) */
    uint64_t n_src;        /* how many of the source's are copied */
    uint64_t n_rope;       /* rope factor tensors after them */
    uint64_t n_bias;       /* bias tensors after those */
    uint64_t n_qk_norms;   /* q/k norm tensors after those (then Gemma's post norms) */
    uint64_t first_shared; /* the shared experts' tensors from here on (4 a layer) */
    uint64_t extra;        /* the extra vector's index */
    int dim, shared;       /* their sizes */
} variant_fill;

static bool name_ends(cake_gguf_str name, const char *suffix) {
    const size_t n = strlen(suffix);
    return name.len >= n && memcmp(name.ptr + name.len - n, suffix, n) == 0;
}

/* The type tensor t has in the copy. */
static int variant_type(const test_model_variant *v, const cake_gguf_tensor *t) {
    if (v->dequantize && t->type == CAKE_DTYPE_Q8_0) return CAKE_DTYPE_F32;
    if (v->retype && t->n_dims >= 2) {
        char name[128];
        snprintf(name, sizeof(name), "%.*s", (int)t->name.len, t->name.ptr);
        return v->retype(name, (int)t->type);
    }
    return (int)t->type;
}

/* t's values (F32 or a quantized type; -1 for others) as f32 into x, then as
 * `type` into buf. */
static int convert_tensor(const cake_gguf_tensor *t, int type, void *buf) {
    if (t->type != CAKE_DTYPE_F32 && !cake_dequant_supported((int)t->type)) return -1;
    size_t n = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) n *= t->ne[d];
    float *x = type == CAKE_DTYPE_F32 ? buf : malloc(n * sizeof(float));
    if (!x) return -1;
    if (t->type == CAKE_DTYPE_F32)
        memcpy(x, t->data, n * sizeof(float));
    else
        cake_dequant_to_f32((int)t->type, t->data, 0, x, n);
    if (type != CAKE_DTYPE_F32) {
        if (cake_dequant_supported(type))
            test_quantize_row(type, x, n, buf);
        else /* a type cake refuses for weights (refusal tests): zero blocks */
            memset(buf, 0,
                   n / cake_dtype_block_elems((uint32_t)type) *
                       cake_dtype_block_bytes((uint32_t)type));
        free(x);
    }
    return 0;
}

/* t's rows into dst (q/k rows in NeoX order for qwen2 and phi3); its bytes. */
static uint64_t put_rows(const variant_fill *f, const cake_gguf_tensor *t, char *dst) {
    const uint64_t bytes = t->nbytes, row = bytes / t->ne[1], half = (uint64_t)f->head_dim / 2;
    if (!f->v->qwen2 ||
        !(name_ends(t->name, "attn_q.weight") || name_ends(t->name, "attn_k.weight"))) {
        memcpy(dst, t->data, bytes);
        return bytes;
    }
    for (uint64_t r = 0; r < t->ne[1]; r++) { /* r = head, 2i + b in llama order */
        const uint64_t head = r / (2 * half), within = r % (2 * half);
        const uint64_t to = head * 2 * half + (within % 2) * half + within / 2;
        memcpy(dst + to * row, (const char *)t->data + r * row, row);
    }
    return bytes;
}

/* The source's tensor named as t with its suffix `from` replaced by `to`. */
static const cake_gguf_tensor *sibling(const cake_gguf *g, const cake_gguf_tensor *t,
                                       const char *from, const char *to) {
    char name[128];
    snprintf(name, sizeof(name), "%.*s%s", (int)(t->name.len - strlen(from)), t->name.ptr, to);
    return cake_gguf_find_tensor(g, name);
}

/* The shared expert's tensor i (gate_inp, gate, up, down a layer): values
 * of a seeded generator, uniform in +-1/sqrt(n_in), into buf as F32 or as
 * retype's type. */
static int fill_shared(const variant_fill *f, uint64_t i, void *buf) {
    const int k = (int)((i - f->first_shared) % 4);
    const size_t n_in = (size_t)(k == 3 ? f->shared : f->dim);
    const size_t n = k == 0 ? n_in : n_in * (size_t)(k == 3 ? f->dim : f->shared);
    const int type = k && f->v->retype ? f->v->retype("ffn_shexp", CAKE_DTYPE_F32) : CAKE_DTYPE_F32;
    float *x = type == CAKE_DTYPE_F32 ? buf : malloc(n * sizeof(float));
    if (!x) return -1;
    uint64_t s = 0x5eed0000u + i;
    for (size_t j = 0; j < n; j++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[j] = ((float)(s >> 40) / 16777216.0f * 2 - 1) / sqrtf((float)n_in);
    }
    if (type != CAKE_DTYPE_F32) {
        test_quantize_row(type, x, n, buf);
        free(x);
    }
    return 0;
}

/* Tensor i of the copy: the source's (q/k rows reordered for qwen2; without
 * output.weight when tied; q/k/v and gate/up fused for phi3), then
 * rope_freqs.weight and LongRoPE's factors, then the biases, then the q/k
 * norms. */
static int fill_variant(uint64_t i, void *buf, uint64_t nbytes, void *ctx) {
    const variant_fill *f = ctx;
    const test_model_variant *v = f->v;
    const uint64_t n_src = f->n_src, first_norm = n_src + f->n_rope + f->n_bias;
    if (i == f->extra) {
        memset(buf, 0, nbytes);
        return 0;
    }
    if (i >= f->first_shared) return fill_shared(f, i, buf);
    if (i >= first_norm) { /* q/k norms, then Gemma's post norms */
        const float spread = i >= first_norm + f->n_qk_norms ? 0.25f : v->qk_norm;
        for (uint64_t j = 0; j < nbytes / 4; j++)
            ((float *)buf)[j] = 1.0f + (float)((int)(j % 5) - 2) * spread;
        return 0;
    }
    if (i >= n_src + f->n_rope) { /* a bias */
        for (uint64_t j = 0; j < nbytes / 4; j++)
            ((float *)buf)[j] = (float)((int)(j % 7) - 3) * v->bias;
        return 0;
    }
    if (i >= n_src) { /* rope_freqs.weight, rope_factors_long, rope_factors_short */
        const float *factors[] = {v->rope_factors, v->long_factors, v->short_factors};
        int k = (int)(i - n_src) + !v->rope_factors;
        memcpy(buf, factors[k], nbytes);
        return 0;
    }
    const cake_gguf_tensor *t = &f->g->tensors[f->src[i]];
    if (f->fused[i] == 1) {
        char *dst = buf;
        dst += put_rows(f, t, dst);
        dst += put_rows(f, sibling(f->g, t, "attn_q.weight", "attn_k.weight"), dst);
        put_rows(f, sibling(f->g, t, "attn_q.weight", "attn_v.weight"), dst);
        return 0;
    }
    if (f->fused[i] == 2) {
        put_rows(f, sibling(f->g, t, "ffn_gate.weight", "ffn_up.weight"),
                 (char *)buf + put_rows(f, t, buf));
        return 0;
    }
    const int type = variant_type(v, t);
    if (type != (int)t->type) return convert_tensor(t, type, buf);
    if (t->n_dims == 3 && v->split_experts) { /* expert part[i] */
        memcpy(buf, (const char *)t->data + f->part[i] * nbytes, nbytes);
        return 0;
    }
    put_rows(f, t, buf);
    return 0;
}

/* A NUL-terminated copy of s with `prefix` in front; NULL when out of memory. */
static char *str_copy(const char *prefix, cake_gguf_str s) {
    const size_t p = strlen(prefix);
    char *c = malloc(p + s.len + 1);
    if (!c) return NULL;
    memcpy(c, prefix, p);
    memcpy(c + p, s.ptr, s.len);
    c[p + s.len] = '\0';
    return c;
}

/* Adds kv to w under `key`; -1 for a type the copy does not take. */
static int copy_kv(cake_gguf_writer *w, const char *key, const cake_gguf_kv *kv, const char *arch) {
    if (kv->type == CAKE_GGUF_UINT32) {
        cake_gguf_writer_add_u32(w, key, (uint32_t)kv->v.u64);
    } else if (kv->type == CAKE_GGUF_FLOAT32) {
        cake_gguf_writer_add_f32(w, key, (float)kv->v.f64);
    } else if (kv->type == CAKE_GGUF_BOOL) {
        cake_gguf_writer_add_bool(w, key, kv->v.u64 != 0);
    } else if (kv->type == CAKE_GGUF_STRING) {
        char *val = str_copy("", kv->v.str);
        if (!val) return -1;
        cake_gguf_writer_add_str(w, key, strcmp(key, "general.architecture") ? val : arch);
        free(val);
    } else if (kv->type == CAKE_GGUF_ARRAY && kv->arr_type == CAKE_GGUF_STRING) {
        char **a = calloc(kv->arr_n, sizeof(*a));
        int rc = a ? 0 : -1;
        for (uint64_t j = 0; !rc && j < kv->arr_n; j++)
            if (!(a[j] = str_copy("", kv->arr_strs[j]))) rc = -1;
        if (!rc) cake_gguf_writer_add_arr_str(w, key, (const char *const *)a, kv->arr_n);
        for (uint64_t j = 0; a && j < kv->arr_n; j++) free(a[j]);
        free(a);
        return rc;
    } else if (kv->type == CAKE_GGUF_ARRAY &&
               (kv->arr_type == CAKE_GGUF_FLOAT32 || kv->arr_type == CAKE_GGUF_INT32)) {
        void *a = malloc(kv->arr_n * 4); /* the elements may sit unaligned in the file */
        if (!a) return -1;
        memcpy(a, kv->arr_data, kv->arr_n * 4);
        if (kv->arr_type == CAKE_GGUF_FLOAT32)
            cake_gguf_writer_add_arr_f32(w, key, a, kv->arr_n);
        else
            cake_gguf_writer_add_arr_i32(w, key, a, kv->arr_n);
        free(a);
    } else {
        return -1;
    }
    return 0;
}

/* The vocabulary's tokens or their types, with the last ones replaced by
 * special (control) tokens. */
static int add_special_tokens(cake_gguf_writer *w, const char *key, const cake_gguf_kv *kv,
                              const char *const *special, char *err, size_t errlen) {
    uint64_t k = 0;
    while (special[k]) k++;
    if (kv->type != CAKE_GGUF_ARRAY || kv->arr_n < k + 256)
        return cake_err(err, errlen, "%s: too few tokens for %llu special ones", key,
                        (unsigned long long)k);
    const uint64_t first = kv->arr_n - k;
    if (kv->arr_type == CAKE_GGUF_INT32) {
        int32_t *types = malloc(kv->arr_n * 4);
        if (!types) return cake_err(err, errlen, "out of memory");
        memcpy(types, kv->arr_data, kv->arr_n * 4);
        for (uint64_t j = first; j < kv->arr_n; j++) types[j] = CAKE_TOKEN_CONTROL;
        cake_gguf_writer_add_arr_i32(w, key, types, kv->arr_n);
        free(types);
        return 0;
    }
    char **a = calloc(kv->arr_n, sizeof(*a));
    int rc = a ? 0 : cake_err(err, errlen, "out of memory");
    for (uint64_t j = 0; !rc && j < kv->arr_n; j++)
        if (!(a[j] = j < first ? str_copy("", kv->arr_strs[j]) : strdup(special[j - first])))
            rc = cake_err(err, errlen, "out of memory");
    if (!rc) cake_gguf_writer_add_arr_str(w, key, (const char *const *)a, kv->arr_n);
    for (uint64_t j = 0; a && j < kv->arr_n; j++) free(a[j]);
    free(a);
    return rc;
}

int test_write_variant(const char *src, const char *dst, const test_model_variant *v, char *err,
                       size_t errlen) {
    cake_gguf *g = NULL;
    if (cake_gguf_open(src, &g, err, errlen)) return -1;
    uint32_t dim = 0, n_heads = 0, n_kv = 0, n_layers = 0;
    if (cake_gguf_get_u32(g, "llama.embedding_length", &dim, err, errlen) ||
        cake_gguf_get_u32(g, "llama.attention.head_count", &n_heads, err, errlen) ||
        cake_gguf_get_u32(g, "llama.attention.head_count_kv", &n_kv, err, errlen) ||
        cake_gguf_get_u32(g, "llama.block_count", &n_layers, err, errlen)) {
        cake_gguf_close(g);
        return cake_err(err, errlen, "%s: not a llama model from cake mkmodel", src);
    }
    uint32_t head_dim = dim / n_heads; /* or the file's key_length (mkmodel's tiny-wide) */
    (void)cake_gguf_get_u32(g, "llama.attention.key_length", &head_dim, err, errlen);
    uint32_t n_experts = 0, ffn = 0;
    (void)cake_gguf_get_u32(g, "llama.expert_count", &n_experts, err, errlen);
    (void)cake_gguf_get_u32(g, "llama.feed_forward_length", &ffn, err, errlen);
    const bool moe = v->qwen2 && v->qk_norm != 0 && n_experts > 0;
    const bool qwen2moe = v->qwen2 && v->shared_expert > 0 && n_experts > 0 && !moe;
    const char *arch = v->granite        ? (n_experts ? "granitemoe" : "granite")
                       : v->mistral3     ? "mistral3"
                       : !v->qwen2       ? "llama"
                       : v->gemma        ? (v->gemma == 2 ? "gemma2" : "gemma3")
                       : v->phi3         ? "phi3"
                       : moe             ? "qwen3moe"
                       : qwen2moe        ? "qwen2moe"
                       : v->qk_norm != 0 ? "qwen3"
                                         : "qwen2";
    cake_gguf_writer *w = cake_gguf_writer_init();
    int rc = w ? 0 : cake_err(err, errlen, "out of memory");
    for (uint64_t i = 0; !rc && i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        const bool renamed = (v->qwen2 || v->granite || v->mistral3) && kv->key.len > 6 &&
                             !memcmp(kv->key.ptr, "llama.", 6);
        char prefix[16];
        snprintf(prefix, sizeof(prefix), "%s.", arch);
        char *key = renamed ? str_copy(prefix, (cake_gguf_str){kv->key.ptr + 6, kv->key.len - 6})
                            : str_copy("", kv->key);
        const size_t kl = key ? strlen(key) : 0;
        if (key && v->context_length && kl > 15 && !strcmp(key + kl - 15, ".context_length"))
            cake_gguf_writer_add_u32(w, key, v->context_length);
        else if (key && v->rope_dims && kl > 21 && !strcmp(key + kl - 21, ".rope.dimension_count"))
            cake_gguf_writer_add_u32(w, key, (uint32_t)v->rope_dims);
        else if (key && v->rope_base != 0 && kl > 15 && !strcmp(key + kl - 15, ".rope.freq_base"))
            cake_gguf_writer_add_f32(w, key, v->rope_base);
        else if (key && (moe || qwen2moe) && kl > 20 &&
                 !strcmp(key + kl - 20, ".feed_forward_length"))
            cake_gguf_writer_add_u32(w, key, 6 * ffn); /* a dense width the experts do not use */
        else if (key && v->special_tokens &&
                 (!strcmp(key, "tokenizer.ggml.tokens") ||
                  !strcmp(key, "tokenizer.ggml.token_type")))
            rc = add_special_tokens(w, key, kv, v->special_tokens, err, errlen);
        else if (!key || copy_kv(w, key, kv, arch))
            rc = cake_err(err, errlen, "%s: key %s could not be copied", src, key ? key : "?");
        free(key);
    }
    if (!rc && (moe || qwen2moe)) { /* the experts' width */
        char key[64];
        snprintf(key, sizeof(key), "%s.expert_feed_forward_length", arch);
        cake_gguf_writer_add_u32(w, key, ffn);
    }
    if (!rc && qwen2moe)
        cake_gguf_writer_add_u32(w, "qwen2moe.expert_shared_feed_forward_length",
                                 (uint32_t)v->shared_expert);
    if (!rc && v->phi3) {
        cake_gguf_writer_add_u32(w, "phi3.attention.sliding_window", v->sliding_window);
        if (v->long_factors)
            cake_gguf_writer_add_u32(w, "phi3.rope.scaling.original_context_length",
                                     v->original_context);
    }
    if (!rc && v->gemma && v->sliding_window) {
        char key[64];
        snprintf(key, sizeof(key), "%s.attention.sliding_window", arch);
        cake_gguf_writer_add_u32(w, key, v->sliding_window);
    }
    if (!rc && v->attn_softcap != 0) {
        cake_gguf_writer_add_f32(w, "gemma2.attn_logit_softcapping", v->attn_softcap);
        cake_gguf_writer_add_f32(w, "gemma2.final_logit_softcapping", v->logit_softcap);
    }
    if (!rc && v->attn_factor != 0) {
        char key[64];
        snprintf(key, sizeof(key), "%s.rope.scaling.attn_factor", arch);
        cake_gguf_writer_add_f32(w, key, v->attn_factor);
    }
    const struct {
        const char *key;
        float value;
    } scales[] = {{"embedding_scale", v->embedding_scale},
                  {"attention.scale", v->attention_scale},
                  {"residual_scale", v->residual_scale},
                  {"logit_scale", v->logit_scale}};
    for (int k = 0; !rc && v->granite && k < 4; k++)
        if (scales[k].value != 0) {
            char key[64];
            snprintf(key, sizeof(key), "%s.%s", arch, scales[k].key);
            cake_gguf_writer_add_f32(w, key, scales[k].value);
        }
    if (!rc && v->chat_template)
        cake_gguf_writer_add_str(w, "tokenizer.chat_template", v->chat_template);
    if (!rc && v->yarn > 0) {
        char key[64];
        snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
        cake_gguf_writer_add_str(w, key, "yarn");
        snprintf(key, sizeof(key), "%s.rope.scaling.factor", arch);
        cake_gguf_writer_add_f32(w, key, v->yarn);
        snprintf(key, sizeof(key), "%s.rope.scaling.original_context_length", arch);
        cake_gguf_writer_add_u32(w, key, v->original_context);
        snprintf(key, sizeof(key), "%s.rope.scaling.yarn_log_multiplier", arch);
        if (v->yarn_log_mul > 0) cake_gguf_writer_add_f32(w, key, v->yarn_log_mul);
    }
    if (!rc && v->temperature > 0) {
        char key[64];
        snprintf(key, sizeof(key), "%s.attention.temperature_scale", arch);
        cake_gguf_writer_add_f32(w, key, v->temperature);
    }
    if (!rc && v->linear > 0) {
        char key[64];
        snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
        cake_gguf_writer_add_str(w, key, "linear");
        snprintf(key, sizeof(key), "%s.rope.scaling.factor", arch);
        cake_gguf_writer_add_f32(w, key, v->linear);
    }
    uint64_t n_out = g->n_tensors + 1; /* the copy's tensors, at most */
    for (uint64_t i = 0; v->split_experts && i < g->n_tensors; i++)
        if (g->tensors[i].n_dims == 3) n_out += g->tensors[i].ne[2];
    uint64_t *copied = calloc(n_out, sizeof(*copied)), n_copied = 0;
    uint64_t *part = calloc(n_out, sizeof(*part));
    int *fused = calloc(n_out, sizeof(*fused));
    if (!copied || !part || !fused) rc = cake_err(err, errlen, "out of memory");
    if (v->phi3 && (v->retype || v->dequantize || v->bias != 0 || v->qk_norm != 0))
        rc = cake_err(err, errlen, "phi3 copies the tensors as they are");
    if (v->split_experts && (v->retype || v->dequantize || v->qwen2))
        rc = cake_err(err, errlen, "split_experts copies the tensors as they are");
    for (uint64_t i = 0; !rc && i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        if (v->tied && name_ends(t->name, "output.weight") && t->name.len == 13) continue;
        if (v->phi3 && (name_ends(t->name, "attn_k.weight") ||
                        name_ends(t->name, "attn_v.weight") || name_ends(t->name, "ffn_up.weight")))
            continue; /* in the fused tensors below */
        if (v->phi3 &&
            (name_ends(t->name, "attn_q.weight") || name_ends(t->name, "ffn_gate.weight"))) {
            const bool qkv = name_ends(t->name, "attn_q.weight");
            const cake_gguf_tensor *k = sibling(g, t, qkv ? "attn_q.weight" : "ffn_gate.weight",
                                                qkv ? "attn_k.weight" : "ffn_up.weight");
            const char *from = qkv ? "attn_q.weight" : "ffn_gate.weight";
            char name[96];
            snprintf(name, sizeof(name), "%.*s%s", (int)(t->name.len - strlen(from)), t->name.ptr,
                     qkv ? "attn_qkv.weight" : "ffn_up.weight");
            const uint64_t ne[2] = {t->ne[0], t->ne[1] + (qkv ? 2 : 1) * k->ne[1]};
            cake_gguf_writer_add_tensor(w, name, (int)t->type, 2, ne);
            fused[n_copied] = qkv ? 1 : 2;
            copied[n_copied++] = i;
            continue;
        }
        if (v->split_experts && t->n_dims == 3) { /* blk.L.ffn_X_exps -> blk.L.ffn_X.E */
            const int stem = (int)t->name.len - (int)strlen("_exps.weight");
            for (uint64_t e = 0; e < t->ne[2]; e++) {
                char name[96];
                snprintf(name, sizeof(name), "%.*s.%llu.weight", stem, t->name.ptr,
                         (unsigned long long)e);
                cake_gguf_writer_add_tensor(w, name, (int)t->type, 2, t->ne);
                part[n_copied] = e;
                copied[n_copied++] = i;
            }
            continue;
        }
        char *name = str_copy("", t->name);
        if (!name)
            rc = cake_err(err, errlen, "out of memory");
        else
            cake_gguf_writer_add_tensor(w, name, variant_type(v, t), t->n_dims, t->ne);
        free(name);
        copied[n_copied++] = i;
    }
    const uint64_t n_factors[1] = {(uint64_t)v->n_factors};
    if (!rc && v->rope_factors)
        cake_gguf_writer_add_tensor(w, "rope_freqs.weight", CAKE_DTYPE_F32, 1, n_factors);
    if (!rc && v->long_factors) {
        cake_gguf_writer_add_tensor(w, "rope_factors_long.weight", CAKE_DTYPE_F32, 1, n_factors);
        cake_gguf_writer_add_tensor(w, "rope_factors_short.weight", CAKE_DTYPE_F32, 1, n_factors);
    }
    for (uint32_t l = 0; !rc && v->bias != 0 && l < n_layers; l++) {
        static const char *const which[] = {"q", "k", "v"};
        for (int k = 0; k < 3; k++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%u.attn_%s.bias", l, which[k]);
            const uint64_t ne[1] = {k == 0 ? n_heads * head_dim : n_kv * head_dim};
            cake_gguf_writer_add_tensor(w, name, CAKE_DTYPE_F32, 1, ne);
        }
    }
    for (uint32_t l = 0; !rc && v->qwen2 && v->qk_norm != 0 && l < n_layers; l++)
        for (int k = 0; k < 2; k++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%u.attn_%s_norm.weight", l, k ? "k" : "q");
            const uint64_t ne[1] = {head_dim};
            cake_gguf_writer_add_tensor(w, name, CAKE_DTYPE_F32, 1, ne);
        }
    for (uint32_t l = 0; !rc && v->gemma && l < n_layers; l++) /* (after the q/k norms) */
        for (int k = 0; k < 2; k++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%u.%s.weight", l,
                     k ? "post_ffw_norm" : "post_attention_norm");
            const uint64_t ne[1] = {dim};
            cake_gguf_writer_add_tensor(w, name, CAKE_DTYPE_F32, 1, ne);
        }
    for (uint32_t l = 0; !rc && qwen2moe && l < n_layers; l++) {
        static const char *const which[] = {"gate_inp", "gate", "up", "down"};
        const uint64_t sh = (uint64_t)v->shared_expert;
        for (int k = 0; k < 4; k++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%u.ffn_%s_shexp.weight", l, which[k]);
            const uint64_t ne[2] = {k == 3 ? sh : dim, k == 0 ? 1 : k == 3 ? dim : sh};
            const int type =
                k && v->retype ? v->retype("ffn_shexp", CAKE_DTYPE_F32) : CAKE_DTYPE_F32;
            cake_gguf_writer_add_tensor(w, name, type, 2, ne);
        }
    }
    if (!rc && v->extra_vector) {
        const uint64_t ne[1] = {dim};
        cake_gguf_writer_add_tensor(w, v->extra_vector, CAKE_DTYPE_F32, 1, ne);
    }
    const uint64_t n_bias = v->bias != 0 ? 3 * (uint64_t)n_layers : 0;
    const uint64_t n_rope = (v->rope_factors != NULL) + 2 * (v->long_factors != NULL);
    const uint64_t n_qk_norms = v->qwen2 && v->qk_norm != 0 ? 2 * (uint64_t)n_layers : 0;
    variant_fill fill = {g,
                         v,
                         (int)head_dim,
                         copied,
                         part,
                         fused,
                         n_copied,
                         n_rope,
                         n_bias,
                         n_qk_norms,
                         qwen2moe ? n_copied + n_rope + n_bias + n_qk_norms : UINT64_MAX,
                         v->extra_vector ? n_copied + n_rope + n_bias + n_qk_norms +
                                               (qwen2moe ? 4 * (uint64_t)n_layers : 0)
                                         : UINT64_MAX,
                         (int)dim,
                         v->shared_expert};
    if (!rc) rc = cake_gguf_writer_write_file(w, dst, fill_variant, &fill, err, errlen);
    free(copied);
    free(part);
    free(fused);
    cake_gguf_writer_free(w);
    cake_gguf_close(g);
    if (rc) fprintf(stderr, "test_write_variant %s -> %s: %s\n", src, dst, err);
    return rc;
}

/* ---- quantized blocks, written the way ggml lays them out ---- */

static void put_f16(uint8_t *p, float v) {
    const cake_f16 h = cake_f32_to_f16(v);
    memcpy(p, &h, 2);
}

void test_encode_q4_q5(int type, float d, float m, const int *q, uint8_t *b) {
    const bool five = type == CAKE_DTYPE_Q5_0 || type == CAKE_DTYPE_Q5_1,
               with_min = type == CAKE_DTYPE_Q4_1 || type == CAKE_DTYPE_Q5_1;
    put_f16(b, d);
    if (with_min) put_f16(b + 2, m);
    uint8_t *p = b + (with_min ? 4 : 2), *qs = five ? p + 4 : p;
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 0xF) | (q[j + 16] & 0xF) << 4);
        qh |= (uint32_t)(q[j] >> 4 & 1) << j | (uint32_t)(q[j + 16] >> 4 & 1) << (j + 16);
    }
    if (five)
        for (int k = 0; k < 4; k++) p[k] = (uint8_t)(qh >> (8 * k));
}

void test_encode_q4_q5_k(int type, float d, float dmin, const int *sc, const int *m, const int *q,
                         uint8_t *b) {
    const bool five = type == CAKE_DTYPE_Q5_K;
    put_f16(b, d);
    put_f16(b + 2, dmin);
    uint8_t *s = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
    for (int j = 0; j < 4; j++) { /* pairs 0..3 whole, 4..7 split */
        s[j] = (uint8_t)(sc[j] | (sc[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)(m[j] | (m[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4);
    }
    if (five) memset(qh, 0, 32);
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 32; l++) {
            const int lo = q[64 * i + l], hi = q[64 * i + 32 + l];
            qs[32 * i + l] = (uint8_t)((lo & 0xF) | (hi & 0xF) << 4);
            if (five) qh[l] |= (uint8_t)((lo >> 4) << (2 * i) | (hi >> 4) << (2 * i + 1));
        }
}

void test_encode_q6_k(float d, const int *sc, const int *q, uint8_t *b) {
    uint8_t *ql = b, *qh = b + 128;
    memset(b, 0, 192);
    for (int v = 0; v < 256; v++) { /* v = 128 half + 32 k + l */
        const int half = v / 128, k = v % 128 / 32, l = v % 32, u = q[v] + 32;
        ql[64 * half + l + 32 * (k % 2)] |= (uint8_t)((u & 0xF) << (k < 2 ? 0 : 4));
        qh[32 * half + l] |= (uint8_t)((u >> 4) << (2 * k));
    }
    for (int i = 0; i < 16; i++) b[192 + i] = (uint8_t)(int8_t)sc[i];
    put_f16(b + 208, d);
}

void test_encode_q2_q3_k(int type, float d, float dmin, const int *sc, const int *m, const int *q,
                         uint8_t *b) {
    const bool three = type == CAKE_DTYPE_Q3_K;
    uint8_t *hm = b, *qs = three ? b + 32 : b + 16, *s = three ? b + 96 : b;
    memset(b, 0, three ? 108 : 80);
    for (int v = 0; v < 256;
         v++) { /* level bits: byte 32 (v / 128) + v % 32, bits 2 (v / 32 % 4) */
        const int u = three ? q[v] + 4 : q[v];
        qs[32 * (v / 128) + v % 32] |= (uint8_t)((u & 3) << (2 * (v / 32 % 4)));
        if (three) hm[v % 32] |= (uint8_t)((u >> 2 & 1) << (v / 32));
    }
    for (int j = 0; j < 16; j++) {
        if (!three) {
            s[j] = (uint8_t)(sc[j] | m[j] << 4);
            continue;
        }
        const int u = sc[j] + 32; /* 6 bits: low nibble in byte j % 8, the rest in byte 8 + j % 4 */
        s[j % 8] |= (uint8_t)((u & 0xF) << (j < 8 ? 0 : 4));
        s[8 + j % 4] |= (uint8_t)((u >> 4) << (2 * (j / 4)));
    }
    put_f16(b + (three ? 108 : 80), d);
    if (!three) put_f16(b + 82, dmin);
}

void test_encode_iq4(int type, float d, const int *sc, const int *idx, uint8_t *b) {
    put_f16(b, d);
    const bool xs = type == CAKE_DTYPE_IQ4_XS;
    uint8_t *qs = b + (xs ? 8 : 2);
    if (xs) {
        int high = 0;
        memset(b + 4, 0, 4);
        for (int i = 0; i < 8; i++) {
            const int u = sc[i] + 32;
            b[4 + i / 2] |= (uint8_t)((u & 0xF) << (4 * (i % 2)));
            high |= (u >> 4) << (2 * i);
        }
        b[2] = (uint8_t)high;
        b[3] = (uint8_t)(high >> 8);
    }
    for (int i = 0; i < (xs ? 8 : 1); i++)
        for (int j = 0; j < 16; j++)
            qs[16 * i + j] = (uint8_t)(idx[32 * i + j] | idx[32 * i + j + 16] << 4);
}

static int clampi(float x, int lo, int hi) {
    const int v = (int)lrintf(x);
    return v < lo ? lo : v > hi ? hi : v;
}

/* Sub-block scales and mins (x = s q - mn, q in 0..top) as 6-bit multiples of
 * d and dmin: the k-quants' two-level scales, rounded plainly. */
static void k_scales(const float *x, int n_sub, int len, int top, float *d, float *dmin, int *sc,
                     int *m) {
    float s[16], mn[16], smax = 0, mmax = 0;
    for (int i = 0; i < n_sub; i++) {
        float lo = x[i * len], hi = lo;
        for (int j = 1; j < len; j++) {
            lo = fminf(lo, x[i * len + j]);
            hi = fmaxf(hi, x[i * len + j]);
        }
        mn[i] = lo < 0 ? -lo : 0;
        s[i] = (hi + mn[i]) / (float)top;
        smax = fmaxf(smax, s[i]);
        mmax = fmaxf(mmax, mn[i]);
    }
    *d = cake_f16_to_f32(cake_f32_to_f16(smax / 63));
    *dmin = cake_f16_to_f32(cake_f32_to_f16(mmax / 63));
    for (int i = 0; i < n_sub; i++) {
        sc[i] = *d > 0 ? clampi(s[i] / *d, 1, 63) : 1;
        m[i] = *dmin > 0 ? clampi(mn[i] / *dmin, 0, 63) : 0;
    }
}

/* The IQ4 table index whose value times dl is nearest x. */
static int nearest_iq4(float x, float dl) {
    int best = 0;
    for (int k = 1; k < 16; k++)
        if (fabsf(dl * cake_iq4_values[k] - x) < fabsf(dl * cake_iq4_values[best] - x)) best = k;
    return best;
}

/* Q3_K's and Q6_K's scales for 256 values x: per 16 a scale of max |x| /
 * reach (the largest level's size) as d sc, sc 1..top, d = the largest /
 * top (rounded to f16). Returns d. */
static float signed_scales_16(const float *x, float reach, int top, int *sc) {
    float amax = 0, s[16];
    for (int i = 0; i < 16; i++) {
        s[i] = 0;
        for (int j = 0; j < 16; j++) s[i] = fmaxf(s[i], fabsf(x[16 * i + j]) / reach);
        amax = fmaxf(amax, s[i]);
    }
    const float d = cake_f16_to_f32(cake_f32_to_f16(amax / (float)top));
    for (int i = 0; i < 16; i++) sc[i] = d > 0 ? clampi(s[i] / d, 1, top) : 1;
    return d;
}

size_t test_quantize_row(int type, const float *x, size_t n, uint8_t *dst) {
    const size_t be = cake_dequant_block_elems(type), bb = cake_dequant_block_bytes(type);
    for (size_t b0 = 0; b0 < n; b0 += be, x += be, dst += bb) {
        int q[256];
        if (type == CAKE_DTYPE_Q8_0) {
            cake_q8_0_quantize_block(x, dst);
        } else if (type == CAKE_DTYPE_IQ4_XS) {
            /* per 32: a scale of max |x| / 127 (the table's reach) as d * sc,
             * d = the largest / 31; each index the nearest table value */
            float amax[8], top = 0;
            for (int i = 0; i < 8; i++) {
                amax[i] = 0;
                for (int j = 0; j < 32; j++) amax[i] = fmaxf(amax[i], fabsf(x[32 * i + j]));
                top = fmaxf(top, amax[i] / 127);
            }
            const float d = cake_f16_to_f32(cake_f32_to_f16(top / 31));
            int sc[8];
            for (int i = 0; i < 8; i++) sc[i] = d > 0 ? clampi(amax[i] / 127 / d, 1, 31) : 1;
            for (int j = 0; j < 256; j++) q[j] = nearest_iq4(x[j], d * (float)sc[j / 32]);
            test_encode_iq4(type, d, sc, q, dst);
        } else if (type == CAKE_DTYPE_IQ4_NL) { /* d = max |x| / 127, nearest table values */
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
            const float d = cake_f16_to_f32(cake_f32_to_f16(amax / 127));
            for (int j = 0; j < 32; j++) q[j] = nearest_iq4(x[j], d);
            test_encode_iq4(type, d, NULL, q, dst);
        } else if (type == CAKE_DTYPE_Q4_K || type == CAKE_DTYPE_Q5_K) {
            const int top = type == CAKE_DTYPE_Q4_K ? 15 : 31;
            int sc[8], m[8];
            float d, dmin;
            k_scales(x, 8, 32, top, &d, &dmin, sc, m);
            for (int j = 0; j < 256; j++)
                q[j] = clampi((x[j] + dmin * (float)m[j / 32]) / (d * (float)sc[j / 32]), 0, top);
            test_encode_q4_q5_k(type, d, dmin, sc, m, q, dst);
        } else if (type == CAKE_DTYPE_Q3_K) { /* levels -4..3, scales 1..31 */
            int sc[16];
            const float d = signed_scales_16(x, 4, 31, sc);
            for (int j = 0; j < 256; j++) q[j] = clampi(x[j] / (d * (float)sc[j / 16]), -4, 3);
            test_encode_q2_q3_k(type, d, 0, sc, NULL, q, dst);
        } else if (type == CAKE_DTYPE_Q6_K) { /* levels -32..31, scales 1..127 */
            int sc[16];
            const float d = signed_scales_16(x, 31, 127, sc);
            for (int j = 0; j < 256; j++) q[j] = clampi(x[j] / (d * (float)sc[j / 16]), -32, 31);
            test_encode_q6_k(d, sc, q, dst);
        } else { /* Q4_0, Q4_1, Q5_0, Q5_1 */
            const bool with_min = type == CAKE_DTYPE_Q4_1 || type == CAKE_DTYPE_Q5_1;
            const int top = type == CAKE_DTYPE_Q4_0 || type == CAKE_DTYPE_Q4_1 ? 15 : 31;
            float lo = x[0], hi = x[0];
            for (int j = 1; j < 32; j++) {
                lo = fminf(lo, x[j]);
                hi = fmaxf(hi, x[j]);
            }
            /* symmetric: levels -(top + 1) / 2 .. top / 2 around 0 */
            const float d = cake_f16_to_f32(
                            cake_f32_to_f16(with_min ? (hi - lo) / (float)top
                                                     : fmaxf(hi, -lo) / (float)((top + 1) / 2))),
                        m = cake_f16_to_f32(cake_f32_to_f16(lo));
            const int off = with_min ? 0 : (top + 1) / 2;
            for (int j = 0; j < 32; j++)
                q[j] = d > 0 ? clampi((x[j] - (with_min ? m : 0)) / d + (float)off, 0, top) : off;
            test_encode_q4_q5(type, d, m, q, dst);
        }
    }
    return n / be * bb;
}

/* The types a Q4_K_M-like mix gets (each type somewhere; the embedding
 * is read by rows, the output as the last matrix). */
int test_mixed_quants(const char *name, int type) {
    (void)type;
    static const struct {
        const char *suffix;
        int type;
    } mix[] = {
        /* attn_output before output: the first suffix that fits counts */
        {"blk.1.ffn_up.weight", CAKE_DTYPE_IQ4_XS}, {"blk.0.ffn_gate.weight", CAKE_DTYPE_IQ4_NL},
        {"blk.1.ffn_down.weight", CAKE_DTYPE_Q3_K}, {"attn_output.weight", CAKE_DTYPE_Q4_0},
        {"output.weight", CAKE_DTYPE_Q6_K},         {"token_embd.weight", CAKE_DTYPE_Q4_K},
        {"attn_q.weight", CAKE_DTYPE_Q4_K},         {"attn_k.weight", CAKE_DTYPE_Q5_K},
        {"attn_v.weight", CAKE_DTYPE_Q6_K},         {"ffn_gate.weight", CAKE_DTYPE_Q4_1},
        {"ffn_up.weight", CAKE_DTYPE_Q5_0},         {"ffn_down.weight", CAKE_DTYPE_Q5_1}};
    const size_t n = strlen(name);
    for (size_t i = 0; i < sizeof(mix) / sizeof(mix[0]); i++) {
        const size_t k = strlen(mix[i].suffix);
        if (n >= k && !strcmp(name + n - k, mix[i].suffix)) return mix[i].type;
    }
    return type;
}

const char *test_gpt2_byte_char(int b) {
    static char chars[256][3];
    int cp = b, extra = 0;
    for (int i = 0; i < 256; i++) {
        bool printable = (i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174;
        if (i == b && !printable) cp = 256 + extra;
        if (!printable) extra++;
    }
    char *c = chars[b];
    if (cp < 0x80) {
        c[0] = (char)cp;
        c[1] = '\0';
    } else {
        c[0] = (char)(0xc0 | cp >> 6);
        c[1] = (char)(0x80 | (cp & 0x3f));
        c[2] = '\0';
    }
    return c;
}

cake_context *test_context(const cake_model *m, int n_ctx, int threads, int max_batch) {
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_threads = threads;
    cp.max_batch = max_batch;
    cake_context *c = NULL;
    char err[256];
    if (cake_context_init(m, cp, &c, err, sizeof(err))) fprintf(stderr, "%s\n", err);
    return c;
}

bool test_sample_constrained(const cake_tokenizer *t, cake_json_grammar *g, cake_token end,
                             float temperature, uint64_t seed, float spread, float boost, int max,
                             char *out, size_t cap) {
    const int n = cake_tokenizer_n_vocab(t);
    float *logits = malloc((size_t)n * sizeof(float));
    cake_sampler_params p = {.temperature = temperature, .top_p = 1, .seed = seed};
    cake_json_grammar_constrain(g, &p);
    cake_sampler *s = cake_sampler_init(p);
    uint64_t rng = seed * 2654435761u + 1;
    size_t len = 0;
    bool ended = false;
    for (int k = 0; logits && s && k < max && !ended; k++) {
        for (int i = 0; i < n; i++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            logits[i] = (float)(rng >> 40) / (float)(1 << 24) * spread;
        }
        logits[end] += boost;
        const cake_token id = cake_sampler_sample(s, logits, n);
        size_t piece = 0;
        const char *text = id == end ? "" : cake_token_text(t, id, &piece);
        ended = id == end;
        if (len + piece >= cap) break;
        memcpy(out + len, text, piece);
        len += piece;
    }
    out[len] = '\0';
    cake_sampler_free(s);
    free(logits);
    return ended;
}

int test_mask_mismatch(const cake_tokenizer *t, const float *logits, int n, cake_token end,
                       const cake_json_state *want, int *allowed) {
    *allowed = 0;
    for (int id = 0; id < n; id++) {
        size_t len;
        const char *text = cake_token_text(t, id, &len);
        cake_json_state st = *want;
        const bool ok =
            id == end ? cake_json_complete(want) : len > 0 && cake_json_feed(&st, text, len);
        *allowed += ok;
        if (ok != (logits[id] == 0)) return id;
    }
    return -1;
}
