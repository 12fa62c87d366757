#include "virtio_net.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

/* Enough segments to hold the first SVPY_NET_HDR_BYTES of a buffer: every
 * segment the queue hands out holds at least one byte. */
#define HEADER_SEGMENTS SVPY_NET_HDR_BYTES

enum delivery {
    DELIVERED,
    DROPPED,    /* no buffer could ever hold it: the frame is gone, the buffers stay */
    NO_BUFFERS, /* not enough buffers yet: the frame waits for more */
    BROKEN,     /* the guest's queue is malformed; the device is marked broken */
};

/* Copies `len` bytes of `src` into the iovecs, starting `skip` bytes in. */
static void copy_to_iov(const struct iovec *iov, unsigned count, size_t skip,
                        const uint8_t *src, size_t len)
{
    for (unsigned i = 0; i < count && len; i++) {
        size_t room = iov[i].iov_len, chunk;

        if (skip >= room) {
            skip -= room;
            continue;
        }
        chunk = room - skip < len ? room - skip : len;
        memcpy((uint8_t *)iov[i].iov_base + skip, src, chunk);
        src += chunk;
        len -= chunk;
        skip = 0;
    }
}

static int tap_is_watched(const struct svpy_net *net)
{
    return net->tap_fd >= 0 && net->thread && !net->tap_lost;
}

/* Watches the tap for exactly what can make progress now. */
static void update_tap_watch(struct svpy_net *net)
{
    uint32_t events = 0;

    if (!tap_is_watched(net))
        return;
    /* A broken device reads nothing: watching the tap would only spin. */
    if (net->rxq.active && !net->rx_waiting &&
        !__atomic_load_n(&net->dev.shared.broken, __ATOMIC_SEQ_CST))
        events |= EPOLLIN;
    if (net->tx_waiting)
        events |= EPOLLOUT;
    if (events != net->tap_events && svpy_iothread_modify(net->thread, &net->tap_watch,
                                                          events) == 0)
        net->tap_events = events;
}

/* Puts the pending frame into the guest's receive buffers. */
static enum delivery deliver(struct svpy_net *net)
{
    struct svpy_virtqueue *vq = &net->rxq;
    struct iovec header_iov[HEADER_SEGMENTS];
    unsigned header_segments = 0;
    uint32_t len = net->pending_len, copied = 0;
    uint16_t buffers = 0;
    uint8_t num_buffers[2];

    if (len < SVPY_NET_HDR_BYTES) {
        net->stats.rx_dropped++;
        return DROPPED;
    }
    while (copied < len) {
        struct svpy_chain *chain = &net->chain;
        const struct iovec *iov;
        uint64_t room;
        uint32_t chunk;
        int ret;

        if (buffers == SVPY_NET_MAX_RX_BUFFERS) {
            svpy_vq_unpop(vq, buffers);
            net->stats.rx_dropped++;
            return DROPPED;
        }
        ret = svpy_vq_pop(vq, net->dev.mem, chain);
        if (ret == 0) {
            svpy_vq_unpop(vq, buffers);
            return NO_BUFFERS;
        }
        if (ret < 0) {
            svpy_mark_broken(&net->dev.shared, ret);
            return BROKEN;
        }
        iov = &chain->iov[chain->readable];
        room = chain->writable_bytes;
        /* A receive buffer the header does not fit in (§5.1.6.3.1). */
        if (buffers == 0 && room < SVPY_NET_HDR_BYTES) {
            svpy_mark_broken(&net->dev.shared, SVPY_VQ_ERR_REQUEST);
            return BROKEN;
        }
        if (!net->mrg_rxbuf && room < len) {
            /* Without MRG_RXBUF a frame takes one buffer; keep the buffer. */
            svpy_vq_unpop(vq, 1);
            net->stats.rx_dropped++;
            return DROPPED;
        }
        chunk = room < len - copied ? (uint32_t)room : len - copied;
        copy_to_iov(iov, chain->writable, 0, net->frame + copied, chunk);
        if (buffers == 0) {
            header_segments = chain->writable < HEADER_SEGMENTS ? chain->writable
                                                                : HEADER_SEGMENTS;
            memcpy(header_iov, iov, header_segments * sizeof(*iov));
        }
        svpy_vq_fill(vq, buffers, chain->head, chunk);
        buffers++;
        copied += chunk;
    }
    /* The tap leaves num_buffers alone; it is the device's to say. */
    num_buffers[0] = buffers & 0xff;
    num_buffers[1] = buffers >> 8;
    copy_to_iov(header_iov, header_segments, SVPY_NET_HDR_NUM_BUFFERS, num_buffers, 2);
    svpy_vq_flush(vq, buffers);
    net->stats.rx_frames++;
    net->stats.rx_bytes += len - SVPY_NET_HDR_BYTES;
    return DELIVERED;
}

/* Reads the tap while the guest has buffers for what it reads. */
static void receive(struct svpy_net *net)
{
    struct svpy_virtqueue *vq = &net->rxq;
    unsigned frames = 0;
    int delivered = 0;

    if (!vq->active || net->tap_fd < 0 || net->rx_waiting ||
        __atomic_load_n(&net->dev.shared.broken, __ATOMIC_SEQ_CST))
        return;
    for (;;) {
        enum delivery result;

        if (frames == SVPY_NET_PASS_MAX_FRAMES) {
            net->stats.yields++;
            svpy_device_requeue(&net->dev, SVPY_NET_RX_QUEUE);
            break;
        }
        if (net->pending_len == 0) {
            ssize_t got = read(net->tap_fd, net->frame, sizeof(net->frame));

            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0)
                break; /* EAGAIN: drained; another error: the next event says more */
            net->pending_len = (uint32_t)got;
        }
        result = deliver(net);
        if (result == BROKEN)
            break;
        if (result == NO_BUFFERS) {
            /* The buffers there (given back unused) are too few for this
             * frame.  If they fill the whole ring, more will never come:
             * drop the frame.  Otherwise ask to hear of the next buffer,
             * then look once more: it may have come just now. */
            uint16_t seen = svpy_vq_avail_idx(vq);

            if ((uint16_t)(seen - vq->last_avail_idx) >= vq->size) {
                net->stats.rx_dropped++;
                net->pending_len = 0;
                frames++;
                continue;
            }
            if (svpy_vq_enable_notify_after(vq, seen))
                continue;
            net->rx_waiting = 1;
            net->stats.rx_stalls++;
            break;
        }
        delivered |= result == DELIVERED;
        net->pending_len = 0;
        frames++;
    }
    if (delivered && svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&net->dev.shared, SVPY_INT_VRING);
}

static void transmit(struct svpy_net *net)
{
    struct svpy_virtqueue *vq = &net->txq;
    struct svpy_chain *chain = &net->chain;
    unsigned frames = 0;
    int completed = 0;

    if (!vq->active || net->tx_waiting ||
        __atomic_load_n(&net->dev.shared.broken, __ATOMIC_SEQ_CST))
        return;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            ssize_t written;
            int ret;

            if (frames == SVPY_NET_PASS_MAX_FRAMES) {
                net->stats.yields++;
                svpy_device_requeue(&net->dev, SVPY_NET_TX_QUEUE);
                goto out;
            }
            ret = svpy_vq_pop(vq, net->dev.mem, chain);
            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&net->dev.shared, ret);
                goto out;
            }
            frames++;
            /* Device-writable parts of a transmit chain are ignored. */
            if (chain->readable_bytes < SVPY_NET_HDR_BYTES ||
                chain->readable_bytes > SVPY_NET_MAX_FRAME) {
                net->stats.tx_errors++;
            } else if (net->tap_fd < 0) {
                net->stats.tx_dropped++;
            } else {
                do
                    written = writev(net->tap_fd, chain->iov, chain->readable);
                while (written < 0 && errno == EINTR);
                if (written < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    /* The tap is full: the frame waits in the queue for EPOLLOUT. */
                    svpy_vq_unpop(vq, 1);
                    net->tx_waiting = 1;
                    net->stats.tx_stalls++;
                    goto out;
                }
                if (written < 0) {
                    net->stats.tx_errors++; /* e.g. an offload the tap refuses */
                } else {
                    net->stats.tx_frames++;
                    net->stats.tx_bytes += (uint64_t)written - SVPY_NET_HDR_BYTES;
                }
            }
            svpy_vq_push(vq, chain->head, 0);
            completed = 1;
        }
    } while (svpy_vq_enable_notify(vq));
out:
    if (completed && svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&net->dev.shared, SVPY_INT_VRING);
}

static void on_queue_notified(struct svpy_device *dev, unsigned queue)
{
    struct svpy_net *net = (struct svpy_net *)dev;

    if (queue == SVPY_NET_RX_QUEUE) {
        net->rx_waiting = 0; /* new buffers (or a re-queued pass) */
        receive(net);
    } else if (queue == SVPY_NET_TX_QUEUE) {
        transmit(net);
    }
    update_tap_watch(net);
}

/* Asked again now: the event may have been fetched for a tap since replaced. */
static int tap_failed(int fd)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN | POLLOUT };

    return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLERR | POLLHUP | POLLNVAL));
}

static void on_tap_event(void *context)
{
    struct svpy_net *net = context;
    uint32_t revents = net->tap_watch.revents;

    svpy_lock(&net->dev.shared);
    /* An event fetched before the tap was detached finds no tap. */
    if (net->tap_fd >= 0) {
        if (revents & (EPOLLOUT | EPOLLERR)) {
            net->tx_waiting = 0;
            transmit(net);
        }
        if (revents & (EPOLLIN | EPOLLERR | EPOLLHUP))
            receive(net);
        if (revents & (EPOLLERR | EPOLLHUP) && !(revents & EPOLLIN) && tap_failed(net->tap_fd)) {
            /* The tap's interface is gone: nothing will come; stop watching
             * rather than spin on an event that cannot be cleared. */
            svpy_iothread_unwatch(net->thread, &net->tap_watch);
            net->tap_events = 0;
            net->tap_lost = 1;
        }
        update_tap_watch(net);
    }
    svpy_unlock(&net->dev.shared);
}

int svpy_net_init(struct svpy_net *net, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds)
{
    net->tap_fd = -1;
    net->tap_lost = 0;
    net->thread = NULL;
    net->tap_events = 0;
    net->rx_waiting = net->tx_waiting = 0;
    net->pending_len = 0;
    net->mrg_rxbuf = 0;
    net->tap_watch.fd = -1;
    net->tap_watch.handler = on_tap_event;
    net->tap_watch.context = net;
    net->tap_watch.revents = 0;
    return svpy_device_init(&net->dev, mem, irqfd, error_fd, 2, kick_fds, on_queue_notified);
}

int svpy_net_attach(struct svpy_net *net, struct svpy_iothread *thread)
{
    int ret = svpy_device_attach(&net->dev, thread);

    if (ret == 0)
        net->thread = thread;
    return ret;
}

void svpy_net_start(struct svpy_net *net)
{
    receive(net);
    transmit(net);
    update_tap_watch(net);
}

void svpy_net_stop(struct svpy_net *net)
{
    svpy_vq_deactivate(&net->rxq);
    svpy_vq_deactivate(&net->txq);
    net->pending_len = 0;
    net->rx_waiting = net->tx_waiting = 0;
    update_tap_watch(net);
}

int svpy_net_set_tap(struct svpy_net *net, int fd)
{
    if (tap_is_watched(net))
        svpy_iothread_unwatch(net->thread, &net->tap_watch);
    net->tap_fd = -1;
    net->tap_lost = 0;
    net->tap_events = 0;
    net->pending_len = 0;
    net->rx_waiting = net->tx_waiting = 0;
    if (fd < 0) {
        /* Frames the guest queued for the old tap are answered (dropped, the
         * link is down), or it would wait for them with notifications off. */
        transmit(net);
        return 0;
    }
    if (net->thread) {
        int ret;

        net->tap_watch.fd = fd;
        ret = svpy_iothread_watch_events(net->thread, &net->tap_watch, 0);
        if (ret)
            return ret;
    }
    net->tap_fd = fd;
    svpy_net_start(net);
    return 0;
}

void svpy_net_destroy(struct svpy_net *net)
{
    svpy_device_destroy(&net->dev);
}
