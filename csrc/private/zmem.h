/* zmem.h -- zeroed memory that costs nothing until it is written.
 * Private to csrc/ (not part of the cdef).
 *
 * Per-page bitmaps and per-record logs are sized by the guest's memory, but
 * a session writes only the parts its work touches. Anonymous mappings give
 * zeroed pages on first write: setup is O(1), and resident memory follows
 * what the session did, not how large the guest is (calloc may take the
 * block from the heap and clear all of it). */
#ifndef RS_PRIVATE_ZMEM_H
#define RS_PRIVATE_ZMEM_H

#include <stddef.h>
#include <sys/mman.h>

static inline void *rs_zalloc(size_t bytes)
{
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

    return p == MAP_FAILED ? NULL : p;
}

/* Free what rs_zalloc(bytes) returned (NULL: nothing). */
static inline void rs_zfree(void *p, size_t bytes)
{
    if (p)
        munmap(p, bytes ? bytes : 1);
}

#endif
