#include "kv/kv_cache.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "util/err.h"

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
    kv->elem_size = type == CAKE_KV_F32 ? 4 : 2;
    kv->layer_bytes = (size_t)kv->head_ctx * (size_t)kv->kv_dim * kv->elem_size;
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

void cake_kv_cache_free(cake_kv_cache *kv) {
    if (kv && kv->base) munmap(kv->base, kv->map_bytes);
    if (kv) kv->base = NULL;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* 16 positions x 32 dims of f16 keys (rows `stride` elements apart) into a
 * transposed key block: dst[d * 64 + 0..15] for d in [0, 32). Three rounds of
 * 16-, 32- and 64-bit interleaves within 128-bit lanes, then the 8-position
 * halves of each dim put side by side. */
static void keys_into_block(uint16_t *dst, const uint16_t *src, size_t stride) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + (size_t)i * stride);
    /* lane L of t[2i] (dims 8L..8L+7): 32-bit pairs of positions (2i, 2i+1)
     * at dims c = 0..3 of the lane; t[2i + 1]: c = 4..7 */
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    /* r[4i + m]: 64-bit quads of positions 4i..4i+3 at c = 2m, 2m + 1 */
    for (int i = 0; i < 4; i++)
        for (int x = 0; x < 2; x++) {
            r[4 * i + 2 * x] = _mm512_unpacklo_epi32(t[4 * i + x], t[4 * i + 2 + x]);
            r[4 * i + 2 * x + 1] = _mm512_unpackhi_epi32(t[4 * i + x], t[4 * i + 2 + x]);
        }
    /* t[8g + c]: lane L holds positions 8g..8g+7 at dim 8L + c */
    for (int g = 0; g < 2; g++)
        for (int m = 0; m < 4; m++) {
            t[8 * g + 2 * m] = _mm512_unpacklo_epi64(r[8 * g + m], r[8 * g + 4 + m]);
            t[8 * g + 2 * m + 1] = _mm512_unpackhi_epi64(r[8 * g + m], r[8 * g + 4 + m]);
        }
    /* 256-bit halves: dims c, 8 + c (lo) and 16 + c, 24 + c (hi) */
    const __m512i lo = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i hi = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for (int c = 0; c < 8; c++) {
        const __m512i a = _mm512_permutex2var_epi64(t[c], lo, t[8 + c]);
        const __m512i b = _mm512_permutex2var_epi64(t[c], hi, t[8 + c]);
        _mm256_storeu_si256((__m256i *)(dst + c * CAKE_KV_KBLOCK), _mm512_castsi512_si256(a));
        _mm256_storeu_si256((__m256i *)(dst + (8 + c) * CAKE_KV_KBLOCK),
                            _mm512_extracti64x4_epi64(a, 1));
        _mm256_storeu_si256((__m256i *)(dst + (16 + c) * CAKE_KV_KBLOCK),
                            _mm512_castsi512_si256(b));
        _mm256_storeu_si256((__m256i *)(dst + (24 + c) * CAKE_KV_KBLOCK),
                            _mm512_extracti64x4_epi64(b, 1));
    }
}
#define HAVE_KEYS_INTO_BLOCK 1
#endif

/* Copies n position-major rows in (put) or out of a layer's K and V. V goes
 * in runs of head_dim; K one element at a time, scattered into its
 * transposed blocks (stores of 2 or 4 bytes). */
static void kv_copy(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v,
                    int put) {
    char *kc = cake_kv_k(kv, layer), *vc = cake_kv_v(kv, layer);
    const int hd = kv->head_dim, hc = kv->head_ctx;
    const size_t es = kv->elem_size, piece = (size_t)hd * es;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            const size_t row = (size_t)t * kv->kv_dim + (size_t)h * hd; /* element */
            char *vo = vc + cake_kv_v_index(hc, hd, h, pos0 + t, 0) * es;
            if (put)
                memcpy(vo, (const char *)v + row * es, piece);
            else
                memcpy((char *)v + row * es, vo, piece);
            for (int d = 0; d < hd; d++) {
                char *ko = kc + cake_kv_k_index(hc, hd, h, pos0 + t, d) * es;
                char *ro = (char *)k + (row + (size_t)d) * es;
                if (put)
                    memcpy(ko, ro, es);
                else
                    memcpy(ro, ko, es);
            }
        }
}

void cake_kv_put(const cake_kv_cache *kv, int layer, int pos0, int n, const void *k,
                 const void *v) {
#ifdef HAVE_KEYS_INTO_BLOCK
    /* f16 keys in whole tiles of 16 positions x 32 dims: transposed in
     * registers (a stored chunk installs at ~4x the rate of the scalar copy) */
    const int hd = kv->head_dim, hc = kv->head_ctx;
    if (kv->type == CAKE_KV_F16 && hd % 32 == 0) {
        int t = 0;
        while (t < n && (pos0 + t) % 16) t++;
        const int t_end = t + (n - t) / 16 * 16;
        kv_copy(kv, layer, pos0, t, (void *)k, (void *)v, 1); /* the ragged ends */
        kv_copy(kv, layer, pos0 + t_end, n - t_end, (char *)k + (size_t)t_end * kv->kv_dim * 2,
                (char *)v + (size_t)t_end * kv->kv_dim * 2, 1);
        char *vc = cake_kv_v(kv, layer);
        uint16_t *kc = cake_kv_k(kv, layer);
        const size_t piece = (size_t)hd * 2;
        for (int h = 0; h < kv->n_kv_heads; h++) {
            for (int tt = t; tt < t_end; tt++)
                memcpy(vc + cake_kv_v_index(hc, hd, h, pos0 + tt, 0) * 2,
                       (const char *)v + ((size_t)tt * kv->kv_dim + (size_t)h * hd) * 2, piece);
            for (int tt = t; tt < t_end; tt += 16)
                for (int d0 = 0; d0 < hd; d0 += 32)
                    keys_into_block(kc + cake_kv_k_index(hc, hd, h, pos0 + tt, d0),
                                    (const uint16_t *)k + (size_t)tt * kv->kv_dim + (size_t)h * hd +
                                        d0,
                                    (size_t)kv->kv_dim);
        }
        return;
    }
#endif
    kv_copy(kv, layer, pos0, n, (void *)k, (void *)v, 1);
}

void cake_kv_get(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v) {
    kv_copy(kv, layer, pos0, n, k, v, 0);
}
