/* Quantized GGUF blocks read back (model/dequant.c): for every type, blocks
 * written from known parts (testutil's encoders, in ggml's layouts) must give
 * exactly the values those parts mean, in the SIMD and the portable decoders;
 * any range of a row gives the same values as the whole. The scales are
 * chosen so that every product is exact in f32, so the comparisons are exact.
 * Also: the plain quantizer the forward tests use stays within about a step
 * of its input, and the Q8_0 quantizer's inline rounding is roundf's. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/dequant.h"
#include "model/gguf.h"
#include "testutil.h"
#include "util/q8_0.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;
static int rnd(int lo, int hi) { /* uniform in [lo, hi] */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return lo + (int)((rng >> 33) % (uint64_t)(hi - lo + 1));
}

/* A power of two in [2^-12, 2^-4], so that d * sc * q stays exact. */
static float rnd_scale(void) {
    return ldexpf(1.0f, -rnd(4, 12));
}

enum { N_BLOCKS = 4 };

/* One row of N_BLOCKS random blocks of `type` into raw, their values into want. */
static void make_row(int type, uint8_t *raw, float *want) {
    const size_t be = cake_dequant_block_elems(type), bb = cake_dequant_block_bytes(type);
    for (int b = 0; b < N_BLOCKS; b++, raw += bb, want += be) {
        int q[256], sc[16], m[16];
        const float d = rnd_scale(), dm = rnd_scale();
        switch (type) {
        case CAKE_DTYPE_Q4_0:
        case CAKE_DTYPE_Q4_1:
        case CAKE_DTYPE_Q5_0:
        case CAKE_DTYPE_Q5_1: {
            const bool five = type == CAKE_DTYPE_Q5_0 || type == CAKE_DTYPE_Q5_1,
                       with_min = type == CAKE_DTYPE_Q4_1 || type == CAKE_DTYPE_Q5_1;
            const int top = five ? 31 : 15, centre = five ? 16 : 8;
            for (int j = 0; j < 32; j++) {
                q[j] = rnd(0, top);
                want[j] = with_min ? (float)q[j] * d + dm : (float)(q[j] - centre) * d;
            }
            test_encode_q4_q5(type, d, dm, q, raw);
            break;
        }
        case CAKE_DTYPE_Q4_K:
        case CAKE_DTYPE_Q5_K: {
            const int top = type == CAKE_DTYPE_Q5_K ? 31 : 15;
            for (int i = 0; i < 8; i++) {
                sc[i] = rnd(0, 63);
                m[i] = rnd(0, 63);
            }
            for (int j = 0; j < 256; j++) {
                q[j] = rnd(0, top);
                want[j] = d * (float)sc[j / 32] * (float)q[j] - dm * (float)m[j / 32];
            }
            test_encode_q4_q5_k(type, d, dm, sc, m, q, raw);
            break;
        }
        case CAKE_DTYPE_Q2_K:
        case CAKE_DTYPE_Q3_K: {
            const bool three = type == CAKE_DTYPE_Q3_K;
            for (int i = 0; i < 16; i++) {
                sc[i] = three ? rnd(-32, 31) : rnd(0, 15);
                m[i] = rnd(0, 15);
            }
            for (int j = 0; j < 256; j++) {
                q[j] = three ? rnd(-4, 3) : rnd(0, 3);
                want[j] = three ? d * (float)sc[j / 16] * (float)q[j]
                                : d * (float)sc[j / 16] * (float)q[j] - dm * (float)m[j / 16];
            }
            test_encode_q2_q3_k(type, d, dm, sc, m, q, raw);
            break;
        }
        case CAKE_DTYPE_IQ4_NL:
        case CAKE_DTYPE_IQ4_XS: {
            /* ggml's kvalues_iq4nl, written out here as the spec of the format */
            static const int table[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};
            const int n = type == CAKE_DTYPE_IQ4_XS ? 256 : 32;
            for (int i = 0; i < 8; i++) sc[i] = type == CAKE_DTYPE_IQ4_XS ? rnd(-32, 31) : 1;
            for (int j = 0; j < n; j++) {
                q[j] = rnd(0, 15);
                want[j] = d * (float)sc[j / 32] * (float)table[q[j]];
            }
            test_encode_iq4(type, d, sc, q, raw);
            break;
        }
        case CAKE_DTYPE_Q6_K:
            for (int i = 0; i < 16; i++) sc[i] = rnd(-128, 127);
            for (int j = 0; j < 256; j++) {
                q[j] = rnd(-32, 31);
                want[j] = d * (float)sc[j / 16] * (float)q[j];
            }
            test_encode_q6_k(d, sc, q, raw);
            break;
        default:
            fail_msg("type %d", type);
        }
    }
}

/* the types test_quantize_row writes, and the rest it does not */
static const int types[] = {CAKE_DTYPE_Q4_0, CAKE_DTYPE_Q4_1, CAKE_DTYPE_Q5_0, CAKE_DTYPE_Q5_1,
                            CAKE_DTYPE_Q4_K, CAKE_DTYPE_Q5_K, CAKE_DTYPE_Q6_K},
                 more_types[] = {CAKE_DTYPE_Q2_K, CAKE_DTYPE_Q3_K, CAKE_DTYPE_IQ4_NL,
                                 CAKE_DTYPE_IQ4_XS};

/* Every value of every type, whole rows and ranges that start and end inside
 * blocks. */
static void test_blocks_decode(void **state) {
    (void)state;
    const size_t n_types = sizeof(types) / sizeof(types[0]),
                 n_more = sizeof(more_types) / sizeof(more_types[0]);
    for (size_t t = 0; t < n_types + n_more; t++) {
        const int type = t < n_types ? types[t] : more_types[t - n_types];
        assert_true(cake_dequant_supported(type));
        const size_t n = N_BLOCKS * cake_dequant_block_elems(type);
        uint8_t raw[N_BLOCKS * 210];
        float want[N_BLOCKS * 256], got[N_BLOCKS * 256];
        for (int round = 0; round < 50; round++) {
            make_row(type, raw, want);
            for (int lanes = 0; lanes < 2; lanes++) {
                (lanes ? cake_dequant_to_f32_lanes : cake_dequant_to_f32)(type, raw, 0, got, n);
                for (size_t i = 0; i < n; i++)
                    if (got[i] != want[i])
                        fail_msg("%s%s, round %d: value %zu is %.9g, not %.9g",
                                 cake_dtype_name(type), lanes ? " (portable)" : "", round, i,
                                 got[i], want[i]);
            }
            const size_t first = (size_t)rnd(0, (int)n - 1), cnt = (size_t)rnd(0, (int)(n - first));
            for (size_t i = 0; i < n; i++) got[i] = -1e30f;
            cake_dequant_to_f32(type, raw, first, got + first, cnt);
            for (size_t i = 0; i < n; i++) {
                const float expect = i >= first && i < first + cnt ? want[i] : -1e30f;
                if (got[i] != expect)
                    fail_msg("%s, values [%zu, %zu): value %zu is %g, not %g",
                             cake_dtype_name(type), first, first + cnt, i, got[i], expect);
            }
        }
    }
}

/* Block sizes agree with ggml's, and the GGUF reader uses them. */
static void test_block_sizes(void **state) {
    (void)state;
    const struct {
        int type;
        size_t bytes, elems;
    } want[] = {
        {CAKE_DTYPE_Q4_0, 18, 32},   {CAKE_DTYPE_Q4_1, 20, 32},   {CAKE_DTYPE_Q5_0, 22, 32},
        {CAKE_DTYPE_Q5_1, 24, 32},   {CAKE_DTYPE_Q8_0, 34, 32},   {CAKE_DTYPE_Q4_K, 144, 256},
        {CAKE_DTYPE_Q5_K, 176, 256}, {CAKE_DTYPE_Q6_K, 210, 256}, {CAKE_DTYPE_Q2_K, 84, 256},
        {CAKE_DTYPE_Q3_K, 110, 256}, {CAKE_DTYPE_IQ4_NL, 18, 32}, {CAKE_DTYPE_IQ4_XS, 136, 256}};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        assert_int_equal(cake_dequant_block_bytes(want[i].type), want[i].bytes);
        assert_int_equal(cake_dequant_block_elems(want[i].type), want[i].elems);
        assert_int_equal(cake_dtype_block_bytes((uint32_t)want[i].type), want[i].bytes);
        assert_int_equal(cake_dtype_block_elems((uint32_t)want[i].type), want[i].elems);
    }
    /* the other IQ types, retired ids, Q8_1 and Q8_K (not for files): not read */
    const int no[] = {
        CAKE_DTYPE_F32, CAKE_DTYPE_F16, CAKE_DTYPE_BF16, 16, 19, 21, 29, 4, 5, 9, 15, 200};
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        assert_false(cake_dequant_supported(no[i]));
        assert_int_equal(cake_dequant_block_bytes(no[i]), 0);
    }
}

/* testutil's quantizer (for the forward tests) round-trips within a step. */
static void test_quantizer_roundtrip(void **state) {
    (void)state;
    float x[512], back[512];
    uint8_t raw[2 * 210];
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        const int type = types[t];
        for (int i = 0; i < 512; i++) x[i] = (float)rnd(-1000, 1000) / 1000.0f * (i % 7 + 1);
        const size_t n = 512, bytes = test_quantize_row(type, x, n, raw);
        assert_int_equal(bytes,
                         n / cake_dequant_block_elems(type) * cake_dequant_block_bytes(type));
        cake_dequant_to_f32(type, raw, 0, back, n);
        const int bits =
            type == CAKE_DTYPE_Q6_K                                                         ? 6
            : type == CAKE_DTYPE_Q5_0 || type == CAKE_DTYPE_Q5_1 || type == CAKE_DTYPE_Q5_K ? 5
                                                                                            : 4;
        double err = 0, amax = 0;
        for (size_t i = 0; i < n; i++) {
            err = fmax(err, fabs((double)back[i] - x[i]));
            amax = fmax(amax, fabs(x[i]));
        }
        /* a step is at most 2 amax / 2^bits; rounded scales cost a little more */
        printf("%s: max error %.4f of max |x| %.2f\n", cake_dtype_name(type), err, amax);
        assert_true(err <= 1.5 * 2 * amax / (1 << bits));
    }
}

/* The inline rounding the Q8_0 quantizer uses is roundf's, at every half,
 * next to every half and on random values in the quantizer's range. */
static void test_round_half_away(void **state) {
    (void)state;
    for (int k = -1000; k <= 1000; k++) {
        const float h = (float)k / 2.0f, v[] = {h, nextafterf(h, -1e9f), nextafterf(h, 1e9f)};
        for (int i = 0; i < 3; i++)
            if (cake_round_half_away(v[i]) != roundf(v[i]))
                fail_msg("%.9g rounds to %g, roundf says %g", v[i], cake_round_half_away(v[i]),
                         roundf(v[i]));
    }
    for (int i = 0; i < 100000; i++) {
        const float v = (float)rnd(-128000000, 128000000) / 1e6f;
        assert_true(cake_round_half_away(v) == roundf(v));
    }
    assert_true(signbit(cake_round_half_away(-0.25f))); /* -0, as roundf */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocks_decode),
        cmocka_unit_test(test_block_sizes),
        cmocka_unit_test(test_quantizer_roundtrip),
        cmocka_unit_test(test_round_half_away),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
