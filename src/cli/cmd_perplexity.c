/* cake perplexity: a model's perplexity on a text, as llama.cpp's
 * llama-perplexity measures it, so that the two engines (or two
 * quantizations of one model) can be compared on the same file.
 *
 * The text is tokenized (BOS first where the vocabulary adds it) and cut
 * into chunks of --ctx tokens; each chunk is computed from position 0 with
 * a fresh KV cache, its first token replaced by BOS (where added), every
 * token's logits kept (cake_batch_seq.all_logits); the tokens of its second
 * half are scored: -log p(token j + 1 | tokens ..j) for j from ctx/2 to
 * ctx - 2. (Each chunk's positions start at 0 again: attention reads only
 * the positions before, so the last chunk's KV needs no clearing.) The perplexity is exp of their
 * mean, printed after each chunk
 * ([1]..., running) and at the end with llama.cpp's error estimate. */
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "model/tokenizer.h"
#include "util/clock.h"

static const char *help =
    "usage: cake perplexity -m MODEL.gguf -f FILE [options]\n"
    "The model's perplexity on the text of FILE, as llama.cpp's llama-perplexity\n"
    "computes it: chunks of --ctx tokens, each from a fresh context starting with\n"
    "BOS, the second half of each scored. Prints the running value after each chunk\n"
    "and the final estimate.\n"
    "  -m, --model FILE      GGUF model\n"
    "  -f, --file FILE       the text (- for standard input); at least 2 x ctx tokens\n"
    "  -c, --ctx N           tokens a chunk (default 512)\n"
    "      --chunks N        score at most N chunks (default: all)\n"
    "      --threads N       CPU threads (default: all online CPUs)\n"
    "      --kv-type TYPE    KV cache element type: f16 (default), f32, q8_0, q4_0\n";

/* -log softmax(logits)[tok], in double (llama.cpp's log_softmax). */
static double nll_of(const float *logits, int n_vocab, cake_token tok) {
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++) max = logits[i] > max ? logits[i] : max;
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)(logits[i] - max));
    return log(sum) - (double)(logits[tok] - max);
}

int cmd_perplexity(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},   {"file", required_argument, 0, 'f'},
        {"ctx", required_argument, 0, 'c'},     {"chunks", required_argument, 0, 'N'},
        {"threads", required_argument, 0, 'j'}, {"kv-type", required_argument, 0, 'k'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
    const char *model_path = NULL, *file = NULL;
    long n_ctx = 512, max_chunks = -1, threads = 0;
    enum cake_kv_type kv_type = CAKE_KV_F16;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:f:c:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model_path = optarg;
            break;
        case 'f':
            file = optarg;
            break;
        case 'c':
            if (cli_parse_int(optarg, 4, 1 << 20, &n_ctx))
                return cli_error(CLI_USAGE, "perplexity", "--ctx wants a count >= 4, got '%s'",
                                 optarg);
            break;
        case 'N':
            if (cli_parse_int(optarg, 1, 1 << 30, &max_chunks))
                return cli_error(CLI_USAGE, "perplexity", "--chunks wants a count >= 1, got '%s'",
                                 optarg);
            break;
        case 'j':
            if (cli_parse_int(optarg, 1, 1024, &threads))
                return cli_error(CLI_USAGE, "perplexity",
                                 "--threads wants a count in [1, 1024], got '%s'", optarg);
            break;
        case 'k':
            if (cli_parse_kv_type(optarg, &kv_type))
                return cli_error(CLI_USAGE, "perplexity",
                                 "--kv-type is f16, f32, q8_0 or q4_0, not '%s'", optarg);
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
        return cli_error(CLI_USAGE, "perplexity", "unexpected argument '%s'", argv[optind]);
    if (!model_path || !file)
        return cli_error(CLI_USAGE, "perplexity", "-m MODEL and -f FILE are required");

    char err[512];
    size_t len = 0;
    char *text = cli_read_file(file, &len, err, sizeof(err));
    if (!text) return cli_error(CLI_FAIL, "perplexity", "%s", err);
    int rc = CLI_FAIL;
    cake_model *model = NULL;
    cake_context *ctx = NULL;
    cake_token *ids = NULL;
    float *logits = NULL;
    if (cake_model_load(model_path, &model, err, sizeof(err))) {
        cli_error(CLI_FAIL, "perplexity", "%s", err);
        goto done;
    }
    const cake_tokenizer *tok = cake_model_tokenizer(model);
    const int n_vocab = cake_model_hparams(model)->n_vocab;
    const int n_train = cake_model_hparams(model)->n_ctx_train;
    if (n_ctx > n_train) /* (as llama-perplexity: it runs, positions past training and all) */
        fprintf(stderr,
                "cake perplexity: warning: a context of %ld is more than the model's %d; "
                "its perplexity is of positions it was not trained on\n",
                n_ctx, n_train);
    const bool bos = cake_tokenizer_add_bos(tok) && cake_tokenizer_bos(tok) >= 0;
    const int64_t n = cake_tokenize(tok, text, len, bos, NULL, 0);
    if (n < 0 || !(ids = malloc((size_t)(n ? n : 1) * sizeof(*ids))) ||
        cake_tokenize(tok, text, len, bos, ids, n) != n) {
        cli_error(CLI_FAIL, "perplexity", "out of memory");
        goto done;
    }
    if (n < 2 * n_ctx) {
        cli_error(CLI_FAIL, "perplexity",
                  "%s has %lld tokens: a context of %ld needs at least %ld (two chunks)", file,
                  (long long)n, n_ctx, 2 * n_ctx);
        goto done;
    }
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = (int)n_ctx;
    cp.n_threads = (int)threads;
    cp.max_batch = (int)(n_ctx < 64 ? n_ctx : 64); /* rows of logits a pass: 64 x n_vocab */
    cp.kv_type = kv_type;
    if (cake_context_init(model, cp, &ctx, err, sizeof(err))) {
        cli_error(CLI_FAIL, "perplexity", "%s", err);
        goto done;
    }
    if (!(logits = malloc((size_t)cp.max_batch * (size_t)n_vocab * sizeof(float)))) {
        cli_error(CLI_FAIL, "perplexity", "out of memory");
        goto done;
    }
    long n_chunks = (long)(n / n_ctx);
    if (max_chunks > 0 && max_chunks < n_chunks) n_chunks = max_chunks;
    const int first = (int)n_ctx / 2;
    fprintf(stderr, "perplexity: %lld tokens, %ld chunks of %ld, scoring the last %ld of each\n",
            (long long)n, n_chunks, n_ctx, n_ctx - first - 1);
    double nll = 0, nll2 = 0;
    long count = 0;
    const uint64_t t0 = cake_now_ns();
    for (long k = 0; k < n_chunks; k++) {
        cake_token *chunk = ids + k * n_ctx;
        const cake_token original = chunk[0];
        if (bos) chunk[0] = cake_tokenizer_bos(tok);
        for (int pos = 0; pos < n_ctx; pos += cp.max_batch) {
            const int m = (int)n_ctx - pos < cp.max_batch ? (int)n_ctx - pos : cp.max_batch;
            const cake_batch_seq one = {ctx, chunk + pos, m, pos, logits, true};
            if (cake_forward_batch(ctx, &one, 1, err, sizeof(err))) {
                cli_error(CLI_FAIL, "perplexity", "%s", err);
                goto done;
            }
            for (int r = 0; r < m; r++) { /* row r: the logits after token pos + r */
                const int j = pos + r;
                if (j < first || j + 1 >= n_ctx) continue;
                const double v = nll_of(logits + (size_t)r * n_vocab, n_vocab, chunk[j + 1]);
                nll += v;
                nll2 += v * v;
                count++;
            }
        }
        chunk[0] = original;
        printf("[%ld]%.4f,", k + 1, exp(nll / (double)count));
        fflush(stdout);
    }
    putchar('\n');
    const double mean = nll / (double)count, ppl = exp(mean);
    const double var = nll2 / (double)count - mean * mean;
    const double sd = var > 0 && count > 1 ? sqrt(var / (double)(count - 1)) : 0;
    printf("Final estimate: PPL = %.4f +/- %.5f\n", ppl, sd * ppl);
    fprintf(stderr, "perplexity: %ld tokens scored in %.2f s\n", count,
            (double)(cake_now_ns() - t0) / 1e9);
    rc = CLI_OK;
done:
    free(logits);
    free(ids);
    cake_context_free(ctx);
    cake_model_free(model);
    free(text);
    return rc;
}
