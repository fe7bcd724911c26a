/* Helpers shared by the unit tests. */
#ifndef CAKE_TESTUTIL_H
#define CAKE_TESTUTIL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "loader/staging.h"

/* Directory of the shared test models (env CAKE_TEST_MODELS, else the build's
 * default ../shared/models). */
const char *test_models_dir(void);
/* "<models dir>/<name>" in a static buffer, or NULL when the file is absent
 * (the caller then skips with a message). */
const char *test_model_path(const char *name);
/* Reads a whole file; caller frees. NULL on failure. */
void *test_read_file(const char *path, size_t *size);

/* `cake mkmodel --shape SHAPE --dtype DTYPE` into a new temp file, whose path
 * goes into path (room for 64). 0, or -1 when the command failed. */
int test_make_model(const char *shape, const char *dtype, char path[64]);

/* What test_write_variant changes in a copy of a `cake mkmodel` model. */
typedef struct {
    const float *rope_factors; /* rope_freqs.weight, n_factors values; NULL: none */
    int n_factors;
    float linear; /* linear RoPE scaling by this factor; 0: none */
    /* qwen2: architecture and keys renamed, each head's q/k rows put back in
     * the NeoX order that llama.cpp's converter permutes Llama's out of
     * (llama row 2i + b is qwen2 row b * head_dim/2 + i). */
    bool qwen2;
    float bias; /* q/k/v biases of (j % 7 - 3) * bias at index j; 0: none */
    bool tied;  /* without output.weight: the output is the token embedding */
    /* Q8_0 tensors written as F32 with their exact values d * q: the same
     * model in floats (not with qwen2) */
    bool dequantize;
} test_model_variant;

/* Copies the GGUF at src (a llama model with the key types `cake mkmodel`
 * writes) to dst with the changes of v. 0, or -1 with the reason in err. */
int test_write_variant(const char *src, const char *dst, const test_model_variant *v, char *err,
                       size_t errlen);

/* A staging allocator (the store's aligned buffers) that counts its calls. */
extern const cake_staging_allocator test_counting_allocator;
extern atomic_int test_counted_allocs, test_counted_releases;

#endif
