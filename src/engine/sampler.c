/* Token sampling: greedy, temperature, top-p (nucleus), top-k and min-p,
 * with OpenAI's logit biases and frequency and presence penalties, the
 * repetition penalty of vLLM and llama.cpp, a
 * grammar's mask (constrain), and a seeded generator so that the same seed
 * and logits give the same tokens. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "cake.h"

struct cake_sampler {
    cake_sampler_params p;
    uint64_t rng;
    int cap; /* capacity of the two work arrays */
    float *prob;
    int *idx;
    cake_logit_bias *bias; /* the params' own copy */
    /* With penalties: how often each token was chosen, the tokens chosen
     * (each once); with penalties or biases, the logits they adjust (n_vocab
     * each). */
    int *count, *chosen, n_chosen;
    float *adjusted;
    /* With a repetition penalty: the prompt and the tokens chosen since
     * (n_history of cap_history), and per token the step that last
     * penalized it (so that a token repeated in the window is penalized
     * once). */
    cake_token *history;
    int n_history, cap_history;
    unsigned *stamp, step;
    cake_token *end_ids; /* the params' own copy (min_tokens) */
    int n_sampled;       /* tokens chosen so far */
};

static int repeats(const cake_sampler *s) {
    return s->p.repetition_penalty > 0.0f && s->p.repetition_penalty != 1.0f;
}

/* Appends t to the history; 0 when there is no room for it. */
static int remember(cake_sampler *s, cake_token t) {
    if (s->n_history == s->cap_history) {
        const int cap = s->cap_history ? 2 * s->cap_history : 64;
        cake_token *h = realloc(s->history, (size_t)cap * sizeof(*h));
        if (!h) return 0;
        s->history = h;
        s->cap_history = cap;
    }
    s->history[s->n_history++] = t;
    return 1;
}

/* splitmix64: small, fast, good enough for sampling, identical everywhere. */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float next_uniform(uint64_t *s) { /* [0, 1) */
    return (float)(next_u64(s) >> 40) * (1.0f / 16777216.0f);
}

cake_sampler *cake_sampler_init(cake_sampler_params p) {
    cake_sampler *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->p = p;
    s->rng = p.seed;
    if (p.n_logit_bias > 0) {
        if (!(s->bias = malloc((size_t)p.n_logit_bias * sizeof(*s->bias)))) {
            free(s);
            return NULL;
        }
        for (int i = 0; i < p.n_logit_bias; i++) s->bias[i] = p.logit_bias[i];
    }
    s->p.logit_bias = s->bias;
    if (repeats(s)) {
        /* (only the window's worth of the prompt is ever looked at) */
        int from = 0;
        if (p.repeat_last_n > 0 && p.n_prompt > p.repeat_last_n)
            from = p.n_prompt - p.repeat_last_n;
        for (int i = from; i < p.n_prompt; i++)
            if (!remember(s, p.prompt[i])) {
                cake_sampler_free(s);
                return NULL;
            }
    }
    s->p.prompt = NULL;
    s->p.n_prompt = 0;
    if (p.min_tokens > 0 && p.n_end_ids > 0) {
        if (!(s->end_ids = malloc((size_t)p.n_end_ids * sizeof(*s->end_ids)))) {
            cake_sampler_free(s);
            return NULL;
        }
        for (int i = 0; i < p.n_end_ids; i++) s->end_ids[i] = p.end_ids[i];
    }
    s->p.end_ids = s->end_ids;
    if (!s->end_ids) s->p.n_end_ids = 0;
    return s;
}

void cake_sampler_free(cake_sampler *s) {
    if (!s) return;
    free(s->prob);
    free(s->idx);
    free(s->count);
    free(s->chosen);
    free(s->adjusted);
    free(s->bias);
    free(s->history);
    free(s->stamp);
    free(s->end_ids);
    free(s);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static int by_prob_desc(const void *a, const void *b, void *ctx) {
    const float *prob = ctx;
    float pa = prob[*(const int *)a], pb = prob[*(const int *)b];
    if (pa != pb) return pa < pb ? 1 : -1;
    return *(const int *)a - *(const int *)b; /* stable order for equal probabilities */
}

/* Token a ranks before b: likelier, or as likely with a lower id. */
static bool before(const float *prob, int a, int b) {
    return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
}

/* Partitions idx[lo..hi) around a pivot (the median of three): those that
 * rank before it first, then it; returns where it lands. */
static int partition(int *idx, int lo, int hi, const float *prob) {
    const int mid = lo + (hi - lo) / 2, last = hi - 1;
    int a = idx[lo], b = idx[mid], c = idx[last], m = mid;
    if (before(prob, a, b) == before(prob, b, c))
        m = mid;
    else if (before(prob, b, a) == before(prob, a, c))
        m = lo;
    else
        m = last;
    const int pivot = idx[m];
    idx[m] = idx[last], idx[last] = pivot;
    int at = lo;
    for (int j = lo; j < last; j++)
        if (before(prob, idx[j], pivot)) {
            const int t = idx[at];
            idx[at++] = idx[j], idx[j] = t;
        }
    idx[last] = idx[at], idx[at] = pivot;
    return at;
}

/* Puts the k highest-ranked of idx[0..m) first, in no order (quickselect:
 * linear on average, where a sort of a large vocabulary takes milliseconds
 * a token). */
static void select_top(int *idx, int m, int k, const float *prob) {
    int lo = 0, hi = m;
    while (hi - lo > 1) {
        const int p = partition(idx, lo, hi, prob);
        if (p == k) return;
        if (p > k)
            hi = p;
        else
            lo = p + 1;
    }
}

/* The nucleus of idx[0..m): the fewest highest-ranked tokens whose mass
 * reaches top_p, put first (in no order but for the last few); returns how
 * many, *mass their mass (all of them when they do not reach it). */
static int select_nucleus(int *idx, int m, float top_p, const float *prob, float *mass) {
    int lo = 0, hi = m; /* [0, lo) are in it (mass acc); its end is in [lo, hi) */
    float acc = 0;
    while (hi - lo > 32) {
        const int p = partition(idx, lo, hi, prob);
        float upper = 0;
        for (int i = lo; i < p; i++) upper += prob[idx[i]];
        if (acc + upper >= top_p) {
            hi = p;
            continue;
        }
        acc += upper + prob[idx[p]];
        if (acc >= top_p) {
            *mass = acc;
            return p + 1;
        }
        lo = p + 1;
    }
    qsort_r(idx + lo, (size_t)(hi - lo), sizeof(int), by_prob_desc, (void *)prob);
    for (int i = lo; i < hi; i++) {
        acc += prob[idx[i]];
        if (acc >= top_p) {
            *mass = acc;
            return i + 1;
        }
    }
    *mass = acc;
    return hi;
}

static cake_token choose(cake_sampler *s, const float *logits, int n) {
    if (s->p.temperature <= 0.0f || n == 1) return argmax(logits, n);
    if (n > s->cap) {
        float *prob = realloc(s->prob, (size_t)n * sizeof(float));
        if (prob) s->prob = prob;
        int *idx = realloc(s->idx, (size_t)n * sizeof(int));
        if (idx) s->idx = idx;
        if (!prob || !idx) return argmax(logits, n); /* out of memory: degrade to greedy */
        s->cap = n;
    }
    float *prob = s->prob;
    const int best = argmax(logits, n);
    const float maxl = logits[best];
    double sum = 0;
    for (int i = 0; i < n; i++) {
        prob[i] = expf((logits[i] - maxl) / s->p.temperature);
        sum += prob[i];
    }
    for (int i = 0; i < n; i++) prob[i] = (float)(prob[i] / sum);

    const float r = next_uniform(&s->rng);
    const int nucleus = s->p.top_p > 0.0f && s->p.top_p < 1.0f;
    const int top_k = s->p.top_k > 0 && s->p.top_k < n ? s->p.top_k : 0;
    if (!nucleus && !top_k && s->p.min_p <= 0.0f) {
        float cdf = 0;
        for (int i = 0; i < n; i++) {
            cdf += prob[i];
            if (r < cdf) return i;
        }
        return n - 1; /* rounding */
    }

    /* The candidates, each filter on the tokens' own probabilities: those
     * at least min_p times the likeliest's probability, the top_k
     * likeliest, and the nucleus of those (the fewest likeliest tokens whose
     * mass reaches top_p). Tokens below (1 - top_p) / (n - 1) can never be
     * in the nucleus: they are left out first (the likeliest never is). */
    float cutoff = nucleus ? (1.0f - s->p.top_p) / (float)(n - 1) : 0.0f;
    if (s->p.min_p > 0.0f) cutoff = fmaxf(cutoff, s->p.min_p * prob[best]);
    cutoff = fminf(cutoff, prob[best]);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (prob[i] >= cutoff) s->idx[m++] = i;
    if (top_k && m > top_k) {
        select_top(s->idx, m, top_k, prob);
        m = top_k;
    }
    float mass = 0;
    if (nucleus) {
        m = select_nucleus(s->idx, m, s->p.top_p, prob, &mass);
    } else {
        for (int i = 0; i < m; i++) mass += prob[s->idx[i]];
    }
    /* (any order of the candidates draws each with its probability) */
    const float target = r * mass;
    float cdf = 0;
    for (int i = 0; i < m; i++) {
        cdf += prob[s->idx[i]];
        if (target < cdf) return s->idx[i];
    }
    return s->idx[m - 1];
}

/* min_tokens: the end ids' adjusted logits to -inf, unless nothing else
 * is left (a grammar that allows only the end: it ends). */
static void ban_ends(cake_sampler *s, int n) {
    float saved[64];
    int k = 0;
    for (; k < s->p.n_end_ids && k < 64; k++) {
        const cake_token t = s->p.end_ids[k];
        saved[k] = t >= 0 && t < n ? s->adjusted[t] : 0;
        if (t >= 0 && t < n) s->adjusted[t] = -INFINITY;
    }
    for (int i = 0; i < n; i++)
        if (s->adjusted[i] > -INFINITY) return;
    while (k-- > 0) /* (in reverse: an id twice gets its first value back) */
        if (s->p.end_ids[k] >= 0 && s->p.end_ids[k] < n) s->adjusted[s->p.end_ids[k]] = saved[k];
}

/* The logits with the biases and the penalties of the tokens chosen so
 * far, and the grammar's mask; NULL when there are none to apply, or no
 * memory for them (then they are not). */
static const float *adjust(cake_sampler *s, const float *logits, int n) {
    const int penalties = s->p.frequency_penalty != 0.0f || s->p.presence_penalty != 0.0f;
    const int repeat = repeats(s), too_soon = s->n_sampled < s->p.min_tokens && s->p.n_end_ids;
    if (!penalties && !repeat && !too_soon && !s->p.n_logit_bias && !s->p.constrain) return NULL;
    if (!s->adjusted) {
        s->adjusted = malloc((size_t)n * sizeof(*s->adjusted));
        if (penalties) {
            s->count = calloc((size_t)n, sizeof(*s->count));
            s->chosen = malloc((size_t)n * sizeof(*s->chosen));
        }
        if (repeat) s->stamp = calloc((size_t)n, sizeof(*s->stamp));
        if (!s->adjusted || (penalties && (!s->count || !s->chosen)) || (repeat && !s->stamp)) {
            free(s->adjusted);
            free(s->count);
            free(s->chosen);
            free(s->stamp);
            s->adjusted = NULL;
            s->count = s->chosen = NULL;
            s->stamp = NULL;
            return NULL;
        }
    }
    if (!s->p.n_logit_bias && !s->n_chosen && !s->n_history && !too_soon && !s->p.constrain)
        return NULL;
    for (int i = 0; i < n; i++) s->adjusted[i] = logits[i];
    for (int k = 0; k < s->p.n_logit_bias; k++)
        if (s->p.logit_bias[k].id >= 0 && s->p.logit_bias[k].id < n)
            s->adjusted[s->p.logit_bias[k].id] += s->p.logit_bias[k].bias;
    if (s->n_history) {
        /* each token in the window once (a fresh stamp per step; the stamps
         * start again from zero when the counter wraps) */
        if (++s->step == 0) {
            for (int i = 0; i < n; i++) s->stamp[i] = 0;
            s->step = 1;
        }
        const float r = s->p.repetition_penalty;
        int from = 0;
        if (s->p.repeat_last_n > 0 && s->n_history > s->p.repeat_last_n)
            from = s->n_history - s->p.repeat_last_n;
        for (int k = from; k < s->n_history; k++) {
            const int t = s->history[k];
            if (t < 0 || t >= n || s->stamp[t] == s->step) continue;
            s->stamp[t] = s->step;
            s->adjusted[t] = s->adjusted[t] > 0.0f ? s->adjusted[t] / r : s->adjusted[t] * r;
        }
    }
    for (int k = 0; k < s->n_chosen; k++) {
        const int t = s->chosen[k];
        s->adjusted[t] -= (float)s->count[t] * s->p.frequency_penalty + s->p.presence_penalty;
    }
    if (s->p.constrain) s->p.constrain(s->p.constrain_ud, s->adjusted, n);
    if (too_soon) ban_ends(s, n);
    return s->adjusted;
}

cake_token cake_sampler_sample(cake_sampler *s, const float *logits, int n) {
    const float *p = adjust(s, logits, n);
    const cake_token t = choose(s, p ? p : logits, n);
    if (s->count && t >= 0 && t < n && s->count[t]++ == 0) s->chosen[s->n_chosen++] = t;
    /* (out of memory: the token is left out of the window) */
    if (repeats(s)) remember(s, t);
    s->n_sampled++;
    if (s->p.accept) s->p.accept(s->p.constrain_ud, t);
    return t;
}
