/* Chunk keys and the chunk blob format: layout, determinism, and every way a
 * blob can be wrong (each must be rejected, naming the failed check, with the
 * KV cache untouched). */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "test_store_common.h"
#include "util/q8_0.h"

/* ---- keys ---- */

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void hash128(const void *in, size_t n, uint8_t out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(in, n));
    memcpy(out, c.digest, 16);
}

/* The documented byte layouts, rebuilt here by hand. */
static void test_key_layout(void **state) {
    (void)state;
    uint8_t in[28], want[16];
    memcpy(in, T_FP, 16);
    put32(in + 16, 256);
    put32(in + 20, CAKE_KV_F16);
    put32(in + 24, CAKE_CHUNK_FORMAT_VERSION);
    hash128(in, sizeof(in), want);
    cake_chunk_key root;
    cake_key_root(T_FP, 256, CAKE_KV_F16, &root);
    assert_memory_equal(root.b, want, 16);

    cake_token toks[5] = {1, -2, 300000, 0x7fffffff, 42};
    uint8_t in2[16 + 20];
    memcpy(in2, root.b, 16);
    for (int i = 0; i < 5; i++) put32(in2 + 16 + 4 * i, (uint32_t)toks[i]);
    hash128(in2, sizeof(in2), want);
    cake_chunk_key k0;
    cake_key_next(&root, toks, 5, &k0);
    assert_memory_equal(k0.b, want, 16);
}

/* A backend's fingerprint: H(model fingerprint || tag), not the model's,
 * and another for another tag. */
static void test_backend_fingerprint(void **state) {
    (void)state;
    uint8_t in[20], want[16], got[16], other[16];
    memcpy(in, T_FP, 16);
    memcpy(in + 16, "cuda", 4);
    hash128(in, sizeof(in), want);
    cake_key_backend_fingerprint(T_FP, "cuda", got);
    assert_memory_equal(got, want, 16);
    assert_memory_not_equal(got, T_FP, 16);
    cake_key_backend_fingerprint(T_FP, "rocm", other);
    assert_memory_not_equal(got, other, 16);
    /* in place, as the context does it */
    memcpy(other, T_FP, 16);
    cake_key_backend_fingerprint(other, "cuda", other);
    assert_memory_equal(other, want, 16);
}

/* A cache salt's fingerprint: H(fingerprint || "cache_salt:" || salt), the
 * same in place; another for another salt, and neither the model's nor a
 * backend's. */
static void test_salted_fingerprint(void **state) {
    (void)state;
    uint8_t in[16 + 11 + 6], want[16], got[16], other[16];
    memcpy(in, T_FP, 16);
    memcpy(in + 16, "cache_salt:", 11);
    memcpy(in + 27, "tenant", 6);
    hash128(in, sizeof(in), want);
    cake_key_salted_fingerprint(T_FP, "tenant", got);
    assert_memory_equal(got, want, 16);
    assert_memory_not_equal(got, T_FP, 16);
    cake_key_salted_fingerprint(T_FP, "tenant2", other);
    assert_memory_not_equal(got, other, 16);
    cake_key_backend_fingerprint(T_FP, "cuda", other);
    assert_memory_not_equal(got, other, 16);
    memcpy(other, T_FP, 16);
    cake_key_salted_fingerprint(other, "tenant", other);
    assert_memory_equal(other, want, 16);
}

/* Keys are part of the on-disk contract: a pinned value catches an accidental
 * change of the scheme (XXH3 itself is a fixed, specified function). */
static void test_key_pinned(void **state) {
    (void)state;
    uint8_t fp[16];
    for (int i = 0; i < 16; i++) fp[i] = (uint8_t)i;
    cake_token toks[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    cake_chunk_key keys[2];
    assert_int_equal(cake_key_chain(fp, 4, CAKE_KV_F16, toks, 8, keys), 2);
    char hex[33];
    cake_key_hex(&keys[1], hex);
    /* Recomputed by hand from the XXH3 primitives with the documented layout. */
    uint8_t in[28], r[16], in2[32], k0[16], k1[16];
    memcpy(in, fp, 16);
    put32(in + 16, 4);
    put32(in + 20, 0);
    put32(in + 24, CAKE_CHUNK_FORMAT_VERSION);
    hash128(in, 28, r);
    memcpy(in2, r, 16);
    for (int i = 0; i < 4; i++) put32(in2 + 16 + 4 * i, (uint32_t)toks[i]);
    hash128(in2, 32, k0);
    memcpy(in2, k0, 16);
    for (int i = 0; i < 4; i++) put32(in2 + 16 + 4 * i, (uint32_t)toks[4 + i]);
    hash128(in2, 32, k1);
    assert_memory_equal(keys[0].b, k0, 16);
    assert_memory_equal(keys[1].b, k1, 16);
    print_message("pinned key of chunk 1: %s\n", hex);
    assert_string_equal(hex, "e476198c18b1f94109778ca0decbdaa7");
}

static void test_key_chain_change(void **state) {
    (void)state;
    enum { N = 10 * T_CHUNK + 5 };
    cake_token toks[N];
    for (int i = 0; i < N; i++) toks[i] = i * 7 + 1;
    cake_chunk_key a[10], b[10];
    assert_int_equal(cake_key_chain(T_FP, T_CHUNK, CAKE_KV_F16, toks, N, a), 10);
    assert_int_equal(cake_key_chain(T_FP, T_CHUNK, CAKE_KV_F16, toks, N, NULL), 10);
    for (int ci = 0; ci < 10; ci += 3) {
        cake_token saved = toks[ci * T_CHUNK + 5];
        toks[ci * T_CHUNK + 5] = saved + 1;
        cake_key_chain(T_FP, T_CHUNK, CAKE_KV_F16, toks, N, b);
        toks[ci * T_CHUNK + 5] = saved;
        for (int j = 0; j < 10; j++) {
            if (j < ci)
                assert_true(cake_key_equal(&a[j], &b[j]));
            else
                assert_false(cake_key_equal(&a[j], &b[j]));
        }
    }
    /* A token in the partial tail changes nothing. */
    toks[N - 1]++;
    cake_key_chain(T_FP, T_CHUNK, CAKE_KV_F16, toks, N, b);
    assert_memory_equal(a, b, sizeof(a));
    /* Every root input matters. */
    cake_chunk_key r0, r1;
    cake_key_root(T_FP, T_CHUNK, CAKE_KV_F16, &r0);
    cake_key_root(T_FP, T_CHUNK + 1, CAKE_KV_F16, &r1);
    assert_false(cake_key_equal(&r0, &r1));
    cake_key_root(T_FP, T_CHUNK, CAKE_KV_F32, &r1);
    assert_false(cake_key_equal(&r0, &r1));
    uint8_t fp2[16];
    memcpy(fp2, T_FP, 16);
    fp2[15] ^= 1;
    cake_key_root(fp2, T_CHUNK, CAKE_KV_F16, &r1);
    assert_false(cake_key_equal(&r0, &r1));
    assert_int_equal(cake_key_chain(T_FP, 0, CAKE_KV_F16, toks, N, b), 0);
}

static void test_key_hex(void **state) {
    (void)state;
    cake_chunk_key k, k2;
    for (int i = 0; i < 16; i++) k.b[i] = (uint8_t)(i * 17 + 3);
    char hex[33];
    cake_key_hex(&k, hex);
    assert_int_equal(strlen(hex), 32);
    assert_int_equal(cake_key_parse(hex, &k2), 0);
    assert_true(cake_key_equal(&k, &k2));
    assert_int_equal(cake_key_parse("00112233445566778899AABBCCDDEEFF", &k2), 0);
    assert_int_equal(k2.b[10], 0xaa);
    assert_int_equal(cake_key_parse("00112233445566778899aabbccddeef", &k2), -1);   /* short */
    assert_int_equal(cake_key_parse("00112233445566778899aabbccddeeff0", &k2), -1); /* long */
    assert_int_equal(cake_key_parse("00112233445566778899aabbccddeefg", &k2), -1);
    assert_int_equal(cake_key_parse("", &k2), -1);
}

/* Keys printed by this same program run as a separate process. */
static void print_keys(void) {
    enum { N = 4 * T_CHUNK };
    cake_token toks[N];
    for (int i = 0; i < N; i++) toks[i] = (i * 2654435761u) % 32000;
    cake_chunk_key k[4];
    cake_key_chain(T_FP, T_CHUNK, CAKE_KV_F16, toks, N, k);
    char hex[33];
    for (int i = 0; i < 4; i++) printf("%s\n", cake_key_hex(&k[i], hex));
}

static void read_child_keys(char *out, size_t n) {
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        execl("/proc/self/exe", "test_store_chunk", "--print-keys", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    size_t got = 0;
    ssize_t r;
    while (got < n - 1 && (r = read(fds[0], out + got, n - 1 - got)) > 0) got += (size_t)r;
    out[got] = '\0';
    close(fds[0]);
    int st;
    waitpid(pid, &st, 0);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static void test_key_two_processes(void **state) {
    (void)state;
    char a[512], b[512];
    read_child_keys(a, sizeof(a));
    read_child_keys(b, sizeof(b));
    assert_int_equal(strlen(a), 4 * 33);
    assert_string_equal(a, b);
    /* and the same as in this process */
    fflush(stdout);
    enum { N = 4 * T_CHUNK };
    cake_token toks[N];
    for (int i = 0; i < N; i++) toks[i] = (i * 2654435761u) % 32000;
    cake_chunk_key k[4];
    cake_key_chain(T_FP, T_CHUNK, CAKE_KV_F16, toks, N, k);
    char hex[33];
    assert_memory_equal(a, cake_key_hex(&k[0], hex), 32);
    assert_memory_equal(a + 3 * 33, cake_key_hex(&k[3], hex), 32);
}

/* ---- chunk blobs ---- */

/* A payload run: n position-major rows of layer `layer`'s K or V from
 * position pos0 of a cache filled by t_fill_kv(salt); 0 when it matches. */
static int rows_differ(const uint8_t *run, int layer, int is_v, int pos0, int n,
                       enum cake_kv_type type, uint32_t salt) {
    const int kv_dim = T_HEADS * T_HDIM;
    for (int p = 0; p < n; p++)
        for (int e = 0; e < kv_dim; e++) {
            const uint32_t x = t_pattern(layer, is_v, pos0 + p, e, salt);
            const size_t i = (size_t)p * kv_dim + (size_t)e;
            uint32_t got;
            if (type == CAKE_KV_F32) {
                memcpy(&got, run + 4 * i, 4);
                if (got != x) return 1;
            } else {
                uint16_t g16;
                memcpy(&g16, run + 2 * i, 2);
                if (g16 != (uint16_t)x) return 1;
            }
        }
    return 0;
}

static void roundtrip(enum cake_kv_type type) {
    cake_kv_cache src, dst;
    assert_int_equal(t_kv_init(&src, type), 0);
    assert_int_equal(t_kv_init(&dst, type), 0);
    t_fill_kv(&src, 1);
    t_fill_kv(&dst, 2);
    cake_chunk_header h = t_header(2, 9, type);
    size_t len;
    void *blob = t_blob(&h, &src, 2 * T_CHUNK, &len);
    size_t es = type == CAKE_KV_F32 ? 4 : 2;
    assert_int_equal(len, CAKE_CHUNK_HEADER_SIZE + 2 * T_LAYERS * T_CHUNK * T_HEADS * T_HDIM * es);
    assert_int_equal(h.payload_len, len - CAKE_CHUNK_HEADER_SIZE);
    assert_true(h.created > 0);
    /* The payload: per layer, the chunk's K rows then its V rows, position-major
     * (the cache keeps heads apart: kv_cache.h). */
    size_t run = T_CHUNK * T_HEADS * T_HDIM * es;
    const uint8_t *p = (const uint8_t *)blob + CAKE_CHUNK_HEADER_SIZE;
    for (int l = 0; l < T_LAYERS; l++) {
        assert_false(rows_differ(p + 2 * l * run, l, 0, 2 * T_CHUNK, T_CHUNK, type, 1));
        assert_false(rows_differ(p + (2 * l + 1) * run, l, 1, 2 * T_CHUNK, T_CHUNK, type, 1));
    }

    char err[256];
    cake_chunk_header got;
    assert_int_equal(cake_chunk_verify(blob, len, &h, &got, err, sizeof(err)), 0);
    assert_int_equal(got.payload_hash, h.payload_hash);
    assert_int_equal(cake_chunk_verify(blob, len, NULL, NULL, err, sizeof(err)), 0);
    assert_int_equal(cake_chunk_decode_into(blob, len, &h, &dst, 2 * T_CHUNK, err, sizeof(err)), 0);
    assert_int_equal(t_kv_cmp_range(&src, 2 * T_CHUNK, &dst, 2 * T_CHUNK, T_CHUNK), 0);
    /* neighbours untouched */
    cake_kv_cache ref;
    assert_int_equal(t_kv_init(&ref, type), 0);
    t_fill_kv(&ref, 2);
    assert_int_equal(t_kv_cmp_range(&ref, 0, &dst, 0, 2 * T_CHUNK), 0);
    assert_int_equal(t_kv_cmp_range(&ref, 3 * T_CHUNK, &dst, 3 * T_CHUNK, T_CTX - 3 * T_CHUNK), 0);
    cake_kv_cache_free(&ref);
    cake_store_free_buffer(blob);
    cake_kv_cache_free(&src);
    cake_kv_cache_free(&dst);
}

/* cake_kv_put / cake_kv_get against the documented layout (kv_cache.h), for
 * head dims that take the f16 tile path (64, 96) and one that does not (40),
 * ranges that start and end inside 16-position tiles and cross key blocks,
 * in both element types: every element lands where cake_kv_*_index says, and
 * nothing outside the range is touched. */
/* llama.cpp's quantize_row_q4_0_ref, for one block of 32 (finite values). */
static void ref_q4_0_block(const float *x, uint8_t *dst) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    const float d = max / -8, id = d ? 1.0f / d : 0.0f;
    const cake_f16 h = cake_f32_to_f16(d);
    memcpy(dst, &h, 2);
    for (int j = 0; j < 16; j++) {
        const int q0 = (int8_t)(x[j] * id + 8.5f), q1 = (int8_t)(x[16 + j] * id + 8.5f);
        dst[2 + j] = (uint8_t)((q0 < 15 ? q0 : 15) | (q1 < 15 ? q1 : 15) << 4);
    }
}

/* Value i (0..31) of a Q8_0 or Q4_0 block. */
static int block_value(const uint8_t *b, int q4, int i) {
    return q4 ? (i < 16 ? b[2 + i] & 15 : b[2 + i - 16] >> 4) : (int)(int8_t)b[2 + i];
}

/* The same for Q8_0 and Q4_0 rows (block runs): each block's values and
 * scale land where cake_kv_*_index (Q4_0: cake_kv_*4_byte and the nibble's
 * shift) and cake_kv_*_scale_index say, nothing outside the range is
 * touched, get gives the rows back; and cake_kv_quantize_put of f32 rows is
 * llama.cpp's quantization of them (quantize_row_q8_0_ref, _q4_0_ref), put. */
static void test_kv_put_get_quantized(void **state) {
    (void)state;
    const int hds[] = {64, 96}, ranges[][2] = {{11, 37}, {0, 64}, {48, 100}, {130, 3}};
    for (int q4 = 0; q4 < 2; q4++)
        for (size_t hi = 0; hi < 2; hi++)
            for (size_t ri = 0; ri < 4; ri++) {
                const int hd = hds[hi], heads = 3, pos0 = ranges[ri][0], n = ranges[ri][1];
                const int ng = hd / 32, kv_dim = heads * hd, bb = q4 ? 18 : 34;
                const size_t rowb = (size_t)kv_dim / 32 * (size_t)bb;
                const enum cake_kv_type type = q4 ? CAKE_KV_Q4_0 : CAKE_KV_Q8_0;
                cake_kv_cache kv;
                char err[256];
                assert_int_equal(cake_kv_cache_init(&kv, 2, 150, heads, hd, type, err, sizeof(err)),
                                 0);
                assert_int_equal(kv.row_bytes, rowb);
                memset(kv.base, 0x5a, kv.map_bytes);
                float *kf = malloc((size_t)n * kv_dim * 4), *vf = malloc((size_t)n * kv_dim * 4);
                uint8_t *k = malloc((size_t)n * rowb), *v = malloc((size_t)n * rowb);
                uint8_t *k2 = malloc((size_t)n * rowb), *v2 = malloc((size_t)n * rowb);
                assert_non_null(v2);
                for (size_t e = 0; e < (size_t)n * kv_dim; e++) {
                    kf[e] = (float)(t_pattern(1, 0, pos0, (int)e, 9) % 2001) / 1000.0f - 1.0f;
                    vf[e] = (float)(t_pattern(1, 1, pos0, (int)e, 9) % 2001) / 500.0f - 2.0f;
                }
                for (size_t b = 0; b < (size_t)n * kv_dim / 32; b++) {
                    (q4 ? ref_q4_0_block : cake_q8_0_quantize_block)(kf + 32 * b, k + bb * b);
                    (q4 ? ref_q4_0_block : cake_q8_0_quantize_block)(vf + 32 * b, v + bb * b);
                }
                cake_kv_put(&kv, 1, pos0, n, k, v);
                uint8_t *mine = calloc(kv.map_bytes, 1); /* bytes the range owns */
                assert_non_null(mine);
                const uint8_t *base = kv.base, *kl = cake_kv_k(&kv, 1), *vl = cake_kv_v(&kv, 1);
                const uint8_t *ksl = (const uint8_t *)cake_kv_k_scales(&kv, 1),
                              *vsl = (const uint8_t *)cake_kv_v_scales(&kv, 1);
                const int hc = kv.head_ctx;
                for (int h = 0; h < heads; h++)
                    for (int p = pos0; p < pos0 + n; p++)
                        for (int g = 0; g < ng; g++) {
                            const size_t b = (size_t)(p - pos0) * rowb + ((size_t)h * ng + g) * bb;
                            const uint8_t *ks = ksl + 2 * cake_kv_k_scale_index(hc, hd, h, p, g),
                                          *vs = vsl + 2 * cake_kv_v_scale_index(hc, hd, h, p, g);
                            if (memcmp(ks, k + b, 2) || memcmp(vs, v + b, 2))
                                fail_msg("%s hd %d: head %d position %d group %d: scale",
                                         q4 ? "q4_0" : "q8_0", hd, h, p, g);
                            memset(mine + (ks - base), 1, 2);
                            memset(mine + (vs - base), 1, 2);
                            for (int i = 0; i < 32; i++) {
                                const int d = 32 * g + i;
                                const uint8_t *kc = kl + (q4 ? cake_kv_k4_byte(hc, hd, h, p, d)
                                                             : cake_kv_k_index(hc, hd, h, p, d));
                                const uint8_t *vc = vl + (q4 ? cake_kv_v4_byte(hc, hd, h, p, d)
                                                             : cake_kv_v_index(hc, hd, h, p, d));
                                const int kq = q4 ? *kc >> cake_kv_k4_shift(d) & 15
                                                  : (int)(int8_t)*kc,
                                          vq = q4 ? *vc >> cake_kv_v4_shift(d) & 15
                                                  : (int)(int8_t)*vc;
                                if (kq != block_value(k + b, q4, i) ||
                                    vq != block_value(v + b, q4, i))
                                    fail_msg("%s hd %d: head %d position %d dim %d",
                                             q4 ? "q4_0" : "q8_0", hd, h, p, d);
                                mine[kc - base] = mine[vc - base] = 1;
                            }
                        }
                for (size_t i = 0; i < kv.map_bytes; i++)
                    if (!mine[i] && base[i] != 0x5a)
                        fail_msg("%s hd %d [%d, %d): byte %zu outside the range written",
                                 q4 ? "q4_0" : "q8_0", hd, pos0, pos0 + n, i);
                free(mine);
                cake_kv_get(&kv, 1, pos0, n, k2, v2);
                assert_memory_equal(k2, k, (size_t)n * rowb);
                assert_memory_equal(v2, v, (size_t)n * rowb);
                memset(kv.base, 0, kv.map_bytes);
                cake_kv_quantize_put(&kv, 1, pos0, n, kf, vf);
                cake_kv_get(&kv, 1, pos0, n, k2, v2);
                assert_memory_equal(k2, k, (size_t)n * rowb);
                assert_memory_equal(v2, v, (size_t)n * rowb);
                free(kf);
                free(vf);
                free(k);
                free(v);
                free(k2);
                free(v2);
                cake_kv_cache_free(&kv);
            }
}

static void test_kv_put_get_layout(void **state) {
    (void)state;
    const int hds[] = {64, 96, 40}, ranges[][2] = {{11, 37}, {0, 64}, {48, 100}, {130, 3}};
    for (int type = 0; type < 2; type++)
        for (size_t hi = 0; hi < 3; hi++)
            for (size_t ri = 0; ri < 4; ri++) {
                const int hd = hds[hi], heads = 3, pos0 = ranges[ri][0], n = ranges[ri][1];
                const enum cake_kv_type kt = type ? CAKE_KV_F32 : CAKE_KV_F16;
                const size_t es = type ? 4 : 2, row = (size_t)heads * hd;
                cake_kv_cache kv;
                char err[256];
                assert_int_equal(cake_kv_cache_init(&kv, 2, 150, heads, hd, kt, err, sizeof(err)),
                                 0);
                memset(kv.base, 0x5a, kv.map_bytes);
                uint8_t *k = malloc((size_t)n * row * es), *v = malloc((size_t)n * row * es);
                uint8_t *k2 = malloc((size_t)n * row * es), *v2 = malloc((size_t)n * row * es);
                assert_non_null(k2);
                for (int t = 0; t < n; t++)
                    for (size_t e = 0; e < row; e++) {
                        const uint32_t xk = t_pattern(1, 0, pos0 + t, (int)e, 7);
                        const uint32_t xv = t_pattern(1, 1, pos0 + t, (int)e, 7);
                        memcpy(k + ((size_t)t * row + e) * es, &xk, es);
                        memcpy(v + ((size_t)t * row + e) * es, &xv, es);
                    }
                cake_kv_put(&kv, 1, pos0, n, k, v);
                uint8_t *mine = calloc(kv.map_bytes, 1); /* bytes the range owns */
                assert_non_null(mine);
                for (int h = 0; h < heads; h++)
                    for (int p = pos0; p < pos0 + n; p++)
                        for (int d = 0; d < hd; d++) {
                            const size_t e = ((size_t)(p - pos0) * row + (size_t)h * hd + d) * es;
                            const size_t ko =
                                (size_t)((const char *)cake_kv_k(&kv, 1) - (const char *)kv.base) +
                                cake_kv_k_index(kv.head_ctx, hd, h, p, d) * es;
                            const size_t vo =
                                (size_t)((const char *)cake_kv_v(&kv, 1) - (const char *)kv.base) +
                                cake_kv_v_index(kv.head_ctx, hd, h, p, d) * es;
                            if (memcmp((const uint8_t *)kv.base + ko, k + e, es) ||
                                memcmp((const uint8_t *)kv.base + vo, v + e, es))
                                fail_msg("hd %d f32 %d [%d, %d): head %d position %d dim %d", hd,
                                         type, pos0, pos0 + n, h, p, d);
                            memset(mine + ko, 1, es);
                            memset(mine + vo, 1, es);
                        }
                for (size_t i = 0; i < kv.map_bytes; i++)
                    if (!mine[i] && ((const uint8_t *)kv.base)[i] != 0x5a)
                        fail_msg("hd %d f32 %d [%d, %d): byte %zu outside the range written", hd,
                                 type, pos0, pos0 + n, i);
                free(mine);
                cake_kv_get(&kv, 1, pos0, n, k2, v2);
                assert_memory_equal(k2, k, (size_t)n * row * es);
                assert_memory_equal(v2, v, (size_t)n * row * es);
                free(k);
                free(v);
                free(k2);
                free(v2);
                cake_kv_cache_free(&kv);
            }
}

static void test_chunk_roundtrip_f16(void **state) {
    (void)state;
    roundtrip(CAKE_KV_F16);
}
static void test_chunk_roundtrip_f32(void **state) {
    (void)state;
    roundtrip(CAKE_KV_F32);
}

typedef struct {
    cake_kv_cache src, dst;
    void *snap; /* copy of dst's memory */
    cake_chunk_header h;
    void *blob;
    size_t len;
} fixture;

static int fx_setup(void **state) {
    fixture *f = calloc(1, sizeof(*f));
    if (t_kv_init(&f->src, CAKE_KV_F16) || t_kv_init(&f->dst, CAKE_KV_F16)) return -1;
    t_fill_kv(&f->src, 1);
    t_fill_kv(&f->dst, 2);
    f->snap = malloc(f->dst.map_bytes);
    memcpy(f->snap, f->dst.base, f->dst.map_bytes);
    f->h = t_header(1, 5, CAKE_KV_F16);
    f->blob = t_blob(&f->h, &f->src, T_CHUNK, &f->len);
    *state = f;
    return 0;
}

static int fx_teardown(void **state) {
    fixture *f = *state;
    cake_kv_cache_free(&f->src);
    cake_kv_cache_free(&f->dst);
    free(f->snap);
    cake_store_free_buffer(f->blob);
    free(f);
    return 0;
}

/* Decoding buf must fail with `want` in the message and leave dst as it was. */
static void expect_reject(fixture *f, const void *buf, size_t len, const char *want) {
    char err[512] = "";
    int rc = cake_chunk_decode_into(buf, len, &f->h, &f->dst, T_CHUNK, err, sizeof(err));
    if (rc == 0 || (want && !strstr(err, want)))
        fail_msg("expected a rejection mentioning '%s', got rc %d: %s", want ? want : "", rc, err);
    assert_memory_equal(f->dst.base, f->snap, f->dst.map_bytes);
}

static void test_chunk_flip_header_bytes(void **state) {
    fixture *f = *state;
    uint8_t *b = f->blob;
    for (int i = 0; i < CAKE_CHUNK_HEADER_SIZE; i++) {
        for (int bit = 0; bit < 8; bit += 7) {
            b[i] ^= (uint8_t)(1 << bit);
            expect_reject(f, b, f->len, NULL);
            b[i] ^= (uint8_t)(1 << bit);
        }
    }
    /* Named checks for the fields before the checksum is even looked at. */
    b[0] ^= 1;
    expect_reject(f, b, f->len, "magic");
    b[0] ^= 1;
    b[8] ^= 1;
    expect_reject(f, b, f->len, "version");
    b[8] ^= 1;
    b[12] ^= 1;
    expect_reject(f, b, f->len, "header size");
    b[12] ^= 1;
    for (int off = 16; off < 128; off += 4) {
        b[off] ^= 0x10;
        expect_reject(f, b, f->len, "header checksum");
        b[off] ^= 0x10;
    }
    char err[256];
    assert_int_equal(cake_chunk_decode_into(b, f->len, &f->h, &f->dst, T_CHUNK, err, sizeof(err)),
                     0);
}

static void test_chunk_flip_payload(void **state) {
    fixture *f = *state;
    uint8_t *b = f->blob;
    size_t offs[] = {CAKE_CHUNK_HEADER_SIZE, CAKE_CHUNK_HEADER_SIZE + 1, f->len / 2, f->len - 1};
    for (size_t i = 0; i < 4; i++) {
        b[offs[i]] ^= 0x80;
        expect_reject(f, b, f->len, "payload checksum");
        b[offs[i]] ^= 0x80;
    }
}

/* The payload hash fed in pieces (what the file store does while it reads)
 * gives the same verdicts as hashing the blob at once, wherever the pieces
 * end, header bytes included; a piece out of order is ignored, not trusted. */
static void test_chunk_verify_fed(void **state) {
    fixture *f = *state;
    uint8_t *b = f->blob;
    char err[256];
    const size_t cuts[] = {
        0, 1, CAKE_CHUNK_HEADER_SIZE, CAKE_CHUNK_HEADER_SIZE + 3, f->len / 2, f->len - 1, f->len};
    for (size_t c = 0; c < sizeof(cuts) / sizeof(cuts[0]); c++) {
        cake_payload_hash h;
        cake_payload_hash_init(&h);
        cake_payload_hash_feed(&h, b, 0, cuts[c] / 3);
        cake_payload_hash_feed(&h, b, cuts[c] / 3, cuts[c]);
        if (cake_chunk_verify_fed(b, f->len, &f->h, &h, NULL, err, sizeof(err)))
            fail_msg("fed up to %zu: %s", cuts[c], err);
        /* a flipped byte after what was fed is still seen */
        if (cuts[c] < f->len && cuts[c] >= CAKE_CHUNK_HEADER_SIZE) {
            cake_payload_hash_init(&h);
            cake_payload_hash_feed(&h, b, 0, cuts[c]);
            b[cuts[c]] ^= 1;
            assert_int_equal(cake_chunk_verify_fed(b, f->len, &f->h, &h, NULL, err, sizeof(err)),
                             -1);
            assert_non_null(strstr(err, "payload checksum"));
            b[cuts[c]] ^= 1;
        }
    }
    /* a piece that does not follow what was fed is ignored */
    cake_payload_hash h;
    cake_payload_hash_init(&h);
    cake_payload_hash_feed(&h, b, 200, f->len);
    assert_int_equal(h.fed, CAKE_CHUNK_HEADER_SIZE);
    assert_int_equal(cake_chunk_verify_fed(b, f->len, &f->h, &h, NULL, err, sizeof(err)), 0);
}

static void test_chunk_truncated(void **state) {
    fixture *f = *state;
    size_t cuts[] = {0, 1, 8, 64, 119, 127, 128, 129, 1000, f->len / 2, f->len - 1};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++)
        expect_reject(f, f->blob, cuts[i], "truncated");
    /* and a trailing byte */
    uint8_t *longer = malloc(f->len + 1);
    memcpy(longer, f->blob, f->len);
    longer[f->len] = 0;
    expect_reject(f, longer, f->len + 1, "trailing");
    free(longer);
}

/* A valid blob, sealed, with one field changed. */
static void *variant(fixture *f, cake_chunk_header h, size_t *len) {
    cake_kv_cache kv;
    char err[256];
    assert_int_equal(cake_kv_cache_init(&kv, (int)h.n_layers, T_CTX, (int)h.n_kv_heads,
                                        (int)h.head_dim, h.dtype, err, sizeof(err)),
                     0);
    t_fill_kv(&kv, 3);
    void *b = t_blob(&h, &kv, 0, len);
    cake_kv_cache_free(&kv);
    (void)f;
    return b;
}

static void test_chunk_mismatches(void **state) {
    fixture *f = *state;
    /* what the rejection must name, for each changed field */
    const char *want[8] = {"fingerprint", "key",     "chunk index", "token count",
                           "layer count", "KV head", "head dim",    "dtype"};
    for (int c = 0; c < 8; c++) {
        cake_chunk_header h = f->h;
        h.created = 0;
        switch (c) {
        case 0:
            h.fingerprint[3] ^= 0x40;
            break; /* a chunk of another model */
        case 1:
            h.key.b[15] ^= 1;
            break;
        case 2:
            h.index++;
            break;
        case 3:
            h.n_tokens = T_CHUNK / 2;
            break; /* another chunk size */
        case 4:
            h.n_layers++;
            break;
        case 5:
            h.n_kv_heads = 1;
            h.head_dim = 16;
            break; /* same row width */
        case 6:
            h.head_dim = 2 * T_HDIM;
            break;
        case 7:
            h.dtype = CAKE_KV_F32;
            break;
        }
        size_t len;
        void *b = variant(f, h, &len);
        expect_reject(f, b, len, want[c]);
        cake_store_free_buffer(b);
    }
}

static void test_chunk_kv_misfit(void **state) {
    fixture *f = *state;
    char err[256];
    /* valid chunk, positions past the cache */
    assert_int_equal(
        cake_chunk_decode_into(f->blob, f->len, &f->h, &f->dst, T_CTX - 3, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "outside"));
    assert_int_equal(cake_chunk_decode_into(f->blob, f->len, &f->h, &f->dst, -1, err, sizeof(err)),
                     -1);
    assert_memory_equal(f->dst.base, f->snap, f->dst.map_bytes);
    /* a cache of another dtype */
    cake_kv_cache other;
    assert_int_equal(t_kv_init(&other, CAKE_KV_F32), 0);
    assert_int_equal(cake_chunk_decode_into(f->blob, f->len, &f->h, &other, 0, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "dtype"));
    /* encode refuses a header that does not match the cache */
    cake_chunk_header h = f->h;
    h.n_layers = 2;
    void *buf = malloc(f->len);
    assert_int_equal(cake_chunk_encode(&h, &f->src, 0, buf, f->len, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "layers"));
    h = f->h;
    assert_int_equal(cake_chunk_encode(&h, &f->src, 0, buf, f->len - 1, err, sizeof(err)), -1);
    h.dtype = 7;
    assert_int_equal(cake_chunk_encode(&h, &f->src, 0, buf, f->len, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "invalid shape"));
    free(buf);
    cake_kv_cache_free(&other);
    assert_int_equal(cake_chunk_payload_size(1u << 30, 1u << 30, 1u << 30, 1u << 30, 0), 0);
    /* the header of a model's chunk, from its hparams: llama-1b, 256 tokens, f16 = 8 MiB */
    cake_hparams hp = {.n_layers = 16, .n_heads = 32, .n_kv_heads = 8, .head_dim = 64};
    h = cake_chunk_header_for(T_FP, &f->h.key, 7, 256, &hp, CAKE_KV_F16);
    assert_memory_equal(h.fingerprint, T_FP, 16);
    assert_int_equal(h.index, 7);
    assert_int_equal(h.n_kv_heads, 8);
    assert_int_equal(h.head_dim, 64);
    assert_int_equal(cake_chunk_blob_size(&h), CAKE_CHUNK_HEADER_SIZE + 8u * 1024 * 1024);
    assert_int_equal(cake_chunk_payload_size(0, 1, 1, 1, 0), 0);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--print-keys")) {
        print_keys();
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_layout),
        cmocka_unit_test(test_key_pinned),
        cmocka_unit_test(test_backend_fingerprint),
        cmocka_unit_test(test_salted_fingerprint),
        cmocka_unit_test(test_key_chain_change),
        cmocka_unit_test(test_key_hex),
        cmocka_unit_test(test_key_two_processes),
        cmocka_unit_test(test_chunk_roundtrip_f16),
        cmocka_unit_test(test_chunk_roundtrip_f32),
        cmocka_unit_test(test_kv_put_get_layout),
        cmocka_unit_test(test_kv_put_get_quantized),
        cmocka_unit_test_setup_teardown(test_chunk_flip_header_bytes, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_chunk_flip_payload, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_chunk_verify_fed, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_chunk_truncated, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_chunk_mismatches, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_chunk_kv_misfit, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
