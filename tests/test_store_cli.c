/* `cake store` end to end: the real binary on a real file store (and on a
 * real Redis when redis-server is installed): ls, stat, verify (finding a
 * corrupted chunk), rm, gc, keys (the same keys from two separate processes),
 * exit codes and one-line errors. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "test_store_common.h"
#include "testutil.h"

static char out_path[4200], err_path[4200];
static char *g_out, *g_err;

/* Runs `cake store ARGS...` (NULL-terminated); returns its exit code, with
 * stdout in g_out and stderr in g_err. */
static int cake(const char *arg0, ...) {
    const char *argv[32] = {CAKE_BIN, "store"};
    int n = 2;
    va_list ap;
    va_start(ap, arg0);
    for (const char *a = arg0; a && n < 31; a = va_arg(ap, const char *)) argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        int o = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int e = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(o, 1);
        dup2(e, 2);
        execv(CAKE_BIN, (char **)argv);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    free(g_out);
    free(g_err);
    g_out = test_read_file(out_path, NULL);
    g_err = test_read_file(err_path, NULL);
    /* test_read_file does not terminate: re-read as strings */
    size_t n1 = 0, n2 = 0;
    free(g_out);
    free(g_err);
    char *a = test_read_file(out_path, &n1), *b = test_read_file(err_path, &n2);
    g_out = calloc(1, n1 + 1);
    g_err = calloc(1, n2 + 1);
    if (a) memcpy(g_out, a, n1);
    if (b) memcpy(g_err, b, n2);
    free(a);
    free(b);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static void expect(int rc, int want, const char *what) {
    if (rc != want)
        fail_msg("%s: exit %d, want %d\nstdout: %s\nstderr: %s", what, rc, want, g_out, g_err);
    if (want != 0 && count_lines(g_err) != 1)
        fail_msg("%s: stderr should be one line: %s", what, g_err);
}

typedef struct {
    char *dir;
    char uri[4200];
    cake_chunk_header h[6];
    size_t len;
} fx;

/* Chunks 0..3 of model A and 0..1 of model B. */
static void populate(fx *f, cake_store *s) {
    cake_kv_cache kv;
    assert_int_equal(t_kv_init(&kv, CAKE_KV_F16), 0);
    t_fill_kv(&kv, 8);
    char err[512];
    for (int i = 0; i < 6; i++) {
        f->h[i] = t_header((uint32_t)(i < 4 ? i : i - 4), i < 4 ? 1 : 2, CAKE_KV_F16);
        if (i >= 4) f->h[i].fingerprint[0] = 0x11; /* model B */
        void *b = t_blob(&f->h[i], &kv, (int)f->h[i].index * T_CHUNK, &f->len);
        assert_int_equal(cake_store_put(s, &f->h[i].key, b, f->len, err, sizeof(err)), 0);
        cake_store_free_buffer(b);
    }
    cake_kv_cache_free(&kv);
}

static int setup(void **state) {
    fx *f = calloc(1, sizeof(*f));
    f->dir = t_mkdtemp();
    snprintf(out_path, sizeof(out_path), "%s/out", f->dir);
    snprintf(err_path, sizeof(err_path), "%s/err", f->dir);
    snprintf(f->uri, sizeof(f->uri), "file:%s/store", f->dir);
    cake_store *s;
    char err[512];
    if (cake_store_open(f->uri, &s, err, sizeof(err))) return -1;
    populate(f, s);
    cake_store_close(s);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    t_rm_rf(f->dir);
    free(f->dir);
    free(f);
    return 0;
}

static void test_cli_ls_stat(void **state) {
    fx *f = *state;
    char hex[33];
    expect(cake("ls", "--store", f->uri, NULL), 0, "ls");
    assert_int_equal(count_lines(g_out), 1 + 6);
    assert_non_null(strstr(g_out, cake_key_hex(&f->h[2].key, hex)));
    assert_non_null(strstr(g_out, "deadbeef01020304"));
    assert_non_null(strstr(g_out, "11adbeef01020304"));
    expect(cake("ls", "--store", f->uri, "--model", "11ad", NULL), 0, "ls --model");
    assert_int_equal(count_lines(g_out), 1 + 2);
    expect(cake("ls", "--store", f->uri, "--json", NULL), 0, "ls --json");
    assert_int_equal(count_lines(g_out), 6);
    assert_non_null(strstr(g_out, "\"index\":3,\"tokens\":16,\"layers\":3"));
    expect(cake("stat", "--store", f->uri, NULL), 0, "stat");
    assert_non_null(strstr(g_out, "chunks    6\n"));
    assert_non_null(strstr(g_out, "models    2\n"));
    assert_non_null(strstr(g_out, "4 chunks"));
    expect(cake("stat", "--store", f->uri, "--json", NULL), 0, "stat --json");
    char want[128];
    snprintf(want, sizeof(want), "\"chunks\":6,\"bytes\":%zu", 6 * f->len);
    assert_non_null(strstr(g_out, want));
}

static void test_cli_verify(void **state) {
    fx *f = *state;
    char hex[33], path[4400];
    expect(cake("verify", "--store", f->uri, NULL), 0, "verify");
    assert_non_null(strstr(g_out, "6 ok, 0 bad"));
    /* flip one payload byte of chunk 1 on disk */
    cake_key_hex(&f->h[1].key, hex);
    snprintf(path, sizeof(path), "%s/store/%.2s/%.2s/%s.chunk", f->dir, hex, hex + 2, hex);
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    unsigned char c;
    assert_int_equal(pread(fd, &c, 1, 1000), 1);
    c ^= 0x20;
    assert_int_equal(pwrite(fd, &c, 1, 1000), 1);
    close(fd);
    expect(cake("verify", "--store", f->uri, NULL), 1, "verify with a bad chunk");
    assert_non_null(strstr(g_out, hex));
    assert_non_null(strstr(g_out, "payload checksum"));
    assert_non_null(strstr(g_out, "5 ok, 1 bad"));
    assert_int_equal(access(path, F_OK), 0); /* reported, not removed */
    expect(cake("verify", "--store", f->uri, "--delete", NULL), 1, "verify --delete");
    assert_non_null(strstr(g_out, "(removed)"));
    assert_int_not_equal(access(path, F_OK), 0);
    expect(cake("verify", "--store", f->uri, NULL), 0, "verify after --delete");
    assert_non_null(strstr(g_out, "5 ok, 0 bad"));
}

static void test_cli_rm_gc(void **state) {
    fx *f = *state;
    char hex[33];
    cake_key_hex(&f->h[0].key, hex);
    expect(cake("rm", "--store", f->uri, hex, NULL), 0, "rm KEY");
    assert_non_null(strstr(g_out, "removed 1"));
    expect(cake("rm", "--store", f->uri, hex, NULL), 1, "rm an absent key");
    expect(cake("rm", "--store", f->uri, "xyz", NULL), 2, "rm a non-key");
    expect(cake("rm", "--store", f->uri, NULL), 2, "rm without what");
    expect(cake("rm", "--store", f->uri, "--model", "11adbeef", NULL), 0, "rm --model");
    assert_non_null(strstr(g_out, "removed 2"));
    expect(cake("stat", "--store", f->uri, NULL), 0, "stat");
    assert_non_null(strstr(g_out, "chunks    3\n"));
    char size[32];
    snprintf(size, sizeof(size), "%zu", f->len);
    expect(cake("gc", "--store", f->uri, "--size", size, NULL), 0, "gc --size");
    assert_non_null(strstr(g_out, "evicted 2 chunks"));
    assert_non_null(strstr(g_out, "holds 1 chunks"));
    expect(cake("gc", "--store", f->uri, NULL), 0, "gc (nothing to do)");
    assert_non_null(strstr(g_out, "evicted 0 chunks"));
    expect(cake("rm", "--store", f->uri, "--all", NULL), 0, "rm --all");
    expect(cake("ls", "--store", f->uri, NULL), 0, "ls empty");
    assert_int_equal(count_lines(g_out), 1);
}

static void test_cli_keys(void **state) {
    fx *f = *state;
    const char *toks = "1 2 3 4 5 6 7 8 9 10 11 12 13";
    expect(cake("keys", "--fingerprint", "000102030405060708090a0b0c0d0e0f", "--chunk", "4",
                "--tokens", toks, NULL),
           0, "keys");
    char first[512];
    snprintf(first, sizeof(first), "%s", g_out);
    assert_int_equal(count_lines(first), 3);
    /* a second process: the same keys */
    expect(cake("keys", "--fingerprint", "000102030405060708090a0b0c0d0e0f", "--chunk", "4",
                "--tokens", toks, NULL),
           0, "keys again");
    assert_string_equal(first, g_out);
    /* and the library's */
    cake_token t[13];
    for (int i = 0; i < 13; i++) t[i] = i + 1;
    uint8_t fp[16];
    for (int i = 0; i < 16; i++) fp[i] = (uint8_t)i;
    cake_chunk_key k[3];
    cake_key_chain(fp, 4, CAKE_KV_F16, t, 13, k);
    char hex[33], line[64];
    snprintf(line, sizeof(line), "2 %s\n", cake_key_hex(&k[2], hex));
    assert_non_null(strstr(first, line));
    /* with a store: presence */
    expect(cake("keys", "--store", f->uri, "--fingerprint", "000102030405060708090a0b0c0d0e0f",
                "--chunk", "4", "--tokens", toks, NULL),
           0, "keys --store");
    assert_non_null(strstr(g_out, " absent\n"));
    expect(cake("keys", "--fingerprint", "0001", "--chunk", "4", "--tokens", toks, NULL), 2,
           "keys with a short fingerprint");
    expect(cake("keys", "--fingerprint", "000102030405060708090a0b0c0d0e0f", "--chunk", "4",
                "--tokens", "1 2 -3", NULL),
           2, "keys with a negative token id");
    /* a store that does not answer: the keys, without presence, and exit 1 */
    expect(cake("keys", "--store", "redis://127.0.0.1:1?timeout=100", "--fingerprint",
                "000102030405060708090a0b0c0d0e0f", "--chunk", "4", "--tokens", toks, NULL),
           1, "keys --store with the store down");
    assert_non_null(strstr(g_out, line));
}

static void test_cli_errors(void **state) {
    fx *f = *state;
    expect(cake(NULL), 2, "no command");
    expect(cake("frob", "--store", f->uri, NULL), 2, "unknown command");
    expect(cake("ls", "--store", "bogus:/x", NULL), 2, "bad URI");
    assert_non_null(strstr(g_err, "unknown kind"));
    expect(cake("ls", "--store", "file:/x?speed=3", NULL), 2, "unknown parameter");
    assert_non_null(strstr(g_err, "speed"));
    expect(cake("gc", "--store", f->uri, "--size", "lots", NULL), 2, "gc bad size");
    char p[4300];
    snprintf(p, sizeof(p), "file:%s/out", f->dir); /* a file, not a directory */
    expect(cake("ls", "--store", p, NULL), 1, "a store that cannot open");
    expect(cake("--help", NULL), 0, "--help");
    assert_non_null(strstr(g_out, "verify"));
}

static void test_cli_redis(void **state) {
    fx *f = *state;
    if (!t_redis_available()) {
        print_message("skip: redis-server not installed\n");
        skip();
    }
    t_redis r;
    assert_int_equal(t_redis_start(&r, 0), 0);
    cake_store *s;
    char err[512];
    assert_int_equal(cake_store_open(r.uri, &s, err, sizeof(err)), 0);
    populate(f, s);
    cake_store_close(s);
    int rc = cake("ls", "--store", r.uri, NULL);
    int lines = count_lines(g_out);
    int rc2 = cake("verify", "--store", r.uri, NULL);
    int has_ok = strstr(g_out, "6 ok, 0 bad") != NULL;
    t_redis_stop(&r);
    assert_int_equal(rc, 0);
    assert_int_equal(lines, 7);
    assert_int_equal(rc2, 0);
    assert_true(has_ok);
    /* Redis down: a one-line failure, quickly */
    double t0 = t_now();
    expect(cake("ls", "--store", r.uri, NULL), 1, "ls with Redis down");
    assert_true(t_now() - t0 < 2.0);
    assert_non_null(strstr(g_err, "redis"));
}

int main(void) {
    if (access(CAKE_BIN, X_OK) != 0) {
        fprintf(stderr, "skip: %s not built\n", CAKE_BIN);
        return 0;
    }
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_cli_ls_stat), T(test_cli_verify), T(test_cli_rm_gc),
        T(test_cli_keys),    T(test_cli_errors), T(test_cli_redis),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    free(g_out);
    free(g_err);
    return rc;
}
