/* virtio-console (multiport or not) as the I/O thread runs it: control
 * messages both ways, guest output to real backends (a stream socketpair and
 * a pipe, with injected EAGAIN and errors), host input into the guest's
 * receive buffers, backends attached and detached, ready or not. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "harness.h"

static ssize_t fault_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (h_fault(0)) {
        errno = EAGAIN;
        return -1;
    }
    if (h_fault(1)) {
        errno = EPIPE; /* the client left */
        return -1;
    }
    return sendmsg(fd, msg, flags);
}

static ssize_t fault_writev(int fd, const struct iovec *iov, int count)
{
    if (h_fault(2)) {
        errno = EAGAIN;
        return -1;
    }
    if (h_fault(3)) {
        errno = EIO;
        return -1;
    }
    return writev(fd, iov, count);
}

#include "wrap.h"
#define sendmsg fault_sendmsg
#define writev fault_writev
#include "virtio_console.c"
#undef sendmsg
#undef writev

#define PORTS SVPY_CONSOLE_MAX_PORTS

static struct svpy_console console;
static struct svpy_iothread thread; /* only its epoll set */
/* Per port: the device's end and ours. */
static int backend[PORTS][2];
static int backend_socket[PORTS];
static uint8_t scratch[65536];

/* Bytes moved this input (host input offered, guest output taken): past
 * twice a port buffer's size the full-buffer paths have been reached; more
 * would only slow the fuzzing (the device copies byte by byte, each byte
 * traced), so the device is served no more. */
#define MAX_BYTES_PER_INPUT (2 * SVPY_CONSOLE_OUT_BYTES)
static uint64_t input_offered;

static bool enough_bytes(void)
{
    uint64_t moved = input_offered;

    for (unsigned nr = 0; nr < PORTS; nr++)
        moved += console.ports[nr].counters.tx_bytes;
    return moved > MAX_BYTES_PER_INPUT;
}

static struct svpy_virtqueue *console_queue(unsigned q)
{
    return &console.vqs[q];
}

static void setup_once(void)
{
    static bool done;

    if (done)
        return;
    thread.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (thread.epoll_fd < 0)
        abort();
    for (unsigned nr = 0; nr < PORTS; nr++) {
        int fds[2];

        /* Port 1 writes a pipe (a file or pty chardev), the others a socket. */
        backend_socket[nr] = nr != 1;
        if (backend_socket[nr]) {
            if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0)
                abort();
            backend[nr][0] = fds[0];
            backend[nr][1] = fds[1];
        } else {
            if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
                abort();
            backend[nr][0] = fds[1];
            backend[nr][1] = fds[0];
        }
    }
    done = true;
}

static void drain_backends(void)
{
    for (unsigned nr = 0; nr < PORTS; nr++)
        while (read(backend[nr][1], scratch, sizeof(scratch)) > 0)
            ;
}

static void check_port_state(void)
{
    H_CHECK(console.ctrl_len <= SVPY_CONSOLE_CTRL_PENDING, "ctrl_len %u", console.ctrl_len);
    for (unsigned nr = 0; nr < PORTS; nr++) {
        const struct svpy_console_port *port = &console.ports[nr];

        H_CHECK(port->out_len <= SVPY_CONSOLE_OUT_BYTES && port->out_start <
                SVPY_CONSOLE_OUT_BYTES, "port %u output ring %u+%u", nr, port->out_start,
                port->out_len);
        H_CHECK(port->in_len <= SVPY_CONSOLE_IN_BYTES && port->in_start < SVPY_CONSOLE_IN_BYTES,
                "port %u input ring %u+%u", nr, port->in_start, port->in_len);
    }
}

static void attach(unsigned nr, int on)
{
    svpy_console_port_set_ready(&console, nr, 0);
    svpy_console_port_attach(&console, nr, on ? backend[nr][0] : -1, backend_socket[nr]);
    if (on)
        svpy_console_port_set_ready(&console, nr, 1);
}

static uint8_t multiport;

static void console_begin(struct h_reader *r)
{
    static const int kicks[2 * (PORTS + 1)] = { -1, -1, -1, -1, -1, -1, -1, -1 };
    uint8_t cfg = h_u8(r);
    unsigned ports = (cfg & 3) % PORTS + 1;

    setup_once();
    if (svpy_console_init(&console, &h_mem, -1, -1, kicks, ports) < 0)
        abort();
    console.thread = &thread;
    multiport = (cfg >> 2) & 1;
    h_faults = 0;
    input_offered = 0;
    for (unsigned nr = 0; nr < ports; nr++) {
        uint8_t port_cfg = h_u8(r);
        static const char *const names[] = { "", "org.qemu.guest_agent.0", "a" };

        svpy_console_add_port(&console, nr, nr == 0 && (port_cfg & 1), (port_cfg >> 1) & 1,
                              names[(port_cfg >> 2) % 3]);
        attach(nr, !(port_cfg & 0x20));
    }
}

static void console_start(void)
{
    if (enough_bytes())
        return;
    svpy_lock(&console.dev.shared);
    svpy_console_start(&console, multiport);
    svpy_unlock(&console.dev.shared);
}

static void console_reset(void)
{
    svpy_lock(&console.dev.shared);
    svpy_console_stop(&console);
    svpy_unlock(&console.dev.shared);
}

static void console_notify(unsigned q)
{
    if (q >= console.dev.num_queues || enough_bytes())
        return; /* no such queue for this many ports, or enough done */
    svpy_lock(&console.dev.shared);
    on_queue_notified(&console.dev, q);
    svpy_unlock(&console.dev.shared);
}

static void console_op(unsigned code, struct h_reader *r)
{
    unsigned nr = h_u8(r) % PORTS;

    if (code <= 1 && enough_bytes())
        return; /* (its bytes are left to be read as the next steps) */
    svpy_lock(&console.dev.shared);
    switch (code) {
    case 0: { /* host input for a port */
        const uint8_t *bytes;
        size_t len = h_take(r, &bytes, h_u8(r));
        uint32_t in_len = nr < console.max_nr_ports ? console.ports[nr].in_len : 0;
        uint32_t taken = svpy_console_input(&console, nr, bytes, (uint32_t)len);

        input_offered += len;
        H_CHECK(taken <= len && taken <= SVPY_CONSOLE_IN_BYTES - in_len, "input took %u of %zu",
                taken, len);
        break;
    }
    case 1: { /* a lot of host input at once: a few of these fill the buffer */
        uint16_t len = h_u16(r) % 2048;

        memset(scratch, 'x', len);
        svpy_console_input(&console, nr, scratch, len);
        input_offered += len;
        break;
    }
    case 2: /* the backend comes or goes (a socket client) */
        if (nr < console.max_nr_ports)
            attach(nr, h_u8(r) & 1);
        break;
    case 3:
        svpy_console_port_set_ready(&console, nr, h_u8(r) & 1);
        break;
    case 4: { /* the backend's epoll event */
        uint8_t revents = h_u8(r) & (EPOLLOUT | EPOLLERR | EPOLLHUP);

        svpy_unlock(&console.dev.shared);
        console.ports[nr].out_watch.revents = revents;
        on_backend_writable(&console.ports[nr]);
        svpy_lock(&console.dev.shared);
        break;
    }
    case 5: /* the other end reads what the device wrote */
        drain_backends();
        break;
    case 6:
        h_faults = h_u8(r);
        break;
    }
    svpy_unlock(&console.dev.shared);
    check_port_state();
}

static void console_end(void)
{
    check_port_state();
    for (unsigned nr = 0; nr < PORTS; nr++)
        watch_out(&console.ports[nr], 0);
    console_reset();
    drain_backends();
}

static const struct h_device device = {
    .num_queues = 2 * (PORTS + 1),
    .num_ops = 7,
    .queue = console_queue,
    .broken = &console.dev.shared.broken,
    .begin = console_begin,
    .start = console_start,
    .reset = console_reset,
    .notify = console_notify,
    .op = console_op,
    .end = console_end,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h_run(&device, data, size);
    return 0;
}
