/* fault.c -- serving a fault on a guest page: from a ready chunk, a zero
 * page or a failed chunk (poisoned), else parked on its chunk, which is
 * asked for; and settling a chunk, which serves every fault parked on it
 * and lets the plan's pages of it in. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "private/engine_int.h"

/* Serve a fault on guest page p (region r) that arrived at t_ns.
 * Returns 0 when served, 1 when parked on its chunk, -EAGAIN when it must
 * be retried after draining events, or another -errno. */
int serve_page(rs_engine *e, int r, uint64_t p, uint64_t t_ns)
{
    uint32_t c;
    int rc, state;

    if (bit_test(e->removed, p)) {
        rc = install_zero(e, r, p, 1, NULL, NULL, 0);
        if (rc == 0)
            log_touch(e, p, log_chunk(e, p), RS_SRC_REMOVED, t_ns);
        return rc;
    }
    if (e->sub > 1)
        return serve_huge(e, r, p, t_ns);
    c = chunk_of(e, p);
    if (c == NO_CHUNK) {
        uint64_t lo, upto;

        rc = install_zero(e, r, p, e->cfg.fault_around, &lo, &upto, 0);
        if (rc == 0) {
            log_planned(e, lo, upto, p);
            log_touch(e, p, NO_CHUNK, RS_SRC_ZERO, t_ns);
        }
        return rc;
    }
    for (;;) {
        state = atomic_load_explicit(&e->chunks[c].state, memory_order_acquire);
        if (state == C_READY && chunk_acquire(e, c)) {
            rc = install_from_chunk(e, r, p, c);
            chunk_release(e, c);
            if (rc == 0)
                log_touch(e, p, c, e->chunks[c].source, t_ns);
            return rc;
        }
        if (state == C_FAILED) {
            rc = install_poison(e, r, p);
            if (rc == 0)
                log_touch(e, p, c, RS_SRC_FAILED, t_ns);
            return rc;
        }
        pthread_mutex_lock(&e->lock);
        state = atomic_load(&e->chunks[c].state);
        if (state == C_READY && (atomic_load(&e->chunks[c].ref) & REF_FREED)) {
            /* Every page of the chunk was in, and its copy is gone; yet
             * here is a fault on one (a race with an install, or memory
             * dropped without a REMOVE event): load the chunk again, and
             * keep this copy for the rest of the session (more of the
             * chunk may come back the same way). */
            e->chunks[c].data = NULL;
            atomic_store(&e->chunks[c].ref, 0);
            atomic_store(&e->chunks[c].state, C_ABSENT);
            atomic_fetch_add(&e->st.chunks_reloaded, 1);
            state = C_ABSENT;
        } else if (state == C_READY || state == C_FAILED) {
            pthread_mutex_unlock(&e->lock);
            continue;
        }
        if (state == C_ABSENT && adopt_host(e, c)) {
            pthread_mutex_unlock(&e->lock);
            continue;
        }
        /* A chunk the prefetch queued for the fetchers gets its first
         * parked fault: ask again at high priority (once: later faults find
         * others parked), so the fetchers put it ahead of the prefetch's. */
        int boost = state == C_QUEUED_REMOTE && e->chunks[c].parked.n == 0;

        rc = plist_push(&e->chunks[c].parked, p, t_ns);
        if (rc == 0 && boost) /* best effort: the low request is still queued */
            (void)rs_fetchq_push(e->remoteq, c, 1);
        if (rc == 0 && state == C_ABSENT) {
            int queued;
            rs_fetchq *q = first_queue(e, &queued);

            atomic_store(&e->chunks[c].state, queued);
            rc = rs_fetchq_push(q, c, 1);
        }
        pthread_mutex_unlock(&e->lock);
        if (rc < 0)
            note_error(e, rc);
        return rc < 0 ? rc : 1;
    }
}

/* Serve page p from any thread; -EAGAIN hands it to the service thread. */
void serve_or_defer(rs_engine *e, uint64_t p, uint64_t t_ns)
{
    int r = region_of_page(e, p);

    if (r >= 0 && serve_page(e, r, p, t_ns) == -EAGAIN)
        defer(e, p, t_ns);
}

/* Publish a decoded chunk (or its failure) and serve its parked faults.
 * mapped: data is the host cache's mapping (not a buffer of the pool). */
void settle_chunk(rs_engine *e, uint32_t c, uint8_t *data, int src, int mapped)
{
    struct chunk *ch = &e->chunks[c];
    struct plist waiting;

    int asked;

    pthread_mutex_lock(&e->lock);
    ch->data = data;
    ch->mapped = (uint8_t)mapped;
    ch->source = (uint8_t)src;
    if (data) /* held until the planned pages are in too */
        atomic_fetch_add(&ch->ref, 1);
    atomic_store_explicit(&ch->state, data ? C_READY : C_FAILED, memory_order_release);
    waiting = plist_take(&ch->parked);
    pthread_mutex_unlock(&e->lock);
    pthread_rwlock_rdlock(&e->install);
    for (size_t i = 0; i < waiting.n; i++)
        serve_or_defer(e, waiting.v[i].page, waiting.v[i].t_ns);
    pthread_rwlock_unlock(&e->install);
    free(waiting.v);
    if (data && e->plan.of_chunk && e->plan.of_chunk[c] >= 0)
        prefetch_install(e, c, (uint32_t)e->plan.of_chunk[c]);
    if (data)
        chunk_release(e, c);

    pthread_mutex_lock(&e->lock);
    asked = e->plan.asked && e->plan.asked[c];
    if (asked) {
        e->plan.asked[c] = 0;
        e->plan.inflight--;
        pthread_cond_signal(&e->plan.cv);
        if (prefetch_done(e))
            pthread_cond_broadcast(&e->done_cv); /* rs_engine_wait_prefetch */
    }
    pthread_mutex_unlock(&e->lock);
}
