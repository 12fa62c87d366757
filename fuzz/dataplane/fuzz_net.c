/* virtio-net both ways as the I/O thread runs it: frames from a "tap" (a
 * datagram socketpair: one read, one frame) into the guest's receive
 * buffers, merged or not, and the guest's transmit chains out to it; tap
 * events, a full tap (real, or an injected EAGAIN), link up and down. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "harness.h"

/* Backend faults the input may ask for (bits of h_faults). */
static ssize_t fault_writev(int fd, const struct iovec *iov, int count)
{
    if (h_fault(0)) {
        errno = EAGAIN;
        return -1;
    }
    if (h_fault(1)) {
        errno = EINVAL; /* an offload the tap refuses */
        return -1;
    }
    return writev(fd, iov, count);
}

static ssize_t fault_read(int fd, void *buf, size_t len)
{
    if (h_fault(2)) {
        errno = EIO;
        return -1;
    }
    if (h_fault(3)) {
        errno = EINTR;
        h_faults &= ~(1u << 3); /* once, or the device would retry forever */
        return -1;
    }
    return read(fd, buf, len);
}

#include "wrap.h"
#define writev fault_writev
#define read fault_read
#include "virtio_net.c"
#undef writev
#undef read

static struct svpy_net net;
static struct svpy_iothread thread; /* only its epoll set: nothing runs it */
static int tap[2] = { -1, -1 };      /* [0] the device's tap, [1] the network's end */
static uint8_t frame[SVPY_NET_MAX_FRAME + 64];
static uint64_t frames_sent;

static struct svpy_virtqueue *net_queue(unsigned q)
{
    return q == SVPY_NET_RX_QUEUE ? &net.rxq : &net.txq;
}

static void drain(int fd, bool check)
{
    for (;;) {
        ssize_t got = recv(fd, frame, sizeof(frame), MSG_DONTWAIT);

        if (got < 0)
            return;
        /* What the device sent the tap: a header and at most the largest frame. */
        if (check)
            H_CHECK(got >= SVPY_NET_HDR_BYTES && got <= SVPY_NET_MAX_FRAME,
                    "a %zd-byte frame sent to the tap", got);
    }
}

static void net_begin(struct h_reader *r)
{
    static const int kicks[2] = { -1, -1 };
    uint8_t cfg = h_u8(r);

    if (tap[0] < 0) {
        int size = 1 << 20;

        thread.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (thread.epoll_fd < 0 ||
            socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, tap) < 0)
            abort();
        setsockopt(tap[1], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    }
    if (svpy_net_init(&net, &h_mem, -1, -1, kicks) < 0)
        abort();
    memset(&net.stats, 0, sizeof(net.stats));
    net.thread = &thread;
    net.mrg_rxbuf = cfg & 1;
    frames_sent = 0;
    h_faults = 0;
    if (!(cfg & 2))
        svpy_net_set_tap(&net, tap[0]);
}

static void net_start(void)
{
    svpy_lock(&net.dev.shared);
    svpy_net_start(&net);
    svpy_unlock(&net.dev.shared);
}

static void net_reset(void)
{
    svpy_lock(&net.dev.shared);
    svpy_net_stop(&net);
    svpy_unlock(&net.dev.shared);
}

static void net_notify(unsigned q)
{
    svpy_lock(&net.dev.shared);
    on_queue_notified(&net.dev, q);
    svpy_unlock(&net.dev.shared);
}

static void net_op(unsigned code, struct h_reader *r)
{
    switch (code) {
    case 0: { /* a frame arrives on the tap */
        size_t len = h_u16(r) % (sizeof(frame) + 1);
        const uint8_t *bytes;
        size_t have = h_take(r, &bytes, h_u8(r));

        if (have > len)
            have = len;
        memcpy(frame, bytes, have);
        memset(frame + have, 0x5a, len - have);
        if (send(tap[1], frame, len, MSG_DONTWAIT) >= 0)
            frames_sent++;
        break;
    }
    case 1: /* the tap's epoll event */
        net.tap_watch.revents = h_u8(r) & (EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP);
        on_tap_event(&net);
        break;
    case 2: /* the network takes what the device sent */
        drain(tap[1], true);
        break;
    case 3: /* link up or down (set_link, hot-plug of the backend) */
        svpy_lock(&net.dev.shared);
        svpy_net_set_tap(&net, h_u8(r) & 1 ? tap[0] : -1);
        svpy_unlock(&net.dev.shared);
        break;
    case 4:
        h_faults = h_u8(r);
        break;
    }
}

static void net_end(void)
{
    net_reset();
    if (tap_is_watched(&net))
        svpy_iothread_unwatch(&thread, &net.tap_watch);
    net.tap_fd = -1;
    /* Every frame delivered or dropped was one the tap gave. */
    H_CHECK(net.stats.rx_frames + net.stats.rx_dropped <= frames_sent,
            "%lu frames received or dropped, %lu sent", (unsigned long)(net.stats.rx_frames +
            net.stats.rx_dropped), (unsigned long)frames_sent);
    drain(tap[0], false);
    drain(tap[1], true);
}

static const struct h_device device = {
    .num_queues = 2,
    .num_ops = 5,
    .queue = net_queue,
    .broken = &net.dev.shared.broken,
    .begin = net_begin,
    .start = net_start,
    .reset = net_reset,
    .notify = net_notify,
    .op = net_op,
    .end = net_end,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h_run(&device, data, size);
    return 0;
}
