/* The Cake loader: compute from the front, load from the back, meet in the middle.
 *
 * A prompt of N tokens is cut into chunks of C tokens. The full chunks
 * before the last prompt token, [0, L) with L = (N - 1) / C, are "loadable":
 * they may come from the store. The rest, the tail (1..C tokens, the last
 * prompt token always among them), is always computed, because its logits
 * choose the first token. Keeping the tail out of the loadable range means
 * every mode runs exactly the same forward calls on exactly the same chunks,
 * so the KV bits (and the first token's logits) are identical whichever way
 * each chunk arrived, on any backend.
 *
 * A prompt that ends on a chunk boundary is the exception: all N / C chunks
 * are loadable, and when the last one was loaded, only the last token is
 * computed again, alone, for its logits (the way vLLM treats a full
 * prefix-cache hit). A fully cached prompt then costs its loads and one
 * token, not its loads and a whole chunk. On a batch-invariant engine (the
 * CPU backend: a token's results do not depend on how many tokens share its
 * forward call) that token alone gives the bits its chunk gives, so a last
 * chunk that was computed gives the logits itself. On any other engine (the
 * GPU: cuBLAS picks its kernels by shape) the last token is computed again,
 * alone, in every mode, so that every mode takes the logits from the same
 * call; that pass also writes the token's KV with its own bits, so the
 * chunk's bits (those of the store) are saved before it and put back after
 * it, and the last chunk's write-back waits until they are back.
 *
 * The lookup. Which chunks the store holds is asked first, once. A store
 * whose lookups take longer than a chunk's compute (a remote Redis, lat=)
 * is asked on a thread of its own (lookup_call) while the compute side
 * computes chunks from the front, until it answers; the plan then starts
 * from there. When every loadable chunk is computed first, the answer is
 * not waited for: the thread is joined at the finish, and the chunks go to
 * the write-back unknown (the writer checks the store).
 *
 * Threads and ownership. The calling thread is the compute side. A request
 * starts io_depth I/O workers (threads) that live for the prefill; each owns
 * one staging buffer (aligned for O_DIRECT) into which it fetches a blob,
 * taken from the engine's pool and given back at the end (staging.h). One
 * mutex guards the per-chunk states and the statistics; a condition variable
 * tells the compute side that a load finished.
 *
 * Claiming. Every loadable chunk is in exactly one state:
 *     ABSENT    the store does not have it: compute must
 *     PRESENT   the store has it, nobody has claimed it yet
 *     FETCHING  claimed by an I/O worker, transfer in flight
 *     COPYING   fetched and verified, being copied into the KV cache
 *     LOADED    in the KV cache
 *     COMPUTING / COMPUTED  claimed by the compute side
 * A worker claims the highest PRESENT chunk (cake mode; lowest in load
 * mode), the compute side claims chunks in order 0, 1, 2, ... A chunk is
 * claimed under the mutex, so it is claimed by exactly one side. In cake mode
 * a worker leaves a chunk alone while the link model says it would arrive
 * more than one chunk's compute time after the compute side gets there: the
 * compute side would compute it anyway, and on a shared link the wasted
 * transfer would slow down the chunks above it (the transfer of a chunk that
 * compute took over runs to its end; a read cannot be recalled). Such a
 * worker re-decides whenever a load or a computed chunk changes the picture,
 * and claims freely once the compute side waits at the meet. With no rate
 * known yet (a process's first request) one transfer goes first, alone.
 *
 * The link model. Transfers in flight share the store's link, modelled as
 * processor sharing: n transfers in flight each progress at B / n, B the
 * aggregate rate. That is a bandwidth-bound link (bw=, a network) exactly, and
 * with B measured at the concurrency in use, a latency-bound device too (n
 * transfers of S bytes each taking about L: B = n S / L). Two running
 * integrals make the model exact: Σn = ∫ n dt gives the mean concurrency a
 * transfer saw, hence B = S n̄ / d from each finished one; Σ1/n = ∫ dt / n
 * gives how far a transfer in flight has got: B Δ(Σ1/n) bytes. Before the
 * first load of a request finishes, B is the store's rate in earlier requests.
 * Counting transfers as whole chunks until they finish would make the loads
 * look up to io_depth chunks slower than they are, and the meet land high.
 *
 * The meet. The compute side walks i = 0, 1, ...: a LOADED chunk is skipped,
 * an ABSENT one is computed. For a chunk the store has (PRESENT, or FETCHING
 * by a worker) it compares two estimates: c, the time to compute chunk i (its
 * FLOPs, which grow with the position, at the median speed of the engine's
 * last 5 chunks, this request's and earlier ones'), and R, the time the link
 * needs until every chunk from i up is in (from the link model: what is left
 * of the transfers in flight, plus the chunks not yet claimed). If c < R,
 * computing chunk i moves the meeting point up and shortens the whole: it
 * claims and computes it (a FETCHING chunk is taken over; its transfer is
 * discarded on arrival, the worker never touches the KV cache). Otherwise the
 * loads will be done first: this is the meet. It waits, re-deciding on every
 * load completion, but never longer than c in total, so a stalled store costs
 * at most one chunk's compute time. With no estimate at all (the first request
 * of a process), it computes: the paper's plain rule. A COPYING chunk is
 * always waited for (a copy is short and already committed).
 *
 * Turns. On an engine shared with other requests (a server's batch
 * scheduler), a chunk's compute may not start at once. Before the compute
 * side claims a chunk the store has, it waits for the engine's turn
 * (wait_turn), unclaimed and with the workers free to fetch anything, and
 * decides again when it comes; a chunk loaded meanwhile ends the wait. A
 * busy engine thus moves the meet toward more loading instead of holding a
 * claimed chunk away from the loads.
 *
 * Chunks other requests are computing. Requests that run at the same time
 * (a server's slots) may share a prefix the store lacks. With a registry of
 * promises (cake_inflight), the first request to look a chunk up promises
 * it and computes it; another that finds the promise marks the chunk
 * PROMISED: no worker claims it, and the compute side, getting there, waits
 * until the promise ends (the promiser's write-back put the chunk in the
 * store, or gave up), polling the registry. A chunk then in the store is
 * PRESENT, and the meet rule takes it from there; one that is not is
 * computed, and promised in turn (a third request waits for this one).
 * Without estimates to go by (a slot's first request), an awaited chunk is
 * loaded, not computed: computing it again is what the wait avoids. The
 * wait is bounded (about two chunks' compute time); a promise outlives
 * nothing: the write-back releases it when its chunk is written, failed or
 * dropped, and the promiser's request releases those it did not compute. A
 * request whose store lookup failed neither promises nor waits.
 *
 * Failures. A load that misses (corrupt blob, vanished file, Redis down) puts
 * its chunk back to ABSENT and the compute side computes it when it gets
 * there: holes and bad chunks are covered by compute, the output never
 * changes. The key lookup (exists) failing makes every chunk ABSENT.
 *
 * Cancellation. Once the compute side has passed every loadable chunk, no
 * worker can claim anything (nothing is PRESENT below the compute front, and
 * above it everything is done or in flight). Workers still fetching finish
 * their transfer and discard it; they are joined after the first token's
 * logits are out, so they never delay them.
 *
 * Load mode (the LMCache way) uses the same machinery: workers take PRESENT
 * chunks lowest first, and the compute side waits until no chunk is PRESENT
 * or in flight before computing what is left, in order. Compute mode never
 * looks into the store.
 *
 * Write-back. Computed full chunks that the store lacks are queued on the
 * bounded write-back queue (see writeback.c); the queue never blocks the
 * compute side.
 *
 * Cached chunks. A caller whose KV cache already holds the prompt's first
 * n_cached positions (a server slot whose last request shared the prefix)
 * says so: the full chunks among them start LOADED, are not looked up, and
 * the compute side starts right after the cached positions, inside the
 * chunk they end in (a chat's next turn computes only its new tokens): the
 * same bits as computing that chunk whole, on a batch-invariant engine (a
 * position's KV does not depend on how the prompt was split). A
 * batch-variant engine computes that chunk whole, so that its bits are
 * always those of one pass. The prompt's last token is always computed: its
 * logits choose the first token. */
#include "loader/loader.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/clock.h"
#include "util/err.h"

/* How long one wait for a turn lasts before the compute side looks whether
 * its chunk has been loaded meanwhile. */
#define TURN_POLL_NS 2000000
/* How often the compute side looks whether a chunk another request is
 * computing has reached the store, and how long it waits for one at most
 * when it cannot estimate the other's progress (no compute speed yet). */
#define AWAIT_POLL_NS 1000000
#define AWAIT_NS      2000000000ull

enum chunk_state { ABSENT, PRESENT, PROMISED, FETCHING, COPYING, LOADED, COMPUTING, COMPUTED };
/* A chunk's promise (cake_inflight): none, this request's (it must release
 * it or hand it to the write-back), or another request's that it awaited. */
enum chunk_promise { NO_PROMISE, OWN_PROMISE, AWAITED };

struct prefill_job;

typedef struct io_worker {
    struct prefill_job *j;
    int tid;
    void *buf;     /* staging buffer for one blob, owned by this worker */
    int busy;      /* a transfer is in flight */
    int chunk;     /* of that transfer */
    uint64_t t0;   /* its start */
    double sum_n0; /* the link integrals at its start */
    double sum_inv0;
} io_worker;

typedef struct {
    int tid; /* 0 = compute, 1.. = I/O worker */
    int chunk;
    const char *what;
    uint64_t t0, t1;
} trace_event;

typedef struct prefill_job {
    const cake_loader_engine *e;
    const cake_prefill_params *p;
    const cake_token *prompt;
    int n_loadable;
    int n_cached; /* chunks [0, n_cached) were in the KV cache already (LOADED) */
    int n_early;  /* chunks [n_cached, n_cached + n_early) computed while the lookup ran */
    struct lookup_call *lookup; /* the lookup on a thread of its own (see the top); NULL: none */
    int compute_from;           /* the first position the compute side computes (see the top) */
    float *last_logits;     /* where the last loadable chunk's compute puts its logits when it ends
                               the prompt (batch-invariant engines); NULL otherwise */
    int last_token_alone;   /* the prompt ends on a chunk boundary and the engine is not
                               batch-invariant: its last token is computed again in every mode */
    int deferred_writeback; /* the last chunk's write-back, until that pass is over: 0 none,
                               else known_absent + 1 */
    cake_chunk_header *expect; /* (n_loadable) the header each chunk must have */

    pthread_mutex_t mu;
    pthread_cond_t cv; /* a load finished or failed */
    enum chunk_state *state;
    uint8_t *promise;   /* enum chunk_promise per chunk */
    uint8_t *near;      /* the store's RAM tier held the chunk at lookup: its load is a
                           copy, off the link (and worth taking at once) */
    int n_promised;     /* chunks still PROMISED */
    int stop;           /* set when the compute side no longer needs loads */
    atomic_int give_up; /* set at the end: transfers still in flight leave the emulated link */
    uint64_t t_start, first_claim, last_load;
    size_t blob_size, buf_size;
    double rate_hint; /* bytes/ns the store delivered in earlier requests; 0 = unknown */

    /* The link model (see the top): transfers in flight and the integrals. */
    int link_n;           /* transfers in flight, discarded ones included */
    uint64_t link_t;      /* when the integrals were last advanced */
    double link_sum_n;    /* ∫ n dt, ns */
    double link_sum_inv;  /* ∫ dt / n while n > 0, ns */
    double rate_weighted; /* Σ S n̄ over finished transfers, bytes */
    double rate_time;     /* Σ d over finished transfers, ns */

    /* Where the compute side is, for the workers' claim decisions. */
    int front;                 /* the chunk being computed or decided on */
    uint64_t front_t0;         /* when its compute (or decision) began */
    cake_compute_speed *speed; /* the engine's memory, or own_speed when it keeps none */
    cake_compute_speed own_speed;
    double ns_per_flop; /* speed's median; 0 = unknown */
    int compute_waits;  /* the compute side waits for loads at the meet */

    cake_prefill_stats *st; /* the caller's; written until cake_prefill_finish */
    trace_event *trace;
    int n_trace, cap_trace;

    cake_prefill_params params; /* copy: the job outlives the call */
    struct io_worker *workers;
    pthread_t *threads;
    int n_started;
    int ok;
} prefill_job;

int cake_mode_parse(const char *s, cake_mode *out) {
    if (!strcmp(s, "compute"))
        *out = CAKE_MODE_COMPUTE;
    else if (!strcmp(s, "load"))
        *out = CAKE_MODE_LOAD;
    else if (!strcmp(s, "cake"))
        *out = CAKE_MODE_CAKE;
    else
        return -1;
    return 0;
}

/* The keys the queries at positions [pos0, pos0 + n) see: p + 1 each, or
 * at most `window`. */
static double keys_seen(int pos0, int n, int window) {
    const double all = (double)n * pos0 + (double)n * (n + 1) / 2;
    const int first = pos0 > window ? pos0 : window, last = pos0 + n - 1; /* p + 1 > window */
    if (!window || first > last) return all;
    const double m = last - first + 1;
    return all - (m * (first + 1) + m * (m - 1) / 2 - (double)window * m);
}

double cake_chunk_flops(const cake_hparams *hp, int pos0, int n) {
    const double q = (double)hp->n_heads * hp->head_dim, kv = (double)hp->n_kv_heads * hp->head_dim;
    /* Per token: the matmuls (q, k, v, o, gate, up, down; with experts the
     * router and the picked experts' three, and the shared expert's and its
     * gate), then attention (QK and PV) over
     * the keys 0..p for the token at position p (its window's, in the
     * layers with one). */
    const double ffns = hp->n_experts ? hp->n_experts_used : 1;
    const double per_token = 2.0 * hp->n_layers *
                             (hp->dim * (2 * q + 2 * kv) + 3.0 * hp->dim * hp->ffn_dim * ffns +
                              (double)hp->dim * hp->n_experts +
                              (3.0 * hp->shared_ffn_dim + 1) * hp->dim * (hp->shared_ffn_dim > 0));
    int windowed = 0;
    for (int l = 0; hp->sliding_window && l < hp->n_layers; l++)
        windowed += !hp->swa_pattern || l % hp->swa_pattern < hp->swa_pattern - 1;
    return n * per_token + 4.0 * q *
                               ((hp->n_layers - windowed) * keys_seen(pos0, n, 0) +
                                windowed * keys_seen(pos0, n, hp->sliding_window));
}

static void speed_add(cake_compute_speed *s, double ns_per_flop) {
    s->ns_per_flop[s->count++ % CAKE_SPEED_SAMPLES] = ns_per_flop;
}

/* The median of the samples; 0 when there are none. */
static double speed_typical(const cake_compute_speed *s) {
    const int n = s->count < CAKE_SPEED_SAMPLES ? (int)s->count : CAKE_SPEED_SAMPLES;
    double v[CAKE_SPEED_SAMPLES];
    for (int i = 0; i < n; i++) { /* insertion sort: at most 5 */
        int k = i;
        for (; k > 0 && v[k - 1] > s->ns_per_flop[i]; k--) v[k] = v[k - 1];
        v[k] = s->ns_per_flop[i];
    }
    return n ? v[n / 2] : 0;
}

/* The first position of chunk i that the compute side computes: its first,
 * or after the cached positions in the chunk they end in. */
static int chunk_start(const prefill_job *j, int i) {
    const int first = i * j->p->chunk;
    return first > j->compute_from ? first : j->compute_from;
}

/* FLOPs of computing chunk i (what of it is not cached). */
static double chunk_flops(const prefill_job *j, int i) {
    const int from = chunk_start(j, i);
    return cake_chunk_flops(j->e->hp, from, (i + 1) * j->p->chunk - from);
}

/* Expected compute time of chunk i, ns; 0 = unknown. Under the mutex. */
static double est_compute_ns(const prefill_job *j, int i) {
    return j->ns_per_flop * chunk_flops(j, i);
}

/* Records a span for --trace (under the mutex). Tracing stops quietly when out of memory. */
static void trace_add(prefill_job *j, int tid, int chunk, const char *what, uint64_t t0,
                      uint64_t t1) {
    if (!j->p->trace_path) return;
    if (j->n_trace == j->cap_trace) {
        int cap = j->cap_trace ? 2 * j->cap_trace : 64;
        trace_event *t = realloc(j->trace, (size_t)cap * sizeof(*t));
        if (!t) return;
        j->trace = t;
        j->cap_trace = cap;
    }
    j->trace[j->n_trace++] = (trace_event){tid, chunk, what, t0, t1};
}

/* Waits on the condition variable for at most ns (under the mutex). */
static void wait_ns(prefill_job *j, uint64_t ns) {
    const struct timespec ts = cake_deadline_ns(ns);
    pthread_cond_timedwait(&j->cv, &j->mu, &ts);
}

/* ---- the link model (see the top) ---- */

/* Advances the integrals to now (under the mutex). */
static void link_advance(prefill_job *j, uint64_t now) {
    if (j->link_n > 0 && now > j->link_t) {
        const double dt = (double)(now - j->link_t);
        j->link_sum_n += dt * j->link_n;
        j->link_sum_inv += dt / j->link_n;
    }
    j->link_t = now;
}

static void link_start(prefill_job *j, io_worker *w, uint64_t now) {
    link_advance(j, now);
    j->link_n++;
    w->busy = 1;
    w->t0 = now;
    w->sum_n0 = j->link_sum_n;
    w->sum_inv0 = j->link_sum_inv;
}

/* A transfer ended; one that delivered `bytes` also measures B = S n̄ / d. */
static void link_end(prefill_job *j, io_worker *w, uint64_t now, size_t bytes) {
    link_advance(j, now);
    j->link_n--;
    w->busy = 0;
    const double d = (double)(now - w->t0);
    if (bytes && d > 0) {
        j->rate_weighted += (double)bytes * (j->link_sum_n - w->sum_n0) / d;
        j->rate_time += d;
    }
}

/* B, the aggregate rate in bytes/ns; 0 when unknown. */
static double link_rate(const prefill_job *j) {
    return j->rate_time > 0 ? j->rate_weighted / j->rate_time : j->rate_hint;
}

/* Bytes still to come of worker w's transfer (under the mutex, after link_advance). */
static double link_left(const prefill_job *j, const io_worker *w, double rate) {
    const double left = (double)j->blob_size - rate * (j->link_sum_inv - w->sum_inv0);
    return left > 0 ? left : 0;
}

/* Expected time until every chunk from i up is in the cache; 0 when none is
 * pending, UINT64_MAX when there is no rate to go by. Under processor sharing
 * the last of them ends when every transfer on the link has been served up
 * to what that last one has left (or all of its bytes, when it is a chunk
 * not claimed yet). Under the mutex. */
static uint64_t remaining_load_ns(prefill_job *j, int i) {
    const double rate = link_rate(j);
    int waiting = 0, pending = 0;
    for (int k = i; k < j->n_loadable; k++) {
        waiting += j->state[k] == PRESENT;
        pending += j->state[k] == PRESENT || j->state[k] == FETCHING || j->state[k] == COPYING;
    }
    if (!pending) return 0;
    if (rate <= 0) return UINT64_MAX;
    link_advance(j, cake_now_ns());
    /* What the last chunk we need has left: a whole blob when one is unclaimed. */
    double last = waiting ? (double)j->blob_size : 0;
    for (int w = 0; w < j->n_started; w++)
        if (j->workers[w].busy && j->workers[w].chunk >= i &&
            j->state[j->workers[w].chunk] == FETCHING)
            last = fmax(last, link_left(j, &j->workers[w], rate));
    int near = 0; /* (copies: no link time) */
    for (int k = i; k < j->n_loadable; k++) near += j->state[k] == PRESENT && j->near[k];
    double bytes = (double)(waiting - near) * (double)j->blob_size;
    for (int w = 0; w < j->n_started; w++)
        if (j->workers[w].busy) bytes += fmin(link_left(j, &j->workers[w], rate), last);
    return (uint64_t)(bytes / rate);
}

/* Whether a worker should fetch chunk k now (cake mode, under the mutex): yes
 * unless the link model says it would arrive more than one chunk's compute
 * time after the compute side reaches k. Fetching it then would only take
 * link time from the chunks above it. */
static int worth_fetching(prefill_job *j, int k) {
    const double rate = link_rate(j);
    if (j->compute_waits || !j->ns_per_flop || rate <= 0) return 1;
    const uint64_t now = cake_now_ns();
    link_advance(j, now);
    /* A new transfer has the most left, so it ends when the link has served everything. */
    double bytes = (double)j->blob_size;
    for (int w = 0; w < j->n_started; w++)
        if (j->workers[w].busy) bytes += link_left(j, &j->workers[w], rate);
    const double arrival = (double)now + bytes / rate;
    double reach = (double)j->front_t0; /* when the compute side gets to k */
    for (int m = j->front; m < k; m++)
        if (j->state[m] != LOADED) reach += est_compute_ns(j, m);
    return arrival <= reach + est_compute_ns(j, k);
}

/* The next chunk for a worker to fetch; -1: nothing left to fetch, -2: nothing
 * worth fetching now (under the mutex). */
static int claim_for_load(prefill_job *j) {
    if (j->stop) return -1;
    if (j->p->mode == CAKE_MODE_LOAD) {
        for (int i = 0; i < j->n_loadable; i++)
            if (j->state[i] == PRESENT) return i;
        return -1;
    }
    /* A chunk in the store's RAM tier is a copy away: always worth it. */
    for (int i = j->n_loadable - 1; i >= 0; i--)
        if (j->state[i] == PRESENT && j->near[i]) return i;
    for (int i = j->n_loadable - 1; i >= 0; i--)
        if (j->state[i] == PRESENT) {
            /* No rate to go by yet (a process's first request): one transfer
             * until it tells how fast the link is, so that on a slow link
             * the top chunk does not share it with io_depth - 1 others. */
            if (link_rate(j) <= 0 && j->link_n > 0) return -2;
            return worth_fetching(j, i) ? i : -2;
        } else if (j->state[i] == COMPUTING || j->state[i] == COMPUTED)
            break;
    /* Chunks another request is computing may come in yet (see the top). */
    return j->n_promised ? -2 : -1;
}

void cake_chunk_error(char *out, size_t n, int index, const char *why) {
    if (!why[0])
        snprintf(out, n, "chunk %d: gone since the lookup", index);
    else if (!strncmp(why, "chunk ", 6))
        snprintf(out, n, "%s", why);
    else
        snprintf(out, n, "chunk %d: %s", index, why);
}

static void *io_worker_main(void *arg) {
    io_worker *w = arg;
    prefill_job *j = w->j;
    char err[256];
    pthread_mutex_lock(&j->mu);
    for (;;) {
        int i = claim_for_load(j);
        if (i == -1) break;
        if (i == -2) { /* re-decide when a load or a computed chunk changes the picture */
            wait_ns(j, (uint64_t)est_compute_ns(j, j->front) / 2 + 5000000);
            continue;
        }
        j->state[i] = FETCHING;
        const uint64_t t0 = cake_now_ns();
        w->chunk = i;
        const int near = j->near[i]; /* (a copy from RAM: not on the link, not measured) */
        if (!near) link_start(j, w, t0);
        if (!j->first_claim) j->first_claim = t0;
        pthread_mutex_unlock(&j->mu);

        size_t len = 0;
        int rc = cake_store_get_verified_until(j->p->store, &j->expect[i], w->buf, j->buf_size,
                                               &len, &j->give_up, err, sizeof(err));
        const uint64_t t1 = cake_now_ns();

        pthread_mutex_lock(&j->mu);
        if (!near) link_end(j, w, t1, rc == 0 ? len : 0);
        trace_add(j, w->tid, i, rc == 0 ? "load" : "load failed", t0, t1);
        /* the compute side took it over meanwhile (or the request ended:
         * gave up) */
        if (j->state[i] != FETCHING || atomic_load(&j->give_up)) {
            j->st->chunks_discarded++;
            pthread_cond_broadcast(&j->cv);
            continue;
        }
        if (rc != 0) {
            j->state[i] = ABSENT; /* compute covers it */
            j->st->chunks_corrupt++;
            if (!j->st->store_error[0])
                cake_chunk_error(j->st->store_error, sizeof(j->st->store_error), i, err);
            pthread_cond_broadcast(&j->cv);
            continue;
        }
        j->state[i] = COPYING;
        pthread_mutex_unlock(&j->mu);

        /* The chunk's positions belong to this worker now: no lock needed. */
        int irc =
            j->e->install(j->e->self, w->buf, &j->expect[i], i * j->p->chunk, err, sizeof(err));
        const uint64_t t2 = cake_now_ns();

        pthread_mutex_lock(&j->mu);
        trace_add(j, w->tid, i, "copy", t1, t2);
        if (irc == 0) {
            j->state[i] = LOADED;
            j->st->chunks_loaded++;
            j->st->bytes_loaded += len;
            j->last_load = t2;
        } else {
            j->state[i] = ABSENT; /* shape mismatch cannot pass verification; be safe anyway */
            j->st->chunks_corrupt++;
        }
        pthread_cond_broadcast(&j->cv);
    }
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

/* At an awaited chunk (another request computed it) when the meet rule has
 * no estimate to go by: wait for its load, for at most one chunk's compute
 * time (AWAIT_NS when that is unknown). */
static uint64_t await_load_budget(uint64_t est_compute_ns, uint64_t waited_ns) {
    const uint64_t cap = est_compute_ns ? est_compute_ns : AWAIT_NS;
    return waited_ns < cap ? cap - waited_ns : 0;
}

/* At chunk i, which the store has (PRESENT, or FETCHING by a worker): how
 * long the compute side should wait for the loads instead of computing it;
 * 0 = compute it now. Computing chunk i pays off only if it takes less than
 * what the workers still have to load from i up (they would load chunk i too
 * meanwhile); otherwise the loads finish first. The wait is re-decided on
 * every wake-up and never exceeds one chunk's compute time in total, so a
 * stalled store costs at most that. Under the mutex. */
static uint64_t wait_budget(prefill_job *j, int i, uint64_t est_compute_ns, uint64_t waited_ns) {
    if (!est_compute_ns || waited_ns >= est_compute_ns) return 0;
    const uint64_t remaining = remaining_load_ns(j, i);
    if (remaining >= est_compute_ns) return 0;
    const uint64_t budget = est_compute_ns - waited_ns;
    return remaining + 200000 < budget ? remaining + 200000 : budget;
}

static void queue_writeback(prefill_job *j, int i, int known_absent) {
    if (!j->p->writeback) return;
    cake_inflight *promise = NULL; /* handed to the write-back, which releases it */
    if (j->promise[i] == OWN_PROMISE) {
        promise = j->p->inflight;
        j->promise[i] = NO_PROMISE;
    }
    if (cake_writeback_enqueue(j->p->writeback, j->e, &j->expect[i], i * j->p->chunk, known_absent,
                               promise) == 0)
        j->st->writeback_queued++;
    else
        j->st->writeback_dropped++;
}

/* Chunks from i up that another request promised and no longer does: in
 * the store now (PRESENT), or not (ABSENT: computed here). It stops at the
 * first promise still held: the other request computes front to back and
 * its write-back releases in that order. Under the mutex, which it leaves
 * while it asks the store (nobody else changes a PROMISED chunk's state). */
static void settle_promises(prefill_job *j, int i) {
    if (!j->n_promised) return;
    int ended[64], n = 0;
    for (int k = i; k < j->n_loadable && n < 64; k++) {
        if (j->state[k] != PROMISED) continue;
        if (cake_inflight_pending(j->p->inflight, &j->expect[k].key)) break;
        ended[n++] = k;
    }
    if (!n) return;
    cake_chunk_key keys[64];
    uint8_t present[64] = {0};
    for (int m = 0; m < n; m++) keys[m] = j->expect[ended[m]].key;
    pthread_mutex_unlock(&j->mu);
    char why[256];
    const int rc = cake_store_exists(j->p->store, keys, (size_t)n, present, why, sizeof(why));
    /* Those that did not come (the other request was cancelled, say) are
     * computed here, and promised in turn, so that a third request waits
     * for this one rather than computing them too; one that a third
     * promised first is waited for again. */
    int8_t taken[64];
    int n_missing = 0;
    for (int m = 0; m < n; m++)
        if (rc || !present[m]) keys[n_missing++] = keys[m];
    pthread_mutex_lock(&j->mu);
    if (n_missing && j->p->writeback && rc == 0) /* (a failing store would not keep them) */
        cake_inflight_promise(j->p->inflight, keys, n_missing, taken);
    else
        memset(taken, -1, sizeof(taken));
    for (int m = 0, miss = 0; m < n; m++) {
        const int k = ended[m], came = rc == 0 && present[m];
        const int8_t t = came ? 1 : taken[miss++];
        if (!came && t == 0) continue; /* a third request's promise now: still PROMISED */
        j->state[k] = came ? PRESENT : ABSENT;
        j->st->chunks_awaited += came;
        if (!came && t == 1) j->promise[k] = OWN_PROMISE;
        j->n_promised--;
    }
    pthread_cond_broadcast(&j->cv); /* workers may fetch them */
}

/* The compute side at chunk i, which another request is computing: waits
 * until the chunk is in the store or the promise ends, at most about two
 * of its compute times (AWAIT_NS without an estimate). Under the mutex. */
static void await_promise(prefill_job *j, int i, uint64_t est_compute) {
    const uint64_t t0 = cake_now_ns();
    const uint64_t limit = est_compute ? 2 * est_compute + 50000000 : AWAIT_NS;
    for (;;) {
        settle_promises(j, i);
        if (j->state[i] != PROMISED || cake_now_ns() - t0 >= limit) break;
        wait_ns(j, AWAIT_POLL_NS);
    }
    if (j->state[i] == PROMISED) { /* the promiser is late: compute it here */
        j->state[i] = ABSENT;
        j->n_promised--;
    }
    const uint64_t t1 = cake_now_ns();
    j->st->await_ms += (double)(t1 - t0) / 1e6;
    trace_add(j, 0, i, "wait for another request", t0, t1);
}

/* A store lookup: on a thread of its own while the compute side computes
 * (a slow store's), or inline. It owns its arrays: the request may end
 * before it does. */
typedef struct lookup_call {
    cake_store *store;
    cake_chunk_key *keys;
    size_t n;
    uint8_t *present, *near;
    int failed;
    char why[256];
    atomic_int done;
    pthread_t thread;
    int joined;
} lookup_call;

static void *lookup_run(void *arg) {
    lookup_call *l = arg;
    l->failed = cake_store_exists(l->store, l->keys, l->n, l->present, l->why, sizeof(l->why));
    cake_store_in_ram(l->store, l->keys, l->n, l->near);
    atomic_store(&l->done, 1);
    return NULL;
}

static void lookup_free(lookup_call *l) {
    if (!l) return;
    if (!l->joined) pthread_join(l->thread, NULL);
    free(l->keys);
    free(l->present);
    free(l->near);
    free(l);
}

/* Whether the compute side computes while the lookup runs: where the
 * store's lookups take at least the first uncached chunk's compute time
 * (the engine's speed known), it would otherwise only wait for the plan.
 * A chunk computed meanwhile is not lost time, even where loading every
 * chunk would win: that takes the lookup and more. */
static int compute_during_lookup(const prefill_job *j) {
    return j->p->mode == CAKE_MODE_CAKE && j->n_cached < j->n_loadable && j->ns_per_flop > 0 &&
           (double)cake_store_lookup_ns(j->p->store) >= est_compute_ns(j, j->n_cached);
}

/* Computes chunk i (its state COMPUTING) and counts it. Under the mutex,
 * which it leaves while it computes. 0, or -1 on an engine failure. */
static int compute_chunk(prefill_job *j, int i, char *err, size_t errlen) {
    const int C = j->p->chunk;
    const uint64_t t0 = cake_now_ns();
    j->front_t0 = t0;
    pthread_mutex_unlock(&j->mu);

    float *logits = i == j->n_loadable - 1 ? j->last_logits : NULL;
    const int from = chunk_start(j, i), n = (i + 1) * C - from;
    const int rc = j->e->compute(j->e->self, j->prompt + from, n, from, logits, err, errlen);
    const uint64_t t1 = cake_now_ns();
    const double ns_per_flop = (double)(t1 - t0) / cake_chunk_flops(j->e->hp, from, n);
    speed_add(j->speed, ns_per_flop); /* also for the next request's first meet */

    pthread_mutex_lock(&j->mu);
    trace_add(j, 0, i, j->lookup && !j->lookup->joined ? "compute during the lookup" : "compute",
              t0, t1);
    j->st->compute_ms += (double)(t1 - t0) / 1e6;
    if (rc) return rc;
    j->state[i] = COMPUTED;
    j->front = i + 1;
    j->front_t0 = t1;
    j->ns_per_flop = speed_typical(j->speed);
    pthread_cond_broadcast(&j->cv); /* workers holding back re-decide */
    j->st->chunks_computed++;
    j->st->tokens_computed += n;
    return 0;
}

/* Whether chunk i may be computed while the lookup runs: not when another
 * request is computing it (then the plan awaits it); else it is promised
 * here first, so that a request with the same prefix that comes meanwhile
 * waits for it rather than computing it too (as after a lookup). */
static bool promise_early(prefill_job *j, int i, bool take) {
    const cake_prefill_params *p = j->p;
    if (!p->inflight || p->mode != CAKE_MODE_CAKE) return true;
    if (!take || !p->writeback) /* (a request that cannot write back promises nothing) */
        return !cake_inflight_pending(p->inflight, &j->expect[i].key);
    int8_t r;
    cake_inflight_promise(p->inflight, &j->expect[i].key, 1, &r);
    if (r == 1) j->promise[i] = OWN_PROMISE;
    return r != 0;
}

/* The compute side while the lookup runs: chunks from the front until the
 * lookup is done, none is left, or another request is computing the next;
 * on a shared engine, each when it gets a turn (asked for until the lookup
 * is done: then the plan decides, and the loads may go first). Under the
 * mutex. */
static int compute_while_looking_up(prefill_job *j, char *err, size_t errlen) {
    for (int i = j->n_cached; i < j->n_loadable && !atomic_load(&j->lookup->done); i++) {
        if (!promise_early(j, i, false)) break;
        if (j->e->wait_turn) {
            pthread_mutex_unlock(&j->mu);
            const int n = (i + 1) * j->p->chunk - chunk_start(j, i);
            int granted = 0;
            while (!granted && !atomic_load(&j->lookup->done))
                granted = j->e->wait_turn(j->e->self, n, TURN_POLL_NS);
            pthread_mutex_lock(&j->mu);
            if (!granted) break;
        }
        if (!promise_early(j, i, true)) break;
        j->state[i] = COMPUTING;
        if (compute_chunk(j, i, err, errlen)) return -1;
        j->n_early++;
        j->st->chunks_during_lookup++;
    }
    return 0;
}

/* A computed chunk goes back to the store when the store lacks it (known:
 * the lookup said so; else the writer checks first). The last one waits
 * while the last token's pass rewrites its KV (last_token_alone). */
static void write_back_computed(prefill_job *j, int i, int known_absent) {
    if (j->last_token_alone && i == j->n_loadable - 1)
        j->deferred_writeback = known_absent + 1;
    else
        queue_writeback(j, i, known_absent);
}

/* The compute side over the loadable chunks. Returns 0, or -1 on an engine failure. */
static int compute_side(prefill_job *j, char *err, size_t errlen) {
    const int C = j->p->chunk;
    int rc = 0;
    pthread_mutex_lock(&j->mu);
    if (j->p->mode == CAKE_MODE_LOAD) { /* LMCache way: all loads first */
        const uint64_t t0 = cake_now_ns();
        for (;;) {
            int busy = 0;
            for (int i = 0; i < j->n_loadable; i++)
                busy |= j->state[i] == PRESENT || j->state[i] == FETCHING || j->state[i] == COPYING;
            if (!busy) break;
            wait_ns(j, 50000000);
        }
        const uint64_t t1 = cake_now_ns();
        j->st->compute_wait_ms += (double)(t1 - t0) / 1e6;
        if (t1 > t0) trace_add(j, 0, -1, "wait for loads", t0, t1);
    }
    for (int i = j->n_cached; i < j->n_loadable; i++) {
        if (i < j->n_cached + j->n_early) continue; /* (computed while the lookup ran) */
        uint64_t waited = 0, turn = 0;              /* in all, and of it for a turn */
        /* Compute time of chunk i, at the engine's recent speed. */
        const uint64_t est_compute = (uint64_t)est_compute_ns(j, i);
        j->front = i;
        j->front_t0 = cake_now_ns();
        if (j->state[i] == PROMISED) await_promise(j, i, est_compute);
        const uint64_t wait_start = cake_now_ns();
        for (int have_turn = !j->e->wait_turn;;) {
            for (;;) {
                enum chunk_state s = j->state[i];
                if (s == LOADED || s == ABSENT) break;
                uint64_t budget = s == COPYING ? 1000000 /* short and committed: wait */
                                  : j->promise[i] == AWAITED && (!est_compute || link_rate(j) <= 0)
                                      ? await_load_budget(est_compute, waited)
                                      : wait_budget(j, i, est_compute, waited);
                if (!budget) break;
                if (j->st->meet_chunk < 0) j->st->meet_chunk = i; /* compute stops here */
                if (!j->compute_waits) { /* workers may now fetch whatever is left */
                    j->compute_waits = 1;
                    pthread_cond_broadcast(&j->cv);
                }
                wait_ns(j, budget);
                waited = cake_now_ns() - wait_start;
            }
            if (have_turn || j->state[i] == LOADED || j->state[i] == ABSENT) break;
            /* A busy engine (a server's other requests) may not run the chunk
             * at once: wait for its turn unclaimed, so that the I/O side may
             * still load it meanwhile (anything: workers claim freely while
             * the compute side waits), then decide again. */
            j->compute_waits = 1;
            pthread_cond_broadcast(&j->cv);
            const uint64_t t0 = cake_now_ns();
            int granted = 0; /* (a chunk loaded meanwhile ends the wait) */
            while (!granted && j->state[i] != LOADED) {
                pthread_mutex_unlock(&j->mu);
                granted =
                    j->e->wait_turn(j->e->self, (i + 1) * C - chunk_start(j, i), TURN_POLL_NS);
                pthread_mutex_lock(&j->mu);
            }
            const uint64_t t1 = cake_now_ns();
            turn += t1 - t0;
            if (t1 - t0 > 100000) trace_add(j, 0, i, "wait for a turn", t0, t1);
            waited = cake_now_ns() - wait_start;
            have_turn = 1;
        }
        j->compute_waits = 0;
        j->st->turn_wait_ms += (double)turn / 1e6;
        if (waited > turn) {
            j->st->compute_wait_ms += (double)(waited - turn) / 1e6;
            if (!turn) trace_add(j, 0, i, "wait", wait_start, wait_start + waited);
        }
        if (j->state[i] == LOADED) {
            if (j->st->meet_chunk < 0) j->st->meet_chunk = i;
            continue;
        }
        const int was_absent = j->state[i] == ABSENT;
        j->state[i] = COMPUTING; /* from ABSENT, PRESENT or a taken-over FETCHING */
        if ((rc = compute_chunk(j, i, err, errlen))) break;
        settle_promises(j, i + 1); /* the workers fetch what other requests finished */
        /* Chunks the lookup did not find, or that failed to load, go back to
         * the store (compute mode did not look); a chunk whose promiser was
         * late may be in the store by now. */
        if (was_absent || j->p->mode == CAKE_MODE_COMPUTE)
            write_back_computed(j, i, j->p->mode != CAKE_MODE_COMPUTE && j->promise[i] != AWAITED);
    }
    j->stop = 1; /* nothing below the front is claimable; stop the workers early */
    pthread_cond_broadcast(&j->cv); /* workers holding back wake up and leave */
    pthread_mutex_unlock(&j->mu);
    return rc;
}

static int write_trace(const prefill_job *j, const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs("{\"traceEvents\":[\n", f);
    fprintf(f, "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":0,"
               "\"args\":{\"name\":\"compute\"}}");
    for (int w = 1; w <= j->st->io_depth; w++)
        fprintf(f,
                ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":%d,"
                "\"args\":{\"name\":\"io worker %d\"}}",
                w, w);
    for (int k = 0; k < j->n_trace; k++) {
        const trace_event *t = &j->trace[k];
        fprintf(f,
                ",\n{\"name\":\"%s %d\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,"
                "\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"chunk\":%d}}",
                t->what, t->chunk, t->what, t->tid, (double)(t->t0 - j->t_start) / 1e3,
                (double)(t->t1 - t->t0) / 1e3, t->chunk);
    }
    fputs("\n]}\n", f);
    return fclose(f) == 0 ? 0 : -1;
}

/* An I/O worker's fetch buffer: from the engine's staging pool when it keeps
 * one (no page faults, and pinned on a GPU), else a new one. */
static void *take_buffer(prefill_job *j) {
    return j->e->staging ? cake_staging_take(j->e->staging, j->buf_size)
                         : cake_store_alloc_buffer(j->buf_size);
}

static void release_buffer(prefill_job *j, void *buf) {
    if (j->e->staging)
        cake_staging_give(j->e->staging, buf, j->buf_size);
    else
        cake_store_free_buffer(buf);
}

/* Joins the I/O workers (they may still be finishing discarded transfers),
 * finishes the statistics and frees the job. */
static void job_finish(prefill_job *j) {
    pthread_mutex_lock(&j->mu);
    j->stop = 1;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    /* Loads that compute overtook are discarded: their emulated transfers
     * need not run out their time (a real one runs to its end) */
    atomic_store(&j->give_up, 1);
    for (int w = 0; w < j->n_started; w++) pthread_join(j->threads[w], NULL);
    lookup_free(j->lookup); /* (a lookup that every chunk's compute overtook ends here) */
    for (int w = 0; w < j->n_started; w++) release_buffer(j, j->workers[w].buf);
    cake_prefill_stats *st = j->st;
    if (j->rate_time > 0) cake_store_set_rate_hint(j->p->store, link_rate(j));
    if (j->first_claim && j->last_load > j->first_claim) {
        st->load_ms = (double)(j->last_load - j->first_claim) / 1e6;
        st->load_gbit_s = (double)st->bytes_loaded * 8 / (st->load_ms * 1e6);
    }
    if (j->ok && j->p->trace_path && write_trace(j, j->p->trace_path))
        fprintf(stderr, "cake: cannot write trace %s: %s\n", j->p->trace_path, strerror(errno));
    free(j->workers);
    free(j->threads);
    free(j->trace);
    free(j->expect);
    free(j->state);
    free(j->promise);
    free(j->near);
    pthread_cond_destroy(&j->cv);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

void cake_prefill_finish(cake_prefill_job *job) {
    if (job) job_finish(job);
}

void cake_loader_engine_salt(cake_loader_engine *e, const char *salt) {
    if (salt) cake_key_salted_fingerprint(e->fingerprint, salt, e->fingerprint);
}

int cake_prefill_loadable_chunks(int n_prompt, int chunk) {
    return n_prompt % chunk == 0 ? n_prompt / chunk : (n_prompt - 1) / chunk;
}

/* The header of one position's KV as a blob: the last chunk's, for one
 * token. A batch-variant engine's last-token pass keeps the chunk's bits of
 * that position in such a blob (see the top of this file). */
static cake_chunk_header one_position_header(const prefill_job *j) {
    const cake_loader_engine *e = j->e;
    const int last = j->n_loadable - 1;
    return cake_chunk_header_for(e->fingerprint, &j->expect[last].key, (uint32_t)last, 1, e->hp,
                                 e->kv_type);
}

int cake_prefill(const cake_loader_engine *e, const cake_token *prompt, int n_prompt,
                 const cake_prefill_params *p, float *logits, cake_prefill_stats *st,
                 cake_prefill_job **pending, char *err, size_t errlen) {
    const int C = p->chunk;
    *st = (cake_prefill_stats){0};
    st->meet_chunk = -1;
    st->mode = p->store ? p->mode : CAKE_MODE_COMPUTE;
    st->chunk = C;
    st->io_depth = st->mode == CAKE_MODE_COMPUTE ? 0
                   : p->io_depth > 0             ? p->io_depth
                                                 : CAKE_DEFAULT_IO_DEPTH;
    if (n_prompt < 1 || C < 1) return cake_err(err, errlen, "prefill: empty prompt or chunk < 1");
    st->chunks_total = (n_prompt + C - 1) / C;

    if (pending) *pending = NULL;
    prefill_job *jp = calloc(1, sizeof(*jp));
    if (!jp) return cake_err(err, errlen, "prefill: out of memory");
    prefill_job *const j = jp;
    *j = (prefill_job){.e = e, .prompt = prompt, .st = st};
    j->params = *p; /* the job may outlive the caller's params */
    j->params.mode = st->mode;
    j->params.io_depth = st->io_depth;
    j->p = &j->params;
    j->t_start = cake_now_ns();
    j->speed = e->speed ? e->speed : &j->own_speed;
    j->ns_per_flop = speed_typical(j->speed);
    st->knew_speed = j->ns_per_flop > 0;
    j->n_loadable = cake_prefill_loadable_chunks(n_prompt, C);
    const int n_full = n_prompt / C; /* the tail is full when n_prompt % C == 0 */
    if (j->n_loadable * C == n_prompt) {
        if (e->batch_invariant)
            j->last_logits = logits;
        else
            j->last_token_alone = 1;
    }
    void *kept_kv = NULL; /* the last token's KV while it is computed again, alone */
    int rc = -1;
    cake_chunk_key *keys = NULL;
    uint8_t *present = NULL;
    pthread_mutex_init(&j->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&j->cv, &ca);
    pthread_condattr_destroy(&ca);

    const int n_keys = (p->store || p->writeback) ? n_full : 0;
    j->expect = calloc((size_t)n_full + 1, sizeof(*j->expect));
    j->state = calloc((size_t)n_full + 1, sizeof(*j->state));
    j->promise = calloc((size_t)n_full + 1, 1);
    j->near = calloc((size_t)n_full + 1, 1);
    keys = calloc((size_t)n_full + 1, sizeof(*keys));
    present = calloc((size_t)n_full + 1, 1);
    if (!j->expect || !j->state || !j->promise || !j->near || !keys || !present) {
        cake_err(err, errlen, "prefill: out of memory");
        goto done;
    }

    /* Positions the KV cache holds already (see the top): the chunks among
     * them are LOADED from the start, not looked up. */
    int start = p->n_cached < 0 ? 0 : p->n_cached < n_prompt ? p->n_cached : n_prompt;
    if (!e->batch_invariant)
        start = start / C * C;
    else if (start > n_prompt - 1)
        start = n_prompt - 1;
    j->compute_from = start;
    /* (all of them when only the last token is left: loading the chunk it
     * ends would still leave that token to compute; but none when none is
     * held, as for a prompt of one token) */
    j->n_cached = start > 0 && start >= n_prompt - 1 ? j->n_loadable : start / C;
    if (j->n_cached > j->n_loadable) j->n_cached = j->n_loadable;
    st->chunks_cached = j->n_cached;

    /* Lookup: keys of the full chunks and which of the others the store has. */
    if (n_keys) {
        cake_key_chain(e->fingerprint, (uint32_t)C, (uint32_t)e->kv_type, prompt, (size_t)n_prompt,
                       keys);
        for (int i = 0; i < n_full; i++)
            j->expect[i] = cake_chunk_header_for(e->fingerprint, &keys[i], (uint32_t)i, (uint32_t)C,
                                                 e->hp, e->kv_type);
        if (st->mode != CAKE_MODE_COMPUTE && n_full > j->n_cached) {
            const size_t n_look = (size_t)(n_full - j->n_cached);
            lookup_call *l = calloc(1, sizeof(*l));
            if (!l || !(l->keys = malloc(n_look * sizeof(*keys))) ||
                !(l->present = calloc(n_look, 1)) || !(l->near = calloc(n_look, 1))) {
                if (l) l->joined = 1;
                lookup_free(l);
                cake_err(err, errlen, "prefill: out of memory");
                goto done;
            }
            l->store = p->store;
            memcpy(l->keys, keys + j->n_cached, n_look * sizeof(*keys));
            l->n = n_look;
            if (compute_during_lookup(j) && !pthread_create(&l->thread, NULL, lookup_run, l)) {
                j->lookup = l; /* (joined below, or at the finish) */
                pthread_mutex_lock(&j->mu);
                const int crc = compute_while_looking_up(j, err, errlen);
                pthread_mutex_unlock(&j->mu);
                if (crc) goto done;
                /* Every chunk computed before the lookup answered: it is
                 * not waited for (the write-backs check the store). */
                if (j->n_cached + j->n_early < j->n_loadable) {
                    pthread_join(l->thread, NULL);
                    l->joined = 1;
                }
            } else {
                l->joined = 1; /* (no thread) */
                lookup_run(l);
                j->lookup = l;
            }
            if (l->joined) {
                memcpy(present + j->n_cached, l->present, n_look);
                memcpy(j->near + j->n_cached, l->near, n_look);
                if (l->failed)
                    snprintf(st->store_error, sizeof(st->store_error), "lookup: %.150s", l->why);
            }
        }
    }
    /* (whether the lookup's answer is in: not when every chunk was computed
     * while it ran) */
    const int looked_up = st->mode != CAKE_MODE_COMPUTE && (!j->lookup || j->lookup->joined);
    int n_present = 0;
    for (int i = 0; i < j->n_loadable; i++) {
        j->state[i] = i < j->n_cached                ? LOADED
                      : i < j->n_cached + j->n_early ? COMPUTED
                      : present[i]                   ? PRESENT
                                                     : ABSENT;
        n_present += j->state[i] == PRESENT;
        /* (compute-only looks nothing up: nothing is known missing) */
        st->chunks_missing += i >= j->n_cached && !present[i] && looked_up;
    }
    /* The chunks computed while the lookup ran go to the store where it
     * lacks them, as any computed chunk (present[] is reused below). */
    for (int i = j->n_cached; i < j->n_cached + j->n_early; i++) {
        if (!looked_up || !present[i]) {
            write_back_computed(j, i, looked_up && !st->store_error[0]);
        } else if (j->promise[i] == OWN_PROMISE) { /* (the store had it: nothing to wait for) */
            cake_inflight_release(p->inflight, &j->expect[i].key);
            j->promise[i] = NO_PROMISE;
        }
    }
    st->chunks_found = n_present;
    /* Chunks the store lacks: promised here when computed here, or awaited
     * when another request running now has promised them (see the top).
     * Not when the lookup failed: a failing store would neither keep nor
     * give them. */
    if (st->mode == CAKE_MODE_CAKE && p->inflight && looked_up && !st->store_error[0]) {
        /* (keys and present are free now: the missing chunks' keys, then
         * what the registry says of each) */
        int n_absent = 0;
        for (int i = j->n_cached; i < j->n_loadable; i++)
            if (j->state[i] == ABSENT) keys[n_absent++] = j->expect[i].key;
        int8_t *r = (int8_t *)present;
        if (p->writeback)
            cake_inflight_promise(p->inflight, keys, n_absent, r);
        else /* a request that cannot write back only awaits */
            for (int k = 0; k < n_absent; k++)
                r[k] = cake_inflight_pending(p->inflight, &keys[k]) ? 0 : -1;
        for (int i = j->n_cached, k = 0; i < j->n_loadable; i++) {
            if (j->state[i] != ABSENT) continue;
            if (r[k] == 1) {
                j->promise[i] = OWN_PROMISE;
            } else if (r[k] == 0) {
                j->state[i] = PROMISED;
                j->promise[i] = AWAITED;
                j->n_promised++;
            }
            k++;
        }
    }
    st->lookup_ms = (double)(cake_now_ns() - j->t_start) / 1e6;

    /* I/O workers, only when there is something to load. */
    if (st->mode != CAKE_MODE_COMPUTE && n_present + j->n_promised > 0) {
        const int n_loads = n_present + j->n_promised;
        int n_workers = st->io_depth < n_loads ? st->io_depth : n_loads;
        j->blob_size = cake_chunk_blob_size(&j->expect[0]);
        j->buf_size = cake_store_buffer_size(j->blob_size);
        /* The rate the last request measured; failing that, assume the
         * earlier gets ran about io_depth at a time. */
        j->rate_hint = cake_store_rate_hint(p->store);
        cake_store_counters ctr;
        cake_store_counters_get(p->store, &ctr);
        if (!j->rate_hint && ctr.read_ns && ctr.bytes_read)
            j->rate_hint = (double)ctr.bytes_read / (double)ctr.read_ns * st->io_depth;
        st->knew_rate = j->rate_hint > 0;
        j->front_t0 = j->t_start;
        j->workers = calloc((size_t)n_workers, sizeof(*j->workers));
        j->threads = calloc((size_t)n_workers, sizeof(*j->threads));
        if (!j->workers || !j->threads) {
            cake_err(err, errlen, "prefill: out of memory");
            goto done;
        }
        /* Under the mutex: the workers read each other's entries (link model). */
        pthread_mutex_lock(&j->mu);
        for (int w = 0; w < n_workers; w++) {
            io_worker *iw = &j->workers[w];
            *iw = (io_worker){.j = j, .tid = w + 1, .buf = take_buffer(j)};
            if (!iw->buf || pthread_create(&j->threads[w], NULL, io_worker_main, iw)) {
                release_buffer(j, iw->buf);
                iw->buf = NULL;
                break; /* fewer workers; compute covers the rest */
            }
            j->n_started++;
        }
        pthread_mutex_unlock(&j->mu);
    }

    if (compute_side(j, err, errlen)) goto done;

    /* The tail: always computed, its logits choose the first token. Without
     * one, the last chunk's compute gave them, or, if it was loaded or the
     * engine is not batch-invariant, the last token is computed again, alone. */
    const int pos = j->n_loadable * C;
    if (pos < n_prompt || j->last_token_alone || j->state[j->n_loadable - 1] != COMPUTED) {
        int from = pos > j->compute_from ? pos : j->compute_from;
        if (from > n_prompt - 1) from = n_prompt - 1;
        const uint64_t t0 = cake_now_ns();
        cake_chunk_header kept_h;
        if (j->last_token_alone) { /* the chunk's bits of the position, kept */
            kept_h = one_position_header(j);
            const size_t size = cake_chunk_blob_size(&kept_h);
            if (!(kept_kv = malloc(size))) {
                cake_err(err, errlen, "prefill: out of memory");
                goto done;
            }
            if (e->extract(e->self, &kept_h, from, kept_kv, size, err, errlen)) goto done;
        }
        if (e->compute(e->self, prompt + from, n_prompt - from, from, logits, err, errlen))
            goto done;
        if (j->last_token_alone && e->install(e->self, kept_kv, &kept_h, from, err, errlen))
            goto done;
        if (j->deferred_writeback) queue_writeback(j, j->n_loadable - 1, j->deferred_writeback - 1);
        const uint64_t t1 = cake_now_ns();
        pthread_mutex_lock(&j->mu);
        trace_add(j, 0, j->n_loadable, pos < n_prompt ? "compute tail" : "compute last token", t0,
                  t1);
        pthread_mutex_unlock(&j->mu);
        st->compute_ms += (double)(t1 - t0) / 1e6;
        st->tail_ms = (double)(t1 - t0) / 1e6;
        if (pos < n_prompt) st->chunks_computed++;
        /* (a last token computed again after its chunk was counted there) */
        if (pos < n_prompt || j->state[j->n_loadable - 1] != COMPUTED)
            st->tokens_computed += n_prompt - from;
        if (n_full > j->n_loadable) /* a full tail chunk is worth storing too */
            queue_writeback(j, j->n_loadable, 0);
    }
    rc = 0;

done:
    for (int i = 0; j->promise && i < j->n_loadable; i++) /* not computed: never will be here */
        if (j->promise[i] == OWN_PROMISE) cake_inflight_release(p->inflight, &j->expect[i].key);
    free(kept_kv);
    free(keys);
    free(present);
    j->ok = rc == 0;
    if (rc == 0 && st->meet_chunk < 0) st->meet_chunk = j->n_loadable;
    if (pending && rc == 0)
        *pending = j; /* joined later, after the first token */
    else
        job_finish(j);
    return rc;
}
