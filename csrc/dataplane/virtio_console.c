#include "virtio_console.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define CTRL_RX 2
#define CTRL_TX 3
#define CTRL_HEADER 8 /* struct virtio_console_control: le32 id, le16 event, le16 value */

unsigned svpy_console_port_queue(unsigned nr, int tx)
{
    return (nr == 0 ? 0 : 4 + 2 * (nr - 1)) + (tx ? 1 : 0);
}

static struct svpy_console_port *port_of(struct svpy_console *console, unsigned nr)
{
    if (nr >= console->max_nr_ports || !console->ports[nr].present)
        return NULL;
    return &console->ports[nr];
}

/* A broken device serves nothing more until the driver resets it: one queue's
 * error stops the others too, whichever path (control plane input, a control
 * message's answer) would pop next. */
static bool is_broken(struct svpy_console *console)
{
    return __atomic_load_n(&console->dev.shared.broken, __ATOMIC_SEQ_CST) != 0;
}

static void interrupt_if_needed(struct svpy_console *console, struct svpy_virtqueue *vq)
{
    if (svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&console->dev.shared, SVPY_INT_VRING);
}

/* Copies into the chain's device-writable buffers; returns the bytes copied. */
static uint32_t copy_to_chain(const struct svpy_chain *chain, uint32_t done, const uint8_t *data,
                              uint32_t len)
{
    uint32_t copied = 0;
    uint64_t skip = done;

    for (unsigned i = 0; i < chain->writable && copied < len; i++) {
        const struct iovec *iov = &chain->iov[chain->readable + i];
        size_t room = iov->iov_len, chunk;

        if (skip >= room) {
            skip -= room;
            continue;
        }
        chunk = room - skip;
        if (chunk > len - copied)
            chunk = len - copied;
        memcpy((uint8_t *)iov->iov_base + skip, data + copied, chunk);
        copied += chunk;
        skip = 0;
    }
    return copied;
}

/* Control messages to the guest. */

static void flush_ctrl(struct svpy_console *console)
{
    struct svpy_virtqueue *vq = &console->vqs[CTRL_RX];
    int completed = 0;

    if (!console->multiport || !vq->active || is_broken(console))
        return;
again:
    while (console->ctrl_len) {
        const struct svpy_console_ctrl *msg = &console->ctrl[console->ctrl_start];
        uint8_t header[CTRL_HEADER];
        uint32_t written;
        int ret = svpy_vq_pop(vq, console->dev.mem, &console->chain);

        if (ret == 0)
            break; /* the guest posts more buffers and notifies */
        if (ret < 0) {
            svpy_mark_broken(&console->dev.shared, ret);
            return;
        }
        header[0] = (uint8_t)msg->id;
        header[1] = (uint8_t)(msg->id >> 8);
        header[2] = (uint8_t)(msg->id >> 16);
        header[3] = (uint8_t)(msg->id >> 24);
        header[4] = (uint8_t)msg->event;
        header[5] = (uint8_t)(msg->event >> 8);
        header[6] = (uint8_t)msg->value;
        header[7] = (uint8_t)(msg->value >> 8);
        written = copy_to_chain(&console->chain, 0, header, CTRL_HEADER);
        if (msg->event == VIRTIO_CONSOLE_PORT_NAME && msg->id < console->max_nr_ports) {
            const char *name = console->ports[msg->id].name;

            written += copy_to_chain(&console->chain, written, (const uint8_t *)name,
                                     (uint32_t)strlen(name));
        }
        svpy_vq_push(vq, console->chain.head, written);
        completed = 1;
        console->ctrl_start = (console->ctrl_start + 1) % SVPY_CONSOLE_CTRL_PENDING;
        console->ctrl_len--;
    }
    /* Out of buffers with messages left: hear of the next ones (or take those that
     * came meanwhile). */
    if (console->ctrl_len && svpy_vq_enable_notify(vq))
        goto again;
    if (completed)
        interrupt_if_needed(console, vq);
}

static void send_ctrl(struct svpy_console *console, uint32_t id, uint16_t event, uint16_t value)
{
    struct svpy_console_ctrl *msg;

    if (console->ctrl_len == SVPY_CONSOLE_CTRL_PENDING) {
        console->ctrl_dropped++;
        return;
    }
    msg = &console->ctrl[(console->ctrl_start + console->ctrl_len) % SVPY_CONSOLE_CTRL_PENDING];
    msg->id = id;
    msg->event = event;
    msg->value = value;
    console->ctrl_len++;
    flush_ctrl(console);
}

static void fill_rx(struct svpy_console *console, struct svpy_console_port *port);

static void port_ready(struct svpy_console *console, struct svpy_console_port *port)
{
    port->guest_ready = 1;
    if (port->is_console)
        send_ctrl(console, port->nr, VIRTIO_CONSOLE_CONSOLE_PORT, 1);
    if (port->name[0])
        send_ctrl(console, port->nr, VIRTIO_CONSOLE_PORT_NAME, 1);
    port->host_open = port->fd >= 0;
    if (port->host_open)
        send_ctrl(console, port->nr, VIRTIO_CONSOLE_PORT_OPEN, 1);
}

static void handle_ctrl(struct svpy_console *console, uint32_t id, uint16_t event, uint16_t value)
{
    struct svpy_console_port *port = id < console->max_nr_ports ? port_of(console, id) : NULL;

    console->ctrl_received++;
    switch (event) {
    case VIRTIO_CONSOLE_DEVICE_READY:
        if (value != 1 || console->driver_ready)
            return;
        console->driver_ready = 1;
        for (unsigned nr = 0; nr < console->max_nr_ports; nr++)
            if (console->ports[nr].present)
                send_ctrl(console, nr, VIRTIO_CONSOLE_DEVICE_ADD, 1);
        break;
    case VIRTIO_CONSOLE_PORT_READY:
        if (port && value == 1 && !port->guest_ready)
            port_ready(console, port);
        break;
    case VIRTIO_CONSOLE_PORT_OPEN:
        if (port) {
            port->guest_open = value ? 1 : 0;
            fill_rx(console, port); /* input that waited for a reader */
        }
        break;
    default:
        break; /* nothing else is the driver's to send */
    }
}

static void serve_ctrl_tx(struct svpy_console *console)
{
    struct svpy_virtqueue *vq = &console->vqs[CTRL_TX];
    int completed = 0;

    if (!vq->active)
        return;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            uint8_t header[CTRL_HEADER];
            uint32_t have = 0;
            int ret;

            /* The last message's answer may have found the control receive queue broken. */
            if (is_broken(console))
                goto out;
            ret = svpy_vq_pop(vq, console->dev.mem, &console->chain);
            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&console->dev.shared, ret);
                return;
            }
            for (unsigned i = 0; i < console->chain.readable && have < CTRL_HEADER; i++) {
                const uint8_t *data = console->chain.iov[i].iov_base;

                for (size_t j = 0; j < console->chain.iov[i].iov_len && have < CTRL_HEADER; j++)
                    header[have++] = __atomic_load_n(&data[j], __ATOMIC_RELAXED);
            }
            svpy_vq_push(vq, console->chain.head, 0);
            completed = 1;
            if (have == CTRL_HEADER)
                handle_ctrl(console,
                            (uint32_t)header[0] | (uint32_t)header[1] << 8 |
                                (uint32_t)header[2] << 16 | (uint32_t)header[3] << 24,
                            (uint16_t)(header[4] | header[5] << 8),
                            (uint16_t)(header[6] | header[7] << 8));
        }
    } while (svpy_vq_enable_notify(vq));
out:
    if (completed)
        interrupt_if_needed(console, vq);
}

/* Output: guest -> backend. */

static void watch_out(struct svpy_console_port *port, int on)
{
    struct svpy_iothread *thread = port->console->thread;

    if (on && !port->out_watched && thread && port->fd >= 0) {
        port->out_watch.fd = port->fd;
        if (svpy_iothread_watch_events(thread, &port->out_watch, EPOLLOUT) == 0)
            port->out_watched = 1;
    } else if (!on && port->out_watched) {
        svpy_iothread_unwatch(thread, &port->out_watch);
        port->out_watched = 0;
    }
}

/* Writes what the backend takes now: bytes, 0 (it would block) or -errno. */
static ssize_t backend_write(struct svpy_console_port *port, const struct iovec *iov,
                             unsigned count)
{
    ssize_t n;

    do {
        if (port->is_socket) {
            struct msghdr msg;

            memset(&msg, 0, sizeof(msg));
            msg.msg_iov = (struct iovec *)iov;
            msg.msg_iovlen = count;
            n = sendmsg(port->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            n = writev(port->fd, iov, (int)count);
        }
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
    return n;
}

/* Flushes the buffered output as far as the backend takes it, and watches
 * for room when it stopped taking it. */
static void flush_out(struct svpy_console_port *port)
{
    int blocked = 0;

    while (port->out_len && port->fd >= 0 && port->ready) {
        struct iovec iov[2];
        uint32_t first = SVPY_CONSOLE_OUT_BYTES - port->out_start;
        unsigned count = 1;
        ssize_t n;

        if (first > port->out_len)
            first = port->out_len;
        iov[0].iov_base = port->out + port->out_start;
        iov[0].iov_len = first;
        if (first < port->out_len) {
            iov[1].iov_base = port->out;
            iov[1].iov_len = port->out_len - first;
            count = 2;
        }
        n = backend_write(port, iov, count);
        if (n <= 0) {
            /* An error: the backend is going (a client that left); the bytes stay
             * for the next one. */
            if (n < 0)
                port->counters.write_errors++;
            blocked = n == 0;
            break;
        }
        port->counters.written_bytes += (uint64_t)n;
        port->out_start = (uint32_t)((port->out_start + (uint32_t)n) % SVPY_CONSOLE_OUT_BYTES);
        port->out_len -= (uint32_t)n;
    }
    if (!port->out_len)
        port->out_start = 0;
    watch_out(port, blocked);
}

static void keep_out(struct svpy_console_port *port, const struct svpy_chain *chain,
                     uint64_t skip)
{
    for (unsigned i = 0; i < chain->readable; i++) {
        const uint8_t *data = chain->iov[i].iov_base;
        size_t len = chain->iov[i].iov_len;

        if (skip >= len) {
            skip -= len;
            continue;
        }
        data += skip;
        len -= skip;
        skip = 0;
        for (size_t j = 0; j < len; j++) {
            if (port->out_len == SVPY_CONSOLE_OUT_BYTES) {
                port->counters.dropped_bytes += len - j;
                break;
            }
            port->out[(port->out_start + port->out_len) % SVPY_CONSOLE_OUT_BYTES] =
                __atomic_load_n(&data[j], __ATOMIC_RELAXED);
            port->out_len++;
        }
    }
}

static void take_output(struct svpy_console_port *port, const struct svpy_chain *chain)
{
    uint64_t total = chain->readable_bytes, sent = 0;

    port->counters.tx_bytes += total;
    if (port->fd < 0 && !port->keep_when_detached) {
        port->counters.dropped_bytes += total; /* no backend will ever take it */
        return;
    }
    if (port->fd >= 0 && port->ready && !port->out_len && chain->readable) {
        ssize_t n = backend_write(port, chain->iov, chain->readable);

        if (n > 0) {
            sent = (uint64_t)n;
            port->counters.written_bytes += sent;
        } else if (n < 0) {
            port->counters.write_errors++;
        }
    }
    if (sent < total)
        keep_out(port, chain, sent);
}

static void serve_port_tx(struct svpy_console *console, struct svpy_console_port *port,
                          struct svpy_virtqueue *vq)
{
    unsigned chains = 0;
    int completed = 0;

    if (!vq->active)
        return;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            int ret;

            if (chains == SVPY_CONSOLE_PASS_MAX_CHAINS) {
                svpy_device_requeue(&console->dev, (unsigned)(vq - console->vqs));
                goto out;
            }
            ret = svpy_vq_pop(vq, console->dev.mem, &console->chain);
            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&console->dev.shared, ret);
                goto out;
            }
            take_output(port, &console->chain);
            /* Given back at once whatever the backend did with it: a guest
             * console waits for its transmit buffers. */
            svpy_vq_push(vq, console->chain.head, 0);
            completed = 1;
            chains++;
        }
    } while (svpy_vq_enable_notify(vq));
out:
    flush_out(port);
    if (completed)
        interrupt_if_needed(console, vq);
}

static void on_backend_writable(void *context)
{
    struct svpy_console_port *port = context;
    struct svpy_console *console = port->console;

    svpy_lock(&console->dev.shared);
    /* A late event for a watch already removed (the fd may be another's now). */
    if (port->out_watched && port->out_watch.fd == port->fd) {
        if (port->out_watch.revents & (EPOLLERR | EPOLLHUP))
            watch_out(port, 0); /* the client left: its successor gets the bytes */
        else
            flush_out(port);
    }
    svpy_unlock(&console->dev.shared);
}

/* Input: backend -> guest. */

static void fill_rx(struct svpy_console *console, struct svpy_console_port *port)
{
    struct svpy_virtqueue *vq = &console->vqs[svpy_console_port_queue(port->nr, 0)];
    int completed = 0;

    /* Linux drops what arrives on a port no process has open: input waits (as
     * QEMU's does) until the guest says it opened the port. */
    if (!vq->active || !port->guest_open || is_broken(console))
        return;
    for (;;) {
        while (port->in_len) {
            uint32_t written = 0;
            int ret = svpy_vq_pop(vq, console->dev.mem, &console->chain);

            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&console->dev.shared, ret);
                return;
            }
            while (port->in_len) {
                uint32_t chunk = SVPY_CONSOLE_IN_BYTES - port->in_start, copied;

                if (chunk > port->in_len)
                    chunk = port->in_len;
                copied = copy_to_chain(&console->chain, written, port->in + port->in_start,
                                       chunk);
                written += copied;
                port->in_start = (port->in_start + copied) % SVPY_CONSOLE_IN_BYTES;
                port->in_len -= copied;
                if (copied < chunk)
                    break; /* the chain is full */
            }
            port->counters.rx_bytes += written;
            svpy_vq_push(vq, console->chain.head, written);
            completed = 1;
        }
        /* Out of buffers with input left: ask to hear of the next ones. */
        if (!port->in_len || !svpy_vq_enable_notify(vq))
            break;
    }
    if (!port->in_len)
        port->in_start = 0;
    if (completed)
        interrupt_if_needed(console, vq);
}

uint32_t svpy_console_input(struct svpy_console *console, unsigned nr, const uint8_t *data,
                            uint32_t len)
{
    struct svpy_console_port *port = port_of(console, nr);
    uint32_t take;

    if (!port)
        return 0;
    take = SVPY_CONSOLE_IN_BYTES - port->in_len;
    if (take > len)
        take = len;
    for (uint32_t i = 0; i < take; i++)
        port->in[(port->in_start + port->in_len + i) % SVPY_CONSOLE_IN_BYTES] = data[i];
    port->in_len += take;
    fill_rx(console, port);
    return take;
}

static void on_queue_notified(struct svpy_device *dev, unsigned queue)
{
    struct svpy_console *console = (struct svpy_console *)dev;
    struct svpy_console_port *port;
    unsigned nr;

    if (__atomic_load_n(&console->dev.shared.broken, __ATOMIC_SEQ_CST))
        return;
    if (queue == CTRL_RX) {
        flush_ctrl(console);
        return;
    }
    if (queue == CTRL_TX) {
        serve_ctrl_tx(console);
        return;
    }
    nr = queue < 2 ? 0 : (queue - 4) / 2 + 1;
    port = port_of(console, nr);
    if (!port)
        return;
    if (queue == svpy_console_port_queue(nr, 1))
        serve_port_tx(console, port, &console->vqs[queue]);
    else
        fill_rx(console, port);
}

int svpy_console_init(struct svpy_console *console, const struct svpy_guest_memory *mem,
                      int irqfd, int error_fd, const int *kick_fds, unsigned max_nr_ports)
{
    if (max_nr_ports == 0 || max_nr_ports > SVPY_CONSOLE_MAX_PORTS)
        return -EINVAL;
    memset(console->vqs, 0, sizeof(console->vqs));
    console->thread = NULL;
    console->max_nr_ports = max_nr_ports;
    console->multiport = 0;
    console->driver_ready = 0;
    console->ctrl_start = console->ctrl_len = 0;
    console->ctrl_dropped = console->ctrl_received = 0;
    for (unsigned nr = 0; nr < SVPY_CONSOLE_MAX_PORTS; nr++) {
        struct svpy_console_port *port = &console->ports[nr];

        memset(port, 0, offsetof(struct svpy_console_port, out));
        port->console = console;
        port->nr = nr;
        port->fd = -1;
        port->out_watch.fd = -1;
        port->out_watch.handler = on_backend_writable;
        port->out_watch.context = port;
    }
    return svpy_device_init(&console->dev, mem, irqfd, error_fd, 2 * (max_nr_ports + 1),
                            kick_fds, on_queue_notified);
}

int svpy_console_attach(struct svpy_console *console, struct svpy_iothread *thread)
{
    console->thread = thread;
    return svpy_device_attach(&console->dev, thread);
}

int svpy_console_add_port(struct svpy_console *console, unsigned nr, int is_console,
                          int keep_when_detached, const char *name)
{
    struct svpy_console_port *port;

    if (nr >= console->max_nr_ports || console->ports[nr].present)
        return -EINVAL;
    port = &console->ports[nr];
    port->present = 1;
    port->is_console = is_console ? 1 : 0;
    port->keep_when_detached = keep_when_detached ? 1 : 0;
    if (name) {
        strncpy(port->name, name, SVPY_CONSOLE_NAME_BYTES - 1);
        port->name[SVPY_CONSOLE_NAME_BYTES - 1] = 0;
    }
    return 0;
}

void svpy_console_start(struct svpy_console *console, int multiport)
{
    console->multiport = multiport ? 1 : 0;
    if (!console->multiport) {
        /* Without control messages port 0 is the one port, open from the start. */
        console->ports[0].guest_ready = console->ports[0].guest_open = 1;
    }
    for (unsigned q = 0; q < console->dev.num_queues; q++)
        if (console->vqs[q].active)
            on_queue_notified(&console->dev, q);
}

void svpy_console_stop(struct svpy_console *console)
{
    for (unsigned q = 0; q < SVPY_CONSOLE_MAX_QUEUES; q++)
        svpy_vq_deactivate(&console->vqs[q]);
    console->multiport = 0;
    console->driver_ready = 0;
    console->ctrl_start = console->ctrl_len = 0;
    for (unsigned nr = 0; nr < SVPY_CONSOLE_MAX_PORTS; nr++) {
        struct svpy_console_port *port = &console->ports[nr];

        /* What the host sent or the guest wrote stays for the next driver. */
        port->guest_ready = port->guest_open = port->host_open = 0;
    }
}

void svpy_console_port_attach(struct svpy_console *console, unsigned nr, int fd, int is_socket)
{
    struct svpy_console_port *port = port_of(console, nr);
    uint8_t open = fd >= 0;

    if (!port)
        return;
    watch_out(port, 0);
    port->fd = fd;
    port->is_socket = is_socket ? 1 : 0;
    if (console->multiport && port->guest_ready && open != port->host_open) {
        port->host_open = open;
        send_ctrl(console, nr, VIRTIO_CONSOLE_PORT_OPEN, open);
    }
}

void svpy_console_port_set_ready(struct svpy_console *console, unsigned nr, int ready)
{
    struct svpy_console_port *port = port_of(console, nr);

    if (!port)
        return;
    port->ready = ready ? 1 : 0;
    if (port->ready)
        flush_out(port);
    else
        watch_out(port, 0);
}

void svpy_console_destroy(struct svpy_console *console)
{
    svpy_device_destroy(&console->dev);
}
