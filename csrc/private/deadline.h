/* deadline.h -- a CLOCK_MONOTONIC deadline for pthread_cond_timedwait.
 * Private to csrc/ (not part of the cdef). */
#ifndef RS_PRIVATE_DEADLINE_H
#define RS_PRIVATE_DEADLINE_H

#include <time.h>

/* Now plus ms milliseconds (ms >= 0), for condition variables whose clock
 * was set to CLOCK_MONOTONIC. */
static inline struct timespec rs_deadline_after(int ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

#endif
