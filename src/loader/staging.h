/* Staging buffers for fetched chunk blobs, kept from one request to the next.
 *
 * A request's I/O workers each fetch blobs into a buffer of one blob's size
 * (hundreds of MB for a 13B model's chunk of 512 tokens). Allocated per
 * request, those buffers cost page faults on every first touch and, on a GPU,
 * a copy through the driver's bounce buffers. Kept here instead, only the
 * first request pays, and an engine can supply its own allocator: the CUDA
 * backend's is pinned host memory, from which a blob goes to the GPU by DMA
 * straight from where the store wrote it. Thread-safe. */
#ifndef CAKE_LOADER_STAGING_H
#define CAKE_LOADER_STAGING_H

#include <stddef.h>

typedef struct cake_staging cake_staging;

/* alloc(size) returns memory aligned for O_DIRECT (4096 bytes) or NULL;
 * release(p) frees it. */
typedef struct {
    void *(*alloc)(size_t size);
    void (*release)(void *p);
} cake_staging_allocator;

/* A pool that keeps at most max_kept buffers; a NULL allocator means the
 * store's (cake_store_alloc_buffer). NULL when out of memory. */
cake_staging *cake_staging_new(const cake_staging_allocator *a, int max_kept);
/* Frees every kept buffer; buffers still out must not be given back after. */
void cake_staging_free(cake_staging *s);

/* A buffer of exactly size bytes: a kept one, else a new one (and the kept
 * ones of other sizes are freed). NULL when out of memory. */
void *cake_staging_take(cake_staging *s, size_t size);
/* Gives buf (of size bytes, from take) back to be kept, or freed when
 * max_kept are kept already; accepts NULL. */
void cake_staging_give(cake_staging *s, void *buf, size_t size);

#endif
