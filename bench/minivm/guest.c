/* guest.c -- the program minivm runs in its VM: 64-bit long mode at CPL 3,
 * memory identity-mapped with 2 MiB pages, no interrupts, no kernel.
 * Freestanding: no libc. (CPL 3, because under a software hypervisor such
 * as PVM only user-mode guest code runs natively; it talks to the VMM by
 * MMIO, which needs no privilege.)
 *
 * INIT builds real state in guest memory (bench/guestwork.h): records with
 * keys and payloads, an open-addressing hash index over the keys, and a
 * "model" (rows of weights); then it signals "snapshot now" on a port. After that it serves
 * requests: each one does data-dependent lookups and arithmetic over that
 * state and reports an answer. MMIO registers (32-bit, at MMIO_BASE, a
 * guest physical page with no memory behind it):
 *
 *   write 0  snapshot now (INIT is done)
 *   read  1  next request; 0 = none left
 *   write 2  the answer to the current request
 *   write 3  balloon: first guest page to drop;  write 4: page count
 *   write 5  done (the guest stops)
 *
 * A request with the top bit set asks for the balloon: the VMM drops the
 * scratch area (madvise MADV_DONTNEED) and the guest answers the sum of its
 * bytes, which must then be 0 (never the snapshot's bytes).
 *
 * Memory (guest physical): code at 0x1000, stack below 0x100000, state
 * from STATE_BASE, page tables at 0x9000 (set up by minivm); RDI holds the
 * memory size at entry (at most 1 GiB - 2 MiB: the last 2 MiB page of the
 * first GiB is MMIO).
 */

#include "../guestwork.h"

#define STATE_BASE 0x200000u
#define SCRATCH_BYTES 0x100000u /* the last MiB: the balloon's target */

#define MMIO_BASE 0x3fe00000ul
enum { REG_SNAPSHOT, REG_REQUEST, REG_ANSWER, REG_BALLOON_START, REG_BALLOON_PAGES, REG_DONE };

static inline void reg_write(int reg, u32 v)
{
    ((volatile u32 *)MMIO_BASE)[reg] = v;
}

static inline u32 reg_read(int reg)
{
    return ((volatile u32 *)MMIO_BASE)[reg];
}

static u32 *scratch;

static void init(u64 mem)
{
    build_state(STATE_BASE, (u32)(mem - STATE_BASE - SCRATCH_BYTES));
    scratch = (u32 *)(uptr)(mem - SCRATCH_BYTES);
    for (u32 w = 0; w < SCRATCH_BYTES / 4; w++)
        scratch[w] = 0xa5a5a5a5u ^ w;
}

static u32 balloon(void)
{
    u32 sum = 0;

    reg_write(REG_BALLOON_START, (u32)((uptr)scratch / 4096));
    reg_write(REG_BALLOON_PAGES, SCRATCH_BYTES / 4096);
    for (u32 w = 0; w < SCRATCH_BYTES / 4; w++)
        sum += scratch[w];
    return sum;
}

void main(u64 mem)
{
    u32 req;

    init(mem);
    reg_write(REG_SNAPSHOT, 1);
    while ((req = reg_read(REG_REQUEST)) != 0)
        reg_write(REG_ANSWER, (req & 0x80000000u) ? balloon() : invoke(req));
    reg_write(REG_DONE, 1);
}

__asm__(".section .text.start\n"
        ".globl _start\n"
        "_start:\n"
        "    call main\n"
        "1:  jmp 1b\n");
