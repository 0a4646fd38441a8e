/* l1.c -- read chunk files from the local cache directory (see l1.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "l1.h"

int64_t rs_l1_read(const char *dir, const uint8_t *id, uint8_t *buf, size_t cap)
{
    static const char hex[] = "0123456789abcdef";
    char name[65], path[4096];
    struct stat st;
    size_t got = 0;
    int fd, n;

    for (int i = 0; i < 32; i++) {
        name[2 * i] = hex[id[i] >> 4];
        name[2 * i + 1] = hex[id[i] & 15];
    }
    name[64] = '\0';
    n = snprintf(path, sizeof(path), "%s/%.2s/%s", dir, name, name);
    if (n < 0 || (size_t)n >= sizeof(path))
        return -ENAMETOOLONG;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0) {
        n = -errno;
        close(fd);
        return n;
    }
    if ((uint64_t)st.st_size > cap) {
        close(fd);
        return -EFBIG;
    }
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            n = r < 0 ? -errno : -EIO;
            close(fd);
            return n;
        }
        got += (size_t)r;
    }
    (void)futimens(fd, NULL); /* LRU refresh; best effort */
    close(fd);
    return (int64_t)got;
}
