/* cake serve: an OpenAI-compatible HTTP server on one model (src/server/). */
#include <getopt.h>
#include <libgen.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "cake.h"
#include "cli/cli.h"
#include "cli/hints.h"
#include "model/model.h"
#include "server/server.h"
#include "util/err.h"

#define DEFAULT_STORE "mem:?capacity=2GiB"

static const char *help =
    "usage: cake serve -m MODEL.gguf [options]\n"
    "Serves the model over HTTP with an OpenAI-compatible API until SIGINT or SIGTERM:\n"
    "POST /v1/completions, POST /v1/chat/completions (\"stream\": true for server-sent\n"
    "events), GET /v1/models, GET /health, GET /metrics (Prometheus). Each request's\n"
    "prompt goes through the Cake loader: its cached chunks are loaded from the store\n"
    "while its first chunks are computed, and new chunks are written back.\n"
    "  -m, --model FILE      GGUF model (as `cake run`)\n"
    "      --host ADDR       address to listen on (default 127.0.0.1)\n"
    "      --port N          port (default 8080; 0 = any free one, printed at start)\n"
    "      --store URI       KV chunk store shared by the requests: file:PATH,\n"
    "                        redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (or the password\n"
    "                        in $CAKE_REDIS_PASSWORD), redis+unix:///PATH, mem:...;\n"
    "                        none = compute only\n"
    "                        (default " DEFAULT_STORE "). ?ram=SIZE on a file or\n"
    "                        redis store: a RAM tier in front, filled ahead for\n"
    "                        requests that wait for a slot\n"
    "      --mode MODE       cake (default), load or compute (as `cake run`)\n"
    "      --chunk TOKENS    prefill chunk size = the store's chunk size (default 256)\n"
    "      --io-depth N      loads in flight per request (default 4)\n"
    "      --slots N         requests served at once, each with its own KV cache;\n"
    "                        their forward passes are batched together (default 4;\n"
    "                        1 with --backend cuda)\n"
    "      --batch TOKENS    most tokens per engine step, filled by priority: decode\n"
    "                        tokens, then prompts without a cache hit, then the\n"
    "                        compute side of cached prompts (default 512)\n"
    "      --schedule P      priority (that order; default) or fcfs (by request\n"
    "                        arrival alone: the paper's baseline)\n"
    "      --queue N         requests that may wait for a slot (default 64); more\n"
    "                        get 503\n"
    "      --ctx N           KV cache of a slot in tokens: prompt + completion\n"
    "                        (default: the model's context)\n"
    "      --threads N       CPU threads of the engine (default: online CPUs)\n"
    "      --kv-type TYPE    f16 (default), f32, q8_0 or q4_0 (53%, 28% of f16's bytes)\n"
    "      --backend B       cpu (default) or cuda (one slot)\n"
    "      --name NAME       the model's id in responses (default: the file name)\n"
    "      --chat-template NAME  the chat format instead of the model's template's:\n"
    "                        chatml, llama3, llama2, mistral, mistral-v1, mistral-v3,\n"
    "                        mistral-tekken, mistral-v7, mistral-v7-tekken, mistral-v11,\n"
    "                        mistral-v13, zephyr, phi3, phi4, gemma, granite, deepseek\n"
    "      --chat-template-file FILE  a Jinja chat template to read instead of the\n"
    "                        model's (its format told by its markers, as the model's)\n"
    "      --max-body BYTES  largest request body (default 8388608); more get 413\n"
    "      --timeout SECONDS close a connection idle this long (default 120); a\n"
    "                        stream waiting for its first token sends a keep-alive\n"
    "                        comment every quarter of it\n"
    "      --request-timeout SECONDS  close a connection that waits this long\n"
    "                        without a byte of its request, its first or the next\n"
    "                        on a kept-alive connection (default 15)\n"
    "      --api-key KEY     the API (/v1/...) wants \"Authorization: Bearer KEY\"\n"
    "                        (default: $CAKE_API_KEY when set, else none)\n";

typedef struct {
    const char *model, *host, *store, *name, *api_key;
    const char *chat_template_file; /* NULL: the model's */
    chat_format chat;               /* CHAT_NONE: as its template says */
    long port, chunk, io_depth, slots, batch, queue, ctx, threads, max_body, timeout,
        request_timeout;
    cake_mode mode;
    sched_policy policy;
    enum cake_kv_type kv_type;
    enum cake_backend_kind backend;
} serve_opts;

static int parse_args(int argc, char **argv, serve_opts *o) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"host", required_argument, 0, 'H'},
                                         {"port", required_argument, 0, 'p'},
                                         {"store", required_argument, 0, 'S'},
                                         {"mode", required_argument, 0, 'M'},
                                         {"chunk", required_argument, 0, 'c'},
                                         {"io-depth", required_argument, 0, 'I'},
                                         {"slots", required_argument, 0, 's'},
                                         {"queue", required_argument, 0, 'q'},
                                         {"ctx", required_argument, 0, 'x'},
                                         {"threads", required_argument, 0, 'j'},
                                         {"batch", required_argument, 0, 'T'},
                                         {"schedule", required_argument, 0, 'P'},
                                         {"kv-type", required_argument, 0, 'k'},
                                         {"backend", required_argument, 0, 'B'},
                                         {"name", required_argument, 0, 'N'},
                                         {"max-body", required_argument, 0, 'b'},
                                         {"api-key", required_argument, 0, 'K'},
                                         {"timeout", required_argument, 0, 'O'},
                                         {"request-timeout", required_argument, 0, 'W'},
                                         {"chat-template", required_argument, 0, 'C'},
                                         {"chat-template-file", required_argument, 0, 'F'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    *o = (serve_opts){.host = "127.0.0.1",
                      .store = DEFAULT_STORE,
                      .port = 8080,
                      .chunk = 256,
                      .io_depth = CAKE_DEFAULT_IO_DEPTH,
                      .slots = 0, /* 4, or 1 on the GPU */
                      .batch = 512,
                      .queue = 64,
                      .max_body = 8 << 20,
                      .timeout = 120,
                      .request_timeout = 15,
                      .mode = CAKE_MODE_CAKE};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        const char *what = NULL;
        switch (c) {
        case 'm':
            o->model = optarg;
            break;
        case 'H':
            o->host = optarg;
            break;
        case 'S':
            o->store = optarg;
            break;
        case 'N':
            o->name = optarg;
            break;
        case 'K':
            o->api_key = optarg;
            break;
        case 'C':
            if (chat_format_parse(optarg, &o->chat))
                what = "--chat-template is a format's name (cake serve --help)";
            break;
        case 'F':
            o->chat_template_file = optarg;
            break;
        case 'p':
            if (cli_parse_int(optarg, 0, 65535, &o->port)) what = "--port wants 0..65535";
            break;
        case 'c':
            if (cli_parse_int(optarg, 1, 1 << 20, &o->chunk))
                what = "--chunk wants a count in 1..1048576";
            break;
        case 'I':
            if (cli_parse_int(optarg, 1, 64, &o->io_depth)) what = "--io-depth wants 1..64";
            break;
        case 's':
            if (cli_parse_int(optarg, 1, 256, &o->slots)) what = "--slots wants 1..256";
            break;
        case 'q':
            if (cli_parse_int(optarg, 0, 1 << 20, &o->queue))
                what = "--queue wants a count in 0..1048576";
            break;
        case 'x':
            if (cli_parse_int(optarg, 1, 1 << 24, &o->ctx)) what = "--ctx wants a count >= 1";
            break;
        case 'P':
            if (sched_policy_parse(optarg, &o->policy)) what = "--schedule is priority or fcfs";
            break;
        case 'T':
            if (cli_parse_int(optarg, 1, 1 << 16, &o->batch)) what = "--batch wants 1..65536";
            break;
        case 'j':
            if (cli_parse_int(optarg, 1, 1024, &o->threads)) what = "--threads wants 1..1024";
            break;
        case 'b':
            if (cli_parse_int(optarg, 1024, 1L << 30, &o->max_body))
                what = "--max-body wants 1024..1073741824";
            break;
        case 'O':
            if (cli_parse_int(optarg, 1, 86400, &o->timeout)) what = "--timeout wants 1..86400";
            break;
        case 'W':
            if (cli_parse_int(optarg, 1, 86400, &o->request_timeout))
                what = "--request-timeout wants 1..86400";
            break;
        case 'M':
            if (cake_mode_parse(optarg, &o->mode)) what = "--mode is cake, load or compute";
            break;
        case 'k':
            if (cli_parse_kv_type(optarg, &o->kv_type))
                what = "--kv-type is f16, f32, q8_0 or q4_0";
            break;
        case 'B':
            if (cli_parse_backend(optarg, &o->backend)) what = "--backend is cpu or cuda";
            break;
        case 'h':
            fputs(help, stdout);
            return -1;
        default:
            fputs(help, stderr);
            return CLI_USAGE;
        }
        if (what) return cli_error(CLI_USAGE, "serve", "%s, got '%s'", what, optarg);
    }
    if (optind < argc)
        return cli_error(CLI_USAGE, "serve", "unexpected argument '%s'", argv[optind]);
    if (!o->model) return cli_error(CLI_USAGE, "serve", "-m MODEL is required");
    if (o->chat && o->chat_template_file)
        return cli_error(CLI_USAGE, "serve",
                         "--chat-template and --chat-template-file: one of them");
    if (!o->slots) o->slots = o->backend == CAKE_BACKEND_CUDA ? 1 : 4;
    if (o->backend == CAKE_BACKEND_CUDA && o->slots != 1)
        return cli_error(CLI_USAGE, "serve", "--backend cuda serves with one slot");
    if (!strcmp(o->store, "none")) o->store = NULL;
    if (o->store && cli_check_store_uri("serve", o->store)) return CLI_USAGE;
    if (!o->api_key) o->api_key = getenv("CAKE_API_KEY");
    if (o->api_key && !o->api_key[0]) o->api_key = NULL;
    return 0;
}

/* What the model's chat template says (else its vocabulary), or the one
 * o names or reads from a file: the format, and what its prompts take from
 * the template (am's chat, default_system, llama3_date, open_thinking,
 * strip_reasoning, dated_system_template; the strings malloc'd, the
 * caller's to free). A format that cannot write a prompt with the model's
 * vocabulary (a special token it lacks) is refused when o asks for it;
 * the model's own gets a warning (its chats answer 400). 0, or -1 with
 * the reason in err. */
static int read_chat_template(const cake_model *m, const serve_opts *o, api_model *am, char *err,
                              size_t errlen) {
    cake_gguf_str s;
    char *tmpl = NULL;
    size_t len;
    if (o->chat_template_file) {
        if (!(tmpl = cli_read_file(o->chat_template_file, &len, err, errlen))) return -1;
    } else if (!o->chat &&
               cake_gguf_get_str(m->gguf, "tokenizer.chat_template", &s, NULL, 0) == 0) {
        tmpl = strndup(s.ptr, s.len);
    }
    const cake_tokenizer *tok = cake_model_tokenizer(m);
    const chat_format f = o->chat ? o->chat : chat_detect(tmpl, tok);
    if (o->chat_template_file && !f) {
        free(tmpl);
        return cake_err(err, errlen,
                        "--chat-template-file %s: not a template cake knows (its markers: "
                        "docs/SERVER.md \"Chat formats\"; or name one with --chat-template)",
                        o->chat_template_file);
    }
    const chat_message hi = {.role = "user", .content = "Hi", .content_len = 2};
    cake_token *ids = NULL, end;
    int n_ids;
    char why[256];
    if (f && chat_prompt(f, tok, &hi, 1, NULL, &ids, &n_ids, &end, why, sizeof(why))) {
        if (o->chat || o->chat_template_file) {
            free(tmpl);
            return cake_err(err, errlen, "chat format %s: %s", chat_format_name(f), why);
        }
        fprintf(stderr, "cake serve: warning: chat format %s: %s (chats answer 400)\n",
                chat_format_name(f), why);
    }
    free(ids);
    am->chat = f;
    am->default_system = f == CHAT_CHATML ? chat_default_system(tmpl) : NULL;
    am->llama3_date = f == CHAT_LLAMA3 ? chat_llama3_date(tmpl) : NULL;
    am->open_thinking = (f == CHAT_CHATML || f == CHAT_DEEPSEEK) && chat_opens_thinking(tmpl);
    am->strip_reasoning = f == CHAT_CHATML && chat_strips_reasoning(tmpl);
    /* (kept whole: its default system message is rendered per request, with
     * the day's date) */
    const bool v7_on = f == CHAT_MISTRAL_V7 || f == CHAT_MISTRAL_V7_TEKKEN ||
                       f == CHAT_MISTRAL_V11 || f == CHAT_MISTRAL_V13;
    char *probe = v7_on ? chat_dated_default_system(tmpl, time(NULL)) : NULL;
    if (probe) {
        am->dated_system_template = tmpl;
        tmpl = NULL;
    }
    free(probe);
    free(tmpl);
    return 0;
}

int cmd_serve(int argc, char **argv) {
    serve_opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc < 0 ? CLI_OK : rc;

    /* Signals are taken by sigwait below: block them before any thread starts,
     * so that every thread inherits the mask. A closed socket is an error
     * return, not a signal. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[512];
    cake_model *model = NULL;
    cake_store *store = NULL;
    serve_pool *pool = NULL;
    serve_server *server = NULL;
    char *name = NULL;
    api_model am = {0};
    char speed_key[96] = "";
    rc = CLI_FAIL;
    if (o.store && cake_store_open(o.store, &store, err, sizeof(err))) {
        char shown[1024];
        cli_error(CLI_FAIL, "serve", "--store %s: %s",
                  cake_store_redact_uri(o.store, shown, sizeof(shown)), err);
        goto done;
    }
    /* A Redis that is down or refuses the password is not fatal (requests
     * compute, and load once it answers), but the operator should know. */
    if (store && cake_store_check(store, err, sizeof(err)))
        fprintf(stderr, "cake serve: warning: store %s: %s (lookups miss until it answers)\n",
                cake_store_uri(store), err);
    if (cake_model_load(o.model, &model, err, sizeof(err))) {
        cli_error(CLI_FAIL, "serve", "%s", err);
        goto done;
    }
    const cake_hparams *hp = cake_model_hparams(model);
    pool_config pc = {.store = store,
                      .mode = store ? o.mode : CAKE_MODE_COMPUTE,
                      .chunk = (int)o.chunk,
                      .io_depth = (int)o.io_depth,
                      .n_slots = (int)o.slots,
                      .batch = (int)o.batch,
                      .policy = o.policy,
                      .n_ctx = (int)(o.ctx && o.ctx < hp->n_ctx_train ? o.ctx : 0),
                      .n_threads = (int)o.threads,
                      .queue_max = (int)o.queue,
                      .kv_type = o.kv_type,
                      .backend = o.backend};
    if (read_chat_template(model, &o, &am, err, sizeof(err))) {
        cli_error(CLI_FAIL, "serve", "%s", err);
        goto done;
    }
    pc.calls = chat_calls(am.chat);
    if (pool_create(model, &pc, &pool, err, sizeof(err))) {
        cli_error(CLI_FAIL, "serve", "%s", err);
        goto done;
    }
    /* The compute speed and load rate that earlier runs measured
     * (cli/hints.c), so that the first requests need not guess; this
     * run's go back at the end. */
    if (store) {
        cli_hints_speed_key(speed_key, sizeof(speed_key), pool_engine(pool),
                            o.backend == CAKE_BACKEND_CUDA ? "cuda" : "cpu", o.chunk);
        cake_compute_speed speed = {0};
        cli_hints_load(speed_key, &speed, cake_store_uri(store), store);
        pool_speed_set(pool, &speed);
    }
    if (!(name = strdup(o.name ? o.name : o.model))) goto done;
    am.tok = cake_model_tokenizer(model);
    am.n_vocab = hp->n_vocab;
    am.n_ctx = pool_n_ctx(pool);
    am.name = o.name ? name : basename(name);
    http_config hc = {.host = o.host,
                      .port = (int)o.port,
                      .max_body = (size_t)o.max_body,
                      .max_connections = (int)(o.slots + o.queue + 16),
                      .api_key = o.api_key,
                      .idle_timeout_s = (int)o.timeout,
                      .request_timeout_s = (int)o.request_timeout};
    if (server_start(pool, &am, &hc, &server, err, sizeof(err))) {
        cli_error(CLI_FAIL, "serve", "%s", err);
        goto done;
    }
    fprintf(stderr,
            "cake serve: %s, context %d, chat format %s; store %s (mode %s, chunk %ld); %ld "
            "slot(s) batched %ld tokens a step, queue %ld%s\n",
            am.name, am.n_ctx, chat_format_name(am.chat), store ? cake_store_uri(store) : "none",
            cake_mode_name(pc.mode), o.chunk, o.slots, o.batch, o.queue,
            o.api_key ? "; API key required" : "");
    fprintf(stderr, "cake serve: listening on http://%s:%d\n", o.host, server_port(server));
    int sig = 0;
    sigwait(&stop_signals, &sig);
    fprintf(stderr, "cake serve: %s, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    rc = CLI_OK;
done:
    server_begin_shutdown(server);
    if (pool) pool_shutdown(pool); /* running requests stop at their next token */
    server_stop(server);           /* then their connections close */
    if (pool && store && rc == CLI_OK) {
        cake_compute_speed speed;
        pool_speed_get(pool, &speed);
        cli_hints_save(speed_key, &speed, store ? cake_store_uri(store) : NULL, store);
    }
    pool_free(pool); /* write-backs drained */
    cake_model_free(model);
    cake_store_close(store);
    free(name);
    free((char *)am.default_system);
    free((char *)am.llama3_date);
    free((char *)am.dated_system_template);
    return rc;
}
