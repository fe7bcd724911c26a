#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "store/store_impl.h"
#include "util/utf8.h"

int cli_error(int code, const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cake %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return code;
}

/* Prompts and texts read whole: far more than any context, and a bound on
 * what a file that never ends takes. */
#define CLI_MAX_FILE ((size_t)1 << 30)

char *cli_read_file(const char *path, size_t *len, char *err, size_t errlen) {
    const int from_stdin = strcmp(path, "-") == 0;
    FILE *f = from_stdin ? stdin : fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    const int have_stat = fstat(fileno(f), &st) == 0;
    if (have_stat && S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s is a directory", path);
        if (!from_stdin) fclose(f);
        return NULL;
    }
    /* a regular file's size is known; a pipe is read until its end */
    size_t cap = have_stat && S_ISREG(st.st_mode) ? (size_t)st.st_size + 1 : (size_t)1 << 16;
    size_t n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1) break; /* the end, or an error */
        const int c = getc(f);  /* full: is there more? */
        if (c == EOF) break;
        if (cap > CLI_MAX_FILE) { /* (/dev/zero, a runaway pipe) */
            snprintf(err, errlen, "%s is larger than %d MiB", from_stdin ? "standard input" : path,
                     (int)(CLI_MAX_FILE >> 20));
            free(buf);
            if (!from_stdin) fclose(f);
            return NULL;
        }
        char *grown = realloc(buf, cap * 2);
        if (!grown) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = grown;
        cap *= 2;
        buf[n++] = (char)c;
    }
    const int bad = !buf || ferror(f);
    const int read_errno = errno;
    if (!from_stdin) fclose(f);
    if (bad) {
        snprintf(err, errlen, "cannot read %s: %s", from_stdin ? "standard input" : path,
                 buf ? strerror(read_errno) : "out of memory");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

int cli_parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int cli_parse_float(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

int cli_parse_u64(const char *s, unsigned long long *out) {
    char *end;
    errno = 0;
    if (*s == '-') return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

void cli_json_string(FILE *f, const char *s, size_t len) {
    fputc('"', f);
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        switch (ch) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (ch < 0x20 || ch == 0x7f) {
                fprintf(f, "\\u%04x", ch);
            } else if (ch < 0x80) {
                fputc(ch, f);
            } else {
                /* JSON is UTF-8: a byte that starts no valid character (a
                 * model can emit any bytes) becomes U+FFFD, as in
                 * Python's errors="replace" */
                const size_t l = utf8_char_len((const unsigned char *)s + i, len - i);
                if (l) {
                    fwrite(s + i, 1, l, f);
                    i += l - 1;
                } else {
                    fputs("\\ufffd", f);
                }
            }
        }
    }
    fputc('"', f);
}

/* The KV types' names, by enum cake_kv_type (llama.cpp's cache type names) */
static const char *const kv_type_names[] = {"f16", "f32", "q8_0", "q4_0"};

int cli_parse_kv_type(const char *s, enum cake_kv_type *out) {
    for (size_t i = 0; i < sizeof(kv_type_names) / sizeof(kv_type_names[0]); i++)
        if (!strcmp(s, kv_type_names[i])) return *out = (enum cake_kv_type)i, 0;
    return -1;
}

const char *cli_kv_type_name(enum cake_kv_type t) {
    return (size_t)t < sizeof(kv_type_names) / sizeof(kv_type_names[0]) ? kv_type_names[t] : "?";
}

int cli_parse_backend(const char *s, enum cake_backend_kind *out) {
    if (!strcmp(s, "cpu")) return *out = CAKE_BACKEND_CPU, 0;
    if (!strcmp(s, "cuda")) return *out = CAKE_BACKEND_CUDA, 0;
    return -1;
}

int cli_check_store_uri(const char *cmd, const char *uri) {
    cake_store_params p;
    char err[512];
    if (!cake_store_parse_uri(uri, &p, err, sizeof(err))) return CLI_OK;
    return cli_error(CLI_USAGE, cmd, "%s", err);
}
