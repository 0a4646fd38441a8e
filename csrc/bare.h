/* bare.h -- the bare minimal fault handler: the performance floor (cdef: no
 * macros, no includes). Built into restore._testbed, not the engine.
 *
 * No tiers, no chunks, no fault log: every missing-page fault is answered
 * with one UFFDIO_COPY of one page straight from an image held in memory,
 * waking the faulting thread. Benchmarks measure the engine against it.
 *
 * Loop (the kernel selftests' idiom): poll the uffd, stop_fd and peer_fd;
 * read events in batches of up to 64; then serve the faults read:
 *   copy ok        served
 *   -EEXIST        the page is there already (a racing fault, or the
 *                  kernel's own retry): wake the range, count it as served
 *   -EAGAIN        a REMOVE event is pending or being completed: keep the
 *                  fault, drain events, retry (yielding the CPU meanwhile)
 *   -ENOENT        the range is no longer registered (unmapped): drop it
 *   -ESRCH         the guest's address space is gone: return 0
 *   other errors   poison the page (the guest gets SIGBUS, not a hang) and
 *                  return the error
 *
 * REMOVE (balloon / virtio-mem, madvise(MADV_DONTNEED) in the guest): the
 * range is recorded, and every later fault in it is answered with zeros
 * (UFFDIO_ZEROPAGE for 4 KiB pages, a copy of a zero page for 2 MiB ones),
 * never with image bytes, as Firecracker's contract requires. Removed
 * ranges are kept merged and sorted; with no REMOVE the cost is nothing.
 *
 * Ending: the guest's exit does NOT wake a poll on the uffd (the kernel
 * reports neither POLLHUP nor POLLERR when the guest's mm goes away), so
 * the caller passes peer_fd, an fd that becomes readable or hangs up when
 * the guest is gone: the guest's end of the handshake socket (it reads EOF
 * when the VMM exits) or a pidfd of the guest.
 */

/* Serve one guest until stop_fd or peer_fd becomes readable (or hangs up),
 * or the guest's memory is gone.
 *
 * uffd:     the guest's userfaultfd, O_NONBLOCK (Firecracker's is; a
 *           blocking one is refused with -EINVAL, since it polls as
 *           POLLERR), API handshake done by the guest; borrowed, not closed.
 * bases, sizes, offsets, n_regions: the guest's regions from the handshake
 *           (host address, bytes, file offset in bytes), all page aligned;
 *           every region's file range must lie inside the image.
 * page_size: bytes, a power of two >= 4096 (4096 or 2 MiB for a VM).
 * image, image_len: the memory file, bytes; read only; any alignment (a
 *           page-aligned image copies fastest).
 * stop_fd:  readable = stop (an eventfd or a pipe); -1 for none.
 * peer_fd:  readable or hung up = the guest is gone; -1 for none.
 * faults:   receives the number of faults served, updated after every
 *           batch so another thread may watch it (may be NULL).
 *
 * Returns 0 when stopped or the guest is gone; -EINVAL for bad arguments;
 * -EFAULT when a fault lies outside every region given (the page is
 * poisoned first); -ENOMEM; or the -errno of a failed poll, read or ioctl.
 * Never takes the GIL: call it from Python through cffi, which releases it.
 */
int rs_bare_serve(int uffd, const uint64_t *bases, const uint64_t *sizes,
                  const uint64_t *offsets, size_t n_regions, uint64_t page_size,
                  const uint8_t *image, uint64_t image_len, int stop_fd,
                  int peer_fd, uint64_t *faults);
