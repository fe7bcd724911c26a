/* cake run: one request on a model, compute only until the chunk store lands. */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cake.h"
#include "cli/cli.h"
#include "cli/hints.h"
#include "engine/generate.h"
#include "engine/json_grammar.h"
#include "loader/loader.h"
#include "store/key.h"
#include "store/store.h"
#include "util/err.h"
#include "model/tokenizer.h"
#ifdef CAKE_HAVE_SERVER
#include "server/json_schema.h"
#endif

static const char *help =
    "usage: cake run -m MODEL.gguf (-p TEXT | -f FILE | --tokens \"1 2 3\") [options]\n"
    "Runs one request: prefill of the prompt in chunks, then generation. The generated\n"
    "text goes to stdout, a summary to stderr.\n"
    "  -m, --model FILE      GGUF model (llama, mistral3, qwen2/3, their MoE, granite, phi3,\n"
    "                        gemma2/3; F32/F16/BF16, Q8_0, Q4_0 ... Q6_K, IQ4_NL/XS weights:\n"
    "                        README.md)\n"
    "  -p, --prompt TEXT     prompt text (BOS is prepended when the vocabulary asks)\n"
    "  -f, --file FILE       read the prompt text from FILE (- for standard input)\n"
    "      --tokens \"IDS\"    the prompt as token ids, space-separated (no BOS added)\n"
    "  -n, --n-predict N     tokens to generate (default 128; 0 = prefill only);\n"
    "                        stops early at the model's EOS token\n"
    "      --temp T          sampling temperature (default 0.8; 0 = greedy)\n"
    "      --top-p P         nucleus sampling mass (default 0.95; 1 = off)\n"
    "      --top-k K         only the K likeliest tokens (default 0 = off)\n"
    "      --min-p P         only tokens at least P times the likeliest's probability (0 = off)\n"
    "      --frequency-penalty F, --presence-penalty F\n"
    "                        OpenAI's penalties on tokens generated so far (-2..2; 0 = off)\n"
    "      --repeat-penalty R  divide (multiply, when negative) the logits of the last\n"
    "                        --repeat-last-n tokens, prompt and answer, by R (default 1 = off)\n"
    "      --repeat-last-n N how many tokens --repeat-penalty looks at (default 64;\n"
    "                        -1 = all, 0 = off)\n"
    "      --json-mode       the answer is one JSON object (OpenAI's JSON mode)\n"
    "      --json-schema FILE  the answer is a value of the JSON Schema in FILE\n"
    "                        (docs/SERVER.md \"Structured output\")\n"
    "      --seed S          random seed (default: from the clock; printed in the summary)\n"
    "      --threads N       CPU threads (default: all online CPUs)\n"
    "      --chunk TOKENS    prefill chunk size = the store's chunk size (default 256)\n"
    "      --kv-type TYPE    KV cache element type: f16 (default), f32, q8_0, q4_0\n"
    "      --backend B       cpu (default) or cuda (one NVIDIA GPU; f16 KV only)\n"
    "      --store URI       KV chunk store: file:PATH, "
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB],\n"
    "                        redis+unix:///PATH or mem: (?bw=25Gbit&lat=1 emulate a\n"
    "                        link). Cached chunks are loaded, newly computed full chunks\n"
    "                        written back\n"
    "      --cache-salt TEXT the prompt's chunks are stored and found under this salt\n"
    "                        only (vLLM's cache_salt: a tenant's own prefixes)\n"
    "      --mode MODE       cake (default with --store): compute from the front while\n"
    "                        loading from the back; load: load every cached chunk,\n"
    "                        then compute the rest; compute: ignore cached chunks\n"
    "      --io-depth N      loads in flight (default 4)\n"
    "      --trace FILE      write the prefill timeline as Chrome trace-event JSON\n"
    "                        (open in Perfetto or chrome://tracing)\n"
    "      --dump-logits F   write the logits that chose the first generated token\n"
    "                        (little-endian float32, n_vocab values)\n"
    "      --json            print one JSON object on stdout instead of the text\n";

typedef struct {
    const char *model, *prompt, *file, *tokens, *store, *dump_logits, *trace, *json_schema,
        *cache_salt;
    cake_mode mode;
    long n_predict, threads, chunk, io_depth;
    double temp, top_p, min_p, frequency_penalty, presence_penalty, repeat_penalty;
    long top_k, repeat_last_n;
    unsigned long long seed;
    int seed_set, json, json_mode;
    enum cake_kv_type kv_type;
    enum cake_backend_kind backend;
} run_opts;

/* Streams generated text to stdout as tokens arrive (not in --json mode). */
typedef struct {
    const cake_tokenizer *tok;
    cake_token prev;
    int print;
    char *text; /* accumulated generated text, for --json */
    size_t len, cap;
} text_sink;

static void sink_append(text_sink *s, const char *p, size_t n) {
    if (s->len + n + 1 > s->cap) {
        size_t cap = (s->cap ? s->cap * 2 : 256) + n;
        char *t = realloc(s->text, cap);
        if (!t) return; /* text is best effort; ids are exact */
        s->text = t;
        s->cap = cap;
    }
    memcpy(s->text + s->len, p, n);
    s->len += n;
    s->text[s->len] = '\0';
}

static int on_token(cake_token id, void *ud) {
    text_sink *s = ud;
    char piece[256];
    int n = cake_token_to_piece(s->tok, s->prev, id, piece, sizeof(piece));
    s->prev = id;
    if (n <= 0) return 0;
    if ((size_t)n > sizeof(piece)) n = sizeof(piece);
    sink_append(s, piece, (size_t)n);
    if (s->print) {
        fwrite(piece, 1, (size_t)n, stdout);
        fflush(stdout);
    }
    return 0;
}

/* Parses "1 2 3" into ids; -1 on a non-number. */
static int parse_token_list(const char *s, cake_token **out, int *n) {
    size_t cap = 16;
    int count = 0;
    cake_token *ids = malloc(cap * sizeof(*ids));
    if (!ids) return -1;
    while (*s) {
        while (*s == ' ' || *s == '\t' || *s == '\n' || *s == ',') s++;
        if (!*s) break;
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > INT32_MAX) {
            free(ids);
            return -1;
        }
        if ((size_t)count == cap) {
            cake_token *t = realloc(ids, (cap *= 2) * sizeof(*ids));
            if (!t) {
                free(ids);
                return -1;
            }
            ids = t;
        }
        ids[count++] = (cake_token)v;
        s = end;
    }
    *out = ids;
    *n = count;
    return 0;
}

static int parse_args(int argc, char **argv, run_opts *o) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"prompt", required_argument, 0, 'p'},
                                         {"file", required_argument, 0, 'f'},
                                         {"tokens", required_argument, 0, 'T'},
                                         {"n-predict", required_argument, 0, 'n'},
                                         {"temp", required_argument, 0, 't'},
                                         {"top-p", required_argument, 0, 'P'},
                                         {"top-k", required_argument, 0, 'K'},
                                         {"min-p", required_argument, 0, 'X'},
                                         {"frequency-penalty", required_argument, 0, 'F'},
                                         {"presence-penalty", required_argument, 0, 'E'},
                                         {"repeat-penalty", required_argument, 0, 1000},
                                         {"repeat-last-n", required_argument, 0, 1001},
                                         {"seed", required_argument, 0, 's'},
                                         {"threads", required_argument, 0, 'j'},
                                         {"chunk", required_argument, 0, 'c'},
                                         {"kv-type", required_argument, 0, 'k'},
                                         {"store", required_argument, 0, 'S'},
                                         {"mode", required_argument, 0, 'M'},
                                         {"cache-salt", required_argument, 0, 1002},
                                         {"dump-logits", required_argument, 0, 'D'},
                                         {"json", no_argument, 0, 'J'},
                                         {"json-mode", no_argument, 0, 'O'},
                                         {"json-schema", required_argument, 0, 'G'},
                                         {"help", no_argument, 0, 'h'},
                                         {"io-depth", required_argument, 0, 'I'},
                                         {"trace", required_argument, 0, 'R'},
                                         {"backend", required_argument, 0, 'B'},
                                         {0, 0, 0, 0}};
    *o = (run_opts){.n_predict = 128,
                    .temp = 0.8,
                    .top_p = 0.95,
                    .repeat_penalty = 1,
                    .repeat_last_n = 64,
                    .chunk = 256,
                    .io_depth = CAKE_DEFAULT_IO_DEPTH,
                    .mode = CAKE_MODE_CAKE};
    int mode_set = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:f:n:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            o->model = optarg;
            break;
        case 'p':
            o->prompt = optarg;
            break;
        case 'f':
            o->file = optarg;
            break;
        case 'T':
            o->tokens = optarg;
            break;
        case 'n':
            if (cli_parse_int(optarg, 0, 1 << 24, &o->n_predict))
                return cli_error(CLI_USAGE, "run", "-n wants a count >= 0, got '%s'", optarg);
            break;
        case 't':
            if (cli_parse_float(optarg, 0, 100, &o->temp))
                return cli_error(CLI_USAGE, "run", "--temp wants a number in [0, 100], got '%s'",
                                 optarg);
            break;
        case 'P':
            if (cli_parse_float(optarg, 1e-6, 1, &o->top_p))
                return cli_error(CLI_USAGE, "run", "--top-p wants a number in (0, 1], got '%s'",
                                 optarg);
            break;
        case 'K':
            if (cli_parse_int(optarg, 0, 1 << 30, &o->top_k))
                return cli_error(CLI_USAGE, "run", "--top-k wants a count >= 0, got '%s'", optarg);
            break;
        case 'X':
            if (cli_parse_float(optarg, 0, 1, &o->min_p))
                return cli_error(CLI_USAGE, "run", "--min-p wants a number in [0, 1], got '%s'",
                                 optarg);
            break;
        case 'F':
        case 'E':
            if (cli_parse_float(optarg, -2, 2,
                                c == 'F' ? &o->frequency_penalty : &o->presence_penalty))
                return cli_error(CLI_USAGE, "run",
                                 "--%s-penalty wants a number in [-2, 2], got '%s'",
                                 c == 'F' ? "frequency" : "presence", optarg);
            break;
        case 1000:
            if (cli_parse_float(optarg, 0.01, 100, &o->repeat_penalty))
                return cli_error(CLI_USAGE, "run",
                                 "--repeat-penalty wants a number in [0.01, 100], got '%s'",
                                 optarg);
            break;
        case 1001:
            if (cli_parse_int(optarg, -1, 1 << 30, &o->repeat_last_n))
                return cli_error(CLI_USAGE, "run", "--repeat-last-n wants a count >= -1, got '%s'",
                                 optarg);
            break;
        case 's':
            if (cli_parse_u64(optarg, &o->seed))
                return cli_error(CLI_USAGE, "run", "--seed wants an unsigned integer, got '%s'",
                                 optarg);
            o->seed_set = 1;
            break;
        case 'j':
            if (cli_parse_int(optarg, 1, 1024, &o->threads))
                return cli_error(CLI_USAGE, "run", "--threads wants 1..1024, got '%s'", optarg);
            break;
        case 'c':
            if (cli_parse_int(optarg, 1, 1 << 20, &o->chunk))
                return cli_error(CLI_USAGE, "run",
                                 "--chunk wants a token count in 1..1048576, got '%s'", optarg);
            break;
        case 'k':
            if (cli_parse_kv_type(optarg, &o->kv_type))
                return cli_error(CLI_USAGE, "run", "--kv-type is f16, f32, q8_0 or q4_0, got '%s'",
                                 optarg);
            break;
        case 'S':
            o->store = optarg;
            break;
        case 'B':
            if (cli_parse_backend(optarg, &o->backend))
                return cli_error(CLI_USAGE, "run", "--backend is cpu or cuda, got '%s'", optarg);
            break;
        case 'M':
            if (cake_mode_parse(optarg, &o->mode))
                return cli_error(CLI_USAGE, "run", "--mode is cake, load or compute, got '%s'",
                                 optarg);
            mode_set = 1;
            break;
        case 'I':
            if (cli_parse_int(optarg, 1, 64, &o->io_depth))
                return cli_error(CLI_USAGE, "run", "--io-depth wants 1..64, got '%s'", optarg);
            break;
        case 'R':
            o->trace = optarg;
            break;
        case 1002:
            if (!*optarg || strlen(optarg) > 1024)
                return cli_error(CLI_USAGE, "run", "--cache-salt wants 1 to 1024 bytes");
            o->cache_salt = optarg;
            break;
        case 'D':
            o->dump_logits = optarg;
            break;
        case 'J':
            o->json = 1;
            break;
        case 'O':
            o->json_mode = 1;
            break;
        case 'G':
            o->json_schema = optarg;
            break;
        case 'h':
            fputs(help, stdout);
            return -1;
        default:
            fputs(help, stderr);
            return CLI_USAGE;
        }
    }
    if (optind < argc) return cli_error(CLI_USAGE, "run", "unexpected argument '%s'", argv[optind]);
    if (!o->model) return cli_error(CLI_USAGE, "run", "-m MODEL is required");
    if (!!o->prompt + !!o->file + !!o->tokens != 1)
        return cli_error(CLI_USAGE, "run", "give exactly one of -p TEXT, -f FILE, --tokens IDS");
    if (mode_set && o->mode != CAKE_MODE_COMPUTE && !o->store)
        return cli_error(CLI_USAGE, "run", "--mode %s needs --store", cake_mode_name(o->mode));
    if (o->cache_salt && !o->store)
        return cli_error(CLI_USAGE, "run", "--cache-salt needs --store");
    if (o->store && cli_check_store_uri("run", o->store)) return CLI_USAGE;
    if (!o->store) o->mode = CAKE_MODE_COMPUTE;
    return 0;
}

/* "name":"why", or "name":null when why is empty. */
static void json_error(FILE *f, const char *name, const char *why) {
    fprintf(f, "\"%s\":", name);
    if (why[0])
        cli_json_string(f, why, strlen(why));
    else
        fputs("null", f);
}

static void json_ids(FILE *f, const char *name, const cake_token *ids, int n) {
    fprintf(f, "\"%s\":[", name);
    for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", ids[i]);
    fputs("],", f);
}

/* Into f, opened before the run (so that a path it cannot write fails at
 * once, not after the prefill); closes f. */
static int write_logits(FILE *f, const char *path, const float *logits, int n, char *err,
                        size_t errlen) {
    /* Raw little-endian float32: this engine only builds for little-endian hosts. */
    const size_t w = fwrite(logits, sizeof(float), (size_t)n, f);
    const int bad = w != (size_t)n || fflush(f) != 0;
    const int e = errno;
    if (fclose(f) != 0 || bad) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(bad ? e : errno));
        return -1;
    }
    return 0;
}

/* A file the run writes at its end (--dump-logits, --trace), tried now. */
static FILE *open_output(const char *option, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) cli_error(CLI_FAIL, "run", "%s %s: %s", option, path, strerror(errno));
    return f;
}

/* --json-schema FILE compiled: its root node, *owner holding it (for
 * drop_schema). NULL with a message in err. */
static const cake_json_node *load_schema(const char *path, void **owner, char *err, size_t errlen) {
#ifdef CAKE_HAVE_SERVER
    size_t len;
    char *text = cli_read_file(path, &len, err, errlen), why[300];
    if (!text) return NULL;
    cJSON *doc = cJSON_ParseWithLength(text, len);
    free(text);
    json_schema *s = doc ? json_schema_compile(doc, why, sizeof(why)) : NULL;
    cJSON_Delete(doc);
    if (!s) {
        cake_err(err, errlen, "--json-schema %s: %s", path, doc ? why : "not JSON");
        return NULL;
    }
    *owner = s;
    return json_schema_root(s);
#else
    (void)path, (void)owner;
    cake_err(err, errlen, "--json-schema needs cJSON: this cake was built without `cake serve`");
    return NULL;
#endif
}

static void drop_schema(void *owner) {
#ifdef CAKE_HAVE_SERVER
    json_schema_release(owner);
#else
    (void)owner;
#endif
}

int cmd_run(int argc, char **argv) {
    run_opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc < 0 ? CLI_OK : rc;

    char err[512];
    cake_store *store = NULL;
    cake_writeback *wb = NULL;
    cake_model *model = NULL;
    cake_context *ctx = NULL;
    cake_sampler *sampler = NULL;
    cake_json_vocab *json_vocab = NULL;
    cake_json_grammar *grammar = NULL;
    void *schema = NULL;
    const cake_json_node *schema_root = NULL;
    cake_token *prompt = NULL, *generated = NULL;
    float *first_logits = NULL;
    char *text = NULL;
    text_sink sink = {0};
    int n_prompt = 0;
    FILE *logits_out = NULL, *trace_out = NULL;
    rc = CLI_FAIL;

    if ((o.dump_logits && !(logits_out = open_output("--dump-logits", o.dump_logits))) ||
        (o.trace && !(trace_out = open_output("--trace", o.trace))))
        goto done;
    if (trace_out) fclose(trace_out); /* (the loader writes it) */

    if (o.tokens && parse_token_list(o.tokens, &prompt, &n_prompt)) {
        rc = cli_error(CLI_USAGE, "run", "--tokens wants space-separated ids, got '%s'", o.tokens);
        goto done;
    }
    if (o.json_mode && o.json_schema) {
        rc = cli_error(CLI_USAGE, "run", "give --json-mode or --json-schema, not both");
        goto done;
    }
    if (o.json_schema && !(schema_root = load_schema(o.json_schema, &schema, err, sizeof(err)))) {
        rc = cli_error(CLI_USAGE, "run", "%s", err);
        goto done;
    }
    size_t text_len = 0;
    if (o.file && !(text = cli_read_file(o.file, &text_len, err, sizeof(err)))) {
        cli_error(CLI_FAIL, "run", "%s", err);
        goto done;
    }
    if (o.store) {
        if (cake_store_open(o.store, &store, err, sizeof(err))) {
            char shown[1024];
            cli_error(CLI_FAIL, "run", "--store %s: %s",
                      cake_store_redact_uri(o.store, shown, sizeof(shown)), err);
            goto done;
        }
        if (!(wb = cake_writeback_create(store, 1024, err, sizeof(err)))) {
            cli_error(CLI_FAIL, "run", "%s", err);
            goto done;
        }
    }
    if (cake_model_load(o.model, &model, err, sizeof(err))) {
        cli_error(CLI_FAIL, "run", "%s", err);
        goto done;
    }
    const cake_hparams *hp = cake_model_hparams(model);
    const cake_tokenizer *tok = cake_model_tokenizer(model);
    if (!o.tokens) {
        const char *src = o.file ? text : o.prompt;
        size_t len = o.file ? text_len : strlen(o.prompt);
        bool bos = cake_tokenizer_add_bos(tok);
        int64_t n = cake_tokenize(tok, src, len, bos, NULL, 0);
        if (n < 0 || n > INT32_MAX || !(prompt = malloc((size_t)(n ? n : 1) * sizeof(*prompt))) ||
            cake_tokenize(tok, src, len, bos, prompt, n) != n) {
            cli_error(CLI_FAIL, "run", "tokenization failed (out of memory)");
            goto done;
        }
        n_prompt = (int)n;
    }
    if (n_prompt == 0) {
        rc = cli_error(CLI_USAGE, "run", "the prompt is empty (no tokens)");
        goto done;
    }
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] >= hp->n_vocab) {
            rc = cli_error(CLI_USAGE, "run", "token id %d is not in the vocabulary (0..%d)",
                           prompt[i], hp->n_vocab - 1);
            goto done;
        }
    if (n_prompt > hp->n_ctx_train) {
        cli_error(CLI_FAIL, "run", "the prompt has %d tokens, more than the model's context of %d",
                  n_prompt, hp->n_ctx_train);
        goto done;
    }
    if (n_prompt + o.n_predict > hp->n_ctx_train) {
        fprintf(stderr, "cake run: generation capped at %d tokens by the model's context of %d\n",
                hp->n_ctx_train - n_prompt, hp->n_ctx_train);
        o.n_predict = hp->n_ctx_train - n_prompt;
    }

    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = n_prompt + (int)o.n_predict;
    cp.n_threads = (int)o.threads;
    cp.kv_type = o.kv_type;
    cp.backend = o.backend;
    if (cake_context_init(model, cp, &ctx, err, sizeof(err))) {
        cli_error(CLI_FAIL, "run", "%s", err);
        goto done;
    }
    /* The last run's compute speed and load rate, so that the loader's first
     * decisions need not guess (cli/hints.c). */
    char speed_key[96] = "";
    cake_compute_speed *speed = NULL;
    if (store) {
        cake_loader_engine le; /* (for its speed memory) */
        cake_context_loader_engine(ctx, 0, &le);
        cli_hints_speed_key(speed_key, sizeof(speed_key), ctx,
                            o.backend == CAKE_BACKEND_CUDA ? "cuda" : "cpu", o.chunk);
        speed = le.speed;
        cli_hints_load(speed_key, speed, cake_store_uri(store), store);
    }
    if (!o.seed_set) o.seed = (unsigned long long)time(NULL);
    cake_sampler_params sp = {.temperature = (float)o.temp,
                              .top_p = (float)o.top_p,
                              .seed = o.seed,
                              .top_k = (int)o.top_k,
                              .min_p = (float)o.min_p,
                              .frequency_penalty = (float)o.frequency_penalty,
                              .presence_penalty = (float)o.presence_penalty,
                              .repetition_penalty = o.repeat_last_n ? (float)o.repeat_penalty : 1,
                              .repeat_last_n = o.repeat_last_n > 0 ? (int)o.repeat_last_n : 0,
                              .prompt = prompt,
                              .n_prompt = n_prompt};
    if (o.json_mode || o.json_schema) {
        if (!(json_vocab = cake_json_vocab_new(tok)) ||
            !(grammar =
                  cake_json_grammar_new(json_vocab, schema_root, cake_tokenizer_eos(tok), -1))) {
            cli_error(CLI_FAIL, "run", "out of memory");
            goto done;
        }
        cake_json_grammar_constrain(grammar, &sp);
    }
    sampler = cake_sampler_init(sp);
    generated = malloc((size_t)(o.n_predict ? o.n_predict : 1) * sizeof(*generated));
    first_logits = malloc((size_t)hp->n_vocab * sizeof(float));
    if (!sampler || !generated || !first_logits) {
        cli_error(CLI_FAIL, "run", "out of memory");
        goto done;
    }

    sink = (text_sink){.tok = tok, .prev = prompt[n_prompt - 1], .print = !o.json};
    cake_prefill_params lp = {.store = store,
                              .writeback = wb,
                              .mode = o.mode,
                              .io_depth = (int)o.io_depth,
                              .trace_path = o.trace,
                              .cache_salt = o.cache_salt};
    cake_request req = {
        .loader = &lp,
        .prompt = prompt,
        .n_prompt = n_prompt,
        .n_predict = (int)o.n_predict,
        .chunk = (int)o.chunk,
        .eos = cake_tokenizer_eos(tok),
        .sampler = sampler,
        .first_logits = first_logits,
        .on_token = on_token,
        .ud = &sink,
    };
    cake_request_stats st;
    if (cake_request_run(ctx, &req, generated, &st, err, sizeof(err))) {
        cli_error(CLI_FAIL, "run", "%s", err);
        goto done;
    }
    /* The next run should find this one's chunks: wait (bounded) for the writes. */
    int wb_dropped = wb ? cake_writeback_drain(wb, 60000) : 0;
    if (store) cli_hints_save(speed_key, speed, cake_store_uri(store), store);
    cake_writeback_counters wbc = {0};
    if (wb) cake_writeback_counters_get(wb, &wbc);
    if (logits_out) {
        FILE *f = logits_out;
        logits_out = NULL; /* (closed by write_logits) */
        if (write_logits(f, o.dump_logits, first_logits, hp->n_vocab, err, sizeof(err))) {
            cli_error(CLI_FAIL, "run", "%s", err);
            goto done;
        }
    }

    const double decode_tps =
        st.n_generated > 1 && st.decode_ms > 0 ? (st.n_generated - 1) * 1e3 / st.decode_ms : 0;
    const double prefill_tps = st.ttft_ms > 0 ? n_prompt * 1e3 / st.ttft_ms : 0;
    const cake_prefill_stats *ps = &st.prefill;
    if (o.json) {
        printf("{\"prompt_tokens\":%d,", n_prompt);
        json_ids(stdout, "prompt_ids", prompt, n_prompt);
        json_ids(stdout, "generated_ids", generated, st.n_generated);
        fputs("\"text\":", stdout);
        cli_json_string(stdout, sink.text ? sink.text : "", sink.len);
        printf(",\"ttft_ms\":%.3f,\"prefill_tok_s\":%.2f,\"decode_tok_s\":%.2f,"
               "\"mode\":\"%s\",\"chunk\":%ld,\"io_depth\":%d,\"chunks_total\":%d,"
               "\"chunks_computed\":%d,\"chunks_loaded\":%d,\"chunks_missing\":%d,"
               "\"chunks_corrupt\":%d,\"chunks_discarded\":%d,\"meet_chunk\":%d,"
               "\"bytes_loaded\":%llu,\"load_gbit_s\":%.3f,\"lookup_ms\":%.3f,"
               "\"chunks_during_lookup\":%d,"
               "\"compute_ms\":%.3f,\"compute_wait_ms\":%.3f,\"load_ms\":%.3f,"
               "\"writeback_queued\":%d,\"writeback_dropped\":%d,\"writeback_written\":%llu,"
               "\"writeback_already_stored\":%llu,\"writeback_failed\":%llu,\"knew_speed\":%s,"
               "\"knew_rate\":%s,"
               "\"kv_type\":\"%s\",\"threads\":%d,\"seed\":%llu,",
               st.ttft_ms, prefill_tps, decode_tps, cake_mode_name(ps->mode), o.chunk, ps->io_depth,
               ps->chunks_total, ps->chunks_computed, ps->chunks_loaded, ps->chunks_missing,
               ps->chunks_corrupt, ps->chunks_discarded, ps->meet_chunk,
               (unsigned long long)ps->bytes_loaded, ps->load_gbit_s, ps->lookup_ms,
               ps->chunks_during_lookup, ps->compute_ms, ps->compute_wait_ms, ps->load_ms,
               ps->writeback_queued, ps->writeback_dropped + wb_dropped,
               (unsigned long long)wbc.written, (unsigned long long)wbc.already_present,
               (unsigned long long)wbc.failed, ps->knew_speed ? "true" : "false",
               ps->knew_rate ? "true" : "false", cli_kv_type_name(o.kv_type),
               cake_context_n_threads(ctx), o.seed);
        json_error(stdout, "store_error", ps->store_error);
        putchar(',');
        json_error(stdout, "writeback_error", wbc.first_error);
        puts("}");
    } else {
        putchar('\n');
    }
    fflush(stdout); /* the text first, then the summary on stderr */
    fprintf(stderr,
            "cake run: prompt %d tokens, generated %d; ttft %.1f ms (prefill %.1f tok/s), "
            "decode %.1f tok/s; seed %llu\n",
            n_prompt, st.n_generated, st.ttft_ms, prefill_tps, decode_tps, o.seed);
    if (store)
        fprintf(stderr,
                "cake run: mode %s, %d chunks of %ld: %d computed, %d loaded (%.1f MB at %.2f "
                "Gbit/s), %d missing, %d corrupt; meet at chunk %d; compute %.1f ms, waited "
                "%.1f ms; write-back %llu written, %llu already stored, %llu failed, %d "
                "dropped\n",
                cake_mode_name(ps->mode), ps->chunks_total, o.chunk, ps->chunks_computed,
                ps->chunks_loaded, (double)ps->bytes_loaded / 1e6, ps->load_gbit_s,
                ps->chunks_missing, ps->chunks_corrupt, ps->meet_chunk, ps->compute_ms,
                ps->compute_wait_ms, (unsigned long long)wbc.written,
                (unsigned long long)wbc.already_present, (unsigned long long)wbc.failed,
                ps->writeback_dropped + wb_dropped);
    /* The output never depends on the store; still, say why it did not help. */
    if (ps->store_error[0])
        fprintf(stderr, "cake run: store %s: %s (computed instead)\n", cake_store_uri(store),
                ps->store_error);
    if (wbc.first_error[0])
        fprintf(stderr, "cake run: store %s: write-back %s (not stored)\n", cake_store_uri(store),
                wbc.first_error);
    rc = CLI_OK;
done:
    if (logits_out) fclose(logits_out);
    free(sink.text);
    free(first_logits);
    free(generated);
    free(prompt);
    free(text);
    cake_sampler_free(sampler);
    cake_json_grammar_free(grammar);
    cake_json_vocab_free(json_vocab);
    drop_schema(schema);
    cake_writeback_free(wb); /* before the context: it may still read its KV */
    cake_context_free(ctx);
    cake_model_free(model);
    cake_store_close(store);
    return rc;
}
