#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "store/store.h"

const char *test_models_dir(void) {
    const char *env = getenv("CAKE_TEST_MODELS");
    return env && *env ? env : CAKE_TEST_MODELS;
}

const char *test_model_path(const char *name) {
    static char path[4096];
    snprintf(path, sizeof(path), "%s/%s", test_models_dir(), name);
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "skip: test model %s not found (set CAKE_TEST_MODELS)\n", path);
        return NULL;
    }
    return path;
}

void *test_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf && size) *size = (size_t)n;
    return buf;
}

atomic_int test_counted_allocs, test_counted_releases;

static void *counting_alloc(size_t size) {
    atomic_fetch_add(&test_counted_allocs, 1);
    return cake_store_alloc_buffer(size);
}

static void counting_release(void *p) {
    atomic_fetch_add(&test_counted_releases, 1);
    cake_store_free_buffer(p);
}

const cake_staging_allocator test_counting_allocator = {counting_alloc, counting_release};
