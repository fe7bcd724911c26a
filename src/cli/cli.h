/* Shared pieces of the `cake` command line. Exit codes: 0 ok, 1 runtime
 * failure, 2 usage error; errors are one line on stderr. */
#ifndef CAKE_CLI_H
#define CAKE_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "cake.h"

#define CLI_OK    0
#define CLI_FAIL  1
#define CLI_USAGE 2

int cmd_run(int argc, char **argv);
int cmd_mkmodel(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_perplexity(int argc, char **argv);
int cmd_store(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_serve(int argc, char **argv);

/* Prints "cake <cmd>: <message>" on stderr and returns code. */
int cli_error(int code, const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The whole of a file, a pipe or, for "-", standard input, into a
 * NUL-terminated malloc'd buffer (len excludes the NUL). NULL with a message
 * in err on failure. */
char *cli_read_file(const char *path, size_t *len, char *err, size_t errlen);

/* Strict numeric parsing of option values: the whole string must be a number in
 * [lo, hi]. 0 ok, -1 otherwise. */
int cli_parse_int(const char *s, long lo, long hi, long *out);
int cli_parse_float(const char *s, double lo, double hi, double *out);
int cli_parse_u64(const char *s, unsigned long long *out);
/* "f16" / "f32", and "cpu" / "cuda". 0 ok, -1 otherwise. */
int cli_parse_kv_type(const char *s, enum cake_kv_type *out); /* f16, f32, q8_0, q4_0 */
const char *cli_kv_type_name(enum cake_kv_type t);
int cli_parse_backend(const char *s, enum cake_backend_kind *out);

/* A --store URI that does not parse is a usage error: prints why and returns
 * CLI_USAGE; CLI_OK when it parses (opening it may still fail). */
int cli_check_store_uri(const char *cmd, const char *uri);

/* Writes s[0..len) as a JSON string literal (with quotes); bytes that are not
 * valid UTF-8 come out as U+FFFD, so that the output is valid JSON. */
void cli_json_string(FILE *f, const char *s, size_t len);

#endif
