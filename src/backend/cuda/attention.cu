/* Causal attention over the f16 KV cache, four ways:
 *
 *  - WGMMA (prefill, head_dim 128, Hopper): the MMA path's query blocks and
 *    key ranges on warpgroup MMA, two warpgroups of 64 queries per block,
 *    K/V tiles loaded by TMA, the P V product of one key tile overlapping the
 *    softmax of the next. See
 *    attention_wgmma.cuh. Built only for sm_90a ("90a" in
 *    CMAKE_CUDA_ARCHITECTURES) and taken only on a compute-capability 9.0 GPU.
 *    Where the MMA path would split keys into ranges, its decoupled variants
 *    can instead run a "stream" of the batch's key tiles cut into one equal
 *    run per SM (CAKE_CUDA_ATTN_SCHED=stream).
 *
 *  - MMA (prefill, head_dim 64 or 128): flash attention on tensor cores
 *    (mma.sync m16n8k16, f16 inputs, f32 accumulation). A block of 4 warps
 *    takes 128 queries of one head (32 per warp, two m16 tiles, so that each
 *    K or V fragment read from shared memory feeds 4 MMAs) and walks the keys
 *    in tiles of 64, double-buffered in shared memory with cp.async; S = Q K^T
 *    and O += P V stay in registers, with the online softmax in between. The
 *    score matrix is never stored. The key tiles start at multiples of 64 from
 *    position 0 whatever pos0 is, so without key ranges a query's result does
 *    not depend on how the prompt was split into batches. When a batch has
 *    too few query blocks to fill the GPU (a chunk of 512 queries far into a
 *    long prompt: 4 blocks per head), the keys are split into ranges, one
 *    block per (query block, head, range); the last of a (query block,
 *    head)'s blocks to finish merges its ranges in order (attn_merge_if_last;
 *    with CAKE_CUDA_COMBINE=launch a combine kernel does, after the grid).
 *  - SIMT (the plain reference, any even head_dim <= 256): one block per
 *    (query, head); scores one key per thread, softmax and P V in f32.
 *  - SPLIT (decode, few queries, head sizes the MMA kernel does not take):
 *    the SIMT kernel over fixed ranges of split_len keys, one block per
 *    (query, head, range), then the combine kernel (flash-decoding). Decode
 *    with head_dim 64 or 128 takes the MMA kernel over key ranges.
 *
 * All four are deterministic: fixed tiles and ranges (chosen from the batch's
 * shape and the GPU's SM count alone), fixed reduction orders; atomics only
 * pick which block merges, never the order of a sum.
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16 with .f16 inputs; g = lane / 4,
 * q = lane % 4):
 *   A (16x16, row):  reg0 = A[g][2q..2q+1]   reg1 = A[g+8][2q..2q+1]
 *                    reg2 = A[g][2q+8..+9]   reg3 = A[g+8][2q+8..+9]
 *   B (16x8, col):   reg0 = B[2q..2q+1][g]   reg1 = B[2q+8..+9][g]
 *   C (16x8, f32):   c0,c1 = C[g][2q..2q+1]  c2,c3 = C[g+8][2q..2q+1]
 * ldmatrix.x4 loads four 8x8 f16 matrices whose row addresses come from lanes
 * 8i..8i+7 (matrix i); lane l receives M_i[l/4][2(l%4)..+1] in register i, or
 * with .trans M_i[2(l%4)..+1][l/4].
 *
 * tests/test_attention_emulated.cpp runs the MMA and WGMMA kernels on the CPU
 * with emulated warps; test_cuda runs every path on a GPU. */
#include "backend/cuda/attention_kernels.cuh"
#include "backend/cuda/attention_wgmma.cuh"

#include "model/gguf.h"

#include <cudaTypedefs.h> /* PFN_cuTensorMapEncodeTiled */
#include <string.h>

using namespace cake_attn;

namespace {

/* ------------------------------------------------------------- dispatching */

/* Key ranges for a batch of MMA blocks. A chunk of 512 queries far into a
 * long prompt is 4 query blocks per head, a few hundred blocks for ~130 SMs
 * that each run `resident` at once, and every block walks all the keys: the
 * last round leaves SMs idle, or running a lone block that gets only ~2/3 of
 * an SM's tensor throughput. Splitting the keys into n ranges makes n times as
 * many, n times shorter blocks. The n taken is the one with the shortest
 * modelled makespan (the busiest SM's blocks, run `resident` at a time), plus
 * 2% of a block's time per range for merging the ranges and the extra
 * prologues. Ranges are whole key tiles (`tile` keys) of at least
 * MMA_MIN_SPLIT keys; batches with blocks enough for every SM four times over
 * are not split (the WGMMA kernel's blocks take the same queries). The choice
 * depends on the shape and the GPU alone, so results stay deterministic. */
constexpr int MMA_MIN_SPLIT = 512;

/* The index in names of environment variable var's value; 0 (the default,
 * names[0]) when it is unset or names none of them. For the knobs below,
 * each read once. */
template <int N> int env_choice(const char *var, const char *const (&names)[N]) {
    const char *e = getenv(var);
    for (int i = 0; e && i < N; i++)
        if (!strcmp(e, names[i])) return i;
    return 0;
}

/* CAKE_CUDA_ATTN_SPLITS=N (read once): N ranges wherever the model above would
 * consider splitting and N is possible, to measure its choice against others. */
int forced_splits() {
    static const int n = [] {
        const char *e = getenv("CAKE_CUDA_ATTN_SPLITS");
        const int v = e ? atoi(e) : 0;
        return v >= 1 && v <= CAKE_ATTN_MMA_MAX_SPLITS ? v : 0;
    }();
    return n;
}

int mma_splits(const cake_attn_launch *a, int resident, int tile, int *split_len) {
    const int blocks = a->n_heads * ((a->n + MMA_BM - 1) / MMA_BM);
    const int keys = a->pos0 + a->n;
    *split_len = 0;
    if (!a->part || a->n_sm < 1 || resident < 1 || blocks >= 4 * a->n_sm) return 1;
    int best_n = 1;
    double best = 1e30;
    for (int n = 1; n <= CAKE_ATTN_MMA_MAX_SPLITS; n++) {
        const int len = ((keys + n - 1) / n + tile - 1) / tile * tile;
        if (n > 1 && (len < MMA_MIN_SPLIT || (keys + len - 1) / len != n)) continue;
        const size_t need = (size_t)a->n * a->n_heads * n * (size_t)(a->head_dim + 2);
        if (n > 1 && need > a->part_floats) break;
        /* The busiest SM's k blocks, in units of one block's time when
         * `resident` share an SM: full rounds, then a last partial one. */
        const int k = (blocks * n + a->n_sm - 1) / a->n_sm;
        const int rest = k % resident;
        const double rounds = (double)(k - rest) + (rest == 1 ? 1.5 : (double)rest);
        const double cost = rounds / n + 0.02 * n; /* in units of an unsplit block's time */
        if (forced_splits() == n) {
            *split_len = n > 1 ? len : 0;
            return n;
        }
        if (cost < best) {
            best = cost;
            best_n = n;
            *split_len = n > 1 ? len : 0;
        }
    }
    return best_n;
}

/* Blocks of KERNEL an SM runs at once (registers and shared memory), asked
 * once per kernel; 0 when unknown (then the batch is not split). */
template <auto KERNEL> int resident_blocks(int threads, size_t smem) {
    static const int r = [&] {
        int n = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, KERNEL, threads, smem) !=
            cudaSuccess) {
            cudaGetLastError();
            n = 0;
        }
        return n;
    }();
    return r;
}

/* The WGMMA kernel's variant, from CAKE_CUDA_WGMMA (read once), to measure
 * them side by side: bn128-free (the default: key tiles of 128, loaded by TMA
 * with no block-wide barrier per tile), bn128-tma (a barrier per tile),
 * bn128 (cp.async by every thread, a barrier per tile; also what the default
 * falls back to where no tensor map can be made), bn64-tma, bn64 (tiles of
 * 64, 4 stages). On an H100, 13B shape, 16K tokens in one pass, attention
 * took 242, 254, 306, 283 and 333 ms (docs/BENCHMARKS.md). bn128-pingpong:
 * bn128-free with the warpgroups taking turns to issue their products (not
 * yet measured on a GPU). */
enum { WG_BN128_FREE, WG_BN128_TMA, WG_BN128, WG_BN64_TMA, WG_BN64, WG_BN128_PINGPONG };
int wgmma_variant() {
    static const char *const names[] = {"bn128-free", "bn128-tma", "bn128",
                                        "bn64-tma",   "bn64",      "bn128-pingpong"};
    static const int v = env_choice("CAKE_CUDA_WGMMA", names);
    return v;
}

/* cuTensorMapEncodeTiled, from the driver (the runtime has no wrapper). */
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                             &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            p = nullptr;
        }
        return (PFN_cuTensorMapEncodeTiled_v12000)p;
    }();
    return fn;
}

/* A TMA map of one layer's K or V cache, rows [0, rows): (head dim, KV head,
 * position), boxes of 64 dims x 1 head x bn positions, 128-byte swizzle (the
 * layout the wgmma kernel's descriptors read); positions past `rows` read as
 * zeros. */
bool make_kv_map(CUtensorMap *map, const __half *cache, int n_kv_heads, int rows, int bn) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) return false;
    const cuuint64_t dims[3] = {(cuuint64_t)WG_HD, (cuuint64_t)n_kv_heads, (cuuint64_t)rows};
    const cuuint64_t strides[2] = {(cuuint64_t)WG_HD * 2, (cuuint64_t)n_kv_heads * WG_HD * 2};
    const cuuint32_t box[3] = {64, 1, (cuuint32_t)bn}, elem[3] = {1, 1, 1};
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, (void *)cache, dims, strides, box, elem,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* 1 if this build has the WGMMA kernel and the current GPU can run it. */
int wgmma_available() {
#ifdef CAKE_CUDA_SM90A
    static const int ok = [] {
        int dev = 0, major = 0, minor = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
        return (int)(major == 9 && minor == 0); /* sm_90a code runs on 9.0 alone */
    }();
    return ok;
#else
    return 0;
#endif
}

template <typename OutT>
cudaError_t launch_combine(const cake_attn_launch *a, OutT *out, int split_len, int n_splits,
                           cudaStream_t st) {
    attn_combine_kernel<OutT><<<dim3((unsigned)a->n, (unsigned)a->n_heads), SIMT_THREADS, 0, st>>>(
        a->part, out, a->pos0, a->n_heads, a->head_dim, split_len, n_splits);
    return cudaGetLastError();
}

/* The counters a split launch of `grid` merges its ranges with, or NULL when
 * the combine kernel is to do it: no counters, too few, or
 * CAKE_CUDA_COMBINE=launch (read once; to measure the two side by side). */
int *merge_counters(const cake_attn_launch *a, dim3 grid) {
    static const char *const names[] = {"merged", "launch"};
    static const bool launch = env_choice("CAKE_CUDA_COMBINE", names) == 1;
    if (launch || grid.z == 1 || !a->counters || (size_t)grid.x * grid.y > a->counter_ints)
        return nullptr;
    return a->counters;
}

template <int HD, typename OutT>
cudaError_t launch_mma(const cake_attn_launch *a, OutT *out, cudaStream_t st) {
    int split_len;
    const int resident =
        resident_blocks<attn_mma_kernel<HD, OutT>>(MMA_WARPS * 32, mma_smem_bytes<HD>());
    const int n_splits = mma_splits(a, resident, MMA_BN, &split_len);
    const dim3 grid((unsigned)a->n_heads, (unsigned)((a->n + MMA_BM - 1) / MMA_BM),
                    (unsigned)n_splits);
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)HD);
    int *counters = merge_counters(a, grid);
    attn_mma_kernel<HD, OutT><<<grid, MMA_WARPS * 32, mma_smem_bytes<HD>(), st>>>(
        a->q, a->k, a->v, out, a->part, counters, a->n, a->pos0, a->n_heads, a->n_kv_heads,
        scale_log2, split_len);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || n_splits == 1 || counters) return e;
    return launch_combine<OutT>(a, out, split_len, n_splits, st);
}

/* CAKE_CUDA_ATTN_SCHED (read once): "stream": the decoupled WGMMA variants
 * take the stream schedule (attention_wgmma.cuh) where a grid would be split
 * into key ranges; "stream-all": for every batch; "grid" (the default): the
 * grid. To measure them side by side. */
enum { SCHED_GRID, SCHED_STREAM, SCHED_STREAM_ALL };
int stream_schedule() {
    static const char *const names[] = {"grid", "stream", "stream-all"};
    static const int v = env_choice("CAKE_CUDA_ATTN_SCHED", names);
    return v;
}

/* The blocks of a stream launch of a batch of `tiles` key tiles, the
 * schedule being on: one per resident slot (fewer where `part` or the
 * counters have not the room for two slots each), or 0 where the batch runs
 * as a grid. */
int stream_runs(const cake_attn_launch *a, int resident, int tiles) {
    const int sched = stream_schedule(), q_blocks = (a->n + WG_BM - 1) / WG_BM;
    if (!a->part || !a->counters || a->n_sm < 1 || resident < 1 ||
        (sched == SCHED_STREAM && q_blocks * a->n_heads >= 4 * a->n_sm))
        return 0;
    const size_t part_room = a->part_floats / (2 * WG_BM * (WG_HD + 2));
    const size_t room = part_room < a->counter_ints / 2 ? part_room : a->counter_ints / 2;
    size_t runs = (size_t)a->n_sm * (size_t)resident;
    runs = runs < room ? runs : room;
    return (int)(runs < (size_t)tiles ? runs : (size_t)tiles);
}

template <typename OutT, typename C>
cudaError_t launch_wgmma(const cake_attn_launch *a, OutT *out, cudaStream_t st) {
    int split_len = 0, n_splits = 1;
    const int resident = resident_blocks<attn_wgmma_kernel<OutT, C>>(WG_THREADS, C::SMEM);
    int stream_tiles = 0, runs = 0;
    if (C::LOAD == WG_LOAD_TMA_DECOUPLED && stream_schedule() != SCHED_GRID) {
        stream_tiles = wg_stream_tiles(a->n, a->pos0, a->n_heads, C::BN);
        runs = stream_runs(a, resident, stream_tiles);
    }
    if (!runs) {
        stream_tiles = 0;
        n_splits = mma_splits(a, resident, C::BN, &split_len);
    }
    const dim3 grid = runs ? dim3((unsigned)runs)
                           : dim3((unsigned)a->n_heads, (unsigned)((a->n + WG_BM - 1) / WG_BM),
                                  (unsigned)n_splits);
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)WG_HD);
    CUtensorMap tm_k, tm_v;
    memset(&tm_k, 0, sizeof(tm_k));
    memset(&tm_v, 0, sizeof(tm_v));
    if (C::LOAD != WG_LOAD_CP_ASYNC &&
        (!make_kv_map(&tm_k, a->k, a->n_kv_heads, a->pos0 + a->n, C::BN) ||
         !make_kv_map(&tm_v, a->v, a->n_kv_heads, a->pos0 + a->n, C::BN)))
        return cudaErrorInvalidValue;
    int *counters = runs ? a->counters : merge_counters(a, grid);
    attn_wgmma_kernel<OutT, C><<<grid, WG_THREADS, C::SMEM, st>>>(
        a->q, a->k, a->v, out, a->part, counters, a->n, a->pos0, a->n_heads, a->n_kv_heads,
        scale_log2, split_len, stream_tiles, tm_k, tm_v);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || n_splits == 1 || counters) return e;
    return launch_combine<OutT>(a, out, split_len, n_splits, st);
}

template <typename OutT>
cudaError_t launch_wgmma(const cake_attn_launch *a, OutT *out, cudaStream_t st) {
    const int v = wgmma_variant();
    if (v == WG_BN128 || (v != WG_BN64 && !tensor_map_encoder()))
        return launch_wgmma<OutT, wg_bn128>(a, out, st);
    switch (v) {
    case WG_BN128_TMA:
        return launch_wgmma<OutT, wg_bn128_tma>(a, out, st);
    case WG_BN64_TMA:
        return launch_wgmma<OutT, wg_bn64_tma>(a, out, st);
    case WG_BN64:
        return launch_wgmma<OutT, wg_bn64>(a, out, st);
    case WG_BN128_PINGPONG:
        return launch_wgmma<OutT, wg_bn128_pingpong>(a, out, st);
    default:
        return launch_wgmma<OutT, wg_bn128_free>(a, out, st);
    }
}

template <typename OutT>
cudaError_t launch_simt(const cake_attn_launch *a, OutT *out, int split, cudaStream_t st) {
    const float scale = 1.0f / sqrtf((float)a->head_dim);
    const size_t smem = (size_t)simt_smem_floats(a->head_dim) * sizeof(float);
    if (!split) {
        /* One range holding every key of every query of the batch. */
        const int all = a->pos0 + a->n;
        const dim3 grid((unsigned)a->n, (unsigned)a->n_heads, 1);
        attn_simt_kernel<OutT><<<grid, SIMT_THREADS, smem, st>>>(a->q, a->k, a->v, out, a->part,
                                                                 a->pos0, a->n_heads, a->n_kv_heads,
                                                                 a->head_dim, all, 1, scale);
        return cudaGetLastError();
    }
    const int n_splits = (a->pos0 + a->n + a->split_len - 1) / a->split_len;
    const size_t need = (size_t)a->n * a->n_heads * n_splits * (size_t)(a->head_dim + 2);
    if (a->n > CAKE_ATTN_SPLIT_MAX_N || need > a->part_floats || !a->part)
        return cudaErrorInvalidValue;
    const dim3 grid((unsigned)a->n, (unsigned)a->n_heads, (unsigned)n_splits);
    attn_simt_kernel<OutT><<<grid, SIMT_THREADS, smem, st>>>(
        a->q, a->k, a->v, out, a->part, a->pos0, a->n_heads, a->n_kv_heads, a->head_dim,
        a->split_len, n_splits, scale);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    /* With one range the kernel above has written the output already. */
    if (n_splits > 1) e = launch_combine<OutT>(a, out, a->split_len, n_splits, st);
    return e;
}

template <typename OutT>
cudaError_t dispatch(const cake_attn_launch *a, int path, OutT *out, cudaStream_t st) {
    if (path == CAKE_ATTN_AUTO) {
        /* Decode (a few queries): the MMA kernel over key ranges where it
         * takes the head size (on an H100, 13B shape after 16K tokens: 57
         * tokens/s against the SIMT split path's 40), else the SIMT split. */
        if (a->n <= CAKE_ATTN_SPLIT_MAX_N && a->part)
            path = cake_cuda_attention_supported(CAKE_ATTN_MMA, a->head_dim) ? CAKE_ATTN_MMA
                                                                             : CAKE_ATTN_SPLIT;
        else if (cake_cuda_attention_supported(CAKE_ATTN_WGMMA, a->head_dim))
            path = CAKE_ATTN_WGMMA;
        else if (cake_cuda_attention_supported(CAKE_ATTN_MMA, a->head_dim))
            path = CAKE_ATTN_MMA;
        else
            path = CAKE_ATTN_SIMT;
    }
    if (!cake_cuda_attention_supported(path, a->head_dim)) return cudaErrorInvalidValue;
    switch (path) {
    case CAKE_ATTN_MMA:
        return a->head_dim == 64 ? launch_mma<64, OutT>(a, out, st)
                                 : launch_mma<128, OutT>(a, out, st);
    case CAKE_ATTN_WGMMA:
        return launch_wgmma<OutT>(a, out, st);
    case CAKE_ATTN_SIMT:
        return launch_simt<OutT>(a, out, 0, st);
    case CAKE_ATTN_SPLIT:
        return launch_simt<OutT>(a, out, 1, st);
    default:
        return cudaErrorInvalidValue;
    }
}

template <int HD> cudaError_t setup_mma() {
    const int bytes = (int)mma_smem_bytes<HD>();
    const cudaFuncAttribute attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
    cudaError_t e;
    if ((e = cudaFuncSetAttribute(attn_mma_kernel<HD, float>, attr, bytes)) ||
        (e = cudaFuncSetAttribute(attn_mma_kernel<HD, __half>, attr, bytes)) ||
        (e = cudaFuncSetAttribute(attn_mma_kernel<HD, __nv_bfloat16>, attr, bytes)))
        return e;
    return cudaSuccess;
}

template <typename C> cudaError_t setup_wgmma() {
    const cudaFuncAttribute attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
    cudaError_t e;
    if ((e = cudaFuncSetAttribute(attn_wgmma_kernel<float, C>, attr, (int)C::SMEM)) ||
        (e = cudaFuncSetAttribute(attn_wgmma_kernel<__half, C>, attr, (int)C::SMEM)) ||
        (e = cudaFuncSetAttribute(attn_wgmma_kernel<__nv_bfloat16, C>, attr, (int)C::SMEM)))
        return e;
    return cudaSuccess;
}

} // namespace

cudaError_t cake_cuda_attention_setup(void) {
    cudaError_t e = setup_mma<64>();
    if (e != cudaSuccess) return e;
    if ((e = setup_mma<128>()) != cudaSuccess || !wgmma_available()) return e;
    if ((e = setup_wgmma<wg_bn128_free>()) || (e = setup_wgmma<wg_bn128_tma>()) ||
        (e = setup_wgmma<wg_bn128>()) || (e = setup_wgmma<wg_bn64_tma>()) ||
        (e = setup_wgmma<wg_bn64>()) || (e = setup_wgmma<wg_bn128_pingpong>()))
        return e;
    return cudaSuccess;
}

int cake_cuda_attention_supported(int path, int head_dim) {
    if (head_dim < 2 || head_dim % 2) return 0;
    switch (path) {
    case CAKE_ATTN_AUTO:
        return head_dim <= SIMT_MAX_HD;
    case CAKE_ATTN_MMA:
        return head_dim == 64 || head_dim == 128;
    case CAKE_ATTN_WGMMA:
        return head_dim == WG_HD && wgmma_available();
    case CAKE_ATTN_SIMT:
    case CAKE_ATTN_SPLIT:
        return head_dim <= SIMT_MAX_HD;
    default:
        return 0;
    }
}

int cake_cuda_attention_stream(void) {
    return stream_schedule() != SCHED_GRID;
}

cudaError_t cake_cuda_attention(const cake_attn_launch *a, int path, cudaStream_t st) {
    switch (a->out_dtype) {
    case CAKE_DTYPE_F32:
        return dispatch<float>(a, path, (float *)a->out, st);
    case CAKE_DTYPE_F16:
        return dispatch<__half>(a, path, (__half *)a->out, st);
    case CAKE_DTYPE_BF16:
        return dispatch<__nv_bfloat16>(a, path, (__nv_bfloat16 *)a->out, st);
    default:
        return cudaErrorInvalidValue;
    }
}
