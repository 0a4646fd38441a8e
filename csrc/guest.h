/* guest.h -- a test guest that plays Firecracker's UFFD backend (cdef: no
 * macros, no includes). Built into restore._testbed, not the engine.
 *
 * rs_guest_run() does what Firecracker does when it restores a snapshot with
 * a UFFD memory backend, then touches its memory along a trace:
 *
 *   1. mmap every region MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE (plus
 *      MAP_HUGETLB|MAP_HUGE_2MB when hugetlb);
 *   2. create a userfaultfd (O_CLOEXEC|O_NONBLOCK), handshake with
 *      UFFD_FEATURE_EVENT_REMOVE (unless told not to; plus MISSING_HUGETLBFS
 *      when hugetlb) and
 *      register every region in MISSING mode;
 *   3. connect to the handler's Unix stream socket and send ONE message:
 *      the payload is a JSON array with one object per region, in order,
 *
 *        [{"base_host_virt_addr":<u64>,"size":<bytes>,"offset":<bytes>,
 *          "page_size":<bytes>,"page_size_kib":<bytes>}, ...]
 *
 *      (page_size_kib is Firecracker's deprecated field: it carries bytes,
 *      the same value as page_size), and the uffd as one SCM_RIGHTS fd. The
 *      guest keeps its own copy of the uffd and the socket open until the
 *      trace is done, as Firecracker v1.12 does, and closes both at return
 *      (with RS_GUEST_CLOSE_CONN it closes the socket at once, as v1.10 and
 *      v1.11 do);
 *   4. run the ops in order (see rs_guest_op).
 *
 * A page the handler poisons makes the access raise SIGBUS, which the guest
 * does not catch: the process dies, as a VM would. Run it in a child
 * process (restore.guest.Guest does): a guest blocked on a fault holds
 * whatever its thread holds, the GIL included.
 *
 * Memory file layout: region i covers file bytes [offset, offset + size);
 * regions may leave gaps between them but must not overlap. A file offset
 * maps to base_i + (file offset - offset_i) in the region that holds it.
 */

/* One guest memory region. */
typedef struct rs_guest_region {
    uint64_t size;    /* bytes, a multiple of page_size, > 0 */
    uint64_t offset;  /* bytes: where the region starts in the memory file,
                         a multiple of page_size */
} rs_guest_region;

enum {
    RS_GUEST_READ = 0,   /* checksum one page */
    RS_GUEST_WRITE = 1,  /* fill one page with a byte pattern, checksum it */
    RS_GUEST_REMOVE = 2, /* madvise(MADV_DONTNEED) pages pages */
    RS_GUEST_WAIT = 3    /* wait for one byte on the handshake socket (the
                            handler's go-ahead; offset 0, pages 1) */
};

/* How rs_guest_run_local backs guest memory with the memory file. */
enum {
    RS_GUEST_RESIDENT = 0, /* anonymous memory, the file read in full first */
    RS_GUEST_MMAP = 1      /* the file mapped MAP_PRIVATE (kernel demand
                              paging, as Firecracker's file backend) */
};

/* One step of a trace (16 bytes; numpy: restore.guest.GUEST_OP_DTYPE).
 *
 *   READ    sums[i] = rs_mem_checksum of the page at offset;
 *           ns[i]   = time of the first load from the page (one byte):
 *                     the fault round trip when the page was missing
 *   WRITE   store the byte rs_guest_pattern(i) to every byte of the page;
 *           sums[i] = checksum of the page afterwards;
 *           ns[i]   = time of the first store (one byte)
 *   REMOVE  madvise(addr, pages * page_size, MADV_DONTNEED): the kernel
 *           sends UFFD_EVENT_REMOVE and waits until the handler has read it;
 *           sums[i] = 0, ns[i] = time of the madvise call
 *
 * Times are CLOCK_MONOTONIC nanoseconds. */
typedef struct rs_guest_op {
    uint64_t offset;  /* bytes in the memory file, a multiple of page_size */
    uint32_t op;      /* RS_GUEST_* */
    uint32_t pages;   /* REMOVE: pages to drop (>= 1, inside one region);
                         READ, WRITE: 1 */
} rs_guest_op;

/* The byte a WRITE at trace position i stores: 1 + i % 255 (never zero, so
 * a written page never looks like a zero page). */
uint8_t rs_guest_pattern(uint64_t i);

enum { RS_GUEST_HUGETLB = 1, RS_GUEST_NO_REMOVE_EVENTS = 2, RS_GUEST_MEMFD = 4, RS_GUEST_CLOSE_CONN = 8 };

/* Play the guest: map, handshake over socket_path, run ops.
 *
 * regions, n_regions: the memory layout (>= 1 region).
 * page_size: 4096, or 2097152 (and then flags must hold RS_GUEST_HUGETLB).
 * flags: RS_GUEST_HUGETLB (2 MiB hugetlbfs pages), RS_GUEST_NO_REMOVE_EVENTS
 *        (leave UFFD_FEATURE_EVENT_REMOVE off: a dropped range then simply
 *        faults again, and the handler is not told), RS_GUEST_MEMFD (back
 *        the memory with one memfd, region r mapped MAP_SHARED at its file
 *        offset, registered MISSING|MINOR with UFFD_FEATURE_MINOR_SHMEM, and
 *        send the memfd as a second fd after the uffd, as memfd-backed
 *        Firecracker builds do; 4 KiB pages only), RS_GUEST_CLOSE_CONN
 *        (close the connection right after sending the handshake and run
 *        on, as Firecracker v1.10 and v1.11 do; no WAIT ops then).
 * ops, n_ops: the trace; every op is checked before anything is mapped.
 * sums, ns: n_ops results each (see rs_guest_op). Each is written as soon as
 *           its op is done, so a caller that shares them with a dying guest
 *           (a mapped file) sees how far it got.
 * err, err_len: receives a one-line reason on failure (may be NULL / 0),
 *               e.g. "connect /tmp/h.sock: Connection refused".
 *
 * Returns 0, or -errno: -EINVAL bad arguments, -ENOMEM mapping failed, or
 * the errno of the syscall that failed (socket, connect, sendmsg, uffd). */
int rs_guest_run(const char *socket_path, const rs_guest_region *regions,
                 size_t n_regions, uint64_t page_size, int flags,
                 const rs_guest_op *ops, size_t n_ops, uint64_t *sums,
                 uint64_t *ns, uint64_t *total_ns, char *err, size_t err_len);

/* The same trace without a handler, for baselines: memory backed by the
 * memory file at image_path as backing says (RS_GUEST_*). *total_ns
 * (may be NULL) receives the restore-to-done time: from the mapping (MMAP)
 * or from the end of the read (RESIDENT) to the end of the trace; for
 * rs_guest_run, from the start of the mapping and handshake. WAIT ops are
 * refused here (no handler). */
int rs_guest_run_local(const char *image_path, int backing,
                       const rs_guest_region *regions, size_t n_regions,
                       uint64_t page_size, const rs_guest_op *ops, size_t n_ops,
                       uint64_t *sums, uint64_t *ns, uint64_t *total_ns,
                       char *err, size_t err_len);

/* Step 3 alone, for guests whose memory is mapped already: connect to
 * socket_path and send the JSON for regions (host bases in bases[i]) and
 * uffd as above, then memfd when it is >= 0. Returns the connected socket
 * (O_CLOEXEC; the caller closes it when it is done with the memory) or
 * -errno with a reason in err. */
int rs_guest_handshake(const char *socket_path, int uffd, int memfd,
                       const uint64_t *bases, const rs_guest_region *regions,
                       size_t n_regions, uint64_t page_size, char *err,
                       size_t err_len);
