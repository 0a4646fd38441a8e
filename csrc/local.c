/* local.c -- the local threads: the host cache, then L1, then the fetch
 * queue; verifying and decoding (struct rs_local). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "l1.h"
#include "private/engine_int.h"

/* Verify and decode stored bytes of chunk c into a new buffer (*out),
 * timed into decode_ns. */
int decode_chunk(rs_engine *e, uint32_t c, const uint8_t *stored, size_t len, uint8_t **out)
{
    uint64_t t0 = now_ns();
    uint8_t *data = chunk_alloc(e);
    int rc = data ? rs_chunk_decode(e->codec, stored, len, e->ids + (size_t)c * RS_ID_BYTES,
                                    e->flags[c], e->zero + (size_t)c * e->bm_bytes, data)
                  : -ENOMEM;

    atomic_fetch_add(&e->st.decode_ns, now_ns() - t0);
    if (rc) {
        chunk_free(e, data);
        data = NULL;
    }
    *out = data;
    return rc;
}

/* Chunk c was verified and decoded into data (a pool buffer), its bytes
 * from tier src: serve it from the buffer, and when this engine is the
 * chunk's host cache filler, write it there too (later sessions, here and
 * in other processes, install it from the host cache's mapping). */
void publish(rs_engine *e, uint32_t c, uint8_t *data, int src)
{
    struct chunk *ch = &e->chunks[c];
    uint64_t t0;
    int rc;

    if (!ch->host_claimed) {
        settle_chunk(e, c, data, src, 0);
        return;
    }
    /* The faults waiting on the chunk come first: serve them (and the
     * plan's pages) from the buffer, then write it into the host cache for
     * everyone else. The reference keeps the buffer while it is written,
     * should every page of the chunk be in by then. */
    (void)chunk_acquire(e, c); /* a new chunk: never freed yet */
    settle_chunk(e, c, data, src, 0);
    t0 = now_ns();
    rc = rs_hostcache_fill(e->host, c, data, e->zero + (size_t)c * e->bm_bytes,
                           rs_codec_page_size(e->codec));
    atomic_fetch_add(&e->st.host_fill_ns, now_ns() - t0);
    ch->host_claimed = 0;
    atomic_fetch_add(rc == 0 ? &e->st.host_fills : &e->st.host_errors, 1);
    chunk_release(e, c);
}

/* Become chunk c's host cache filler; 1 when the host cache has it (it is
 * settled from there), 0 otherwise (claimed, or the host cache failed:
 * the chunk is loaded as without one). */
static int host_load(rs_engine *e, uint32_t c)
{
    int waited, rc = rs_hostcache_claim(e->host, c, &waited);

    if (waited)
        atomic_fetch_add(&e->st.host_waits, 1);
    if (rc == 1) {
        atomic_fetch_add(&e->st.chunks_host, 1);
        settle_chunk(e, c, (uint8_t *)rs_hostcache_chunk(e->host, c), RS_SRC_HOST, 1);
        return 1;
    }
    if (rc == 0)
        e->chunks[c].host_claimed = 1;
    else
        atomic_fetch_add(&e->st.host_errors, 1);
    return 0;
}

/* Read chunk c from L1 into buf (bound bytes), decode and publish it;
 * 0 when done, -1 on a miss or a bad copy. */
static int l1_load(rs_engine *e, uint32_t c, uint8_t *buf, size_t bound)
{
    uint64_t t0 = now_ns();
    int64_t n = rs_l1_read(e->local.l1_dir, e->ids + (size_t)c * RS_ID_BYTES, buf, bound);

    atomic_fetch_add(&e->st.l1_read_ns, now_ns() - t0);
    if (n >= 0 && (uint64_t)n == e->lens[c]) {
        uint8_t *data;
        int rc = decode_chunk(e, c, buf, (size_t)n, &data);

        if (rc == 0) {
            atomic_fetch_add(&e->st.chunks_l1, 1);
            publish(e, c, data, RS_SRC_L1);
            return 0;
        }
        atomic_fetch_add(&e->st.l1_bad, 1);
    } else if (n == -ENOENT) {
        atomic_fetch_add(&e->st.l1_misses, 1);
    } else {
        atomic_fetch_add(&e->st.l1_bad, 1);
    }
    return -1;
}

/* A local thread: host cache, then L1, then the fetchers ask the next
 * tiers (the host fill lock, if taken, stays held until they answer). */
void *local_main(void *arg)
{
    rs_engine *e = arg;
    size_t bound = rs_codec_stored_bound(e->codec);
    uint8_t *buf = e->local.l1_dir ? malloc(bound) : NULL;
    uint32_t c;
    int high;

    if (e->local.l1_dir && !buf) {
        note_error(e, -ENOMEM);
        return NULL;
    }
    while (rs_fetchq_pop(e->local.q, &c, &high, -1) == 1) {
        if (e->host && host_load(e, c))
            continue;
        if (e->local.l1_dir && l1_load(e, c, buf, bound) == 0)
            continue;
        atomic_store(&e->chunks[c].state, C_QUEUED_REMOTE);
        if (rs_fetchq_push(e->remoteq, c, high) == -ENOSPC) /* a prefetch stays a prefetch */
            note_error(e, -ENOSPC);
    }
    free(buf);
    return NULL;
}
