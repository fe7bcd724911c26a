/* The store front: URI parsing, the emulated link, counters, verification.
 *
 * The emulated link (bw=) models a link shared fairly by every transfer in
 * flight, like TCP flows on one wire: generalized processor sharing. A virtual
 * clock V counts the bytes that each active transfer has been served; it
 * advances at bw / n_active while n_active transfers are in flight. A
 * transfer of S bytes that starts when the clock reads V0 is done when V
 * reaches V0 + S. So a lone transfer takes S / bw, and N concurrent ones each
 * progress at bw / N. A transfer registers with the link before the backend
 * does the real work (its size is set once known), so the real I/O overlaps
 * the emulated time instead of adding to it: a transfer takes max(real,
 * emulated). lat= is slept before the transfer joins the link (request
 * latency does not occupy the wire). Reads and writes use separate links. */
#include "store/store.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <strings.h>
#include <time.h>

#include "store/store_impl.h"
#include "util/clock.h"
#include "util/err.h"

/* ---- time ---- */

static void sleep_ns(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* How often an emulated wait looks at its caller's give-up flag. */
#define GIVE_UP_CHECK_NS 10000000ull

static int gave_up(const atomic_int *give_up) {
    return give_up && atomic_load_explicit(give_up, memory_order_relaxed);
}

/* sleep_ns, ending early once *give_up (may be NULL) is set. */
static void sleep_ns_or_give_up(uint64_t ns, const atomic_int *give_up) {
    for (const uint64_t end = cake_now_ns() + ns; !gave_up(give_up);) {
        const uint64_t now = cake_now_ns();
        if (now >= end) return;
        sleep_ns(!give_up || end - now < GIVE_UP_CHECK_NS ? end - now : GIVE_UP_CHECK_NS);
    }
}

/* ---- the emulated link ---- */

typedef struct {
    double bytes_per_ns; /* 0 = unlimited */
    pthread_mutex_t mu;
    pthread_cond_t cv;   /* on CLOCK_MONOTONIC */
    double vclock;       /* bytes served to each active transfer so far */
    uint64_t t_last;     /* real time of the last vclock update */
    uint64_t idle_since; /* when the link last went idle (exact), 0 = never */
    int n_active;
} emu_link;

/* A transfer that joins an idle link within this long after the previous one
 * ended starts at that end: the gap is our own wake-up and scheduling delay
 * (or the caller's turnaround), which a back-to-back client on a real link
 * would not leave. Without it a lone stream reaches only 95-97% of bw= on a
 * busy machine. A lookup (a request's first word to the store) ends it
 * (link_fresh): a new request's first transfer does not continue the last
 * request's stream, or back-to-back runs (cake bench) would load a small
 * chunk in the idle time between them, faster than the link. */
#define LINK_GRACE_NS 2000000ull

static int link_init(emu_link *l, double bytes_per_s) {
    memset(l, 0, sizeof(*l));
    l->bytes_per_ns = bytes_per_s / 1e9;
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca)) return -1;
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&l->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc) return -1;
    if (pthread_mutex_init(&l->mu, NULL)) {
        pthread_cond_destroy(&l->cv);
        return -1;
    }
    return 0;
}

static void link_destroy(emu_link *l) {
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
}

/* Under l->mu. */
static void link_advance(emu_link *l, uint64_t now) {
    if (l->n_active > 0 && now > l->t_last)
        l->vclock += (double)(now - l->t_last) * l->bytes_per_ns / l->n_active;
    l->t_last = now;
}

/* Joins the link; returns the virtual time of arrival. */
static double link_join(emu_link *l) {
    pthread_mutex_lock(&l->mu);
    uint64_t now = cake_now_ns();
    if (l->n_active == 0)
        l->t_last = l->idle_since && now - l->idle_since < LINK_GRACE_NS ? l->idle_since : now;
    else
        link_advance(l, now);
    l->n_active++;
    double v0 = l->vclock;
    pthread_mutex_unlock(&l->mu);
    return v0;
}

/* An idle link's next transfer starts when it joins (no grace). */
static void link_fresh(emu_link *l) {
    pthread_mutex_lock(&l->mu);
    if (l->n_active == 0) l->idle_since = 0;
    pthread_mutex_unlock(&l->mu);
}

/* Waits until the transfer that joined at v0 has been carried (bytes may be
 * 0: it then just leaves), then leaves the link; or leaves it at once when
 * *give_up (may be NULL) is set: its caller no longer wants it. */
static void link_finish(emu_link *l, double v0, uint64_t bytes, const atomic_int *give_up) {
    double done = v0 + (double)bytes, pv;
    uint64_t pt;
    int left_early = 0;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        uint64_t now = cake_now_ns();
        pv = l->vclock;
        pt = l->t_last;
        link_advance(l, now);
        if (l->vclock >= done) break;
        if ((left_early = gave_up(give_up))) break;
        /* When it would finish if nobody joins or leaves; a leaver wakes us
         * early (broadcast), a joiner makes us wake early and wait again. */
        double wait = (done - l->vclock) * l->n_active / l->bytes_per_ns;
        uint64_t until = now + (uint64_t)ceil(wait);
        if (give_up && until > now + GIVE_UP_CHECK_NS) until = now + GIVE_UP_CHECK_NS;
        const struct timespec ts = cake_timespec_ns(until);
        pthread_cond_timedwait(&l->cv, &l->mu, &ts);
    }
    /* We woke late. When the clock crossed `done` within its last step, leave
     * at that exact moment: the others get the larger share from then on,
     * and the link's idle time starts then. */
    if (!left_early && pv <= done && l->vclock > pv) {
        double f = (done - pv) / (l->vclock - pv);
        l->t_last = pt + (uint64_t)(f * (double)(l->t_last - pt));
        l->vclock = done;
    }
    l->n_active--;
    if (l->n_active == 0) l->idle_since = l->t_last;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/* ---- the store object ---- */

struct cake_store {
    const cake_store_ops *ops;
    void *b;
    /* The RAM tier (ram=): a mem backend holding the chunks this process
     * read or wrote lately, read before the backend and outside the link;
     * NULL: none. Its evictions are counted apart. */
    void *ram;
    cake_store_atomic_counters ram_ctr;
    char *uri;
    int emulate; /* bw > 0 */
    uint64_t lat_ns;
    emu_link rd, wr;
    cake_store_atomic_counters ctr;
    _Atomic double rate_hint;   /* bytes/ns; see cake_store_rate_hint */
    _Atomic uint64_t exists_ns; /* see cake_store_lookup_ns */
};

static const char *default_dir(char *buf, size_t n) {
    const char *x = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (x && *x == '/')
        snprintf(buf, n, "%s/cake", x);
    else if (home && *home)
        snprintf(buf, n, "%s/.cache/cake", home);
    else
        return NULL;
    return buf;
}

int cake_parse_size(const char *s, uint64_t *bytes) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || !isfinite(v)) return -1;
    static const struct {
        const char *suf;
        double mul;
    } units[] = {
        {"", 1},
        {"B", 1},
        {"K", 1e3},
        {"KB", 1e3},
        {"KiB", 1024},
        {"M", 1e6},
        {"MB", 1e6},
        {"MiB", 1048576.0},
        {"G", 1e9},
        {"GB", 1e9},
        {"GiB", 1073741824.0},
        {"T", 1e12},
        {"TB", 1e12},
        {"TiB", 1099511627776.0},
    };
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (!strcasecmp(end, units[i].suf)) {
            double b = v * units[i].mul;
            if (b >= 1.8e19) return -1;
            *bytes = (uint64_t)llround(b);
            return 0;
        }
    }
    return -1;
}

int cake_parse_rate(const char *s, double *bytes_per_second) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v > 0) || !isfinite(v)) return -1;
    char unit[32];
    size_t n = strlen(end);
    if (n >= sizeof(unit)) return -1;
    memcpy(unit, end, n + 1);
    if (n >= 2 && !strcmp(unit + n - 2, "/s")) unit[n - 2] = '\0';
    /* Decimal prefix, then the unit: bits unless it says B (bytes). */
    static const struct {
        char c;
        double dec, bin;
    } prefixes[] = {{'k', 1e3, 1024.0},
                    {'m', 1e6, 1048576.0},
                    {'g', 1e9, 1073741824.0},
                    {'t', 1e12, 1099511627776.0}};
    const char *u = unit;
    double dec = 1, bin = 0;
    for (size_t i = 0; i < 4; i++) {
        if ((*u | 0x20) == prefixes[i].c) {
            dec = prefixes[i].dec;
            bin = prefixes[i].bin;
            u++;
            break;
        }
    }
    double mul;
    if (!*u || !strcmp(u, "b") || !strcasecmp(u, "bit") || !strcasecmp(u, "bits") ||
        !strcasecmp(u, "bps"))
        mul = dec / 8; /* bits/s; a plain number is bits/s too */
    else if (!strcmp(u, "B") || !strcmp(u, "Bps"))
        mul = dec;
    else if (!strcmp(u, "iB") && bin > 0)
        mul = bin;
    else
        return -1;
    *bytes_per_second = v * mul;
    return 0;
}

static int parse_bool(const char *v, int *out) {
    if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes"))
        *out = 1;
    else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no"))
        *out = 0;
    else
        return -1;
    return 0;
}

/* ---- URIs ---- */

/* Where a URI's "USER:PASSWORD@" ends (the last '@' before the query), or
 * NULL; *auth is where it starts: after "SCHEME://" (any scheme, so that a
 * mistyped one is redacted too), unless a path starts there. */
static const char *userinfo_end(const char *uri, const char **auth) {
    const char *scheme_end = strstr(uri, "://");
    if (!scheme_end || scheme_end[3] == '/') return NULL;
    *auth = scheme_end + 3;
    const char *q = strchr(*auth, '?'), *at = NULL;
    for (const char *x = *auth; *x && (!q || x < q); x++)
        if (*x == '@') at = x;
    return at;
}

const char *cake_store_redact_uri(const char *uri, char *out, size_t n) {
    const char *auth, *at = userinfo_end(uri, &auth);
    const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    if (!colon)
        snprintf(out, n, "%s", uri);
    else
        snprintf(out, n, "%.*s***%s", (int)(colon + 1 - uri), uri, at);
    return out;
}

static int hex_digit(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c |= 0x20;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* s[0..n) with its %XX escapes decoded into out (cap bytes, NUL-ended); -1 on
 * a bad escape, an escaped NUL or no room. */
static int percent_decode(const char *s, size_t n, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            if (i + 2 >= n) return -1;
            const int a = hex_digit(s[i + 1]), b = hex_digit(s[i + 2]);
            if (a < 0 || b < 0 || !(c = a * 16 + b)) return -1;
            i += 2;
        }
        if (o + 1 >= cap) return -1;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return 0;
}

/* A Redis database number (Redis has 16 unless configured otherwise). */
static int parse_db(const char *s, cake_store_params *p) {
    char *end;
    const long db = strtol(s, &end, 10);
    if (end == s || *end || db < 0 || db > 1000000) return -1;
    p->db = (int)db;
    return 0;
}

/* HOST[:PORT] or [IPV6][:PORT] in [s, end): 0, -1 when malformed, -2 for a
 * bad port. */
static int parse_host_port(const char *s, const char *end, char host[256], int *port) {
    const char *h = s, *h_end, *num = NULL;
    if (*s == '[') { /* [IPv6] */
        h = s + 1;
        h_end = memchr(h, ']', (size_t)(end - h));
        if (!h_end || (h_end + 1 < end && h_end[1] != ':')) return -1;
        if (h_end + 1 < end) num = h_end + 2;
    } else {
        h_end = memchr(s, ':', (size_t)(end - s));
        if (h_end)
            num = h_end + 1;
        else
            h_end = end;
    }
    if (h_end == h || h_end - h >= 256) return -1;
    memcpy(host, h, (size_t)(h_end - h));
    host[h_end - h] = '\0';
    *port = 6379;
    if (num) {
        char digits[8], *e;
        if (end == num || end - num >= (long)sizeof(digits)) return -2;
        memcpy(digits, num, (size_t)(end - num));
        digits[end - num] = '\0';
        const long v = strtol(digits, &e, 10);
        if (*e || v < 1 || v > 65535) return -2;
        *port = (int)v;
    }
    return 0;
}

/* redis://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/DB] and
 * redis+unix://[[USER]:PASSWORD@]/PATH (base: the URI without its query). */
static int parse_redis(const char *base, const char *shown, cake_store_params *p, char *err,
                       size_t errlen) {
    const int is_unix = !strncmp(base, "redis+unix://", 13);
    const char *auth = base + (is_unix ? 13 : 8), *at = userinfo_end(base, &auth);
    const char *h = at ? at + 1 : auth;
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        const size_t ulen = (size_t)((colon ? colon : at) - auth);
        if (percent_decode(auth, ulen, p->user, sizeof(p->user)))
            return cake_err(err, errlen, "store %s: bad user name (escape '%%' as %%25)", shown);
        if (colon &&
            percent_decode(colon + 1, (size_t)(at - colon - 1), p->password, sizeof(p->password)))
            return cake_err(err, errlen,
                            "store %s: bad password (at most %zu bytes; escape '%%' as %%25)",
                            shown, sizeof(p->password) - 1);
    }
    if (!p->password[0]) { /* kept off the command line */
        const char *env = getenv("CAKE_REDIS_PASSWORD");
        if (env && strlen(env) < sizeof(p->password)) strcpy(p->password, env);
    }
    if (p->user[0] && !p->password[0])
        return cake_err(err, errlen,
                        "store %s: user '%s' without a password (give "
                        "USER:PASSWORD@, or the password in CAKE_REDIS_PASSWORD)",
                        shown, p->user);

    if (is_unix) {
        if (h[0] != '/' || !h[1])
            return cake_err(err, errlen, "store %s: expected redis+unix:///PATH/TO/SOCKET", shown);
        if (strlen(h) >= sizeof(p->socket))
            return cake_err(err, errlen, "store %s: socket path over %zu bytes", shown,
                            sizeof(p->socket) - 1);
        strcpy(p->socket, h);
        return 0;
    }

    const char *slash = strchr(h, '/'), *end = slash ? slash : h + strlen(h);
    for (const char *item = h; item <= end; item++) { /* HOST[:PORT], comma-separated */
        const char *item_end = memchr(item, ',', (size_t)(end - item));
        if (!item_end) item_end = end;
        if (p->n_servers == CAKE_REDIS_SERVERS_MAX)
            return cake_err(err, errlen, "store %s: more than %d servers", shown,
                            CAKE_REDIS_SERVERS_MAX);
        const int bad =
            parse_host_port(item, item_end, p->host[p->n_servers], &p->port[p->n_servers]);
        if (bad == -2)
            return cake_err(err, errlen, "store %s: bad port in '%.*s'", shown,
                            (int)(item_end - item), item);
        if (bad)
            return cake_err(err, errlen,
                            "store %s: expected redis://HOST[:PORT][,HOST[:PORT]...][/DB] (an "
                            "IPv6 host in brackets) at '%.*s'",
                            shown, (int)(item_end - item), item);
        for (int i = 0; i < p->n_servers; i++)
            if (!strcmp(p->host[i], p->host[p->n_servers]) && p->port[i] == p->port[p->n_servers])
                return cake_err(err, errlen, "store %s: server %s:%d listed twice", shown,
                                p->host[i], p->port[i]);
        p->n_servers++;
        item = item_end;
    }
    if (slash && slash[1] && parse_db(slash + 1, p))
        return cake_err(err, errlen, "store %s: bad database number '%s'", shown, slash + 1);
    return 0;
}

static int parse_param(cake_store_params *p, const char *name, const char *val, const char *uri,
                       char *err, size_t errlen) {
    int is_file = !strcmp(p->kind, "file"), is_redis = !strcmp(p->kind, "redis");
    char *end;
    if (!strcmp(name, "bw")) {
        if (cake_parse_rate(val, &p->bw) || p->bw < 125) /* (a slower link never ends) */
            return cake_err(err, errlen,
                            "store %s: bad bw=%s (a rate such as 25Gbit, 500Mbit, "
                            "1.6GB; at least 1Kbit)",
                            uri, val);
    } else if (!strcmp(name, "lat")) {
        errno = 0;
        p->lat_ms = strtod(val, &end);
        if (errno || end == val || *end || !(p->lat_ms >= 0) || p->lat_ms > 1e6)
            return cake_err(err, errlen, "store %s: bad lat=%s (milliseconds)", uri, val);
    } else if (!strcmp(name, "capacity")) {
        if (is_redis)
            return cake_err(err, errlen,
                            "store %s: capacity= is not supported by redis stores "
                            "(set Redis's maxmemory instead)",
                            uri);
        if (cake_parse_size(val, &p->capacity) || !p->capacity)
            return cake_err(err, errlen, "store %s: bad capacity=%s (a size such as 10G, 512MiB)",
                            uri, val);
    } else if (!strcmp(name, "direct") || !strcmp(name, "cache") || !strcmp(name, "fsync")) {
        if (!is_file)
            return cake_err(err, errlen, "store %s: %s= is only for file stores", uri, name);
        int *flag = !strcmp(name, "direct")  ? &p->direct
                    : !strcmp(name, "cache") ? &p->cache
                                             : &p->fsync;
        if (parse_bool(val, flag))
            return cake_err(err, errlen, "store %s: bad %s=%s (0 or 1)", uri, name, val);
    } else if (!strcmp(name, "readers")) {
        if (!is_file)
            return cake_err(err, errlen, "store %s: readers= is only for file stores", uri);
        long r = strtol(val, &end, 10);
        if (end == val || *end || r < 1 || r > CAKE_STORE_READERS_MAX)
            return cake_err(err, errlen, "store %s: bad readers=%s (1..%d)", uri, val,
                            CAKE_STORE_READERS_MAX);
        p->readers = (int)r;
    } else if (!strcmp(name, "ram")) {
        if (!is_file && !is_redis)
            return cake_err(err, errlen, "store %s: ram= is only for file and redis stores", uri);
        if (cake_parse_size(val, &p->ram) || !p->ram)
            return cake_err(err, errlen, "store %s: bad ram=%s (a size such as 2GiB, 512MiB)", uri,
                            val);
    } else if (!strcmp(name, "db")) {
        if (!is_redis) return cake_err(err, errlen, "store %s: db= is only for redis stores", uri);
        if (parse_db(val, p))
            return cake_err(err, errlen, "store %s: bad db=%s (a database number)", uri, val);
    } else if (!strcmp(name, "timeout")) {
        if (!is_redis)
            return cake_err(err, errlen, "store %s: timeout= is only for redis stores", uri);
        long t = strtol(val, &end, 10);
        if (end == val || *end || t < 1 || t > 3600000)
            return cake_err(err, errlen, "store %s: bad timeout=%s (milliseconds)", uri, val);
        p->timeout_ms = (int)t;
    } else {
        return cake_err(err, errlen,
                        "store %s: unknown parameter '%s' (known: bw, lat, capacity, "
                        "direct, cache, fsync, readers, timeout, db, ram)",
                        uri, name);
    }
    return 0;
}

int cake_store_parse_uri(const char *uri, cake_store_params *p, char *err, size_t errlen) {
    memset(p, 0, sizeof(*p));
    p->direct = 1;
    p->cache = 1;
    p->timeout_ms = 1000;
    char base[4352];
    const char *q = strchr(uri, '?');
    size_t blen = q ? (size_t)(q - uri) : strlen(uri);
    if (blen >= sizeof(base)) return cake_err(err, errlen, "store URI too long");
    char shown_buf[4352];
    const char *shown = cake_store_redact_uri(uri, shown_buf, sizeof(shown_buf));
    memcpy(base, uri, blen);
    base[blen] = '\0';

    if (!strncmp(base, "file:", 5)) {
        strcpy(p->kind, "file");
        const char *path = base + 5;
        if (!strncmp(path, "//", 2)) { /* file:///abs/path */
            path += 2;
            if (*path && *path != '/')
                return cake_err(err, errlen,
                                "store %s: file://%s names a host; give file:PATH or "
                                "file:///ABSOLUTE/PATH",
                                shown, path);
        }
        if (!*path && !(path = default_dir(p->path, sizeof(p->path))))
            return cake_err(err, errlen,
                            "store %s: no default directory (neither XDG_CACHE_HOME "
                            "nor HOME is set)",
                            uri);
        if (strlen(path) >= sizeof(p->path))
            return cake_err(err, errlen, "store %s: path too long", shown);
        if (path != p->path) strcpy(p->path, path);
    } else if (!strncmp(base, "redis://", 8) || !strncmp(base, "redis+unix://", 13)) {
        strcpy(p->kind, "redis");
        if (parse_redis(base, shown, p, err, errlen)) return -1;
    } else if (!strcmp(base, "mem:")) {
        strcpy(p->kind, "mem");
    } else {
        return cake_err(err, errlen,
                        "store '%s': unknown kind (use file:PATH, "
                        "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], redis+unix:///PATH or mem:)",
                        shown);
    }

    if (q) {
        char params[1024];
        if (strlen(q + 1) >= sizeof(params))
            return cake_err(err, errlen, "store %s: parameters too long", shown);
        strcpy(params, q + 1);
        char *save = NULL;
        const char *seen[32]; /* (a parameter given twice is a mistake, not the last wins) */
        int n_seen = 0;
        for (char *kv = strtok_r(params, "&", &save); kv; kv = strtok_r(NULL, "&", &save)) {
            char *eq = strchr(kv, '=');
            if (!eq || eq == kv)
                return cake_err(err, errlen, "store %s: parameter '%s' is not NAME=VALUE", shown,
                                kv);
            *eq = '\0';
            for (int i = 0; i < n_seen; i++)
                if (!strcmp(seen[i], kv))
                    return cake_err(err, errlen, "store %s: %s= is given twice", shown, kv);
            if (parse_param(p, kv, eq + 1, shown, err, errlen)) return -1;
            if (n_seen < 32) seen[n_seen++] = kv;
        }
    }
    return 0;
}

static void ignore_if_default(int sig) {
    struct sigaction old;
    if (sigaction(sig, NULL, &old) == 0 && !(old.sa_flags & SA_SIGINFO) &&
        old.sa_handler == SIG_DFL)
        signal(sig, SIG_IGN);
}

int cake_store_open(const char *uri, cake_store **out, char *err, size_t errlen) {
    *out = NULL;
    cake_store_params p;
    if (cake_store_parse_uri(uri, &p, err, errlen)) return -1;
    char shown[4352];
    uri = cake_store_redact_uri(uri, shown, sizeof(shown)); /* the password stays in p */
    cake_store *s = calloc(1, sizeof(*s));
    if (!s || !(s->uri = strdup(uri))) {
        free(s);
        return cake_err(err, errlen, "store %s: out of memory", uri);
    }
    ignore_if_default(SIGPIPE);
    ignore_if_default(SIGXFSZ);
    s->emulate = p.bw > 0;
    s->lat_ns = (uint64_t)llround(p.lat_ms * 1e6);
    if (link_init(&s->rd, p.bw) || (link_init(&s->wr, p.bw) && (link_destroy(&s->rd), 1))) {
        free(s->uri);
        free(s);
        return cake_err(err, errlen, "store %s: cannot create the link emulation", uri);
    }
    int rc;
    if (!strcmp(p.kind, "file")) {
        s->ops = &cake_store_file_ops;
        rc = cake_store_file_open(&p, &s->ctr, &s->b, err, errlen);
    } else if (!strcmp(p.kind, "redis")) {
        s->ops = &cake_store_redis_ops;
        rc = cake_store_redis_open(&p, &s->ctr, &s->b, err, errlen);
    } else {
        s->ops = &cake_store_mem_ops;
        rc = cake_store_mem_open(&p, &s->ctr, &s->b, err, errlen);
    }
    explicit_bzero(p.password, sizeof(p.password)); /* the backend has its copy */
    if (!rc && p.ram) {
        cake_store_params rp = {.capacity = p.ram};
        rc = cake_store_mem_open(&rp, &s->ram_ctr, &s->ram, err, errlen);
    }
    if (rc) {
        if (!s->b) s->ops = NULL;
        cake_store_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

void cake_store_close(cake_store *s) {
    if (!s) return;
    if (s->ops) s->ops->close(s->b);
    if (s->ram) cake_store_mem_ops.close(s->ram);
    link_destroy(&s->rd);
    link_destroy(&s->wr);
    free(s->uri);
    free(s);
}

const char *cake_store_kind(const cake_store *s) {
    return s->ops->kind;
}

const char *cake_store_uri(const cake_store *s) {
    return s->uri;
}

int cake_store_check(cake_store *s, char *err, size_t errlen) {
    return s->ops->check ? s->ops->check(s->b, err, errlen) : 0;
}

/* ---- buffers ---- */

#define CAKE_STORE_ALIGN 4096

size_t cake_store_buffer_size(size_t blob_size) {
    return (blob_size + CAKE_STORE_ALIGN - 1) / CAKE_STORE_ALIGN * CAKE_STORE_ALIGN;
}

void *cake_store_alloc_buffer(size_t size) {
    void *p = NULL;
    size_t n = cake_store_buffer_size(size ? size : 1);
    if (posix_memalign(&p, CAKE_STORE_ALIGN, n) != 0) return NULL;
#ifdef MADV_POPULATE_WRITE
    /* its pages in one go, not a fault per page during the first read into it */
    (void)madvise(p, n, MADV_POPULATE_WRITE);
#endif
    return p;
}

void cake_store_free_buffer(void *p) {
    free(p);
}

/* ---- calls ---- */

static void add(_Atomic uint64_t *c, uint64_t v) {
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

static void request_latency(cake_store *s, const atomic_int *give_up) {
    if (s->lat_ns) sleep_ns_or_give_up(s->lat_ns, give_up);
}

/* The RAM tier's copy of key into buf: 0 when it had one (counted). */
static int ram_get(cake_store *s, const cake_chunk_key *key, void *buf, size_t cap, size_t *len) {
    char e[64];
    if (!s->ram || cake_store_mem_ops.get(s->ram, key, buf, cap, len, NULL, e, sizeof(e)) != 0)
        return 1;
    add(&s->ctr.ram_hits, 1);
    return 0;
}

/* Keeps a copy of a blob the backend gave or took (the RAM tier). */
static void ram_put(cake_store *s, const cake_chunk_key *key, const void *blob, size_t len) {
    char e[64];
    if (s->ram) cake_store_mem_ops.put(s->ram, key, blob, len, e, sizeof(e));
}

/* The backend get, inside the emulated link, after the RAM tier (which the
 * link does not slow). hash: see cake_store_ops.get. Counts only RAM hits.
 * give_up (may be NULL): once set, the emulated waits end at once. */
static int emulated_get(cake_store *s, const cake_chunk_key *key, cake_payload_hash *hash,
                        void *buf, size_t cap, size_t *len, const atomic_int *give_up, char *err,
                        size_t errlen) {
    *len = 0;
    if (ram_get(s, key, buf, cap, len) == 0) return 0;
    request_latency(s, give_up);
    double v0 = s->emulate ? link_join(&s->rd) : 0;
    int rc = s->ops->get(s->b, key, buf, cap, len, hash, err, errlen);
    if (s->emulate) link_finish(&s->rd, v0, rc == 0 ? *len : 0, give_up);
    if (gave_up(give_up)) { /* (not carried in full: not kept in RAM either, a miss) */
        *len = 0;
        return 1;
    }
    if (rc == 0) ram_put(s, key, buf, *len);
    return rc;
}

int cake_store_get(cake_store *s, const cake_chunk_key *key, void *buf, size_t cap, size_t *len,
                   char *err, size_t errlen) {
    uint64_t t0 = cake_now_ns();
    if (err && errlen) err[0] = '\0';
    int rc = emulated_get(s, key, NULL, buf, cap, len, NULL, err, errlen);
    if (rc == 0) {
        add(&s->ctr.hits, 1);
        add(&s->ctr.bytes_read, *len);
    } else if (rc != -1) { /* -1: the caller's buffer is too small; not a lookup result */
        add(&s->ctr.misses, 1);
        if (rc == CAKE_STORE_GET_FAILED) {
            add(&s->ctr.errors, 1);
            rc = 1;
        }
    }
    add(&s->ctr.read_ns, cake_now_ns() - t0);
    return rc;
}

/* After a backend get of expect's key (rc as the backend returned it):
 * verification (of what hash, if not NULL, was not fed), counters, removal of
 * a bad chunk. The check comes after the transfer: it needs the last bytes.
 * Returns 0 hit / 1 miss. */
static int settle_verified(cake_store *s, const cake_chunk_header *expect, cake_payload_hash *hash,
                           const void *buf, int rc, size_t *len, char *err, size_t errlen) {
    if (rc == 0 && cake_chunk_verify_fed(buf, *len, expect, hash, NULL, err, errlen) != 0) rc = -1;
    if (rc == 0) {
        add(&s->ctr.hits, 1);
        add(&s->ctr.bytes_read, *len);
        return 0;
    }
    add(&s->ctr.misses, 1);
    if (rc == CAKE_STORE_GET_FAILED) {
        add(&s->ctr.errors, 1);
    } else if (rc == -1) {
        /* Bad bytes under this key (or a blob too big to be this chunk): never
         * returned; removed so that the write-back replaces it. */
        add(&s->ctr.corrupt, 1);
        char e2[64];
        s->ops->del(s->b, &expect->key, e2, sizeof(e2));
        if (s->ram) cake_store_mem_ops.del(s->ram, &expect->key, e2, sizeof(e2));
    }
    *len = 0;
    return 1;
}

static int check_room(const cake_chunk_header *expect, size_t cap, char *err, size_t errlen) {
    size_t want = cake_chunk_blob_size(expect);
    if (!want) return cake_err(err, errlen, "get: the expected chunk has an invalid shape");
    if (cap < want)
        return cake_err(err, errlen, "get: buffer of %zu bytes is smaller than the %zu-byte chunk",
                        cap, want);
    return 0;
}

int cake_store_get_verified(cake_store *s, const cake_chunk_header *expect, void *buf, size_t cap,
                            size_t *len, char *err, size_t errlen) {
    return cake_store_get_verified_until(s, expect, buf, cap, len, NULL, err, errlen);
}

int cake_store_get_verified_until(cake_store *s, const cake_chunk_header *expect, void *buf,
                                  size_t cap, size_t *len, const atomic_int *give_up, char *err,
                                  size_t errlen) {
    uint64_t t0 = cake_now_ns();
    if (err && errlen) err[0] = '\0';
    if (check_room(expect, cap, err, errlen)) return -1;
    cake_payload_hash hash;
    cake_payload_hash_init(&hash);
    int rc = emulated_get(s, &expect->key, &hash, buf, cap, len, give_up, err, errlen);
    rc = settle_verified(s, expect, &hash, buf, rc, len, err, errlen);
    add(&s->ctr.read_ns, cake_now_ns() - t0);
    return rc;
}

int cake_store_get_many_verified(cake_store *s, const cake_chunk_header *expect, size_t n,
                                 void *const *bufs, size_t cap, size_t *lens, int *results,
                                 char *err, size_t errlen) {
    uint64_t t0 = cake_now_ns();
    if (err && errlen) err[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        results[i] = 1;
        lens[i] = 0;
        if (check_room(&expect[i], cap, err, errlen)) return -1;
    }
    if (!n) return 0;
    cake_chunk_key stack_keys[16], *keys = n <= 16 ? stack_keys : malloc(n * sizeof(*keys));
    double stack_v0[16], *v0 = n <= 16 ? stack_v0 : malloc(n * sizeof(*v0));
    if (!keys || !v0) {
        if (keys != stack_keys) free(keys);
        if (v0 != stack_v0) free(v0);
        return cake_err(err, errlen, "get: out of memory for %zu keys", n);
    }
    /* The RAM tier's first; the backend's for the others, in one round trip. */
    size_t n_far = 0;
    for (size_t i = 0; i < n; i++)
        if (ram_get(s, &expect[i].key, bufs[i], cap, &lens[i]) == 0)
            results[i] = 0;
        else
            keys[n_far++] = expect[i].key;
    char e1[256] = "";
    if (n_far) {
        void *stack_far[16], **far = n_far <= 16 ? stack_far : malloc(n_far * sizeof(*far));
        size_t stack_len[16], *far_len = n_far <= 16 ? stack_len : malloc(n_far * sizeof(size_t));
        int stack_rc[16], *far_rc = n_far <= 16 ? stack_rc : malloc(n_far * sizeof(int));
        if (!far || !far_len || !far_rc) {
            snprintf(e1, sizeof(e1), "get: out of memory for %zu keys", n_far);
            for (size_t i = 0; i < n; i++)
                if (results[i]) results[i] = CAKE_STORE_GET_FAILED;
        } else {
            for (size_t i = 0, k = 0; i < n; i++)
                if (results[i]) far[k++] = bufs[i];
            request_latency(s, NULL); /* one round trip for all */
            if (s->emulate)
                for (size_t k = 0; k < n_far; k++) v0[k] = link_join(&s->rd);
            if (s->ops->get_many) {
                s->ops->get_many(s->b, keys, n_far, far, cap, far_len, far_rc, e1, sizeof(e1));
            } else {
                for (size_t k = 0; k < n_far; k++)
                    far_rc[k] =
                        s->ops->get(s->b, &keys[k], far[k], cap, &far_len[k], NULL, e1, sizeof(e1));
            }
            if (s->emulate)
                for (size_t k = 0; k < n_far; k++)
                    link_finish(&s->rd, v0[k], far_rc[k] == 0 ? far_len[k] : 0, NULL);
            for (size_t i = 0, k = 0; i < n; i++) {
                if (!results[i]) continue;
                results[i] = far_rc[k];
                lens[i] = far_len[k++];
                if (results[i] == 0) ram_put(s, &expect[i].key, bufs[i], lens[i]);
            }
        }
        if (far != stack_far) free(far);
        if (far_len != stack_len) free(far_len);
        if (far_rc != stack_rc) free(far_rc);
    }
    int hits = 0;
    for (size_t i = 0; i < n; i++) {
        char e2[256] = "";
        results[i] =
            settle_verified(s, &expect[i], NULL, bufs[i], results[i], &lens[i], e2, sizeof(e2));
        hits += results[i] == 0;
        if (results[i] && err && errlen && !err[0]) snprintf(err, errlen, "%s", e2[0] ? e2 : e1);
    }
    if (keys != stack_keys) free(keys);
    if (v0 != stack_v0) free(v0);
    add(&s->ctr.read_ns, cake_now_ns() - t0);
    return hits;
}

int cake_store_load(cake_store *s, const cake_chunk_header *expect, void *buf, size_t cap,
                    cake_kv_cache *kv, int pos0, char *err, size_t errlen) {
    /* Check the fit first: a chunk that cannot go into kv is the caller's
     * mistake, not a corrupt chunk to delete. */
    if (!kv || !kv->base || expect->n_layers != (uint32_t)kv->n_layers ||
        expect->n_kv_heads != (uint32_t)kv->n_kv_heads ||
        expect->head_dim != (uint32_t)kv->head_dim || expect->dtype != (uint32_t)kv->type ||
        pos0 < 0 || (uint64_t)pos0 + expect->n_tokens > (uint64_t)kv->n_ctx)
        return cake_err(err, errlen, "load: chunk %u does not fit the KV cache at position %d",
                        expect->index, pos0);
    size_t len;
    int rc = cake_store_get_verified(s, expect, buf, cap, &len, err, errlen);
    if (rc != 0) return rc;
    return cake_chunk_copy_into(buf, expect, kv, pos0, err, errlen);
}

int cake_store_put(cake_store *s, const cake_chunk_key *key, const void *blob, size_t len,
                   char *err, size_t errlen) {
    request_latency(s, NULL);
    double v0 = s->emulate ? link_join(&s->wr) : 0;
    int rc = s->ops->put(s->b, key, blob, len, err, errlen);
    if (s->emulate) link_finish(&s->wr, v0, rc == 0 ? len : 0, NULL);
    if (rc == 0) {
        /* Only a chunk the backend took: one held in RAM alone would look
         * present to lookups here, and so never be put again, while the
         * servers sharing the store lack it. */
        ram_put(s, key, blob, len);
        add(&s->ctr.puts, 1);
        add(&s->ctr.bytes_written, len);
    } else {
        add(&s->ctr.errors, 1);
    }
    return rc;
}

int cake_store_save(cake_store *s, cake_chunk_header *h, const cake_kv_cache *kv, int pos0,
                    void *buf, size_t cap, char *err, size_t errlen) {
    if (cake_chunk_encode(h, kv, pos0, buf, cap, err, errlen)) return -1;
    return cake_store_put(s, &h->key, buf, cake_chunk_blob_size(h), err, errlen);
}

int cake_store_exists(cake_store *s, const cake_chunk_key *keys, size_t n, uint8_t *present,
                      char *err, size_t errlen) {
    memset(present, 0, n);
    if (!n) return 0;
    if (s->emulate) link_fresh(&s->rd);
    /* What the RAM tier holds is there, whatever the backend says; when it
     * holds them all, the backend is not asked. */
    uint8_t *in_ram = s->ram ? calloc(n, 1) : NULL;
    char e[64];
    size_t n_ram = 0;
    if (in_ram && cake_store_mem_ops.exists(s->ram, keys, n, in_ram, e, sizeof(e)) == 0)
        for (size_t i = 0; i < n; i++) n_ram += in_ram[i];
    int rc = 0;
    if (n_ram < n) {
        const uint64_t t0 = cake_now_ns();
        request_latency(s, NULL);
        /* A failing backend leaves present[] as far as it could tell (a
         * sharded Redis: the servers that answered), the rest absent. */
        if ((rc = s->ops->exists(s->b, keys, n, present, err, errlen))) add(&s->ctr.errors, 1);
        /* (a running mean of the last few: one slow answer moves it a quarter) */
        const uint64_t took = cake_now_ns() - t0, was = atomic_load(&s->exists_ns);
        atomic_store(&s->exists_ns, was ? (3 * was + took) / 4 : took);
    }
    for (size_t i = 0; in_ram && i < n; i++) present[i] |= in_ram[i];
    free(in_ram);
    return rc;
}

int cake_store_del(cake_store *s, const cake_chunk_key *key, char *err, size_t errlen) {
    char e[64];
    const int in_ram = s->ram && cake_store_mem_ops.del(s->ram, key, e, sizeof(e)) == 0;
    request_latency(s, NULL);
    int rc = s->ops->del(s->b, key, err, errlen);
    if (rc < 0) add(&s->ctr.errors, 1);
    return rc == 1 && in_ram ? 0 : rc;
}

int cake_store_prefetch(cake_store *s, const cake_chunk_key *keys, size_t n, size_t blob_size,
                        const atomic_int *stop) {
    if (!s->ram || !n) return 0;
    uint8_t *in_ram = calloc(n, 1);
    void *buf = cake_store_alloc_buffer(blob_size);
    char e[256];
    int fetched = 0;
    if (in_ram && buf && cake_store_mem_ops.exists(s->ram, keys, n, in_ram, e, sizeof(e)) == 0)
        for (size_t i = 0; i < n && !(stop && atomic_load(stop)); i++) {
            size_t len;
            if (in_ram[i] || emulated_get(s, &keys[i], NULL, buf, cake_store_buffer_size(blob_size),
                                          &len, NULL, e, sizeof(e)) != 0)
                continue;
            add(&s->ctr.prefetched, 1);
            fetched++;
        }
    free(in_ram);
    cake_store_free_buffer(buf);
    return fetched;
}

bool cake_store_has_ram(const cake_store *s) {
    return s->ram != NULL;
}

void cake_store_in_ram(cake_store *s, const cake_chunk_key *keys, size_t n, uint8_t *near) {
    char e[64];
    if (!s->ram || cake_store_mem_ops.exists(s->ram, keys, n, near, e, sizeof(e)) != 0)
        memset(near, 0, n);
}

int cake_store_head(cake_store *s, const cake_chunk_key *key, void *buf, size_t n, size_t *len,
                    uint64_t *total, char *err, size_t errlen) {
    *len = 0;
    *total = 0;
    int rc = s->ops->head(s->b, key, buf, n, len, total, err, errlen);
    if (rc < 0) add(&s->ctr.errors, 1);
    return rc;
}

int cake_store_iterate(cake_store *s, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen) {
    return s->ops->iterate(s->b, fn, ctx, err, errlen);
}

typedef struct {
    cake_store_entry *v;
    size_t n, cap;
    uint64_t bytes;
    int oom;
} entry_list;

static int add_entry(const cake_store_entry *e, void *ctx) {
    entry_list *l = ctx;
    if (l->n == l->cap) {
        const size_t cap = l->cap ? 2 * l->cap : 256;
        cake_store_entry *v = realloc(l->v, cap * sizeof(*v));
        if (!v) return l->oom = 1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = *e;
    l->bytes += e->size;
    return 0;
}

static int list_entries(const cake_store_ops *ops, void *b, entry_list *l, char *err,
                        size_t errlen) {
    *l = (entry_list){0};
    if (ops->iterate(b, add_entry, l, err, errlen) || l->oom) {
        free(l->v);
        return l->oom ? cake_err(err, errlen, "out of memory listing the store") : -1;
    }
    return 0;
}

int cake_store_list(cake_store *s, cake_store_entry **out, size_t *n, char *err, size_t errlen) {
    entry_list l;
    *out = NULL;
    *n = 0;
    if (list_entries(s->ops, s->b, &l, err, errlen)) return -1;
    *out = l.v;
    *n = l.n;
    return 0;
}

static int by_last_use(const void *a, const void *b) {
    const cake_store_entry *x = a, *y = b;
    if (x->last_used != y->last_used) return x->last_used < y->last_used ? -1 : 1;
    return memcmp(x->key.b, y->key.b, sizeof(x->key.b));
}

int cake_store_backend_by_age(const cake_store_ops *ops, void *b, cake_store_entry **out, size_t *n,
                              uint64_t *bytes, char *err, size_t errlen) {
    entry_list l;
    *out = NULL;
    *n = 0;
    *bytes = 0;
    if (list_entries(ops, b, &l, err, errlen)) return -1;
    if (l.n) qsort(l.v, l.n, sizeof(*l.v), by_last_use);
    *out = l.v;
    *n = l.n;
    *bytes = l.bytes;
    return 0;
}

static int count_entry(const cake_store_entry *e, void *ctx) {
    cake_store_usage *u = ctx;
    u->n_chunks++;
    u->bytes += e->size;
    return 0;
}

int cake_store_backend_count(const cake_store_ops *ops, void *b, cake_store_usage *u, char *err,
                             size_t errlen) {
    u->n_chunks = u->bytes = 0;
    return ops->iterate(b, count_entry, u, err, errlen) ? -1 : 0;
}

int cake_store_usage_get(cake_store *s, cake_store_usage *u, char *err, size_t errlen) {
    memset(u, 0, sizeof(*u));
    return s->ops->usage(s->b, u, err, errlen);
}

int cake_store_gc(cake_store *s, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed,
                  char *err, size_t errlen) {
    uint64_t n = 0, b = 0;
    int rc = s->ops->gc(s->b, target, &n, &b, err, errlen);
    add(&s->ctr.evictions, n);
    if (n_evicted) *n_evicted = n;
    if (bytes_freed) *bytes_freed = b;
    return rc;
}

uint64_t cake_store_lookup_ns(const cake_store *s) {
    return atomic_load(&((cake_store *)s)->exists_ns);
}

void cake_store_set_lookup_ns(cake_store *s, uint64_t ns) {
    atomic_store(&s->exists_ns, ns);
}

double cake_store_rate_hint(const cake_store *s) {
    return atomic_load(&((cake_store *)s)->rate_hint);
}

void cake_store_set_rate_hint(cake_store *s, double bytes_per_ns) {
    atomic_store(&s->rate_hint, bytes_per_ns);
}

void cake_store_counters_get(const cake_store *s, cake_store_counters *o) {
    cake_store_atomic_counters *c = (cake_store_atomic_counters *)&s->ctr;
    o->hits = atomic_load(&c->hits);
    o->misses = atomic_load(&c->misses);
    o->corrupt = atomic_load(&c->corrupt);
    o->errors = atomic_load(&c->errors);
    o->bytes_read = atomic_load(&c->bytes_read);
    o->bytes_written = atomic_load(&c->bytes_written);
    o->read_ns = atomic_load(&c->read_ns);
    o->puts = atomic_load(&c->puts);
    o->evictions = atomic_load(&c->evictions);
    o->ram_hits = atomic_load(&c->ram_hits);
    o->prefetched = atomic_load(&c->prefetched);
}
