/* huge.c -- guest pages larger than the snapshot's pages: 2 MiB hugetlbfs
 * pages, from chunks smaller than a huge page or from a page map that
 * scattered a huge page's 4 KiB pages over many chunks.
 *
 * hugetlbfs maps a huge page whole: one UFFDIO_COPY of all of it, from 2 MiB
 * of bytes. Those bytes are assembled from every chunk the page spans
 * (page_chunks), the zero pages between them as zeros. A fault asks for all
 * of its chunks at once and parks on the first that is not ready; each time
 * that one settles, the fault is looked at again (parking on the next if
 * need be), and the look that finds them all ready installs it. A chunk
 * that failed poisons the whole huge page: the guest gets SIGBUS, never a
 * page of partly wrong bytes. The chunks' decoded copies are kept until
 * every huge page needing them is settled: a huge page counts once in each
 * chunk it spans (count_left, settle_page). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "private/engine_int.h"

/* A buffer of one guest page (pool.c: a mapping, not malloc: it is 2 MiB,
 * and goes back to the system with the session). */
static uint8_t *buf_get(rs_engine *e)
{
    return pool_take(e, e->pool.huge, &e->pool.n_huge, e->cfg.page_size);
}

static void buf_put(rs_engine *e, uint8_t *b)
{
    pool_give(e, e->pool.huge, &e->pool.n_huge, e->cfg.page_size, b);
}

/* Unmap the buffers kept for reuse (rs_engine_destroy, before pool_drain
 * destroys the pool's lock). */
void huge_buf_drain(rs_engine *e)
{
    while (e->pool.n_huge > 0)
        munmap(e->pool.huge[--e->pool.n_huge], e->cfg.page_size);
}

/* Take a reference on each of chunks cs[0..n): 1 when all are ready and
 * held; 0 when one is not ready (or its copy was freed), none held then.
 * *failed: the chunk of them that failed (the page can never be had), or
 * NO_CHUNK. */
static int acquire_all(rs_engine *e, const uint32_t *cs, uint32_t n, uint32_t *failed)
{
    uint32_t i;

    *failed = NO_CHUNK;
    for (i = 0; i < n; i++) {
        if (atomic_load_explicit(&e->chunks[cs[i]].state, memory_order_acquire) == C_FAILED) {
            *failed = cs[i];
            return 0;
        }
    }
    for (i = 0; i < n; i++)
        if (atomic_load_explicit(&e->chunks[cs[i]].state, memory_order_acquire) != C_READY ||
            !chunk_acquire(e, cs[i]))
            break;
    if (i == n)
        return 1;
    while (i-- > 0)
        chunk_release(e, cs[i]);
    return 0;
}

static void release_all(rs_engine *e, const uint32_t *cs, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        chunk_release(e, cs[i]);
}

/* Guest page p's bytes where they already lie in order, all in chunk c
 * (the identity layout with chunks of a huge page or more, or a page map
 * that kept the page's small pages together): no copy to assemble. NULL
 * when they do not. */
static const uint8_t *in_place(rs_engine *e, uint64_t p, uint32_t c)
{
    const uint64_t q0 = p * e->sub;

    if (!e->page_chunk) /* slots in order; zero slots decode as zeros */
        return q0 / e->slots == (q0 + e->sub - 1) / e->slots ? e->chunks[c].data + off_of(e, q0) : NULL;
    for (uint64_t q = q0; q < q0 + e->sub; q++)
        if (chunk_of(e, q) != c || off_of(e, q) != off_of(e, q0) + (q - q0) * e->small)
            return NULL;
    return e->chunks[c].data + off_of(e, q0);
}

/* Copy guest page p's bytes into buf from its chunks (held by the caller),
 * a run of small pages contiguous in one chunk per memcpy, zeros between. */
static void assemble(rs_engine *e, uint64_t p, uint8_t *buf)
{
    const uint64_t q0 = p * e->sub, end = q0 + e->sub, ps = e->small;
    uint64_t q = q0;

    while (q < end) {
        uint32_t c = chunk_of(e, q);
        uint64_t a = q++;

        if (c == NO_CHUNK) {
            while (q < end && chunk_of(e, q) == NO_CHUNK)
                q++;
            memset(buf + (a - q0) * ps, 0, (q - a) * ps);
            continue;
        }
        while (q < end && chunk_of(e, q) == c && off_of(e, q) == off_of(e, q - 1) + ps)
            q++;
        memcpy(buf + (a - q0) * ps, e->chunks[c].data + off_of(e, a), (q - a) * ps);
    }
}

/* Install guest page p of region r, whose chunks cs[0..n) the caller holds.
 * 0 (installed, or present already), -EAGAIN (retry later) or -errno. */
static int put_page(rs_engine *e, int r, uint64_t p, const uint32_t *cs, uint32_t n, int prefetch)
{
    const uint8_t *src = n == 1 ? in_place(e, p, cs[0]) : NULL;
    uint8_t *buf = NULL;
    uint64_t upto;
    int rc;

    if (!src) {
        if (!(buf = buf_get(e))) {
            note_error(e, -ENOMEM);
            return -EAGAIN; /* retried: memory may come back */
        }
        assemble(e, p, buf);
        src = buf;
    }
    rc = fill_run(e, r, src, p, p + 1, &upto, prefetch);
    if (buf)
        buf_put(e, buf);
    return rc;
}

/* Does guest page q need chunks among cs[0..n) (ascending) only, and one
 * at least? */
static int within(rs_engine *e, uint64_t q, const uint32_t *cs, uint32_t n)
{
    uint32_t last = NO_CHUNK;

    for (uint64_t s = q * e->sub; s < (q + 1) * e->sub; s++) {
        uint32_t c = chunk_of(e, s), lo = 0, hi = n;

        if (c == NO_CHUNK || c == last)
            continue;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;

            if (cs[mid] < c)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo == n || cs[lo] != c)
            return 0;
        last = c;
    }
    return last != NO_CHUNK;
}

/* Fault-around in huge pages: the other missing pages of p's aligned
 * window of `window` guest pages in region r whose bytes all come from
 * the chunks p needed (cs, held): what the 4 KiB path does with the pages
 * of the faulting page's chunk. Nothing is fetched for it; with chunks of
 * a huge page or less no neighbour shares them. Best effort. */
static void around(rs_engine *e, int r, uint64_t p, uint32_t window, const uint32_t *cs, uint32_t n,
                   int prefetch)
{
    const uint64_t w0 = p - p % window, w1 = w0 + window;

    for (uint64_t q = w0; q < w1 && q < e->n_pages; q++) {
        if (q == p || !in_region(e, r, q) || bit_test(e->present, q) || bit_test(e->removed, q) ||
            !within(e, q, cs, n))
            continue;
        if (put_page(e, r, q, cs, n, prefetch) == 0)
            log_planned(e, q, q + 1, UINT64_MAX);
    }
}

/* The tier a huge page is logged as coming from: the farthest of its
 * chunks' (a fault that needed the durable store waited for it). */
static int source_of(rs_engine *e, const uint32_t *cs, uint32_t n)
{
    static const int rank[RS_N_SOURCES] = {
        [RS_SRC_HOST] = 1, [RS_SRC_L1] = 2, [RS_SRC_FETCHED] = 3, [RS_SRC_L2] = 4, [RS_SRC_DURABLE] = 5,
    };
    int best = e->chunks[cs[0]].source;

    for (uint32_t i = 1; i < n; i++) {
        int s = e->chunks[cs[i]].source;

        if (s < RS_N_SOURCES && best < RS_N_SOURCES && rank[s] > rank[best])
            best = s;
    }
    return best;
}

/* serve_page for a guest of huge pages (the page is not removed): 0 when
 * served, 1 when parked on one of its chunks, -EAGAIN to retry after
 * draining events, or another -errno. */
int serve_huge(rs_engine *e, int r, uint64_t p, uint64_t t_ns)
{
    uint32_t cs[e->sub], n = page_chunks(e, p, cs), wait;
    uint32_t failed;
    int rc, src;

    if (n == 0) {
        rc = install_zero(e, r, p, 1, NULL, NULL, 0);
        if (rc == 0)
            log_touch(e, p, NO_CHUNK, RS_SRC_ZERO, t_ns);
        return rc;
    }
    for (;;) {
        if (acquire_all(e, cs, n, &failed)) {
            rc = put_page(e, r, p, cs, n, 0);
            if (rc == 0 && e->cfg.fault_around > 1)
                around(e, r, p, e->cfg.fault_around, cs, n, 0);
            src = source_of(e, cs, n);
            release_all(e, cs, n);
            if (rc == 0)
                log_touch(e, p, cs[0], src, t_ns);
            return rc;
        }
        if (failed != NO_CHUNK) {
            rc = poison_or_kill(e, addr_of(e, r, p), failed);
            if (rc == 0)
                log_touch(e, p, cs[0], RS_SRC_FAILED, t_ns);
            return rc;
        }
        /* Ask for every chunk not had yet, at once (they load in
         * parallel), and park on the first still coming. */
        rc = 0;
        wait = NO_CHUNK;
        pthread_mutex_lock(&e->lock);
        for (uint32_t i = 0; i < n; i++) {
            struct chunk *ch = &e->chunks[cs[i]];
            int state = atomic_load(&ch->state);

            if (state == C_READY && (atomic_load(&ch->ref) & REF_FREED)) {
                /* Freed once every page needing it was in; a late fault
                 * (see serve_page): load it again, for good. */
                ch->data = NULL;
                atomic_store(&ch->ref, 0);
                atomic_store(&ch->state, C_ABSENT);
                atomic_fetch_add(&e->st.chunks_reloaded, 1);
                state = C_ABSENT;
            }
            if (state == C_ABSENT && adopt_host(e, cs[i]))
                state = C_READY;
            if (state == C_ABSENT) {
                int queued, err;
                rs_fetchq *q = first_queue(e, &queued);

                atomic_store(&ch->state, queued);
                if ((err = rs_fetchq_push(q, cs[i], 1)) < 0)
                    rc = err;
                state = queued;
            }
            if ((state == C_QUEUED_L1 || state == C_QUEUED_REMOTE) && wait == NO_CHUNK)
                wait = cs[i];
        }
        if (wait == NO_CHUNK) { /* all settled meanwhile: look again */
            pthread_mutex_unlock(&e->lock);
            continue;
        }
        if (plist_push(&e->chunks[wait].parked, p, t_ns) < 0)
            rc = -ENOMEM;
        pthread_mutex_unlock(&e->lock);
        if (rc < 0)
            note_error(e, rc);
        return rc < 0 ? rc : 1;
    }
}

/* The prefetch of plan chunk k, just ready: install each of its planned
 * huge pages whose other chunks are ready too (a page is listed under each
 * chunk it spans, so the last of them to be ready installs it), with its
 * window of prefetch_around pages as its recorded fault brought in. */
void prefetch_install_huge(rs_engine *e, uint32_t k)
{
    uint32_t cs[e->sub], n;

    for (uint64_t i = e->plan.start[k]; i < e->plan.start[k + 1]; i++) {
        uint64_t p = e->plan.pages[i];
        int r = region_of_page(e, p);
        uint32_t failed;

        if (r < 0 || bit_test(e->present, p) || bit_test(e->removed, p))
            continue;
        n = page_chunks(e, p, cs);
        if (!acquire_all(e, cs, n, &failed))
            continue; /* a chunk still to come installs it, or it failed */
        /* Per page, so a demand fault waits for one huge page at most; the
         * page is looked at again under the lock (a REMOVE may have come). */
        pthread_rwlock_rdlock(&e->install);
        if (!bit_test(e->present, p) && !bit_test(e->removed, p) && put_page(e, r, p, cs, n, 1) == 0) {
            log_planned(e, p, p + 1, UINT64_MAX);
            if (e->cfg.prefetch_around > 1)
                around(e, r, p, e->cfg.prefetch_around, cs, n, 1);
        }
        pthread_rwlock_unlock(&e->install);
        release_all(e, cs, n);
    }
}
