/* The file store against real files: round trips, persistence, O_DIRECT and
 * buffered reads, capacity + LRU across restarts, gc, and the faults: bad
 * bytes on disk, truncation, foreign chunks, a file vanishing between exists
 * and get, a full disk, concurrent writers of one key, writers killed with
 * SIGKILL. Every fault must end as a miss (never wrong data, never a crash)
 * with the store still usable. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "store/store_impl.h"
#include "test_store_common.h"
#include "util/fs.h"

typedef struct {
    char *dir;
    char uri[4200];
    cake_store *s;
    cake_kv_cache kv, out;
    cake_chunk_header h[8]; /* chunks 0..7 of one prompt */
    void *blob[8];
    size_t len;
    void *buf; /* aligned staging buffer */
    size_t cap;
} fx;

static int setup(void **state) {
    fx *f = calloc(1, sizeof(*f));
    f->dir = t_mkdtemp();
    snprintf(f->uri, sizeof(f->uri), "file:%s/store", f->dir);
    char err[512];
    if (cake_store_open(f->uri, &f->s, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    if (t_kv_init(&f->kv, CAKE_KV_F16) || t_kv_init(&f->out, CAKE_KV_F16)) return -1;
    t_fill_kv(&f->kv, 11);
    for (int i = 0; i < 8; i++) {
        f->h[i] = t_header((uint32_t)i, 1, CAKE_KV_F16);
        f->blob[i] = t_blob(&f->h[i], &f->kv, i * T_CHUNK, &f->len);
    }
    f->cap = cake_store_buffer_size(f->len);
    f->buf = cake_store_alloc_buffer(f->cap);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    cake_store_close(f->s);
    for (int i = 0; i < 8; i++) cake_store_free_buffer(f->blob[i]);
    cake_store_free_buffer(f->buf);
    cake_kv_cache_free(&f->kv);
    cake_kv_cache_free(&f->out);
    t_rm_rf(f->dir);
    free(f->dir);
    free(f);
    return 0;
}

static void chunk_path(fx *f, const cake_chunk_key *k, char *out, size_t n) {
    char hex[33];
    cake_key_hex(k, hex);
    snprintf(out, n, "%s/store/%.2s/%.2s/%s.chunk", f->dir, hex, hex + 2, hex);
}

static void put_ok(fx *f, int i) {
    char err[512];
    if (cake_store_put(f->s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err)))
        fail_msg("put %d: %s", i, err);
}

/* get_verified must hit and return exactly blob i. */
static void expect_hit(fx *f, int i) {
    char err[512];
    size_t len = 0;
    int rc = cake_store_get_verified(f->s, &f->h[i], f->buf, f->cap, &len, err, sizeof(err));
    if (rc != 0) fail_msg("chunk %d: expected a hit, got %d: %s", i, rc, err);
    assert_int_equal(len, f->len);
    assert_memory_equal(f->buf, f->blob[i], f->len);
}

/* get_verified must miss; want (if not NULL) must be in the message. */
static void expect_miss(fx *f, int i, const char *want) {
    char err[512] = "";
    size_t len = 1;
    int rc = cake_store_get_verified(f->s, &f->h[i], f->buf, f->cap, &len, err, sizeof(err));
    if (rc != 1) fail_msg("chunk %d: expected a miss, got %d: %s", i, rc, err);
    assert_int_equal(len, 0);
    if (want && !strstr(err, want)) fail_msg("chunk %d: miss should say '%s': %s", i, want, err);
}

static int count_files(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* The chunk folders (root/ab/cd) of the store: every folder under the
 * root but tmp/, at both levels. */
static int count_chunk_folders(const fx *f) {
    char root[4200], sub[4500];
    snprintf(root, sizeof(root), "%s/store", f->dir);
    DIR *d = opendir(root);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.' || !strcmp(e->d_name, "tmp")) continue;
        snprintf(sub, sizeof(sub), "%s/%s", root, e->d_name);
        const int in = count_files(sub);
        if (in >= 0) n += 1 + in;
    }
    closedir(d);
    return n;
}

static void test_roundtrip(void **state) {
    fx *f = *state;
    char err[512], path[4400];
    uint8_t present[8];
    assert_int_equal(cake_store_exists(f->s, &f->h[0].key, 1, present, err, sizeof(err)), 0);
    assert_int_equal(present[0], 0);
    expect_miss(f, 0, NULL);
    for (int i = 0; i < 4; i++) put_ok(f, i);
    cake_chunk_key keys[8];
    for (int i = 0; i < 8; i++) keys[i] = f->h[i].key;
    assert_int_equal(cake_store_exists(f->s, keys, 8, present, err, sizeof(err)), 0);
    for (int i = 0; i < 8; i++) assert_int_equal(present[i], i < 4);
    chunk_path(f, &f->h[2].key, path, sizeof(path));
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, (off_t)f->len);
    char tmpdir[4200];
    snprintf(tmpdir, sizeof(tmpdir), "%s/store/tmp", f->dir);
    assert_int_equal(count_files(tmpdir), 0);
    for (int i = 0; i < 4; i++) expect_hit(f, i);

    /* raw get with a plain malloc'd buffer of the exact size: buffered path */
    void *plain = malloc(f->len + 1);
    size_t len;
    assert_int_equal(
        cake_store_get(f->s, &f->h[1].key, (char *)plain + 1, f->len, &len, err, sizeof(err)), 0);
    assert_memory_equal((char *)plain + 1, f->blob[1], f->len);
    /* too small a buffer is the caller's error, not a miss */
    assert_int_equal(cake_store_get(f->s, &f->h[1].key, plain, f->len - 1, &len, err, sizeof(err)),
                     -1);
    free(plain);

    /* load into a KV cache */
    t_fill_kv(&f->out, 99);
    assert_int_equal(
        cake_store_load(f->s, &f->h[3], f->buf, f->cap, &f->out, 3 * T_CHUNK, err, sizeof(err)), 0);
    assert_int_equal(t_kv_cmp_range(&f->kv, 3 * T_CHUNK, &f->out, 3 * T_CHUNK, T_CHUNK), 0);

    /* save = encode + put */
    cake_chunk_header h = f->h[5];
    assert_int_equal(
        cake_store_save(f->s, &h, &f->kv, 5 * T_CHUNK, f->buf, f->cap, err, sizeof(err)), 0);
    expect_hit(f, 5);

    cake_store_usage u;
    assert_int_equal(cake_store_usage_get(f->s, &u, err, sizeof(err)), 0);
    assert_int_equal(u.n_chunks, 5);
    assert_int_equal(u.bytes, 5 * f->len);

    assert_int_equal(cake_store_del(f->s, &f->h[0].key, err, sizeof(err)), 0);
    assert_int_equal(cake_store_del(f->s, &f->h[0].key, err, sizeof(err)), 1);
    expect_miss(f, 0, NULL);

    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.hits, 4 + 1 + 1 + 1);
    assert_int_equal(c.misses, 2);
    assert_int_equal(c.corrupt, 0);
    assert_int_equal(c.errors, 0);
    assert_int_equal(c.puts, 5);
    assert_int_equal(c.bytes_written, 5 * f->len);
    assert_int_equal(c.bytes_read, 7 * f->len);
    assert_true(c.read_ns > 0);

    /* survives a restart, with no rebuild */
    cake_store_close(f->s);
    assert_int_equal(cake_store_open(f->uri, &f->s, err, sizeof(err)), 0);
    for (int i = 1; i < 4; i++) expect_hit(f, i);
    /* buffered reads (direct=0) give the same */
    cake_store *s2;
    char uri2[4300];
    snprintf(uri2, sizeof(uri2), "%s?direct=0", f->uri);
    assert_int_equal(cake_store_open(uri2, &s2, err, sizeof(err)), 0);
    assert_int_equal(cake_store_get_verified(s2, &f->h[2], f->buf, f->cap, &len, err, sizeof(err)),
                     0);
    assert_memory_equal(f->buf, f->blob[2], f->len);
    cake_store_close(s2);
}

typedef struct {
    const char *cap_uri;
} iter_ctx;

static int count_entry(const cake_store_entry *e, void *ctx) {
    int *n = ctx;
    (*n)++;
    assert_true(e->size > 0);
    assert_true(e->last_used > 0);
    return 0;
}

static void test_iterate_and_head(void **state) {
    fx *f = *state;
    char err[512];
    for (int i = 0; i < 6; i++) put_ok(f, i);
    int n = 0;
    assert_int_equal(cake_store_iterate(f->s, count_entry, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 6);
    uint8_t hdr[CAKE_CHUNK_HEADER_SIZE];
    size_t len;
    uint64_t total;
    assert_int_equal(
        cake_store_head(f->s, &f->h[4].key, hdr, sizeof(hdr), &len, &total, err, sizeof(err)), 0);
    assert_int_equal(len, sizeof(hdr));
    assert_int_equal(total, f->len);
    cake_chunk_header h;
    assert_int_equal(cake_chunk_parse_header(hdr, len, &h, err, sizeof(err)), 0);
    assert_int_equal(h.index, 4);
    assert_int_equal(
        cake_store_head(f->s, &f->h[7].key, hdr, sizeof(hdr), &len, &total, err, sizeof(err)), 1);
}

/* A chunk's file to write by hand, its folders made first: a store removes
 * them as they empty (a corrupt chunk it dropped). */
static FILE *create_chunk_file(const char *path) {
    char dir[4400];
    snprintf(dir, sizeof(dir), "%s", path);
    *strrchr(dir, '/') = '\0';
    assert_int_equal(cake_mkdir_p(dir), 0);
    return fopen(path, "wb");
}

/* Rewrites the file of chunk i with bytes. */
static void write_file(fx *f, int i, const void *bytes, size_t n) {
    char path[4400];
    chunk_path(f, &f->h[i].key, path, sizeof(path));
    FILE *fp = create_chunk_file(path);
    assert_non_null(fp);
    assert_int_equal(fwrite(bytes, 1, n, fp), n);
    fclose(fp);
}

static void test_fault_bad_bytes(void **state) {
    fx *f = *state;
    uint8_t *bad = malloc(f->len + 16);
    uint64_t corrupt = 0;
    cake_store_counters c;
    /* one flipped byte: in the payload, and in each header field */
    size_t offs[] = {0,  8,  12, 16, 32,  48,  52,  56,  60,         64,
                     68, 72, 80, 88, 100, 120, 128, 129, f->len / 2, f->len - 1};
    for (size_t j = 0; j < sizeof(offs) / sizeof(offs[0]); j++) {
        put_ok(f, 0);
        memcpy(bad, f->blob[0], f->len);
        bad[offs[j]] ^= 0x04;
        write_file(f, 0, bad, f->len);
        expect_miss(f, 0, offs[j] >= 128 ? "payload checksum" : NULL);
        cake_store_counters_get(f->s, &c);
        assert_int_equal(c.corrupt, ++corrupt);
        /* the bad chunk was removed; the store still works */
        expect_miss(f, 0, NULL);
        assert_int_equal(c.corrupt, corrupt);
        put_ok(f, 0);
        expect_hit(f, 0);
    }
    for (int i = 1; i < 4; i++) put_ok(f, i);
    /* truncation at several offsets */
    size_t cuts[] = {0, 1, 64, 127, 128, 1000, f->len / 2, f->len - 1};
    for (size_t j = 0; j < sizeof(cuts) / sizeof(cuts[0]); j++) {
        write_file(f, 1, f->blob[1], cuts[j]);
        expect_miss(f, 1, cuts[j] ? "truncated" : NULL);
        put_ok(f, 1);
        expect_hit(f, 1);
    }
    /* trailing garbage */
    memcpy(bad, f->blob[1], f->len);
    write_file(f, 1, bad, f->len + 16);
    expect_miss(f, 1, NULL);
    /* a chunk of another model under this key */
    cake_chunk_header h = f->h[2];
    h.fingerprint[0] ^= 1;
    h.created = 0;
    size_t len;
    void *foreign = t_blob(&h, &f->kv, 2 * T_CHUNK, &len);
    write_file(f, 2, foreign, len);
    expect_miss(f, 2, "fingerprint");
    cake_store_free_buffer(foreign);
    /* a chunk of another chunk size (smaller: fits the buffer) */
    h = f->h[2];
    h.n_tokens = T_CHUNK / 2;
    h.created = 0;
    foreign = t_blob(&h, &f->kv, 2 * T_CHUNK, &len);
    write_file(f, 2, foreign, len);
    expect_miss(f, 2, "token count");
    cake_store_free_buffer(foreign);
    /* and a bigger one than this chunk can be: also a corrupt miss */
    h = f->h[2];
    h.n_tokens = T_CHUNK * 2;
    h.created = 0;
    foreign = t_blob(&h, &f->kv, 2 * T_CHUNK, &len);
    write_file(f, 2, foreign, len);
    expect_miss(f, 2, NULL);
    cake_store_free_buffer(foreign);
    /* the load path leaves the cache untouched on every such miss */
    t_fill_kv(&f->out, 5);
    cake_kv_cache ref;
    assert_int_equal(t_kv_init(&ref, CAKE_KV_F16), 0);
    t_fill_kv(&ref, 5);
    memcpy(bad, f->blob[3], f->len);
    bad[f->len - 3] ^= 1;
    write_file(f, 3, bad, f->len);
    char err[512];
    assert_int_equal(
        cake_store_load(f->s, &f->h[3], f->buf, f->cap, &f->out, 3 * T_CHUNK, err, sizeof(err)), 1);
    assert_memory_equal(f->out.base, ref.base, ref.map_bytes);
    cake_kv_cache_free(&ref);
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.errors, 0);
    free(bad);
}

static void test_fault_deleted_between_exists_and_get(void **state) {
    fx *f = *state;
    char err[512], path[4400];
    put_ok(f, 4);
    uint8_t present;
    assert_int_equal(cake_store_exists(f->s, &f->h[4].key, 1, &present, err, sizeof(err)), 0);
    assert_int_equal(present, 1);
    chunk_path(f, &f->h[4].key, path, sizeof(path));
    assert_int_equal(unlink(path), 0);
    expect_miss(f, 4, NULL);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 0);
    assert_int_equal(c.errors, 0);
    /* and the whole folder tree gone: still a miss, and puts recreate it */
    char root[4200];
    snprintf(root, sizeof(root), "%s/store", f->dir);
    t_rm_rf(root);
    expect_miss(f, 3, NULL);
    put_ok(f, 3);
    expect_hit(f, 3);
    /* a FIFO put where the chunk was (a read of it would wait forever): a
     * miss that says why, at once; the same for a head (cake store ls) */
    chunk_path(f, &f->h[3].key, path, sizeof(path));
    assert_int_equal(unlink(path), 0);
    assert_int_equal(mkfifo(path, 0644), 0);
    expect_miss(f, 3, "not a regular file");
    uint8_t head[64];
    size_t len;
    uint64_t total;
    assert_int_equal(
        cake_store_head(f->s, &f->h[3].key, head, sizeof(head), &len, &total, err, sizeof(err)),
        -1);
    assert_non_null(strstr(err, "not a regular file"));
    unlink(path);
}

static void test_fault_file_size_limit(void **state) {
    fx *f = *state;
    char err[512], path[4400], tmpdir[4200];
    put_ok(f, 1); /* an older version that must survive the failed rewrite */
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 1024; /* smaller than a chunk */
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    int rc0 = cake_store_put(f->s, &f->h[0].key, f->blob[0], f->len, err, sizeof(err));
    int rc1 = cake_store_put(f->s, &f->h[1].key, f->blob[1], f->len, err, sizeof(err));
    setrlimit(RLIMIT_FSIZE, &old);
    assert_int_equal(rc0, -1);
    assert_int_equal(rc1, -1);
    print_message("put under RLIMIT_FSIZE: %s\n", err);
    assert_non_null(strstr(err, "write"));
    chunk_path(f, &f->h[0].key, path, sizeof(path));
    assert_int_not_equal(access(path, F_OK), 0);
    snprintf(tmpdir, sizeof(tmpdir), "%s/store/tmp", f->dir);
    assert_int_equal(count_files(tmpdir), 0);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.errors, 2);
    expect_miss(f, 0, NULL);
    expect_hit(f, 1);
    put_ok(f, 0);
    expect_hit(f, 0);
}

/* A full filesystem: a 1 MiB tmpfs in a private mount namespace (needs root
 * or CAP_SYS_ADMIN; skipped otherwise). Runs in a child process. */
/* Waits for a child that checks in a private mount namespace: it exits 0
 * when the check holds, 77 when it cannot mount here (then the test is
 * skipped, saying why), else the number of the failed step. */
static void expect_child_ok(pid_t pid, const char *why_skipped) {
    int st;
    waitpid(pid, &st, 0);
    assert_true(WIFEXITED(st));
    if (WEXITSTATUS(st) == 77) {
        print_message("skip: %s\n", why_skipped);
        skip();
    }
    assert_int_equal(WEXITSTATUS(st), 0);
}

static void test_fault_no_space(void **state) {
    fx *f = *state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
            _exit(77);
        char mnt[4200], uri[4300], err[512];
        snprintf(mnt, sizeof(mnt), "%s/small", f->dir);
        mkdir(mnt, 0755);
        if (mount("tmpfs", mnt, "tmpfs", 0, "size=1m") != 0) _exit(77);
        snprintf(uri, sizeof(uri), "file:%s/s", mnt);
        cake_store *s;
        if (cake_store_open(uri, &s, err, sizeof(err))) _exit(10);
        /* Chunks of 256 KiB (8 layers, 64 tokens, kv_dim 128): a few fit in 1 MiB.
         * tmpfs refuses O_DIRECT: the store falls back to buffered reads. */
        cake_kv_cache kv;
        if (cake_kv_cache_init(&kv, 8, 64 * 8, 2, 64, CAKE_KV_F16, err, sizeof(err))) _exit(9);
        t_fill_kv(&kv, 3);
        cake_chunk_header h[8];
        void *blobs[8];
        size_t blen = 0;
        for (int i = 0; i < 8; i++) {
            memset(&h[i], 0, sizeof(h[i]));
            h[i] = f->h[i];
            h[i].created = 0;
            h[i].n_tokens = 64;
            h[i].n_layers = 8;
            h[i].n_kv_heads = 2;
            h[i].head_dim = 64;
            blobs[i] = cake_store_alloc_buffer(cake_chunk_blob_size(&h[i]));
            blen = cake_chunk_blob_size(&h[i]);
            if (cake_chunk_encode(&h[i], &kv, i * 64, blobs[i], blen, err, sizeof(err))) _exit(9);
        }
        void *buf = cake_store_alloc_buffer(blen);
        size_t cap = cake_store_buffer_size(blen);
        int n_ok = 0, n_fail = 0;
        for (int i = 0; i < 8; i++) {
            if (cake_store_put(s, &h[i].key, blobs[i], blen, err, sizeof(err)) == 0)
                n_ok++;
            else if (strstr(err, "No space"))
                n_fail++;
            else
                _exit(11);
        }
        if (n_fail == 0 || n_ok == 0) _exit(12);
        char tmpdir[4400];
        snprintf(tmpdir, sizeof(tmpdir), "%s/s/tmp", mnt);
        if (count_files(tmpdir) != 0) _exit(13); /* failed writes cleaned up */
        /* what was written reads back whole; what failed is a miss */
        size_t len;
        int hits = 0;
        for (int i = 0; i < 8; i++) {
            int rc = cake_store_get_verified(s, &h[i], buf, cap, &len, err, sizeof(err));
            if (rc == 0 && !memcmp(buf, blobs[i], blen))
                hits++;
            else if (rc != 1)
                _exit(14);
        }
        if (hits != n_ok) _exit(15);
        /* free space, and the store works again */
        for (int i = 0; i < 8; i++) cake_store_del(s, &h[i].key, err, sizeof(err));
        if (cake_store_put(s, &h[7].key, blobs[7], blen, err, sizeof(err))) _exit(16);
        if (cake_store_get_verified(s, &h[7], buf, cap, &len, err, sizeof(err))) _exit(17);
        cake_store_close(s);
        _exit(0);
    }
    expect_child_ok(pid, "cannot mount a small tmpfs here (not root?)");
}

/* Two processes write the same key (different, valid blobs) as fast as they
 * can while this one reads: every hit is exactly one of the two. */
static void test_concurrent_writers_same_key(void **state) {
    fx *f = *state;
    /* blob B: same header fields, other payload */
    cake_kv_cache kv2;
    assert_int_equal(t_kv_init(&kv2, CAKE_KV_F16), 0);
    t_fill_kv(&kv2, 77);
    cake_chunk_header hb = f->h[0];
    hb.created = 0;
    size_t len;
    void *blob_b = t_blob(&hb, &kv2, 0, &len);
    cake_kv_cache_free(&kv2);
    assert_memory_not_equal(blob_b, f->blob[0], f->len);
    pid_t pids[2];
    for (int w = 0; w < 2; w++) {
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0) {
            cake_store *s;
            char err[512];
            if (cake_store_open(f->uri, &s, err, sizeof(err))) _exit(1);
            for (int i = 0; i < 300; i++)
                if (cake_store_put(s, &f->h[0].key, w ? blob_b : f->blob[0], f->len, err,
                                   sizeof(err)))
                    _exit(2);
            cake_store_close(s);
            _exit(0);
        }
    }
    int seen_a = 0, seen_b = 0, misses = 0, running = 2;
    char err[512];
    while (running) {
        int rc = cake_store_get_verified(f->s, &f->h[0], f->buf, f->cap, &len, err, sizeof(err));
        if (rc == 0) {
            if (!memcmp(f->buf, f->blob[0], f->len))
                seen_a++;
            else if (!memcmp(f->buf, blob_b, f->len))
                seen_b++;
            else
                fail_msg("a hit that is neither blob");
        } else {
            assert_int_equal(rc, 1);
            assert_string_equal(err, ""); /* absent at the start only, never corrupt */
            misses++;
        }
        running = 0;
        for (int w = 0; w < 2; w++) {
            int st;
            if (pids[w] && waitpid(pids[w], &st, WNOHANG) == pids[w]) {
                assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
                pids[w] = 0;
            }
            running += pids[w] != 0;
        }
    }
    print_message("reads during concurrent writes: %d of A, %d of B, %d misses\n", seen_a, seen_b,
                  misses);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 0);
    char tmpdir[4200];
    snprintf(tmpdir, sizeof(tmpdir), "%s/store/tmp", f->dir);
    assert_int_equal(count_files(tmpdir), 0);
    cake_store_free_buffer(blob_b);
}

static void kill_self(void) {
    raise(SIGKILL);
}

static void test_writer_killed_mid_write(void **state) {
    fx *f = *state;
    char tmpdir[4200], err[512];
    snprintf(tmpdir, sizeof(tmpdir), "%s/store/tmp", f->dir);
    put_ok(f, 0); /* the old version of chunk 0 */
    for (int i = 0; i < 2; i++) {
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            cake_store *s;
            if (cake_store_open(f->uri, &s, err, sizeof(err))) _exit(1);
            cake_store_file_mid_write_hook = kill_self;
            /* i = 0: a rewrite of chunk 0 (its blob 1 bytes, under key 0); i = 1: a new key */
            cake_store_put(s, &f->h[i].key, f->blob[1], f->len, err, sizeof(err));
            _exit(3); /* not reached */
        }
        int st;
        waitpid(pid, &st, 0);
        assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    }
    /* the second writer's half-written file; the first one's was removed
     * when the second writer opened the store (its writer was dead) */
    assert_int_equal(count_files(tmpdir), 1);
    expect_hit(f, 0); /* the old version, whole */
    expect_miss(f, 1, NULL);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 0);
    /* the next open removes the leftovers of dead writers */
    cake_store_close(f->s);
    assert_int_equal(cake_store_open(f->uri, &f->s, err, sizeof(err)), 0);
    assert_int_equal(count_files(tmpdir), 0);

    /* Unsynchronized kills of a writer looping over puts: whatever is there
     * afterwards is whole. */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        cake_store *s;
        if (cake_store_open(f->uri, &s, err, sizeof(err))) _exit(1);
        for (;;)
            for (int i = 0; i < 8; i++)
                cake_store_put(s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err));
    }
    usleep(30000);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    size_t len;
    for (int i = 0; i < 8; i++) {
        int rc = cake_store_get_verified(f->s, &f->h[i], f->buf, f->cap, &len, err, sizeof(err));
        assert_true(rc == 0 || rc == 1);
        if (rc == 0) assert_memory_equal(f->buf, f->blob[i], f->len);
    }
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 0);
}

static void set_last_use(fx *f, int i, time_t t) {
    char path[4400];
    chunk_path(f, &f->h[i].key, path, sizeof(path));
    struct timespec ts[2] = {{t, 0}, {t, 0}};
    assert_int_equal(utimensat(AT_FDCWD, path, ts, 0), 0);
}

static void test_capacity_lru(void **state) {
    fx *f = *state;
    char err[512], uri[4300];
    cake_store_close(f->s);
    /* room for 3.5 chunks */
    snprintf(uri, sizeof(uri), "%s?capacity=%zu", f->uri, f->len * 7 / 2);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    put_ok(f, 0);
    put_ok(f, 1);
    put_ok(f, 2);
    expect_hit(f, 0); /* 0 is now more recent than 1 */
    put_ok(f, 3);     /* evicts 1 */
    expect_miss(f, 1, NULL);
    /* and its folders (two levels each; the keys share none here) */
    assert_int_equal(count_chunk_folders(f), 2 * 3);
    expect_hit(f, 0);
    expect_hit(f, 2);
    expect_hit(f, 3);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.evictions, 1);
    cake_store_usage u;
    assert_int_equal(cake_store_usage_get(f->s, &u, err, sizeof(err)), 0);
    assert_int_equal(u.n_chunks, 3);
    assert_true(u.bytes <= u.capacity);
    /* rewriting a chunk does not evict for its own old size */
    put_ok(f, 3);
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.evictions, 1);

    /* After a restart the order comes from the files' times. */
    cake_store_close(f->s);
    time_t now = time(NULL);
    set_last_use(f, 0, now - 30);
    set_last_use(f, 2, now - 300); /* least recently used */
    set_last_use(f, 3, now - 100);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    put_ok(f, 4); /* evicts 2 */
    expect_miss(f, 2, NULL);
    expect_hit(f, 3);
    expect_hit(f, 0);
    put_ok(f, 5); /* evicts 4 (0 and 3 were just used) */
    expect_miss(f, 4, NULL);
    expect_hit(f, 0);
    /* a chunk bigger than the capacity is refused */
    char small[4300];
    cake_store *s2;
    snprintf(small, sizeof(small), "%s?capacity=1000", f->uri);
    assert_int_equal(cake_store_open(small, &s2, err, sizeof(err)), 0);
    assert_int_equal(cake_store_put(s2, &f->h[6].key, f->blob[6], f->len, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "capacity"));
    cake_store_close(s2);
}

/* A store with room for one chunk, written A, B, A, B, ... for 1.5 s: each
 * put must evict the other chunk, also across the turn of a second, when a
 * just-written file's mtime can already read a second later than time()
 * (fine-grained file times); a chunk then looked used by another process
 * since and was kept, over the capacity. */
static void test_capacity_across_seconds(void **state) {
    fx *f = *state;
    char err[512], uri[4300];
    cake_store_close(f->s);
    snprintf(uri, sizeof(uri), "%s?capacity=%zu", f->uri, f->len * 3 / 2);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    const double t0 = t_now();
    long puts = 0;
    while (t_now() - t0 < 1.5) {
        const int i = (int)(puts++ % 2);
        put_ok(f, i);
        uint8_t present;
        assert_int_equal(cake_store_exists(f->s, &f->h[1 - i].key, 1, &present, err, sizeof(err)),
                         0);
        if (present && puts > 1) fail_msg("put %ld kept chunk %d beside chunk %d", puts, 1 - i, i);
    }
}

/* gc where the chunks cannot be removed (the store's folder mounted read
 * only, in a private mount namespace; skipped when not root): it says why,
 * and counts nothing as evicted. */
static void test_gc_cannot_remove(void **state) {
    fx *f = *state;
    for (int i = 0; i < 3; i++) put_ok(f, i);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char dir[4200], uri[4300], err[512];
        snprintf(dir, sizeof(dir), "%s/store", f->dir);
        if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
            mount(dir, dir, NULL, MS_BIND, NULL) != 0 ||
            mount(NULL, dir, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) != 0)
            _exit(77);
        snprintf(uri, sizeof(uri), "file:%s", dir);
        cake_store *s;
        if (cake_store_open(uri, &s, err, sizeof(err))) _exit(10);
        uint64_t n = 9, b = 9;
        if (cake_store_gc(s, 0, &n, &b, err, sizeof(err)) != -1) _exit(11);
        if (n != 0 || b != 0) _exit(12);
        if (!strstr(err, "cannot remove") || !strstr(err, "Read-only") || !strstr(err, "2 more"))
            _exit(13);
        cake_store_close(s);
        _exit(0);
    }
    expect_child_ok(pid, "cannot mount read-only here (not root?)");
    for (int i = 0; i < 3; i++) expect_hit(f, i); /* (nothing was removed) */
}

static void test_gc(void **state) {
    fx *f = *state;
    char err[512], tmpdir[4200], p[4400];
    for (int i = 0; i < 6; i++) put_ok(f, i);
    time_t now = time(NULL);
    for (int i = 0; i < 6; i++) set_last_use(f, i, now - 1000 + i * 10); /* 0 oldest */
    /* leftovers: one of a dead writer of this host, one of a live writer */
    snprintf(tmpdir, sizeof(tmpdir), "%s/store/tmp", f->dir);
    char host[64];
    gethostname(host, sizeof(host));
    for (char *c = host; *c; c++)
        if (*c == '.' || *c == '/') *c = '_';
    pid_t dead = fork();
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    snprintf(p, sizeof(p), "%s/%s.%d.0.tmp", tmpdir, host, (int)dead);
    fclose(fopen(p, "w"));
    snprintf(p, sizeof(p), "%s/%s.%d.99.tmp", tmpdir, host, (int)getpid());
    fclose(fopen(p, "w"));
    uint64_t n, b;
    assert_int_equal(cake_store_gc(f->s, UINT64_MAX, &n, &b, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
    assert_int_equal(count_files(tmpdir), 1); /* the live writer's file stays */
    unlink(p);
    assert_int_equal(cake_store_gc(f->s, 3 * f->len, &n, &b, err, sizeof(err)), 0);
    assert_int_equal(n, 3);
    assert_int_equal(b, 3 * f->len);
    for (int i = 0; i < 3; i++) expect_miss(f, i, NULL);
    for (int i = 3; i < 6; i++) expect_hit(f, i);
    assert_int_equal(count_chunk_folders(f), 2 * 3); /* (emptied ones removed) */
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.evictions, 3);
    char err2[256];
    assert_int_equal(cake_store_del(f->s, &f->h[3].key, err2, sizeof(err2)), 0);
    assert_int_equal(count_chunk_folders(f), 2 * 2);
}

/* Several threads reading and writing overlapping chunks through one store
 * with a capacity (run under TSan by scripts/test.sh). */
typedef struct {
    fx *f;
    int id;
    int bad;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    fx *f = w->f;
    void *buf = cake_store_alloc_buffer(f->cap);
    char err[512];
    size_t len;
    for (int it = 0; it < 60; it++) {
        int i = (it * 3 + w->id) % 8;
        if ((it + w->id) % 3 == 0) {
            if (cake_store_put(f->s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err))) w->bad++;
        } else {
            int rc = cake_store_get_verified(f->s, &f->h[i], buf, f->cap, &len, err, sizeof(err));
            if (rc == 0 && memcmp(buf, f->blob[i], f->len)) w->bad++;
            if (rc < 0) w->bad++;
        }
        uint8_t present[8];
        cake_chunk_key keys[8];
        for (int j = 0; j < 8; j++) keys[j] = f->h[j].key;
        cake_store_exists(f->s, keys, 8, present, err, sizeof(err));
    }
    cake_store_free_buffer(buf);
    return NULL;
}

static void test_threads(void **state) {
    fx *f = *state;
    char err[512], uri[4300];
    cake_store_close(f->s);
    snprintf(uri, sizeof(uri), "%s?capacity=%zu", f->uri, f->len * 5);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    pthread_t th[4];
    worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker){f, i, 0};
        pthread_create(&th[i], NULL, work, &w[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(w[i].bad, 0);
    }
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 0);
    cake_store_usage u;
    assert_int_equal(cake_store_usage_get(f->s, &u, err, sizeof(err)), 0);
    assert_true(u.bytes <= 5 * f->len);
}

static void test_open_errors(void **state) {
    fx *f = *state;
    char err[512], uri[4300], p[4200];
    cake_store *s;
    snprintf(p, sizeof(p), "%s/afile", f->dir);
    fclose(fopen(p, "w"));
    snprintf(uri, sizeof(uri), "file:%s", p);
    assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "afile"));
    snprintf(uri, sizeof(uri), "file:%s/x?capacity=abc", f->dir);
    assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "capacity"));
}

/* A blob of several pieces (16 MiB each), read by helper threads while the
 * caller hashes the pieces in order: it comes back whole, through O_DIRECT
 * and through the page cache, and a cut or a flipped byte anywhere (in a
 * piece hashed during the read, or in the last one, hashed after it) is still
 * a miss. */
static void test_big_blob_pieces(void **state) {
    fx *f = *state;
    cake_chunk_header h = f->h[0];
    size_t len;
    uint8_t *blob = t_big_blob(&h, 512, 24, 0, &len); /* 96 MiB + the header: 7 pieces */
    assert_non_null(blob);
    assert_true(len > 6 * (16u << 20));
    const size_t cap = cake_store_buffer_size(len);
    uint8_t *buf = cake_store_alloc_buffer(cap);
    assert_non_null(buf);
    char err[512], path[4400];
    chunk_path(f, &h.key, path, sizeof(path));
    /* readers=3: two threads read while this one hashes; readers=2: both read */
    for (int run = 0; run < 4; run++) {
        const int direct = run < 2, readers = run % 2 ? 2 : 3;
        char uri[4300];
        snprintf(uri, sizeof(uri), "file:%s/store?direct=%d&readers=%d", f->dir, direct, readers);
        cake_store *s;
        assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), 0);
        assert_int_equal(cake_store_put(s, &h.key, blob, len, err, sizeof(err)), 0);
        size_t got = 0;
        memset(buf, 0, cap);
        if (cake_store_get_verified(s, &h, buf, cap, &got, err, sizeof(err)) != 0)
            fail_msg("direct=%d, readers=%d: %s", direct, readers, err);
        assert_int_equal(got, len);
        assert_memory_equal(buf, blob, len);
        /* cut inside the first, the third and the last piece */
        const size_t cuts[] = {1000, (32u << 20) + 4096 + 17, len - 1};
        for (size_t c = 0; c < sizeof(cuts) / sizeof(cuts[0]); c++) {
            FILE *fp = create_chunk_file(path);
            assert_non_null(fp);
            assert_int_equal(fwrite(blob, 1, cuts[c], fp), cuts[c]);
            fclose(fp);
            got = 1;
            assert_int_equal(cake_store_get_verified(s, &h, buf, cap, &got, err, sizeof(err)), 1);
            assert_int_equal(got, 0);
            assert_non_null(strstr(err, "truncated"));
        }
        /* one flipped byte in the first, the third and the last piece */
        const size_t flips[] = {1000, (32u << 20) + 7, len - 5};
        for (size_t b = 0; b < sizeof(flips) / sizeof(flips[0]); b++) {
            blob[flips[b]] ^= 1;
            FILE *fp = create_chunk_file(path);
            assert_non_null(fp);
            assert_int_equal(fwrite(blob, 1, len, fp), len);
            fclose(fp);
            blob[flips[b]] ^= 1;
            assert_int_equal(cake_store_get_verified(s, &h, buf, cap, &got, err, sizeof(err)), 1);
            assert_non_null(strstr(err, "payload checksum"));
        }
        /* and whole again: a hit, hashed in pieces */
        assert_int_equal(cake_store_put(s, &h.key, blob, len, err, sizeof(err)), 0);
        if (cake_store_get_verified(s, &h, buf, cap, &got, err, sizeof(err)) != 0)
            fail_msg("direct=%d, readers=%d, after the faults: %s", direct, readers, err);
        assert_memory_equal(buf, blob, len);
        cake_store_close(s);
    }
    cake_store_free_buffer(blob);
    cake_store_free_buffer(buf);
}

/* Pages of the file at path in the page cache: *resident of *total. */
static void cached_pages(const char *path, size_t *resident, size_t *total) {
    const int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), n = ((size_t)st.st_size + page - 1) / page;
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    assert_true(map != MAP_FAILED);
    unsigned char *vec = malloc(n);
    assert_non_null(vec);
    assert_int_equal(mincore(map, (size_t)st.st_size, vec), 0);
    *resident = 0;
    for (size_t i = 0; i < n; i++) *resident += vec[i] & 1;
    *total = n;
    free(vec);
    munmap(map, (size_t)st.st_size);
    close(fd);
}

/* Drops the file out of the page cache, then reads its first `keep` bytes
 * back in (buffered, no readahead): a chunk of which only a prefix is cached. */
static void cache_only_prefix(const char *path, size_t keep) {
    const int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(fdatasync(fd), 0); /* only clean pages can go */
    assert_int_equal(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    assert_int_equal(posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM), 0);
    char *tmp = malloc(keep + 1);
    assert_non_null(tmp);
    for (size_t got = 0; got < keep;) {
        const ssize_t n = pread(fd, tmp + got, keep - got, (off_t)got);
        assert_true(n > 0);
        got += (size_t)n;
    }
    free(tmp);
    close(fd);
}

/* With direct reads, a chunk wholly in the page cache is read through it
 * (cache=1, the default), any other from the disk: a chunk all cached, one
 * with only its first half cached, one not cached at all, and cache=0 all
 * give the blob back, and a read from the disk adds nothing to the cache. */
static void test_page_cache_first(void **state) {
    fx *f = *state;
    cake_chunk_header h = f->h[0];
    size_t len;
    uint8_t *blob = t_big_blob(&h, 64, 4, 0, &len); /* 2 MiB + the header */
    assert_non_null(blob);
    const size_t cap = cake_store_buffer_size(len);
    uint8_t *buf = cake_store_alloc_buffer(cap);
    assert_non_null(buf);
    char err[512], path[4400];
    chunk_path(f, &h.key, path, sizeof(path));
    assert_int_equal(cake_store_put(f->s, &h.key, blob, len, err, sizeof(err)), 0);
    /* whether this filesystem takes O_DIRECT (tmpfs does not: all buffered) */
    const int dfd = open(path, O_RDONLY | O_DIRECT);
    const int direct = dfd >= 0;
    if (dfd >= 0) close(dfd);
    const size_t prefixes[] = {len, 1u << 20, 0}; /* bytes left in the cache */
    for (size_t i = 0; i < 3; i++) {
        size_t before = 0, total = 0, after = 0;
        if (prefixes[i] < len) cache_only_prefix(path, prefixes[i]);
        cached_pages(path, &before, &total);
        size_t got = 0;
        memset(buf, 0, cap);
        if (cake_store_get_verified(f->s, &h, buf, cap, &got, err, sizeof(err)) != 0)
            fail_msg("%zu of %zu bytes cached: %s", prefixes[i], len, err);
        assert_int_equal(got, len);
        assert_memory_equal(buf, blob, len);
        cached_pages(path, &after, &total);
        printf("%zu of %zu bytes left cached: read back whole; pages cached %zu before, %zu "
               "after, of %zu\n",
               prefixes[i], len, before, after, total);
        /* read from the disk: nothing added to the cache */
        if (direct) assert_true(after <= before);
    }
    if (!direct) printf("no O_DIRECT on this filesystem: buffered reads only\n");
    cake_store *s0;
    char uri[4300];
    snprintf(uri, sizeof(uri), "%s?cache=0", f->uri);
    assert_int_equal(cake_store_open(uri, &s0, err, sizeof(err)), 0);
    size_t got = 0;
    assert_int_equal(cake_store_get_verified(s0, &h, buf, cap, &got, err, sizeof(err)), 0);
    assert_memory_equal(buf, blob, len);
    cake_store_close(s0);
    cake_store_free_buffer(blob);
    cake_store_free_buffer(buf);
}

/* ram=: a RAM tier in front of the files. What the process wrote or read
 * comes from RAM (counted as ram_hits), even once the file is gone; a new
 * process starts empty, and prefetch brings chunks in ahead of their gets;
 * a chunk that fails verification is dropped from both tiers. */
static void test_ram_tier(void **state) {
    fx *f = *state;
    char err[512], uri[4300];
    cake_store_close(f->s);
    snprintf(uri, sizeof(uri), "%s?ram=64MiB", f->uri);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    assert_true(cake_store_has_ram(f->s));
    for (int i = 0; i < 4; i++) put_ok(f, i);
    cake_store_counters c;
    expect_hit(f, 0); /* written through: in RAM */
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.ram_hits, 1);
    char path[4400];
    chunk_path(f, &f->h[1].key, path, sizeof(path));
    assert_int_equal(unlink(path), 0);
    expect_hit(f, 1); /* the file is gone; RAM still has it */

    /* a new process: RAM empty; a get fills it, prefetch too */
    cake_store_close(f->s);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    cake_chunk_key keys[4];
    uint8_t near[4], present[4];
    for (int i = 0; i < 4; i++) keys[i] = f->h[i].key;
    cake_store_in_ram(f->s, keys, 4, near);
    for (int i = 0; i < 4; i++) assert_int_equal(near[i], 0);
    expect_hit(f, 0);
    assert_int_equal(cake_store_prefetch(f->s, keys, 4, f->len, NULL), 2); /* not 0, not 1 */
    cake_store_in_ram(f->s, keys, 4, near);
    for (int i = 0; i < 4; i++) assert_int_equal(near[i], i != 1);
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.ram_hits, 0);
    assert_int_equal(c.prefetched, 2);
    for (int i = 2; i < 4; i++) expect_hit(f, i);
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.ram_hits, 2);
    assert_int_equal(cake_store_exists(f->s, keys, 4, present, err, sizeof(err)), 0);
    for (int i = 0; i < 4; i++) assert_int_equal(present[i], i != 1);

    /* bad bytes under a key: the file and the RAM copy go */
    chunk_path(f, &f->h[2].key, path, sizeof(path));
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    fseek(fp, (long)f->len - 1, SEEK_SET);
    fputc(0x5a ^ ((const uint8_t *)f->blob[2])[f->len - 1], fp);
    fclose(fp);
    cake_store_close(f->s); /* (a fresh RAM tier: it reads the bad file) */
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    expect_miss(f, 2, NULL);
    cake_store_in_ram(f->s, &keys[2], 1, near);
    assert_int_equal(near[0], 0);
    assert_int_equal(access(path, F_OK), -1);

    /* only for file and redis stores, and a size */
    cake_store *bad = NULL;
    assert_int_equal(cake_store_open("mem:?ram=1GiB", &bad, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "ram="));
    snprintf(uri, sizeof(uri), "%s?ram=0", f->uri);
    assert_int_equal(cake_store_open(uri, &bad, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "ram="));
}

int main(void) {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_roundtrip),
        T(test_iterate_and_head),
        T(test_fault_bad_bytes),
        T(test_fault_deleted_between_exists_and_get),
        T(test_fault_file_size_limit),
        T(test_fault_no_space),
        T(test_concurrent_writers_same_key),
        T(test_writer_killed_mid_write),
        T(test_capacity_lru),
        T(test_capacity_across_seconds),
        T(test_gc),
        T(test_gc_cannot_remove),
        T(test_threads),
        T(test_open_errors),
        T(test_big_blob_pieces),
        T(test_page_cache_first),
        T(test_ram_tier),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
