/* engine_int.h -- the engine's state, shared by its files (not the cdef).
 *
 * One restore session (engine.h) is served by several files, one per
 * concern, each with its own part of struct rs_engine:
 *
 *   engine.c    the API: lifecycle (create, start, stop, destroy), supply
 *               and fail from the fetchers, the fault log and the stats
 *   service.c   struct rs_service: the service thread reading the uffd's
 *               events (faults, REMOVE), polling between faults, and the
 *               installs it retries after -EAGAIN
 *   local.c     struct rs_local: the local threads (host cache, then L1,
 *               then the fetch queue) and decoding
 *   fault.c     the chunk state machine: a fault is served from a ready
 *               chunk or parks on its chunk; whoever settles the chunk
 *               serves what is parked
 *   install.c   struct rs_memfd: putting pages in the guest (UFFDIO_COPY,
 *               ZEROPAGE, POISON, CONTINUE after writing the memfd), runs
 *               and fault-around
 *   prefetch.c  struct rs_plan: the working-set plan and its thread
 *   huge.c      guest pages larger than the snapshot's pages (2 MiB
 *               hugetlbfs): each assembled from every chunk it spans
 *   pool.c      struct rs_pool: buffers of decoded chunks, the references
 *               readers hold on them, the per-chunk page counts that free
 *               a buffer once its pages are in
 *   state.c     what every thread does to the shared state: parked-fault
 *               lists, first-touch records, adopting a host-cache chunk,
 *               deferring a fault to the service thread and waking it
 *   hostcache.c the host cache's files (hostcache.h)
 *   l1.c        reading an L1 file (l1.h)
 *
 * Each file calls only those below it in this order: engine.c on top;
 * service.c and local.c; fault.c; prefetch.c; huge.c; install.c; pool.c;
 * state.c; then hostcache.c, l1.c, fetchq.c, faultlog.c, chunk.c, uffd.c.
 */
#ifndef RS_PRIVATE_ENGINE_INT_H
#define RS_PRIVATE_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "../chunk.h"
#include "../faultlog.h"
#include "../fetchq.h"
#include "../hostcache.h"
#include "../uffd.h"
#include "../engine.h"

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
 * data hold a reference (chunk_acquire); the last one out frees it. A
 * chunk served from the host cache's mapping is never freed. */
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
    _Atomic uint64_t chunks_host, host_fills, host_waits, host_errors, host_fill_ns, poll_ns, poll_hits;
};

/* pool.c: buffers for decoded chunks, mmap'ed so that a session's memory
 * goes back to the system when it ends (malloc keeps freed 512 KiB blocks
 * in its arenas), a few kept for reuse, warm, within the session. */
struct rs_pool {
    pthread_mutex_t lock;
    uint8_t *bufs[POOL_MAX];
    int n;
    uint8_t *huge[POOL_MAX];      /* guest-page buffers (huge.c), kept for reuse */
    int n_huge;
};

/* prefetch.c: the working-set plan (rs_engine_set_plan). */
struct rs_plan {
    uint32_t *chunks;             /* chunks, in first-planned order */
    uint32_t n_chunks;
    uint64_t *pages;              /* planned pages grouped by plan chunk,
                                     ascending within a chunk (a huge page
                                     is listed under each of its chunks) */
    uint64_t *start;              /* plan chunk k: pages[start[k]..start[k+1]) */
    int32_t *of_chunk;            /* chunk -> plan chunk index, or -1 */
    uint64_t *zero;               /* planned all-zero pages, ascending */
    uint64_t n_zero;
    _Atomic uint64_t *planned;    /* bitmap: page is in the plan */
    _Atomic uint64_t *prefetched; /* bitmap: page installed by the prefetch */
    uint32_t max;                 /* chunk requests in flight at most */
    uint32_t inflight;            /* under e->lock */
    uint8_t *asked;               /* per chunk: requested by the prefetch,
                                     not yet settled (under e->lock) */
    pthread_cond_t cv;            /* inflight went down */
    pthread_t thread;
    int started;
    int issued;                   /* walked the whole plan (under e->lock) */
};

/* service.c: the thread that reads the guest's uffd. */
struct rs_service {
    int uffd;                     /* the guest's, borrowed */
    int conn_fd;                  /* the guest's connection, borrowed, or -1 */
    int pid_fd;                   /* the VMM's pidfd, borrowed, or -1 */
    _Atomic int conn_closed;      /* the connection ended, the session went on */
    int wake_fd, stop_fd;         /* eventfds: look again / stop */
    pthread_t thread;
    int started;
    _Atomic int stop_now;         /* rs_engine_stop was called: polling stops */
    struct plist deferred;        /* installs that met -EAGAIN (under e->lock) */
    _Atomic size_t n_deferred;    /* deferred.n, readable without the lock */
};

/* install.c: the first page that could be neither served nor poisoned,
 * and the kill of the VMM it led to (stats.kill_*). */
struct rs_kill {
    _Atomic int state;            /* 0 none; 1 being recorded; 2 recorded */
    uint64_t addr;
    uint32_t chunk;
    int error, result;
};

/* install.c: a guest whose memory is a memfd (rs_engine_set_memfd). */
struct rs_memfd {
    int fd;                       /* the guest memory's memfd, or -1 */
    int cont;                     /* fill it by pwrite + UFFDIO_CONTINUE */
    _Atomic uint64_t *claimed;    /* continue mode: page being written into
                                     the memfd by someone */
    _Atomic uint64_t *written;    /* continue mode: ... and its bytes are in */
};

/* local.c: the threads that look in the host cache and L1. */
struct rs_local {
    char *l1_dir;                 /* NULL: no L1 */
    rs_fetchq *q;                 /* requests for them */
    pthread_t *threads;
    uint32_t n_started;
};

struct rs_engine {
    rs_engine_config cfg;
    const rs_codec *codec;
    rs_engine_region *regions;
    size_t n_regions;
    uint64_t n_pages;             /* guest pages in the memory file */
    uint64_t small;               /* the snapshot's page size (the codec's):
                                     the unit of the tables below, bytes */
    uint64_t sub;                 /* small pages per guest page: 1, or 512
                                     for 2 MiB guest pages (huge.c) */
    /* The tables below are borrowed from the caller (rs_engine_create). */
    const uint32_t *page_chunk;   /* per small page: chunk or NO_CHUNK (NULL:
                                     the identity layout, see chunk_of) */
    const uint32_t *page_off;     /* per small page: offset in the decoded
                                     chunk */
    const uint8_t *ids;           /* n_chunks * RS_ID_BYTES */
    const uint32_t *lens, *flags; /* stored bytes, RS_CHUNK_* */
    const uint8_t *zero;          /* n_chunks * bm_bytes zero bitmaps */
    size_t bm_bytes;
    uint64_t slots;               /* pages per chunk (identity layout) */
    rs_hostcache *host;           /* the version's host cache, or NULL */
    struct chunk *chunks;
    _Atomic uint32_t *left;       /* per chunk: guest pages in the regions
                                     that need it, not yet settled (a huge
                                     page counts once in each chunk it spans;
                                     apart from chunks: counted
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
    struct rs_plan plan;
    struct rs_pool pool;
    struct rs_service svc;
    struct rs_memfd memfd;
    struct rs_local local;
    struct rs_kill kill;
    rs_fetchq *remoteq;           /* requests for the fetchers */
    rs_faultlog *log;
    pthread_cond_t done_cv;
    int done;                     /* the service thread ended (under lock) */
    int stopping;                 /* rs_engine_stop is joining (under lock) */
    int stopped;
    uint64_t t0_ns;               /* session start, CLOCK_MONOTONIC */
    struct counters st;
    _Atomic int guest_gone;
    _Atomic int end_reason;       /* RS_END_*: the first reason to end */
    _Atomic int error;
};

/* ---- small helpers every file uses ---- */

static inline uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void note_error(rs_engine *e, int rc)
{
    int none = 0;

    atomic_compare_exchange_strong(&e->error, &none, rc);
}

/* End the session for reason (RS_END_*; the first one given is kept). */
static inline void end_session(rs_engine *e, int reason)
{
    int none = RS_END_RUNNING;

    atomic_compare_exchange_strong(&e->end_reason, &none, reason);
    atomic_store(&e->guest_gone, 1);
}

/* Every chunk of the plan asked for and settled. Call with e->lock held;
 * when it turns true, done_cv is broadcast (rs_engine_wait_prefetch). */
static inline int prefetch_done(const rs_engine *e)
{
    return e->plan.issued && e->plan.inflight == 0;
}

static inline int bit_test(_Atomic uint64_t *bm, uint64_t i)
{
    return (atomic_load_explicit(&bm[i / 64], memory_order_acquire) >> (i % 64)) & 1;
}

/* Set bit i; returns its old value. */
static inline int bit_set(_Atomic uint64_t *bm, uint64_t i)
{
    uint64_t m = 1ull << (i % 64);

    return (atomic_fetch_or_explicit(&bm[i / 64], m, memory_order_acq_rel) & m) != 0;
}

static inline void bit_clear(_Atomic uint64_t *bm, uint64_t i)
{
    atomic_fetch_and_explicit(&bm[i / 64], ~(1ull << (i % 64)), memory_order_acq_rel);
}

/* Guest page of a host address, and the index of its region (-1: none). */
static inline int page_of(const rs_engine *e, uint64_t addr, uint64_t *page)
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
static inline uint64_t addr_of(const rs_engine *e, int r, uint64_t p)
{
    const rs_engine_region *g = &e->regions[r];

    return g->base + (p * e->cfg.page_size - g->offset);
}

static inline int in_region(const rs_engine *e, int r, uint64_t p)
{
    const rs_engine_region *g = &e->regions[r];
    uint64_t off = p * e->cfg.page_size;

    return off >= g->offset && off - g->offset < g->size;
}

static inline int region_of_page(const rs_engine *e, uint64_t p)
{
    for (size_t i = 0; i < e->n_regions; i++)
        if (in_region(e, (int)i, p))
            return (int)i;
    return -1;
}

/* Chunk of small page p (NO_CHUNK: an all-zero page), and the page's byte
 * offset in the decoded chunk. Small pages are the snapshot's (the unit of
 * its zero bitmaps and page map); for a guest with pages of that size they
 * are the guest's pages, else guest page g spans small pages g * sub to
 * g * sub + sub - 1 (page_chunks). Without page tables the layout is the
 * identity: slot p % slots of chunk p / slots, zero when its bit is set. */
static inline uint32_t chunk_of(const rs_engine *e, uint64_t p)
{
    uint64_t c, s;

    if (e->page_chunk)
        return e->page_chunk[p];
    c = p / e->slots;
    s = p % e->slots;
    return (e->zero[c * e->bm_bytes + s / 8] >> (s % 8) & 1) ? NO_CHUNK : (uint32_t)c;
}

static inline uint64_t off_of(const rs_engine *e, uint64_t p)
{
    return e->page_off ? e->page_off[p] : (p % e->slots) * e->small;
}

/* The chunks guest page g needs, each once, ascending, into cs (room for
 * e->sub entries); returns how many (0: an all-zero page). A 4 KiB guest
 * page needs one chunk at most; a 2 MiB one needs every chunk holding one
 * of its non-zero small pages: four with 512 KiB chunks, up to 512 with a
 * page map that scattered them. */
static inline uint32_t page_chunks(const rs_engine *e, uint64_t g, uint32_t *cs)
{
    uint32_t n = 0, c;

    for (uint64_t q = g * e->sub; q < (g + 1) * e->sub; q++) {
        uint32_t i;

        c = chunk_of(e, q);
        if (c == NO_CHUNK || (n && cs[n - 1] == c))
            continue; /* zero, or the same chunk as the page before */
        for (i = n; i > 0 && cs[i - 1] > c; i--)
            ;
        if (i > 0 && cs[i - 1] == c)
            continue;
        memmove(cs + i + 1, cs + i, (n - i) * sizeof(*cs));
        cs[i] = c;
        n++;
    }
    return n;
}

/* The chunk a guest page's log record names: its first non-zero small
 * page's (NO_CHUNK: all zero). */
static inline uint32_t log_chunk(const rs_engine *e, uint64_t g)
{
    for (uint64_t q = g * e->sub; q < (g + 1) * e->sub; q++)
        if (chunk_of(e, q) != NO_CHUNK)
            return chunk_of(e, q);
    return NO_CHUNK;
}

/* ---- state.c ---- */
int plist_push(struct plist *l, uint64_t page, uint64_t t_ns);
struct plist plist_take(struct plist *l);
int log_record(rs_engine *e, uint64_t p, uint32_t chunk, int src, uint64_t t_ns, uint64_t svc);
void log_touch(rs_engine *e, uint64_t p, uint32_t chunk, int src, uint64_t t_ns);
void log_planned(rs_engine *e, uint64_t lo, uint64_t upto, uint64_t skip);
int adopt_host(rs_engine *e, uint32_t c);
rs_fetchq *first_queue(rs_engine *e, int *state);
void wake_service(rs_engine *e);
void push_deferred(rs_engine *e, uint64_t page, uint64_t t_ns);
void defer(rs_engine *e, uint64_t page, uint64_t t_ns);
void engine_finish(rs_engine *e);

/* ---- fault.c ---- */
int serve_page(rs_engine *e, int r, uint64_t p, uint64_t t_ns);
void serve_or_defer(rs_engine *e, uint64_t p, uint64_t t_ns);
void settle_chunk(rs_engine *e, uint32_t c, uint8_t *data, int src, int mapped);

/* ---- service.c ---- */
void *service_main(void *arg);

/* ---- install.c ---- */
int ioctl_result(rs_engine *e, int rc);
int candidate(rs_engine *e, int r, uint32_t c, uint64_t q);
int fill_run(rs_engine *e, int r, const uint8_t *src, uint64_t lo, uint64_t hi, uint64_t *upto,
             int prefetch);
int install_zero(rs_engine *e, int r, uint64_t p, uint32_t window, uint64_t *lo_out,
                 uint64_t *upto_out, int prefetch);
int install_poison(rs_engine *e, int r, uint64_t p);
int poison_or_kill(rs_engine *e, uint64_t addr, uint32_t chunk);
void run_around(rs_engine *e, int r, uint32_t c, uint64_t p, uint32_t window, uint64_t *lo,
                uint64_t *hi);
void fill_window_rest(rs_engine *e, int r, uint32_t c, uint64_t p, uint32_t window, uint64_t lo,
                      uint64_t hi, int prefetch);
int install_from_chunk(rs_engine *e, int r, uint64_t p, uint32_t c);
void punch(rs_engine *e, uint64_t off, uint64_t len);

/* ---- huge.c ---- */
int serve_huge(rs_engine *e, int r, uint64_t p, uint64_t t_ns);
void prefetch_install_huge(rs_engine *e, uint32_t k);
void huge_buf_drain(rs_engine *e);

/* ---- prefetch.c ---- */
void prefetch_install(rs_engine *e, uint32_t c, uint32_t k);
void *prefetch_main(void *arg);
void prefetch_free(rs_engine *e);

/* ---- pool.c ---- */
uint8_t *pool_take(rs_engine *e, uint8_t **list, int *n, size_t size);
void pool_give(rs_engine *e, uint8_t **list, int *n, size_t size, uint8_t *p);
uint8_t *chunk_alloc(rs_engine *e);
void chunk_free(rs_engine *e, uint8_t *p);
void pool_drain(rs_engine *e);
int chunk_acquire(rs_engine *e, uint32_t c);
void chunk_release(rs_engine *e, uint32_t c);
void settle_page(rs_engine *e, uint64_t q);
void count_left(rs_engine *e);

/* ---- local.c ---- */
int decode_chunk(rs_engine *e, uint32_t c, const uint8_t *stored, size_t len, uint8_t **out);
void publish(rs_engine *e, uint32_t c, uint8_t *data, int src);
void *local_main(void *arg);

#endif
