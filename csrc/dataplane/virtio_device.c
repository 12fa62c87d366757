#include "virtio_device.h"

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

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

static void on_queue_notified(void *context)
{
    struct svpy_queue_kick *kick = context;
    struct svpy_device *dev = kick->dev;
    uint64_t count;

    /* Clear the ioeventfd; several notifications collapse into one pass. */
    if (read(kick->watch.fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return;
    svpy_lock(&dev->shared);
    dev->notified(dev, kick->queue);
    svpy_unlock(&dev->shared);
}

int svpy_device_init(struct svpy_device *dev, const struct svpy_guest_memory *mem, int irqfd,
                     int error_fd, unsigned num_queues, const int *kick_fds,
                     svpy_queue_notified_fn notified)
{
    if (num_queues == 0 || num_queues > SVPY_MAX_QUEUES)
        return -EINVAL;
    dev->mem = mem;
    dev->num_queues = num_queues;
    dev->notified = notified;
    for (unsigned i = 0; i < num_queues; i++) {
        dev->kicks[i].watch.fd = kick_fds[i];
        dev->kicks[i].watch.handler = on_queue_notified;
        dev->kicks[i].watch.context = &dev->kicks[i];
        dev->kicks[i].dev = dev;
        dev->kicks[i].queue = i;
    }
    return svpy_shared_init(&dev->shared, irqfd, error_fd);
}

int svpy_device_attach(struct svpy_device *dev, struct svpy_iothread *thread)
{
    for (unsigned i = 0; i < dev->num_queues; i++) {
        int ret = svpy_iothread_watch(thread, &dev->kicks[i].watch);

        if (ret)
            return ret;
    }
    return 0;
}

void svpy_device_requeue(struct svpy_device *dev, unsigned queue)
{
    if (queue < dev->num_queues)
        svpy_eventfd_signal(dev->kicks[queue].watch.fd);
}

void svpy_device_destroy(struct svpy_device *dev)
{
    svpy_shared_destroy(&dev->shared);
}
