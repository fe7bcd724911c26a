/* cake store: inspect and maintain a KV chunk store (any backend URI).
 *
 *   ls      one line per chunk: key, model, index, tokens, size, age, idle
 *   stat    totals, per model
 *   verify  reads every chunk in full and checks header and checksums
 *   rm      removes chunks by key, by model, or all
 *   gc      removes leftovers of interrupted writes; evicts LRU to a size
 *   keys    prints the chunk keys of a token sequence (for debugging) */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "store/store.h"
#include "store/store_impl.h"

static const char *help =
    "usage: cake store COMMAND [--store URI] [options]\n"
    "Inspects and maintains a KV chunk store. URI: file:PATH,\n"
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], redis+unix:///PATH or mem: (default:\n"
    "file:, the user cache directory).\n"
    "\n"
    "commands:\n"
    "  ls [--model HEX] [--json]   list chunks: key, model, index, tokens, size, age\n"
    "                              (since written) and idle time (since last use)\n"
    "  stat [--json]               totals and one line per model\n"
    "  verify [--delete]           read every chunk, check its header and checksums;\n"
    "                              report bad ones (exit 1 if any); --delete removes them\n"
    "  rm KEY... | --model HEX | --all\n"
    "                              remove chunks (HEX: a fingerprint or a prefix of one)\n"
    "  gc [--size SIZE]            remove leftovers of interrupted writes, then evict\n"
    "                              least recently used chunks down to SIZE (default: the\n"
    "                              URI's capacity=, if any)\n"
    "  keys --fingerprint HEX --chunk N [--kv-type f16|f32|q8_0|q4_0] --tokens \"IDS\"\n"
    "                              print the key of every full chunk of a token sequence\n"
    "                              (and whether the store has it, with --store)\n";

typedef struct {
    const char *store, *model, *size, *fingerprint, *tokens;
    long chunk;
    int json, del, all;
    enum cake_kv_type kv_type;
} store_opts;

static const char *human(uint64_t b, char *buf, size_t n) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int i = 0;
    while (v >= 1024 && i < 4) v /= 1024, i++;
    snprintf(buf, n, i ? "%.1f %s" : "%.0f %s", v, u[i]);
    return buf;
}

static const char *duration(int64_t s, char *buf, size_t n) {
    if (s < 0)
        snprintf(buf, n, "-");
    else if (s < 120)
        snprintf(buf, n, "%" PRId64 "s", s);
    else if (s < 7200)
        snprintf(buf, n, "%" PRId64 "m", s / 60);
    else if (s < 172800)
        snprintf(buf, n, "%" PRId64 "h", s / 3600);
    else
        snprintf(buf, n, "%" PRId64 "d", s / 86400);
    return buf;
}

/* ---- listing: every entry with its header ---- */

typedef struct {
    cake_store_entry e;
    cake_chunk_header h;
    int ok; /* header parsed */
    char why[160];
} item;

typedef struct {
    cake_store *s;
    item *v;
    size_t n;
} item_list;

static void read_headers(item_list *l) {
    for (size_t i = 0; i < l->n; i++) {
        item *it = &l->v[i];
        uint8_t hdr[CAKE_CHUNK_HEADER_SIZE];
        size_t len;
        uint64_t total;
        int rc = cake_store_head(l->s, &it->e.key, hdr, sizeof(hdr), &len, &total, it->why,
                                 sizeof(it->why));
        if (rc == 1)
            snprintf(it->why, sizeof(it->why), "removed meanwhile");
        else if (rc == 0 &&
                 cake_chunk_parse_header(hdr, len, &it->h, it->why, sizeof(it->why)) == 0)
            it->ok = 1;
    }
}

static int by_model_index(const void *a, const void *b) {
    const item *x = a, *y = b;
    if (x->ok != y->ok) return y->ok - x->ok;
    int c = memcmp(x->h.fingerprint, y->h.fingerprint, 16);
    if (c) return c;
    if (x->h.n_tokens != y->h.n_tokens) return x->h.n_tokens < y->h.n_tokens ? -1 : 1;
    if (x->h.index != y->h.index) return x->h.index < y->h.index ? -1 : 1;
    return memcmp(x->e.key.b, y->e.key.b, 16);
}

/* Fingerprint filter: a full hex fingerprint or a prefix of one. */
static int model_matches(const item *it, const char *hex) {
    if (!hex) return 1;
    if (!it->ok) return 0;
    char fp[33];
    cake_hex16(it->h.fingerprint, fp);
    return strncasecmp(fp, hex, strlen(hex)) == 0;
}

static int list_all(cake_store *s, item_list *l, int headers, char *err, size_t errlen) {
    memset(l, 0, sizeof(*l));
    l->s = s;
    cake_store_entry *e;
    size_t n;
    if (cake_store_list(s, &e, &n, err, errlen)) return -1;
    l->v = calloc(n ? n : 1, sizeof(*l->v));
    if (!l->v) {
        free(e);
        snprintf(err, errlen, "out of memory listing the store");
        return -1;
    }
    for (size_t i = 0; i < n; i++) l->v[i].e = e[i];
    l->n = n;
    free(e);
    if (headers) {
        read_headers(l);
        if (l->n) qsort(l->v, l->n, sizeof(*l->v), by_model_index);
    }
    return 0;
}

static int do_ls(cake_store *s, const store_opts *o) {
    item_list l;
    char err[512], a[33], b[33], sz[32], age[24], idle[24];
    if (list_all(s, &l, 1, err, sizeof(err))) return cli_error(CLI_FAIL, "store", "%s", err);
    int64_t now = (int64_t)time(NULL);
    if (!o->json)
        printf("%-32s  %-16s  %5s  %6s  %10s  %5s  %5s\n", "KEY", "MODEL", "INDEX", "TOKENS",
               "SIZE", "AGE", "IDLE");
    for (size_t i = 0; i < l.n; i++) {
        item *it = &l.v[i];
        if (!model_matches(it, o->model)) continue;
        cake_key_hex(&it->e.key, a);
        int64_t idle_s = it->e.last_used ? now - it->e.last_used : -1;
        if (o->json) {
            printf("{\"key\":\"%s\",\"size\":%" PRIu64 ",\"idle_s\":%" PRId64, a, it->e.size,
                   idle_s);
            if (it->ok)
                printf(",\"model\":\"%s\",\"index\":%" PRIu32 ",\"tokens\":%" PRIu32
                       ",\"layers\":%" PRIu32 ",\"kv_heads\":%" PRIu32 ",\"head_dim\":%" PRIu32
                       ",\"dtype\":\"%s\",\"age_s\":%" PRId64 "}\n",
                       cake_hex16(it->h.fingerprint, b), it->h.index, it->h.n_tokens,
                       it->h.n_layers, it->h.n_kv_heads, it->h.head_dim,
                       cli_kv_type_name((enum cake_kv_type)it->h.dtype),
                       now - (int64_t)it->h.created);
            else {
                printf(",\"error\":");
                cli_json_string(stdout, it->why, strlen(it->why));
                printf("}\n");
            }
        } else if (it->ok) {
            printf("%s  %.16s  %5" PRIu32 "  %6" PRIu32 "  %10s  %5s  %5s\n", a,
                   cake_hex16(it->h.fingerprint, b), it->h.index, it->h.n_tokens,
                   human(it->e.size, sz, sizeof(sz)),
                   duration(now - (int64_t)it->h.created, age, sizeof(age)),
                   duration(idle_s, idle, sizeof(idle)));
        } else {
            printf("%s  %-16s  %5s  %6s  %10s  %5s  %5s  (%s)\n", a, "?", "?", "?",
                   human(it->e.size, sz, sizeof(sz)), "?", duration(idle_s, idle, sizeof(idle)),
                   it->why);
        }
    }
    free(l.v);
    return CLI_OK;
}

static int do_stat(cake_store *s, const store_opts *o) {
    item_list l;
    char err[512], sz[32], fp[33];
    if (list_all(s, &l, 1, err, sizeof(err))) return cli_error(CLI_FAIL, "store", "%s", err);
    cake_store_usage u;
    if (cake_store_usage_get(s, &u, err, sizeof(err)))
        return free(l.v), cli_error(CLI_FAIL, "store", "%s", err);
    uint64_t total = 0, bad = 0;
    int64_t oldest = 0, now = (int64_t)time(NULL);
    size_t models = 0;
    for (size_t i = 0; i < l.n; i++) {
        total += l.v[i].e.size;
        bad += !l.v[i].ok;
        if (l.v[i].ok && (!oldest || (int64_t)l.v[i].h.created < oldest))
            oldest = (int64_t)l.v[i].h.created;
        if (l.v[i].ok && (i == 0 || !l.v[i - 1].ok ||
                          memcmp(l.v[i].h.fingerprint, l.v[i - 1].h.fingerprint, 16) ||
                          l.v[i].h.n_tokens != l.v[i - 1].h.n_tokens))
            models++;
    }
    if (o->json) {
        printf("{\"store\":");
        cli_json_string(stdout, cake_store_uri(s), strlen(cake_store_uri(s)));
        printf(",\"kind\":\"%s\",\"chunks\":%zu,\"bytes\":%" PRIu64 ",\"capacity\":%" PRIu64
               ",\"bad_headers\":%" PRIu64 ",\"models\":[",
               cake_store_kind(s), l.n, total, u.capacity, bad);
    } else {
        printf("store     %s\nkind      %s\nchunks    %zu\nbytes     %s (%" PRIu64 ")\n",
               cake_store_uri(s), cake_store_kind(s), l.n, human(total, sz, sizeof(sz)), total);
        printf("capacity  %s\n", u.capacity ? human(u.capacity, sz, sizeof(sz)) : "none");
        if (oldest) {
            char d[24];
            printf("oldest    %s\n", duration(now - oldest, d, sizeof(d)));
        }
        if (bad) printf("unreadable headers: %" PRIu64 " (run `cake store verify`)\n", bad);
        printf("models    %zu\n", models);
    }
    int first = 1;
    for (size_t i = 0; i < l.n;) {
        if (!l.v[i].ok) break;
        size_t j = i;
        uint64_t bytes = 0;
        while (j < l.n && l.v[j].ok && !memcmp(l.v[j].h.fingerprint, l.v[i].h.fingerprint, 16) &&
               l.v[j].h.n_tokens == l.v[i].h.n_tokens)
            bytes += l.v[j++].e.size;
        const cake_chunk_header *h = &l.v[i].h;
        cake_hex16(h->fingerprint, fp);
        if (o->json)
            printf("%s{\"model\":\"%s\",\"chunks\":%zu,\"bytes\":%" PRIu64 ",\"tokens\":%" PRIu32
                   ",\"layers\":%" PRIu32 ",\"kv_heads\":%" PRIu32 ",\"head_dim\":%" PRIu32
                   ",\"dtype\":\"%s\"}",
                   first ? "" : ",", fp, j - i, bytes, h->n_tokens, h->n_layers, h->n_kv_heads,
                   h->head_dim, cli_kv_type_name((enum cake_kv_type)h->dtype));
        else
            printf("  %s  %zu chunks, %s, %" PRIu32 " tokens/chunk, %" PRIu32 " layers x %" PRIu32
                   " KV heads x %" PRIu32 ", %s\n",
                   fp, j - i, human(bytes, sz, sizeof(sz)), h->n_tokens, h->n_layers, h->n_kv_heads,
                   h->head_dim, cli_kv_type_name((enum cake_kv_type)h->dtype));
        first = 0;
        i = j;
    }
    if (o->json) printf("]}\n");
    free(l.v);
    return CLI_OK;
}

static int do_verify(cake_store *s, const store_opts *o) {
    item_list l;
    char err[512], hex[33], sz[32];
    if (list_all(s, &l, 0, err, sizeof(err))) return cli_error(CLI_FAIL, "store", "%s", err);
    void *buf = NULL;
    size_t cap = 0;
    uint64_t n_ok = 0, n_bad = 0, n_gone = 0, bytes = 0;
    for (size_t i = 0; i < l.n; i++) {
        const cake_store_entry *e = &l.v[i].e;
        size_t need = cake_store_buffer_size((size_t)e->size + 4096); /* room to see growth */
        if (need > cap) {
            cake_store_free_buffer(buf);
            if (!(buf = cake_store_alloc_buffer(need))) {
                free(l.v);
                return cli_error(CLI_FAIL, "store", "out of memory for a %s chunk",
                                 human(e->size, sz, sizeof(sz)));
            }
            cap = need;
        }
        size_t len;
        cake_key_hex(&e->key, hex);
        int rc = cake_store_get(s, &e->key, buf, cap, &len, err, sizeof(err));
        if (rc == 1 && !err[0]) { /* removed since the listing */
            n_gone++;
            continue;
        }
        cake_chunk_header h;
        if (rc == 0 && cake_chunk_verify(buf, len, NULL, &h, err, sizeof(err)) == 0) {
            if (cake_key_equal(&h.key, &e->key)) {
                n_ok++;
                bytes += len;
                continue;
            }
            char k2[33];
            snprintf(err, sizeof(err), "stored under this key but its header says key %s",
                     cake_key_hex(&h.key, k2));
        }
        n_bad++;
        printf("BAD %s: %s", hex, err);
        if (o->del) {
            char e2[256];
            int d = cake_store_del(s, &e->key, e2, sizeof(e2));
            printf(d < 0 ? " (remove failed: %s)" : " (removed)", e2);
        }
        putchar('\n');
    }
    printf("verified %" PRIu64 " chunks (%s): %" PRIu64 " ok, %" PRIu64 " bad", n_ok + n_bad,
           human(bytes, sz, sizeof(sz)), n_ok, n_bad);
    if (n_gone) printf(", %" PRIu64 " removed meanwhile", n_gone);
    putchar('\n');
    cake_store_free_buffer(buf);
    free(l.v);
    if (n_bad)
        return cli_error(CLI_FAIL, "store", "verify: %" PRIu64 " bad chunk%s in %s", n_bad,
                         n_bad > 1 ? "s" : "", cake_store_uri(s));
    return CLI_OK;
}

static int do_rm(cake_store *s, const store_opts *o, int nkeys, char **keys) {
    char err[512], hex[33];
    if (!!nkeys + !!o->model + o->all != 1)
        return cli_error(CLI_USAGE, "store", "rm: give keys, or --model HEX, or --all");
    uint64_t removed = 0, absent = 0;
    for (int i = 0; i < nkeys; i++) {
        cake_chunk_key k;
        if (cake_key_parse(keys[i], &k))
            return cli_error(CLI_USAGE, "store", "rm: '%s' is not a key (32 hex digits)", keys[i]);
    }
    if (nkeys) {
        for (int i = 0; i < nkeys; i++) {
            cake_chunk_key k;
            cake_key_parse(keys[i], &k);
            int rc = cake_store_del(s, &k, err, sizeof(err));
            if (rc < 0) return cli_error(CLI_FAIL, "store", "%s", err);
            if (rc == 1) {
                fprintf(stderr, "cake store: %s: no such chunk\n", keys[i]);
                absent++;
            }
            removed += rc == 0;
        }
    } else {
        item_list l;
        if (list_all(s, &l, o->model != NULL, err, sizeof(err)))
            return cli_error(CLI_FAIL, "store", "%s", err);
        for (size_t i = 0; i < l.n; i++) {
            if (o->model && !model_matches(&l.v[i], o->model)) continue;
            int rc = cake_store_del(s, &l.v[i].e.key, err, sizeof(err));
            if (rc < 0) {
                free(l.v);
                return cli_error(CLI_FAIL, "store", "%s: %s", cake_key_hex(&l.v[i].e.key, hex),
                                 err);
            }
            removed += rc == 0;
        }
        free(l.v);
    }
    printf("removed %" PRIu64 " chunks\n", removed);
    return absent ? CLI_FAIL : CLI_OK;
}

static int do_gc(cake_store *s, const store_opts *o) {
    char err[512], a[32], b[32];
    uint64_t target = UINT64_MAX;
    cake_store_usage u;
    if (cake_store_usage_get(s, &u, err, sizeof(err)))
        return cli_error(CLI_FAIL, "store", "%s", err);
    if (o->size) {
        if (cake_parse_size(o->size, &target))
            return cli_error(CLI_USAGE, "store", "gc: bad --size '%s' (e.g. 10G, 512MiB)", o->size);
    } else if (u.capacity) {
        target = u.capacity;
    }
    uint64_t n = 0, freed = 0;
    char why[512] = ""; /* (chunks it could not remove: said after what it did) */
    const int failed = cake_store_gc(s, target, &n, &freed, why, sizeof(why)) != 0;
    if (cake_store_usage_get(s, &u, err, sizeof(err)))
        return cli_error(CLI_FAIL, "store", "%s", failed ? why : err);
    printf("evicted %" PRIu64 " chunks (%s); the store holds %" PRIu64 " chunks, %s\n", n,
           human(freed, a, sizeof(a)), u.n_chunks, human(u.bytes, b, sizeof(b)));
    return failed ? cli_error(CLI_FAIL, "store", "gc: %s", why) : CLI_OK;
}

static int do_keys(cake_store *s, const store_opts *o) {
    uint8_t fp[16];
    if (!o->fingerprint || cake_parse_hex16(o->fingerprint, fp))
        return cli_error(CLI_USAGE, "store", "keys: --fingerprint needs 32 hex digits");
    if (o->chunk <= 0) return cli_error(CLI_USAGE, "store", "keys: --chunk N is required");
    if (!o->tokens) return cli_error(CLI_USAGE, "store", "keys: --tokens \"IDS\" is required");
    size_t n = 0, cap = 256;
    cake_token *t = malloc(cap * sizeof(*t));
    const char *p = o->tokens;
    while (t) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == ',') p++;
        if (!*p) break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX) { /* (token ids, as cake run takes them) */
            free(t);
            return cli_error(CLI_USAGE, "store", "keys: bad token id near '%.20s'", p);
        }
        if (n == cap) {
            cake_token *nt = realloc(t, 2 * cap * sizeof(*t));
            if (!nt) break;
            t = nt;
            cap *= 2;
        }
        t[n++] = (cake_token)v;
        p = end;
    }
    size_t nk = cake_key_chain(fp, (uint32_t)o->chunk, o->kv_type, t, n, NULL);
    cake_chunk_key *k = malloc((nk ? nk : 1) * sizeof(*k));
    uint8_t *present = calloc(nk ? nk : 1, 1);
    if (!t || !k || !present) {
        free(t), free(k), free(present);
        return cli_error(CLI_FAIL, "store", "out of memory");
    }
    cake_key_chain(fp, (uint32_t)o->chunk, o->kv_type, t, n, k);
    char err[512], hex[33];
    int have = s && cake_store_exists(s, k, nk, present, err, sizeof(err)) == 0;
    if (s && !have) fprintf(stderr, "cake store: %s\n", err);
    for (size_t i = 0; i < nk; i++)
        printf("%zu %s%s\n", i, cake_key_hex(&k[i], hex),
               have ? (present[i] ? " present" : " absent") : "");
    free(t), free(k), free(present);
    /* (the keys are printed even so: they need no store) */
    return s && !have ? CLI_FAIL : CLI_OK;
}

int cmd_store(int argc, char **argv) {
    static const struct option opts[] = {{"store", required_argument, 0, 's'},
                                         {"model", required_argument, 0, 'M'},
                                         {"json", no_argument, 0, 'j'},
                                         {"delete", no_argument, 0, 'd'},
                                         {"all", no_argument, 0, 'a'},
                                         {"size", required_argument, 0, 'S'},
                                         {"fingerprint", required_argument, 0, 'F'},
                                         {"chunk", required_argument, 0, 'c'},
                                         {"kv-type", required_argument, 0, 'k'},
                                         {"tokens", required_argument, 0, 't'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    store_opts o = {0};
    o.kv_type = CAKE_KV_F16;
    int c;
    optind = 1;
    opterr = 0; /* one line of our own instead */
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 's':
            o.store = optarg;
            break;
        case 'M':
            o.model = optarg;
            break;
        case 'j':
            o.json = 1;
            break;
        case 'd':
            o.del = 1;
            break;
        case 'a':
            o.all = 1;
            break;
        case 'S':
            o.size = optarg;
            break;
        case 'F':
            o.fingerprint = optarg;
            break;
        case 't':
            o.tokens = optarg;
            break;
        case 'c':
            if (cli_parse_int(optarg, 1, 1 << 24, &o.chunk))
                return cli_error(CLI_USAGE, "store", "bad --chunk '%s'", optarg);
            break;
        case 'k':
            if (cli_parse_kv_type(optarg, &o.kv_type))
                return cli_error(CLI_USAGE, "store", "bad --kv-type '%s' (f16, f32, q8_0 or q4_0)",
                                 optarg);
            break;
        case 'h':
            fputs(help, stdout);
            return CLI_OK;
        case ':':
            return cli_error(CLI_USAGE, "store", "option '%s' needs a value", argv[optind - 1]);
        default:
            return cli_error(CLI_USAGE, "store", "bad option '%s' (see cake store --help)",
                             argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return cli_error(CLI_USAGE, "store",
                         "missing command: ls, stat, verify, rm, gc or keys "
                         "(see cake store --help)");
    const char *cmd = argv[optind++];
    int nargs = argc - optind;
    char **args = argv + optind;
    static const char *cmds[] = {"ls", "stat", "verify", "rm", "gc", "keys"};
    int which = -1;
    for (int i = 0; i < 6; i++)
        if (!strcmp(cmd, cmds[i])) which = i;
    if (which < 0)
        return cli_error(CLI_USAGE, "store",
                         "unknown command '%s' (ls, stat, verify, "
                         "rm, gc, keys)",
                         cmd);
    if (which != 3 && nargs)
        return cli_error(CLI_USAGE, "store", "%s: unexpected argument '%s'", cmd, args[0]);
    if (o.model && (strlen(o.model) < 1 || strlen(o.model) > 32 ||
                    strspn(o.model, "0123456789abcdefABCDEF") != strlen(o.model)))
        return cli_error(CLI_USAGE, "store", "--model needs hex digits (a fingerprint or prefix)");

    cake_store *s = NULL;
    char err[512];
    /* a malformed URI is a usage error, an unreachable store a failure */
    if (o.store && cli_check_store_uri("store", o.store)) return CLI_USAGE;
    if (which != 5 || o.store) {
        if (cake_store_open(o.store ? o.store : "file:", &s, err, sizeof(err)))
            return cli_error(CLI_FAIL, "store", "%s", err);
    }
    int rc;
    switch (which) {
    case 0:
        rc = do_ls(s, &o);
        break;
    case 1:
        rc = do_stat(s, &o);
        break;
    case 2:
        rc = do_verify(s, &o);
        break;
    case 3:
        rc = do_rm(s, &o, nargs, args);
        break;
    case 4:
        rc = do_gc(s, &o);
        break;
    default:
        rc = do_keys(s, &o);
        break;
    }
    cake_store_close(s);
    return rc;
}
