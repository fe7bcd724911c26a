/* Chunk keys: the chained XXH3-128 scheme of DESIGN.md section 3.
 *
 *     k_{-1} = H(model fingerprint (16 bytes) || chunk size (u32 LE)
 *                || KV dtype (u32 LE) || format version (u32 LE))
 *     k_i    = H(k_{i-1} (16 bytes) || token ids of chunk i (int32 LE each))
 *
 * with H = XXH3-128 (seed 0) and every k stored in XXH3's canonical big-endian
 * byte order (XXH128_canonicalFromHash), which is also the order of the 32-char
 * hex form. Nothing else goes into a key (no seed, no pointer, no time), so the
 * same tokens give the same keys in any process on any machine, and a change in
 * chunk i changes the keys of chunk i and of every chunk after it. Because k_i
 * chains the whole prefix, chunk i can be looked up on its own even when an
 * earlier chunk was evicted. */
#ifndef CAKE_STORE_KEY_H
#define CAKE_STORE_KEY_H

#include <stddef.h>
#include <stdint.h>

#include "cake.h"

/* Version of the chunk format (header layout + payload layout). It is part of
 * k_{-1}, so chunks of another format never even match a key. */
#define CAKE_CHUNK_FORMAT_VERSION 1u

typedef struct {
    uint8_t b[16]; /* canonical (big-endian) XXH3-128 */
} cake_chunk_key;

/* The fingerprint a backend's chunks carry in place of the model's: H(model
 * fingerprint (16 bytes) || tag), tag naming the backend ("cuda"). The CPU
 * backend uses the model's own. Another backend's KV is not the CPU's bits
 * (f16 weights on tensor cores, unquantized activations), and the loader
 * promises the same bits whichever way KV arrives; so a store shared by CPU
 * and GPU servers keeps their chunks apart. */
void cake_key_backend_fingerprint(const uint8_t model_fp[16], const char *tag, uint8_t out[16]);

/* The fingerprint the chunks of requests with a cache salt (vLLM's
 * `cache_salt`: a tenant's or a user's) carry in place of fp: H(fp ||
 * "cache_salt:" || salt). Their keys and headers are their own, so a store
 * shared by tenants never hands one's KV to another, nor tells by a fast
 * first token that another sent a prompt. */
void cake_key_salted_fingerprint(const uint8_t fp[16], const char *salt, uint8_t out[16]);

/* k_{-1} of a model + chunk size + KV dtype (enum cake_kv_type numbering). */
void cake_key_root(const uint8_t fingerprint[16], uint32_t chunk_size, uint32_t kv_dtype,
                   cake_chunk_key *out);
/* k_i from k_{i-1} and the n token ids of chunk i. */
void cake_key_next(const cake_chunk_key *prev, const cake_token *tokens, size_t n,
                   cake_chunk_key *out);
/* The keys of every full chunk of a prompt: keys[i] for i in [0, n_tokens / chunk_size).
 * Returns the number of keys written (the partial tail has no key). keys may be
 * NULL to only count. chunk_size must be > 0 (returns 0 otherwise). */
size_t cake_key_chain(const uint8_t fingerprint[16], uint32_t chunk_size, uint32_t kv_dtype,
                      const cake_token *tokens, size_t n_tokens, cake_chunk_key *keys);

/* 32 lowercase hex chars + NUL. Returns out. */
char *cake_key_hex(const cake_chunk_key *k, char out[33]);
/* Parses exactly 32 hex chars (either case). 0 ok, -1 otherwise. */
int cake_key_parse(const char *hex, cake_chunk_key *out);
int cake_key_equal(const cake_chunk_key *a, const cake_chunk_key *b);

/* Same hex form for any 16 bytes (fingerprints). */
char *cake_hex16(const uint8_t b[16], char out[33]);
int cake_parse_hex16(const char *hex, uint8_t out[16]);

#endif
