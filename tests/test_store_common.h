/* Helpers shared by the store tests (static, header-only: each test program
 * is one .c file). */
#ifndef CAKE_TEST_STORE_COMMON_H
#define CAKE_TEST_STORE_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <math.h>
#include <time.h>
#include <unistd.h>

#include "kv/kv_cache.h"
#include "store/chunk.h"
#include "store/key.h"
#include "store/store.h"

/* A small model shape for the tests: 3 layers, 2 KV heads of dim 8. */
#define T_LAYERS 3
#define T_HEADS  2
#define T_HDIM   8
#define T_CHUNK  16
#define T_CTX    128

static uint8_t T_FP[16] = {0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};

/* Distinct, recognizable bits for every (layer, K/V, position, element of
 * the position's row): any misplaced copy shows up. */
static inline uint32_t t_pattern(int layer, int is_v, int pos, int e, uint32_t salt) {
    uint32_t x = (uint32_t)(layer * 7919 + is_v * 104729 + pos * 131 + e) ^ salt;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    return x ^ (x >> 15);
}

static inline void t_fill_kv(cake_kv_cache *kv, uint32_t salt) {
    for (int l = 0; l < kv->n_layers; l++)
        for (int v = 0; v < 2; v++) {
            void *base = v ? cake_kv_v(kv, l) : cake_kv_k(kv, l);
            for (int p = 0; p < kv->n_ctx; p++)
                for (int e = 0; e < kv->kv_dim; e++) {
                    uint32_t x = t_pattern(l, v, p, e, salt);
                    const int h = e / kv->head_dim, d = e % kv->head_dim;
                    const size_t i = v ? cake_kv_v_index(kv->head_ctx, kv->head_dim, h, p, d)
                                       : cake_kv_k_index(kv->head_ctx, kv->head_dim, h, p, d);
                    if (kv->type == CAKE_KV_F32)
                        ((uint32_t *)base)[i] = x;
                    else
                        ((uint16_t *)base)[i] = (uint16_t)x;
                }
        }
}

static inline int t_kv_init(cake_kv_cache *kv, enum cake_kv_type type) {
    char err[256];
    return cake_kv_cache_init(kv, T_LAYERS, T_CTX, T_HEADS, T_HDIM, type, err, sizeof(err));
}

/* Compares positions [p0, p0+n) of two caches, all layers; 0 when equal. */
static inline int t_kv_cmp_range(const cake_kv_cache *a, int pa, const cake_kv_cache *b, int pb,
                                 int n) {
    const size_t rows = (size_t)n * (size_t)a->kv_dim * a->elem_size;
    char *buf = malloc(4 * rows + 1);
    int differ = buf == NULL;
    for (int l = 0; l < a->n_layers && !differ; l++) {
        cake_kv_get(a, l, pa, n, buf, buf + rows);
        cake_kv_get(b, l, pb, n, buf + 2 * rows, buf + 3 * rows);
        differ = memcmp(buf, buf + 2 * rows, 2 * rows) != 0;
    }
    free(buf);
    return differ;
}

/* Expected header of chunk `index` with key derived from tokens seeded by `seed`. */
static inline cake_chunk_header t_header(uint32_t index, uint32_t seed, enum cake_kv_type type) {
    cake_chunk_header h;
    memset(&h, 0, sizeof(h));
    memcpy(h.fingerprint, T_FP, 16);
    cake_token toks[T_CHUNK];
    for (int i = 0; i < T_CHUNK; i++) toks[i] = (cake_token)(seed * 1000 + index * 37 + i);
    cake_chunk_key root;
    cake_key_root(T_FP, T_CHUNK, type, &root);
    cake_key_next(&root, toks, T_CHUNK, &h.key);
    h.index = index;
    h.n_tokens = T_CHUNK;
    h.n_layers = T_LAYERS;
    h.n_kv_heads = T_HEADS;
    h.head_dim = T_HDIM;
    h.dtype = type;
    return h;
}

/* A big sealed chunk: h becomes a chunk of n_tokens x n_layers x 16 KV heads
 * of dim 128 (f16), its payload pseudo-random. The buffer has extra bytes
 * past cake_store_buffer_size(*len), random too (for values longer than the
 * chunk). Caller frees with cake_store_free_buffer. */
static inline uint8_t *t_big_blob(cake_chunk_header *h, uint32_t n_tokens, uint32_t n_layers,
                                  size_t extra, size_t *len) {
    h->n_tokens = n_tokens;
    h->n_layers = n_layers;
    h->n_kv_heads = 16;
    h->head_dim = 128;
    h->created = 0;
    *len = cake_chunk_blob_size(h);
    const size_t room = cake_store_buffer_size(*len) + extra;
    uint8_t *blob = cake_store_alloc_buffer(room);
    if (!blob) return NULL;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t k = CAKE_CHUNK_HEADER_SIZE; k + 8 <= room; k += 8) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        memcpy(blob + k, &x, 8);
    }
    char err[256];
    if (cake_chunk_seal(h, blob, err, sizeof(err))) {
        fprintf(stderr, "t_big_blob: %s\n", err);
        cake_store_free_buffer(blob);
        return NULL;
    }
    return blob;
}

/* A sealed blob for h from kv positions [pos0, pos0 + T_CHUNK). Caller frees. */
static inline void *t_blob(cake_chunk_header *h, const cake_kv_cache *kv, int pos0, size_t *len) {
    char err[256];
    *len = cake_chunk_blob_size(h);
    void *b = cake_store_alloc_buffer(*len);
    if (!b || cake_chunk_encode(h, kv, pos0, b, *len, err, sizeof(err))) {
        fprintf(stderr, "t_blob: %s\n", err);
        abort();
    }
    return b;
}

static inline char *t_mkdtemp(void) {
    const char *base = getenv("TMPDIR");
    char *p = malloc(4096);
    snprintf(p, 4096, "%s/cake-store-test-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(p)) abort();
    return p;
}

static inline void t_rm_rf(const char *path) {
    pid_t pid = fork();
    if (pid == 0) {
        execlp("rm", "rm", "-rf", "--", path, (char *)NULL);
        _exit(127);
    }
    int st;
    if (pid > 0) waitpid(pid, &st, 0);
}

static inline double t_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- a throwaway redis-server on a free loopback port ---- */

typedef struct {
    pid_t pid;
    int port;
    char uri[128];
} t_redis;

static inline int t_free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t n = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) || getsockname(fd, (void *)&a, &n)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static inline int t_port_answers(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = 0;
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
        struct timeval tv = {0, 200000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        char buf[16] = {0};
        ok = write(fd, "PING\r\n", 6) == 6 && read(fd, buf, sizeof(buf) - 1) > 0 &&
             (!strncmp(buf, "+PONG", 5) || !strncmp(buf, "-NOAUTH", 7)); /* up, wants AUTH */
    }
    if (fd >= 0) close(fd);
    return ok;
}

static inline int t_redis_available(void) {
    return system("command -v redis-server >/dev/null 2>&1") == 0;
}

/* Starts redis-server on port (0 = a free one), with extra arguments (NULL
 * or NULL-ended) after the usual ones. 0 ok. */
static inline int t_redis_start_with(t_redis *r, int port, const char *const *extra) {
    for (int attempt = 0; attempt < 5; attempt++) {
        r->port = port ? port : t_free_port();
        if (r->port <= 0) return -1;
        char portstr[16];
        snprintf(portstr, sizeof(portstr), "%d", r->port);
        r->pid = fork();
        if (r->pid < 0) return -1;
        if (r->pid == 0) {
            int devnull = open("/dev/null", O_WRONLY);
            if (devnull >= 0) {
                dup2(devnull, 1);
                dup2(devnull, 2);
            }
            const char *argv[64] = {"redis-server", "--port",           portstr, "--bind",
                                    "127.0.0.1",    "--save",           "",      "--appendonly",
                                    "no",           "--daemonize",      "no",    "--dir",
                                    "/tmp",         "--protected-mode", "no"};
            int n = 15;
            for (int i = 0; extra && extra[i] && n < 63; i++) argv[n++] = extra[i];
            argv[n] = NULL;
            execvp("redis-server", (char *const *)argv);
            _exit(127);
        }
        for (int i = 0; i < 500; i++) { /* up to 5 s */
            if (t_port_answers(r->port)) {
                snprintf(r->uri, sizeof(r->uri), "redis://127.0.0.1:%d", r->port);
                return 0;
            }
            int st;
            if (waitpid(r->pid, &st, WNOHANG) == r->pid) break; /* port taken: try another */
            usleep(10000);
        }
        kill(r->pid, SIGKILL);
        waitpid(r->pid, NULL, 0);
        r->pid = 0;
        if (port) return -1;
    }
    return -1;
}

static inline int t_redis_start(t_redis *r, int port) {
    return t_redis_start_with(r, port, NULL);
}

static inline void t_redis_stop(t_redis *r) {
    if (r->pid > 0) {
        kill(r->pid, SIGKILL);
        waitpid(r->pid, NULL, 0);
    }
    r->pid = 0;
}

#endif
