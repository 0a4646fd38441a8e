/* prefetch.c -- the working-set plan and the thread that replays it
 * (struct rs_plan). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "private/zmem.h"
#include "private/engine_int.h"

/* Install the planned pages of ready chunk c (plan chunk k) that are not
 * present or removed, taking the install lock for reading per run. Each
 * planned page brings its run of prefetch_around pages, as its demand
 * fault did when the plan was recorded with that fault-around (the log
 * holds the faulting pages; the guest touched their neighbours without
 * faulting; 1 for a plan recorded page by page), and the runs of neighbouring
 * planned pages are coalesced while they stay contiguous in the chunk and
 * in one region: one UFFDIO_COPY per run, up to a whole chunk. Best
 * effort: a run that meets -EAGAIN (a REMOVE in flight) is cut short; its
 * pages fault later. */
void prefetch_install(rs_engine *e, uint32_t c, uint32_t k)
{
    const uint64_t ps = e->cfg.page_size, end = e->plan.start[k + 1];
    uint64_t i = e->plan.start[k];

    if (e->sub > 1) {
        prefetch_install_huge(e, k);
        return;
    }
    if (!chunk_acquire(e, c))
        return; /* every page of the chunk is in already */
    while (i < end) {
        uint64_t first = i, p = e->plan.pages[i++], lo, hi, lo2, hi2, upto, w = UINT64_MAX;
        int r = region_of_page(e, p);

        if (r < 0 || !candidate(e, r, c, p))
            continue;
        /* The install lock is taken per run, so a demand fault waits for
         * at most one run (a chunk's worth), never for the whole plan. */
        pthread_rwlock_rdlock(&e->install);
        run_around(e, r, c, p, e->cfg.prefetch_around, &lo, &hi);
        while (i < end && e->plan.pages[i] <= hi) {
            uint64_t q = e->plan.pages[i];

            if (q < hi) { /* inside the run already */
                i++;
                continue;
            }
            if (!candidate(e, r, c, q) || off_of(e, q) != off_of(e, q - 1) + ps)
                break;
            run_around(e, r, c, q, e->cfg.prefetch_around, &lo2, &hi2);
            hi = hi2;
            i++;
        }
        (void)fill_run(e, r, e->chunks[c].data + off_of(e, lo), lo, hi, &upto, 1);
        log_planned(e, lo, upto, UINT64_MAX);
        /* And the rest of each planned page's window, as its recorded
         * fault brought in (install_from_chunk). */
        for (uint64_t j = first; j < i && e->cfg.prefetch_around > 1; j++) {
            uint64_t q = e->plan.pages[j];

            if (q - q % e->cfg.prefetch_around != w) {
                w = q - q % e->cfg.prefetch_around;
                fill_window_rest(e, r, c, q, e->cfg.prefetch_around, lo, hi, 1);
            }
        }
        pthread_rwlock_unlock(&e->install);
    }
    chunk_release(e, c);
}

/* Install the plan's all-zero pages, each with its run of prefetch_around
 * zero pages (one UFFDIO_ZEROPAGE per run), as their demand faults did. */
static void prefetch_zero(rs_engine *e)
{
    pthread_rwlock_rdlock(&e->install);
    for (uint64_t i = 0; i < e->plan.n_zero; i++) {
        uint64_t p = e->plan.zero[i], lo, upto;
        int r = region_of_page(e, p), rc;

        /* A huge page is listed here only when all of it is zero. */
        if (r < 0 || (e->sub == 1 ? !candidate(e, r, NO_CHUNK, p)
                                  : bit_test(e->present, p) || bit_test(e->removed, p)))
            continue;
        rc = install_zero(e, r, p, e->cfg.prefetch_around, &lo, &upto, 1);
        if (rc == 0)
            log_planned(e, lo, upto, UINT64_MAX);
    }
    pthread_rwlock_unlock(&e->install);
}

void *prefetch_main(void *arg)
{
    rs_engine *e = arg;

    prefetch_zero(e);
    for (uint32_t k = 0; k < e->plan.n_chunks; k++) {
        uint32_t c = e->plan.chunks[k];
        int state;

        pthread_mutex_lock(&e->lock);
        while (e->plan.inflight >= e->plan.max && !e->stopping)
            pthread_cond_wait(&e->plan.cv, &e->lock);
        if (e->stopping || atomic_load(&e->guest_gone)) {
            pthread_mutex_unlock(&e->lock);
            break;
        }
        state = atomic_load(&e->chunks[c].state);
        if (state == C_READY || (state == C_ABSENT && adopt_host(e, c))) {
            atomic_fetch_add(&e->st.prefetch_chunks, 1);
            pthread_mutex_unlock(&e->lock);
            prefetch_install(e, c, k);
            continue;
        }
        if (state != C_FAILED) {
            /* Absent: ask for it at low priority. Queued already (a demand
             * fault got there first): count it in flight all the same;
             * settle_chunk installs the planned pages either way. */
            if (state == C_ABSENT) {
                int queued;
                rs_fetchq *q = first_queue(e, &queued);

                atomic_store(&e->chunks[c].state, queued);
                if (rs_fetchq_push(q, c, 0) < 0)
                    note_error(e, -ENOSPC);
            }
            e->plan.asked[c] = 1;
            e->plan.inflight++;
            atomic_fetch_add(&e->st.prefetch_chunks, 1);
        }
        pthread_mutex_unlock(&e->lock);
    }
    pthread_mutex_lock(&e->lock);
    e->plan.issued = 1;
    if (prefetch_done(e))
        pthread_cond_broadcast(&e->done_cv); /* rs_engine_wait_prefetch */
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

int rs_engine_set_plan(rs_engine *e, const uint64_t *pages, size_t n, uint32_t inflight)
{
    const uint32_t nc = e->cfg.n_chunks;
    uint64_t *count;
    uint64_t pos, listed = 0;
    uint32_t cs[e->sub], m;

    if (e->svc.started || e->plan.chunks || !inflight)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (pages[i] >= e->n_pages)
            return -EINVAL;
    e->plan.planned = rs_zalloc((e->n_pages + 63) / 64 * sizeof(uint64_t));
    e->plan.prefetched = rs_zalloc((e->n_pages + 63) / 64 * sizeof(uint64_t));
    e->plan.of_chunk = malloc((nc + 1) * sizeof(int32_t));
    e->plan.chunks = malloc((nc + 1) * sizeof(uint32_t));
    e->plan.start = calloc(nc + 2, sizeof(uint64_t));
    /* A huge page is listed under every chunk it spans: whichever of them
     * is ready last installs it (prefetch_install_huge). */
    for (size_t i = 0; i < n && e->sub > 1; i++)
        listed += page_chunks(e, pages[i], cs);
    e->plan.pages = malloc(((e->sub > 1 ? listed : n) + 1) * sizeof(uint64_t));
    e->plan.zero = malloc((n + 1) * sizeof(uint64_t));
    e->plan.asked = rs_zalloc(nc + 1);
    count = calloc(nc + 1, sizeof(uint64_t));
    if (!e->plan.planned || !e->plan.prefetched || !e->plan.of_chunk || !e->plan.chunks || !e->plan.start ||
        !e->plan.pages || !e->plan.zero || !e->plan.asked || !count) {
        free(count);
        return -ENOMEM;
    }
    for (uint32_t c = 0; c < nc; c++)
        e->plan.of_chunk[c] = -1;
    /* Chunks in the order of their first planned page; pages grouped by
     * chunk (a page listed twice counts once). */
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pages[i];

        if (bit_set(e->plan.planned, p))
            continue;
        m = page_chunks(e, p, cs);
        if (m == 0) {
            e->plan.zero[e->plan.n_zero++] = p;
            continue;
        }
        for (uint32_t j = 0; j < m; j++) {
            uint32_t c = cs[j];

            if (e->plan.of_chunk[c] < 0) {
                e->plan.of_chunk[c] = (int32_t)e->plan.n_chunks;
                e->plan.chunks[e->plan.n_chunks++] = c;
            }
            count[e->plan.of_chunk[c]]++;
        }
    }
    pos = 0;
    for (uint32_t k = 0; k < e->plan.n_chunks; k++) {
        e->plan.start[k] = pos;
        pos += count[k];
        count[k] = e->plan.start[k]; /* next free slot of plan chunk k */
    }
    e->plan.start[e->plan.n_chunks] = pos;
    for (size_t i = 0; i < n; i++) /* again from nothing: only the plan's bits */
        bit_clear(e->plan.planned, pages[i]);
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pages[i];

        if (bit_set(e->plan.planned, p))
            continue;
        m = page_chunks(e, p, cs);
        for (uint32_t j = 0; j < m; j++)
            e->plan.pages[count[e->plan.of_chunk[cs[j]]]++] = p;
    }
    for (uint32_t k = 0; k < e->plan.n_chunks; k++)
        qsort(e->plan.pages + e->plan.start[k], e->plan.start[k + 1] - e->plan.start[k],
              sizeof(uint64_t), cmp_u64);
    qsort(e->plan.zero, e->plan.n_zero, sizeof(uint64_t), cmp_u64);
    e->plan.max = inflight;
    free(count);
    return 0;
}

size_t rs_engine_prefetched(rs_engine *e, uint64_t *out, size_t max)
{
    size_t n = 0;

    if (!e->plan.prefetched)
        return 0;
    for (uint64_t w = 0; w < (e->n_pages + 63) / 64 && n < max; w++) {
        uint64_t bits = atomic_load(&e->plan.prefetched[w]);

        while (bits && n < max) {
            out[n++] = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
        }
    }
    return n;
}

/* Free the plan's tables (rs_engine_destroy, or a failed create). */
void prefetch_free(rs_engine *e)
{
    size_t bm = (e->n_pages + 63) / 64 * sizeof(uint64_t);

    free(e->plan.chunks);
    free(e->plan.pages);
    free(e->plan.start);
    free(e->plan.of_chunk);
    free(e->plan.zero);
    rs_zfree((void *)e->plan.planned, bm);
    rs_zfree((void *)e->plan.prefetched, bm);
    rs_zfree(e->plan.asked, e->cfg.n_chunks + 1);
}
