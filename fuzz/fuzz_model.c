/* libFuzzer target for the model loader, the CPU forward pass and the Cake
 * loader (see fuzz/README.md).
 *
 * Each input describes a tiny model: architecture, layers, heads, KV heads,
 * head size, widths, each tensor's dtype, one tensor's shape or presence
 * spoiled or not, optional biases, q/k norms, RoPE factors and scaling
 * (linear, YaRN), Ministral 3's attention temperature, and
 * whether the weights are sane values or any bits (NaN and infinity
 * included), and a prompt. The target writes that model as a GGUF file and loads it. A
 * model the loader refuses must come with a message. A model it accepts must
 * run: a prompt in one forward pass and the same prompt split in two must
 * give the same logits, bit for bit (cake_forward's promise), and so must the
 * Cake loader's prefill in chunks over an in-memory store in each mode
 * (computed and written back, loaded, both at once), one decode
 * step must follow, and with sane weights every logit must be finite. Bad
 * calls (a token id out of range, positions past the cache) must fail with
 * a message. Anything else (a crash, an ASan/UBSan report) aborts. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cake.h"
#include "engine/context.h"
#include "loader/loader.h"
#include "model/gguf.h"
#include "store/store.h"
#include "util/f16.h"
#include "fuzz_check.h"

/* The input, read a byte at a time (0 once it runs out). */
typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static unsigned next_byte(input *in) {
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}

/* Weights come from a generator seeded by the input, so that inputs stay short. */
static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static float rng_unit(uint64_t *s) { /* [-0.5, 0.5) */
    return (float)(rng_next(s) >> 40) / (float)(1u << 24) - 0.5f;
}

/* The dtypes a matrix may get. */
static const enum cake_dtype k_matrix_dtypes[] = {
    CAKE_DTYPE_F32,  CAKE_DTYPE_F16,  CAKE_DTYPE_BF16, CAKE_DTYPE_Q8_0,   CAKE_DTYPE_Q4_0,
    CAKE_DTYPE_Q4_1, CAKE_DTYPE_Q5_0, CAKE_DTYPE_Q5_1, CAKE_DTYPE_IQ4_NL, CAKE_DTYPE_Q2_K,
    CAKE_DTYPE_Q3_K, CAKE_DTYPE_Q4_K, CAKE_DTYPE_Q5_K, CAKE_DTYPE_Q6_K,   CAKE_DTYPE_IQ4_XS,
};
enum { N_MATRIX_DTYPES = sizeof(k_matrix_dtypes) / sizeof(k_matrix_dtypes[0]) };

/* Where each quantized block keeps its f16 scales (ggml's layouts): set to
 * a small value in sane weights, so that the levels around them stay small. */
static int scale_offsets(enum cake_dtype t, int off[2]) {
    switch (t) {
    case CAKE_DTYPE_Q4_1:
    case CAKE_DTYPE_Q5_1:
    case CAKE_DTYPE_Q4_K:
    case CAKE_DTYPE_Q5_K:
        off[0] = 0, off[1] = 2;
        return 2;
    case CAKE_DTYPE_Q2_K:
        off[0] = 80, off[1] = 82;
        return 2;
    case CAKE_DTYPE_Q3_K:
        off[0] = 108;
        return 1;
    case CAKE_DTYPE_Q6_K:
        off[0] = 208;
        return 1;
    default: /* Q4_0, Q5_0, Q8_0, IQ4_NL, IQ4_XS: d first */
        off[0] = 0;
        return 1;
    }
}

/* Prompts of up to 100 tokens: past the batch sizes where the kernels change
 * paths (16 and 32 tokens) and the KV cache's blocks of 64 positions. */
enum { MAX_TENSORS = 64, MAX_TOKENS = 100, N_CTX = 128 };

typedef struct {
    char name[64];
    enum cake_dtype type;
    uint32_t n_dims;
    uint64_t ne[2];
    bool norm; /* a vector of scales around 1 (norms, RoPE factors) */
} tensor_desc;

typedef struct {
    tensor_desc t[MAX_TENSORS];
    int n;
    bool sane;
    uint64_t seed;
} model_desc;

static void add(model_desc *d, const char *name, enum cake_dtype type, uint64_t n_in,
                uint64_t n_out, bool norm) {
    CHECK(d->n < MAX_TENSORS);
    tensor_desc *t = &d->t[d->n++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->type = type;
    t->n_dims = n_out ? 2 : 1;
    t->ne[0] = n_in;
    t->ne[1] = n_out;
    t->norm = norm;
}

static int fill(uint64_t i, void *buf, uint64_t nbytes, void *ctx) {
    model_desc *d = ctx;
    const tensor_desc *t = &d->t[i];
    uint64_t s = d->seed ^ (i + 1) * 0x9e3779b97f4a7c15ull;
    uint8_t *b = buf;
    if (!d->sane) {
        for (uint64_t k = 0; k < nbytes; k++) b[k] = (uint8_t)rng_next(&s);
        return 0;
    }
    if (t->type == CAKE_DTYPE_F32 || t->type == CAKE_DTYPE_F16 || t->type == CAKE_DTYPE_BF16) {
        const size_t es = t->type == CAKE_DTYPE_F32 ? 4 : 2;
        for (uint64_t k = 0; k < nbytes / es; k++) {
            const float v = t->norm ? 1.0f + rng_unit(&s) : rng_unit(&s);
            if (t->type == CAKE_DTYPE_F32) {
                memcpy(b + 4 * k, &v, 4);
            } else {
                uint16_t h = t->type == CAKE_DTYPE_F16 ? cake_f32_to_f16(v) : cake_f32_to_bf16(v);
                memcpy(b + 2 * k, &h, 2);
            }
        }
        return 0;
    }
    const size_t bb = cake_dtype_block_bytes(t->type);
    const uint16_t small = cake_f32_to_f16(0.01f);
    int off[2];
    const int n_off = scale_offsets(t->type, off);
    for (uint64_t k = 0; k < nbytes; k++) b[k] = (uint8_t)rng_next(&s);
    for (uint64_t blk = 0; blk + bb <= nbytes; blk += bb)
        for (int j = 0; j < n_off; j++) memcpy(b + blk + off[j], &small, 2);
    return 0;
}

static char g_path[64];
static bool g_verbose; /* $CAKE_FUZZ_VERBOSE: say what each input did */
static void remove_model(void) {
    if (g_path[0]) unlink(g_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    g_verbose = getenv("CAKE_FUZZ_VERBOSE") != NULL;
    snprintf(g_path, sizeof(g_path), "/dev/shm/cake-fuzz-model-%d.gguf", (int)getpid());
    atexit(remove_model);
    return 0;
}

/* A small SentencePiece vocabulary of n tokens: unknown, BOS, EOS, then pieces. */
static void add_vocab(cake_gguf_writer *w, int n) {
    char *tokens[64];
    float scores[64];
    int32_t types[64];
    for (int i = 0; i < n; i++) {
        tokens[i] = malloc(16);
        CHECK(tokens[i]);
        if (i < 3)
            snprintf(tokens[i], 16, "%s", i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>");
        else
            snprintf(tokens[i], 16, "\xe2\x96\x81t%d", i);
        scores[i] = (float)-i;
        types[i] = i == 0 ? 2 : i < 3 ? 3 : 1;
    }
    cake_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    cake_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tokens,
                                 (uint64_t)n);
    cake_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", scores, (uint64_t)n);
    cake_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)n);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2);
    cake_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    for (int i = 0; i < n; i++) free(tokens[i]);
}

/* Writes the model the input describes to g_path. The prompt goes to
 * tokens / n_tokens, the context's settings to p. 1 when its weights are
 * sane values, 0 when they are any bits, -1 when the writer refuses the
 * model (a quantized row that is not whole blocks, an empty tensor: the GGUF
 * reader's own fuzz target covers such files). */
static int write_model(input *in, cake_token *tokens, int *n_tokens, int *chunk,
                       cake_context_params *p) {
    static const char *const arch_names[] = {"llama", "qwen2", "qwen3", "mistral3"};
    const unsigned flags = next_byte(in);
    const char *arch = arch_names[flags % 4];
    const bool tied = flags & 0x04, bias = flags & 0x08, rope_factors = flags & 0x10,
               linear = flags & 0x20, qwen3_norms = flags & 0x40, mixed = flags & 0x80;
    const int n_layers = 1 + (int)next_byte(in) % 2;
    const int n_heads = 1 + (int)next_byte(in) % 8;
    const unsigned kv = next_byte(in);
    /* mostly a divisor of n_heads (as models have), sometimes anything */
    const int n_kv_heads = kv & 0x80 ? 1 + (int)(kv % 8) : n_heads / (1 + (int)(kv % n_heads));
    const int key_length = (int)next_byte(in) % 72; /* 0: dim / n_heads */
    const unsigned dim_byte = next_byte(in);
    /* quantized matrices need whole blocks: widths of 256 reach every type */
    const bool wide = dim_byte & 0x80;
    const int dim = wide         ? 256
                    : key_length ? 1 + (int)(dim_byte % 96)
                                 : n_heads * (1 + (int)(dim_byte % 20));
    const int ffn = wide ? 256 * (1 + (int)next_byte(in) % 2) : 1 + (int)next_byte(in) % 96;
    const int n_vocab = 4 + (int)next_byte(in) % 40;
    const int head_dim = key_length ? key_length : dim / n_heads;
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const enum cake_dtype base = k_matrix_dtypes[next_byte(in) % N_MATRIX_DTYPES];
    const enum cake_dtype norm_type =
        (enum cake_dtype[]){CAKE_DTYPE_F32, CAKE_DTYPE_F16, CAKE_DTYPE_BF16}[next_byte(in) % 3];
    const unsigned spoil = next_byte(in); /* which tensor gets a wrong shape, if any */
    const unsigned values = next_byte(in);

    model_desc *d = calloc(1, sizeof(*d));
    CHECK(d);
    const bool sane = d->sane = !(values & 0x80);
    d->seed = 0x243f6a8885a308d3ull ^ (uint64_t)values * 0x100000001b3ull;
#define MATRIX_TYPE() (mixed ? k_matrix_dtypes[next_byte(in) % N_MATRIX_DTYPES] : base)
    add(d, "token_embd.weight", MATRIX_TYPE(), (uint64_t)dim, (uint64_t)n_vocab, false);
    if (!tied) add(d, "output.weight", MATRIX_TYPE(), (uint64_t)dim, (uint64_t)n_vocab, false);
    add(d, "output_norm.weight", norm_type, (uint64_t)dim, 0, true);
    if (rope_factors) add(d, "rope_freqs.weight", norm_type, (uint64_t)(head_dim / 2), 0, true);
    for (int l = 0; l < n_layers; l++) {
        char name[64];
#define LAYER(suffix) (snprintf(name, sizeof(name), "blk.%d." suffix, l), name)
        add(d, LAYER("attn_norm.weight"), norm_type, (uint64_t)dim, 0, true);
        add(d, LAYER("ffn_norm.weight"), norm_type, (uint64_t)dim, 0, true);
        add(d, LAYER("attn_q.weight"), MATRIX_TYPE(), (uint64_t)dim, (uint64_t)q_dim, false);
        add(d, LAYER("attn_k.weight"), MATRIX_TYPE(), (uint64_t)dim, (uint64_t)kv_dim, false);
        add(d, LAYER("attn_v.weight"), MATRIX_TYPE(), (uint64_t)dim, (uint64_t)kv_dim, false);
        add(d, LAYER("attn_output.weight"), MATRIX_TYPE(), (uint64_t)q_dim, (uint64_t)dim, false);
        add(d, LAYER("ffn_gate.weight"), MATRIX_TYPE(), (uint64_t)dim, (uint64_t)ffn, false);
        add(d, LAYER("ffn_up.weight"), MATRIX_TYPE(), (uint64_t)dim, (uint64_t)ffn, false);
        add(d, LAYER("ffn_down.weight"), MATRIX_TYPE(), (uint64_t)ffn, (uint64_t)dim, false);
        if (bias) {
            add(d, LAYER("attn_q.bias"), norm_type, (uint64_t)q_dim, 0, false);
            add(d, LAYER("attn_k.bias"), norm_type, (uint64_t)kv_dim, 0, false);
            add(d, LAYER("attn_v.bias"), norm_type, (uint64_t)kv_dim, 0, false);
        }
        if (qwen3_norms) {
            add(d, LAYER("attn_q_norm.weight"), norm_type, (uint64_t)head_dim, 0, true);
            add(d, LAYER("attn_k_norm.weight"), norm_type, (uint64_t)head_dim, 0, true);
        }
#undef LAYER
    }
#undef MATRIX_TYPE
    if (spoil & 0x80) { /* one dimension off by one, or a tensor gone */
        tensor_desc *t = &d->t[spoil % (unsigned)d->n];
        if (spoil & 0x40) {
            *t = d->t[--d->n];
        } else {
            const int k = t->n_dims == 2 && spoil & 0x20;
            t->ne[k] = spoil & 0x10 ? t->ne[k] + 1 : t->ne[k] - 1;
        }
    }

    cake_gguf_writer *w = cake_gguf_writer_init();
    CHECK(w);
    char key[96];
#define KEY(suffix) (snprintf(key, sizeof(key), "%s." suffix, arch), key)
    cake_gguf_writer_add_str(w, "general.architecture", arch);
    cake_gguf_writer_add_u32(w, KEY("context_length"), 4096);
    cake_gguf_writer_add_u32(w, KEY("embedding_length"), (uint32_t)dim);
    cake_gguf_writer_add_u32(w, KEY("block_count"), (uint32_t)n_layers);
    cake_gguf_writer_add_u32(w, KEY("feed_forward_length"), (uint32_t)ffn);
    cake_gguf_writer_add_u32(w, KEY("attention.head_count"), (uint32_t)n_heads);
    cake_gguf_writer_add_u32(w, KEY("attention.head_count_kv"), (uint32_t)n_kv_heads);
    if (key_length) {
        cake_gguf_writer_add_u32(w, KEY("attention.key_length"), (uint32_t)key_length);
        cake_gguf_writer_add_u32(w, KEY("attention.value_length"), (uint32_t)key_length);
    }
    cake_gguf_writer_add_u32(w, KEY("rope.dimension_count"), (uint32_t)head_dim);
    cake_gguf_writer_add_f32(w, KEY("rope.freq_base"), values & 1 ? 1e6f : 1e4f);
    cake_gguf_writer_add_f32(w, KEY("attention.layer_norm_rms_epsilon"), 1e-5f);
    if (linear) { /* (or YaRN, over a short original context, with or without its magnitude) */
        const bool yarn = values & 2;
        cake_gguf_writer_add_str(w, KEY("rope.scaling.type"), yarn ? "yarn" : "linear");
        cake_gguf_writer_add_f32(w, KEY("rope.scaling.factor"), 1.0f + (float)(values % 8));
        if (yarn)
            cake_gguf_writer_add_u32(w, KEY("rope.scaling.original_context_length"),
                                     1 + values % 64);
        if (yarn && values & 4)
            cake_gguf_writer_add_f32(w, KEY("rope.scaling.yarn_log_multiplier"),
                                     0.5f * (float)(values >> 3 & 3));
    }
    if (!strcmp(arch, "mistral3") &&
        values & 8) { /* Ministral 3's temperature, from position 1-3 */
        cake_gguf_writer_add_f32(w, KEY("attention.temperature_scale"),
                                 0.1f * (float)(1 + values % 4));
        cake_gguf_writer_add_u32(w, KEY("attention.temperature_length"), 1 + values % 3);
    }
#undef KEY
    add_vocab(w, n_vocab);
    for (int i = 0; i < d->n; i++)
        cake_gguf_writer_add_tensor(w, d->t[i].name, d->t[i].type, d->t[i].n_dims, d->t[i].ne);
    char err[256];
    const int written = cake_gguf_writer_write_file(w, g_path, fill, d, err, sizeof(err));
    cake_gguf_writer_free(w);
    free(d);
    if (written) {
        if (g_verbose) fprintf(stderr, "not written: %s\n", err);
        return -1;
    }

    const unsigned run = next_byte(in);
    *p = cake_context_default_params();
    p->n_ctx = N_CTX;
    p->n_threads = 1 + (int)(run & 1);
    p->kv_type = run & 2                         ? CAKE_KV_F32
                 : run & 4 && head_dim % 32 == 0 ? CAKE_KV_Q8_0
                 : run & 8 && head_dim % 32 == 0 ? CAKE_KV_Q4_0
                                                 : CAKE_KV_F16;
    *n_tokens = 1 + (int)next_byte(in) % MAX_TOKENS;
    p->max_batch = 1 + (int)next_byte(in) % *n_tokens; /* splits inside each call */
    *chunk = 1 + (int)next_byte(in) % 24;              /* the store's chunk size */
    /* (varied ids even where the input has run out) */
    for (int i = 0; i < *n_tokens; i++)
        tokens[i] = (cake_token)((next_byte(in) + 7u * (unsigned)i) % (unsigned)n_vocab);
    return sane;
}

/* The Cake loader over an in-memory store: the prompt computed in chunks
 * (written back), then loaded, then computed from the front while loaded
 * from the back, must give the logits of one call (want), bit for bit. */
static void loader_modes(cake_context *c, const cake_token *tokens, int n, int chunk,
                         const float *want, float *got) {
    cake_loader_engine e;
    cake_context_loader_engine(c, 1, &e);
    char err[512];
    cake_store *s = NULL;
    CHECK(cake_store_open("mem:", &s, err, sizeof(err)) == 0);
    cake_writeback *wb =
        cake_writeback_create(s, MAX_TOKENS, err, sizeof(err)); /* room for every chunk */
    CHECK(wb);
    static const cake_mode modes[] = {CAKE_MODE_COMPUTE, CAKE_MODE_LOAD, CAKE_MODE_CAKE};
    for (int i = 0; i < 3; i++) {
        cake_prefill_params lp = {.store = s,
                                  .writeback = i == 0 ? wb : NULL,
                                  .mode = modes[i],
                                  .chunk = chunk,
                                  .io_depth = 2};
        cake_prefill_stats st;
        err[0] = '\0';
        if (cake_prefill(&e, tokens, n, &lp, got, &st, NULL, err, sizeof(err))) {
            fprintf(stderr, "prefill (mode %d): %s\n", (int)modes[i], err);
            abort();
        }
        if (i == 0) CHECK(cake_writeback_drain(wb, 60000) == 0);
        /* every loadable chunk is in the store: load mode loads them all */
        if (modes[i] == CAKE_MODE_LOAD)
            CHECK(st.chunks_loaded == cake_prefill_loadable_chunks(n, chunk) && !st.store_error[0]);
        if (memcmp(got, want, (size_t)e.hp->n_vocab * sizeof(float)) != 0) {
            fprintf(stderr, "mode %d: logits differ from one call (%d tokens, chunks of %d)\n",
                    (int)modes[i], n, chunk);
            abort();
        }
    }
    cake_writeback_free(wb);
    cake_store_close(s);
}

static bool all_finite(const float *v, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(v[i])) return false;
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    input in = {data, size};
    cake_token tokens[MAX_TOKENS + 1];
    int n = 0;
    cake_context_params p;
    int chunk = 1;
    const int sane = write_model(&in, tokens, &n, &chunk, &p);
    if (sane < 0) return -1; /* not added to the corpus */

    char err[512] = "";
    cake_model *m = NULL;
    if (cake_model_load(g_path, &m, err, sizeof(err))) {
        CHECK(m == NULL && err[0]);
        if (g_verbose) fprintf(stderr, "refused: %s\n", err);
        return 0;
    }
    const cake_hparams *hp = cake_model_hparams(m);
    const int n_vocab = hp->n_vocab; /* (the loader's engine takes the fingerprint) */

    cake_context *c = NULL;
    if (cake_context_init(m, p, &c, err, sizeof(err))) {
        fprintf(stderr, "context: %s\n", err);
        abort();
    }
    float *one = malloc((size_t)n_vocab * sizeof(float)),
          *split = malloc((size_t)n_vocab * sizeof(float));
    CHECK(one && split);
    /* the prompt in one call, then again split in two (the cache's positions
     * rewritten): the same bits */
    CHECK(cake_forward(c, tokens, n, 0, one, err, sizeof(err)) == 0);
    const int k = n / 2;
    if (k) CHECK(cake_forward(c, tokens, k, 0, NULL, err, sizeof(err)) == 0);
    CHECK(cake_forward(c, tokens + k, n - k, k, split, err, sizeof(err)) == 0);
    if (memcmp(one, split, (size_t)n_vocab * sizeof(float)) != 0) {
        fprintf(stderr, "logits differ between one call and %d + %d tokens\n", k, n - k);
        abort();
    }
    if (sane) CHECK(all_finite(one, n_vocab));
    loader_modes(c, tokens, n, chunk, one, split);
    /* a decode step */
    CHECK(cake_forward(c, tokens, 1, n, one, err, sizeof(err)) == 0);
    if (sane) CHECK(all_finite(one, n_vocab));
    /* bad calls fail with a message */
    cake_token bad = (cake_token)n_vocab;
    err[0] = '\0';
    CHECK(cake_forward(c, &bad, 1, n + 1, one, err, sizeof(err)) == -1 && err[0]);
    err[0] = '\0';
    CHECK(cake_forward(c, tokens, 1, N_CTX, one, err, sizeof(err)) == -1 && err[0]);

    if (g_verbose)
        fprintf(stderr,
                "ran: %s, %d layers, dim %d, %d heads / %d KV heads of %d, ffn %d, %s, %d tokens\n",
                cake_dtype_name((uint32_t)hp->weight_dtype), hp->n_layers, hp->dim, hp->n_heads,
                hp->n_kv_heads, hp->head_dim, hp->ffn_dim, sane ? "sane weights" : "any bits", n);
    free(one);
    free(split);
    cake_context_free(c);
    cake_model_free(m);
    return 0;
}
