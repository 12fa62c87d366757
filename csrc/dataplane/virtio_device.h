/* What every virtio device's data plane has, whatever its kind.
 *
 * struct svpy_virtio_shared is the state it shares with its transport (the
 * Python virtio-mmio registers): the interrupt status the guest reads and
 * acks, the irqfd that injects the interrupt, how a broken device is reported,
 * and the lock that serialises data-plane work with reconfiguration.
 *
 * struct svpy_device adds guest memory and one notification (ioeventfd) per
 * queue, watched on an I/O thread: a device kind embeds it first and gives
 * one function, called with the lock held when the guest notified a queue.
 * The rest of a kind's C file is its requests. */
#ifndef SVPY_VIRTIO_DEVICE_H
#define SVPY_VIRTIO_DEVICE_H

#include <pthread.h>
#include <stdint.h>

#include "guest_memory.h"
#include "iothread.h"

#define SVPY_MAX_QUEUES 8 /* virtio-console: 2 per port and 2 for control */

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

struct svpy_device;

/* The guest notified `queue`; called on the I/O thread with the device lock held. */
typedef void (*svpy_queue_notified_fn)(struct svpy_device *dev, unsigned queue);

struct svpy_queue_kick {
    struct svpy_watch watch; /* the queue's ioeventfd (datamatch = queue index) */
    struct svpy_device *dev;
    unsigned queue;
};

struct svpy_device {
    struct svpy_virtio_shared shared;
    const struct svpy_guest_memory *mem;
    unsigned num_queues;
    svpy_queue_notified_fn notified;
    struct svpy_queue_kick kicks[SVPY_MAX_QUEUES];
};

/* kick_fds[0..num_queues): each queue's ioeventfd; 0 or -errno. */
int svpy_device_init(struct svpy_device *dev, const struct svpy_guest_memory *mem, int irqfd,
                     int error_fd, unsigned num_queues, const int *kick_fds,
                     svpy_queue_notified_fn notified);
/* Watches every queue's notification on `thread`. */
int svpy_device_attach(struct svpy_device *dev, struct svpy_iothread *thread);
/* Serves `queue` again later on the I/O thread, as if the guest had notified it
 * (a pass that stopped at its work budget). */
void svpy_device_requeue(struct svpy_device *dev, unsigned queue);
void svpy_device_destroy(struct svpy_device *dev);

#endif
