/* fetchq.h -- a queue of chunk requests with two priorities (cdef-clean).
 *
 * Producers push chunk indices; consumers (C threads, or Python fetcher
 * threads blocked inside rs_fetchq_pop with the GIL released) pop the
 * high-priority requests (demand faults) before the low ones (prefetch).
 * Each level holds at most `capacity` entries; the engine pushes a chunk at
 * most once per level, so capacity = number of chunks never overflows.
 */

typedef struct rs_fetchq rs_fetchq;

int rs_fetchq_create(rs_fetchq **out, uint32_t capacity);
void rs_fetchq_destroy(rs_fetchq *q);

/* Queue chunk at high (1) or low (0) priority; -ENOSPC when that level is
 * full, -ESHUTDOWN once closed. */
int rs_fetchq_push(rs_fetchq *q, uint32_t chunk, int high);

/* Take the next request, waiting up to timeout_ms (< 0: forever).
 * Returns 1 and sets *chunk (and *high), 0 on timeout, -ESHUTDOWN once the
 * queue is closed and empty. */
int rs_fetchq_pop(rs_fetchq *q, uint32_t *chunk, int *high, int timeout_ms);

/* Wake every waiter; later pushes fail and pops drain what is left. */
void rs_fetchq_close(rs_fetchq *q);

/* Requests waiting at each level. */
uint32_t rs_fetchq_pending(rs_fetchq *q, int high);
