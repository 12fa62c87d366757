/*
 * virtio-net driver (virtio 1.x, section 5.1) over virtio-mmio v2, polled.
 *
 * Queue 0 receives, queue 1 transmits; no control queue, one queue pair.  Every
 * buffer is one descriptor that never changes: descriptor i of a queue always
 * names buffer i (NET_BUF_SIZE bytes) of that queue, device-writable on rx.
 * A tx buffer holds the 12-byte virtio_net_hdr_v1 (zero: no offload) followed by
 * the frame; an rx buffer receives the header (num_buffers tells how many
 * buffers the frame spans with MRG_RXBUF) and the frame.  Posting a buffer is
 * putting its index into the avail ring; the used id names it again.
 */
#ifndef SVTEST_VIRTIO_NET_H
#define SVTEST_VIRTIO_NET_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_mmio.h"
#include "virtqueue.h"

/* Feature bits (5.1.3). */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_GUEST_TSO4 7
#define VIRTIO_NET_F_GUEST_TSO6 8
#define VIRTIO_NET_F_GUEST_ECN 9
#define VIRTIO_NET_F_GUEST_UFO 10
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_HOST_TSO6 12
#define VIRTIO_NET_F_HOST_ECN 13
#define VIRTIO_NET_F_HOST_UFO 14
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_F_CTRL_VQ 17

/* Config space (struct virtio_net_config). */
#define VIRTIO_NET_CFG_MAC 0     /* u8[6] */
#define VIRTIO_NET_CFG_STATUS 6  /* le16 */
#define VIRTIO_NET_CFG_MTU 10    /* le16 */
#define VIRTIO_NET_S_LINK_UP 1

#define NET_HDR_LEN 12 /* struct virtio_net_hdr_v1 */
#define NET_BUF_SIZE 2048
#define NET_MAX_FRAME (NET_BUF_SIZE - NET_HDR_LEN) /* what one tx buffer carries */
#define NET_ETH_HLEN 14
#define NET_QUEUE_SIZE 64 /* QueueNum asked for (less when QueueNumMax is less) */
#define NET_RXQ 0
#define NET_TXQ 1
#define NET_MAX_OPEN 2 /* NICs open at once (each has its own rings and buffers) */

/* net_* results that are not a count. */
#define NET_ERR_TIMEOUT (-1)
#define NET_ERR_BROKEN (-2) /* DEVICE_NEEDS_RESET */
#define NET_ERR_BAD_ID (-3) /* a used element named a buffer that was not posted */
#define NET_ERR_BAD_LEN (-4) /* an rx used length below the header, or beyond the buffer */

struct virtio_net_hdr_v1 {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

struct net_options {
    bool event_idx;      /* accept VIRTIO_F_EVENT_IDX when offered */
    bool indirect;       /* accept VIRTIO_F_INDIRECT_DESC when offered */
    bool mrg_rxbuf;      /* accept VIRTIO_NET_F_MRG_RXBUF when offered */
    bool offload;        /* accept CSUM, GUEST_CSUM, the TSO/ECN/UFO bits when offered */
    bool irq;            /* ask for an interrupt per completion (else suppress them) */
    uint16_t queue_size; /* per queue, at most VQ_MAX_SIZE */
    unsigned timeout_ms; /* per wait */
};

struct net_dev {
    const struct virtio_mmio_dev *mmio;
    unsigned nic;  /* index among the net devices of the command line */
    unsigned slot; /* which of the NET_MAX_OPEN memory sets it uses */
    struct virtq rx, tx;
    uint8_t *rxbuf, *txbuf; /* queue size * NET_BUF_SIZE each */
    uint64_t offered, accepted;
    uint16_t rx_num_max, tx_num_max;
    bool mrg_rxbuf, irq;
    uint8_t mac[6];
    unsigned timeout_ms;

    uint16_t tx_free[VQ_MAX_SIZE]; /* stack of idle tx buffers */
    uint16_t tx_free_count;
    bool rx_posted[VQ_MAX_SIZE];
    bool tx_busy[VQ_MAX_SIZE];

    /* statistics */
    unsigned frames_sent, frames_received, rx_buffers_used;
    unsigned irq_seen; /* rounds after which InterruptStatus bit 0 was set */
    unsigned config_irqs;
};

extern const struct net_options net_default_options;

/* Fills opts from the command line (svtest.event_idx, indirect, mrg_rxbuf, offload, ...). */
void net_options_from_cmdline(struct net_options *opts);

/* The virtio_mmio.device= index of net device number nic, or -1 (devices must be discovered). */
int net_find(unsigned nic, unsigned *count);

/*
 * Full initialisation (3.1.1) of device index mmio_index as NIC nic, with memory
 * set slot: reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 required; MAC, STATUS,
 * MRG_RXBUF, EVENT_IDX, INDIRECT_DESC and the offloads per options), FEATURES_OK,
 * MAC from config space, queues 0 and 1, DRIVER_OK.  No rx buffer is posted.
 * Returns NULL or what failed.
 */
const char *net_init(struct net_dev *n, const struct virtio_mmio_dev *m, unsigned nic,
                     unsigned slot, const struct net_options *opts);

/* The config status field (VIRTIO_NET_S_LINK_UP when STATUS was not offered). */
uint16_t net_link_status(const struct net_dev *n);

/* Posts every idle rx buffer and notifies when the device asks. Returns how many. */
unsigned net_post_rx(struct net_dev *n);

/* Re-posts rx buffer id (no notification). */
void net_repost_rx(struct net_dev *n, uint16_t id);

/* Notifies queue q when the device asks for it. */
void net_kick(struct net_dev *n, unsigned q);

/* The payload area of an idle tx buffer, or NULL when none is idle; then net_queue_tx(). */
uint8_t *net_tx_frame(struct net_dev *n, uint16_t *id);

/* Queues tx buffer id with a frame of len bytes (no notification). */
void net_queue_tx(struct net_dev *n, uint16_t id, uint32_t len);

/* Takes back completed tx buffers. Returns how many, or an NET_ERR_* value. */
int net_reap_tx(struct net_dev *n);

/* Waits until at least want tx buffers are idle (reaping): 0 or NET_ERR_*. */
int net_wait_tx_free(struct net_dev *n, unsigned want);

/* Waits until every tx buffer is idle again: 0 or NET_ERR_*. */
static inline int net_wait_tx(struct net_dev *n)
{
    return net_wait_tx_free(n, n->tx.size);
}

/*
 * Waits for one received frame and copies it (without the virtio header, all its
 * buffers gathered) into out (room for size bytes; longer frames are cut, *len is the
 * full length).  The buffers go back to the device.  Returns 0 or NET_ERR_*; with
 * timeout_ms 0 the device's default time-out applies.
 */
int net_recv(struct net_dev *n, uint8_t *out, uint32_t size, uint32_t *len, unsigned timeout_ms);

/* Reads and acknowledges InterruptStatus; counts config interrupts. */
uint32_t net_ack_interrupts(struct net_dev *n);

/* "timeout", "needs-reset", ... for a NET_ERR_* value. */
const char *net_result_name(int result);

/* "xx:xx:xx:xx:xx:xx" into out[18]. */
void net_format_mac(const uint8_t mac[6], char out[18]);

#endif
