/* uffd.c -- thin userfaultfd wrappers (see uffd.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/userfaultfd.h>

#include "uffd.h"

/* Newer than some distributions' kernel headers (Linux 6.6 / 6.1). */
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

_Static_assert(RS_UFFD_FEATURE_EVENT_REMOVE == UFFD_FEATURE_EVENT_REMOVE, "uffd.h");
_Static_assert(RS_UFFD_FEATURE_MISSING_HUGETLBFS == UFFD_FEATURE_MISSING_HUGETLBFS, "uffd.h");
_Static_assert(RS_UFFD_FEATURE_THREAD_ID == UFFD_FEATURE_THREAD_ID, "uffd.h");
_Static_assert(RS_UFFD_REGISTER_MISSING == UFFDIO_REGISTER_MODE_MISSING, "uffd.h");
_Static_assert(RS_UFFD_EVENT_PAGEFAULT == UFFD_EVENT_PAGEFAULT, "uffd.h");
_Static_assert(RS_UFFD_EVENT_REMOVE == UFFD_EVENT_REMOVE, "uffd.h");
_Static_assert(RS_UFFD_EVENT_UNMAP == UFFD_EVENT_UNMAP, "uffd.h");
_Static_assert(RS_UFFD_PAGEFAULT_WRITE == UFFD_PAGEFAULT_FLAG_WRITE, "uffd.h");
_Static_assert(RS_UFFD_DONTWAKE == UFFDIO_COPY_MODE_DONTWAKE, "uffd.h");
_Static_assert(RS_UFFD_DONTWAKE == UFFDIO_ZEROPAGE_MODE_DONTWAKE, "uffd.h");
_Static_assert(RS_UFFD_DONTWAKE == UFFDIO_POISON_MODE_DONTWAKE, "uffd.h");
#ifdef UFFD_FEATURE_MINOR_SHMEM
_Static_assert(RS_UFFD_FEATURE_MINOR_SHMEM == UFFD_FEATURE_MINOR_SHMEM, "uffd.h");
_Static_assert(RS_UFFD_REGISTER_MINOR == UFFDIO_REGISTER_MODE_MINOR, "uffd.h");
_Static_assert(RS_UFFD_DONTWAKE == UFFDIO_CONTINUE_MODE_DONTWAKE, "uffd.h");
#endif

int rs_uffd_create(int nonblock, int user_mode_only)
{
    int flags = O_CLOEXEC | (nonblock ? O_NONBLOCK : 0) |
                (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    int fd = (int)syscall(SYS_userfaultfd, flags);
    int dev, err;

    if (fd >= 0)
        return fd;
    err = errno;
    /* The syscall may be refused (vm.unprivileged_userfaultfd, seccomp)
     * where the device node is allowed. */
    dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -err;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    if (fd < 0)
        err = errno;
    close(dev);
    return fd >= 0 ? fd : -err;
}

int rs_uffd_api(int fd, uint64_t features, uint64_t *offered, uint64_t *ioctls)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };

    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    if (offered)
        *offered = api.features;
    if (ioctls)
        *ioctls = api.ioctls;
    return 0;
}

int rs_uffd_probe(uint64_t *features)
{
    int fd = rs_uffd_create(1, 0), rc;

    if (fd < 0)
        return fd;
    rc = rs_uffd_api(fd, 0, features, NULL);
    close(fd);
    return rc;
}

int rs_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t modes,
                     uint64_t *ioctls)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = len },
        .mode = modes,
    };

    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    if (ioctls)
        *ioctls = reg.ioctls;
    return 0;
}

int rs_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { .start = start, .len = len };

    return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

/* The kernel reports progress in a signed field: bytes done, or -errno
 * when nothing was done. */
static int finish(int ret, int64_t progress, uint64_t *done)
{
    int err = ret < 0 ? errno : 0;

    if (done)
        *done = progress > 0 ? (uint64_t)progress : 0;
    return -err;
}

int rs_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len,
                 uint64_t mode, uint64_t *done)
{
    struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode };
    int ret = ioctl(fd, UFFDIO_COPY, &c);

    return finish(ret, c.copy, done);
}

int rs_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode,
                     uint64_t *done)
{
    struct uffdio_zeropage z = { .range = { .start = dst, .len = len }, .mode = mode };
    int ret = ioctl(fd, UFFDIO_ZEROPAGE, &z);

    return finish(ret, z.zeropage, done);
}

int rs_uffd_continue(int fd, uint64_t dst, uint64_t len, uint64_t mode,
                     uint64_t *done)
{
#ifdef UFFDIO_CONTINUE
    struct uffdio_continue c = { .range = { .start = dst, .len = len }, .mode = mode };
    int ret = ioctl(fd, UFFDIO_CONTINUE, &c);

    return finish(ret, c.mapped, done);
#else
    (void)fd; (void)dst; (void)len; (void)mode;
    if (done)
        *done = 0;
    return -ENOTSUP;
#endif
}

int rs_uffd_poison(int fd, uint64_t dst, uint64_t len, uint64_t mode,
                   uint64_t *done)
{
    struct uffdio_poison p = { .range = { .start = dst, .len = len }, .mode = mode };
    int ret = ioctl(fd, UFFDIO_POISON, &p);

    return finish(ret, p.updated, done);
}

int rs_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { .start = start, .len = len };

    return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

int rs_uffd_read_events(int fd, rs_uffd_event *out, size_t max)
{
    struct uffd_msg msg[64];
    ssize_t n;
    size_t count;

    if (max == 0)
        return 0;
    if (max > 64)
        max = 64;
    do {
        n = read(fd, msg, max * sizeof(msg[0]));
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    if (n % sizeof(msg[0]))
        return -EIO;
    count = (size_t)n / sizeof(msg[0]);
    for (size_t i = 0; i < count; i++) {
        rs_uffd_event *e = &out[i];

        memset(e, 0, sizeof(*e));
        e->event = msg[i].event;
        switch (msg[i].event) {
        case UFFD_EVENT_PAGEFAULT:
            e->flags = msg[i].arg.pagefault.flags;
            e->address = msg[i].arg.pagefault.address;
            e->ptid = msg[i].arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            e->address = msg[i].arg.remove.start;
            e->end = msg[i].arg.remove.end;
            break;
        case UFFD_EVENT_REMAP:
            e->address = msg[i].arg.remap.from;
            e->end = msg[i].arg.remap.to;
            e->len = msg[i].arg.remap.len;
            break;
        case UFFD_EVENT_FORK:
            e->end = msg[i].arg.fork.ufd;
            break;
        default:
            break;
        }
    }
    return (int)count;
}
