/* cake tokenize: the model's token ids for a text, on one line. */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

static const char *help =
    "usage: cake tokenize -m MODEL.gguf (-p TEXT | -f FILE) [--no-bos]\n"
    "Prints the token ids of the text, space-separated on one line. BOS comes first\n"
    "unless --no-bos is given or the vocabulary says not to add it. Works on\n"
    "vocabulary-only GGUF files.\n"
    "  -m, --model FILE    GGUF file with a tokenizer.ggml.* vocabulary\n"
    "  -p, --prompt TEXT   text to tokenize\n"
    "  -f, --file FILE     read the text from FILE, bytes as they are (- = stdin)\n"
    "      --no-bos        do not prepend BOS\n";

int cmd_tokenize(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"file", required_argument, 0, 'f'},  {"no-bos", no_argument, 0, 'B'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *model = NULL, *prompt = NULL, *file = NULL;
    int no_bos = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:f:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'p':
            prompt = optarg;
            break;
        case 'f':
            file = optarg;
            break;
        case 'B':
            no_bos = 1;
            break;
        case 'h':
            fputs(help, stdout);
            return CLI_OK;
        default:
            fputs(help, stderr);
            return CLI_USAGE;
        }
    }
    if (optind < argc)
        return cli_error(CLI_USAGE, "tokenize", "unexpected argument '%s'", argv[optind]);
    if (!model) return cli_error(CLI_USAGE, "tokenize", "-m MODEL is required");
    if (!!prompt + !!file != 1)
        return cli_error(CLI_USAGE, "tokenize", "give exactly one of -p TEXT and -f FILE");

    char err[512];
    size_t len = 0;
    char *text = NULL;
    if (file) {
        if (!(text = cli_read_file(file, &len, err, sizeof(err))))
            return cli_error(CLI_FAIL, "tokenize", "%s", err);
    }
    cake_gguf *g = NULL;
    cake_tokenizer *tok = NULL;
    cake_token *ids = NULL;
    int rc = CLI_FAIL;
    if (cake_gguf_open(model, &g, err, sizeof(err))) { /* its message names the file */
        cli_error(CLI_FAIL, "tokenize", "%s", err);
        goto done;
    }
    if (cake_tokenizer_init(g, &tok, err, sizeof(err))) {
        cli_error(CLI_FAIL, "tokenize", "%s: %s", model, err);
        goto done;
    }
    const char *src = file ? text : prompt;
    if (!file) len = strlen(prompt);
    bool bos = !no_bos && cake_tokenizer_add_bos(tok);
    int64_t n = cake_tokenize(tok, src, len, bos, NULL, 0);
    if (n < 0 || !(ids = malloc((size_t)(n ? n : 1) * sizeof(*ids))) ||
        cake_tokenize(tok, src, len, bos, ids, n) != n) {
        cli_error(CLI_FAIL, "tokenize", "out of memory");
        goto done;
    }
    for (int64_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    putchar('\n');
    rc = CLI_OK;
done:
    free(ids);
    cake_tokenizer_free(tok);
    cake_gguf_close(g);
    free(text);
    return rc;
}
