#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/gguf.h"
#include "store/store.h"
#include "util/err.h"
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
    const uint64_t *src; /* tensor i of the copy is the source's src[i] */
    uint64_t n_src;      /* how many of the source's are copied */
} variant_fill;

static bool name_ends(cake_gguf_str name, const char *suffix) {
    const size_t n = strlen(suffix);
    return name.len >= n && memcmp(name.ptr + name.len - n, suffix, n) == 0;
}

/* Tensor i of the copy: the source's (q/k rows reordered for qwen2; without
 * output.weight when tied), then rope_freqs.weight, then the biases. */
static int fill_variant(uint64_t i, void *buf, uint64_t nbytes, void *ctx) {
    const variant_fill *f = ctx;
    const uint64_t n_src = f->n_src;
    if (i >= n_src + (f->v->rope_factors != NULL)) { /* a bias */
        for (uint64_t j = 0; j < nbytes / 4; j++)
            ((float *)buf)[j] = (float)((int)(j % 7) - 3) * f->v->bias;
        return 0;
    }
    if (i == n_src) {
        memcpy(buf, f->v->rope_factors, nbytes);
        return 0;
    }
    const cake_gguf_tensor *t = &f->g->tensors[f->src[i]];
    if (f->v->dequantize && t->type == CAKE_DTYPE_Q8_0) {
        cake_q8_0_to_f32(t->data, 0, buf, nbytes / 4);
        return 0;
    }
    if (!f->v->qwen2 ||
        !(name_ends(t->name, "attn_q.weight") || name_ends(t->name, "attn_k.weight"))) {
        memcpy(buf, t->data, nbytes);
        return 0;
    }
    const size_t row = nbytes / t->ne[1], half = (size_t)f->head_dim / 2;
    for (uint64_t r = 0; r < t->ne[1]; r++) { /* r = head, 2i + b in llama order */
        const uint64_t head = r / (2 * half), within = r % (2 * half);
        const uint64_t to = head * 2 * half + (within % 2) * half + within / 2;
        memcpy((char *)buf + to * row, (const char *)t->data + r * row, row);
    }
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
    const uint32_t head_dim = dim / n_heads;
    cake_gguf_writer *w = cake_gguf_writer_init();
    int rc = w ? 0 : cake_err(err, errlen, "out of memory");
    for (uint64_t i = 0; !rc && i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        const bool renamed = v->qwen2 && kv->key.len > 6 && !memcmp(kv->key.ptr, "llama.", 6);
        char *key = renamed ? str_copy("qwen2.", (cake_gguf_str){kv->key.ptr + 6, kv->key.len - 6})
                            : str_copy("", kv->key);
        if (!key || copy_kv(w, key, kv, v->qwen2 ? "qwen2" : "llama"))
            rc = cake_err(err, errlen, "%s: key %s could not be copied", src, key ? key : "?");
        free(key);
    }
    if (!rc && v->linear > 0) {
        const char *arch = v->qwen2 ? "qwen2" : "llama";
        char key[64];
        snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
        cake_gguf_writer_add_str(w, key, "linear");
        snprintf(key, sizeof(key), "%s.rope.scaling.factor", arch);
        cake_gguf_writer_add_f32(w, key, v->linear);
    }
    uint64_t *copied = calloc(g->n_tensors + 1, sizeof(*copied)), n_copied = 0;
    if (!copied) rc = cake_err(err, errlen, "out of memory");
    for (uint64_t i = 0; !rc && i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        if (v->tied && name_ends(t->name, "output.weight") && t->name.len == 13) continue;
        char *name = str_copy("", t->name);
        if (!name)
            rc = cake_err(err, errlen, "out of memory");
        else
            cake_gguf_writer_add_tensor(w, name,
                                        v->dequantize && t->type == CAKE_DTYPE_Q8_0 ? CAKE_DTYPE_F32
                                                                                    : (int)t->type,
                                        t->n_dims, t->ne);
        free(name);
        copied[n_copied++] = i;
    }
    if (!rc && v->rope_factors) {
        const uint64_t ne[1] = {(uint64_t)v->n_factors};
        cake_gguf_writer_add_tensor(w, "rope_freqs.weight", CAKE_DTYPE_F32, 1, ne);
    }
    for (uint32_t l = 0; !rc && v->bias != 0 && l < n_layers; l++) {
        static const char *const which[] = {"q", "k", "v"};
        for (int k = 0; k < 3; k++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%u.attn_%s.bias", l, which[k]);
            const uint64_t ne[1] = {k == 0 ? dim : n_kv * head_dim};
            cake_gguf_writer_add_tensor(w, name, CAKE_DTYPE_F32, 1, ne);
        }
    }
    variant_fill fill = {g, v, (int)head_dim, copied, n_copied};
    if (!rc) rc = cake_gguf_writer_write_file(w, dst, fill_variant, &fill, err, errlen);
    free(copied);
    cake_gguf_writer_free(w);
    cake_gguf_close(g);
    return rc;
}
