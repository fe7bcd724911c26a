/* Key index + recency list; see lru.h. Keys are already uniform hashes, so
 * their first 8 bytes are the bucket hash. */
#include "store/lru.h"

#include <stdlib.h>
#include <string.h>

static size_t bucket_of(const cake_lru *l, const cake_chunk_key *k) {
    uint64_t h;
    memcpy(&h, k->b, 8);
    return (size_t)(h & (l->n_buckets - 1));
}

int cake_lru_init(cake_lru *l) {
    memset(l, 0, sizeof(*l));
    l->n_buckets = 256;
    l->buckets = calloc(l->n_buckets, sizeof(*l->buckets));
    l->head.prev = l->head.next = &l->head;
    return l->buckets ? 0 : -1;
}

void cake_lru_free(cake_lru *l, void (*free_data)(void *)) {
    if (!l->buckets) return;
    for (cake_lru_node *n = l->head.next, *next; n != &l->head; n = next) {
        next = n->next;
        if (free_data && n->data) free_data(n->data);
        free(n);
    }
    free(l->buckets);
    memset(l, 0, sizeof(*l));
}

cake_lru_node *cake_lru_find(const cake_lru *l, const cake_chunk_key *k) {
    for (cake_lru_node *n = l->buckets[bucket_of(l, k)]; n; n = n->hnext)
        if (cake_key_equal(&n->key, k)) return n;
    return NULL;
}

static void grow(cake_lru *l) {
    size_t nb = l->n_buckets * 2;
    cake_lru_node **b = calloc(nb, sizeof(*b));
    if (!b) return; /* keep the longer chains: still correct */
    cake_lru_node **old = l->buckets;
    size_t old_n = l->n_buckets;
    l->buckets = b;
    l->n_buckets = nb;
    for (size_t i = 0; i < old_n; i++) {
        for (cake_lru_node *n = old[i], *next; n; n = next) {
            next = n->hnext;
            size_t j = bucket_of(l, &n->key);
            n->hnext = b[j];
            b[j] = n;
        }
    }
    free(old);
}

static void list_unlink(cake_lru_node *n) {
    n->prev->next = n->next;
    n->next->prev = n->prev;
}

static void list_after(cake_lru_node *at, cake_lru_node *n) {
    n->prev = at;
    n->next = at->next;
    at->next->prev = n;
    at->next = n;
}

cake_lru_node *cake_lru_insert(cake_lru *l, const cake_chunk_key *k, uint64_t size, int64_t stamp,
                               void *data) {
    cake_lru_node *n = calloc(1, sizeof(*n));
    if (!n) return NULL;
    if (l->n >= l->n_buckets) grow(l);
    n->key = *k;
    n->size = size;
    n->stamp = stamp;
    n->data = data;
    size_t j = bucket_of(l, k);
    n->hnext = l->buckets[j];
    l->buckets[j] = n;
    list_after(&l->head, n);
    l->n++;
    l->bytes += size;
    return n;
}

void cake_lru_touch(cake_lru *l, cake_lru_node *n) {
    list_unlink(n);
    list_after(&l->head, n);
}

void cake_lru_resize(cake_lru *l, cake_lru_node *n, uint64_t size) {
    l->bytes = l->bytes - n->size + size;
    n->size = size;
}

void cake_lru_remove(cake_lru *l, cake_lru_node *n) {
    cake_lru_node **pp = &l->buckets[bucket_of(l, &n->key)];
    while (*pp != n) pp = &(*pp)->hnext;
    *pp = n->hnext;
    list_unlink(n);
    l->n--;
    l->bytes -= n->size;
    free(n);
}

cake_lru_node *cake_lru_oldest(const cake_lru *l) {
    return l->head.prev == &l->head ? NULL : l->head.prev;
}
