/* KVM_RUN with the exits that come per I/O answered in C.
 *
 * Every interrupt a virtio-mmio device raises makes the guest read
 * InterruptStatus and write InterruptACK: two MMIO exits per I/O completion.
 * A console writer reads the UART's line status and writes its transmit
 * register for every byte.  Going up to Python for those would put Python on
 * the I/O path, so this loop answers them from shared state and returns to
 * Python only for every other exit (or when KVM_RUN is interrupted). */
#ifndef SVPY_VCPU_FASTPATH_H
#define SVPY_VCPU_FASTPATH_H

#include <stdint.h>

#include "virtio_device.h"

#define SVPY_FASTPATH_MAX_DEVICES 16

/* Where console bytes may be written from here, kept by the console's output
 * side (Python), which otherwise writes them itself.  While `ready` is set the
 * output has no backlog, has not failed and is open, so a byte written here
 * neither overtakes queued ones nor goes to a closed (or reused) fd. */
struct svpy_console_output {
    int fd;            /* -1: output is discarded */
    uint8_t is_socket; /* send(MSG_DONTWAIT | MSG_NOSIGNAL) rather than write */
    uint8_t ready;     /* atomic: bytes may be written here now */
    uint32_t writers;  /* atomic: vCPUs between reading `ready` and their write */
    uint64_t written;  /* atomic: bytes written here, for measurement */
};

/* Sets or clears `ready`.  Clearing returns once no vCPU is still writing on
 * the strength of the old value, so the caller may then queue bytes (they are
 * not overtaken) or close the fd. */
void svpy_console_output_set_ready(struct svpy_console_output *output, int ready);

/* What the 16550's registers mean to the fast path, kept current by the UART
 * model (Python).  Line status reads change nothing, so they are answered
 * here; a transmit register write is answered here while it only means "send
 * this byte" (the model says so in `thr_passthrough`) and `output` takes it
 * at once.  Anything else goes to Python unanswered, which then does it all. */
struct svpy_uart_status {
    uint16_t lsr_port;
    uint16_t thr_port;
    uint8_t rx_ready;        /* atomic: received bytes wait (LSR data ready) */
    uint8_t thr_passthrough; /* atomic: no divisor latch, loopback or THR interrupt */
    struct svpy_console_output *output; /* or NULL: transmits go to Python */
};

struct svpy_mmio_fastpath {
    uint64_t base;        /* guest address of the first virtio-mmio window */
    uint64_t window_size; /* bytes per window */
    uint32_t count;
    struct svpy_virtio_shared *devices[SVPY_FASTPATH_MAX_DEVICES];
    uint64_t handled;     /* atomic: exits answered here, for measurement */
    uint64_t returned;    /* atomic: exits returned to Python, for measurement */
    struct svpy_uart_status *uart; /* or NULL */
};

/* Runs the vCPU until an exit Python must see: returns 0, or -errno from
 * KVM_RUN (-EINTR when kicked). `run` is the vCPU's mmap'ed struct kvm_run. */
long svpy_vcpu_run(int vcpu_fd, void *run, struct svpy_mmio_fastpath *fastpath);

#endif
