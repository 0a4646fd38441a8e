/* pool.c -- buffers of decoded chunks, the references readers hold on them,
 * and the per-chunk page counts that free a buffer once its pages are in
 * (struct rs_pool). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "private/zmem.h"
#include "private/engine_int.h"

/* A buffer of size bytes: one kept for reuse in list (*n of them), or a
 * new mapping. The pool keeps two lists: decoded chunks, and guest pages
 * assembled from several chunks (huge.c). */
uint8_t *pool_take(rs_engine *e, uint8_t **list, int *n, size_t size)
{
    void *p = NULL;

    pthread_mutex_lock(&e->pool.lock);
    if (*n > 0)
        p = list[--*n];
    pthread_mutex_unlock(&e->pool.lock);
    if (!p) {
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            p = NULL;
    }
    return p;
}

/* Give a buffer of pool_take back: kept for reuse while list has room. */
void pool_give(rs_engine *e, uint8_t **list, int *n, size_t size, uint8_t *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&e->pool.lock);
    if (*n < POOL_MAX) {
        list[(*n)++] = p;
        p = NULL;
    }
    pthread_mutex_unlock(&e->pool.lock);
    if (p)
        munmap(p, size);
}

uint8_t *chunk_alloc(rs_engine *e)
{
    return pool_take(e, e->pool.bufs, &e->pool.n, e->cfg.chunk_size);
}

void chunk_free(rs_engine *e, uint8_t *p)
{
    pool_give(e, e->pool.bufs, &e->pool.n, e->cfg.chunk_size, p);
}

/* Unmap the buffers kept for reuse (rs_engine_destroy). */
void pool_drain(rs_engine *e)
{
    while (e->pool.n > 0)
        munmap(e->pool.bufs[--e->pool.n], e->cfg.chunk_size);
    pthread_mutex_destroy(&e->pool.lock);
}

/* Take a reference on chunk c's decoded data: 0 when it was freed. */
int chunk_acquire(rs_engine *e, uint32_t c)
{
    _Atomic uint32_t *ref = &e->chunks[c].ref;
    uint32_t v = atomic_load(ref);

    do {
        if (v & REF_FREED)
            return 0;
    } while (!atomic_compare_exchange_weak(ref, &v, v + 1));
    return 1;
}

static void chunk_try_free(rs_engine *e, uint32_t c)
{
    uint32_t v = REF_RETIRED;

    /* The state first: C_READY is stored (release) after data and mapped
     * are set, and never changes again, so once it is read (acquire) they
     * are safe to read. Reading mapped first raced with the thread that
     * publishes the chunk. */
    if (atomic_load_explicit(&e->chunks[c].state, memory_order_acquire) != C_READY)
        return;
    if (e->chunks[c].mapped)
        return; /* the host cache's bytes: nothing of ours to free */
    if (atomic_compare_exchange_strong(&e->chunks[c].ref, &v, REF_RETIRED | REF_FREED)) {
        chunk_free(e, e->chunks[c].data);
        atomic_fetch_add(&e->st.chunks_released, 1);
    }
}

void chunk_release(rs_engine *e, uint32_t c)
{
    if (atomic_fetch_sub(&e->chunks[c].ref, 1) - 1 == REF_RETIRED)
        chunk_try_free(e, c);
}

/* Chunk c lost one guest page that needed it: when it was the last, the
 * chunk's decoded copy is no longer needed. */
static void chunk_page_settled(rs_engine *e, uint32_t c)
{
    if (atomic_fetch_sub(&e->left[c], 1) == 1) {
        uint32_t old = atomic_fetch_or(&e->chunks[c].ref, REF_RETIRED);

        if (!(old & REF_USERS))
            chunk_try_free(e, c);
    }
}

/* Guest page q is present or removed: a chunk whose every page is settled
 * is no longer needed. A huge page settles each chunk it spans, so a chunk
 * shared by several huge pages stays until the last of them is in. */
void settle_page(rs_engine *e, uint64_t q)
{
    uint32_t c, n, cs[e->sub];

    if (e->sub == 1) {
        c = chunk_of(e, q);
        if (c != NO_CHUNK && !bit_set(e->settled, q))
            chunk_page_settled(e, c);
        return;
    }
    n = page_chunks(e, q, cs);
    if (n == 0 || bit_set(e->settled, q))
        return;
    for (uint32_t i = 0; i < n; i++)
        chunk_page_settled(e, cs[i]);
}

/* Set bits of w (no popcnt instruction assumed: the build is generic x86-64). */
static uint32_t popcount64(uint64_t w)
{
    w -= (w >> 1) & 0x5555555555555555ull;
    w = (w & 0x3333333333333333ull) + ((w >> 2) & 0x3333333333333333ull);
    w = (w + (w >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (uint32_t)((w * 0x0101010101010101ull) >> 56);
}

/* Each chunk's non-zero pages inside the regions (counted once each): its
 * decoded copy is freed when all of them are settled. A huge guest page
 * counts once in every chunk it spans (page_chunks). With page tables,
 * a walk of the regions' pages; for the identity layout, a count of the
 * zero bitmaps' clear bits per chunk: setup stays proportional to the
 * chunk table, not to guest memory. */
void count_left(rs_engine *e)
{
    for (size_t i = 0; i < e->n_regions; i++) {
        uint64_t p0 = e->regions[i].offset / e->cfg.page_size;
        uint64_t p1 = p0 + e->regions[i].size / e->cfg.page_size;

        /* Regions may overlap in the file: count what earlier ones did not. */
        for (size_t j = 0; j < i && p0 < p1; j++) {
            uint64_t q0 = e->regions[j].offset / e->cfg.page_size;
            uint64_t q1 = q0 + e->regions[j].size / e->cfg.page_size;

            if (q0 <= p0 && p0 < q1)
                p0 = q1 < p1 ? q1 : p1;
            if (q0 < p1 && p1 <= q1)
                p1 = q0 > p0 ? q0 : p0;
        }
        if (e->sub > 1) {
            uint32_t cs[e->sub], n;

            for (uint64_t p = p0; p < p1; p++)
                if ((n = page_chunks(e, p, cs)) && !bit_set(e->settled, p))
                    for (uint32_t k = 0; k < n; k++)
                        atomic_fetch_add(&e->left[cs[k]], 1);
            continue;
        }
        if (e->page_chunk) {
            for (uint64_t p = p0; p < p1; p++)
                if (e->page_chunk[p] != NO_CHUNK && !bit_set(e->settled, p))
                    atomic_fetch_add(&e->left[e->page_chunk[p]], 1);
            continue;
        }
        for (uint64_t p = p0; p < p1;) {
            uint64_t c = p / e->slots, end = (c + 1) * e->slots < p1 ? (c + 1) * e->slots : p1;
            uint32_t n = 0;

            if (p % e->slots == 0 && end - p == e->slots && e->slots % 64 == 0) {
                const uint8_t *z = e->zero + c * e->bm_bytes;

                for (uint64_t b = 0; b < e->slots / 64; b++) {
                    uint64_t w;

                    memcpy(&w, z + b * 8, 8);
                    n += 64 - popcount64(w);
                }
            } else {
                for (uint64_t q = p; q < end; q++)
                    n += chunk_of(e, q) != NO_CHUNK;
            }
            /* No other thread yet: no locked add needed (one per chunk). */
            atomic_store_explicit(&e->left[c], atomic_load_explicit(&e->left[c], memory_order_relaxed) + n,
                                  memory_order_relaxed);
            p = end;
        }
    }
    if (e->page_chunk || e->sub > 1) /* used above to count each page once */
        memset((void *)e->settled, 0, (e->n_pages + 63) / 64 * sizeof(uint64_t));
}
