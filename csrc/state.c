/* state.c -- the moves on the engine's shared state that every thread
 * makes: parked-fault lists, first-touch records in the fault log, adopting
 * a chunk the host cache holds, where a request for an absent chunk goes
 * first, deferring a fault to the service thread and waking it, and the
 * end of the session. It calls no other file of the engine's: each of
 * those builds on it. */
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

int plist_push(struct plist *l, uint64_t page, uint64_t t_ns)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        struct parked *v = realloc(l->v, cap * sizeof(*v));

        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n].page = page;
    l->v[l->n].t_ns = t_ns;
    l->n++;
    return 0;
}

struct plist plist_take(struct plist *l)
{
    struct plist out = *l;

    memset(l, 0, sizeof(*l));
    return out;
}

/* Append the first-touch record of page p (once per page); 1 if it was
 * the first. */
int log_record(rs_engine *e, uint64_t p, uint32_t chunk, int src, uint64_t t_ns,
               uint64_t svc)
{
    rs_fault_record rec;

    if (bit_set(e->touched, p))
        return 0;
    memset(&rec, 0, sizeof(rec));
    rec.t_ns = t_ns - e->t0_ns;
    rec.offset = p * e->cfg.page_size;
    rec.chunk = chunk;
    rec.service_ns = svc > UINT32_MAX ? UINT32_MAX : (uint32_t)svc;
    rec.source = (uint8_t)src;
    rs_faultlog_append(e->log, &rec);
    atomic_fetch_add(&e->st.first_touches[src], 1);
    return 1;
}

/* Log the demand fault on page p that arrived at t_ns and is now served. */
void log_touch(rs_engine *e, uint64_t p, uint32_t chunk, int src, uint64_t t_ns)
{
    if (log_record(e, p, chunk, src, t_ns, now_ns() - t_ns) && e->plan.planned)
        atomic_fetch_add(bit_test(e->plan.planned, p) ? &e->st.faults_planned : &e->st.faults_unplanned, 1);
}

/* With a plan, a planned page that an install brings in ahead of its touch
 * is logged there (source prefetched), in place of the demand fault it
 * would have caused: a session that replays a plan records as much as one
 * that did not. Pages [lo, upto) were just installed; skip is the page
 * whose fault is being served (logged by its caller), or UINT64_MAX. */
void log_planned(rs_engine *e, uint64_t lo, uint64_t upto, uint64_t skip)
{
    uint64_t t = now_ns();

    if (!e->plan.planned)
        return;
    for (uint64_t q = lo; q < upto; q++)
        if (q != skip && bit_test(e->plan.planned, q))
            log_record(e, q, log_chunk(e, q), RS_SRC_PREFETCHED, t, 0);
}

/* Under e->lock, chunk c ABSENT: when the host cache holds it, make it
 * READY with the host cache's bytes (nothing to read or decode) and return
 * 1; else 0. */
int adopt_host(rs_engine *e, uint32_t c)
{
    struct chunk *ch = &e->chunks[c];

    if (!e->host || !rs_hostcache_present(e->host, c))
        return 0;
    ch->data = (uint8_t *)rs_hostcache_chunk(e->host, c);
    ch->mapped = 1;
    ch->source = RS_SRC_HOST;
    atomic_store(&ch->ref, 0);
    atomic_store_explicit(&ch->state, C_READY, memory_order_release);
    atomic_fetch_add(&e->st.chunks_host, 1);
    return 1;
}

/* Where requests for absent chunks go first: the local threads (host
 * cache, L1) when there are any, else the fetchers. */
rs_fetchq *first_queue(rs_engine *e, int *state)
{
    int local = e->local.l1_dir != NULL || e->host != NULL;

    *state = local ? C_QUEUED_L1 : C_QUEUED_REMOTE;
    return local ? e->local.q : e->remoteq;
}

void wake_service(rs_engine *e)
{
    uint64_t one = 1;

    if (write(e->svc.wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        note_error(e, -errno);
}

/* Queue a fault for the service thread to retry (after -EAGAIN). */
void push_deferred(rs_engine *e, uint64_t page, uint64_t t_ns)
{
    pthread_mutex_lock(&e->lock);
    if (plist_push(&e->svc.deferred, page, t_ns) < 0)
        note_error(e, -ENOMEM);
    atomic_store(&e->svc.n_deferred, e->svc.deferred.n);
    pthread_mutex_unlock(&e->lock);
}

/* Defer a fault met by another thread, and wake the service thread. */
void defer(rs_engine *e, uint64_t page, uint64_t t_ns)
{
    push_deferred(e, page, t_ns);
    atomic_fetch_add(&e->st.deferred, 1);
    wake_service(e);
}

void engine_finish(rs_engine *e)
{
    pthread_mutex_lock(&e->lock);
    e->done = 1;
    pthread_cond_broadcast(&e->done_cv);
    pthread_mutex_unlock(&e->lock);
}
