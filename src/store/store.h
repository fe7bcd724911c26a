/* The KV chunk store: where computed chunks are kept and loaded from.
 *
 * One interface over several backends, chosen by URI (DESIGN.md section 3):
 *
 *     file:PATH                one file per chunk under PATH (file: alone =
 *                              $XDG_CACHE_HOME/cake or ~/.cache/cake)
 *     redis://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/DB]
 *                              a Redis server, shareable between machines
 *                              (port 6379, database 0 by default; an IPv6
 *                              host in brackets, [::1]:6379); several: the
 *                              chunks spread over them by rendezvous
 *                              hashing of their keys (the same servers,
 *                              written the same way, in any order, on every
 *                              machine), and one that is down only leaves
 *                              holes
 *     redis+unix://[[USER]:PASSWORD@]/PATH
 *                              a Redis server on this machine, by its unix
 *                              socket (db=N for a database)
 *     mem:                     in-process RAM
 *
 * Redis passwords: USER and PASSWORD are percent-decoded (%40 for '@'); a
 * URI without a password takes the one in $CAKE_REDIS_PASSWORD, if set (so
 * that it is not on the command line). With PASSWORD the store sends AUTH
 * [USER] PASSWORD on every connection. Messages and cake_store_uri show the
 * URI with its password as "***".
 *
 * Query parameters (any backend unless noted), e.g. file:/data/kv?bw=25Gbit&lat=0.2:
 *     bw=RATE        emulate a link of RATE: every transfer (get and put, each
 *                    direction its own link, like a full-duplex network) is
 *                    held until a fair-shared link of RATE has carried it, so
 *                    N concurrent transfers each get about RATE/N. RATE is
 *                    bits/s by default: 25Gbit, 500Mbit, 100000; bytes with
 *                    B: 1.6GB, 800MB, 1GiB.
 *     lat=MS         add MS milliseconds (float) to every request.
 *     capacity=SIZE  (file, mem) most bytes kept; least recently used chunks
 *                    are evicted to make room. 10G, 512MiB, ...
 *     direct=0|1     (file) read with O_DIRECT (default 1; falls back to
 *                    buffered reads where the filesystem refuses it).
 *     cache=0|1      (file, direct=1) a chunk that the page cache holds
 *                    whole (a recent put, a repeated prompt) is read through
 *                    it, at memory speed (default 1; 0: every read from the
 *                    disk, to measure it).
 *     fsync=0|1      (file) fsync each chunk before publishing it (default 0).
 *     timeout=MS     (redis) read/write timeout, default 1000; connect
 *                    timeout is min(200, MS).
 *     db=N           (redis) the database, as /DB does.
 *     ram=SIZE       (file, redis) a RAM tier in front: the chunks this
 *                    process read or wrote lately (LRU, up to SIZE) are
 *                    read from RAM, outside bw= and lat= (a repeated prefix
 *                    loads at memory speed, and while Redis is down), and
 *                    cake_store_prefetch brings chunks into it ahead of
 *                    their request (a server's queued requests).
 * Unknown parameters are an error that names them.
 *
 * Trust: a lookup never returns a wrong chunk. The verified calls
 * (cake_store_get_verified, cake_store_load) check the whole blob (see
 * chunk.h) and turn any failure into a miss, counted as `corrupt`, and remove
 * the bad chunk so that it gets rewritten. A failing backend (Redis down or
 * hung, a file vanishing, an I/O error) is also a miss, within the timeout:
 * the caller computes instead.
 *
 * Threads: a store may be used by several threads at once (the loader's I/O
 * workers); the file backend uses one fd per call, Redis a pool of
 * connections (one per concurrent caller), mem a mutex around its index.
 *
 * Opening a store sets SIGPIPE and SIGXFSZ to SIG_IGN when they are at their
 * defaults, so that a closed socket or a file-size limit is an error code, not
 * the death of the process. */
#ifndef CAKE_STORE_H
#define CAKE_STORE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kv/kv_cache.h"
#include "store/chunk.h"
#include "store/key.h"

typedef struct cake_store cake_store;

/* What the engine exports (later as Prometheus metrics). Monotonic. */
typedef struct {
    uint64_t hits;          /* gets that returned a chunk (verified ones for the verified calls) */
    uint64_t misses;        /* gets that returned none: absent, corrupt or failed */
    uint64_t corrupt;       /* chunks that failed verification (also counted in misses) */
    uint64_t errors;        /* backend failures: I/O errors, Redis down, failed puts */
    uint64_t bytes_read;    /* blob bytes returned by hits */
    uint64_t bytes_written; /* blob bytes of successful puts */
    uint64_t read_ns;       /* wall time spent in get calls, emulated link time included */
    uint64_t puts;          /* successful puts */
    uint64_t evictions;     /* chunks removed to respect capacity (or by gc) */
    uint64_t ram_hits;      /* of the hits, those the RAM tier (ram=) gave */
    uint64_t prefetched;    /* chunks cake_store_prefetch brought into the RAM tier */
} cake_store_counters;

typedef struct {
    cake_chunk_key key;
    uint64_t size;     /* blob bytes */
    int64_t last_used; /* unix seconds of the last read or write; 0 = unknown */
} cake_store_entry;

typedef struct {
    uint64_t n_chunks;
    uint64_t bytes;
    uint64_t capacity; /* 0 = no limit set */
} cake_store_usage;

/* Opens (and for file:, creates) the store named by uri. A Redis store opens
 * even when the server is down: its lookups then miss until it is back. */
int cake_store_open(const char *uri, cake_store **out, char *err, size_t errlen);
void cake_store_close(cake_store *s);             /* accepts NULL */
const char *cake_store_kind(const cake_store *s); /* "file", "redis" or "mem" */
const char *cake_store_uri(const cake_store *s);  /* redacted: no password */
/* uri with its password (if any) replaced by "***", for messages. */
const char *cake_store_redact_uri(const char *uri, char *out, size_t n);
/* 0 when the store answers now; -1 with the reason when it does not (a Redis
 * store that is down, or refuses the password): its lookups miss until it
 * answers. For a server's start-up message. */
int cake_store_check(cake_store *s, char *err, size_t errlen);

/* Buffers for gets. The file backend reads straight into the caller's buffer
 * with O_DIRECT only when it is 4096-aligned and has room for the blob rounded
 * up to 4096 bytes (the last block is read whole); other buffers are read
 * through the page cache. cake_store_buffer_size(blob) gives that rounded
 * size; cake_store_alloc_buffer returns such a buffer (free with
 * cake_store_free_buffer), NULL when out of memory. */
size_t cake_store_buffer_size(size_t blob_size);
void *cake_store_alloc_buffer(size_t size);
void cake_store_free_buffer(void *p);

/* Raw get: copies the blob stored under key into buf (cap bytes) and sets
 * *len. Returns 0 on a hit, 1 on a miss (absent, or the backend failed: then
 * err says why and `errors` is counted), -1 when the blob does not fit in cap
 * (err says so). Does not verify the blob. */
int cake_store_get(cake_store *s, const cake_chunk_key *key, void *buf, size_t cap, size_t *len,
                   char *err, size_t errlen);

/* Get + full verification against expect (fingerprint, key, index, n_tokens,
 * n_layers, n_kv_heads, head_dim, dtype). 0: buf holds a valid blob of *len
 * bytes. 1: miss; when the chunk was there but bad, it is counted as corrupt,
 * removed from the store, and err names the failed check (err is "" for a
 * plain absence). -1: cap is smaller than the blob expect describes. */
int cake_store_get_verified(cake_store *s, const cake_chunk_header *expect, void *buf, size_t cap,
                            size_t *len, char *err, size_t errlen);
/* The same, for a caller that may stop wanting the chunk: once *give_up is
 * set, the emulated link's waits (lat=, bw=) end at once and the get is a
 * miss (a real backend's transfer runs to its end first). */
int cake_store_get_verified_until(cake_store *s, const cake_chunk_header *expect, void *buf,
                                  size_t cap, size_t *len, const atomic_int *give_up, char *err,
                                  size_t errlen);

/* n cake_store_get_verified in one round trip where the backend allows it
 * (pipelined GETs on Redis; one after the other elsewhere): chunk i goes to
 * bufs[i] (cap bytes each), results[i] = 0 hit / 1 miss, lens[i] its length.
 * Returns the number of hits, or -1 (nothing fetched) when cap is smaller
 * than one of the chunks. err describes the first miss that had a reason. */
int cake_store_get_many_verified(cake_store *s, const cake_chunk_header *expect, size_t n,
                                 void *const *bufs, size_t cap, size_t *lens, int *results,
                                 char *err, size_t errlen);

/* cake_store_get_verified, then the copy of the chunk into kv at positions
 * [pos0, pos0 + n_tokens). buf (cap bytes) is the caller's staging buffer.
 * Same return codes; -1 also when the chunk does not fit kv. kv is only
 * written on 0. */
int cake_store_load(cake_store *s, const cake_chunk_header *expect, void *buf, size_t cap,
                    cake_kv_cache *kv, int pos0, char *err, size_t errlen);

/* Stores a blob under key (replacing any). Readers see the old blob or the new
 * one, never a part. 0 ok, -1 on failure (no space, Redis down...). */
int cake_store_put(cake_store *s, const cake_chunk_key *key, const void *blob, size_t len,
                   char *err, size_t errlen);

/* cake_chunk_encode of positions [pos0, pos0 + h->n_tokens) of kv into buf
 * (cap bytes), then cake_store_put under h->key. */
int cake_store_save(cake_store *s, cake_chunk_header *h, const cake_kv_cache *kv, int pos0,
                    void *buf, size_t cap, char *err, size_t errlen);

/* Brings the chunks of keys (blob_size bytes each at most) that the store
 * has and its RAM tier lacks into the RAM tier, through the link, one after
 * the other, until *stop (may be NULL) is set. Returns how many it brought;
 * 0 without a RAM tier. */
int cake_store_prefetch(cake_store *s, const cake_chunk_key *keys, size_t n, size_t blob_size,
                        const atomic_int *stop);
bool cake_store_has_ram(const cake_store *s);
/* near[i] = 1 when the RAM tier holds keys[i] (a load of it is a copy, not
 * a transfer); all 0 without a RAM tier. */
void cake_store_in_ram(cake_store *s, const cake_chunk_key *keys, size_t n, uint8_t *near);

/* present[i] = 1 when keys[i] is in the store, for i < n, in one round trip
 * where the backend allows (pipelined on Redis; none when the RAM tier holds
 * them all). present is always filled: on a backend failure the call
 * returns -1 with err, and present holds what the backend could still tell
 * (the RAM tier's; a Redis store over several servers: the ones that
 * answered), the rest 0, so callers may simply treat the result as
 * misses. */
int cake_store_exists(cake_store *s, const cake_chunk_key *keys, size_t n, uint8_t *present,
                      char *err, size_t errlen);

/* 0 removed, 1 was absent, -1 failure. */
int cake_store_del(cake_store *s, const cake_chunk_key *key, char *err, size_t errlen);

/* The first min(n, blob size) bytes of a blob (for listing headers) in buf,
 * *total = the blob's size. 0 / 1 (absent) / -1. */
int cake_store_head(cake_store *s, const cake_chunk_key *key, void *buf, size_t n, size_t *len,
                    uint64_t *total, char *err, size_t errlen);

/* Calls fn for every chunk, in no particular order, until fn returns nonzero.
 * fn may call other functions of the same store. Chunks written or removed
 * meanwhile may or may not be seen. 0 ok, -1 failure. */
typedef int (*cake_store_iter_fn)(const cake_store_entry *e, void *ctx);
int cake_store_iterate(cake_store *s, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen);

/* Every chunk, as cake_store_iterate sees them, in one malloc'd array (*out,
 * *n entries; free(*out)). 0 ok, -1 failure (out of memory included). */
int cake_store_list(cake_store *s, cake_store_entry **out, size_t *n, char *err, size_t errlen);

int cake_store_usage_get(cake_store *s, cake_store_usage *u, char *err, size_t errlen);

/* Maintenance: removes leftovers of interrupted writes (file), then evicts
 * least recently used chunks until at most target bytes remain (UINT64_MAX =
 * evict nothing). Counts what it evicted; -1 when some could not be removed
 * (err says why; the counts hold what was). */
int cake_store_gc(cake_store *s, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed,
                  char *err, size_t errlen);

void cake_store_counters_get(const cake_store *s, cake_store_counters *out);

/* How long the store's lookups (cake_store_exists that reached the backend)
 * took lately, in ns; 0 = none yet. The loader computes while a lookup that
 * takes longer than a chunk's compute runs. */
uint64_t cake_store_lookup_ns(const cake_store *s);
void cake_store_set_lookup_ns(cake_store *s, uint64_t ns); /* (a hint from an earlier run) */

/* The aggregate read rate (bytes/ns) the loader measured on this store in its
 * last request, for the next request's first estimates; 0 = none yet. */
double cake_store_rate_hint(const cake_store *s);
void cake_store_set_rate_hint(cake_store *s, double bytes_per_ns);

/* Parsers shared with the command line. 0 ok, -1 when s is not a valid value.
 * Sizes: a number with an optional K/M/G/T (powers of 1000, B optional) or
 * KiB/MiB/GiB/TiB suffix. Rates: bits/s by default or with bit / bps; bytes/s
 * with B (KB, MB, GB, KiB...); a "/s" may follow. */
int cake_parse_size(const char *s, uint64_t *bytes);
int cake_parse_rate(const char *s, double *bytes_per_second);

#endif
