/* The CUDA backend's element-wise kernels (row_kernels.cuh: RMSNorm, the RoPE
 * table, qwen3's q/k head norms, RoPE with the KV write, SwiGLU), run on the
 * CPU with the block emulator of cuda_emulator.h, against references written
 * here from the maths. Like test_attention_emulated, it checks the kernels'
 * indexing and vector layouts on any machine with the CUDA headers; test_cuda
 * checks them on a GPU. */
#include "cuda_emulator.h"

#include <stdarg.h>

#include <cuda_bf16.h>

#include <type_traits>

/* A block's static __shared__ arrays: one copy, shared by the emulated
 * threads (blocks run one at a time). */
#undef __shared__
#define __shared__ static

/* Device intrinsics the CUDA headers declare for the host but do not define. */
extern "C" float rsqrtf(float x) {
    return 1.0f / sqrtf(x);
}

#include "backend/cuda/row_kernels.cuh"

using namespace cake_rows;

static int failed;

static void check(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s: ", ok ? "ok" : "FAILED");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    failed += !ok;
}

/* ---- RMSNorm ---- */

/* Relative error allowed for T's rounding of the result (half an ulp) plus the
 * f32 arithmetic before it. */
template <typename T> static double tolerance();
template <> double tolerance<float>() {
    return 1e-5;
}
template <> double tolerance<__half>() {
    return 1.0 / 2048 + 1e-5;
}
template <> double tolerance<__nv_bfloat16>() {
    return 1.0 / 256 + 1e-5;
}

template <typename T> static void test_rmsnorm(int n, int dim, const char *type) {
    std::vector<float> x((size_t)n * dim), w(dim);
    for (auto &v : x) v = uniform(3.0f);
    for (auto &v : w) v = 1.0f + uniform(0.5f);
    std::vector<T> y((size_t)n * dim);
    const float eps = 1e-5f;
    const bool vec = rmsnorm_vec_fits(dim);
    T *yp = y.data();
    const float *xp = x.data(), *wp = w.data();
    if (vec)
        emu::body = [=] { rmsnorm_vec_kernel<T>(yp, xp, wp, dim, eps); };
    else
        emu::body = [=] { rmsnorm_kernel<T>(yp, xp, wp, dim, eps); };
    if (run_grid(dim3((unsigned)n), ROW_THREADS)) {
        failed++;
        return;
    }
    double worst = 0;
    for (int t = 0; t < n; t++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[(size_t)t * dim + i] * x[(size_t)t * dim + i];
        const double r = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++) {
            const double want = x[(size_t)t * dim + i] * r * w[i];
            const double got = cake_to_f32(y[(size_t)t * dim + i]);
            const double e = fabs(got - want) / (fabs(want) + 1e-3);
            worst = isnan(e) ? INFINITY : fmax(worst, e);
        }
    }
    check(worst <= tolerance<T>(),
          "rmsnorm%s %s, %d rows of %d: max relative error %.3g (tol %.3g)", vec ? " (float4)" : "",
          type, n, dim, worst, tolerance<T>());
}

/* ---- RoPE ---- */

/* The table and the rotation, against the same maths on the host: the same
 * (cos, sin) from double, the same f32 products, so within one f16 rounding
 * (the order of an f32 multiply-add can differ). q/k/v come in as TIn, the
 * type the GEMM before it wrote. */
/* neox: RoPE turns pairs (i, i + head_dim/2) (qwen2); bias: add q/k/v biases. */
/* wide: rope_kv_kernel with 4 pairs a thread step (S = 4) instead of 1. */
template <typename TIn>
static void test_rope(int n_heads, int n_kv_heads, int head_dim, int pos0, int n, int slices,
                      const char *type, bool neox = false, bool bias = false, bool wide = false) {
    const int half_hd = head_dim / 2, n_pos = pos0 + n;
    const int dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    std::vector<double> inv(half_hd);
    for (int i = 0; i < half_hd; i++) inv[i] = pow(500000.0, -2.0 * i / head_dim);
    std::vector<float2> cs((size_t)n_pos * half_hd);
    float2 *csp = cs.data();
    const double *invp = inv.data();
    emu::body = [=] { rope_table_kernel(csp, invp, n_pos, half_hd); };
    if (run_grid(dim3(7), ROW_THREADS)) { /* a grid smaller than the table: the loop strides */
        failed++;
        return;
    }
    int bad_table = 0;
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < half_hd; i++) {
            const float2 c = cs[(size_t)p * half_hd + i];
            bad_table += c.x != (float)cos(p * inv[i]) || c.y != (float)sin(p * inv[i]);
        }
    check(!bad_table, "rope table, %d positions x %d: %d entries differ from cos/sin in double",
          n_pos, half_hd, bad_table);

    std::vector<TIn> qkv_in((size_t)n * (dim + 2 * kv_dim));
    std::vector<float> qkv(qkv_in.size()); /* the same values, as the reference reads them */
    for (size_t i = 0; i < qkv.size(); i++) {
        qkv_in[i] = cake_from_f32<TIn>(uniform(4.0f));
        qkv[i] = cake_to_f32(qkv_in[i]);
    }
    std::vector<float> b(bias ? dim + 2 * kv_dim : 0);
    for (float &x : b) x = uniform(1.0f);
    std::vector<__half> q16((size_t)n * dim), kc((size_t)n_pos * kv_dim),
        vc((size_t)n_pos * kv_dim);
    const TIn *qp = qkv_in.data();
    const float *bp = bias ? b.data() : nullptr;
    __half *q16p = q16.data(), *kp = kc.data(), *vp = vc.data();
    const float2 *csc = cs.data();
    if constexpr (sizeof(TIn) == 2) {
        if (wide && neox)
            emu::body = [=] {
                rope_kv_kernel<TIn, true, 4>(qp, bp, q16p, kp, vp, csc, pos0, n_heads, n_kv_heads,
                                             head_dim);
            };
        else if (wide)
            emu::body = [=] {
                rope_kv_kernel<TIn, false, 4>(qp, bp, q16p, kp, vp, csc, pos0, n_heads, n_kv_heads,
                                              head_dim);
            };
    }
    if (!wide && neox)
        emu::body = [=] {
            rope_kv_kernel<TIn, true, 1>(qp, bp, q16p, kp, vp, csc, pos0, n_heads, n_kv_heads,
                                         head_dim);
        };
    else if (!wide)
        emu::body = [=] {
            rope_kv_kernel<TIn, false, 1>(qp, bp, q16p, kp, vp, csc, pos0, n_heads, n_kv_heads,
                                          head_dim);
        };
    if (run_grid(dim3((unsigned)n, (unsigned)slices), ROW_THREADS)) {
        failed++;
        return;
    }
    double worst = 0;
    int v_bad = 0;
    for (int t = 0; t < n; t++) {
        const int pos = pos0 + t;
        std::vector<float> row(qkv.begin() + (ptrdiff_t)t * (dim + 2 * kv_dim),
                               qkv.begin() + (ptrdiff_t)(t + 1) * (dim + 2 * kv_dim));
        for (size_t j = 0; j < b.size(); j++) row[j] += b[j];
        for (int part = 0; part < 2; part++) { /* q, then k */
            const int width = part ? kv_dim : dim;
            const float *src = row.data() + (part ? dim : 0);
            const __half *dst =
                part ? kc.data() + (size_t)pos * kv_dim : q16.data() + (size_t)t * dim;
            for (int h = 0; h < width / head_dim; h++)
                for (int i = 0; i < head_dim / 2; i++) { /* pair i of head h */
                    const int j0 = h * head_dim + (neox ? i : 2 * i);
                    const int j1 = neox ? j0 + head_dim / 2 : j0 + 1;
                    const double c = (float)cos(pos * inv[i]), s = (float)sin(pos * inv[i]);
                    const double want0 = src[j0] * c - src[j1] * s,
                                 want1 = src[j0] * s + src[j1] * c;
                    const double e0 = fabs(__half2float(dst[j0]) - want0) / (fabs(want0) + 1e-2);
                    const double e1 = fabs(__half2float(dst[j1]) - want1) / (fabs(want1) + 1e-2);
                    worst = fmax(worst, isnan(e0) || isnan(e1) ? INFINITY : fmax(e0, e1));
                }
        }
        for (int j = 0; j < kv_dim; j++) /* v: copied, rounded once */
            v_bad += __half2float(vc[(size_t)pos * kv_dim + j]) !=
                     __half2float(__float2half_rn(row[dim + kv_dim + j]));
    }
    const double tol = 1.0 / 1024;
    check(worst <= tol && !v_bad,
          "rope+kv%s%s%s from %s, heads %d/%d of %d, positions %d..%d, %d slice(s) a row: max "
          "relative error %.3g (tol %.3g), %d v values differ",
          wide ? " (wide)" : "", neox ? " (neox)" : "", bias ? " with biases" : "", type, n_heads,
          n_kv_heads, head_dim, pos0, pos0 + n - 1, slices, worst, tol, v_bad);
}

/* ---- qwen3's q/k head norms ---- */

/* qk_norm_kernel in place on rows [q | k | v] of TIn, against the maths in
 * double: each q and k head (plus its bias) RMS-normed with its weights; v
 * untouched. More heads than a block has warps, so warps take two rounds. */
template <typename T>
static void test_qk_norm(int n_heads, int n_kv_heads, int head_dim, int n, bool bias,
                         const char *type) {
    const int qk = (n_heads + n_kv_heads) * head_dim, width = qk + n_kv_heads * head_dim;
    std::vector<T> qkv((size_t)n * width);
    for (auto &v : qkv) v = cake_from_f32<T>(uniform(4.0f));
    const std::vector<T> before = qkv;
    std::vector<float> b(bias ? qk : 0), wq(head_dim), wk(head_dim);
    for (float &x : b) x = uniform(1.0f);
    for (int i = 0; i < head_dim; i++) {
        wq[i] = 1.0f + uniform(0.4f);
        wk[i] = 1.0f + uniform(0.4f);
    }
    const float eps = 1e-6f;
    T *p = qkv.data();
    const float *bp = bias ? b.data() : nullptr, *wqp = wq.data(), *wkp = wk.data();
    emu::body = [=] { qk_norm_kernel<T>(p, bp, wqp, wkp, n_heads, n_kv_heads, head_dim, eps); };
    if (run_grid(dim3((unsigned)n), ROW_THREADS)) {
        failed++;
        return;
    }
    double worst = 0;
    int v_changed = 0;
    for (int t = 0; t < n; t++) {
        const T *in = before.data() + (size_t)t * width, *out = qkv.data() + (size_t)t * width;
        for (int h = 0; h < n_heads + n_kv_heads; h++) {
            const float *w = h < n_heads ? wqp : wkp;
            double ss = 0;
            std::vector<double> x(head_dim);
            for (int i = 0; i < head_dim; i++) {
                const int j = h * head_dim + i;
                x[i] = (double)cake_to_f32(in[j]) + (bias ? b[j] : 0.0f);
                ss += x[i] * x[i];
            }
            const double r = 1.0 / sqrt(ss / head_dim + eps);
            for (int i = 0; i < head_dim; i++) {
                const double want = x[i] * r * w[i];
                const double got = cake_to_f32(out[h * head_dim + i]);
                const double e = fabs(got - want) / (fabs(want) + 1e-3);
                worst = isnan(e) ? INFINITY : fmax(worst, e);
            }
        }
        for (int j = qk; j < width; j++) v_changed += cake_to_f32(out[j]) != cake_to_f32(in[j]);
    }
    check(worst <= tolerance<T>() && !v_changed,
          "q/k head norms%s %s, heads %d/%d of %d, %d rows: max relative error %.3g (tol %.3g), "
          "%d v values changed",
          bias ? " with biases" : "", type, n_heads, n_kv_heads, head_dim, n, worst, tolerance<T>(),
          v_changed);
}

/* ---- SwiGLU ---- */

/* gate/up come in as TIn: f32, or T as the GEMM wrote them. */
/* wide: swiglu_vec_kernel (8 elements a thread, a flat grid; grid_y unused). */
template <typename T, typename TIn>
static void test_swiglu(int n, int ffn, int grid_y, const char *type, bool wide = false) {
    std::vector<TIn> gu_in((size_t)n * 2 * ffn);
    std::vector<float> gu(gu_in.size());
    for (size_t i = 0; i < gu.size(); i++) {
        gu_in[i] = cake_from_f32<TIn>(uniform(6.0f));
        gu[i] = cake_to_f32(gu_in[i]);
    }
    std::vector<T> h((size_t)n * ffn);
    T *hp = h.data();
    const TIn *gp = gu_in.data();
    dim3 grid((unsigned)((ffn + ROW_THREADS - 1) / ROW_THREADS), (unsigned)grid_y);
    emu::body = [=] { swiglu_kernel<T, TIn>(hp, gp, n, ffn); };
    if constexpr (sizeof(T) == 2 && std::is_same_v<T, TIn>) {
        if (wide) {
            emu::body = [=] { swiglu_vec_kernel<T>(hp, gp, n, ffn); };
            grid = dim3((unsigned)(((size_t)n * (ffn / 8) + ROW_THREADS - 1) / ROW_THREADS));
        }
    }
    if (run_grid(grid, ROW_THREADS)) {
        failed++;
        return;
    }
    double worst = 0;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < ffn; i++) {
            const double g = gu[(size_t)t * 2 * ffn + i], u = gu[(size_t)t * 2 * ffn + ffn + i];
            const double want = g / (1.0 + exp(-g)) * u;
            const double e = fabs(cake_to_f32(h[(size_t)t * ffn + i]) - want) / (fabs(want) + 1e-3);
            worst = isnan(e) ? INFINITY : fmax(worst, e);
        }
    check(worst <= tolerance<T>(),
          "swiglu%s %s, %d rows of %d (grid y %d): max relative error %.3g", wide ? " (wide)" : "",
          type, n, ffn, wide ? 1 : grid_y, worst);
}

int main() {
    /* float4 path: dims of the shapes (768, 5120), one float4 per thread
     * (1024), partial last loads (100), the largest row it takes (8192) */
    for (int dim : {768, 5120, 1024, 100, 8192}) {
        test_rmsnorm<float>(3, dim, "f32");
        test_rmsnorm<__half>(3, dim, "f16");
        test_rmsnorm<__nv_bfloat16>(2, dim, "bf16");
    }
    /* the plain kernel: rows that are not whole float4s, or too long */
    for (int dim : {6, 258, 8196}) test_rmsnorm<__half>(2, dim, "f16");
    check(!rmsnorm_vec_fits(8196) && !rmsnorm_vec_fits(258) && rmsnorm_vec_fits(8192),
          "rmsnorm picks the plain kernel for rows of 258 and 8196 floats");

    test_rope<float>(4, 2, 128, 0, 3, 1, "f32");
    test_rope<float>(3, 3, 64, 30000, 2, 1, "f32"); /* far positions: the angles need double */
    test_rope<float>(8, 1, 16, 100, 2, 1, "f32");
    test_rope<__half>(4, 2, 128, 500, 3, 3, "f16"); /* 512 pairs in slices of 171 */
    test_rope<__nv_bfloat16>(3, 3, 64, 30000, 2, 2, "bf16");
    test_rope<float>(2, 1, 16, 7, 2, 5, "f32"); /* 32 pairs: slices of 7, the last short */
    /* qwen2: NeoX pairs and q/k/v biases */
    test_rope<float>(4, 2, 128, 500, 3, 1, "f32", true, true);
    test_rope<__half>(14, 2, 64, 30000, 2, 3, "f16", true, true);
    test_rope<__nv_bfloat16>(2, 1, 16, 7, 2, 5, "bf16", true, false);
    test_rope<float>(3, 3, 64, 100, 2, 2, "f32", false, true);
    /* the wide kernel (4 pairs a step) for f16/bf16 rows, both pairings, with
     * and without biases, slices that end inside a head */
    test_rope<__half>(4, 2, 128, 500, 3, 3, "f16", false, false, true);
    test_rope<__nv_bfloat16>(3, 3, 64, 30000, 2, 2, "bf16", false, true, true);
    test_rope<__half>(14, 2, 64, 30000, 2, 3, "f16", true, true, true);
    test_rope<__nv_bfloat16>(2, 1, 16, 7, 2, 5, "bf16", true, false, true);
    test_rope<__half>(40, 40, 128, 16000, 2, 4, "f16", false, false, true); /* 13B's rows */
    check(rope_kv_wide_fits(128) && rope_kv_wide_fits(64) && rope_kv_wide_fits(16) &&
              !rope_kv_wide_fits(20),
          "the wide RoPE kernel takes head dims that are multiples of 8");

    /* Qwen3 0.6B's heads (16/8 of 128: 24 q/k heads, three rounds of 8
     * warps), heads narrower than a warp, a last round with idle warps */
    test_qk_norm<float>(16, 8, 128, 2, false, "f32");
    test_qk_norm<__half>(16, 8, 128, 2, true, "f16");
    test_qk_norm<__nv_bfloat16>(4, 2, 16, 3, false, "bf16");
    test_qk_norm<float>(5, 5, 40, 2, true, "f32");

    test_swiglu<__half, float>(3, 300, 3, "f16 from f32");
    test_swiglu<float, float>(5, 256, 2, "f32"); /* rows strided over grid y */
    test_swiglu<__nv_bfloat16, float>(2, 13824 / 8, 2, "bf16 from f32");
    test_swiglu<__half, __half>(3, 300, 2, "f16");
    test_swiglu<__nv_bfloat16, __nv_bfloat16>(2, 13824 / 8, 2, "bf16");
    /* the wide kernel: rows that end inside a block, a row shorter than a block */
    test_swiglu<__half, __half>(3, 13824 / 8, 1, "f16", true);
    test_swiglu<__nv_bfloat16, __nv_bfloat16>(5, 296, 1, "bf16", true);
    test_swiglu<__half, __half>(2, 4096, 1, "f16", true);

    if (failed) printf("%d check(s) failed\n", failed);
    return failed ? 1 : 0;
}
