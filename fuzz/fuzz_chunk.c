/* libFuzzer target for the chunk blob (see fuzz/README.md): what a store
 * hands back, which may be cut short, corrupt, or a chunk of another shape.
 *
 * The first input byte sets how the blob is checked; the rest is the blob.
 * With bit 0 set, the target first writes correct checksums into the blob
 * (header, and payload over the bytes after the header, unless bit 5 is set
 * too), so that the checks behind them are reached. Bit 1 checks against the expected header of
 * the cache's shape (else against none), bits 2-3 pick where in the cache
 * the chunk goes (the last choice runs past its end), bit 4 picks an f32
 * cache, bit 6 a q8_0 one and bit 7 a q4_0 one, with head_dim 32 (else f16).
 *
 * Each blob must be accepted or refused with a message; a refused blob must
 * leave the cache as it was, an accepted one must land there exactly (read
 * back with cake_kv_get); the checksum fed in pieces (as the file store feeds
 * it while it reads) must give the same verdict as the checksum in one go. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "store/chunk.h"
#include "fuzz_check.h"

enum { N_LAYERS = 2, N_KV_HEADS = 2, N_CTX = 16, CHUNK_TOKENS = 4 };

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const unsigned mode = data[0];
    const size_t len = size - 1;
    /* an exact-size copy, so that ASan sees any read past the blob */
    uint8_t *blob = malloc(len ? len : 1);
    CHECK(blob);
    memcpy(blob, data + 1, len);
    if (mode & 1 && len >= CAKE_CHUNK_HEADER_SIZE) {
        if (!(mode & 0x20))
            put64(blob + 80,
                  XXH3_64bits(blob + CAKE_CHUNK_HEADER_SIZE, len - CAKE_CHUNK_HEADER_SIZE));
        put64(blob + 120, XXH3_64bits(blob, 120));
    }
    const enum cake_kv_type type = mode & 0x80   ? CAKE_KV_Q4_0
                                   : mode & 0x40 ? CAKE_KV_Q8_0
                                   : mode & 0x10 ? CAKE_KV_F32
                                                 : CAKE_KV_F16;
    const int head_dim = cake_kv_quantized(type) ? 32 : 8;
    static const int k_pos0[] = {0, CHUNK_TOKENS, N_CTX - CHUNK_TOKENS, N_CTX - 1};
    const int pos0 = k_pos0[(mode >> 2) & 3];

    cake_kv_cache kv;
    char err[512];
    CHECK(cake_kv_cache_init(&kv, N_LAYERS, N_CTX, N_KV_HEADS, head_dim, type, err, sizeof(err)) ==
          0);
    const size_t cache_bytes = (size_t)N_LAYERS * 2 * kv.layer_bytes;
    for (size_t i = 0; i < cache_bytes; i++) ((uint8_t *)kv.base)[i] = (uint8_t)(i * 7 + 1);
    uint8_t *before = malloc(cache_bytes);
    CHECK(before);
    memcpy(before, kv.base, cache_bytes);

    const cake_hparams hp = {.n_layers = N_LAYERS, .n_kv_heads = N_KV_HEADS, .head_dim = head_dim};
    uint8_t fingerprint[16] = {0};
    cake_chunk_key key;
    memset(&key, 0, sizeof(key));
    cake_chunk_header expect = cake_chunk_header_for(fingerprint, &key, 0, CHUNK_TOKENS, &hp, type);
    /* the expectation takes the blob's identity fields, so that a blob from
     * the fuzzer can meet it: only the shape is held against the cache */
    cake_chunk_header parsed;
    if (cake_chunk_parse_header(blob, len, &parsed, NULL, 0) == 0) {
        memcpy(expect.fingerprint, parsed.fingerprint, 16);
        expect.key = parsed.key;
        expect.index = parsed.index;
    }
    const cake_chunk_header *exp = mode & 2 ? &expect : NULL;

    /* the verdict in one go, and fed in pieces of sizes from the blob */
    cake_chunk_header h;
    err[0] = '\0';
    const int whole = cake_chunk_verify(blob, len, exp, &h, err, sizeof(err));
    CHECK(whole == 0 || (whole == -1 && err[0]));
    cake_payload_hash fed;
    cake_payload_hash_init(&fed);
    for (size_t at = 0, step; at < len; at += step) {
        step = 1 + (size_t)blob[at] * 97;
        /* now and then a piece is left out: the bytes from there on are then
         * hashed by the verification itself */
        if (blob[at] % 5) cake_payload_hash_feed(&fed, blob, at, at + step < len ? at + step : len);
    }
    CHECK(cake_chunk_verify_fed(blob, len, exp, &fed, NULL, err, sizeof(err)) == whole);
    if (whole == 0) {
        CHECK(h.payload_len == len - CAKE_CHUNK_HEADER_SIZE);
        CHECK(cake_chunk_blob_size(&h) == len);
    }

    /* into the cache: all of it, or nothing */
    err[0] = '\0';
    const int rc = cake_chunk_decode_into(blob, len, exp, &kv, pos0, err, sizeof(err));
    if (getenv("CAKE_FUZZ_VERBOSE")) /* say what each input did */
        fprintf(stderr, "%s%s\n", rc ? "refused: " : "accepted", rc ? err : "");
    if (rc != 0) {
        CHECK(rc == -1 && err[0]);
        CHECK(memcmp(before, kv.base, cache_bytes) == 0);
    } else {
        CHECK(whole == 0);
        const size_t run = (size_t)h.n_tokens * kv.row_bytes;
        uint8_t *k = malloc(run), *v = malloc(run);
        CHECK(k && v);
        const uint8_t *p = blob + CAKE_CHUNK_HEADER_SIZE;
        for (int l = 0; l < N_LAYERS; l++, p += 2 * run) {
            cake_kv_get(&kv, l, pos0, (int)h.n_tokens, k, v);
            CHECK(memcmp(k, p, run) == 0 && memcmp(v, p + run, run) == 0);
        }
        free(k);
        free(v);
    }
    free(before);
    cake_kv_cache_free(&kv);
    free(blob);
    return 0;
}
