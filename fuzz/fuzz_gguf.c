/* libFuzzer target for the GGUF parser (see fuzz/README.md).
 *
 * Any input must either parse, with every view the result hands out lying inside
 * the input, or give -1 with a message; anything else (a crash, an ASan/UBSan
 * report, a broken invariant) aborts.
 *
 * Built with -DFUZZ_GGUF_MKSEED instead, this file is the seed-corpus generator:
 * `fuzz_gguf_mkseed CORPUS_DIR DICT_FILE [GGUF_FILE...]` writes small
 * writer-made files and a libFuzzer dictionary, and copies the given GGUF files
 * (those that exist) plus a shrunken copy of each (same keys and tensor names,
 * short arrays, tiny tensors) into the corpus. Model files thus never need to
 * live in the repository.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/gguf.h"
#include "fuzz_check.h"

#ifndef FUZZ_GGUF_MKSEED

static int inside(const void *p, uint64_t n, const uint8_t *base, size_t size) {
    const uint8_t *q = p;
    return q >= base && q <= base + size && n <= (uint64_t)(base + size - q);
}

/* Reads the first and last byte of a view, so that ASan checks it is readable. */
static volatile uint8_t sink;
static void touch(const void *p, uint64_t n) {
    if (!n) return;
    sink ^= ((const volatile uint8_t *)p)[0];
    sink ^= ((const volatile uint8_t *)p)[n - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const uint8_t esize[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    cake_gguf *g = NULL;
    char err[512];
    err[0] = '\0';
    if (cake_gguf_parse(data, size, &g, err, sizeof(err)) != 0) {
        CHECK(g == NULL);
        CHECK(err[0] != '\0');
        CHECK(strlen(err) < sizeof(err));
        return 0;
    }
    CHECK(g != NULL);
    CHECK(g->alignment && !(g->alignment & (g->alignment - 1)));
    CHECK(g->data_offset <= size);
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        CHECK(kv->key.len > 0 && inside(kv->key.ptr, kv->key.len, data, size));
        CHECK(!memchr(kv->key.ptr, 0, kv->key.len));
        touch(kv->key.ptr, kv->key.len);
        CHECK(kv->type < CAKE_GGUF_TYPE_COUNT);
        if (kv->type == CAKE_GGUF_STRING) {
            CHECK(inside(kv->v.str.ptr, kv->v.str.len, data, size));
            touch(kv->v.str.ptr, kv->v.str.len);
        } else if (kv->type == CAKE_GGUF_ARRAY) {
            CHECK(kv->arr_type < CAKE_GGUF_TYPE_COUNT && kv->arr_type != CAKE_GGUF_ARRAY);
            if (kv->arr_type == CAKE_GGUF_STRING) {
                CHECK(kv->arr_n == 0 || kv->arr_strs != NULL);
                for (uint64_t j = 0; j < kv->arr_n; j++) {
                    CHECK(inside(kv->arr_strs[j].ptr, kv->arr_strs[j].len, data, size));
                    touch(kv->arr_strs[j].ptr, kv->arr_strs[j].len);
                }
            } else {
                const uint64_t n = kv->arr_n * esize[kv->arr_type];
                CHECK(n / esize[kv->arr_type] == kv->arr_n);
                CHECK(inside(kv->arr_data, n, data, size));
                touch(kv->arr_data, n);
            }
        }
        /* The getters must cope with whatever type the key has. */
        char key[64];
        if (kv->key.len < sizeof(key)) {
            memcpy(key, kv->key.ptr, kv->key.len);
            key[kv->key.len] = '\0';
            uint32_t u;
            float f;
            bool b;
            cake_gguf_str s;
            CHECK(cake_gguf_find_kv(g, key) == kv); /* keys are unique */
            (void)cake_gguf_get_u32(g, key, &u, err, sizeof(err));
            (void)cake_gguf_get_f32(g, key, &f, err, sizeof(err));
            (void)cake_gguf_get_bool(g, key, &b, err, sizeof(err));
            if (cake_gguf_get_str(g, key, &s, err, sizeof(err)) == 0)
                CHECK(inside(s.ptr, s.len, data, size));
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        CHECK(t->name.len > 0 && inside(t->name.ptr, t->name.len, data, size));
        CHECK(t->n_dims >= 1 && t->n_dims <= CAKE_GGUF_MAX_DIMS);
        CHECK(cake_dtype_block_bytes(t->type) != 0);
        CHECK(t->offset % g->alignment == 0);
        CHECK(t->nbytes > 0 && inside(t->data, t->nbytes, data, size));
        CHECK((const uint8_t *)t->data == data + g->data_offset + t->offset);
        uint64_t n = 1;
        for (int d = 0; d < CAKE_GGUF_MAX_DIMS; d++) {
            CHECK(t->ne[d] > 0);
            n *= t->ne[d];
        }
        CHECK(t->nbytes == n / cake_dtype_block_elems(t->type) * cake_dtype_block_bytes(t->type));
        touch(t->data, t->nbytes);
        char name[64];
        if (t->name.len < sizeof(name)) {
            memcpy(name, t->name.ptr, t->name.len);
            name[t->name.len] = '\0';
            CHECK(cake_gguf_find_tensor(g, name) == t); /* names are unique */
        }
        /* Tensors do not overlap (checked pairwise for small counts). */
        for (uint64_t j = 0; j < i && g->n_tensors <= 64; j++) {
            const cake_gguf_tensor *o = &g->tensors[j];
            CHECK(t->offset >= o->offset + o->nbytes || o->offset >= t->offset + t->nbytes);
        }
    }
    cake_gguf_close(g);
    return 0;
}

#else /* FUZZ_GGUF_MKSEED: the seed-corpus generator */

#include <errno.h>

static int fill_pattern(uint64_t i, void *buf, uint64_t nbytes, void *ctx) {
    (void)ctx;
    uint8_t *p = buf;
    for (uint64_t k = 0; k < nbytes; k++) p[k] = (uint8_t)(k * 13 + i);
    return 0;
}

static int write_small(const char *dir, const char *name, uint32_t alignment, int n_tensors) {
    static const char *const toks[] = {"<unk>", "<s>", "</s>", "<0x00>", "\xe2\x96\x81the", ""};
    static const float scores[] = {0.0f, -1.5f, 2.25f, -1e9f, 3.0f, 0.5f};
    static const int32_t types[] = {2, 3, 3, 6, 1, 1};
    cake_gguf_writer *w = cake_gguf_writer_init();
    cake_gguf_writer_add_str(w, "general.architecture", "llama");
    if (alignment) cake_gguf_writer_add_u32(w, "general.alignment", alignment);
    cake_gguf_writer_add_u32(w, "llama.embedding_length", 64);
    cake_gguf_writer_add_i32(w, "test.i32", -5);
    cake_gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    cake_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true);
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", toks, 6);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", scores, 6);
    cake_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", types, 6);
    const uint64_t ne[][4] = {
        {8, 2, 1, 1}, {16, 1, 1, 1}, {4, 2, 2, 1}, {32, 2, 1, 1}, {2, 1, 1, 3}};
    const enum cake_dtype dt[] = {CAKE_DTYPE_F32, CAKE_DTYPE_F16, CAKE_DTYPE_BF16, CAKE_DTYPE_Q8_0,
                                  CAKE_DTYPE_F32};
    const uint32_t nd[] = {2, 1, 3, 2, 4};
    const char *const names[] = {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                 "output.weight", "blk.0.ffn_up.weight"};
    for (int i = 0; i < n_tensors && i < 5; i++)
        cake_gguf_writer_add_tensor(w, names[i], dt[i], nd[i], ne[i]);
    char path[4096], err[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    const int rc = cake_gguf_writer_write_file(w, path, fill_pattern, NULL, err, sizeof(err));
    if (rc) fprintf(stderr, "fuzz_gguf_mkseed: %s\n", err);
    cake_gguf_writer_free(w);
    return rc;
}

static char *cstr(cake_gguf_str s) {
    char *c = malloc((size_t)s.len + 1);
    if (!c) return NULL;
    memcpy(c, s.ptr, (size_t)s.len);
    c[s.len] = '\0';
    return c;
}

/* Same keys and tensor names as `g`, arrays cut to 8 elements, tensors cut to one
 * block row: a small seed with a real model's structure. */
static int write_shrunk(const cake_gguf *g, const char *path) {
    cake_gguf_writer *w = cake_gguf_writer_init();
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        char *key = cstr(kv->key);
        if (!key) continue;
        const uint64_t n = kv->arr_n < 8 ? kv->arr_n : 8;
        switch (kv->type) {
        case CAKE_GGUF_UINT8:
        case CAKE_GGUF_UINT16:
        case CAKE_GGUF_UINT32:
            cake_gguf_writer_add_u32(w, key, (uint32_t)kv->v.u64);
            break;
        case CAKE_GGUF_INT8:
        case CAKE_GGUF_INT16:
        case CAKE_GGUF_INT32:
            cake_gguf_writer_add_i32(w, key, (int32_t)kv->v.i64);
            break;
        case CAKE_GGUF_FLOAT32:
            cake_gguf_writer_add_f32(w, key, (float)kv->v.f64);
            break;
        case CAKE_GGUF_BOOL:
            cake_gguf_writer_add_bool(w, key, kv->v.u64 != 0);
            break;
        case CAKE_GGUF_STRING: {
            char *v = cstr(kv->v.str);
            if (v) cake_gguf_writer_add_str(w, key, v);
            free(v);
            break;
        }
        case CAKE_GGUF_ARRAY:
            if (kv->arr_type == CAKE_GGUF_STRING) {
                char *v[8];
                for (uint64_t j = 0; j < n; j++) v[j] = cstr(kv->arr_strs[j]);
                cake_gguf_writer_add_arr_str(w, key, (const char *const *)v, n);
                for (uint64_t j = 0; j < n; j++) free(v[j]);
            } else if (kv->arr_type == CAKE_GGUF_FLOAT32) {
                float v[8];
                memcpy(v, kv->arr_data, (size_t)n * 4);
                cake_gguf_writer_add_arr_f32(w, key, v, n);
            } else if (kv->arr_type == CAKE_GGUF_INT32) {
                int32_t v[8];
                memcpy(v, kv->arr_data, (size_t)n * 4);
                cake_gguf_writer_add_arr_i32(w, key, v, n);
            }
            break;
        default:
            break;
        }
        free(key);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        char *name = cstr(t->name);
        const uint64_t ne[1] = {cake_dtype_block_elems(t->type)};
        if (name) cake_gguf_writer_add_tensor(w, name, t->type, 1, ne);
        free(name);
    }
    char err[512];
    const int rc = cake_gguf_writer_write_file(w, path, fill_pattern, NULL, err, sizeof(err));
    if (rc) fprintf(stderr, "fuzz_gguf_mkseed: %s\n", err);
    cake_gguf_writer_free(w);
    return rc;
}

static int copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb");
    if (!in) return -1;
    FILE *out = fopen(dst, "wb");
    if (!out) {
        fclose(in);
        return -1;
    }
    char buf[65536];
    size_t n;
    int rc = 0;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
        if (fwrite(buf, 1, n, out) != n) rc = -1;
    if (ferror(in)) rc = -1;
    fclose(in);
    if (fclose(out) != 0) rc = -1;
    return rc;
}

/* Tokens that the mutator should splice in whole. */
static const char *const dict[] = {
    "\"GGUF\"",
    "\"\\x03\\x00\\x00\\x00\"",
    "\"general.alignment\"",
    "\"general.architecture\"",
    "\"tokenizer.ggml.tokens\"",
    "\"\\x09\\x00\\x00\\x00\"",
    "\"\\x08\\x00\\x00\\x00\"",
    "\"\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\"",
    "\"\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x80\"",
    "\"\\x20\\x00\\x00\\x00\"",
    "\"\\x1e\\x00\\x00\\x00\"",
    "\"\\x0c\\x00\\x00\\x00\"",
};

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: fuzz_gguf_mkseed CORPUS_DIR DICT_FILE [GGUF_FILE...]\n");
        return 2;
    }
    const char *dir = argv[1];
    int rc = 0;
    rc |= write_small(dir, "small.gguf", 0, 5);
    rc |= write_small(dir, "small_align64.gguf", 64, 5);
    rc |= write_small(dir, "small_align8.gguf", 8, 2);
    rc |= write_small(dir, "vocab_only.gguf", 0, 0);
    FILE *d = fopen(argv[2], "w");
    if (!d) {
        fprintf(stderr, "fuzz_gguf_mkseed: cannot write %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < sizeof(dict) / sizeof(dict[0]); i++) fprintf(d, "%s\n", dict[i]);
    if (fclose(d) != 0) rc = 1;
    for (int i = 3; i < argc; i++) {
        const char *base = strrchr(argv[i], '/');
        base = base ? base + 1 : argv[i];
        char dst[4096];
        snprintf(dst, sizeof(dst), "%s/%s", dir, base);
        if (copy_file(argv[i], dst) != 0) {
            fprintf(stderr, "fuzz_gguf_mkseed: %s not copied (absent?), skipped\n", argv[i]);
            continue;
        }
        cake_gguf *g = NULL;
        char err[512];
        if (cake_gguf_open(argv[i], &g, err, sizeof(err)) == 0) {
            snprintf(dst, sizeof(dst), "%s/shrunk-%s", dir, base);
            rc |= write_shrunk(g, dst);
            cake_gguf_close(g);
        } else {
            fprintf(stderr, "fuzz_gguf_mkseed: %s\n", err);
        }
    }
    return rc ? 1 : 0;
}

#endif
