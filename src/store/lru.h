/* An index of chunks by key with a recency list, for the capacity-bounded
 * backends (mem, file): find / insert / touch in O(1), the least recently
 * used entry in O(1), and the total bytes. Not thread-safe: the owner locks. */
#ifndef CAKE_STORE_LRU_H
#define CAKE_STORE_LRU_H

#include <stddef.h>
#include <stdint.h>

#include "store/key.h"

typedef struct cake_lru_node {
    cake_chunk_key key;
    uint64_t size;
    int64_t stamp;                     /* owner's recency stamp (e.g. unix seconds of last use) */
    void *data;                        /* owner's payload */
    struct cake_lru_node *prev, *next; /* recency list; head.next = most recent */
    struct cake_lru_node *hnext;       /* hash chain */
} cake_lru_node;

typedef struct {
    cake_lru_node **buckets;
    size_t n_buckets;   /* power of two */
    size_t n;           /* entries */
    uint64_t bytes;     /* sum of sizes */
    cake_lru_node head; /* sentinel of the recency list */
} cake_lru;

int cake_lru_init(cake_lru *l); /* 0 ok, -1 out of memory */
/* Frees every node (calling free_data on each node's data when not NULL). */
void cake_lru_free(cake_lru *l, void (*free_data)(void *));
cake_lru_node *cake_lru_find(const cake_lru *l, const cake_chunk_key *k);
/* Adds a new node (the key must be absent) as the most recent. NULL when out of memory. */
cake_lru_node *cake_lru_insert(cake_lru *l, const cake_chunk_key *k, uint64_t size, int64_t stamp,
                               void *data);
void cake_lru_touch(cake_lru *l, cake_lru_node *n); /* make most recent */
void cake_lru_resize(cake_lru *l, cake_lru_node *n, uint64_t size);
/* Unlinks n and frees the node (not its data). */
void cake_lru_remove(cake_lru *l, cake_lru_node *n);
cake_lru_node *cake_lru_oldest(const cake_lru *l); /* NULL when empty */

#endif
