#include "virtio_device.h"

#include <stdint.h>

#include "eventfd.h"
#include "virtqueue.h"

int svpy_shared_init(struct svpy_virtio_shared *shared, int irqfd, int error_fd)
{
    shared->interrupt_status = 0;
    shared->broken = 0;
    shared->irqfd = irqfd;
    shared->error_fd = error_fd;
    return -pthread_mutex_init(&shared->lock, NULL);
}

void svpy_shared_destroy(struct svpy_virtio_shared *shared)
{
    pthread_mutex_destroy(&shared->lock);
}

void svpy_raise_interrupt(struct svpy_virtio_shared *shared, uint32_t cause)
{
    __atomic_fetch_or(&shared->interrupt_status, cause, __ATOMIC_SEQ_CST);
    if (shared->irqfd >= 0)
        svpy_eventfd_signal(shared->irqfd);
}

uint32_t svpy_read_interrupt_status(struct svpy_virtio_shared *shared)
{
    return __atomic_load_n(&shared->interrupt_status, __ATOMIC_SEQ_CST);
}

void svpy_ack_interrupt(struct svpy_virtio_shared *shared, uint32_t bits)
{
    __atomic_fetch_and(&shared->interrupt_status, ~bits, __ATOMIC_SEQ_CST);
}

void svpy_mark_broken(struct svpy_virtio_shared *shared, int error)
{
    int32_t expected = 0;

    if (error < 0)
        error = -error;
    if (__atomic_compare_exchange_n(&shared->broken, &expected, error, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST) && shared->error_fd >= 0)
        svpy_eventfd_signal(shared->error_fd);
}

void svpy_lock(struct svpy_virtio_shared *shared)
{
    pthread_mutex_lock(&shared->lock);
}

void svpy_unlock(struct svpy_virtio_shared *shared)
{
    pthread_mutex_unlock(&shared->lock);
}

const char *svpy_device_error_name(int error)
{
    if (error < 0)
        error = -error;
    if (error == SVPY_DEV_ERR_STATUS_CLEARED)
        return "the driver cleared a device status bit (only a write of 0 resets)";
    return svpy_vq_error_name(error);
}
