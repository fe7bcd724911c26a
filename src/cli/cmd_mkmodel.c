/* cake mkmodel: a complete GGUF (architecture llama, SentencePiece-style
 * vocabulary) with random weights, for benchmarks and tests. llama.cpp loads
 * the same file, so both engines can be timed on it. */
#include <getopt.h>
#include <pthread.h>
#include <unistd.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "model/gguf.h"
#include "model/shapes.h"
#include "model/synth_vocab.h"
#include "util/f16.h"
#include "util/q8_0.h"

static void print_help(FILE *f) {
    fputs("usage: cake mkmodel --shape NAME -o FILE.gguf [--seed S] [--dtype f32|f16|q8_0]\n"
          "Writes a GGUF with random weights and a real Llama architecture.\n"
          "  --shape NAME     one of:\n",
          f);
    for (const cake_shape *s = cake_shapes; s->name; s++)
        fprintf(f,
                "                     %-15s dim %d, %d layers, %d heads, %d KV heads, ffn %d, ctx "
                "%d (%s)\n",
                s->name, s->dim, s->n_layers, s->n_heads, s->n_kv_heads, s->ffn_dim, s->n_ctx,
                s->about);
    fputs("  -o, --output F   file to write (written to F.tmp, then renamed)\n"
          "  --seed S         weight seed (default 1)\n"
          "  --dtype T        f16 (default), f32 or q8_0 for the matrices (q8_0: the f16\n"
          "                   model's values quantized as llama.cpp does); norms are always f32\n",
          f);
}

/* Per-tensor generation state: which tensors are norms, the dtype, the seed. */
typedef struct {
    const int *is_norm;
    const int *dtype;
    uint64_t seed;
    float scale; /* weights uniform in [-scale, scale] */
} fill_ctx;

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Weights are drawn in pieces of PIECE elements, each from its own stream
 * seeded by (seed, tensor, piece), so the file is the same whatever the number
 * of threads that fill it (big shapes have billions of weights). */
#define PIECE (1u << 20)

typedef struct {
    const fill_ctx *fc;
    uint64_t tensor, n, n_pieces;
    void *buf;
    int dtype, is_norm, n_threads, tid;
} fill_job;

static void *fill_pieces(void *arg) {
    const fill_job *j = arg;
    for (uint64_t p = (uint64_t)j->tid; p < j->n_pieces; p += (uint64_t)j->n_threads) {
        uint64_t state = (j->fc->seed * 0x100000001b3ull + j->tensor) * 0x9e3779b97f4a7c15ull + p;
        const uint64_t end = (p + 1) * PIECE < j->n ? (p + 1) * PIECE : j->n;
        float block[CAKE_Q8_0_BLOCK]; /* Q8_0: the values of the block being made */
        for (uint64_t k = p * PIECE; k < end; k++) {
            /* norms are 1; weights uniform in [-scale, scale) from 24 random bits */
            float v = j->is_norm ? 1.0f
                                 : ((float)(splitmix(&state) >> 40) * (2.0f / 16777216.0f) - 1.0f) *
                                       j->fc->scale;
            if (j->dtype == CAKE_DTYPE_F32) {
                ((float *)j->buf)[k] = v;
            } else if (j->dtype == CAKE_DTYPE_F16) {
                ((cake_f16 *)j->buf)[k] = cake_f32_to_f16(v);
            } else { /* pieces are whole blocks */
                block[k % CAKE_Q8_0_BLOCK] = cake_f16_to_f32(cake_f32_to_f16(v));
                if (k % CAKE_Q8_0_BLOCK == CAKE_Q8_0_BLOCK - 1)
                    cake_q8_0_quantize_block(block, (uint8_t *)j->buf +
                                                        k / CAKE_Q8_0_BLOCK * CAKE_Q8_0_BYTES);
            }
        }
    }
    return NULL;
}

static int fill_tensor(uint64_t i, void *buf, uint64_t nbytes, void *ud) {
    const fill_ctx *fc = ud;
    fill_job base = {
        .fc = fc, .tensor = i, .buf = buf, .dtype = fc->dtype[i], .is_norm = fc->is_norm[i]};
    base.n = base.dtype == CAKE_DTYPE_Q8_0 ? nbytes / CAKE_Q8_0_BYTES * CAKE_Q8_0_BLOCK
                                           : nbytes / (base.dtype == CAKE_DTYPE_F32 ? 4 : 2);
    base.n_pieces = (base.n + PIECE - 1) / PIECE;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n_threads = cpus < 1 ? 1 : cpus > 64 ? 64 : (int)cpus;
    if ((uint64_t)n_threads > base.n_pieces) n_threads = (int)base.n_pieces;
    base.n_threads = n_threads;
    fill_job jobs[64];
    pthread_t th[64];
    int started = 0;
    for (int t = 1; t < n_threads; t++) {
        jobs[t] = base;
        jobs[t].tid = t;
        if (pthread_create(&th[t], NULL, fill_pieces, &jobs[t]) != 0) break;
        started = t;
    }
    /* Pieces of threads that failed to start are done here, on the caller. */
    for (int t = 0; t < n_threads; t++) {
        if (t >= 1 && t <= started) continue;
        jobs[t] = base;
        jobs[t].tid = t;
        fill_pieces(&jobs[t]);
    }
    for (int t = 1; t <= started; t++) pthread_join(th[t], NULL);
    return 0;
}

int cmd_mkmodel(int argc, char **argv) {
    static const struct option opts[] = {
        {"shape", required_argument, 0, 's'}, {"output", required_argument, 0, 'o'},
        {"seed", required_argument, 0, 'S'},  {"dtype", required_argument, 0, 'd'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *shape_name = NULL, *out = NULL;
    unsigned long long seed = 1;
    int dtype = CAKE_DTYPE_F16, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (c) {
        case 's':
            shape_name = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'S':
            if (cli_parse_u64(optarg, &seed))
                return cli_error(CLI_USAGE, "mkmodel", "--seed wants an unsigned integer, got '%s'",
                                 optarg);
            break;
        case 'd':
            if (!strcmp(optarg, "f16"))
                dtype = CAKE_DTYPE_F16;
            else if (!strcmp(optarg, "f32"))
                dtype = CAKE_DTYPE_F32;
            else if (!strcmp(optarg, "q8_0"))
                dtype = CAKE_DTYPE_Q8_0;
            else
                return cli_error(CLI_USAGE, "mkmodel", "--dtype is f16, f32 or q8_0, got '%s'",
                                 optarg);
            break;
        case 'h':
            print_help(stdout);
            return CLI_OK;
        default:
            print_help(stderr);
            return CLI_USAGE;
        }
    }
    if (optind < argc)
        return cli_error(CLI_USAGE, "mkmodel", "unexpected argument '%s'", argv[optind]);
    if (!shape_name || !out) return cli_error(CLI_USAGE, "mkmodel", "--shape and -o are required");
    const cake_shape *sh = cake_shape_find(shape_name);
    if (!sh) return cli_error(CLI_USAGE, "mkmodel", "unknown shape '%s' (see --help)", shape_name);

    char **tokens = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    if (cake_synth_vocab_build(sh->n_vocab, &tokens, &scores, &types))
        return cli_error(CLI_FAIL, "mkmodel", "out of memory building the vocabulary");

    cake_gguf_writer *w = cake_gguf_writer_init();
    const int head_dim = sh->head_dim ? sh->head_dim : sh->dim / sh->n_heads,
              q_dim = sh->n_heads * head_dim, kv_dim = sh->n_kv_heads * head_dim;
    const int max_tensors = 3 + 10 * sh->n_layers;
    int *is_norm = calloc((size_t)max_tensors, sizeof(int));
    int *dtypes = calloc((size_t)max_tensors, sizeof(int));
    int rc = CLI_FAIL;
    if (!w || !is_norm || !dtypes) {
        cli_error(CLI_FAIL, "mkmodel", "out of memory");
        goto done;
    }

    cake_gguf_writer_add_str(w, "general.architecture", "llama");
    char name[128];
    snprintf(name, sizeof(name), "cake-%s-random", sh->name);
    cake_gguf_writer_add_str(w, "general.name", name);
    /* llama.cpp's file types: all F32, mostly F16, mostly Q8_0 */
    cake_gguf_writer_add_u32(w, "general.file_type",
                             dtype == CAKE_DTYPE_F32   ? 0
                             : dtype == CAKE_DTYPE_F16 ? 1
                                                       : 7);
    cake_gguf_writer_add_u32(w, "llama.context_length", (uint32_t)sh->n_ctx);
    cake_gguf_writer_add_u32(w, "llama.embedding_length", (uint32_t)sh->dim);
    cake_gguf_writer_add_u32(w, "llama.block_count", (uint32_t)sh->n_layers);
    cake_gguf_writer_add_u32(w, "llama.feed_forward_length", (uint32_t)sh->ffn_dim);
    cake_gguf_writer_add_u32(w, "llama.attention.head_count", (uint32_t)sh->n_heads);
    cake_gguf_writer_add_u32(w, "llama.attention.head_count_kv", (uint32_t)sh->n_kv_heads);
    cake_gguf_writer_add_u32(w, "llama.rope.dimension_count", (uint32_t)head_dim);
    if (sh->head_dim) {
        cake_gguf_writer_add_u32(w, "llama.attention.key_length", (uint32_t)head_dim);
        cake_gguf_writer_add_u32(w, "llama.attention.value_length", (uint32_t)head_dim);
    }
    cake_gguf_writer_add_u32(w, "llama.vocab_size", (uint32_t)sh->n_vocab);
    if (sh->n_experts) {
        cake_gguf_writer_add_u32(w, "llama.expert_count", (uint32_t)sh->n_experts);
        cake_gguf_writer_add_u32(w, "llama.expert_used_count", (uint32_t)sh->n_experts_used);
    }
    cake_gguf_writer_add_f32(w, "llama.rope.freq_base", sh->rope_theta);
    cake_gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon", sh->rms_eps);
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tokens,
                                 (uint64_t)sh->n_vocab);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", scores, (uint64_t)sh->n_vocab);
    cake_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)sh->n_vocab);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    cake_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true);

    int nt = 0;
    /* a tensor of n_mats matrices (n_out, n_in); norms are vectors of n_in */
#define ADD3(nm, norm, n_in, n_out, n_mats, type)                                                  \
    do {                                                                                           \
        uint64_t ne_[3] = {(uint64_t)(n_in), (uint64_t)(n_out), (uint64_t)(n_mats)};               \
        dtypes[nt] = (type);                                                                       \
        is_norm[nt] = (norm);                                                                      \
        cake_gguf_writer_add_tensor(w, nm, dtypes[nt], (norm) ? 1 : (n_mats) > 1 ? 3 : 2, ne_);    \
        nt++;                                                                                      \
    } while (0)
#define ADD(nm, norm, n_in, n_out) ADD3(nm, norm, n_in, n_out, 1, (norm) ? CAKE_DTYPE_F32 : dtype)
    ADD("token_embd.weight", 0, sh->dim, sh->n_vocab);
    for (int l = 0; l < sh->n_layers; l++) {
        static const char *const suffix[] = {"attn_norm", "attn_q",      "attn_k",
                                             "attn_v",    "attn_output", "ffn_norm",
                                             "ffn_gate",  "ffn_up",      "ffn_down"};
        const int n_in[] = {sh->dim, sh->dim, sh->dim, sh->dim,    q_dim,
                            sh->dim, sh->dim, sh->dim, sh->ffn_dim};
        const int n_out[] = {1, q_dim,       kv_dim,      kv_dim, sh->dim,
                             1, sh->ffn_dim, sh->ffn_dim, sh->dim};
        for (int k = 0; k < (sh->n_experts ? 6 : 9); k++) {
            snprintf(name, sizeof(name), "blk.%d.%s.weight", l, suffix[k]);
            ADD(name, n_out[k] == 1, n_in[k], n_out[k]);
        }
        if (!sh->n_experts) continue;
        /* Mixtral's layout (llama.cpp's converter): the router in f32 (as
         * llama-quantize leaves it), each FFN matrix for all experts in one
         * tensor */
        snprintf(name, sizeof(name), "blk.%d.ffn_gate_inp.weight", l);
        ADD3(name, 0, sh->dim, sh->n_experts, 1, CAKE_DTYPE_F32);
        for (int k = 6; k < 9; k++) {
            snprintf(name, sizeof(name), "blk.%d.%s_exps.weight", l, suffix[k]);
            ADD3(name, 0, n_in[k], n_out[k], sh->n_experts, dtype);
        }
    }
    ADD("output_norm.weight", 1, sh->dim, 1);
    ADD("output.weight", 0, sh->dim, sh->n_vocab);
#undef ADD
#undef ADD3

    /* Uniform weights with std ~ 1/sqrt(dim) keep activations O(1) through the layers. */
    fill_ctx fc = {is_norm, dtypes, seed, sqrtf(3.0f / (float)sh->dim)};
    char err[512];
    if (cake_gguf_writer_write_file(w, out, fill_tensor, &fc, err, sizeof(err))) {
        cli_error(CLI_FAIL, "mkmodel", "%s", err);
        goto done;
    }
    fprintf(stderr, "cake mkmodel: wrote %s (shape %s, %s)\n", out, sh->name,
            dtype == CAKE_DTYPE_F32   ? "f32"
            : dtype == CAKE_DTYPE_F16 ? "f16"
                                      : "q8_0");
    rc = CLI_OK;
done:
    free(is_norm);
    free(dtypes);
    cake_gguf_writer_free(w);
    cake_synth_vocab_free(tokens, scores, types, sh->n_vocab);
    return rc;
}
