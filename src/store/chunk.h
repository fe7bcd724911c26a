/* The chunk blob: what the store keeps for one chunk of one prompt.
 *
 * A blob is a 128-byte header followed by the payload. The header is
 * little-endian and serialized field by field (never a struct memcpy):
 *
 *     off size field
 *       0    8 magic "CAKEKVCH"
 *       8    4 format version (CAKE_CHUNK_FORMAT_VERSION)
 *      12    4 header size (128)
 *      16   16 model fingerprint
 *      32   16 key (canonical XXH3-128, see key.h)
 *      48    4 chunk index
 *      52    4 token count
 *      56    4 layer count
 *      60    4 KV heads
 *      64    4 head dim
 *      68    4 dtype (0 = f16, 1 = f32, 2 = q8_0: enum cake_kv_type)
 *      72    8 payload length in bytes
 *      80    8 XXH3-64 of the payload
 *      88    8 creation time (unix seconds; informational, for `cake store ls`)
 *      96   24 reserved, zero
 *     120    8 XXH3-64 of header bytes [0, 120)
 *
 * The header checksum makes a flip in any header byte detectable, including
 * the fields that are not compared against an expectation.
 *
 * Payload, for layer l = 0 .. n_layers-1: the K rows of the chunk's positions
 * (n_tokens x kv_dim elements, kv_dim = n_kv_heads * head_dim, position-major),
 * then the V rows (q8_0: each row kv_dim / 32 blocks of an f16 scale and 32
 * int8, ggml's block_q8_0). Loading is a copy, not a transform: the CUDA cache is
 * position-major and takes each run as it is; the CPU cache keeps each head's
 * positions together (kv_cache.h), so each row's head pieces go to their runs. Elements are stored
 * in the host's byte order, which must be little-endian (x86-64, aarch64).
 *
 * Every load verifies everything before the first byte reaches the cache; a
 * failed check is reported with the field that failed, and the cache is left
 * untouched. */
#ifndef CAKE_STORE_CHUNK_H
#define CAKE_STORE_CHUNK_H

#include <stddef.h>
#include <stdint.h>

#include "kv/kv_cache.h"
#include "store/key.h"

#define CAKE_CHUNK_HEADER_SIZE 128
#define CAKE_CHUNK_MAGIC       "CAKEKVCH"

typedef struct {
    uint8_t fingerprint[16]; /* model fingerprint */
    cake_chunk_key key;
    uint32_t index;    /* chunk number within its prompt, 0-based */
    uint32_t n_tokens; /* tokens in the chunk (the store's chunk size) */
    uint32_t n_layers;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t dtype;        /* enum cake_kv_type */
    uint64_t payload_len;  /* set by encode/seal */
    uint64_t payload_hash; /* set by encode/seal */
    uint64_t created;      /* unix seconds; encode/seal: 0 = now */
} cake_chunk_header;

/* The header every chunk of a model must have (for cake_chunk_encode and as
 * the expectation of a load): fingerprint, key, index, n_tokens from the
 * arguments; layers, KV heads and head dim from hp; dtype = kv_type. */
cake_chunk_header cake_chunk_header_for(const uint8_t fingerprint[16], const cake_chunk_key *key,
                                        uint32_t index, uint32_t n_tokens, const cake_hparams *hp,
                                        enum cake_kv_type kv_type);

/* Bytes of the payload for a shape, or 0 when the shape is invalid (a zero
 * field, an unknown dtype, or a size that does not fit in 2^48). */
uint64_t cake_chunk_payload_size(uint32_t n_tokens, uint32_t n_layers, uint32_t n_kv_heads,
                                 uint32_t head_dim, uint32_t dtype);
/* CAKE_CHUNK_HEADER_SIZE + payload size of h's shape; 0 when invalid. */
size_t cake_chunk_blob_size(const cake_chunk_header *h);

/* Copies positions [pos0, pos0 + h->n_tokens) of every layer of kv into a blob
 * at out (cap bytes, at least cake_chunk_blob_size(h)). h gives fingerprint,
 * key, index, n_tokens, n_kv_heads, head_dim; n_layers and dtype must match
 * kv. Sets h->payload_len, h->payload_hash and h->created (when 0). */
int cake_chunk_encode(cake_chunk_header *h, const cake_kv_cache *kv, int pos0, void *out,
                      size_t cap, char *err, size_t errlen);

/* For a blob whose payload (blob + 128, payload size of h's shape) is already
 * written: computes the payload checksum and writes the header. */
int cake_chunk_seal(cake_chunk_header *h, void *blob, char *err, size_t errlen);

/* Reads and checks the header alone: length, magic, version, header size,
 * header checksum, reserved bytes. Does not look at the payload. */
int cake_chunk_parse_header(const void *blob, size_t len, cake_chunk_header *out, char *err,
                            size_t errlen);

/* Full validation of a blob of len bytes: the header as above, then (when
 * expect is not NULL) fingerprint, key, index, token count, layers, KV heads,
 * head dim and dtype against expect, then the payload length against the
 * shape and against len, then the payload checksum. out (may be NULL) gets the
 * parsed header. 0 when valid; -1 with the failed check in err. */
int cake_chunk_verify(const void *blob, size_t len, const cake_chunk_header *expect,
                      cake_chunk_header *out, char *err, size_t errlen);

/* The payload checksum of a blob fed in pieces, in order, while the rest of
 * the blob is still being read (the file store does this for big blobs). */
typedef struct {
    _Alignas(64) unsigned char state[640]; /* the hash state (XXH3) */
    size_t fed;                            /* blob bytes [0, fed) are in */
} cake_payload_hash;

void cake_payload_hash_init(cake_payload_hash *h);

/* Feeds blob bytes [from, to); from must be h->fed (anything else is
 * ignored, and the verification then hashes those bytes itself). The
 * header's bytes are skipped: the checksum covers the payload. */
void cake_payload_hash_feed(cake_payload_hash *h, const void *blob, size_t from, size_t to);

/* cake_chunk_verify, taking the bytes that h was fed as already hashed (h
 * may be NULL: plain cake_chunk_verify). */
int cake_chunk_verify_fed(const void *blob, size_t len, const cake_chunk_header *expect,
                          cake_payload_hash *h, cake_chunk_header *out, char *err, size_t errlen);

/* cake_chunk_verify against expect, then a check that the chunk fits kv at
 * pos0 (layers, kv_dim, dtype, positions), and only then the copy. On failure
 * kv is untouched. */
int cake_chunk_decode_into(const void *blob, size_t len, const cake_chunk_header *expect,
                           cake_kv_cache *kv, int pos0, char *err, size_t errlen);

/* The copy step alone, for a blob that cake_chunk_verify already accepted and
 * whose shape matches kv (checked again here, cheaply; the checksum is not
 * recomputed). -1 with err when the shape does not fit. */
int cake_chunk_copy_into(const void *blob, const cake_chunk_header *h, cake_kv_cache *kv, int pos0,
                         char *err, size_t errlen);

#endif
