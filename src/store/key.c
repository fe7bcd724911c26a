/* Chained chunk keys; see key.h for the scheme. */
#include "store/key.h"

#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

static void put_u32le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void key_from_hash(XXH128_hash_t h, cake_chunk_key *out) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out->b, c.digest, 16);
}

void cake_key_backend_fingerprint(const uint8_t model_fp[16], const char *tag, uint8_t out[16]) {
    uint8_t in[16 + 32];
    const size_t n = strnlen(tag, 32);
    memcpy(in, model_fp, 16);
    memcpy(in + 16, tag, n);
    cake_chunk_key k;
    key_from_hash(XXH3_128bits(in, 16 + n), &k);
    memcpy(out, k.b, 16);
}

void cake_key_salted_fingerprint(const uint8_t fp[16], const char *salt, uint8_t out[16]) {
    static const char tag[] = "cache_salt:";
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, fp, 16);
    XXH3_128bits_update(&st, tag, sizeof(tag) - 1);
    XXH3_128bits_update(&st, salt, strlen(salt));
    cake_chunk_key k;
    key_from_hash(XXH3_128bits_digest(&st), &k);
    memcpy(out, k.b, 16);
}

void cake_key_root(const uint8_t fingerprint[16], uint32_t chunk_size, uint32_t kv_dtype,
                   cake_chunk_key *out) {
    uint8_t in[28];
    memcpy(in, fingerprint, 16);
    put_u32le(in + 16, chunk_size);
    put_u32le(in + 20, kv_dtype);
    put_u32le(in + 24, CAKE_CHUNK_FORMAT_VERSION);
    key_from_hash(XXH3_128bits(in, sizeof(in)), out);
}

void cake_key_next(const cake_chunk_key *prev, const cake_token *tokens, size_t n,
                   cake_chunk_key *out) {
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, prev->b, 16);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* int32 LE is the in-memory form here: hash the array as it is. */
    XXH3_128bits_update(&st, tokens, n * sizeof(cake_token));
#else
    uint8_t buf[1024];
    for (size_t i = 0; i < n;) {
        size_t m = 0;
        for (; i < n && m + 4 <= sizeof(buf); i++, m += 4) put_u32le(buf + m, (uint32_t)tokens[i]);
        XXH3_128bits_update(&st, buf, m);
    }
#endif
    key_from_hash(XXH3_128bits_digest(&st), out);
}

size_t cake_key_chain(const uint8_t fingerprint[16], uint32_t chunk_size, uint32_t kv_dtype,
                      const cake_token *tokens, size_t n_tokens, cake_chunk_key *keys) {
    if (chunk_size == 0) return 0;
    size_t n_chunks = n_tokens / chunk_size;
    if (!keys) return n_chunks;
    cake_chunk_key k;
    cake_key_root(fingerprint, chunk_size, kv_dtype, &k);
    for (size_t i = 0; i < n_chunks; i++) {
        cake_key_next(&k, tokens + i * chunk_size, chunk_size, &k);
        keys[i] = k;
    }
    return n_chunks;
}

char *cake_hex16(const uint8_t b[16], char out[33]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[32] = '\0';
    return out;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int cake_parse_hex16(const char *hex, uint8_t out[16]) {
    uint8_t b[16];
    for (int i = 0; i < 16; i++) {
        int hi = hexval(hex[2 * i]), lo = hi < 0 ? -1 : hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        b[i] = (uint8_t)(hi << 4 | lo);
    }
    if (hex[32] != '\0') return -1;
    memcpy(out, b, 16);
    return 0;
}

char *cake_key_hex(const cake_chunk_key *k, char out[33]) {
    return cake_hex16(k->b, out);
}

int cake_key_parse(const char *hex, cake_chunk_key *out) {
    return cake_parse_hex16(hex, out->b);
}

int cake_key_equal(const cake_chunk_key *a, const cake_chunk_key *b) {
    return memcmp(a->b, b->b, 16) == 0;
}
