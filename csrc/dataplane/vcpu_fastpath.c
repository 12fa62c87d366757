#include "vcpu_fastpath.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/kvm.h>

#define REG_INTERRUPT_STATUS 0x60
#define REG_INTERRUPT_ACK 0x64
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20
#define LSR_IDLE 0x40

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

void svpy_console_output_set_ready(struct svpy_console_output *output, int ready)
{
    /* Sequentially consistent on both sides (here: store `ready`, load
     * `writers`; in transmit(): bump `writers`, load `ready`), so a vCPU that
     * still saw the old value is always seen here as a writer. */
    __atomic_store_n(&output->ready, ready ? 1 : 0, __ATOMIC_SEQ_CST);
    if (ready)
        return;
    while (__atomic_load_n(&output->writers, __ATOMIC_SEQ_CST))
        sched_yield(); /* a one-byte non-blocking write: microseconds */
}

/* Sends one byte the guest wrote to the transmit register, or returns 0 having
 * sent nothing, so that Python does it (queues it, reports the failure...). */
static int transmit(const struct svpy_uart_status *uart, uint8_t byte)
{
    struct svpy_console_output *output = uart->output;
    ssize_t done;

    if (!output || !__atomic_load_n(&uart->thr_passthrough, __ATOMIC_ACQUIRE))
        return 0;
    __atomic_add_fetch(&output->writers, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&output->ready, __ATOMIC_SEQ_CST))
        done = 0;
    else if (output->fd < 0)
        done = 1;
    else if (output->is_socket)
        done = send(output->fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    else
        done = write(output->fd, &byte, 1);
    __atomic_sub_fetch(&output->writers, 1, __ATOMIC_RELEASE);
    if (done != 1)
        return 0;
    __atomic_add_fetch(&output->written, 1, __ATOMIC_RELAXED);
    return 1;
}

/* The transmitter is always ready (output never waits for the host).  String
 * I/O (rep outsb/insb) goes to Python: a partial write could not be handed on. */
static int answer_pio(struct kvm_run *run, struct svpy_mmio_fastpath *fastpath)
{
    const struct svpy_uart_status *uart = fastpath->uart;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;

    if (!uart || run->io.size != 1 || run->io.count != 1)
        return 0;
    if (run->io.port == uart->thr_port && run->io.direction == KVM_EXIT_IO_OUT)
        return transmit(uart, *data);
    if (run->io.port != uart->lsr_port || run->io.direction != KVM_EXIT_IO_IN)
        return 0;
    *data = LSR_THR_EMPTY | LSR_IDLE |
            (__atomic_load_n(&uart->rx_ready, __ATOMIC_ACQUIRE) ? LSR_DATA_READY : 0);
    return 1;
}

long svpy_vcpu_run(int vcpu_fd, void *run_page, struct svpy_mmio_fastpath *fastpath)
{
    struct kvm_run *run = run_page;

    for (;;) {
        int answered;

        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        if (!fastpath)
            return 0;
        if (run->exit_reason == KVM_EXIT_MMIO)
            answered = answer_mmio(run, fastpath);
        else if (run->exit_reason == KVM_EXIT_IO)
            answered = answer_pio(run, fastpath);
        else
            answered = 0;
        if (!answered) {
            __atomic_add_fetch(&fastpath->returned, 1, __ATOMIC_RELAXED);
            return 0;
        }
        /* A kick (immediate_exit) makes the next KVM_RUN return -EINTR at once. */
        __atomic_add_fetch(&fastpath->handled, 1, __ATOMIC_RELAXED);
    }
}
