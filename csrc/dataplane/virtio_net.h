/* virtio-net frames (virtio 1.x §5.1) between a guest and a tap, on an I/O thread.
 *
 * Queue 0 receives (tap -> guest), queue 1 transmits (guest -> tap).  The tap
 * carries a 12-byte virtio_net_hdr_v1 (IFF_VNET_HDR, TUNSETVNETHDRSZ), the
 * same header the guest uses, so offload metadata passes through unchanged.
 *
 * Back-pressure both ways, with no busy loop and nothing dropped that the
 * guest gave us: when the guest has no receive buffers the tap is not read
 * (its watch loses EPOLLIN until the guest posts buffers); when the tap
 * cannot take a frame, the chain goes back to the queue and the tap is
 * watched for EPOLLOUT. */
#ifndef SVPY_VIRTIO_NET_H
#define SVPY_VIRTIO_NET_H

#include <stdint.h>

#include "guest_memory.h"
#include "iothread.h"
#include "virtio_device.h"
#include "virtqueue.h"

#define SVPY_NET_RX_QUEUE 0
#define SVPY_NET_TX_QUEUE 1
/* struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
 * csum_offset, num_buffers. */
#define SVPY_NET_HDR_BYTES 12
#define SVPY_NET_HDR_NUM_BUFFERS 10
/* The largest frame either way: a 64 KiB GSO packet, its Ethernet header and
 * the virtio-net header. */
#define SVPY_NET_MAX_FRAME (SVPY_NET_HDR_BYTES + 14 + 65535)
/* Frames moved per pass per direction before the pass re-queues itself, so
 * that one busy NIC cannot hold the I/O thread (and the disks) for long. */
#define SVPY_NET_PASS_MAX_FRAMES 256
/* A merged receive never spreads over more buffers than this (the guest's
 * buffers are at least a page with MRG_RXBUF; 64 KiB needs 17). */
#define SVPY_NET_MAX_RX_BUFFERS 64

struct svpy_net_stats {
    uint64_t rx_frames;
    uint64_t rx_bytes;
    uint64_t tx_frames;
    uint64_t tx_bytes;
    uint64_t rx_dropped;  /* frames no guest buffer could hold (too small, no MRG_RXBUF) */
    uint64_t tx_errors;   /* frames the tap refused, or malformed (too short or too long) */
    uint64_t tx_dropped;  /* frames sent while no tap is attached (link down) */
    uint64_t rx_stalls;   /* times the tap stopped being read: no guest buffers */
    uint64_t tx_stalls;   /* times the tap was full and the transmit queue waited */
    uint64_t yields;      /* passes that stopped at their budget and re-queued */
};

struct svpy_net {
    struct svpy_device dev; /* first: the generic part */
    struct svpy_virtqueue rxq;
    struct svpy_virtqueue txq;
    uint8_t mrg_rxbuf; /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    /* The tap (O_NONBLOCK) or -1 for an empty slot (link down). */
    int tap_fd;
    struct svpy_watch tap_watch;
    struct svpy_iothread *thread;
    uint32_t tap_events;   /* what the tap is watched for now */
    uint8_t tap_lost;      /* the tap's interface went away: no longer watched */
    uint8_t rx_waiting;    /* the tap is not read until the guest posts receive buffers */
    uint8_t tx_waiting;    /* a frame waits for the tap to take it (EPOLLOUT) */
    uint32_t pending_len;  /* a frame read from the tap and not yet delivered */
    struct svpy_net_stats stats;
    struct svpy_chain chain;
    uint8_t frame[SVPY_NET_MAX_FRAME];
};

int svpy_net_init(struct svpy_net *net, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds);
int svpy_net_attach(struct svpy_net *net, struct svpy_iothread *thread);
/* The driver set DRIVER_OK (queues activated by the caller) or was reset; lock held. */
void svpy_net_start(struct svpy_net *net);
void svpy_net_stop(struct svpy_net *net);
/* Attaches a tap (fd >= 0) or detaches it (-1); lock held.  0 or -errno. */
int svpy_net_set_tap(struct svpy_net *net, int fd);
void svpy_net_destroy(struct svpy_net *net);

#endif
