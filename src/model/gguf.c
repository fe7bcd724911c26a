/* GGUF v3 reader.
 *
 * A model file is untrusted input: it may be truncated, corrupted or crafted. The
 * parser therefore walks the file once with a cursor that never moves past the
 * end, checks every length and count against the bytes that remain *before*
 * using it (so a corrupted count cannot trigger a huge allocation or a wild
 * pointer), and only hands out pointers once the whole file has been validated.
 * All multi-byte fields are read with memcpy, so unaligned fields are fine.
 *
 * Choices the spec leaves open:
 * - arrays of arrays are rejected (llama.cpp writes none and its reader refuses them too);
 * - keys and tensor names must be non-empty and free of NUL bytes; string values
 *   may hold any bytes;
 * - every tensor must have 1..4 dims, no zero dim, a dtype of known size (which
 *   need not be one cake computes with: gguf_types.c), an offset
 *   that is a multiple of the alignment, and data that lies inside the file and
 *   overlaps no other tensor. Bytes after the last tensor are ignored.
 * - a file without tensors may end before the padded start of its (empty) data
 *   section; data_offset is then clamped to the file size.
 */
#include "model/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/err.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader assumes a little-endian host"
#endif

/* ---- type tables ---- */

static const char *const gguf_type_names[CAKE_GGUF_TYPE_COUNT] = {
    "UINT8", "INT8",   "UINT16", "INT16",  "UINT32", "INT32",   "FLOAT32",
    "BOOL",  "STRING", "ARRAY",  "UINT64", "INT64",  "FLOAT64",
};

/* Serialized size of a scalar of each type; 0 for the variable-size STRING/ARRAY. */
static const uint8_t gguf_type_size[CAKE_GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *cake_gguf_type_name(uint32_t type) {
    return type < CAKE_GGUF_TYPE_COUNT ? gguf_type_names[type] : "unknown";
}

/* ---- the parser ---- */

/* Minimum serialized sizes, used to bound counts before allocating: a KV is at
 * least a key length, a type and a 1-byte value; a tensor info is at least a name
 * length, n_dims, one dim, a type and an offset. (Empty names are counted here so
 * that they get their own, clearer error later.) */
#define MIN_KV_BYTES     (8 + 4 + 1)
#define MIN_TENSOR_BYTES (8 + 4 + 8 + 4 + 8)
#define HEADER_BYTES     (4 + 4 + 8 + 8)

typedef struct {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos; /* invariant: pos <= size */
    char *err;
    size_t errlen;
} reader;

static uint64_t remaining(const reader *r) {
    return r->size - r->pos;
}

static uint32_t rd_u32(reader *r) {
    uint32_t v;
    memcpy(&v, r->base + r->pos, 4);
    r->pos += 4;
    return v;
}

static uint64_t rd_u64(reader *r) {
    uint64_t v;
    memcpy(&v, r->base + r->pos, 8);
    r->pos += 8;
    return v;
}

/* A printable, bounded copy of a key or tensor name for error messages (names in a
 * corrupted file can be huge or hold control bytes). */
typedef struct {
    char s[80];
} shown;

static shown show(const char *p, uint64_t len) {
    shown out;
    size_t n = len > 64 ? 61 : (size_t)len, k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        out.s[k++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (n < len) {
        memcpy(out.s + k, "...", 3);
        k += 3;
    }
    out.s[k] = '\0';
    return out;
}

/* Reads a string (u64 length + bytes) into *s. `what` names the item for errors
 * ("key #3", "tensor #7: name", "key #2 ('x'): value"). */
static int rd_str(reader *r, cake_gguf_str *s, const char *what) {
    if (remaining(r) < 8)
        return cake_err(r->err, r->errlen, "%s: string length runs past end of file at offset %llu",
                        what, (unsigned long long)r->pos);
    const uint64_t at = r->pos;
    const uint64_t len = rd_u64(r);
    if (len > remaining(r))
        return cake_err(
            r->err, r->errlen,
            "%s: string of length %llu at offset %llu runs past end of file (size %llu)", what,
            (unsigned long long)len, (unsigned long long)at, (unsigned long long)r->size);
    s->ptr = (const char *)r->base + r->pos;
    s->len = len;
    r->pos += len;
    return 0;
}

/* Keys and tensor names: non-empty, no NUL (they are looked up as C strings). */
static int check_name(reader *r, cake_gguf_str s, const char *what) {
    if (s.len == 0) return cake_err(r->err, r->errlen, "%s: empty name", what);
    if (memchr(s.ptr, '\0', s.len))
        return cake_err(r->err, r->errlen, "%s ('%s'): name contains a NUL byte", what,
                        show(s.ptr, s.len).s);
    return 0;
}

/* Decodes one scalar at p into kv->v, widening it. */
static int decode_scalar(reader *r, const char *who, enum cake_gguf_type type, const uint8_t *p,
                         cake_gguf_kv *kv) {
    switch (type) {
    case CAKE_GGUF_UINT8:
        kv->v.u64 = p[0];
        break;
    case CAKE_GGUF_INT8:
        kv->v.i64 = (int8_t)p[0];
        break;
    case CAKE_GGUF_UINT16: {
        uint16_t v;
        memcpy(&v, p, 2);
        kv->v.u64 = v;
        break;
    }
    case CAKE_GGUF_INT16: {
        int16_t v;
        memcpy(&v, p, 2);
        kv->v.i64 = v;
        break;
    }
    case CAKE_GGUF_UINT32: {
        uint32_t v;
        memcpy(&v, p, 4);
        kv->v.u64 = v;
        break;
    }
    case CAKE_GGUF_INT32: {
        int32_t v;
        memcpy(&v, p, 4);
        kv->v.i64 = v;
        break;
    }
    case CAKE_GGUF_FLOAT32: {
        float v;
        memcpy(&v, p, 4);
        kv->v.f64 = v;
        break;
    }
    case CAKE_GGUF_BOOL:
        if (p[0] > 1)
            return cake_err(r->err, r->errlen, "%s: BOOL value is %u, not 0 or 1", who, p[0]);
        kv->v.u64 = p[0];
        break;
    case CAKE_GGUF_UINT64:
        memcpy(&kv->v.u64, p, 8);
        break;
    case CAKE_GGUF_INT64:
        memcpy(&kv->v.i64, p, 8);
        break;
    case CAKE_GGUF_FLOAT64:
        memcpy(&kv->v.f64, p, 8);
        break;
    default:
        return cake_err(r->err, r->errlen, "%s: type %u is not a scalar", who, (unsigned)type);
    }
    return 0;
}

static int parse_array(reader *r, const char *who, cake_gguf_kv *kv) {
    if (remaining(r) < 12)
        return cake_err(r->err, r->errlen, "%s: array header runs past end of file at offset %llu",
                        who, (unsigned long long)r->pos);
    const uint32_t et = rd_u32(r);
    const uint64_t n = rd_u64(r);
    if (et == CAKE_GGUF_ARRAY)
        return cake_err(r->err, r->errlen, "%s: arrays of arrays are not supported", who);
    if (et >= CAKE_GGUF_TYPE_COUNT)
        return cake_err(r->err, r->errlen, "%s: array element type %u is out of range (0..%d)", who,
                        et, CAKE_GGUF_TYPE_COUNT - 1);
    kv->arr_type = (enum cake_gguf_type)et;
    kv->arr_n = n;
    kv->arr_data = r->base + r->pos;
    /* Strings take at least their 8-byte length each: bounding n by that keeps the
     * view array below twice the file size whatever the count says. */
    const uint64_t esize = et == CAKE_GGUF_STRING ? 8 : gguf_type_size[et];
    if (n > remaining(r) / esize)
        return cake_err(r->err, r->errlen,
                        "%s: array of %llu %s runs past end of file at offset %llu", who,
                        (unsigned long long)n, gguf_type_names[et], (unsigned long long)r->pos);
    if (et != CAKE_GGUF_STRING) {
        if (et == CAKE_GGUF_BOOL) {
            const uint8_t *b = r->base + r->pos;
            for (uint64_t i = 0; i < n; i++)
                if (b[i] > 1)
                    return cake_err(r->err, r->errlen, "%s: BOOL element #%llu is %u, not 0 or 1",
                                    who, (unsigned long long)i, b[i]);
        }
        r->pos += n * esize;
        return 0;
    }
    if (n == 0) return 0;
    kv->arr_strs = malloc((size_t)n * sizeof(cake_gguf_str));
    if (!kv->arr_strs)
        return cake_err(r->err, r->errlen, "%s: out of memory for %llu string views", who,
                        (unsigned long long)n);
    for (uint64_t i = 0; i < n; i++) {
        char what[160];
        snprintf(what, sizeof(what), "%s: element #%llu", who, (unsigned long long)i);
        if (rd_str(r, &kv->arr_strs[i], what)) return -1;
    }
    return 0;
}

static int parse_kv(reader *r, uint64_t i, cake_gguf_kv *kv) {
    char who[128];
    snprintf(who, sizeof(who), "key #%llu", (unsigned long long)i);
    if (rd_str(r, &kv->key, who) || check_name(r, kv->key, who)) return -1;
    snprintf(who, sizeof(who), "key #%llu ('%s')", (unsigned long long)i,
             show(kv->key.ptr, kv->key.len).s);
    if (remaining(r) < 4)
        return cake_err(r->err, r->errlen, "%s: value type runs past end of file at offset %llu",
                        who, (unsigned long long)r->pos);
    const uint32_t t = rd_u32(r);
    if (t >= CAKE_GGUF_TYPE_COUNT)
        return cake_err(r->err, r->errlen, "%s: value type %u is out of range (0..%d)", who, t,
                        CAKE_GGUF_TYPE_COUNT - 1);
    kv->type = (enum cake_gguf_type)t;
    if (t == CAKE_GGUF_STRING) return rd_str(r, &kv->v.str, who);
    if (t == CAKE_GGUF_ARRAY) return parse_array(r, who, kv);
    const uint64_t sz = gguf_type_size[t];
    if (remaining(r) < sz)
        return cake_err(r->err, r->errlen, "%s: %s value runs past end of file at offset %llu", who,
                        gguf_type_names[t], (unsigned long long)r->pos);
    if (decode_scalar(r, who, kv->type, r->base + r->pos, kv)) return -1;
    r->pos += sz;
    return 0;
}

static int parse_tensor_info(reader *r, uint64_t i, uint64_t alignment, cake_gguf_tensor *t) {
    char who[128];
    snprintf(who, sizeof(who), "tensor #%llu", (unsigned long long)i);
    if (rd_str(r, &t->name, who) || check_name(r, t->name, who)) return -1;
    snprintf(who, sizeof(who), "tensor '%s'", show(t->name.ptr, t->name.len).s);
    if (remaining(r) < 4)
        return cake_err(r->err, r->errlen, "%s: n_dims runs past end of file at offset %llu", who,
                        (unsigned long long)r->pos);
    t->n_dims = rd_u32(r);
    if (t->n_dims < 1 || t->n_dims > CAKE_GGUF_MAX_DIMS)
        return cake_err(r->err, r->errlen, "%s: n_dims = %u is out of range (1..%d)", who,
                        t->n_dims, CAKE_GGUF_MAX_DIMS);
    if (remaining(r) < 8ull * t->n_dims + 4 + 8)
        return cake_err(r->err, r->errlen,
                        "%s: shape, dtype and offset run past end of file at offset %llu", who,
                        (unsigned long long)r->pos);
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < CAKE_GGUF_MAX_DIMS; d++) {
        t->ne[d] = d < t->n_dims ? rd_u64(r) : 1;
        if (t->ne[d] == 0) return cake_err(r->err, r->errlen, "%s: dimension %u is 0", who, d);
        /* Element counts stay below 2^63 so that they fit ggml's int64 as well. */
        if (t->ne[d] > (UINT64_C(1) << 63) / n_elems)
            return cake_err(r->err, r->errlen,
                            "%s: dimension %u = %llu makes the element count overflow", who, d,
                            (unsigned long long)t->ne[d]);
        n_elems *= t->ne[d];
    }
    const uint32_t type = rd_u32(r);
    const size_t bb = cake_dtype_block_bytes(type), be = cake_dtype_block_elems(type);
    if (!bb)
        return cake_err(r->err, r->errlen, "%s: dtype %s (%u) is not a type cake knows the size of",
                        who, cake_dtype_name(type), type);
    t->type = (enum cake_dtype)type;
    if (t->ne[0] % be)
        return cake_err(r->err, r->errlen,
                        "%s: ne[0] = %llu is not a multiple of the %s block size %zu", who,
                        (unsigned long long)t->ne[0], cake_dtype_name(type), be);
    /* n_elems < 2^63, but bb/be is up to 8: the byte count can overflow. */
    const uint64_t blocks = n_elems / be;
    if (blocks > UINT64_MAX / bb)
        return cake_err(r->err, r->errlen, "%s: byte size overflows", who);
    t->nbytes = blocks * bb;
    t->offset = rd_u64(r);
    if (t->offset % alignment)
        return cake_err(r->err, r->errlen,
                        "%s: offset %llu is not a multiple of the alignment %llu", who,
                        (unsigned long long)t->offset, (unsigned long long)alignment);
    return 0;
}

/* Entries for the duplicate and overlap checks (sorted by name, then by offset). */
typedef struct {
    const char *ptr;
    uint64_t len;
    uint64_t begin, end;
} sort_entry;

static int cmp_name(const void *a, const void *b) {
    const sort_entry *x = a, *y = b;
    const uint64_t n = x->len < y->len ? x->len : y->len;
    const int c = memcmp(x->ptr, y->ptr, (size_t)n);
    if (c) return c;
    return (x->len > y->len) - (x->len < y->len);
}

static int cmp_range(const void *a, const void *b) {
    const sort_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

static int same_name(const sort_entry *a, const sort_entry *b) {
    return a->len == b->len && memcmp(a->ptr, b->ptr, (size_t)a->len) == 0;
}

static int check_duplicate_keys(reader *r, const cake_gguf *g) {
    if (g->n_kv < 2) return 0;
    sort_entry *e = malloc((size_t)g->n_kv * sizeof(*e));
    if (!e)
        return cake_err(r->err, r->errlen, "out of memory checking %llu keys",
                        (unsigned long long)g->n_kv);
    for (uint64_t i = 0; i < g->n_kv; i++)
        e[i] = (sort_entry){g->kv[i].key.ptr, g->kv[i].key.len, i, 0};
    qsort(e, (size_t)g->n_kv, sizeof(*e), cmp_name);
    int rc = 0;
    for (uint64_t i = 1; i < g->n_kv && !rc; i++)
        if (same_name(&e[i - 1], &e[i]))
            rc = cake_err(r->err, r->errlen, "duplicate key '%s'", show(e[i].ptr, e[i].len).s);
    free(e);
    return rc;
}

static int check_tensor_layout(reader *r, const cake_gguf *g) {
    if (g->n_tensors < 2) return 0;
    const uint64_t n = g->n_tensors;
    sort_entry *e = malloc((size_t)n * sizeof(*e));
    if (!e)
        return cake_err(r->err, r->errlen, "out of memory checking %llu tensors",
                        (unsigned long long)n);
    for (uint64_t i = 0; i < n; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        e[i] = (sort_entry){t->name.ptr, t->name.len, t->offset, t->offset + t->nbytes};
    }
    int rc = 0;
    qsort(e, (size_t)n, sizeof(*e), cmp_name);
    for (uint64_t i = 1; i < n && !rc; i++)
        if (same_name(&e[i - 1], &e[i]))
            rc = cake_err(r->err, r->errlen, "duplicate tensor name '%s'",
                          show(e[i].ptr, e[i].len).s);
    if (!rc) {
        /* Sorted by start, any overlap shows up between neighbours. Ranges are
         * relative to the data section and already known to lie inside the file. */
        qsort(e, (size_t)n, sizeof(*e), cmp_range);
        for (uint64_t i = 1; i < n && !rc; i++)
            if (e[i].begin < e[i - 1].end) {
                const shown a = show(e[i - 1].ptr, e[i - 1].len), b = show(e[i].ptr, e[i].len);
                rc = cake_err(r->err, r->errlen,
                              "tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap in the "
                              "data section",
                              a.s, (unsigned long long)e[i - 1].begin,
                              (unsigned long long)e[i - 1].end, b.s, (unsigned long long)e[i].begin,
                              (unsigned long long)e[i].end);
            }
    }
    free(e);
    return rc;
}

static int parse_header(reader *r, cake_gguf *g) {
    if (r->size >= 4) {
        uint32_t magic;
        memcpy(&magic, r->base, 4);
        if (magic != CAKE_GGUF_MAGIC) {
            const shown m = show((const char *)r->base, 4);
            return cake_err(r->err, r->errlen,
                            "not a GGUF file: magic is '%s' (0x%08x), expected 'GGUF'", m.s, magic);
        }
    }
    if (r->size < HEADER_BYTES)
        return cake_err(r->err, r->errlen,
                        "truncated GGUF header: the file has %llu bytes, the header needs %d",
                        (unsigned long long)r->size, HEADER_BYTES);
    r->pos = 4;
    g->version = rd_u32(r);
    if (g->version != CAKE_GGUF_VERSION) {
        const uint32_t v = g->version;
        if (__builtin_bswap32(v) == CAKE_GGUF_VERSION)
            return cake_err(r->err, r->errlen, "big-endian GGUF files are not supported");
        return cake_err(r->err, r->errlen, "unsupported GGUF version %u (cake reads version %d)", v,
                        CAKE_GGUF_VERSION);
    }
    g->n_tensors = rd_u64(r);
    g->n_kv = rd_u64(r);
    const uint64_t rem = remaining(r);
    if (g->n_kv > rem / MIN_KV_BYTES)
        return cake_err(r->err, r->errlen,
                        "key count %llu cannot fit in the %llu bytes after the header",
                        (unsigned long long)g->n_kv, (unsigned long long)rem);
    if (g->n_tensors > rem / MIN_TENSOR_BYTES ||
        g->n_tensors * MIN_TENSOR_BYTES > rem - g->n_kv * MIN_KV_BYTES)
        return cake_err(r->err, r->errlen,
                        "tensor count %llu cannot fit in the %llu bytes after the header "
                        "(with %llu keys)",
                        (unsigned long long)g->n_tensors, (unsigned long long)rem,
                        (unsigned long long)g->n_kv);
    return 0;
}

static int parse_alignment(reader *r, cake_gguf *g) {
    g->alignment = CAKE_GGUF_DEFAULT_ALIGNMENT;
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, "general.alignment");
    if (!kv) return 0;
    if (kv->type != CAKE_GGUF_UINT32)
        return cake_err(r->err, r->errlen, "key 'general.alignment' has type %s, expected UINT32",
                        cake_gguf_type_name(kv->type));
    const uint64_t a = kv->v.u64;
    if (a == 0 || (a & (a - 1)))
        return cake_err(r->err, r->errlen,
                        "key 'general.alignment' = %llu is not a nonzero power of two",
                        (unsigned long long)a);
    g->alignment = a;
    return 0;
}

static int parse(reader *r, cake_gguf *g) {
    g->base = r->base;
    g->size = r->size;
    if (parse_header(r, g)) return -1;
    if (g->n_kv) {
        g->kv = calloc((size_t)g->n_kv, sizeof(cake_gguf_kv));
        if (!g->kv)
            return cake_err(r->err, r->errlen, "out of memory for %llu keys",
                            (unsigned long long)g->n_kv);
    }
    /* The arrays are zeroed, so after a failure cake_gguf_close frees exactly what
     * was allocated (unparsed entries hold NULL). */
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (parse_kv(r, i, &g->kv[i])) return -1;
    if (check_duplicate_keys(r, g) || parse_alignment(r, g)) return -1;

    if (g->n_tensors > remaining(r) / MIN_TENSOR_BYTES)
        return cake_err(r->err, r->errlen,
                        "tensor count %llu cannot fit in the %llu bytes after the keys (offset "
                        "%llu)",
                        (unsigned long long)g->n_tensors, (unsigned long long)remaining(r),
                        (unsigned long long)r->pos);
    if (g->n_tensors) {
        g->tensors = calloc((size_t)g->n_tensors, sizeof(cake_gguf_tensor));
        if (!g->tensors)
            return cake_err(r->err, r->errlen, "out of memory for %llu tensors",
                            (unsigned long long)g->n_tensors);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (parse_tensor_info(r, i, g->alignment, &g->tensors[i])) return -1;

    /* pos <= size < 2^64 - alignment in practice, but keep the sum overflow-safe. */
    const uint64_t pad = (g->alignment - r->pos % g->alignment) % g->alignment;
    if (pad > UINT64_MAX - r->pos)
        return cake_err(r->err, r->errlen, "data section offset overflows");
    g->data_offset = r->pos + pad;
    if (g->data_offset > r->size) {
        if (g->n_tensors)
            return cake_err(r->err, r->errlen,
                            "data section starts at offset %llu, past end of file (size %llu)",
                            (unsigned long long)g->data_offset, (unsigned long long)r->size);
        g->data_offset = r->size;
    }
    const uint64_t data_size = r->size - g->data_offset;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        cake_gguf_tensor *t = &g->tensors[i];
        const shown nm = show(t->name.ptr, t->name.len);
        if (t->offset > data_size)
            return cake_err(r->err, r->errlen,
                            "tensor '%s': offset %llu is past end of file (data section starts "
                            "at %llu, size %llu)",
                            nm.s, (unsigned long long)t->offset, (unsigned long long)g->data_offset,
                            (unsigned long long)r->size);
        const uint64_t begin = g->data_offset + t->offset;
        if (t->nbytes > data_size - t->offset) {
            /* begin + nbytes may exceed 2^64 for a corrupt shape: print it only when it fits. */
            if (t->nbytes <= UINT64_MAX - begin)
                return cake_err(r->err, r->errlen,
                                "tensor '%s': data [%llu, %llu) extends past end of file "
                                "(size %llu)",
                                nm.s, (unsigned long long)begin,
                                (unsigned long long)(begin + t->nbytes),
                                (unsigned long long)r->size);
            return cake_err(r->err, r->errlen,
                            "tensor '%s': data of %llu bytes at offset %llu extends past end of "
                            "file (size %llu)",
                            nm.s, (unsigned long long)t->nbytes, (unsigned long long)begin,
                            (unsigned long long)r->size);
        }
        t->data = r->base + begin;
    }
    return check_tensor_layout(r, g);
}

static int parse_into(cake_gguf *g, const void *data, uint64_t size, char *err, size_t errlen) {
    reader r = {data, size, 0, err, errlen};
    return parse(&r, g);
}

int cake_gguf_parse(const void *data, size_t size, cake_gguf **out, char *err, size_t errlen) {
    *out = NULL;
    if (!data && size) return cake_err(err, errlen, "cake_gguf_parse: NULL data");
    cake_gguf *g = calloc(1, sizeof(*g));
    if (!g) return cake_err(err, errlen, "out of memory");
    static const uint8_t empty[1];
    if (parse_into(g, data ? data : empty, size, err, errlen)) {
        cake_gguf_close(g);
        return -1;
    }
    *out = g;
    return 0;
}

int cake_gguf_open(const char *path, cake_gguf **out, char *err, size_t errlen) {
    *out = NULL;
    /* (O_NONBLOCK: a FIFO would block the open until a writer came; it
     * is refused below, and a regular file's reads ignore the flag) */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return cake_err(err, errlen, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        const int e = errno;
        close(fd);
        return cake_err(err, errlen, "cannot stat '%s': %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return cake_err(err, errlen, "'%s' is a directory, not a GGUF file", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return cake_err(err, errlen, "'%s' is not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return cake_err(err, errlen, "'%s' is empty, not a GGUF file", path);
    }
    const size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    close(fd); /* the mapping keeps the file alive */
    if (map == MAP_FAILED)
        return cake_err(err, errlen, "cannot map '%s' (%zu bytes): %s", path, size,
                        strerror(map_errno));
    cake_gguf *g = calloc(1, sizeof(*g));
    if (!g) {
        munmap(map, size);
        return cake_err(err, errlen, "out of memory opening '%s'", path);
    }
    g->map = map;
    g->map_size = size;
    char why[512];
    if (parse_into(g, map, size, why, sizeof(why))) {
        cake_gguf_close(g);
        return cake_err(err, errlen, "%s: %s", path, why);
    }
    *out = g;
    return 0;
}

void cake_gguf_close(cake_gguf *g) {
    if (!g) return;
    if (g->kv)
        for (uint64_t i = 0; i < g->n_kv; i++) free(g->kv[i].arr_strs);
    free(g->kv);
    free(g->tensors);
    if (g->map) munmap(g->map, g->map_size);
    free(g);
}

/* ---- lookups ---- */

static int str_is(cake_gguf_str s, const char *c, size_t n) {
    return s.len == n && memcmp(s.ptr, c, n) == 0;
}

const cake_gguf_kv *cake_gguf_find_kv(const cake_gguf *g, const char *key) {
    if (!g || !key) return NULL;
    const size_t n = strlen(key);
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (str_is(g->kv[i].key, key, n)) return &g->kv[i];
    return NULL;
}

const cake_gguf_tensor *cake_gguf_find_tensor(const cake_gguf *g, const char *name) {
    if (!g || !name) return NULL;
    const size_t n = strlen(name);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (str_is(g->tensors[i].name, name, n)) return &g->tensors[i];
    return NULL;
}

static int is_unsigned(enum cake_gguf_type t) {
    return t == CAKE_GGUF_UINT8 || t == CAKE_GGUF_UINT16 || t == CAKE_GGUF_UINT32 ||
           t == CAKE_GGUF_UINT64;
}

static int is_signed(enum cake_gguf_type t) {
    return t == CAKE_GGUF_INT8 || t == CAKE_GGUF_INT16 || t == CAKE_GGUF_INT32 ||
           t == CAKE_GGUF_INT64;
}

static int wrong_type(const cake_gguf_kv *kv, const char *key, const char *want, char *err,
                      size_t errlen) {
    const char *t = kv->type == CAKE_GGUF_ARRAY ? "ARRAY of " : "";
    const char *et = kv->type == CAKE_GGUF_ARRAY ? cake_gguf_type_name(kv->arr_type)
                                                 : cake_gguf_type_name(kv->type);
    cake_err(err, errlen, "key '%s' has type %s%s, expected %s", key, t, et, want);
    return -2;
}

int cake_gguf_get_u32(const cake_gguf *g, const char *key, uint32_t *out, char *err,
                      size_t errlen) {
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, key);
    if (!kv) return -1;
    if (is_unsigned(kv->type)) {
        if (kv->v.u64 > UINT32_MAX) {
            cake_err(err, errlen, "key '%s' = %llu (%s) does not fit in 32 bits", key,
                     (unsigned long long)kv->v.u64, cake_gguf_type_name(kv->type));
            return -2;
        }
        *out = (uint32_t)kv->v.u64;
        return 0;
    }
    if (is_signed(kv->type)) {
        if (kv->v.i64 < 0 || (uint64_t)kv->v.i64 > UINT32_MAX) {
            cake_err(err, errlen, "key '%s' = %lld (%s) is not a 32-bit unsigned value", key,
                     (long long)kv->v.i64, cake_gguf_type_name(kv->type));
            return -2;
        }
        *out = (uint32_t)kv->v.i64;
        return 0;
    }
    return wrong_type(kv, key, "an integer", err, errlen);
}

int cake_gguf_get_f32(const cake_gguf *g, const char *key, float *out, char *err, size_t errlen) {
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, key);
    if (!kv) return -1;
    if (kv->type != CAKE_GGUF_FLOAT32 && kv->type != CAKE_GGUF_FLOAT64)
        return wrong_type(kv, key, "FLOAT32 or FLOAT64", err, errlen);
    const double v = kv->v.f64;
    /* A finite FLOAT64 that float cannot hold is an error, not a silent infinity. */
    if (isfinite(v) && fabs(v) > FLT_MAX) {
        cake_err(err, errlen, "key '%s' = %g does not fit in a 32-bit float", key, v);
        return -2;
    }
    *out = (float)v;
    return 0;
}

int cake_gguf_get_bool(const cake_gguf *g, const char *key, bool *out, char *err, size_t errlen) {
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, key);
    if (!kv) return -1;
    if (kv->type != CAKE_GGUF_BOOL) return wrong_type(kv, key, "BOOL", err, errlen);
    *out = kv->v.u64 != 0;
    return 0;
}

int cake_gguf_get_str(const cake_gguf *g, const char *key, cake_gguf_str *out, char *err,
                      size_t errlen) {
    const cake_gguf_kv *kv = cake_gguf_find_kv(g, key);
    if (!kv) return -1;
    if (kv->type != CAKE_GGUF_STRING) return wrong_type(kv, key, "STRING", err, errlen);
    *out = kv->v.str;
    return 0;
}
