/* minivm.c -- the smallest honest VMM: one KVM vCPU running guest.c, with
 * Firecracker's snapshot/restore shape.
 *
 *   minivm boot    --guest BIN --mem MIB [--regions N] --image FILE --state FILE
 *                  [--request R ...]
 *       Run the guest's INIT phase; at its "snapshot now" port write, save the
 *       memory file (regions back to back) and the vCPU state. With requests,
 *       go on serving them from memory that never left (reference answers).
 *   minivm restore --socket PATH --state FILE [--request R ...]
 *       Map anonymous memory, create a userfaultfd as Firecracker does
 *       (O_CLOEXEC|O_NONBLOCK, UFFD_FEATURE_EVENT_REMOVE, every region
 *       registered MISSING), send the regions as JSON plus the uffd over the
 *       socket, restore the vCPU and serve the requests: every page comes in
 *       through the handler.
 *   minivm resident --image FILE --state FILE [--request R ...]
 *       The same from memory read in full beforehand (the resident baseline).
 *
 * Each answer prints "answer <request> <value> <ns>", ns counted from the
 * start of the restore (restore) or of the vCPU's resumption (resident,
 * boot). The guest (guest.c) runs at CPL 3 and talks to minivm by MMIO. A balloon request (top bit set) makes the guest ask for its scratch
 * area to be dropped; the VMM madvise(MADV_DONTNEED)s it.
 *
 * State file: "MINIVM1\0", u64 memory bytes, u64 regions, struct kvm_regs,
 * struct kvm_sregs (this host's layout; a snapshot is restored on the
 * machine kind that made it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_REGIONS 4
#define MAX_REQUESTS 256
#define GUEST_LOAD 0x1000
#define STACK_TOP 0x100000

/* guest.c's MMIO registers: 32-bit, at MMIO_BASE (no memory behind it). */
#define MMIO_BASE 0x3fe00000ull
enum { REG_SNAPSHOT, REG_REQUEST, REG_ANSWER, REG_BALLOON_START, REG_BALLOON_PAGES, REG_DONE };

struct vm {
    int kvm, fd, vcpu;
    struct kvm_run *run;
    uint64_t mem;                 /* bytes of guest memory */
    unsigned n_regions;
    uint8_t *host[MAX_REGIONS];   /* region i: guest physical i*mem/n */
    uint64_t region_size;
    int memfd;                    /* the memory's memfd, or -1 (anonymous) */
};

static const char STATE_MAGIC[8] = "MINIVM1";

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "minivm: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint8_t *gpa_to_host(struct vm *vm, uint64_t gpa)
{
    unsigned i = (unsigned)(gpa / vm->region_size);

    if (gpa >= vm->mem || i >= vm->n_regions)
        die("guest address %#llx is outside its memory", (unsigned long long)gpa);
    return vm->host[i] + gpa % vm->region_size;
}

/* Guest memory: anonymous, or (memfd) one memfd holding the memory file's
 * layout, region i mapped shared at its offset, as memfd-backed VMMs do. */
static void map_memory(struct vm *vm, uint64_t mem, unsigned n_regions, int memfd)
{
    if (!n_regions || n_regions > MAX_REGIONS || mem % (n_regions * 4096ull))
        die("memory of %llu bytes cannot be cut into %u regions", (unsigned long long)mem, n_regions);
    vm->mem = mem;
    vm->n_regions = n_regions;
    vm->region_size = mem / n_regions;
    vm->memfd = -1;
    if (memfd) {
        vm->memfd = memfd_create("minivm-memory", MFD_CLOEXEC);
        if (vm->memfd < 0 || ftruncate(vm->memfd, (off_t)mem) < 0)
            die("memfd of %llu bytes: %s", (unsigned long long)mem, strerror(errno));
    }
    for (unsigned i = 0; i < n_regions; i++) {
        vm->host[i] = memfd ? mmap(NULL, vm->region_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                                   vm->memfd, (off_t)(i * vm->region_size))
                            : mmap(NULL, vm->region_size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (vm->host[i] == MAP_FAILED)
            die("mmap %llu bytes: %s", (unsigned long long)vm->region_size, strerror(errno));
    }
}

static void create_vm(struct vm *vm)
{
    int mmap_size;

    vm->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm < 0)
        die("open /dev/kvm: %s", strerror(errno));
    if (ioctl(vm->kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        die("unexpected KVM API version");
    vm->fd = ioctl(vm->kvm, KVM_CREATE_VM, 0);
    if (vm->fd < 0)
        die("KVM_CREATE_VM: %s", strerror(errno));
    for (unsigned i = 0; i < vm->n_regions; i++) {
        struct kvm_userspace_memory_region r = {
            .slot = i,
            .guest_phys_addr = i * vm->region_size,
            .memory_size = vm->region_size,
            .userspace_addr = (uint64_t)(uintptr_t)vm->host[i],
        };

        if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
            die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
    }
    vm->vcpu = ioctl(vm->fd, KVM_CREATE_VCPU, 0);
    if (vm->vcpu < 0)
        die("KVM_CREATE_VCPU: %s", strerror(errno));
    mmap_size = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size <= 0)
        die("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    vm->run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
    if (vm->run == MAP_FAILED)
        die("mmap kvm_run: %s", strerror(errno));
}

/* 64-bit long mode at CPL 3: the first GiB identity-mapped with 2 MiB user
 * pages (page tables at PT_BASE in guest memory, so they are part of the
 * snapshot), flat segments, no interrupts. CPL 3 because a software
 * hypervisor (such as PVM, which these machines run nested KVM on) runs
 * only guest user mode natively and emulates guest kernel mode. */
#define PT_BASE 0x9000
#define PTE_P 1ull
#define PTE_RW 2ull
#define PTE_US 4ull
#define PTE_PS 0x80ull

static void boot_cpu(struct vm *vm)
{
    uint64_t *pml4 = (uint64_t *)gpa_to_host(vm, PT_BASE);
    uint64_t *pdpt = (uint64_t *)gpa_to_host(vm, PT_BASE + 0x1000);
    uint64_t *pd = (uint64_t *)gpa_to_host(vm, PT_BASE + 0x2000);
    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 11,
        .present = 1, .dpl = 3, .db = 0, .s = 1, .l = 1, .g = 1,
    };
    struct kvm_segment data = code;
    struct kvm_sregs s;
    struct kvm_regs r;

    if (vm->mem > MMIO_BASE)
        die("minivm maps at most %llu MiB of guest memory", MMIO_BASE >> 20);
    pml4[0] = (PT_BASE + 0x1000) | PTE_P | PTE_RW | PTE_US;
    pdpt[0] = (PT_BASE + 0x2000) | PTE_P | PTE_RW | PTE_US;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS;

    if (ioctl(vm->vcpu, KVM_GET_SREGS, &s) < 0)
        die("KVM_GET_SREGS: %s", strerror(errno));
    data.type = 3;
    data.selector = 0x23;
    data.l = 0;
    data.db = 1;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.cr3 = PT_BASE;
    s.cr4 = 1u << 5;                  /* PAE */
    s.efer = (1u << 8) | (1u << 10);  /* LME, LMA */
    s.cr0 = 0x80000001u;              /* PG, PE */
    if (ioctl(vm->vcpu, KVM_SET_SREGS, &s) < 0)
        die("KVM_SET_SREGS: %s", strerror(errno));
    memset(&r, 0, sizeof(r));
    r.rflags = 2;
    r.rip = GUEST_LOAD;
    r.rsp = STACK_TOP;
    r.rdi = vm->mem;
    if (ioctl(vm->vcpu, KVM_SET_REGS, &r) < 0)
        die("KVM_SET_REGS: %s", strerror(errno));
}

static void save_state(struct vm *vm, const char *path)
{
    struct kvm_regs r;
    struct kvm_sregs s;
    uint64_t hdr[2] = { vm->mem, vm->n_regions };
    FILE *f;

    if (ioctl(vm->vcpu, KVM_GET_REGS, &r) < 0 || ioctl(vm->vcpu, KVM_GET_SREGS, &s) < 0)
        die("reading the vCPU state: %s", strerror(errno));
    f = fopen(path, "wb");
    if (!f || fwrite(STATE_MAGIC, 8, 1, f) != 1 || fwrite(hdr, sizeof(hdr), 1, f) != 1 ||
        fwrite(&r, sizeof(r), 1, f) != 1 || fwrite(&s, sizeof(s), 1, f) != 1 || fclose(f))
        die("writing %s: %s", path, strerror(errno));
}

static void load_state(const char *path, uint64_t *mem, unsigned *n_regions,
                       struct kvm_regs *r, struct kvm_sregs *s)
{
    char magic[8];
    uint64_t hdr[2];
    FILE *f = fopen(path, "rb");

    if (!f)
        die("%s: %s", path, strerror(errno));
    if (fread(magic, 8, 1, f) != 1 || memcmp(magic, STATE_MAGIC, 8) ||
        fread(hdr, sizeof(hdr), 1, f) != 1 || fread(r, sizeof(*r), 1, f) != 1 ||
        fread(s, sizeof(*s), 1, f) != 1)
        die("%s is not a minivm state file", path);
    fclose(f);
    *mem = hdr[0];
    *n_regions = (unsigned)hdr[1];
}

static void set_state(struct vm *vm, struct kvm_regs *r, struct kvm_sregs *s)
{
    if (ioctl(vm->vcpu, KVM_SET_SREGS, s) < 0 || ioctl(vm->vcpu, KVM_SET_REGS, r) < 0)
        die("restoring the vCPU state: %s", strerror(errno));
}

static void write_image(struct vm *vm, const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

    if (fd < 0)
        die("%s: %s", path, strerror(errno));
    for (unsigned i = 0; i < vm->n_regions; i++) {
        for (uint64_t off = 0; off < vm->region_size;) {
            ssize_t n = write(fd, vm->host[i] + off, vm->region_size - off);

            if (n <= 0)
                die("writing %s: %s", path, strerror(errno));
            off += (uint64_t)n;
        }
    }
    if (close(fd) < 0)
        die("writing %s: %s", path, strerror(errno));
}

static void read_image(struct vm *vm, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        die("%s: %s", path, strerror(errno));
    for (unsigned i = 0; i < vm->n_regions; i++) {
        for (uint64_t off = 0; off < vm->region_size;) {
            ssize_t n = read(fd, vm->host[i] + off, vm->region_size - off);

            if (n <= 0)
                die("reading %s: %s", path, n ? strerror(errno) : "file too short");
            off += (uint64_t)n;
        }
    }
    close(fd);
}

/* Firecracker's side of the UFFD handshake. */
static void handshake(struct vm *vm, const char *socket_path)
{
    struct uffdio_api api = {
        .api = UFFD_API,
        .features = UFFD_FEATURE_EVENT_REMOVE | (vm->memfd >= 0 ? UFFD_FEATURE_MINOR_SHMEM : 0),
    };
    int fds[2] = { -1, vm->memfd };
    size_t n_fds = vm->memfd >= 0 ? 2 : 1;
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    char json[1024];
    size_t len = 0;
    int uffd, sock;

    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        die("userfaultfd: %s", strerror(errno));
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API: %s", strerror(errno));
    len += (size_t)snprintf(json + len, sizeof(json) - len, "[");
    for (unsigned i = 0; i < vm->n_regions; i++) {
        struct uffdio_register reg = {
            .range = { .start = (uint64_t)(uintptr_t)vm->host[i], .len = vm->region_size },
            .mode = UFFDIO_REGISTER_MODE_MISSING | (vm->memfd >= 0 ? UFFDIO_REGISTER_MODE_MINOR : 0),
        };

        if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
            die("UFFDIO_REGISTER: %s", strerror(errno));
        len += (size_t)snprintf(json + len, sizeof(json) - len,
                                "%s{\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":%llu,"
                                "\"page_size\":4096,\"page_size_kib\":4096}",
                                i ? "," : "", (unsigned long long)(uintptr_t)vm->host[i],
                                (unsigned long long)vm->region_size,
                                (unsigned long long)(i * vm->region_size));
    }
    len += (size_t)snprintf(json + len, sizeof(json) - len, "]");

    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (strlen(socket_path) >= sizeof(addr.sun_path))
        die("socket path too long: %s", socket_path);
    strcpy(addr.sun_path, socket_path);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("connect %s: %s", socket_path, strerror(errno));
    {
        char cbuf[CMSG_SPACE(2 * sizeof(int))];
        struct iovec iov = { .iov_base = json, .iov_len = len };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                              .msg_control = cbuf, .msg_controllen = CMSG_SPACE(n_fds * sizeof(int)) };
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);

        memset(cbuf, 0, sizeof(cbuf));
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(n_fds * sizeof(int));
        fds[0] = uffd;
        memcpy(CMSG_DATA(c), fds, n_fds * sizeof(int));
        if (sendmsg(sock, &msg, 0) != (ssize_t)len)
            die("sendmsg: %s", strerror(errno));
    }
    /* Like Firecracker: keep both the socket and our copy of the uffd open
     * for as long as the VM lives. */
}

/* Run the vCPU until the guest writes REG_DONE. mode 'b' (boot) saves the
 * snapshot at the guest's signal; restored and resident runs take that
 * signal as their resume point. */
static void run(struct vm *vm, char mode, const char *image, const char *state,
                const uint32_t *requests, int n_requests, uint64_t t0)
{
    int next = 0;
    uint32_t current = 0;
    uint64_t balloon_start = 0;

    for (;;) {
        struct kvm_run *run = vm->run;
        uint32_t value;
        int reg;

        if (ioctl(vm->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN: %s", strerror(errno));
        }
        if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
            die("KVM_EXIT_FAIL_ENTRY: reason %#llx",
                (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        if (run->exit_reason != KVM_EXIT_MMIO)
            die("unexpected exit reason %u", run->exit_reason);
        if (run->mmio.len != 4 || run->mmio.phys_addr < MMIO_BASE ||
            (run->mmio.phys_addr - MMIO_BASE) % 4 || run->mmio.phys_addr - MMIO_BASE > 4 * REG_DONE)
            die("unexpected %u-byte access at %#llx", run->mmio.len,
                (unsigned long long)run->mmio.phys_addr);
        reg = (int)((run->mmio.phys_addr - MMIO_BASE) / 4);
        if (!run->mmio.is_write) {
            if (reg != REG_REQUEST)
                die("the guest read write-only register %d", reg);
            current = next < n_requests ? requests[next++] : 0;
            memcpy(run->mmio.data, &current, 4);
            continue;
        }
        memcpy(&value, run->mmio.data, 4);
        switch (reg) {
        case REG_SNAPSHOT:
            if (mode == 'b') {
                write_image(vm, image);
                save_state(vm, state);
                printf("snapshot %llu\n", (unsigned long long)vm->mem);
                fflush(stdout);
                if (!n_requests)
                    return;
                t0 = now_ns();
            }
            break;
        case REG_ANSWER:
            printf("answer %u %u %llu\n", current, value, (unsigned long long)(now_ns() - t0));
            fflush(stdout);
            break;
        case REG_BALLOON_START:
            balloon_start = (uint64_t)value * 4096;
            break;
        case REG_BALLOON_PAGES: {
            uint64_t len = (uint64_t)value * 4096;

            if (balloon_start + len > vm->mem ||
                balloon_start / vm->region_size != (balloon_start + len - 1) / vm->region_size)
                die("balloon range [%#llx, +%#llx) is not inside one region",
                    (unsigned long long)balloon_start, (unsigned long long)len);
            if (madvise(gpa_to_host(vm, balloon_start), len, MADV_DONTNEED) < 0)
                die("madvise: %s", strerror(errno));
            break;
        }
        case REG_DONE:
            return;
        default:
            die("the guest wrote read-only register %d", reg);
        }
    }
}

static void load_guest(struct vm *vm, const char *path)
{
    FILE *f = fopen(path, "rb");
    size_t n;

    if (!f)
        die("%s: %s", path, strerror(errno));
    n = fread(gpa_to_host(vm, GUEST_LOAD), 1, STACK_TOP / 2, f);
    if (n == 0 || !feof(f))
        die("%s: empty, or larger than %u bytes", path, STACK_TOP / 2);
    fclose(f);
}

static void usage(void)
{
    die("usage: minivm boot --guest BIN --mem MIB [--regions N] --image FILE --state FILE [--request R ...]\n"
        "       minivm restore --socket PATH --state FILE [--memfd 1] [--request R ...]\n"
        "       minivm resident --image FILE --state FILE [--request R ...]");
}

int main(int argc, char **argv)
{
    const char *guest = NULL, *image = NULL, *state = NULL, *sock = NULL;
    uint64_t mem = 0;
    unsigned regions = 1;
    int memfd = 0;
    uint32_t requests[MAX_REQUESTS];
    int n_requests = 0;
    struct vm vm;
    char mode;

    if (argc < 2)
        usage();
    mode = !strcmp(argv[1], "boot") ? 'b' : !strcmp(argv[1], "restore") ? 'r'
         : !strcmp(argv[1], "resident") ? 'm' : 0;
    if (!mode)
        usage();
    for (int i = 2; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!v)
            usage();
        if (!strcmp(argv[i], "--guest"))
            guest = v;
        else if (!strcmp(argv[i], "--mem"))
            mem = strtoull(v, NULL, 0) << 20;
        else if (!strcmp(argv[i], "--regions"))
            regions = (unsigned)strtoul(v, NULL, 0);
        else if (!strcmp(argv[i], "--image"))
            image = v;
        else if (!strcmp(argv[i], "--state"))
            state = v;
        else if (!strcmp(argv[i], "--socket"))
            sock = v;
        else if (!strcmp(argv[i], "--memfd"))
            memfd = atoi(v);
        else if (!strcmp(argv[i], "--request") && n_requests < MAX_REQUESTS)
            requests[n_requests++] = (uint32_t)strtoul(v, NULL, 0);
        else
            usage();
        i++;
    }
    for (int i = 0; i < n_requests; i++)
        if (!requests[i])
            die("request 0 is reserved (it means: no more requests)");
    memset(&vm, 0, sizeof(vm));

    if (mode == 'b') {
        if (!guest || !mem || !image || !state)
            usage();
        map_memory(&vm, mem, regions, 0);
        load_guest(&vm, guest);
        create_vm(&vm);
        boot_cpu(&vm);
        run(&vm, mode, image, state, requests, n_requests, now_ns());
    } else {
        struct kvm_regs r;
        struct kvm_sregs s;
        uint64_t t0 = now_ns();

        if (!state || (mode == 'r' && !sock) || (mode == 'm' && !image))
            usage();
        load_state(state, &mem, &regions, &r, &s);
        map_memory(&vm, mem, regions, mode == 'r' && memfd);
        if (mode == 'm') {
            read_image(&vm, image);
            t0 = now_ns();
        } else {
            handshake(&vm, sock);
        }
        create_vm(&vm);
        set_state(&vm, &r, &s);
        run(&vm, mode, NULL, NULL, requests, n_requests, t0);
    }
    return 0;
}
