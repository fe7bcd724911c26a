/* A CUDA block emulator for kernel tests on machines without a GPU: kernels
 * written for CUDA (device code in a .cuh) are compiled as host C++ and run
 * here, block after block. Each CUDA thread of a block is a coroutine (its
 * own stack; a few instructions switch on x86-64, ucontext elsewhere); all
 * threads of the block run in lockstep rounds, one round per
 * synchronisation point (__syncthreads, or each half of a warp collective: a
 * lane publishes its operand, yields, reads the others', yields). The kernels'
 * control flow around those points must be uniform over the block, which the
 * lockstep needs and checks (a thread that ends early while others still sync
 * is an error). A thread may also wait for another (an mbarrier phase, a
 * named barrier) with block(), which passes no synchronisation point: it
 * gives up its turn until the round in which what it waits for has happened;
 * a round in which every thread waits is a deadlock, reported as an error.
 *
 * Include it before the kernels' header. A kernel's static __shared__ arrays
 * must be shared by the block's threads: a test that runs such kernels
 * defines __shared__ as static after the CUDA headers (blocks run one at a
 * time, so one copy is the block's). */
#ifndef CAKE_TEST_CUDA_EMULATOR_H
#define CAKE_TEST_CUDA_EMULATOR_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CAKE_CUDA_EMULATE 1

/* ---- the emulated block ---- */

namespace emu {

constexpr int MAX_THREADS = 256;
constexpr size_t STACK_BYTES = 256 * 1024;

/* What the lanes of a warp publish in a collective: addresses (ldmatrix) and
 * operands (mma) for the attention test, floats for the shuffle. */
struct warp_buf {
    const void *addr[32];
    uint32_t a[32][4], b[32][2];
    float f[32];
};

int cur;       /* the thread running now */
bool progress; /* some thread passed a synchronisation point or ended this round */
std::vector<char> stacks;
bool done[MAX_THREADS];
long yields[MAX_THREADS];
warp_buf warps[MAX_THREADS / 32];
std::function<void()> body;
uint3 tid3, bid3;
dim3 grid3, block3;

void entry();

#if defined(__x86_64__)
/* Switching threads: on x86-64, saving the callee-saved registers and the
 * stack pointer is all a switch between two calls needs. swapcontext also
 * saves the signal mask (a system call each way) and the FPU environment:
 * with it a third of the attention test took 54 s here, without 12 s. */
extern "C" void emu_switch(void **save_sp, void *to_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
void *sched_sp, *thread_sp[MAX_THREADS];

[[noreturn]] void start_thread() {
    entry();
    emu_switch(&thread_sp[cur], sched_sp); /* done: never resumed */
    abort();
}

/* A thread's first switch pops six zeroed registers and returns into
 * start_thread, with the stack aligned as at a call. */
void init_thread(int t, char *stack, size_t size) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void **sp = (void **)(top - 64);
    memset(sp, 0, 64);
    sp[6] = (void *)start_thread;
    thread_sp[t] = sp;
}
void to_sched() {
    emu_switch(&thread_sp[cur], sched_sp);
}
void to_thread(int t) {
    emu_switch(&sched_sp, thread_sp[t]);
}
#else
ucontext_t sched_ctx, thread_ctx[MAX_THREADS];

void init_thread(int t, char *stack, size_t size) {
    getcontext(&thread_ctx[t]);
    thread_ctx[t].uc_stack.ss_sp = stack;
    thread_ctx[t].uc_stack.ss_size = size;
    thread_ctx[t].uc_link = &sched_ctx;
    makecontext(&thread_ctx[t], entry, 0);
}
void to_sched() {
    swapcontext(&thread_ctx[cur], &sched_ctx);
}
void to_thread(int t) {
    swapcontext(&sched_ctx, &thread_ctx[t]);
}
#endif

void yield() {
    yields[cur]++;
    progress = true;
    to_sched();
}

/* Gives up this round's turn while waiting for another thread. */
void block() {
    to_sched();
}

/* For a collective (two yields: publish, then read), between its yields: the
 * threads [first, first + n) (a warp, a warpgroup) are all in it, none a round
 * behind or ahead (a wait let some run on). Those after this one in the round
 * order (higher numbers run first) have read already and yielded again. */
void check_in_step(int first, int n) {
    for (int t = first; t < first + n && t < (int)block3.x; t++)
        if (!done[t] && yields[t] != yields[cur] + (t > cur)) {
            fprintf(stderr, "emulator: thread %d is out of step with thread %d in a collective\n",
                    t, cur);
            abort();
        }
}

void entry() {
    body();
    done[cur] = true;
}

/* Runs body as one block of n threads; returns 0, or -1 (with a message) if
 * the threads did not pass the same number of synchronisation points or
 * deadlocked. */
int run_block(int n) {
    block3 = dim3((unsigned)n, 1, 1);
    stacks.resize((size_t)n * STACK_BYTES);
    for (int t = 0; t < n; t++) {
        done[t] = false;
        yields[t] = 0;
        init_thread(t, stacks.data() + (size_t)t * STACK_BYTES, STACK_BYTES);
    }
    /* Each round runs the threads last to first: thread 0, which issues the
     * TMA copies in the Hopper attention kernel, then sees every other
     * thread's progress up to the same synchronisation point (an mbarrier it
     * waits on has had all the round's arrivals). */
    for (int left = n; left > 0;) {
        left = 0;
        progress = false;
        for (int t = n - 1; t >= 0; t--) {
            if (done[t]) continue;
            cur = t;
            tid3 = make_uint3((unsigned)t, 0, 0);
            to_thread(t);
            progress |= done[t];
            left += !done[t];
        }
        if (left && !progress) {
            fprintf(stderr, "emulator: every thread of the block waits for another (a deadlock)\n");
            return -1;
        }
    }
    for (int t = 1; t < n; t++)
        if (yields[t] != yields[0]) {
            fprintf(stderr, "emulator: threads 0 and %d passed %ld and %ld barriers\n", t,
                    yields[0], yields[t]);
            return -1;
        }
    return 0;
}

warp_buf &my_warp() {
    return warps[cur / 32];
}
int my_lane() {
    return cur % 32;
}

} // namespace emu

#define threadIdx emu::tid3
#define blockIdx  emu::bid3
#define gridDim   emu::grid3
#define blockDim  emu::block3
#define __launch_bounds__(...)

static inline void __syncthreads() {
    emu::yield();
}

/* The lanes of a warp run in lockstep here already. */
static inline void __syncwarp(unsigned = 0xffffffffu) {}

static inline float __shfl_xor_sync(unsigned, float v, int mask) {
    emu::warp_buf &w = emu::my_warp();
    w.f[emu::my_lane()] = v;
    emu::yield();
    emu::check_in_step(emu::cur / 32 * 32, 32);
    const float r = w.f[emu::my_lane() ^ mask];
    emu::yield();
    return r;
}

/* Blocks run one at a time, and a block's threads one at a time: memory is
 * coherent and an atomic is a plain read-modify-write. */
static inline int atomicAdd(int *p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}
static inline void __threadfence() {}
static inline float __ldcg(const float *p) {
    return *p;
}
static inline float2 __ldcg(const float2 *p) {
    return *p;
}

using std::max;
using std::min;

/* The device intrinsic; declared by the CUDA headers for the host, not defined. */
extern "C" float __expf(float x) {
    return expf(x);
}

/* Test inputs: uniform in [-a, a], from a fixed xorshift sequence. */
static uint64_t rng = 88172645463325252ull;
static float uniform(float a) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return a * (2.0f * (float)(rng >> 11) / 9007199254740992.0f - 1.0f);
}

/* Runs body on every block of grid (block threads each), in the order of
 * their index or (backwards) the reverse; -1 if a block failed (run_block). */
static int run_grid(dim3 grid, int threads, bool backwards = false) {
    emu::grid3 = grid;
    const unsigned blocks = grid.x * grid.y * grid.z;
    for (unsigned i = 0; i < blocks; i++) {
        const unsigned b = backwards ? blocks - 1 - i : i;
        const unsigned x = b % grid.x, y = b / grid.x % grid.y, z = b / (grid.x * grid.y);
        emu::bid3 = make_uint3(x, y, z);
        if (emu::run_block(threads)) {
            fprintf(stderr, "block (%u, %u, %u) failed\n", x, y, z);
            return -1;
        }
    }
    return 0;
}

#endif
