/* Engine speed on one model: prefill tokens/s at given prompt lengths, decode
 * tokens/s, and the process's peak RSS against (file size + KV cache).
 * Run one model per process so that the peak RSS belongs to that model:
 *   bench_engine MODEL.gguf [--threads N] [--prompt 512,2048] [--decode 32] [--kv f16|f32]
 *                [--batch N (tokens per forward pass; default 512)] [--backend cpu|cuda]
 * Prompts are random token ids (speed depends on shapes, not values). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "cake.h"
#include "model/gguf.h"
#include "util/clock.h"

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr,
                "usage: %s MODEL.gguf [--threads N] [--prompt 512,2048] [--decode 32] "
                "[--kv f16|f32]\n",
                argv[0]);
        return 2;
    }
    const char *path = argv[1], *prompts = "512,2048";
    int threads = 2, n_decode = 32, batch = 512;
    enum cake_backend_kind backend = CAKE_BACKEND_CPU;
    enum cake_kv_type kv = CAKE_KV_F16;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt"))
            prompts = argv[i + 1];
        else if (!strcmp(argv[i], "--decode"))
            n_decode = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch"))
            batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--backend"))
            backend = strcmp(argv[i + 1], "cuda") ? CAKE_BACKEND_CPU : CAKE_BACKEND_CUDA;
        else if (!strcmp(argv[i], "--kv"))
            kv = strcmp(argv[i + 1], "f32") ? CAKE_KV_F16 : CAKE_KV_F32;
        else
            return fprintf(stderr, "unknown option %s\n", argv[i]), 2;
    }
    char err[512];
    cake_model *m = NULL;
    if (cake_model_load(path, &m, err, sizeof(err))) return fprintf(stderr, "%s\n", err), 1;
    const cake_hparams *hp = cake_model_hparams(m);

    int lens[8], n_lens = 0, max_len = 0;
    for (const char *p = prompts; *p && n_lens < 8;) {
        lens[n_lens] = atoi(p);
        if (lens[n_lens] > max_len) max_len = lens[n_lens];
        n_lens++;
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = max_len + n_decode + 16;
    cp.n_threads = threads;
    cp.kv_type = kv;
    cp.max_batch = batch;
    cp.backend = backend;
    cake_context *c = NULL;
    if (cake_context_init(m, cp, &c, err, sizeof(err))) return fprintf(stderr, "%s\n", err), 1;

    cake_token *tok = malloc((size_t)cp.n_ctx * sizeof(cake_token));
    float *logits = malloc((size_t)hp->n_vocab * sizeof(float));
    uint64_t x = 42;
    for (int i = 0; i < cp.n_ctx; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = 3 + (cake_token)((x >> 33) % (uint64_t)(hp->n_vocab - 3));
    }
    /* Warm-up: touches every weight page once, like llama-bench's warm-up run. */
    if (cake_forward(c, tok, 16, 0, logits, err, sizeof(err)))
        return fprintf(stderr, "%s\n", err), 1;

    const int kv_elem = kv == CAKE_KV_F32 ? 4 : 2;
    const double kv_per_tok = 2.0 * hp->n_layers * hp->n_kv_heads * hp->head_dim * kv_elem;
    char extra[64] = ""; /* experts, a sliding window */
    if (hp->n_experts)
        snprintf(extra, sizeof(extra), " (%d experts, %d a token)", hp->n_experts,
                 hp->n_experts_used);
    if (hp->sliding_window)
        snprintf(extra + strlen(extra), sizeof(extra) - strlen(extra), ", window %d",
                 hp->sliding_window);
    printf("model %s: dim %d, %d layers, %d/%d heads, ffn %d%s, vocab %d, weights %s, kv %s, "
           "%d threads, batch %d, backend %s\n",
           path, hp->dim, hp->n_layers, hp->n_heads, hp->n_kv_heads, hp->ffn_dim, extra,
           hp->n_vocab, cake_dtype_name((uint32_t)hp->weight_dtype),
           kv == CAKE_KV_F32 ? "f32" : "f16", threads, batch,
           backend == CAKE_BACKEND_CUDA ? "cuda" : "cpu");
    for (int i = 0; i < n_lens; i++) {
        double t0 = cake_now_s();
        if (cake_forward(c, tok, lens[i], 0, logits, err, sizeof(err)))
            return fprintf(stderr, "%s\n", err), 1;
        double dt = cake_now_s() - t0;
        printf("  prefill %5d tokens: %8.2f s  %8.1f tok/s\n", lens[i], dt, lens[i] / dt);
        fflush(stdout);
    }
    /* Decode after the longest prompt's KV (as llama-bench's tg runs after an empty
     * context, ours continue a real one: slightly harder). */
    int pos = lens[n_lens - 1];
    cake_token t = argmax(logits, hp->n_vocab);
    double t0 = cake_now_s();
    for (int i = 0; i < n_decode; i++) {
        if (cake_forward(c, &t, 1, pos + i, logits, err, sizeof(err)))
            return fprintf(stderr, "%s\n", err), 1;
        t = argmax(logits, hp->n_vocab);
    }
    double dt = cake_now_s() - t0;
    printf("  decode  %5d tokens: %8.2f s  %8.1f tok/s (after %d prompt tokens)\n", n_decode, dt,
           n_decode / dt, pos);

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    const double rss = (double)ru.ru_maxrss * 1024.0;
    const double file = (double)cake_model_file_size(m);
    const double kv_bytes = kv_per_tok * (max_len + n_decode);
    printf("  peak RSS %.0f MiB; file %.0f MiB + KV cache %.0f MiB = %.0f MiB; ratio %.3f\n",
           rss / 1048576, file / 1048576, kv_bytes / 1048576, (file + kv_bytes) / 1048576,
           rss / (file + kv_bytes));
    free(tok);
    free(logits);
    cake_context_free(c);
    cake_model_free(m);
    return 0;
}
