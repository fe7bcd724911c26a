/* GGUF's tensor types (ggml's, by id): names and block sizes. A file of its
 * own because the CUDA module links it too (it decodes quantized weights on
 * the host, dequant.c, which takes the sizes from here). */
#include <stdint.h>

#include "model/gguf.h"

/* ggml's tensor types by id: name, values and bytes of a block (ggml's
 * layouts). Every type of known size is parsed, so that a file is readable
 * for its metadata and vocabulary whatever its weights; loading a model
 * refuses the weights cake cannot compute with (model.c). Gaps are ids that
 * ggml has retired; Q4_2 and Q4_3 (retired in 2023) are named but unsized. */
static const struct {
    const char *name;
    uint16_t elems, bytes;
} ggml_types[] = {
    [0] = {"F32", 1, 4},           [1] = {"F16", 1, 2},           [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},        [4] = {"Q4_2", 0, 0},          [5] = {"Q4_3", 0, 0},
    [6] = {"Q5_0", 32, 22},        [7] = {"Q5_1", 32, 24},        [8] = {"Q8_0", 32, 34},
    [9] = {"Q8_1", 32, 36},        [10] = {"Q2_K", 256, 84},      [11] = {"Q3_K", 256, 110},
    [12] = {"Q4_K", 256, 144},     [13] = {"Q5_K", 256, 176},     [14] = {"Q6_K", 256, 210},
    [15] = {"Q8_K", 256, 292},     [16] = {"IQ2_XXS", 256, 66},   [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98},   [19] = {"IQ1_S", 256, 50},     [20] = {"IQ4_NL", 32, 18},
    [21] = {"IQ3_S", 256, 110},    [22] = {"IQ2_S", 256, 82},     [23] = {"IQ4_XS", 256, 136},
    [24] = {"I8", 1, 1},           [25] = {"I16", 1, 2},          [26] = {"I32", 1, 4},
    [27] = {"I64", 1, 8},          [28] = {"F64", 1, 8},          [29] = {"IQ1_M", 256, 56},
    [30] = {"BF16", 1, 2},         [31] = {"Q4_0_4_4", 32, 18}, /* Q4_0 blocks, interleaved (retired
                                                                   in 2024) */
    [32] = {"Q4_0_4_8", 32, 18},   [33] = {"Q4_0_8_8", 32, 18},   [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},     [36] = {"IQ4_NL_4_4", 32, 18}, /* IQ4_NL blocks, interleaved
                                                                     (retired in 2024) */
    [37] = {"IQ4_NL_4_8", 32, 18}, [38] = {"IQ4_NL_8_8", 32, 18}, [39] = {"MXFP4", 32, 17},
};
#define N_GGML_TYPES (sizeof(ggml_types) / sizeof(ggml_types[0]))

const char *cake_dtype_name(uint32_t type) {
    return type < N_GGML_TYPES && ggml_types[type].name ? ggml_types[type].name : "unknown";
}

size_t cake_dtype_block_bytes(uint32_t type) {
    return type < N_GGML_TYPES ? ggml_types[type].bytes : 0;
}

size_t cake_dtype_block_elems(uint32_t type) {
    return type < N_GGML_TYPES ? ggml_types[type].elems : 0;
}
