/* Hints kept across runs of `cake run`: the loader's compute speed, the
 * store's load rate and how long its lookups take.
 *
 * A process's first request knows neither. The loader then computes the
 * first chunk whatever the store's speed, and sends one transfer alone until
 * it has a rate (docs/LOADER.md). Every `cake run` is a process's first
 * request: on a fast store, a warm Cake run took 1.7x as long as load-only
 * (~520 against ~300 ms for 2389 tokens of mha-160m from a local disk). So
 * each run leaves what it measured in a small text file, and the next run
 * starts from it:
 *
 *     speed <model fingerprint>/<backend>/<threads>t/<chunk> <count> <ns/FLOP> x5
 *     rate <store URI> <bytes/ns>
 *     lookup <store URI> <ns>
 *
 * newest first, at most MAX_LINES. The file is $CAKE_HINTS, else
 * $XDG_CACHE_HOME/cake/hints, else $HOME/.cache/cake/hints; CAKE_HINTS set
 * and empty turns hints off. It is written whole under another name, then
 * renamed, so a reader never sees half of it. A missing, unreadable or
 * malformed file (or line) is ignored: it costs only the first request's
 * guesses. A hint is only a starting point: the loader's estimates move with
 * what each request measures. */
#include "cli/hints.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/fs.h"

#define MAX_LINES 64
#define LINE_MAX_ 1200

/* The file's path; 0, or -1 when hints are off or there is no home. */
static int hints_path(char *out, size_t n) {
    const char *env = getenv("CAKE_HINTS");
    if (env) return *env && snprintf(out, n, "%s", env) < (int)n ? 0 : -1;
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    int k = xdg && *xdg     ? snprintf(out, n, "%s/cake/hints", xdg)
            : home && *home ? snprintf(out, n, "%s/.cache/cake/hints", home)
                            : -1;
    return k > 0 && (size_t)k < n ? 0 : -1;
}

void cli_hints_speed_key(char *out, size_t n, cake_context *engine, const char *backend,
                         long chunk) {
    cake_loader_engine le;
    cake_context_loader_engine(engine, 1, &le);
    char fp[33];
    snprintf(out, n, "%s/%s/%dt/%ld", cake_hex16(le.fingerprint, fp), backend,
             cake_context_n_threads(engine), chunk);
}

/* Creates the folder that path is in. */
static void make_parents(const char *path) {
    char dir[1024];
    if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir)) return;
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return;
    *slash = '\0';
    (void)cake_mkdir_p(dir);
}

/* A key fits a line's one field: no blanks, not empty, not too long. */
static int key_ok(const char *key) {
    return key && *key && strlen(key) < 1024 && !strpbrk(key, " \t\r\n");
}

/* A key as the file writes it: blanks and '%' as %XX, so that a store in a
 * folder with a space in its name (file:/srv/my cache) has its hints too.
 * NULL (no hint for it) when it does not fit. */
static const char *field_of(const char *key, char out[1024]) {
    if (!key) return NULL;
    size_t o = 0;
    for (const char *c = key; *c; c++) {
        if (o + 4 > 1024) return NULL;
        if (strchr(" \t\r\n%", *c))
            o += (size_t)snprintf(out + o, 4, "%%%02X", (unsigned char)*c);
        else
            out[o++] = *c;
    }
    out[o] = '\0';
    return out;
}

/* One line of the file: 1 and its parts when it is a well-formed hint (a
 * speed in *speed, a rate or lookup time in *value). */
static int parse_line(const char *line, char kind[8], char key[1024], cake_compute_speed *speed,
                      double *value) {
    if (!strchr(line, '\n') || sscanf(line, "%7s %1023s", kind, key) != 2) return 0;
    if (!strcmp(kind, "rate") || !strcmp(kind, "lookup")) /* bytes/ns; ns */
        return sscanf(line, "%*s %*s %lf", value) == 1 && *value > 0 &&
               *value < (kind[0] == 'r' ? 1e6 : 1e12);
    unsigned count;
    cake_compute_speed s = {0};
    if (strcmp(kind, "speed") ||
        sscanf(line, "%*s %*s %u %lf %lf %lf %lf %lf", &count, &s.ns_per_flop[0], &s.ns_per_flop[1],
               &s.ns_per_flop[2], &s.ns_per_flop[3], &s.ns_per_flop[4]) != 1 + CAKE_SPEED_SAMPLES ||
        count == 0)
        return 0;
    for (unsigned i = 0; i < CAKE_SPEED_SAMPLES && i < count; i++)
        if (!(s.ns_per_flop[i] > 0 && s.ns_per_flop[i] < 1e9)) return 0;
    s.count = count;
    *speed = s;
    return 1;
}

void cli_hints_load(const char *speed_key_, cake_compute_speed *speed, const char *rate_key_,
                    cake_store *store) {
    char path[1024], line[LINE_MAX_], kind[8], key[1024], speed_field[1024], rate_field[1024];
    const char *speed_key = field_of(speed_key_, speed_field);
    const char *rate_key = field_of(rate_key_, rate_field);
    if (hints_path(path, sizeof(path))) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    int have_speed = 0, have_rate = 0, have_lookup = 0;
    cake_compute_speed s;
    double value;
    while (fgets(line, sizeof(line), f)) {
        if (!parse_line(line, kind, key, &s, &value)) continue;
        if (!have_speed && !strcmp(kind, "speed") && key_ok(speed_key) && !strcmp(key, speed_key)) {
            *speed = s;
            have_speed = 1;
        } else if (!have_rate && !strcmp(kind, "rate") && store && key_ok(rate_key) &&
                   !strcmp(key, rate_key)) {
            cake_store_set_rate_hint(store, value);
            have_rate = 1;
        } else if (!have_lookup && !strcmp(kind, "lookup") && store && key_ok(rate_key) &&
                   !strcmp(key, rate_key)) {
            cake_store_set_lookup_ns(store, (uint64_t)value);
            have_lookup = 1;
        }
    }
    fclose(f);
}

void cli_hints_save(const char *speed_key_, const cake_compute_speed *speed, const char *rate_key_,
                    const cake_store *store) {
    char path[1024], tmp[1100], line[LINE_MAX_], kind[8], key[1024], speed_field[1024],
        rate_field[1024];
    const char *speed_key = field_of(speed_key_, speed_field);
    const char *rate_key = field_of(rate_key_, rate_field);
    if (hints_path(path, sizeof(path))) return;
    const int put_speed = key_ok(speed_key) && speed && speed->count > 0;
    const double rate = store ? cake_store_rate_hint(store) : 0;
    const int put_rate = key_ok(rate_key) && rate > 0;
    const uint64_t lookup = store ? cake_store_lookup_ns(store) : 0;
    const int put_lookup = key_ok(rate_key) && lookup > 0;
    if (!put_speed && !put_rate && !put_lookup) return;
    make_parents(path);
    snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid());
    FILE *out = fopen(tmp, "w");
    if (!out) return;
    int n = 0;
    if (put_speed) {
        fprintf(out, "speed %s %u", speed_key, speed->count);
        for (int i = 0; i < CAKE_SPEED_SAMPLES; i++) fprintf(out, " %.9g", speed->ns_per_flop[i]);
        fputc('\n', out);
        n++;
    }
    if (put_rate) {
        fprintf(out, "rate %s %.9g\n", rate_key, rate);
        n++;
    }
    if (put_lookup) {
        fprintf(out, "lookup %s %llu\n", rate_key, (unsigned long long)lookup);
        n++;
    }
    FILE *in = fopen(path, "r");
    cake_compute_speed s;
    double r;
    while (in && n < MAX_LINES && fgets(line, sizeof(line), in)) {
        if (!parse_line(line, kind, key, &s, &r)) continue; /* damaged: dropped */
        if ((put_speed && !strcmp(kind, "speed") && !strcmp(key, speed_key)) ||
            (put_rate && !strcmp(kind, "rate") && !strcmp(key, rate_key)) ||
            (put_lookup && !strcmp(kind, "lookup") && !strcmp(key, rate_key)))
            continue; /* replaced above */
        fputs(line, out);
        n++;
    }
    if (in) fclose(in);
    if (fclose(out) != 0 || rename(tmp, path) != 0) remove(tmp);
}
