/* guest.c -- the program minivm runs in its VM: 64-bit long mode at CPL 3,
 * memory identity-mapped with 2 MiB pages, no interrupts, no kernel.
 * Freestanding: no libc. (CPL 3, because under a software hypervisor such
 * as PVM only user-mode guest code runs natively; it talks to the VMM by
 * MMIO, which needs no privilege.)
 *
 * INIT builds real state in guest memory: records with keys and payloads,
 * an open-addressing hash index over the keys, and a "model" (rows of
 * weights); then it signals "snapshot now" on a port. After that it serves
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

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;

#define STATE_BASE 0x200000u
#define SCRATCH_BYTES 0x100000u /* the last MiB: the balloon's target */
#define RECORD_BYTES 64u
#define ROW_WORDS 256u
#define LOOKUPS 400u

#define MMIO_BASE 0x3fe00000ul
enum { REG_SNAPSHOT, REG_REQUEST, REG_ANSWER, REG_BALLOON_START, REG_BALLOON_PAGES, REG_DONE };

struct record {
    u32 key;
    u32 payload[RECORD_BYTES / 4 - 1];
};

static inline void reg_write(int reg, u32 v)
{
    ((volatile u32 *)MMIO_BASE)[reg] = v;
}

static inline u32 reg_read(int reg)
{
    return ((volatile u32 *)MMIO_BASE)[reg];
}

static u32 rnd(u32 *s)
{
    u32 x = *s;

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static u32 key_of(u32 i)
{
    u32 k = i * 2654435761u ^ 0x5bd1e995u;

    k ^= k >> 15;
    return k | 1u; /* never 0: 0 marks an empty slot */
}

static struct record *records;
static u32 *table;   /* 2n slots: record index + 1, or 0 */
static u32 *model;   /* rows * ROW_WORDS weights */
static u32 *scratch;
static u32 n_records, n_slots, n_rows;

static void init(u64 mem)
{
    u32 avail = (u32)(mem - STATE_BASE - SCRATCH_BYTES);
    u32 s = 12345;

    n_records = avail / 10 * 4 / RECORD_BYTES;
    n_slots = 2 * n_records;
    records = (struct record *)(uptr)STATE_BASE;
    table = (u32 *)(records + n_records);
    model = table + n_slots;
    n_rows = (avail / 10 * 3) / (ROW_WORDS * 4);
    scratch = (u32 *)(uptr)(mem - SCRATCH_BYTES);

    for (u32 i = 0; i < n_records; i++) {
        records[i].key = key_of(i);
        for (u32 w = 0; w < RECORD_BYTES / 4 - 1; w++)
            records[i].payload[w] = rnd(&s);
    }
    for (u32 i = 0; i < n_records; i++) {
        u32 slot = records[i].key % n_slots;

        while (table[slot])
            slot = slot + 1 == n_slots ? 0 : slot + 1;
        table[slot] = i + 1;
    }
    /* Half the model's rows are filled; the rest stays zero, as real
     * memory has its zero pages. */
    for (u32 r = 0; r < n_rows; r += 2)
        for (u32 w = 0; w < ROW_WORDS; w++)
            model[r * ROW_WORDS + w] = rnd(&s) & 0xffff;
    for (u32 w = 0; w < SCRATCH_BYTES / 4; w++)
        scratch[w] = 0xa5a5a5a5u ^ w;
}

static struct record *lookup(u32 key)
{
    u32 slot = key % n_slots;

    while (table[slot]) {
        struct record *r = &records[table[slot] - 1];

        if (r->key == key)
            return r;
        slot = slot + 1 == n_slots ? 0 : slot + 1;
    }
    return 0;
}

static u32 invoke(u32 req)
{
    u32 s = req * 2654435761u ^ 0x9e3779b9u, acc = req;

    if (!s)
        s = 1;
    for (u32 q = 0; q < LOOKUPS; q++) {
        struct record *r = lookup(key_of(rnd(&s) % n_records));
        u32 row, dot = 0;

        if (!r)
            return 0xdeadbeefu; /* the index lost a key: state is wrong */
        acc ^= r->payload[rnd(&s) % (RECORD_BYTES / 4 - 1)];
        row = (acc ^ s) % n_rows;
        for (u32 k = 0; k < 64; k++)
            dot += model[row * ROW_WORDS + k * 4] * (k + 1);
        acc = ((acc << 5) | (acc >> 27)) + dot;
    }
    return acc;
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
