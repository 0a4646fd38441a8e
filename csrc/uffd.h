/* uffd.h -- thin userfaultfd wrappers (cdef: no macros, no includes).
 *
 * Every function returns 0 (or a count) on success and a negative errno on
 * failure; none prints. Ioctls that install pages report through *done the
 * bytes they installed, as the kernel does (Linux 6.x):
 *   0        the whole range was installed (and woken, without DONTWAKE)
 *   -EAGAIN with *done > 0
 *            part of the range was installed (and woken); call again from
 *            *done to learn what stopped it
 *   -EEXIST  (*done == 0) the first page of the range is present already;
 *            nothing was woken: the caller wakes the range and moves on
 *   -EAGAIN with *done == 0
 *            the mm is changing (a REMOVE/UNMAP is in flight): drain events
 *            and retry, more than once: the kernel clears the condition only
 *            when the remover resumes, shortly after its event is read
 *   -ESRCH   the guest's address space is gone
 * The constants mirror <linux/userfaultfd.h> so that callers need no
 * kernel headers; uffd.c checks each against the kernel's where it has one.
 */

enum {
    /* UFFDIO_API features */
    RS_UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1,
    RS_UFFD_FEATURE_EVENT_FORK = 2,
    RS_UFFD_FEATURE_EVENT_REMAP = 4,
    RS_UFFD_FEATURE_EVENT_REMOVE = 8,
    RS_UFFD_FEATURE_MISSING_HUGETLBFS = 16,
    RS_UFFD_FEATURE_MISSING_SHMEM = 32,
    RS_UFFD_FEATURE_EVENT_UNMAP = 64,
    RS_UFFD_FEATURE_SIGBUS = 128,
    RS_UFFD_FEATURE_THREAD_ID = 256,
    RS_UFFD_FEATURE_MINOR_HUGETLBFS = 512,
    RS_UFFD_FEATURE_MINOR_SHMEM = 1024,
    RS_UFFD_FEATURE_EXACT_ADDRESS = 2048,
    RS_UFFD_FEATURE_POISON = 16384,
    RS_UFFD_FEATURE_MOVE = 65536,

    /* UFFDIO_REGISTER modes */
    RS_UFFD_REGISTER_MISSING = 1,
    RS_UFFD_REGISTER_WP = 2,
    RS_UFFD_REGISTER_MINOR = 4,

    /* Event types (uffd_msg.event) */
    RS_UFFD_EVENT_PAGEFAULT = 0x12,
    RS_UFFD_EVENT_FORK = 0x13,
    RS_UFFD_EVENT_REMAP = 0x14,
    RS_UFFD_EVENT_REMOVE = 0x15,
    RS_UFFD_EVENT_UNMAP = 0x16,

    /* Page fault flags */
    RS_UFFD_PAGEFAULT_WRITE = 1,
    RS_UFFD_PAGEFAULT_WP = 2,
    RS_UFFD_PAGEFAULT_MINOR = 4,

    /* Mode bit of copy / zeropage / continue / poison: install without
     * waking the faulting threads (wake them later with rs_uffd_wake). */
    RS_UFFD_DONTWAKE = 1
};

/* One event read from a userfaultfd, flattened from struct uffd_msg. */
typedef struct rs_uffd_event {
    uint32_t event;    /* RS_UFFD_EVENT_* */
    uint32_t ptid;     /* faulting thread id (THREAD_ID feature), else 0 */
    uint64_t flags;    /* RS_UFFD_PAGEFAULT_* for page faults */
    uint64_t address;  /* fault address, or start of a REMOVE/UNMAP range */
    uint64_t end;      /* end (exclusive) of a REMOVE/UNMAP range, else 0;
                          REMAP: the new address; FORK: the new uffd */
    uint64_t len;      /* REMAP: bytes moved, else 0 */
} rs_uffd_event;

/* A new userfaultfd (O_CLOEXEC, plus O_NONBLOCK when nonblock), from the
 * userfaultfd(2) syscall, falling back to /dev/userfaultfd. Returns the fd
 * or -errno. user_mode_only: 1 to ask for faults from user mode only. */
int rs_uffd_create(int nonblock, int user_mode_only);

/* The UFFDIO_API handshake: request features; *offered receives what the
 * kernel writes back, which is every feature it offers (not just those
 * requested), *ioctls the ioctls the fd supports (both may be NULL).
 * -EINVAL when the kernel lacks a requested feature. */
int rs_uffd_api(int fd, uint64_t features, uint64_t *offered, uint64_t *ioctls);

/* Features this kernel offers (a throwaway fd, asked with no features). */
int rs_uffd_probe(uint64_t *features);

/* Register [start, start+len) in modes (RS_UFFD_REGISTER_*); *ioctls
 * receives the range ioctls allowed there (may be NULL). */
int rs_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t modes,
                     uint64_t *ioctls);
int rs_uffd_unregister(int fd, uint64_t start, uint64_t len);

/* Install pages: copy len bytes from src (UFFDIO_COPY), zero pages
 * (UFFDIO_ZEROPAGE), map the page cache's pages (UFFDIO_CONTINUE, MINOR
 * mode) or poison (UFFDIO_POISON: a later access gets SIGBUS). dst, src,
 * len are page aligned; mode is 0 or RS_UFFD_DONTWAKE; *done receives the
 * bytes handled (may be NULL). */
int rs_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len,
                 uint64_t mode, uint64_t *done);
int rs_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode,
                     uint64_t *done);
int rs_uffd_continue(int fd, uint64_t dst, uint64_t len, uint64_t mode,
                     uint64_t *done);
int rs_uffd_poison(int fd, uint64_t dst, uint64_t len, uint64_t mode,
                   uint64_t *done);

/* Wake the threads faulting in [start, start+len). */
int rs_uffd_wake(int fd, uint64_t start, uint64_t len);

/* Read up to max events without blocking (the fd is O_NONBLOCK) or, for a
 * blocking fd, waiting for at least one. Returns the count, 0 when none
 * is pending on a non-blocking fd, or -errno. */
int rs_uffd_read_events(int fd, rs_uffd_event *out, size_t max);
