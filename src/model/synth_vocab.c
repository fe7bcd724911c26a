/* Synthetic Llama-2-style vocabulary (see synth_vocab.h).
 *
 * SentencePiece BPE only reaches a piece if it can be built by merging two
 * adjacent pieces that are themselves in the vocabulary. Adding every prefix of
 * "▁word" guarantees that: whatever order the merges take, the piece that
 * starts at the "▁" can always absorb its right neighbour, since the result is
 * again a prefix of the word. Pieces never contain "▁" past their first
 * character, so merges never cross a word boundary. */
#include "model/synth_vocab.h"

#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"

#define SPACE     "\xe2\x96\x81" /* U+2581, SentencePiece's escaped space */
#define N_FIXED   259            /* <unk>, <s>, </s> and the 256 byte tokens */
#define N_SINGLE  95             /* "▁" and the printable ASCII characters but space */
#define MAX_VOCAB (1 << 22)

/* Common English words, most of them frequent in TinyStories-like text. */
static const char *const k_words[] = {
    "the",     "a",        "and",     "to",      "of",        "was",       "he",     "she",
    "it",      "in",       "you",     "that",    "is",        "his",       "her",    "they",
    "with",    "for",      "on",      "said",    "had",       "but",       "at",     "not",
    "be",      "as",       "i",       "we",      "this",      "have",      "were",   "all",
    "so",      "one",      "day",     "there",   "then",      "up",        "what",   "very",
    "time",    "once",     "upon",    "little",  "girl",      "boy",       "named",  "lily",
    "tim",     "ben",      "mom",     "dad",     "big",       "play",      "wanted", "saw",
    "happy",   "from",     "friend",  "friends", "could",     "would",     "out",    "do",
    "did",     "can",      "will",    "go",      "went",      "like",      "liked",  "loved",
    "love",    "see",      "get",     "got",     "make",      "made",      "are",    "him",
    "them",    "their",    "my",      "me",      "your",      "our",       "us",     "no",
    "yes",     "if",       "or",      "when",    "who",       "how",       "why",    "where",
    "which",   "by",       "an",      "about",   "into",      "over",      "after",  "before",
    "again",   "back",     "down",    "off",     "too",       "also",      "just",   "now",
    "new",     "old",      "good",    "bad",     "small",     "long",      "little", "park",
    "ball",    "red",      "blue",    "green",   "tree",      "house",     "home",   "dog",
    "cat",     "bird",     "sun",     "sky",     "water",     "toy",       "toys",   "car",
    "box",     "book",     "food",    "cake",    "fun",       "found",     "looked", "look",
    "came",    "come",     "ran",     "run",     "help",      "helped",    "know",   "knew",
    "think",   "thought",  "felt",    "feel",    "sad",       "scared",    "smiled", "laughed",
    "said",    "asked",    "told",    "tell",    "say",       "because",   "some",   "many",
    "more",    "most",     "other",   "each",    "every",     "first",     "last",   "next",
    "thing",   "things",   "way",     "world",   "people",    "man",       "woman",  "children",
    "child",   "mother",   "father",  "family",  "school",    "name",      "place",  "outside",
    "inside",  "together", "always",  "never",   "again",     "away",      "around", "high",
    "low",     "still",    "well",    "much",    "only",      "than",      "its",    "been",
    "has",     "these",    "those",   "any",     "two",       "three",     "year",   "years",
    "work",    "should",   "may",     "might",   "must",      "want",      "need",   "use",
    "used",    "find",     "give",    "gave",    "take",      "took",      "keep",   "kept",
    "let",     "put",      "try",     "tried",   "ask",       "turn",      "show",   "start",
    "started", "stop",     "open",    "close",   "walk",      "walked",    "talk",   "jump",
    "jumped",  "hug",      "share",   "shared",  "special",   "beautiful", "pretty", "nice",
    "kind",    "best",     "better",  "great",   "important", "learned",   "lesson", "moral",
    "story",   "end",      "hello",   "world",   "water",     "while",     "under",  "between",
    "through", "during",   "without", "again",
};

typedef struct {
    char **tok;     /* [n_vocab] */
    int n, cap;     /* filled, n_vocab */
    int32_t *slots; /* [mask + 1] index + 1, 0 = empty: the dedup set */
    uint32_t mask;
} builder;

static uint32_t hash_str(const char *s) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

/* Appends s unless it is already there or the vocabulary is full:
 * 1 added, 0 skipped, -1 out of memory. */
static int add(builder *b, const char *s) {
    if (b->n == b->cap) return 0;
    uint32_t h = hash_str(s) & b->mask;
    for (; b->slots[h]; h = (h + 1) & b->mask)
        if (strcmp(b->tok[b->slots[h] - 1], s) == 0) return 0;
    char *copy = strdup(s);
    if (!copy) return -1;
    b->tok[b->n] = copy;
    b->slots[h] = ++b->n;
    return 1;
}

/* Adds every prefix of SPACE + word that is at least one character past the
 * "▁", optionally with the first letter upper-cased. */
static int add_word(builder *b, const char *word, int capital) {
    char buf[64];
    size_t n = strlen(word);
    if (n + 4 > sizeof(buf)) return 0;
    memcpy(buf, SPACE, 3);
    memcpy(buf + 3, word, n + 1);
    if (capital && buf[3] >= 'a' && buf[3] <= 'z') buf[3] = (char)(buf[3] - 'a' + 'A');
    for (size_t k = 4; k <= n + 3; k++) {
        char c = buf[k];
        buf[k] = '\0';
        if (add(b, buf) < 0) return -1;
        buf[k] = c;
    }
    return 0;
}

int cake_synth_vocab_build(int n_vocab, char ***tokens, float **scores, int32_t **types) {
    *tokens = NULL;
    *scores = NULL;
    *types = NULL;
    if (n_vocab < N_FIXED + N_SINGLE || n_vocab > MAX_VOCAB) return -1;

    builder b = {.cap = n_vocab};
    uint32_t slots = 1;
    while (slots < 2u * (uint32_t)n_vocab) slots <<= 1;
    b.mask = slots - 1;
    b.tok = calloc((size_t)n_vocab, sizeof(*b.tok));
    b.slots = calloc(slots, sizeof(*b.slots));
    float *sc = malloc((size_t)n_vocab * sizeof(*sc));
    int32_t *ty = malloc((size_t)n_vocab * sizeof(*ty));
    if (!b.tok || !b.slots || !sc || !ty) goto fail;

    if (add(&b, "<unk>") < 0 || add(&b, "<s>") < 0 || add(&b, "</s>") < 0) goto fail;
    for (int i = 0; i < 256; i++) {
        static const char hex[] = "0123456789ABCDEF";
        char name[7] = {'<', '0', 'x', hex[i >> 4], hex[i & 15], '>', '\0'};
        if (add(&b, name) < 0) goto fail;
    }
    /* Single characters, so that ASCII text never needs byte fallback. */
    if (add(&b, SPACE) < 0) goto fail;
    for (int c = 0x21; c < 0x7f; c++) {
        char s[2] = {(char)c, '\0'};
        if (add(&b, s) < 0) goto fail;
    }
    for (size_t i = 0; i < sizeof(k_words) / sizeof(k_words[0]); i++)
        if (add_word(&b, k_words[i], 0) || add_word(&b, k_words[i], 1)) goto fail;
    /* Fill with lower-case strings of growing length, each alone and after "▁". */
    for (int len = 2; b.n < n_vocab; len++) {
        char s[3 + 8 + 1];
        int idx[8] = {0};
        for (;;) {
            memcpy(s, SPACE, 3);
            for (int k = 0; k < len; k++) s[3 + k] = (char)('a' + idx[k]);
            s[3 + len] = '\0';
            if (add(&b, s) < 0 || add(&b, s + 3) < 0) goto fail;
            if (b.n == n_vocab) break;
            int k = len - 1; /* next string in lexicographic order */
            while (k >= 0 && idx[k] == 25) idx[k--] = 0;
            if (k < 0) break;
            idx[k]++;
        }
    }

    for (int i = 0; i < n_vocab; i++) {
        if (i == 0)
            ty[i] = CAKE_TOKEN_UNKNOWN;
        else if (i < 3)
            ty[i] = CAKE_TOKEN_CONTROL;
        else if (i < N_FIXED)
            ty[i] = CAKE_TOKEN_BYTE;
        else
            ty[i] = CAKE_TOKEN_NORMAL;
        sc[i] = i < N_FIXED ? 0.0f : -(float)(i - N_FIXED + 1);
    }
    free(b.slots);
    *tokens = b.tok;
    *scores = sc;
    *types = ty;
    return 0;
fail:
    cake_synth_vocab_free(b.tok, sc, ty, n_vocab);
    free(b.slots);
    return -1;
}

void cake_synth_vocab_free(char **tokens, float *scores, int32_t *types, int n_vocab) {
    if (tokens)
        for (int i = 0; i < n_vocab; i++) free(tokens[i]);
    free(tokens);
    free(scores);
    free(types);
}
