/* virtio-console with VIRTIO_CONSOLE_F_MULTIPORT (virtio 1.x §5.3), on an I/O thread.
 *
 * Queues: 0/1 are port 0's receive/transmit, 2/3 the control receive/transmit,
 * then 4+2(n-1)/5+2(n-1) port n's.  Guest output (transmit chains) is copied
 * to the port's backend fd by C, non-blocking: what the fd does not take at
 * once waits in a bounded buffer flushed when the fd is writable (EPOLLOUT on
 * the same I/O thread), and what does not fit is dropped and counted.  Chains
 * are always given back at once: Linux's hvc put_chars spins until they are.
 * A port whose backend comes and goes (a socket chardev) keeps its output in
 * that buffer while nobody is connected, for the next client.
 *
 * Host input arrives per chunk from the control plane (svpy_console_input)
 * into a bounded buffer, copied into the guest's receive buffers as they come
 * while the guest has the port open (PORT_OPEN 1 from the driver).
 *
 * Control messages the device sends wait in a small queue until the guest
 * gives control receive buffers. */
#ifndef SVPY_VIRTIO_CONSOLE_H
#define SVPY_VIRTIO_CONSOLE_H

#include <stdint.h>

#include "guest_memory.h"
#include "iothread.h"
#include "virtio_device.h"
#include "virtqueue.h"

#define SVPY_CONSOLE_MAX_PORTS 3
#define SVPY_CONSOLE_MAX_QUEUES (2 * (SVPY_CONSOLE_MAX_PORTS + 1))
#define SVPY_CONSOLE_OUT_BYTES 65536
#define SVPY_CONSOLE_IN_BYTES 65536
#define SVPY_CONSOLE_NAME_BYTES 64
#define SVPY_CONSOLE_CTRL_PENDING 32
#define SVPY_CONSOLE_PASS_MAX_CHAINS 256

#define VIRTIO_CONSOLE_F_SIZE 0
#define VIRTIO_CONSOLE_F_MULTIPORT 1

/* Control events (§5.3.6.2). */
#define VIRTIO_CONSOLE_DEVICE_READY 0
#define VIRTIO_CONSOLE_DEVICE_ADD 1
#define VIRTIO_CONSOLE_DEVICE_REMOVE 2
#define VIRTIO_CONSOLE_PORT_READY 3
#define VIRTIO_CONSOLE_CONSOLE_PORT 4
#define VIRTIO_CONSOLE_RESIZE 5
#define VIRTIO_CONSOLE_PORT_OPEN 6
#define VIRTIO_CONSOLE_PORT_NAME 7

struct svpy_console_counters {
    uint64_t tx_bytes;      /* bytes the guest wrote */
    uint64_t written_bytes; /* of those, written to the backend */
    uint64_t dropped_bytes; /* lost: the buffer was full, or nobody takes output */
    uint64_t rx_bytes;      /* bytes given to the guest */
    uint64_t write_errors;
};

struct svpy_console;

struct svpy_console_port {
    struct svpy_console *console;
    unsigned nr;
    uint8_t present;
    uint8_t is_console;
    uint8_t keep_when_detached; /* no backend now, but one may come: keep output */
    uint8_t guest_ready;         /* the guest sent PORT_READY 1 */
    uint8_t guest_open;          /* the guest's last PORT_OPEN */
    uint8_t host_open;           /* what PORT_OPEN told the guest last */
    uint8_t ready;               /* the backend fd may be written now */
    uint8_t is_socket;
    uint8_t out_watched;
    int fd;
    struct svpy_watch out_watch;
    char name[SVPY_CONSOLE_NAME_BYTES];
    uint32_t out_start, out_len;
    uint32_t in_start, in_len;
    struct svpy_console_counters counters;
    uint8_t out[SVPY_CONSOLE_OUT_BYTES];
    uint8_t in[SVPY_CONSOLE_IN_BYTES];
};

struct svpy_console_ctrl {
    uint32_t id;
    uint16_t event;
    uint16_t value;
};

struct svpy_console {
    struct svpy_device dev; /* first: the generic part */
    struct svpy_virtqueue vqs[SVPY_CONSOLE_MAX_QUEUES];
    struct svpy_iothread *thread;
    unsigned max_nr_ports;
    uint8_t multiport;      /* negotiated */
    uint8_t driver_ready;   /* DEVICE_READY 1 seen */
    uint32_t ctrl_start, ctrl_len;
    struct svpy_console_ctrl ctrl[SVPY_CONSOLE_CTRL_PENDING];
    uint64_t ctrl_dropped;  /* control messages lost: the pending queue was full */
    uint64_t ctrl_received; /* control messages from the guest */
    struct svpy_console_port ports[SVPY_CONSOLE_MAX_PORTS];
    struct svpy_chain chain;
};

/* max_nr_ports in [1, SVPY_CONSOLE_MAX_PORTS]; kick_fds: 2 * (max_nr_ports + 1). */
int svpy_console_init(struct svpy_console *console, const struct svpy_guest_memory *mem,
                      int irqfd, int error_fd, const int *kick_fds, unsigned max_nr_ports);
int svpy_console_attach(struct svpy_console *console, struct svpy_iothread *thread);
/* Declares port nr (before the guest runs). */
int svpy_console_add_port(struct svpy_console *console, unsigned nr, int is_console,
                          int keep_when_detached, const char *name);
/* After the caller activated the queues (lock held). */
void svpy_console_start(struct svpy_console *console, int multiport);
void svpy_console_stop(struct svpy_console *console);
/* The port's backend (lock held, port not ready): fd, or -1 for none. */
void svpy_console_port_attach(struct svpy_console *console, unsigned nr, int fd, int is_socket);
/* Whether the backend may be written now (lock held); false: no write is in flight after. */
void svpy_console_port_set_ready(struct svpy_console *console, unsigned nr, int ready);
/* Host input for port nr (lock held): the bytes taken (the rest did not fit). */
uint32_t svpy_console_input(struct svpy_console *console, unsigned nr, const uint8_t *data,
                            uint32_t len);
/* Queue index of port nr's receive (tx = 0) or transmit (tx = 1) queue. */
unsigned svpy_console_port_queue(unsigned nr, int tx);
void svpy_console_destroy(struct svpy_console *console);

#endif
