/* `cake serve`, the real binary on loopback, driven over plain sockets: the
 * API's answers against `cake run` on the same model, streams against whole
 * answers, stop strings, a file store and a Redis store that dies, clients
 * that go away, a full queue, bad requests of every kind, and SIGTERM. The
 * chat formats and the request parser are taken apart in process. */
#include <cjson/cJSON.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <ctype.h>
#include <math.h>

#include "test_store_common.h"
#include "testutil.h"

#include "cake.h"
#include "model/tokenizer.h"
#include "server/chat.h"
#include "server/openai.h"
#include "engine/json_grammar.h"
#include "util/clock.h"

/* ---- the server process ---- */

typedef struct {
    pid_t pid;
    int port;
    char log[64];
} t_server;

/* Servers still running when a test fails (cmocka jumps out of it): killed
 * at exit, so that none outlives the test and holds its output open. */
static pid_t g_running[16];

static void kill_running(void) {
    for (int i = 0; i < 16; i++)
        if (g_running[i] > 0) kill(g_running[i], SIGKILL);
}

/* Starts `cake serve -m model --port 0 args...` (NULL-terminated); 0 when it
 * says it listens. Its stderr goes to a file, read for the port. */
static int serve_start(t_server *s, const char *model, ...) {
    const char *argv[40] = {CAKE_BIN, "serve", "-m", model, "--port", "0", "--threads", "2"};
    int argc = 8;
    va_list ap;
    va_start(ap, model);
    for (const char *a; argc < 39 && (a = va_arg(ap, const char *));) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    snprintf(s->log, sizeof(s->log), "/tmp/cake-test-serve-XXXXXX");
    const int fd = mkstemp(s->log);
    if (fd < 0) return -1;
    s->pid = fork();
    if (s->pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        dup2(fd, 2);
        execv(CAKE_BIN, (char *const *)argv);
        _exit(127);
    }
    close(fd);
    for (int i = 0; i < 16; i++)
        if (g_running[i] <= 0) {
            g_running[i] = s->pid;
            break;
        }
    for (int i = 0; i < 3000; i++) { /* 30 s: a sanitized build loads slowly */
        char text[4096] = "";
        FILE *f = fopen(s->log, "r");
        if (f) {
            text[fread(text, 1, sizeof(text) - 1, f)] = '\0';
            fclose(f);
        }
        const char *at = strstr(text, "listening on http://127.0.0.1:");
        if (at) {
            s->port = atoi(at + strlen("listening on http://127.0.0.1:"));
            return 0;
        }
        if (waitpid(s->pid, NULL, WNOHANG) == s->pid) break;
        usleep(10000);
    }
    return -1;
}

/* SIGTERM, then the exit status (-1: no exit within 20 s). */
static int serve_stop(t_server *s) {
    int st = -1;
    if (s->pid > 0) {
        kill(s->pid, SIGTERM);
        for (int i = 0; i < 2000; i++) {
            if (waitpid(s->pid, &st, WNOHANG) == s->pid) break;
            usleep(10000);
            st = -1;
        }
        if (st == -1) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, NULL, 0);
        }
    }
    for (int i = 0; i < 16; i++)
        if (g_running[i] == s->pid) g_running[i] = 0;
    s->pid = 0;
    const int code = st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (code != 0 || getenv("CAKE_TEST_SERVE_LOG")) { /* what the server said */
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "cat %s >&2", s->log);
        if (system(cmd)) fprintf(stderr, "cannot show %s\n", s->log);
    }
    unlink(s->log);
    return code;
}

/* ---- HTTP/1.1 over a socket ---- */

typedef struct {
    int status;
    char *head; /* status line and headers */
    char *body; /* NUL-terminated, chunked encoding undone */
    size_t len;
} t_resp;

static void resp_free(t_resp *r) {
    free(r->head);
    free(r->body);
    *r = (t_resp){0};
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    struct timeval tv = {60, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

static void send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return; /* the server may close first (413) */
        p += w, n -= (size_t)w;
    }
}

/* extra: more header lines ("Name: value\r\n"), or "" */
static void send_request_with(int fd, const char *method, const char *path, const char *body,
                              const char *extra) {
    char head[512];
    snprintf(head, sizeof(head),
             "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s"
             "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
             method, path, extra, body ? strlen(body) : 0);
    send_all(fd, head, strlen(head));
    if (body) send_all(fd, body, strlen(body));
}

static void send_request(int fd, const char *method, const char *path, const char *body) {
    send_request_with(fd, method, path, body, "");
}

/* Reads the whole response (the server closes the connection after it). */
static t_resp read_response(int fd) {
    size_t cap = 1 << 16, n = 0;
    char *raw = malloc(cap);
    for (ssize_t r; (r = recv(fd, raw + n, cap - n - 1, 0)) > 0;)
        if ((n += (size_t)r) + 1 == cap) raw = realloc(raw, cap *= 2);
    close(fd);
    raw[n] = '\0';
    t_resp out = {0};
    char *sep = strstr(raw, "\r\n\r\n");
    assert_non_null(sep);
    *sep = '\0';
    out.head = strdup(raw);
    sscanf(raw, "HTTP/1.%*d %d", &out.status);
    const char *body = sep + 4;
    size_t blen = n - (size_t)(body - raw);
    out.body = malloc(blen + 1);
    if (strcasestr(out.head, "Transfer-Encoding: chunked")) {
        for (const char *p = body;;) {
            size_t sz = strtoul(p, NULL, 16);
            p = strstr(p, "\r\n");
            if (!sz || !p) break;
            memcpy(out.body + out.len, p + 2, sz);
            out.len += sz;
            p += 2 + sz + 2;
        }
    } else {
        memcpy(out.body, body, blen);
        out.len = blen;
    }
    out.body[out.len] = '\0';
    free(raw);
    return out;
}

static t_resp http(int port, const char *method, const char *path, const char *body) {
    int fd = connect_to(port);
    send_request(fd, method, path, body);
    return read_response(fd);
}

/* POSTs body (printf format) and returns the parsed JSON of a 200 answer. */
__attribute__((format(printf, 3, 4))) static cJSON *post_ok(int port, const char *path,
                                                            const char *fmt, ...) {
    char body[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof(body), fmt, ap);
    va_end(ap);
    t_resp r = http(port, "POST", path, body);
    if (r.status != 200) fprintf(stderr, "%s -> %d %s\n", body, r.status, r.body);
    assert_int_equal(r.status, 200);
    cJSON *j = cJSON_Parse(r.body);
    assert_non_null(j);
    resp_free(&r);
    return j;
}

static const cJSON *maybe_at(const cJSON *j, const char *path) { /* "a.b.0.c"; NULL: none */
    char buf[128];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *save, *k = strtok_r(buf, ".", &save); j && k; k = strtok_r(NULL, ".", &save))
        j = cJSON_IsArray(j) ? cJSON_GetArrayItem(j, atoi(k))
                             : cJSON_GetObjectItemCaseSensitive(j, k);
    return j;
}

static const cJSON *at(const cJSON *j, const char *path) {
    const cJSON *v = maybe_at(j, path);
    if (!v) fail_msg("no %s in the answer", path);
    return v;
}

static const char *str_at(const cJSON *j, const char *path) {
    const cJSON *v = at(j, path);
    assert_true(cJSON_IsString(v));
    return v->valuestring;
}

static double num_at(const cJSON *j, const char *path) {
    const cJSON *v = at(j, path);
    assert_true(cJSON_IsNumber(v));
    return v->valuedouble;
}

/* The value of a metric line "name value" in /metrics. */
static double metric(int port, const char *name) {
    t_resp r = http(port, "GET", "/metrics", NULL);
    assert_int_equal(r.status, 200);
    char key[160];
    snprintf(key, sizeof(key), "\n%s ", name);
    const char *p = strstr(r.body, key);
    assert_non_null(p);
    const double v = strtod(p + strlen(key), NULL);
    resp_free(&r);
    return v;
}

/* The JSON objects of an event stream's "data: " lines, and whether it
 * ended with "data: [DONE]". */
static int parse_events(const char *body, cJSON **ev, int cap, int *done) {
    int n = 0;
    *done = 0;
    for (const char *p = body; (p = strstr(p, "data: ")); p += 6) {
        if (!strncmp(p + 6, "[DONE]\n\n", 8)) {
            *done = 1;
            continue;
        }
        assert_true(n < cap);
        assert_non_null(ev[n++] = cJSON_Parse(p + 6)); /* stops at the line's end */
    }
    return n;
}

/* The JSON objects of an answer: a stream's events, or its one body. */
static int answer_objects(const t_resp *r, int stream, cJSON **ev, int cap) {
    int done = 0;
    if (stream) return parse_events(r->body, ev, cap, &done);
    ev[0] = cJSON_Parse(r->body);
    return 1;
}

/* ---- fixtures ---- */

static char g_tiny[64];

static int setup(void **state) {
    (void)state;
    signal(SIGPIPE, SIG_IGN);
    atexit(kill_running);
    setenv("CAKE_HINTS", "", 1);
    return test_make_model("tiny", "f16", g_tiny);
}

/* A copy of the tiny model with v's changes, in a new temp file (path: 64). */
static void tiny_variant(const test_model_variant *v, char path[64]) {
    char err[256];
    snprintf(path, 64, "/tmp/cake-test-serve-model-XXXXXX");
    const int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(test_write_variant(g_tiny, path, v, err, sizeof(err)), 0);
}

static int teardown(void **state) {
    (void)state;
    unlink(g_tiny);
    kill_running();
    return 0;
}

/* ---- the command line ---- */

static void test_usage_errors(void **state) {
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s serve 2>/dev/null", CAKE_BIN);
    assert_int_equal(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof(cmd), "%s serve -m %s --port 70000 2>/dev/null", CAKE_BIN, g_tiny);
    assert_int_equal(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof(cmd), "%s serve -m %s --timeout 0 2>/dev/null", CAKE_BIN, g_tiny);
    assert_int_equal(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof(cmd), "%s serve -m %s --slots 2 --backend cuda 2>/dev/null", CAKE_BIN,
             g_tiny);
    assert_int_equal(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof(cmd), "%s serve -m /nonexistent.gguf --port 0 2>/dev/null", CAKE_BIN);
    assert_int_equal(WEXITSTATUS(system(cmd)), 1);
    snprintf(cmd, sizeof(cmd), "%s serve --help | grep -q -- --slots", CAKE_BIN);
    assert_int_equal(WEXITSTATUS(system(cmd)), 0);

    /* A port in use: a clear error, exit 1. */
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, NULL), 0);
    snprintf(cmd, sizeof(cmd), "%s serve -m %s --port %d 2>&1 | grep -q 'cannot listen'", CAKE_BIN,
             g_tiny, s.port);
    assert_int_equal(WEXITSTATUS(system(cmd)), 0);
    assert_int_equal(serve_stop(&s), 0);
}

/* --chat-template NAME and --chat-template-file FILE: a chat format for a
 * model whose template cake does not know (the tiny model has none), or
 * instead of its own; one its vocabulary cannot write (no such special
 * token) or a file that is no template cake knows stops the start, with
 * the reason. */
static void test_chat_template_option(void **state) {
    (void)state;
    const char *chat = "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":2}";
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    t_resp r = http(s.port, "POST", "/v1/chat/completions", chat);
    assert_int_equal(r.status, 400); /* (no template) */
    resp_free(&r);
    assert_int_equal(serve_stop(&s), 0);
    char path[] = "/tmp/cake-test-template-XXXXXX";
    const int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char tmpl[] = "{% for m in messages %}{{ ' [INST] ' + m['content'] + ' [/INST]' }}"
                        "{% endfor %}";
    assert_int_equal(write(fd, tmpl, sizeof(tmpl) - 1), (ssize_t)sizeof(tmpl) - 1);
    close(fd);
    const char *const starts[][2] = {{"--chat-template", "mistral"},
                                     {"--chat-template-file", path}};
    for (int k = 0; k < 2; k++) {
        assert_int_equal(
            serve_start(&s, g_tiny, "--store", "none", starts[k][0], starts[k][1], NULL), 0);
        r = http(s.port, "POST", "/v1/chat/completions", chat);
        assert_int_equal(r.status, 200);
        resp_free(&r);
        FILE *f = fopen(s.log, "r");
        char text[4096] = "";
        text[fread(text, 1, sizeof(text) - 1, f)] = '\0';
        fclose(f);
        assert_non_null(strstr(text, k ? "chat format mistral-v1" : "chat format mistral;"));
        assert_int_equal(serve_stop(&s), 0);
    }
    char cmd[1024];
    snprintf(
        cmd, sizeof(cmd),
        "%s serve -m %s --port 0 --chat-template chatml 2>&1 | grep -q 'no <|im_start|> token'",
        CAKE_BIN, g_tiny);
    assert_int_equal(WEXITSTATUS(system(cmd)), 0);
    snprintf(cmd, sizeof(cmd), "%s serve -m %s --port 0 --chat-template chatml 2>/dev/null",
             CAKE_BIN, g_tiny);
    assert_int_equal(WEXITSTATUS(system(cmd)), 1);
    snprintf(cmd, sizeof(cmd),
             "%s serve -m %s --port 0 --chat-template-file %s 2>&1 | grep -q "
             "'not a template cake knows'",
             CAKE_BIN, g_tiny, CAKE_BIN);
    assert_int_equal(WEXITSTATUS(system(cmd)), 0);
    snprintf(cmd, sizeof(cmd), "%s serve -m %s --chat-template jinja 2>/dev/null", CAKE_BIN,
             g_tiny);
    assert_int_equal(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof(cmd),
             "%s serve -m %s --chat-template chatml --chat-template-file %s 2>/dev/null", CAKE_BIN,
             g_tiny, path);
    assert_int_equal(WEXITSTATUS(system(cmd)), 2);
    unlink(path);
}

/* --api-key (or CAKE_API_KEY): the API wants it, /health and /metrics not. */
static void test_api_key(void **state) {
    (void)state;
    t_server s;
    setenv("CAKE_API_KEY", "s3cret", 1);
    const int started = serve_start(&s, g_tiny, "--store", "none", NULL);
    unsetenv("CAKE_API_KEY");
    assert_int_equal(started, 0);
    static const struct {
        const char *path, *auth;
        int status;
    } cases[] = {
        {"/v1/completions", "", 401},
        {"/v1/completions", "Authorization: Bearer s3cre\r\n", 401},
        {"/v1/completions", "Authorization: Bearer s3cret!\r\n", 401},
        {"/v1/completions", "Authorization: s3cret\r\n", 401},
        {"/v1/completions", "Authorization: Bearer s3cret\r\n", 200},
        {"/v1/completions", "Authorization: bearer s3cret\r\n", 200}, /* (any case) */
        {"/v1/models", "", 401},
        {"/v1/models", "Authorization: Bearer s3cret\r\n", 200},
        {"/tokenize", "", 401},
        {"/tokenize", "Authorization: Bearer s3cret\r\n", 200},
        {"/health", "", 200},
        {"/metrics", "", 200},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const int post =
            !strcmp(cases[i].path, "/v1/completions") || !strcmp(cases[i].path, "/tokenize");
        int fd = connect_to(s.port);
        send_request_with(fd, post ? "POST" : "GET", cases[i].path,
                          post ? "{\"prompt\":\"Hi\",\"max_tokens\":2}" : NULL, cases[i].auth);
        t_resp r = read_response(fd);
        if (r.status != cases[i].status)
            fail_msg("%s with '%s': %d %s", cases[i].path, cases[i].auth, r.status, r.body);
        if (r.status == 401) assert_non_null(strstr(r.body, "API key"));
        if (r.status == 401) assert_non_null(strstr(r.head, "WWW-Authenticate: Bearer"));
        resp_free(&r);
    }
    /* (the 401s are counted with the other statuses) */
    assert_int_equal(metric(s.port, "cake_http_responses_total{code=\"401\"}"), 6);
    assert_int_equal(serve_stop(&s), 0);

    /* the same key as an option */
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--api-key", "k2", NULL), 0);
    int fd = connect_to(s.port);
    send_request_with(fd, "GET", "/v1/models", NULL, "Authorization: Bearer k2\r\n");
    t_resp r = read_response(fd);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    r = http(s.port, "GET", "/v1/models", NULL);
    assert_int_equal(r.status, 401);
    resp_free(&r);
    assert_int_equal(serve_stop(&s), 0);
}

/* ---- bad requests: clear errors, and the server keeps serving ---- */

static void test_bad_requests(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--ctx", "64", "--max-body", "4096", "--name",
                                 "tiny \"q\"\xff", NULL),
                     0);
    t_resp r = http(s.port, "GET", "/v1/models", NULL);
    cJSON *models = cJSON_Parse(r.body);
    assert_string_equal(str_at(models, "data.0.id"), "tiny \"q\"\xef\xbf\xbd");
    cJSON_Delete(models);
    resp_free(&r);
    static const struct {
        const char *method, *path, *body;
        int status;
        const char *says;
    } cases[] = {
        {"GET", "/nope", NULL, 404, "no such endpoint"},
        {"GET", "/v1/completions", NULL, 405, "wants POST"},
        {"POST", "/health", "{}", 405, "wants GET"},
        {"POST", "/v1/completions", "", 400, "JSON object"},
        {"POST", "/v1/completions", "{\"prompt\":", 400, "JSON object"},
        {"POST", "/v1/completions", "[1,2]", 400, "JSON object"},
        {"POST", "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":1} x", 400, "JSON object"},
        {"POST", "/v1/completions", "{\"prompt\":\"Hi\"}{\"max_tokens\":\"bad\"}", 400,
         "JSON object"},
        {"POST", "/v1/completions", "{\"prompt\":\"Hi\",\"stop\":\"girl\\u0000XYZ\"}", 400, "NUL"},
        {"POST", "/v1/completions", "{\"prompt\":\"Once\\u0000 zebra\"}", 400, "NUL"},
        {"POST", "/tokenize", "{\"prompt\":\"a\\\\\\u0000\"}", 400, "NUL"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"min_tokens\":17}", 400, "the default"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stream_options\":{}}", 400,
         "'stream_options' is for"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"logit_bias\":{\" 5\":1}}", 400,
         "not a token id"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"logit_bias\":{\"+5\":1}}", 400,
         "not a token id"},
        {"POST", "/v1/completions", "{}", 400, "'prompt'"},
        {"POST", "/v1/completions", "{\"prompt\":\"Hi\",\"cache_salt\":\"\"}", 400, "'cache_salt'"},
        {"POST", "/v1/completions", "{\"prompt\":\"Hi\",\"cache_salt\":5}", 400, "'cache_salt'"},
        {"POST", "/v1/completions", "{\"prompt\":[]}", 400, "empty"},
        {"POST", "/v1/completions", "{\"prompt\":[1,99999]}", 400, "not a token id"},
        {"POST", "/v1/completions", "{\"prompt\":[1,2.5]}", 400, "not a token id"},
        {"POST", "/v1/completions", "{\"prompt\":[\"a\",5]}", 400, "a list of prompts holds"},
        {"POST", "/v1/completions", "{\"prompt\":[[1,2],[1,99999]]}", 400, "not a token id"},
        {"POST", "/v1/completions", "{\"prompt\":[\"a\",\"b\",\"c\",\"d\",\"e\"],\"n\":16}", 400,
         "at most 64 answers"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"max_tokens\":0}", 400, "'max_tokens'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"max_tokens\":\"5\"}", 400,
         "'max_tokens'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"temperature\":3}", 400, "'temperature'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"top_p\":0}", 400, "'top_p'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"seed\":-1}", 400, "'seed'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"n\":0}", 400, "'n'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stop_token_ids\":[99999]}", 400,
         "'stop_token_ids'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stop_token_ids\":[1e300]}", 400,
         "'stop_token_ids'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stop_token_ids\":7}", 400,
         "'stop_token_ids'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"n\":17}", 400, "'n'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"n\":1.5}", 400, "'n'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stream\":1}", 400, "'stream'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"ignore_eos\":\"yes\"}", 400,
         "'ignore_eos'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stop\":\"\"}", 400, "'stop'"},
        {"POST", "/v1/completions",
         "{\"prompt\":\"hi\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"j\","
         "\"k\","
         "\"l\",\"m\",\"n\",\"o\",\"p\",\"q\"]}",
         400, "'stop'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"logprobs\":21}", 400, "'logprobs'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"logprobs\":true}", 400, "'logprobs'"},
        {"POST", "/v1/chat/completions", "{\"messages\":[],\"logprobs\":2}", 400, "'logprobs'"},
        {"POST", "/v1/chat/completions", "{\"messages\":[],\"top_logprobs\":2}", 400,
         "needs 'logprobs'"},
        {"POST", "/v1/chat/completions", "{\"messages\":[],\"logprobs\":true,\"top_logprobs\":21}",
         400, "'top_logprobs'"},
        {"POST", "/v1/chat/completions", "{\"messages\":[],\"echo\":true}", 400,
         "'echo' is for /v1/completions"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"echo\":true,\"stream\":true}", 400,
         "'echo' with 'stream'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"echo\":1}", 400, "'echo'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"prompt_logprobs\":21}", 400,
         "'prompt_logprobs'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"prompt_logprobs\":1,\"stream\":true}",
         400, "'prompt_logprobs' with 'stream'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"presence_penalty\":3}", 400,
         "'presence_penalty'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"frequency_penalty\":\"1\"}", 400,
         "'frequency_penalty'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"logit_bias\":{\"x5\":1}}", 400,
         "not a token id"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"logit_bias\":{\"5\":101}}", 400,
         "'logit_bias'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"suffix\":\"x\"}", 400,
         "no prefix, suffix and middle tokens"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"suffix\":5}", 400, "'suffix'"},
        {"POST", "/v1/chat/completions", "{\"messages\":[],\"suffix\":\"x\"}", 400, "'suffix'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"top_k\":2.5}", 400, "'top_k'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"typical_p\":0.5}", 400, "'typical_p'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"mirostat\":2}", 400, "neutral value"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"max_tokens\":4,\"min_tokens\":5}", 400,
         "'min_tokens'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"min_tokens\":-1}", 400, "'min_tokens'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"min_p\":2}", 400, "'min_p'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"repetition_penalty\":0}", 400,
         "'repetition_penalty'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"repeat_last_n\":-2}", 400,
         "'repeat_last_n'"},
        {"POST", "/v1/completions",
         "{\"prompt\":\"hi\",\"repetition_penalty\":1.1,\"repeat_penalty\":1.1}", 400, "give one"},
        {"POST", "/v1/completions",
         "{\"prompt\":\"hi\",\"response_format\":{\"type\":\"json_schema\"}}", 400,
         "'response_format'"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"guided_regex\":\"a+\"}", 400,
         "not supported"},
        {"POST", "/v1/completions", "{\"prompt\":\"hi\",\"stream_options\":3}", 400,
         "'stream_options'"},
        /* 70 tokens in a context of 64 */
        {"POST", "/v1/completions",
         "{\"prompt\":[1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,"
         "6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10]}",
         400, "context holds 64"},
        {"POST", "/v1/chat/completions", "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
         400, "no chat template"},
    };
    int n400 = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        n400 += cases[i].status == 400;
        r = http(s.port, cases[i].method, cases[i].path, cases[i].body);
        cJSON *j = cJSON_Parse(r.body);
        const cJSON *msg =
            j ? cJSON_GetObjectItem(cJSON_GetObjectItem(j, "error"), "message") : NULL;
        if (r.status != cases[i].status || !cJSON_IsString(msg) ||
            !strstr(msg->valuestring, cases[i].says))
            fail_msg("%s %s %s: %d %s, want %d '%s'", cases[i].method, cases[i].path,
                     cases[i].body ? cases[i].body : "", r.status, r.body, cases[i].status,
                     cases[i].says);
        if (r.status == 405) /* (the methods the path takes) */
            assert_non_null(strstr(r.head, strcmp(cases[i].path, "/health") ? "Allow: POST"
                                                                            : "Allow: GET, HEAD"));
        cJSON_Delete(j);
        resp_free(&r);
    }

    /* HEAD where GET is taken: the head alone */
    r = http(s.port, "HEAD", "/health", NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);
    /* (an escaped backslash before "u0000" is text, not a NUL) */
    r = http(s.port, "POST", "/tokenize", "{\"prompt\":\"a\\\\u0000\"}");
    assert_int_equal(r.status, 200);
    resp_free(&r);

    /* Bodies over the limit: with a length up front, and sent in chunks. */
    char big[6000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    r = http(s.port, "POST", "/v1/completions", big);
    assert_int_equal(r.status, 413);
    resp_free(&r);
    int fd = connect_to(s.port);
    const char *head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n";
    send_all(fd, head, strlen(head));
    for (int i = 0; i < 6; i++) {
        char chunk[1100];
        snprintf(chunk, sizeof(chunk), "3e8\r\n%.1000s\r\n", big);
        send_all(fd, chunk, strlen(chunk));
    }
    send_all(fd, "0\r\n\r\n", 5);
    r = read_response(fd);
    assert_int_equal(r.status, 413);
    resp_free(&r);

    /* Not HTTP at all (MHD closes the connection), and a connection that
     * closes mid-request. */
    fd = connect_to(s.port);
    send_all(fd, "GARBAGE\r\n\r\n", 11);
    char junk[256];
    while (recv(fd, junk, sizeof(junk), 0) > 0) continue;
    close(fd);
    fd = connect_to(s.port);
    send_all(fd, "POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro", 59);
    close(fd);

    /* Still serving. */
    r = http(s.port, "GET", "/health", NULL);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\"ok\""));
    resp_free(&r);
    cJSON *j = post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hello\",\"max_tokens\":3}");
    assert_int_equal(num_at(j, "usage.completion_tokens"), 3);
    cJSON_Delete(j);
    assert_int_equal(metric(s.port, "cake_http_responses_total{code=\"400\"}"), n400);
    assert_int_equal(metric(s.port, "cake_http_responses_total{code=\"413\"}"), 2);
    assert_int_equal(serve_stop(&s), 0);
}

/* ---- answers ---- */

/* `cake run --json` on the same model: the reference answer. */
static cJSON *cake_run(const char *model, const char *prompt, int n) {
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "%s run -m %s -p '%s' -n %d --temp 0 --json --threads 2 2>/dev/null",
             CAKE_BIN, model, prompt, n);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    char buf[65536];
    const size_t len = fread(buf, 1, sizeof(buf) - 1, f);
    buf[len] = '\0';
    assert_int_equal(pclose(f), 0);
    cJSON *j = cJSON_Parse(buf);
    assert_non_null(j);
    return j;
}

static void assert_same_ids(const cJSON *a, const cJSON *b) {
    assert_int_equal(cJSON_GetArraySize(a), cJSON_GetArraySize(b));
    for (int i = 0; i < cJSON_GetArraySize(a); i++)
        assert_int_equal(cJSON_GetArrayItem(a, i)->valueint, cJSON_GetArrayItem(b, i)->valueint);
}

/* Greedy answers equal `cake run`'s, from text and from token ids; the
 * stream's pieces add up to the whole answer. */
static void check_answers(const char *model, const char *prompt, int n) {
    t_server s;
    assert_int_equal(serve_start(&s, model, "--store", "none", NULL), 0);
    cJSON *ref = cake_run(model, prompt, n);
    cJSON *j = post_ok(s.port, "/v1/completions",
                       "{\"model\":\"x\",\"prompt\":\"%s\",\"max_tokens\":%d,\"temperature\":0}",
                       prompt, n);
    assert_same_ids(at(j, "cake.generated_ids"), at(ref, "generated_ids"));
    assert_string_equal(str_at(j, "choices.0.text"), str_at(ref, "text"));
    assert_string_equal(str_at(j, "object"), "text_completion");
    assert_int_equal(num_at(j, "usage.prompt_tokens"), num_at(ref, "prompt_tokens"));
    const char *finish = str_at(j, "choices.0.finish_reason");
    assert_true(!strcmp(finish, "length") || !strcmp(finish, "stop"));

    /* the prompt as ids */
    char *ids = cJSON_PrintUnformatted(at(ref, "prompt_ids"));
    cJSON *k = post_ok(s.port, "/v1/completions",
                       "{\"prompt\":%s,\"max_tokens\":%d,\"temperature\":0}", ids, n);
    assert_same_ids(at(k, "cake.generated_ids"), at(ref, "generated_ids"));
    free(ids);
    cJSON_Delete(k);

    /* streamed, with usage */
    char body[1024];
    snprintf(body, sizeof(body),
             "{\"prompt\":\"%s\",\"max_tokens\":%d,\"temperature\":0,\"stream\":true,"
             "\"stream_options\":{\"include_usage\":true}}",
             prompt, n);
    t_resp r = http(s.port, "POST", "/v1/completions", body);
    assert_int_equal(r.status, 200);
    assert_non_null(strcasestr(r.head, "Content-Type: text/event-stream"));
    cJSON *ev[600];
    int done, n_ev = parse_events(r.body, ev, 600, &done);
    assert_true(done);
    assert_true(n_ev >= 2);
    char text[65536] = "";
    for (int i = 0; i < n_ev - 2; i++) {
        assert_true(cJSON_IsNull(at(ev[i], "choices.0.finish_reason")));
        strcat(text, str_at(ev[i], "choices.0.text"));
    }
    assert_string_equal(text, str_at(j, "choices.0.text"));
    assert_string_equal(str_at(ev[n_ev - 2], "choices.0.finish_reason"), finish);
    assert_same_ids(at(ev[n_ev - 2], "cake.generated_ids"), at(ref, "generated_ids"));
    assert_int_equal(cJSON_GetArraySize(at(ev[n_ev - 1], "choices")), 0);
    assert_int_equal(num_at(ev[n_ev - 1], "usage.completion_tokens"),
                     num_at(j, "usage.completion_tokens"));
    for (int i = 0; i < n_ev; i++) cJSON_Delete(ev[i]);
    resp_free(&r);
    cJSON_Delete(j);
    cJSON_Delete(ref);
    /* a stream that ran to its end is not counted as cancelled */
    assert_int_equal(metric(s.port, "cake_requests_cancelled_total"), 0);
    assert_int_equal(metric(s.port, "cake_requests_finished_total"), 3);
    assert_int_equal(serve_stop(&s), 0);
}

static void test_answers_tiny(void **state) {
    (void)state;
    check_answers(g_tiny, "Once upon a time", 40);
}

static void test_answers_stories260k(void **state) {
    (void)state;
    const char *model = test_model_path("stories260K.gguf");
    if (!model) {
        print_message("skip: stories260K.gguf not in %s\n", test_models_dir());
        return;
    }
    check_answers(model, "Once upon a time", 60);
}

/* A Llama 2 chat template (tiny_variant gives it to the tiny model). */
static const char *LLAMA2_TEMPLATE =
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
    "message['content'] + '\\n<</SYS>>\\n\\n' }}{% endif %}{% endfor %}";

/* Log-probabilities: the first token's equal its logits' log softmax
 * (`cake run --dump-logits`); a greedy token is its own likeliest
 * alternative; the tokens spell the text at their offsets; a stream
 * carries the same; a chat's come with their bytes. */
static void test_logprobs(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    enum { N = 8, K = 3 };
    cJSON *j = post_ok(s.port, "/v1/completions",
                       "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":0,"
                       "\"ignore_eos\":true,\"logprobs\":%d}",
                       N, K);
    const cJSON *lp = at(j, "choices.0.logprobs");
    assert_int_equal(cJSON_GetArraySize(at(lp, "tokens")), N);
    char text[4096] = "";
    for (int i = 0; i < N; i++) {
        const cJSON *top = cJSON_GetArrayItem(at(lp, "top_logprobs"), i);
        const double chosen = cJSON_GetArrayItem(at(lp, "token_logprobs"), i)->valuedouble;
        double best = -INFINITY;
        for (const cJSON *t = top->child; t; t = t->next) best = fmax(best, t->valuedouble);
        assert_true(cJSON_GetArraySize(top) >= 1 && cJSON_GetArraySize(top) <= K);
        assert_true(chosen <= 0 && chosen == best); /* greedy */
        assert_int_equal(cJSON_GetArrayItem(at(lp, "text_offset"), i)->valueint, (int)strlen(text));
        strcat(text, cJSON_GetArrayItem(at(lp, "tokens"), i)->valuestring);
    }
    assert_string_equal(text, str_at(j, "choices.0.text"));

    /* the first token against the engine's logits */
    char logits_path[] = "/tmp/cake-test-logits-XXXXXX", cmd[512];
    const int fd = mkstemp(logits_path);
    assert_true(fd >= 0);
    close(fd);
    snprintf(cmd, sizeof(cmd),
             "%s run -m %s -p 'Once upon a time' -n 1 --temp 0 --threads 2 --dump-logits %s "
             ">/dev/null 2>&1",
             CAKE_BIN, g_tiny, logits_path);
    assert_int_equal(system(cmd), 0);
    FILE *f = fopen(logits_path, "rb");
    assert_non_null(f);
    float *logits = malloc(1 << 20);
    const size_t n_vocab = fread(logits, sizeof(float), (1 << 20) / sizeof(float), f);
    fclose(f);
    unlink(logits_path);
    assert_true(n_vocab > 0);
    double max = logits[0], sum = 0, top[K];
    for (size_t i = 0; i < n_vocab; i++) max = fmax(max, logits[i]);
    for (size_t i = 0; i < n_vocab; i++) sum += exp(logits[i] - max);
    const double lse = max + log(sum);
    const int id0 = cJSON_GetArrayItem(at(j, "cake.generated_ids"), 0)->valueint;
    assert_true(fabs(cJSON_GetArrayItem(at(lp, "token_logprobs"), 0)->valuedouble -
                     (logits[id0] - lse)) < 1e-4);
    for (int k = 0; k < K; k++) { /* the K largest, in order */
        top[k] = -INFINITY;
        for (size_t i = 0; i < n_vocab; i++)
            if (logits[i] - lse > top[k] && (k == 0 || logits[i] - lse < top[k - 1]))
                top[k] = logits[i] - lse;
    }
    const cJSON *top0 = cJSON_GetArrayItem(at(lp, "top_logprobs"), 0);
    int k = 0;
    for (const cJSON *t = top0->child; t; t = t->next, k++)
        assert_true(fabs(t->valuedouble - top[k]) < 1e-4);
    free(logits);

    /* streamed: the same tokens and values, spread over the events */
    char body[512];
    snprintf(body, sizeof(body),
             "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":0,"
             "\"ignore_eos\":true,\"logprobs\":%d,\"stream\":true}",
             N, K);
    t_resp r = http(s.port, "POST", "/v1/completions", body);
    cJSON *ev[64];
    int done, n_ev = parse_events(r.body, ev, 64, &done), got = 0;
    assert_true(done);
    for (int e = 0; e < n_ev; e++) {
        const cJSON *elp = at(ev[e], "choices.0.logprobs");
        for (int i = 0; i < cJSON_GetArraySize(at(elp, "tokens")); i++, got++) {
            assert_true(got < N);
            assert_string_equal(cJSON_GetArrayItem(at(elp, "tokens"), i)->valuestring,
                                cJSON_GetArrayItem(at(lp, "tokens"), got)->valuestring);
            assert_true(cJSON_GetArrayItem(at(elp, "token_logprobs"), i)->valuedouble ==
                        cJSON_GetArrayItem(at(lp, "token_logprobs"), got)->valuedouble);
        }
        cJSON_Delete(ev[e]);
    }
    assert_int_equal(got, N);
    resp_free(&r);
    cJSON_Delete(j);
    assert_int_equal(serve_stop(&s), 0);

    /* a chat's: token, logprob, bytes and alternatives for each token */
    char path[64];
    tiny_variant(&(test_model_variant){.chat_template = LLAMA2_TEMPLATE}, path);
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    cJSON *c =
        post_ok(s.port, "/v1/chat/completions",
                "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":%d,"
                "\"temperature\":0,\"ignore_eos\":true,\"logprobs\":true,\"top_logprobs\":2}",
                N);
    const cJSON *content = at(c, "choices.0.logprobs.content");
    assert_int_equal(cJSON_GetArraySize(content), N);
    text[0] = '\0';
    for (int i = 0; i < N; i++) {
        const cJSON *t = cJSON_GetArrayItem(content, i);
        const char *tok = str_at(t, "token");
        const cJSON *bytes = at(t, "bytes");
        assert_int_equal(cJSON_GetArraySize(bytes), (int)strlen(tok));
        for (int b = 0; b < cJSON_GetArraySize(bytes); b++)
            assert_int_equal(cJSON_GetArrayItem(bytes, b)->valueint, (unsigned char)tok[b]);
        assert_int_equal(cJSON_GetArraySize(at(t, "top_logprobs")), 2);
        assert_true(num_at(t, "top_logprobs.0.logprob") == num_at(t, "logprob"));
        assert_true(num_at(t, "top_logprobs.1.logprob") <= num_at(t, "logprob"));
        strcat(text, tok);
    }
    assert_string_equal(text, str_at(c, "choices.0.message.content"));
    cJSON_Delete(c);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
}

static int has_id(const cJSON *ids, int from, int to, int id) {
    for (int i = from; i < to; i++)
        if (cJSON_GetArrayItem(ids, i)->valueint == id) return 1;
    return 0;
}

/* The repetition penalty, vLLM's and llama.cpp's: at 1 (or a window of 0)
 * the plain answer; at 100 over everything no token of the prompt or of
 * the answer so far comes again; over the last token only, no token
 * follows itself, but earlier ones come back. */
static void check_repetition(int port, const cJSON *plain, int n) {
#define ask                                                                                        \
    "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,%s}"
    cJSON *one = post_ok(port, "/v1/completions", ask, n, "\"repetition_penalty\":1");
    cJSON *none =
        post_ok(port, "/v1/completions", ask, n, "\"repeat_penalty\":100,\"repeat_last_n\":0");
    cJSON *all = post_ok(port, "/v1/completions", ask, n, "\"repetition_penalty\":100");
    cJSON *last =
        post_ok(port, "/v1/completions", ask, n, "\"repeat_penalty\":100,\"repeat_last_n\":1");
#undef ask
    cJSON *tok = post_ok(port, "/tokenize", "{\"prompt\":\"Once upon a time\"}");
    const cJSON *pids = at(plain, "cake.generated_ids"), *prompt = at(tok, "tokens");
    assert_same_ids(at(one, "cake.generated_ids"), pids);
    assert_same_ids(at(none, "cake.generated_ids"), pids);
    const cJSON *a = at(all, "cake.generated_ids"), *l = at(last, "cake.generated_ids");
    const int np = cJSON_GetArraySize(prompt);
    int returns = 0;
    for (int i = 0; i < n; i++) {
        const int ai = cJSON_GetArrayItem(a, i)->valueint, li = cJSON_GetArrayItem(l, i)->valueint;
        assert_false(has_id(prompt, 0, np, ai) || has_id(a, 0, i, ai));
        assert_int_not_equal(li, i ? cJSON_GetArrayItem(l, i - 1)->valueint
                                   : cJSON_GetArrayItem(prompt, np - 1)->valueint);
        returns += has_id(prompt, 0, np, li) || has_id(l, 0, i, li);
    }
    print_message("repetition penalty: %d of %d tokens seen before with a window of 1, 0 "
                  "without\n",
                  returns, n);
    assert_true(returns > 0);
    cJSON_Delete(one);
    cJSON_Delete(none);
    cJSON_Delete(all);
    cJSON_Delete(last);
    cJSON_Delete(tok);
}

/* Appends ids[from..to) (a JSON array of token ids) to the comma-separated
 * list in buf. */
static void add_ids(char *buf, size_t cap, const cJSON *ids, int from, int to) {
    for (int i = from; i < to; i++) {
        const size_t len = strlen(buf);
        snprintf(buf + len, cap - len, "%s%d", len ? "," : "",
                 cJSON_GetArrayItem(ids, i)->valueint);
    }
}

/* A completion's echo: the prompt's text before the answer's; with
 * logprobs (as lm-eval's loglikelihood asks: the prompt as token ids,
 * max_tokens 1, logprobs 1) every prompt token's log-probability after the
 * tokens before it, the first null: each the bits a request for that token
 * alone after its prefix gives (forced by a logit bias, which log-
 * probabilities do not see); text offsets into the echoed text; with
 * max_tokens 0 the prompt alone. vLLM's prompt_logprobs: the same values
 * by token id, with ranks; a chat's, of its whole prompt. */
static void test_echo(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    const char *text = "Once upon a time there was a";
    cJSON *plain = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"%s\",\"max_tokens\":5,\"temperature\":0}", text);
    cJSON *echo =
        post_ok(s.port, "/v1/completions",
                "{\"prompt\":\"%s\",\"max_tokens\":5,\"temperature\":0,\"echo\":true}", text);
    char want[256];
    snprintf(want, sizeof(want), "%s%s", text, str_at(plain, "choices.0.text"));
    assert_string_equal(str_at(echo, "choices.0.text"), want);
    assert_true(cJSON_IsNull(at(echo, "choices.0.logprobs")));

    cJSON *tok = post_ok(s.port, "/tokenize", "{\"prompt\":\"%s\"}", text);
    const cJSON *ids = at(tok, "tokens");
    const int n = cJSON_GetArraySize(ids);
    char list[512] = "";
    add_ids(list, sizeof(list), ids, 0, n);
    cJSON *scored = post_ok(s.port, "/v1/completions",
                            "{\"prompt\":[[%s]],\"max_tokens\":1,\"temperature\":0,"
                            "\"logprobs\":1,\"echo\":true}",
                            list);
    const cJSON *lps = at(scored, "choices.0.logprobs.token_logprobs"),
                *tops = at(scored, "choices.0.logprobs.top_logprobs"),
                *offsets = at(scored, "choices.0.logprobs.text_offset"),
                *tokens = at(scored, "choices.0.logprobs.tokens");
    assert_int_equal(cJSON_GetArraySize(lps), n + 1);
    assert_true(cJSON_IsNull(cJSON_GetArrayItem(lps, 0)) &&
                cJSON_IsNull(cJSON_GetArrayItem(tops, 0)));
    size_t offset = 0;
    for (int k = 0; k <= n; k++) {
        assert_int_equal(cJSON_GetArrayItem(offsets, k)->valueint, (int)offset);
        offset += strlen(cJSON_GetArrayItem(tokens, k)->valuestring);
        if (!k) continue;
        const double lp = cJSON_GetArrayItem(lps, k)->valuedouble;
        const cJSON *top = cJSON_GetArrayItem(tops, k);
        assert_int_equal(cJSON_GetArraySize(top), 1); /* and the token's own at most that */
        assert_true(lp <= top->child->valuedouble);
        if (k == n) break; /* (the answer's token) */
        /* the same token forced after its prefix */
        char prefix[512] = "";
        add_ids(prefix, sizeof(prefix), ids, 0, k);
        const int id = cJSON_GetArrayItem(ids, k)->valueint;
        cJSON *one = post_ok(s.port, "/v1/completions",
                             "{\"prompt\":[%s],\"max_tokens\":1,\"temperature\":0,"
                             "\"logprobs\":0,\"logit_bias\":{\"%d\":100}}",
                             prefix, id);
        assert_int_equal(num_at(one, "cake.generated_ids.0"), id);
        if (num_at(one, "choices.0.logprobs.token_logprobs.0") != lp)
            fail_msg("prompt token %d: %.9g scored, %.9g forced", k, lp,
                     num_at(one, "choices.0.logprobs.token_logprobs.0"));
        cJSON_Delete(one);
    }
    /* the echoed text is the prompt's (the BOS prints nothing), then the answer's */
    assert_int_equal(strncmp(str_at(scored, "choices.0.text"), text, strlen(text)), 0);
    /* max_tokens 0: the prompt alone, scored */
    cJSON *only =
        post_ok(s.port, "/v1/completions",
                "{\"prompt\":\"%s\",\"max_tokens\":0,\"logprobs\":2,\"echo\":true}", text);
    assert_string_equal(str_at(only, "choices.0.text"), text);
    assert_int_equal(cJSON_GetArraySize(at(only, "choices.0.logprobs.token_logprobs")), n);
    assert_int_equal(cJSON_GetArraySize(at(only, "choices.0.logprobs.top_logprobs.1")), 2);
    assert_string_equal(str_at(only, "choices.0.finish_reason"), "length");
    /* vLLM's prompt_logprobs: each prompt token's entry by id, the same
     * log-probability, its rank, and the alternatives asked */
    cJSON *vllm = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":[%s],\"max_tokens\":1,\"temperature\":0,"
                          "\"prompt_logprobs\":2}",
                          list);
    const cJSON *pl = at(vllm, "choices.0.prompt_logprobs");
    assert_int_equal(cJSON_GetArraySize(pl), n);
    assert_true(cJSON_IsNull(cJSON_GetArrayItem(pl, 0)));
    for (int k = 1; k < n; k++) {
        char key[16];
        snprintf(key, sizeof(key), "%d", cJSON_GetArrayItem(ids, k)->valueint);
        const cJSON *d = cJSON_GetArrayItem(pl, k), *e = cJSON_GetObjectItemCaseSensitive(d, key);
        assert_non_null(e);
        assert_true(num_at(e, "logprob") == cJSON_GetArrayItem(lps, k)->valuedouble);
        const int rank = (int)num_at(e, "rank");
        const int size = cJSON_GetArraySize(d);
        assert_true(rank >= 1 && (size == 2 || size == 3) && (rank <= 2) == (size == 2));
    }
    cJSON_Delete(vllm);
    print_message("echo: %d prompt tokens scored, each as its forced request gives it\n", n - 1);
    cJSON_Delete(only);
    cJSON_Delete(scored);
    cJSON_Delete(tok);
    cJSON_Delete(echo);
    cJSON_Delete(plain);
    assert_int_equal(serve_stop(&s), 0);
    /* a chat's (its prompt, template and all), on the tiny model made ChatML */
    static const char *const specials[] = {"<|im_start|>", "<|im_end|>", NULL};
    char path[64];
    tiny_variant(&(test_model_variant){.chat_template = "{{ '<|im_start|>' + role }}",
                                       .special_tokens = specials},
                 path);
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    cJSON *chat = post_ok(s.port, "/v1/chat/completions",
                          "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                          "\"max_tokens\":1,\"prompt_logprobs\":0}");
    assert_int_equal(cJSON_GetArraySize(at(chat, "prompt_logprobs")),
                     num_at(chat, "usage.prompt_tokens"));
    cJSON_Delete(chat);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
}

/* A greedy answer with a presence penalty repeats no token (the tiny
 * model's logits lie within a few tenths of each other); the penalties
 * change nothing at 0; a logit bias of -100 bans a token, 100 forces one. */
static void test_penalties(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    enum { N = 40 };
    cJSON *plain = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":0,"
                           "\"ignore_eos\":true}",
                           N);
    cJSON *zero = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":0,"
                          "\"ignore_eos\":true,\"frequency_penalty\":0,\"presence_penalty\":0}",
                          N);
    cJSON *pen = post_ok(s.port, "/v1/completions",
                         "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":0,"
                         "\"ignore_eos\":true,\"presence_penalty\":2}",
                         N);
    assert_same_ids(at(plain, "cake.generated_ids"), at(zero, "cake.generated_ids"));
    const cJSON *ids = at(pen, "cake.generated_ids"), *pids = at(plain, "cake.generated_ids");
    int repeats = 0;
    for (int i = 0; i < N; i++)
        for (int k = 0; k < i; k++) {
            assert_int_not_equal(cJSON_GetArrayItem(ids, i)->valueint,
                                 cJSON_GetArrayItem(ids, k)->valueint);
            repeats +=
                cJSON_GetArrayItem(pids, i)->valueint == cJSON_GetArrayItem(pids, k)->valueint;
        }
    print_message("penalties: %d repeated tokens without, 0 with\n", repeats);
    /* logit_bias: -100 bans the greedy first token, 100 forces another */
    const int first = cJSON_GetArrayItem(pids, 0)->valueint, other = first == 7 ? 8 : 7;
    cJSON *ban = post_ok(s.port, "/v1/completions",
                         "{\"prompt\":\"Once upon a time\",\"max_tokens\":4,\"temperature\":0,"
                         "\"logit_bias\":{\"%d\":-100}}",
                         first);
    assert_int_not_equal(num_at(ban, "cake.generated_ids.0"), first);
    cJSON *force = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"Once upon a time\",\"max_tokens\":4,\"temperature\":0,"
                           "\"ignore_eos\":true,\"logit_bias\":{\"%d\":100}}",
                           other);
    for (int i = 0; i < 4; i++)
        assert_int_equal(cJSON_GetArrayItem(at(force, "cake.generated_ids"), i)->valueint, other);
    cJSON_Delete(ban);
    cJSON_Delete(force);
    /* top_k 1 is greedy at any temperature; min_p 1 too */
    cJSON *k1 = post_ok(s.port, "/v1/completions",
                        "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":1.5,"
                        "\"ignore_eos\":true,\"top_k\":1,\"seed\":5}",
                        N);
    cJSON *m1 = post_ok(s.port, "/v1/completions",
                        "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":1.5,"
                        "\"ignore_eos\":true,\"min_p\":1,\"seed\":5,"
                        "\"response_format\":{\"type\":\"text\"}}",
                        N);
    assert_same_ids(at(k1, "cake.generated_ids"), pids);
    assert_same_ids(at(m1, "cake.generated_ids"), pids);
    cJSON_Delete(k1);
    cJSON_Delete(m1);
    check_repetition(s.port, plain, N);
    cJSON_Delete(plain);
    cJSON_Delete(zero);
    cJSON_Delete(pen);
    assert_int_equal(serve_stop(&s), 0);
}

/* n choices: each is the answer of the request alone with its seed moved by
 * its index; a stream carries them all, told apart by index, each with its
 * last chunk, then the usage of all. */
static void test_choices(void **state) {
    (void)state;
    enum { N = 3, MAX = 6 };
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--slots", "2", NULL), 0);
#define CHOICES_REQUEST                                                                            \
    "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"temperature\":1,\"seed\":%d,"            \
    "\"ignore_eos\":true,\"n\":%d%s}"
    cJSON *all = post_ok(s.port, "/v1/completions", CHOICES_REQUEST, MAX, 5, N, "");
    assert_int_equal(cJSON_GetArraySize(at(all, "choices")), N);
    assert_int_equal(num_at(all, "usage.completion_tokens"), N * MAX);
    int differ = 0;
    for (int i = 0; i < N; i++) {
        char path[64];
        snprintf(path, sizeof(path), "choices.%d.index", i);
        assert_int_equal(num_at(all, path), i);
        cJSON *one = post_ok(s.port, "/v1/completions", CHOICES_REQUEST, MAX, 5 + i, 1, "");
        snprintf(path, sizeof(path), "choices.%d.text", i);
        assert_string_equal(str_at(all, path), str_at(one, "choices.0.text"));
        /* (the prompt counted once) */
        assert_int_equal(num_at(all, "usage.prompt_tokens"), num_at(one, "usage.prompt_tokens"));
        differ += i && strcmp(str_at(all, path), str_at(all, "choices.0.text")) != 0;
        cJSON_Delete(one);
    }
    assert_true(differ > 0);

    char body[512];
    snprintf(body, sizeof(body), CHOICES_REQUEST, MAX, 5, N,
             ",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    t_resp r = http(s.port, "POST", "/v1/completions", body);
    assert_int_equal(r.status, 200);
    cJSON *ev[200];
    int done, n_ev = parse_events(r.body, ev, 200, &done);
    assert_true(done);
    char text[N][256] = {{0}};
    int finished[N] = {0};
    for (int e = 0; e < n_ev - 1; e++) {
        const int i = (int)num_at(ev[e], "choices.0.index");
        assert_true(i >= 0 && i < N && !finished[i]);
        strcat(text[i], str_at(ev[e], "choices.0.text"));
        finished[i] = cJSON_IsString(at(ev[e], "choices.0.finish_reason"));
    }
    for (int i = 0; i < N; i++) {
        char path[64];
        snprintf(path, sizeof(path), "choices.%d.text", i);
        assert_true(finished[i]);
        assert_string_equal(text[i], str_at(all, path));
    }
    assert_int_equal(cJSON_GetArraySize(at(ev[n_ev - 1], "choices")), 0);
    assert_int_equal(num_at(ev[n_ev - 1], "usage.completion_tokens"), N * MAX);
    for (int e = 0; e < n_ev; e++) cJSON_Delete(ev[e]);
    resp_free(&r);
    cJSON_Delete(all);
    assert_int_equal(serve_stop(&s), 0);
#undef CHOICES_REQUEST
}

/* A completion's list of prompts (strings, or lists of token ids): choice
 * k of prompt p at index p n + k, each the answer of that prompt alone (its
 * seed moved by k); the usage counts each prompt once; a stream carries
 * them all, then the usage. */
static void test_prompt_list(void **state) {
    (void)state;
    enum { N = 2, MAX = 5 };
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--slots", "2", NULL), 0);
    const char *prompts[] = {"\"Once upon a time\"", "[1,300,301,302,303]", "\"The cat sat\""};
#define LIST_REQUEST                                                                               \
    "{\"prompt\":%s,\"max_tokens\":%d,\"temperature\":1,\"seed\":7,\"ignore_eos\":true,"           \
    "\"n\":%d%s}"
    cJSON *all = post_ok(s.port, "/v1/completions", LIST_REQUEST,
                         "[\"Once upon a time\",[1,300,301,302,303],\"The cat sat\"]", MAX, N, "");
    assert_int_equal(cJSON_GetArraySize(at(all, "choices")), 3 * N);
    int prompt_tokens = 0;
    for (int p = 0; p < 3; p++) {
        cJSON *one = post_ok(s.port, "/v1/completions", LIST_REQUEST, prompts[p], MAX, N, "");
        prompt_tokens += (int)num_at(one, "usage.prompt_tokens");
        for (int k = 0; k < N; k++) {
            char path[64], alone[64];
            snprintf(path, sizeof(path), "choices.%d.index", p * N + k);
            assert_int_equal(num_at(all, path), p * N + k);
            snprintf(path, sizeof(path), "choices.%d.text", p * N + k);
            snprintf(alone, sizeof(alone), "choices.%d.text", k);
            assert_string_equal(str_at(all, path), str_at(one, alone));
        }
        cJSON_Delete(one);
    }
    assert_int_equal(num_at(all, "usage.prompt_tokens"), prompt_tokens);
    assert_int_equal(num_at(all, "usage.completion_tokens"), 3 * N * MAX);

    char body[512];
    snprintf(body, sizeof(body), LIST_REQUEST, "[\"Once upon a time\",\"The cat sat\"]", MAX, 1,
             ",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    t_resp r = http(s.port, "POST", "/v1/completions", body);
    assert_int_equal(r.status, 200);
    cJSON *ev[200];
    int done, n_ev = parse_events(r.body, ev, 200, &done);
    assert_true(done);
    char text[2][256] = {{0}};
    for (int e = 0; e < n_ev - 1; e++) {
        const int i = (int)num_at(ev[e], "choices.0.index");
        assert_true(i == 0 || i == 1);
        strcat(text[i], str_at(ev[e], "choices.0.text"));
    }
    assert_string_equal(text[0], str_at(all, "choices.0.text"));
    assert_string_equal(text[1], str_at(all, "choices.4.text"));
    assert_int_equal(num_at(ev[n_ev - 1], "usage.completion_tokens"), 2 * MAX);
    for (int e = 0; e < n_ev; e++) cJSON_Delete(ev[e]);
    resp_free(&r);
    cJSON_Delete(all);
    assert_int_equal(serve_stop(&s), 0);
#undef LIST_REQUEST
}

/* stop_token_ids end the answer where the first of them is chosen, as EOS
 * does: the greedy answer up to there, "stop". */
static void test_stop_ids(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    cJSON *plain = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"Once upon a time\",\"max_tokens\":20,\"temperature\":0,"
                           "\"ignore_eos\":true}");
    const cJSON *g = at(plain, "cake.generated_ids");
    const int stop = cJSON_GetArrayItem(g, 5)->valueint;
    int first = 0;
    while (cJSON_GetArrayItem(g, first)->valueint != stop) first++;
    cJSON *cut = post_ok(s.port, "/v1/completions",
                         "{\"prompt\":\"Once upon a time\",\"max_tokens\":20,\"temperature\":0,"
                         "\"stop_token_ids\":[%d]}",
                         stop);
    assert_string_equal(str_at(cut, "choices.0.finish_reason"), "stop");
    const cJSON *c = at(cut, "cake.generated_ids");
    assert_int_equal(cJSON_GetArraySize(c), first + 1);
    for (int i = 0; i <= first; i++)
        assert_int_equal(cJSON_GetArrayItem(c, i)->valueint, cJSON_GetArrayItem(g, i)->valueint);
    /* min_tokens: the stop id may not come among the first first + 3
     * tokens, and stop strings do not cut them */
    cJSON *held = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":\"Once upon a time\",\"max_tokens\":20,\"temperature\":0,"
                          "\"stop_token_ids\":[%d],\"min_tokens\":%d}",
                          stop, first + 3);
    const cJSON *h = at(held, "cake.generated_ids");
    assert_true(cJSON_GetArraySize(h) >= first + 3);
    for (int i = 0; i < first + 3; i++)
        assert_int_not_equal(cJSON_GetArrayItem(h, i)->valueint, stop);
    const char *text = str_at(plain, "choices.0.text");
    char stop_text[8] = "";
    memcpy(stop_text, text + 1, 2); /* (two bytes of the answer's start) */
    cJSON *strings = post_ok(s.port, "/v1/completions",
                             "{\"prompt\":\"Once upon a time\",\"max_tokens\":8,\"temperature\":0,"
                             "\"ignore_eos\":true,\"stop\":\"%s\",\"min_tokens\":8}",
                             stop_text);
    assert_int_equal(cJSON_GetArraySize(at(strings, "cake.generated_ids")), 8);
    cJSON *cut_early = post_ok(s.port, "/v1/completions",
                               "{\"prompt\":\"Once upon a time\",\"max_tokens\":8,"
                               "\"temperature\":0,\"ignore_eos\":true,\"stop\":\"%s\"}",
                               stop_text);
    assert_true(cJSON_GetArraySize(at(cut_early, "cake.generated_ids")) < 8);
    cJSON_Delete(cut_early);
    cJSON_Delete(strings);
    cJSON_Delete(held);
    cJSON_Delete(cut);
    cJSON_Delete(plain);
    assert_int_equal(serve_stop(&s), 0);
}

/* JSON mode: the answer is one JSON object. Biases that make a greedy
 * answer all quotes give {"":""} under it; sampled answers that end are
 * objects cJSON reads, those that do not ran out of tokens; a chat's too.
 * Schemas and other formats are refused. */
static void test_json_mode(void **state) {
    (void)state;
    /* byte tokens (id 3 + byte): '"' 100, '}' 50, ':' 30 */
#define JSON_BIASES "\"logit_bias\":{\"37\":100,\"128\":50,\"61\":30}"
#define JSON_OBJECT "\"response_format\":{\"type\":\"json_object\"}"
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    cJSON *plain = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"Answer in JSON\",\"max_tokens\":8,\"temperature\":0,"
                           "\"ignore_eos\":true," JSON_BIASES "}");
    assert_string_equal(str_at(plain, "choices.0.text"), "\"\"\"\"\"\"\"\"");
    cJSON *json = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":\"Answer in JSON\",\"max_tokens\":32,\"temperature\":0,"
                          "\"ignore_eos\":false," JSON_BIASES "," JSON_OBJECT "}");
    assert_string_equal(str_at(json, "choices.0.finish_reason"), "stop");
    cJSON *o = cJSON_Parse(str_at(json, "choices.0.text"));
    assert_true(cJSON_IsObject(o));
    const cJSON *empty = cJSON_GetObjectItemCaseSensitive(o, "");
    assert_true(cJSON_IsString(empty) && !strcmp(empty->valuestring, ""));
    cJSON_Delete(o);
    cJSON_Delete(json);
    cJSON_Delete(plain);
    int ended = 0;
    for (int seed = 0; seed < 8; seed++) {
        cJSON *a = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"Answer in JSON\",\"max_tokens\":60,\"temperature\":1,"
                           "\"seed\":%d," JSON_OBJECT "}",
                           seed);
        const char *text = str_at(a, "choices.0.text");
        if (!strcmp(str_at(a, "choices.0.finish_reason"), "stop")) {
            o = cJSON_Parse(text);
            if (!cJSON_IsObject(o)) fail_msg("seed %d: not a JSON object: %s", seed, text);
            cJSON_Delete(o);
            ended++;
        } else {
            assert_int_equal(num_at(a, "usage.completion_tokens"), 60);
        }
        cJSON_Delete(a);
    }
    printf("json mode: %d of 8 sampled answers ended\n", ended);
    static const char *bad[] = {"\"response_format\":{\"type\":\"json_schema\",\"schema\":{}}",
                                "\"response_format\":{\"type\":\"xml\"}",
                                "\"response_format\":\"json_object\""};
    for (int i = 0; i < 3; i++) {
        char body[256];
        snprintf(body, sizeof(body), "{\"prompt\":\"hi\",%s}", bad[i]);
        t_resp r = http(s.port, "POST", "/v1/completions", body);
        assert_int_equal(r.status, 400);
        assert_non_null(strstr(r.body, "response_format"));
        resp_free(&r);
    }
    assert_int_equal(serve_stop(&s), 0);

    /* a chat ends its object with the format's end (Llama 2's: EOS) */
    char path[64];
    tiny_variant(&(test_model_variant){.chat_template = LLAMA2_TEMPLATE}, path);
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    cJSON *c = post_ok(s.port, "/v1/chat/completions",
                       "{\"messages\":[{\"role\":\"user\",\"content\":\"JSON please\"}],"
                       "\"max_tokens\":32,\"temperature\":0," JSON_BIASES "," JSON_OBJECT "}");
    assert_string_equal(str_at(c, "choices.0.finish_reason"), "stop");
    o = cJSON_Parse(str_at(c, "choices.0.message.content"));
    assert_true(cJSON_IsObject(o));
    cJSON_Delete(o);
    cJSON_Delete(c);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
#undef JSON_BIASES
#undef JSON_OBJECT
}

/* A JSON schema (OpenAI's response_format json_schema, vLLM's guided_json,
 * llama.cpp's json_schema): every sampled answer, whole or streamed, of
 * each of n choices, that ends holds it; schemas cake cannot enforce are
 * refused with the keyword named. */
static void test_json_schema(void **state) {
    (void)state;
#define SCHEMA                                                                                     \
    "{\"type\":\"object\",\"properties\":{\"answer\":{\"enum\":[\"yes\",\"no\"]},\"n\":{\"type\":" \
    "\"integer\"}},\"required\":[\"answer\",\"n\"]}"
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    static const char *forms[] = {
        "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"r\",\"strict\":"
        "true,\"schema\":" SCHEMA "}}",
        "\"guided_json\":" SCHEMA,
        "\"json_schema\":" SCHEMA,
    };
    int ended = 0;
    for (int f = 0; f < 3; f++) {
        for (int stream = 0; stream < 2; stream++) {
            char body[1024];
            snprintf(body, sizeof(body),
                     "{\"prompt\":\"Yes or no, in JSON\",\"max_tokens\":80,\"temperature\":1,"
                     "\"seed\":%d,\"n\":3,\"stream\":%s,%s}",
                     f, stream ? "true" : "false", forms[f]);
            t_resp r = http(s.port, "POST", "/v1/completions", body);
            assert_int_equal(r.status, 200);
            char text[3][1024] = {"", "", ""};
            char finish[3][16] = {"", "", ""};
            cJSON *ev[256];
            const int n_ev = answer_objects(&r, stream, ev, 256);
            for (int e = 0; e < n_ev; e++) {
                const cJSON *ch = cJSON_GetObjectItemCaseSensitive(ev[e], "choices");
                for (const cJSON *c = ch ? ch->child : NULL; c; c = c->next) {
                    const int i = (int)cJSON_GetObjectItemCaseSensitive(c, "index")->valuedouble;
                    const cJSON *t = cJSON_GetObjectItemCaseSensitive(c, "text");
                    const cJSON *fr = cJSON_GetObjectItemCaseSensitive(c, "finish_reason");
                    assert_true(i >= 0 && i < 3);
                    if (cJSON_IsString(t))
                        strncat(text[i], t->valuestring, sizeof(text[i]) - strlen(text[i]) - 1);
                    if (cJSON_IsString(fr))
                        snprintf(finish[i], sizeof(finish[i]), "%s", fr->valuestring);
                }
                cJSON_Delete(ev[e]);
            }
            for (int i = 0; i < 3; i++) {
                if (strcmp(finish[i], "stop")) continue; /* (ran out of tokens) */
                cJSON *o = cJSON_Parse(text[i]);
                const cJSON *answer = cJSON_GetObjectItemCaseSensitive(o, "answer");
                const cJSON *num = cJSON_GetObjectItemCaseSensitive(o, "n");
                if (!cJSON_IsString(answer) || !cJSON_IsNumber(num) ||
                    (strcmp(answer->valuestring, "yes") && strcmp(answer->valuestring, "no")) ||
                    cJSON_GetArraySize(o) != 2)
                    fail_msg("not of the schema: %s", text[i]);
                cJSON_Delete(o);
                ended++;
            }
            resp_free(&r);
        }
    }
    printf("json schema: %d of 18 sampled answers ended, all of the schema\n", ended);
    assert_true(ended > 0);

    static const struct {
        const char *field, *says;
    } bad[] = {
        {"\"json_schema\":{\"type\":\"string\",\"pattern\":\"a+\"}", "'pattern'"},
        {"\"guided_json\":\"{not json\"", "guided_json"},
        {"\"guided_json\":{},\"json_schema\":{}", "give one of"},
        {"\"response_format\":{\"type\":\"json_object\"},\"json_schema\":{}", "give one of"},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{\"$ref\":"
         "\"#/x\"}}}",
         "points to nothing"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char body[512];
        snprintf(body, sizeof(body), "{\"prompt\":\"hi\",%s}", bad[i].field);
        t_resp r = http(s.port, "POST", "/v1/completions", body);
        assert_int_equal(r.status, 400);
        if (!strstr(r.body, bad[i].says)) fail_msg("%s: %s", bad[i].field, r.body);
        resp_free(&r);
    }
    assert_int_equal(serve_stop(&s), 0);
#undef SCHEMA
}

/* /tokenize gives the ids a completion of the text computes (the same
 * answer from them), /detokenize the text back; bad bodies answer 400. */
static void test_tokenize(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--ctx", "512", NULL), 0);
    cJSON *t = post_ok(s.port, "/tokenize", "{\"prompt\":\"Once upon a time\"}");
    const cJSON *ids = at(t, "tokens");
    assert_int_equal(num_at(t, "count"), cJSON_GetArraySize(ids));
    assert_int_equal(num_at(t, "max_model_len"), 512);
    char *list = cJSON_PrintUnformatted(ids);
    cJSON *a = post_ok(s.port, "/v1/completions",
                       "{\"prompt\":\"Once upon a time\",\"max_tokens\":6,\"temperature\":0}");
    cJSON *b = post_ok(s.port, "/v1/completions",
                       "{\"prompt\":%s,\"max_tokens\":6,\"temperature\":0}", list);
    assert_int_equal(num_at(a, "usage.prompt_tokens"), cJSON_GetArraySize(ids));
    assert_same_ids(at(a, "cake.generated_ids"), at(b, "cake.generated_ids"));
    cJSON *d = post_ok(s.port, "/detokenize", "{\"tokens\":%s}", list);
    assert_string_equal(str_at(d, "prompt"), "Once upon a time");
    free(list);
    cJSON_Delete(t);
    cJSON_Delete(a);
    cJSON_Delete(b);
    cJSON_Delete(d);
    static const struct {
        const char *path, *body, *says;
    } bad[] = {{"/tokenize", "{}", "'prompt'"},
               {"/tokenize", "{\"prompt\":[1,2]}", "'prompt'"},
               {"/tokenize", "[]", "JSON object"},
               {"/tokenize", "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
                "no chat template"},
               {"/detokenize", "{\"tokens\":[1,-1]}", "not a token id"},
               {"/detokenize", "{\"tokens\":\"1\"}", "'tokens'"}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        t_resp r = http(s.port, "POST", bad[i].path, bad[i].body);
        if (r.status != 400 || !strstr(r.body, bad[i].says))
            fail_msg("%s %s: %d %s", bad[i].path, bad[i].body, r.status, r.body);
        resp_free(&r);
    }
    t_resp r = http(s.port, "GET", "/tokenize", NULL);
    assert_int_equal(r.status, 405);
    resp_free(&r);
    assert_int_equal(serve_stop(&s), 0);

    /* A ChatML template's own system message, read from the GGUF by cake
     * serve, opens a chat without one (test_chat_default_system) */
    static const char *const specials[] = {"<|im_start|>", "<|im_end|>", NULL};
    char path[64];
    tiny_variant(&(test_model_variant){.chat_template = "{{ '<|im_start|>system\\nBe kind."
                                                        "<|im_end|>\\n' }}{{ '<|im_start|>' "
                                                        "+ role }}",
                                       .special_tokens = specials},
                 path);
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    t = post_ok(s.port, "/tokenize", "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}");
    list = cJSON_PrintUnformatted(at(t, "tokens"));
    d = post_ok(s.port, "/detokenize", "{\"tokens\":%s}", list);
    const char *text = str_at(d, "prompt"), *kind = strstr(text, "Be kind.");
    assert_true(kind && strstr(text, "system") < kind && kind < strstr(text, "user"));
    free(list);
    cJSON_Delete(t);
    cJSON_Delete(d);
    assert_int_equal(serve_stop(&s), 0);
}

/* A stop string ends the answer before it, whole or streamed, even when it
 * spans tokens. */
static void test_stop_strings(void **state) {
    (void)state;
    const char *model = test_model_path("stories260K.gguf");
    if (!model) model = g_tiny;
    t_server s;
    assert_int_equal(serve_start(&s, model, "--store", "none", NULL), 0);
    cJSON *full = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":\"Once upon a time\",\"max_tokens\":48,\"temperature\":0}");
    const char *text = str_at(full, "choices.0.text");
    const size_t len = strlen(text);
    assert_true(len > 20);
    /* stops that start at 10 bytes in, 3 and 7 bytes long (both may span pieces) */
    for (int sl = 3; sl <= 7; sl += 4) {
        char stop[8];
        snprintf(stop, sizeof(stop), "%.*s", sl, text + 10);
        const size_t want = (size_t)(strstr(text, stop) - text);
        cJSON *j = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":\"Once upon a time\",\"max_tokens\":48,\"temperature\":0,"
                           "\"stop\":[\"\\u00e9\\u00e9nope\",\"q1\",\"q2\",\"q3\",\"q4\",\"%s\"]}",
                           stop); /* (more than OpenAI's 4, as vLLM takes them) */
        assert_int_equal(strlen(str_at(j, "choices.0.text")), want);
        assert_memory_equal(str_at(j, "choices.0.text"), text, want);
        assert_string_equal(str_at(j, "choices.0.finish_reason"), "stop");
        cJSON_Delete(j);

        char body[512];
        snprintf(body, sizeof(body),
                 "{\"prompt\":\"Once upon a time\",\"max_tokens\":48,\"temperature\":0,"
                 "\"stream\":true,\"stop\":\"%s\"}",
                 stop);
        t_resp r = http(s.port, "POST", "/v1/completions", body);
        cJSON *ev[100];
        int done, n_ev = parse_events(r.body, ev, 100, &done);
        char streamed[4096] = "";
        for (int i = 0; i < n_ev; i++) {
            strcat(streamed, str_at(ev[i], "choices.0.text"));
            cJSON_Delete(ev[i]);
        }
        assert_true(done);
        assert_int_equal(strlen(streamed), want);
        assert_memory_equal(streamed, text, want);
        resp_free(&r);
    }
    cJSON_Delete(full);
    assert_int_equal(serve_stop(&s), 0);
}

/* Sampling with a seed repeats; different seeds differ somewhere. */
static void test_seeded_sampling(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
#define SEEDED "{\"prompt\":\"Hello\",\"max_tokens\":24,\"temperature\":1.5,\"seed\":%d}"
    cJSON *a = post_ok(s.port, "/v1/completions", SEEDED, 7);
    cJSON *b = post_ok(s.port, "/v1/completions", SEEDED, 7);
    assert_same_ids(at(a, "cake.generated_ids"), at(b, "cake.generated_ids"));
    int differs = 0;
    for (int seed = 8; seed < 12 && !differs; seed++) {
        cJSON *c = post_ok(s.port, "/v1/completions", SEEDED, seed);
        differs = strcmp(str_at(a, "choices.0.text"), str_at(c, "choices.0.text")) != 0;
        cJSON_Delete(c);
    }
    assert_true(differs);
    cJSON_Delete(a);
    cJSON_Delete(b);
    assert_int_equal(serve_stop(&s), 0);
}

/* ---- the store ---- */

/* A prompt of 75 tokens: 4 full chunks of 16 and a tail. */
static const char *LONG_PROMPT =
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the "
    "door, and the children play in the garden under the tall green trees until the sun goes "
    "down behind the hills and the stars come out one by one over the quiet little town";

/* A prompt's chunks stored by one server are loaded by the next on the same
 * store, with the same answer; the same prompt again finds them in the
 * slot's KV cache; after Redis died the answer is computed, the same. In
 * load mode: in cake mode the tiny model computes faster than it loads. The
 * Redis wants a password (a wrong one is a warning at start). */
static void test_store_reuse(void **state) {
    (void)state;
    char dir[] = "/tmp/cake-test-serve-store-XXXXXX", uri[128];
    assert_non_null(mkdtemp(dir));
    snprintf(uri, sizeof(uri), "file:%s", dir);
    t_redis redis = {0};
    const char *const password[] = {"--requirepass", "s3cret pw", NULL};
    const int have_redis = t_redis_available() && t_redis_start_with(&redis, 0, password) == 0;
    if (!have_redis) print_message("skip: the Redis half (no redis-server)\n");
    char redis_uri[160];
    snprintf(redis_uri, sizeof(redis_uri), "redis://:s3cret%%20pw@127.0.0.1:%d?timeout=300",
             redis.port);

    for (int which = 0; which < 1 + have_redis; which++) {
        const char *store = which ? redis_uri : uri;
        t_server s;
        if (which) { /* a wrong password: the server says so at start (and not the password) */
            char wrong[160];
            snprintf(wrong, sizeof(wrong), "redis://:bad-pw@127.0.0.1:%d?timeout=300", redis.port);
            assert_int_equal(serve_start(&s, g_tiny, "--store", wrong, NULL), 0);
            char log[4096] = "";
            FILE *f = fopen(s.log, "r");
            assert_non_null(f);
            log[fread(log, 1, sizeof(log) - 1, f)] = '\0';
            fclose(f);
            if (!strstr(log, "warning: store redis://:***@127.0.0.1:") ||
                !strstr(log, "WRONGPASS") || strstr(log, "bad-pw"))
                fail_msg("the server's start-up log: %s", log);
            assert_int_equal(serve_stop(&s), 0);
        }
        assert_int_equal(
            serve_start(&s, g_tiny, "--store", store, "--chunk", "16", "--mode", "load", NULL), 0);
#define LONG_REQUEST "{\"prompt\":\"%s\",\"max_tokens\":12,\"temperature\":0}"
        cJSON *cold = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
        assert_int_equal(num_at(cold, "cake.chunks_loaded"), 0);
        const int total = (int)num_at(cold, "cake.chunks_total");
        assert_true(total >= 5);
        assert_int_equal(metric(s.port, "cake_store_up"), 1);
        /* (the lookup took some time; nothing was computed during it in
         * load mode) */
        assert_true(metric(s.port, "cake_store_lookup_seconds") > 0);
        assert_int_equal(metric(s.port, "cake_prefill_chunks_during_lookup_total"), 0);
        /* the slot drains its write-backs before it takes the next request */
        cJSON_Delete(post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":1}"));
        assert_true(metric(s.port, "cake_store_writeback_chunks_total{result=\"written\"}") >=
                    total - 1);
        assert_int_equal(serve_stop(&s), 0);

        /* A new server on the same store loads the chunks. */
        assert_int_equal(
            serve_start(&s, g_tiny, "--store", store, "--chunk", "16", "--mode", "load", NULL), 0);
        cJSON *warm = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
        assert_true(num_at(warm, "cake.chunks_loaded") >= total - 1);
        assert_true(num_at(warm, "cake.bytes_loaded") > 0);
        assert_same_ids(at(warm, "cake.generated_ids"), at(cold, "cake.generated_ids"));
        assert_true(metric(s.port, "cake_prefill_chunks_total{source=\"loaded\"}") >= total - 1);
        /* It computed only its tail, after the loads: a prefill pass like
         * any other, not the (lowest-priority) compute side of a cached
         * prompt, which load mode leaves idle. */
        assert_int_equal(metric(s.port, "cake_engine_tokens_total{kind=\"prefill\"}"),
                         num_at(warm, "usage.prompt_tokens") -
                             16 * num_at(warm, "cake.chunks_loaded"));
        assert_int_equal(metric(s.port, "cake_engine_tokens_total{kind=\"cake\"}"), 0);
        /* The same prompt again: the slot's KV cache holds it */
        cJSON *again = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
        assert_int_equal(num_at(again, "cake.chunks_loaded"), 0);
        assert_true(num_at(again, "cake.chunks_cached") >= total - 1);
        assert_same_ids(at(again, "cake.generated_ids"), at(cold, "cake.generated_ids"));
        assert_true(metric(s.port, "cake_prefill_chunks_total{source=\"cached\"}") >= total - 1);
        cJSON_Delete(again);
        if (which) {
            /* another prompt takes the slot's KV cache, then Redis dies */
            cJSON_Delete(
                post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":1}"));
            t_redis_stop(&redis);
            assert_int_equal(metric(s.port, "cake_store_up"), 0);
            cJSON *dead = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
            assert_int_equal(num_at(dead, "cake.chunks_loaded"), 0);
            assert_int_equal(num_at(dead, "cake.chunks_cached"), 0);
            assert_true(cJSON_IsString(at(dead, "cake.store_error")));
            assert_same_ids(at(dead, "cake.generated_ids"), at(cold, "cake.generated_ids"));
            assert_true(metric(s.port, "cake_store_request_errors_total") >= 1);
            cJSON_Delete(dead);
        }
        cJSON_Delete(cold);
        cJSON_Delete(warm);
        assert_int_equal(serve_stop(&s), 0);
    }
    char cmd[160];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* vLLM's cache_salt on one slot and the default RAM store: a prompt with
 * salt "a" computed; the same prompt with salt "b" computed again (neither
 * the store's chunks nor the slot's KV cache, which holds it, are another
 * salt's), then with "a" loaded from the store (the slot holds "b"'s), then
 * without a salt computed again; the same answer each time. (An empty or
 * non-string salt: test_bad_requests.) */
static void test_cache_salt(void **state) {
    (void)state;
    t_server s;
    /* (load mode: a salt's chunks are all loaded, whatever the machine's speed) */
    assert_int_equal(
        serve_start(&s, g_tiny, "--slots", "1", "--chunk", "16", "--mode", "load", NULL), 0);
#define SALTED "{\"prompt\":\"%s\",\"max_tokens\":6,\"temperature\":0%s}"
    cJSON *a = post_ok(s.port, "/v1/completions", SALTED, LONG_PROMPT, ",\"cache_salt\":\"a\"");
    const double total = num_at(a, "cake.chunks_total");
    assert_true(total >= 5);
    assert_int_equal(num_at(a, "cake.chunks_computed"), total);
    const char *salts[] = {",\"cache_salt\":\"b\"", ",\"cache_salt\":\"a\"", ""};
    for (int i = 0; i < 3; i++) {
        cJSON *r = post_ok(s.port, "/v1/completions", SALTED, LONG_PROMPT, salts[i]);
        print_message("salt [%s]: %.0f computed, %.0f loaded, %.0f cached\n", salts[i],
                      num_at(r, "cake.chunks_computed"), num_at(r, "cake.chunks_loaded"),
                      num_at(r, "cake.chunks_cached"));
        assert_int_equal(num_at(r, "cake.chunks_cached"), 0);
        if (i == 1) {
            assert_true(num_at(r, "cake.chunks_loaded") >= total - 1);
            assert_true(num_at(r, "usage.prompt_tokens_details.cached_tokens") >= 16 * (total - 1));
        } else {
            assert_int_equal(num_at(r, "cake.chunks_computed"), total);
            assert_int_equal(num_at(r, "usage.prompt_tokens_details.cached_tokens"), 0);
        }
        assert_same_ids(at(r, "cake.generated_ids"), at(a, "cake.generated_ids"));
        cJSON_Delete(r);
    }
    /* the same salt again: the slot's KV cache holds it */
    cJSON *again = post_ok(s.port, "/v1/completions", SALTED, LONG_PROMPT, "");
    assert_true(num_at(again, "cake.chunks_cached") >= total - 1);
    cJSON_Delete(again);
    cJSON_Delete(a);
#undef SALTED
    assert_int_equal(serve_stop(&s), 0);
}

/* `--kv-type q8_0` (tiny-256: head_dim 64) on one slot and the default RAM
 * store: a prompt computed, another taking the slot, then the first again
 * loads its chunks and answers as it did; each loaded chunk is at most 0.6
 * of what an f16 server's is (34/64 of the payload, plus the header). In
 * load mode: in cake mode the tiny model may compute every chunk before a
 * load lands (a CI run did). */
static void test_kv_q8_0_served(void **state) {
    (void)state;
    char model[64];
    assert_int_equal(test_make_model("tiny-256", "f16", model), 0);
    double per_chunk[2];
    for (int q8 = 0; q8 < 2; q8++) {
        t_server s;
        assert_int_equal(serve_start(&s, model, "--slots", "1", "--chunk", "16", "--kv-type",
                                     q8 ? "q8_0" : "f16", "--mode", "load", NULL),
                         0);
        cJSON *cold = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
        assert_int_equal(num_at(cold, "cake.chunks_loaded"), 0);
        const int total = (int)num_at(cold, "cake.chunks_total");
        assert_true(total >= 5);
        cJSON_Delete(post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":1}"));
        cJSON *warm = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
        const double loaded = num_at(warm, "cake.chunks_loaded");
        assert_true(loaded >= total - 1);
        assert_int_equal(num_at(warm, "cake.chunks_cached"), 0);
        assert_same_ids(at(warm, "cake.generated_ids"), at(cold, "cake.generated_ids"));
        per_chunk[q8] = num_at(warm, "cake.bytes_loaded") / loaded;
        cJSON_Delete(cold);
        cJSON_Delete(warm);
        assert_int_equal(serve_stop(&s), 0);
    }
    print_message("bytes per loaded chunk: f16 %.0f, q8_0 %.0f\n", per_chunk[0], per_chunk[1]);
    assert_true(per_chunk[1] > 0 && per_chunk[1] <= 0.6 * per_chunk[0]);
    unlink(model);
}

/* A prompt that extends the one before (a chat's next turn) starts where
 * the slot's KV cache stops sharing it, down to the token, and answers as
 * `cake run` does from scratch; one that differs after BOS reuses only BOS.
 * The usage says how many prompt tokens were not computed. */
static void test_slot_prefix(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--chunk", "16", NULL), 0);
    cJSON *first = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
    const int n_first = (int)num_at(first, "usage.prompt_tokens");
    assert_int_equal(num_at(first, "usage.prompt_tokens_details.cached_tokens"), 0);
    assert_int_equal(num_at(first, "cake.tokens_computed"), n_first);
    cJSON_Delete(first);
    char longer[1024];
    snprintf(longer, sizeof(longer), "%s and the moon rises over the sea", LONG_PROMPT);
    static const char *different = "A different start for a prompt of a few words";
    const char *prompts[] = {longer, different};
    for (int k = 0; k < 2; k++) {
        cJSON *j = post_ok(s.port, "/v1/completions", LONG_REQUEST, prompts[k]);
        cJSON *ref = cake_run(g_tiny, prompts[k], 12);
        assert_same_ids(at(j, "cake.generated_ids"), at(ref, "generated_ids"));
        const int n = (int)num_at(j, "usage.prompt_tokens");
        const int cached = (int)num_at(j, "usage.prompt_tokens_details.cached_tokens");
        assert_int_equal(cached, n - (int)num_at(j, "cake.tokens_computed"));
        if (k == 0) {
            assert_true(num_at(j, "cake.chunks_cached") >= 4);
            /* all the first prompt's tokens but perhaps its last (the
             * longer text may tokenize the join differently), not just
             * its whole chunks */
            assert_true(cached >= n_first - 1);
        } else {
            assert_int_equal(num_at(j, "cake.chunks_cached"), 0);
            assert_int_equal(cached, 1);
        }
        cJSON_Delete(ref);
        cJSON_Delete(j);
    }
    assert_int_equal(serve_stop(&s), 0);
}

/* A first token later than --timeout: a whole answer still comes, and a
 * stream stays open on keep-alive comments. A store with 0.6 s of latency
 * a request makes the wait (a lookup, then the loads: over 1 s). */
static void test_slow_first_token(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "mem:?lat=600", "--mode", "load", "--chunk",
                                 "16", "--timeout", "1", "--slots", "1", NULL),
                     0);
    const char *prompt = "The quick brown fox jumps over the lazy dog, and the cat sleeps on";
    cJSON *cold = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":\"%s\",\"max_tokens\":4,\"temperature\":0}", prompt);
    assert_true(num_at(cold, "cake.chunks_total") >= 2);
    /* (another prompt in between, each time: the slot's KV cache would
     * hold this one, and nothing would be loaded) */
#define OTHER_PROMPT "{\"prompt\":\"Hi\",\"max_tokens\":1}"
    cJSON_Delete(post_ok(s.port, "/v1/completions", OTHER_PROMPT));
    cJSON *warm = post_ok(s.port, "/v1/completions",
                          "{\"prompt\":\"%s\",\"max_tokens\":4,\"temperature\":0}", prompt);
    assert_true(num_at(warm, "cake.chunks_loaded") >= 1);
    assert_true(num_at(warm, "cake.ttft_ms") > 1000);
    assert_same_ids(at(warm, "cake.generated_ids"), at(cold, "cake.generated_ids"));

    cJSON_Delete(post_ok(s.port, "/v1/completions", OTHER_PROMPT));
    char body[512];
    snprintf(body, sizeof(body),
             "{\"prompt\":\"%s\",\"max_tokens\":4,\"temperature\":0,\"stream\":true}", prompt);
    t_resp r = http(s.port, "POST", "/v1/completions", body);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, ": keep-alive\n\n"));
    cJSON *ev[16];
    int done, n_ev = parse_events(r.body, ev, 16, &done);
    assert_true(done && n_ev >= 2);
    assert_true(num_at(ev[n_ev - 1], "cake.ttft_ms") > 1000);
    assert_same_ids(at(ev[n_ev - 1], "cake.generated_ids"), at(cold, "cake.generated_ids"));
    for (int i = 0; i < n_ev; i++) cJSON_Delete(ev[i]);
    resp_free(&r);
    cJSON_Delete(cold);
    cJSON_Delete(warm);
    assert_int_equal(serve_stop(&s), 0);
}

/* Connections that send half a request, or none, are closed after
 * --request-timeout (not the idle --timeout of 120 s), so that they cannot
 * hold every connection the server takes (--slots 1 --queue 0: 17) for two
 * minutes; a stream whose first token takes longer than that still gets
 * it (a lookup with 1.5 s of latency). */
static void test_request_timeout(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "mem:?lat=1500", "--mode", "load",
                                 "--chunk", "16", "--slots", "1", "--queue", "0",
                                 "--request-timeout", "1", NULL),
                     0);
    t_resp r = http(s.port, "POST", "/v1/completions",
                    "{\"prompt\":\"The quick brown fox jumps over the lazy dog, and the cat "
                    "sleeps on\",\"max_tokens\":1,\"stream\":true}");
    assert_int_equal(r.status, 200);
    cJSON *ev[8];
    int done, n_ev = parse_events(r.body, ev, 8, &done);
    assert_true(done && n_ev >= 1);
    assert_true(num_at(ev[n_ev - 1], "cake.ttft_ms") > 1500);
    for (int i = 0; i < n_ev; i++) cJSON_Delete(ev[i]);
    resp_free(&r);
    int idle[17];
    for (int i = 0; i < 17; i++) {
        idle[i] = connect_to(s.port);
        if (i % 2) send_all(idle[i], "GET /health HTTP/1.1\r\nHost: x\r\n", 32);
    }
    const uint64_t t0 = cake_now_ns();
    r = http(s.port, "GET", "/health", NULL);
    const double waited = (double)(cake_now_ns() - t0) / 1e9;
    printf("request timeout: /health answered %.1f s after 17 idle connections\n", waited);
    assert_int_equal(r.status, 200);
    assert_true(waited < 10);
    resp_free(&r);
    for (int i = 0; i < 17; i++) close(idle[i]);
    assert_int_equal(serve_stop(&s), 0);
}

/* ---- continuous batching ---- */

/* Sends a greedy completion of prompt (max_tokens, then `extra` JSON
 * members) without waiting for the answer; returns the socket. */
static int send_completion(int port, const char *prompt, int max_tokens, const char *extra) {
    char body[2400];
    snprintf(body, sizeof(body), "{\"prompt\":\"%s\",\"max_tokens\":%d,\"temperature\":0%s}",
             prompt, max_tokens, extra);
    const int fd = connect_to(port);
    send_request(fd, "POST", "/v1/completions", body);
    return fd;
}

/* The answer on fd: 200, its JSON. */
static cJSON *answer_json(int fd) {
    t_resp r = read_response(fd);
    assert_int_equal(r.status, 200);
    cJSON *j = cJSON_Parse(r.body);
    assert_non_null(j);
    resp_free(&r);
    return j;
}

/* Requests that arrive together are computed together, a step at a time,
 * and each answers exactly as `cake run` alone does. Five requests on four
 * slots (the fifth waits for one), steps of at most 12 tokens: the prompts'
 * 16-token chunks go in pieces, beside the other requests' decode tokens. */
static void test_batched_answers(void **state) {
    (void)state;
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--slots", "4", "--batch", "12",
                                 "--chunk", "16", NULL),
                     0);
    const char *prompts[] = {"Once upon a time", "The quick brown fox jumps over the lazy dog",
                             LONG_PROMPT, "A", "Hello there, how are you today?"};
    enum { N = sizeof(prompts) / sizeof(prompts[0]), MAX_TOKENS = 40 };
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = send_completion(s.port, prompts[i], MAX_TOKENS, ",\"ignore_eos\":true");
    int prompt_tokens = 0, cached_tokens = 0; /* computed, and not */
    for (int i = 0; i < N; i++) {
        cJSON *j = answer_json(fds[i]);
        cJSON *ref = cake_run(g_tiny, prompts[i], MAX_TOKENS);
        const int n = cJSON_GetArraySize(at(ref, "generated_ids"));
        /* (`cake run` stops at EOS; the server was told to go on) */
        assert_true(cJSON_GetArraySize(at(j, "cake.generated_ids")) >= n);
        for (int k = 0; k < n; k++)
            assert_int_equal(cJSON_GetArrayItem(at(j, "cake.generated_ids"), k)->valueint,
                             cJSON_GetArrayItem(at(ref, "generated_ids"), k)->valueint);
        assert_int_equal(num_at(j, "usage.completion_tokens"), MAX_TOKENS);
        /* (the fifth reuses what its slot's KV cache shares with it: BOS) */
        const int cached = (int)num_at(j, "usage.prompt_tokens_details.cached_tokens");
        prompt_tokens += (int)num_at(j, "usage.prompt_tokens") - cached;
        cached_tokens += cached;
        cJSON_Delete(ref);
        cJSON_Delete(j);
    }
    /* Every token went through the steps, by its class; steps were shared. */
    assert_int_equal(metric(s.port, "cake_engine_tokens_total{kind=\"prefill\"}"), prompt_tokens);
    assert_int_equal(metric(s.port, "cake_prompt_tokens_cached_total"), cached_tokens);
    assert_int_equal(metric(s.port, "cake_engine_tokens_total{kind=\"decode\"}"),
                     N * (MAX_TOKENS - 1));
    assert_int_equal(metric(s.port, "cake_engine_tokens_total{kind=\"cake\"}"), 0);
    assert_true(metric(s.port, "cake_engine_shared_steps_total") >= 1);
    assert_true(metric(s.port, "cake_engine_max_sequences") >= 2);
    assert_true(metric(s.port, "cake_engine_max_sequences") <= 4);
    /* the latency histograms: every request, every gap between two tokens */
    assert_int_equal(metric(s.port, "cake_request_queue_seconds_count"), N);
    assert_int_equal(metric(s.port, "cake_request_seconds_count"), N);
    assert_int_equal(metric(s.port, "cake_inter_token_seconds_count"), N * (MAX_TOKENS - 1));
    assert_int_equal(metric(s.port, "cake_inter_token_seconds_bucket{le=\"+Inf\"}"),
                     N * (MAX_TOKENS - 1));
    assert_true(metric(s.port, "cake_request_seconds_sum") >
                metric(s.port, "cake_time_to_first_token_seconds_sum") +
                    metric(s.port, "cake_request_queue_seconds_sum"));
    assert_int_equal(serve_stop(&s), 0);
}

/* Requests at once whose prompts share a prefix the store lacks: one
 * computes each chunk, the others wait for it and load it; the answers
 * are `cake run`'s. */
static void test_shared_prefix(void **state) {
    (void)state;
    t_server s;
    /* A store 20 ms away: the first request's write-backs take ~20 ms a
     * chunk, so the others, however late their lookup, find promises. */
    assert_int_equal(
        serve_start(&s, g_tiny, "--slots", "3", "--chunk", "16", "--store", "mem:?lat=20", NULL),
        0);
    const char *endings[] = {"First.", "The second one is here.", "And a third, at last."};
    enum { N = 3, MAX_TOKENS = 8 };
    char prompts[N][768];
    int fds[N];
    for (int i = 0; i < N; i++) {
        snprintf(prompts[i], sizeof(prompts[i]), "%s. Then %s. %s", LONG_PROMPT, LONG_PROMPT,
                 endings[i]);
        fds[i] = send_completion(s.port, prompts[i], MAX_TOKENS, "");
    }
    int computed = 0, awaited = 0, loadable = 0;
    for (int i = 0; i < N; i++) {
        cJSON *j = answer_json(fds[i]);
        cJSON *ref = cake_run(g_tiny, prompts[i], MAX_TOKENS);
        assert_same_ids(at(j, "cake.generated_ids"), at(ref, "generated_ids"));
        computed += (int)num_at(j, "cake.chunks_computed");
        awaited += (int)num_at(j, "cake.chunks_awaited");
        loadable = (int)num_at(j, "cake.chunks_total") - 1; /* (no prompt ends on a boundary) */
        cJSON_Delete(ref);
        cJSON_Delete(j);
    }
    /* Each computing the shared chunks would be N * (loadable + 1) chunks.
     * (How many the others find promised, rather than written already,
     * depends on timing: hence only less than twice.) */
    assert_true(loadable >= 8);
    print_message("shared prefix: %d chunks computed by %d requests of %d loadable, %d awaited\n",
                  computed, N, loadable, awaited);
    assert_true(computed < 2 * (loadable + 1));
    assert_true(awaited >= loadable);
    assert_int_equal(metric(s.port, "cake_store_chunks_awaited_total"), awaited);
    assert_int_equal(serve_stop(&s), 0);
}

/* A slot's first request starts from the compute speed another slot's
 * request measured; a server leaves its speed in the hints file, and the
 * next one's first request starts from it (CAKE_HINTS= turns that off). */
static void test_speed_hints(void **state) {
    (void)state;
    char hints[] = "/tmp/cake-test-hints-XXXXXX";
    const int fd = mkstemp(hints);
    assert_true(fd >= 0);
    close(fd);
    unlink(hints);
#define HINTS_REQUEST "{\"prompt\":\"%s\",\"max_tokens\":1}"
    for (int with_hints = 0; with_hints < 2; with_hints++) {
        setenv("CAKE_HINTS", with_hints ? hints : "", 1);
        t_server s;
        assert_int_equal(serve_start(&s, g_tiny, "--slots", "2", "--chunk", "16", NULL), 0);
        cJSON *a = post_ok(s.port, "/v1/completions", HINTS_REQUEST, LONG_PROMPT);
        /* the idle slot takes the next one (it shares no prefix) */
        cJSON *b = post_ok(s.port, "/v1/completions", HINTS_REQUEST, "Once upon a time");
        assert_int_equal(cJSON_IsTrue(at(a, "cake.knew_speed")), 0);
        assert_int_equal(cJSON_IsTrue(at(b, "cake.knew_speed")), 1);
        cJSON_Delete(a);
        cJSON_Delete(b);
        assert_int_equal(serve_stop(&s), 0);
    }
    /* the second server saved its speed; a third starts from it */
    FILE *f = fopen(hints, "r");
    assert_non_null(f);
    char line[512] = "";
    assert_non_null(fgets(line, sizeof(line), f));
    fclose(f);
    assert_int_equal(strncmp(line, "speed ", 6), 0);
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--chunk", "16", NULL), 0);
    cJSON *a = post_ok(s.port, "/v1/completions", HINTS_REQUEST, LONG_PROMPT);
    assert_int_equal(cJSON_IsTrue(at(a, "cake.knew_speed")), 1);
    cJSON_Delete(a);
    assert_int_equal(serve_stop(&s), 0);
    setenv("CAKE_HINTS", "", 1);
    unlink(hints);
}

/* ---- clients that leave, a full queue, shutdown ---- */

/* Opens a stream of a long generation and reads until its first text
 * event; returns the socket. */
static int open_long_stream(int port) {
    int fd = connect_to(port);
    send_request(fd, "POST", "/v1/completions",
                 "{\"prompt\":\"Hello\",\"max_tokens\":1000000,\"stream\":true,\"temperature\":1,"
                 "\"ignore_eos\":true}");
    char buf[4096];
    size_t n = 0;
    while (n < sizeof(buf) - 1) {
        ssize_t r = recv(fd, buf + n, sizeof(buf) - 1 - n, 0);
        assert_true(r > 0);
        n += (size_t)r;
        buf[n] = '\0';
        if (strstr(buf, "data: ")) break;
    }
    return fd;
}

static void wait_metric(int port, const char *name, double want) {
    for (int i = 0; i < 1000 && metric(port, name) != want; i++) usleep(10000);
    assert_true(metric(port, name) == want);
}

static void test_cancel_and_queue(void **state) {
    (void)state;
    /* The tiny model with a context of 1M tokens, and ignore_eos: its "long"
     * generations (~0.3 ms a token; random weights sample EOS now and then)
     * must outlast the test's steps by far. */
    char path[64];
    tiny_variant(&(test_model_variant){.context_length = 1 << 20}, path);
    t_server s;
    assert_int_equal(serve_start(&s, path, "--store", "none", "--queue", "1", "--slots", "1", NULL),
                     0);
    /* A client that leaves mid-stream cancels its generation. */
    int fd = open_long_stream(s.port);
    assert_int_equal(metric(s.port, "cake_requests_running"), 1);
    /* One slot, a queue of one: the next request waits, the one after is
     * turned away. */
    int waiting = connect_to(s.port);
    send_request(waiting, "POST", "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":50}");
    wait_metric(s.port, "cake_requests_queued", 1);
    t_resp r = http(s.port, "POST", "/v1/completions", "{\"prompt\":\"Hi\"}");
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.head, "Retry-After"));
    assert_non_null(strstr(r.body, "busy"));
    resp_free(&r);
    /* The waiting client leaves (its connection notices within 200 ms), then
     * the streaming one: the slot skips the first and stops the second. */
    close(waiting);
    usleep(1000000);
    close(fd);
    wait_metric(s.port, "cake_requests_queued", 0);
    wait_metric(s.port, "cake_requests_running", 0);
    assert_int_equal(metric(s.port, "cake_requests_cancelled_total"), 2);
    /* (cancelled requests are finished ones, when they were cancelled: in
     * the queue, or the stream while it generated) */
    assert_int_equal(metric(s.port, "cake_requests_finished_total"), 2);
    assert_true(metric(s.port, "cake_generation_tokens_total") < 1000000);
    assert_int_equal(metric(s.port, "cake_prompt_tokens_total"), 2); /* BOS Hello, not Hi's */

    /* The same for a client that waits for a whole answer. */
    fd = connect_to(s.port);
    send_request(
        fd, "POST", "/v1/completions",
        "{\"prompt\":\"Hello\",\"max_tokens\":1000000,\"temperature\":1,\"ignore_eos\":true}");
    wait_metric(s.port, "cake_requests_running", 1);
    close(fd);
    wait_metric(s.port, "cake_requests_running", 0);
    assert_int_equal(metric(s.port, "cake_requests_cancelled_total"), 3);
    assert_int_equal(metric(s.port, "cake_requests_rejected_total"), 1);

    /* The slot is free again. */
    cJSON *j = post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":2}");
    cJSON_Delete(j);
    /* More answers than a slot and the queue take at once: never, so 400
     * rather than a 503 that says to retry */
    r = http(s.port, "POST", "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":2,\"n\":3}");
    assert_int_equal(r.status, 400);
    assert_non_null(strstr(r.body, "more than this server takes at once: 2"));
    resp_free(&r);

    /* SIGTERM with a stream open and a whole answer awaited: the stream
     * ends, the other gets 503, the server exits 0. */
    fd = open_long_stream(s.port);
    int whole = connect_to(s.port);
    send_request(whole, "POST", "/v1/completions",
                 "{\"prompt\":\"Hello\",\"max_tokens\":1000000,\"ignore_eos\":true}");
    wait_metric(s.port, "cake_requests_queued", 1);
    assert_int_equal(serve_stop(&s), 0);
    close(fd);
    r = read_response(whole);
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.body, "shutting down"));
    resp_free(&r);
    unlink(path);
}

/* A client that leaves during a long prefill stops it at the next pass:
 * steps of one token make a 20000-token prompt take thousands of steps. */
static void test_cancel_prefill(void **state) {
    (void)state;
    char path[64];
    tiny_variant(&(test_model_variant){.context_length = 1 << 20}, path);
    t_server s;
    assert_int_equal(serve_start(&s, path, "--store", "none", "--batch", "1", "--slots", "1", NULL),
                     0);
    enum { N = 20000 };
    char *body = malloc(16 * N), *at_end = body;
    at_end += sprintf(at_end, "{\"max_tokens\":1,\"prompt\":[1");
    for (int i = 1; i < N; i++) at_end += sprintf(at_end, ",%d", 3 + i % 900);
    strcpy(at_end, "]}");
    int fd = connect_to(s.port);
    send_request(fd, "POST", "/v1/completions", body);
    free(body);
    wait_metric(s.port, "cake_requests_running", 1);
    usleep(300000);
    close(fd);
    wait_metric(s.port, "cake_requests_running", 0);
    assert_int_equal(metric(s.port, "cake_requests_cancelled_total"), 1);
    assert_int_equal(metric(s.port, "cake_requests_finished_total"), 1);
    assert_int_equal(metric(s.port, "cake_requests_failed_total"), 0);
    const double computed = metric(s.port, "cake_engine_tokens_total{kind=\"prefill\"}");
    print_message("prefill stopped after %.0f of %d tokens\n", computed, N);
    assert_true(computed > 0 && computed < N);
    /* and the slot serves the next request */
    cJSON_Delete(post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":2}"));
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
}

/* A store with a RAM tier (ram=): while a request waits for the one slot,
 * the server brings the chunks of its prompt that the store holds into RAM;
 * when it runs, every load comes from there, and the answer is the one the
 * prompt had when it was computed. */
static void test_prefetch(void **state) {
    (void)state;
    char dir[] = "/tmp/cake-prefetch-XXXXXX", store[128];
    assert_non_null(mkdtemp(dir));
    snprintf(store, sizeof(store), "file:%s?ram=64MiB", dir);
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", store, "--chunk", "16", "--slots", "1",
                                 "--mode", "load", NULL),
                     0);
    cJSON *cold = post_ok(s.port, "/v1/completions", LONG_REQUEST, LONG_PROMPT);
    const int n = cake_prefill_loadable_chunks((int)num_at(cold, "usage.prompt_tokens"), 16);
    assert_true(n >= 4);
    assert_int_equal(serve_stop(&s), 0); /* (its write-backs drained) */

    /* a new server (its RAM tier empty): the slot busy, the prompt waits */
    assert_int_equal(serve_start(&s, g_tiny, "--store", store, "--chunk", "16", "--slots", "1",
                                 "--mode", "load", NULL),
                     0);
    const int busy = send_completion(s.port, "Busy", 3000, ",\"ignore_eos\":true");
    wait_metric(s.port, "cake_requests_running", 1);
    const int fd = send_completion(s.port, LONG_PROMPT, 12, "");
    wait_metric(s.port, "cake_store_chunks_prefetched_total", n);
    close(busy); /* (cancelled: the slot is free) */
    cJSON *warm = answer_json(fd);
    close(fd);
    assert_int_equal(num_at(warm, "cake.chunks_loaded"), n);
    assert_int_equal(metric(s.port, "cake_store_ram_hits_total"), n);
    assert_same_ids(at(warm, "cake.generated_ids"), at(cold, "cake.generated_ids"));
    cJSON_Delete(warm);
    cJSON_Delete(cold);
    assert_int_equal(serve_stop(&s), 0);
    char cmd[160];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* Appends the JSON numbers of ids to out (comma-separated). */
static void append_ids(char *out, size_t cap, const int *ids, int n) {
    for (int i = 0; i < n; i++) {
        const size_t len = strlen(out);
        snprintf(out + len, cap - len, "%s%d", len && out[len - 1] != '[' ? "," : "", ids[i]);
    }
}

/* The chunks an answer completes go to the store, as its prompt's do: a
 * chat's next turn (the first turn's ids, the answer's, a new message) that
 * finds its slot taken by another prompt loads them all, and answers as a
 * server that computes everything, to the log-probability. */
static void test_answer_stored(void **state) {
    (void)state;
    enum { C = 16, N_FIRST = 20, ANSWER = 40, NEW = 5 };
    int ids[N_FIRST + ANSWER + NEW];
    ids[0] = 1;
    for (int i = 1; i < N_FIRST + ANSWER + NEW; i++) ids[i] = 3 + (i * 37) % 200;
    char body[2048] = "{\"prompt\":[";
    append_ids(body, sizeof(body), ids, N_FIRST);
    strcat(body, "],\"max_tokens\":40,\"temperature\":0,\"ignore_eos\":true}");
    t_server s;
    assert_int_equal(serve_start(&s, g_tiny, "--store", "mem:", "--chunk", "16", "--slots", "1",
                                 "--mode", "load", NULL),
                     0);
    cJSON *first = post_ok(s.port, "/v1/completions", "%s", body);
    const cJSON *answer = at(first, "cake.generated_ids");
    assert_int_equal(cJSON_GetArraySize(answer), ANSWER);
    for (int i = 0; i < ANSWER; i++) ids[N_FIRST + i] = cJSON_GetArrayItem(answer, i)->valueint;
    cJSON_Delete(first);
    /* the prompt's chunk, and the two its 39 fed-back tokens complete */
    wait_metric(s.port, "cake_store_writeback_chunks_total{result=\"written\"}", 3);
    cJSON_Delete(post_ok(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":1}"));

    strcpy(body, "{\"prompt\":[");
    append_ids(body, sizeof(body), ids, N_FIRST + ANSWER + NEW);
    strcat(body, "],\"max_tokens\":8,\"temperature\":0,\"logprobs\":2}");
    cJSON *next = post_ok(s.port, "/v1/completions", "%s", body);
    assert_int_equal(num_at(next, "cake.chunks_loaded"), 3);
    assert_int_equal(num_at(next, "usage.prompt_tokens_details.cached_tokens"), 3 * C);
    assert_int_equal(serve_stop(&s), 0);

    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", "--chunk", "16", NULL), 0);
    cJSON *ref = post_ok(s.port, "/v1/completions", "%s", body);
    assert_int_equal(num_at(ref, "cake.tokens_computed"), N_FIRST + ANSWER + NEW);
    assert_same_ids(at(next, "cake.generated_ids"), at(ref, "cake.generated_ids"));
    for (int i = 0; i < 8; i++) {
        char path[64];
        snprintf(path, sizeof(path), "choices.0.logprobs.token_logprobs.%d", i);
        assert_true(num_at(next, path) == num_at(ref, path));
    }
    cJSON_Delete(ref);
    cJSON_Delete(next);
    assert_int_equal(serve_stop(&s), 0);
}

/* ---- chat ---- */

/* A chat request answers as a completion of the prompt chat_prompt builds;
 * streamed, it starts with the assistant's role. */
static void test_chat_llama2(void **state) {
    (void)state;
    char path[64], err[256];
    tiny_variant(&(test_model_variant){.chat_template = LLAMA2_TEMPLATE}, path);
    cake_model *m;
    assert_int_equal(cake_model_load(path, &m, err, sizeof(err)), 0);
    const chat_message msgs[] = {
        {.role = "system", .content = "Be brief.", .content_len = 9},
        {.role = "user", .content = "Tell me a story.", .content_len = 16}};
    cake_token *ids, eot;
    int n;
    assert_int_equal(chat_prompt(CHAT_LLAMA2, cake_model_tokenizer(m), msgs, 2, NULL, &ids, &n,
                                 &eot, err, sizeof(err)),
                     0);
    cake_model_free(m);

    t_server s;
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    const char *msgs_json = "[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                            "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Tell "
                            "me \"},{\"type\":\"text\",\"text\":\"a story.\"}]}]";
    cJSON *chat = post_ok(s.port, "/v1/chat/completions",
                          "{\"messages\":%s,\"max_tokens\":16,\"temperature\":0}", msgs_json);
    assert_string_equal(str_at(chat, "object"), "chat.completion");
    assert_string_equal(str_at(chat, "choices.0.message.role"), "assistant");
    assert_int_equal(num_at(chat, "usage.prompt_tokens"), n);
    cJSON *tk = post_ok(s.port, "/tokenize", "{\"messages\":%s}", msgs_json);
    assert_int_equal(num_at(tk, "count"), n); /* the chat's own prompt */
    assert_int_equal(cJSON_GetArrayItem(at(tk, "tokens"), n - 1)->valueint, ids[n - 1]);
    cJSON_Delete(tk);
    char list[4096] = "[";
    for (int i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof(list) - strlen(list), i ? ",%d" : "%d", ids[i]);
    strcat(list, "]");
    free(ids);
    cJSON *plain = post_ok(s.port, "/v1/completions",
                           "{\"prompt\":%s,\"max_tokens\":16,\"temperature\":0}", list);
    assert_same_ids(at(chat, "cake.generated_ids"), at(plain, "cake.generated_ids"));
    assert_string_equal(str_at(chat, "choices.0.message.content"), str_at(plain, "choices.0.text"));

    char body[1024];
    snprintf(body, sizeof(body),
             "{\"messages\":%s,\"max_tokens\":16,\"temperature\":0,"
             "\"stream\":true}",
             msgs_json);
    t_resp r = http(s.port, "POST", "/v1/chat/completions", body);
    cJSON *ev[64];
    int done, n_ev = parse_events(r.body, ev, 64, &done);
    assert_true(done && n_ev >= 2);
    assert_string_equal(str_at(ev[0], "object"), "chat.completion.chunk");
    assert_string_equal(str_at(ev[0], "choices.0.delta.role"), "assistant");
    char text[4096] = "";
    for (int i = 0; i < n_ev - 1; i++) strcat(text, str_at(ev[i], "choices.0.delta.content"));
    assert_string_equal(text, str_at(plain, "choices.0.text"));
    assert_non_null(str_at(ev[n_ev - 1], "choices.0.finish_reason"));
    for (int i = 0; i < n_ev; i++) cJSON_Delete(ev[i]);
    resp_free(&r);

    t_resp bad = http(s.port, "POST", "/v1/chat/completions",
                      "{\"messages\":[{\"role\":\"wizard\",\"content\":\"hi\"}]}");
    assert_int_equal(bad.status, 400);
    assert_non_null(strstr(bad.body, "wizard"));
    resp_free(&bad);
    cJSON_Delete(chat);
    cJSON_Delete(plain);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
}

/* A byte-level vocabulary with the chat formats' special tokens after the
 * 256 bytes (no merges: a byte is a token). */
enum {
    IM_START = 256,
    IM_END,
    START_HEADER,
    END_HEADER,
    EOT,
    BOT,
    CALL,
    CALL_END,
    THINK,
    THINK_END,
    IM_SEP, /* Phi-4's, then Phi-3's tags */
    PHI_SYSTEM,
    PHI_USER,
    PHI_ASSISTANT,
    PHI_END,
    INST, /* Mistral's markers, as v0.3 and later have them */
    INST_END,
    SYS_PROMPT,
    SYS_PROMPT_END,
    START_TURN, /* Gemma's */
    END_TURN,
    START_ROLE, /* Granite's */
    END_ROLE,
    END_TEXT,
    TOOL_CALLS, /* Mistral's tool markers (v0.3, Nemo) */
    AVAILABLE_TOOLS,
    AVAILABLE_TOOLS_END,
    TOOL_RESULTS,
    TOOL_RESULTS_END,
    DS_USER, /* DeepSeek-R1's */
    DS_ASSISTANT,
    ARGS, /* Mistral's later tool markers (v7, v11, v13) */
    CALL_ID,
    TOOL_CONTENT,
    CHAT_VOCAB
};

/* A prompt's expected id for byte c of the tests' strings: \x01 .. \x08
 * are IM_START .. CALL_END, \x0e .. \x1f IM_SEP .. TOOL_RESULTS, \x7f
 * TOOL_RESULTS_END, and \x80 + k any special token IM_START + k; other
 * bytes are themselves. */
static int chat_test_id(unsigned char c) {
    return c >= 1 && c <= 8     ? IM_START + c - 1
           : c >= 14 && c <= 31 ? IM_SEP + c - 14
           : c == 0x7f          ? TOOL_RESULTS_END
           : c >= 0x80          ? IM_START + c - 0x80
                                : c;
}

static cake_tokenizer *chat_vocab(void) {
    static const char *tokens[CHAT_VOCAB];
    static int32_t types[CHAT_VOCAB];
    for (int b = 0; b < 256; b++) tokens[b] = test_gpt2_byte_char(b), types[b] = CAKE_TOKEN_NORMAL;
    const char *special[] = {"<|im_start|>",
                             "<|im_end|>",
                             "<|start_header_id|>",
                             "<|end_header_id|>",
                             "<|eot_id|>",
                             "<|begin_of_text|>",
                             "<tool_call>",
                             "</tool_call>",
                             "<think>",
                             "</think>",
                             "<|im_sep|>",
                             "<|system|>",
                             "<|user|>",
                             "<|assistant|>",
                             "<|end|>",
                             "[INST]",
                             "[/INST]",
                             "[SYSTEM_PROMPT]",
                             "[/SYSTEM_PROMPT]",
                             "<start_of_turn>",
                             "<end_of_turn>",
                             "<|start_of_role|>",
                             "<|end_of_role|>",
                             "<|end_of_text|>",
                             "[TOOL_CALLS]",
                             "[AVAILABLE_TOOLS]",
                             "[/AVAILABLE_TOOLS]",
                             "[TOOL_RESULTS]",
                             "[/TOOL_RESULTS]",
                             "<｜User｜>",
                             "<｜Assistant｜>",
                             "[ARGS]",
                             "[CALL_ID]",
                             "[TOOL_CONTENT]"};
    for (int i = 0; i < CHAT_VOCAB - 256; i++)
        tokens[256 + i] = special[i], types[256 + i] = CAKE_TOKEN_CONTROL;
    /* (Qwen's tags are user-defined: their text is theirs) */
    types[CALL] = types[CALL_END] = types[THINK] = types[THINK_END] = CAKE_TOKEN_USER_DEFINED;
    cake_vocab_arrays va = {.n_vocab = CHAT_VOCAB,
                            .tokens = tokens,
                            .types = types,
                            .bos = BOT,
                            .eos = EOT,
                            .unk = -1,
                            .add_bos = true,
                            .merges = (const char *[]){"a b"},
                            .n_merges = 0,
                            .pre = "llama-bpe"};
    cake_tokenizer *t;
    char err[256];
    assert_int_equal(cake_tokenizer_init_arrays(&va, &t, err, sizeof(err)), 0);
    return t;
}

/* The prompt of messages m[0..n) in format f is `want` (chat_test_id's
 * bytes), id by id. */
static void expect_prompt(const cake_tokenizer *t, chat_format f, const chat_message *m, int n,
                          const chat_options *opt, const char *want) {
    cake_token *ids, eot;
    int n_ids;
    char err[256];
    if (chat_prompt(f, t, m, n, opt, &ids, &n_ids, &eot, err, sizeof(err)))
        fail_msg("%s: %s", chat_format_name(f), err);
    for (int i = 0; i < n_ids && i < (int)strlen(want); i++)
        if (ids[i] != chat_test_id((unsigned char)want[i]))
            fail_msg("%s: id %d is %d, want byte %d", chat_format_name(f), i, ids[i], want[i]);
    if (n_ids != (int)strlen(want))
        fail_msg("%s: %d ids, want %zu", chat_format_name(f), n_ids, strlen(want));
    free(ids);
}

/* Every chat format's prompt, id by id, on chat_vocab(). */
static void test_chat_formats(void **state) {
    (void)state;
    cake_tokenizer *t = chat_vocab();
    char err[256];
    assert_int_equal(chat_detect("{{ '<|im_start|>' + role }}", t), CHAT_CHATML);
    assert_int_equal(chat_detect("<|start_header_id|>x<|end_header_id|>", t), CHAT_LLAMA3);
    assert_int_equal(chat_detect(LLAMA2_TEMPLATE, t), CHAT_LLAMA2);
    assert_int_equal(chat_detect("{{ messages }}", t), CHAT_NONE);
    assert_int_equal(chat_detect(NULL, t), CHAT_CHATML); /* from the vocabulary */

    assert_int_equal(chat_detect("[INST] {{ m }} [/INST]", t), CHAT_MISTRAL);
    /* 7B v0.2's later template */
    assert_int_equal(chat_detect("{{- ' [INST] ' + system_message + '\\n\\n' }}", t),
                     CHAT_MISTRAL_V1);
    assert_int_equal(chat_detect("{{ '<|user|>\n' }}{{ '<|assistant|>' }}", t), CHAT_ZEPHYR);
    assert_int_equal(chat_detect("{{'<|user|>\n' + m + '<|end|>\n'}}{{ '<|assistant|>\n' }}", t),
                     CHAT_PHI3);
    assert_int_equal(chat_detect("{{'<|im_start|>' + r + '<|im_sep|>' + c + '<|im_end|>'}}", t),
                     CHAT_PHI4);
    assert_int_equal(chat_detect("{{ '<start_of_turn>' + role + '\n' }}", t), CHAT_GEMMA);
    assert_int_equal(chat_detect("{{- '<|start_of_role|>' + m['role'] + '<|end_of_role|>' }}", t),
                     CHAT_GRANITE);
    assert_int_equal(chat_detect("{{ '[SYSTEM_PROMPT] ' + s }}{{ '[INST] ' + u }}", t),
                     CHAT_MISTRAL_V7);
    /* Small 3's, without the spaces */
    assert_int_equal(chat_detect("{{- '[SYSTEM_PROMPT]' + s + '[/SYSTEM_PROMPT]' }}{{- '[INST]' + "
                                 "m['content'] + '[/INST]' }}",
                                 t),
                     CHAT_MISTRAL_V7_TEKKEN);
    /* and with the later calls: Small 3.2's (v11), Ministral 3's (v13) */
    assert_int_equal(chat_detect("{{- '[SYSTEM_PROMPT]' + s }}{{- '[INST]' + u + '[/INST]' }}{{- "
                                 "name + '[CALL_ID]' + id + '[ARGS]' + arguments }}",
                                 t),
                     CHAT_MISTRAL_V11);
    assert_int_equal(chat_detect("{{- '[SYSTEM_PROMPT]' + s }}{{- '[INST]' + u + '[/INST]' }}{{- "
                                 "'[TOOL_CALLS]' + name + '[ARGS]' + arguments }}",
                                 t),
                     CHAT_MISTRAL_V13);
    assert_int_equal(chat_detect("{{ '[AVAILABLE_TOOLS]' }}{{ \"[INST]\" + u }}", t),
                     CHAT_MISTRAL_TEKKEN);
    assert_int_equal(chat_detect("{{'<｜User｜>' + c}}{{'<｜Assistant｜><think>\\n'}}", t),
                     CHAT_DEEPSEEK);
    assert_true(chat_opens_thinking("{{'<｜Assistant｜><think>\\n'}}"));
    assert_true(chat_opens_thinking("{{- '<|im_start|>assistant\\n<think>\\n' }}")); /* QwQ */
    assert_false(chat_opens_thinking("{{'<｜Assistant｜>'}}"));
    assert_false(chat_opens_thinking(NULL));
    /* 7B v0.3's: tools, "[INST] " without a space before it */
    assert_int_equal(
        chat_detect("{{- \"[AVAILABLE_TOOLS] [\" }}{{- \"[INST] \" + m + \"[/INST]\" }}", t),
        CHAT_MISTRAL_V3);

    /* Each format, id by id: the expected prompt is bytes, with the special
     * tokens written as \x01 .. \x06 (IM_START .. BOT) and \x0e .. \x1b
     * (IM_SEP .. END_TEXT). BOS comes first
     * (add_bos). The user's "<|im_end|>" stays text: bytes, not the special
     * token. */
    const chat_message m[] = {{.role = "system", .content = "S", .content_len = 1},
                              {.role = "user", .content = " <|im_end|>\n", .content_len = 12},
                              {.role = "assistant", .content = " ok ", .content_len = 4},
                              {.role = "user", .content = "more", .content_len = 4}};
    static const struct {
        chat_format f;
        const char *want;
        cake_token eot;
    } formats[] = {
        {CHAT_CHATML,
         "\x06\x01system\nS\x02\n\x01user\n <|im_end|>\n\x02\n\x01"
         "assistant\n ok \x02\n\x01user\nmore\x02\n\x01"
         "assistant\n",
         IM_END},
        /* Llama 3 and Mistral trim each message */
        {CHAT_LLAMA3,
         "\x06\x03system\x04\n\nS\x05\x03user\x04\n\n<|im_end|>\x05\x03"
         "assistant\x04\n\nok\x05\x03user\x04\n\nmore\x05\x03"
         "assistant\x04\n\n",
         EOT},
        /* Mistral's markers as tokens where the vocabulary has them */
        /* (v0.1's and v1's templates do not trim the messages) */
        {CHAT_MISTRAL, "\x06\x13 S\n\n <|im_end|>\n \x14 ok \x05\x13 more \x14", -1},
        {CHAT_MISTRAL_V1, "\x06 \x13 S\n\n <|im_end|>\n \x14  ok \x05 \x13 more \x14", -1},
        {CHAT_MISTRAL_TEKKEN, "\x06\x13S\n\n <|im_end|>\n\x14 ok \x05\x13more\x14", -1},
        {CHAT_MISTRAL_V7, "\x06\x15 S\x16\x13  <|im_end|>\n\x14  ok \x05\x13 more\x14", -1},
        {CHAT_MISTRAL_V7_TEKKEN, "\x06\x15S\x16\x13 <|im_end|>\n\x14 ok \x05\x13more\x14", -1},
        {CHAT_MISTRAL_V3, "\x06\x13 S\n\n <|im_end|>\n\x14 ok\x05\x13 more\x14", -1},
        /* DeepSeek-R1's: \x9d <｜User｜>, \x9e <｜Assistant｜> */
        {CHAT_DEEPSEEK, "\x06S\x9d <|im_end|>\n\x9e ok \x05\x9dmore\x9e", -1},
        {CHAT_ZEPHYR,
         "\x06<|system|>\nS\x05\n<|user|>\n <|im_end|>\n\x05\n<|assistant|>\n ok \x05\n"
         "<|user|>\nmore\x05\n<|assistant|>\n",
         -1},
        {CHAT_LLAMA2,
         "\x06[INST] <<SYS>>\nS\n<</SYS>>\n\n<|im_end|> [/INST] ok \x05\x06[INST] more [/INST]",
         -1},
        {CHAT_PHI3,
         "\x06\x0f\nS\x12\n\x10\n <|im_end|>\n\x12\n\x11\n ok \x12\n\x10\nmore\x12\n\x11\n",
         PHI_END},
        /* Gemma: the system message before the first user message, trimmed */
        {CHAT_GEMMA,
         "\x06\x17user\nS\n\n<|im_end|>\x18\n\x17model\nok\x18\n\x17user\nmore\x18\n\x17model\n",
         END_TURN},
        {CHAT_GRANITE,
         "\x06\x19system\x1aS\x1b\n\x19user\x1a <|im_end|>\n\x1b\n\x19"
         "assistant\x1a ok \x1b\n\x19user\x1amore\x1b\n\x19"
         "assistant\x1a",
         END_TEXT},
        {CHAT_PHI4,
         "\x06\x01system\x0eS\x02\x01user\x0e <|im_end|>\n\x02\x01"
         "assistant\x0e ok \x02\x01user\x0emore\x02\x01"
         "assistant\x0e",
         IM_END},
    };
    for (size_t k = 0; k < sizeof(formats) / sizeof(formats[0]); k++) {
        cake_token *ids, eot;
        int n;
        assert_int_equal(chat_prompt(formats[k].f, t, m, 4, NULL, &ids, &n, &eot, err, sizeof(err)),
                         0);
        const char *want = formats[k].want;
        if (n != (int)strlen(want))
            fail_msg("%s: %d ids, want %zu", chat_format_name(formats[k].f), n, strlen(want));
        for (int i = 0; i < n; i++) {
            const unsigned char c = (unsigned char)want[i];
            if (ids[i] != chat_test_id(c))
                fail_msg("%s: id %d is %d, want byte %d", chat_format_name(formats[k].f), i, ids[i],
                         c);
        }
        assert_int_equal(eot, formats[k].eot);
        free(ids);
    }

    /* With tools: Qwen's prompt (ChatML; its tags as tokens where the
     * vocabulary has them, \x07 and \x08, but never in a message's text)
     * and Llama 3.1's. */
    const char *tool_json[] = {"{\"type\": \"function\", \"function\": {\"name\": \"f\"}}"};
    const chat_tools tools = {tool_json, 1};
    const chat_tool_call call = {"f", "{\"a\": 1}", NULL};
    const chat_message tm[] = {{.role = "system", .content = "S", .content_len = 1},
                               {.role = "user", .content = "<tool_call>", .content_len = 11},
                               {.role = "assistant", .content = "", .calls = &call, .n_calls = 1},
                               {.role = "tool", .content = "R", .content_len = 1},
                               {.role = "tool", .content = "R2", .content_len = 2}};
    static const struct {
        chat_format f;
        const char *want;
    } with_tools[] = {
        {CHAT_CHATML,
         "\x06\x01system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the "
         "user query.\n\nYou are provided with function signatures within <tools></tools> XML "
         "tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": "
         "\"f\"}}\n</tools>\n\nFor "
         "each function call, return a json object with function name and arguments within "
         "\x07\x08 XML tags:\n\x07\n{\"name\": <function-name>, \"arguments\": "
         "<args-json-object>}\n\x08\x02\n"
         "\x01user\n<tool_call>\x02\n"
         "\x01"
         "assistant\n\x07\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n\x08\x02\n"
         "\x01user\n<tool_response>\nR\n</tool_response>\n<tool_response>\nR2\n</"
         "tool_response>\x02\n"
         "\x01"
         "assistant\n"},
        {CHAT_LLAMA3,
         "\x06\x03system\x04\n\nEnvironment: ipython\nCutting Knowledge Date: December "
         "2023\nToday Date: 26 Jul 2024\n\nS\x05"
         "\x03user\x04\n\nGiven the following functions, please respond with a JSON for a "
         "function call with its proper arguments that best answers the given prompt.\n\n"
         "Respond in the format {\"name\": function name, \"parameters\": dictionary of "
         "argument name and its value}.Do not use variables.\n\n{\"type\": \"function\", "
         "\"function\": {\"name\": \"f\"}}\n\n<tool_call>\x05"
         "\x03"
         "assistant\x04\n\n{\"name\": \"f\", \"parameters\": {\"a\": 1}}\x05"
         "\x03ipython\x04\n\n\"R\"\x05\x03ipython\x04\n\n\"R2\"\x05"
         "\x03"
         "assistant\x04\n\n"},
    };
    for (size_t k = 0; k < sizeof(with_tools) / sizeof(with_tools[0]); k++)
        expect_prompt(t, with_tools[k].f, tm, 5, &(chat_options){.tools = &tools},
                      with_tools[k].want);
    /* Mistral's (7B v0.3's template, and Nemo's without the spaces): the
     * functions before the last user message, a call as [TOOL_CALLS] and a
     * list with its id, then EOS, a result with its call's id; \x1c is
     * [TOOL_CALLS], \x1d \x1e [AVAILABLE_TOOLS] and its end, \x1f \x7f
     * [TOOL_RESULTS] and its end */
    const chat_tool_call mistral_call = {"f", "{\"a\": 1}", "abcDEF123"};
    const chat_message mm[] = {
        {.role = "system", .content = "S", .content_len = 1},
        {.role = "user", .content = "Q1", .content_len = 2},
        {.role = "assistant", .content = " A1 ", .content_len = 4},
        {.role = "user", .content = "Q2", .content_len = 2},
        {.role = "assistant", .content = "", .calls = &mistral_call, .n_calls = 1},
        {.role = "tool", .content = "R", .content_len = 1, .call_id = "abcDEF123"}};
    static const struct {
        chat_format f;
        const char *want;
    } mistral_tools[] = {
        {CHAT_MISTRAL_V3,
         "\x06\x13 S\n\nQ1\x14 A1\x05\x1d [{\"type\": \"function\", \"function\": {\"name\": "
         "\"f\"}}]\x1e\x13 Q2\x14\x1c [{\"name\": \"f\", \"arguments\": {\"a\": 1}, \"id\": "
         "\"abcDEF123\"}]\x05\x1f {\"content\": R, \"call_id\": \"abcDEF123\"}\x7f"},
        {CHAT_MISTRAL_TEKKEN,
         "\x06\x13S\n\nQ1\x14 A1 \x05\x1d[{\"type\": \"function\", \"function\": {\"name\": "
         "\"f\"}}]\x1e\x13Q2\x14\x1c[{\"name\": \"f\", \"arguments\": {\"a\": 1}, \"id\": "
         "\"abcDEF123\"}]\x05\x1f{\"content\": R, \"call_id\": \"abcDEF123\"}\x7f"},
    };
    for (size_t k = 0; k < sizeof(mistral_tools) / sizeof(mistral_tools[0]); k++)
        expect_prompt(t, mistral_tools[k].f, mm, 6, &(chat_options){.tools = &tools},
                      mistral_tools[k].want);
    /* mistral-common's v7 and later (Small 3 on): the answer's text before
     * its calls; v7's a list, v11's and v13's name[ARGS]{...} each, v11's
     * with [CALL_ID] and the id; results with the id and [TOOL_CONTENT]
     * (v13: without); the functions before the last user message (v13:
     * after the first system message). \x9f [ARGS], \xa0 [CALL_ID], \xa1
     * [TOOL_CONTENT] */
    const chat_tool_call two_calls[] = {{"f", "{\"a\": 1}", "abcDEF123"}, {"g", "{}", "XYZ987654"}};
    chat_message later[6];
    memcpy(later, mm, sizeof(later));
    later[4] = (chat_message){.role = "assistant",
                              .content = "On it.",
                              .content_len = 6,
                              .calls = two_calls,
                              .n_calls = 2};
    static const struct {
        chat_format f;
        const char *want;
    } later_tools[] = {
        {CHAT_MISTRAL_V7_TEKKEN,
         "\x06\x15S\x16\x13Q1\x14 A1 \x05\x1d[{\"type\": \"function\", \"function\": {\"name\": "
         "\"f\"}}]\x1e\x13Q2\x14On it.\x1c[{\"name\": \"f\", \"arguments\": {\"a\": 1}, \"id\": "
         "\"abcDEF123\"}, {\"name\": \"g\", \"arguments\": {}, \"id\": \"XYZ987654\"}]\x05\x1f"
         "abcDEF123\xa1R\x7f"},
        {CHAT_MISTRAL_V11,
         "\x06\x15S\x16\x13Q1\x14 A1 \x05\x1d[{\"type\": \"function\", \"function\": {\"name\": "
         "\"f\"}}]\x1e\x13Q2\x14On it.\x1c"
         "f\xa0"
         "abcDEF123\x9f{\"a\": 1}\x1cg\xa0XYZ987654\x9f{}\x05\x1f"
         "abcDEF123\xa1R\x7f"},
        {CHAT_MISTRAL_V13,
         "\x06\x15S\x16\x1d[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]\x1e"
         "\x13Q1\x14 A1 \x05\x13Q2\x14On it.\x1c"
         "f\x9f{\"a\": 1}\x1cg\x9f{}\x05\x1fR\x7f"},
    };
    for (size_t k = 0; k < sizeof(later_tools) / sizeof(later_tools[0]); k++)
        expect_prompt(t, later_tools[k].f, later, 6, &(chat_options){.tools = &tools},
                      later_tools[k].want);
    /* v13 without a system message: the functions first (after the
     * template's default system message, where it has one); v13 needs no
     * ids, v7 and v11 do */
    expect_prompt(t, CHAT_MISTRAL_V13, later + 1, 1,
                  &(chat_options){.tools = &tools, .default_system = "D"},
                  "\x06\x15"
                  "D\x16\x1d[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]\x1e"
                  "\x13Q1\x14");
    const chat_message no_ids[] = {
        {.role = "user", .content = "Q", .content_len = 1},
        {.role = "assistant", .content = "", .calls = &call, .n_calls = 1},
        {.role = "tool", .content = "R", .content_len = 1}};
    expect_prompt(t, CHAT_MISTRAL_V13, no_ids, 3, NULL,
                  "\x06\x13Q\x14\x1c"
                  "f\x9f{\"a\": 1}\x05\x1fR\x7f");
    cake_token *ids, eot;
    int n;
    /* as mistral-common's templates: a run of user messages, or of answers,
     * is one message (blank lines between; the answers' text, then their
     * calls), so the functions go before the run; v13's before the first
     * user message, after every system message before it */
    const chat_message runs[] = {
        {.role = "system", .content = "S", .content_len = 1},
        {.role = "system", .content = "T", .content_len = 1},
        {.role = "user", .content = "a", .content_len = 1},
        {.role = "assistant", .content = "", .calls = &mistral_call, .n_calls = 1},
        {.role = "assistant", .content = "x", .content_len = 1},
        {.role = "user", .content = "b", .content_len = 1},
        {.role = "user", .content = "c", .content_len = 1}};
    expect_prompt(
        t, CHAT_MISTRAL_V11, runs, 7, &(chat_options){.tools = &tools},
        "\x06\x15S\x16\x15T\x16\x13"
        "a\x14x\x1c"
        "f\xa0"
        "abcDEF123\x9f{\"a\": 1}\x05\x1d[{\"type\": \"function\", \"function\": {\"name\": "
        "\"f\"}}]\x1e\x13"
        "b\n\nc\x14");
    expect_prompt(t, CHAT_MISTRAL_V13, runs, 7, &(chat_options){.tools = &tools},
                  "\x06\x15S\x16\x15T\x16\x1d[{\"type\": \"function\", \"function\": {\"name\": "
                  "\"f\"}}]\x1e\x13"
                  "a\x14x\x1c"
                  "f\x9f{\"a\": 1}\x05\x13"
                  "b\n\nc\x14");
    const chat_format need_ids[] = {CHAT_MISTRAL_V7_TEKKEN, CHAT_MISTRAL_V11};
    for (size_t k = 0; k < 2; k++) {
        assert_int_equal(
            chat_prompt(need_ids[k], t, no_ids, 3, NULL, &ids, &n, &eot, err, sizeof(err)), -1);
        assert_non_null(strstr(err, "'id'"));
    }
    /* As the templates do: Qwen 3's drops an earlier answer's reasoning (not
     * an answer after the last user message's); Mistral's system messages
     * (several: joined) before the first user message after them;
     * DeepSeek-R1's distills keep the last system message; Llama 3.1's
     * writes a tool's result as tojson */
    assert_true(chat_strips_reasoning("{%- set content = content.split('</think>')[-1] %}"));
    assert_false(chat_strips_reasoning("{{ '<|im_start|>' + role }}"));
    const chat_message thought[] = {
        {.role = "user", .content = "Hi", .content_len = 2},
        {.role = "assistant", .content = "<think>\nr\n</think>\n\nHello!", .content_len = 26},
        {.role = "user", .content = "Again", .content_len = 5},
        {.role = "assistant", .content = "<think>x</think>", .content_len = 16}};
    expect_prompt(t, CHAT_CHATML, thought, 3, &(chat_options){.strip_reasoning = 1},
                  "\x06\x01user\nHi\x02\n\x01"
                  "assistant\nHello!\x02\n\x01user\nAgain\x02\n\x01"
                  "assistant\n");
    expect_prompt(t, CHAT_CHATML, thought + 2, 2, &(chat_options){.strip_reasoning = 1},
                  "\x06\x01user\nAgain\x02\n\x01"
                  "assistant\n<think>x</think>\x02\n\x01"
                  "assistant\n");
    const chat_message systems[] = {{.role = "system", .content = "A", .content_len = 1},
                                    {.role = "system", .content = "B", .content_len = 1},
                                    {.role = "user", .content = "u", .content_len = 1}};
    expect_prompt(t, CHAT_MISTRAL, systems, 3, NULL, "\x06\x13 A\n\nB\n\nu \x14");
    expect_prompt(t, CHAT_DEEPSEEK, systems, 3, NULL,
                  "\x06"
                  "B\x9du\x9e");
    const chat_message result[] = {
        {.role = "user", .content = "q", .content_len = 1},
        {.role = "tool", .content = "say \"hi\"\n\x01", .content_len = 10}};
    expect_prompt(t, CHAT_LLAMA3, result, 2, NULL,
                  "\x06\x03user\x04\n\nq\x05\x03ipython\x04\n\n\"say \\\"hi\\\"\\n\\u0001\"\x05"
                  "\x03"
                  "assistant\x04\n\n");

    /* Mistral's prompt needs the ids */
    assert_int_equal(chat_prompt(CHAT_MISTRAL_V3, t, tm, 5, &(chat_options){.tools = &tools}, &ids,
                                 &n, &eot, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "'id'"));
    assert_int_equal(
        chat_prompt(CHAT_MISTRAL_V3, t, &tm[3], 1, NULL, &ids, &n, &eot, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "'tool_call_id'"));
    /* formats without tools refuse them, and tool messages */
    assert_int_equal(chat_prompt(CHAT_MISTRAL, t, m, 4, &(chat_options){.tools = &tools}, &ids, &n,
                                 &eot, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "'tools'"));
    assert_int_equal(chat_prompt(CHAT_LLAMA2, t, tm, 5, NULL, &ids, &n, &eot, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "tool calls"));

    const chat_message bad[] = {{.role = "robot", .content = "x", .content_len = 1}};
    assert_int_equal(chat_prompt(CHAT_CHATML, t, bad, 1, NULL, &ids, &n, &eot, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "robot"));
    cake_tokenizer_free(t);
}

/* A finished job of api_parse's body whose answer is `text`. */
static serve_job *answered(const char *body, const api_model *m, api_shape *shape,
                           const char *text) {
    serve_job *j;
    char err[256];
    if (api_parse(body, strlen(body), 1, m, &j, shape, err, sizeof(err)))
        fail_msg("refused %s: %s", body, err);
    pthread_mutex_lock(&j->mu);
    job_add_text(j, text, strlen(text));
    j->stopped = 1;
    pthread_mutex_unlock(&j->mu);
    job_settle(j, NULL);
    job_finish(j);
    return j;
}

/* The prompt's text (specials as their names). */
static char *prompt_text(const serve_job *j, const cake_tokenizer *t) {
    char *out = calloc(1, 65536);
    size_t len = 0;
    for (int i = 0; i < j->n_prompt && len < 60000; i++)
        len += (size_t)cake_token_to_piece(t, i ? j->prompt[i - 1] : -1, j->prompt[i], out + len,
                                           65536 - len);
    return out;
}

/* A ChatML template's own system message (Qwen2, Qwen2.5) goes into a chat
 * without one, as the template writes it (read from its string literal);
 * a chat with one, and templates without such a literal (Qwen3's), get
 * none. Through api_parse on chat_vocab(). */
static void test_chat_default_system(void **state) {
    (void)state;
    /* Qwen2.5's template, the parts that write the system turn */
    static const char qwen25[] =
        "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == "
        "'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You "
        "are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif "
        "%}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- "
        "'<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else "
        "%}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
        "a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}";
    char *sys = chat_default_system(qwen25);
    assert_string_equal(sys,
                        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
    free(sys);
    /* Qwen2's, with escapes in its text; a newline written as one */
    sys = chat_default_system("{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                              "\"<|im_start|>system\\nBe \\\"brief\\\"\\tand it\\'s "
                              "fine<|im_end|>\\n\" }}{% endif %}");
    assert_string_equal(sys, "Be \"brief\"\tand it's fine");
    free(sys);
    sys = chat_default_system("{{ '<|im_start|>system\nHi.<|im_end|>' }}");
    assert_string_equal(sys, "Hi.");
    free(sys);
    /* none: Qwen3's (the content is a variable), no template, an empty
     * text, a literal that ends before <|im_end|>, a dangling escape */
    assert_null(chat_default_system("{{- '<|im_start|>system\\n' + messages[0].content + "
                                    "'<|im_end|>\\n\\n' }}"));
    assert_null(chat_default_system(NULL));
    assert_null(chat_default_system("{{ '<|im_start|>system\\n<|im_end|>' }}"));
    assert_null(chat_default_system("{{ '<|im_start|>system\\nA' + b + '<|im_end|>' }}"));
    assert_null(chat_default_system("{{ '<|im_start|>system\\nA\\<|im_end|>' }}"));

    cake_tokenizer *t = chat_vocab();
    api_model m = {.tok = t,
                   .n_vocab = CHAT_VOCAB,
                   .n_ctx = 8192,
                   .chat = CHAT_CHATML,
                   .name = "t",
                   .default_system = "Be brief."};
    static const struct {
        const char *body, *want; /* (the special tokens print nothing) */
    } cases[] = {
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}",
         "system\nBe brief.\nuser\nHi\nassistant\n"},
        {"{\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\","
         "\"content\":\"Hi\"}]}",
         "system\nS\nuser\nHi\nassistant\n"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"tools\":[{\"type\":"
         "\"function\",\"function\":{\"name\":\"f\"}}]}",
         "system\nBe brief.\n\n# Tools\n\nYou may call"},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        api_shape shape;
        serve_job *j;
        char err[256];
        if (api_parse(cases[k].body, strlen(cases[k].body), 1, &m, &j, &shape, err, sizeof(err)))
            fail_msg("refused %s: %s", cases[k].body, err);
        char *p = prompt_text(j, t);
        if (strncmp(p, cases[k].want, strlen(cases[k].want)))
            fail_msg("case %zu: prompt '%s', want it to begin '%s'", k, p, cases[k].want);
        free(p);
        job_release(j);
    }
    /* (and chat_template_kwargs must be an object) */
    const char *kwargs = "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                         "\"chat_template_kwargs\":5}";
    api_shape shape;
    serve_job *j;
    char err[256];
    assert_int_equal(api_parse(kwargs, strlen(kwargs), 1, &m, &j, &shape, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "'chat_template_kwargs'"));

    /* Llama 3.1 and later write a system turn in every chat, with the
     * knowledge cutoff and a date: 3.1's own ("26 Jul 2024"), 3.2's and
     * 3.3's the day's (strftime_now); 3.0's template has none */
    static const char llama31[] =
        "{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n"
        "{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: "
        "\" + date_string + \"\\n\\n\" }}";
    static const char llama32[] =
        "{%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b "
        "%Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n"
        "{{- \"Cutting Knowledge Date: December 2023\\n\" }}";
    char *date = chat_llama3_date(llama31);
    assert_string_equal(date, "26 Jul 2024");
    free(date);
    date = chat_llama3_date(llama32);
    assert_string_equal(date, "");
    free(date);
    assert_null(chat_llama3_date("{{ '<|start_header_id|>' + message['role'] }}"));
    assert_null(chat_llama3_date(NULL));
    /* Mistral Small 3's, with the day in it: its default system message as
     * the template writes it (the template's escapes as a Jinja source has
     * them, or expanded to line breaks), in [SYSTEM_PROMPT] when a chat has
     * no system message */
    static const char small31[] =
        "{%- set today = strftime_now(\"%Y-%m-%d\") %}\n{%- set default_system_message = \"You "
        "are Mistral Small 3.\\nThe current date is \" + today + \".\\n\\nAsk \\\"where?\\\"\" "
        "%}\n{{- bos_token }}";
    const time_t day = 1796000000; /* (2026-11-29 at 22:13 UTC) */
    struct tm day_tm;
    char day_text[16], want_small[128];
    strftime(day_text, sizeof(day_text), "%Y-%m-%d", localtime_r(&day, &day_tm));
    snprintf(want_small, sizeof(want_small),
             "You are Mistral Small 3.\nThe current date is %s.\n\nAsk \"where?\"", day_text);
    sys = chat_dated_default_system(small31, day);
    assert_non_null(sys);
    assert_string_equal(sys, want_small);
    free(sys);
    sys = chat_dated_default_system("{%- set default_system_message = \"A\\\nB\" %}", day);
    assert_string_equal(sys, "A\nB");
    free(sys);
    /* a long one (templates' literals are not capped) */
    char *long_tmpl = malloc(9100), *long_sys;
    static const char head[] = "{%- set default_system_message = \"";
    strcpy(long_tmpl, head);
    memset(long_tmpl + sizeof(head) - 1, 'A', 9000);
    strcpy(long_tmpl + sizeof(head) - 1 + 9000, "\" %}");
    assert_non_null(long_sys = chat_dated_default_system(long_tmpl, day));
    assert_int_equal(strlen(long_sys), 9000);
    free(long_sys);
    free(long_tmpl);
    /* Ministral 3's: {today} and {yesterday} in one literal */
    sys = chat_dated_default_system("{%- set default_system_message = 'You are Ministral.\\nThe "
                                    "current date is {today}.\\n(\"yesterday\" is {yesterday}), "
                                    "don\\'t {x}.' %}",
                                    day);
    char yesterday[16];
    const time_t before = day - 86400;
    strftime(yesterday, sizeof(yesterday), "%Y-%m-%d", localtime_r(&before, &day_tm));
    snprintf(want_small, sizeof(want_small),
             "You are Ministral.\nThe current date is %s.\n(\"yesterday\" is %s), don't {x}.",
             day_text, yesterday);
    assert_non_null(sys);
    assert_string_equal(sys, want_small);
    free(sys);
    assert_null(chat_dated_default_system("{%- set default_system_message = x + 'a' %}", day));
    assert_null(chat_dated_default_system("{{ '[INST]' + m }}", day));
    const chat_message user_only[] = {{.role = "user", .content = "u", .content_len = 1}};
    expect_prompt(t, CHAT_MISTRAL_V7_TEKKEN, user_only, 1, &(chat_options){.default_system = "D"},
                  "\x06\x15"
                  "D\x16\x13u\x14");
    const chat_message with_system[] = {{.role = "system", .content = "S", .content_len = 1},
                                        {.role = "user", .content = "u", .content_len = 1}};
    expect_prompt(t, CHAT_MISTRAL_V7_TEKKEN, with_system, 2, &(chat_options){.default_system = "D"},
                  "\x06\x15S\x16\x13u\x14");

    m.chat = CHAT_LLAMA3;
    m.default_system = NULL;
    m.llama3_date = "";
    char today[32];
    const time_t now = time(NULL);
    struct tm tm;
    strftime(today, sizeof(today), "%d %b %Y", localtime_r(&now, &tm));
    char want[128];
    snprintf(want, sizeof(want),
             "system\n\nCutting Knowledge Date: December 2023\nToday Date: %s\n\nuser\n\nHi",
             today);
    const char *hi = "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}";
    assert_int_equal(api_parse(hi, strlen(hi), 1, &m, &j, &shape, err, sizeof(err)), 0);
    char *p = prompt_text(j, t);
    if (strncmp(p, want, strlen(want))) fail_msg("Llama 3.2: '%s', want '%s'", p, want);
    free(p);
    job_release(j);
    m.llama3_date = NULL; /* (Llama 3.0: the messages alone) */
    assert_int_equal(api_parse(hi, strlen(hi), 1, &m, &j, &shape, err, sizeof(err)), 0);
    p = prompt_text(j, t);
    assert_string_equal(p, "user\n\nHiassistant\n\n");
    free(p);
    job_release(j);
    cake_tokenizer_free(t);
}

/* Tools (OpenAI's function calling), on chat_vocab() through the API
 * functions: the prompt lists the functions; an answer's calls come back
 * as tool_calls (whole and streamed), with finish_reason tool_calls, the
 * text before them as content, and text that does not read as a call stays
 * content; while it is generated, what may be a call is held back from the
 * stream; a named tool_choice constrains sampling to a call of that
 * function with its parameters; bad tools answer 400. */
static void test_tools(void **state) {
    (void)state;
    cake_tokenizer *t = chat_vocab();
    api_model m = {
        .tok = t, .n_vocab = CHAT_VOCAB, .n_ctx = 8192, .chat = CHAT_CHATML, .name = "t"};
#define TOOLS                                                                                      \
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":"    \
    "\"Weather now\",\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":"      \
    "\"string\",\"maxLength\":12}},\"required\":[\"city\"]}}},{\"type\":\"function\","             \
    "\"function\":{\"name\":\"get_time\"}}]"
    const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris?\"}]," TOOLS "}";
    api_shape shape;
    serve_job *j = answered(body, &m, &shape,
                            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                            "{\"city\": \"Paris\"}}\n</tool_call>");
    char *p = prompt_text(j, t);
    assert_non_null(strstr(p, "<tools>\n{\"type\": \"function\", \"function\": {\"name\": "
                              "\"get_weather\", \"description\": \"Weather now\""));
    free(p);
    char *r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    cJSON *o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.content"), "Let me look.");
    assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.function.name"), "get_weather");
    assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.type"), "function");
    assert_true(!strncmp(str_at(o, "choices.0.message.tool_calls.0.id"), "call_", 5));
    cJSON *args = cJSON_Parse(str_at(o, "choices.0.message.tool_calls.0.function.arguments"));
    assert_string_equal(str_at(args, "city"), "Paris");
    assert_string_equal(str_at(o, "choices.0.finish_reason"), "tool_calls");
    cJSON_Delete(args);
    cJSON_Delete(o);
    free(r);
    /* streamed: the calls in their own chunk, with their index */
    char *ev = api_stream_event(&shape, CHUNK_CALLS, 0, "", 0, 0, 0, j, "c", 1, "t");
    o = cJSON_Parse(ev + 6);
    assert_string_equal(str_at(o, "choices.0.delta.tool_calls.0.function.name"), "get_weather");
    assert_int_equal(num_at(o, "choices.0.delta.tool_calls.0.index"), 0);
    cJSON_Delete(o);
    free(ev);
    assert_int_equal(api_content_end(j), 12);
    job_release(j);

    /* a call to a function not given, or not JSON: all content */
    j = answered(body, &m, &shape,
                 "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>");
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_null(cJSON_GetObjectItemCaseSensitive(at(o, "choices.0.message"), "tool_calls"));
    assert_string_equal(str_at(o, "choices.0.finish_reason"), "stop");
    assert_non_null(strstr(str_at(o, "choices.0.message.content"), "\"rm\""));
    cJSON_Delete(o);
    free(r);
    job_release(j);

    /* held back while generated: from the tag, or a part of it, and the
     * white space before it (the content ends before it, trimmed); still
     * when the answer is settled, until it is finished and read whole (a
     * stream that read it in between sent the call as content) */
    serve_job *g;
    char err[256];
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &g, &shape, err, sizeof(err)), 0);
    static const struct {
        const char *piece;
        size_t ready;
    } steps[] = {{"Sure", 4},
                 {" <tool", 4},
                 {"_cal", 4},
                 {"x", 15},
                 {" \n", 15},
                 {"<tool_call>{", 15},
                 {"\"name\": \"get_time\", \"arguments\": {}}", 15}};
    for (size_t k = 0; k < sizeof(steps) / sizeof(steps[0]); k++) {
        job_add_text(g, steps[k].piece, strlen(steps[k].piece));
        if (g->ready != steps[k].ready)
            fail_msg("after '%s': ready %zu, want %zu", steps[k].piece, g->ready, steps[k].ready);
    }
    g->stopped = 1;
    job_settle(g, NULL);
    size_t from, to;
    assert_int_equal(g->ready, 15);
    assert_int_equal(api_next_piece(g, 15, &from, &to), 0);
    job_finish(g);
    assert_int_equal(api_content_end(g), 15);
    assert_int_equal(api_next_piece(g, 15, &from, &to), 0);
    job_release(g);

    /* Llama 3: the call is the whole answer, "parameters" its arguments;
     * the functions listed as Llama 3.1's template writes them,
     * tojson(indent=4) (the text is Python's json.dumps(t, indent=4)) */
    m.chat = CHAT_LLAMA3;
    j = answered(body, &m, &shape, " {\"name\": \"get_time\", \"parameters\": {}}");
    p = prompt_text(j, t);
    assert_non_null(strstr(
        p, "Do not use variables.\n\n"
           "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": "
           "\"get_weather\",\n        \"description\": \"Weather now\",\n        "
           "\"parameters\": {\n            \"type\": \"object\",\n            \"properties\": "
           "{\n                \"city\": {\n                    \"type\": \"string\",\n       "
           "             \"maxLength\": 12\n                }\n            },\n            "
           "\"required\": [\n                \"city\"\n            ]\n        }\n    }\n}\n\n"
           "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": "
           "\"get_time\"\n    }\n}\n\nParis?"));
    free(p);
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_true(cJSON_IsNull(at(o, "choices.0.message.content")));
    assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.function.name"), "get_time");
    assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.function.arguments"), "{}");
    cJSON_Delete(o);
    free(r);
    job_release(j);

    /* Mistral (7B v0.3): the functions listed as its template writes them
     * (strings between quotes as they are); calls as [TOOL_CALLS] and a
     * list, each a tool call with an id of 9 letters or digits (what its
     * prompt takes back); a list with an item that is not a call is all
     * content; the ids of a conversation's calls and results are their
     * last 9 characters */
    m.chat = CHAT_MISTRAL_V3;
    const char *quoted = "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris?\"}],\"tools\":"
                         "[{\"type\":\"function\",\"function\":{\"name\":\"get_time\","
                         "\"description\":\"say \\\"now\\\"\",\"return\":{\"type\":\"string\"},"
                         "\"strict\":false}}]}";
    j = answered(quoted, &m, &shape,
                 "Sure.[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": "
                 "{}}, {\"name\": \"get_time\", \"arguments\": {\"tz\": 1}}]");
    p = prompt_text(j, t);
    assert_non_null(strstr(p, " [{\"type\": \"function\", \"function\": {\"name\": \"get_time\", "
                              "\"description\": \"say \"now\"\", \"strict\": false}}] Paris?"));
    free(p);
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.content"), "Sure.");
    assert_string_equal(str_at(o, "choices.0.message.tool_calls.1.function.arguments"),
                        "{\"tz\":1}");
    assert_string_equal(str_at(o, "choices.0.finish_reason"), "tool_calls");
    for (int c = 0; c < 2; c++) {
        char path[64];
        snprintf(path, sizeof(path), "choices.0.message.tool_calls.%d.id", c);
        const char *id = str_at(o, path);
        assert_int_equal(strlen(id), 9);
        for (int i = 0; i < 9; i++) assert_true(isalnum((unsigned char)id[i]));
    }
    cJSON_Delete(o);
    free(r);
    job_release(j);
    j = answered(quoted, &m, &shape,
                 "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}}, 5]");
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_null(cJSON_GetObjectItemCaseSensitive(at(o, "choices.0.message"), "tool_calls"));
    assert_string_equal(str_at(o, "choices.0.finish_reason"), "stop");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    const char *mistral_conv =
        "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris?\"},{\"role\":"
        "\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_0123456789\","
        "\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
        "\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},{\"role\":\"tool\","
        "\"tool_call_id\":\"call_0123456789\",\"content\":\"sunny\"}]," TOOLS "}";
    j = answered(mistral_conv, &m, &shape, "It is sunny.");
    p = prompt_text(j, t);
    assert_non_null(strstr(p, " Paris? [{\"name\": \"get_weather\", \"arguments\": {\"city\": "
                              "\"Paris\"}, \"id\": \"123456789\"}] {\"content\": sunny, "
                              "\"call_id\": \"123456789\"}"));
    free(p);
    job_release(j);
    /* Mistral v11 (Small 3.2) and v13 (Ministral 3): the functions listed
     * as their templates' tojson writes them; [TOOL_CALLS]name[ARGS]{...}
     * each, after the answer's text, with v11's [CALL_ID] and the model's
     * id where it writes one (cake gives its own, of 9 letters or digits);
     * a call of no tool is all content; v11's conversation sends the ids
     * back, v13's does not */
    const chat_format later_formats[] = {CHAT_MISTRAL_V11, CHAT_MISTRAL_V13};
    for (int f = 0; f < 2; f++) {
        m.chat = later_formats[f];
        j = answered(body, &m, &shape,
                     f ? "Let me check. [TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"} "
                         "[TOOL_CALLS]get_time[ARGS] {}"
                       : "Let me check. [TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"} "
                         "[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS] {}");
        p = prompt_text(j, t);
        assert_non_null(strstr(
            p, "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
               "\"description\": \"Weather now\", \"parameters\": {\"type\": \"object\", "
               "\"properties\": {\"city\": {\"type\": \"string\", \"maxLength\": 12}}, "
               "\"required\": [\"city\"]}}}, {\"type\": \"function\", \"function\": {\"name\": "
               "\"get_time\"}}]"));
        free(p);
        r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
        o = cJSON_Parse(r);
        assert_string_equal(str_at(o, "choices.0.message.content"), "Let me check.");
        assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.function.name"),
                            "get_weather");
        assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.function.arguments"),
                            "{\"city\":\"Paris\"}");
        assert_string_equal(str_at(o, "choices.0.message.tool_calls.1.function.name"), "get_time");
        assert_string_equal(str_at(o, "choices.0.message.tool_calls.1.function.arguments"), "{}");
        assert_int_equal(strlen(str_at(o, "choices.0.message.tool_calls.1.id")), 9);
        assert_string_equal(str_at(o, "choices.0.finish_reason"), "tool_calls");
        cJSON_Delete(o);
        free(r);
        job_release(j);
        j = answered(body, &m, &shape, "[TOOL_CALLS]get_date[ARGS]{}");
        r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
        o = cJSON_Parse(r);
        assert_string_equal(str_at(o, "choices.0.message.content"), "[TOOL_CALLS]get_date[ARGS]{}");
        cJSON_Delete(o);
        free(r);
        job_release(j);
        j = answered(mistral_conv, &m, &shape, "It is sunny.");
        p = prompt_text(j, t);
        assert_non_null(strstr(p, f ? "Paris?get_weather{\"city\": \"Paris\"}sunny"
                                    : "Paris?get_weather123456789{\"city\": \"Paris\"}"
                                      "123456789sunny"));
        free(p);
        job_release(j);
        /* a message's text parts joined by blank lines, and a call's empty
         * arguments as {}, as their templates write them */
        const char *parts = "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
                            "\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]},{\"role\":"
                            "\"assistant\",\"tool_calls\":[{\"id\":\"abcDEF123\",\"type\":"
                            "\"function\",\"function\":{\"name\":\"get_time\",\"arguments\":\"\"}}"
                            "]}]}";
        j = answered(parts, &m, &shape, "");
        p = prompt_text(j, t);
        assert_non_null(strstr(p, f ? "a\n\nbget_time{}" : "a\n\nbget_timeabcDEF123{}"));
        free(p);
        job_release(j);
    }
    m.chat = CHAT_CHATML;

    /* a named tool_choice, and required: sampled hot under the constraint,
     * each answer is a call of that function (of either, told apart by the
     * name: a city of at most 12 characters for get_weather) */
    const char *named = "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris?\"}]," TOOLS
                        ",\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":"
                        "\"get_weather\"}}}";
    const char *required = "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris?\"}]," TOOLS
                           ",\"tool_choice\":\"required\"}";
    cake_json_vocab *v = cake_json_vocab_new(t);
    float logits[CHAT_VOCAB]; /* (for the masks below) */
    int calls = 0, time_calls = 0;
    for (int a = 0; a < 20; a++) {
        const char *req = a < 10 ? named : required;
        assert_int_equal(api_parse(req, strlen(req), 1, &m, &g, &shape, err, sizeof(err)), 0);
        assert_true(g->json && g->schema);
        cake_json_grammar *gr =
            cake_json_grammar_new(v, json_schema_root(g->schema), g->end_of_turn, -1);
        char out[2048];
        const bool ended =
            test_sample_constrained(t, gr, IM_END, 1.5f, (uint64_t)a, 6, 8, 600, out, sizeof(out));
        const size_t len = strlen(out);
        cake_json_grammar_free(gr);
        job_release(g);
        if (!ended || len < 20 || strcmp(out + len - 12, "</tool_call>"))
            continue; /* (cut short) */
        j = answered(req, &m, &shape, out);
        r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
        o = cJSON_Parse(r);
        const char *fn = str_at(o, "choices.0.message.tool_calls.0.function.name");
        args = cJSON_Parse(str_at(o, "choices.0.message.tool_calls.0.function.arguments"));
        const cJSON *city = cJSON_GetObjectItemCaseSensitive(args, "city");
        if (!strcmp(fn, "get_time") && a >= 10) {
            time_calls++;
            assert_true(cJSON_IsObject(args));
        } else if (strcmp(fn, "get_weather") || !cJSON_IsString(city) ||
                   strlen(city->valuestring) > 48) {
            fail_msg("not a call of the parameters: %s", out);
        }
        cJSON_Delete(args);
        cJSON_Delete(o);
        free(r);
        job_release(j);
        calls++;
    }
    printf("tools: %d of 20 sampled answers under a named or required tool_choice ended, all "
           "calls (%d of get_time)\n",
           calls, time_calls);
    assert_true(calls > 0);

    /* tool_choice auto: a call is constrained from its tag on (a lazy
     * grammar); before the tag and after the call, any token */
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &g, &shape, err, sizeof(err)), 0);
    assert_true(!g->json && g->schema);
    cake_json_grammar *lazy =
        cake_json_grammar_new_lazy(v, json_schema_root(g->schema), "<tool_call>", IM_END, -1);
    int allowed;
#define MASK()                                                                                     \
    do {                                                                                           \
        for (int i = 0; i < CHAT_VOCAB; i++) logits[i] = 0;                                        \
        cake_json_grammar_mask(lazy, logits, CHAT_VOCAB);                                          \
        allowed = 0;                                                                               \
        for (int i = 0; i < CHAT_VOCAB; i++) allowed += logits[i] == 0;                            \
    } while (0)
#define FEED(str)                                                                                  \
    for (const char *q = str; *q; q++) cake_json_grammar_accept(lazy, (unsigned char)*q)
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    FEED("Sure <tool_call");
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB); /* ('>' starts an empty call: it may go on) */
    FEED(">");
    MASK(); /* a call: white space or '{', not the end of the turn */
    assert_true(logits['{'] == 0 && logits['\n'] == 0 && isinf(logits['a']) &&
                isinf(logits[IM_END]));
    FEED("\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call");
    MASK();
    assert_true(logits['>'] == 0 && isinf(logits['x']) && isinf(logits[IM_END]));
    FEED(">");
    MASK(); /* free again */
    assert_int_equal(allowed, CHAT_VOCAB);
    cake_json_grammar_free(lazy);
    /* the tag as one token, and what the token has after it */
    lazy = cake_json_grammar_new_lazy(v, json_schema_root(g->schema), "<tool_call>", IM_END, -1);
    cake_json_grammar_accept(lazy, CALL);
    MASK();
    assert_true(logits['{'] == 0 && isinf(logits['a']));
    cake_json_grammar_free(lazy);
    job_release(g);
    /* Llama 3: an answer that begins with '{' is a call (and then ends) */
    m.chat = CHAT_LLAMA3;
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &g, &shape, err, sizeof(err)), 0);
    lazy = cake_json_grammar_new_lazy(v, json_schema_root(g->schema), "", EOT, -1);
    FEED(" ");
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    FEED("{");
    MASK();
    assert_true(logits['"'] == 0 && isinf(logits['a']) && isinf(logits[EOT]));
    FEED("\"name\": \"get_time\", \"parameters\": {}}");
    MASK();
    assert_true(logits[EOT] == 0 && allowed == 1);
    cake_json_grammar_free(lazy);
    lazy = cake_json_grammar_new_lazy(v, json_schema_root(g->schema), "", EOT, -1);
    FEED("Hi {"); /* (text first: free for good) */
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    cake_json_grammar_free(lazy);
    job_release(g);
    /* Mistral's [TOOL_CALLS], a control token, read as its text in the
     * grammar's vocabulary (cake_json_vocab_new_keeping, as cake serve
     * builds it for tool requests): required, the answer opens with it,
     * then a list of one call, then EOS; the plain vocabulary cannot */
    m.chat = CHAT_MISTRAL_V3;
    const cake_token kept_id = TOOL_CALLS;
    const char *const kept_text = "[TOOL_CALLS]";
    cake_json_vocab *kept = cake_json_vocab_new_keeping(t, &kept_id, &kept_text, 1);
    assert_int_equal(api_parse(required, strlen(required), 1, &m, &g, &shape, err, sizeof(err)), 0);
    assert_true(g->json && g->schema);
    lazy = cake_json_grammar_new(v, json_schema_root(g->schema), EOT, -1);
    MASK();
    assert_true(isinf(logits[TOOL_CALLS]));
    cake_json_grammar_free(lazy);
    lazy = cake_json_grammar_new(kept, json_schema_root(g->schema), EOT, -1);
    MASK();
    assert_true(logits[TOOL_CALLS] == 0 && isinf(logits['{']) && isinf(logits[EOT]));
    cake_json_grammar_accept(lazy, TOOL_CALLS);
    MASK();
    assert_true(logits[' '] == 0 && logits['['] == 0 && isinf(logits['{']));
    FEED(" [{\"name\": \"get_time\", \"arguments\": {}}");
    MASK(); /* one call */
    assert_true(logits[']'] == 0 && isinf(logits[',']) && isinf(logits[EOT]));
    FEED("]");
    MASK();
    assert_true(logits[EOT] == 0 && allowed == 1);
    cake_json_grammar_free(lazy);
    job_release(g);
    /* auto: free text until the tag, then a list of calls */
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &g, &shape, err, sizeof(err)), 0);
    lazy = cake_json_grammar_new_lazy(kept, json_schema_root(g->schema), "[TOOL_CALLS]", EOT, -1);
    FEED("Hi ");
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    cake_json_grammar_accept(lazy, TOOL_CALLS);
    MASK();
    assert_true(logits['['] == 0 && isinf(logits['{']) && isinf(logits[EOT]));
    FEED("[{\"name\": \"get_time\", \"arguments\": {}}");
    MASK(); /* more calls may follow */
    assert_true(logits[']'] == 0 && logits[','] == 0 && isinf(logits[EOT]));
    FEED("]");
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    cake_json_grammar_free(lazy);
    job_release(g);
    cake_json_vocab_free(kept);
    /* Ministral 3's (v13) [TOOL_CALLS]name[ARGS]{...}, both tags control
     * tokens read as their text: required opens with the tag, then a
     * function's name, [ARGS], and that function's arguments (a city of at
     * most 12 characters for get_weather), then the end */
    m.chat = CHAT_MISTRAL_V13;
    const cake_token tag_ids[] = {TOOL_CALLS, ARGS};
    const char *const tag_texts[] = {"[TOOL_CALLS]", "[ARGS]"};
    kept = cake_json_vocab_new_keeping(t, tag_ids, tag_texts, 2);
    assert_int_equal(api_parse(required, strlen(required), 1, &m, &g, &shape, err, sizeof(err)), 0);
    lazy = cake_json_grammar_new(kept, json_schema_root(g->schema), EOT, -1);
    MASK();
    assert_true(logits[TOOL_CALLS] == 0 && isinf(logits[ARGS]) && isinf(logits['{']));
    cake_json_grammar_accept(lazy, TOOL_CALLS);
    MASK();
    assert_true(logits['g'] == 0 && isinf(logits['{']) && isinf(logits[ARGS]) &&
                isinf(logits[EOT]));
    FEED("get_");
    MASK();
    assert_true(logits['w'] == 0 && logits['t'] == 0 && isinf(logits['x']));
    FEED("weather");
    MASK();
    assert_true(logits[ARGS] == 0 && isinf(logits['{']) && isinf(logits[EOT]));
    cake_json_grammar_accept(lazy, ARGS);
    MASK();
    assert_true(logits['{'] == 0 && isinf(logits[TOOL_CALLS]) && isinf(logits[EOT]));
    FEED("{\"city\": \"Saint-Etienne");
    MASK(); /* (12 characters) */
    assert_true(logits['"'] == 0 && isinf(logits['x']));
    FEED("\"}");
    MASK();
    assert_true(logits[EOT] == 0 && allowed == 1);
    cake_json_grammar_free(lazy);
    lazy = cake_json_grammar_new(kept, json_schema_root(g->schema), EOT, -1);
    cake_json_grammar_accept(lazy, TOOL_CALLS);
    FEED("get_time");
    cake_json_grammar_accept(lazy, ARGS);
    FEED("{}");
    MASK(); /* (a function without parameters: any object) */
    assert_true(logits[EOT] == 0 && allowed == 1);
    cake_json_grammar_free(lazy);
    job_release(g);
    /* auto: free text, then after each tag a call, then free text again */
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &g, &shape, err, sizeof(err)), 0);
    lazy = cake_json_grammar_new_lazy(kept, json_schema_root(g->schema), "[TOOL_CALLS]", EOT, -1);
    FEED("Let me see.");
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    cake_json_grammar_accept(lazy, TOOL_CALLS);
    MASK();
    assert_true(isinf(logits[EOT]) && isinf(logits['{']) && logits['g'] == 0);
    FEED("get_time[ARGS]{}");
    MASK();
    assert_int_equal(allowed, CHAT_VOCAB);
    cake_json_grammar_accept(lazy, TOOL_CALLS);
    MASK();
    assert_true(isinf(logits[EOT]) && logits['g'] == 0);
    cake_json_grammar_free(lazy);
    job_release(g);
    cake_json_vocab_free(kept);
    m.chat = CHAT_CHATML;
#undef MASK
#undef FEED
    cake_json_vocab_free(v);

    /* tags inside a call's strings are text */
    j = answered(body, &m, &shape,
                 "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": "
                 "\"</tool_call>\"}}</tool_call>");
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    args = cJSON_Parse(str_at(o, "choices.0.message.tool_calls.0.function.arguments"));
    assert_string_equal(str_at(args, "city"), "</tool_call>");
    cJSON_Delete(args);
    cJSON_Delete(o);
    free(r);
    job_release(j);

    /* a conversation with a call and its result */
    const char *conv = "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris?\"},{\"role\":"
                       "\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_1\","
                       "\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
                       "\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},{\"role\":\"tool\","
                       "\"tool_call_id\":\"call_1\",\"content\":\"sunny\"}]," TOOLS "}";
    j = answered(conv, &m, &shape, "It is sunny.");
    p = prompt_text(j, t); /* (without the control tokens; the tags are tokens too) */
    assert_non_null(strstr(p, "assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                              "{\"city\": \"Paris\"}}\n</tool_call>\nuser\n<tool_response>\nsunny\n"
                              "</tool_response>\nassistant\n"));
    int tags = 0;
    for (int i = 0; i < j->n_prompt; i++) tags += j->prompt[i] == CALL || j->prompt[i] == CALL_END;
    assert_int_equal(tags, 6); /* the instructions' four, the call's two */
    free(p);
    job_release(j);

    static const struct {
        int chat;
        const char *body, *says;
    } bad[] = {
        {0, "{\"prompt\":\"x\"," TOOLS "}", "/v1/chat/completions"},
        {1, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tool_choice\":\"required\"}",
         "give 'tools'"},
        {1,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]," TOOLS
         ",\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"nope\"}}}",
         "'nope'"},
        {1,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":"
         "\"function\",\"function\":{\"name\":\"a b\"}}]}",
         "tool 0"},
        {1,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]," TOOLS
         ",\"tool_choice\":\"required\",\"response_format\":{\"type\":\"json_object\"}}",
         "give one of them"},
        {1,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]," TOOLS
         ",\"json_schema\":{\"type\":\"object\"}}",
         "give one of them"},
        {1,
         "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":"
         "\"f\",\"arguments\":\"{x\"}}]}]}",
         "not a JSON object"},
    };
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        serve_job *none = NULL;
        err[0] = '\0';
        assert_int_equal(api_parse(bad[k].body, strlen(bad[k].body), bad[k].chat, &m, &none, &shape,
                                   err, sizeof(err)),
                         -1);
        assert_null(none);
        if (!strstr(err, bad[k].says)) fail_msg("%s: '%s'", bad[k].body, err);
    }
    m.chat = CHAT_MISTRAL;
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &j, &shape, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "chat format with tools"));
    cake_tokenizer_free(t);
#undef TOOLS
}

/* Fill in the middle (a completion's suffix, as code editors send it), on
 * the tiny model given Qwen2.5-Coder's FIM tokens: the answer is the one
 * of the prompt [BOS] <|fim_prefix|> prefix <|fim_suffix|> suffix
 * <|fim_middle|> sent as token ids, as llama.cpp's infill builds it; a
 * model without them answers 400. */
static void test_fill_in_middle(void **state) {
    (void)state;
    static const char *const specials[] = {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                                           "<|fim_pad|>", NULL};
    char path[64];
    tiny_variant(&(test_model_variant){.special_tokens = specials}, path);
    t_server s;
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    cJSON *fim = post_ok(s.port, "/v1/completions",
                         "{\"prompt\":\"def area(r):\",\"suffix\":\"return a\",\"max_tokens\":8,"
                         "\"temperature\":0,\"ignore_eos\":true}");
    cJSON *pre = post_ok(s.port, "/tokenize", "{\"prompt\":\"def area(r):\"}"),
          *suf = post_ok(s.port, "/tokenize", "{\"prompt\":\"return a\"}");
    const int n_vocab = 32000; /* (the specials are the vocabulary's last tokens) */
    char ids[1024] = "";
    const cJSON *p = at(pre, "tokens"), *q = at(suf, "tokens");
    /* BOS, prefix, then the suffix (its own BOS left out) */
    add_ids(ids, sizeof(ids), p, 0, 1);
    snprintf(ids + strlen(ids), sizeof(ids) - strlen(ids), ",%d", n_vocab - 4);
    add_ids(ids, sizeof(ids), p, 1, cJSON_GetArraySize(p));
    snprintf(ids + strlen(ids), sizeof(ids) - strlen(ids), ",%d", n_vocab - 3);
    add_ids(ids, sizeof(ids), q, 1, cJSON_GetArraySize(q));
    snprintf(ids + strlen(ids), sizeof(ids) - strlen(ids), ",%d", n_vocab - 2);
    cJSON *same =
        post_ok(s.port, "/v1/completions",
                "{\"prompt\":[%s],\"max_tokens\":8,\"temperature\":0,\"ignore_eos\":true}", ids);
    assert_same_ids(at(fim, "cake.generated_ids"), at(same, "cake.generated_ids"));
    assert_int_equal(num_at(fim, "usage.prompt_tokens"), num_at(same, "usage.prompt_tokens"));
    assert_string_equal(str_at(fim, "choices.0.text"), str_at(same, "choices.0.text"));
    /* <|fim_pad|> ends a middle, also with a request's 16 stop_token_ids
     * (made the likeliest token by a bias) */
    cJSON *pad = post_ok(s.port, "/v1/completions",
                         "{\"prompt\":\"def\",\"suffix\":\"x\",\"max_tokens\":4,"
                         "\"logit_bias\":{\"%d\":100},\"stop_token_ids\":[3,4,5,6,7,8,9,10,11,"
                         "12,13,14,15,16,17,18]}",
                         n_vocab - 1);
    assert_string_equal(str_at(pad, "choices.0.finish_reason"), "stop");
    assert_int_equal(cJSON_GetArraySize(at(pad, "cake.generated_ids")), 1);
    cJSON_Delete(pad);
    t_resp r = http(s.port, "POST", "/v1/completions",
                    "{\"prompt\":[1,2],\"suffix\":\"x\",\"max_tokens\":2}");
    assert_int_equal(r.status, 400);
    assert_non_null(strstr(r.body, "one 'prompt' string"));
    resp_free(&r);
    cJSON_Delete(same);
    cJSON_Delete(pre);
    cJSON_Delete(suf);
    cJSON_Delete(fim);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
    /* the plain tiny model has no FIM tokens */
    assert_int_equal(serve_start(&s, g_tiny, "--store", "none", NULL), 0);
    r = http(s.port, "POST", "/v1/completions", "{\"prompt\":\"a\",\"suffix\":\"b\"}");
    assert_int_equal(r.status, 400);
    assert_non_null(strstr(r.body, "no prefix, suffix and middle tokens"));
    resp_free(&r);
    assert_int_equal(serve_stop(&s), 0);
}

/* A Mistral format's tool calls through the real server, on the tiny model
 * given template tmpl and specials (control tokens: the last ids;
 * specials[tool_calls_at] is [TOOL_CALLS]): a tool request's answer prints
 * its tags, and its grammar reads them as that text, so that an answer that
 * opens with [TOOL_CALLS] (a logit bias makes sure) shows it, and when it
 * ends reads as a call, with an id of 9 letters or digits that the
 * conversation's next turn takes back. */
static void served_mistral_calls(const char *name, const char *tmpl, const char *const *specials,
                                 int tool_calls_at) {
    char path[64];
    t_server s;
    tiny_variant(&(test_model_variant){.chat_template = tmpl, .special_tokens = specials}, path);
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    int n_specials = 0;
    while (specials[n_specials]) n_specials++;
    const int tool_calls_id = 32000 - n_specials + tool_calls_at;
#define NOW_TOOL                                                                                   \
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"now\",\"parameters\":{\"type\":"   \
    "\"object\",\"properties\":{},\"additionalProperties\":false}}}]"
    int mistral_calls = 0;
    for (int seed = 0; seed < 6; seed++) {
        const int stream = seed == 5;
        char body[1024];
        snprintf(body, sizeof(body),
                 "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]," NOW_TOOL
                 ",\"tool_choice\":\"required\",\"logit_bias\":{\"%d\":100},\"max_tokens\":200,"
                 "\"seed\":%d,\"stream\":%s,\"logprobs\":%s}",
                 tool_calls_id, seed, stream ? "true" : "false", seed ? "false" : "true");
        t_resp r = http(s.port, "POST", "/v1/chat/completions", body);
        assert_int_equal(r.status, 200);
        cJSON *ev[512];
        const int n_ev = answer_objects(&r, stream, ev, 512);
        const char *id = NULL, *fin = NULL, *content = NULL;
        if (!seed) { /* (the tag as the answer prints it, not "") */
            cJSON *o = cJSON_Parse(r.body);
            assert_string_equal(str_at(o, "choices.0.logprobs.content.0.token"), "[TOOL_CALLS]");
            cJSON_Delete(o);
        }
        for (int e = 0; e < n_ev; e++) {
            const char *where = stream ? "choices.0.delta" : "choices.0.message";
            char path_of[64];
            snprintf(path_of, sizeof(path_of), "%s.tool_calls.0", where);
            const cJSON *call = maybe_at(ev[e], path_of);
            if (call) {
                assert_string_equal(str_at(call, "function.name"), "now");
                assert_string_equal(str_at(call, "function.arguments"), "{}");
                id = str_at(call, "id");
            }
            snprintf(path_of, sizeof(path_of), "%s.content", where);
            const cJSON *text = maybe_at(ev[e], path_of);
            if (!content && cJSON_IsString(text) && text->valuestring[0])
                content = text->valuestring;
            const cJSON *fr = maybe_at(ev[e], "choices.0.finish_reason");
            if (cJSON_IsString(fr)) fin = fr->valuestring;
        }
        assert_non_null(fin);
        if (!strcmp(fin, "tool_calls")) {
            assert_non_null(id);
            assert_int_equal(strlen(id), 9);
            mistral_calls++;
            char next[1024];
            snprintf(next, sizeof(next),
                     "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":"
                     "\"assistant\",\"tool_calls\":[{\"id\":\"%s\",\"type\":\"function\","
                     "\"function\":{\"name\":\"now\",\"arguments\":\"{}\"}}]},{\"role\":"
                     "\"tool\",\"tool_call_id\":\"%s\",\"content\":\"noon\"}]," NOW_TOOL
                     ",\"max_tokens\":4}",
                     id, id);
            cJSON_Delete(post_ok(s.port, "/v1/chat/completions", "%s", next));
        } else if (!content || strncmp(content, "[TOOL_CALLS]", 12)) { /* (cut short) */
            fail_msg("seed %d: %s without the tag: %s", seed, fin, r.body);
        }
        for (int e = 0; e < n_ev; e++) cJSON_Delete(ev[e]);
        resp_free(&r);
    }
    printf("tools served (Mistral %s): %d of 6 sampled answers under tool_choice required were "
           "calls\n",
           name, mistral_calls);
    assert_true(mistral_calls > 0);
#undef NOW_TOOL
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
}

/* Tools through the real server, on the tiny model made ChatML (two of
 * its tokens become <|im_start|> and <|im_end|>): a named tool_choice's
 * sampled answers that end are calls of the function, whole and streamed. */
static void test_tools_served(void **state) {
    (void)state;
    static const char *const specials[] = {"<|im_start|>", "<|im_end|>", NULL};
    char path[64];
    tiny_variant(&(test_model_variant){.chat_template = "{{ '<|im_start|>' + role }}",
                                       .special_tokens = specials},
                 path);
    t_server s;
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
#define TOOL_REQUEST                                                                               \
    "{\"messages\":[{\"role\":\"user\",\"content\":\"Weather in Paris?\"}],\"tools\":[{\"type\":"  \
    "\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\","     \
    "\"properties\":{\"city\":{\"type\":\"string\",\"maxLength\":8}},\"required\":[\"city\"]}}}]," \
    "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}},"             \
    "\"max_tokens\":160,\"temperature\":0.7,\"seed\":%d,\"stream\":%s}"
    int calls = 0;
    for (int seed = 0; seed < 6; seed++) {
        const int stream = seed % 2;
        char body[1024];
        snprintf(body, sizeof(body), TOOL_REQUEST, seed, stream ? "true" : "false");
        t_resp r = http(s.port, "POST", "/v1/chat/completions", body);
        assert_int_equal(r.status, 200);
        const char *name = NULL, *args = NULL, *finish = NULL;
        cJSON *ev[512];
        const int n_ev = answer_objects(&r, stream, ev, 512);
        for (int e = 0; e < n_ev; e++) {
            const char *where =
                stream ? "choices.0.delta.tool_calls.0" : "choices.0.message.tool_calls.0";
            const cJSON *call = maybe_at(ev[e], where);
            char fn[96], ar[96];
            snprintf(fn, sizeof(fn), "%s.function.name", where);
            snprintf(ar, sizeof(ar), "%s.function.arguments", where);
            if (call) name = str_at(ev[e], fn), args = str_at(ev[e], ar);
            const cJSON *fr = maybe_at(ev[e], "choices.0.finish_reason");
            if (cJSON_IsString(fr)) finish = fr->valuestring;
        }
        assert_non_null(finish);
        if (!strcmp(finish, "tool_calls")) {
            assert_string_equal(name, "get_weather");
            cJSON *a = cJSON_Parse(args);
            const cJSON *city = cJSON_GetObjectItemCaseSensitive(a, "city");
            if (!cJSON_IsString(city)) fail_msg("arguments %s", args);
            cJSON_Delete(a);
            calls++;
        } else {
            assert_string_equal(finish, "length");
        }
        for (int e = 0; e < n_ev; e++) cJSON_Delete(ev[e]);
        resp_free(&r);
    }
    printf("tools served: %d of 6 sampled answers under a named tool_choice were calls\n", calls);
    assert_true(calls > 0);
    /* auto: the model's choice (a call is constrained from its tag on) */
    cJSON *a = post_ok(s.port, "/v1/chat/completions",
                       "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"tools\":[{"
                       "\"type\":\"function\",\"function\":{\"name\":\"f\"}}],\"max_tokens\":24,"
                       "\"seed\":1}");
    const char *finish = str_at(a, "choices.0.finish_reason");
    assert_true(!strcmp(finish, "stop") || !strcmp(finish, "length") ||
                !strcmp(finish, "tool_calls"));
    cJSON_Delete(a);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);

    /* Mistral 7B v0.3's format, its markers control tokens (which print
     * nothing): a tool request's answer prints [TOOL_CALLS] and its grammar
     * reads it as that text */
    static const char *const mistral[] = {"[INST]",
                                          "[/INST]",
                                          "[TOOL_CALLS]",
                                          "[AVAILABLE_TOOLS]",
                                          "[/AVAILABLE_TOOLS]",
                                          "[TOOL_RESULTS]",
                                          "[/TOOL_RESULTS]",
                                          NULL};
    served_mistral_calls(
        "v0.3", "{{- \"[AVAILABLE_TOOLS] [\" }}{{- \"[INST] \" + m + \"[/INST]\" }}", mistral, 2);
    /* Ministral 3's (v13): [TOOL_CALLS]name[ARGS]{...}, [ARGS] a control
     * token too */
    static const char *const v13[] = {
        "[INST]", "[/INST]",           "[SYSTEM_PROMPT]",    "[/SYSTEM_PROMPT]", "[TOOL_CALLS]",
        "[ARGS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",   "[/TOOL_RESULTS]",
        NULL};
    served_mistral_calls("v13",
                         "{{- '[SYSTEM_PROMPT]' + s }}{{- '[INST]' + u + '[/INST]' }}{{- "
                         "'[TOOL_CALLS]' + name + '[ARGS]' + arguments }}",
                         v13, 4);
#undef TOOL_REQUEST
}

/* A stream of job j's answer, made of pieces (NULL-ended) then finished:
 * what api_next_piece sends as reasoning and as content (128 bytes each). */
static void stream_pieces(serve_job *j, const char *const *pieces, char *reasoning, char *content) {
    reasoning[0] = content[0] = '\0';
    size_t sent = 0, from, to;
    for (size_t k = 0;; k++) {
        if (pieces[k]) {
            job_add_text(j, pieces[k], strlen(pieces[k]));
        } else {
            job_settle(j, NULL);
            job_finish(j);
        }
        for (int kind; (kind = api_next_piece(j, sent, &from, &to)); sent = to)
            strncat(kind == 1 ? reasoning : content, j->text + from, to - from);
        if (!pieces[k]) break;
    }
}

/* A thinking model's chat (its vocabulary has <think>): the reasoning an
 * answer opens with comes back as reasoning_content, whole and streamed
 * (the tags never), before the content and the tool calls. */
static void test_reasoning(void **state) {
    (void)state;
    cake_tokenizer *t = chat_vocab();
    api_model m = {
        .tok = t, .n_vocab = CHAT_VOCAB, .n_ctx = 8192, .chat = CHAT_CHATML, .name = "t"};
    const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":\"Weather?\"}]}";
    api_shape shape;
    serve_job *j = answered(body, &m, &shape, "<think>\nIt is Paris.\n</think>\n\nSunny.");
    char *r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    cJSON *o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.reasoning_content"), "It is Paris.");
    assert_string_equal(str_at(o, "choices.0.message.content"), "Sunny.");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    j = answered(body, &m, &shape, "Sunny. <think>no</think>"); /* (not at the start: text) */
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_null(maybe_at(o, "choices.0.message.reasoning_content"));
    assert_string_equal(str_at(o, "choices.0.message.content"), "Sunny. <think>no</think>");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    /* with a call after the reasoning */
    const char *tools = "{\"messages\":[{\"role\":\"user\",\"content\":\"Weather?\"}],\"tools\":"
                        "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]}";
    j = answered(tools, &m, &shape,
                 "<think>A call.</think>\n<tool_call>\n{\"name\": \"f\", \"arguments\": "
                 "{}}\n</tool_call>");
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.reasoning_content"), "A call.");
    assert_true(cJSON_IsNull(at(o, "choices.0.message.content")));
    assert_string_equal(str_at(o, "choices.0.message.tool_calls.0.function.name"), "f");
    assert_string_equal(str_at(o, "choices.0.finish_reason"), "tool_calls");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    /* streamed, piece by piece: the tags held back and skipped */
    static const char *pieces[] = {"<thi",        "nk>\nIt is", " Paris.\n</th",
                                   "ink>\n\nSun", "ny.",        NULL};
    char err[256], reasoning[128], content[128];
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &j, &shape, err, sizeof(err)), 0);
    stream_pieces(j, pieces, reasoning, content);
    assert_string_equal(reasoning, "\nIt is Paris.\n");
    assert_string_equal(content, "Sunny.");
    job_release(j);
    /* told not to think (vLLM's chat_template_kwargs, Qwen 3's switch): the
     * answer opens with an empty reasoning, as Qwen 3's template writes it */
    const char *off = "{\"messages\":[{\"role\":\"user\",\"content\":\"Weather?\"}],"
                      "\"chat_template_kwargs\":{\"enable_thinking\":false}}";
    assert_int_equal(api_parse(off, strlen(off), 1, &m, &j, &shape, err, sizeof(err)), 0);
    const cake_token tail[] = {IM_START, 'a',  's',   's',  'i',  's',       't',  'a', 'n',
                               't',      '\n', THINK, '\n', '\n', THINK_END, '\n', '\n'};
    const int k = (int)(sizeof(tail) / sizeof(tail[0]));
    assert_true(j->n_prompt > k);
    assert_memory_equal(j->prompt + j->n_prompt - k, tail, sizeof(tail));
    job_release(j);

    /* A template that opens the answer's <think> (DeepSeek-R1's distills,
     * QwQ): the prompt ends "<think>\n" and the answer begins inside the
     * reasoning, whole and streamed; one cut before </think> is all
     * reasoning; an earlier answer's reasoning is left out of the prompt */
    m.chat = CHAT_DEEPSEEK;
    m.open_thinking = 1;
    const char *conv = "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":"
                       "\"assistant\",\"content\":\"<think>x</think>Hello.\"},{\"role\":\"user\","
                       "\"content\":\"Weather?\"}]}";
    j = answered(conv, &m, &shape, "It is Paris.\n</think>\n\nSunny.");
    assert_int_equal(j->reasoning, JOB_THINKING);
    const cake_token opened[] = {DS_USER, 'H', 'i', DS_ASSISTANT, 'H',          'e',   'l', 'l',
                                 'o',     '.', EOT, DS_USER,      'W',          'e',   'a', 't',
                                 'h',     'e', 'r', '?',          DS_ASSISTANT, THINK, '\n'};
    const int n_opened = (int)(sizeof(opened) / sizeof(opened[0]));
    assert_int_equal(j->n_prompt, n_opened + 1); /* (BOS first) */
    assert_memory_equal(j->prompt + 1, opened, sizeof(opened));
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.reasoning_content"), "It is Paris.");
    assert_string_equal(str_at(o, "choices.0.message.content"), "Sunny.");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    j = answered(conv, &m, &shape, "Still thinking");
    r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.reasoning_content"), "Still thinking");
    assert_string_equal(str_at(o, "choices.0.message.content"), "");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    static const char *opened_pieces[] = {"It is", " Paris.\n</th", "ink>\n\nSun", "ny.", NULL};
    assert_int_equal(api_parse(conv, strlen(conv), 1, &m, &j, &shape, err, sizeof(err)), 0);
    stream_pieces(j, opened_pieces, reasoning, content);
    assert_string_equal(reasoning, "It is Paris.\n");
    assert_string_equal(content, "Sunny.");
    job_release(j);
    /* without the template's opening: the model opens it, as before */
    m.open_thinking = 0;
    assert_int_equal(api_parse(conv, strlen(conv), 1, &m, &j, &shape, err, sizeof(err)), 0);
    assert_int_equal(j->reasoning, 1);
    assert_int_equal(j->prompt[j->n_prompt - 1], DS_ASSISTANT);
    job_release(j);
    cake_tokenizer_free(t);
}

/* Mistral's reasoning tags (Magistral, Ministral 3 Reasoning): [THINK] and
 * [/THINK], control tokens (the tiny model's last two, its template
 * Mistral's), read as <think> is, whole and streamed; served, the answer
 * prints them as their text (a logit bias opens it with [THINK]: the answer
 * [THINK][THINK] is all reasoning), and so do its logprobs. */
static void test_reasoning_brackets(void **state) {
    (void)state;
    static const char *const specials[] = {"[INST]", "[/INST]", "[THINK]", "[/THINK]", NULL};
    char path[64];
    tiny_variant(&(test_model_variant){.chat_template = "{{ '[INST] ' + m + ' [/INST]' }}",
                                       .special_tokens = specials},
                 path);
    cake_model *model = NULL;
    char err[256];
    assert_int_equal(cake_model_load(path, &model, err, sizeof(err)), 0);
    api_model m = {.tok = cake_model_tokenizer(model),
                   .n_vocab = cake_model_hparams(model)->n_vocab,
                   .n_ctx = 4096,
                   .chat = CHAT_MISTRAL_V1,
                   .name = "t"};
    const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":\"Weather?\"}]}";
    api_shape shape;
    serve_job *j = answered(body, &m, &shape, "[THINK]It is Paris.[/THINK]\nSunny.");
    assert_true(j->reasoning && j->think_brackets);
    char *r = api_response(&shape, &j, 1, "chatcmpl-1", 1, "t");
    cJSON *o = cJSON_Parse(r);
    assert_string_equal(str_at(o, "choices.0.message.reasoning_content"), "It is Paris.");
    assert_string_equal(str_at(o, "choices.0.message.content"), "Sunny.");
    cJSON_Delete(o);
    free(r);
    job_release(j);
    static const char *pieces[] = {"[TH", "INK]It is", " Paris.[/TH", "INK]Sun", "ny.", NULL};
    char reasoning[128], content[128];
    assert_int_equal(api_parse(body, strlen(body), 1, &m, &j, &shape, err, sizeof(err)), 0);
    stream_pieces(j, pieces, reasoning, content);
    assert_string_equal(reasoning, "It is Paris.");
    assert_string_equal(content, "Sunny.");
    job_release(j);
    cake_model_free(model);

    t_server s;
    assert_int_equal(serve_start(&s, path, "--store", "none", NULL), 0);
    char req[512];
    snprintf(req, sizeof(req),
             "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"logit_bias\":{\"%d\":100},"
             "\"max_tokens\":2,\"logprobs\":true}",
             32000 - 4 + 2);
    o = post_ok(s.port, "/v1/chat/completions", "%s", req);
    assert_string_equal(str_at(o, "choices.0.message.reasoning_content"), "[THINK]");
    assert_string_equal(str_at(o, "choices.0.logprobs.content.0.token"), "[THINK]");
    cJSON_Delete(o);
    assert_int_equal(serve_stop(&s), 0);
    unlink(path);
}

int main(void) {
    /* clang-format off */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_formats),
        cmocka_unit_test(test_chat_default_system),
        cmocka_unit_test(test_tools),
        cmocka_unit_test(test_tools_served),
        cmocka_unit_test(test_reasoning),
        cmocka_unit_test(test_reasoning_brackets),
        cmocka_unit_test(test_usage_errors),
        cmocka_unit_test(test_chat_template_option),
        cmocka_unit_test(test_api_key),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_answers_tiny),
        cmocka_unit_test(test_answers_stories260k),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_seeded_sampling),
        cmocka_unit_test(test_store_reuse),
        cmocka_unit_test(test_slow_first_token),
        cmocka_unit_test(test_request_timeout),
        cmocka_unit_test(test_slot_prefix),
        cmocka_unit_test(test_answer_stored),
        cmocka_unit_test(test_kv_q8_0_served),
        cmocka_unit_test(test_cache_salt),
        cmocka_unit_test(test_prefetch),
        cmocka_unit_test(test_cancel_and_queue),
        cmocka_unit_test(test_chat_llama2),
        cmocka_unit_test(test_batched_answers),
        cmocka_unit_test(test_shared_prefix),
        cmocka_unit_test(test_speed_hints),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_tokenize),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_echo),
        cmocka_unit_test(test_json_mode),
        cmocka_unit_test(test_json_schema),
        cmocka_unit_test(test_choices),
        cmocka_unit_test(test_prompt_list),
        cmocka_unit_test(test_fill_in_middle),
        cmocka_unit_test(test_stop_ids),
        cmocka_unit_test(test_cancel_prefill),
    };
    /* clang-format on */
    return cmocka_run_group_tests(tests, setup, teardown);
}
