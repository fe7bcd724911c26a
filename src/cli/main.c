/* cake: one binary, subcommands. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"

static const char *usage =
    "usage: cake <command> [options]\n"
    "\n"
    "commands:\n"
    "  run        run one request on a GGUF model (prefill + generation)\n"
    "  mkmodel    write a GGUF model with random weights and a real architecture\n"
    "  tokenize   print the token ids of a text\n"
    "  perplexity a model's perplexity on a text (as llama.cpp's llama-perplexity)\n"
    "  bench      benchmarks: `cake bench ttft` (compute vs load vs Cake, with the oracle)\n"
    "  store      inspect and maintain a KV chunk store (ls, stat, verify, rm, gc)\n"
    "  serve      an OpenAI-compatible HTTP server on a model\n"
    "\n"
    "`cake <command> --help` describes each command's options.\n";

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs(usage, stderr);
        return CLI_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        fputs(usage, stdout);
        return CLI_OK;
    }
    if (!strcmp(cmd, "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "mkmodel")) return cmd_mkmodel(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "perplexity")) return cmd_perplexity(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "store")) return cmd_store(argc - 1, argv + 1);
#ifdef CAKE_HAVE_SERVER
    if (!strcmp(cmd, "serve")) return cmd_serve(argc - 1, argv + 1);
#else
    if (!strcmp(cmd, "serve")) {
        fputs("cake serve: this build has no server (libmicrohttpd and libcjson were missing; "
              "scripts/install-deps.sh installs them)\n",
              stderr);
        return CLI_FAIL;
    }
#endif
    fprintf(stderr, "cake: unknown command '%s'\n%s", cmd, usage);
    return CLI_USAGE;
}
