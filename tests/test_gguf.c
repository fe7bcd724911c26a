/* The GGUF reader and writer: real files from llama.cpp's converter, a writer
 * round trip, a hand-built file with every metadata type, and malformed input
 * (truncation at every offset, each header field corrupted, seeded random byte
 * flips). Malformed input must give -1 with a message that names the culprit,
 * and never crash or read outside the buffer: every parse runs on an exact-size
 * heap copy, so ASan builds catch any over-read. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/gguf.h"
#include "testutil.h"
#include "util/f16.h"

/* ---- helpers ---- */

static int str_eq(cake_gguf_str s, const char *c) {
    return s.len == strlen(c) && memcmp(s.ptr, c, s.len) == 0;
}

static char tmpdir[64];

static void make_tmpdir(void) {
    if (tmpdir[0]) return;
    strcpy(tmpdir, "/tmp/cake_test_gguf_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
}

static const char *tmp_path(const char *name) {
    static char p[128];
    make_tmpdir();
    snprintf(p, sizeof(p), "%s/%s", tmpdir, name);
    return p;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 || lstat(path, &st) == 0;
}

/* Parses an exact-size heap copy of data[0, n): an over-read is an ASan error. */
static int parse_copy(const uint8_t *data, size_t n, char *err, size_t errlen) {
    uint8_t *copy = malloc(n ? n : 1);
    assert_non_null(copy);
    if (n) memcpy(copy, data, n);
    cake_gguf *g = NULL;
    err[0] = '\0';
    const int rc = cake_gguf_parse(copy, n, &g, err, errlen);
    if (rc == 0)
        assert_non_null(g);
    else
        assert_null(g);
    cake_gguf_close(g);
    free(copy);
    return rc;
}

static int inside(const void *p, uint64_t n, const uint8_t *base, uint64_t size) {
    const uint8_t *q = p;
    return q >= base && q <= base + size && n <= (uint64_t)(base + size - q);
}

/* What the header promises: after a successful parse every view lies in the buffer. */
static void assert_views_inside(const cake_gguf *g, const uint8_t *base, uint64_t size) {
    static const uint8_t esize[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        assert_true(inside(kv->key.ptr, kv->key.len, base, size));
        if (kv->type == CAKE_GGUF_STRING)
            assert_true(inside(kv->v.str.ptr, kv->v.str.len, base, size));
        if (kv->type != CAKE_GGUF_ARRAY) continue;
        if (kv->arr_type == CAKE_GGUF_STRING) {
            for (uint64_t j = 0; j < kv->arr_n; j++)
                assert_true(inside(kv->arr_strs[j].ptr, kv->arr_strs[j].len, base, size));
        } else {
            assert_true(kv->arr_type < CAKE_GGUF_TYPE_COUNT && kv->arr_type != CAKE_GGUF_ARRAY);
            assert_true(inside(kv->arr_data, kv->arr_n * esize[kv->arr_type], base, size));
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        assert_true(inside(t->name.ptr, t->name.len, base, size));
        assert_true(inside(t->data, t->nbytes, base, size));
        assert_true(t->nbytes > 0);
        assert_true(t->n_dims >= 1 && t->n_dims <= CAKE_GGUF_MAX_DIMS);
    }
}

/* A growable byte buffer for hand-built files. */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} tb;

static void tb_put(tb *b, const void *s, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void tb_u8(tb *b, uint8_t v) {
    tb_put(b, &v, 1);
}
static void tb_u32(tb *b, uint32_t v) {
    tb_put(b, &v, 4);
}
static void tb_u64(tb *b, uint64_t v) {
    tb_put(b, &v, 8);
}
static void tb_strn(tb *b, const char *s, size_t n) {
    tb_u64(b, n);
    tb_put(b, s, n);
}
static void tb_str(tb *b, const char *s) {
    tb_strn(b, s, strlen(s));
}
static void tb_header(tb *b, uint64_t n_tensors, uint64_t n_kv) {
    b->n = 0;
    tb_u32(b, CAKE_GGUF_MAGIC);
    tb_u32(b, CAKE_GGUF_VERSION);
    tb_u64(b, n_tensors);
    tb_u64(b, n_kv);
}
static void tb_pad(tb *b, size_t a) {
    while (b->n % a) tb_u8(b, 0);
}

/* Parses b and expects -1 with `want` in the message. */
static void expect_fail(const tb *b, const char *want) {
    char err[512];
    assert_int_equal(parse_copy(b->p, b->n, err, sizeof(err)), -1);
    if (!strstr(err, want)) fail_msg("error '%s' does not contain '%s'", err, want);
}

static void expect_ok(const tb *b) {
    char err[512];
    if (parse_copy(b->p, b->n, err, sizeof(err)) != 0) fail_msg("unexpected error: %s", err);
}

/* ---- the small writer-made file ---- */

#define N_SMALL_TENSORS 5
static const char *const small_names[N_SMALL_TENSORS] = {"t.f32", "t.f16", "t.bf16", "t.q8",
                                                         "t.4d"};
static const enum cake_dtype small_types[N_SMALL_TENSORS] = {
    CAKE_DTYPE_F32, CAKE_DTYPE_F16, CAKE_DTYPE_BF16, CAKE_DTYPE_Q8_0, CAKE_DTYPE_F32};
static const uint32_t small_ndims[N_SMALL_TENSORS] = {2, 1, 3, 2, 4};
static const uint64_t small_ne[N_SMALL_TENSORS][4] = {
    {8, 3, 1, 1}, {40, 1, 1, 1}, {4, 2, 3, 1}, {64, 2, 1, 1}, {2, 1, 3, 2}};
static const uint64_t small_nbytes[N_SMALL_TENSORS] = {96, 80, 48, 136, 48};
static const char *const small_tokens[] = {"a", "", "h\xc3\xa9llo", "<0x00>"};
static const float small_f32s[] = {1.5f, -2.0f, 1e30f};
static const int32_t small_i32s[] = {-1, 0, 7, INT32_MAX};

/* Expected bytes of tensor i: values with an exact representation in the dtype. */
static void small_bytes(uint64_t i, uint8_t *buf) {
    const uint64_t n = small_nbytes[i];
    switch (small_types[i]) {
    case CAKE_DTYPE_F32:
        for (uint64_t k = 0; k < n / 4; k++) {
            const float v = (float)k * 0.25f - 3.0f + (float)i;
            memcpy(buf + 4 * k, &v, 4);
        }
        break;
    case CAKE_DTYPE_F16:
        for (uint64_t k = 0; k < n / 2; k++) {
            const cake_f16 h = cake_f32_to_f16((float)k * 0.5f);
            memcpy(buf + 2 * k, &h, 2);
        }
        break;
    case CAKE_DTYPE_BF16:
        for (uint64_t k = 0; k < n / 2; k++) {
            const cake_bf16 h = cake_f32_to_bf16((float)k - 7.0f);
            memcpy(buf + 2 * k, &h, 2);
        }
        break;
    default:
        for (uint64_t k = 0; k < n; k++) buf[k] = (uint8_t)(k * 7 + 3);
        break;
    }
}

typedef struct {
    int calls;
    int fail_at; /* -1: never */
} fill_state;

static int small_fill(uint64_t i, void *buf, uint64_t nbytes, void *ctx) {
    fill_state *st = ctx;
    st->calls++;
    if ((int)i == st->fail_at) return -1;
    if (nbytes != small_nbytes[i]) return -1;
    small_bytes(i, buf);
    return 0;
}

static cake_gguf_writer *small_writer(uint32_t alignment) {
    cake_gguf_writer *w = cake_gguf_writer_init();
    assert_non_null(w);
    cake_gguf_writer_add_str(w, "general.architecture", "llama");
    cake_gguf_writer_add_u32(w, "general.alignment", alignment);
    cake_gguf_writer_add_u32(w, "test.u32", 4000000000u);
    cake_gguf_writer_add_i32(w, "test.i32", -123456);
    cake_gguf_writer_add_f32(w, "test.f32", 0.15625f);
    cake_gguf_writer_add_bool(w, "test.bool_t", true);
    cake_gguf_writer_add_bool(w, "test.bool_f", false);
    cake_gguf_writer_add_str(w, "test.empty_str", "");
    cake_gguf_writer_add_arr_str(w, "test.arr_str", small_tokens, 4);
    cake_gguf_writer_add_arr_f32(w, "test.arr_f32", small_f32s, 3);
    cake_gguf_writer_add_arr_i32(w, "test.arr_i32", small_i32s, 4);
    cake_gguf_writer_add_arr_i32(w, "test.arr_empty", NULL, 0);
    for (int i = 0; i < N_SMALL_TENSORS; i++)
        cake_gguf_writer_add_tensor(w, small_names[i], small_types[i], small_ndims[i], small_ne[i]);
    return w;
}

/* Writes the small file with the writer and reads it back into memory. */
static uint8_t *small_file(uint32_t alignment, size_t *size) {
    cake_gguf_writer *w = small_writer(alignment);
    fill_state st = {0, -1};
    char err[512];
    const char *path = tmp_path("small.gguf");
    if (cake_gguf_writer_write_file(w, path, small_fill, &st, err, sizeof(err)))
        fail_msg("writer: %s", err);
    cake_gguf_writer_free(w);
    assert_int_equal(st.calls, N_SMALL_TENSORS);
    uint8_t *data = test_read_file(path, size);
    assert_non_null(data);
    unlink(path);
    return data;
}

/* ---- real files ---- */

static void test_dtype_tables(void **state) {
    (void)state;
    assert_string_equal(cake_dtype_name(CAKE_DTYPE_F32), "F32");
    assert_string_equal(cake_dtype_name(CAKE_DTYPE_BF16), "BF16");
    assert_string_equal(cake_dtype_name(12), "Q4_K");
    assert_string_equal(cake_dtype_name(14), "Q6_K");
    assert_string_equal(cake_dtype_name(1000), "unknown");
    assert_int_equal(cake_dtype_block_bytes(CAKE_DTYPE_Q8_0), 34);
    assert_int_equal(cake_dtype_block_elems(CAKE_DTYPE_Q8_0), 32);
    assert_int_equal(cake_dtype_block_bytes(CAKE_DTYPE_F16), 2);
    assert_int_equal(cake_dtype_block_bytes(12), 144); /* Q4_K */
    /* types cake does not compute with are parsed too (their sizes are ggml's) */
    assert_int_equal(cake_dtype_block_bytes(16), 66); /* IQ2_XXS */
    assert_int_equal(cake_dtype_block_elems(16), 256);
    assert_int_equal(cake_dtype_block_bytes(39), 17); /* MXFP4 */
    assert_int_equal(cake_dtype_block_elems(39), 32);
    assert_int_equal(cake_dtype_block_bytes(28), 8); /* F64 */
    assert_string_equal(cake_dtype_name(4), "Q4_2"); /* retired: named, no size */
    assert_int_equal(cake_dtype_block_bytes(4), 0);
    assert_int_equal(cake_dtype_block_bytes(40), 0);
    assert_string_equal(cake_gguf_type_name(CAKE_GGUF_FLOAT32), "FLOAT32");
    assert_string_equal(cake_gguf_type_name(CAKE_GGUF_FLOAT64), "FLOAT64");
    assert_string_equal(cake_gguf_type_name(13), "unknown");
}

static void test_stories260k(void **state) {
    (void)state;
    const char *path = test_model_path("stories260K.gguf");
    if (!path) skip();
    cake_gguf *g = NULL;
    char err[512];
    if (cake_gguf_open(path, &g, err, sizeof(err))) fail_msg("%s", err);
    assert_int_equal(g->version, 3);
    assert_int_equal(g->alignment, 32);
    assert_int_equal(g->n_tensors, 48); /* 3 + 5 layers x 9 */
    assert_true(g->data_offset % 32 == 0);
    assert_views_inside(g, g->base, g->size);

    cake_gguf_str s;
    assert_int_equal(cake_gguf_get_str(g, "general.architecture", &s, err, sizeof(err)), 0);
    assert_true(str_eq(s, "llama"));
    uint32_t u;
    assert_int_equal(cake_gguf_get_u32(g, "llama.embedding_length", &u, err, sizeof(err)), 0);
    assert_int_equal(u, 64);
    assert_int_equal(cake_gguf_get_u32(g, "llama.block_count", &u, err, sizeof(err)), 0);
    assert_int_equal(u, 5);
    float f;
    assert_int_equal(
        cake_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f, err, sizeof(err)), 0);
    assert_float_equal(f, 1e-5f, 1e-9f);

    const cake_gguf_kv *tok = cake_gguf_find_kv(g, "tokenizer.ggml.tokens");
    assert_non_null(tok);
    assert_int_equal(tok->type, CAKE_GGUF_ARRAY);
    assert_int_equal(tok->arr_type, CAKE_GGUF_STRING);
    assert_int_equal(tok->arr_n, 512);
    assert_true(str_eq(tok->arr_strs[0], "<unk>"));
    assert_true(str_eq(tok->arr_strs[1], "<s>"));
    assert_true(str_eq(tok->arr_strs[2], "</s>"));
    const cake_gguf_kv *scores = cake_gguf_find_kv(g, "tokenizer.ggml.scores");
    assert_non_null(scores);
    assert_int_equal(scores->arr_type, CAKE_GGUF_FLOAT32);
    assert_int_equal(scores->arr_n, 512);

    const cake_gguf_tensor *t = cake_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->type, CAKE_DTYPE_F32);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 512);
    assert_int_equal(t->nbytes, 64 * 512 * 4);
    assert_ptr_equal(t->data, g->base + g->data_offset + t->offset);
    t = cake_gguf_find_tensor(g, "blk.4.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 172);
    assert_int_equal(t->ne[1], 64);
    assert_null(cake_gguf_find_tensor(g, "blk.5.ffn_down.weight"));
    assert_null(cake_gguf_find_tensor(g, "token_embd"));
    assert_null(cake_gguf_find_kv(g, "general"));
    /* The weights are real: the embedding is not all zero, and finite. */
    float sum = 0;
    for (uint64_t k = 0; k < 64 * 512; k++) {
        float v;
        memcpy(&v, (const uint8_t *)cake_gguf_find_tensor(g, "token_embd.weight")->data + 4 * k, 4);
        assert_true(isfinite(v));
        sum += fabsf(v);
    }
    assert_true(sum > 1.0f);
    cake_gguf_close(g);
}

static void test_vocab_only(void **state) {
    (void)state;
    const char *path = test_model_path("ggml-vocab-llama-spm.gguf");
    if (!path) skip();
    cake_gguf *g = NULL;
    char err[512];
    if (cake_gguf_open(path, &g, err, sizeof(err))) fail_msg("%s", err);
    assert_int_equal(g->n_tensors, 0);
    assert_views_inside(g, g->base, g->size);
    cake_gguf_str s;
    assert_int_equal(cake_gguf_get_str(g, "tokenizer.ggml.model", &s, err, sizeof(err)), 0);
    assert_true(str_eq(s, "llama"));
    const cake_gguf_kv *tok = cake_gguf_find_kv(g, "tokenizer.ggml.tokens");
    assert_non_null(tok);
    assert_int_equal(tok->arr_type, CAKE_GGUF_STRING);
    assert_int_equal(tok->arr_n, 32000);
    assert_true(str_eq(tok->arr_strs[0], "<unk>"));
    assert_true(str_eq(tok->arr_strs[3], "<0x00>"));
    const cake_gguf_kv *tt = cake_gguf_find_kv(g, "tokenizer.ggml.token_type");
    assert_non_null(tt);
    assert_int_equal(tt->arr_type, CAKE_GGUF_INT32);
    assert_int_equal(tt->arr_n, 32000);
    bool b;
    assert_int_equal(cake_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, err, sizeof(err)),
                     0);
    assert_true(b);
    uint32_t u;
    assert_int_equal(cake_gguf_get_u32(g, "llama.vocab_size", &u, err, sizeof(err)), 0);
    assert_int_equal(u, 32000);
    cake_gguf_close(g);
}

static void test_open_errors(void **state) {
    (void)state;
    cake_gguf *g = (cake_gguf *)&g; /* must be reset to NULL */
    char err[512];
    assert_int_equal(cake_gguf_open("/nonexistent/x.gguf", &g, err, sizeof(err)), -1);
    assert_null(g);
    assert_non_null(strstr(err, "/nonexistent/x.gguf"));
    assert_non_null(strstr(err, "No such file"));
    make_tmpdir();
    assert_int_equal(cake_gguf_open(tmpdir, &g, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "directory"));
    char empty[128], bad[128]; /* tmp_path reuses one buffer */
    snprintf(empty, sizeof(empty), "%s", tmp_path("empty.gguf"));
    snprintf(bad, sizeof(bad), "%s", tmp_path("bad.gguf"));
    FILE *f = fopen(empty, "wb");
    assert_non_null(f);
    fclose(f);
    assert_int_equal(cake_gguf_open(empty, &g, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "empty"));
    /* A corrupt file on disk: the message names the file and the problem. */
    f = fopen(bad, "wb");
    assert_non_null(f);
    fputs("GGML and some more bytes to make a header", f);
    fclose(f);
    assert_int_equal(cake_gguf_open(bad, &g, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "bad.gguf"));
    assert_non_null(strstr(err, "not a GGUF file"));
    unlink(empty);
    unlink(bad);
    /* NULL err is allowed. */
    assert_int_equal(cake_gguf_open("/nonexistent/x.gguf", &g, NULL, 0), -1);
    assert_int_equal(cake_gguf_parse(NULL, 0, &g, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "header"));
}

/* ---- writer round trip ---- */

static void check_small(const cake_gguf *g, uint32_t alignment) {
    char err[512];
    assert_int_equal(g->alignment, alignment);
    assert_int_equal(g->n_kv, 12);
    assert_int_equal(g->n_tensors, N_SMALL_TENSORS);
    assert_views_inside(g, g->base, g->size);

    cake_gguf_str s;
    uint32_t u;
    float f;
    bool b;
    assert_int_equal(cake_gguf_get_str(g, "general.architecture", &s, err, sizeof(err)), 0);
    assert_true(str_eq(s, "llama"));
    assert_int_equal(cake_gguf_get_u32(g, "test.u32", &u, err, sizeof(err)), 0);
    assert_int_equal(u, 4000000000u);
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, "test.i32");
    assert_non_null(kv);
    assert_int_equal(kv->type, CAKE_GGUF_INT32);
    assert_int_equal(kv->v.i64, -123456);
    assert_int_equal(cake_gguf_get_f32(g, "test.f32", &f, err, sizeof(err)), 0);
    assert_true(f == 0.15625f);
    assert_int_equal(cake_gguf_get_bool(g, "test.bool_t", &b, err, sizeof(err)), 0);
    assert_true(b);
    assert_int_equal(cake_gguf_get_bool(g, "test.bool_f", &b, err, sizeof(err)), 0);
    assert_false(b);
    assert_int_equal(cake_gguf_get_str(g, "test.empty_str", &s, err, sizeof(err)), 0);
    assert_int_equal(s.len, 0);

    kv = cake_gguf_find_kv(g, "test.arr_str");
    assert_non_null(kv);
    assert_int_equal(kv->type, CAKE_GGUF_ARRAY);
    assert_int_equal(kv->arr_type, CAKE_GGUF_STRING);
    assert_int_equal(kv->arr_n, 4);
    for (int i = 0; i < 4; i++) assert_true(str_eq(kv->arr_strs[i], small_tokens[i]));
    kv = cake_gguf_find_kv(g, "test.arr_f32");
    assert_non_null(kv);
    assert_int_equal(kv->arr_type, CAKE_GGUF_FLOAT32);
    assert_int_equal(kv->arr_n, 3);
    assert_memory_equal(kv->arr_data, small_f32s, sizeof(small_f32s));
    kv = cake_gguf_find_kv(g, "test.arr_i32");
    assert_non_null(kv);
    assert_int_equal(kv->arr_type, CAKE_GGUF_INT32);
    assert_int_equal(kv->arr_n, 4);
    assert_memory_equal(kv->arr_data, small_i32s, sizeof(small_i32s));
    kv = cake_gguf_find_kv(g, "test.arr_empty");
    assert_non_null(kv);
    assert_int_equal(kv->arr_n, 0);

    /* Getters with the wrong type say which key and which type. */
    assert_int_equal(cake_gguf_get_u32(g, "test.f32", &u, err, sizeof(err)), -2);
    assert_non_null(strstr(err, "test.f32"));
    assert_non_null(strstr(err, "FLOAT32"));
    assert_int_equal(cake_gguf_get_u32(g, "test.i32", &u, err, sizeof(err)), -2); /* negative */
    assert_non_null(strstr(err, "-123456"));
    assert_int_equal(cake_gguf_get_str(g, "test.arr_str", &s, err, sizeof(err)), -2);
    assert_non_null(strstr(err, "ARRAY of STRING"));
    assert_int_equal(cake_gguf_get_bool(g, "test.u32", &b, err, sizeof(err)), -2);
    assert_int_equal(cake_gguf_get_f32(g, "test.bool_t", &f, err, sizeof(err)), -2);
    assert_int_equal(cake_gguf_get_u32(g, "test.missing", &u, err, sizeof(err)), -1);

    uint8_t expect[256];
    for (int i = 0; i < N_SMALL_TENSORS; i++) {
        const cake_gguf_tensor *t = cake_gguf_find_tensor(g, small_names[i]);
        assert_non_null(t);
        assert_int_equal(t->type, small_types[i]);
        assert_int_equal(t->n_dims, small_ndims[i]);
        for (int d = 0; d < 4; d++) assert_int_equal(t->ne[d], small_ne[i][d]);
        assert_int_equal(t->nbytes, small_nbytes[i]);
        assert_int_equal(t->offset % alignment, 0);
        assert_int_equal(((const uint8_t *)t->data - g->base) % alignment, 0);
        small_bytes((uint64_t)i, expect);
        assert_memory_equal(t->data, expect, small_nbytes[i]);
    }
    /* The values mean what they were written as. */
    const cake_gguf_tensor *t = cake_gguf_find_tensor(g, "t.f16");
    cake_f16 h;
    memcpy(&h, (const uint8_t *)t->data + 2 * 3, 2);
    assert_true(cake_f16_to_f32(h) == 1.5f);
    t = cake_gguf_find_tensor(g, "t.bf16");
    cake_bf16 bh;
    memcpy(&bh, (const uint8_t *)t->data + 2 * 23, 2);
    assert_true(cake_bf16_to_f32(bh) == 16.0f);
}

static void test_writer_roundtrip(void **state) {
    (void)state;
    const uint32_t aligns[] = {32, 64, 8};
    for (int a = 0; a < 3; a++) {
        size_t size;
        uint8_t *data = small_file(aligns[a], &size);
        cake_gguf *g = NULL;
        char err[512];
        if (cake_gguf_parse(data, size, &g, err, sizeof(err))) fail_msg("%s", err);
        check_small(g, aligns[a]);
        assert_int_equal(size % aligns[a], 0); /* the writer pads after the last tensor */
        cake_gguf_close(g);
        free(data);
    }
    /* The same file via open (mmap). */
    cake_gguf_writer *w = small_writer(32);
    fill_state st = {0, -1};
    char err[512];
    const char *path = tmp_path("rt.gguf");
    assert_int_equal(cake_gguf_writer_write_file(w, path, small_fill, &st, err, sizeof(err)), 0);
    cake_gguf_writer_free(w);
    char tmp[160];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    assert_false(file_exists(tmp));
    cake_gguf *g = NULL;
    if (cake_gguf_open(path, &g, err, sizeof(err))) fail_msg("%s", err);
    assert_non_null(g->map);
    check_small(g, 32);
    cake_gguf_close(g);
    unlink(path);

    /* Zero tensors (a vocabulary-only file) need no fill callback. */
    w = cake_gguf_writer_init();
    cake_gguf_writer_add_str(w, "general.architecture", "llama");
    assert_int_equal(cake_gguf_writer_write_file(w, path, NULL, NULL, err, sizeof(err)), 0);
    cake_gguf_writer_free(w);
    assert_int_equal(cake_gguf_open(path, &g, err, sizeof(err)), 0);
    assert_int_equal(g->n_tensors, 0);
    assert_int_equal(g->n_kv, 1);
    cake_gguf_close(g);
    unlink(path);
}

static void test_writer_errors(void **state) {
    (void)state;
    char err[512];
    fill_state st = {0, -1};
    const char *path = tmp_path("werr.gguf");
    char tmp[160];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);

    /* Unwritable location: strerror in the message. */
    cake_gguf_writer *w = small_writer(32);
    assert_int_equal(cake_gguf_writer_write_file(w, "/nonexistent/dir/x.gguf", small_fill, &st, err,
                                                 sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "No such file"));

    /* A failing fill callback: no file, no tmp file left behind. */
    st = (fill_state){0, 2};
    assert_int_equal(cake_gguf_writer_write_file(w, path, small_fill, &st, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "t.bf16"));
    assert_false(file_exists(path));
    assert_false(file_exists(tmp));

    /* A full disk: the tmp file is a link to /dev/full, so the write fails with ENOSPC. */
    if (symlink("/dev/full", tmp) == 0) {
        st = (fill_state){0, -1};
        assert_int_equal(cake_gguf_writer_write_file(w, path, small_fill, &st, err, sizeof(err)),
                         -1);
        assert_non_null(strstr(err, "No space left on device"));
        assert_false(file_exists(path));
        assert_false(file_exists(tmp));
    }
    cake_gguf_writer_free(w);

    /* Invalid descriptions are reported by write_file, naming the item. */
    struct {
        const char *what;
        enum cake_dtype type;
        uint32_t n_dims;
        uint64_t ne[4];
        const char *want;
    } bad[] = {
        {"five dims", CAKE_DTYPE_F32, 5, {1, 1, 1, 1}, "n_dims"},
        {"zero dim", CAKE_DTYPE_F32, 2, {4, 0, 1, 1}, "dimension 1 is 0"},
        {"q8 row", CAKE_DTYPE_Q8_0, 1, {33, 1, 1, 1}, "block size 32"},
        {"q4_2", (enum cake_dtype)4, 1, {256, 1, 1, 1}, "Q4_2 (4) is not a type cake knows"},
        {"iq2xxs row", (enum cake_dtype)16, 1, {32, 1, 1, 1}, "IQ2_XXS block size 256"},
        {"overflow", CAKE_DTYPE_F32, 2, {UINT64_C(1) << 40, UINT64_C(1) << 40, 1, 1}, "overflow"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        w = cake_gguf_writer_init();
        cake_gguf_writer_add_tensor(w, bad[i].what, bad[i].type, bad[i].n_dims, bad[i].ne);
        assert_int_equal(cake_gguf_writer_write_file(w, path, small_fill, &st, err, sizeof(err)),
                         -1);
        if (!strstr(err, bad[i].want) || !strstr(err, bad[i].what))
            fail_msg("case %s: '%s'", bad[i].what, err);
        cake_gguf_writer_free(w);
        assert_false(file_exists(path));
    }
    w = cake_gguf_writer_init();
    cake_gguf_writer_add_u32(w, "k", 1);
    cake_gguf_writer_add_str(w, "k", "again");
    assert_int_equal(cake_gguf_writer_write_file(w, path, NULL, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "duplicate metadata key 'k'"));
    cake_gguf_writer_free(w);
    w = cake_gguf_writer_init();
    const uint64_t ne[1] = {4};
    cake_gguf_writer_add_tensor(w, "x", CAKE_DTYPE_F32, 1, ne);
    cake_gguf_writer_add_tensor(w, "x", CAKE_DTYPE_F32, 1, ne);
    assert_int_equal(cake_gguf_writer_write_file(w, path, small_fill, &st, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "duplicate tensor name 'x'"));
    cake_gguf_writer_free(w);
    w = cake_gguf_writer_init();
    cake_gguf_writer_add_u32(w, "general.alignment", 48);
    assert_int_equal(cake_gguf_writer_write_file(w, path, NULL, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "power of two"));
    cake_gguf_writer_free(w);
    w = cake_gguf_writer_init();
    cake_gguf_writer_add_str(w, "", "x");
    assert_int_equal(cake_gguf_writer_write_file(w, path, NULL, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "empty"));
    cake_gguf_writer_free(w);
    /* A NULL writer (init failed) is reported, not dereferenced. */
    cake_gguf_writer_add_u32(NULL, "k", 1);
    assert_int_equal(cake_gguf_writer_write_file(NULL, path, NULL, NULL, err, sizeof(err)), -1);
    cake_gguf_writer_free(NULL);
}

/* ---- every metadata type, hand-built ---- */

static void test_all_kv_types(void **state) {
    (void)state;
    tb b = {0};
    tb_header(&b, 1, 25);
    /* scalars */
    tb_str(&b, "u8"), tb_u32(&b, CAKE_GGUF_UINT8), tb_u8(&b, 200);
    tb_str(&b, "i8"), tb_u32(&b, CAKE_GGUF_INT8), tb_u8(&b, (uint8_t)-100);
    tb_str(&b, "u16"), tb_u32(&b, CAKE_GGUF_UINT16), tb_u8(&b, 0x60), tb_u8(&b, 0xea); /* 60000 */
    tb_str(&b, "i16"), tb_u32(&b, CAKE_GGUF_INT16), tb_u8(&b, 0xd0), tb_u8(&b, 0x8a);  /* -30000 */
    tb_str(&b, "u32"), tb_u32(&b, CAKE_GGUF_UINT32), tb_u32(&b, 4000000000u);
    tb_str(&b, "i32"), tb_u32(&b, CAKE_GGUF_INT32), tb_u32(&b, (uint32_t)-2000000000);
    const float f32 = 0.5f;
    tb_str(&b, "f32"), tb_u32(&b, CAKE_GGUF_FLOAT32), tb_put(&b, &f32, 4);
    tb_str(&b, "bool"), tb_u32(&b, CAKE_GGUF_BOOL), tb_u8(&b, 1);
    tb_str(&b, "string"), tb_u32(&b, CAKE_GGUF_STRING), tb_str(&b, "hi");
    tb_str(&b, "u64"), tb_u32(&b, CAKE_GGUF_UINT64), tb_u64(&b, UINT64_C(1) << 40);
    tb_str(&b, "i64"), tb_u32(&b, CAKE_GGUF_INT64), tb_u64(&b, (uint64_t) - (INT64_C(1) << 40));
    const double f64 = 1e300, f64s = -0.25;
    tb_str(&b, "f64"), tb_u32(&b, CAKE_GGUF_FLOAT64), tb_put(&b, &f64, 8);
    tb_str(&b, "f64small"), tb_u32(&b, CAKE_GGUF_FLOAT64), tb_put(&b, &f64s, 8);
    /* arrays of every element type but ARRAY: 3 elements each, bytes 0..3*size-1 */
    static const uint8_t esize[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    for (uint32_t t = 0; t < CAKE_GGUF_TYPE_COUNT; t++) {
        if (t == CAKE_GGUF_ARRAY) continue;
        char key[32];
        snprintf(key, sizeof(key), "arr.%s", cake_gguf_type_name(t));
        tb_str(&b, key), tb_u32(&b, CAKE_GGUF_ARRAY), tb_u32(&b, t), tb_u64(&b, 3);
        if (t == CAKE_GGUF_STRING) {
            tb_str(&b, "x"), tb_str(&b, ""), tb_str(&b, "zz");
        } else {
            for (uint32_t k = 0; k < 3u * esize[t]; k++)
                tb_u8(&b, t == CAKE_GGUF_BOOL ? (uint8_t)(k & 1) : (uint8_t)k);
        }
    }
    /* one tensor */
    tb_str(&b, "w"), tb_u32(&b, 1), tb_u64(&b, 4), tb_u32(&b, CAKE_DTYPE_F32), tb_u64(&b, 0);
    tb_pad(&b, 32);
    const size_t data_off = b.n;
    const float w[4] = {1, 2, 3, 4};
    tb_put(&b, w, sizeof(w));

    cake_gguf *g = NULL;
    char err[512];
    if (cake_gguf_parse(b.p, b.n, &g, err, sizeof(err))) fail_msg("%s", err);
    assert_int_equal(g->data_offset, data_off);
    assert_views_inside(g, b.p, b.n);
    assert_int_equal(cake_gguf_find_kv(g, "u8")->v.u64, 200);
    assert_int_equal(cake_gguf_find_kv(g, "i8")->v.i64, -100);
    assert_int_equal(cake_gguf_find_kv(g, "u16")->v.u64, 60000);
    assert_int_equal(cake_gguf_find_kv(g, "i16")->v.i64, -30000);
    assert_int_equal(cake_gguf_find_kv(g, "u32")->v.u64, 4000000000u);
    assert_int_equal(cake_gguf_find_kv(g, "i32")->v.i64, -2000000000);
    assert_true(cake_gguf_find_kv(g, "f32")->v.f64 == 0.5);
    assert_int_equal(cake_gguf_find_kv(g, "bool")->v.u64, 1);
    assert_true(str_eq(cake_gguf_find_kv(g, "string")->v.str, "hi"));
    assert_int_equal(cake_gguf_find_kv(g, "u64")->v.u64, UINT64_C(1) << 40);
    assert_int_equal(cake_gguf_find_kv(g, "i64")->v.i64, -(INT64_C(1) << 40));
    assert_true(cake_gguf_find_kv(g, "f64")->v.f64 == 1e300);
    for (uint32_t t = 0; t < CAKE_GGUF_TYPE_COUNT; t++) {
        if (t == CAKE_GGUF_ARRAY) continue;
        char key[32];
        snprintf(key, sizeof(key), "arr.%s", cake_gguf_type_name(t));
        const cake_gguf_kv *kv = cake_gguf_find_kv(g, key);
        assert_non_null(kv);
        assert_int_equal(kv->arr_type, t);
        assert_int_equal(kv->arr_n, 3);
        if (t == CAKE_GGUF_STRING) {
            assert_true(str_eq(kv->arr_strs[0], "x"));
            assert_true(str_eq(kv->arr_strs[1], ""));
            assert_true(str_eq(kv->arr_strs[2], "zz"));
        } else {
            const uint8_t *p = kv->arr_data;
            for (uint32_t k = 0; k < 3u * esize[t]; k++)
                assert_int_equal(p[k], t == CAKE_GGUF_BOOL ? (k & 1) : k);
        }
    }
    const cake_gguf_tensor *t = cake_gguf_find_tensor(g, "w");
    assert_non_null(t);
    assert_memory_equal(t->data, w, sizeof(w));

    /* Integer getters accept any integer type whose value fits. */
    uint32_t u;
    float f;
    bool bo;
    cake_gguf_str s;
    assert_int_equal(cake_gguf_get_u32(g, "u8", &u, err, sizeof(err)), 0);
    assert_int_equal(u, 200);
    assert_int_equal(cake_gguf_get_u32(g, "u16", &u, err, sizeof(err)), 0);
    assert_int_equal(u, 60000);
    assert_int_equal(cake_gguf_get_u32(g, "i8", &u, err, sizeof(err)), -2);
    assert_non_null(strstr(err, "'i8'"));
    assert_int_equal(cake_gguf_get_u32(g, "u64", &u, err, sizeof(err)), -2);
    assert_non_null(strstr(err, "'u64'"));
    assert_int_equal(cake_gguf_get_u32(g, "string", &u, err, sizeof(err)), -2);
    assert_non_null(strstr(err, "STRING"));
    assert_int_equal(cake_gguf_get_f32(g, "f64small", &f, err, sizeof(err)), 0);
    assert_true(f == -0.25f);
    assert_int_equal(cake_gguf_get_f32(g, "f64", &f, err, sizeof(err)), -2);
    assert_int_equal(cake_gguf_get_f32(g, "u8", &f, err, sizeof(err)), -2);
    assert_int_equal(cake_gguf_get_bool(g, "bool", &bo, err, sizeof(err)), 0);
    assert_true(bo);
    assert_int_equal(cake_gguf_get_bool(g, "u8", &bo, NULL, 0), -2); /* NULL err is fine */
    assert_int_equal(cake_gguf_get_str(g, "arr.UINT8", &s, err, sizeof(err)), -2);
    assert_non_null(strstr(err, "ARRAY of UINT8"));
    cake_gguf_close(g);
    free(b.p);
}

/* ---- malformed input ---- */

/* End of the last tensor's data: truncating anywhere before it must fail. */
static uint64_t must_fail_below(const uint8_t *data, size_t size) {
    cake_gguf *g = NULL;
    char err[512];
    if (cake_gguf_parse(data, size, &g, err, sizeof(err))) fail_msg("%s", err);
    uint64_t end = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const uint64_t e =
            (uint64_t)((const uint8_t *)g->tensors[i].data - data) + g->tensors[i].nbytes;
        if (e > end) end = e;
    }
    assert_true(g->n_tensors > 0);
    cake_gguf_close(g);
    return end;
}

static void check_truncated(const uint8_t *data, size_t size, size_t at, uint64_t fail_below) {
    char err[512];
    const int rc = parse_copy(data, at, err, sizeof(err));
    if (at < fail_below) {
        if (rc != -1) fail_msg("truncation at %zu of %zu parsed", at, size);
        if (!err[0]) fail_msg("truncation at %zu: empty error", at);
    } else if (rc != 0) {
        fail_msg("truncation at %zu (after the last tensor) failed: %s", at, err);
    }
}

static void test_truncate_small(void **state) {
    (void)state;
    size_t size;
    uint8_t *data = small_file(32, &size);
    const uint64_t end = must_fail_below(data, size);
    assert_true(end <= size && size - end < 32);
    for (size_t at = 0; at <= size; at++) check_truncated(data, size, at, end);
    /* A few messages are pinned down exactly. */
    char err[512];
    assert_int_equal(parse_copy(data, 10, err, sizeof(err)), -1);
    assert_string_equal(err, "truncated GGUF header: the file has 10 bytes, the header needs 24");
    assert_int_equal(parse_copy(data, size - 40, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tensor 't.4d': data ["));
    assert_non_null(strstr(err, "extends past end of file"));
    free(data);
}

static void test_truncate_stories(void **state) {
    (void)state;
    const char *path = test_model_path("stories260K.gguf");
    if (!path) skip();
    size_t size;
    uint8_t *data = test_read_file(path, &size);
    assert_non_null(data);
    const uint64_t end = must_fail_below(data, size);
    assert_int_equal(end, size);
    cake_gguf *g = NULL;
    char err[512];
    assert_int_equal(cake_gguf_parse(data, size, &g, err, sizeof(err)), 0);
    const size_t meta = (size_t)g->data_offset;
    cake_gguf_close(g);
    int n = 0;
    for (size_t at = 0; at < 64; at++, n++) check_truncated(data, size, at, end);
    for (size_t k = 0; k < 400; k++, n++)
        check_truncated(data, size, 64 + k * (meta - 64) / 400 + k % 7, end);
    for (size_t k = 0; k < 40; k++, n++)
        check_truncated(data, size, meta + k * (size - meta) / 40 + 1, end);
    check_truncated(data, size, size - 1, end);
    assert_true(n > 500);
    free(data);
}

/* Patching helpers: fields are located through a valid parse of the same bytes. */
static void put32(uint8_t *p, uint32_t v) {
    memcpy(p, &v, 4);
}
static void put64(uint8_t *p, uint64_t v) {
    memcpy(p, &v, 8);
}

typedef struct {
    const uint8_t *data;
    size_t size;
    uint8_t *work; /* exact-size copy */
} patcher;

static void expect_patch_fail(patcher *pt, size_t off, const void *bytes, size_t n,
                              const char *want, const char *want2) {
    memcpy(pt->work, pt->data, pt->size);
    memcpy(pt->work + off, bytes, n);
    cake_gguf *g = NULL;
    char err[512] = "";
    const int rc = cake_gguf_parse(pt->work, pt->size, &g, err, sizeof(err));
    cake_gguf_close(g);
    if (rc != -1) fail_msg("patch at %zu parsed; wanted an error with '%s'", off, want);
    if (!strstr(err, want) || (want2 && !strstr(err, want2)))
        fail_msg("patch at %zu: error '%s' lacks '%s'%s%s", off, err, want, want2 ? " / " : "",
                 want2 ? want2 : "");
}

static void patch_u32(patcher *pt, size_t off, uint32_t v, const char *want, const char *want2) {
    uint8_t b[4];
    put32(b, v);
    expect_patch_fail(pt, off, b, 4, want, want2);
}

static void patch_u64(patcher *pt, size_t off, uint64_t v, const char *want, const char *want2) {
    uint8_t b[8];
    put64(b, v);
    expect_patch_fail(pt, off, b, 8, want, want2);
}

/* Corrupts each header field of a valid file in turn. */
static void corrupt_fields(const uint8_t *data, size_t size) {
    cake_gguf *g = NULL;
    char err[512];
    if (cake_gguf_parse(data, size, &g, err, sizeof(err))) fail_msg("%s", err);
    patcher pt = {data, size, malloc(size)};
    assert_non_null(pt.work);
    const uint8_t *base = g->base;

    patch_u32(&pt, 0, 0x4c4d4747u, "not a GGUF file", "GGML");
    patch_u32(&pt, 4, 2, "unsupported GGUF version 2", NULL);
    patch_u32(&pt, 4, 1, "unsupported GGUF version 1", NULL);
    patch_u32(&pt, 4, 4, "unsupported GGUF version 4", NULL);
    patch_u32(&pt, 4, 0x03000000u, "big-endian", NULL);
    patch_u64(&pt, 8, UINT64_C(1) << 40, "tensor count", NULL);
    patch_u64(&pt, 8, UINT64_MAX, "tensor count", NULL);
    patch_u64(&pt, 8, g->n_tensors + 1, "tensor", NULL);
    patch_u64(&pt, 16, UINT64_C(1) << 40, "key count", NULL);
    patch_u64(&pt, 16, UINT64_MAX, "key count", NULL);

    for (uint64_t i = 0; i < g->n_kv; i++) {
        const cake_gguf_kv *kv = &g->kv[i];
        char name[160], num[32];
        snprintf(name, sizeof(name), "'%.*s'", (int)kv->key.len, kv->key.ptr);
        snprintf(num, sizeof(num), "key #%llu", (unsigned long long)i);
        const size_t klen = (size_t)((const uint8_t *)kv->key.ptr - base) - 8;
        const size_t type = klen + 8 + (size_t)kv->key.len;
        patch_u64(&pt, klen, UINT64_MAX, num, "past end of file");
        patch_u64(&pt, klen, size, num, "past end of file");
        patch_u64(&pt, klen, 0, num, "empty");
        patch_u32(&pt, type, 13, name, "value type 13");
        patch_u32(&pt, type, 0xffffffffu, name, "out of range");
        uint8_t nul = 0;
        expect_patch_fail(&pt, klen + 8 + (size_t)kv->key.len / 2, &nul, 1, num, "NUL");
        if (kv->type == CAKE_GGUF_STRING) {
            const size_t slen = (size_t)((const uint8_t *)kv->v.str.ptr - base) - 8;
            patch_u64(&pt, slen, UINT64_MAX, name, "past end of file");
            patch_u64(&pt, slen, size, name, "past end of file");
        } else if (kv->type == CAKE_GGUF_BOOL) {
            uint8_t two = 2;
            expect_patch_fail(&pt, type + 4, &two, 1, name, "not 0 or 1");
        } else if (kv->type == CAKE_GGUF_ARRAY) {
            patch_u32(&pt, type + 4, CAKE_GGUF_ARRAY, name, "arrays of arrays");
            patch_u32(&pt, type + 4, 99, name, "out of range");
            patch_u64(&pt, type + 8, UINT64_MAX, name, "past end of file");
            patch_u64(&pt, type + 8, size, name, "past end of file");
            if (kv->arr_type == CAKE_GGUF_STRING && kv->arr_n > 1)
                patch_u64(&pt, (size_t)((const uint8_t *)kv->arr_strs[1].ptr - base) - 8,
                          UINT64_MAX - 5, name, "element #1");
        }
        if (str_eq(kv->key, "general.alignment")) {
            const size_t val = type + 4;
            patch_u32(&pt, val, 0, "general.alignment", "power of two");
            patch_u32(&pt, val, 48, "general.alignment", "power of two");
            patch_u32(&pt, val, 1u << 31, "tensor", NULL); /* valid, but no offset fits */
            patch_u32(&pt, type, CAKE_GGUF_INT32, "general.alignment", "INT32");
        }
    }

    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        char name[160], num[32];
        snprintf(name, sizeof(name), "tensor '%.*s'", (int)t->name.len, t->name.ptr);
        snprintf(num, sizeof(num), "tensor #%llu", (unsigned long long)i);
        const size_t nlen = (size_t)((const uint8_t *)t->name.ptr - base) - 8;
        const size_t ndims = nlen + 8 + (size_t)t->name.len;
        const size_t ne = ndims + 4;
        const size_t dtype = ne + 8 * t->n_dims;
        const size_t off = dtype + 4;
        patch_u64(&pt, nlen, UINT64_MAX, num, "past end of file");
        patch_u64(&pt, nlen, 0, num, "empty name");
        patch_u32(&pt, ndims, 0, name, "n_dims = 0");
        patch_u32(&pt, ndims, 5, name, "n_dims = 5");
        patch_u32(&pt, ndims, 0x80000000u, name, "out of range");
        patch_u64(&pt, ne, 0, name, "dimension 0 is 0");
        patch_u64(&pt, ne + 8 * (t->n_dims - 1), UINT64_C(1) << 62, name, NULL);
        patch_u64(&pt, ne, UINT64_MAX, name, NULL);
        patch_u32(&pt, dtype, 5, name, "dtype Q4_3 (5) is not a type cake knows the size of");
        patch_u32(&pt, dtype, 200, name, "dtype unknown (200)");
        if (t->type != CAKE_DTYPE_Q8_0 && t->ne[0] % 32)
            patch_u32(&pt, dtype, CAKE_DTYPE_Q8_0, name, "block size 32");
        patch_u64(&pt, off, t->offset + 1, name, "not a multiple of the alignment");
        patch_u64(&pt, off, UINT64_MAX - 31, name, "past end of file");
        patch_u64(&pt, off, (size - g->data_offset + 32) & ~(uint64_t)31, name, "past end of file");
        /* The last tensor ends the file (in stories260K): moving it back one slot overlaps. */
        if (i > 0) patch_u64(&pt, off, g->tensors[i - 1].offset, "overlap", NULL);
        /* A duplicate name: copy the previous tensor's name when it has the same length. */
        if (i > 0 && g->tensors[i - 1].name.len == t->name.len)
            expect_patch_fail(&pt, nlen + 8, g->tensors[i - 1].name.ptr, t->name.len,
                              "duplicate tensor name", NULL);
    }
    /* A duplicate key, when two keys have the same length. */
    for (uint64_t i = 1; i < g->n_kv; i++)
        for (uint64_t j = 0; j < i; j++)
            if (g->kv[i].key.len == g->kv[j].key.len &&
                !str_eq(g->kv[i].key, "general.alignment") &&
                !str_eq(g->kv[j].key, "general.alignment")) {
                expect_patch_fail(&pt, (size_t)((const uint8_t *)g->kv[i].key.ptr - base),
                                  g->kv[j].key.ptr, g->kv[j].key.len, "duplicate key", NULL);
                i = g->n_kv;
                break;
            }
    free(pt.work);
    cake_gguf_close(g);
}

static void test_corrupt_small(void **state) {
    (void)state;
    size_t size;
    uint8_t *data = small_file(32, &size);
    corrupt_fields(data, size);
    free(data);
}

static void test_corrupt_stories(void **state) {
    (void)state;
    const char *path = test_model_path("stories260K.gguf");
    if (!path) skip();
    size_t size;
    uint8_t *data = test_read_file(path, &size);
    assert_non_null(data);
    corrupt_fields(data, size);
    free(data);
}

/* Hand-built files for what patching cannot express. */
static void test_handbuilt_invalid(void **state) {
    (void)state;
    tb b = {0};
    /* keys */
    tb_header(&b, 0, 1), tb_str(&b, ""), tb_u32(&b, CAKE_GGUF_UINT8), tb_u8(&b, 1);
    expect_fail(&b, "key #0: empty name");
    tb_header(&b, 0, 1), tb_strn(&b, "a\0b", 3), tb_u32(&b, CAKE_GGUF_UINT8), tb_u8(&b, 1);
    expect_fail(&b, "NUL");
    tb_header(&b, 0, 2);
    tb_str(&b, "k"), tb_u32(&b, CAKE_GGUF_UINT8), tb_u8(&b, 1);
    tb_str(&b, "k"), tb_u32(&b, CAKE_GGUF_UINT8), tb_u8(&b, 1);
    expect_fail(&b, "duplicate key 'k'");
    tb_header(&b, 0, 1), tb_str(&b, "nest"), tb_u32(&b, CAKE_GGUF_ARRAY);
    tb_u32(&b, CAKE_GGUF_ARRAY), tb_u64(&b, 1), tb_u32(&b, CAKE_GGUF_UINT8), tb_u64(&b, 1),
        tb_u8(&b, 0);
    expect_fail(&b, "key #0 ('nest'): arrays of arrays are not supported");
    tb_header(&b, 0, 1), tb_str(&b, "bools"), tb_u32(&b, CAKE_GGUF_ARRAY);
    tb_u32(&b, CAKE_GGUF_BOOL), tb_u64(&b, 3), tb_u8(&b, 1), tb_u8(&b, 0), tb_u8(&b, 7);
    expect_fail(&b, "key #0 ('bools'): BOOL element #2 is 7");
    tb_header(&b, 0, 1), tb_str(&b, "b"), tb_u32(&b, CAKE_GGUF_BOOL), tb_u8(&b, 255);
    expect_fail(&b, "key #0 ('b'): BOOL value is 255");
    tb_header(&b, 0, 1), tb_str(&b, "general.alignment"), tb_u32(&b, CAKE_GGUF_UINT64),
        tb_u64(&b, 32);
    expect_fail(&b, "key 'general.alignment' has type UINT64, expected UINT32");
    /* The message format for an array that runs off the end. */
    tb_header(&b, 0, 1), tb_str(&b, "tokenizer.ggml.scores"), tb_u32(&b, CAKE_GGUF_ARRAY);
    tb_u32(&b, CAKE_GGUF_FLOAT32), tb_u64(&b, 32000);
    for (int i = 0; i < 100; i++) tb_u32(&b, 0);
    char want[256];
    snprintf(want, sizeof(want),
             "key #0 ('tokenizer.ggml.scores'): array of 32000 FLOAT32 runs past end of file at "
             "offset %zu",
             b.n - 400);
    expect_fail(&b, want);
    /* A long, unprintable key is shown bounded and escaped. */
    tb_header(&b, 0, 1);
    char longkey[300];
    memset(longkey, 'k', sizeof(longkey));
    longkey[5] = '\n';
    tb_strn(&b, longkey, sizeof(longkey)), tb_u32(&b, 77);
    expect_fail(&b, "key #0 ('kkkkk?kkk");
    expect_fail(&b, "...'): value type 77 is out of range");

    /* tensors */
    typedef struct {
        const char *name;
        uint32_t n_dims, type;
        uint64_t ne0, offset;
    } tspec;
    tspec ts[2];
    const uint8_t zeros[256] = {0};
#define TENSORS(n, data_bytes)                                                                     \
    do {                                                                                           \
        tb_header(&b, n, 0);                                                                       \
        for (int i_ = 0; i_ < (n); i_++) {                                                         \
            tb_str(&b, ts[i_].name), tb_u32(&b, ts[i_].n_dims);                                    \
            for (uint32_t d_ = 0; d_ < ts[i_].n_dims; d_++) tb_u64(&b, d_ ? 1 : ts[i_].ne0);       \
            tb_u32(&b, ts[i_].type), tb_u64(&b, ts[i_].offset);                                    \
        }                                                                                          \
        tb_pad(&b, 32);                                                                            \
        tb_put(&b, zeros, data_bytes);                                                             \
    } while (0)
    ts[0] = (tspec){"blk.0.attn_q.weight", 2, 16, 256, 0};
    TENSORS(1, 66); /* IQ2_XXS: one 66-byte block; parsed (loading a model refuses it) */
    expect_ok(&b);
    TENSORS(1, 65);
    expect_fail(&b, "tensor 'blk.0.attn_q.weight': data [96, 162) extends past end of file");
    ts[0] = (tspec){"w", 1, CAKE_DTYPE_F32, 8, 0};
    ts[1] = (tspec){"w", 1, CAKE_DTYPE_F32, 8, 32};
    TENSORS(2, 64);
    expect_fail(&b, "duplicate tensor name 'w'");
    ts[0] = (tspec){"a", 1, CAKE_DTYPE_F32, 16, 0};
    ts[1] = (tspec){"b", 1, CAKE_DTYPE_F32, 8, 32};
    TENSORS(2, 96);
    expect_fail(&b, "tensors 'a' [0, 64) and 'b' [32, 64) overlap");
    ts[1].offset = 64;
    TENSORS(2, 96);
    expect_ok(&b);
    ts[0] = (tspec){"", 1, CAKE_DTYPE_F32, 8, 0};
    TENSORS(1, 32);
    expect_fail(&b, "tensor #0: empty name");
    ts[0] = (tspec){"q", 1, CAKE_DTYPE_Q8_0, 48, 0};
    TENSORS(1, 64);
    expect_fail(&b, "tensor 'q': ne[0] = 48 is not a multiple of the Q8_0 block size 32");
    ts[0] = (tspec){"q", 2, CAKE_DTYPE_Q8_0, 64, 0};
    TENSORS(1, 68);
    expect_ok(&b);
    ts[0] = (tspec){"output.weight", 1, CAKE_DTYPE_F16, 64, 32};
    TENSORS(1, 100);
    snprintf(want, sizeof(want),
             "tensor 'output.weight': data [%zu, %zu) extends past end of file (size %zu)",
             b.n - 100 + 32, b.n - 100 + 32 + 128, b.n);
    expect_fail(&b, want);
    /* Tensors but no room for the padded data section. */
    ts[0] = (tspec){"a", 1, CAKE_DTYPE_F32, 8, 0};
    TENSORS(1, 0);
    b.n -= 1;
    expect_fail(&b, "past end of file");
#undef TENSORS

    /* Zero tensors: the file may end right after the metadata (no padding). */
    tb_header(&b, 0, 1), tb_str(&b, "general.architecture"), tb_u32(&b, CAKE_GGUF_STRING),
        tb_str(&b, "llama");
    assert_true(b.n % 32 != 0);
    expect_ok(&b);
    tb_header(&b, 0, 0);
    expect_ok(&b);
    free(b.p);
}

/* xorshift64*: a fixed seed makes every run flip the same bytes. */
static uint64_t rng_next(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}

/* Random byte flips over [lo, hi): either a clean parse whose views lie in the
 * buffer, or -1 with a message. Returns how many parsed. */
static int random_flips(const uint8_t *data, size_t size, size_t lo, size_t hi, int iters,
                        uint64_t seed) {
    uint8_t *work = malloc(size);
    assert_non_null(work);
    memcpy(work, data, size);
    int ok = 0;
    for (int it = 0; it < iters; it++) {
        size_t pos[4];
        uint8_t old[4];
        const int n = 1 + (int)(rng_next(&seed) % 4);
        for (int k = 0; k < n; k++) {
            pos[k] = lo + (size_t)(rng_next(&seed) % (hi - lo));
            old[k] = work[pos[k]];
            const uint64_t r = rng_next(&seed);
            /* Mix single-bit flips with whole-byte replacements (0, 0xff, random). */
            switch (r % 4) {
            case 0:
                work[pos[k]] ^= (uint8_t)(1u << ((r >> 8) % 8));
                break;
            case 1:
                work[pos[k]] = 0;
                break;
            case 2:
                work[pos[k]] = 0xff;
                break;
            default:
                work[pos[k]] = (uint8_t)(r >> 16);
                break;
            }
        }
        cake_gguf *g = NULL;
        char err[512] = "";
        if (cake_gguf_parse(work, size, &g, err, sizeof(err)) == 0) {
            assert_views_inside(g, work, size);
            cake_gguf_close(g);
            ok++;
        } else {
            assert_null(g);
            if (!err[0]) fail_msg("flip iteration %d: -1 without a message", it);
        }
        for (int k = n - 1; k >= 0; k--) work[pos[k]] = old[k];
    }
    free(work);
    return ok;
}

static void test_random_flips(void **state) {
    (void)state;
    size_t size;
    uint8_t *data = small_file(32, &size);
    cake_gguf *g = NULL;
    char err[512];
    assert_int_equal(cake_gguf_parse(data, size, &g, err, sizeof(err)), 0);
    const size_t meta = (size_t)g->data_offset;
    cake_gguf_close(g);
    const int ok = random_flips(data, size, 0, meta, 4000, 0x9e3779b97f4a7c15ull);
    /* Flips inside string bytes or float values are harmless: some must parse, and
     * most (in lengths, counts, types) must not. */
    assert_true(ok > 0 && ok < 4000);
    free(data);

    const char *path = test_model_path("stories260K.gguf");
    if (!path) return;
    data = test_read_file(path, &size);
    assert_non_null(data);
    assert_int_equal(cake_gguf_parse(data, size, &g, err, sizeof(err)), 0);
    const size_t smeta = (size_t)g->data_offset;
    /* Most of the metadata is token text; the tensor infos (names, shapes, dtypes,
     * offsets) get their own round so that flips hit them often. */
    const size_t infos = (size_t)((const uint8_t *)g->tensors[0].name.ptr - g->base) - 8;
    cake_gguf_close(g);
    random_flips(data, size, 0, smeta, 1500, 12345);
    random_flips(data, size, infos, smeta, 1500, 777);
    free(data);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_tables),     cmocka_unit_test(test_stories260k),
        cmocka_unit_test(test_vocab_only),       cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_writer_roundtrip), cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_all_kv_types),     cmocka_unit_test(test_truncate_small),
        cmocka_unit_test(test_truncate_stories), cmocka_unit_test(test_corrupt_small),
        cmocka_unit_test(test_corrupt_stories),  cmocka_unit_test(test_handbuilt_invalid),
        cmocka_unit_test(test_random_flips),
    };
    const int rc = cmocka_run_group_tests(tests, NULL, NULL);
    if (tmpdir[0]) rmdir(tmpdir);
    return rc;
}
