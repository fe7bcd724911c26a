/* The tensor-core attention kernels, run on the CPU with emulated warps, against
 * a double-precision reference (the MMA kernel of prefill, and the SIMT kernel
 * of decode and the plain path). The GPU test (test_cuda) needs a GPU; this one
 * checks the kernels' logic (tiling, fragment layouts, masking, the online
 * softmax) on any machine with the CUDA headers, so that a kernel change is
 * tested before a GPU is at hand.
 *
 * How: attention_kernels.cuh is compiled as host C++ with CAKE_CUDA_EMULATE,
 * which leaves out its inline PTX; this file supplies cp.async, ldmatrix and
 * mma instead, on the block emulator of cuda_emulator.h (threads as coroutines
 * in lockstep, the warp shuffle). mma sums its products in f32, not in the
 * tensor cores' order, hence the tolerance rather than bit equality against
 * the GPU. */
#include "cuda_emulator.h"

/* cp.async: an immediate copy, so commit and wait have nothing to do. */
static inline void cp_async16(void *smem, const void *gmem) {
    memcpy(smem, gmem, 16);
}
static inline void cp_async_commit() {}
template <int N> static inline void cp_async_wait() {}

static inline uint16_t half_bits(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l gets
 * M_i[l/4][2(l%4)..+1] in register i, or with trans M_i[2(l%4)..+1][l/4]. */
static void ldsm(uint32_t (&r)[4], const void *p, bool trans) {
    emu::warp_buf &w = emu::my_warp();
    const int l = emu::my_lane();
    w.addr[l] = p;
    emu::yield();
    emu::check_in_step(emu::cur / 32 * 32, 32);
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {
            const __half *row = (const __half *)w.addr[8 * i + l / 4];
            lo = half_bits(row + 2 * (l % 4));
            hi = half_bits(row + 2 * (l % 4) + 1);
        } else {
            lo = half_bits((const __half *)w.addr[8 * i + 2 * (l % 4)] + l / 4);
            hi = half_bits((const __half *)w.addr[8 * i + 2 * (l % 4) + 1] + l / 4);
        }
        r[i] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    emu::yield();
}
static inline void ldsm_x4(uint32_t (&r)[4], const void *p) {
    ldsm(r, p, false);
}
static inline void ldsm_x4_trans(uint32_t (&r)[4], const void *p) {
    ldsm(r, p, true);
}

static float half_of(uint32_t reg, int which) {
    __half h;
    const uint16_t bits = (uint16_t)(which ? reg >> 16 : reg & 0xffff);
    memcpy(&h, &bits, 2);
    return __half2float(h);
}

/* mma.m16n8k16 (f16 in, f32 accumulate), layouts as in attention.cu:
 * A[r][k]: lane (r%8)*4 + (k%8)/2, register (r>=8) + 2(k>=8), half k%2;
 * B[k][n]: lane n*4 + (k%8)/2, register k>=8, half k%2;
 * C: c0,c1 = C[g][2q..+1], c2,c3 = C[g+8][2q..+1]. */
static void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::warp_buf &w = emu::my_warp();
    const int l = emu::my_lane();
    memcpy(w.a[l], a, sizeof(w.a[l]));
    w.b[l][0] = b0;
    w.b[l][1] = b1;
    emu::yield();
    emu::check_in_step(emu::cur / 32 * 32, 32);
    const int g = l / 4, q = l % 4;
    for (int e = 0; e < 4; e++) {
        const int r = g + 8 * (e >> 1), c = 2 * q + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; k++) {
            const float av =
                half_of(w.a[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2);
            const float bv = half_of(w.b[c * 4 + (k % 8) / 2][k >= 8], k % 2);
            acc += av * bv;
        }
        d[e] = acc;
    }
    emu::yield();
}

/* ---- wgmma (the Hopper kernel), emulated ----
 *
 * Shared-memory addresses are offsets into the kernels' dynamic shared memory
 * (smem_u4), so that descriptors can be decoded and the 128-byte swizzle
 * applied to them as the hardware does (XOR of address bits 4-6 with 7-9).
 * A wgmma is executed when its group is waited for, not when it is issued:
 * the latest moment the hardware may read its A registers and write its
 * accumulators, so that a kernel reading S before the wait, or overwriting P
 * while its product runs, gets wrong results here. */
namespace cake_attn {
extern uint4 smem_u4[];
} // namespace cake_attn

static inline uint32_t smem_addr(const void *p) {
    return (uint32_t)((const char *)p - (const char *)cake_attn::smem_u4);
}

struct wg_op {
    float *d;          /* the issuing thread's accumulators */
    const uint32_t *a; /* ... and A fragment (read when executed) */
    uint64_t desc_b;
    int n, trans_b, accumulate; /* N of m64nNk16; B MN-major; D += (else D =) */
};
struct wg_queue {
    std::vector<wg_op> ops;
    std::vector<size_t> group_end; /* ops.size() at each commit */
};
static wg_queue wg_queues[emu::MAX_THREADS];
static const wg_queue *wg_pub[emu::MAX_THREADS];

static inline void wg_fence() {}
static inline void fence_proxy_async() {}
template <int N> static inline void wg_pin(float (&)[N]) {}
template <int N> static inline void wg_pin(uint32_t (&)[N][4]) {}
static inline void wg_commit() {
    wg_queue &q = wg_queues[emu::cur];
    q.group_end.push_back(q.ops.size());
}
template <int TRANS_B, int ND>
static inline void wgmma_rs(float (&d)[ND], const uint32_t (&a)[4], uint64_t desc, int acc) {
    wg_queues[emu::cur].ops.push_back({d, a, desc, 2 * ND, TRANS_B, acc});
}

/* B[k][n] of a 128-byte-swizzled operand (k < 16 along K, n along N). */
static float wg_b(uint64_t desc, int trans_b, int k, int n) {
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4;
    const uint32_t lbo = (uint32_t)(desc >> 16 & 0x3FFF) << 4;
    const uint32_t sbo = (uint32_t)(desc >> 32 & 0x3FFF) << 4;
    if (desc >> 62 != 1) {
        fprintf(stderr, "emulated wgmma: only the 128-byte swizzle is emulated\n");
        abort();
    }
    uint32_t off =
        trans_b ? start + (uint32_t)(n / 64) * lbo + (uint32_t)(k / 8) * sbo +
                      (uint32_t)(k % 8) * 128 + (uint32_t)(n % 64) * 2
                : start + (uint32_t)(n / 8) * sbo + (uint32_t)(n % 8) * 128 + (uint32_t)k * 2;
    off ^= (off >> 7 & 7) << 4;
    return half_of(half_bits((const char *)cake_attn::smem_u4 + off), 0);
}

/* wgmma.wait_group N: runs this warpgroup's committed groups but the newest N. */
template <int N> static void wg_wait() {
    wg_queue &mine = wg_queues[emu::cur];
    const int wg0 = emu::cur / 128 * 128, me = emu::cur - wg0;
    wg_pub[emu::cur] = &mine;
    emu::yield();
    emu::check_in_step(wg0, 128);
    const size_t groups = mine.group_end.size();
    const size_t n_ops = groups > (size_t)N ? mine.group_end[groups - 1 - N] : 0;
    const int w = me / 32, g = me % 32 / 4, q = me % 4;
    for (size_t i = 0; i < n_ops; i++) {
        const wg_op &op = mine.ops[i];
        for (int t = 0; t < 128; t++) { /* the warpgroup issued the same thing */
            const wg_queue *o = wg_pub[wg0 + t];
            if (o->ops.size() < n_ops || o->ops[i].desc_b != op.desc_b || o->ops[i].n != op.n) {
                fprintf(stderr, "emulated wgmma: the warpgroup's threads disagree\n");
                abort();
            }
        }
        for (int e = 0; e < op.n / 2; e++) {
            const int row = g + 8 * (e % 4 >> 1), col = 8 * (e / 4) + 2 * q + (e & 1);
            float acc = op.accumulate ? op.d[e] : 0.0f;
            for (int k = 0; k < 16; k++) {
                /* A[row][k] of this warp's 16 rows: mma.m16n8k16's A layout */
                const int lane = row % 8 * 4 + k % 8 / 2, reg = (row >= 8) + 2 * (k >= 8);
                const float av = half_of(wg_pub[wg0 + w * 32 + lane]->ops[i].a[reg], k % 2);
                acc += av * wg_b(op.desc_b, op.trans_b, k, col);
            }
            op.d[e] = acc;
        }
    }
    emu::yield(); /* all have read the others' A fragments */
    mine.ops.erase(mine.ops.begin(), mine.ops.begin() + (long)n_ops);
    mine.group_end.erase(mine.group_end.begin(),
                         mine.group_end.begin() + (long)(groups - std::min(groups, (size_t)N)));
    for (size_t &end : mine.group_end) end -= n_ops;
}

/* ---- mbarriers and TMA, emulated ----
 * A TMA copy completes at once; an mbarrier is a phase bit, arrivals pending
 * and bytes pending. A wait for a phase that has not completed would never
 * end here (the copies are done when issued): it is reported as a hang. The
 * tensor map is this file's own encoding (emu_tmap) in CUtensorMap's bytes. */
#include <cuda.h>

struct emu_tmap {
    const __half *base;
    long dims[3];    /* elements: head dim, KV heads, positions */
    long strides[2]; /* elements between KV heads, between positions */
    int box[3];
};
static_assert(sizeof(emu_tmap) <= sizeof(CUtensorMap), "the map's bytes hold it");

struct emu_mbar {
    int count, pending, phase;
    long tx;
};
static std::vector<std::pair<const void *, emu_mbar>> emu_mbars;
static emu_mbar &mbar_of(const void *bar) {
    for (auto &b : emu_mbars)
        if (b.first == bar) return b.second;
    emu_mbars.push_back({bar, emu_mbar{0, 0, 0, 0}});
    return emu_mbars.back().second;
}
static void mbar_settle(emu_mbar &b) {
    emu::progress = true; /* an arrival: waiters may go on next round */
    if (b.pending == 0 && b.tx == 0) {
        b.phase ^= 1;
        b.pending = b.count;
    }
}
static inline void mbar_init(uint64_t *bar, int count) {
    mbar_of(bar) = emu_mbar{count, count, 0, 0};
}
static inline void mbar_arrive(uint64_t *bar) {
    emu_mbar &b = mbar_of(bar);
    b.pending--;
    mbar_settle(b);
}
static inline void mbar_expect_tx(uint64_t *bar, uint32_t bytes) {
    emu_mbar &b = mbar_of(bar);
    b.tx += bytes;
    b.pending--;
    mbar_settle(b);
}
/* A phase that never completes leaves every thread waiting: the emulator
 * reports the deadlock. */
static inline void mbar_wait(uint64_t *bar, int parity) {
    while (mbar_of(bar).phase == parity) emu::block();
}

/* The lanes of a warp hold the same value already. */
static inline int warp_uniform(int v) {
    return v;
}

/* Named barriers (bar.sync / bar.arrive with an id and a thread count). A
 * sync waits at least until the next round, even when its arrival completes
 * the barrier, so that all its waiters go on together. */
struct emu_named_bar {
    int arrived;
    long generation;
};
static emu_named_bar named_bars[16];
static inline void named_bar_arrive(int id, int count) {
    emu_named_bar &b = named_bars[id];
    emu::progress = true; /* waiters may go on next round */
    if (++b.arrived == count) {
        b.arrived = 0;
        b.generation++;
    }
}
static inline void named_bar_sync(int id, int count) {
    const long g = named_bars[id].generation;
    named_bar_arrive(id, count);
    do emu::block();
    while (named_bars[id].generation == g);
}
/* The box at (c0, c1, c2) into dst as 128-byte-swizzled rows; outside the
 * tensor, zeros. */
static inline void tma_load_3d(void *dst, const CUtensorMap *map, int c0, int c1, int c2,
                               uint64_t *bar) {
    emu_tmap m;
    memcpy(&m, map, sizeof(m));
    if (m.box[0] * 2 != 128 || m.box[1] != 1) {
        fprintf(stderr, "emulated TMA: only boxes of 128-byte rows are emulated\n");
        abort();
    }
    uint8_t *d = (uint8_t *)dst;
    for (int r = 0; r < m.box[2]; r++)
        for (int c = 0; c < 8; c++) {
            uint8_t chunk[16] = {0};
            const long pos = (long)c2 + r, head = c1, dim = (long)c0 + c * 8;
            if (pos < m.dims[2] && head < m.dims[1] && dim < m.dims[0])
                memcpy(chunk, m.base + pos * m.strides[1] + head * m.strides[0] + dim, 16);
            memcpy(d + r * 128 + ((c ^ (r & 7)) << 4), chunk, 16);
        }
    emu_mbar &b = mbar_of(bar);
    b.tx -= (long)m.box[2] * 128;
    mbar_settle(b);
}

#include "backend/cuda/attention_wgmma.cuh"

namespace cake_attn {
/* the MMA kernels' dynamic shared memory, and the SIMT kernel's */
alignas(1024) uint4 smem_u4[(256 * 1024) / sizeof(uint4)];
float sm[simt_smem_floats(SIMT_MAX_HD)];
} // namespace cake_attn

using namespace cake_attn;

/* ---- the check ---- */

struct problem {
    int hd, heads, kv_heads, pos0, n;
    std::vector<__half> q, k, v; /* q (n, heads, hd); k, v (pos0 + n, kv_heads, hd) */
};

static problem make_problem(int hd, int heads, int kv_heads, int pos0, int n, float q_scale) {
    problem p{hd, heads, kv_heads, pos0, n, {}, {}, {}};
    for (int i = 0; i < n * heads * hd; i++) p.q.push_back(__float2half_rn(uniform(q_scale)));
    for (int i = 0; i < (pos0 + n) * kv_heads * hd; i++) {
        p.k.push_back(__float2half_rn(uniform(1.0f)));
        p.v.push_back(__float2half_rn(uniform(1.0f)));
    }
    return p;
}

/* The WGMMA variants, as attention.cu names them. */
struct wgmma_case {
    const char *name;
    int tile;
    void (*kernel)(const __half *, const __half *, const __half *, float *, float *, int *, int,
                   int, int, int, float, int, int, const CUtensorMap, const CUtensorMap);
    bool stream; /* takes the stream schedule (decoupled TMA loads) */
};
static const wgmma_case wgmma_kernels[] = {
    {"bn128-free", 128, attn_wgmma_kernel<float, wg_bn128_free>, true},
    {"bn128-tma", 128, attn_wgmma_kernel<float, wg_bn128_tma>, false},
    {"bn128", 128, attn_wgmma_kernel<float, wg_bn128>, false},
    {"bn64-tma", 64, attn_wgmma_kernel<float, wg_bn64_tma>, false},
    {"bn64", 64, attn_wgmma_kernel<float, wg_bn64>, false},
    {"bn128-pingpong", 128, attn_wgmma_kernel<float, wg_bn128_pingpong>, true},
};

/* What make_kv_map in attention.cu encodes, in emu_tmap's form. */
static CUtensorMap emu_kv_map(const __half *cache, int kv_heads, int hd, int rows, int bn) {
    emu_tmap m{cache, {hd, kv_heads, rows}, {hd, (long)kv_heads * hd}, {64, 1, bn}};
    CUtensorMap map;
    memset(&map, 0, sizeof(map));
    memcpy(&map, &m, sizeof(m));
    return map;
}

/* How a split launch merges its key ranges: the combine kernel after it, or
 * the last block of each query block and head, with the blocks run in the
 * order of their index (the last range merges) or backwards (the first). */
enum merge_mode { COMBINE_KERNEL, MERGE_LAST, MERGE_LAST_BACKWARDS };

/* Queries [t0, t0 + n) of p (positions pos0 + t0 ...) through the MMA kernel
 * (wg NULL) or a WGMMA variant, its keys in n_splits ranges of split_len,
 * merged as `merge` says; or (runs > 0) a WGMMA variant on the stream
 * schedule, in that many blocks. */
static int launch(const problem &p, const wgmma_case *wg, int n_splits, int split_len, int t0,
                  int n, float *out, merge_mode merge = COMBINE_KERNEL, int runs = 0) {
    const int pos0 = p.pos0 + t0, heads = p.heads, kvh = p.kv_heads, hd = p.hd;
    const __half *q = p.q.data() + (size_t)t0 * heads * hd, *k = p.k.data(), *v = p.v.data();
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)hd);
    const size_t part_rows = runs ? (size_t)runs * 2 * WG_BM : (size_t)n * heads * n_splits;
    std::vector<float> part(part_rows * (hd + 2), NAN);
    float *pp = n_splits > 1 || runs ? part.data() : nullptr;
    const unsigned q_blocks = (unsigned)((n + MMA_BM - 1) / MMA_BM);
    std::vector<int> counters(runs ? (size_t)runs * 2 : (size_t)q_blocks * heads, 0);
    int *cp = merge == COMBINE_KERNEL && !runs ? nullptr : counters.data();
    const int stream_tiles = runs ? wg_stream_tiles(n, pos0, heads, wg->tile) : 0;
    if (wg) {
        const CUtensorMap tk = emu_kv_map(k, kvh, hd, pos0 + n, wg->tile);
        const CUtensorMap tv = emu_kv_map(v, kvh, hd, pos0 + n, wg->tile);
        emu::body = [=] {
            wg->kernel(q, k, v, out, pp, cp, n, pos0, heads, kvh, scale_log2, split_len,
                       stream_tiles, tk, tv);
        };
    } else if (hd == 64) {
        emu::body = [=] {
            attn_mma_kernel<64, float>(q, k, v, out, pp, cp, n, pos0, heads, kvh, scale_log2,
                                       split_len);
        };
    } else {
        emu::body = [=] {
            attn_mma_kernel<128, float>(q, k, v, out, pp, cp, n, pos0, heads, kvh, scale_log2,
                                        split_len);
        };
    }
    memset(cake_attn::smem_u4, 0xff, sizeof(cake_attn::smem_u4)); /* NaN garbage */
    const dim3 grid =
        runs ? dim3((unsigned)runs) : dim3((unsigned)heads, q_blocks, (unsigned)n_splits);
    if (run_grid(grid, wg ? WG_THREADS : MMA_WARPS * 32, merge == MERGE_LAST_BACKWARDS)) return -1;
    for (int c : counters)
        if (c) {
            fprintf(stderr, "a merge counter was left at %d\n", c);
            return -1;
        }
    for (emu_named_bar &b : named_bars)
        if (b.arrived) {
            fprintf(stderr, "a named barrier was left with %d arrivals\n", b.arrived);
            b.arrived = 0;
            return -1;
        }
    if (n_splits == 1 || merge != COMBINE_KERNEL || runs) return 0;
    emu::body = [=] { attn_combine_kernel<float>(pp, out, pos0, heads, hd, split_len, n_splits); };
    return run_grid(dim3((unsigned)n, (unsigned)heads, 1), SIMT_THREADS);
}

/* All queries of p through the SIMT kernel (decode's, and the plain path):
 * one range of every key, or (split_len > 0) ranges of split_len keys merged
 * by the combine kernel, as attention.cu launches them. */
static int launch_simt(const problem &p, int split_len, float *out) {
    const int hd = p.hd, heads = p.heads, kvh = p.kv_heads, pos0 = p.pos0, n = p.n;
    const __half *q = p.q.data(), *k = p.k.data(), *v = p.v.data();
    const float scale = 1.0f / sqrtf((float)hd);
    const int len = split_len ? split_len : pos0 + n;
    const int n_splits = (pos0 + n + len - 1) / len;
    std::vector<float> part((size_t)n * heads * n_splits * (hd + 2), NAN);
    float *pp = part.data();
    emu::body = [=] {
        attn_simt_kernel<float>(q, k, v, out, pp, pos0, heads, kvh, hd, len, n_splits, scale);
    };
    for (float &x : cake_attn::sm) x = NAN; /* garbage */
    if (run_grid(dim3((unsigned)n, (unsigned)heads, (unsigned)n_splits), SIMT_THREADS)) return -1;
    if (n_splits == 1) return 0;
    emu::body = [=] { attn_combine_kernel<float>(pp, out, pos0, heads, hd, len, n_splits); };
    return run_grid(dim3((unsigned)n, (unsigned)heads, 1), SIMT_THREADS);
}

static double max_error(const problem &p, const float *out) {
    double worst = 0;
    const int group = p.heads / p.kv_heads;
    std::vector<double> w((size_t)(p.pos0 + p.n));
    for (int t = 0; t < p.n; t++)
        for (int h = 0; h < p.heads; h++) {
            const __half *qr = p.q.data() + ((size_t)t * p.heads + h) * p.hd;
            const int keys = p.pos0 + t + 1;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j < keys; j++) {
                const __half *kr = p.k.data() + ((size_t)j * p.kv_heads + h / group) * p.hd;
                double s = 0;
                for (int d = 0; d < p.hd; d++)
                    s += (double)__half2float(qr[d]) * (double)__half2float(kr[d]);
                w[j] = s / sqrt((double)p.hd);
                mx = fmax(mx, w[j]);
            }
            for (int j = 0; j < keys; j++) sum += (w[j] = exp(w[j] - mx));
            for (int d = 0; d < p.hd; d++) {
                double o = 0;
                for (int j = 0; j < keys; j++)
                    o += w[j] * __half2float(p.v[((size_t)j * p.kv_heads + h / group) * p.hd + d]);
                const double e = fabs(o / sum - out[((size_t)t * p.heads + h) * p.hd + d]);
                worst = isnan(e) ? INFINITY : fmax(worst, e);
            }
        }
    return worst;
}

/* `test_attention_emulated PART N` runs every Nth (kernel, case) job from
 * job PART on: ctest runs the parts side by side (the whole takes ~2 min). */
int main(int argc, char **argv) {
    const int part = argc == 3 ? atoi(argv[1]) : 0, n_parts = argc == 3 ? atoi(argv[2]) : 1;
    if (argc != 1 && (argc != 3 || n_parts < 1 || part < 0 || part >= n_parts)) {
        fprintf(stderr, "usage: %s [PART N_PARTS]\n", argv[0]);
        return 2;
    }
    int job = 0;
    struct {
        int hd, heads, kv, pos0, n;
        float q_scale;
        int n_splits, split_len; /* key ranges (1: none) */
    } cases[] = {
        {128, 4, 1, 0, 200, 4.0f, 1, 0},     {128, 2, 2, 100, 77, 4.0f, 1, 0},
        {128, 2, 1, 3, 1, 4.0f, 1, 0},       {128, 1, 1, 37, 300, 4.0f, 1, 0},
        {64, 4, 2, 0, 64, 4.0f, 1, 0},       {64, 3, 3, 63, 65, 8.0f, 1, 0},
        {64, 2, 1, 5, 257, 4.0f, 1, 0},      {128, 2, 1, 300, 140, 4.0f, 3, 192},
        {64, 2, 2, 250, 100, 4.0f, 2, 256},  {128, 1, 1, 0, 200, 4.0f, 4, 64},
        {128, 2, 1, 200, 300, 4.0f, 2, 256}, {128, 2, 2, 1000, 77, 2.0f, 3, 384},
        {128, 1, 1, 900, 100, 4.0f, 1, 0}, /* more key tiles than stages, in one range */
    };
    int failed = 0;
    const int n_wgmma = (int)(sizeof(wgmma_kernels) / sizeof(wgmma_kernels[0]));
    for (int kernel = -1; kernel < n_wgmma; kernel++)
        for (const auto &c : cases) {
            const wgmma_case *wg = kernel >= 0 ? &wgmma_kernels[kernel] : nullptr;
            if (wg && (c.hd != WG_HD || c.split_len % wg->tile)) continue;
            if (job++ % n_parts != part) continue;
            char name[64];
            snprintf(name, sizeof(name), "%s%s", wg ? "WGMMA " : "MMA", wg ? wg->name : "");
            problem p = make_problem(c.hd, c.heads, c.kv, c.pos0, c.n, c.q_scale);
            std::vector<float> out((size_t)c.n * c.heads * c.hd, NAN);
            char what[64];
            snprintf(what, sizeof(what), "%d key range(s) of %d", c.n_splits, c.split_len);
            if (launch(p, wg, c.n_splits, c.split_len, 0, c.n, out.data())) {
                failed++;
                continue;
            }
            const double e = max_error(p, out.data());
            /* f16 P on the tensor cores: |P - f16(P)| <= 2^-11 P, so |dO| <= 2^-11 max|V|. */
            const bool ok = e <= 2e-3;
            printf("%s: %s, head_dim %d, heads %d/%d, pos0 %d, n %d, %s: max error %.3g (tol "
                   "2e-03)\n",
                   ok ? "ok" : "FAILED", name, c.hd, c.heads, c.kv, c.pos0, c.n, what, e);
            failed += !ok;

            /* Split, the blocks that merge their own ranges give the combine
             * kernel's bits, whichever block of a query block comes last (the
             * MMA kernel and the default WGMMA variant: the others' merge is
             * the same code after the same epilogue). */
            for (merge_mode m : {MERGE_LAST, MERGE_LAST_BACKWARDS}) {
                if (c.n_splits == 1 || (wg && wg != &wgmma_kernels[0])) break;
                std::vector<float> out2(out.size(), NAN);
                if (launch(p, wg, c.n_splits, c.split_len, 0, c.n, out2.data(), m)) {
                    failed++;
                    continue;
                }
                const bool same = !memcmp(out.data(), out2.data(), out.size() * sizeof(float));
                printf("%s: %s, %s, merged by the %s block: the combine kernel's bits\n",
                       same ? "ok" : "FAILED", name, what, m == MERGE_LAST ? "last" : "first");
                failed += !same;
            }

            /* The stream schedule (instead of the case's key ranges): one block
             * for all, three (items cut mid-run), and a block per tile; three
             * also in reverse order (the merging block comes first). Ping-pong
             * shares the schedule's code: three blocks only. */
            const int all_tiles = wg ? wg_stream_tiles(c.n, c.pos0, c.heads, wg->tile) : 0;
            for (int runs : {3, 1, all_tiles}) {
                if (!wg || !wg->stream || (runs != 3 && wg != &wgmma_kernels[0])) break;
                if (runs > all_tiles) continue;
                for (merge_mode m : {MERGE_LAST, MERGE_LAST_BACKWARDS}) {
                    if (m == MERGE_LAST_BACKWARDS && (runs != 3 || wg != &wgmma_kernels[0]))
                        continue;
                    std::vector<float> out2(out.size(), NAN);
                    if (launch(p, wg, 1, 0, 0, c.n, out2.data(), m, runs)) {
                        failed++;
                        continue;
                    }
                    const double e2 = max_error(p, out2.data());
                    const bool ok2 = e2 <= 2e-3;
                    printf("%s: %s, stream schedule in %d block(s)%s: max error %.3g (tol 2e-03)\n",
                           ok2 ? "ok" : "FAILED", name, runs,
                           m == MERGE_LAST_BACKWARDS ? ", run backwards" : "", e2);
                    failed += !ok2;
                }
            }

            /* Unsplit, a query's result does not depend on how the queries are
             * batched: the same queries in two launches, split at an unaligned
             * point, give the same bits. */
            if (c.n > 40 && c.n_splits == 1) {
                const int split = 37;
                std::vector<float> out2(out.size(), NAN);
                if (launch(p, wg, 1, 0, 0, split, out2.data()) ||
                    launch(p, wg, 1, 0, split, c.n - split,
                           out2.data() + (size_t)split * c.heads * c.hd)) {
                    failed++;
                    continue;
                }
                const bool same = !memcmp(out.data(), out2.data(), out.size() * sizeof(float));
                printf("%s: %s, batches of %d and %d give the same bits as one of %d\n",
                       same ? "ok" : "FAILED", name, split, c.n - split, c.n);
                failed += !same;
            }
        }

    /* The SIMT kernel: plain (one range), and split over keys for decode. */
    struct {
        int hd, heads, kv, pos0, n, split_len; /* 0: one range */
    } simt_cases[] = {
        {128, 4, 1, 0, 5, 0},     {64, 2, 2, 300, 3, 0},  {6, 2, 1, 40, 4, 0},
        {128, 2, 1, 700, 1, 256}, {64, 4, 2, 130, 8, 64}, {256, 1, 1, 20, 2, 16},
    };
    for (const auto &c : simt_cases) {
        if (job++ % n_parts != part) continue;
        problem p = make_problem(c.hd, c.heads, c.kv, c.pos0, c.n, 4.0f);
        std::vector<float> out((size_t)c.n * c.heads * c.hd, NAN);
        if (launch_simt(p, c.split_len, out.data())) {
            failed++;
            continue;
        }
        /* f32 all the way: only the order of the sums differs from the reference */
        const double e = max_error(p, out.data());
        const bool ok = e <= 1e-4;
        printf(
            "%s: SIMT, head_dim %d, heads %d/%d, pos0 %d, n %d, %s: max error %.3g (tol 1e-04)\n",
            ok ? "ok" : "FAILED", c.hd, c.heads, c.kv, c.pos0, c.n,
            c.split_len ? "key ranges (decode)" : "one range", e);
        failed += !ok;
    }
    if (failed) printf("%d check(s) failed\n", failed);
    return failed ? 1 : 0;
}
