/* bench_store: sustained load bandwidth of the chunk store, against the
 * tools that measure the same medium directly.
 *
 * For 256-token f16 chunks of the llama-1b and mha-160m shapes (8 MiB and
 * 9 MiB blobs), with 1, 2 and 4 transfers in flight (threads):
 *   file   gets from a file store with O_DIRECT into aligned buffers (cache=0:
 *          all from the disk, never the page cache), vs
 *          `dd iflag=direct` of the same bytes (one file of all the blobs, in
 *          the same directory, bs = one blob, one dd per transfer in flight
 *          over disjoint ranges). Goal: ratio >= 0.9.
 *   redis  gets from a redis-server on loopback (started here), vs
 *          `redis-benchmark -t set,get -d <blob size> -c <in flight>`'s GET
 *          rate times the value size. Goal: ratio >= 0.8. And the same
 *          gets by the server's unix socket (redis+unix://): unix/tcp; and
 *          from a store over two servers (redis://A,B): 2 srv/1.
 *   bw=    gets through the emulated link (mem store, and file store) at set
 *          rates: achieved / set rate, goal within 5%; and the per-stream
 *          share (about bw/N).
 * Each get is also shown with verification (cake_store_get_verified: header
 * checks + XXH3-64 of the payload), which is what a load costs in the engine.
 * The file store hashes the pieces of a big blob while it reads the rest; the
 * file part also shows a plain get followed by cake_chunk_verify, the check
 * after the read, beside it.
 *
 * Each cell is the median of --rounds measurements that alternate the store
 * and the reference tool, so that drifts of a shared medium hit both alike.
 *
 * Not a test: it prints numbers. Takes 3-4 minutes with the defaults. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "store/store.h"
#include "util/clock.h"

typedef struct {
    const char *name;
    uint32_t layers, kv_heads, head_dim;
} shape;

static const shape SHAPES[] = {
    {"llama-1b", 16, 8, 64}, {"mha-160m", 12, 12, 64}, {"longalpaca-13b", 40, 40, 128}};
static int TOKENS = 256; /* per chunk (--tokens) */
static const int INFLIGHT[] = {1, 2, 4};

static void die(const char *what, const char *err) {
    fprintf(stderr, "bench_store: %s: %s\n", what, err);
    exit(1);
}

/* ---- chunks ---- */

typedef struct {
    int n;
    cake_chunk_header *h;
    void **blobs;
    size_t len;
} chunk_set;

/* n sealed blobs with random payloads (incompressible) and distinct keys. */
static void make_chunks(chunk_set *c, const shape *sh, int n) {
    c->n = n;
    c->h = calloc((size_t)n, sizeof(*c->h));
    c->blobs = calloc((size_t)n, sizeof(*c->blobs));
    uint64_t x = 0x9e3779b97f4a7c15ull;
    char err[256];
    for (int i = 0; i < n; i++) {
        cake_chunk_header *h = &c->h[i];
        memset(h->fingerprint, 0xab, 16);
        cake_token toks[4096];
        for (int t = 0; t < TOKENS; t++) toks[t] = i * TOKENS + t;
        cake_chunk_key root;
        cake_key_root(h->fingerprint, TOKENS, CAKE_KV_F16, &root);
        cake_key_next(&root, toks, TOKENS, &h->key);
        h->key.b[0] ^= (uint8_t)(sh->layers); /* distinct per shape */
        h->index = (uint32_t)i;
        h->n_tokens = (uint32_t)TOKENS;
        h->n_layers = sh->layers;
        h->n_kv_heads = sh->kv_heads;
        h->head_dim = sh->head_dim;
        h->dtype = CAKE_KV_F16;
        c->len = cake_chunk_blob_size(h);
        c->blobs[i] = cake_store_alloc_buffer(c->len);
        uint64_t *p = (uint64_t *)((char *)c->blobs[i] + CAKE_CHUNK_HEADER_SIZE);
        for (size_t k = 0; k < (c->len - CAKE_CHUNK_HEADER_SIZE) / 8; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            p[k] = x;
        }
        if (cake_chunk_seal(h, c->blobs[i], err, sizeof(err))) die("seal", err);
    }
}

static void free_chunks(chunk_set *c) {
    for (int i = 0; i < c->n; i++) cake_store_free_buffer(c->blobs[i]);
    free(c->blobs);
    free(c->h);
}

static void put_all(cake_store *s, chunk_set *c) {
    char err[512];
    for (int i = 0; i < c->n; i++)
        if (cake_store_put(s, &c->h[i].key, c->blobs[i], c->len, err, sizeof(err))) die("put", err);
}

/* ---- loaders: T threads, gets of chunks in turn, for a duration ---- */

typedef struct {
    cake_store *s;
    chunk_set *c;
    int verify; /* 0: get; 1: get_verified; 2: get, then cake_chunk_verify */
    double until;
    _Atomic long next;
    _Atomic uint64_t bytes;
    _Atomic int failed;
} load_job;

typedef struct {
    load_job *j;
    double end;
    uint64_t bytes;
} load_thread;

static void *loader(void *arg) {
    load_thread *t = arg;
    load_job *j = t->j;
    size_t cap = cake_store_buffer_size(j->c->len);
    void *buf = cake_store_alloc_buffer(cap);
    char err[512];
    while (cake_now_s() < j->until) {
        long i = atomic_fetch_add(&j->next, 1) % j->c->n;
        size_t len;
        int rc = j->verify == 1
                     ? cake_store_get_verified(j->s, &j->c->h[i], buf, cap, &len, err, sizeof(err))
                     : cake_store_get(j->s, &j->c->h[i].key, buf, cap, &len, err, sizeof(err));
        if (rc == 0 && j->verify == 2)
            rc = cake_chunk_verify(buf, len, &j->c->h[i], NULL, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "bench_store: get: rc %d: %s\n", rc, err);
            atomic_store(&j->failed, 1);
            break;
        }
        t->bytes += len;
    }
    t->end = cake_now_s();
    cake_store_free_buffer(buf);
    return NULL;
}

/* Aggregate bytes/s over the run; per_stream (optional) = mean of each thread's rate. */
static double run_loads(cake_store *s, chunk_set *c, int threads, int verify, double seconds,
                        double *per_stream) {
    load_job j = {.s = s, .c = c, .verify = verify};
    atomic_init(&j.next, 0);
    atomic_init(&j.failed, 0);
    pthread_t th[16];
    load_thread lt[16];
    double t0 = cake_now_s();
    j.until = t0 + seconds;
    for (int i = 0; i < threads; i++) {
        lt[i] = (load_thread){&j, 0, 0};
        pthread_create(&th[i], NULL, loader, &lt[i]);
    }
    uint64_t total = 0;
    double end = t0, ps = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        total += lt[i].bytes;
        if (lt[i].end > end) end = lt[i].end;
        ps += lt[i].bytes / (lt[i].end - t0);
    }
    if (atomic_load(&j.failed)) exit(1);
    if (per_stream) *per_stream = ps / threads;
    return total / (end - t0);
}

/* ---- dd ---- */

/* Reads [skip, skip+count) blocks of bs from path with dd iflag=direct
 * (through the page cache where the filesystem refuses O_DIRECT, as the file
 * store then does); T of them at once over disjoint ranges. Bytes/s. */
static double dd_direct(const char *path, size_t bs, long blocks, int threads, int passes) {
    int probe = open(path, O_RDONLY | O_DIRECT);
    const int direct = probe >= 0;
    if (probe >= 0) close(probe);
    long per = blocks / threads;
    double t0 = cake_now_s();
    for (int pass = 0; pass < passes; pass++) {
        pid_t pids[16];
        for (int t = 0; t < threads; t++) {
            char a_if[4200], a_bs[64], a_skip[64], a_count[64];
            snprintf(a_if, sizeof(a_if), "if=%s", path);
            snprintf(a_bs, sizeof(a_bs), "bs=%zu", bs);
            snprintf(a_skip, sizeof(a_skip), "skip=%ld", t * per);
            snprintf(a_count, sizeof(a_count), "count=%ld", per);
            pids[t] = fork();
            if (pids[t] == 0) {
                execlp("dd", "dd", a_if, "of=/dev/null", a_bs, a_skip, a_count,
                       direct ? "iflag=direct" : "iflag=fullblock", "status=none", (char *)NULL);
                _exit(127);
            }
        }
        for (int t = 0; t < threads; t++) {
            int st;
            waitpid(pids[t], &st, 0);
            if (!WIFEXITED(st) || WEXITSTATUS(st)) die("dd", "failed");
        }
    }
    return (double)per * threads * bs * passes / (cake_now_s() - t0);
}

/* ---- redis ---- */

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t n = sizeof(a);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || getsockname(fd, (void *)&a, &n)) return -1;
    close(fd);
    return ntohs(a.sin_port);
}

static pid_t redis_pid[2];       /* a second server for a store over two */
static char redis_socket[2][64]; /* each server's unix socket too */

static void stop_redis(void) {
    for (int i = 0; i < 2; i++)
        if (redis_pid[i] > 0) {
            kill(redis_pid[i], SIGTERM);
            waitpid(redis_pid[i], NULL, 0);
            redis_pid[i] = 0;
            unlink(redis_socket[i]);
        }
}

/* Starts server i (0 or 1) on port. */
static int start_redis(int i, int port) {
    char p[16];
    snprintf(p, sizeof(p), "%d", port);
    snprintf(redis_socket[i], sizeof(redis_socket[i]), "/tmp/bench-store-%d-%d.sock", (int)getpid(),
             i);
    redis_pid[i] = fork();
    if (redis_pid[i] == 0) {
        int dn = open("/dev/null", O_WRONLY);
        dup2(dn, 1);
        dup2(dn, 2);
        execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--protected-mode", "no", "--unixsocket", redis_socket[i],
               "--unixsocketperm", "700", (char *)NULL);
        _exit(127);
    }
    if (i == 0) atexit(stop_redis);
    for (int t = 0; t < 300; t++) {
        char uri[64], err[256];
        snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d", port);
        cake_store *s;
        if (cake_store_open(uri, &s, err, sizeof(err)) == 0) {
            cake_store_usage u;
            int ok = cake_store_usage_get(s, &u, err, sizeof(err)) == 0;
            cake_store_close(s);
            if (ok) return 0;
        }
        usleep(20000);
    }
    return -1;
}

/* redis-benchmark's GET rate (requests/s) for values of size bytes. */
static double redis_benchmark_get(int port, size_t size, int clients, int n) {
    char cmd[512];
    snprintf(cmd, sizeof(cmd),
             "redis-benchmark -h 127.0.0.1 -p %d -t set,get -d %zu -c %d -n %d --csv 2>/dev/null",
             port, size, clients, n);
    FILE *p = popen(cmd, "r");
    if (!p) return 0;
    char line[512];
    double rps = 0;
    while (fgets(line, sizeof(line), p))
        if (!strncmp(line, "\"GET\",\"", 7)) rps = strtod(line + 7, NULL);
    pclose(p);
    return rps;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* ---- main ---- */

static void usage(void) {
    fputs("usage: bench_store [--dir DIR] [--mb MB] [--seconds S] [--no-file] [--no-redis]\n"
          "                   [--no-emul] [--shape llama-1b|mha-160m|longalpaca-13b]\n"
          "                   [--tokens N]\n"
          "  --dir DIR     where the file store and the dd file go (default ./bench-store.tmp;\n"
          "                removed at the end): put it on the disk to measure\n"
          "  --mb MB       bytes of chunks per shape for the file part (default 768)\n"
          "  --tokens N    tokens per chunk (default 256; 512 with longalpaca-13b makes\n"
          "                419 MB blobs, which the file store reads with several threads)\n"
          "  --seconds S   duration of each measurement (default 2)\n"
          "  --rounds R    measurements per cell, alternating store and reference tool;\n"
          "                the median is reported (default 3, at most 9)\n",
          stderr);
}

int main(int argc, char **argv) {
    static const struct option opts[] = {{"dir", required_argument, 0, 'd'},
                                         {"mb", required_argument, 0, 'm'},
                                         {"seconds", required_argument, 0, 's'},
                                         {"no-file", no_argument, 0, 'F'},
                                         {"no-redis", no_argument, 0, 'R'},
                                         {"no-emul", no_argument, 0, 'E'},
                                         {"shape", required_argument, 0, 'S'},
                                         {"rounds", required_argument, 0, 'r'},
                                         {"tokens", required_argument, 0, 't'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *dir = "bench-store.tmp", *only = NULL;
    double seconds = 2;
    int mb = 768, rounds = 3, do_file = 1, do_redis = 1, do_emul = 1, c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'd':
            dir = optarg;
            break;
        case 'm':
            mb = atoi(optarg);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'F':
            do_file = 0;
            break;
        case 'R':
            do_redis = 0;
            break;
        case 'E':
            do_emul = 0;
            break;
        case 'S':
            only = optarg;
            break;
        case 'r':
            rounds = atoi(optarg);
            break;
        case 't':
            TOKENS = atoi(optarg);
            break;
        default:
            usage();
            return c == 'h' ? 0 : 2;
        }
    }
    if (mb < 64 || seconds <= 0 || rounds < 1 || rounds > 9 || TOKENS < 1 || TOKENS > 4096) {
        usage();
        return 2;
    }
    char err[512], uri[4300], big[4300];
    mkdir(dir, 0755);
    printf("bench_store: %d-token f16 chunks; %g s per measurement, median of %d; in flight = "
           "threads\n",
           TOKENS, seconds, rounds);

    for (size_t si = 0; si < sizeof(SHAPES) / sizeof(SHAPES[0]); si++) {
        const shape *sh = &SHAPES[si];
        if (only && strcmp(only, sh->name)) continue;
        chunk_set cs;
        cake_chunk_header probe = {.n_tokens = (uint32_t)TOKENS,
                                   .n_layers = sh->layers,
                                   .n_kv_heads = sh->kv_heads,
                                   .head_dim = sh->head_dim,
                                   .dtype = CAKE_KV_F16};
        size_t blob = cake_chunk_blob_size(&probe);
        int n = (int)((size_t)mb * 1048576 / blob);
        if (n < 2) n = 2;
        printf("\n== %s: %u layers x %u KV heads x %u, chunk blob %zu bytes (%.2f MiB)\n", sh->name,
               sh->layers, sh->kv_heads, sh->head_dim, blob, blob / 1048576.0);

        if (do_file) {
            make_chunks(&cs, sh, n);
            /* cache=0: every get from the disk, as dd's (the chunks just
             * put are in the page cache, which a get would otherwise use) */
            snprintf(uri, sizeof(uri), "file:%s/%s?cache=0", dir, sh->name);
            cake_store *s;
            if (cake_store_open(uri, &s, err, sizeof(err))) die("open", err);
            put_all(s, &cs);
            /* the same store read by one thread per blob, beside the default */
            char uri1[4400];
            snprintf(uri1, sizeof(uri1), "%s&readers=1", uri);
            cake_store *s1;
            if (cake_store_open(uri1, &s1, err, sizeof(err))) die("open", err);
            /* the same bytes as one file, for dd */
            snprintf(big, sizeof(big), "%s/%s.dd", dir, sh->name);
            int fd = open(big, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            size_t bs = cake_store_buffer_size(blob);
            char *pad = calloc(1, bs);
            for (int i = 0; i < n; i++) {
                memcpy(pad, cs.blobs[i], blob);
                if (write(fd, pad, bs) != (ssize_t)bs) die("write", strerror(errno));
            }
            close(fd);
            free(pad);
            sync();
            printf("file store %s: %d chunks (%.0f MiB); dd file: bs=%zu\n", uri, n,
                   (double)n * blob / 1048576, bs);
            printf("  %-9s %12s %14s %12s %17s %12s %8s\n", "in flight", "store MB/s",
                   "1 reader MB/s", "+verify MB/s", "verify after MB/s", "dd MB/s", "ratio");
            int passes = 1;
            for (size_t t = 0; t < 3; t++) {
                int T = INFLIGHT[t];
                double got[9], one[9], ver[9], after[9], dd[9];
                /* alternate the contenders so that drifts of the medium
                 * (a shared VM disk) hit both alike; report medians */
                for (int r = 0; r < rounds; r++) {
                    got[r] = run_loads(s, &cs, T, 0, seconds, NULL);
                    one[r] = run_loads(s1, &cs, T, 0, seconds, NULL);
                    ver[r] = run_loads(s, &cs, T, 1, seconds, NULL);
                    after[r] = run_loads(s, &cs, T, 2, seconds, NULL);
                    dd[r] = dd_direct(big, bs, n, T, passes);
                    if (n * (double)blob * passes / dd[r] < seconds * 0.7) {
                        passes = (int)(seconds * dd[r] / (n * (double)blob)) + 1;
                        dd[r] = dd_direct(big, bs, n, T, passes); /* about as long as ours */
                    }
                }
                double g = median(got, rounds), o = median(one, rounds), v = median(ver, rounds),
                       a = median(after, rounds), d = median(dd, rounds);
                printf("  %-9d %12.0f %14.0f %12.0f %17.0f %12.0f %8.2f\n", T, g / 1e6, o / 1e6,
                       v / 1e6, a / 1e6, d / 1e6, g / d);
            }
            cake_store_counters ctr;
            cake_store_counters_get(s, &ctr);
            printf("  counters: %llu hits, %llu misses, %llu corrupt, %.0f MB read\n",
                   (unsigned long long)ctr.hits, (unsigned long long)ctr.misses,
                   (unsigned long long)ctr.corrupt, ctr.bytes_read / 1e6);
            cake_store_close(s1);
            cake_store_close(s);
            unlink(big);
            char rm[4400];
            snprintf(rm, sizeof(rm), "rm -rf '%s/%s'", dir, sh->name);
            if (system(rm)) {
            }
            free_chunks(&cs);
        }

        if (do_redis) {
            if (system("command -v redis-server >/dev/null && command -v redis-benchmark "
                       ">/dev/null")) {
                printf("redis: skipped (redis-server or redis-benchmark not installed)\n");
            } else {
                int port = free_port(), port2 = free_port();
                if (start_redis(0, port) || start_redis(1, port2))
                    die("redis-server", "did not start");
                make_chunks(&cs, sh, 16);
                snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d", port);
                /* over TCP, over the unix socket, and over two servers */
                cake_store *s, *su, *s2;
                if (cake_store_open(uri, &s, err, sizeof(err))) die("open", err);
                char unix_uri[128], two_uri[128];
                snprintf(unix_uri, sizeof(unix_uri), "redis+unix://%s", redis_socket[0]);
                snprintf(two_uri, sizeof(two_uri), "redis://127.0.0.1:%d,127.0.0.1:%d", port,
                         port2);
                if (cake_store_open(unix_uri, &su, err, sizeof(err)) ||
                    cake_store_open(two_uri, &s2, err, sizeof(err)))
                    die("open", err);
                put_all(s, &cs);
                put_all(s2, &cs);
                printf("redis store %s: %d chunks on loopback; also by %s, and over %s\n", uri,
                       cs.n, unix_uri, two_uri);
                printf("  %-9s %12s %12s %14s %8s %12s %10s %12s %9s\n", "in flight", "store MB/s",
                       "+verify MB/s", "r-bench MB/s", "ratio", "unix MB/s", "unix/tcp",
                       "2 srv MB/s", "2 srv/1");
                for (size_t t = 0; t < 3; t++) {
                    int T = INFLIGHT[t];
                    double got[9], ver[9], rb[9], un[9], two[9];
                    for (int r = 0; r < rounds; r++) {
                        got[r] = run_loads(s, &cs, T, 0, seconds, NULL);
                        ver[r] = run_loads(s, &cs, T, 1, seconds, NULL);
                        un[r] = run_loads(su, &cs, T, 0, seconds, NULL);
                        two[r] = run_loads(s2, &cs, T, 0, seconds, NULL);
                        /* about `seconds` of GETs at the rate we just saw */
                        int nreq = (int)(got[r] * seconds / blob);
                        if (nreq < 20 * T) nreq = 20 * T;
                        rb[r] = redis_benchmark_get(port, blob, T, nreq) * blob;
                    }
                    double g = median(got, rounds), v = median(ver, rounds), b = median(rb, rounds),
                           u = median(un, rounds), w = median(two, rounds);
                    printf("  %-9d %12.0f %12.0f %14.0f %8.2f %12.0f %10.2f %12.0f %9.2f\n", T,
                           g / 1e6, v / 1e6, b / 1e6, b > 0 ? g / b : 0, u / 1e6, g > 0 ? u / g : 0,
                           w / 1e6, g > 0 ? w / g : 0);
                }
                cake_store_close(s2);
                cake_store_close(su);
                cake_store_close(s);
                stop_redis();
                free_chunks(&cs);
            }
        }

        if (do_emul) {
            make_chunks(&cs, sh, 8);
            const char *rates[] = {"2Gbit", "8Gbit"};
            printf("bw= emulation (mem store): achieved / set rate\n");
            printf("  %-7s %-9s %12s %12s %10s %14s %16s\n", "bw", "in flight", "set MB/s",
                   "got MB/s", "got/set", "per stream/set", "+verify got/set");
            for (int r = 0; r < 2; r++) {
                snprintf(uri, sizeof(uri), "mem:?bw=%s", rates[r]);
                cake_store *s;
                if (cake_store_open(uri, &s, err, sizeof(err))) die("open", err);
                put_all(s, &cs);
                double set;
                cake_parse_rate(rates[r], &set);
                for (size_t t = 0; t < 3; t++) {
                    int T = INFLIGHT[t];
                    double ps;
                    double got = run_loads(s, &cs, T, 0, seconds, &ps);
                    double ver = run_loads(s, &cs, T, 1, seconds, NULL);
                    printf("  %-7s %-9d %12.0f %12.0f %10.3f %14.3f %16.3f\n", rates[r], T,
                           set / 1e6, got / 1e6, got / set, ps / set, ver / set);
                }
                cake_store_close(s);
            }
            if (do_file) {
                snprintf(uri, sizeof(uri), "file:%s/emul?bw=4Gbit", dir);
                cake_store *s;
                if (cake_store_open(uri, &s, err, sizeof(err))) die("open", err);
                put_all(s, &cs);
                sync();
                double set;
                cake_parse_rate("4Gbit", &set);
                printf("bw= emulation over the file store (O_DIRECT), bw=4Gbit\n");
                for (size_t t = 0; t < 3; t++) {
                    int T = INFLIGHT[t];
                    double ps;
                    double got = run_loads(s, &cs, T, 0, seconds, &ps);
                    double ver = run_loads(s, &cs, T, 1, seconds, NULL);
                    printf("  %-7s %-9d %12.0f %12.0f %10.3f %14.3f %16.3f\n", "4Gbit", T,
                           set / 1e6, got / 1e6, got / set, ps / set, ver / set);
                }
                cake_store_close(s);
                char rm[4400];
                snprintf(rm, sizeof(rm), "rm -rf '%s/emul'", dir);
                if (system(rm)) {
                }
            }
            free_chunks(&cs);
        }
    }
    rmdir(dir);
    return 0;
}
