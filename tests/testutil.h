/* Helpers shared by the unit tests. */
#ifndef CAKE_TESTUTIL_H
#define CAKE_TESTUTIL_H

#include <stdatomic.h>
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

/* A staging allocator (the store's aligned buffers) that counts its calls. */
extern const cake_staging_allocator test_counting_allocator;
extern atomic_int test_counted_allocs, test_counted_releases;

#endif
