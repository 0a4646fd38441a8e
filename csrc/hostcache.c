/* hostcache.c -- decoded chunks of one snapshot version, shared on the host
 * (hostcache.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hostcache.h"

#define STATE_AT 4096u
#define MAGIC "RSHOSTC1"
#define FORMAT 1u
#define BOOT_ID_LEN 36

struct header {
    char magic[8];
    uint32_t format;
    uint32_t n_chunks;
    uint64_t chunk_size;
    uint8_t version_id[32];
    char boot_id[BOOT_ID_LEN];
};

_Static_assert(offsetof(struct header, chunk_size) == 16, "header layout");
_Static_assert(offsetof(struct header, version_id) == 24, "header layout");
_Static_assert(offsetof(struct header, boot_id) == 56, "header layout");

struct rs_hostcache {
    int state_fd, data_fd;     /* this opener's own open file descriptions:
                                  its fill locks are its own */
    uint32_t n_chunks;
    uint64_t chunk_size;       /* bytes */
    uint8_t *state_map;        /* the state file, STATE_AT + n_chunks bytes */
    _Atomic uint8_t *state;    /* state_map + STATE_AT: RS_HOST_* per chunk */
    const uint8_t *data;       /* the data file, read-only, n_chunks * chunk_size */
};

static int boot_id(char out[BOOT_ID_LEN])
{
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -errno;
    n = read(fd, out, BOOT_ID_LEN);
    close(fd);
    return n == BOOT_ID_LEN ? 0 : -EIO;
}

static void expected_header(struct header *h, uint32_t n_chunks, uint64_t chunk_size,
                            const uint8_t *version_id, const char *boot)
{
    memset(h, 0, sizeof(*h));
    memcpy(h->magic, MAGIC, 8);
    h->format = FORMAT;
    h->n_chunks = n_chunks;
    h->chunk_size = chunk_size;
    memcpy(h->version_id, version_id, 32);
    memcpy(h->boot_id, boot, BOOT_ID_LEN);
}

/* 1 when the files hold what want describes, 0 when not, -errno. */
static int files_match(int state_fd, int data_fd, const struct header *want)
{
    struct header got;
    struct stat ss, ds;

    if (fstat(state_fd, &ss) < 0 || fstat(data_fd, &ds) < 0)
        return -errno;
    if ((uint64_t)ss.st_size != STATE_AT + (uint64_t)want->n_chunks ||
        (uint64_t)ds.st_size != (uint64_t)want->n_chunks * want->chunk_size)
        return 0;
    if (pread(state_fd, &got, sizeof(got), 0) != (ssize_t)sizeof(got))
        return 0;
    return memcmp(&got, want, sizeof(got)) == 0;
}

/* Empty both files and write a fresh header: every chunk absent. */
static int reset(int state_fd, int data_fd, const struct header *want)
{
    if (ftruncate(data_fd, 0) < 0 || ftruncate(state_fd, 0) < 0 ||
        ftruncate(data_fd, (off_t)(want->n_chunks * want->chunk_size)) < 0 ||
        ftruncate(state_fd, (off_t)(STATE_AT + want->n_chunks)) < 0)
        return -errno;
    if (pwrite(state_fd, want, sizeof(*want), 0) != (ssize_t)sizeof(*want))
        return -EIO;
    return 0;
}

/* Is fd still the file at dir/name (not one an eviction renamed away)? */
static int still_linked(int fd, const char *path)
{
    struct stat a, b;

    return fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Open both files and take LOCK_SH, resetting them when they do not match
 * (which needs LOCK_EX: nobody else using them). */
static int open_files(rs_hostcache *h, const char *dir, const struct header *want)
{
    char sp[PATH_MAX], dp[PATH_MAX];
    int rc;

    if (snprintf(sp, sizeof(sp), "%s/state", dir) >= (int)sizeof(sp) ||
        snprintf(dp, sizeof(dp), "%s/data", dir) >= (int)sizeof(dp))
        return -ENAMETOOLONG;
    for (int attempt = 0; attempt < 8; attempt++) {
        h->state_fd = open(sp, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (h->state_fd < 0)
            return -errno;
        h->data_fd = open(dp, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (h->data_fd < 0) {
            rc = -errno;
            goto fail;
        }
        if (flock(h->state_fd, LOCK_SH) < 0) {
            rc = -errno;
            goto fail;
        }
        if (!still_linked(h->state_fd, sp) || !still_linked(h->data_fd, dp)) {
            close(h->state_fd); /* evicted meanwhile: open the new ones */
            close(h->data_fd);
            h->state_fd = h->data_fd = -1;
            continue;
        }
        rc = files_match(h->state_fd, h->data_fd, want);
        if (rc)
            return rc < 0 ? rc : 0;
        /* Converting to LOCK_EX drops LOCK_SH first; a reset needs every
         * other user gone. */
        if (flock(h->state_fd, LOCK_EX | LOCK_NB) < 0) {
            rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
            goto fail;
        }
        rc = files_match(h->state_fd, h->data_fd, want);
        if (rc == 0)
            rc = reset(h->state_fd, h->data_fd, want);
        if (rc < 0)
            goto fail;
        if (flock(h->state_fd, LOCK_SH) < 0) {
            rc = -errno;
            goto fail;
        }
        return 0;
    }
    return -EAGAIN;
fail:
    close(h->state_fd);
    if (h->data_fd >= 0)
        close(h->data_fd);
    h->state_fd = h->data_fd = -1;
    return rc;
}

int rs_hostcache_open(rs_hostcache **out, const char *dir, uint32_t n_chunks,
                      uint64_t chunk_size, const uint8_t *version_id)
{
    struct header want;
    char boot[BOOT_ID_LEN];
    rs_hostcache *h;
    void *m;
    int rc;

    *out = NULL;
    if (!n_chunks || !chunk_size || chunk_size & 4095 || (uint64_t)n_chunks > UINT64_MAX / chunk_size)
        return -EINVAL;
    if ((rc = boot_id(boot)) < 0)
        return rc;
    expected_header(&want, n_chunks, chunk_size, version_id, boot);
    h = calloc(1, sizeof(*h));
    if (!h)
        return -ENOMEM;
    h->state_fd = h->data_fd = -1;
    h->n_chunks = n_chunks;
    h->chunk_size = chunk_size;
    if ((rc = open_files(h, dir, &want)) < 0) {
        free(h);
        return rc;
    }
    m = mmap(NULL, STATE_AT + n_chunks, PROT_READ | PROT_WRITE, MAP_SHARED, h->state_fd, 0);
    if (m == MAP_FAILED)
        goto fail;
    h->state_map = m;
    h->state = (_Atomic uint8_t *)(h->state_map + STATE_AT);
    m = mmap(NULL, (size_t)n_chunks * chunk_size, PROT_READ, MAP_SHARED, h->data_fd, 0);
    if (m == MAP_FAILED)
        goto fail;
    h->data = m;
    *out = h;
    return 0;
fail:
    rc = -errno;
    rs_hostcache_close(h);
    return rc;
}

void rs_hostcache_close(rs_hostcache *h)
{
    if (!h)
        return;
    if (h->data)
        munmap((void *)h->data, (size_t)h->n_chunks * h->chunk_size);
    if (h->state_map)
        munmap(h->state_map, STATE_AT + h->n_chunks);
    /* Closing the descriptions drops LOCK_SH and any fill lock left. */
    close(h->data_fd);
    close(h->state_fd);
    free(h);
}

int rs_hostcache_present(const rs_hostcache *h, uint32_t c)
{
    return c < h->n_chunks &&
           atomic_load_explicit(&h->state[c], memory_order_acquire) == RS_HOST_PRESENT;
}

const uint8_t *rs_hostcache_chunk(const rs_hostcache *h, uint32_t c)
{
    return h->data + (size_t)c * h->chunk_size;
}

static int fill_lock(rs_hostcache *h, uint32_t c, int cmd, short type)
{
    struct flock fl = {
        .l_type = type,
        .l_whence = SEEK_SET,
        .l_start = (off_t)(STATE_AT + c),
        .l_len = 1,
    };

    while (fcntl(h->state_fd, cmd, &fl) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

int rs_hostcache_claim(rs_hostcache *h, uint32_t c, int *waited)
{
    int rc;

    *waited = 0;
    if (c >= h->n_chunks)
        return -EINVAL;
    if (rs_hostcache_present(h, c))
        return 1;
    rc = fill_lock(h, c, F_OFD_SETLK, F_WRLCK);
    if (rc == -EAGAIN || rc == -EACCES) {
        *waited = 1; /* someone else is filling it: wait for them */
        rc = fill_lock(h, c, F_OFD_SETLKW, F_WRLCK);
    }
    if (rc < 0)
        return rc;
    if (rs_hostcache_present(h, c)) {
        rs_hostcache_abandon(h, c);
        return 1;
    }
    return 0;
}

void rs_hostcache_abandon(rs_hostcache *h, uint32_t c)
{
    (void)fill_lock(h, c, F_OFD_SETLK, F_UNLCK);
}

int rs_hostcache_fill(rs_hostcache *h, uint32_t c, const uint8_t *decoded,
                      const uint8_t *zero_bitmap, uint64_t page_size)
{
    const uint64_t slots = h->chunk_size / page_size, base = (uint64_t)c * h->chunk_size;
    int rc = 0;

    if (c >= h->n_chunks || !page_size || h->chunk_size % page_size) {
        rc = -EINVAL;
        goto out;
    }
    /* A filler killed mid-way may have left bytes here; zero slots must
     * read as zeros. Nobody reads an absent chunk, so this changes nothing
     * a session uses. A range that is all hole, the common case, needs no
     * punch (a punch is a journal transaction on most filesystems). */
    {
        off_t next = lseek(h->data_fd, (off_t)base, SEEK_DATA);

        if ((next >= 0 && (uint64_t)next < base + h->chunk_size) || (next < 0 && errno != ENXIO)) {
            if (fallocate(h->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)base,
                          (off_t)h->chunk_size) < 0) {
                rc = -errno;
                goto out;
            }
        }
    }
    for (uint64_t s = 0; s < slots;) {
        uint64_t e;

        if (zero_bitmap[s / 8] >> (s % 8) & 1) {
            s++;
            continue;
        }
        for (e = s + 1; e < slots && !(zero_bitmap[e / 8] >> (e % 8) & 1); e++)
            ;
        for (uint64_t off = s * page_size; off < e * page_size;) {
            ssize_t n = pwrite(h->data_fd, decoded + off, e * page_size - off, (off_t)(base + off));

            if (n <= 0) {
                rc = n < 0 ? -errno : -EIO;
                goto out;
            }
            off += (uint64_t)n;
        }
        s = e;
    }
    atomic_store_explicit(&h->state[c], RS_HOST_PRESENT, memory_order_release);
out:
    rs_hostcache_abandon(h, c);
    return rc;
}
