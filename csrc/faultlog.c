/* faultlog.c -- a lock-free, never-overwriting ring of first touches. */
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "faultlog.h"
#include "private/zmem.h"

_Static_assert(sizeof(rs_fault_record) == 32, "numpy dtype in restore/session.py");

struct rs_faultlog {
    size_t capacity;          /* records */
    atomic_size_t claimed;    /* slots handed out (may exceed capacity) */
    atomic_uint_fast64_t dropped;
    atomic_uchar *ready;      /* 1 once slot i holds a whole record */
    rs_fault_record *recs;
};

int rs_faultlog_create(rs_faultlog **out, size_t capacity)
{
    rs_faultlog *l = calloc(1, sizeof(*l));

    *out = NULL;
    if (!l)
        return -ENOMEM;
    l->capacity = capacity;
    /* Sized for the worst case (a record per guest page), paid for as used. */
    l->recs = rs_zalloc(capacity * sizeof(*l->recs));
    l->ready = rs_zalloc(capacity * sizeof(*l->ready));
    if (!l->recs || !l->ready) {
        rs_faultlog_destroy(l);
        return -ENOMEM;
    }
    atomic_init(&l->claimed, 0);
    atomic_init(&l->dropped, 0);
    *out = l;
    return 0;
}

void rs_faultlog_destroy(rs_faultlog *log)
{
    if (!log)
        return;
    rs_zfree(log->recs, log->capacity * sizeof(*log->recs));
    rs_zfree((void *)log->ready, log->capacity * sizeof(*log->ready));
    free(log);
}

int rs_faultlog_append(rs_faultlog *log, const rs_fault_record *rec)
{
    size_t i = atomic_fetch_add_explicit(&log->claimed, 1, memory_order_relaxed);

    if (i >= log->capacity) {
        atomic_fetch_add_explicit(&log->dropped, 1, memory_order_relaxed);
        return -ENOSPC;
    }
    log->recs[i] = *rec;
    atomic_store_explicit(&log->ready[i], 1, memory_order_release);
    return 0;
}

size_t rs_faultlog_count(const rs_faultlog *log)
{
    size_t n = atomic_load_explicit(&((rs_faultlog *)log)->claimed, memory_order_acquire);

    return n < log->capacity ? n : log->capacity;
}

uint64_t rs_faultlog_dropped(const rs_faultlog *log)
{
    return atomic_load_explicit(&((rs_faultlog *)log)->dropped, memory_order_relaxed);
}

size_t rs_faultlog_copy(const rs_faultlog *log, rs_fault_record *out, size_t max)
{
    size_t n = rs_faultlog_count(log), k = 0;

    for (size_t i = 0; i < n && k < max; i++) {
        if (atomic_load_explicit(&log->ready[i], memory_order_acquire))
            out[k++] = log->recs[i];
    }
    return k;
}
