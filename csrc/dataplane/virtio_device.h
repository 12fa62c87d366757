/* State a virtio device's data plane shares with its transport (the Python
 * virtio-mmio registers): the interrupt status the guest reads and acks, the
 * irqfd that injects the interrupt, and how a broken device is reported. */
#ifndef SVPY_VIRTIO_DEVICE_H
#define SVPY_VIRTIO_DEVICE_H

#include <pthread.h>
#include <stdint.h>

#define SVPY_INT_VRING 1u
#define SVPY_INT_CONFIG 2u

/* Why a device is broken: a svpy_vq_error (its queue or a request), or one of
 * these, found by the transport. */
enum svpy_device_error {
    SVPY_DEV_ERR_STATUS_CLEARED = 64,
};

struct svpy_virtio_shared {
    uint32_t interrupt_status; /* atomic: InterruptStatus register */
    int32_t broken;            /* atomic: 0, or the svpy_device_error that broke it */
    int irqfd;                 /* eventfd bound to the device's GSI (KVM_IRQFD) */
    int error_fd;              /* eventfd the control plane watches for breakage */
    pthread_mutex_t lock;      /* serialises data-plane work with reconfiguration */
};

int svpy_shared_init(struct svpy_virtio_shared *shared, int irqfd, int error_fd);
void svpy_shared_destroy(struct svpy_virtio_shared *shared);
void svpy_raise_interrupt(struct svpy_virtio_shared *shared, uint32_t cause);
uint32_t svpy_read_interrupt_status(struct svpy_virtio_shared *shared);
void svpy_ack_interrupt(struct svpy_virtio_shared *shared, uint32_t bits);
/* Marks the device broken (first error wins) and tells the control plane. */
void svpy_mark_broken(struct svpy_virtio_shared *shared, int error);
const char *svpy_device_error_name(int error);
void svpy_lock(struct svpy_virtio_shared *shared);
void svpy_unlock(struct svpy_virtio_shared *shared);

#endif
