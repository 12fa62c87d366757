#include "kvm_helpers.h"

#include <cpuid.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

long svpy_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    long ret;

    do {
        ret = ioctl(fd, request, arg);
    } while (ret < 0 && errno == EINTR && request != KVM_RUN);
    return ret < 0 ? -errno : ret;
}

long svpy_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long ret;

    do {
        ret = ioctl(fd, request, arg);
    } while (ret < 0 && errno == EINTR && request != KVM_RUN);
    return ret < 0 ? -errno : ret;
}

void *svpy_map_guest_ram(size_t size, int dump_core, int *err)
{
    void *addr = mmap(NULL, size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

    if (addr == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    /* -machine dump-guest-core=off: guest RAM in a core dump is huge and
     * may hold guest secrets. */
    if (!dump_core)
        (void)madvise(addr, size, MADV_DONTDUMP);
    *err = 0;
    return addr;
}

int svpy_unmap(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

int svpy_discard(void *addr, size_t size)
{
    return madvise(addr, size, MADV_DONTNEED) < 0 ? -errno : 0;
}

static void ignore_signal(int signo)
{
    (void)signo;
}

int svpy_install_kick_handler(int signo)
{
    struct sigaction action;

    memset(&action, 0, sizeof(action));
    action.sa_handler = ignore_signal;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL) < 0 ? -errno : 0;
}

void svpy_host_cpuid(uint32_t function, uint32_t index, uint32_t regs[4])
{
    unsigned int eax, ebx, ecx, edx;

    __cpuid_count(function, index, eax, ebx, ecx, edx);
    regs[0] = eax;
    regs[1] = ebx;
    regs[2] = ecx;
    regs[3] = edx;
}
