/* Chunk blob encode / verify / decode; the layout is described in chunk.h. */
#include "store/chunk.h"

#include <inttypes.h>
#include <string.h>
#include <time.h>

#include "util/err.h"

/* Inlined so the payload checksum is compiled for the build's CPU (AVX2 /
 * AVX-512 with CAKE_NATIVE): it runs on every load, at memory speed. */
#define XXH_INLINE_ALL
#include <xxhash.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the chunk payload is the host's KV cache bytes, defined as little-endian"
#endif

enum {
    OFF_MAGIC = 0,
    OFF_VERSION = 8,
    OFF_HSIZE = 12,
    OFF_FP = 16,
    OFF_KEY = 32,
    OFF_INDEX = 48,
    OFF_TOKENS = 52,
    OFF_LAYERS = 56,
    OFF_HEADS = 60,
    OFF_HEADDIM = 64,
    OFF_DTYPE = 68,
    OFF_PLEN = 72,
    OFF_PHASH = 80,
    OFF_CREATED = 88,
    OFF_RESERVED = 96,
    OFF_HHASH = 120,
};

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) {
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

cake_chunk_header cake_chunk_header_for(const uint8_t fingerprint[16], const cake_chunk_key *key,
                                        uint32_t index, uint32_t n_tokens, const cake_hparams *hp,
                                        enum cake_kv_type kv_type) {
    cake_chunk_header h;
    memset(&h, 0, sizeof(h));
    memcpy(h.fingerprint, fingerprint, 16);
    h.key = *key;
    h.index = index;
    h.n_tokens = n_tokens;
    h.n_layers = (uint32_t)hp->n_layers;
    h.n_kv_heads = (uint32_t)hp->n_kv_heads;
    h.head_dim = (uint32_t)hp->head_dim;
    h.dtype = (uint32_t)kv_type;
    return h;
}

uint64_t cake_chunk_payload_size(uint32_t n_tokens, uint32_t n_layers, uint32_t n_kv_heads,
                                 uint32_t head_dim, uint32_t dtype) {
    const uint64_t kv_dim = (uint64_t)n_kv_heads * head_dim;
    if (!n_tokens || !n_layers || !kv_dim || kv_dim > (1u << 30) || dtype > CAKE_KV_Q4_0) return 0;
    /* K and V rows of every token and layer */
    uint64_t n = cake_kv_row_bytes((enum cake_kv_type)dtype, (int)head_dim, (int)kv_dim),
             f[3] = {2, n_tokens, n_layers};
    if (!n) return 0;
    for (int i = 0; i < 3; i++)
        if (__builtin_mul_overflow(n, f[i], &n) || n >= (1ull << 48)) return 0;
    return n;
}

size_t cake_chunk_blob_size(const cake_chunk_header *h) {
    uint64_t p =
        cake_chunk_payload_size(h->n_tokens, h->n_layers, h->n_kv_heads, h->head_dim, h->dtype);
    return p ? (size_t)(CAKE_CHUNK_HEADER_SIZE + p) : 0;
}

static void write_header(const cake_chunk_header *h, uint8_t *p) {
    memset(p, 0, CAKE_CHUNK_HEADER_SIZE);
    memcpy(p + OFF_MAGIC, CAKE_CHUNK_MAGIC, 8);
    put32(p + OFF_VERSION, CAKE_CHUNK_FORMAT_VERSION);
    put32(p + OFF_HSIZE, CAKE_CHUNK_HEADER_SIZE);
    memcpy(p + OFF_FP, h->fingerprint, 16);
    memcpy(p + OFF_KEY, h->key.b, 16);
    put32(p + OFF_INDEX, h->index);
    put32(p + OFF_TOKENS, h->n_tokens);
    put32(p + OFF_LAYERS, h->n_layers);
    put32(p + OFF_HEADS, h->n_kv_heads);
    put32(p + OFF_HEADDIM, h->head_dim);
    put32(p + OFF_DTYPE, h->dtype);
    put64(p + OFF_PLEN, h->payload_len);
    put64(p + OFF_PHASH, h->payload_hash);
    put64(p + OFF_CREATED, h->created);
    put64(p + OFF_HHASH, XXH3_64bits(p, OFF_HHASH));
}

/* "chunk 3 (key 3f2a...)" for messages. */
static const char *chunk_name(const cake_chunk_header *h, char *buf, size_t n) {
    char hex[33];
    snprintf(buf, n, "chunk %" PRIu32 " (key %s)", h->index, cake_key_hex(&h->key, hex));
    return buf;
}

static int check_kv_fit(const cake_chunk_header *h, const cake_kv_cache *kv, int pos0,
                        const char *what, char *err, size_t errlen) {
    char name[80];
    if (!kv || !kv->base)
        return cake_err(err, errlen, "%s: no KV cache", chunk_name(h, name, sizeof(name)));
    if (h->n_layers != (uint32_t)kv->n_layers)
        return cake_err(err, errlen, "%s: %s %" PRIu32 " layers, KV cache has %d",
                        chunk_name(h, name, sizeof(name)), what, h->n_layers, kv->n_layers);
    if (h->n_kv_heads != (uint32_t)kv->n_kv_heads || h->head_dim != (uint32_t)kv->head_dim)
        return cake_err(err, errlen,
                        "%s: %s %" PRIu32 " KV heads x %" PRIu32 " head dim, KV cache "
                        "has %d x %d",
                        chunk_name(h, name, sizeof(name)), what, h->n_kv_heads, h->head_dim,
                        kv->n_kv_heads, kv->head_dim);
    if (h->dtype != (uint32_t)kv->type)
        return cake_err(err, errlen, "%s: %s dtype %" PRIu32 ", KV cache has dtype %d",
                        chunk_name(h, name, sizeof(name)), what, h->dtype, (int)kv->type);
    if (pos0 < 0 || (uint64_t)pos0 + h->n_tokens > (uint64_t)kv->n_ctx)
        return cake_err(err, errlen, "%s: positions [%d, %" PRIu64 ") outside the KV cache (%d)",
                        chunk_name(h, name, sizeof(name)), pos0, (uint64_t)pos0 + h->n_tokens,
                        kv->n_ctx);
    return 0;
}

int cake_chunk_seal(cake_chunk_header *h, void *blob, char *err, size_t errlen) {
    uint64_t plen =
        cake_chunk_payload_size(h->n_tokens, h->n_layers, h->n_kv_heads, h->head_dim, h->dtype);
    if (!plen) {
        char name[80];
        return cake_err(err, errlen,
                        "%s: invalid shape (%" PRIu32 " tokens, %" PRIu32 " layers, %" PRIu32
                        " KV heads, %" PRIu32 " head dim, dtype %" PRIu32 ")",
                        chunk_name(h, name, sizeof(name)), h->n_tokens, h->n_layers, h->n_kv_heads,
                        h->head_dim, h->dtype);
    }
    uint8_t *p = blob;
    h->payload_len = plen;
    h->payload_hash = XXH3_64bits(p + CAKE_CHUNK_HEADER_SIZE, (size_t)plen);
    if (!h->created) h->created = (uint64_t)time(NULL);
    write_header(h, p);
    return 0;
}

int cake_chunk_encode(cake_chunk_header *h, const cake_kv_cache *kv, int pos0, void *out,
                      size_t cap, char *err, size_t errlen) {
    size_t need = cake_chunk_blob_size(h);
    char name[80];
    if (!need) return cake_chunk_seal(h, out, err, errlen); /* reports the invalid shape */
    if (check_kv_fit(h, kv, pos0, "header says", err, errlen)) return -1;
    if (cap < need)
        return cake_err(err, errlen, "%s: blob needs %zu bytes, buffer has %zu",
                        chunk_name(h, name, sizeof(name)), need, cap);
    size_t run = (size_t)h->n_tokens * kv->row_bytes;
    uint8_t *p = (uint8_t *)out + CAKE_CHUNK_HEADER_SIZE;
    for (int l = 0; l < kv->n_layers; l++) {
        cake_kv_get(kv, l, pos0, (int)h->n_tokens, p, p + run);
        p += 2 * run;
    }
    return cake_chunk_seal(h, out, err, errlen);
}

int cake_chunk_parse_header(const void *blob, size_t len, cake_chunk_header *out, char *err,
                            size_t errlen) {
    const uint8_t *p = blob;
    if (len < CAKE_CHUNK_HEADER_SIZE)
        return cake_err(err, errlen, "chunk truncated: %zu bytes, shorter than the %d-byte header",
                        len, CAKE_CHUNK_HEADER_SIZE);
    if (memcmp(p + OFF_MAGIC, CAKE_CHUNK_MAGIC, 8) != 0)
        return cake_err(err, errlen, "not a chunk: bad magic");
    uint32_t v = get32(p + OFF_VERSION);
    if (v != CAKE_CHUNK_FORMAT_VERSION)
        return cake_err(err, errlen, "chunk format version %" PRIu32 ", expected %u", v,
                        CAKE_CHUNK_FORMAT_VERSION);
    uint32_t hs = get32(p + OFF_HSIZE);
    if (hs != CAKE_CHUNK_HEADER_SIZE)
        return cake_err(err, errlen, "chunk header size %" PRIu32 ", expected %d", hs,
                        CAKE_CHUNK_HEADER_SIZE);
    if (XXH3_64bits(p, OFF_HHASH) != get64(p + OFF_HHASH))
        return cake_err(err, errlen, "chunk header checksum mismatch");
    for (int i = OFF_RESERVED; i < OFF_HHASH; i++)
        if (p[i]) return cake_err(err, errlen, "chunk header reserved byte %d is not zero", i);
    cake_chunk_header h;
    memcpy(h.fingerprint, p + OFF_FP, 16);
    memcpy(h.key.b, p + OFF_KEY, 16);
    h.index = get32(p + OFF_INDEX);
    h.n_tokens = get32(p + OFF_TOKENS);
    h.n_layers = get32(p + OFF_LAYERS);
    h.n_kv_heads = get32(p + OFF_HEADS);
    h.head_dim = get32(p + OFF_HEADDIM);
    h.dtype = get32(p + OFF_DTYPE);
    h.payload_len = get64(p + OFF_PLEN);
    h.payload_hash = get64(p + OFF_PHASH);
    h.created = get64(p + OFF_CREATED);
    if (out) *out = h;
    return 0;
}

_Static_assert(sizeof(XXH3_state_t) <= sizeof(((cake_payload_hash *)0)->state) &&
                   _Alignof(XXH3_state_t) <= 64,
               "cake_payload_hash has no room for the XXH3 state");

void cake_payload_hash_init(cake_payload_hash *h) {
    XXH3_64bits_reset((XXH3_state_t *)h->state);
    h->fed = CAKE_CHUNK_HEADER_SIZE;
}

void cake_payload_hash_feed(cake_payload_hash *h, const void *blob, size_t from, size_t to) {
    if (from < CAKE_CHUNK_HEADER_SIZE) from = CAKE_CHUNK_HEADER_SIZE;
    if (from != h->fed || to <= from) return;
    XXH3_64bits_update((XXH3_state_t *)h->state, (const uint8_t *)blob + from, to - from);
    h->fed = to;
}

int cake_chunk_verify(const void *blob, size_t len, const cake_chunk_header *expect,
                      cake_chunk_header *out, char *err, size_t errlen) {
    return cake_chunk_verify_fed(blob, len, expect, NULL, out, err, errlen);
}

int cake_chunk_verify_fed(const void *blob, size_t len, const cake_chunk_header *expect,
                          cake_payload_hash *fed, cake_chunk_header *out, char *err,
                          size_t errlen) {
    cake_chunk_header h;
    char name[80], a[33], b[33];
    if (cake_chunk_parse_header(blob, len, &h, err, errlen)) {
        if (expect && err && errlen) { /* prefix which chunk it was meant to be */
            char tmp[256];
            snprintf(tmp, sizeof(tmp), "%s", err);
            snprintf(err, errlen, "%s: %s", chunk_name(expect, name, sizeof(name)), tmp);
        }
        return -1;
    }
    const cake_chunk_header *nm = expect ? expect : &h;
#define MISMATCH(field, fmt, got, want)                                                            \
    return cake_err(err, errlen, "%s: " field " mismatch: chunk has " fmt ", expected " fmt,       \
                    chunk_name(nm, name, sizeof(name)), got, want)
    if (expect) {
        if (memcmp(h.fingerprint, expect->fingerprint, 16))
            MISMATCH("model fingerprint (another model)", "%s", cake_hex16(h.fingerprint, a),
                     cake_hex16(expect->fingerprint, b));
        if (!cake_key_equal(&h.key, &expect->key))
            MISMATCH("key", "%s", cake_key_hex(&h.key, a), cake_key_hex(&expect->key, b));
        if (h.index != expect->index) MISMATCH("chunk index", "%" PRIu32, h.index, expect->index);
        if (h.n_tokens != expect->n_tokens)
            MISMATCH("token count (another chunk size)", "%" PRIu32, h.n_tokens, expect->n_tokens);
        if (h.n_layers != expect->n_layers)
            MISMATCH("layer count", "%" PRIu32, h.n_layers, expect->n_layers);
        if (h.n_kv_heads != expect->n_kv_heads)
            MISMATCH("KV head count", "%" PRIu32, h.n_kv_heads, expect->n_kv_heads);
        if (h.head_dim != expect->head_dim)
            MISMATCH("head dim", "%" PRIu32, h.head_dim, expect->head_dim);
        if (h.dtype != expect->dtype) MISMATCH("dtype", "%" PRIu32, h.dtype, expect->dtype);
    }
#undef MISMATCH
    uint64_t want =
        cake_chunk_payload_size(h.n_tokens, h.n_layers, h.n_kv_heads, h.head_dim, h.dtype);
    if (!want)
        return cake_err(err, errlen, "%s: invalid shape in header",
                        chunk_name(nm, name, sizeof(name)));
    if (h.payload_len != want)
        return cake_err(err, errlen,
                        "%s: payload length %" PRIu64 " does not match the shape (%" PRIu64
                        " bytes)",
                        chunk_name(nm, name, sizeof(name)), h.payload_len, want);
    if ((uint64_t)len - CAKE_CHUNK_HEADER_SIZE != want)
        return cake_err(err, errlen, "%s: %s: blob is %zu bytes, header says %" PRIu64,
                        chunk_name(nm, name, sizeof(name)),
                        (uint64_t)len - CAKE_CHUNK_HEADER_SIZE < want ? "truncated"
                                                                      : "trailing bytes",
                        len, want + CAKE_CHUNK_HEADER_SIZE);
    /* len is the header's size plus want here, so fed bytes are payload bytes. */
    uint64_t hash;
    if (fed) {
        cake_payload_hash_feed(fed, blob, fed->fed, len);
        hash = XXH3_64bits_digest((XXH3_state_t *)fed->state);
    } else {
        hash = XXH3_64bits((const uint8_t *)blob + CAKE_CHUNK_HEADER_SIZE, (size_t)want);
    }
    if (hash != h.payload_hash)
        return cake_err(err, errlen, "%s: payload checksum mismatch",
                        chunk_name(nm, name, sizeof(name)));
    if (out) *out = h;
    return 0;
}

int cake_chunk_copy_into(const void *blob, const cake_chunk_header *h, cake_kv_cache *kv, int pos0,
                         char *err, size_t errlen) {
    if (check_kv_fit(h, kv, pos0, "has", err, errlen)) return -1;
    size_t run = (size_t)h->n_tokens * kv->row_bytes;
    const uint8_t *p = (const uint8_t *)blob + CAKE_CHUNK_HEADER_SIZE;
    for (int l = 0; l < kv->n_layers; l++) {
        cake_kv_put(kv, l, pos0, (int)h->n_tokens, p, p + run);
        p += 2 * run;
    }
    return 0;
}

int cake_chunk_decode_into(const void *blob, size_t len, const cake_chunk_header *expect,
                           cake_kv_cache *kv, int pos0, char *err, size_t errlen) {
    cake_chunk_header h;
    if (cake_chunk_verify(blob, len, expect, &h, err, errlen)) return -1;
    return cake_chunk_copy_into(blob, &h, kv, pos0, err, errlen);
}
