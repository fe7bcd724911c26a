/* GGUF v3 writer (for `cake mkmodel` and the tests).
 *
 * Each KV is serialized when it is added (the writer copies the caller's data),
 * tensors are only described; write_file() then streams header, KVs, tensor
 * infos and, one tensor at a time, the bytes a callback fills in. So a 16 GB
 * model needs one tensor's worth of memory, not the whole file.
 *
 * The add_* functions return nothing: the first problem (out of memory, a
 * duplicate key or name, an invalid shape or dtype) is remembered and reported
 * by write_file(), so the writer never produces a file that the reader rejects.
 * The file is written to PATH.tmp and renamed into place only when complete, so
 * a failed write never leaves a truncated model under the real name.
 */
#include "model/gguf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/err.h"

typedef struct {
    char *key;     /* NUL-terminated copy, for the duplicate check */
    uint8_t *blob; /* the serialized KV: key string, type, value */
    size_t len;
} wkv;

typedef struct {
    char *name;
    uint32_t type;
    uint32_t n_dims;
    uint64_t ne[CAKE_GGUF_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset; /* in the data section; set by write_file */
} wtensor;

struct cake_gguf_writer {
    wkv *kv;
    size_t n_kv, cap_kv;
    wtensor *t;
    size_t n_t, cap_t;
    uint64_t alignment; /* general.alignment if added, else 32 */
    int failed;         /* sticky: the first error is kept in err */
    char err[256];
};

cake_gguf_writer *cake_gguf_writer_init(void) {
    cake_gguf_writer *w = calloc(1, sizeof(*w));
    if (w) w->alignment = CAKE_GGUF_DEFAULT_ALIGNMENT;
    return w;
}

void cake_gguf_writer_free(cake_gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].blob);
    }
    for (size_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->kv);
    free(w->t);
    free(w);
}

__attribute__((format(printf, 2, 3))) static void wfail(cake_gguf_writer *w, const char *fmt, ...) {
    if (w->failed) return;
    w->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->err, sizeof(w->err), fmt, ap);
    va_end(ap);
}

/* ---- serialization of one KV into a growing byte buffer ---- */

typedef struct {
    uint8_t *p;
    size_t len, cap;
    int oom;
} buf;

static void put(buf *b, const void *src, size_t n) {
    if (b->oom) return;
    if (n > SIZE_MAX - b->len) {
        b->oom = 1;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n) cap = cap > SIZE_MAX / 2 ? b->len + n : cap * 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void put_u32(buf *b, uint32_t v) {
    put(b, &v, 4);
}

static void put_u64(buf *b, uint64_t v) {
    put(b, &v, 8);
}

static void put_str(buf *b, const char *s) {
    const size_t n = strlen(s);
    put_u64(b, n);
    put(b, s, n);
}

/* Starts a KV: checks the key, serializes it and the type. 0 ok. */
static int kv_begin(cake_gguf_writer *w, const char *key, enum cake_gguf_type type, buf *b) {
    if (!w || w->failed) return -1;
    if (!key || !*key) {
        wfail(w, "metadata key is empty");
        return -1;
    }
    for (size_t i = 0; i < w->n_kv; i++)
        if (!strcmp(w->kv[i].key, key)) {
            wfail(w, "duplicate metadata key '%s'", key);
            return -1;
        }
    *b = (buf){0};
    put_str(b, key);
    put_u32(b, type);
    return 0;
}

static void kv_end(cake_gguf_writer *w, const char *key, buf *b) {
    char *k = b->oom ? NULL : strdup(key);
    if (!k || (w->n_kv == w->cap_kv && w->cap_kv > SIZE_MAX / 2 / sizeof(wkv))) {
        free(k);
        free(b->p);
        wfail(w, "out of memory adding key '%s'", key);
        return;
    }
    if (w->n_kv == w->cap_kv) {
        const size_t cap = w->cap_kv ? 2 * w->cap_kv : 16;
        wkv *kv = realloc(w->kv, cap * sizeof(*kv));
        if (!kv) {
            free(k);
            free(b->p);
            wfail(w, "out of memory adding key '%s'", key);
            return;
        }
        w->kv = kv;
        w->cap_kv = cap;
    }
    w->kv[w->n_kv++] = (wkv){k, b->p, b->len};
}

void cake_gguf_writer_add_u32(cake_gguf_writer *w, const char *key, uint32_t v) {
    buf b;
    if (kv_begin(w, key, CAKE_GGUF_UINT32, &b)) return;
    if (!strcmp(key, "general.alignment")) {
        if (v == 0 || (v & (v - 1))) {
            free(b.p);
            wfail(w, "key 'general.alignment' = %u is not a nonzero power of two", v);
            return;
        }
        w->alignment = v;
    }
    put_u32(&b, v);
    kv_end(w, key, &b);
}

/* The reader insists on general.alignment being UINT32; so does the writer. */
static int not_alignment(cake_gguf_writer *w, const char *key, const char *type) {
    if (w && !w->failed && key && !strcmp(key, "general.alignment")) {
        wfail(w, "key 'general.alignment' must be UINT32, not %s", type);
        return 0;
    }
    return 1;
}

void cake_gguf_writer_add_i32(cake_gguf_writer *w, const char *key, int32_t v) {
    buf b;
    if (!not_alignment(w, key, "INT32") || kv_begin(w, key, CAKE_GGUF_INT32, &b)) return;
    put(&b, &v, 4);
    kv_end(w, key, &b);
}

void cake_gguf_writer_add_f32(cake_gguf_writer *w, const char *key, float v) {
    buf b;
    if (!not_alignment(w, key, "FLOAT32") || kv_begin(w, key, CAKE_GGUF_FLOAT32, &b)) return;
    put(&b, &v, 4);
    kv_end(w, key, &b);
}

void cake_gguf_writer_add_bool(cake_gguf_writer *w, const char *key, bool v) {
    buf b;
    if (!not_alignment(w, key, "BOOL") || kv_begin(w, key, CAKE_GGUF_BOOL, &b)) return;
    const uint8_t byte = v ? 1 : 0;
    put(&b, &byte, 1);
    kv_end(w, key, &b);
}

void cake_gguf_writer_add_str(cake_gguf_writer *w, const char *key, const char *v) {
    buf b;
    if (!not_alignment(w, key, "STRING")) return;
    if (w && !w->failed && !v) {
        wfail(w, "key '%s': NULL string", key ? key : "(null)");
        return;
    }
    if (kv_begin(w, key, CAKE_GGUF_STRING, &b)) return;
    put_str(&b, v);
    kv_end(w, key, &b);
}

/* Array of fixed-size elements. */
static void add_arr(cake_gguf_writer *w, const char *key, enum cake_gguf_type et, const void *v,
                    uint64_t n, size_t esize) {
    buf b;
    if (!not_alignment(w, key, "ARRAY")) return;
    if (w && !w->failed && n && !v) {
        wfail(w, "key '%s': NULL array of %llu elements", key ? key : "(null)",
              (unsigned long long)n);
        return;
    }
    if (kv_begin(w, key, CAKE_GGUF_ARRAY, &b)) return;
    if (n > SIZE_MAX / esize) {
        free(b.p);
        wfail(w, "key '%s': array of %llu elements is too large", key, (unsigned long long)n);
        return;
    }
    put_u32(&b, et);
    put_u64(&b, n);
    put(&b, v, (size_t)n * esize);
    kv_end(w, key, &b);
}

void cake_gguf_writer_add_arr_f32(cake_gguf_writer *w, const char *key, const float *v,
                                  uint64_t n) {
    add_arr(w, key, CAKE_GGUF_FLOAT32, v, n, sizeof(float));
}

void cake_gguf_writer_add_arr_i32(cake_gguf_writer *w, const char *key, const int32_t *v,
                                  uint64_t n) {
    add_arr(w, key, CAKE_GGUF_INT32, v, n, sizeof(int32_t));
}

void cake_gguf_writer_add_arr_str(cake_gguf_writer *w, const char *key, const char *const *v,
                                  uint64_t n) {
    buf b;
    if (!not_alignment(w, key, "ARRAY")) return;
    if (w && !w->failed && n && !v) {
        wfail(w, "key '%s': NULL array of %llu strings", key ? key : "(null)",
              (unsigned long long)n);
        return;
    }
    for (uint64_t i = 0; w && !w->failed && i < n; i++)
        if (!v[i]) {
            wfail(w, "key '%s': string #%llu is NULL", key ? key : "(null)", (unsigned long long)i);
            return;
        }
    if (kv_begin(w, key, CAKE_GGUF_ARRAY, &b)) return;
    put_u32(&b, CAKE_GGUF_STRING);
    put_u64(&b, n);
    for (uint64_t i = 0; i < n; i++) put_str(&b, v[i]);
    kv_end(w, key, &b);
}

void cake_gguf_writer_add_tensor(cake_gguf_writer *w, const char *name, enum cake_dtype type,
                                 uint32_t n_dims, const uint64_t *ne) {
/* Records the first error and leaves the writer failed. */
#define FAIL(...)                                                                                  \
    do {                                                                                           \
        wfail(w, __VA_ARGS__);                                                                     \
        return;                                                                                    \
    } while (0)
    if (!w || w->failed) return;
    if (!name || !*name) FAIL("tensor name is empty");
    for (size_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name)) FAIL("duplicate tensor name '%s'", name);
    const size_t bb = cake_dtype_block_bytes(type), be = cake_dtype_block_elems(type);
    if (!bb)
        FAIL("tensor '%s': dtype %s (%u) is not a type cake knows the size of", name,
             cake_dtype_name(type), (unsigned)type);
    if (n_dims < 1 || n_dims > CAKE_GGUF_MAX_DIMS || !ne)
        FAIL("tensor '%s': n_dims = %u is out of range (1..%d)", name, n_dims, CAKE_GGUF_MAX_DIMS);
    wtensor t = {.type = (uint32_t)type, .n_dims = n_dims};
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < CAKE_GGUF_MAX_DIMS; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] == 0) FAIL("tensor '%s': dimension %u is 0", name, d);
        if (t.ne[d] > (UINT64_C(1) << 63) / n_elems)
            FAIL("tensor '%s': element count overflows", name);
        n_elems *= t.ne[d];
    }
    if (t.ne[0] % be)
        FAIL("tensor '%s': ne[0] = %llu is not a multiple of the %s block size %zu", name,
             (unsigned long long)t.ne[0], cake_dtype_name(type), be);
    if (n_elems / be > UINT64_MAX / bb) FAIL("tensor '%s': byte size overflows", name);
    t.nbytes = n_elems / be * bb;
    if (w->n_t == w->cap_t) {
        const size_t cap = w->cap_t ? 2 * w->cap_t : 16;
        wtensor *p = cap <= SIZE_MAX / sizeof(*p) ? realloc(w->t, cap * sizeof(*p)) : NULL;
        if (!p) FAIL("out of memory adding tensor '%s'", name);
        w->t = p;
        w->cap_t = cap;
    }
    t.name = strdup(name);
    if (!t.name) FAIL("out of memory adding tensor '%s'", name);
    w->t[w->n_t++] = t;
#undef FAIL
}

/* ---- streaming the file ---- */

typedef struct {
    FILE *f;
    uint64_t pos;
    int err; /* errno of the first failure, 0 if none */
} out;

static void out_write(out *o, const void *p, size_t n) {
    if (o->err || n == 0) return;
    if (fwrite(p, 1, n, o->f) != n) {
        o->err = errno ? errno : EIO;
        return;
    }
    o->pos += n;
}

static void out_u32(out *o, uint32_t v) {
    out_write(o, &v, 4);
}

static void out_u64(out *o, uint64_t v) {
    out_write(o, &v, 8);
}

static void out_pad(out *o, uint64_t alignment) {
    static const uint8_t zeros[256];
    uint64_t pad = (alignment - o->pos % alignment) % alignment;
    while (pad) {
        const size_t n = pad < sizeof(zeros) ? (size_t)pad : sizeof(zeros);
        out_write(o, zeros, n);
        if (o->err) return;
        pad -= n;
    }
}

int cake_gguf_writer_write_file(cake_gguf_writer *w, const char *path, cake_gguf_fill_fn fill,
                                void *ctx, char *err, size_t errlen) {
    if (!w) return cake_err(err, errlen, "GGUF writer: out of memory");
    if (w->failed) return cake_err(err, errlen, "%s", w->err);
    if (!path || !*path) return cake_err(err, errlen, "GGUF writer: empty output path");
    if (w->n_t && !fill)
        return cake_err(err, errlen, "GGUF writer: no fill callback for %zu tensors", w->n_t);

    /* Offsets: each tensor starts at the next multiple of the alignment. */
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        w->t[i].offset = off;
        const uint64_t a = w->alignment;
        const uint64_t padded = w->t[i].nbytes + (a - w->t[i].nbytes % a) % a;
        if (padded < w->t[i].nbytes || padded > UINT64_MAX - off)
            return cake_err(err, errlen, "tensor '%s': data section size overflows", w->t[i].name);
        off += padded;
    }

    const size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) return cake_err(err, errlen, "out of memory writing '%s'", path);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        const int e = errno;
        cake_err(err, errlen, "cannot create '%s': %s", tmp, strerror(e));
        free(tmp);
        return -1;
    }
    out o = {f, 0, 0};
    int rc = -1;

    out_u32(&o, CAKE_GGUF_MAGIC);
    out_u32(&o, CAKE_GGUF_VERSION);
    out_u64(&o, w->n_t);
    out_u64(&o, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) out_write(&o, w->kv[i].blob, w->kv[i].len);
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        const uint64_t n = strlen(t->name);
        out_u64(&o, n);
        out_write(&o, t->name, (size_t)n);
        out_u32(&o, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) out_u64(&o, t->ne[d]);
        out_u32(&o, t->type);
        out_u64(&o, t->offset);
    }
    out_pad(&o, w->alignment);
    for (size_t i = 0; i < w->n_t && !o.err; i++) {
        const wtensor *t = &w->t[i];
        if (t->nbytes > SIZE_MAX) {
            cake_err(err, errlen, "tensor '%s': %llu bytes do not fit in memory", t->name,
                     (unsigned long long)t->nbytes);
            goto fail;
        }
        /* calloc: bytes that fill() leaves alone are zero, so output is deterministic. */
        void *data = calloc(1, (size_t)t->nbytes);
        if (!data) {
            cake_err(err, errlen, "tensor '%s': out of memory for %llu bytes", t->name,
                     (unsigned long long)t->nbytes);
            goto fail;
        }
        if (fill(i, data, t->nbytes, ctx) != 0) {
            free(data);
            cake_err(err, errlen, "tensor '%s': filling its data failed", t->name);
            goto fail;
        }
        out_write(&o, data, (size_t)t->nbytes);
        free(data);
        out_pad(&o, w->alignment);
    }
    if (!o.err && fflush(f) != 0) o.err = errno ? errno : EIO;
    /* fsync before rename, so a crash cannot leave a renamed but empty file. */
    if (!o.err && fsync(fileno(f)) != 0 && errno != EINVAL && errno != EROFS) o.err = errno;
    if (o.err) {
        cake_err(err, errlen, "writing '%s': %s", tmp, strerror(o.err));
        goto fail;
    }
    if (fclose(f) != 0) {
        f = NULL;
        cake_err(err, errlen, "writing '%s': %s", tmp, strerror(errno));
        goto fail;
    }
    f = NULL;
    if (rename(tmp, path) != 0) {
        cake_err(err, errlen, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
        goto fail;
    }
    rc = 0;
fail:
    if (f) fclose(f);
    if (rc) unlink(tmp);
    free(tmp);
    return rc;
}
