/* See dequant.h. Each decoder turns one block into its floats; the blocks of
 * 256 keep scales for each 32 (Q4_K, Q5_K, IQ4_XS) or 16 (Q2_K, Q3_K, Q6_K)
 * values inside. */
#include "model/dequant.h"

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "model/gguf.h"
#include "util/f16.h"
#include "util/q8_0.h"

enum { QK = 32, QK_K = 256, MAX_BLOCK = QK_K };

static float f16_at(const uint8_t *p) {
    cake_f16 h;
    memcpy(&h, p, 2);
    return cake_f16_to_f32(h);
}

/* Q4_0: d, 16 bytes of nibbles; low nibbles are values 0..15, high 16..31. */
static void q4_0(const uint8_t *b, float *y) {
    const float d = f16_at(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (float)((qs[j] & 0xF) - 8) * d;
        y[j + QK / 2] = (float)((qs[j] >> 4) - 8) * d;
    }
}

/* Q4_1: d, m, nibbles; value = q d + m. */
static void q4_1(const uint8_t *b, float *y) {
    const float d = f16_at(b), m = f16_at(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (float)(qs[j] & 0xF) * d + m;
        y[j + QK / 2] = (float)(qs[j] >> 4) * d + m;
    }
}

/* Q5_0 and Q5_1: as Q4_0/Q4_1 with a fifth bit per value in a 32-bit qh
 * (bit j for value j). Q5_0 centres on 16, Q5_1 adds m. */
static void q5(const uint8_t *b, float *y, bool has_min) {
    const float d = f16_at(b), m = has_min ? f16_at(b + 2) : 0.0f;
    const uint8_t *p = b + (has_min ? 4 : 2);
    const uint32_t qh =
        (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    const uint8_t *qs = p + 4;
    for (int j = 0; j < QK / 2; j++) {
        const int lo = (qs[j] & 0xF) | (int)((qh >> j) << 4 & 0x10),
                  hi = (qs[j] >> 4) | (int)(qh >> (j + 12) & 0x10);
        if (has_min) {
            y[j] = (float)lo * d + m;
            y[j + QK / 2] = (float)hi * d + m;
        } else {
            y[j] = (float)(lo - 16) * d;
            y[j + QK / 2] = (float)(hi - 16) * d;
        }
    }
}

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block: 12
 * bytes hold 8 pairs, the first four whole in the low 6 bits of bytes 0..7,
 * the last four split between nibbles of bytes 8..11 and the top 2 bits of
 * bytes 0..7. */
static void k_scale_min(int j, const uint8_t *s, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4;
        *m = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* The 6-bit scale of sub-block j (0..7) of an IQ4_XS block b: its low
 * nibble in byte 4 + j / 2, its top two bits in the 16-bit word at b + 2. */
static int iq4_xs_scale(const uint8_t *b, int j) {
    const int scales_h = b[2] | b[3] << 8;
    return (b[4 + j / 2] >> (4 * (j % 2)) & 0xF) | (scales_h >> (2 * j) & 3) << 4;
}

/* Q3_K's 6-bit scale j (0..15) from its 12 bytes s: the low nibble in byte
 * j % 8 (j < 8: low, else high), bits 4, 5 from byte 8 + j % 4 (shifted by
 * 2 (j / 4)). */
static int q3_k_scale(const uint8_t *s, int j) {
    const int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4, hi = s[8 + j % 4] >> (2 * (j / 4)) & 3;
    return lo | hi << 4;
}

/* Q3_K's levels of sub-block j (values 32 j .. 32 j + 31): low 2 bits at
 * bit 2 (j % 4) of qs[32 (j / 4) + t], bit 2 at bit j of hmask[t] (the
 * layout q3_k below decodes); level 0..7 = value / scale + 4. */
static void q3_k_parts(const uint8_t *b, cake_kquant_parts *p) {
    const uint8_t *hm = b, *s = b + 96;
    memcpy(&p->d, b + 108, 2);
    p->dmin = 0;
    memset(p->m, 0, sizeof(p->m));
    for (int j = 0; j < 8; j++) {
        const uint8_t *qs = b + 32 + 32 * (j / 4);
        p->sc[j] = (int8_t)(q3_k_scale(s, 2 * j) - 32);
        p->sc_hi[j] = (int8_t)(q3_k_scale(s, 2 * j + 1) - 32);
#ifdef __AVX512F__
        __m128i lev[2]; /* levels t = 0..15, then 16..31 */
        for (int h = 0; h < 2; h++) {
            const __m128i low = _mm_and_si128(
                              _mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * h)),
                                            _mm_cvtsi32_si128(2 * (j % 4))),
                              _mm_set1_epi8(3)),
                          high = _mm_and_si128(
                              _mm_srl_epi16(_mm_loadu_si128((const __m128i *)(hm + 16 * h)),
                                            _mm_cvtsi32_si128(j)),
                              _mm_set1_epi8(1));
            lev[h] = _mm_or_si128(low, _mm_slli_epi16(high, 2)); /* < 8: no carries */
        }
        _mm_storeu_si128((__m128i *)p->pairs[j], _mm_or_si128(lev[0], _mm_slli_epi16(lev[1], 4)));
#else
        for (int t = 0; t < 16; t++) {
            const int lo = (qs[t] >> 2 * (j % 4) & 3) | (hm[t] >> j & 1) << 2,
                      hi = (qs[16 + t] >> 2 * (j % 4) & 3) | (hm[16 + t] >> j & 1) << 2;
            p->pairs[j][t] = (uint8_t)(lo | hi << 4);
        }
#endif
    }
}

/* Q6_K's levels of sub-block j (values 32 j .. 32 j + 31, the quarter k = j
 * % 4 of half h = j / 4): low 4 bits in the low (k < 2) or high nibbles of
 * ql[64 h + 32 (k % 2) + l], high 2 bits in bits 2k, 2k + 1 of qh[32 h + l]
 * (the layout q6_k below decodes). */
static void q6_k_parts(const uint8_t *b, cake_kquant_parts *p) {
    const int8_t *sc = (const int8_t *)(b + 192);
    memcpy(&p->d, b + 208, 2);
    p->dmin = 0;
    memset(p->m, 0, sizeof(p->m));
    memset(p->fifth, 0, sizeof(p->fifth));
    for (int j = 0; j < 8; j++) {
        const int h = j / 4, k = j % 4;
        const uint8_t *ql = b + 64 * h + 32 * (k % 2), *qh = b + 128 + 32 * h;
        p->sc[j] = sc[2 * j];
        p->sc_hi[j] = sc[2 * j + 1];
#ifdef __AVX512F__
        const __m256i low4 = _mm256_set1_epi8(0x0F),
                      nib =
                          _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)ql),
                                                            _mm_cvtsi32_si128(4 * (k / 2))),
                                           low4),
                      top =
                          _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qh),
                                                            _mm_cvtsi32_si128(2 * k)),
                                           _mm256_set1_epi8(3));
        /* nibbles < 16: shifting the 16-bit words by 4 carries nothing across bytes */
        _mm_storeu_si128((__m128i *)p->pairs[j],
                         _mm_or_si128(_mm256_castsi256_si128(nib),
                                      _mm_slli_epi16(_mm256_extracti128_si256(nib, 1), 4)));
        _mm256_storeu_si256((__m256i *)p->top2[j], top);
#else
        for (int t = 0; t < 32; t++) {
            const int nib = ql[t] >> 4 * (k / 2) & 0xF;
            if (t < 16)
                p->pairs[j][t] = (uint8_t)nib;
            else
                p->pairs[j][t - 16] |= (uint8_t)(nib << 4);
            p->top2[j][t] = (uint8_t)(qh[t] >> 2 * k & 3);
        }
#endif
    }
}

void cake_kquant_unpack(int type, const void *block, cake_kquant_parts *p) {
    const uint8_t *b = block;
    memset(p->d32, 0, sizeof(p->d32));
    if (type == CAKE_DTYPE_Q6_K) {
        q6_k_parts(b, p);
        return;
    }
    memset(p->fifth, 0, sizeof(p->fifth));
    memset(p->top2, 0, sizeof(p->top2));
    if (type == CAKE_DTYPE_Q3_K) {
        q3_k_parts(b, p);
        return;
    }
    if (type == CAKE_DTYPE_Q4_0 || type == CAKE_DTYPE_IQ4_NL) { /* 8 blocks: d, 16 pairs */
        p->d = p->dmin = 0;
        memset(p->sc, 0, sizeof(p->sc));
        memset(p->sc_hi, 0, sizeof(p->sc_hi));
        memset(p->m, 0, sizeof(p->m));
        for (int j = 0; j < 8; j++, b += 18) {
            memcpy(&p->d32[j], b, 2);
            memcpy(p->pairs[j], b + 2, 16);
        }
        return;
    }
    memcpy(&p->d, b, 2);
    if (type == CAKE_DTYPE_IQ4_XS) { /* its indices are already pairs (t, 16 + t) */
        p->dmin = cake_f32_to_f16(f16_at(b) * 128.0f); /* exact: a power of 2 */
        for (int j = 0; j < 8; j++)
            p->sc[j] = p->sc_hi[j] = p->m[j] = (int8_t)(iq4_xs_scale(b, j) - 32);
        memcpy(p->pairs, b + 8, 128);
        return;
    }
    const bool five = type == CAKE_DTYPE_Q5_K;
    const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
    memcpy(&p->dmin, b + 2, 2);
    for (int j = 0; j < 8; j++) {
        int s, mm;
        k_scale_min(j, b + 4, &s, &mm);
        p->sc[j] = p->sc_hi[j] = (int8_t)s;
        p->m[j] = (int8_t)mm;
    }
    /* 32 bytes hold sub-blocks 2c (low nibbles) and 2c + 1 (high), as in
     * qk_4_5 below */
    for (int c = 0; c < 4; c++, qs += 32)
        for (int t = 0; t < 16; t++) {
            p->pairs[2 * c][t] = (uint8_t)((qs[t] & 0xF) | (qs[16 + t] & 0xF) << 4);
            p->pairs[2 * c + 1][t] = (uint8_t)((qs[t] >> 4) | (qs[16 + t] & 0xF0));
        }
    if (!five) return;
#ifdef __AVX512F__
    /* bit j of byte l to bit l: shifted to the byte's top, then movemask */
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    for (int j = 0; j < 8; j++)
        p->fifth[j] = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(h, _mm_cvtsi32_si128(7 - j)));
#else
    for (int l = 0; l < 32; l++)
        for (int j = 0; j < 8; j++) p->fifth[j] |= (uint32_t)(qh[l] >> j & 1) << l;
#endif
}

#ifdef __AVX512F__
/* The k-quants and IQ4 decoded 16 values a step (loading a model requantizes
 * every matrix: llama-1b Q4_K_M, `cake run -n 1` on 2 cores, 2.0-2.4 s with
 * the scalar decoders, 0.95-0.97 s with these). The levels are put together
 * bytewise as unsigned q with an offset c, then y = s (q - c) - m in f32
 * lanes: the scalar lines' operations (no FMA; m = 0 where they have none,
 * which changes no value), so the same bits. */
static inline void lanes16(float *y, __m128i q, int c, float s, float m) {
    const __m512 v =
        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), _mm512_set1_epi32(c)));
    _mm512_storeu_ps(y, _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(s), v), _mm512_set1_ps(m)));
}

/* The bits `mask` picks at bit n of each byte of h (shifted down to bit 0),
 * and the same moved up to bit 4. */
static inline __m128i bits_at(__m128i h, int n, int mask) {
    return _mm_and_si128(_mm_srl_epi16(h, _mm_cvtsi32_si128(n)), _mm_set1_epi8((char)mask));
}

static inline __m128i high_bits(__m128i h, int n, int mask) {
    return _mm_slli_epi16(bits_at(h, n, mask), 4);
}

static inline __m128i nibbles(__m128i q, int high) {
    return _mm_and_si128(high ? _mm_srli_epi16(q, 4) : q, _mm_set1_epi8(0x0F));
}
#endif

/* Q4_K and Q5_K: d, dmin, 12 bytes of scales, (Q5_K: 32 bytes of fifth
 * bits), 128 bytes of nibbles. Each 64 values share 32 bytes of nibbles:
 * sub-block 2i the low ones, 2i + 1 the high ones; value = d sc q - dmin m. */
static void qk_4_5(const uint8_t *b, float *y, bool five, bool lanes) {
    (void)lanes; /* without AVX-512 every path is the portable one */
    const float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
    for (int i = 0; i < 4; i++, qs += 32, y += 64) {
        int sc, m;
        k_scale_min(2 * i, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        k_scale_min(2 * i + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
#ifdef __AVX512F__
        for (int k = 0; !lanes && k < 2; k++) {
            const __m128i q = _mm_loadu_si128((const __m128i *)(qs + 16 * k));
            __m128i lo = nibbles(q, 0), hi = nibbles(q, 1);
            if (five) {
                const __m128i h = _mm_loadu_si128((const __m128i *)(qh + 16 * k));
                lo = _mm_or_si128(lo, high_bits(h, 2 * i, 1));
                hi = _mm_or_si128(hi, high_bits(h, 2 * i + 1, 1));
            }
            lanes16(y + 16 * k, lo, 0, d1, m1);
            lanes16(y + 32 + 16 * k, hi, 0, d2, m2);
        }
        if (!lanes) continue;
#endif
        for (int l = 0; l < 32; l++) {
            const int h1 = five && (qh[l] >> (2 * i) & 1) ? 16 : 0,
                      h2 = five && (qh[l] >> (2 * i + 1) & 1) ? 16 : 0;
            y[l] = d1 * (float)((qs[l] & 0xF) + h1) - m1;
            y[l + 32] = d2 * (float)((qs[l] >> 4) + h2) - m2;
        }
    }
}

/* Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one
 * per 16 values), then d. Each half of 128 values takes 64 bytes of ql and 32
 * of qh: value l + 32 k (k = 0..3) has the low (k < 2) or high nibble of ql[l +
 * 32 (k % 2)] and bits 2k, 2k + 1 of qh[l]; value = d sc (q - 32). */
static void q6_k(const uint8_t *b, float *y, bool lanes) {
    (void)lanes; /* without AVX-512 every path is the portable one */
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = f16_at(b + 208);
    for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128) {
#ifdef __AVX512F__
        for (int k = 0; !lanes && k < 2; k++) { /* values 16 k .. 16 k + 15 of each quarter */
            const __m128i a = _mm_loadu_si128((const __m128i *)(ql + 16 * k)),
                          c = _mm_loadu_si128((const __m128i *)(ql + 32 + 16 * k)),
                          h = _mm_loadu_si128((const __m128i *)(qh + 16 * k));
            lanes16(y + 16 * k, _mm_or_si128(nibbles(a, 0), high_bits(h, 0, 3)), 32,
                    d * (float)sc[k], 0.0f);
            lanes16(y + 32 + 16 * k, _mm_or_si128(nibbles(c, 0), high_bits(h, 2, 3)), 32,
                    d * (float)sc[k + 2], 0.0f);
            lanes16(y + 64 + 16 * k, _mm_or_si128(nibbles(a, 1), high_bits(h, 4, 3)), 32,
                    d * (float)sc[k + 4], 0.0f);
            lanes16(y + 96 + 16 * k, _mm_or_si128(nibbles(c, 1), high_bits(h, 6, 3)), 32,
                    d * (float)sc[k + 6], 0.0f);
        }
        if (!lanes) continue;
#endif
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (qh[l] >> 0 & 3) << 4) - 32,
                      q2 = ((ql[l + 32] & 0xF) | (qh[l] >> 2 & 3) << 4) - 32,
                      q3 = ((ql[l] >> 4) | (qh[l] >> 4 & 3) << 4) - 32,
                      q4 = ((ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
    }
}

/* Q2_K: 16 scale bytes (low nibble the scale, high the min, per 16 values),
 * 64 bytes of 2-bit levels, d, dmin. Value v: level (qs[32 (v / 128) + v %
 * 32] >> 2 (v / 32 % 4)) & 3, scale byte v / 16; value = d sc q - dmin m. */
static void q2_k(const uint8_t *b, float *y, bool lanes) {
    (void)lanes; /* without AVX-512 every path is the portable one */
    const uint8_t *scales = b, *qs = b + 16;
    const float d = f16_at(b + 80), dmin = f16_at(b + 82);
    for (int v = 0; v < QK_K; v += 16) {
        const int sc = scales[v / 16];
        const float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
        const uint8_t *q = qs + 32 * (v / 128) + v % 32;
        const int shift = 2 * (v / 32 % 4);
#ifdef __AVX512F__
        if (!lanes) {
            lanes16(y + v, bits_at(_mm_loadu_si128((const __m128i *)q), shift, 3), 0, dl, ml);
            continue;
        }
#endif
        for (int l = 0; l < 16; l++) y[v + l] = dl * (float)(q[l] >> shift & 3) - ml;
    }
}

/* Q3_K: 32 bytes of high bits (hmask), 64 of 2-bit levels, 12 of 6-bit
 * scales, d. Value v: low bits as Q2_K's, high bit v / 32 of hmask[v % 32]
 * (clear: the level drops by 4); scale j = v / 16 has its low nibble in byte
 * j % 8 (j < 8: low, else high) and bits 4, 5 from byte 8 + j % 4 (shifted
 * by 2 (j / 4)); value = d (scale - 32) q. */
static void q3_k(const uint8_t *b, float *y, bool lanes) {
    (void)lanes; /* without AVX-512 every path is the portable one */
    const uint8_t *hm = b, *qs = b + 32, *s = b + 96;
    const float d = f16_at(b + 108);
    for (int v = 0; v < QK_K; v += 16) {
        const float dl = d * (float)(q3_k_scale(s, v / 16) - 32);
        const uint8_t *q = qs + 32 * (v / 128) + v % 32, *h = hm + v % 32;
        const int shift = 2 * (v / 32 % 4), bit = v / 32;
#ifdef __AVX512F__
        if (!lanes) { /* level + 4 = low bits + 4 high bit, in 0..7 */
            const __m128i low = bits_at(_mm_loadu_si128((const __m128i *)q), shift, 3),
                          high = bits_at(_mm_loadu_si128((const __m128i *)h), bit, 1);
            lanes16(y + v, _mm_or_si128(low, _mm_slli_epi16(high, 2)), 4, dl, 0.0f);
            continue;
        }
#endif
        for (int l = 0; l < 16; l++)
            y[v + l] = dl * (float)((q[l] >> shift & 3) - (h[l] >> bit & 1 ? 0 : 4));
    }
}

/* IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-uniform table (ggml's
 * kvalues_iq4nl), packed as Q4_0's nibbles. IQ4_NL: d, 16 bytes per 32
 * values. IQ4_XS: d, 16 bits of high scale pairs, 4 bytes of low scale
 * nibbles, 128 bytes of indices; sub-block i of 32 has scale (low nibble i
 * | high pair i << 4) - 32. Value = d scale table[index]. */
const int8_t cake_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1,    13,   25,  38,  53,  69,  89,  113};

static void iq4_32(const uint8_t *qs, float dl, float *y, bool lanes) {
    (void)lanes; /* without AVX-512 every path is the portable one */
#ifdef __AVX512F__
    if (!lanes) { /* the table + 128 (its sign bits flipped) as bytes, looked up 16 at a time */
        const __m128i table = _mm_xor_si128(_mm_loadu_si128((const __m128i *)cake_iq4_values),
                                            _mm_set1_epi8((char)0x80));
        const __m128i q = _mm_loadu_si128((const __m128i *)qs);
        lanes16(y, _mm_shuffle_epi8(table, nibbles(q, 0)), 128, dl, 0.0f);
        lanes16(y + 16, _mm_shuffle_epi8(table, nibbles(q, 1)), 128, dl, 0.0f);
        return;
    }
#endif
    for (int j = 0; j < 16; j++) {
        y[j] = dl * (float)cake_iq4_values[qs[j] & 0xF];
        y[j + 16] = dl * (float)cake_iq4_values[qs[j] >> 4];
    }
}

static void iq4_xs(const uint8_t *b, float *y, bool lanes) {
    const float d = f16_at(b);
    for (int i = 0; i < 8; i++)
        iq4_32(b + 8 + 16 * i, d * (float)(iq4_xs_scale(b, i) - 32), y + 32 * i, lanes);
}

static void decode_block(int type, const uint8_t *b, float *y, bool lanes) {
    switch (type) {
    case CAKE_DTYPE_Q4_0:
        q4_0(b, y);
        break;
    case CAKE_DTYPE_Q4_1:
        q4_1(b, y);
        break;
    case CAKE_DTYPE_Q5_0:
        q5(b, y, false);
        break;
    case CAKE_DTYPE_Q5_1:
        q5(b, y, true);
        break;
    case CAKE_DTYPE_Q8_0:
        cake_q8_0_to_f32(b, 0, y, QK);
        break;
    case CAKE_DTYPE_Q4_K:
        qk_4_5(b, y, false, lanes);
        break;
    case CAKE_DTYPE_Q5_K:
        qk_4_5(b, y, true, lanes);
        break;
    case CAKE_DTYPE_Q6_K:
        q6_k(b, y, lanes);
        break;
    case CAKE_DTYPE_Q2_K:
        q2_k(b, y, lanes);
        break;
    case CAKE_DTYPE_Q3_K:
        q3_k(b, y, lanes);
        break;
    case CAKE_DTYPE_IQ4_NL:
        iq4_32(b + 2, f16_at(b), y, lanes);
        break;
    case CAKE_DTYPE_IQ4_XS:
        iq4_xs(b, y, lanes);
        break;
    default:
        memset(y, 0, MAX_BLOCK * sizeof(float));
        break; /* callers check first */
    }
}

bool cake_dequant_supported(int type) {
    switch (type) {
    case CAKE_DTYPE_Q4_0:
    case CAKE_DTYPE_Q4_1:
    case CAKE_DTYPE_Q5_0:
    case CAKE_DTYPE_Q5_1:
    case CAKE_DTYPE_Q8_0:
    case CAKE_DTYPE_IQ4_NL:
    case CAKE_DTYPE_Q2_K:
    case CAKE_DTYPE_Q3_K:
    case CAKE_DTYPE_Q4_K:
    case CAKE_DTYPE_Q5_K:
    case CAKE_DTYPE_Q6_K:
    case CAKE_DTYPE_IQ4_XS:
        return true;
    default:
        return false;
    }
}

/* The sizes are the GGUF reader's (ggml's layouts). */
size_t cake_dequant_block_bytes(int type) {
    return cake_dequant_supported(type) ? cake_dtype_block_bytes((uint32_t)type) : 0;
}

size_t cake_dequant_block_elems(int type) {
    return cake_dequant_supported(type) ? cake_dtype_block_elems((uint32_t)type) : 0;
}

static void decode_range(int type, const void *src, size_t first, float *dst, size_t n,
                         bool lanes) {
    const size_t be = cake_dequant_block_elems(type), bb = cake_dequant_block_bytes(type);
    float block[MAX_BLOCK];
    for (size_t i = 0; i < n;) {
        const size_t e = first + i, j0 = e % be, take = be - j0 < n - i ? be - j0 : n - i;
        const uint8_t *b = (const uint8_t *)src + e / be * bb;
        if (j0 == 0 && take == be) {
            decode_block(type, b, dst + i, lanes); /* whole blocks straight into dst */
        } else {
            decode_block(type, b, block, lanes);
            memcpy(dst + i, block + j0, take * sizeof(float));
        }
        i += take;
    }
}

void cake_dequant_to_f32(int type, const void *src, size_t first, float *dst, size_t n) {
    decode_range(type, src, first, dst, n, false);
}

void cake_dequant_to_f32_lanes(int type, const void *src, size_t first, float *dst, size_t n) {
    decode_range(type, src, first, dst, n, true);
}
