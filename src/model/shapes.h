/* Named model shapes for `cake mkmodel` (random weights, real architectures).
 * Benchmarks time shapes, not values, so these stand in for real models. */
#ifndef CAKE_SHAPES_H
#define CAKE_SHAPES_H

typedef struct {
    const char *name;
    int dim, n_layers, n_heads, n_kv_heads, ffn_dim, n_ctx, n_vocab;
    float rope_theta, rms_eps;
    const char *about;
    int head_dim; /* 0: dim / n_heads; else written as attention.key_length */
    /* 0: a dense FFN; else that many experts of width ffn_dim (Mixtral's
     * layout), n_experts_used a token */
    int n_experts, n_experts_used;
} cake_shape;

/* NULL-terminated by a zero entry. */
extern const cake_shape cake_shapes[];
const cake_shape *cake_shape_find(const char *name);

#endif
