#include "kv/kv_cache.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "util/err.h"
#include "util/q8_0.h"

/* ggml's block_q4_0: an f16 scale, then 16 bytes; value i of the block is
 * the low nibble of byte i (i < 16) or the high one of byte i - 16. */
enum { Q4_0_BLOCK = 32, Q4_0_BYTES = 18 };

size_t cake_kv_row_bytes(enum cake_kv_type type, int head_dim, int kv_dim) {
    switch (type) {
    case CAKE_KV_F16:
        return (size_t)kv_dim * 2;
    case CAKE_KV_F32:
        return (size_t)kv_dim * 4;
    case CAKE_KV_Q8_0:
        return head_dim % CAKE_Q8_0_BLOCK ? 0 : (size_t)kv_dim / CAKE_Q8_0_BLOCK * CAKE_Q8_0_BYTES;
    case CAKE_KV_Q4_0:
        return head_dim % Q4_0_BLOCK ? 0 : (size_t)kv_dim / Q4_0_BLOCK * Q4_0_BYTES;
    }
    return 0;
}

int cake_kv_cache_init(cake_kv_cache *kv, int n_layers, int n_ctx, int n_kv_heads, int head_dim,
                       enum cake_kv_type type, char *err, size_t errlen) {
    memset(kv, 0, sizeof(*kv));
    if (n_layers <= 0 || n_ctx <= 0 || n_kv_heads <= 0 || head_dim <= 0)
        return cake_err(err, errlen,
                        "KV cache: invalid shape (%d layers, %d positions, %d heads of %d)",
                        n_layers, n_ctx, n_kv_heads, head_dim);
    kv->n_layers = n_layers;
    kv->n_ctx = n_ctx;
    kv->n_kv_heads = n_kv_heads;
    kv->head_dim = head_dim;
    kv->kv_dim = n_kv_heads * head_dim;
    kv->head_ctx = (n_ctx + CAKE_KV_KBLOCK - 1) / CAKE_KV_KBLOCK * CAKE_KV_KBLOCK;
    kv->type = type;
    kv->row_bytes = cake_kv_row_bytes(type, head_dim, kv->kv_dim);
    if (!kv->row_bytes)
        return cake_kv_quantized(type)
                   ? cake_err(err, errlen,
                              "KV cache: %s needs a head dimension that is a multiple of 32 "
                              "(this model's is %d); use --kv-type f16",
                              type == CAKE_KV_Q8_0 ? "q8_0" : "q4_0", head_dim)
                   : cake_err(err, errlen, "KV cache: unknown type %d", (int)type);
    kv->elem_size = type == CAKE_KV_F32    ? 4
                    : type == CAKE_KV_Q8_0 ? 1
                    : type == CAKE_KV_Q4_0 ? 0
                                           : 2;
    const size_t elements = (size_t)kv->head_ctx * (size_t)kv->kv_dim;
    kv->layer_bytes = type == CAKE_KV_Q4_0 ? elements / 2 : elements * kv->elem_size;
    if (cake_kv_quantized(type)) { /* the scales after the elements */
        kv->scales_offset = kv->layer_bytes;
        kv->layer_bytes += elements / CAKE_Q8_0_BLOCK * sizeof(cake_f16);
    }
    kv->map_bytes = kv->layer_bytes * 2 * (size_t)n_layers;
    kv->base =
        mmap(NULL, kv->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (kv->base == MAP_FAILED) {
        kv->base = NULL;
        return cake_err(err, errlen, "KV cache: cannot allocate %zu bytes: %s", kv->map_bytes,
                        strerror(errno));
    }
    return 0;
}

void cake_kv_cache_prefault(const cake_kv_cache *kv) {
#ifdef MADV_POPULATE_WRITE
    /* best effort: a kernel without it (< 5.14) faults the pages in later */
    if (kv->base) (void)madvise(kv->base, kv->map_bytes, MADV_POPULATE_WRITE);
#else
    (void)kv;
#endif
}

void cake_kv_cache_free(cake_kv_cache *kv) {
    if (kv && kv->base) munmap(kv->base, kv->map_bytes);
    if (kv) kv->base = NULL;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* A 16 x 32 matrix of 16-bit elements (rows src_stride elements apart)
 * transposed into 32 x 16 (rows dst_stride apart): cake_kv_put moves 16
 * positions x 32 dims of f16 keys into a key block this way (dst_stride 64),
 * cake_kv_get 16 dims x 32 positions of a block back out into rows. Three
 * rounds of 16-, 32- and 64-bit interleaves within 128-bit lanes, then the
 * 8-column halves of each output row put side by side. */
static void transpose_16x32(uint16_t *dst, size_t dst_stride, const uint16_t *src,
                            size_t src_stride) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + (size_t)i * src_stride);
    /* lane L of t[2i] (columns 8L..8L+7): 32-bit pairs of rows (2i, 2i+1)
     * at columns c = 0..3 of the lane; t[2i + 1]: c = 4..7 */
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    /* r[4i + m]: 64-bit quads of rows 4i..4i+3 at c = 2m, 2m + 1 */
    for (int i = 0; i < 4; i++)
        for (int x = 0; x < 2; x++) {
            r[4 * i + 2 * x] = _mm512_unpacklo_epi32(t[4 * i + x], t[4 * i + 2 + x]);
            r[4 * i + 2 * x + 1] = _mm512_unpackhi_epi32(t[4 * i + x], t[4 * i + 2 + x]);
        }
    /* t[8g + c]: lane L holds rows 8g..8g+7 at column 8L + c */
    for (int g = 0; g < 2; g++)
        for (int m = 0; m < 4; m++) {
            t[8 * g + 2 * m] = _mm512_unpacklo_epi64(r[8 * g + m], r[8 * g + 4 + m]);
            t[8 * g + 2 * m + 1] = _mm512_unpackhi_epi64(r[8 * g + m], r[8 * g + 4 + m]);
        }
    /* 256-bit halves: columns c, 8 + c (lo) and 16 + c, 24 + c (hi) */
    const __m512i lo = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i hi = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for (int c = 0; c < 8; c++) {
        const __m512i a = _mm512_permutex2var_epi64(t[c], lo, t[8 + c]);
        const __m512i b = _mm512_permutex2var_epi64(t[c], hi, t[8 + c]);
        _mm256_storeu_si256((__m256i *)(dst + c * dst_stride), _mm512_castsi512_si256(a));
        _mm256_storeu_si256((__m256i *)(dst + (8 + c) * dst_stride),
                            _mm512_extracti64x4_epi64(a, 1));
        _mm256_storeu_si256((__m256i *)(dst + (16 + c) * dst_stride), _mm512_castsi512_si256(b));
        _mm256_storeu_si256((__m256i *)(dst + (24 + c) * dst_stride),
                            _mm512_extracti64x4_epi64(b, 1));
    }
}
#define HAVE_TRANSPOSE_16X32 1

/* 32 rows of 32 bytes (row i at rows[i]) transposed into 32 rows of 32 bytes,
 * dst_stride bytes apart: pairs of rows interleaved byte by byte are 16 rows
 * of 32 16-bit elements, which transpose_16x32 turns into the 32 rows (each
 * element a pair of consecutive bytes of one of them). */
static void transpose_bytes_32x32(uint8_t *dst, size_t dst_stride, const uint8_t *const rows[32]) {
    uint16_t pairs[16 * 32];
    for (int i = 0; i < 16; i++) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)rows[2 * i]),
                      b = _mm256_loadu_si256((const __m256i *)rows[2 * i + 1]);
        const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
        _mm256_storeu_si256((__m256i *)(pairs + 32 * i), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(pairs + 32 * i + 16),
                            _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    transpose_16x32((uint16_t *)dst, dst_stride / 2, pairs, 32);
}
#endif

/* Values of n position-major rows (v holds rows from pos0) in (put) or out
 * of a layer's cache, in pieces of head_dim, a row's heads one after another. */
static void copy_values(const cake_kv_cache *kv, int layer, int pos0, int n, void *v, int put) {
    char *vc = cake_kv_v(kv, layer);
    const size_t es = kv->elem_size, piece = (size_t)kv->head_dim * es;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            char *c = vc + cake_kv_v_index(kv->head_ctx, kv->head_dim, h, pos0 + t, 0) * es;
            char *r = (char *)v + ((size_t)t * kv->kv_dim + (size_t)h * kv->head_dim) * es;
            memcpy(put ? c : r, put ? r : c, piece);
        }
}

/* Keys of rows [t0, t1) (k holds rows from pos0) element by element: per
 * head, block and dim, a run of positions (consecutive in the block, kv_dim
 * apart in the rows). */
#define MOVE_KEY_RUN(T)                                                                            \
    do {                                                                                           \
        T *c_ = (T *)kc + c, *r_ = (T *)k + r;                                                     \
        if (put)                                                                                   \
            for (int i = 0; i < len; i++) c_[i] = r_[(size_t)i * kv->kv_dim];                      \
        else                                                                                       \
            for (int i = 0; i < len; i++) r_[(size_t)i * kv->kv_dim] = c_[i];                      \
    } while (0)

static void copy_keys(const cake_kv_cache *kv, int layer, int pos0, int t0, int t1, void *k,
                      int put) {
    void *kc = cake_kv_k(kv, layer);
    const int hd = kv->head_dim;
    for (int h = 0; h < kv->n_kv_heads; h++)
        for (int t = t0, len; t < t1; t += len) {
            const int room = CAKE_KV_KBLOCK - (pos0 + t) % CAKE_KV_KBLOCK;
            len = t1 - t < room ? t1 - t : room;
            for (int d = 0; d < hd; d++) {
                const size_t c = cake_kv_k_index(kv->head_ctx, hd, h, pos0 + t, d);
                const size_t r = (size_t)t * kv->kv_dim + (size_t)h * hd + (size_t)d;
                if (kv->elem_size == 2)
                    MOVE_KEY_RUN(uint16_t);
                else
                    MOVE_KEY_RUN(float);
            }
        }
}
#undef MOVE_KEY_RUN

#ifdef HAVE_TRANSPOSE_16X32
/* The rows [*t0, *t1) of [0, n) whose positions pos0 + t fill whole aligned
 * runs of `align` positions (empty when there are none). */
static void aligned_rows(int pos0, int n, int align, int *t0, int *t1) {
    const int first = (align - pos0 % align) % align;
    *t0 = first < n ? first : n;
    *t1 = *t0 + (n - *t0) / align * align;
}
#endif

/* Keys of rows [0, n), in (put) or out: f16 keys in whole tiles transposed
 * in registers (put: 16 positions x 32 dims into a block; get: 16 dims x 32
 * positions of a block out to rows; ~4x the element-by-element rate), the
 * ragged ends and f32 keys by copy_keys. Rows outermost, as in copy_values:
 * each row is read (written) whole before the next, 1.1-1.4x faster than a
 * head at a time. */
static void move_keys(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, int put) {
    int t0 = n, t1 = n; /* rows whose keys go in whole tiles */
#ifdef HAVE_TRANSPOSE_16X32
    const int hd = kv->head_dim, rows = put ? 16 : 32, dims = put ? 32 : 16;
    if (kv->type == CAKE_KV_F16 && hd % dims == 0) {
        aligned_rows(pos0, n, rows, &t0, &t1);
        uint16_t *kc = cake_kv_k(kv, layer);
        for (int t = t0; t < t1; t += rows)
            for (int h = 0; h < kv->n_kv_heads; h++)
                for (int d0 = 0; d0 < hd; d0 += dims) {
                    uint16_t *c = kc + cake_kv_k_index(kv->head_ctx, hd, h, pos0 + t, d0);
                    uint16_t *r = (uint16_t *)k + (size_t)t * kv->kv_dim + (size_t)h * hd + d0;
                    if (put)
                        transpose_16x32(c, CAKE_KV_KBLOCK, r, (size_t)kv->kv_dim);
                    else
                        transpose_16x32(r, (size_t)kv->kv_dim, c, CAKE_KV_KBLOCK);
                }
    }
#endif
    copy_keys(kv, layer, pos0, 0, t0, k, put);
    copy_keys(kv, layer, pos0, t1, n, k, put);
}

/* One Q8_0 block (34 bytes: f16 scale, 32 int8) of a key and of a value
 * (head h, position p, dims [32 g, 32 g + 32)) in (put) or out: the scales
 * to their places, the value's int8 to its run, the key's to dims 64 apart
 * in its transposed block. */
static void move_q8_0_block(const cake_kv_cache *kv, int layer, int h, int p, int g, uint8_t *kb,
                            uint8_t *vb, int put, int keys) {
    const int hd = kv->head_dim, hc = kv->head_ctx;
    uint8_t *ks = (uint8_t *)(cake_kv_k_scales(kv, layer) + cake_kv_k_scale_index(hc, hd, h, p, g));
    uint8_t *vs = (uint8_t *)(cake_kv_v_scales(kv, layer) + cake_kv_v_scale_index(hc, hd, h, p, g));
    uint8_t *kc = (uint8_t *)cake_kv_k(kv, layer) + cake_kv_k_index(hc, hd, h, p, 32 * g);
    uint8_t *vc = (uint8_t *)cake_kv_v(kv, layer) + cake_kv_v_index(hc, hd, h, p, 32 * g);
    if (put) {
        memcpy(ks, kb, 2);
        memcpy(vs, vb, 2);
        memcpy(vc, vb + 2, CAKE_Q8_0_BLOCK);
        for (int i = 0; keys && i < CAKE_Q8_0_BLOCK; i++)
            kc[(size_t)i * CAKE_KV_KBLOCK] = kb[2 + i];
    } else {
        memcpy(kb, ks, 2);
        memcpy(vb, vs, 2);
        memcpy(vb + 2, vc, CAKE_Q8_0_BLOCK);
        for (int i = 0; keys && i < CAKE_Q8_0_BLOCK; i++)
            kb[2 + i] = kc[(size_t)i * CAKE_KV_KBLOCK];
    }
}

/* A Q4_0 block's 16 bytes (block_q4_0's order: byte i holds dims i and
 * i + 16) in the cache's order (byte m holds dims 2m and 2m + 1), and back. */
static void q4_0_pair_dims(const uint8_t *b, uint8_t *out) {
    for (int m = 0; m < 8; m++) {
        out[m] = (uint8_t)((b[2 * m] & 15) | (b[2 * m + 1] & 15) << 4);
        out[8 + m] = (uint8_t)(b[2 * m] >> 4 | (b[2 * m + 1] & 0xf0));
    }
}
static void q4_0_unpair_dims(const uint8_t *paired, uint8_t *b) {
    for (int m = 0; m < 8; m++) {
        b[2 * m] = (uint8_t)((paired[m] & 15) | paired[8 + m] << 4);
        b[2 * m + 1] = (uint8_t)(paired[m] >> 4 | (paired[8 + m] & 0xf0));
    }
}

/* The same for a Q4_0 block (18 bytes: f16 scale, 16 bytes of nibbles):
 * the value's 16 bytes are its run's as they are; the key's values go in
 * pairs of dims to one byte each (kv_cache.h). */
static void move_q4_0_block(const cake_kv_cache *kv, int layer, int h, int p, int g, uint8_t *kb,
                            uint8_t *vb, int put, int keys) {
    const int hd = kv->head_dim, hc = kv->head_ctx;
    uint8_t *ks = (uint8_t *)(cake_kv_k_scales(kv, layer) + cake_kv_k_scale_index(hc, hd, h, p, g));
    uint8_t *vs = (uint8_t *)(cake_kv_v_scales(kv, layer) + cake_kv_v_scale_index(hc, hd, h, p, g));
    uint8_t *kc = (uint8_t *)cake_kv_k(kv, layer);
    uint8_t *vc = (uint8_t *)cake_kv_v(kv, layer) + cake_kv_v4_byte(hc, hd, h, p, 32 * g);
    memcpy(put ? ks : kb, put ? kb : ks, 2);
    memcpy(put ? vs : vb, put ? vb : vs, 2);
    memcpy(put ? vc : vb + 2, put ? vb + 2 : vc, 16);
    if (!keys) return;
    uint8_t paired[16]; /* the key's bytes in the cache's order */
    if (put) q4_0_pair_dims(kb + 2, paired);
    for (int m = 0; m < 16; m++) {
        uint8_t *c = kc + cake_kv_k4_byte(hc, hd, h, p, 32 * g + 2 * m);
        if (put)
            *c = paired[m];
        else
            paired[m] = *c;
    }
    if (!put) q4_0_unpair_dims(paired, kb + 2);
}

#ifdef HAVE_TRANSPOSE_16X32
/* Q8_0 or Q4_0 keys of the rows [t0, t1) (whole aligned runs of 32
 * positions) in (put) or out of the cache, 32 positions x 32 key bytes of a
 * head at a time: a byte transpose, where a block at a time moves each byte
 * 64 apart from the last (~2x the rate). Q4_0 rows go through the cache's
 * order of dims (`paired`). Needs the head's key bytes (head_dim or
 * head_dim / 2) to be a multiple of 32. */
static void move_key_tiles(const cake_kv_cache *kv, int layer, int pos0, int t0, int t1, uint8_t *k,
                           int put) {
    const int hd = kv->head_dim, hc = kv->head_ctx, ng = hd / 32, q4 = kv->type == CAKE_KV_Q4_0;
    const size_t bb = q4 ? Q4_0_BYTES : CAKE_Q8_0_BYTES;
    const int head_bytes = q4 ? hd / 2 : hd;
    uint8_t *kc = cake_kv_k(kv, layer), paired[32][128]; /* q4: a head's bytes (head_dim <= 256) */
    for (int t = t0; t < t1; t += 32)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            /* row i's key bytes of this head in a chunk row, group g */
#define ROW_BLOCK(i, g) (k + (size_t)(t + (i)) * kv->row_bytes + ((size_t)h * ng + (g)) * bb + 2)
            if (q4 && put)
                for (int i = 0; i < 32; i++)
                    for (int g = 0; g < ng; g++)
                        q4_0_pair_dims(ROW_BLOCK(i, g), paired[i] + 16 * g);
            for (int c = 0; c < head_bytes; c += 32) {
                uint8_t *cache = kc + (q4 ? cake_kv_k4_byte(hc, hd, h, pos0 + t, 2 * c)
                                          : cake_kv_k_index(hc, hd, h, pos0 + t, c));
                const uint8_t *rows[32];
                for (int i = 0; i < 32; i++)
                    rows[i] = put ? (q4 ? paired[i] + c : ROW_BLOCK(i, c / 32))
                                  : cache + (size_t)i * CAKE_KV_KBLOCK; /* key byte c + i */
                if (put)
                    transpose_bytes_32x32(cache, CAKE_KV_KBLOCK, rows);
                else if (q4)
                    transpose_bytes_32x32(paired[0] + c, sizeof(paired[0]), rows);
                else
                    transpose_bytes_32x32(ROW_BLOCK(0, c / 32), kv->row_bytes, rows);
            }
            if (q4 && !put)
                for (int i = 0; i < 32; i++)
                    for (int g = 0; g < ng; g++)
                        q4_0_unpair_dims(paired[i] + 16 * g, ROW_BLOCK(i, g));
#undef ROW_BLOCK
        }
}
#endif

/* Q8_0 or Q4_0 rows (block runs) in (put) or out, a block at a time; the
 * keys of whole runs of 32 positions by move_key_tiles. */
static void move_blocks(const cake_kv_cache *kv, int layer, int pos0, int n, uint8_t *k, uint8_t *v,
                        int put) {
    const int ng = kv->head_dim / 32;
    const size_t bb = kv->type == CAKE_KV_Q8_0 ? CAKE_Q8_0_BYTES : Q4_0_BYTES;
    int t0 = n, t1 = n; /* rows whose keys go in tiles */
#ifdef HAVE_TRANSPOSE_16X32
    const int head_bytes = kv->type == CAKE_KV_Q4_0 ? kv->head_dim / 2 : kv->head_dim;
    if (head_bytes % 32 == 0 && kv->head_dim <= 256) {
        aligned_rows(pos0, n, 32, &t0, &t1);
        move_key_tiles(kv, layer, pos0, t0, t1, k, put);
    }
#endif
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++)
            for (int g = 0; g < ng; g++) {
                const size_t b = (size_t)t * kv->row_bytes + ((size_t)h * ng + g) * bb;
                const int keys = t < t0 || t >= t1;
                if (kv->type == CAKE_KV_Q8_0)
                    move_q8_0_block(kv, layer, h, pos0 + t, g, k + b, v + b, put, keys);
                else
                    move_q4_0_block(kv, layer, h, pos0 + t, g, k + b, v + b, put, keys);
            }
}

void cake_kv_put(const cake_kv_cache *kv, int layer, int pos0, int n, const void *k,
                 const void *v) {
    if (cake_kv_quantized(kv->type)) {
        move_blocks(kv, layer, pos0, n, (uint8_t *)k, (uint8_t *)v, 1);
        return;
    }
    copy_values(kv, layer, pos0, n, (void *)v, 1);
    move_keys(kv, layer, pos0, n, (void *)k, 1);
}

void cake_kv_get(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v) {
    if (cake_kv_quantized(kv->type)) {
        move_blocks(kv, layer, pos0, n, k, v, 0);
        return;
    }
    copy_values(kv, layer, pos0, n, v, 0);
    move_keys(kv, layer, pos0, n, k, 0);
}

/* 32 values into a block_q4_0 as llama.cpp's quantize_row_q4_0_ref does:
 * d = the value of largest magnitude / -8, q = min(15, trunc(x / d + 8.5))
 * (a NaN, which it leaves undefined, gives 0). */
static void q4_0_quantize_block(const float *x, uint8_t *dst) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    const float d = max / -8, id = d != 0.0f ? 1.0f / d : 0.0f;
    const cake_f16 h = cake_f32_to_f16(d);
    memcpy(dst, &h, 2);
    uint8_t q[32];
    for (int j = 0; j < 32; j++) {
        const float t = x[j] * id + 8.5f;
        q[j] = t >= 15.0f ? 15 : t >= 0.0f ? (uint8_t)t : 0;
    }
    for (int j = 0; j < 16; j++) dst[2 + j] = (uint8_t)(q[j] | q[16 + j] << 4);
}

void cake_kv_quantize_put(const cake_kv_cache *kv, int layer, int pos0, int n, const float *k,
                          const float *v) {
    const int hd = kv->head_dim, ng = hd / 32, q8 = kv->type == CAKE_KV_Q8_0;
    uint8_t kb[CAKE_Q8_0_BYTES], vb[CAKE_Q8_0_BYTES];
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++)
            for (int g = 0; g < ng; g++) {
                const size_t e = (size_t)t * kv->kv_dim + (size_t)h * hd + (size_t)g * 32;
                if (q8) {
                    cake_q8_0_quantize_block(k + e, kb);
                    cake_q8_0_quantize_block(v + e, vb);
                    move_q8_0_block(kv, layer, h, pos0 + t, g, kb, vb, 1, 1);
                } else {
                    q4_0_quantize_block(k + e, kb);
                    q4_0_quantize_block(v + e, vb);
                    move_q4_0_block(kv, layer, h, pos0 + t, g, kb, vb, 1, 1);
                }
            }
}
