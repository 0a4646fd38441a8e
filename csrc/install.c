/* install.c -- putting pages in the guest: copy, zero, poison, and for a
 * memfd guest write then continue; runs and fault-around (struct rs_memfd). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "private/engine_int.h"

/* Result of an install ioctl: 0 done, -EAGAIN retry later, other -errno. */
int ioctl_result(rs_engine *e, int rc)
{
    if (rc == -ESRCH) {
        end_session(e, RS_END_MEMORY_GONE);
        wake_service(e);
    } else if (rc && rc != -EAGAIN) {
        note_error(e, rc);
    }
    return rc;
}

/* May page q join a fault-around run of chunk c (NO_CHUNK: of zero
 * pages) in region r? */
int candidate(rs_engine *e, int r, uint32_t c, uint64_t q)
{
    return q < e->n_pages && in_region(e, r, q) && chunk_of(e, q) == c &&
           !bit_test(e->present, q) && !bit_test(e->removed, q);
}

/* Continue mode: write the pages of [lo, hi) (their bytes at src, the run
 * contiguous there) into the memfd at their file offsets, each page by
 * whichever thread claims it first. Returns the first page that cannot be
 * mapped yet (another thread claimed it and has not finished writing it,
 * or a write failed), hi when all can. The guest cannot see a page before
 * it is mapped, and a page mapped by us is never claimed again (it is
 * present), so no write ever lands on bytes the guest may have changed. */
static uint64_t write_run(rs_engine *e, const uint8_t *src, uint64_t lo, uint64_t hi)
{
    const uint64_t ps = e->cfg.page_size;
    uint64_t q = lo;

    while (q < hi) {
        uint64_t a = q;

        while (q < hi && !bit_set(e->memfd.claimed, q))
            q++;
        for (uint64_t k = a; k < q;) {
            ssize_t n = pwrite(e->memfd.fd, src + (k - lo) * ps, (q - k) * ps, (off_t)(k * ps));

            if (n <= 0) {
                note_error(e, n < 0 ? -errno : -EIO);
                for (uint64_t j = k; j < q; j++)
                    bit_clear(e->memfd.claimed, j); /* let a later try write them */
                return k;
            }
            for (uint64_t j = k; j < k + (uint64_t)n / ps; j++)
                bit_set(e->memfd.written, j);
            atomic_fetch_add(&e->st.memfd_written, (uint64_t)n / ps);
            k += (uint64_t)n / ps;
        }
        if (q < hi) {
            if (!bit_test(e->memfd.written, q))
                return q;
            q++; /* written by another thread: map it all the same */
        }
    }
    return hi;
}

/* Install the run of pages [lo, hi) of region r: copied from src (the run
 * is contiguous there) or, when src is NULL, as zero pages. Pages found
 * present are skipped. The first ioctl wakes what it installs; once the
 * run is split, the rest goes in with DONTWAKE and one wake at the end.
 * *upto receives the first page not handled (hi when all were).
 * Returns 0, -EAGAIN (the mm is changing: retry later) or another -errno.
 *
 * prefetch: the prefetch installs it (its pages are marked prefetched and
 * its time counted apart).
 *
 * The kernel reports a partial install as -EAGAIN with *done > 0, and
 * -EEXIST only when the first page of the request is present. */
int fill_run(rs_engine *e, int r, const uint8_t *src, uint64_t lo, uint64_t hi, uint64_t *upto,
             int prefetch)
{
    const uint64_t ps = e->cfg.page_size, dst = addr_of(e, r, lo);
    uint64_t off = 0, mode = 0, done, t0 = now_ns(), len;
    int rc = 0, split = 0, cont = src && src != e->zero_page && e->memfd.cont;

    if (cont) /* the bytes go into the memfd; the ioctls only map them */
        hi = write_run(e, src, lo, hi);
    len = (hi - lo) * ps;
    while (off < len) {
        done = 0;
        if (cont)
            rc = rs_uffd_continue(e->svc.uffd, dst + off, len - off, mode, &done);
        else if (src)
            rc = rs_uffd_copy(e->svc.uffd, dst + off, (uint64_t)(uintptr_t)(src + off),
                              len - off, mode, &done);
        else
            rc = rs_uffd_zeropage(e->svc.uffd, dst + off, len - off, mode, &done);
        for (uint64_t k = 0; k < done / ps; k++) {
            bit_set(e->present, lo + off / ps + k);
            settle_page(e, lo + off / ps + k);
            if (prefetch)
                bit_set(e->plan.prefetched, lo + off / ps + k);
        }
        if (prefetch)
            atomic_fetch_add(&e->st.prefetch_pages, done / ps);
        atomic_fetch_add(&e->st.pages_installed, done / ps);
        atomic_fetch_add(&e->st.bytes_installed, done);
        off += done;
        if (rc == -EAGAIN && done > 0) {
            split = split || mode == RS_UFFD_DONTWAKE;
            continue; /* partial: the next call says what stopped it */
        }
        if (rc != -EEXIST)
            break;
        atomic_fetch_add(&e->st.eexist, 1);
        bit_set(e->present, lo + off / ps);
        settle_page(e, lo + off / ps);
        off += ps;
        mode = RS_UFFD_DONTWAKE;
        split = 1;
        rc = 0;
    }
    if (split && off)
        (void)rs_uffd_wake(e->svc.uffd, dst, off);
    *upto = lo + off / ps;
    atomic_fetch_add(prefetch ? &e->st.prefetch_install_ns : &e->st.demand_install_ns, now_ns() - t0);
    return ioctl_result(e, rc);
}

/* Serve a fault on zero page p (all zero, or removed) with zeros: one
 * UFFDIO_ZEROPAGE over the run of not-yet-present zero pages around it
 * within its aligned window of `window` pages (1: the page alone). hugetlbfs has no UFFDIO_ZEROPAGE: huge
 * pages are copied from a zero page, one at a time. */
int install_zero(rs_engine *e, int r, uint64_t p, uint32_t window, uint64_t *lo_out,
                 uint64_t *upto_out, int prefetch)
{
    uint64_t lo = p, hi = p + 1, upto;
    int rc;

    if (e->cfg.page_size != 4096) {
        rc = fill_run(e, r, e->zero_page, p, p + 1, &upto, prefetch);
        goto out;
    }
    if (window > 1) {
        uint64_t w0 = p - p % window, w1 = w0 + window;

        while (lo > w0 && candidate(e, r, NO_CHUNK, lo - 1))
            lo--;
        while (hi < w1 && candidate(e, r, NO_CHUNK, hi))
            hi++;
    }
    rc = fill_run(e, r, NULL, lo, hi, &upto, prefetch);
    if (rc == -EAGAIN && upto > p)
        rc = 0;
out:
    if (lo_out) {
        *lo_out = lo;
        *upto_out = upto;
    }
    return rc;
}

/* The page at addr (of chunk, NO_CHUNK: outside the regions) can be
 * neither served nor poisoned (err: why not). The faulting thread must not
 * be left asleep for ever, nor woken onto an empty page: the VMM is killed
 * through its pidfd (the first such page is recorded, for the log). Without
 * a pidfd, or if the kill fails, the session ends (RS_END_UNSERVABLE) and
 * the caller of the engine kills the VMM as it can. Returns err. */
static int unservable(rs_engine *e, uint64_t addr, uint32_t chunk, int err)
{
    int none = 0, rc = -EBADF;

    note_error(e, err);
    if (!atomic_compare_exchange_strong(&e->kill.state, &none, 1))
        return err; /* killed already, or being killed */
    e->kill.addr = addr;
    e->kill.chunk = chunk;
    e->kill.error = err;
    if (e->svc.pid_fd >= 0)
        rc = syscall(SYS_pidfd_send_signal, e->svc.pid_fd, SIGKILL, NULL, 0) < 0 ? -errno : 0;
    e->kill.result = rc;
    atomic_store_explicit(&e->kill.state, 2, memory_order_release);
    if (rc) {
        end_session(e, RS_END_UNSERVABLE);
        wake_service(e);
    }
    return err;
}

/* Poison the missing page at addr (of chunk; NO_CHUNK: outside the
 * regions) so that the faulting thread gets SIGBUS; where the kernel has
 * no UFFDIO_POISON (cfg.no_poison, or the ioctl says EINVAL) kill the VMM
 * instead (unservable). Returns 0 or -errno. */
int poison_or_kill(rs_engine *e, uint64_t addr, uint32_t chunk)
{
    uint64_t ps = e->cfg.page_size;
    int rc;

    if (e->cfg.no_poison)
        return unservable(e, addr, chunk, -EOPNOTSUPP);
    rc = rs_uffd_poison(e->svc.uffd, addr, ps, 0, NULL);
    if (rc == -EEXIST)
        rc = rs_uffd_wake(e->svc.uffd, addr, ps);
    else if (rc == 0)
        atomic_fetch_add(&e->st.poisoned, 1);
    else if (rc == -EINVAL)
        return unservable(e, addr, chunk, rc);
    return ioctl_result(e, rc);
}

int install_poison(rs_engine *e, int r, uint64_t p)
{
    return poison_or_kill(e, addr_of(e, r, p), chunk_of(e, p));
}

/* The run around page p of chunk c in region r: [*lo, *hi), the
 * not-yet-present pages around p within its aligned window of `window`
 * pages that are contiguous in the chunk. */
void run_around(rs_engine *e, int r, uint32_t c, uint64_t p, uint32_t window, uint64_t *lo,
                uint64_t *hi)
{
    const uint64_t ps = e->cfg.page_size;

    *lo = p;
    *hi = p + 1;
    if (window > 1) {
        uint64_t w0 = p - p % window;
        uint64_t w1 = w0 + window;

        while (*lo > w0 && candidate(e, r, c, *lo - 1) &&
               off_of(e, *lo - 1) + ps == off_of(e, *lo))
            (*lo)--;
        while (*hi < w1 && candidate(e, r, c, *hi) &&
               off_of(e, *hi) == off_of(e, *hi - 1) + ps)
            (*hi)++;
    }
}

/* The rest of page p's aligned window of `window` pages (fault-around),
 * past where the run [lo, hi) around p stopped (a page present already, a zero page, a page of another
 * chunk): every missing page of chunk c in the aligned window goes in, as
 * runs contiguous in the chunk. After a prefetch installed the planned
 * pages, this is what brings in their unplanned neighbours when the guest
 * touches one. Best effort: pages of a run that fails fault later. */
void fill_window_rest(rs_engine *e, int r, uint32_t c, uint64_t p, uint32_t window, uint64_t lo,
                      uint64_t hi, int prefetch)
{
    const uint64_t ps = e->cfg.page_size, w0 = p - p % window, w1 = w0 + window;
    uint64_t q = w0;

    while (q < w1) {
        uint64_t a, upto;

        if (q >= lo && q < hi) {
            q = hi;
            continue;
        }
        if (!candidate(e, r, c, q)) {
            q++;
            continue;
        }
        a = q++;
        while (q < w1 && q != lo && candidate(e, r, c, q) && off_of(e, q) == off_of(e, q - 1) + ps)
            q++;
        (void)fill_run(e, r, e->chunks[c].data + off_of(e, a), a, q, &upto, prefetch);
        log_planned(e, a, upto, UINT64_MAX);
    }
}

int install_from_chunk(rs_engine *e, int r, uint64_t p, uint32_t c)
{
    uint64_t lo, hi, upto;
    int rc;

    run_around(e, r, c, p, e->cfg.fault_around, &lo, &hi);
    rc = fill_run(e, r, e->chunks[c].data + off_of(e, lo), lo, hi, &upto, 0);
    if (rc == -EAGAIN && upto > p)
        rc = 0; /* the faulting page made it; the rest may fault later */
    else if (rc == 0 && upto <= p)
        rc = -EAGAIN; /* continue mode: another thread is writing it */
    log_planned(e, lo, upto, p);
    if (rc == 0 && e->cfg.fault_around > 1)
        fill_window_rest(e, r, c, p, e->cfg.fault_around, lo, hi, 0);
    return rc;
}

/* Drop file bytes [off, off + len) of the memfd from its page cache: a
 * removed range of shared memory must read as zeros, as it does for
 * anonymous memory, not as what it held. */
void punch(rs_engine *e, uint64_t off, uint64_t len)
{
    if (e->memfd.fd >= 0 &&
        fallocate(e->memfd.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
        note_error(e, -errno);
}
