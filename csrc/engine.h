/* engine.h -- one restore session: serve a guest's page faults from chunks.
 * (cdef: no macros, no includes; uses rs_codec from chunk.h and
 * rs_fault_record from faultlog.h.)
 *
 * The engine owns the chunk table, the page bitmaps and the service
 * threads of one guest. It never needs Python to resolve a fault (the file
 * of each part is in brackets; csrc/private/engine_int.h has their state):
 *
 *   service thread   [service.c]
 *                    poll(uffd, conn, pidfd, wake, stop) -> read events in
                    batches;
 *                    after an event it keeps reading the uffd without
 *                    sleeping for up to poll_us (the guest's next fault is
 *                    then read at once, with no wake-up of this thread)
 *     PAGEFAULT      [fault.c, install.c]
 *                    page -> (chunk, offset in the decoded chunk) through the
 *                    page table given at creation (the manifest's page map;
 *                    computed from the zero bitmaps when it has none)
 *                    zero page / removed range -> UFFDIO_ZEROPAGE
 *                    chunk READY  -> UFFDIO_COPY the page, or a fault-around
 *                                    run of not-yet-present pages of the
 *                                    chunk (one ioctl per contiguous run)
 *                    chunk in the host cache -> READY at once, its bytes the
 *                                    host cache's mapping (hostcache.h)
 *                    chunk FAILED -> UFFDIO_POISON (never wrong bytes);
 *                                    a kernel without it: the VMM is
 *                                    killed through its pidfd
 *                    otherwise    -> park the fault on the chunk and queue
 *                                    one high-priority request for it
 *                    [huge.c] a guest page larger than the snapshot's
 *                    pages (2 MiB) needs every chunk holding one of its
 *                    small pages: all are asked for, the fault parks on
 *                    the first not ready, and once all are READY the page
 *                    is assembled from them and copied whole (any FAILED
 *                    -> the whole page is poisoned)
 *     REMOVE         mark the range removed: later faults get zeros
 *   local threads    [local.c, hostcache.c, l1.c]
 *                    pop requests; with a host cache, become the chunk's
 *                    filler (or wait for the filler of another session or
 *                    process, then take its bytes); read DIR/<hex[0:2]>/<hex>
 *                    from L1, verify and decode (rs_chunk_decode) and write
 *                    the decoded chunk into the host cache; on a miss or a
 *                    bad copy pass the request on to the fetch queue
 *   fetchers         Python threads block in rs_engine_next_request (GIL
 *                    released), fetch from L2/durable, and hand the stored
 *                    bytes back through rs_engine_supply (verified and
 *                    decoded in C, then written into the host cache)
 *   prefetch thread  [prefetch.c] with a plan: installs its all-zero pages,
 *                    then walks its chunks in order, asking for each at low
 *                    priority (at most inflight at a time); whoever settles
 *                    a planned chunk installs its planned pages
 *
 * Whoever makes a chunk READY (or FAILED) serves the faults parked on it.
 * A chunk in the host cache is installed from the shared mapping (the page
 * cache of the host cache's data file) and never decoded again; without
 * one, a decoded copy lives in a buffer of the session's pool until every
 * page of it is in [pool.c]. Installs that meet -EAGAIN (a REMOVE in flight) are
 * handed to the service thread, which retries them after draining events.
 * Every first touch of a guest page is appended to the fault log; a
 * planned page the prefetch installed is logged when it is installed
 * (source prefetched), since a touch of a present page makes no event.
 *
 * The *_ns counters add up thread time per phase (several threads can
 * spend it at once): they say where a restore's CPU went.
 */

typedef struct rs_engine rs_engine;

typedef struct rs_engine_region {
    uint64_t base;    /* host virtual address of the region */
    uint64_t size;    /* bytes, a multiple of page_size */
    uint64_t offset;  /* offset of the region in the memory file, bytes */
} rs_engine_region;

typedef struct rs_engine_config {
    uint64_t memory_size;   /* bytes of the memory file */
    uint64_t chunk_size;    /* bytes per chunk (the codec's) */
    uint64_t page_size;     /* guest page size: the install unit, bytes */
    uint32_t n_chunks;      /* entries in the chunk table */
    uint32_t fault_around;  /* pages installed per fault at most (>= 1) */
    uint32_t l1_threads;    /* C threads reading L1 (0: no L1) */
    uint32_t log_capacity;  /* fault log records (0: one per guest page) */
    uint32_t prefetch_around; /* pages the prefetch installs around each
                               planned page: the fault-around the plan was
                               recorded with (0: fault_around) */
    uint32_t poll_us;       /* after an event, keep reading the uffd for up
                               to this long before sleeping in poll(), us
                               (0: sleep at once) */
    uint32_t no_poison;     /* 1: the kernel has no UFFDIO_POISON (before
                               Linux 6.6): a page that cannot be served is
                               never poisoned, its VMM is killed instead
                               (rs_engine_set_vmm) */
} rs_engine_config;

/* Why a session ended (rs_engine_stats.end_reason). */
enum {
    RS_END_RUNNING = 0,     /* it has not */
    RS_END_STOPPED = 1,     /* rs_engine_stop */
    RS_END_VMM_EXITED = 2,  /* the VMM's pidfd turned readable */
    RS_END_CONN_CLOSED = 3, /* the connection closed, and no pidfd tracks
                               the VMM */
    RS_END_MEMORY_GONE = 4, /* the guest's address space is gone (ESRCH,
                               or the uffd hung up) */
    RS_END_ERROR = 5,       /* reading the uffd or polling failed (error) */
    RS_END_UNSERVABLE = 6   /* a page could be neither served nor poisoned,
                               and the VMM could not be killed from here */
};

typedef struct rs_engine_stats {
    uint64_t faults;              /* page-fault events handled */
    uint64_t minor_faults;        /* of which minor (memfd page not mapped) */
    uint64_t memfd_written;       /* pages written into the memfd (continue mode) */
    uint64_t first_touches[16];   /* first touches by RS_SRC_* */
    uint64_t pages_installed;     /* guest pages installed, fault-around incl. */
    uint64_t bytes_installed;     /* bytes installed by copy or zeropage */
    uint64_t chunks_l1;           /* chunks decoded from L1 */
    uint64_t chunks_fetched;      /* chunks supplied by fetchers */
    uint64_t chunks_host;         /* chunks taken from the host cache as
                                     they were (no read, no decode) */
    uint64_t host_fills;          /* chunks this session decoded into the
                                     host cache */
    uint64_t host_waits;          /* chunks another session or process was
                                     filling: waited for, then taken */
    uint64_t host_errors;         /* host cache writes that failed (the
                                     chunk was served from memory) */
    uint64_t chunks_failed;       /* chunks given up on (pages poisoned) */
    uint64_t chunks_released;     /* decoded copies freed: all their pages in */
    uint64_t chunks_reloaded;     /* released chunks loaded again for a fault */
    uint64_t l1_misses;           /* L1 lookups that found no file */
    uint64_t l1_bad;              /* L1 files that failed verification */
    uint64_t supply_rejected;     /* supplied bytes that failed verification */
    uint64_t removes;             /* REMOVE events */
    uint64_t eexist;              /* installs that found the page present */
    uint64_t deferred;            /* installs retried after -EAGAIN */
    uint64_t poisoned;            /* pages poisoned */
    uint64_t log_dropped;         /* fault records lost to a full log */
    uint64_t prefetch_chunks;     /* plan chunks the prefetch installed from
                                     or asked for (all but failed ones) */
    uint64_t prefetch_pages;      /* pages installed by the prefetch */
    uint64_t faults_planned;      /* first touches of planned pages that still
                                     faulted (their chunk was not there yet) */
    uint64_t faults_unplanned;    /* first touches of pages not in the plan */
    uint64_t l1_read_ns;          /* time L1 threads spent reading files */
    uint64_t decode_ns;           /* time spent verifying and decoding chunks */
    uint64_t install_ns;          /* time spent in install ioctls (all) */
    uint64_t prefetch_install_ns; /* of which the prefetch's */
    uint64_t host_fill_ns;        /* time spent writing decoded chunks into
                                     the host cache */
    uint64_t poll_ns;             /* service thread CPU time spent reading an
                                     empty uffd between faults (poll_us) */
    uint64_t poll_hits;           /* events found while doing so */
    uint32_t parked_now;          /* faults waiting on chunks right now */
    uint32_t parked_remote_now;   /* of which on chunks handed to the network
                                     fetchers (L2, durable) */
    int32_t guest_gone;           /* 1 once the guest's memory is gone */
    int32_t error;                /* -errno of the first unexpected failure */
    uint32_t prefetch_done;       /* 1 once the prefetch has asked for every
                                     planned chunk and all of them settled */
    uint32_t conn_closed;         /* 1 once the connection closed while the
                                     session went on (a pidfd tracks the VMM) */
    int32_t end_reason;           /* RS_END_* */
    uint32_t vmm_killed;          /* 1: the engine killed the VMM (a page it
                                     could neither serve nor poison) */
    int32_t kill_error;           /* -errno of why the page could not be
                                     poisoned (-EOPNOTSUPP: no UFFDIO_POISON
                                     here), 0 if no page was unservable */
    int32_t kill_result;          /* 0, or -errno of pidfd_send_signal
                                     (-EBADF: no pidfd to kill with) */
    uint32_t kill_chunk;          /* the unservable page's chunk
                                     (0xFFFFFFFF: outside the regions) */
    uint64_t kill_addr;           /* its host address in the VMM */
} rs_engine_stats;

/* Create a session engine.
 * page_chunk, page_off: one entry per page of the codec's page size in the
 *   memory file (memory_size / the codec's page size): the chunk holding
 *   the page (0xFFFFFFFF for an all-zero page) and the page's byte offset
 *   inside the decoded chunk; both NULL for the identity layout (page p in
 *   slot p % slots of chunk p / slots, all-zero when its bit is set in the
 *   chunk's zero bitmap): nothing per page to build or hold.
 *   cfg->page_size, the guest's, is a multiple of the codec's page size;
 *   when larger (2 MiB hugetlbfs pages), each guest page is assembled from
 *   every chunk holding one of its pages and installed whole.
 * chunk_ids (n_chunks * 32 bytes), chunk_lens (stored bytes), chunk_flags,
 *   chunk_zero (n_chunks * bitmap bytes of the codec): the manifest's chunk
 *   table, as rs_chunk_decode takes it.
 * l1_dir: the L1 cache directory, or NULL.
 * The tables (page_chunk, page_off, chunk_*) are borrowed, not copied: they
 * are per snapshot version, shared by its sessions, and must outlive the
 * engine, as must the codec. Regions and l1_dir are copied. */
int rs_engine_create(rs_engine **out, const rs_engine_config *cfg,
                     const rs_codec *codec,
                     const rs_engine_region *regions, size_t n_regions,
                     const uint32_t *page_chunk, const uint32_t *page_off,
                     const uint8_t *chunk_ids, const uint32_t *chunk_lens,
                     const uint32_t *chunk_flags, const uint8_t *chunk_zero,
                     const char *l1_dir);

/* Give the engine a working-set plan before rs_engine_start: guest page
 * indices in the order the guest is expected to touch them. From the
 * start, a prefetch thread requests the plan's chunks in order at low
 * priority (demand faults always go first), at most inflight at a time,
 * and installs each chunk's planned pages as coalesced runs as soon as the
 * chunk is decoded; all-zero planned pages get zero pages at once. Pages
 * already present or removed are skipped. -EINVAL for a page outside the
 * memory file. */
int rs_engine_set_plan(rs_engine *e, const uint64_t *pages, size_t n_pages,
                       uint32_t inflight);

enum { RS_MEMFD_COPY = 0, RS_MEMFD_CONTINUE = 1 };

/* The guest's memory lives in memfd (shared, region r at its memory-file
 * offset, registered MISSING|MINOR): before rs_engine_start. mode says how
 * pages are filled:
 *   RS_MEMFD_COPY      as for anonymous memory: UFFDIO_COPY puts a page in
 *                      the memfd's page cache and maps it in one ioctl;
 *   RS_MEMFD_CONTINUE  "map, don't copy": the decoded bytes are written
 *                      into the memfd (pwrite, each page once) and the run
 *                      is mapped with UFFDIO_CONTINUE (4 KiB pages only).
 * Either way zero pages get UFFDIO_ZEROPAGE; minor faults (a page in the
 * cache but not mapped in the guest) are answered with UFFDIO_CONTINUE;
 * a REMOVE punches the range out of the memfd so that it reads as zeros.
 * The caller keeps owning memfd. -EINVAL when it is smaller than the
 * regions or the mode is unknown. */
int rs_engine_set_memfd(rs_engine *e, int memfd, int mode);

/* Serve from, and fill, the host cache of this snapshot version in dir
 * (hostcache.h; version_id: 32 bytes), before rs_engine_start. Chunks it
 * holds are installed from its mapping; chunks it lacks are decoded into
 * it once, by whichever session gets there first. Returns
 * rs_hostcache_open's result. */
int rs_engine_set_host_cache(rs_engine *e, const char *dir, const uint8_t *version_id);

/* Track the VMM by pidfd (a pidfd of the peer process, borrowed: the
 * caller closes it after rs_engine_stop), before rs_engine_start. The
 * service thread polls it: readable = the VMM exited, the session ends.
 * With a pidfd, the connection's end no longer ends the session (Firecracker
 * before v1.12 closes it right after the handshake): it is counted
 * (stats.conn_closed) and no longer polled. A page that can be neither
 * served nor poisoned kills the VMM with pidfd_send_signal(SIGKILL). */
int rs_engine_set_vmm(rs_engine *e, int pidfd);

/* Start serving: uffd is the guest's userfaultfd (API done, regions
 * registered, O_NONBLOCK), conn_fd the guest's connection (EOF or hangup
 * = the guest went away, unless a pidfd tracks the VMM) or -1. The caller keeps owning both fds and
 * closes them after rs_engine_stop. */
int rs_engine_start(rs_engine *e, int uffd, int conn_fd);

/* Stop every thread and wait for them; fetchers blocked in
 * rs_engine_next_request return -ESHUTDOWN. Idempotent. */
void rs_engine_stop(rs_engine *e);
void rs_engine_destroy(rs_engine *e);

/* Wait up to timeout_ms (< 0: forever) for the guest to go away (or the
 * engine to stop). Returns 1 when it has, 0 on timeout. */
int rs_engine_wait(rs_engine *e, int timeout_ms);

/* Wait up to timeout_ms (< 0: forever) for the prefetch to be done: every
 * chunk of the plan asked for and settled (rs_engine_stats.prefetch_done).
 * Returns 1 when it is; 0 on timeout, when there is no plan, or when the
 * guest went away or the engine stopped first. */
int rs_engine_wait_prefetch(rs_engine *e, int timeout_ms);

/* Fetcher side. next_request: 1 and *chunk set, 0 on timeout,
 * -ESHUTDOWN when stopping. supply: verify and decode stored bytes of a
 * requested chunk and serve its parked faults; source names the tier the
 * bytes came from (RS_SRC_L2 or RS_SRC_DURABLE; the chunk's first touches
 * are logged with it); a negative result (from rs_chunk_decode) leaves the
 * request open so another tier may be asked.
 * fail: give up on a chunk: its pending and future faults are poisoned. */
int rs_engine_next_request(rs_engine *e, uint32_t *chunk, int timeout_ms);
/* next_request, and *high: 1 for a demand request (a fault waits on the
 * chunk), 0 for a prefetch. A chunk asked for by the prefetch and then by
 * a fault comes twice, low then high; the second may find it settled. */
int rs_engine_next_request_prio(rs_engine *e, uint32_t *chunk, int *high, int timeout_ms);
int rs_engine_supply(rs_engine *e, uint32_t chunk, const uint8_t *stored,
                     size_t stored_len, int source);
int rs_engine_fail(rs_engine *e, uint32_t chunk, int err);

void rs_engine_get_stats(rs_engine *e, rs_engine_stats *out);

/* Copy the guest page indices the prefetch installed (fault-around runs
 * included), ascending, into out, at most max of them; returns how many
 * were copied (0 without a plan). stats.prefetch_pages is enough room. */
size_t rs_engine_prefetched(rs_engine *e, uint64_t *out, size_t max);

/* Copy up to max fault records (append order) to out; returns the count. */
size_t rs_engine_log_read(rs_engine *e, rs_fault_record *out, size_t max);
