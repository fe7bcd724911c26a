/* file: one file per chunk, ROOT/ab/cd/<32 hex>.chunk (ab, cd = the key's
 * first two bytes: 65536 folders keep directories small at any store size).
 *
 * Publishing: a put writes ROOT/tmp/<host>.<pid>.<seq>.tmp and renames it over
 * the final name. rename() is atomic, so a reader (in this process or another,
 * even one that opened the file a moment before a replacement) sees the old
 * blob or the new one, never a part, and a writer killed mid-write leaves only
 * its temporary file, which the next open (or `cake store gc`) removes once its
 * writer is dead. No fsync by default: after a power loss a chunk may be lost
 * or read back short, which verification turns into a miss; fsync=1 makes a
 * put durable when it returns, at a large cost in write speed.
 *
 * Reads: with direct=1 (default) a get reads with O_DIRECT into the caller's
 * buffer when it is 4096-aligned and has room for the file rounded up to
 * 4096 bytes (the last block is requested whole and comes back short at end
 * of file), bypassing the page cache, unless the page cache holds the whole
 * chunk (cache=1, the default; mincore on a mapping of the file says so
 * without any I/O): then it is read through the cache, at memory speed (a
 * chunk put or read a moment ago, the common case of a repeated prompt: ~6
 * GB/s against ~0.9 for the VM's disk). A chunk partly cached is read from
 * the disk, which also keeps chunks read from the disk out of the cache.
 * cache=0: every read from the disk, to measure it. Other buffers, and
 * filesystems that refuse O_DIRECT (tmpfs), get buffered reads.
 *
 * Recency and capacity: a read sets the file's atime (at most once a minute
 * per file, with futimens, so noatime mounts work too); last use =
 * max(atime, mtime) survives restarts with no index on disk. With capacity=,
 * open scans the store once to build an in-memory LRU index (a startup cost;
 * gets, exists and puts never scan), and a put that would exceed the capacity
 * first removes the least recently used files. Before removing a file the
 * index thinks is oldest, its atime is checked, in case another process has
 * used it since. Several processes sharing a directory each enforce the
 * capacity over what they know; `cake store gc` enforces it exactly. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "store/lru.h"
#include "store/store_impl.h"
#include "util/fs.h"
#include "util/err.h"

#define ALIGN           4096
#define TMP_MAX_AGE_S   3600 /* temporary files of any writer older than this are leftovers */
#define ATIME_REFRESH_S 60

void (*cake_store_file_mid_write_hook)(void) = NULL;

typedef struct {
    char root[4096];
    char host[64];
    int fsync;
    _Atomic int direct;
    int cache;   /* cache=: a chunk wholly in the page cache is read through it */
    int readers; /* threads that read one big blob (readers=); 0: from the CPUs */
    int n_cpu;
    _Atomic int reading; /* gets reading a blob now */
    _Atomic uint64_t tmp_seq;
    uint64_t capacity;
    cake_store_atomic_counters *ctr;
    pthread_mutex_t mu; /* guards lru and pending (capacity only) */
    cake_lru lru;       /* node->stamp = last use (unix seconds) */
    uint64_t pending;   /* bytes of puts in progress */
} file_store;

static int path_of(const file_store *f, const cake_chunk_key *k, char *buf, size_t n) {
    char hex[33];
    cake_key_hex(k, hex);
    int w = snprintf(buf, n, "%s/%.2s/%.2s/%s.chunk", f->root, hex, hex + 2, hex);
    return w > 0 && (size_t)w < n ? 0 : -1;
}

/* After a chunk at path (root/ab/cd/<key>.chunk) is removed: its folders
 * too, when that left them empty (else a store that evicts keeps up to
 * 65,536 empty folders, ~270 MB on ext4, whatever its capacity). A put
 * that raced us into a folder removed here makes it again (file_put). */
static void remove_empty_folders(char *path) {
    for (int level = 0; level < 2; level++) {
        char *slash = strrchr(path, '/');
        if (!slash) return;
        *slash = '\0';
        if (rmdir(path) != 0) return; /* (not empty, mostly) */
    }
}

/* Unix seconds, from the clock that file times come from. time() reads a
 * coarse clock that can be a second behind the mtime of a file written just
 * before (Linux's fine-grained file times): a chunk we had just written then
 * looked used by another process since we noted it. */
static int64_t wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

static int64_t last_use(const struct stat *st) {
    return st->st_atime > st->st_mtime ? (int64_t)st->st_atime : (int64_t)st->st_mtime;
}

/* Parses "<32 hex>.chunk". */
static int chunk_name(const char *name, cake_chunk_key *k) {
    char hex[33];
    if (strlen(name) != 38 || strcmp(name + 32, ".chunk")) return -1;
    memcpy(hex, name, 32);
    hex[32] = '\0';
    return cake_key_parse(hex, k);
}

static int is_hex2(const char *s) {
    return strlen(s) == 2 && strspn(s, "0123456789abcdef") == 2;
}

/* Calls fn for every chunk file (fn returns nonzero to stop). */
static int file_iterate(void *st_, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen) {
    file_store *f = st_;
    DIR *d0 = opendir(f->root);
    if (!d0) return cake_err(err, errlen, "file store %s: %s", f->root, strerror(errno));
    int stop = 0;
    struct dirent *e0, *e1, *e2;
    while (!stop && (e0 = readdir(d0))) {
        if (!is_hex2(e0->d_name)) continue;
        char p1[4400];
        snprintf(p1, sizeof(p1), "%s/%s", f->root, e0->d_name);
        DIR *d1 = opendir(p1);
        if (!d1) continue;
        while (!stop && (e1 = readdir(d1))) {
            if (!is_hex2(e1->d_name)) continue;
            char p2[4700];
            snprintf(p2, sizeof(p2), "%s/%s", p1, e1->d_name);
            DIR *d2 = opendir(p2);
            if (!d2) continue;
            while (!stop && (e2 = readdir(d2))) {
                cake_store_entry ent;
                struct stat st;
                if (chunk_name(e2->d_name, &ent.key)) continue;
                if (fstatat(dirfd(d2), e2->d_name, &st, 0) != 0 || !S_ISREG(st.st_mode)) continue;
                ent.size = (uint64_t)st.st_size;
                ent.last_used = last_use(&st);
                stop = fn(&ent, ctx);
            }
            closedir(d2);
        }
        closedir(d1);
    }
    closedir(d0);
    return 0;
}

/* ---- temporary files ---- */

static void tmp_dir(const file_store *f, char *buf, size_t n) {
    snprintf(buf, n, "%s/tmp", f->root);
}

/* A temporary file is a leftover when its writer is gone: same host and the
 * pid is dead, or it is older than TMP_MAX_AGE_S (another host, or a reused
 * pid). Names are <host>.<pid>.<seq>.tmp; hosts have no '.' (see open). */
static int tmp_is_stale(const file_store *f, const char *name, const struct stat *st) {
    if (time(NULL) - st->st_mtime > TMP_MAX_AGE_S) return 1;
    const char *dot = strchr(name, '.');
    if (!dot || (size_t)(dot - name) != strlen(f->host) || strncmp(name, f->host, strlen(f->host)))
        return 0;
    char *end;
    long pid = strtol(dot + 1, &end, 10);
    if (end == dot + 1 || *end != '.' || pid <= 0 || pid > INT_MAX) return 0;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

static void clean_tmp(file_store *f) {
    char dir[4200];
    tmp_dir(f, dir, sizeof(dir));
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        struct stat st;
        if (n < 5 || strcmp(e->d_name + n - 4, ".tmp")) continue;
        if (fstatat(dirfd(d), e->d_name, &st, 0) != 0 || !S_ISREG(st.st_mode)) continue;
        if (tmp_is_stale(f, e->d_name, &st)) unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
}

/* ---- capacity index ---- */

static void index_note(file_store *f, const cake_chunk_key *k, uint64_t size, int64_t stamp) {
    if (!f->capacity) return;
    pthread_mutex_lock(&f->mu);
    cake_lru_node *n = cake_lru_find(&f->lru, k);
    if (n) {
        cake_lru_resize(&f->lru, n, size);
        cake_lru_touch(&f->lru, n);
        n->stamp = stamp;
    } else {
        cake_lru_insert(&f->lru, k, size, stamp, NULL); /* out of memory: just not tracked */
    }
    pthread_mutex_unlock(&f->mu);
}

static void index_forget(file_store *f, const cake_chunk_key *k) {
    if (!f->capacity) return;
    pthread_mutex_lock(&f->mu);
    cake_lru_node *n = cake_lru_find(&f->lru, k);
    if (n) cake_lru_remove(&f->lru, n);
    pthread_mutex_unlock(&f->mu);
}

/* Under f->mu: removes the least recently used chunk other than keep.
 * Returns 0 when there is nothing left to remove. */
static int evict_one(file_store *f, const cake_chunk_key *keep) {
    for (size_t tries = f->lru.n; tries > 0; tries--) {
        cake_lru_node *v = cake_lru_oldest(&f->lru);
        if (!v) return 0;
        char path[4400];
        struct stat st;
        path_of(f, &v->key, path, sizeof(path));
        if (cake_key_equal(&v->key, keep) || (stat(path, &st) == 0 && last_use(&st) > v->stamp)) {
            /* Being replaced, or used by another process since we looked. */
            if (!cake_key_equal(&v->key, keep)) v->stamp = last_use(&st);
            cake_lru_touch(&f->lru, v);
            continue;
        }
        if (unlink(path) == 0) {
            atomic_fetch_add(&f->ctr->evictions, 1);
            remove_empty_folders(path);
        }
        cake_lru_remove(&f->lru, v);
        return 1;
    }
    return 0;
}

/* ---- reading a blob ---- */

/* One thread copies a page-cache-resident blob at 3-6 GB/s, slower than the
 * links cake is meant for (56-100 Gbit/s = 7-12.5 GB/s; a 13B chunk of 512
 * tokens is 419 MB), and the check (XXH3 of the payload, ~15 GB/s) comes on
 * top. Pieces are 16 MiB, or 1/64 of a blob over 1 GiB. A blob of two pieces
 * or more is therefore read by several threads that take the pieces in order:
 * the CPUs left to each of the gets in progress, at most 4, or readers=. With
 * three readers or more, the calling thread instead feeds the finished pieces
 * to the payload hash, in order, as they land. The last piece is left to the
 * store front, which hashes it after the (emulated) transfer: the work that
 * remains once the last byte is in. A thread costs tens of microseconds
 * against the milliseconds a piece takes. */
#define PIECE_MIN       (16u << 20) /* a multiple of ALIGN, for O_DIRECT */
#define PIECES_MAX      64          /* bigger blobs get bigger pieces */
#define READERS_DEFAULT 4           /* beyond it, a 2-16 core host gains little */

typedef struct {
    int fd;
    char *buf;
    size_t size, piece; /* piece: bytes per piece, a multiple of ALIGN */
    int n_pieces;
    atomic_int next;   /* the next piece to read */
    atomic_int direct; /* O_DIRECT reads (cleared if the filesystem refuses them) */
    atomic_int refused;
    pthread_mutex_t mu; /* guards the rest; cv: a piece is done */
    pthread_cond_t cv;
    size_t got[PIECES_MAX]; /* per piece: bytes read */
    char done[PIECES_MAX];  /* per piece: read (got says how much) */
    int err;                /* errno of the first failed read */
} blob_read;

static size_t piece_end(const blob_read *r, int i) {
    const size_t end = (size_t)(i + 1) * r->piece;
    return end < r->size ? end : r->size;
}

/* Reads piece i, or up to end of file; O_DIRECT reads ask for whole blocks
 * (the last one comes back short at end of file). */
static void read_piece(blob_read *r, int i) {
    const size_t off = (size_t)i * r->piece, end = piece_end(r, i);
    size_t got = 0;
    int err = 0;
    while (off + got < end) {
        const int direct = atomic_load(&r->direct);
        size_t want = end - off - got;
        if (direct) want = cake_store_buffer_size(want);
        ssize_t n = pread(r->fd, r->buf + off + got, want, (off_t)(off + got));
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EINVAL && direct) { /* refused after all: read through the cache */
                fcntl(r->fd, F_SETFL, fcntl(r->fd, F_GETFL) & ~O_DIRECT);
                atomic_store(&r->direct, 0);
                atomic_store(&r->refused, 1);
                continue;
            }
            err = errno;
            break;
        }
        if (n == 0) break; /* shorter than it was: verification will say so */
        got += (size_t)n;
    }
    pthread_mutex_lock(&r->mu);
    r->got[i] = got;
    r->done[i] = 1;
    if (err && !r->err) r->err = err;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void *reader_main(void *arg) {
    blob_read *r = arg;
    for (int i; (i = atomic_fetch_add(&r->next, 1)) < r->n_pieces;) read_piece(r, i);
    return NULL;
}

/* Feeds pieces 0 .. n_pieces - 2 to hash as they land, stopping at a short one. */
static void hash_pieces(blob_read *r, cake_payload_hash *hash) {
    for (int i = 0; i + 1 < r->n_pieces; i++) {
        pthread_mutex_lock(&r->mu);
        while (!r->done[i]) pthread_cond_wait(&r->cv, &r->mu);
        const int whole = !r->err && r->got[i] == piece_end(r, i) - (size_t)i * r->piece;
        pthread_mutex_unlock(&r->mu);
        if (!whole) return;
        cake_payload_hash_feed(hash, r->buf, (size_t)i * r->piece, piece_end(r, i));
    }
}

/* Reads the size-byte file into buf (see above); hash may be NULL. *len = the
 * bytes read from the start with no gap; *refused_direct is set when the
 * filesystem refused O_DIRECT after all. Returns 0 or the errno of a failed
 * read. */
static int read_blob(int fd, char *buf, size_t size, int direct, int readers,
                     cake_payload_hash *hash, size_t *len, int *refused_direct) {
    blob_read r = {.fd = fd,
                   .buf = buf,
                   .size = size,
                   .mu = PTHREAD_MUTEX_INITIALIZER,
                   .cv = PTHREAD_COND_INITIALIZER};
    const size_t per = ((size + PIECES_MAX - 1) / PIECES_MAX + ALIGN - 1) / ALIGN * ALIGN;
    r.piece = per > PIECE_MIN ? per : PIECE_MIN;
    r.n_pieces = size ? (int)((size + r.piece - 1) / r.piece) : 1;
    atomic_init(&r.next, 0);
    atomic_init(&r.direct, direct);
    atomic_init(&r.refused, 0);
    /* readers - 1 helpers; this thread hashes, or reads too. Hashing while
     * reading pays when at least two threads still read: with fewer CPUs,
     * reading with all of them and hashing after is as fast (2-core VM). */
    const int hashing = hash && r.n_pieces > 1 && readers >= 3;
    int want = r.n_pieces < 2 ? 0 : readers - 1;
    if (want > r.n_pieces) want = r.n_pieces;
    pthread_t th[CAKE_STORE_READERS_MAX];
    int started = 0;
    while (started < want && pthread_create(&th[started], NULL, reader_main, &r) == 0) started++;
    if (hashing && started) hash_pieces(&r, hash);
    reader_main(&r); /* whatever no helper has taken yet (all of it without helpers) */
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);

    *refused_direct |= atomic_load(&r.refused);
    *len = 0;
    for (int i = 0; i < r.n_pieces; i++) {
        *len = (size_t)i * r.piece + r.got[i];
        if (*len < piece_end(&r, i)) break; /* a gap from here on */
    }
    pthread_cond_destroy(&r.cv);
    pthread_mutex_destroy(&r.mu);
    return r.err;
}

/* Whether the page cache holds every page of the size-byte file fd (no I/O:
 * mincore on a mapping that is never touched). 0 where mincore cannot say
 * (a file this process may not write reports only its own mapped pages). */
static int whole_file_cached(int fd, size_t size) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), n = (size + page - 1) / page;
    if (!size) return 0;
    void *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) return 0;
    unsigned char *vec = malloc(n);
    int all = vec && mincore(map, size, vec) == 0;
    for (size_t i = 0; all && i < n; i++) all = vec[i] & 1;
    free(vec);
    munmap(map, size);
    return all;
}

/* ---- operations ---- */

static int file_get(void *st_, const cake_chunk_key *k, void *buf, size_t cap, size_t *len,
                    cake_payload_hash *hash, char *err, size_t errlen) {
    file_store *f = st_;
    char path[4400];
    if (path_of(f, k, path, sizeof(path)))
        return cake_err(err, errlen, "file store: path too long");
    int direct =
        atomic_load_explicit(&f->direct, memory_order_relaxed) && ((uintptr_t)buf % ALIGN) == 0;
    /* (O_NONBLOCK: a FIFO put where a chunk was would block the open; on a
     * regular file it changes nothing) */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | (direct ? O_DIRECT : 0));
    if (fd < 0 && direct && errno == EINVAL) { /* filesystem without O_DIRECT */
        atomic_store(&f->direct, 0);
        direct = 0;
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    }
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) return 1;
        cake_err(err, errlen, "file store: open %s: %s", path, strerror(errno));
        return CAKE_STORE_GET_FAILED;
    }
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0) {
        cake_err(err, errlen, "file store: stat %s: %s", path, strerror(errno));
        rc = CAKE_STORE_GET_FAILED;
        goto done;
    }
    if (!S_ISREG(st.st_mode)) { /* (a read of a FIFO or a device could wait forever) */
        cake_err(err, errlen, "file store: %s is not a regular file", path);
        rc = CAKE_STORE_GET_FAILED;
        goto done;
    }
    size_t size = (size_t)st.st_size;
    if (size > cap) {
        rc = cake_err(err, errlen, "file store: %s is %zu bytes, buffer has %zu", path, size, cap);
        goto done;
    }
    if (direct &&
        (cake_store_buffer_size(size) > cap || (f->cache && whole_file_cached(fd, size)))) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_DIRECT);
        direct = 0;
    }
    /* Threads beyond the CPUs only add switching: concurrent gets share them. */
    const int active = atomic_fetch_add(&f->reading, 1) + 1;
    int readers = f->n_cpu / active;
    if (readers > READERS_DEFAULT) readers = READERS_DEFAULT;
    if (f->readers) readers = f->readers; /* readers= decides */
    size_t done = 0;
    int refused = 0;
    int e = read_blob(fd, buf, size, direct, readers > 1 ? readers : 1, hash, &done, &refused);
    atomic_fetch_sub(&f->reading, 1);
    if (refused) atomic_store(&f->direct, 0); /* refused after all: remember */
    if (e) {
        cake_err(err, errlen, "file store: read %s: %s", path, strerror(e));
        rc = CAKE_STORE_GET_FAILED;
        goto done;
    }
    *len = done;
    const time_t now = (time_t)wall_seconds();
    if (st.st_atime + ATIME_REFRESH_S < now) {
        const struct timespec ts[2] = {{now, 0}, {0, UTIME_OMIT}};
        futimens(fd, ts); /* best effort: a read-only store still serves */
    }
    index_note(f, k, size, (int64_t)now);
done:
    close(fd);
    return rc;
}

static int file_head(void *st_, const cake_chunk_key *k, void *buf, size_t n, size_t *len,
                     uint64_t *total, char *err, size_t errlen) {
    file_store *f = st_;
    char path[4400];
    if (path_of(f, k, path, sizeof(path)))
        return cake_err(err, errlen, "file store: path too long");
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* (as file_get) */
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) return 1;
        return cake_err(err, errlen, "file store: open %s: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        const int e = errno;
        close(fd);
        return cake_err(err, errlen, "file store: stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return cake_err(err, errlen, "file store: %s is not a regular file", path);
    }
    *total = (uint64_t)st.st_size;
    ssize_t got;
    do got = pread(fd, buf, n, 0);
    while (got < 0 && errno == EINTR);
    const int e = errno;
    close(fd);
    if (got < 0) return cake_err(err, errlen, "file store: read %s: %s", path, strerror(e));
    *len = (size_t)got;
    return 0;
}

static int write_all(int fd, const char *p, size_t len) {
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) {
            errno = ENOSPC;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int file_put(void *st_, const cake_chunk_key *k, const void *blob, size_t len, char *err,
                    size_t errlen) {
    file_store *f = st_;
    char path[4400], tmp[4400], hex[33];
    cake_key_hex(k, hex);
    if (path_of(f, k, path, sizeof(path)))
        return cake_err(err, errlen, "file store: path too long");
    if (f->capacity) {
        if (len > f->capacity)
            return cake_err(err, errlen,
                            "file store %s: chunk %s (%zu bytes) exceeds the capacity "
                            "(%llu)",
                            f->root, hex, len, (unsigned long long)f->capacity);
        pthread_mutex_lock(&f->mu);
        cake_lru_node *old = cake_lru_find(&f->lru, k);
        uint64_t old_size = old ? old->size : 0;
        while (f->lru.bytes - old_size + f->pending + len > f->capacity && evict_one(f, k)) {
        }
        f->pending += len;
        pthread_mutex_unlock(&f->mu);
    }
    snprintf(tmp, sizeof(tmp), "%s/tmp/%s.%ld.%llu.tmp", f->root, f->host, (long)getpid(),
             (unsigned long long)atomic_fetch_add(&f->tmp_seq, 1));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ENOENT) { /* tmp/ was removed: recreate it */
        char dir[4200];
        tmp_dir(f, dir, sizeof(dir));
        cake_mkdir_p(dir);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    }
    int rc = 0;
    const char *what = "create";
    if (fd < 0) goto fail;
    what = "write";
    if (cake_store_file_mid_write_hook) {
        size_t half = len / 2;
        if (write_all(fd, blob, half)) goto fail;
        cake_store_file_mid_write_hook();
        if (write_all(fd, (const char *)blob + half, len - half)) goto fail;
    } else if (write_all(fd, blob, len)) {
        goto fail;
    }
    what = "fsync";
    if (f->fsync && fsync(fd) != 0) goto fail;
    what = "close";
    int c = close(fd);
    fd = -1;
    if (c != 0) goto fail;
    what = "rename";
    /* Its folder made where missing; a few times, as an eviction may remove
     * it again as it empties (remove_empty_folders) */
    for (int tries = 0; rename(tmp, path) != 0; tries++) {
        if (errno != ENOENT || tries == 8) goto fail;
        char dir[4400];
        snprintf(dir, sizeof(dir), "%s/%.2s/%.2s", f->root, hex, hex + 2);
        cake_mkdir_p(dir); /* (its parent may go as it is made: the rename tells) */
    }
    if (f->fsync) { /* make the rename itself durable */
        char dir[4400];
        snprintf(dir, sizeof(dir), "%s/%.2s/%.2s", f->root, hex, hex + 2);
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    goto out;
fail:;
    int e = errno;
    if (fd >= 0) close(fd);
    unlink(tmp);
    rc = cake_err(err, errlen, "file store %s: chunk %s: %s %s: %s", f->root, hex, what, tmp,
                  strerror(e));
out:
    if (f->capacity) {
        /* (noted before it leaves pending: counted twice for a moment, never
         * in neither, or another put could skip an eviction it needed) */
        if (rc == 0) index_note(f, k, len, wall_seconds());
        pthread_mutex_lock(&f->mu);
        f->pending -= len;
        pthread_mutex_unlock(&f->mu);
    }
    return rc;
}

static int file_exists(void *st_, const cake_chunk_key *keys, size_t n, uint8_t *present, char *err,
                       size_t errlen) {
    file_store *f = st_;
    for (size_t i = 0; i < n; i++) {
        char path[4400];
        struct stat st;
        if (path_of(f, &keys[i], path, sizeof(path)))
            return cake_err(err, errlen, "file store: path too long");
        present[i] =
            stat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= CAKE_CHUNK_HEADER_SIZE;
    }
    return 0;
}

static int file_del(void *st_, const cake_chunk_key *k, char *err, size_t errlen) {
    file_store *f = st_;
    char path[4400];
    if (path_of(f, k, path, sizeof(path)))
        return cake_err(err, errlen, "file store: path too long");
    index_forget(f, k);
    if (unlink(path) == 0) {
        remove_empty_folders(path);
        return 0;
    }
    if (errno == ENOENT || errno == ENOTDIR) return 1;
    return cake_err(err, errlen, "file store: remove %s: %s", path, strerror(errno));
}

static int file_usage(void *st_, cake_store_usage *u, char *err, size_t errlen) {
    file_store *f = st_;
    u->capacity = f->capacity;
    return cake_store_backend_count(&cake_store_file_ops, f, u, err, errlen);
}

static int file_gc(void *st_, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed,
                   char *err, size_t errlen) {
    file_store *f = st_;
    clean_tmp(f);
    if (target == UINT64_MAX) return 0;
    cake_store_entry *e;
    size_t n;
    uint64_t bytes;
    if (cake_store_backend_by_age(&cake_store_file_ops, f, &e, &n, &bytes, err, errlen)) return -1;
    size_t failed = 0; /* (the first one's reason in err) */
    for (size_t i = 0; i < n && bytes > target; i++) {
        char path[4400];
        path_of(f, &e[i].key, path, sizeof(path));
        index_forget(f, &e[i].key);
        if (unlink(path) == 0) {
            (*n_evicted)++;
            *bytes_freed += e[i].size;
            remove_empty_folders(path);
        } else if (errno != ENOENT && !failed++) { /* (gone meanwhile: as good as removed) */
            cake_err(err, errlen, "file store: cannot remove %s: %s", path, strerror(errno));
        }
        bytes -= e[i].size;
    }
    free(e);
    if (failed > 1) {
        const size_t len = strlen(err);
        snprintf(err + len, errlen - len, " (and %zu more)", failed - 1);
    }
    return failed ? -1 : 0;
}

static void file_close(void *st_) {
    file_store *f = st_;
    if (!f) return;
    if (f->capacity) {
        cake_lru_free(&f->lru, NULL);
        pthread_mutex_destroy(&f->mu);
    }
    free(f);
}

int cake_store_file_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                         char *err, size_t errlen) {
    file_store *f = calloc(1, sizeof(*f));
    if (!f) return cake_err(err, errlen, "file store: out of memory");
    size_t n = strlen(p->path);
    while (n > 1 && p->path[n - 1] == '/') n--; /* "dir/" and "dir" are one store */
    memcpy(f->root, p->path, n);
    f->root[n] = '\0';
    f->fsync = p->fsync;
    atomic_init(&f->direct, p->direct);
    f->cache = p->cache;
    const long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    f->n_cpu = n_cpu < 1 ? 1 : n_cpu > 1024 ? 1024 : (int)n_cpu;
    f->readers = p->readers;
    atomic_init(&f->reading, 0);
    atomic_init(&f->tmp_seq, 0);
    f->capacity = p->capacity;
    f->ctr = ctr;
    if (gethostname(f->host, sizeof(f->host)) != 0 || !f->host[0]) strcpy(f->host, "localhost");
    f->host[sizeof(f->host) - 1] = '\0';
    for (char *c = f->host; *c; c++)
        if (*c == '.' || *c == '/') *c = '_';

    char dir[4200];
    struct stat st;
    tmp_dir(f, dir, sizeof(dir));
    if (cake_mkdir_p(f->root) != 0 && !(stat(f->root, &st) == 0 && S_ISDIR(st.st_mode))) {
        int e = errno;
        free(f);
        return cake_err(err, errlen, "file store %s: cannot create the directory: %s", p->path,
                        strerror(e));
    }
    if (stat(f->root, &st) != 0 || !S_ISDIR(st.st_mode)) {
        free(f);
        return cake_err(err, errlen, "file store %s: not a directory", p->path);
    }
    mkdir(dir, 0755); /* may fail on a read-only store: gets still work */
    clean_tmp(f);

    if (f->capacity) {
        if (cake_lru_init(&f->lru)) {
            free(f);
            return cake_err(err, errlen, "file store: out of memory");
        }
        pthread_mutex_init(&f->mu, NULL);
        cake_store_entry *e;
        size_t n_entries;
        uint64_t bytes;
        if (cake_store_backend_by_age(&cake_store_file_ops, f, &e, &n_entries, &bytes, err,
                                      errlen)) {
            file_close(f);
            return -1;
        }
        /* Oldest first, each as the most recent: the newest ends up first. */
        for (size_t i = 0; i < n_entries; i++)
            cake_lru_insert(&f->lru, &e[i].key, e[i].size, e[i].last_used, NULL);
        free(e);
    }
    *out = f;
    return 0;
}

const cake_store_ops cake_store_file_ops = {
    .kind = "file",
    .get = file_get,
    .head = file_head,
    .put = file_put,
    .exists = file_exists,
    .del = file_del,
    .iterate = file_iterate,
    .usage = file_usage,
    .gc = file_gc,
    .close = file_close,
};
