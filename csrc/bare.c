/* bare.c -- the bare minimal fault handler (see bare.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bare.h"
#include "uffd.h"

#define BATCH 64
#define SMALL_PAGE ((uint64_t)4096)

/* Removed host ranges [start, end), sorted, disjoint, not adjacent. */
typedef struct range {
    uint64_t start, end;
} range;

typedef struct bare {
    int uffd;
    const uint64_t *bases, *sizes, *offsets;
    size_t n_regions;
    uint64_t page_size;
    const uint8_t *image;
    void *zero;            /* page_size zero bytes (hugetlb has no ZEROPAGE) */
    range *removed;
    size_t n_removed, cap_removed;
    uint64_t *queue;       /* page addresses of faults not served yet */
    size_t n_queue, cap_queue;
    uint64_t served;
} bare;

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    size_t cap2 = *cap ? *cap : 64;
    void *q;

    if (need <= *cap)
        return 0;
    while (cap2 < need)
        cap2 *= 2;
    q = realloc(*p, cap2 * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = cap2;
    return 0;
}

/* Add [start, end) to the removed set, merging with what it touches. */
static int add_removed(bare *b, uint64_t start, uint64_t end)
{
    size_t lo = 0, hi;

    if (start >= end)
        return 0;
    while (lo < b->n_removed && b->removed[lo].end < start)
        lo++;
    hi = lo;
    while (hi < b->n_removed && b->removed[hi].start <= end) {
        if (b->removed[hi].start < start)
            start = b->removed[hi].start;
        if (b->removed[hi].end > end)
            end = b->removed[hi].end;
        hi++;
    }
    if (hi == lo) { /* nothing merged: insert at lo */
        if (grow((void **)&b->removed, &b->cap_removed, b->n_removed + 1, sizeof(range)))
            return -ENOMEM;
        memmove(&b->removed[lo + 1], &b->removed[lo], (b->n_removed - lo) * sizeof(range));
        b->n_removed++;
    } else if (hi > lo + 1) { /* ranges lo..hi-1 collapse into lo */
        memmove(&b->removed[lo + 1], &b->removed[hi], (b->n_removed - hi) * sizeof(range));
        b->n_removed -= hi - lo - 1;
    }
    b->removed[lo].start = start;
    b->removed[lo].end = end;
    return 0;
}

static int is_removed(const bare *b, uint64_t page)
{
    size_t lo = 0, hi = b->n_removed;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (b->removed[mid].end <= page)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < b->n_removed && b->removed[lo].start <= page;
}

static int push_fault(bare *b, uint64_t page)
{
    if (grow((void **)&b->queue, &b->cap_queue, b->n_queue + 1, sizeof(uint64_t)))
        return -ENOMEM;
    b->queue[b->n_queue++] = page;
    return 0;
}

/* Read every pending event: record REMOVEs, queue faults. */
static int drain_events(bare *b)
{
    rs_uffd_event ev[BATCH];
    int n, rc;

    do {
        n = rs_uffd_read_events(b->uffd, ev, BATCH);
        if (n < 0)
            return n;
        for (int i = 0; i < n; i++) {
            if (ev[i].event == RS_UFFD_EVENT_PAGEFAULT)
                rc = push_fault(b, ev[i].address & ~(b->page_size - 1));
            else if (ev[i].event == RS_UFFD_EVENT_REMOVE)
                rc = add_removed(b, ev[i].address, ev[i].end);
            else
                rc = 0; /* not requested by a Firecracker guest */
            if (rc < 0)
                return rc;
        }
    } while (n == BATCH);
    return 0;
}

/* 0 served, 1 try again later, 2 dropped, or -errno. */
static int serve_page(bare *b, uint64_t page)
{
    uint64_t ps = b->page_size, src = 0;
    size_t r;
    int rc;

    for (r = 0; r < b->n_regions; r++) {
        if (page >= b->bases[r] && page - b->bases[r] < b->sizes[r])
            break;
    }
    if (r == b->n_regions) {
        rs_uffd_poison(b->uffd, page, ps, 0, NULL);
        return -EFAULT;
    }
    if (!is_removed(b, page))
        src = (uint64_t)(uintptr_t)(b->image + b->offsets[r] + (page - b->bases[r]));
    else if (b->zero)
        src = (uint64_t)(uintptr_t)b->zero;
    if (src)
        rc = rs_uffd_copy(b->uffd, page, src, ps, 0, NULL);
    else
        rc = rs_uffd_zeropage(b->uffd, page, ps, 0, NULL);

    switch (rc) {
    case 0:
        return 0;
    case -EEXIST:
        rc = rs_uffd_wake(b->uffd, page, ps);
        return rc == 0 || rc == -ESRCH ? 0 : rc;
    case -EAGAIN:
        return 1;
    case -ENOENT:
        return 2;
    case -ESRCH:
        return rc;
    default:
        rs_uffd_poison(b->uffd, page, ps, 0, NULL);
        return rc;
    }
}

/* Serve the queued faults; keep those that must wait. */
static int serve_queue(bare *b, int *progress)
{
    size_t keep = 0;
    int rc = 0;

    *progress = 0;
    for (size_t i = 0; i < b->n_queue; i++) {
        int r = rc < 0 ? 1 : serve_page(b, b->queue[i]);

        if (r == 1) {
            b->queue[keep++] = b->queue[i];
            continue;
        }
        if (r < 0) {
            rc = r;
            continue;
        }
        *progress = 1;
        if (r == 0)
            b->served++;
    }
    b->n_queue = keep;
    return rc;
}

static int check_args(const uint64_t *bases, const uint64_t *sizes,
                      const uint64_t *offsets, size_t n, uint64_t ps,
                      const uint8_t *image, uint64_t image_len)
{
    if (!bases || !sizes || !offsets || n == 0 || !image)
        return -EINVAL;
    if (ps < SMALL_PAGE || (ps & (ps - 1)))
        return -EINVAL;
    for (size_t r = 0; r < n; r++) {
        if (bases[r] % ps || sizes[r] == 0 || sizes[r] % ps || offsets[r] % ps)
            return -EINVAL;
        if (offsets[r] > image_len || sizes[r] > image_len - offsets[r])
            return -EINVAL;
    }
    return 0;
}

int rs_bare_serve(int uffd, const uint64_t *bases, const uint64_t *sizes,
                  const uint64_t *offsets, size_t n_regions, uint64_t page_size,
                  const uint8_t *image, uint64_t image_len, int stop_fd,
                  int peer_fd, uint64_t *faults)
{
    bare b = {
        .uffd = uffd, .bases = bases, .sizes = sizes, .offsets = offsets,
        .n_regions = n_regions, .page_size = page_size, .image = image,
    };
    struct pollfd pfd[3] = {
        { .fd = uffd, .events = POLLIN },
        { .fd = stop_fd, .events = POLLIN },
        { .fd = peer_fd, .events = POLLIN },
    };
    int rc = check_args(bases, sizes, offsets, n_regions, page_size, image, image_len);

    if (faults)
        *faults = 0;
    if (rc < 0)
        return rc;
    /* A blocking uffd polls as POLLERR for ever (the kernel's way of
     * saying read may block): refuse it rather than spin or stop. */
    rc = fcntl(uffd, F_GETFL);
    if (rc < 0)
        return -errno;
    if (!(rc & O_NONBLOCK))
        return -EINVAL;
    if (page_size != SMALL_PAGE) {
        b.zero = mmap(NULL, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b.zero == MAP_FAILED)
            return -ENOMEM;
    }

    for (;;) {
        int progress, n;

        /* With faults waiting on a REMOVE, look but do not sleep. */
        n = poll(pfd, 3, b.n_queue ? 0 : -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        if (pfd[1].revents || pfd[2].revents) {
            rc = 0; /* stopped, or the guest is gone */
            break;
        }
        if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            /* Not reported when the guest exits (6.18); kept in case a kernel does. */
            rc = pfd[0].revents & POLLNVAL ? -EBADF : 0;
            break;
        }
        if (pfd[0].revents & POLLIN) {
            rc = drain_events(&b);
            if (rc < 0)
                break;
        }
        rc = serve_queue(&b, &progress);
        if (faults)
            __atomic_store_n(faults, b.served, __ATOMIC_RELAXED);
        if (rc < 0) {
            if (rc == -ESRCH)
                rc = 0; /* the guest's mm is gone */
            break;
        }
        /* A fault kept back by a REMOVE the guest has not finished:
         * drain events and retry after letting the guest run. */
        if (b.n_queue && !progress) {
            rc = drain_events(&b);
            if (rc < 0)
                break;
            sched_yield();
        }
    }
    if (faults)
        __atomic_store_n(faults, b.served, __ATOMIC_RELAXED);
    if (b.zero)
        munmap(b.zero, page_size);
    free(b.removed);
    free(b.queue);
    return rc;
}
