/* The core's side of the CUDA backend: loads libcake_cuda.so on first use and
 * forwards the cake_cuda_* calls to its table (see cuda_backend.h for why it
 * is a module). Where it looks, in order:
 *   $CAKE_CUDA_MODULE (a path), the executable's folder and its parent (the
 *   build tree: cake and the benches sit beside the module, the tests one
 *   folder down), then the dynamic linker's search path. */
#ifdef CAKE_HAVE_CUDA
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/cuda/cuda_backend.h"
#include "util/err.h"

#define MODULE_NAME "libcake_cuda.so"

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static const cake_cuda_ops *ops;
static char load_error[1024];

/* dlopen of path; 0 ok (ops set), -1 with the reason appended to load_error. */
static int try_open(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    const size_t used = strlen(load_error);
    if (!h) {
        snprintf(load_error + used, sizeof(load_error) - used, "%s%s", used ? "; " : "", dlerror());
        return -1;
    }
    const cake_cuda_ops *t = dlsym(h, "cake_cuda_module_ops");
    if (!t || t->version != CAKE_CUDA_MODULE_VERSION) {
        snprintf(load_error + used, sizeof(load_error) - used,
                 "%s%s: not a cake CUDA module of "
                 "this version",
                 used ? "; " : "", path);
        dlclose(h);
        return -1;
    }
    ops = t; /* the module stays loaded for the life of the process */
    return 0;
}

static void load_module(void) {
    const char *env = getenv("CAKE_CUDA_MODULE");
    if (env && *env) {
        try_open(env);
        return;
    }
    char exe[PATH_MAX], path[PATH_MAX + 32];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            snprintf(path, sizeof(path), "%s/" MODULE_NAME, exe);
            if (access(path, F_OK) == 0 && try_open(path) == 0) return;
            snprintf(path, sizeof(path), "%s/../" MODULE_NAME, exe);
            if (access(path, F_OK) == 0 && try_open(path) == 0) return;
        }
    }
    try_open(MODULE_NAME);
}

static const cake_cuda_ops *get_ops(char *err, size_t errlen) {
    pthread_once(&load_once, load_module);
    if (!ops) cake_err(err, errlen, "cuda: cannot load the CUDA backend module (%s)", load_error);
    return ops;
}

int cake_cuda_available(char *err, size_t errlen) {
    const cake_cuda_ops *o = get_ops(err, errlen);
    return o ? o->available(err, errlen) : 0;
}

int cake_cuda_init(const cake_model *m, int n_ctx, int max_batch, cake_cuda_state **out, char *err,
                   size_t errlen) {
    *out = NULL;
    const cake_cuda_ops *o = get_ops(err, errlen);
    return o ? o->init(m, n_ctx, max_batch, out, err, errlen) : -1;
}

void cake_cuda_free(cake_cuda_state *s) {
    if (s) ops->free(s); /* a state exists only once the module is loaded */
}

int cake_cuda_forward(cake_cuda_state *s, const cake_token *tokens, int n, int pos0, float *logits,
                      char *err, size_t errlen) {
    return ops->forward(s, tokens, n, pos0, logits, err, errlen);
}

int cake_cuda_kv_write(cake_cuda_state *s, int layer, int pos0, int n, const void *k_f16,
                       const void *v_f16, char *err, size_t errlen) {
    return ops->kv_write(s, layer, pos0, n, k_f16, v_f16, err, errlen);
}

int cake_cuda_kv_read(cake_cuda_state *s, int layer, int pos0, int n, void *k_f16, void *v_f16,
                      char *err, size_t errlen) {
    return ops->kv_read(s, layer, pos0, n, k_f16, v_f16, err, errlen);
}

void *cake_cuda_host_alloc(size_t size) {
    char err[256];
    const cake_cuda_ops *o = get_ops(err, sizeof(err));
    return o ? o->host_alloc(size) : NULL;
}

int cake_cuda_host_free(void *p) {
    return ops && p ? ops->host_free(p) : 0; /* pinned memory exists only once it is loaded */
}

int cake_cuda_attention_check(int path, int head_dim, int n_heads, int n_kv_heads, int pos0, int n,
                              float q_scale, double *max_err, char *err, size_t errlen) {
    const cake_cuda_ops *o = get_ops(err, errlen);
    return o ? o->attention_check(path, head_dim, n_heads, n_kv_heads, pos0, n, q_scale, max_err,
                                  err, errlen)
             : -1;
}

#else
typedef int cake_cuda_module_absent; /* a build without nvcc: no CUDA backend */
#endif
