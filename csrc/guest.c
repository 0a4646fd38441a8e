/* guest.c -- a test guest that plays Firecracker's UFFD backend (see guest.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "guest.h"
#include "mem.h"
#include "uffd.h"

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

#define SMALL_PAGE ((uint64_t)4096)
#define HUGE_PAGE ((uint64_t)2 << 20)

_Static_assert(sizeof(rs_guest_op) == 16, "rs_guest_op is 16 bytes (GUEST_OP_DTYPE)");

static int say(char *err, size_t err_len, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Write a one-line reason to err and return -code. (strerror is
 * thread-safe in glibc >= 2.32 for every errno the kernel returns.) */
static int say(char *err, size_t err_len, int code, const char *fmt, ...)
{
    va_list ap;

    if (err && err_len) {
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return -code;
}

static uint64_t now_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

uint8_t rs_guest_pattern(uint64_t i)
{
    return (uint8_t)(1 + i % 255);
}

/* The region holding file bytes [off, off + len), or -1. */
static long find_region(const rs_guest_region *regions, size_t n, uint64_t off,
                        uint64_t len)
{
    for (size_t r = 0; r < n; r++) {
        if (off >= regions[r].offset && off - regions[r].offset < regions[r].size &&
            len <= regions[r].size - (off - regions[r].offset))
            return (long)r;
    }
    return -1;
}

static int check_layout(const rs_guest_region *regions, size_t n,
                        uint64_t page_size, int hugetlb, char *err,
                        size_t err_len)
{
    if (page_size != SMALL_PAGE && page_size != HUGE_PAGE)
        return say(err, err_len, EINVAL,
                   "page_size %" PRIu64 " is neither 4096 nor 2097152 bytes", page_size);
    if (!hugetlb && page_size != SMALL_PAGE)
        return say(err, err_len, EINVAL,
                   "page_size %" PRIu64 " needs hugetlb (anonymous memory has 4096-byte pages)",
                   page_size);
    if (hugetlb && page_size != HUGE_PAGE)
        return say(err, err_len, EINVAL,
                   "hugetlb needs page_size 2097152, not %" PRIu64, page_size);
    if (!regions || n == 0)
        return say(err, err_len, EINVAL, "no regions");
    for (size_t r = 0; r < n; r++) {
        const rs_guest_region *g = &regions[r];

        if (g->size == 0 || g->size % page_size)
            return say(err, err_len, EINVAL,
                       "region %zu: size %#" PRIx64 " is not a positive multiple of the page size %#" PRIx64,
                       r, g->size, page_size);
        if (g->offset % page_size)
            return say(err, err_len, EINVAL,
                       "region %zu: offset %#" PRIx64 " is not a multiple of the page size %#" PRIx64,
                       r, g->offset, page_size);
        if (g->offset + g->size < g->offset)
            return say(err, err_len, EINVAL,
                       "region %zu: offset %#" PRIx64 " + size %#" PRIx64 " overflows",
                       r, g->offset, g->size);
        for (size_t q = 0; q < r; q++) {
            if (g->offset < regions[q].offset + regions[q].size &&
                regions[q].offset < g->offset + g->size)
                return say(err, err_len, EINVAL,
                           "regions %zu and %zu overlap in the memory file", q, r);
        }
    }
    return 0;
}

static int check_ops(const rs_guest_region *regions, size_t n_regions,
                     uint64_t page_size, const rs_guest_op *ops, size_t n_ops,
                     char *err, size_t err_len)
{
    if (n_ops && !ops)
        return say(err, err_len, EINVAL, "ops is NULL");
    for (size_t i = 0; i < n_ops; i++) {
        const rs_guest_op *o = &ops[i];
        uint64_t len;

        if (o->op > RS_GUEST_WAIT)
            return say(err, err_len, EINVAL, "op %zu: unknown op %" PRIu32, i, o->op);
        if (o->op == RS_GUEST_WAIT) {
            if (o->offset || o->pages != 1)
                return say(err, err_len, EINVAL, "op %zu: a wait has offset 0 and 1 page", i);
            continue;
        }
        if (o->offset % page_size)
            return say(err, err_len, EINVAL,
                       "op %zu: offset %#" PRIx64 " is not a multiple of the page size %#" PRIx64,
                       i, o->offset, page_size);
        if (o->op != RS_GUEST_REMOVE && o->pages != 1)
            return say(err, err_len, EINVAL,
                       "op %zu: a read or write touches 1 page, not %" PRIu32, i, o->pages);
        if (o->op == RS_GUEST_REMOVE && o->pages == 0)
            return say(err, err_len, EINVAL, "op %zu: a remove of 0 pages", i);
        if (find_region(regions, n_regions, o->offset, page_size) < 0)
            return say(err, err_len, EINVAL,
                       "op %zu: offset %#" PRIx64 " is outside every region", i, o->offset);
        len = (uint64_t)o->pages * page_size;
        if (find_region(regions, n_regions, o->offset, len) < 0)
            return say(err, err_len, EINVAL,
                       "op %zu: remove of %" PRIu32 " pages at offset %#" PRIx64
                       " runs past the end of its region",
                       i, o->pages, o->offset);
    }
    return 0;
}

/* The JSON array Firecracker sends (serde field order, no spaces). Returns
 * a malloc'ed string or NULL. */
static char *regions_json(const uint64_t *bases, const rs_guest_region *regions,
                          size_t n, uint64_t page_size, size_t *len)
{
    /* An object takes at most 173 bytes: a comma, the keys and punctuation
     * (72 bytes) and five numbers of at most 20 digits. */
    size_t cap = 2 + n * 192, used = 0;
    char *s = malloc(cap);

    if (!s)
        return NULL;
    s[used++] = '[';
    for (size_t r = 0; r < n; r++) {
        used += (size_t)snprintf(
            s + used, cap - used,
            "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64
            ",\"page_size\":%" PRIu64 ",\"page_size_kib\":%" PRIu64 "}",
            r ? "," : "", bases[r], regions[r].size, regions[r].offset, page_size, page_size);
    }
    s[used++] = ']';
    s[used] = '\0';
    *len = used;
    return s;
}

/* Send buf with fds[0..n_fds) (1 or 2) as SCM_RIGHTS on its first byte. */
static int send_all(int sock, const char *buf, size_t len, const int *fds, size_t n_fds)
{
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = CMSG_SPACE(n_fds * sizeof(int)),
    };
    struct cmsghdr *cmsg;
    ssize_t n;
    size_t sent;

    memset(&control, 0, sizeof(control));
    cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(n_fds * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, n_fds * sizeof(int));
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    /* The fd went with the first byte; a stream socket may take the rest
     * in more writes (never for a payload this small, in practice). */
    for (sent = (size_t)n; sent < len; sent += (size_t)n) {
        do {
            n = send(sock, buf + sent, len - sent, MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n < 0)
            return -errno;
    }
    return 0;
}

int rs_guest_handshake(const char *socket_path, int uffd, int memfd,
                       const uint64_t *bases, const rs_guest_region *regions,
                       size_t n_regions, uint64_t page_size, char *err,
                       size_t err_len)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    char *json;
    size_t json_len;
    int sock, rc;

    if (!socket_path || !*socket_path)
        return say(err, err_len, EINVAL, "no socket path");
    if (strlen(socket_path) >= sizeof(addr.sun_path))
        return say(err, err_len, ENAMETOOLONG,
                   "socket path %s is longer than %zu bytes", socket_path,
                   sizeof(addr.sun_path) - 1);
    if (!bases || !regions || n_regions == 0)
        return say(err, err_len, EINVAL, "no regions");
    memcpy(addr.sun_path, socket_path, strlen(socket_path) + 1);

    json = regions_json(bases, regions, n_regions, page_size, &json_len);
    if (!json)
        return say(err, err_len, ENOMEM, "out of memory for the region JSON");
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        rc = errno;
        free(json);
        return say(err, err_len, rc, "socket: %s", strerror(rc));
    }
    rc = connect(sock, (struct sockaddr *)&addr, sizeof(addr));
    if (rc < 0) {
        rc = errno;
        say(err, err_len, rc, "connect %s: %s", socket_path, strerror(rc));
        goto fail;
    }
    {
        int fds[2] = { uffd, memfd };

        rc = send_all(sock, json, json_len, fds, memfd >= 0 ? 2 : 1);
    }
    if (rc < 0) {
        rc = -rc;
        say(err, err_len, rc, "sendmsg %s: %s", socket_path, strerror(rc));
        goto fail;
    }
    free(json);
    return sock;

fail:
    free(json);
    close(sock);
    return -rc;
}

/* Map the regions, create and register the uffd. On failure everything
 * mapped so far stays in bases[] (0 where not mapped) for the caller to
 * unmap. */
static int setup_memory(const rs_guest_region *regions, size_t n,
                        int guest_flags, uint64_t *bases,
                        int *uffd_out, int *memfd_out, char *err, size_t err_len)
{
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    int hugetlb = guest_flags & RS_GUEST_HUGETLB;
    uint64_t features = guest_flags & RS_GUEST_NO_REMOVE_EVENTS ? 0 : RS_UFFD_FEATURE_EVENT_REMOVE;
    uint64_t modes = RS_UFFD_REGISTER_MISSING;
    int uffd, rc, memfd = -1;

    if (guest_flags & RS_GUEST_MEMFD) {
        /* One memfd holds the memory file's layout: region r maps it at
         * its file offset, shared, as a memfd-backed VMM does. */
        uint64_t extent = 0;

        for (size_t r = 0; r < n; r++)
            if (regions[r].offset + regions[r].size > extent)
                extent = regions[r].offset + regions[r].size;
        memfd = memfd_create("restore-guest", MFD_CLOEXEC);
        if (memfd < 0) {
            rc = errno;
            return say(err, err_len, rc, "memfd_create: %s", strerror(rc));
        }
        *memfd_out = memfd;
        if (ftruncate(memfd, (off_t)extent) < 0) {
            rc = errno;
            return say(err, err_len, rc, "ftruncate memfd to %" PRIu64 " bytes: %s", extent, strerror(rc));
        }
        flags = MAP_SHARED | MAP_NORESERVE;
        features |= RS_UFFD_FEATURE_MINOR_SHMEM;
        modes |= RS_UFFD_REGISTER_MINOR;
    }

    if (hugetlb) {
        flags |= MAP_HUGETLB | MAP_HUGE_2MB;
        features |= RS_UFFD_FEATURE_MISSING_HUGETLBFS;
    }
    for (size_t r = 0; r < n; r++) {
        void *p = mmap(NULL, regions[r].size, PROT_READ | PROT_WRITE, flags, memfd,
                       memfd >= 0 ? (off_t)regions[r].offset : 0);

        if (p == MAP_FAILED) {
            rc = errno;
            return say(err, err_len, rc, "mmap region %zu (%" PRIu64 " bytes%s): %s", r,
                       regions[r].size, hugetlb ? ", hugetlb" : "",
                       strerror(rc));
        }
        bases[r] = (uint64_t)(uintptr_t)p;
    }
    uffd = rs_uffd_create(1, 0);
    if (uffd < 0)
        return say(err, err_len, -uffd, "userfaultfd: %s", strerror(-uffd));
    *uffd_out = uffd;
    rc = rs_uffd_api(uffd, features, NULL, NULL);
    if (rc < 0)
        return say(err, err_len, -rc, "UFFDIO_API (features %#" PRIx64 "): %s", features,
                   strerror(-rc));
    for (size_t r = 0; r < n; r++) {
        rc = rs_uffd_register(uffd, bases[r], regions[r].size, modes, NULL);
        if (rc < 0)
            return say(err, err_len, -rc, "UFFDIO_REGISTER region %zu: %s", r,
                       strerror(-rc));
    }
    return 0;
}

/* Keep the compiler from moving memory accesses across the clock reads. */
#define BARRIER() __asm__ __volatile__("" ::: "memory")

static void run_ops(const rs_guest_region *regions, size_t n_regions,
                    const uint64_t *bases, uint64_t page_size,
                    const rs_guest_op *ops, size_t n_ops, uint64_t *sums,
                    uint64_t *ns, int sock)
{
    for (size_t i = 0; i < n_ops; i++) {
        const rs_guest_op *o = &ops[i];
        long r = o->op == RS_GUEST_WAIT ? 0 : find_region(regions, n_regions, o->offset, page_size);
        uint64_t addr = bases[r] + (o->offset - regions[r].offset);
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
        uint64_t t0, t1, sum = 0;
        uint8_t byte;

        if (o->op == RS_GUEST_WAIT) {
            char go;

            t0 = now_ns();
            while (recv(sock, &go, 1, MSG_WAITALL) < 0 && errno == EINTR)
                ;
            t1 = now_ns();
            sums[i] = 0;
            BARRIER();
            ns[i] = t1 - t0;
            continue;
        }
        switch (o->op) {
        case RS_GUEST_READ:
            t0 = now_ns();
            BARRIER();
            (void)*p;
            BARRIER();
            t1 = now_ns();
            sum = rs_mem_checksum(addr, page_size);
            break;
        case RS_GUEST_WRITE:
            byte = rs_guest_pattern(i);
            t0 = now_ns();
            BARRIER();
            *p = byte;
            BARRIER();
            t1 = now_ns();
            rs_mem_fill(addr, page_size, byte);
            sum = rs_mem_checksum(addr, page_size);
            break;
        default: /* RS_GUEST_REMOVE, checked before */
            t0 = now_ns();
            madvise((void *)(uintptr_t)addr, (size_t)o->pages * page_size, MADV_DONTNEED);
            t1 = now_ns();
            break;
        }
        /* ns last: a reader of a dead guest's results takes the first op
         * without a time as the one it died in. */
        sums[i] = sum;
        BARRIER();
        ns[i] = t1 - t0;
    }
}

int rs_guest_run(const char *socket_path, const rs_guest_region *regions,
                 size_t n_regions, uint64_t page_size, int flags,
                 const rs_guest_op *ops, size_t n_ops, uint64_t *sums,
                 uint64_t *ns, uint64_t *total_ns, char *err, size_t err_len)
{
    uint64_t *bases, t_start = now_ns();
    int uffd = -1, memfd = -1, sock = -1, rc;

    if (err && err_len)
        err[0] = '\0';
    if (flags & ~(RS_GUEST_HUGETLB | RS_GUEST_NO_REMOVE_EVENTS | RS_GUEST_MEMFD | RS_GUEST_CLOSE_CONN))
        return say(err, err_len, EINVAL, "unknown flags %#x", flags);
    for (size_t i = 0; (flags & RS_GUEST_CLOSE_CONN) && ops && i < n_ops; i++)
        if (ops[i].op == RS_GUEST_WAIT)
            return say(err, err_len, EINVAL,
                       "op %zu: a guest that closes its connection cannot wait on it", i);
    if ((flags & RS_GUEST_HUGETLB) && (flags & RS_GUEST_MEMFD))
        return say(err, err_len, EINVAL, "a memfd-backed guest has 4 KiB pages, not hugetlb");
    rc = check_layout(regions, n_regions, page_size, flags & RS_GUEST_HUGETLB, err, err_len);
    if (rc < 0)
        return rc;
    rc = check_ops(regions, n_regions, page_size, ops, n_ops, err, err_len);
    if (rc < 0)
        return rc;
    if (n_ops && (!sums || !ns))
        return say(err, err_len, EINVAL, "sums or ns is NULL");
    bases = calloc(n_regions, sizeof(*bases));
    if (!bases)
        return say(err, err_len, ENOMEM, "out of memory");

    rc = setup_memory(regions, n_regions, flags, bases, &uffd, &memfd, err, err_len);
    if (rc < 0)
        goto out;
    sock = rs_guest_handshake(socket_path, uffd, memfd, bases, regions, n_regions, page_size,
                              err, err_len);
    if (sock < 0) {
        rc = sock;
        goto out;
    }
    if (flags & RS_GUEST_CLOSE_CONN) {
        /* As Firecracker v1.10 and v1.11: the handshake sent, the
         * connection is closed and the VM runs on. */
        close(sock);
        sock = -1;
    }
    run_ops(regions, n_regions, bases, page_size, ops, n_ops, sums, ns, sock);
    if (total_ns)
        *total_ns = now_ns() - t_start;
    rc = 0;

out:
    if (sock >= 0)
        close(sock);
    if (uffd >= 0)
        close(uffd);
    if (memfd >= 0)
        close(memfd);
    for (size_t r = 0; r < n_regions; r++) {
        if (bases[r])
            munmap((void *)(uintptr_t)bases[r], regions[r].size);
    }
    free(bases);
    return rc;
}

int rs_guest_run_local(const char *image_path, int backing,
                       const rs_guest_region *regions, size_t n_regions,
                       uint64_t page_size, const rs_guest_op *ops, size_t n_ops,
                       uint64_t *sums, uint64_t *ns, uint64_t *total_ns,
                       char *err, size_t err_len)
{
    uint64_t *bases, t_start = 0;
    int fd, rc;

    if (err && err_len)
        err[0] = '\0';
    if (backing != RS_GUEST_RESIDENT && backing != RS_GUEST_MMAP)
        return say(err, err_len, EINVAL, "unknown backing %d", backing);
    rc = check_layout(regions, n_regions, page_size, 0, err, err_len);
    if (rc < 0)
        return rc;
    rc = check_ops(regions, n_regions, page_size, ops, n_ops, err, err_len);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < n_ops; i++)
        if (ops[i].op == RS_GUEST_WAIT)
            return say(err, err_len, EINVAL, "op %zu: nobody to wait for without a handler", i);
    fd = open(image_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return say(err, err_len, errno, "open %s: %s", image_path, strerror(errno));
    bases = calloc(n_regions, sizeof(*bases));
    if (!bases) {
        close(fd);
        return say(err, err_len, ENOMEM, "out of memory");
    }
    if (backing == RS_GUEST_MMAP)
        t_start = now_ns();
    for (size_t r = 0; r < n_regions; r++) {
        void *p = backing == RS_GUEST_MMAP
                      ? mmap(NULL, regions[r].size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd,
                             (off_t)regions[r].offset)
                      : mmap(NULL, regions[r].size, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

        if (p == MAP_FAILED) {
            rc = say(err, err_len, errno, "mmap region %zu: %s", r, strerror(errno));
            goto out;
        }
        bases[r] = (uint64_t)(uintptr_t)p;
        if (backing == RS_GUEST_RESIDENT) {
            for (uint64_t off = 0; off < regions[r].size;) {
                ssize_t n = pread(fd, (uint8_t *)p + off, regions[r].size - off,
                                  (off_t)(regions[r].offset + off));

                if (n <= 0) {
                    rc = say(err, err_len, n ? errno : EIO, "reading %s: %s", image_path,
                             n ? strerror(errno) : "file too short");
                    goto out;
                }
                off += (uint64_t)n;
            }
        }
    }
    if (backing == RS_GUEST_RESIDENT)
        t_start = now_ns();
    run_ops(regions, n_regions, bases, page_size, ops, n_ops, sums, ns, -1);
    if (total_ns)
        *total_ns = now_ns() - t_start;
    rc = 0;
out:
    for (size_t r = 0; r < n_regions; r++)
        if (bases[r])
            munmap((void *)(uintptr_t)bases[r], regions[r].size);
    free(bases);
    close(fd);
    return rc;
}
