#include "model/shapes.h"

#include <string.h>

const cake_shape cake_shapes[] = {
    {"tiny", 64, 2, 4, 2, 192, 4096, 32000, 10000.0f, 1e-5f, "a few MB, for tests", 0, 0, 0},
    {"tiny-256", 256, 2, 4, 2, 512, 4096, 32000, 10000.0f, 1e-5f,
     "rows of 256 (k-quant blocks), for tests", 0, 0, 0},
    {"tiny-wide", 64, 2, 4, 2, 192, 4096, 32000, 10000.0f, 1e-5f,
     "heads of 32, wider than dim / heads (as Qwen3 0.6B), for tests", 32, 0, 0},
    {"mha-160m", 768, 12, 12, 12, 2048, 16384, 32000, 10000.0f, 1e-5f,
     "MHA, KV-heavy like LongAlpaca; 134M parameters", 0, 0, 0},
    {"llama-1b", 2048, 16, 32, 8, 8192, 8192, 32000, 500000.0f, 1e-5f, "Llama-3.2-1B dims", 0, 0,
     0},
    {"llama-8b", 4096, 32, 32, 8, 14336, 32768, 32000, 500000.0f, 1e-5f, "Llama-3.1-8B dims", 0, 0,
     0},
    {"longalpaca-13b", 5120, 40, 40, 40, 13824, 32768, 32000, 10000.0f, 1e-5f,
     "Llama-2-13B dims with MHA", 0, 0, 0},
    {"tiny-6", 64, 6, 4, 2, 192, 4096, 32000, 10000.0f, 1e-5f,
     "tiny with 6 layers (Gemma 3's window pattern), for tests", 0, 0, 0},
    {"tiny-26", 64, 26, 4, 2, 192, 4096, 32000, 10000.0f, 1e-5f,
     "tiny with 26 layers (Gemma 2 2B's depth, which llama.cpp requires)", 0, 0, 0},
    {"tiny-moe", 64, 2, 4, 2, 96, 4096, 32000, 10000.0f, 1e-5f, "8 experts, 2 a token, for tests",
     0, 8, 2},
    {"tiny-moe-256", 256, 2, 4, 2, 256, 4096, 32000, 10000.0f, 1e-5f,
     "tiny-moe with rows of 256 (k-quant blocks), for tests", 0, 8, 2},
    {"moe-1b", 1024, 16, 16, 4, 512, 8192, 32000, 500000.0f, 1e-5f,
     "32 experts, 4 a token: 0.9B parameters, 0.2B active", 0, 32, 4},
    {"mixtral-8x7b", 4096, 32, 32, 8, 14336, 32768, 32000, 1000000.0f, 1e-5f,
     "Mixtral-8x7B dims: 8 experts, 2 a token", 0, 8, 2},
    {0},
};

const cake_shape *cake_shape_find(const char *name) {
    for (const cake_shape *s = cake_shapes; s->name; s++)
        if (!strcmp(s->name, name)) return s;
    return NULL;
}
