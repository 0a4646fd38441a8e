/* fetchq.c -- two-priority request queue (mutex + condition variable). */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "fetchq.h"
#include "private/deadline.h"

struct ring {
    uint32_t *slots;
    uint32_t head, count; /* next to pop; entries held */
};

struct rs_fetchq {
    pthread_mutex_t lock;
    pthread_cond_t nonempty;
    uint32_t capacity;
    int closed;
    struct ring level[2]; /* [0] low, [1] high */
};

int rs_fetchq_create(rs_fetchq **out, uint32_t capacity)
{
    rs_fetchq *q = calloc(1, sizeof(*q));
    pthread_condattr_t ca;

    *out = NULL;
    if (!q)
        return -ENOMEM;
    q->capacity = capacity ? capacity : 1;
    for (int i = 0; i < 2; i++) {
        q->level[i].slots = calloc(q->capacity, sizeof(uint32_t));
        if (!q->level[i].slots) {
            free(q->level[0].slots);
            free(q);
            return -ENOMEM;
        }
    }
    pthread_mutex_init(&q->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->nonempty, &ca);
    pthread_condattr_destroy(&ca);
    *out = q;
    return 0;
}

void rs_fetchq_destroy(rs_fetchq *q)
{
    if (!q)
        return;
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->nonempty);
    free(q->level[0].slots);
    free(q->level[1].slots);
    free(q);
}

int rs_fetchq_push(rs_fetchq *q, uint32_t chunk, int high)
{
    struct ring *r = &q->level[high ? 1 : 0];
    int rc = 0;

    pthread_mutex_lock(&q->lock);
    if (q->closed)
        rc = -ESHUTDOWN;
    else if (r->count == q->capacity)
        rc = -ENOSPC;
    else {
        r->slots[(r->head + r->count) % q->capacity] = chunk;
        r->count++;
        pthread_cond_signal(&q->nonempty);
    }
    pthread_mutex_unlock(&q->lock);
    return rc;
}

int rs_fetchq_pop(rs_fetchq *q, uint32_t *chunk, int *high, int timeout_ms)
{
    struct timespec deadline = rs_deadline_after(timeout_ms > 0 ? timeout_ms : 0);
    int rc = 0;

    pthread_mutex_lock(&q->lock);
    for (;;) {
        for (int lv = 1; lv >= 0; lv--) {
            struct ring *r = &q->level[lv];

            if (r->count) {
                *chunk = r->slots[r->head];
                if (high)
                    *high = lv;
                r->head = (r->head + 1) % q->capacity;
                r->count--;
                rc = 1;
                goto out;
            }
        }
        if (q->closed) {
            rc = -ESHUTDOWN;
            goto out;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(&q->nonempty, &q->lock);
        } else if (pthread_cond_timedwait(&q->nonempty, &q->lock, &deadline) == ETIMEDOUT) {
            rc = 0;
            goto out;
        }
    }
out:
    pthread_mutex_unlock(&q->lock);
    return rc;
}

void rs_fetchq_close(rs_fetchq *q)
{
    pthread_mutex_lock(&q->lock);
    q->closed = 1;
    pthread_cond_broadcast(&q->nonempty);
    pthread_mutex_unlock(&q->lock);
}

uint32_t rs_fetchq_pending(rs_fetchq *q, int high)
{
    uint32_t n;

    pthread_mutex_lock(&q->lock);
    n = q->level[high ? 1 : 0].count;
    pthread_mutex_unlock(&q->lock);
    return n;
}
