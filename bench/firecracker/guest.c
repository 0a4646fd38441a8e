/* guest.c -- the guest the tests and the comparison boot under a real
 * Firecracker. Freestanding (no libc, no kernel): Firecracker's ELF boot
 * path loads it at 1 MiB and enters _start in 64-bit long mode at CPL 0,
 * with the first GiB identity-mapped and RSI pointing at the Linux boot
 * parameters ("zero page"), whose e820 table gives the memory size. It
 * moves to CPL 3 at once (see _start). No interrupts are enabled; the guest
 * polls the serial port (a 16550 at I/O port 0x3f8, which Firecracker
 * connects to its standard input and output).
 *
 * INIT builds real state in guest memory, the same work as minivm's guest
 * (bench/guestwork.h): records with keys and payloads, an open-addressing
 * hash index over the keys, and a "model" (rows of weights, half of them
 * zero). Then it prints "ready <records> <rows>" and serves requests, one
 * per line:
 *
 *   <n>      (decimal, 1 .. 2^32-1) data-dependent lookups and arithmetic
 *            over the state; answers "answer <n> <value>"
 *   sum      a hash over every byte of the state; answers "sum <value>"
 *
 * A snapshot taken after "ready" and restored elsewhere must give the
 * answers the VM that made it gives.
 */

#include "../guestwork.h"

#define STATE_BASE 0x400000ul /* above this program (loaded at 1 MiB) */
#define IDENTITY_END 0x40000000ul /* what Firecracker's boot page tables map */

#define COM1 0x3f8
#define LSR (COM1 + 5)
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

/* Offsets in the Linux boot parameters (struct boot_params). */
#define BP_E820_ENTRIES 0x1e8
#define BP_E820_TABLE 0x2d0
#define E820_RAM 1

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;

    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc_serial(char c)
{
    while (!(inb(LSR) & LSR_THR_EMPTY))
        __asm__ volatile("pause");
    outb(COM1, (u8)c);
}

static void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}

static void putu(u64 v)
{
    char buf[24];
    int n = 0;

    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc_serial(buf[--n]);
}

static char getc_serial(void)
{
    while (!(inb(LSR) & LSR_DATA_READY))
        __asm__ volatile("pause");
    return (char)inb(COM1);
}

static u64 state_end;

/* The end of the RAM that starts at 1 MiB, from the e820 table, capped at
 * what the boot page tables map. */
static u64 memory_end(const u8 *boot_params)
{
    u32 n = boot_params[BP_E820_ENTRIES];
    u64 end = 0;

    for (u32 i = 0; i < n; i++) {
        const u8 *e = boot_params + BP_E820_TABLE + 20 * i;
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        u32 type = *(const u32 *)(e + 16);

        if (type == E820_RAM && addr <= STATE_BASE && addr + size > end)
            end = addr + size;
    }
    return end > IDENTITY_END ? IDENTITY_END : end;
}

/* FNV-1a over the state's 64-bit words. */
static u64 state_sum(void)
{
    u64 h = 14695981039346656037ull;

    for (const u64 *w = (const u64 *)STATE_BASE; w < (const u64 *)state_end; w++)
        h = (h ^ *w) * 1099511628211ull;
    return h;
}

/* Read one request line; returns its length (the line without its end). */
static u32 read_line(char *buf, u32 cap)
{
    u32 n = 0;

    for (;;) {
        char c = getc_serial();

        if (c == '\n' || c == '\r') {
            if (n)
                return n;
            continue;
        }
        if (n + 1 < cap)
            buf[n++] = c;
    }
}

void main(const u8 *boot_params)
{
    char line[32];

    state_end = build_state(STATE_BASE, (u32)(memory_end(boot_params) - STATE_BASE));
    puts_serial("ready ");
    putu(n_records);
    putc_serial(' ');
    putu(n_rows);
    putc_serial('\n');
    for (;;) {
        u32 n = read_line(line, sizeof(line));
        u64 req = 0;
        u32 i;

        if (n == 3 && line[0] == 's' && line[1] == 'u' && line[2] == 'm') {
            puts_serial("sum ");
            putu(state_sum());
            putc_serial('\n');
            continue;
        }
        for (i = 0; i < n && line[i] >= '0' && line[i] <= '9' && req < (1ull << 32); i++)
            req = req * 10 + (u64)(line[i] - '0');
        if (i != n || req == 0 || req >= (1ull << 32)) {
            puts_serial("error bad request\n");
            continue;
        }
        puts_serial("answer ");
        putu(req);
        putc_serial(' ');
        putu(invoke((u32)req));
        putc_serial('\n');
    }
}

/* Entry, at CPL 0 on Firecracker's boot page tables. The guest drops to
 * CPL 3 before doing any work: under a software hypervisor such as PVM only
 * user-mode guest code runs natively, and kernel-mode code is slower by
 * orders of magnitude. So _start builds its own page tables (the first GiB
 * identity-mapped by 2 MiB pages, user-accessible) and GDT (64-bit user
 * code and data), and enters main at CPL 3 with IOPL 3, which lets it use
 * the serial port's I/O ports. Nothing ever returns to CPL 0: there is no
 * IDT and no interrupt is enabled. The stack is the guest's own. */
__asm__(".pushsection .text.start, \"ax\"\n"
        ".globl _start\n"
        "_start:\n"
        "    lea stack_top(%rip), %rsp\n"
        "    mov %rsi, %r12\n"
        /* pd[i] = i * 2 MiB | PS | U | RW | P */
        "    lea pd(%rip), %rdi\n"
        "    xor %ecx, %ecx\n"
        "1:  mov %rcx, %rax\n"
        "    shl $21, %rax\n"
        "    or $0x87, %rax\n"
        "    mov %rax, (%rdi,%rcx,8)\n"
        "    inc %ecx\n"
        "    cmp $512, %ecx\n"
        "    jne 1b\n"
        "    lea pd(%rip), %rax\n"
        "    or $0x7, %rax\n"
        "    mov %rax, pdpt(%rip)\n"
        "    lea pdpt(%rip), %rax\n"
        "    or $0x7, %rax\n"
        "    mov %rax, pml4(%rip)\n"
        "    lea pml4(%rip), %rax\n"
        "    mov %rax, %cr3\n"
        "    lgdt gdt_desc(%rip)\n"
        "    pushq $0x1b\n"            /* SS: user data, RPL 3 */
        "    lea stack_top(%rip), %rax\n"
        "    push %rax\n"              /* RSP */
        "    pushq $0x3002\n"          /* RFLAGS: IOPL 3, interrupts off */
        "    pushq $0x23\n"            /* CS: user code, RPL 3 */
        "    lea user_entry(%rip), %rax\n"
        "    push %rax\n"              /* RIP */
        "    iretq\n"
        "user_entry:\n"
        "    mov $0x1b, %ax\n"
        "    mov %ax, %ds\n"
        "    mov %ax, %es\n"
        "    mov %r12, %rdi\n"
        "    call main\n"
        "2:  pause\n"
        "    jmp 2b\n"
        ".balign 8\n"
        "gdt:\n"
        "    .quad 0\n"
        "    .quad 0x00af9a000000ffff\n" /* 0x08 kernel code, 64-bit */
        "    .quad 0x00cf92000000ffff\n" /* 0x10 kernel data */
        "    .quad 0x00cff2000000ffff\n" /* 0x18 user data */
        "    .quad 0x00affa000000ffff\n" /* 0x20 user code, 64-bit */
        "gdt_end:\n"
        "gdt_desc:\n"
        "    .word gdt_end - gdt - 1\n"
        "    .quad gdt\n"
        ".popsection\n"
        ".pushsection .bss\n"
        ".balign 4096\n"
        "pml4: .skip 4096\n"
        "pdpt: .skip 4096\n"
        "pd:   .skip 4096\n"
        ".balign 16\n"
        "    .skip 65536\n"
        "stack_top:\n"
        ".popsection\n");
