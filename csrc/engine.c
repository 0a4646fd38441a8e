/* engine.c -- serve one guest's page faults from snapshot chunks (engine.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chunk.h"
#include "faultlog.h"
#include "fetchq.h"
#include "hostcache.h"
#include "l1.h"
#include "uffd.h"
#include "engine.h"
#include "private/deadline.h"
#include "private/zmem.h"

#define NO_CHUNK 0xFFFFFFFFu
#define EVENT_BATCH 64

enum chunk_state { C_ABSENT, C_QUEUED_L1, C_QUEUED_REMOTE, C_READY, C_FAILED };

struct parked {
    uint64_t page;  /* guest page index */
    uint64_t t_ns;  /* arrival, CLOCK_MONOTONIC */
};

struct plist {
    struct parked *v;
    size_t n, cap;
};

/* A decoded chunk is kept only while some of its guest pages may still
 * need it: once every one of its pages in the guest's regions is present
 * or removed, the copy is freed (it would take memory the size of the
 * guest, and a freed buffer is reused warm by the next decode). Readers of
 * data hold a reference (chunk_acquire); the last one out frees it. */
#define REF_USERS 0x3FFFFFFFu  /* readers holding the data */
#define REF_RETIRED 0x40000000u /* every page settled: free when unused */
#define REF_FREED 0x80000000u   /* data freed: load the chunk again to use it */
#define POOL_MAX 16             /* decoded-chunk buffers kept for reuse */

struct chunk {
    _Atomic int state;  /* enum chunk_state */
    uint8_t source;     /* RS_SRC_L1, _L2, _DURABLE or _HOST once READY */
    uint8_t mapped;     /* data is the host cache's mapping: never freed */
    uint8_t host_claimed; /* this engine holds the chunk's host fill lock */
    uint8_t *data;      /* decoded chunk (chunk_size bytes) once READY */
    _Atomic uint32_t ref;  /* REF_* */
    struct plist parked;
};

/* Counters, one per rs_engine_stats field that threads bump. */
struct counters {
    _Atomic uint64_t faults, pages_installed, bytes_installed, chunks_l1,
        chunks_fetched, chunks_failed, l1_misses, l1_bad, supply_rejected,
        removes, eexist, deferred, poisoned, chunks_released, chunks_reloaded, minor_faults,
        memfd_written;
    _Atomic uint64_t first_touches[RS_N_SOURCES];
    _Atomic uint64_t prefetch_chunks, prefetch_pages, faults_planned, faults_unplanned;
    _Atomic uint64_t l1_read_ns, decode_ns, demand_install_ns, prefetch_install_ns;
    _Atomic uint64_t chunks_host, host_fills, host_waits, host_errors, poll_ns, poll_hits;
};

struct rs_engine {
    rs_engine_config cfg;
    const rs_codec *codec;
    rs_engine_region *regions;
    size_t n_regions;
    uint64_t n_pages;             /* guest pages in the memory file */
    /* The tables below are borrowed from the caller (rs_engine_create). */
    const uint32_t *page_chunk;   /* per page: chunk or NO_CHUNK (NULL: the
                                     identity layout, see chunk_of) */
    const uint32_t *page_off;     /* per page: offset in the decoded chunk */
    uint64_t slots;               /* pages per chunk (identity layout) */
    rs_hostcache *host;           /* the version's host cache, or NULL */
    const uint8_t *ids;           /* n_chunks * RS_ID_BYTES */
    const uint32_t *lens, *flags; /* stored bytes, RS_CHUNK_* */
    const uint8_t *zero;          /* n_chunks * bm_bytes zero bitmaps */
    size_t bm_bytes;
    char *l1_dir;                 /* NULL: no L1 */
    struct chunk *chunks;
    _Atomic uint32_t *left;       /* per chunk: its pages in the regions not
                                     yet settled (apart from chunks: counted
                                     at creation, it is the only per-chunk
                                     state every session writes whole) */
    _Atomic uint64_t *present;    /* page installed (by anyone) */
    _Atomic uint64_t *removed;    /* page removed: zeros from now on */
    _Atomic uint64_t *touched;    /* page's first touch logged */
    _Atomic uint64_t *settled;    /* page present or removed at least once */
    uint8_t *zero_page;           /* page_size zeros, for huge pages */

    pthread_mutex_t lock;         /* chunk states, parked lists, deferred, done,
                                     prefetch in-flight count */
    pthread_rwlock_t install;     /* held for writing by the service thread
                                     while it reads and handles events, for
                                     reading by every other installer: no
                                     install lands between a REMOVE's read
                                     and its bookkeeping */

    /* Working-set plan (rs_engine_set_plan). */
    uint32_t *plan_chunks;        /* chunks, in first-planned order */
    uint32_t n_plan_chunks;
    uint64_t *plan_pages;         /* planned pages grouped by plan chunk,
                                     ascending within a chunk */
    uint64_t *plan_start;         /* plan chunk k: plan_pages[start[k]..start[k+1]) */
    int32_t *chunk_plan;          /* chunk -> plan chunk index, or -1 */
    uint64_t *plan_zero;          /* planned all-zero pages, ascending */
    uint64_t n_plan_zero;
    _Atomic uint64_t *planned;    /* bitmap: page is in the plan */
    _Atomic uint64_t *prefetched; /* bitmap: page installed by the prefetch */
    uint32_t prefetch_max;        /* chunk requests in flight at most */
    uint32_t prefetch_inflight;   /* under lock */
    uint8_t *prefetch_asked;      /* per chunk: requested by the prefetch,
                                     not yet settled (under lock) */
    pthread_cond_t prefetch_cv;
    pthread_t prefetch;
    int prefetch_started, stopping;
    int prefetch_issued;          /* the prefetch walked the whole plan (under lock) */
    pthread_cond_t done_cv;
    int done;
    struct plist deferred;        /* installs that met -EAGAIN */
    _Atomic size_t n_deferred;    /* deferred.n, readable without the lock */

    /* Buffers for decoded chunks: mmap'ed, so that a session's memory goes
     * back to the system when it ends (malloc keeps freed 512 KiB blocks in
     * its arenas), and a few kept for reuse, warm, within the session. */
    pthread_mutex_t pool_lock;
    uint8_t *pool[POOL_MAX];
    int pool_n;

    rs_fetchq *l1q, *remoteq;
    rs_faultlog *log;
    int uffd, conn_fd, wake_fd, stop_fd;
    int memfd;                    /* the guest memory's memfd, or -1 */
    int memfd_continue;           /* fill it by pwrite + UFFDIO_CONTINUE */
    _Atomic uint64_t *claimed;    /* continue mode: page being written into
                                     the memfd by someone */
    _Atomic uint64_t *written;    /* continue mode: ... and its bytes are in */
    pthread_t service;
    pthread_t *l1_threads;
    uint32_t n_l1_started;
    int service_started, stopped;
    _Atomic int stop_now;         /* rs_engine_stop was called: the service
                                     thread's poll loop checks it */
    uint64_t t0_ns;
    struct counters st;
    _Atomic int guest_gone;
    _Atomic int error;
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void note_error(rs_engine *e, int rc)
{
    int none = 0;

    atomic_compare_exchange_strong(&e->error, &none, rc);
}

static int bit_test(_Atomic uint64_t *bm, uint64_t i)
{
    return (atomic_load_explicit(&bm[i / 64], memory_order_acquire) >> (i % 64)) & 1;
}

/* Set bit i; returns its old value. */
static int bit_set(_Atomic uint64_t *bm, uint64_t i)
{
    uint64_t m = 1ull << (i % 64);

    return (atomic_fetch_or_explicit(&bm[i / 64], m, memory_order_acq_rel) & m) != 0;
}

static void bit_clear(_Atomic uint64_t *bm, uint64_t i)
{
    atomic_fetch_and_explicit(&bm[i / 64], ~(1ull << (i % 64)), memory_order_acq_rel);
}

static int plist_push(struct plist *l, uint64_t page, uint64_t t_ns)
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

static struct plist plist_take(struct plist *l)
{
    struct plist out = *l;

    memset(l, 0, sizeof(*l));
    return out;
}

/* Guest page of a host address, and the index of its region (-1: none). */
static int page_of(const rs_engine *e, uint64_t addr, uint64_t *page)
{
    for (size_t i = 0; i < e->n_regions; i++) {
        const rs_engine_region *r = &e->regions[i];

        if (addr >= r->base && addr - r->base < r->size) {
            *page = (r->offset + (addr - r->base)) / e->cfg.page_size;
            return (int)i;
        }
    }
    return -1;
}

/* Host address of guest page p in region r (the caller knows p is in r). */
static uint64_t addr_of(const rs_engine *e, int r, uint64_t p)
{
    const rs_engine_region *g = &e->regions[r];

    return g->base + (p * e->cfg.page_size - g->offset);
}

static int in_region(const rs_engine *e, int r, uint64_t p)
{
    const rs_engine_region *g = &e->regions[r];
    uint64_t off = p * e->cfg.page_size;

    return off >= g->offset && off - g->offset < g->size;
}

/* Chunk of guest page p (NO_CHUNK: an all-zero page), and the page's byte
 * offset in the decoded chunk. Without page tables the layout is the
 * identity: slot p % slots of chunk p / slots, zero when its bit is set. */
static uint32_t chunk_of(const rs_engine *e, uint64_t p)
{
    uint64_t c, s;

    if (e->page_chunk)
        return e->page_chunk[p];
    c = p / e->slots;
    s = p % e->slots;
    return (e->zero[c * e->bm_bytes + s / 8] >> (s % 8) & 1) ? NO_CHUNK : (uint32_t)c;
}

static uint64_t off_of(const rs_engine *e, uint64_t p)
{
    return e->page_off ? e->page_off[p] : (p % e->slots) * e->cfg.page_size;
}

static void wake_service(rs_engine *e)
{
    uint64_t one = 1;

    if (write(e->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        note_error(e, -errno);
}

/* Queue a fault for the service thread to retry (after -EAGAIN). */
static void push_deferred(rs_engine *e, uint64_t page, uint64_t t_ns)
{
    pthread_mutex_lock(&e->lock);
    if (plist_push(&e->deferred, page, t_ns) < 0)
        note_error(e, -ENOMEM);
    atomic_store(&e->n_deferred, e->deferred.n);
    pthread_mutex_unlock(&e->lock);
}

/* Defer a fault met by another thread, and wake the service thread. */
static void defer(rs_engine *e, uint64_t page, uint64_t t_ns)
{
    push_deferred(e, page, t_ns);
    atomic_fetch_add(&e->st.deferred, 1);
    wake_service(e);
}

/* Append the first-touch record of page p (once per page); 1 if it was
 * the first. */
static int log_record(rs_engine *e, uint64_t p, uint32_t chunk, int src, uint64_t t_ns,
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
static void log_touch(rs_engine *e, uint64_t p, uint32_t chunk, int src, uint64_t t_ns)
{
    if (log_record(e, p, chunk, src, t_ns, now_ns() - t_ns) && e->planned)
        atomic_fetch_add(bit_test(e->planned, p) ? &e->st.faults_planned : &e->st.faults_unplanned, 1);
}

/* With a plan, a planned page that an install brings in ahead of its touch
 * is logged there (source prefetched), in place of the demand fault it
 * would have caused: a session that replays a plan records as much as one
 * that did not. Pages [lo, upto) were just installed; skip is the page
 * whose fault is being served (logged by its caller), or UINT64_MAX. */
static void log_planned(rs_engine *e, uint64_t lo, uint64_t upto, uint64_t skip)
{
    uint64_t t = now_ns();

    if (!e->planned)
        return;
    for (uint64_t q = lo; q < upto; q++)
        if (q != skip && bit_test(e->planned, q))
            log_record(e, q, chunk_of(e, q), RS_SRC_PREFETCHED, t, 0);
}

static uint8_t *chunk_alloc(rs_engine *e)
{
    void *p = NULL;

    pthread_mutex_lock(&e->pool_lock);
    if (e->pool_n > 0)
        p = e->pool[--e->pool_n];
    pthread_mutex_unlock(&e->pool_lock);
    if (!p) {
        p = mmap(NULL, e->cfg.chunk_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            p = NULL;
    }
    return p;
}

static void chunk_free(rs_engine *e, uint8_t *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&e->pool_lock);
    if (e->pool_n < POOL_MAX) {
        e->pool[e->pool_n++] = p;
        p = NULL;
    }
    pthread_mutex_unlock(&e->pool_lock);
    if (p)
        munmap(p, e->cfg.chunk_size);
}

/* Take a reference on chunk c's decoded data: 0 when it was freed. */
static int chunk_acquire(rs_engine *e, uint32_t c)
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

    if (e->chunks[c].mapped)
        return; /* the host cache's bytes: nothing of ours to free */
    if (atomic_load(&e->chunks[c].state) == C_READY &&
        atomic_compare_exchange_strong(&e->chunks[c].ref, &v, REF_RETIRED | REF_FREED)) {
        chunk_free(e, e->chunks[c].data);
        atomic_fetch_add(&e->st.chunks_released, 1);
    }
}

static void chunk_release(rs_engine *e, uint32_t c)
{
    if (atomic_fetch_sub(&e->chunks[c].ref, 1) - 1 == REF_RETIRED)
        chunk_try_free(e, c);
}

/* Page q is present or removed: when it is the last unsettled page of
 * its chunk, the chunk's decoded copy is no longer needed. */
static void settle_page(rs_engine *e, uint64_t q)
{
    uint32_t c = chunk_of(e, q);

    if (c == NO_CHUNK || bit_set(e->settled, q))
        return;
    if (atomic_fetch_sub(&e->left[c], 1) == 1) {
        uint32_t old = atomic_fetch_or(&e->chunks[c].ref, REF_RETIRED);

        if (!(old & REF_USERS))
            chunk_try_free(e, c);
    }
}

/* Result of an install ioctl: 0 done, -EAGAIN retry later, other -errno. */
static int ioctl_result(rs_engine *e, int rc)
{
    if (rc == -ESRCH) {
        atomic_store(&e->guest_gone, 1);
        wake_service(e);
    } else if (rc && rc != -EAGAIN) {
        note_error(e, rc);
    }
    return rc;
}

/* May page q join a fault-around run of chunk c (NO_CHUNK: of zero
 * pages) in region r? */
static int candidate(rs_engine *e, int r, uint32_t c, uint64_t q)
{
    return q < e->n_pages && in_region(e, r, q) && chunk_of(e, q) == c &&
           !bit_test(e->present, q) && !bit_test(e->removed, q);
}

/* Set while this thread installs for the prefetch: what it installs is
 * marked prefetched, and its install time is counted apart. */
static _Thread_local int in_prefetch;

/* Continue mode: write the pages of [lo, hi) (their bytes at src, the run
 * contiguous there) into the memfd at their file offsets, each page by
 * whichever thread claims it first. Returns the first page that cannot be
 * mapped yet (another thread claimed it and has not finished writing it,
 * or a write failed), hi when all can. The guest cannot see a page before
 * it is mapped, and a page mapped by us is never claimed again (it is
 * present), so no write ever lands on bytes the guest may have changed. */
static uint64_t write_run(rs_engine *e, const uint8_t *src, uint64_t lo, uint64_t hi)
{
    const uint64_t ps = e->cfg.page_size;
    uint64_t q = lo;

    while (q < hi) {
        uint64_t a = q;

        while (q < hi && !bit_set(e->claimed, q))
            q++;
        for (uint64_t k = a; k < q;) {
            ssize_t n = pwrite(e->memfd, src + (k - lo) * ps, (q - k) * ps, (off_t)(k * ps));

            if (n <= 0) {
                note_error(e, n < 0 ? -errno : -EIO);
                for (uint64_t j = k; j < q; j++)
                    bit_clear(e->claimed, j); /* let a later try write them */
                return k;
            }
            for (uint64_t j = k; j < k + (uint64_t)n / ps; j++)
                bit_set(e->written, j);
            atomic_fetch_add(&e->st.memfd_written, (uint64_t)n / ps);
            k += (uint64_t)n / ps;
        }
        if (q < hi) {
            if (!bit_test(e->written, q))
                return q;
            q++; /* written by another thread: map it all the same */
        }
    }
    return hi;
}

/* Install the run of pages [lo, hi) of region r: copied from src (the run
 * is contiguous there) or, when src is NULL, as zero pages. Pages found
 * present are skipped. The first ioctl wakes what it installs; once the
 * run is split, the rest goes in with DONTWAKE and one wake at the end.
 * *upto receives the first page not handled (hi when all were).
 * Returns 0, -EAGAIN (the mm is changing: retry later) or another -errno.
 *
 * The kernel reports a partial install as -EAGAIN with *done > 0, and
 * -EEXIST only when the first page of the request is present. */
static int fill_run(rs_engine *e, int r, const uint8_t *src, uint64_t lo,
                    uint64_t hi, uint64_t *upto)
{
    const uint64_t ps = e->cfg.page_size, dst = addr_of(e, r, lo);
    uint64_t off = 0, mode = 0, done, t0 = now_ns(), len;
    int rc = 0, split = 0, cont = src && src != e->zero_page && e->memfd_continue;

    if (cont) /* the bytes go into the memfd; the ioctls only map them */
        hi = write_run(e, src, lo, hi);
    len = (hi - lo) * ps;
    while (off < len) {
        done = 0;
        if (cont)
            rc = rs_uffd_continue(e->uffd, dst + off, len - off, mode, &done);
        else if (src)
            rc = rs_uffd_copy(e->uffd, dst + off, (uint64_t)(uintptr_t)(src + off),
                              len - off, mode, &done);
        else
            rc = rs_uffd_zeropage(e->uffd, dst + off, len - off, mode, &done);
        for (uint64_t k = 0; k < done / ps; k++) {
            bit_set(e->present, lo + off / ps + k);
            settle_page(e, lo + off / ps + k);
            if (in_prefetch)
                bit_set(e->prefetched, lo + off / ps + k);
        }
        if (in_prefetch)
            atomic_fetch_add(&e->st.prefetch_pages, done / ps);
        atomic_fetch_add(&e->st.pages_installed, done / ps);
        atomic_fetch_add(&e->st.bytes_installed, done);
        off += done;
        if (rc == -EAGAIN && done > 0) {
            split = split || mode == RS_UFFD_DONTWAKE;
            continue; /* partial: the next call says what stopped it */
        }
        if (rc != -EEXIST)
            break;
        atomic_fetch_add(&e->st.eexist, 1);
        bit_set(e->present, lo + off / ps);
        settle_page(e, lo + off / ps);
        off += ps;
        mode = RS_UFFD_DONTWAKE;
        split = 1;
        rc = 0;
    }
    if (split && off)
        (void)rs_uffd_wake(e->uffd, dst, off);
    *upto = lo + off / ps;
    atomic_fetch_add(in_prefetch ? &e->st.prefetch_install_ns : &e->st.demand_install_ns, now_ns() - t0);
    return ioctl_result(e, rc);
}

/* Serve a fault on zero page p (all zero, or removed) with zeros: one
 * UFFDIO_ZEROPAGE over the run of not-yet-present zero pages around it
 * within the fault-around window. hugetlbfs has no UFFDIO_ZEROPAGE: huge
 * pages are copied from a zero page, one at a time. */
static int install_zero(rs_engine *e, int r, uint64_t p, int around, uint64_t *lo_out,
                        uint64_t *upto_out)
{
    uint64_t lo = p, hi = p + 1, upto;
    int rc;

    if (e->cfg.page_size != 4096) {
        rc = fill_run(e, r, e->zero_page, p, p + 1, &upto);
        goto out;
    }
    if (around && e->cfg.fault_around > 1) {
        uint64_t w0 = p - p % e->cfg.fault_around, w1 = w0 + e->cfg.fault_around;

        while (lo > w0 && candidate(e, r, NO_CHUNK, lo - 1))
            lo--;
        while (hi < w1 && candidate(e, r, NO_CHUNK, hi))
            hi++;
    }
    rc = fill_run(e, r, NULL, lo, hi, &upto);
    if (rc == -EAGAIN && upto > p)
        rc = 0;
out:
    if (lo_out) {
        *lo_out = lo;
        *upto_out = upto;
    }
    return rc;
}

static int install_poison(rs_engine *e, int r, uint64_t p)
{
    uint64_t dst = addr_of(e, r, p), ps = e->cfg.page_size;
    int rc = rs_uffd_poison(e->uffd, dst, ps, 0, NULL);

    if (rc == -EEXIST)
        rc = rs_uffd_wake(e->uffd, dst, ps);
    else if (rc == 0)
        atomic_fetch_add(&e->st.poisoned, 1);
    return ioctl_result(e, rc);
}

/* The run around page p of chunk c in region r: [*lo, *hi), the
 * not-yet-present pages around p within its aligned window of `window`
 * pages that are contiguous in the chunk. */
static void run_around(rs_engine *e, int r, uint32_t c, uint64_t p, uint32_t window, uint64_t *lo,
                       uint64_t *hi)
{
    const uint64_t ps = e->cfg.page_size;

    *lo = p;
    *hi = p + 1;
    if (window > 1) {
        uint64_t w0 = p - p % window;
        uint64_t w1 = w0 + window;

        while (*lo > w0 && candidate(e, r, c, *lo - 1) &&
               off_of(e, *lo - 1) + ps == off_of(e, *lo))
            (*lo)--;
        while (*hi < w1 && candidate(e, r, c, *hi) &&
               off_of(e, *hi) == off_of(e, *hi - 1) + ps)
            (*hi)++;
    }
}

static int install_from_chunk(rs_engine *e, int r, uint64_t p, uint32_t c)
{
    uint64_t lo, hi, upto;
    int rc;

    run_around(e, r, c, p, e->cfg.fault_around, &lo, &hi);
    rc = fill_run(e, r, e->chunks[c].data + off_of(e, lo), lo, hi, &upto);
    if (rc == -EAGAIN && upto > p)
        rc = 0; /* the faulting page made it; the rest may fault later */
    else if (rc == 0 && upto <= p)
        rc = -EAGAIN; /* continue mode: another thread is writing it */
    log_planned(e, lo, upto, p);
    return rc;
}

/* Under e->lock, chunk c ABSENT: when the host cache holds it, make it
 * READY with the host cache's bytes (nothing to read or decode) and return
 * 1; else 0. */
static int adopt_host(rs_engine *e, uint32_t c)
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
static rs_fetchq *first_queue(rs_engine *e, int *state)
{
    int local = e->l1_dir != NULL || e->host != NULL;

    *state = local ? C_QUEUED_L1 : C_QUEUED_REMOTE;
    return local ? e->l1q : e->remoteq;
}

/* Serve a fault on guest page p (region r) that arrived at t_ns.
 * Returns 0 when served, 1 when parked on its chunk, -EAGAIN when it must
 * be retried after draining events, or another -errno. */
static int serve_page(rs_engine *e, int r, uint64_t p, uint64_t t_ns)
{
    uint32_t c;
    int rc, state;

    if (bit_test(e->removed, p)) {
        rc = install_zero(e, r, p, 0, NULL, NULL);
        if (rc == 0)
            log_touch(e, p, chunk_of(e, p), RS_SRC_REMOVED, t_ns);
        return rc;
    }
    c = chunk_of(e, p);
    if (c == NO_CHUNK) {
        uint64_t lo, upto;

        rc = install_zero(e, r, p, 1, &lo, &upto);
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
        rc = plist_push(&e->chunks[c].parked, p, t_ns);
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

static int region_of_page(const rs_engine *e, uint64_t p)
{
    for (size_t i = 0; i < e->n_regions; i++)
        if (in_region(e, (int)i, p))
            return (int)i;
    return -1;
}

/* Serve page p from any thread; -EAGAIN hands it to the service thread. */
static void serve_or_defer(rs_engine *e, uint64_t p, uint64_t t_ns)
{
    int r = region_of_page(e, p);

    if (r >= 0 && serve_page(e, r, p, t_ns) == -EAGAIN)
        defer(e, p, t_ns);
}

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
static void prefetch_install(rs_engine *e, uint32_t c, uint32_t k)
{
    const uint64_t ps = e->cfg.page_size, end = e->plan_start[k + 1];
    uint64_t i = e->plan_start[k];

    if (!chunk_acquire(e, c))
        return; /* every page of the chunk is in already */
    while (i < end) {
        uint64_t p = e->plan_pages[i++], lo, hi, lo2, hi2, upto;
        int r = region_of_page(e, p);

        if (r < 0 || !candidate(e, r, c, p))
            continue;
        /* The install lock is taken per run, so a demand fault waits for
         * at most one run (a chunk's worth), never for the whole plan. */
        pthread_rwlock_rdlock(&e->install);
        run_around(e, r, c, p, e->cfg.prefetch_around, &lo, &hi);
        while (i < end && e->plan_pages[i] <= hi) {
            uint64_t q = e->plan_pages[i];

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
        in_prefetch = 1;
        (void)fill_run(e, r, e->chunks[c].data + off_of(e, lo), lo, hi, &upto);
        in_prefetch = 0;
        log_planned(e, lo, upto, UINT64_MAX);
        pthread_rwlock_unlock(&e->install);
    }
    chunk_release(e, c);
}

/* Install the plan's all-zero pages, each with its zero fault-around run
 * (one UFFDIO_ZEROPAGE per run), as their demand faults did. */
static void prefetch_zero(rs_engine *e)
{
    pthread_rwlock_rdlock(&e->install);
    for (uint64_t i = 0; i < e->n_plan_zero; i++) {
        uint64_t p = e->plan_zero[i], lo, upto;
        int r = region_of_page(e, p), rc;

        if (r < 0 || !candidate(e, r, NO_CHUNK, p))
            continue;
        in_prefetch = 1;
        rc = install_zero(e, r, p, 1, &lo, &upto);
        in_prefetch = 0;
        if (rc == 0)
            log_planned(e, lo, upto, UINT64_MAX);
    }
    pthread_rwlock_unlock(&e->install);
}

static void *prefetch_main(void *arg)
{
    rs_engine *e = arg;

    prefetch_zero(e);
    for (uint32_t k = 0; k < e->n_plan_chunks; k++) {
        uint32_t c = e->plan_chunks[k];
        int state;

        pthread_mutex_lock(&e->lock);
        while (e->prefetch_inflight >= e->prefetch_max && !e->stopping)
            pthread_cond_wait(&e->prefetch_cv, &e->lock);
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
            e->prefetch_asked[c] = 1;
            e->prefetch_inflight++;
            atomic_fetch_add(&e->st.prefetch_chunks, 1);
        }
        pthread_mutex_unlock(&e->lock);
    }
    pthread_mutex_lock(&e->lock);
    e->prefetch_issued = 1;
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

/* Publish a decoded chunk (or its failure) and serve its parked faults.
 * mapped: data is the host cache's mapping (not a buffer of the pool). */
static void settle_chunk(rs_engine *e, uint32_t c, uint8_t *data, int src, int mapped)
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
    if (data && e->chunk_plan && e->chunk_plan[c] >= 0)
        prefetch_install(e, c, (uint32_t)e->chunk_plan[c]);
    if (data)
        chunk_release(e, c);

    pthread_mutex_lock(&e->lock);
    asked = e->prefetch_asked && e->prefetch_asked[c];
    if (asked) {
        e->prefetch_asked[c] = 0;
        e->prefetch_inflight--;
        pthread_cond_signal(&e->prefetch_cv);
    }
    pthread_mutex_unlock(&e->lock);
}

static void retry_deferred(rs_engine *e)
{
    struct plist again;

    if (!atomic_load(&e->n_deferred))
        return;
    pthread_mutex_lock(&e->lock);
    again = plist_take(&e->deferred);
    atomic_store(&e->n_deferred, 0);
    pthread_mutex_unlock(&e->lock);
    for (size_t i = 0; i < again.n; i++) {
        uint64_t p = again.v[i].page;
        int r = region_of_page(e, p);

        if (r >= 0 && serve_page(e, r, p, again.v[i].t_ns) == -EAGAIN)
            push_deferred(e, p, again.v[i].t_ns);
    }
    free(again.v);
}

/* Drop file bytes [off, off + len) of the memfd from its page cache: a
 * removed range of shared memory must read as zeros, as it does for
 * anonymous memory, not as what it held. */
static void punch(rs_engine *e, uint64_t off, uint64_t len)
{
    if (e->memfd >= 0 &&
        fallocate(e->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
        note_error(e, -errno);
}

static void handle_remove(rs_engine *e, uint64_t start, uint64_t end)
{
    const uint64_t ps = e->cfg.page_size;

    atomic_fetch_add(&e->st.removes, 1);
    for (size_t i = 0; i < e->n_regions; i++) {
        const rs_engine_region *g = &e->regions[i];
        uint64_t a = start > g->base ? start : g->base;
        uint64_t b = end < g->base + g->size ? end : g->base + g->size;

        if (a < b)
            punch(e, g->offset + (a - g->base) - (a - g->base) % ps,
                  b - a + (a - g->base) % ps);

        for (uint64_t addr = a - (a - g->base) % ps; addr < b; addr += ps) {
            uint64_t p = (g->offset + (addr - g->base)) / ps;

            bit_set(e->removed, p);
            bit_clear(e->present, p);
            settle_page(e, p);
        }
    }
}

/* A minor fault on page p: the page is in the memfd's page cache but not
 * mapped in the guest (its mapping was dropped without a REMOVE we were
 * told of, or the fault came between an install putting the page in the
 * cache and mapping it). Its bytes are the guest's own: map them with
 * UFFDIO_CONTINUE. A removed page gets zeros instead. */
static int serve_minor(rs_engine *e, int r, uint64_t p, uint64_t t_ns)
{
    const uint64_t ps = e->cfg.page_size, dst = addr_of(e, r, p);
    uint32_t c = chunk_of(e, p);
    int rc;

    if (bit_test(e->removed, p)) {
        punch(e, p * ps, ps);
        return serve_page(e, r, p, t_ns);
    }
    if (e->claimed && bit_test(e->claimed, p) && !bit_test(e->written, p))
        return -EAGAIN; /* its bytes are still being written */
    rc = rs_uffd_continue(e->uffd, dst, ps, 0, NULL);
    if (rc == -EFAULT) /* gone from the cache meanwhile: a missing page now */
        return serve_page(e, r, p, t_ns);
    if (rc == -EEXIST)
        return ioctl_result(e, rs_uffd_wake(e->uffd, dst, ps));
    if (rc == 0) {
        bit_set(e->present, p);
        settle_page(e, p);
        log_touch(e, p, c, c == NO_CHUNK ? RS_SRC_ZERO : e->chunks[c].source, t_ns);
    }
    return ioctl_result(e, rc);
}

static void handle_fault(rs_engine *e, const rs_uffd_event *ev)
{
    uint64_t t = now_ns(), p;
    uint64_t addr = ev->address & ~(e->cfg.page_size - 1);
    int r = page_of(e, addr, &p), rc;

    atomic_fetch_add(&e->st.faults, 1);
    if (r < 0 || p >= e->n_pages) {
        /* Memory the handshake did not describe: never guess its bytes. */
        note_error(e, -EFAULT);
        rc = rs_uffd_poison(e->uffd, addr, e->cfg.page_size, 0, NULL);
        if (rc == 0)
            atomic_fetch_add(&e->st.poisoned, 1);
        return;
    }
    if (ev->flags & RS_UFFD_PAGEFAULT_MINOR) {
        atomic_fetch_add(&e->st.minor_faults, 1);
        rc = serve_minor(e, r, p, t);
    } else {
        rc = serve_page(e, r, p, t);
    }
    if (rc == -EAGAIN) {
        /* Retried by this thread once the pending events are read. */
        push_deferred(e, p, t);
        atomic_fetch_add(&e->st.deferred, 1);
    }
}

/* Read and handle the uffd's pending events; returns how many, or -errno. */
static int drain_events(rs_engine *e)
{
    rs_uffd_event ev[EVENT_BATCH];
    int n, total = 0;

    /* Read again only after a full batch: after a short one the queue is
     * empty, and going straight back to poll() keeps the thread's work
     * after waking a guest short (the scheduler then tends to keep guest
     * and handler on one CPU). */
    do {
        n = rs_uffd_read_events(e->uffd, ev, EVENT_BATCH);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            switch (ev[i].event) {
            case RS_UFFD_EVENT_PAGEFAULT:
                handle_fault(e, &ev[i]);
                break;
            case RS_UFFD_EVENT_REMOVE:
            case RS_UFFD_EVENT_UNMAP:
                handle_remove(e, ev[i].address, ev[i].end);
                break;
            default:
                break;
            }
        }
        total += n;
    } while (n == EVENT_BATCH);
    return n < 0 ? n : total;
}

/* Handle the uffd's events with the install lock held for writing. */
static int handle_events(rs_engine *e)
{
    int rc;

    pthread_rwlock_wrlock(&e->install);
    rc = drain_events(e);
    pthread_rwlock_unlock(&e->install);
    if (rc < 0 && rc != -EAGAIN) {
        note_error(e, rc);
        atomic_store(&e->guest_gone, 1);
    }
    return rc;
}

/* After serving a fault, keep looking at the uffd for poll_us (restarted
 * by every event found) instead of sleeping: a guest that faults again
 * soon finds this thread awake, with no wake-up to wait for and no hop to
 * another CPU. The look is a poll() with no timeout (no install lock
 * taken); between looks the CPU is offered to whoever else is runnable on
 * it (the guest itself, when they share one). Nothing is spent once the
 * guest stops faulting for poll_us. */
static void poll_busy(rs_engine *e)
{
    const uint64_t window = (uint64_t)e->cfg.poll_us * 1000;
    struct pollfd pfd = { .fd = e->uffd, .events = POLLIN };
    uint64_t t = now_ns(), end = t + window, idle = 0;

    while (t < end && !atomic_load_explicit(&e->stop_now, memory_order_relaxed) &&
           !atomic_load(&e->guest_gone) && !atomic_load(&e->n_deferred)) {
        uint64_t t1;

        if (poll(&pfd, 1, 0) > 0) {
            int n = pfd.revents & POLLIN ? handle_events(e) : 0;

            if (pfd.revents & (POLLERR | POLLHUP))
                atomic_store(&e->guest_gone, 1);
            if (n > 0)
                atomic_fetch_add(&e->st.poll_hits, (uint64_t)n);
            t = now_ns();
            end = t + window;
            continue;
        }
        sched_yield();
        t1 = now_ns();
        idle += t1 - t;
        t = t1;
    }
    atomic_fetch_add(&e->st.poll_ns, idle);
}

static void finish(rs_engine *e)
{
    pthread_mutex_lock(&e->lock);
    e->done = 1;
    pthread_cond_broadcast(&e->done_cv);
    pthread_mutex_unlock(&e->lock);
}

static void *service_main(void *arg)
{
    rs_engine *e = arg;
    struct pollfd pfd[4] = {
        { .fd = e->uffd, .events = POLLIN },
        { .fd = e->stop_fd, .events = POLLIN },
        { .fd = e->wake_fd, .events = POLLIN },
        { .fd = e->conn_fd, .events = POLLIN | POLLRDHUP },
    };
    nfds_t nfds = e->conn_fd >= 0 ? 4 : 3;

    while (!atomic_load(&e->guest_gone)) {
        int n;

        /* Deferred installs wait for a REMOVE's remover to resume, which
         * comes with no event of ours: look again soon. */
        n = poll(pfd, nfds, atomic_load(&e->n_deferred) ? 1 : -1);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            note_error(e, -errno);
            break;
        }
        if (pfd[1].revents)
            break;
        if (pfd[2].revents & POLLIN) {
            uint64_t v;

            if (read(e->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                note_error(e, -errno);
        }
        if (nfds == 4 && pfd[3].revents) {
            char buf[256];
            ssize_t got = 1;

            if (!(pfd[3].revents & (POLLHUP | POLLRDHUP | POLLERR)))
                got = recv(e->conn_fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (got == 0 || (pfd[3].revents & (POLLHUP | POLLRDHUP | POLLERR)))
                atomic_store(&e->guest_gone, 1);
        }
        if (pfd[0].revents & (POLLERR | POLLHUP))
            atomic_store(&e->guest_gone, 1);
        if ((pfd[0].revents & POLLIN) && handle_events(e) > 0 && e->cfg.poll_us)
            poll_busy(e);
        retry_deferred(e);
    }
    finish(e);
    return NULL;
}

/* Verify and decode stored bytes of chunk c into a new buffer (*out),
 * timed into decode_ns. */
static int decode_chunk(rs_engine *e, uint32_t c, const uint8_t *stored, size_t len, uint8_t **out)
{
    uint64_t t0 = now_ns();
    uint8_t *data = chunk_alloc(e);
    int rc = data ? rs_chunk_decode(e->codec, stored, len, e->ids + (size_t)c * RS_ID_BYTES,
                                    e->flags[c], e->zero + (size_t)c * e->bm_bytes, data)
                  : -ENOMEM;

    atomic_fetch_add(&e->st.decode_ns, now_ns() - t0);
    if (rc) {
        chunk_free(e, data);
        data = NULL;
    }
    *out = data;
    return rc;
}

/* Chunk c was verified and decoded into data (a pool buffer), its bytes
 * from tier src. When this engine is the chunk's host cache filler, write
 * it there and serve it from the host cache's mapping (the buffer goes
 * back to the pool); else serve it from the buffer. */
static void publish(rs_engine *e, uint32_t c, uint8_t *data, int src)
{
    struct chunk *ch = &e->chunks[c];

    if (ch->host_claimed) {
        int rc = rs_hostcache_fill(e->host, c, data, e->zero + (size_t)c * e->bm_bytes,
                                   rs_codec_page_size(e->codec));

        ch->host_claimed = 0;
        if (rc == 0) {
            atomic_fetch_add(&e->st.host_fills, 1);
            chunk_free(e, data);
            settle_chunk(e, c, (uint8_t *)rs_hostcache_chunk(e->host, c), src, 1);
            return;
        }
        atomic_fetch_add(&e->st.host_errors, 1);
    }
    settle_chunk(e, c, data, src, 0);
}

/* Become chunk c's host cache filler; 1 when the host cache has it (it is
 * settled from there), 0 otherwise (claimed, or the host cache failed:
 * the chunk is loaded as without one). */
static int host_load(rs_engine *e, uint32_t c)
{
    int waited, rc = rs_hostcache_claim(e->host, c, &waited);

    if (waited)
        atomic_fetch_add(&e->st.host_waits, 1);
    if (rc == 1) {
        atomic_fetch_add(&e->st.chunks_host, 1);
        settle_chunk(e, c, (uint8_t *)rs_hostcache_chunk(e->host, c), RS_SRC_HOST, 1);
        return 1;
    }
    if (rc == 0)
        e->chunks[c].host_claimed = 1;
    else
        atomic_fetch_add(&e->st.host_errors, 1);
    return 0;
}

/* Read chunk c from L1 into buf (bound bytes), decode and publish it;
 * 0 when done, -1 on a miss or a bad copy. */
static int l1_load(rs_engine *e, uint32_t c, uint8_t *buf, size_t bound)
{
    uint64_t t0 = now_ns();
    int64_t n = rs_l1_read(e->l1_dir, e->ids + (size_t)c * RS_ID_BYTES, buf, bound);

    atomic_fetch_add(&e->st.l1_read_ns, now_ns() - t0);
    if (n >= 0 && (uint64_t)n == e->lens[c]) {
        uint8_t *data;
        int rc = decode_chunk(e, c, buf, (size_t)n, &data);

        if (rc == 0) {
            atomic_fetch_add(&e->st.chunks_l1, 1);
            publish(e, c, data, RS_SRC_L1);
            return 0;
        }
        atomic_fetch_add(&e->st.l1_bad, 1);
    } else if (n == -ENOENT) {
        atomic_fetch_add(&e->st.l1_misses, 1);
    } else {
        atomic_fetch_add(&e->st.l1_bad, 1);
    }
    return -1;
}

/* A local thread: host cache, then L1, then the fetchers ask the next
 * tiers (the host fill lock, if taken, stays held until they answer). */
static void *local_main(void *arg)
{
    rs_engine *e = arg;
    size_t bound = rs_codec_stored_bound(e->codec);
    uint8_t *buf = e->l1_dir ? malloc(bound) : NULL;
    uint32_t c;

    if (e->l1_dir && !buf) {
        note_error(e, -ENOMEM);
        return NULL;
    }
    while (rs_fetchq_pop(e->l1q, &c, NULL, -1) == 1) {
        if (e->host && host_load(e, c))
            continue;
        if (e->l1_dir && l1_load(e, c, buf, bound) == 0)
            continue;
        atomic_store(&e->chunks[c].state, C_QUEUED_REMOTE);
        if (rs_fetchq_push(e->remoteq, c, 1) == -ENOSPC)
            note_error(e, -ENOSPC);
    }
    free(buf);
    return NULL;
}

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
    rs_zfree((void *)e->claimed, bm);
    rs_zfree((void *)e->written, bm);
    free(e->l1_dir);
    free(e->zero_page);
    rs_fetchq_destroy(e->l1q);
    rs_fetchq_destroy(e->remoteq);
    rs_faultlog_destroy(e->log);
    free(e->plan_chunks);
    free(e->plan_pages);
    free(e->plan_start);
    free(e->chunk_plan);
    free(e->plan_zero);
    rs_zfree((void *)e->planned, bm);
    rs_zfree((void *)e->prefetched, bm);
    rs_zfree(e->prefetch_asked, e->cfg.n_chunks + 1);
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
    uint64_t pos;

    if (e->service_started || e->plan_chunks || !inflight)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (pages[i] >= e->n_pages)
            return -EINVAL;
    e->planned = rs_zalloc((e->n_pages + 63) / 64 * sizeof(uint64_t));
    e->prefetched = rs_zalloc((e->n_pages + 63) / 64 * sizeof(uint64_t));
    e->chunk_plan = malloc((nc + 1) * sizeof(int32_t));
    e->plan_chunks = malloc((nc + 1) * sizeof(uint32_t));
    e->plan_start = calloc(nc + 2, sizeof(uint64_t));
    e->plan_pages = malloc((n + 1) * sizeof(uint64_t));
    e->plan_zero = malloc((n + 1) * sizeof(uint64_t));
    e->prefetch_asked = rs_zalloc(nc + 1);
    count = calloc(nc + 1, sizeof(uint64_t));
    if (!e->planned || !e->prefetched || !e->chunk_plan || !e->plan_chunks || !e->plan_start ||
        !e->plan_pages || !e->plan_zero || !e->prefetch_asked || !count) {
        free(count);
        return -ENOMEM;
    }
    for (uint32_t c = 0; c < nc; c++)
        e->chunk_plan[c] = -1;
    /* Chunks in the order of their first planned page; pages grouped by
     * chunk (a page listed twice counts once). */
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pages[i];
        uint32_t c = chunk_of(e, p);

        if (bit_set(e->planned, p))
            continue;
        if (c == NO_CHUNK) {
            e->plan_zero[e->n_plan_zero++] = p;
            continue;
        }
        if (e->chunk_plan[c] < 0) {
            e->chunk_plan[c] = (int32_t)e->n_plan_chunks;
            e->plan_chunks[e->n_plan_chunks++] = c;
        }
        count[e->chunk_plan[c]]++;
    }
    pos = 0;
    for (uint32_t k = 0; k < e->n_plan_chunks; k++) {
        e->plan_start[k] = pos;
        pos += count[k];
        count[k] = e->plan_start[k]; /* next free slot of plan chunk k */
    }
    e->plan_start[e->n_plan_chunks] = pos;
    for (size_t i = 0; i < n; i++) /* again from nothing: only the plan's bits */
        bit_clear(e->planned, pages[i]);
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pages[i];
        uint32_t c = chunk_of(e, p);

        if (bit_set(e->planned, p) || c == NO_CHUNK)
            continue;
        e->plan_pages[count[e->chunk_plan[c]]++] = p;
    }
    for (uint32_t k = 0; k < e->n_plan_chunks; k++)
        qsort(e->plan_pages + e->plan_start[k], e->plan_start[k + 1] - e->plan_start[k],
              sizeof(uint64_t), cmp_u64);
    qsort(e->plan_zero, e->n_plan_zero, sizeof(uint64_t), cmp_u64);
    e->prefetch_max = inflight;
    free(count);
    return 0;
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
 * decoded copy is freed when all of them are settled. With page tables,
 * a walk of the regions' pages; for the identity layout, a count of the
 * zero bitmaps' clear bits per chunk: setup stays proportional to the
 * chunk table, not to guest memory. */
static void count_left(rs_engine *e)
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
    if (e->page_chunk) /* used above to count each page once */
        memset((void *)e->settled, 0, (e->n_pages + 63) / 64 * sizeof(uint64_t));
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
    if (!cfg->page_size || cfg->page_size & (cfg->page_size - 1) ||
        cfg->page_size > cfg->chunk_size || cfg->memory_size % cfg->page_size ||
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
    e->uffd = e->conn_fd = e->wake_fd = e->stop_fd = e->memfd = -1;
    e->n_pages = cfg->memory_size / cfg->page_size;
    e->n_regions = n_regions;
    e->bm_bytes = rs_codec_bitmap_bytes(codec);
    words = (e->n_pages + 63) / 64;
    e->slots = cfg->chunk_size / cfg->page_size;
    if (!page_chunk != !page_off ||
        (!page_chunk && cfg->page_size != rs_codec_page_size(codec))) {
        rc = -EINVAL; /* the identity layout needs slots of one guest page */
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
        for (uint64_t p = 0; p < e->n_pages; p++) {
            if (page_chunk[p] != NO_CHUNK &&
                (page_chunk[p] >= cfg->n_chunks ||
                 (uint64_t)page_off[p] + cfg->page_size > cfg->chunk_size)) {
                rc = -EINVAL;
                goto fail;
            }
        }
    } else if ((e->n_pages + e->slots - 1) / e->slots > cfg->n_chunks) {
        rc = -EINVAL; /* the identity layout needs a chunk per slots pages */
        goto fail;
    }
    count_left(e);
    if (l1_dir && !(e->l1_dir = strdup(l1_dir)))
        goto fail;
    if (cfg->page_size != 4096 && !(e->zero_page = calloc(1, cfg->page_size)))
        goto fail;
    if ((rc = rs_fetchq_create(&e->l1q, cfg->n_chunks)) ||
        (rc = rs_fetchq_create(&e->remoteq, cfg->n_chunks)) ||
        (rc = rs_faultlog_create(&e->log, cfg->log_capacity ? cfg->log_capacity
                                                            : e->n_pages + 1024)))
        goto fail;
    e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->wake_fd < 0 || e->stop_fd < 0) {
        rc = -errno;
        goto fail;
    }
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->pool_lock, NULL);
    {
        pthread_condattr_t ca;
        pthread_rwlockattr_t ra;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&e->done_cv, &ca);
        pthread_condattr_destroy(&ca);
        pthread_cond_init(&e->prefetch_cv, NULL);
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
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    free(e);
    return rc;
}

int rs_engine_set_host_cache(rs_engine *e, const char *dir, const uint8_t *version_id)
{
    if (e->service_started || e->host)
        return -EINVAL;
    return rs_hostcache_open(&e->host, dir, e->cfg.n_chunks, e->cfg.chunk_size, version_id);
}

int rs_engine_set_memfd(rs_engine *e, int memfd, int mode)
{
    struct stat st;
    size_t words = (e->n_pages + 63) / 64;

    if (e->service_started || memfd < 0 || e->memfd >= 0 ||
        (mode != RS_MEMFD_COPY && mode != RS_MEMFD_CONTINUE) ||
        (mode == RS_MEMFD_CONTINUE && e->cfg.page_size != 4096))
        return -EINVAL;
    if (fstat(memfd, &st) < 0)
        return -errno;
    for (size_t i = 0; i < e->n_regions; i++)
        if ((uint64_t)st.st_size < e->regions[i].offset + e->regions[i].size)
            return -EINVAL;
    if (mode == RS_MEMFD_CONTINUE) {
        e->claimed = rs_zalloc(words * sizeof(uint64_t));
        e->written = rs_zalloc(words * sizeof(uint64_t));
        if (!e->claimed || !e->written)
            return -ENOMEM; /* freed with the engine */
        e->memfd_continue = 1;
    }
    e->memfd = memfd;
    return 0;
}

int rs_engine_start(rs_engine *e, int uffd, int conn_fd)
{
    sigset_t all, old;
    int rc = 0;

    if (e->service_started || e->stopped)
        return -EALREADY;
    e->uffd = uffd;
    e->conn_fd = conn_fd;
    e->t0_ns = now_ns();
    /* Our threads take no signals: Python's main thread handles them. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    if (!e->cfg.l1_threads) {
        /* No local threads: requests go straight to the fetchers. */
        free(e->l1_dir);
        e->l1_dir = NULL;
        rs_hostcache_close(e->host);
        e->host = NULL;
    }
    if (e->l1_dir || e->host) {
        e->l1_threads = calloc(e->cfg.l1_threads, sizeof(pthread_t));
        if (!e->l1_threads)
            rc = -ENOMEM;
        for (uint32_t i = 0; !rc && i < e->cfg.l1_threads; i++) {
            rc = -pthread_create(&e->l1_threads[i], NULL, local_main, e);
            if (!rc)
                e->n_l1_started++;
        }
    }
    if (!rc) {
        rc = -pthread_create(&e->service, NULL, service_main, e);
        e->service_started = rc == 0;
    }
    if (!rc && e->plan_chunks) {
        rc = -pthread_create(&e->prefetch, NULL, prefetch_main, e);
        e->prefetch_started = rc == 0;
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
    atomic_store(&e->stop_now, 1);
    if (write(e->stop_fd, &one, sizeof(one)) < 0)
        note_error(e, -errno);
    if (e->service_started)
        pthread_join(e->service, NULL);
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->prefetch_cv);
    pthread_mutex_unlock(&e->lock);
    rs_fetchq_close(e->l1q);
    rs_fetchq_close(e->remoteq);
    for (uint32_t i = 0; i < e->n_l1_started; i++)
        pthread_join(e->l1_threads[i], NULL);
    if (e->prefetch_started)
        pthread_join(e->prefetch, NULL);
    finish(e);
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
    while (e->pool_n > 0)
        munmap(e->pool[--e->pool_n], e->cfg.chunk_size);
    pthread_mutex_destroy(&e->pool_lock);
    free(e->deferred.v);
    free(e->l1_threads);
    close(e->wake_fd);
    close(e->stop_fd);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->done_cv);
    pthread_cond_destroy(&e->prefetch_cv);
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

int rs_engine_next_request(rs_engine *e, uint32_t *chunk, int timeout_ms)
{
    return rs_fetchq_pop(e->remoteq, chunk, NULL, timeout_ms);
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
    uint32_t parked = 0;

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
    for (uint32_t c = 0; c < e->cfg.n_chunks; c++)
        parked += (uint32_t)e->chunks[c].parked.n;
    out->prefetch_done = e->prefetch_issued && e->prefetch_inflight == 0;
    pthread_mutex_unlock(&e->lock);
    out->parked_now = parked;
    out->guest_gone = atomic_load(&e->guest_gone);
    out->error = atomic_load(&e->error);
}

size_t rs_engine_prefetched(rs_engine *e, uint64_t *out, size_t max)
{
    size_t n = 0;

    if (!e->prefetched)
        return 0;
    for (uint64_t w = 0; w < (e->n_pages + 63) / 64 && n < max; w++) {
        uint64_t bits = atomic_load(&e->prefetched[w]);

        while (bits && n < max) {
            out[n++] = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
        }
    }
    return n;
}

size_t rs_engine_log_read(rs_engine *e, rs_fault_record *out, size_t max)
{
    return rs_faultlog_copy(e->log, out, max);
}
