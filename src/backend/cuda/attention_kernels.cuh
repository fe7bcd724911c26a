/* The attention kernels (device code); attention.cu launches them. See
 * attention.cu for the design and the fragment layouts.
 *
 * The PTX wrappers below (cp.async, ldmatrix, mma) are the only inline
 * assembly; a host build that defines CAKE_CUDA_EMULATE supplies its own
 * versions of them: tests/test_attention_emulated.cpp runs the kernels' logic
 * on a CPU with emulated warps that way. */
#ifndef CAKE_CUDA_ATTENTION_KERNELS_CUH
#define CAKE_CUDA_ATTENTION_KERNELS_CUH

#include "backend/cuda/common.cuh"

namespace cake_attn {

/* ---------------------------------------------------------------- MMA path */

constexpr int MMA_WARPS = 4;
constexpr int MMA_MT = 2;                       /* m16 tiles (16 query rows each) per warp */
constexpr int MMA_BM = 16 * MMA_MT * MMA_WARPS; /* queries per block */
constexpr int MMA_BN = 64;                      /* keys per tile */

#ifndef CAKE_CUDA_EMULATE
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

/* d += a * b for one m16n8k16 tile. */
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif

/* Two floats as f16x2: lo in the low half (the lower k index). */
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

/* Row pitch in halves: 16 bytes of padding spread ldmatrix's 8 rows over all banks. */
template <int HD> __host__ __device__ constexpr int mma_ld() {
    return HD + 8;
}

template <int HD> __host__ __device__ constexpr size_t mma_smem_bytes() {
    return (size_t)(MMA_BM + 4 * MMA_BN) * (size_t)mma_ld<HD>() * sizeof(__half);
}

/* The queries and key tiles of this block of a tensor-core kernel (MMA or
 * WGMMA): grid (n_heads, ceil(n / bm), n_splits), query blocks taken last
 * first. Block z of n_splits walks the key tiles [tile0, tile1) of its range
 * [z split_len, (z + 1) split_len), or all of them when unsplit; tile0 >=
 * tile1 when the range lies past the block's keys (the combine skips it). */
struct attn_block {
    int m0, rows; /* queries [m0, m0 + rows) of the batch */
    int kv_len;   /* keys [0, kv_len) */
    int tile0, tile1;
};
__device__ __forceinline__ attn_block attn_block_range(int bm, int bn, int n, int pos0,
                                                       int split_len) {
    attn_block b;
    b.m0 = ((int)gridDim.y - 1 - (int)blockIdx.y) * bm;
    b.rows = min(bm, n - b.m0);
    b.kv_len = pos0 + b.m0 + b.rows;
    const int tiles = (b.kv_len + bn - 1) / bn;
    if (gridDim.z == 1) {
        b.tile0 = 0;
        b.tile1 = tiles;
    } else {
        b.tile0 = (int)blockIdx.z * (split_len / bn);
        b.tile1 = min(tiles, b.tile0 + split_len / bn);
    }
    return b;
}

/* The combine, fused into a split launch (counters not NULL): each block of a
 * key range writes its rows' partials, and the last block of its (query block,
 * head) to finish merges that query block's ranges into the output, in range
 * order, so the result does not depend on which block came last. This saves
 * the combine launch, which read every partial back from memory in small
 * blocks after the whole grid had drained.
 *
 * attn_last_arrival takes the block's ticket once its partials are written:
 * true in the block whose arrival is the n_arrivals-th, which also zeroes the
 * counter for the next launch (counters start at zero). last: an int of shared
 * memory that no thread uses any more. Called by every thread of the block (it
 * synchronises the block). */
__device__ __forceinline__ bool attn_last_arrival(int *counter, int n_arrivals, int *last) {
    __threadfence(); /* this thread's partials, before the block's arrival */
    __syncthreads();
    if (threadIdx.x == 0) {
        *last = atomicAdd(counter, 1) == n_arrivals - 1;
        if (*last) *counter = 0; /* every part has arrived */
    }
    __syncthreads();
    if (!*last) return false;
    __threadfence(); /* the other blocks' partials, after their arrivals */
    return true;
}

/* Merges the partials of queries [m0, m0 + rows) of head h into `out`, in
 * part order: part_row(s, r) is part s of row r (o[head_dim], max in
 * natural-log units, sum), parts_of(r) how many parts row r has; head_dim <=
 * 128. A warp per query, each lane two pairs of dims. The merging block is
 * the last of its query block to finish, so its merge adds to the launch's
 * time: a row's loads, up to 8 parts, are issued together before any math
 * (one trip to L2 per row instead of one per part and sum), and each sum
 * still runs in part order, as in attn_combine_kernel. */
template <typename OutT, typename PartRow, typename PartsOf>
__device__ void attn_merge_rows(PartRow part_row, PartsOf parts_of, OutT *__restrict__ out, int m0,
                                int rows, int h, int n_heads, int head_dim) {
    constexpr int BATCH = 8;
    const int warps = (int)blockDim.x / 32, lane = (int)threadIdx.x % 32;
    const int d0 = 2 * lane, d1 = d0 + 64;
    for (int r = (int)threadIdx.x / 32; r < rows; r += warps) {
        const int n_parts = parts_of(r);
        float m[BATCH], ls[BATCH];
        float2 v0[BATCH], v1[BATCH];
        auto load = [&](int s0) {
#pragma unroll
            for (int k = 0; k < BATCH; k++) {
                m[k] = -INFINITY;
                ls[k] = 0.0f;
                v0[k] = v1[k] = make_float2(0.0f, 0.0f);
                if (s0 + k >= n_parts) continue;
                const float *p = part_row(s0 + k, r);
                m[k] = __ldcg(p + head_dim);
                ls[k] = __ldcg(p + head_dim + 1);
                if (d0 < head_dim) v0[k] = __ldcg(reinterpret_cast<const float2 *>(p + d0));
                if (d1 < head_dim) v1[k] = __ldcg(reinterpret_cast<const float2 *>(p + d1));
            }
        };
        load(0);
        float mx = -INFINITY;
#pragma unroll
        for (int k = 0; k < BATCH; k++) mx = fmaxf(mx, m[k]);
        for (int s0 = BATCH; s0 < n_parts; s0 += BATCH) { /* more parts: the maxima first */
#pragma unroll
            for (int k = 0; k < BATCH && s0 + k < n_parts; k++)
                mx = fmaxf(mx, __ldcg(part_row(s0 + k, r) + head_dim));
        }
        float l = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int s0 = 0; s0 < n_parts; s0 += BATCH) {
            if (s0 > 0) load(s0);
#pragma unroll
            for (int k = 0; k < BATCH; k++) {
                if (s0 + k >= n_parts) break;
                const float w = __expf(m[k] - mx);
                l += ls[k] * w;
                a0 += v0[k].x * w;
                a1 += v0[k].y * w;
                a2 += v1[k].x * w;
                a3 += v1[k].y * w;
            }
        }
        OutT *orow = out + ((size_t)(m0 + r) * n_heads + h) * head_dim;
        if (d0 < head_dim) cake_store2(orow + d0, a0 / l, a1 / l);
        if (d1 < head_dim) cake_store2(orow + d1, a2 / l, a3 / l);
    }
}

/* The merge of a split grid (n_heads, query blocks, ranges): the partials at
 * part[(query, head, range)], ranges that hold keys of a query merged. blk,
 * bn: the block and its key tile width. */
template <typename OutT>
__device__ void attn_merge_if_last(const float *__restrict__ part, OutT *__restrict__ out,
                                   int *counters, const attn_block &blk, int bn, int pos0,
                                   int n_heads, int head_dim, int split_len, int *last) {
    const int m0 = blk.m0, h = (int)blockIdx.x, n_splits = (int)gridDim.z;
    const int per = split_len / bn, n_ranges = ((blk.kv_len + bn - 1) / bn + per - 1) / per;
    if (!attn_last_arrival(counters + blockIdx.y * gridDim.x + blockIdx.x, n_ranges, last)) return;
    const size_t pitch = (size_t)head_dim + 2;
    attn_merge_rows(
        [&](int s, int r) {
            return part + (((size_t)(m0 + r) * n_heads + h) * n_splits + s) * pitch;
        },
        [&](int r) { return (pos0 + m0 + r + 1 + split_len - 1) / split_len; }, /* with keys */
        out, m0, blk.rows, h, n_heads, head_dim);
}

/* grid (n_heads, ceil(n / MMA_BM), n_splits), block 128, dynamic smem
 * mma_smem_bytes<HD>(). Heads vary fastest so that the heads of a KV group run
 * side by side (their K/V tiles stay in L2), and query blocks are taken last
 * first: the last ones see the most keys, and starting them first shortens the
 * tail. scale_log2 = log2(e) / sqrt(head_dim): the softmax runs in base 2, its
 * running max in those scaled units, so that one FFMA gives the exponent.
 *
 * With n_splits == 1 the block walks all its keys and writes the normalised
 * output. Otherwise block z walks only keys [z split_len, (z + 1) split_len)
 * and writes its rows' unnormalised partial (o[HD], max in natural-log units,
 * sum) to part (split_len is a multiple of MMA_BN); with counters (one int per
 * block of a range, zeroed) the last block of each query block and head merges
 * them (attn_merge_if_last), without, attn_combine_kernel does after. */
template <int HD, typename OutT>
__global__ void __launch_bounds__(MMA_WARPS * 32, (HD <= 64 ? 3 : 2))
    attn_mma_kernel(const __half *__restrict__ q, const __half *__restrict__ kc,
                    const __half *__restrict__ vc, OutT *__restrict__ out, float *__restrict__ part,
                    int *__restrict__ counters, int n, int pos0, int n_heads, int n_kv_heads,
                    float scale_log2, int split_len) {
    constexpr int LD = mma_ld<HD>();
    constexpr int CH = HD / 8;     /* 16-byte chunks per row */
    constexpr int NT = MMA_BN / 8; /* n-tiles of S per key tile */
    constexpr int DT = HD / 8;     /* n-tiles of O */
    constexpr int MT = MMA_MT;
    constexpr int THREADS = MMA_WARPS * 32;
    extern __shared__ uint4 smem_u4[]; /* uint4: 16-byte alignment for cp.async and ldmatrix */
    __half *sQ = reinterpret_cast<__half *>(smem_u4); /* [MMA_BM][LD] */
    __half *sK = sQ + MMA_BM * LD;                    /* [2][MMA_BN][LD] */
    __half *sV = sK + 2 * MMA_BN * LD;                /* [2][MMA_BN][LD] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const attn_block blk = attn_block_range(MMA_BM, MMA_BN, n, pos0, split_len);
    const int m0 = blk.m0, rows = blk.rows, kv_len = blk.kv_len;
    const int tile0 = blk.tile0, tile1 = blk.tile1;
    if (tile0 >= tile1) return; /* a range past this block's keys: the combine skips it */
    const int h = blockIdx.x, kvh = h / (n_heads / n_kv_heads);
    const int n_splits = (int)gridDim.z, sp = (int)blockIdx.z;
    const size_t q_stride = (size_t)n_heads * HD, kv_stride = (size_t)n_kv_heads * HD;
    const __half *kbase = kc + (size_t)kvh * HD, *vbase = vc + (size_t)kvh * HD;

    /* Q tile; rows past the batch are zero (their results are not written). */
    for (int c = tid; c < MMA_BM * CH; c += THREADS) {
        const int r = c / CH, cc = c % CH;
        __half *dst = sQ + r * LD + cc * 8;
        if (r < rows)
            cp_async16(dst, q + (size_t)(m0 + r) * q_stride + (size_t)h * HD + cc * 8);
        else
            *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
    }
    /* K/V tile `tile` into buffer `buf`. Keys at or past kv_len are zero-filled:
     * they are masked out of the softmax, but a masked P of 0 times a garbage V
     * (possibly NaN) would still poison O. */
    auto load_kv = [&](int tile, int buf) {
        __half *dk = sK + buf * MMA_BN * LD, *dv = sV + buf * MMA_BN * LD;
        for (int c = tid; c < MMA_BN * CH; c += THREADS) {
            const int r = c / CH, cc = c % CH;
            const int j = tile * MMA_BN + r;
            if (j < kv_len) {
                cp_async16(dk + r * LD + cc * 8, kbase + (size_t)j * kv_stride + cc * 8);
                cp_async16(dv + r * LD + cc * 8, vbase + (size_t)j * kv_stride + cc * 8);
            } else {
                *reinterpret_cast<uint4 *>(dk + r * LD + cc * 8) = make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4 *>(dv + r * LD + cc * 8) = make_uint4(0, 0, 0, 0);
            }
        }
    };
    load_kv(tile0, 0);
    cp_async_commit();

    /* This thread's rows (within the block): warp * 32 + mt * 16 + g (+ 8). */
    int pq[MT][2]; /* their positions */
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        pq[mt][0] = pos0 + m0 + warp * 32 + mt * 16 + g;
        pq[mt][1] = pq[mt][0] + 8;
    }
    const __half *qrow = sQ + (warp * 32 + (lane & 15)) * LD + (lane >> 4) * 8;

    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
    float m[MT][2], l[MT][2]; /* running max (scaled), this thread's part of the sums */
#pragma unroll
    for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;

    for (int it = tile0; it < tile1; it++) {
        const int buf = (it - tile0) & 1;
        if (it + 1 < tile1) {
            load_kv(it + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>(); /* everything but the newest group (tile it + 1) is in */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const __half *tk = sK + buf * MMA_BN * LD, *tv = sV + buf * MMA_BN * LD;

        /* S = Q K^T, 32 head dims per step: the Q fragments of both m-tiles
         * (re-read from shared memory: registers hold O and S), then each K
         * fragment (8 keys x 32 dims) into 4 MMAs. B[k = d][n = key] =
         * K[key][d], i.e. K's rows as stored. */
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 32; kk++) {
            uint32_t qa[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                ldsm_x4(qa[mt][0], qrow + mt * 16 * LD + kk * 32);
                ldsm_x4(qa[mt][1], qrow + mt * 16 * LD + kk * 32 + 16);
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                uint32_t b[4]; /* d blocks kk*32 + {0, 8, 16, 24} of keys nt*8..+7 */
                ldsm_x4(b, tk + (nt * 8 + (lane & 7)) * LD + kk * 32 + (lane >> 3) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(s[mt][nt], qa[mt][0], b[0], b[1]);
                    mma_16816(s[mt][nt], qa[mt][1], b[2], b[3]);
                }
            }
        }

        /* Mask (query at position pq sees keys j <= pq; only tiles reaching
         * past the block's first query need the test), then the row maxima. */
        const int kbeg = it * MMA_BN;
        const bool need_mask = kbeg + MMA_BN - 1 > pos0 + m0;
        float ref[MT][2]; /* the new max, or 0 while a row has seen no key */
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = kbeg + nt * 8 + 2 * tq + (e & 1);
                    if (need_mask && j > pq[mt][e >> 1]) s[mt][nt][e] = -INFINITY;
                }
                mx0 = fmaxf(mx0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            /* The 4 threads of a quad hold the same two rows. */
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m[mt][0], mx0 * scale_log2);
            const float mn1 = fmaxf(m[mt][1], mx1 * scale_log2);
            /* A row that has seen no key yet (possible in a split other than
             * the first) keeps max -inf: exponents against 0 then give 0 for
             * everything, where -inf - -inf would give NaN. */
            ref[mt][0] = mn0 == -INFINITY ? 0.0f : mn0;
            ref[mt][1] = mn1 == -INFINITY ? 0.0f : mn1;
            const float a0 = exp2f(m[mt][0] - ref[mt][0]); /* rescales the old sums; 0 at first */
            const float a1 = exp2f(m[mt][1] - ref[mt][1]);
            m[mt][0] = mn0;
            m[mt][1] = mn1;
            l[mt][0] *= a0;
            l[mt][1] *= a1;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                o[mt][dt][0] *= a0;
                o[mt][dt][1] *= a0;
                o[mt][dt][2] *= a1;
                o[mt][dt][3] *= a1;
            }
        }

        /* O += P V, 16 keys per step: P = exp2(S scale - max) packed straight
         * into A fragments (keys kj*16..+15 are S n-tiles 2kj, regs 0 and 1,
         * and 2kj+1, regs 2 and 3), each V fragment into 4 MMAs. B[k = key]
         * [n = d] = V[key][d], loaded transposed. */
#pragma unroll
        for (int kj = 0; kj < MMA_BN / 16; kj++) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int nt = 2 * kj + half;
                    const float p0 = exp2f(fmaf(s[mt][nt][0], scale_log2, -ref[mt][0]));
                    const float p1 = exp2f(fmaf(s[mt][nt][1], scale_log2, -ref[mt][0]));
                    const float p2 = exp2f(fmaf(s[mt][nt][2], scale_log2, -ref[mt][1]));
                    const float p3 = exp2f(fmaf(s[mt][nt][3], scale_log2, -ref[mt][1]));
                    l[mt][0] += p0 + p1;
                    l[mt][1] += p2 + p3;
                    pa[mt][half * 2 + 0] = pack_half2(p0, p1);
                    pa[mt][half * 2 + 1] = pack_half2(p2, p3);
                }
            }
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                uint32_t b[4]; /* (keys lo, d dt), (keys hi, d dt), (lo, dt+1), (hi, dt+1) */
                ldsm_x4_trans(b, tv + (kj * 16 + (lane & 15)) * LD + dt * 8 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(o[mt][dt], pa[mt], b[0], b[1]);
                    mma_16816(o[mt][dt + 1], pa[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads(); /* the next iteration refills the buffer read here */
    }

#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float sum = l[mt][hf];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int r = warp * 32 + mt * 16 + g + 8 * hf;
            if (r >= rows) continue;
            if (n_splits == 1) {
                const float inv = 1.0f / sum;
                OutT *orow = out + (size_t)(m0 + r) * q_stride + (size_t)h * HD;
#pragma unroll
                for (int dt = 0; dt < DT; dt++)
                    cake_store2(orow + dt * 8 + 2 * tq, o[mt][dt][2 * hf] * inv,
                                o[mt][dt][2 * hf + 1] * inv);
            } else {
                float *pp =
                    part + (((size_t)(m0 + r) * n_heads + h) * n_splits + sp) * (size_t)(HD + 2);
#pragma unroll
                for (int dt = 0; dt < DT; dt++)
                    *reinterpret_cast<float2 *>(pp + dt * 8 + 2 * tq) =
                        make_float2(o[mt][dt][2 * hf], o[mt][dt][2 * hf + 1]);
                if (tq == 0) {
                    pp[HD] = m[mt][hf] * 0.6931471805599453f; /* natural-log units */
                    pp[HD + 1] = sum;
                }
            }
        }
    }
    if (n_splits > 1 && counters)
        attn_merge_if_last(part, out, counters, blk, MMA_BN, pos0, n_heads, HD, split_len,
                           reinterpret_cast<int *>(smem_u4));
}

/* --------------------------------------------------------------- SIMT path */

constexpr int SIMT_THREADS = 128; /* keys per step; also covers head_dim <= 256 in 2 slots */
constexpr int SIMT_MAX_HD = 2 * SIMT_THREADS;

__host__ __device__ constexpr int simt_smem_floats(int head_dim) {
    return head_dim + SIMT_THREADS + 64;
}

/* grid (n, n_heads, n_splits), block SIMT_THREADS, dynamic smem
 * simt_smem_floats(head_dim) floats. Query t (position p = pos0 + t) attends
 * keys [s * split_len, min(p + 1, (s + 1) * split_len)). With n_splits == 1
 * (split_len >= p + 1) it writes the normalised output; otherwise the
 * unnormalised partial (o[head_dim], max, sum) of its range to `part`. */
template <typename OutT>
__global__ void __launch_bounds__(SIMT_THREADS)
    attn_simt_kernel(const __half *__restrict__ q, const __half *__restrict__ kc,
                     const __half *__restrict__ vc, OutT *__restrict__ out,
                     float *__restrict__ part, int pos0, int n_heads, int n_kv_heads, int head_dim,
                     int split_len, int n_splits, float scale) {
    extern __shared__ float sm[];
    float *qs = sm;                     /* [head_dim] */
    float *ps = qs + head_dim;          /* [SIMT_THREADS] probabilities of the current step */
    float *red_max = ps + SIMT_THREADS; /* [32] block reductions */
    float *red_sum = red_max + 32;      /* [32] */
    const int t = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, tid = threadIdx.x;
    const int p = pos0 + t;
    const int k_begin = sp * split_len;
    const int k_end = min(p + 1, k_begin + split_len);
    if (k_begin >= k_end) return; /* uniform over the block: a range past this query */

    const int kvh = h / (n_heads / n_kv_heads);
    const size_t kv_stride = (size_t)n_kv_heads * head_dim;
    const __half *qrow = q + ((size_t)t * n_heads + h) * head_dim;
    for (int d = tid; d < head_dim; d += SIMT_THREADS) qs[d] = __half2float(qrow[d]);
    __syncthreads();
    const __half *kb = kc + (size_t)kvh * head_dim, *vb = vc + (size_t)kvh * head_dim;

    float m = -INFINITY, l = 0.0f, o0 = 0.0f, o1 = 0.0f; /* o for d = tid, tid + 128 */
    for (int j0 = k_begin; j0 < k_end; j0 += SIMT_THREADS) {
        const int j = j0 + tid;
        float sc = -INFINITY;
        if (j < k_end) {
            const __half2 *kr = reinterpret_cast<const __half2 *>(kb + (size_t)j * kv_stride);
            float acc = 0.0f;
            for (int d2 = 0; d2 < head_dim / 2; d2++) {
                const float2 kf = __half22float2(kr[d2]);
                acc += qs[2 * d2] * kf.x + qs[2 * d2 + 1] * kf.y;
            }
            sc = acc * scale;
        }
        const float mt = cake_block_max(sc, red_max);
        const float mn = fmaxf(m, mt); /* finite: key j0 is valid */
        const float alpha = __expf(m - mn);
        const float pj = j < k_end ? __expf(sc - mn) : 0.0f;
        ps[tid] = pj;
        const float st = cake_block_sum(pj, red_sum); /* its barrier also publishes ps */
        l = l * alpha + st;
        m = mn;
        const int cnt = min(SIMT_THREADS, k_end - j0);
        if (tid < head_dim) {
            float acc = 0.0f;
            for (int jj = 0; jj < cnt; jj++)
                acc += ps[jj] * __half2float(vb[(size_t)(j0 + jj) * kv_stride + tid]);
            o0 = o0 * alpha + acc;
        }
        if (tid + SIMT_THREADS < head_dim) {
            float acc = 0.0f;
            for (int jj = 0; jj < cnt; jj++)
                acc +=
                    ps[jj] * __half2float(vb[(size_t)(j0 + jj) * kv_stride + tid + SIMT_THREADS]);
            o1 = o1 * alpha + acc;
        }
        __syncthreads(); /* ps, red_max and red_sum are rewritten in the next step */
    }

    if (n_splits == 1) {
        OutT *orow = out + ((size_t)t * n_heads + h) * head_dim;
        if (tid < head_dim) orow[tid] = cake_from_f32<OutT>(o0 / l);
        if (tid + SIMT_THREADS < head_dim) orow[tid + SIMT_THREADS] = cake_from_f32<OutT>(o1 / l);
    } else {
        float *pp = part + (((size_t)t * n_heads + h) * n_splits + sp) * (size_t)(head_dim + 2);
        if (tid < head_dim) pp[tid] = o0;
        if (tid + SIMT_THREADS < head_dim) pp[tid + SIMT_THREADS] = o1;
        if (tid == 0) {
            pp[head_dim] = m;
            pp[head_dim + 1] = l;
        }
    }
}

/* grid (n, n_heads), block SIMT_THREADS: merges the ranges of query t in order. */
template <typename OutT>
__global__ void attn_combine_kernel(const float *__restrict__ part, OutT *__restrict__ out,
                                    int pos0, int n_heads, int head_dim, int split_len,
                                    int n_splits) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int n_valid = (pos0 + t + 1 + split_len - 1) / split_len; /* ranges with keys */
    const size_t pitch = (size_t)head_dim + 2;
    const float *base = part + ((size_t)t * n_heads + h) * n_splits * pitch;
    float mx = -INFINITY;
    for (int s = 0; s < n_valid; s++) mx = fmaxf(mx, base[s * pitch + head_dim]);
    float l = 0.0f;
    for (int s = 0; s < n_valid; s++)
        l += base[s * pitch + head_dim + 1] * __expf(base[s * pitch + head_dim] - mx);
    OutT *orow = out + ((size_t)t * n_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < n_valid; s++)
            acc += base[s * pitch + d] * __expf(base[s * pitch + head_dim] - mx);
        orow[d] = cake_from_f32<OutT>(acc / l);
    }
}

} // namespace cake_attn

#endif
