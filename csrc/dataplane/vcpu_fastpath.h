/* KVM_RUN with the exits that come per I/O answered in C.
 *
 * Every interrupt a virtio-mmio device raises makes the guest read
 * InterruptStatus and write InterruptACK: two MMIO exits per I/O completion.
 * A console writer reads the UART's line status before every byte.  Going up
 * to Python for those would put Python on the I/O path, so this loop answers
 * them from shared state and returns to Python only for every other exit (or
 * when KVM_RUN is interrupted). */
#ifndef SVPY_VCPU_FASTPATH_H
#define SVPY_VCPU_FASTPATH_H

#include <stdint.h>

#include "virtio_device.h"

#define SVPY_FASTPATH_MAX_DEVICES 16

/* What the 16550's line status register says, kept current by the UART model
 * (Python) so that reads of it, which change nothing, are answered here. */
struct svpy_uart_status {
    uint16_t lsr_port;
    uint8_t rx_ready; /* atomic: received bytes wait (LSR data ready) */
};

struct svpy_mmio_fastpath {
    uint64_t base;        /* guest address of the first virtio-mmio window */
    uint64_t window_size; /* bytes per window */
    uint32_t count;
    struct svpy_virtio_shared *devices[SVPY_FASTPATH_MAX_DEVICES];
    uint64_t handled;     /* exits answered here, for measurement */
    struct svpy_uart_status *uart; /* or NULL */
};

/* Runs the vCPU until an exit Python must see: returns 0, or -errno from
 * KVM_RUN (-EINTR when kicked). `run` is the vCPU's mmap'ed struct kvm_run. */
long svpy_vcpu_run(int vcpu_fd, void *run, struct svpy_mmio_fastpath *fastpath);

#endif
