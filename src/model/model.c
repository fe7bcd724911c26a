/* Loading a GGUF Llama-family model: read the architecture keys, check every
 * tensor's presence, dtype and shape, and point at the weights inside the
 * mapping.
 *
 * Two architectures share the layers: `llama`, and `qwen2` (Qwen2/2.5), which
 * is the same block with biases on q, k and v and RoPE rotating the two
 * halves of a head (NeoX style) instead of adjacent pairs. llama.cpp's
 * converter permutes Llama's q/k rows so that adjacent pairs work, but not
 * Qwen2's. Optional q/k/v biases are taken on either, as llama.cpp does.
 * `qwen3` adds per-head q/k norms; `qwen3moe` is qwen3 with a mixture of
 * experts in place of the FFN, which llama files may have too (Mixtral);
 * `qwen2moe` is qwen2 with experts and a gated shared expert; `granite`
 * and `granitemoe` are llama and its experts with scales on the
 * embeddings, scores, residual branches and logits.
 * `phi3` keeps q/k/v and gate/up in one tensor each (read as row views),
 * with LongRoPE and a sliding window; `gemma2` and `gemma3` add embedding
 * scaling, GELU, post-norms, windowed layers and (Gemma 2) soft caps. */
#include "model/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include "backend/cpu/kernels.h"
#include "model/dequant.h"
#include "model/tokenizer.h"
#include "util/err.h"
#include "util/f16.h"
#include "util/q8_0.h"
#include "util/threadpool.h"

static int str_eq(cake_gguf_str s, const char *c) {
    return s.len == strlen(c) && memcmp(s.ptr, c, s.len) == 0;
}

/* Required (or defaulted) u32 key, checked to lie in [lo, hi]. */
static int get_u32_in(const cake_gguf *g, const char *key, int required, uint32_t def, uint32_t lo,
                      uint32_t hi, int *out, char *err, size_t errlen) {
    uint32_t v = def;
    int rc = cake_gguf_get_u32(g, key, &v, err, errlen);
    if (rc == -2) return -1;
    if (rc == -1) {
        if (required) return cake_err(err, errlen, "missing metadata key '%s'", key);
        v = def;
    }
    if (v < lo || v > hi)
        return cake_err(err, errlen, "metadata key '%s' = %u is out of range [%u, %u]", key, v, lo,
                        hi);
    *out = (int)v;
    return 0;
}

static int get_f32_or(const cake_gguf *g, const char *key, float def, float *out, char *err,
                      size_t errlen) {
    int rc = cake_gguf_get_f32(g, key, out, err, errlen);
    if (rc == -2) return -1;
    if (rc == -1) *out = def;
    if (!isfinite(*out)) return cake_err(err, errlen, "metadata key '%s' is not finite", key);
    return 0;
}

static int is_float_dtype(int t) {
    return t == CAKE_DTYPE_F32 || t == CAKE_DTYPE_F16 || t == CAKE_DTYPE_BF16;
}

/* The big matrices may also be quantized (model/dequant.h; the GGUF reader
 * checked that their rows are whole blocks). */
static int is_weight_dtype(int t) {
    return is_float_dtype(t) || cake_dequant_supported(t);
}

/* The matrices (n_out, n_in) of tensor `name`: a 2-D one, ne = [n_in,
 * n_out] (GGUF lists the row length first), when n_mats is 0; else a 3-D
 * one of n_mats of them, ne = [n_in, n_out, n_mats] (experts). Matrix k
 * into w[k * stride]. 1 when the tensor is absent and `optional`. */
static int find_matrices(const cake_gguf *g, const char *name, int n_in, int n_out, int n_mats,
                         int stride, int optional, cake_weight *w, char *err, size_t errlen) {
    const cake_gguf_tensor *t = cake_gguf_find_tensor(g, name);
    if (!t) {
        if (optional) return 1;
        return cake_err(err, errlen, "tensor '%s' is missing", name);
    }
    if (!is_weight_dtype(t->type))
        return cake_err(err, errlen,
                        "tensor '%s': dtype %s is not supported for weights (" CAKE_WEIGHT_DTYPES
                        " are)",
                        name, cake_dtype_name(t->type));
    if (!n_mats && (t->n_dims != 2 || t->ne[0] != (uint64_t)n_in || t->ne[1] != (uint64_t)n_out))
        return cake_err(err, errlen, "tensor '%s': shape [%llu, %llu] (%u dims), expected [%d, %d]",
                        name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], t->n_dims,
                        n_in, n_out);
    if (n_mats && (t->n_dims != 3 || t->ne[0] != (uint64_t)n_in || t->ne[1] != (uint64_t)n_out ||
                   t->ne[2] != (uint64_t)n_mats))
        return cake_err(err, errlen,
                        "tensor '%s': shape [%llu, %llu, %llu] (%u dims), expected [%d, %d, %d]",
                        name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                        (unsigned long long)t->ne[2], t->n_dims, n_in, n_out, n_mats);
    /* rows are whole blocks (the GGUF reader checked), so a matrix is too */
    const size_t bytes = (size_t)n_out * (size_t)n_in / cake_dtype_block_elems(t->type) *
                         cake_dtype_block_bytes(t->type);
    for (int k = 0; k < (n_mats ? n_mats : 1); k++)
        w[k * stride] = (cake_weight){.data = (const char *)t->data + (size_t)k * bytes,
                                      .dtype = (int)t->type,
                                      .n_in = n_in,
                                      .n_out = n_out};
    return 0;
}

/* A 2-D weight (find_matrices). */
static int find_weight(const cake_gguf *g, const char *name, int n_in, int n_out, int optional,
                       cake_weight *w, char *err, size_t errlen) {
    return find_matrices(g, name, n_in, n_out, 0, 1, optional, w, err, errlen);
}

/* Layer l's n_experts matrices `which` (gate, up, down), expert e's into
 * w[3 e] (w steps over the three matrices of an expert): from one 3-D
 * tensor, ne = [n_in, n_out, n_experts] (llama.cpp's converter since
 * 2024), or one tensor an expert, blk.L.ffn_WHICH.E.weight (older
 * Mixtral conversions, still on the hubs). */
static int find_experts(const cake_gguf *g, int l, const char *which, int n_in, int n_out,
                        int n_experts, cake_weight *w, char *err, size_t errlen) {
    char name[96], one[96];
    snprintf(name, sizeof(name), "blk.%d.ffn_%s_exps.weight", l, which);
    snprintf(one, sizeof(one), "blk.%d.ffn_%s.0.weight", l, which);
    if (cake_gguf_find_tensor(g, name) || !cake_gguf_find_tensor(g, one))
        return find_matrices(g, name, n_in, n_out, n_experts, 3, 0, w, err, errlen);
    for (int e = 0; e < n_experts; e++) {
        snprintf(one, sizeof(one), "blk.%d.ffn_%s.%d.weight", l, which, e);
        if (find_weight(g, one, n_in, n_out, 0, &w[3 * e], err, errlen)) return -1;
    }
    return 0;
}

/* Rows [r0, r0 + n) of w: a matrix of their own (rows are whole blocks). */
static cake_weight weight_rows(cake_weight w, int r0, int n) {
    const size_t row = (size_t)w.n_in / cake_dtype_block_elems((uint32_t)w.dtype) *
                       cake_dtype_block_bytes((uint32_t)w.dtype);
    w.data = (const char *)w.data + (size_t)r0 * row;
    w.n_out = n;
    return w;
}

/* Layer l's q, k and v: three tensors, or phi3's one (attn_qkv: q's rows,
 * then k's, then v's). */
static int find_qkv(const cake_gguf *g, int l, int dim, int q_dim, int kv_dim, cake_layer *L,
                    char *err, size_t errlen) {
    char name[96];
    snprintf(name, sizeof(name), "blk.%d.attn_qkv.weight", l);
    cake_weight qkv = {0};
    const int rc = find_weight(g, name, dim, q_dim + 2 * kv_dim, 1, &qkv, err, errlen);
    if (rc < 0) return -1;
    if (rc == 0) {
        L->wq = weight_rows(qkv, 0, q_dim);
        L->wk = weight_rows(qkv, q_dim, kv_dim);
        L->wv = weight_rows(qkv, q_dim + kv_dim, kv_dim);
        return 0;
    }
    const char *which[] = {"q", "k", "v"};
    cake_weight *w[] = {&L->wq, &L->wk, &L->wv};
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof(name), "blk.%d.attn_%s.weight", l, which[i]);
        if (find_weight(g, name, dim, i ? kv_dim : q_dim, 0, w[i], err, errlen)) return -1;
    }
    return 0;
}

/* Layer l's gate and up: two tensors, or phi3's ffn_up of both (the gate's
 * rows first: llama.cpp's LLM_FFN_SWIGLU takes silu of the first half). */
static int find_gate_up(const cake_gguf *g, int l, int dim, int ffn, cake_layer *L, char *err,
                        size_t errlen) {
    char gate[96], up[96];
    snprintf(gate, sizeof(gate), "blk.%d.ffn_gate.weight", l);
    snprintf(up, sizeof(up), "blk.%d.ffn_up.weight", l);
    if (cake_gguf_find_tensor(g, gate))
        return find_weight(g, gate, dim, ffn, 0, &L->w_gate, err, errlen) ||
                       find_weight(g, up, dim, ffn, 0, &L->w_up, err, errlen)
                   ? -1
                   : 0;
    cake_weight both = {0};
    if (find_weight(g, up, dim, 2 * ffn, 0, &both, err, errlen)) {
        cake_err(err, errlen, "tensor '%s' is missing (and '%s' is not gate and up in one)", gate,
                 up);
        return -1;
    }
    L->w_gate = weight_rows(both, 0, ffn);
    L->w_up = weight_rows(both, ffn, ffn);
    return 0;
}

/* A norm vector of length n, returned as an f32 copy (it is tiny). */
static float *load_norm(const cake_gguf *g, const char *name, int n, char *err, size_t errlen) {
    const cake_gguf_tensor *t = cake_gguf_find_tensor(g, name);
    if (!t) {
        cake_err(err, errlen, "tensor '%s' is missing", name);
        return NULL;
    }
    /* (a vector may be a matrix of one row, as a linear layer to one
     * output converts: qwen2moe's shared expert gate) */
    const bool row = t->n_dims == 1 || (t->n_dims == 2 && t->ne[1] == 1);
    if (!row || t->ne[0] != (uint64_t)n ||
        !(is_float_dtype(t->type) || cake_dequant_supported(t->type))) {
        cake_err(err, errlen,
                 "tensor '%s': expected a vector of %d (" CAKE_WEIGHT_DTYPES "), got %s [%llu]",
                 name, n, cake_dtype_name(t->type), (unsigned long long)t->ne[0]);
        return NULL;
    }
    float *v = malloc((size_t)n * sizeof(float));
    if (!v) {
        cake_err(err, errlen, "out of memory");
        return NULL;
    }
    if (cake_dequant_supported(t->type)) {
        cake_dequant_to_f32(t->type, t->data, 0, v, (size_t)n);
        return v;
    }
    for (int i = 0; i < n; i++) {
        if (t->type == CAKE_DTYPE_F32) {
            memcpy(&v[i], (const char *)t->data + 4 * (size_t)i, 4);
        } else {
            uint16_t h;
            memcpy(&h, (const char *)t->data + 2 * (size_t)i, 2);
            v[i] = t->type == CAKE_DTYPE_F16 ? cake_f16_to_f32(h) : cake_bf16_to_f32(h);
        }
    }
    return v;
}

/* get_mscale of transformers' YaRN: the magnitude that a context `scale`
 * times longer takes, with its mscale. */
static double yarn_mscale(double scale, double mscale) {
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

/* YaRN's keys (rope.scaling.type yarn) into hp, with factor and the
 * original context read: the betas (32 and 1 where absent, as
 * transformers' and llama.cpp's), and the magnitude on the scores
 * (transformers' attention_factor; as rope_attn_factor): the file's
 * rope.scaling.yarn_attn_factor, or rope.scaling.attn_factor
 * (attn_factor_given), else get_mscale(factor, 1) / get_mscale(factor,
 * mscale_all_dim), the latter as llama.cpp's Ministral 3 files keep it in
 * rope.scaling.yarn_log_multiplier (1: no scaling), else get_mscale(factor)
 * (the plain YaRN of Qwen's files). */
static int read_yarn(const cake_gguf *g, cake_gguf_str arch, float factor, int orig_ctx,
                     bool attn_factor_given, cake_hparams *hp, char *err, size_t errlen) {
    char key[96];
#define KEY(suffix) (snprintf(key, sizeof(key), "%.*s." suffix, (int)arch.len, arch.ptr), key)
    float ext = 1.0f, log_mul = 0.0f, attn = 0.0f;
    hp->rope_yarn_factor = factor;
    hp->rope_yarn_orig_ctx = orig_ctx;
    if (get_f32_or(g, KEY("rope.scaling.yarn_beta_fast"), 32.0f, &hp->rope_yarn_beta_fast, err,
                   errlen) ||
        get_f32_or(g, KEY("rope.scaling.yarn_beta_slow"), 1.0f, &hp->rope_yarn_beta_slow, err,
                   errlen) ||
        get_f32_or(g, KEY("rope.scaling.yarn_ext_factor"), 1.0f, &ext, err, errlen) ||
        get_f32_or(g, KEY("rope.scaling.yarn_log_multiplier"), 0.0f, &log_mul, err, errlen) ||
        get_f32_or(g, KEY("rope.scaling.yarn_attn_factor"), 0.0f, &attn, err, errlen))
        return -1;
    if (!(hp->rope_yarn_beta_fast > 0 && hp->rope_yarn_beta_slow > 0 &&
          hp->rope_yarn_beta_fast < 1e6f && hp->rope_yarn_beta_slow < 1e6f))
        return cake_err(err, errlen, "YaRN's betas (%g, %g) must be positive",
                        hp->rope_yarn_beta_fast, hp->rope_yarn_beta_slow);
    if (ext != 1.0f) /* (transformers' YaRN has none; llama.cpp's run-time knob) */
        return cake_err(err, errlen, "YaRN's ext_factor %g is not supported (1 is)", ext);
    if (!(log_mul >= 0 && log_mul < 100 && attn >= 0 && attn < 100))
        return cake_err(err, errlen,
                        "YaRN's log multiplier %g or attention factor %g is out of "
                        "range",
                        log_mul, attn);
#undef KEY
    if (attn > 0)
        hp->rope_attn_factor = attn;
    else if (!attn_factor_given)
        hp->rope_attn_factor =
            (float)(log_mul > 0 ? yarn_mscale(factor, 1) / yarn_mscale(factor, log_mul)
                                : yarn_mscale(factor, 1));
    return 0;
}

/* The hyperparameters into hp; *orig_ctx: the context LongRoPE's short
 * factors are for (rope.scaling.original_context_length; n_ctx_train when
 * absent). */
static int read_hparams(const cake_gguf *g, cake_hparams *hp, int *orig_ctx, char *err,
                        size_t errlen) {
    cake_gguf_str arch;
    int rc = cake_gguf_get_str(g, "general.architecture", &arch, err, errlen);
    if (rc == -1) return cake_err(err, errlen, "missing metadata key 'general.architecture'");
    if (rc < 0) return -1;
    const bool qwen2moe = str_eq(arch, "qwen2moe"), granitemoe = str_eq(arch, "granitemoe"),
               moe_arch = qwen2moe || granitemoe || str_eq(arch, "qwen3moe"),
               granite = granitemoe || str_eq(arch, "granite"), phi3 = str_eq(arch, "phi3"),
               gemma2 = str_eq(arch, "gemma2"), gemma3 = str_eq(arch, "gemma3"),
               mistral3 = str_eq(arch, "mistral3"), llama = str_eq(arch, "llama") || mistral3;
    if (!llama && !str_eq(arch, "qwen2") && !str_eq(arch, "qwen3") && !moe_arch && !granite &&
        !phi3 && !gemma2 && !gemma3)
        return cake_err(err, errlen,
                        "architecture '%.*s' is not supported ('llama', 'mistral3', 'qwen2', "
                        "'qwen3', 'qwen2moe', 'qwen3moe', 'granite', 'granitemoe', 'phi3', "
                        "'gemma2' and 'gemma3' are)",
                        (int)(arch.len > 64 ? 64 : arch.len), arch.ptr);
    /* qwen2, qwen3 and phi3 files keep the NeoX pairing (llama.cpp's
     * converter permutes only llama's q/k rows); qwen3 adds per-head q/k
     * norms, found by their tensors. */
    /* (Granite's and Ministral 3's (mistral3: llama's layers, with YaRN and
     * Llama 4's attention temperature) are permuted as llama's) */
    hp->rope_neox = !llama && !granite;
    /* The keys are named after the architecture: llama.block_count, ... */
    char key[96];
#define KEY(suffix) (snprintf(key, sizeof(key), "%.*s." suffix, (int)arch.len, arch.ptr), key)

    if (get_u32_in(g, KEY("embedding_length"), 1, 0, 1, 1 << 16, &hp->dim, err, errlen) ||
        get_u32_in(g, KEY("block_count"), 1, 0, 1, 1024, &hp->n_layers, err, errlen) ||
        get_u32_in(g, KEY("attention.head_count"), 1, 0, 1, 1024, &hp->n_heads, err, errlen) ||
        get_u32_in(g, KEY("attention.head_count_kv"), 0, (uint32_t)hp->n_heads, 1, 1024,
                   &hp->n_kv_heads, err, errlen) ||
        get_u32_in(g, KEY("feed_forward_length"), 1, 0, 1, 1 << 20, &hp->ffn_dim, err, errlen) ||
        get_u32_in(g, KEY("context_length"), 1, 0, 1, 1 << 24, &hp->n_ctx_train, err, errlen))
        return -1;
    /* Experts: llama files may have them (Mixtral: feed_forward_length is
     * an expert's width); qwen2moe and qwen3moe always do, their experts'
     * width under its own key. llama and qwen3moe scale the picked experts'
     * weights to sum to 1 (llama.cpp's build_moe_ffn with norm_w, as
     * Qwen3-MoE's norm_topk_prob), qwen2moe does not (Qwen1.5-MoE, Qwen2-57B-
     * A14B: norm_topk_prob false), and adds a shared expert, as wide as the
     * dense FFN unless its key says otherwise (as llama.cpp reads it). */
    const int dense_ffn = hp->ffn_dim;
    if (get_u32_in(g, KEY("expert_count"), moe_arch, 0, 0, 1024, &hp->n_experts, err, errlen) ||
        get_u32_in(g, KEY("expert_used_count"), hp->n_experts > 0, 0, hp->n_experts ? 1 : 0,
                   (uint32_t)hp->n_experts, &hp->n_experts_used, err, errlen) ||
        get_u32_in(g, KEY("expert_feed_forward_length"), 0, (uint32_t)hp->ffn_dim, 1, 1 << 20,
                   &hp->ffn_dim, err, errlen))
        return -1;
    if (moe_arch && !hp->n_experts)
        return cake_err(err, errlen, "%s is 0: a %.*s model has experts", KEY("expert_count"),
                        (int)arch.len, arch.ptr);
    hp->experts_norm = hp->n_experts > 0 && !qwen2moe;
    if (qwen2moe && get_u32_in(g, KEY("expert_shared_feed_forward_length"), 0, (uint32_t)dense_ffn,
                               1, 1 << 20, &hp->shared_ffn_dim, err, errlen))
        return -1;
    if (hp->n_heads % hp->n_kv_heads)
        return cake_err(err, errlen, "head_count %d is not a multiple of head_count_kv %d",
                        hp->n_heads, hp->n_kv_heads);
    /* A head is dim / n_heads wide unless the file says otherwise: Qwen3
     * 0.6B, 4B and 32B have wider heads, so q (n_heads heads) is wider than
     * x, and wq and wo are not square. */
    int key_length, value_length;
    if (get_u32_in(g, KEY("attention.key_length"), 0, 0, 0, 1 << 16, &key_length, err, errlen) ||
        get_u32_in(g, KEY("attention.value_length"), 0, (uint32_t)key_length, 0, 1 << 16,
                   &value_length, err, errlen))
        return -1;
    if (value_length != key_length)
        return cake_err(err, errlen, "key_length %d != value_length %d is not supported",
                        key_length, value_length);
    if (!key_length && hp->dim % hp->n_heads)
        return cake_err(err, errlen, "embedding_length %d is not a multiple of head_count %d",
                        hp->dim, hp->n_heads);
    hp->head_dim = key_length ? key_length : hp->dim / hp->n_heads;
    hp->q_dim = hp->n_heads * hp->head_dim;
    if (hp->head_dim % 2)
        return cake_err(err, errlen, "head dimension %d is odd (RoPE rotates pairs)", hp->head_dim);

    /* Partial RoPE (Phi-4-mini turns 96 of 128): NeoX pairs of the first
     * rope_dims values; llama's interleaved pairs only whole heads */
    if (get_u32_in(g, KEY("rope.dimension_count"), 0, (uint32_t)hp->head_dim, 2,
                   (uint32_t)hp->head_dim, &hp->rope_dims, err, errlen))
        return -1;
    if (hp->rope_dims % 2 || (hp->rope_dims != hp->head_dim && !hp->rope_neox))
        return cake_err(err, errlen,
                        "%s %d: RoPE turns an even number of values, and a part of "
                        "a head (head dimension %d) in NeoX models only",
                        KEY("rope.dimension_count"), hp->rope_dims, hp->head_dim);
    if (get_f32_or(g, KEY("attention.layer_norm_rms_epsilon"), 1e-5f, &hp->rms_eps, err, errlen) ||
        get_f32_or(g, KEY("rope.freq_base"), 10000.0f, &hp->rope_theta, err, errlen))
        return -1;
    if (hp->rms_eps <= 0 || hp->rope_theta <= 0)
        return cake_err(err, errlen, "rms epsilon and rope.freq_base must be positive");
    if (get_f32_or(g, KEY("rope.scaling.attn_factor"), 1.0f, &hp->rope_attn_factor, err, errlen) ||
        get_u32_in(g, KEY("rope.scaling.original_context_length"), 0, (uint32_t)hp->n_ctx_train, 1,
                   1 << 24, orig_ctx, err, errlen))
        return -1;
    if (!(hp->rope_attn_factor > 0 && hp->rope_attn_factor < 100)) /* (squared onto q) */
        return cake_err(err, errlen, "rope.scaling.attn_factor %g must be in (0, 100)",
                        hp->rope_attn_factor);
    const bool attn_factor_given = cake_gguf_find_kv(g, KEY("rope.scaling.attn_factor")) != NULL;
    /* Ministral 3's temperature: its length is YaRN's original context
     * unless the file says (llama.cpp's n_attn_temp_floor_scale) */
    hp->attn_temp_scale = 0.0f;
    hp->attn_temp_length = *orig_ctx;
    if (mistral3 && (get_f32_or(g, KEY("attention.temperature_scale"), 0.0f, &hp->attn_temp_scale,
                                err, errlen) ||
                     get_u32_in(g, KEY("attention.temperature_length"), 0, (uint32_t)*orig_ctx, 1,
                                1u << 30, &hp->attn_temp_length, err, errlen)))
        return -1;
    if (!(hp->attn_temp_scale >= 0 && hp->attn_temp_scale < 100))
        return cake_err(err, errlen, "attention.temperature_scale %g must be in [0, 100)",
                        hp->attn_temp_scale);
    /* Phi-3's 4K models attend over the last 2047 positions: a query at p
     * sees keys p - 2046 .. p (llama.cpp takes 2047 where older files lack
     * the key; Phi-4 writes 0 for none). A window as long as the context
     * masks nothing. */
    /* (llama.cpp's defaults where a file lacks the key: 2047 for Phi-3 4K,
     * 4096 for Gemma 2) */
    const uint32_t window = phi3 && hp->n_ctx_train == 4096 ? 2047 : gemma2 ? 4096 : 0;
    if ((phi3 || gemma2 || gemma3) && get_u32_in(g, KEY("attention.sliding_window"), 0, window, 0,
                                                 1u << 30, &hp->sliding_window, err, errlen))
        return -1;
    if (hp->sliding_window >= hp->n_ctx_train) hp->sliding_window = 0;
    /* Gemma 2 and 3 (llama.cpp's llm_build_gemma2, _gemma3): embeddings
     * times sqrt(dim), GELU, norms after attention and FFN (found by their
     * tensors); scores scaled by 1/sqrt(dim / heads) in the 27Bs (46 and 62
     * layers), 1/sqrt(head_dim) in the others. Gemma 2: every other layer
     * windowed (the even ones), scores and logits soft-capped; Gemma 3: q/k
     * norms, five windowed layers in six at RoPE base 10000 unscaled. (The
     * norms' weights hold Gemma's 1 + w: the converter adds 1.) */
    const bool gemma = gemma2 || gemma3;
    hp->embed_scale = gemma ? sqrtf((float)hp->dim) : 1.0f;
    hp->gelu = gemma;
    hp->swa_pattern = gemma3 ? 6 : gemma2 ? 2 : 0;
    hp->rope_theta_local = gemma3 ? 10000.0f : 0.0f;
    hp->q_scale = (gemma2 && hp->n_layers == 46) || (gemma3 && hp->n_layers == 62)
                      ? sqrtf((float)hp->head_dim / (float)(hp->dim / hp->n_heads))
                      : 1.0f;
    /* Granite (llama.cpp's build_llama with its four scales): scores
     * scaled by attention.scale instead of 1/sqrt(head_dim) (here q is, by
     * the ratio), the attention and FFN outputs by residual_scale before
     * they are added, the logits divided by logit_scale. */
    float attention_scale = 0.0f;
    hp->residual_scale = hp->logit_scale = 1.0f;
    if (granite && (get_f32_or(g, KEY("embedding_scale"), 1.0f, &hp->embed_scale, err, errlen) ||
                    get_f32_or(g, KEY("attention.scale"), 0.0f, &attention_scale, err, errlen) ||
                    get_f32_or(g, KEY("residual_scale"), 1.0f, &hp->residual_scale, err, errlen) ||
                    get_f32_or(g, KEY("logit_scale"), 1.0f, &hp->logit_scale, err, errlen)))
        return -1;
    if (attention_scale != 0.0f) hp->q_scale = attention_scale * sqrtf((float)hp->head_dim);
    if (!(hp->embed_scale > 0 && hp->q_scale > 0 && hp->residual_scale > 0 && hp->logit_scale > 0))
        return cake_err(err, errlen, "Granite's scales must be positive");
    hp->attn_softcap = hp->logit_softcap = 0.0f;
    if (gemma2 &&
        (get_f32_or(g, KEY("attn_logit_softcapping"), 50.0f, &hp->attn_softcap, err, errlen) ||
         get_f32_or(g, KEY("final_logit_softcapping"), 30.0f, &hp->logit_softcap, err, errlen)))
        return -1;
    if (hp->attn_softcap < 0 || hp->logit_softcap < 0)
        return cake_err(err, errlen, "a soft cap must not be negative");

    /* RoPE scaling: none, linear and YaRN are supported; anything else
     * changes the positions' meaning and is refused rather than silently
     * ignored. */
    hp->rope_freq_scale = 1.0f;
    hp->rope_yarn_factor = 0.0f;
    cake_gguf_str scaling;
    rc = cake_gguf_get_str(g, KEY("rope.scaling.type"), &scaling, err, errlen);
    if (rc == -2) return -1;
    if (rc == 0 && !str_eq(scaling, "none")) {
        const bool yarn = str_eq(scaling, "yarn");
        if (!str_eq(scaling, "linear") && !yarn)
            return cake_err(err, errlen,
                            "rope scaling type '%.*s' is not supported (none, linear and yarn "
                            "are)",
                            (int)(scaling.len > 32 ? 32 : scaling.len), scaling.ptr);
        float factor = 1.0f;
        if (get_f32_or(g, KEY("rope.scaling.factor"), 1.0f, &factor, err, errlen)) return -1;
        if (!(factor >= 1.0f && factor <= 1e6f))
            return cake_err(err, errlen, "%s %g must be in [1, 1e6]", key, factor);
        if (yarn && read_yarn(g, arch, factor, *orig_ctx, attn_factor_given, hp, err, errlen))
            return -1;
        if (!yarn) hp->rope_freq_scale = 1.0f / factor;
    }
#undef KEY
    return 0;
}

/* An optional vector of length n (biases, qwen3's q/k norms): NULL when
 * absent (*failed stays 0), else as load_norm (*failed = 1 when it is
 * malformed). */
static float *load_bias(const cake_gguf *g, const char *name, int n, int *failed, char *err,
                        size_t errlen) {
    if (*failed || !cake_gguf_find_tensor(g, name)) return NULL;
    float *b = load_norm(g, name, n, err, errlen);
    *failed = !b;
    return b;
}

/* Pair i's frequency theta^(-2i / rope_dims) * scale / factor[i] (factor
 * NULL: 1), for the rope_dims / 2 pairs; NULL when out of memory. */
static double *pair_frequencies(int rope_dims, double theta, double scale, const float *factor) {
    double *f = malloc((size_t)(rope_dims / 2) * sizeof(*f));
    for (int i = 0; f && i < rope_dims / 2; i++)
        f[i] = pow(theta, -2.0 * i / rope_dims) * scale / (factor ? (double)factor[i] : 1.0);
    return f;
}

/* YaRN's pair frequencies (transformers' _compute_yarn_parameters): pair
 * i's theta^(-2i / d) (extrapolated: the fast pairs, which turn more than
 * beta_fast times over the original context, keep it) blended by a ramp
 * with it / factor (interpolated: the slow ones, under beta_slow turns);
 * the ramp's ends floored and ceiled. NULL when out of memory. */
static double *yarn_frequencies(const cake_hparams *hp) {
    const int d = hp->rope_dims;
    const double base = hp->rope_theta, orig = hp->rope_yarn_orig_ctx;
    /* the pair index that turns `turns` times over the original context */
    const double lo = floor(d * log(orig / (hp->rope_yarn_beta_fast * 2 * M_PI)) / (2 * log(base)));
    const double hi = ceil(d * log(orig / (hp->rope_yarn_beta_slow * 2 * M_PI)) / (2 * log(base)));
    const double low = lo > 0 ? lo : 0, high0 = hi < d - 1 ? hi : d - 1;
    const double high = high0 == low ? high0 + 0.001 : high0;
    double *f = malloc((size_t)(d / 2) * sizeof(*f));
    for (int i = 0; f && i < d / 2; i++) {
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        const double extrapolated = pow(base, -2.0 * i / d);
        f[i] = extrapolated / hp->rope_yarn_factor * ramp + extrapolated * (1 - ramp);
    }
    return f;
}

/* Each RoPE pair's frequency (cake_model.rope_freqs), divided by per-pair
 * factors where the file has them (as llama.cpp's freq_factors): Llama
 * 3.1's rope_freqs.weight, or LongRoPE's (Phi-3.5, Phi-3 128K) pair of
 * rope_factors_short/_long, long when the context is longer than the one
 * the short ones are for (llama.cpp picks by the context in use, vLLM by the
 * longest allowed; cake's contexts go up to n_ctx_train). *set: which pair
 * (cake_model.rope_factor_set). */
static double *rope_frequencies(const cake_gguf *g, const cake_hparams *hp, int orig_ctx, int *set,
                                char *err, size_t errlen) {
    const int half = hp->rope_dims / 2;
    const char *name = "rope_freqs.weight";
    *set = 0;
    if (cake_gguf_find_tensor(g, "rope_factors_long.weight") ||
        cake_gguf_find_tensor(g, "rope_factors_short.weight")) {
        *set = hp->n_ctx_train > orig_ctx ? 2 : 1;
        name = *set == 2 ? "rope_factors_long.weight" : "rope_factors_short.weight";
    }
    if (hp->rope_yarn_factor) {
        if (cake_gguf_find_tensor(g, name) || *set)
            return cake_err(err, errlen, "YaRN and per-pair factors (%s) together", name), NULL;
        double *f = yarn_frequencies(hp);
        if (!f) cake_err(err, errlen, "out of memory");
        return f;
    }
    float *factor = NULL;
    if (cake_gguf_find_tensor(g, name) || *set) {
        if (!(factor = load_norm(g, name, half, err, errlen))) return NULL;
        for (int i = 0; i < half; i++)
            if (!(factor[i] > 0 && factor[i] < INFINITY)) {
                cake_err(err, errlen, "tensor '%s': factor %d is %g, not positive", name, i,
                         factor[i]);
                free(factor);
                return NULL;
            }
    }
    double *f = pair_frequencies(hp->rope_dims, hp->rope_theta, hp->rope_freq_scale, factor);
    if (!f) cake_err(err, errlen, "out of memory");
    free(factor);
    return f;
}

/* The matrices the matmul reads, i < n_matmul_weights(m): per layer q, k,
 * v, o, then gate, up and down, or the router and the experts' matrices;
 * then the output. */
static int layer_matmuls(const cake_hparams *hp) {
    return 4 + (hp->n_experts ? 1 + 3 * hp->n_experts + (hp->shared_ffn_dim ? 3 : 0) : 3);
}

static int n_matmul_weights(const cake_model *m) {
    return m->hp.n_layers * layer_matmuls(&m->hp) + 1;
}

static cake_weight *matmul_weight(cake_model *m, int i) {
    const int per_layer = layer_matmuls(&m->hp);
    if (i == m->hp.n_layers * per_layer) return &m->output;
    cake_layer *L = &m->layers[i / per_layer];
    i %= per_layer;
    if (m->hp.n_experts && i >= 4)
        return i == 4                        ? &L->router
               : i - 5 < 3 * m->hp.n_experts ? &L->expert[i - 5]
                                             : &L->shared[i - 5 - 3 * m->hp.n_experts];
    cake_weight *lw[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
    return lw[i];
}

typedef struct {
    cake_weight **w;    /* the quantized matrices */
    uint8_t **dst;      /* where each goes */
    const void *keep;   /* the token embedding, whose pages stay */
    _Atomic int no_mem; /* a requantization found no memory for its rows */
} pack_job;

/* A matrix of another quantized type goes into the same layout through Q8_0,
 * 16 rows (one group) at a time: each row decoded to floats and requantized
 * per block of 32 as llama.cpp quantizes activations (d = max |x| / 127).
 * The error that adds is at most max |x| / 254 a value, a small part of the
 * 4 to 6-bit steps its values already sit on (Q4_K: about a 17th). */
static int requantize_x16(uint8_t *dst, const cake_weight *w) {
    const size_t n_in = (size_t)w->n_in, nb = n_in / CAKE_Q8_0_BLOCK,
                 row_bytes = nb * CAKE_Q8_0_BYTES;
    float *row = malloc(n_in * sizeof(*row));
    uint8_t *q8 = malloc(CAKE_Q8_0_X16_ROWS * row_bytes);
    if (!row || !q8) {
        free(row);
        free(q8);
        return -1;
    }
    for (int r0 = 0; r0 < w->n_out; r0 += CAKE_Q8_0_X16_ROWS) {
        const int rows = w->n_out - r0 < CAKE_Q8_0_X16_ROWS ? w->n_out - r0 : CAKE_Q8_0_X16_ROWS;
        for (int r = 0; r < rows; r++) {
            cake_dequant_to_f32(w->dtype, w->data, (size_t)(r0 + r) * n_in, row, n_in);
            cake_q8_0_quantize_row(row, q8 + r * row_bytes, n_in);
        }
        cake_q8_0_pack_x16(dst + (size_t)(r0 / CAKE_Q8_0_X16_ROWS) * nb * CAKE_Q8_0_X16_GROUP_BLOCK,
                           q8, rows, w->n_in);
    }
    free(row);
    free(q8);
    return 0;
}

/* The CPU matmul's layout of a quantized matrix of m: Q3_K, Q4_K, Q5_K,
 * IQ4_XS, Q4_0 and IQ4_NL keep their levels (matmul_kquant.c) where rows are
 * whole blocks of 256 (k-quants always are), Q6_K in the output matrix only;
 * the others go to Q8_0 (matmul_q8_0.c). Q6_K's scale per 16 costs its
 * kernel a second step a block, 0.82x the Q8_0 copy's prefill (a llama-1b
 * Q6_K file: 204 against 249 tok/s); the output matrix only ever takes the
 * last token, where Q6_K's fewer bytes win (decode ~1.2x). */
static int packed_dtype(const cake_model *m, const cake_weight *w) {
    const int kq = w->n_in % 256 == 0 ? cake_kquant_x16_for(w->dtype) : 0;
    if (!kq || (kq == CAKE_DTYPE_Q6_K_X16 && w != &m->output)) return CAKE_DTYPE_Q8_0_X16;
    return kq;
}

static size_t packed_size(const cake_weight *w) {
    return w->x16_dtype == CAKE_DTYPE_Q8_0_X16
               ? cake_q8_0_x16_size(w->n_out, w->n_in)
               : cake_kquant_x16_size(w->x16_dtype, w->n_out, w->n_in);
}

/* Repacks matrix i, then releases its pages of the file from this process
 * (so that the peak stays near the model's size). */
static void pack_task(void *ctx, int i, int tid) {
    (void)tid;
    pack_job *j = ctx;
    const cake_weight *w = j->w[i];
    if (w->dtype == CAKE_DTYPE_Q8_0)
        cake_q8_0_pack_x16(j->dst[i], w->data, w->n_out, w->n_in);
    else if (w->x16_dtype != CAKE_DTYPE_Q8_0_X16)
        cake_kquant_pack_x16(w->x16_dtype, j->dst[i], w->data, w->n_out, w->n_in);
    else if (requantize_x16(j->dst[i], w))
        j->no_mem = 1;
    if (w->data == j->keep) return;
    const size_t bytes = (size_t)w->n_out * (size_t)w->n_in / cake_dtype_block_elems(w->dtype) *
                         cake_dtype_block_bytes(w->dtype);
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)w->data;
    const uintptr_t lo = (a + page - 1) / page * page, hi = (a + bytes) / page * page;
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* Quantized matrices are repacked once into the CPU matmul's layouts
 * (packed_dtype), all in one mapping the model owns, on every core and in
 * huge pages where the kernel gives them: most of the time is the kernel
 * zeroing fresh pages (llama-1b: 3.4 s on one thread in 4 KiB pages, 0.5 s
 * this way). The token embedding is read from the file (by rows; a tied
 * output gets its own repacked copy). */
static int pack_quantized(cake_model *m, char *err, size_t errlen) {
    const int n = n_matmul_weights(m);
    cake_weight **w = malloc((size_t)n * sizeof(*w));
    if (!w) return cake_err(err, errlen, "out of memory");
    int n_quant = 0; /* w[0..n_quant): the quantized ones */
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        cake_weight *wi = matmul_weight(m, i);
        if (!cake_dequant_supported(wi->dtype)) continue;
        wi->x16_dtype = packed_dtype(m, wi); /* (x16 stays NULL until it is made) */
        total += packed_size(wi);
        w[n_quant++] = wi;
    }
    if (!n_quant) {
        free(w);
        return 0;
    }
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        free(w);
        return cake_err(err, errlen, "out of memory for the %zu MiB of repacked weights",
                        total >> 20);
    }
    (void)madvise(p, total, MADV_HUGEPAGE);
    m->packed = p;
    m->packed_size = total;
    uint8_t **dst = malloc((size_t)n_quant * sizeof(*dst)), *next = m->packed;
    if (!dst) {
        free(w);
        return cake_err(err, errlen, "out of memory");
    }
    for (int i = 0; i < n_quant; i++) {
        dst[i] = next;
        next += packed_size(w[i]);
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    cake_threadpool *pool = cake_threadpool_create(cores > 1 ? (int)cores : 1);
    /* a NULL pool (no threads to be had) runs every task here */
    pack_job job = {w, dst, m->tok_embd.data, 0};
    cake_threadpool_run(pool, n_quant, pack_task, &job);
    cake_threadpool_free(pool);
    for (int i = 0; i < n_quant; i++) w[i]->x16 = dst[i];
    free(dst);
    free(w);
    return job.no_mem ? cake_err(err, errlen, "out of memory requantizing the weights") : 0;
}

/* Whether some matrix the matmul reads is quantized. */
static bool has_quantized(cake_model *m) {
    for (int i = 0; i < n_matmul_weights(m); i++)
        if (cake_dequant_supported(matmul_weight(m, i)->dtype)) return true;
    return false;
}

/* pthread_once takes no argument: the model is passed in a thread-local. */
static _Thread_local cake_model *pack_target;

static void pack_once(void) {
    cake_model *m = pack_target;
    if (pack_quantized(m, m->pack_err, sizeof(m->pack_err)) && !m->pack_err[0])
        snprintf(m->pack_err, sizeof(m->pack_err), "cannot repack the quantized weights");
}

int cake_model_prepare_cpu(const cake_model *m, char *err, size_t errlen) {
    if (!m->quantized) return 0;
    cake_model *mm = (cake_model *)m; /* the repacked copies are a cache */
    pack_target = mm;
    pthread_once(&mm->pack_once, pack_once);
    return m->pack_err[0] ? cake_err(err, errlen, "%s", m->pack_err) : 0;
}

static void free_layers(cake_model *m) {
    if (!m->layers) return;
    for (int l = 0; l < m->hp.n_layers; l++) {
        free(m->layers[l].attn_norm);
        free(m->layers[l].ffn_norm);
        free(m->layers[l].bq);
        free(m->layers[l].bk);
        free(m->layers[l].bv);
        free(m->layers[l].q_norm);
        free(m->layers[l].k_norm);
        free(m->layers[l].expert);
        free(m->layers[l].shared_gate);
        free(m->layers[l].post_attn_norm);
        free(m->layers[l].post_ffn_norm);
    }
    free(m->layers);
    m->layers = NULL;
}

void cake_model_free(cake_model *m) {
    if (!m) return;
    free_layers(m);
    free(m->output_norm);
    free(m->rope_freqs);
    free(m->rope_freqs_local);
    if (m->packed) munmap(m->packed, m->packed_size);
    cake_tokenizer_free(m->tokenizer);
    cake_gguf_close(m->gguf);
    free(m);
}

int cake_model_load(const char *path, cake_model **out, char *err, size_t errlen) {
    *out = NULL;
    cake_model *m = calloc(1, sizeof(*m));
    if (!m) return cake_err(err, errlen, "out of memory");
    m->fingerprint_once = (pthread_once_t)PTHREAD_ONCE_INIT;
    char why[512] = "";
    if (cake_gguf_open(path, &m->gguf, err, errlen)) goto fail; /* its message names the file */
    const cake_gguf *g = m->gguf;
    cake_hparams *hp = &m->hp;
    int orig_ctx = 0;
    if (read_hparams(g, hp, &orig_ctx, why, sizeof(why)) ||
        !(m->rope_freqs = rope_frequencies(g, hp, orig_ctx, &m->rope_factor_set, why, sizeof(why))))
        goto fail_why;
    if (cake_tokenizer_init(g, &m->tokenizer, why, sizeof(why))) goto fail_why;

    const cake_gguf_tensor *embd = cake_gguf_find_tensor(g, "token_embd.weight");
    if (!embd) {
        snprintf(why, sizeof(why), "tensor 'token_embd.weight' is missing");
        goto fail_why;
    }
    hp->n_vocab = (int)(embd->n_dims == 2 && embd->ne[1] < (1u << 24) ? embd->ne[1] : 0);
    if (hp->n_vocab != cake_tokenizer_n_vocab(m->tokenizer)) {
        snprintf(why, sizeof(why),
                 "tensor 'token_embd.weight' has %d rows but the vocabulary has %d tokens",
                 hp->n_vocab, cake_tokenizer_n_vocab(m->tokenizer));
        goto fail_why;
    }
    const int dim = hp->dim, q_dim = hp->q_dim, kv_dim = hp->n_kv_heads * hp->head_dim,
              ffn = hp->ffn_dim;
    if (find_weight(g, "token_embd.weight", dim, hp->n_vocab, 0, &m->tok_embd, why, sizeof(why)))
        goto fail_why;
    int rc = find_weight(g, "output.weight", dim, hp->n_vocab, 1, &m->output, why, sizeof(why));
    if (rc < 0) goto fail_why;
    hp->tied_output = rc == 1;
    if (hp->tied_output) m->output = m->tok_embd;
    if (!(m->output_norm = load_norm(g, "output_norm.weight", dim, why, sizeof(why))))
        goto fail_why;

    m->layers = calloc((size_t)hp->n_layers, sizeof(cake_layer));
    if (!m->layers) {
        snprintf(why, sizeof(why), "out of memory");
        goto fail_why;
    }
    for (int l = 0; l < hp->n_layers; l++) {
        cake_layer *L = &m->layers[l];
        char name[96];
#define LAYER_NAME(suffix) (snprintf(name, sizeof(name), "blk.%d." suffix, l), name)
        if (!(L->attn_norm = load_norm(g, LAYER_NAME("attn_norm.weight"), dim, why, sizeof(why))) ||
            !(L->ffn_norm = load_norm(g, LAYER_NAME("ffn_norm.weight"), dim, why, sizeof(why))) ||
            find_qkv(g, l, dim, q_dim, kv_dim, L, why, sizeof(why)) ||
            find_weight(g, LAYER_NAME("attn_output.weight"), q_dim, dim, 0, &L->wo, why,
                        sizeof(why)))
            goto fail_why;
        const int ne = hp->n_experts;
        if (!ne && (find_gate_up(g, l, dim, ffn, L, why, sizeof(why)) ||
                    find_weight(g, LAYER_NAME("ffn_down.weight"), ffn, dim, 0, &L->w_down, why,
                                sizeof(why))))
            goto fail_why;
        if (ne && !(L->expert = calloc(3 * (size_t)ne, sizeof(cake_weight)))) {
            snprintf(why, sizeof(why), "out of memory");
            goto fail_why;
        }
        if (ne && (find_weight(g, LAYER_NAME("ffn_gate_inp.weight"), dim, ne, 0, &L->router, why,
                               sizeof(why)) ||
                   find_experts(g, l, "gate", dim, ffn, ne, L->expert, why, sizeof(why)) ||
                   find_experts(g, l, "up", dim, ffn, ne, L->expert + 1, why, sizeof(why)) ||
                   find_experts(g, l, "down", ffn, dim, ne, L->expert + 2, why, sizeof(why))))
            goto fail_why;
        const int sh = hp->shared_ffn_dim;
        if (sh && (find_weight(g, LAYER_NAME("ffn_gate_shexp.weight"), dim, sh, 0, &L->shared[0],
                               why, sizeof(why)) ||
                   find_weight(g, LAYER_NAME("ffn_up_shexp.weight"), dim, sh, 0, &L->shared[1], why,
                               sizeof(why)) ||
                   find_weight(g, LAYER_NAME("ffn_down_shexp.weight"), sh, dim, 0, &L->shared[2],
                               why, sizeof(why)) ||
                   !(L->shared_gate = load_norm(g, LAYER_NAME("ffn_gate_inp_shexp.weight"), dim,
                                                why, sizeof(why)))))
            goto fail_why;
        /* (biases llama.cpp takes where files have them, cake does not: such
         * a file is refused, not read without them) */
        static const char *const unread[] = {"attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
                                             "ffn_down.bias"};
        for (size_t k = 0; k < sizeof(unread) / sizeof(unread[0]); k++) {
            snprintf(name, sizeof(name), "blk.%d.%s", l, unread[k]);
            if (cake_gguf_find_tensor(g, name)) {
                snprintf(why, sizeof(why), "tensor '%s': such biases are not supported", name);
                goto fail_why;
            }
        }
        int failed = 0;
        L->bq = load_bias(g, LAYER_NAME("attn_q.bias"), q_dim, &failed, why, sizeof(why));
        L->bk = load_bias(g, LAYER_NAME("attn_k.bias"), kv_dim, &failed, why, sizeof(why));
        L->bv = load_bias(g, LAYER_NAME("attn_v.bias"), kv_dim, &failed, why, sizeof(why));
        if (failed) goto fail_why;
        if (L->bq || L->bk || L->bv) hp->qkv_bias = true;
        L->q_norm =
            load_bias(g, LAYER_NAME("attn_q_norm.weight"), hp->head_dim, &failed, why, sizeof(why));
        L->k_norm =
            load_bias(g, LAYER_NAME("attn_k_norm.weight"), hp->head_dim, &failed, why, sizeof(why));
        if (failed) goto fail_why;
        if (!L->q_norm != !L->k_norm) {
            snprintf(why, sizeof(why), "layer %d has a norm for %s only", l, L->q_norm ? "q" : "k");
            goto fail_why;
        }
        if (L->q_norm) hp->qk_norm = true;
        L->post_attn_norm =
            load_bias(g, LAYER_NAME("post_attention_norm.weight"), dim, &failed, why, sizeof(why));
        L->post_ffn_norm =
            load_bias(g, LAYER_NAME("post_ffw_norm.weight"), dim, &failed, why, sizeof(why));
        if (failed) goto fail_why;
        if (!L->post_attn_norm != !L->post_ffn_norm ||
            (l && !L->post_attn_norm != !hp->post_norms)) {
            snprintf(why, sizeof(why), "layer %d lacks a post-attention or post-FFN norm", l);
            goto fail_why;
        }
        hp->post_norms = L->post_attn_norm != NULL;
        const bool windowed =
            hp->sliding_window && (!hp->swa_pattern || l % hp->swa_pattern < hp->swa_pattern - 1);
        L->window = windowed ? hp->sliding_window : 0;
        const bool local = windowed && hp->rope_theta_local > 0;
        /* Gemma 3's windowed layers turn RoPE at theta 10000, unscaled
         * (llama.cpp's rope_freq_base_train_swa) */
        if (local && !m->rope_freqs_local &&
            !(m->rope_freqs_local =
                  pair_frequencies(hp->rope_dims, hp->rope_theta_local, 1, NULL))) {
            snprintf(why, sizeof(why), "out of memory");
            goto fail_why;
        }
        L->rope_freqs = local ? m->rope_freqs_local : m->rope_freqs;
#undef LAYER_NAME
    }
    if (hp->gelu && !hp->post_norms) { /* Gemma's are not optional */
        snprintf(why, sizeof(why), "a Gemma model needs post-attention and post-FFN norms");
        goto fail_why;
    }
    hp->weight_dtype = m->layers[0].wq.dtype;
    m->quantized = has_quantized(m);
    m->pack_once = (pthread_once_t)PTHREAD_ONCE_INIT;
    /* Weights read in place: have the kernel start reading the file now, in
     * large sequential reads, or a model that is not in the page cache comes
     * in fault by fault during the first forward pass (llama-1b F16, cold
     * page cache, `cake run -n 4`, four runs each: 2.4-3.3 -> 2.1-3.0 s, TTFT
     * 1.7-2.5 -> 1.3-2.1 s). Not when quantized: the CPU's repack reads the whole
     * file, and read-ahead would fetch the pages it let go again (+0.26 s in
     * three runs of three). */
    if (!m->quantized) (void)madvise(g->map, g->map_size, MADV_WILLNEED);
    *out = m;
    return 0;

fail_why:
    cake_err(err, errlen, "%s: %s", path, why);
fail:
    cake_model_free(m);
    return -1;
}

const cake_hparams *cake_model_hparams(const cake_model *m) {
    return &m->hp;
}

const cake_tokenizer *cake_model_tokenizer(const cake_model *m) {
    return m->tokenizer;
}

uint64_t cake_model_file_size(const cake_model *m) {
    return m->gguf->size;
}

/* pthread_once takes no argument: the model being fingerprinted is passed
 * through a thread-local. */
static _Thread_local cake_model *fingerprint_target;

static void hash_u64(XXH3_state_t *st, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i)); /* little-endian on every host */
    XXH3_128bits_update(st, b, 8);
}

static void compute_fingerprint(void) {
    cake_model *m = fingerprint_target;
    const cake_hparams *hp = &m->hp;
    XXH3_state_t *st = XXH3_createState();
    XXH128_canonical_t c;
    if (!st) { /* out of memory: a fingerprint of the architecture alone would be unsafe */
        memset(m->fingerprint, 0xff, 16);
        return;
    }
    XXH3_128bits_reset(st);
    XXH3_128bits_update(st, "cake-model-v1", 13);
    const int64_t arch[] = {hp->n_vocab,    hp->dim,      hp->n_layers, hp->n_heads,
                            hp->n_kv_heads, hp->head_dim, hp->ffn_dim,  hp->tied_output};
    for (size_t i = 0; i < sizeof(arch) / sizeof(arch[0]); i++) hash_u64(st, (uint64_t)arch[i]);
    if (hp->rope_dims != hp->head_dim) hash_u64(st, (uint64_t)hp->rope_dims); /* partial RoPE */
    if (m->rope_factor_set || hp->rope_attn_factor != 1.0f) { /* LongRoPE: which factors */
        hash_u64(st, (uint64_t)m->rope_factor_set);
        hash_u64(st, cake_bits_from_f32(hp->rope_attn_factor));
    }
    if (hp->rope_yarn_factor) { /* YaRN's frequencies */
        hash_u64(st, cake_bits_from_f32(hp->rope_yarn_factor));
        hash_u64(st, (uint64_t)hp->rope_yarn_orig_ctx);
        hash_u64(st, cake_bits_from_f32(hp->rope_yarn_beta_fast));
        hash_u64(st, cake_bits_from_f32(hp->rope_yarn_beta_slow));
    }
    if (hp->sliding_window) { /* the windowed layers' keys are not the same */
        hash_u64(st, (uint64_t)hp->sliding_window);
        hash_u64(st, (uint64_t)hp->swa_pattern);
    }
    if (hp->embed_scale != 1.0f || hp->gelu || hp->post_norms || hp->q_scale != 1.0f) {
        hash_u64(st, cake_bits_from_f32(hp->embed_scale));
        hash_u64(st, cake_bits_from_f32(hp->q_scale));
        hash_u64(st, (uint64_t)hp->gelu << 1 | (uint64_t)hp->post_norms);
        hash_u64(st, cake_bits_from_f32(hp->rope_theta_local));
        hash_u64(st, cake_bits_from_f32(hp->attn_softcap));
        hash_u64(st, cake_bits_from_f32(hp->logit_softcap));
    }
    if (hp->n_experts) { /* hashed only when set: dense models keep their fingerprints */
        hash_u64(st, (uint64_t)hp->n_experts);
        hash_u64(st, (uint64_t)hp->n_experts_used);
        hash_u64(st, hp->experts_norm);
        if (hp->shared_ffn_dim) hash_u64(st, (uint64_t)hp->shared_ffn_dim);
    }
    if (hp->residual_scale != 1.0f || hp->logit_scale != 1.0f) { /* Granite's (and the two above) */
        hash_u64(st, cake_bits_from_f32(hp->residual_scale));
        hash_u64(st, cake_bits_from_f32(hp->logit_scale));
        hash_u64(st, cake_bits_from_f32(hp->embed_scale));
        hash_u64(st, cake_bits_from_f32(hp->q_scale));
    }
    /* NeoX RoPE turns other pairs of the same weights; hashed only when set,
     * so that every llama model keeps the fingerprint (and store) it had. */
    if (hp->rope_neox) hash_u64(st, 0x6e656f78u);
    /* Quantized matrices multiply 8-bit activations since the x16 kernel; KV
     * computed before that (exact f32 activations) is not the same bits. */
    if (m->quantized) hash_u64(st, 0x71385f30783136u);
    /* and Q4_K, Q5_K and IQ4_XS matrices keep their levels since the
     * k-quant kernel (they were requantized to Q8_0 before). */
    int kept = 0; /* and Q6_K (the output), Q4_0 and IQ4_NL, Q3_K since they joined them */
    for (int i = 0; i < n_matmul_weights(m); i++) {
        const cake_weight *w = matmul_weight(m, i);
        const bool quantized = cake_dequant_supported(w->dtype);
        const int t = quantized && packed_dtype(m, w) != CAKE_DTYPE_Q8_0_X16 ? w->dtype : -1;
        kept |= t < 0                                            ? 0
                : t == CAKE_DTYPE_Q6_K                           ? 2
                : t == CAKE_DTYPE_Q4_0 || t == CAKE_DTYPE_IQ4_NL ? 4
                : t == CAKE_DTYPE_Q3_K                           ? 8
                                                                 : 1;
    }
    if (kept & 1) hash_u64(st, 0x71345f6b783136u);
    if (kept & 2) hash_u64(st, 0x71365f6b783136u);
    if (kept & 4) hash_u64(st, 0x71345f30783136u);
    if (kept & 8) hash_u64(st, 0x71335f6b783136u);
    hash_u64(st, cake_bits_from_f32(hp->rms_eps));
    hash_u64(st, cake_bits_from_f32(hp->rope_theta));
    hash_u64(st, cake_bits_from_f32(hp->rope_freq_scale));
    const cake_gguf *g = m->gguf;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const cake_gguf_tensor *t = &g->tensors[i];
        hash_u64(st, t->name.len);
        XXH3_128bits_update(st, t->name.ptr, (size_t)t->name.len);
        hash_u64(st, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) hash_u64(st, t->ne[d]);
        hash_u64(st, (uint64_t)t->type);
        hash_u64(st, t->nbytes);
        XXH3_128bits_update(st, t->data, (size_t)t->nbytes);
    }
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(st));
    memcpy(m->fingerprint, c.digest, 16);
    XXH3_freeState(st);
}

void cake_model_fingerprint(const cake_model *m, uint8_t out[16]) {
    cake_model *mm = (cake_model *)m; /* the cached value is the only mutable part */
    fingerprint_target = mm;
    pthread_once(&mm->fingerprint_once, compute_fingerprint);
    memcpy(out, mm->fingerprint, 16);
}
