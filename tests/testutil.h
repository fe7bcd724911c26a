/* Helpers shared by the unit tests. */
#ifndef CAKE_TESTUTIL_H
#define CAKE_TESTUTIL_H

#include <stddef.h>

/* Directory of the shared test models (env CAKE_TEST_MODELS, else the build's
 * default ../shared/models). */
const char *test_models_dir(void);
/* "<models dir>/<name>" in a static buffer, or NULL when the file is absent
 * (the caller then skips with a message). */
const char *test_model_path(const char *name);
/* Reads a whole file; caller frees. NULL on failure. */
void *test_read_file(const char *path, size_t *size);

#endif
