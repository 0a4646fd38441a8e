/* engine.c -- one restore session's API (engine.h): lifecycle (create,
 * start, stop, destroy), supply and fail from the fetchers, reading the
 * fault log, and the stats. The files it starts and calls build on each
 * other in one direction; the map is private/engine_int.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "l1.h"
#include "private/deadline.h"
#include "private/zmem.h"
#include "private/engine_int.h"

/* Free what rs_engine_create allocated besides the struct and its fds. */
static void free_tables(rs_engine *e)
{
    size_t bm = (e->n_pages + 63) / 64 * sizeof(uint64_t);

    free(e->regions);
    rs_zfree(e->chunks, (e->cfg.n_chunks + 1) * sizeof(struct chunk));
    rs_zfree((void *)e->left, (e->cfg.n_chunks + 1) * sizeof(uint32_t));
    rs_zfree((void *)e->present, bm);
    rs_zfree((void *)e->removed, bm);
    rs_zfree((void *)e->touched, bm);
    rs_zfree((void *)e->settled, bm);
    rs_zfree((void *)e->memfd.claimed, bm);
    rs_zfree((void *)e->memfd.written, bm);
    free(e->local.l1_dir);
    free(e->zero_page);
    rs_fetchq_destroy(e->local.q);
    rs_fetchq_destroy(e->remoteq);
    rs_faultlog_destroy(e->log);
    prefetch_free(e);
}

int rs_engine_create(rs_engine **out, const rs_engine_config *cfg,
                     const rs_codec *codec,
                     const rs_engine_region *regions, size_t n_regions,
                     const uint32_t *page_chunk, const uint32_t *page_off,
                     const uint8_t *chunk_ids, const uint32_t *chunk_lens,
                     const uint32_t *chunk_flags, const uint8_t *chunk_zero,
                     const char *l1_dir)
{
    rs_engine *e;
    uint64_t words;
    int rc = -ENOMEM;

    *out = NULL;
    /* A guest page may be larger than a chunk: it is then assembled from
     * the chunks it spans (huge.c). It must be whole small pages. */
    if (!cfg->page_size || cfg->page_size & (cfg->page_size - 1) ||
        cfg->page_size % rs_codec_page_size(codec) ||
        rs_codec_page_size(codec) > cfg->chunk_size || cfg->memory_size % cfg->page_size ||
        !n_regions || !cfg->fault_around)
        return -EINVAL;
    for (size_t i = 0; i < n_regions; i++) {
        const rs_engine_region *g = &regions[i];

        if (!g->size || g->size % cfg->page_size || g->offset % cfg->page_size ||
            g->base % cfg->page_size || g->offset > cfg->memory_size ||
            g->size > cfg->memory_size - g->offset)
            return -EINVAL;
    }
    e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->cfg = *cfg;
    if (!e->cfg.prefetch_around)
        e->cfg.prefetch_around = e->cfg.fault_around;
    e->codec = codec;
    e->svc.uffd = e->svc.conn_fd = e->svc.pid_fd = e->svc.wake_fd = e->svc.stop_fd = e->memfd.fd = -1;
    e->n_pages = cfg->memory_size / cfg->page_size;
    e->n_regions = n_regions;
    e->bm_bytes = rs_codec_bitmap_bytes(codec);
    words = (e->n_pages + 63) / 64;
    e->small = rs_codec_page_size(codec);
    e->sub = cfg->page_size / e->small;
    e->slots = cfg->chunk_size / e->small;
    if (!page_chunk != !page_off) {
        rc = -EINVAL;
        goto fail;
    }
    e->regions = malloc(n_regions * sizeof(*regions));
    e->page_chunk = page_chunk;
    e->page_off = page_off;
    e->ids = chunk_ids;
    e->lens = chunk_lens;
    e->flags = chunk_flags;
    e->zero = chunk_zero;
    e->chunks = rs_zalloc((cfg->n_chunks + 1) * sizeof(struct chunk));
    e->left = rs_zalloc((cfg->n_chunks + 1) * sizeof(uint32_t));
    e->present = rs_zalloc(words * sizeof(uint64_t));
    e->removed = rs_zalloc(words * sizeof(uint64_t));
    e->touched = rs_zalloc(words * sizeof(uint64_t));
    e->settled = rs_zalloc(words * sizeof(uint64_t));
    if (!e->regions || !e->chunks || !e->left || !e->present || !e->removed ||
        !e->touched || !e->settled)
        goto fail;
    memcpy(e->regions, regions, n_regions * sizeof(*regions));
    if (page_chunk) {
        for (uint64_t p = 0; p < e->n_pages * e->sub; p++) {
            if (page_chunk[p] != NO_CHUNK &&
                (page_chunk[p] >= cfg->n_chunks ||
                 (uint64_t)page_off[p] + e->small > cfg->chunk_size)) {
                rc = -EINVAL;
                goto fail;
            }
        }
    } else if ((e->n_pages * e->sub + e->slots - 1) / e->slots > cfg->n_chunks) {
        rc = -EINVAL; /* the identity layout needs a chunk per slots pages */
        goto fail;
    }
    count_left(e);
    if (l1_dir && !(e->local.l1_dir = strdup(l1_dir)))
        goto fail;
    if (cfg->page_size != 4096 && !(e->zero_page = calloc(1, cfg->page_size)))
        goto fail;
    if ((rc = rs_fetchq_create(&e->local.q, cfg->n_chunks)) ||
        (rc = rs_fetchq_create(&e->remoteq, cfg->n_chunks)) ||
        (rc = rs_faultlog_create(&e->log, cfg->log_capacity ? cfg->log_capacity
                                                            : e->n_pages + 1024)))
        goto fail;
    e->svc.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->svc.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->svc.wake_fd < 0 || e->svc.stop_fd < 0) {
        rc = -errno;
        goto fail;
    }
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->pool.lock, NULL);
    {
        pthread_condattr_t ca;
        pthread_rwlockattr_t ra;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&e->done_cv, &ca);
        pthread_condattr_destroy(&ca);
        pthread_cond_init(&e->plan.cv, NULL);
        /* The service thread must not starve behind installers. */
        pthread_rwlockattr_init(&ra);
        pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(&e->install, &ra);
        pthread_rwlockattr_destroy(&ra);
    }
    *out = e;
    return 0;
fail:
    /* Not started: nothing to join, the lock was never initialised. */
    free_tables(e);
    if (e->svc.wake_fd >= 0)
        close(e->svc.wake_fd);
    if (e->svc.stop_fd >= 0)
        close(e->svc.stop_fd);
    free(e);
    return rc;
}

int rs_engine_set_host_cache(rs_engine *e, const char *dir, const uint8_t *version_id)
{
    if (e->svc.started || e->host)
        return -EINVAL;
    return rs_hostcache_open(&e->host, dir, e->cfg.n_chunks, e->cfg.chunk_size, version_id);
}

int rs_engine_set_memfd(rs_engine *e, int memfd, int mode)
{
    struct stat st;
    size_t words = (e->n_pages + 63) / 64;

    if (e->svc.started || memfd < 0 || e->memfd.fd >= 0 ||
        (mode != RS_MEMFD_COPY && mode != RS_MEMFD_CONTINUE) ||
        (mode == RS_MEMFD_CONTINUE && e->cfg.page_size != 4096))
        return -EINVAL;
    if (fstat(memfd, &st) < 0)
        return -errno;
    for (size_t i = 0; i < e->n_regions; i++)
        if ((uint64_t)st.st_size < e->regions[i].offset + e->regions[i].size)
            return -EINVAL;
    if (mode == RS_MEMFD_CONTINUE) {
        e->memfd.claimed = rs_zalloc(words * sizeof(uint64_t));
        e->memfd.written = rs_zalloc(words * sizeof(uint64_t));
        if (!e->memfd.claimed || !e->memfd.written)
            return -ENOMEM; /* freed with the engine */
        e->memfd.cont = 1;
    }
    e->memfd.fd = memfd;
    return 0;
}

int rs_engine_set_vmm(rs_engine *e, int pidfd)
{
    if (e->svc.started || pidfd < 0)
        return -EINVAL;
    e->svc.pid_fd = pidfd;
    return 0;
}

int rs_engine_start(rs_engine *e, int uffd, int conn_fd)
{
    sigset_t all, old;
    int rc = 0;

    if (e->svc.started || e->stopped)
        return -EALREADY;
    e->svc.uffd = uffd;
    e->svc.conn_fd = conn_fd;
    e->t0_ns = now_ns();
    /* Our threads take no signals: Python's main thread handles them. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    if (!e->cfg.l1_threads) {
        /* No local threads: requests go straight to the fetchers. */
        free(e->local.l1_dir);
        e->local.l1_dir = NULL;
        rs_hostcache_close(e->host);
        e->host = NULL;
    }
    if (e->local.l1_dir || e->host) {
        e->local.threads = calloc(e->cfg.l1_threads, sizeof(pthread_t));
        if (!e->local.threads)
            rc = -ENOMEM;
        for (uint32_t i = 0; !rc && i < e->cfg.l1_threads; i++) {
            rc = -pthread_create(&e->local.threads[i], NULL, local_main, e);
            if (!rc)
                e->local.n_started++;
        }
    }
    if (!rc) {
        rc = -pthread_create(&e->svc.thread, NULL, service_main, e);
        e->svc.started = rc == 0;
    }
    if (!rc && e->plan.chunks) {
        rc = -pthread_create(&e->plan.thread, NULL, prefetch_main, e);
        e->plan.started = rc == 0;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc)
        rs_engine_stop(e);
    return rc;
}

void rs_engine_stop(rs_engine *e)
{
    uint64_t one = 1;

    if (e->stopped)
        return;
    e->stopped = 1;
    {
        int none = RS_END_RUNNING;

        atomic_compare_exchange_strong(&e->end_reason, &none, RS_END_STOPPED);
    }
    atomic_store(&e->svc.stop_now, 1);
    if (write(e->svc.stop_fd, &one, sizeof(one)) < 0)
        note_error(e, -errno);
    if (e->svc.started)
        pthread_join(e->svc.thread, NULL);
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->plan.cv);
    pthread_cond_broadcast(&e->done_cv); /* rs_engine_wait_prefetch */
    pthread_mutex_unlock(&e->lock);
    rs_fetchq_close(e->local.q);
    rs_fetchq_close(e->remoteq);
    for (uint32_t i = 0; i < e->local.n_started; i++)
        pthread_join(e->local.threads[i], NULL);
    if (e->plan.started)
        pthread_join(e->plan.thread, NULL);
    engine_finish(e);
}

void rs_engine_destroy(rs_engine *e)
{
    if (!e)
        return;
    rs_engine_stop(e);
    for (uint32_t c = 0; c < e->cfg.n_chunks; c++) {
        if (!e->chunks[c].mapped && !(atomic_load(&e->chunks[c].ref) & REF_FREED))
            chunk_free(e, e->chunks[c].data);
        free(e->chunks[c].parked.v);
    }
    /* Unmaps, and drops the fill locks of chunks never supplied. */
    rs_hostcache_close(e->host);
    huge_buf_drain(e);
    pool_drain(e);
    free(e->svc.deferred.v);
    free(e->local.threads);
    close(e->svc.wake_fd);
    close(e->svc.stop_fd);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->done_cv);
    pthread_cond_destroy(&e->plan.cv);
    pthread_rwlock_destroy(&e->install);
    free_tables(e);
    free(e);
}

int rs_engine_wait(rs_engine *e, int timeout_ms)
{
    struct timespec deadline = rs_deadline_after(timeout_ms > 0 ? timeout_ms : 0);
    int done;

    pthread_mutex_lock(&e->lock);
    while (!e->done) {
        if (timeout_ms < 0)
            pthread_cond_wait(&e->done_cv, &e->lock);
        else if (pthread_cond_timedwait(&e->done_cv, &e->lock, &deadline) == ETIMEDOUT)
            break;
    }
    done = e->done;
    pthread_mutex_unlock(&e->lock);
    return done;
}

int rs_engine_wait_prefetch(rs_engine *e, int timeout_ms)
{
    struct timespec deadline = rs_deadline_after(timeout_ms > 0 ? timeout_ms : 0);
    int done;

    if (!e->plan.chunks)
        return 0;
    pthread_mutex_lock(&e->lock);
    while (!prefetch_done(e) && !e->done && !e->stopping) {
        if (timeout_ms < 0)
            pthread_cond_wait(&e->done_cv, &e->lock);
        else if (pthread_cond_timedwait(&e->done_cv, &e->lock, &deadline) == ETIMEDOUT)
            break;
    }
    done = prefetch_done(e);
    pthread_mutex_unlock(&e->lock);
    return done;
}

int rs_engine_next_request(rs_engine *e, uint32_t *chunk, int timeout_ms)
{
    return rs_fetchq_pop(e->remoteq, chunk, NULL, timeout_ms);
}

int rs_engine_next_request_prio(rs_engine *e, uint32_t *chunk, int *high, int timeout_ms)
{
    return rs_fetchq_pop(e->remoteq, chunk, high, timeout_ms);
}

int rs_engine_supply(rs_engine *e, uint32_t chunk, const uint8_t *stored,
                     size_t stored_len, int source)
{
    uint8_t *data;
    int rc;

    if (chunk >= e->cfg.n_chunks || (source != RS_SRC_L2 && source != RS_SRC_DURABLE))
        return -EINVAL;
    if (atomic_load(&e->chunks[chunk].state) != C_QUEUED_REMOTE)
        return -EALREADY;
    if (stored_len != e->lens[chunk]) {
        atomic_fetch_add(&e->st.supply_rejected, 1);
        return -EBADMSG;
    }
    rc = decode_chunk(e, chunk, stored, stored_len, &data);
    if (rc) {
        if (rc != -ENOMEM)
            atomic_fetch_add(&e->st.supply_rejected, 1);
        return rc;
    }
    atomic_fetch_add(&e->st.chunks_fetched, 1);
    publish(e, chunk, data, source);
    return 0;
}

int rs_engine_fail(rs_engine *e, uint32_t chunk, int err)
{
    if (chunk >= e->cfg.n_chunks)
        return -EINVAL;
    if (atomic_load(&e->chunks[chunk].state) == C_READY)
        return -EALREADY;
    note_error(e, err < 0 ? err : -err);
    atomic_fetch_add(&e->st.chunks_failed, 1);
    if (e->chunks[chunk].host_claimed) {
        e->chunks[chunk].host_claimed = 0;
        rs_hostcache_abandon(e->host, chunk);
    }
    settle_chunk(e, chunk, NULL, RS_SRC_FAILED, 0);
    return 0;
}

void rs_engine_get_stats(rs_engine *e, rs_engine_stats *out)
{
    uint32_t parked = 0, parked_remote = 0;

    memset(out, 0, sizeof(*out));
    out->faults = atomic_load(&e->st.faults);
    for (int i = 0; i < RS_N_SOURCES; i++)
        out->first_touches[i] = atomic_load(&e->st.first_touches[i]);
    out->pages_installed = atomic_load(&e->st.pages_installed);
    out->bytes_installed = atomic_load(&e->st.bytes_installed);
    out->chunks_l1 = atomic_load(&e->st.chunks_l1);
    out->chunks_fetched = atomic_load(&e->st.chunks_fetched);
    out->chunks_host = atomic_load(&e->st.chunks_host);
    out->host_fills = atomic_load(&e->st.host_fills);
    out->host_waits = atomic_load(&e->st.host_waits);
    out->host_errors = atomic_load(&e->st.host_errors);
    out->host_fill_ns = atomic_load(&e->st.host_fill_ns);
    out->poll_ns = atomic_load(&e->st.poll_ns);
    out->poll_hits = atomic_load(&e->st.poll_hits);
    out->chunks_failed = atomic_load(&e->st.chunks_failed);
    out->l1_misses = atomic_load(&e->st.l1_misses);
    out->l1_bad = atomic_load(&e->st.l1_bad);
    out->supply_rejected = atomic_load(&e->st.supply_rejected);
    out->removes = atomic_load(&e->st.removes);
    out->eexist = atomic_load(&e->st.eexist);
    out->deferred = atomic_load(&e->st.deferred);
    out->poisoned = atomic_load(&e->st.poisoned);
    out->chunks_released = atomic_load(&e->st.chunks_released);
    out->chunks_reloaded = atomic_load(&e->st.chunks_reloaded);
    out->minor_faults = atomic_load(&e->st.minor_faults);
    out->memfd_written = atomic_load(&e->st.memfd_written);
    out->log_dropped = rs_faultlog_dropped(e->log);
    out->prefetch_chunks = atomic_load(&e->st.prefetch_chunks);
    out->prefetch_pages = atomic_load(&e->st.prefetch_pages);
    out->faults_planned = atomic_load(&e->st.faults_planned);
    out->faults_unplanned = atomic_load(&e->st.faults_unplanned);
    out->l1_read_ns = atomic_load(&e->st.l1_read_ns);
    out->decode_ns = atomic_load(&e->st.decode_ns);
    out->prefetch_install_ns = atomic_load(&e->st.prefetch_install_ns);
    out->install_ns = atomic_load(&e->st.demand_install_ns) + out->prefetch_install_ns;
    pthread_mutex_lock(&e->lock);
    for (uint32_t c = 0; c < e->cfg.n_chunks; c++) {
        parked += (uint32_t)e->chunks[c].parked.n;
        if (atomic_load(&e->chunks[c].state) == C_QUEUED_REMOTE)
            parked_remote += (uint32_t)e->chunks[c].parked.n;
    }
    out->prefetch_done = prefetch_done(e);
    pthread_mutex_unlock(&e->lock);
    out->parked_now = parked;
    out->parked_remote_now = parked_remote;
    out->guest_gone = atomic_load(&e->guest_gone);
    out->error = atomic_load(&e->error);
    out->conn_closed = (uint32_t)atomic_load(&e->svc.conn_closed);
    out->end_reason = atomic_load(&e->end_reason);
    if (atomic_load_explicit(&e->kill.state, memory_order_acquire) == 2) {
        out->kill_addr = e->kill.addr;
        out->kill_chunk = e->kill.chunk;
        out->kill_error = e->kill.error;
        out->kill_result = e->kill.result;
        out->vmm_killed = e->kill.result == 0;
    }
}

size_t rs_engine_log_read(rs_engine *e, rs_fault_record *out, size_t max)
{
    return rs_faultlog_copy(e->log, out, max);
}
