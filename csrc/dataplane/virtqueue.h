/* Split virtqueues (virtio 1.x §2.7), device side, with every guest-controlled
 * value checked: ring addresses, descriptor indices, buffer ranges, chain
 * length, indirect tables and the readable-before-writable order.  A chain
 * that breaks a rule is an error for the device, never a host crash. */
#ifndef SVPY_VIRTQUEUE_H
#define SVPY_VIRTQUEUE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_memory.h"

#define SVPY_VQ_MAX_SIZE 1024
/* Longest chain accepted, indirect tables included. */
#define SVPY_CHAIN_MAX_SEGMENTS 1024

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* then used_event */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[]; /* then avail_event */
};

/* Why a chain or queue was refused; also reported to the control plane. */
enum svpy_vq_error {
    SVPY_VQ_OK = 0,
    SVPY_VQ_ERR_RING_ADDRESS = 1,   /* ring not in guest RAM, misaligned, or used over avail */
    SVPY_VQ_ERR_AVAIL_IDX = 2,      /* avail idx moved by more than the queue size */
    SVPY_VQ_ERR_HEAD_INDEX = 3,     /* avail ring entry >= queue size */
    SVPY_VQ_ERR_NEXT_INDEX = 4,     /* next >= queue (or table) size */
    SVPY_VQ_ERR_CHAIN_TOO_LONG = 5, /* a loop, or longer than allowed */
    SVPY_VQ_ERR_BUFFER_ADDRESS = 6, /* buffer not wholly inside guest RAM */
    SVPY_VQ_ERR_INDIRECT = 7,       /* bad indirect table, or indirect not negotiated */
    SVPY_VQ_ERR_ORDER = 8,          /* device-readable after device-writable */
    SVPY_VQ_ERR_REQUEST = 9,        /* the device could not parse the request */
};

struct svpy_virtqueue {
    /* Set by the transport before activation. */
    uint16_t size;
    uint8_t event_idx;
    uint8_t indirect;
    uint64_t desc_gpa;
    uint64_t avail_gpa;
    uint64_t used_gpa;
    /* Run-time state. */
    uint8_t active;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;
    uint8_t signalled_used_valid;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
};

struct svpy_chain {
    uint16_t head;
    uint16_t readable;  /* iov[0..readable) are device-readable */
    uint16_t writable;  /* then this many device-writable */
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    struct iovec iov[SVPY_CHAIN_MAX_SEGMENTS];
};

/* Resolves the rings; returns SVPY_VQ_OK or SVPY_VQ_ERR_RING_ADDRESS. */
int svpy_vq_activate(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem);
void svpy_vq_deactivate(struct svpy_virtqueue *vq);

/* 1: a chain was popped into *chain; 0: nothing available; <0: -svpy_vq_error. */
int svpy_vq_pop(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem,
                struct svpy_chain *chain);
void svpy_vq_push(struct svpy_virtqueue *vq, uint16_t head, uint32_t written);
/* Gives back the last `count` chains popped, unanswered: the next pops return
 * them again (a device that cannot use them yet, e.g. a full tap). */
void svpy_vq_unpop(struct svpy_virtqueue *vq, uint16_t count);
/* Several used elements published at once (a received frame spread over
 * several buffers must appear whole): fill each, then flush them all. */
void svpy_vq_fill(struct svpy_virtqueue *vq, uint16_t offset, uint16_t head, uint32_t written);
void svpy_vq_flush(struct svpy_virtqueue *vq, uint16_t count);

/* Notification suppression, both directions (VIRTIO_F_EVENT_IDX or flags). */
void svpy_vq_disable_notify(struct svpy_virtqueue *vq);
/* Re-enables notifications; true if more buffers arrived meanwhile. */
bool svpy_vq_enable_notify(struct svpy_virtqueue *vq);
/* The driver's available index now (acquire). */
uint16_t svpy_vq_avail_idx(struct svpy_virtqueue *vq);
/* Asks for a notification when the driver makes available anything past
 * `seen` (a device that popped buffers, found them too few and gave them
 * back); true if it already has. */
bool svpy_vq_enable_notify_after(struct svpy_virtqueue *vq, uint16_t seen);
bool svpy_vq_should_interrupt(struct svpy_virtqueue *vq);

const char *svpy_vq_error_name(int error);

#endif
