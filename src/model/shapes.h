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
} cake_shape;

/* NULL-terminated by a zero entry. */
extern const cake_shape cake_shapes[];
const cake_shape *cake_shape_find(const char *name);

#endif
