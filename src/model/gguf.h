/* GGUF v3 reader (and a small writer for `cake mkmodel`).
 *
 * The reader maps the file read-only and validates everything up front: every
 * count, string length, array extent, tensor shape, dtype, offset and alignment
 * is checked against the file size before anything points into it. After a
 * successful open, every pointer handed out lies inside the mapping, so callers
 * never need to re-check. A malformed file gives -1 and one line in `err` that
 * names what is wrong (which key, which tensor, which field, at which offset).
 *
 * Strings in GGUF are not NUL-terminated: they are (ptr, len) views into the map.
 */
#ifndef CAKE_GGUF_H
#define CAKE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CAKE_GGUF_MAGIC             0x46554747u /* "GGUF" little-endian */
#define CAKE_GGUF_VERSION           3
#define CAKE_GGUF_DEFAULT_ALIGNMENT 32
#define CAKE_GGUF_MAX_DIMS          4

/* Metadata value types (GGUF spec numbering). */
enum cake_gguf_type {
    CAKE_GGUF_UINT8 = 0,
    CAKE_GGUF_INT8 = 1,
    CAKE_GGUF_UINT16 = 2,
    CAKE_GGUF_INT16 = 3,
    CAKE_GGUF_UINT32 = 4,
    CAKE_GGUF_INT32 = 5,
    CAKE_GGUF_FLOAT32 = 6,
    CAKE_GGUF_BOOL = 7,
    CAKE_GGUF_STRING = 8,
    CAKE_GGUF_ARRAY = 9,
    CAKE_GGUF_UINT64 = 10,
    CAKE_GGUF_INT64 = 11,
    CAKE_GGUF_FLOAT64 = 12,
    CAKE_GGUF_TYPE_COUNT
};

/* Tensor element types (ggml numbering). Only the ones cake computes with are
 * named here; gguf_types.c has every ggml type's name and block size. */
enum cake_dtype {
    CAKE_DTYPE_F32 = 0,
    CAKE_DTYPE_F16 = 1,
    CAKE_DTYPE_Q4_0 = 2,
    CAKE_DTYPE_Q4_1 = 3,
    CAKE_DTYPE_Q5_0 = 6,
    CAKE_DTYPE_Q5_1 = 7,
    CAKE_DTYPE_Q8_0 = 8,
    CAKE_DTYPE_Q2_K = 10,
    CAKE_DTYPE_Q3_K = 11,
    CAKE_DTYPE_Q4_K = 12,
    CAKE_DTYPE_Q5_K = 13,
    CAKE_DTYPE_Q6_K = 14,
    CAKE_DTYPE_IQ4_NL = 20,
    CAKE_DTYPE_IQ4_XS = 23,
    CAKE_DTYPE_BF16 = 30,
};

typedef struct {
    const char *ptr; /* into the mapping (reader) or caller memory (writer); not NUL-terminated */
    uint64_t len;
} cake_gguf_str;

typedef struct {
    cake_gguf_str key;
    enum cake_gguf_type type;
    union {
        uint64_t u64; /* UINT8/16/32/64 and BOOL, widened */
        int64_t i64;  /* INT8/16/32/64, widened */
        double f64;   /* FLOAT32/64, widened */
        cake_gguf_str str;
    } v;
    /* ARRAY only: element type, count and the raw little-endian elements.
     * For arrays of strings, `arr_strs` holds one view per element (owned by the
     * reader) and `arr_data` points at the first serialized string. */
    enum cake_gguf_type arr_type;
    uint64_t arr_n;
    const void *arr_data;
    cake_gguf_str *arr_strs;
} cake_gguf_kv;

typedef struct {
    cake_gguf_str name;
    uint32_t n_dims;
    uint64_t ne[CAKE_GGUF_MAX_DIMS]; /* ne[0] is the fastest-varying (row length); unused = 1 */
    enum cake_dtype type;
    uint64_t offset;  /* relative to the start of the data section */
    const void *data; /* into the mapping */
    uint64_t nbytes;
} cake_gguf_tensor;

typedef struct cake_gguf {
    void *map; /* whole file, read-only; NULL for an in-memory parse */
    size_t map_size;
    const uint8_t *base; /* file bytes */
    uint64_t size;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset; /* start of the tensor data section in the file */
    uint64_t n_kv;
    cake_gguf_kv *kv;
    uint64_t n_tensors;
    cake_gguf_tensor *tensors;
} cake_gguf;

/* Open and validate `path`. 0 on success (*out owns the mapping; free with
 * cake_gguf_close), -1 on failure with a one-line reason in err (*out = NULL). */
int cake_gguf_open(const char *path, cake_gguf **out, char *err, size_t errlen);

/* Same validation over caller memory (for fuzzing and tests); `data` must
 * outlive the result. */
int cake_gguf_parse(const void *data, size_t size, cake_gguf **out, char *err, size_t errlen);

void cake_gguf_close(cake_gguf *g); /* accepts NULL */

/* Lookups; NULL when absent. Keys and names are compared as byte strings. */
const cake_gguf_kv *cake_gguf_find_kv(const cake_gguf *g, const char *key);
const cake_gguf_tensor *cake_gguf_find_tensor(const cake_gguf *g, const char *name);

/* Typed getters: 0 ok, -1 absent, -2 present with an incompatible type (err says
 * which key and which type it had). Integer getters accept any integer type whose
 * value fits; float getters accept FLOAT32/FLOAT64. Strings are views. */
int cake_gguf_get_u32(const cake_gguf *g, const char *key, uint32_t *out, char *err, size_t errlen);
int cake_gguf_get_f32(const cake_gguf *g, const char *key, float *out, char *err, size_t errlen);
int cake_gguf_get_bool(const cake_gguf *g, const char *key, bool *out, char *err, size_t errlen);
int cake_gguf_get_str(const cake_gguf *g, const char *key, cake_gguf_str *out, char *err,
                      size_t errlen);

/* Bytes per element-block and elements per block of a dtype (any ggml type,
 * also those cake cannot compute with); 0 if unknown. */
size_t cake_dtype_block_bytes(uint32_t type);
size_t cake_dtype_block_elems(uint32_t type);
/* "F32", "F16", "Q4_K", ... or "unknown". */
const char *cake_dtype_name(uint32_t type);
const char *cake_gguf_type_name(uint32_t type);

/* ---- Writer (used by `cake mkmodel`): builds a GGUF v3 file in one pass. ----
 * Usage: init, add KVs and tensor descriptors, then write_file() with a callback
 * that fills each tensor's bytes; the writer streams so that big models never
 * sit in memory whole. */
typedef struct cake_gguf_writer cake_gguf_writer;

cake_gguf_writer *cake_gguf_writer_init(void);
void cake_gguf_writer_free(cake_gguf_writer *w);
void cake_gguf_writer_add_u32(cake_gguf_writer *w, const char *key, uint32_t v);
void cake_gguf_writer_add_i32(cake_gguf_writer *w, const char *key, int32_t v);
void cake_gguf_writer_add_f32(cake_gguf_writer *w, const char *key, float v);
void cake_gguf_writer_add_bool(cake_gguf_writer *w, const char *key, bool v);
void cake_gguf_writer_add_str(cake_gguf_writer *w, const char *key, const char *v);
/* Arrays: the writer copies the elements. */
void cake_gguf_writer_add_arr_str(cake_gguf_writer *w, const char *key, const char *const *v,
                                  uint64_t n);
void cake_gguf_writer_add_arr_f32(cake_gguf_writer *w, const char *key, const float *v, uint64_t n);
void cake_gguf_writer_add_arr_i32(cake_gguf_writer *w, const char *key, const int32_t *v,
                                  uint64_t n);
void cake_gguf_writer_add_tensor(cake_gguf_writer *w, const char *name, enum cake_dtype type,
                                 uint32_t n_dims, const uint64_t *ne);
/* fill(i, buf, nbytes, ctx) writes tensor i's bytes into buf; returns 0 or -1. */
typedef int (*cake_gguf_fill_fn)(uint64_t i, void *buf, uint64_t nbytes, void *ctx);
int cake_gguf_writer_write_file(cake_gguf_writer *w, const char *path, cake_gguf_fill_fn fill,
                                void *ctx, char *err, size_t errlen);

#endif
