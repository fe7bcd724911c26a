/* The Hopper attention kernel for prefill (device code; attention.cu launches
 * it): flash attention on warpgroup MMA (wgmma, sm_90a), head_dim 128. The
 * same contract as attn_mma_kernel (grid, key tiles from position 0, key
 * ranges, partials), so that the dispatch can take either; see attention.cu.
 * Or, instead of a grid, the stream schedule: a block per SM walking an equal
 * run of the batch's key tiles across (query block, head) items (below).
 *
 * A block of two warpgroups (256 threads) takes 128 queries of one head, 64
 * per warpgroup, and walks the keys in tiles of BN (64 or 128). Per tile, each
 * warpgroup computes
 *   S = Q K^T     8 wgmma m64nBNk16 over the head dims, Q as A fragments in
 *                 registers (loaded once)
 *   O += P V      BN/16 wgmma m64n128k16, P from registers, V from shared
 *                 memory (MN-major, the "transposed B" form)
 * The P V product of tile t - 1 runs while the softmax of tile t is
 * computed: each iteration issues S(t) and then O += P(t-1) V(t-1), waits for
 * S(t) only, takes its row maxima and exponents, then waits for O before
 * rescaling it. K/V tiles stream through shared-memory stages, loaded a tile
 * or more ahead (never into the stage of tile t - 1, which the P V product in
 * flight still reads), by TMA or by cp.async (wg_load below).
 *
 * Shared memory: Q and every K or V tile are rows of 128 halves stored as two
 * regions of rows x 128 bytes (head dims 0-63, 64-127), each row's eight
 * 16-byte chunks permuted as wgmma's 128-byte swizzle expects (chunk c of row r
 * at c ^ (r % 8)); regions are 1024-byte aligned. Descriptors (PTX ISA,
 * "matrix descriptor"): start address, leading byte offset (LBO), stride byte
 * offset (SBO), swizzle mode 1 (128 B):
 *   K (K-major):  8-row groups SBO = 1024 apart; a 16-dim step starts 32
 *                 bytes further along the row (in the second region from dim
 *                 64); LBO unused.
 *   V (MN-major): rows = keys, 8-key groups SBO = 1024 apart, the two 64-dim
 *                 regions LBO = BN * 128 apart; a 16-key step starts 2048
 *                 bytes on.
 * Register layouts (wgmma m64nNk16, warp w of the warpgroup, g = lane / 4,
 * q = lane % 4): accumulator d[4i..4i+3] = rows 16w + g (d0, d1) and 16w + g
 * + 8 (d2, d3), columns 8i + 2q, +1; the A fragment of a 16-wide k step is
 * mma.m16n8k16's A layout on rows 16w..16w+15, so S's d[8j..8j+7] packed to
 * f16 pairs are P's A fragment for keys 16j..16j+15.
 *
 * A host build that defines CAKE_CUDA_EMULATE supplies the PTX wrappers
 * (tests/test_attention_emulated.cpp emulates wgmma, descriptors and swizzle
 * included, and runs this kernel on the CPU). */
#ifndef CAKE_CUDA_ATTENTION_WGMMA_CUH
#define CAKE_CUDA_ATTENTION_WGMMA_CUH

#include "backend/cuda/attention_kernels.cuh"

#include <cuda.h> /* CUtensorMap */

/* Device code for wgmma exists only in sm_90a builds (CMake's "90a"). */
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(CAKE_CUDA_EMULATE)
#define CAKE_ATTN_WGMMA_BODY 1
#endif

namespace cake_attn {

constexpr int WG_HD = 128; /* the one head size it takes */
constexpr int WG_BM = 128; /* queries per block: 2 warpgroups x 64 */
constexpr int WG_THREADS = 256;
constexpr int WG_Q_BYTES = WG_BM * WG_HD * 2;

/* How K/V tiles reach shared memory: cp.async by every thread, then the proxy
 * fence that makes them visible to wgmma (the PTX memory model asks for it);
 * or TMA (cp.async.bulk.tensor, one thread, completion on an mbarrier per
 * stage; the tensor copy engine writes through the async proxy, as wgmma
 * reads, and swizzles by itself), issued by thread 0 either between
 * block-wide barriers or, decoupled, as soon as every warp has released the
 * stage (an "empty" mbarrier per stage) with no block-wide barrier at all: the
 * warpgroups then drift up to a tile apart, so that one's softmax can run
 * while the other's products do. */
enum wg_load { WG_LOAD_CP_ASYNC, WG_LOAD_TMA, WG_LOAD_TMA_DECOUPLED };

/* A kernel variant: key tile width BN, K/V stages in shared memory, how tiles
 * are loaded, how many tiles ahead, and ping-pong: the two warpgroups take
 * turns issuing their products (FlashAttention-3's scheduling), so that one's
 * softmax runs while the other's products keep the tensor cores busy, instead
 * of both waiting for the same tile and issuing together. */
template <int BN_, int STAGES_, int LOAD_, int AHEAD_ = STAGES_ - 2, bool PINGPONG_ = false>
struct wg_cfg {
    static constexpr int BN = BN_, STAGES = STAGES_, LOAD = LOAD_;
    static constexpr bool PINGPONG = PINGPONG_;
    static constexpr int AHEAD = AHEAD_;        /* tiles loaded ahead of the one computed */
    static constexpr int TILE = BN * WG_HD * 2; /* bytes of one K or V tile */
    static constexpr size_t SMEM = 1024 /* alignment slack */ + WG_Q_BYTES +
                                   (size_t)STAGES * 2 * (size_t)TILE + 16 * STAGES /* mbarriers */;
    static_assert(SMEM <= 232448, "over the H100's 227 KB per block");
    static_assert(AHEAD >= 1 && STAGES >= AHEAD + 2,
                  "the P V product in flight holds the previous tile's stage");
    static_assert(!PINGPONG || LOAD == WG_LOAD_TMA_DECOUPLED,
                  "ping-pong needs warpgroups free of block-wide barriers");
};
/* The variants, as CAKE_CUDA_WGMMA names them (see attention.cu). */
using wg_bn128_free = wg_cfg<128, 3, WG_LOAD_TMA_DECOUPLED, 1>; /* the default */
using wg_bn128_pingpong = wg_cfg<128, 3, WG_LOAD_TMA_DECOUPLED, 1, true>;
using wg_bn128_tma = wg_cfg<128, 3, WG_LOAD_TMA>;
using wg_bn128 = wg_cfg<128, 3, WG_LOAD_CP_ASYNC>; /* where no tensor map can be made */
using wg_bn64_tma = wg_cfg<64, 4, WG_LOAD_TMA>;
using wg_bn64 = wg_cfg<64, 4, WG_LOAD_CP_ASYNC>;

/* Byte offset of 16-byte chunk c (0..15) of row r in a swizzled Q, K or V
 * buffer of `rows` rows. */
__host__ __device__ constexpr int wg_chunk_offset(int rows, int r, int c) {
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

/* A shared-memory matrix descriptor with 128-byte swizzle. */
__host__ __device__ constexpr uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((lbo & 0x3FFFF) >> 4) << 16 |
           (uint64_t)((sbo & 0x3FFFF) >> 4) << 32 | 1ull << 62;
}

#ifndef CAKE_CUDA_EMULATE
__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Named barrier `id` (1-15; __syncthreads has 0) of `count` threads: sync
 * waits until `count` have arrived, itself included; arrive does not wait. */
__device__ __forceinline__ void named_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ int warp_uniform(int v) {
    return __shfl_sync(0xffffffffu, v, 0);
}
/* Makes this thread's generic-proxy writes to shared memory (cp.async, st)
 * visible to wgmma's operand reads (the async proxy). */
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
/* mbarriers (in shared memory) and the TMA tensor load. */
__device__ __forceinline__ void mbar_init(uint64_t *bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/* One arrival that also expects `bytes` of transfers before the phase ends. */
__device__ __forceinline__ void mbar_expect_tx(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
/* Waits until the phase of parity `parity` has completed. A wait of over
 * ~1 s (a copy that never arrives) traps, so that the launch fails with an
 * error instead of hanging the GPU. */
__device__ __forceinline__ void mbar_wait(uint64_t *bar, int parity) {
    const long long t0 = clock64();
    for (;;) {
        uint32_t done;
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(smem_addr(bar)), "r"(parity)
                     : "memory");
        if (done) return;
        if (clock64() - t0 > 2000000000ll) __trap();
    }
}
/* The box of `map` at coordinates (c0, c1, c2) into dst, completing on bar. */
__device__ __forceinline__ void tma_load_3d(void *dst, const CUtensorMap *map, int c0, int c1,
                                            int c2, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(smem_addr(dst)),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2),
                 "r"(smem_addr(bar))
                 : "memory");
}
/* Keeps the compiler from moving accesses of registers that an in-flight
 * wgmma reads or writes across the fence/commit/wait points. */
template <int N> __device__ __forceinline__ void wg_pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void wg_pin(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) asm volatile("" : "+r"(r[i][j])::"memory");
}

/* D (+)= A B for one m64nNk16 step (N = 64 or 128 by D's size): A in
 * registers, B in shared memory, K-major (TRANS_B 0) or MN-major (TRANS_B 1,
 * "transposed B"); accumulate 0 overwrites D. */
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

#endif

/* The stream schedule (the kernel's stream_tiles > 0; decoupled TMA loads
 * only). The launch's work is one sequence of key tiles: its items (query
 * block, head), query blocks last first and heads fastest as the grid takes
 * them, each item's tiles from key 0. Block g of gridDim.x takes the g-th of
 * equal runs of it, so that every block has the same number of tiles however
 * long the items are (a grid of key ranges rounds up to whole waves of
 * blocks), and one block walks item after item with its K/V pipeline kept
 * full across them (a grid block starts its pipeline empty). An item cut
 * between blocks is merged by the last of them to finish, from partials in two
 * slots per block: slot 0 for its run's first item, 1 for its last. Such an
 * item is the last of at most one run that it starts inside of, or the first
 * of the one it starts, so its first part's block and slot name its counter:
 * 2 per block. */
struct wg_item {
    int mi, h;       /* query block mi (last first: m0 = (blocks - 1 - mi) WG_BM), head h */
    int tile, tiles; /* the next key tile, and the item's tile count */
};
/* Query block mi's first query, and its query count. */
__host__ __device__ inline int wg_qblock_m0(int mi, int n) {
    return ((n + WG_BM - 1) / WG_BM - 1 - mi) * WG_BM;
}
__host__ __device__ inline int wg_qblock_rows(int m0, int n) {
    return n - m0 < WG_BM ? n - m0 : WG_BM;
}
__host__ __device__ inline int wg_item_tiles(int mi, int n, int pos0, int bn) {
    const int m0 = wg_qblock_m0(mi, n);
    return (pos0 + m0 + wg_qblock_rows(m0, n) + bn - 1) / bn;
}
/* The launch's tiles: the stream's length. */
__host__ __device__ inline int wg_stream_tiles(int n, int pos0, int n_heads, int bn) {
    int total = 0;
    for (int mi = 0; mi < (n + WG_BM - 1) / WG_BM; mi++)
        total += n_heads * wg_item_tiles(mi, n, pos0, bn);
    return total;
}
/* Where run g of `runs` over `total` tiles starts, and the run holding tile t. */
__host__ __device__ inline int wg_run_start(int g, int total, int runs) {
    const int per = total / runs, rem = total % runs;
    return g * per + (g < rem ? g : rem);
}
__device__ inline int wg_run_of(int t, int total, int runs) {
    const int per = total / runs, rem = total % runs, big = rem * (per + 1);
    return t < big ? t / (per + 1) : rem + (t - big) / per;
}
/* The item and tile of stream tile t, and the step to the next tile. */
__device__ inline wg_item wg_item_at(int t, int n, int pos0, int n_heads, int bn) {
    for (int mi = 0;; mi++) {
        const int tiles = wg_item_tiles(mi, n, pos0, bn);
        if (t < n_heads * tiles) return wg_item{mi, t / tiles, t % tiles, tiles};
        t -= n_heads * tiles;
    }
}
__device__ inline void wg_next_tile(wg_item &c, int n, int pos0, int n_heads, int bn) {
    if (++c.tile < c.tiles) return;
    c.tile = 0;
    if (++c.h < n_heads) return;
    c.h = 0;
    c.tiles = wg_item_tiles(++c.mi, n, pos0, bn);
}

/* Grid (stream_tiles == 0): (n_heads, ceil(n / WG_BM), n_splits), as
 * attn_mma_kernel's, arguments and output as its (split_len a multiple of
 * C::BN). Stream (stream_tiles = wg_stream_tiles(...) > 0, decoupled TMA
 * variants): (runs, 1, 1), partials in `part` at [block][slot][row], and
 * counters likewise [block][slot]. Block WG_THREADS, dynamic smem C::SMEM. With TMA loads,
 * tm_k and tm_v map the K and V caches as (head dim, KV head, position) with
 * boxes of (64, 1, BN) and the 128-byte swizzle (make_kv_map in attention.cu);
 * other variants ignore them. */
template <typename OutT, typename C>
__global__ void __launch_bounds__(WG_THREADS, 1)
    attn_wgmma_kernel(const __half *__restrict__ q, const __half *__restrict__ kc,
                      const __half *__restrict__ vc, OutT *__restrict__ out,
                      float *__restrict__ part, int *__restrict__ counters, int n, int pos0,
                      int n_heads, int n_kv_heads, float scale_log2, int split_len,
                      int stream_tiles, const __grid_constant__ CUtensorMap tm_k,
                      const __grid_constant__ CUtensorMap tm_v) {
#ifdef CAKE_ATTN_WGMMA_BODY
    constexpr int HD = WG_HD, CH = HD / 8, BN = C::BN, NT = BN / 8, DT = HD / 8;
    constexpr int STAGES = C::STAGES, AHEAD = C::AHEAD, TILE = C::TILE;
    constexpr int LOADS = BN * CH / WG_THREADS; /* 16-byte chunks per thread per K (or V) tile */
    extern __shared__ uint4 smem_u4[];
    /* Swizzle atoms are 1024 bytes: align the buffers to that. */
    uint8_t *raw = reinterpret_cast<uint8_t *>(smem_u4);
    uint8_t *sQ = raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u);
    uint8_t *sKV = sQ + WG_Q_BYTES; /* stage s: K at 2 s TILE, V after it */

    /* wg from lane 0: the compiler then knows that branches on it do not
     * diverge within a warp, and keeps the products in flight across them
     * (else ptxas serialises them: its warning C7520). */
    const int tid = threadIdx.x, wg = warp_uniform(tid >> 7), wl = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const bool stream = C::LOAD == WG_LOAD_TMA_DECOUPLED && stream_tiles > 0;
    const int group = n_heads / n_kv_heads;
    const size_t q_stride = (size_t)n_heads * HD, kv_stride = (size_t)n_kv_heads * HD;

    /* This block's run of key tiles: a range of one item (grid), or its share
     * of the stream; `item` is where the next segment (an item's tiles within
     * the run) starts. */
    wg_item item;
    int run0 = 0, run_len;
    if (stream) {
        run0 = wg_run_start(blockIdx.x, stream_tiles, gridDim.x);
        run_len = wg_run_start(blockIdx.x + 1, stream_tiles, gridDim.x) - run0;
        item = wg_item_at(run0, n, pos0, n_heads, BN);
    } else {
        const attn_block blk = attn_block_range(WG_BM, BN, n, pos0, split_len);
        if (blk.tile0 >= blk.tile1)
            return; /* a range past this block's keys: the combine skips it */
        item = wg_item{(int)blockIdx.y, (int)blockIdx.x, blk.tile0, (blk.kv_len + BN - 1) / BN};
        run_len = blk.tile1 - blk.tile0;
    }
    /* The segment's query block and head; the cp.async loads take the first
     * segment's (their variants run grids: one segment per block). */
    int m0, rows, h;
    auto enter_item = [&] {
        m0 = wg_qblock_m0(item.mi, n);
        rows = wg_qblock_rows(m0, n);
        h = item.h;
    };
    enter_item();
    const int kv_len = pos0 + m0 + rows; /* the first segment's, for the cp.async loads */

    /* Q, swizzled; rows past the batch are zero. */
    auto load_q = [&] {
        for (int c = tid; c < WG_BM * CH; c += WG_THREADS) {
            const int r = c / CH, cc = c % CH;
            uint8_t *dst = sQ + wg_chunk_offset(WG_BM, r, cc);
            if (r < rows)
                cp_async16(dst, q + (size_t)(m0 + r) * q_stride + (size_t)h * HD + cc * 8);
            else
                *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
        }
    };
    load_q();
    /* This thread's K/V chunks: the same rows and columns of every tile. */
    int ld_row[LOADS], ld_off[LOADS];
#pragma unroll
    for (int i = 0; i < LOADS; i++) {
        const int c = tid + i * WG_THREADS;
        ld_row[i] = c / CH;
        ld_off[i] = wg_chunk_offset(BN, c / CH, c % CH);
    }
    const __half *kbase = kc + (size_t)(h / group) * HD + (tid % CH) * 8;
    const __half *vbase = vc + (size_t)(h / group) * HD + (tid % CH) * 8;
    static_assert(WG_THREADS % CH == 0, "a thread keeps its column across its chunks");
    /* K/V tile `tile` into stage `st`. Keys at or past kv_len are zero (masked
     * out of the softmax, but 0 x a NaN in V would poison O). */
    auto load_kv = [&](int tile, int st) {
        uint8_t *dk = sKV + (size_t)st * 2 * TILE, *dv = dk + TILE;
#pragma unroll
        for (int i = 0; i < LOADS; i++) {
            const int j = tile * BN + ld_row[i];
            if (j < kv_len) {
                cp_async16(dk + ld_off[i], kbase + (size_t)j * kv_stride);
                cp_async16(dv + ld_off[i], vbase + (size_t)j * kv_stride);
            } else {
                *reinterpret_cast<uint4 *>(dk + ld_off[i]) = make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4 *>(dv + ld_off[i]) = make_uint4(0, 0, 0, 0);
            }
        }
    };
    /* TMA: a "full" mbarrier per stage, armed with the tile's bytes by thread
     * 0, which issues its copies. Tile i of the run (its i-th) goes to stage i
     * % STAGES, whose (i / STAGES)-th phase it completes: its waiters ask for
     * parity (i / STAGES) & 1. Decoupled, an "empty" mbarrier per stage as
     * well, which each warp arrives at once done with the stage's tile.
     * Thread 0 walks the run's tiles ahead of the computation with its own
     * cursor, across items. */
    uint64_t *full = reinterpret_cast<uint64_t *>(sKV + (size_t)STAGES * 2 * TILE);
    uint64_t *empty = full + STAGES;
    wg_item ahead = item;
    int issued = 0;
    auto issue_tma = [&] {
        uint64_t *bar = &full[issued % STAGES];
        uint8_t *dk = sKV + (size_t)(issued % STAGES) * 2 * TILE, *dv = dk + TILE;
        const int kvh = ahead.h / group, key = ahead.tile * BN;
        mbar_expect_tx(bar, 2 * TILE);
        tma_load_3d(dk, &tm_k, 0, kvh, key, bar);
        tma_load_3d(dk + BN * 128, &tm_k, 64, kvh, key, bar);
        tma_load_3d(dv, &tm_v, 0, kvh, key, bar);
        tma_load_3d(dv + BN * 128, &tm_v, 64, kvh, key, bar);
        if (++issued < run_len) wg_next_tile(ahead, n, pos0, n_heads, BN);
    };
    if constexpr (C::LOAD != WG_LOAD_CP_ASYNC) {
        if (tid == 0) {
            for (int st = 0; st < STAGES; st++) {
                mbar_init(&full[st], 1);
                mbar_init(&empty[st], WG_THREADS / 32);
            }
            while (issued < AHEAD && issued < run_len) issue_tma();
        }
        cp_async_commit(); /* Q */
        cp_async_wait<0>();
        fence_proxy_async(); /* Q, for wgmma */
        __syncthreads();     /* Q in; the mbarriers initialised */
    } else {
        /* cp.async groups: Q with the first tile, then one per tile (empty
         * past the end), so that waiting for all but the newest AHEAD - 1
         * groups always means "tile it is in". */
#pragma unroll
        for (int a = 0; a < AHEAD; a++) {
            if (a < run_len) load_kv(item.tile + a, a);
            cp_async_commit();
        }
    }

    uint32_t qa[HD / 16][4]; /* Q as A fragments, one per 16-dim step */
    float s[NT * 4];         /* S of the current tile, then its exponents */
    uint32_t pa[BN / 16][4]; /* P of the previous tile, f16 A fragments */
    float o[DT * 4];
    /* This thread's rows (within the block): 64 wg + 16 wl + g (+ 8). */
    const int r0 = wg * 64 + wl * 16 + g;

    for (int seq = 0; seq < run_len;) { /* a segment: item's tiles [tile0, tile1) */
        const int tile0 = item.tile, tile1 = min(item.tiles, tile0 + run_len - seq), seq0 = seq;
        if (seq0 > 0) { /* the stream's next item */
            enter_item();
            __syncthreads(); /* every warp is done with the last item's Q and merge */
            load_q();
            cp_async_commit();
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();
        }
        const int pq0 = pos0 + m0 + r0, pq1 = pq0 + 8;
#pragma unroll
        for (int i = 0; i < DT * 4; i++) o[i] = 0.0f;
        float m_0 = -INFINITY, m_1 = -INFINITY, l_0 = 0.0f, l_1 = 0.0f;

        /* Ping-pong: named barrier 1 + w is warpgroup w's turn to issue; each
         * hands the turn to the other once its products are issued. Warpgroup
         * 0 starts, and warpgroup 1 does not hand over after the segment's
         * last tile, so that every arrival has its wait. */
        if constexpr (C::PINGPONG)
            if (wg == 1) named_bar_arrive(1, WG_THREADS);

        for (int it = tile0; it < tile1; it++, seq++) {
            const int stage = seq % STAGES;
            if constexpr (C::LOAD == WG_LOAD_TMA_DECOUPLED) {
                /* Tile seq + AHEAD goes where tile seq + AHEAD - STAGES was,
                 * once every warp has released that one (in its iteration
                 * seq + AHEAD - STAGES + 1 <= seq - 1, or the end of its
                 * segment). */
                const int prev = seq + AHEAD - STAGES;
                if (tid == 0 && seq + AHEAD < run_len) {
                    if (prev >= 0) mbar_wait(&empty[prev % STAGES], (prev / STAGES) & 1);
                    issue_tma();
                }
                mbar_wait(&full[stage], (seq / STAGES) & 1); /* tile it is in */
            } else if constexpr (C::LOAD == WG_LOAD_TMA) {
                __syncthreads(); /* all done with tile it - 2, whose stage is refilled */
                if (tid == 0 && seq + AHEAD < run_len) issue_tma();
                mbar_wait(&full[stage], (seq / STAGES) & 1); /* tile it is in */
            } else {
                cp_async_wait<AHEAD - 1>(); /* tile it is in */
                fence_proxy_async();        /* ... and visible to wgmma */
                __syncthreads();            /* everyone's part of it; all done with tile it - 2 */
                if (seq + AHEAD < run_len) load_kv(it + AHEAD, (seq + AHEAD) % STAGES);
                cp_async_commit();
            }
            if (it == tile0) {
                /* ldmatrix rows: this warp's 16, chunk (lane >> 4) of each 16-dim step */
                const int r = wg * 64 + wl * 16 + (lane & 15);
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++)
                    ldsm_x4(qa[kk], sQ + wg_chunk_offset(WG_BM, r, 2 * kk + (lane >> 4)));
            }
            const uint32_t k_addr = smem_addr(sKV + (size_t)stage * 2 * TILE);
            const uint32_t v_prev =
                smem_addr(sKV + (size_t)((seq + STAGES - 1) % STAGES) * 2 * TILE + TILE);

            /* Issue S = Q K^T, then (from the second tile) O += P V of the
             * previous tile, as two groups. */
            if constexpr (C::PINGPONG) named_bar_sync(1 + wg, WG_THREADS);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) /* 32 bytes on per step, a region per 64 dims */
                wgmma_rs<0>(s, qa[kk],
                            wg_desc(k_addr + (kk >> 2) * BN * 128 + (kk & 3) * 32, 16, 1024),
                            kk > 0);
            wg_commit();
            if (it > tile0) {
#pragma unroll
                for (int kj = 0; kj < BN / 16; kj++)
                    wgmma_rs<1>(o, pa[kj], wg_desc(v_prev + kj * 2048, BN * 128, 1024), 1);
                wg_commit();
                if constexpr (C::PINGPONG)
                    if (wg == 0 || it + 1 < tile1) named_bar_arrive(2 - wg, WG_THREADS);
                wg_wait<1>(); /* S is done; P V may still run */
            } else {
                if constexpr (C::PINGPONG)
                    if (wg == 0 || it + 1 < tile1) named_bar_arrive(2 - wg, WG_THREADS);
                wg_wait<0>();
            }
            wg_pin(s);

            /* Mask (query at position pq sees keys j <= pq; only tiles reaching
             * past the block's first query need the test), row maxima. */
            const int kbeg = it * BN;
            const bool need_mask = kbeg + BN - 1 > pos0 + m0;
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                if (need_mask) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int j = kbeg + nt * 8 + 2 * tq + (e & 1);
                        if (j > ((e >> 1) ? pq1 : pq0)) s[nt * 4 + e] = -INFINITY;
                    }
                }
                mx0 = fmaxf(mx0, fmaxf(s[nt * 4 + 0], s[nt * 4 + 1]));
                mx1 = fmaxf(mx1, fmaxf(s[nt * 4 + 2], s[nt * 4 + 3]));
            }
            /* The 4 threads of a quad hold the same two rows. */
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m_0, mx0 * scale_log2), mn1 = fmaxf(m_1, mx1 * scale_log2);
            /* A row that has seen no key yet keeps max -inf (see attn_mma_kernel). */
            const float ref0 = mn0 == -INFINITY ? 0.0f : mn0, ref1 = mn1 == -INFINITY ? 0.0f : mn1;
            const float a0 = exp2f(m_0 - ref0), a1 = exp2f(m_1 - ref1);
            m_0 = mn0;
            m_1 = mn1;
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                s[nt * 4 + 0] = exp2f(fmaf(s[nt * 4 + 0], scale_log2, -ref0));
                s[nt * 4 + 1] = exp2f(fmaf(s[nt * 4 + 1], scale_log2, -ref0));
                s[nt * 4 + 2] = exp2f(fmaf(s[nt * 4 + 2], scale_log2, -ref1));
                s[nt * 4 + 3] = exp2f(fmaf(s[nt * 4 + 3], scale_log2, -ref1));
                sum0 += s[nt * 4 + 0] + s[nt * 4 + 1];
                sum1 += s[nt * 4 + 2] + s[nt * 4 + 3];
            }
            l_0 = l_0 * a0 + sum0;
            l_1 = l_1 * a1 + sum1;

            /* O (with the previous tile's P V in it) to the new maxima, then
             * this tile's P as f16 A fragments. */
            wg_wait<0>();
            wg_pin(o);
            wg_pin(pa);
            if constexpr (C::LOAD == WG_LOAD_TMA_DECOUPLED) {
                /* This warp is done with tile seq - 1 (K in S(seq - 1), V in
                 * the P V product just waited for): its stage may be refilled. */
                if (it > tile0) {
                    __syncwarp();
                    if (lane == 0) mbar_arrive(&empty[(seq + STAGES - 1) % STAGES]);
                }
            }
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                o[dt * 4 + 0] *= a0;
                o[dt * 4 + 1] *= a0;
                o[dt * 4 + 2] *= a1;
                o[dt * 4 + 3] *= a1;
            }
#pragma unroll
            for (int kj = 0; kj < BN / 16; kj++) {
                pa[kj][0] = pack_half2(s[kj * 8 + 0], s[kj * 8 + 1]);
                pa[kj][1] = pack_half2(s[kj * 8 + 2], s[kj * 8 + 3]);
                pa[kj][2] = pack_half2(s[kj * 8 + 4], s[kj * 8 + 5]);
                pa[kj][3] = pack_half2(s[kj * 8 + 6], s[kj * 8 + 7]);
            }
        }
        /* The last tile's P V; then its stage is free (decoupled: the next
         * segment's loads wait for that). */
        {
            const int last = (seq + STAGES - 1) % STAGES;
            const uint32_t v_last = smem_addr(sKV + (size_t)last * 2 * TILE + TILE);
            wg_fence();
#pragma unroll
            for (int kj = 0; kj < BN / 16; kj++)
                wgmma_rs<1>(o, pa[kj], wg_desc(v_last + kj * 2048, BN * 128, 1024), 1);
            wg_commit();
            wg_wait<0>();
            wg_pin(o);
            if constexpr (C::LOAD == WG_LOAD_TMA_DECOUPLED) {
                __syncwarp();
                if (lane == 0) mbar_arrive(&empty[last]);
            }
        }

        /* Whole (a grid's unsplit block, or an item inside the run): the
         * normalised output. Otherwise the rows' partials: at (query, head,
         * range) in a grid, in slot (seq0 > 0) of this block in the stream. */
        const bool whole = stream ? tile0 == 0 && tile1 == item.tiles : gridDim.z == 1;
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float sum = hf ? l_1 : l_0;
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int r = r0 + 8 * hf;
            if (r >= rows) continue;
            if (whole) {
                const float inv = 1.0f / sum;
                OutT *orow = out + (size_t)(m0 + r) * q_stride + (size_t)h * HD;
#pragma unroll
                for (int dt = 0; dt < DT; dt++)
                    cake_store2(orow + dt * 8 + 2 * tq, o[dt * 4 + 2 * hf] * inv,
                                o[dt * 4 + 2 * hf + 1] * inv);
            } else {
                const size_t at = stream
                                      ? ((size_t)(blockIdx.x * 2 + (seq0 > 0)) * WG_BM + r)
                                      : ((size_t)(m0 + r) * n_heads + h) * gridDim.z + blockIdx.z;
                float *pp = part + at * (HD + 2);
#pragma unroll
                for (int dt = 0; dt < DT; dt++)
                    *reinterpret_cast<float2 *>(pp + dt * 8 + 2 * tq) =
                        make_float2(o[dt * 4 + 2 * hf], o[dt * 4 + 2 * hf + 1]);
                if (tq == 0) {
                    pp[HD] = (hf ? m_1 : m_0) * 0.6931471805599453f; /* natural-log units */
                    pp[HD + 1] = sum;
                }
            }
        }
        int *last_flag = reinterpret_cast<int *>(smem_u4); /* sQ's, or unused: Q is in registers */
        if (!whole && !stream && counters) {
            /* The grid block's range again: kept live across the loop, it
             * cost registers. */
            attn_merge_if_last(part, out, counters, attn_block_range(WG_BM, BN, n, pos0, split_len),
                               BN, pos0, n_heads, HD, split_len, last_flag);
        } else if (!whole && stream) {
            /* The blocks whose runs hold the item's tiles; the first one's
             * part is in slot 1 unless the item starts its run. */
            const int first = run0 + seq0 - tile0; /* the item's tile 0 in the stream */
            const int b0 = wg_run_of(first, stream_tiles, gridDim.x);
            const int b1 = wg_run_of(first + item.tiles - 1, stream_tiles, gridDim.x);
            const int slot0 = first == wg_run_start(b0, stream_tiles, gridDim.x) ? 0 : 1;
            if (attn_last_arrival(counters + b0 * 2 + slot0, b1 - b0 + 1, last_flag))
                attn_merge_rows(
                    [&](int p, int r) {
                        const int slot = (b0 + p) * 2 + (p ? 0 : slot0);
                        return part + ((size_t)slot * WG_BM + r) * (HD + 2);
                    },
                    [&](int) { return b1 - b0 + 1; }, out, m0, rows, h, n_heads, HD);
        }
        item.tile = tile1;
        if (tile1 == item.tiles && seq < run_len) {
            item.tile = item.tiles - 1;
            wg_next_tile(item, n, pos0, n_heads, BN);
        }
    }
#endif
}

} // namespace cake_attn

#endif
