#include "sandbox.h"

#include <dlfcn.h>
#include <errno.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <unistd.h>

#define MAIN SVPY_THREAD_MAIN
#define VCPU SVPY_THREAD_VCPU
#define IO SVPY_THREAD_IO
#define PYTHON (MAIN | VCPU) /* threads that run Python code */
#define ALL (MAIN | VCPU | IO)

/* What each thread kind may call after set-up. The main thread (and the Python helper
 * threads it starts: chardev readers, output flushers, the device_del worker) runs the
 * whole control plane, including hot-plug, so it needs the most; a vCPU runs KVM_RUN and the
 * device models' register handlers in Python; the I/O thread runs only C. Each thread has
 * exactly one filter: the vCPU and I/O threads start before the main thread enters its own. */
static const struct svpy_syscall_rule RULES[] = {
    /* Every thread. */
    {"read", ALL, SVPY_RULE_ANY, "eventfds, sockets, tap, rng source"},
    {"write", ALL, SVPY_RULE_ANY, "eventfds (irqfd), sockets, console, log"},
    {"readv", ALL, SVPY_RULE_ANY, "tap and console reads into guest buffers"},
    {"writev", ALL, SVPY_RULE_ANY, "tap and console writes from guest buffers"},
    {"epoll_wait", ALL, SVPY_RULE_ANY, "the I/O thread's loop; the control plane's loop"},
    {"epoll_pwait", ALL, SVPY_RULE_ANY, "as epoll_wait (libc may use either)"},
    {"epoll_ctl", ALL, SVPY_RULE_ANY,
     "watching a queue's kick eventfd when the guest activates it (a vCPU), a backend's "
     "writability (the I/O thread), sockets (the control plane)"},
    {"futex", ALL, SVPY_RULE_ANY, "locks and condition variables (the GIL, device locks)"},
    {"madvise", ALL, SVPY_RULE_ANY,
     "the balloon returns guest pages (MADV_DONTNEED); malloc and thread stacks trim memory"},
    {"rt_sigprocmask", ALL, SVPY_RULE_ANY, "libc masks signals around thread start and exit"},
    {"rt_sigreturn", ALL, SVPY_RULE_ANY, "returning from the vCPU kick signal's handler"},
    {"restart_syscall", ALL, SVPY_RULE_ANY, "the kernel restarts a call a signal interrupted"},
    {"getpid", ALL, SVPY_RULE_ANY, "logging; the bad-call reporter"},
    {"gettid", ALL, SVPY_RULE_ANY, "logging; the bad-call reporter"},
    {"tgkill", ALL, SVPY_RULE_OWN_PROCESS,
     "kicking a vCPU out of KVM_RUN; the bad-call reporter ends the process with SIGSYS"},
    {"clock_gettime", ALL, SVPY_RULE_ANY, "timeouts (when the vDSO is not used)"},
    {"exit", ALL, SVPY_RULE_ANY, "a thread ends"},
    {"exit_group", ALL, SVPY_RULE_ANY, "the process ends"},
    {"close", ALL, SVPY_RULE_ANY, "closing a client, a backend, an eventfd"},

    /* The I/O thread's data plane (and the control plane, which flushes and drains disks
     * on unplug and at exit). */
    {"preadv", MAIN | IO, SVPY_RULE_ANY, "virtio-blk reads"},
    {"pwritev", MAIN | IO, SVPY_RULE_ANY, "virtio-blk writes"},
    {"pread64", MAIN | IO, SVPY_RULE_ANY, "virtio-blk reads of one segment"},
    {"pwrite64", MAIN | IO, SVPY_RULE_ANY, "virtio-blk writes of one segment"},
    {"fdatasync", MAIN | IO, SVPY_RULE_ANY, "virtio-blk FLUSH; a disk is synced when unplugged"},
    {"fsync", MAIN | IO, SVPY_RULE_ANY, "as fdatasync, for backends where it is needed"},
    {"fallocate", MAIN | IO, SVPY_RULE_ANY, "virtio-blk DISCARD and WRITE_ZEROES"},
    {"io_submit", MAIN | IO, SVPY_RULE_ANY, "virtio-blk on O_DIRECT images (Linux AIO)"},
    {"io_getevents", MAIN | IO, SVPY_RULE_ANY, "AIO completions; drained when a disk goes"},
    {"sendto", ALL, SVPY_RULE_ANY, "console and UART output to a socket client"},
    {"recvfrom", MAIN | IO, SVPY_RULE_ANY, "console input from a socket client; QMP"},
    {"timerfd_settime", ALL, SVPY_RULE_ANY,
     "virtio-rng's rate limit period (armed when the guest activates the device)"},
    {"sendmsg", ALL, SVPY_RULE_ANY, "console port output to a socket (MSG_NOSIGNAL); QMP"},

    /* Threads that run Python. */
    {"mmap", PYTHON, SVPY_RULE_NO_EXEC, "the allocator and thread stacks; never executable"},
    {"mprotect", PYTHON, SVPY_RULE_NO_EXEC, "thread stack guard pages; never executable"},
    {"munmap", ALL, SVPY_RULE_ANY, "the allocator; a thread's stack at its end"},
    {"mremap", PYTHON, SVPY_RULE_ANY, "the allocator grows large buffers"},
    {"brk", PYTHON, SVPY_RULE_ANY, "the allocator"},
    {"ioctl", PYTHON, SVPY_RULE_IOCTLS, "the requests in the ioctl table"},
    {"clone", PYTHON, SVPY_RULE_THREADS_ONLY,
     "new threads (a console output flusher, the unplug worker), never a new process"},
    {"clone3", PYTHON, SVPY_RULE_ENOSYS, "refused with ENOSYS: glibc then uses clone"},
    {"set_robust_list", PYTHON, SVPY_RULE_ANY, "a new thread's start (glibc)"},
    {"rseq", PYTHON, SVPY_RULE_ANY, "a new thread's start (glibc)"},
    {"sched_yield", PYTHON, SVPY_RULE_ANY, "the interpreter hands over its lock"},
    {"sched_getaffinity", PYTHON, SVPY_RULE_ANY, "glibc and Python ask for the CPU count"},
    {"getrandom", PYTHON, SVPY_RULE_ANY, "Python's hash seed and random module"},
    {"clock_nanosleep", PYTHON, SVPY_RULE_ANY, "time.sleep (balloon polling, retries)"},
    {"nanosleep", PYTHON, SVPY_RULE_ANY, "as clock_nanosleep"},
    {"poll", PYTHON, SVPY_RULE_ANY, "socket operations with a timeout"},
    {"ppoll", PYTHON, SVPY_RULE_ANY, "as poll"},
    {"fcntl", PYTHON, SVPY_RULE_ANY, "non-blocking and close-on-exec flags"},
    {"sigaltstack", PYTHON, SVPY_RULE_ANY, "a new thread's signal stack (Python)"},
    {"pselect6", PYTHON, SVPY_RULE_ANY, "select() with a timeout (Python's selectors)"},
    {"openat", VCPU, SVPY_RULE_EACCES,
     "refused: a vCPU never opens a file (Python's traceback tries to read its sources)"},
    {"newfstatat", VCPU, SVPY_RULE_EACCES, "refused: as openat"},

    /* The control plane: QMP, hot-plug, chardev clients, shutdown. */
    {"openat", MAIN, SVPY_RULE_ANY, "blockdev-add opens an image, netdev_add /dev/net/tun"},
    {"newfstatat", MAIN, SVPY_RULE_ANY, "the size and type of a hot-plugged image or fd"},
    {"fstat", MAIN, SVPY_RULE_ANY, "as newfstatat"},
    {"statx", MAIN, SVPY_RULE_ANY, "as newfstatat"},
    {"lseek", MAIN, SVPY_RULE_ANY, "the size of a hot-plugged image"},
    {"flock", MAIN, SVPY_RULE_ANY, "a hot-plugged image is locked against a second user"},
    {"fstatfs", MAIN, SVPY_RULE_ANY, "the logical block size of an O_DIRECT image"},
    {"dup", MAIN, SVPY_RULE_ANY, "a client's socket is handed to a chardev"},
    {"dup3", MAIN, SVPY_RULE_ANY, "as dup"},
    {"pipe2", MAIN, SVPY_RULE_ANY, "wake-up pipes"},
    {"io_setup", MAIN, SVPY_RULE_ANY, "the AIO context of a hot-plugged O_DIRECT image"},
    {"io_destroy", MAIN, SVPY_RULE_ANY, "an unplugged image's AIO context"},
    {"accept4", MAIN, SVPY_RULE_ANY, "QMP and chardev clients"},
    {"recvmsg", MAIN, SVPY_RULE_ANY, "QMP getfd: file descriptors passed by the client"},
    {"shutdown", MAIN | VCPU, SVPY_RULE_ANY,
     "letting a client go (a vCPU lets a UART client go whose socket broke)"},
    {"getsockopt", MAIN, SVPY_RULE_ANY, "socket errors"},
    {"setsockopt", MAIN, SVPY_RULE_ANY, "socket buffer sizes"},
    {"getsockname", MAIN, SVPY_RULE_ANY, "socket addresses"},
    {"getpeername", MAIN, SVPY_RULE_ANY, "socket addresses"},
    {"unlink", MAIN, SVPY_RULE_ANY, "socket paths and the pid file are removed at exit"},
    {"unlinkat", MAIN, SVPY_RULE_ANY, "as unlink"},
    {"rt_sigaction", MAIN, SVPY_RULE_ANY, "Python restores signal handlers at exit"},
    {"timerfd_create", MAIN, SVPY_RULE_ANY, "a virtio-rng rate limit timer"},
    {"getdents64", MAIN, SVPY_RULE_ANY, "listing directories (/proc/self/fd at exit)"},
    {"readlink", MAIN, SVPY_RULE_ANY, "resolving paths"},
    {"getcwd", MAIN, SVPY_RULE_ANY, "resolving relative paths"},
    {"uname", MAIN, SVPY_RULE_ANY, "Python's platform queries"},
};

#define RULE_COUNT (sizeof(RULES) / sizeof(RULES[0]))

/* The ioctl requests each kind may make (the I/O thread makes none). Every device, its
 * eventfds, irqfd and ioeventfds exist from set-up on: hot-plug fills a slot, it never
 * places a device, so no KVM_IRQFD, KVM_IOEVENTFD or eventfd2 later. */
static const struct svpy_ioctl_rule IOCTLS[] = {
    {KVM_RUN, "KVM_RUN", VCPU, "runs the guest"},
    {KVM_GET_REGS, "KVM_GET_REGS", VCPU, "a fatal exit's report (RIP, code bytes)"},
    {KVM_GET_SREGS, "KVM_GET_SREGS", VCPU, "as KVM_GET_REGS"},
    {KVM_IRQ_LINE, "KVM_IRQ_LINE", MAIN | VCPU,
     "the UART's interrupt: raised by a register write (vCPU) or by input (control plane)"},
    {TUNSETIFF, "TUNSETIFF", MAIN, "netdev_add opens a tap"},
    {TUNGETIFF, "TUNGETIFF", MAIN, "checks a tap fd passed in (fd=N)"},
    {TUNSETVNETHDRSZ, "TUNSETVNETHDRSZ", MAIN, "a hot-plugged tap's virtio-net header"},
    {TUNSETOFFLOAD, "TUNSETOFFLOAD", MAIN | VCPU,
     "offloads follow what the guest accepted (when its driver starts: a vCPU)"},
    {FIONBIO, "FIONBIO", MAIN, "non-blocking sockets"},
    {FIOCLEX, "FIOCLEX", MAIN, "close-on-exec for a received fd"},
    {TCGETS, "TCGETS", MAIN, "isatty() and terminal modes (stdio, pty)"},
    {TCSETS, "TCSETS", MAIN, "the terminal's modes are restored at exit"},
    {TCSETSW, "TCSETSW", MAIN, "as TCSETS"},
    {TCSETSF, "TCSETSF", MAIN, "as TCSETS"},
    {TIOCGWINSZ, "TIOCGWINSZ", MAIN, "terminal size queries"},
};

#define IOCTL_COUNT (sizeof(IOCTLS) / sizeof(IOCTLS[0]))
#define NAMED_SYSCALLS 512

static int sandbox_mode = SVPY_SANDBOX_OFF;
static int report_fd = 2;
/* Resolved while preparing: a signal handler may not allocate. */
static const char *syscall_names[NAMED_SYSCALLS];
static __thread unsigned thread_kind;

static size_t append(char *line, size_t at, size_t size, const char *text)
{
    while (*text && at + 1 < size)
        line[at++] = *text++;
    return at;
}

static size_t append_number(char *line, size_t at, size_t size, long value)
{
    char digits[24];
    int count = 0;
    unsigned long magnitude = value < 0 ? -(unsigned long)value : (unsigned long)value;

    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    if (value < 0 && at + 1 < size)
        line[at++] = '-';
    while (count && at + 1 < size)
        line[at++] = digits[--count];
    return at;
}

static size_t append_hex(char *line, size_t at, size_t size, unsigned long long value)
{
    char digits[16];
    int count = 0;

    do {
        digits[count++] = "0123456789abcdef"[value & 0xf];
        value >>= 4;
    } while (value);
    at = append(line, at, size, "0x");
    while (count && at + 1 < size)
        line[at++] = digits[--count];
    return at;
}

static const char *kind_name(unsigned kind)
{
    switch (kind) {
    case MAIN:
        return "main";
    case VCPU:
        return "vcpu";
    case IO:
        return "iothread";
    default:
        return "inherited"; /* a thread started by a filtered one: its creator's filter */
    }
}

/* A call outside the list: say which (its number first), then die of SIGSYS. Only
 * async-signal-safe work here, and only calls every filter allows. */
static void report_bad_call(int signo, siginfo_t *info, void *context)
{
    char line[384];
    size_t at = 0;
    int nr = info->si_syscall;
    pid_t pid = getpid();
    const char *name = nr >= 0 && nr < NAMED_SYSCALLS ? syscall_names[nr] : NULL;

    at = append(line, at, sizeof(line), "stratovirt-py: seccomp: bad system call ");
    at = append_number(line, at, sizeof(line), nr);
    at = append(line, at, sizeof(line), " (");
    at = append(line, at, sizeof(line), name ? name : "?");
#ifdef __x86_64__
    {
        /* The arguments say which use of the call it was (an ioctl's request...). */
        const greg_t *regs = ((const ucontext_t *)context)->uc_mcontext.gregs;
        const int order[] = {REG_RDI, REG_RSI, REG_RDX, REG_R10, REG_R8, REG_R9};

        for (int i = 0; i < 6; i++) {
            at = append(line, at, sizeof(line), i ? ", " : ": ");
            at = append_hex(line, at, sizeof(line), (unsigned long long)regs[order[i]]);
        }
    }
#else
    (void)context;
#endif
    at = append(line, at, sizeof(line), ") on thread ");
    at = append_number(line, at, sizeof(line), (long)syscall(SYS_gettid));
    at = append(line, at, sizeof(line), " (");
    at = append(line, at, sizeof(line), kind_name(thread_kind));
    at = append(line, at, sizeof(line), " filter): the monitor is killed with SIGSYS\n");
    if (write(report_fd, line, at) < 0) {
        /* Nothing more to try: dying is what matters. */
    }
    /* SA_RESETHAND made SIGSYS's action the default (death) and SA_NODEFER left it
     * unblocked: sending it again ends the whole process. */
    syscall(SYS_tgkill, pid, (pid_t)syscall(SYS_gettid), signo);
}

const struct svpy_syscall_rule *svpy_sandbox_rule(unsigned index)
{
    return index < RULE_COUNT ? &RULES[index] : NULL;
}

const struct svpy_ioctl_rule *svpy_sandbox_ioctl(unsigned index)
{
    return index < IOCTL_COUNT ? &IOCTLS[index] : NULL;
}

int svpy_sandbox_mode(void)
{
    return sandbox_mode;
}

int svpy_sandbox_prepare(int mode, int log_fd)
{
    struct sigaction action;

    if (mode != SVPY_SANDBOX_OFF && mode != SVPY_SANDBOX_ENFORCE && mode != SVPY_SANDBOX_LOG)
        return -EINVAL;
    for (size_t i = 0; i < RULE_COUNT; i++)
        if (seccomp_syscall_resolve_name(RULES[i].name) == __NR_SCMP_ERROR)
            return -EINVAL;
    sandbox_mode = mode;
    report_fd = log_fd;
    if (mode == SVPY_SANDBOX_OFF)
        return 0;
    /* glibc loads libgcc_s the first time a thread ends through pthread_exit (Python's
     * daemon threads do at exit): mapping its code then would be refused. Loaded now, it is
     * found already there. */
    if (!dlopen("libgcc_s.so.1", RTLD_NOW | RTLD_NODELETE))
        return -ENOENT;
    if (mode != SVPY_SANDBOX_ENFORCE)
        return 0;
    for (int nr = 0; nr < NAMED_SYSCALLS; nr++)
        if (!syscall_names[nr])
            syscall_names[nr] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = report_bad_call;
    action.sa_flags = SA_SIGINFO | SA_RESETHAND | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSYS, &action, NULL) < 0 ? -errno : 0;
}

static int add_ioctls(scmp_filter_ctx filter, int nr, unsigned kind)
{
    int ret = 0;

    /* The request is an int in the kernel: only its low 32 bits count. */
    for (size_t i = 0; i < IOCTL_COUNT && ret == 0; i++)
        if (IOCTLS[i].kinds & kind)
            ret = seccomp_rule_add(filter, SCMP_ACT_ALLOW, nr, 1,
                                   SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffu, IOCTLS[i].request));
    return ret;
}

static int add_rule(scmp_filter_ctx filter, const struct svpy_syscall_rule *rule, unsigned kind)
{
    int nr = seccomp_syscall_resolve_name(rule->name);

    switch (rule->condition) {
    case SVPY_RULE_IOCTLS:
        return add_ioctls(filter, nr, kind);
    case SVPY_RULE_THREADS_ONLY:
        return seccomp_rule_add(filter, SCMP_ACT_ALLOW, nr, 1,
                                SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD));
    case SVPY_RULE_OWN_PROCESS:
        return seccomp_rule_add(filter, SCMP_ACT_ALLOW, nr, 1,
                                SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid()));
    case SVPY_RULE_ENOSYS:
        return seccomp_rule_add(filter, SCMP_ACT_ERRNO(ENOSYS), nr, 0);
    case SVPY_RULE_EACCES:
        return seccomp_rule_add(filter, SCMP_ACT_ERRNO(EACCES), nr, 0);
    case SVPY_RULE_NO_EXEC:
        return seccomp_rule_add(filter, SCMP_ACT_ALLOW, nr, 1,
                                SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
    default:
        return seccomp_rule_add(filter, SCMP_ACT_ALLOW, nr, 0);
    }
}

int svpy_sandbox_enter(unsigned kind)
{
    scmp_filter_ctx filter;
    int ret = 0;

    if (sandbox_mode == SVPY_SANDBOX_OFF)
        return 0;
    if (kind != MAIN && kind != VCPU && kind != IO)
        return -EINVAL;
    filter = seccomp_init(sandbox_mode == SVPY_SANDBOX_LOG ? SCMP_ACT_LOG : SCMP_ACT_TRAP);
    if (!filter)
        return -ENOMEM;
    for (size_t i = 0; i < RULE_COUNT && ret == 0; i++)
        if (RULES[i].kinds & kind)
            ret = add_rule(filter, &RULES[i], kind);
    if (ret == 0)
        ret = seccomp_load(filter);
    seccomp_release(filter);
    if (ret == 0)
        thread_kind = kind;
    return ret;
}
