#include "vcpu_fastpath.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define REG_INTERRUPT_STATUS 0x60
#define REG_INTERRUPT_ACK 0x64

static int answer_mmio(struct kvm_run *run, struct svpy_mmio_fastpath *fastpath)
{
    uint64_t addr = run->mmio.phys_addr;
    struct svpy_virtio_shared *shared;
    uint64_t index, offset;
    uint32_t value;

    if (addr < fastpath->base || run->mmio.len != 4)
        return 0;
    index = (addr - fastpath->base) / fastpath->window_size;
    offset = (addr - fastpath->base) % fastpath->window_size;
    if (index >= fastpath->count || !(shared = fastpath->devices[index]))
        return 0;
    if (offset == REG_INTERRUPT_STATUS && !run->mmio.is_write) {
        value = svpy_read_interrupt_status(shared);
        memcpy(run->mmio.data, &value, sizeof(value));
        return 1;
    }
    if (offset == REG_INTERRUPT_ACK && run->mmio.is_write) {
        memcpy(&value, run->mmio.data, sizeof(value));
        svpy_ack_interrupt(shared, value);
        return 1;
    }
    return 0;
}

long svpy_vcpu_run(int vcpu_fd, void *run_page, struct svpy_mmio_fastpath *fastpath)
{
    struct kvm_run *run = run_page;

    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_MMIO || !fastpath || !answer_mmio(run, fastpath))
            return 0;
        /* A kick (immediate_exit) makes the next KVM_RUN return -EINTR at once. */
        fastpath->handled++;
    }
}
