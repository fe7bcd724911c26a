/* The backend side of the store: what store.c needs from each backend.
 *
 * Like Redis's rio, a backend is a table of functions plus its own state
 * (void *b). store.c wraps every call with the emulated link, the counters and
 * the verification; backends only move bytes. Return codes follow store.h:
 * get/head/del 0 found, 1 absent, -1 failure (with err). For get, a failure
 * that the caller should treat as a miss (connection lost, I/O error) is
 * returned as -2 so that store.c can count it as an error and a miss, while -1
 * is kept for "does not fit in cap". */
#ifndef CAKE_STORE_IMPL_H
#define CAKE_STORE_IMPL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "store/store.h"

#define CAKE_STORE_GET_FAILED (-2)

typedef struct {
    _Atomic uint64_t hits, misses, corrupt, errors, bytes_read, bytes_written, read_ns, puts,
        evictions, ram_hits, prefetched;
} cake_store_atomic_counters;

/* At most this many threads read one blob (readers=). */
#define CAKE_STORE_READERS_MAX 16

/* At most this many Redis servers in one store (redis://H1,H2,...). */
#define CAKE_REDIS_SERVERS_MAX 16

/* Everything parsed from a URI. */
typedef struct {
    char kind[8];    /* "file", "redis", "mem" */
    char path[4096]; /* file: root directory */
    int n_servers;   /* redis: TCP servers, the chunks spread over them (0: a socket) */
    char host[CAKE_REDIS_SERVERS_MAX][256];
    int port[CAKE_REDIS_SERVERS_MAX];
    char socket[108];   /* redis+unix: the socket's path (sun_path's size) */
    int db;             /* redis */
    char user[128];     /* redis: ACL user, "" = the default user */
    char password[512]; /* redis: "" = no AUTH */
    uint64_t capacity;  /* file, mem: 0 = unlimited */
    int direct;         /* file: O_DIRECT reads */
    int cache;          /* file, direct reads: what the page cache holds first */
    int fsync;          /* file: fsync before rename */
    int readers;        /* file: threads reading one big blob; 0 = CPUs per get, at most 4 */
    int timeout_ms;     /* redis: read/write timeout */
    double bw;          /* bytes per second, 0 = no emulation */
    double lat_ms;      /* per request */
    uint64_t ram;       /* file, redis: bytes of the RAM tier; 0 = none */
} cake_store_params;

/* Parses a URI (see store.h). Error messages show it redacted. */
int cake_store_parse_uri(const char *uri, cake_store_params *p, char *err, size_t errlen);

typedef struct {
    const char *kind;
    /* hash: NULL, or the payload hash that a backend reading in pieces may
     * feed with the pieces it has while it still reads (optional). */
    int (*get)(void *b, const cake_chunk_key *k, void *buf, size_t cap, size_t *len,
               cake_payload_hash *hash, char *err, size_t errlen);
    /* Optional (NULL: store.c loops over get): n gets in one round trip,
     * rc[i] and lens[i] per key as get returns them. */
    int (*get_many)(void *b, const cake_chunk_key *keys, size_t n, void *const *bufs, size_t cap,
                    size_t *lens, int *rc, char *err, size_t errlen);
    int (*head)(void *b, const cake_chunk_key *k, void *buf, size_t n, size_t *len, uint64_t *total,
                char *err, size_t errlen);
    int (*put)(void *b, const cake_chunk_key *k, const void *blob, size_t len, char *err,
               size_t errlen);
    int (*exists)(void *b, const cake_chunk_key *keys, size_t n, uint8_t *present, char *err,
                  size_t errlen);
    int (*del)(void *b, const cake_chunk_key *k, char *err, size_t errlen);
    int (*iterate)(void *b, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen);
    int (*usage)(void *b, cake_store_usage *u, char *err, size_t errlen);
    int (*gc)(void *b, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed, char *err,
              size_t errlen);
    void (*close)(void *b);
    /* Optional (NULL: always answers): 0 when the backend answers now, -1
     * with the reason when it does not. */
    int (*check)(void *b, char *err, size_t errlen);
} cake_store_ops;

/* Each backend's constructor. ctr outlives the backend (evictions are counted there). */
int cake_store_file_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                         char *err, size_t errlen);
int cake_store_mem_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                        char *err, size_t errlen);
int cake_store_redis_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                          char *err, size_t errlen);
extern const cake_store_ops cake_store_file_ops, cake_store_mem_ops, cake_store_redis_ops;

/* Every chunk a backend holds, least recently used first (ties by key), and
 * their total size: what gc evicts first and an LRU is rebuilt from. *out is
 * malloc'ed (NULL when empty). */
int cake_store_backend_by_age(const cake_store_ops *ops, void *b, cake_store_entry **out, size_t *n,
                              uint64_t *bytes, char *err, size_t errlen);

/* Sets u->n_chunks and u->bytes by iterating the backend (leaves capacity). */
int cake_store_backend_count(const cake_store_ops *ops, void *b, cake_store_usage *u, char *err,
                             size_t errlen);

/* Test hook of the file backend: when set, put writes half of the blob into
 * its temporary file, calls the hook, then writes the rest. Lets the tests
 * kill a writer mid-write deterministically. */
extern void (*cake_store_file_mid_write_hook)(void);

#endif
