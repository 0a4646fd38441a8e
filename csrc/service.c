/* service.c -- the service thread: the guest's uffd events, polling between
 * faults, and the installs retried after -EAGAIN (struct rs_service). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "private/engine_int.h"

static void retry_deferred(rs_engine *e)
{
    struct plist again;

    if (!atomic_load(&e->svc.n_deferred))
        return;
    pthread_mutex_lock(&e->lock);
    again = plist_take(&e->svc.deferred);
    atomic_store(&e->svc.n_deferred, 0);
    pthread_mutex_unlock(&e->lock);
    for (size_t i = 0; i < again.n; i++) {
        uint64_t p = again.v[i].page;
        int r = region_of_page(e, p);

        if (r >= 0 && serve_page(e, r, p, again.v[i].t_ns) == -EAGAIN)
            push_deferred(e, p, again.v[i].t_ns);
    }
    free(again.v);
}

static void handle_remove(rs_engine *e, uint64_t start, uint64_t end)
{
    const uint64_t ps = e->cfg.page_size;

    atomic_fetch_add(&e->st.removes, 1);
    for (size_t i = 0; i < e->n_regions; i++) {
        const rs_engine_region *g = &e->regions[i];
        uint64_t a = start > g->base ? start : g->base;
        uint64_t b = end < g->base + g->size ? end : g->base + g->size;

        if (a < b)
            punch(e, g->offset + (a - g->base) - (a - g->base) % ps,
                  b - a + (a - g->base) % ps);

        for (uint64_t addr = a - (a - g->base) % ps; addr < b; addr += ps) {
            uint64_t p = (g->offset + (addr - g->base)) / ps;

            bit_set(e->removed, p);
            bit_clear(e->present, p);
            settle_page(e, p);
        }
    }
}

/* A minor fault on page p: the page is in the memfd's page cache but not
 * mapped in the guest (its mapping was dropped without a REMOVE we were
 * told of, or the fault came between an install putting the page in the
 * cache and mapping it). Its bytes are the guest's own: map them with
 * UFFDIO_CONTINUE. A removed page gets zeros instead. */
static int serve_minor(rs_engine *e, int r, uint64_t p, uint64_t t_ns)
{
    const uint64_t ps = e->cfg.page_size, dst = addr_of(e, r, p);
    uint32_t c = chunk_of(e, p);
    int rc;

    if (bit_test(e->removed, p)) {
        punch(e, p * ps, ps);
        return serve_page(e, r, p, t_ns);
    }
    if (e->memfd.claimed && bit_test(e->memfd.claimed, p) && !bit_test(e->memfd.written, p))
        return -EAGAIN; /* its bytes are still being written */
    rc = rs_uffd_continue(e->svc.uffd, dst, ps, 0, NULL);
    if (rc == -EFAULT) /* gone from the cache meanwhile: a missing page now */
        return serve_page(e, r, p, t_ns);
    if (rc == -EEXIST)
        return ioctl_result(e, rs_uffd_wake(e->svc.uffd, dst, ps));
    if (rc == 0) {
        bit_set(e->present, p);
        settle_page(e, p);
        log_touch(e, p, c, c == NO_CHUNK ? RS_SRC_ZERO : e->chunks[c].source, t_ns);
    }
    return ioctl_result(e, rc);
}

static void handle_fault(rs_engine *e, const rs_uffd_event *ev)
{
    uint64_t t = now_ns(), p;
    uint64_t addr = ev->address & ~(e->cfg.page_size - 1);
    int r = page_of(e, addr, &p), rc;

    atomic_fetch_add(&e->st.faults, 1);
    if (r < 0 || p >= e->n_pages) {
        /* Memory the handshake did not describe: never guess its bytes. */
        note_error(e, -EFAULT);
        (void)poison_or_kill(e, addr, NO_CHUNK);
        return;
    }
    if (ev->flags & RS_UFFD_PAGEFAULT_MINOR) {
        atomic_fetch_add(&e->st.minor_faults, 1);
        rc = serve_minor(e, r, p, t);
    } else {
        rc = serve_page(e, r, p, t);
    }
    if (rc == -EAGAIN) {
        /* Retried by this thread once the pending events are read. */
        push_deferred(e, p, t);
        atomic_fetch_add(&e->st.deferred, 1);
    }
}

/* Read and handle the uffd's pending events; returns how many, or -errno. */
static int drain_events(rs_engine *e)
{
    rs_uffd_event ev[EVENT_BATCH];
    int n, total = 0;

    /* Read again only after a full batch: after a short one the queue is
     * empty, and going straight back to poll() keeps the thread's work
     * after waking a guest short (the scheduler then tends to keep guest
     * and handler on one CPU). */
    do {
        n = rs_uffd_read_events(e->svc.uffd, ev, EVENT_BATCH);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            switch (ev[i].event) {
            case RS_UFFD_EVENT_PAGEFAULT:
                handle_fault(e, &ev[i]);
                break;
            case RS_UFFD_EVENT_REMOVE:
            case RS_UFFD_EVENT_UNMAP:
                handle_remove(e, ev[i].address, ev[i].end);
                break;
            default:
                break;
            }
        }
        total += n;
    } while (n == EVENT_BATCH);
    return n < 0 ? n : total;
}

/* Handle the uffd's events with the install lock held for writing. */
static int handle_events(rs_engine *e)
{
    int rc;

    pthread_rwlock_wrlock(&e->install);
    rc = drain_events(e);
    pthread_rwlock_unlock(&e->install);
    if (rc < 0 && rc != -EAGAIN) {
        note_error(e, rc);
        end_session(e, rc == -ESRCH ? RS_END_MEMORY_GONE : RS_END_ERROR);
    }
    return rc;
}

/* After serving a fault, keep looking at the uffd for poll_us (restarted
 * by every event found) instead of sleeping: a guest that faults again
 * soon finds this thread awake, with no wake-up to wait for and no hop to
 * another CPU. The look is a poll() with no timeout (no install lock
 * taken); between looks the CPU is offered to whoever else is runnable on
 * it (the guest itself, when they share one). Nothing is spent once the
 * guest stops faulting for poll_us. */
static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void poll_busy(rs_engine *e)
{
    const uint64_t window = (uint64_t)e->cfg.poll_us * 1000;
    struct pollfd pfd = { .fd = e->svc.uffd, .events = POLLIN };
    uint64_t t = now_ns(), end = t + window, cpu0 = thread_cpu_ns(), handling = 0;

    while (t < end && !atomic_load_explicit(&e->svc.stop_now, memory_order_relaxed) &&
           !atomic_load(&e->guest_gone) && !atomic_load(&e->svc.n_deferred)) {
        if (poll(&pfd, 1, 0) > 0) {
            uint64_t h0 = thread_cpu_ns();
            int n = pfd.revents & POLLIN ? handle_events(e) : 0;

            handling += thread_cpu_ns() - h0;

            if (pfd.revents & (POLLERR | POLLHUP))
                end_session(e, RS_END_MEMORY_GONE);
            if (n > 0)
                atomic_fetch_add(&e->st.poll_hits, (uint64_t)n);
            t = now_ns();
            end = t + window;
            continue;
        }
        sched_yield();
        t = now_ns();
    }
    /* CPU time, not wall time: the yields give the CPU away. */
    atomic_fetch_add(&e->st.poll_ns, thread_cpu_ns() - cpu0 - handling);
}

/* The connection's end (EOF or hang-up). Without a pidfd it is the only
 * sign that the VMM went away: the session ends. With one, the VMM is
 * tracked by it (Firecracker before v1.12 closes the connection right
 * after the handshake and runs on): the end is counted and the connection
 * no longer polled. */
static void conn_ended(rs_engine *e, struct pollfd *conn)
{
    if (e->svc.pid_fd < 0) {
        end_session(e, RS_END_CONN_CLOSED);
        return;
    }
    atomic_store(&e->svc.conn_closed, 1);
    conn->fd = -1; /* poll() skips it from now on */
}

enum { PFD_UFFD, PFD_STOP, PFD_WAKE, PFD_PID, PFD_CONN, PFD_N };

void *service_main(void *arg)
{
    rs_engine *e = arg;
    struct pollfd pfd[PFD_N] = {
        [PFD_UFFD] = { .fd = e->svc.uffd, .events = POLLIN },
        [PFD_STOP] = { .fd = e->svc.stop_fd, .events = POLLIN },
        [PFD_WAKE] = { .fd = e->svc.wake_fd, .events = POLLIN },
        /* A negative fd is skipped by poll(). */
        [PFD_PID] = { .fd = e->svc.pid_fd, .events = POLLIN },
        [PFD_CONN] = { .fd = e->svc.conn_fd, .events = POLLIN | POLLRDHUP },
    };

    while (!atomic_load(&e->guest_gone)) {
        int n;

        /* Deferred installs wait for a REMOVE's remover to resume, which
         * comes with no event of ours: look again soon. */
        n = poll(pfd, PFD_N, atomic_load(&e->svc.n_deferred) ? 1 : -1);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            note_error(e, -errno);
            end_session(e, RS_END_ERROR);
            break;
        }
        if (pfd[PFD_STOP].revents)
            break;
        if (pfd[PFD_WAKE].revents & POLLIN) {
            uint64_t v;

            if (read(e->svc.wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                note_error(e, -errno);
        }
        if (pfd[PFD_CONN].fd >= 0 && pfd[PFD_CONN].revents) {
            char buf[256];
            ssize_t got = 1;

            if (!(pfd[PFD_CONN].revents & (POLLHUP | POLLRDHUP | POLLERR)))
                got = recv(e->svc.conn_fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (got == 0 || (pfd[PFD_CONN].revents & (POLLHUP | POLLRDHUP | POLLERR)))
                conn_ended(e, &pfd[PFD_CONN]);
        }
        if (pfd[PFD_UFFD].revents & (POLLERR | POLLHUP))
            end_session(e, RS_END_MEMORY_GONE);
        if ((pfd[PFD_UFFD].revents & POLLIN) && handle_events(e) > 0 && e->cfg.poll_us)
            poll_busy(e);
        retry_deferred(e);
        /* Last: the faults the VMM raised before it exited are served
         * (their replies are harmless once it is gone). */
        if (pfd[PFD_PID].revents)
            end_session(e, RS_END_VMM_EXITED);
    }
    engine_finish(e);
    return NULL;
}
