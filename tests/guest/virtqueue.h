/*
 * Split virtqueue, driver side (virtio 1.x, section 2.7), for a polling driver.
 *
 * One 4 KiB page holds the three parts for up to VQ_MAX_SIZE entries:
 *   descriptor table at +0x000 (16 bytes per entry, 16-aligned)
 *   driver area (avail) at +0x400: flags, idx, ring[size], used_event
 *   device area (used)  at +0x800: flags, idx, ring[size] {id, len}, avail_event
 * Free descriptors are linked through their next fields.  The driver asks for an
 * interrupt on every completion (avail flags 0, or used_event = last seen used idx
 * with VIRTIO_F_EVENT_IDX) and notifies as the device asks (used flags
 * NO_NOTIFY, or avail_event with VIRTIO_F_EVENT_IDX).
 */
#ifndef SVTEST_VIRTQUEUE_H
#define SVTEST_VIRTQUEUE_H

#include <stdbool.h>
#include <stdint.h>

#define VQ_MAX_SIZE 64
#define VQ_PAGE_SIZE 4096
#define VQ_DESC_OFFSET 0x000
#define VQ_AVAIL_OFFSET 0x400
#define VQ_USED_OFFSET 0x800

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4

#define VQ_AVAIL_F_NO_INTERRUPT 1
#define VQ_USED_F_NO_NOTIFY 1

struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vq_used_elem {
    uint32_t id;
    uint32_t len;
};

/* One buffer of a chain: guest-physical address, length, device-writable or not. */
struct vq_buf {
    uint64_t addr;
    uint32_t len;
    bool write;
};

struct virtq {
    uint16_t size;
    bool event_idx;
    uintptr_t page;

    struct vq_desc *desc;
    volatile uint16_t *avail_flags, *avail_idx, *avail_ring, *used_event;
    volatile uint16_t *used_flags, *used_idx, *avail_event;
    volatile struct vq_used_elem *used_ring;

    uint16_t next_avail; /* the value avail->idx takes at the next publish */
    uint16_t last_used;  /* used entries consumed so far */
    uint16_t last_kick;  /* avail idx when notification was last considered */
    uint16_t free_head;
    uint16_t num_free;
    uint16_t chain_len[VQ_MAX_SIZE]; /* descriptors held by the chain with this head */

    unsigned kicks;            /* notifications the driver sent */
    unsigned kicks_suppressed; /* and those the device's flags/avail_event made it skip */
};

/* Zeroes the page, links all descriptors into the free list. size <= VQ_MAX_SIZE. */
void vq_init(struct virtq *vq, void *page, uint16_t size, bool event_idx);

static inline uint64_t vq_desc_addr(const struct virtq *vq)
{
    return vq->page + VQ_DESC_OFFSET;
}
static inline uint64_t vq_driver_addr(const struct virtq *vq)
{
    return vq->page + VQ_AVAIL_OFFSET;
}
static inline uint64_t vq_device_addr(const struct virtq *vq)
{
    return vq->page + VQ_USED_OFFSET;
}

/*
 * Builds a chain from n buffers.  With indirect != NULL the buffers go into that
 * table (n entries, 16-byte aligned, in RAM) and the ring holds one descriptor
 * pointing at it.  Returns the head index, or -1 when the ring has too few free
 * descriptors.  Nothing is published yet.
 */
int vq_add(struct virtq *vq, const struct vq_buf *bufs, unsigned n, struct vq_desc *indirect);

/* Puts head into the avail ring and advances avail->idx (with the barrier before). */
void vq_publish(struct virtq *vq, uint16_t head);

/*
 * After publishing: whether the device wants a notification for what was
 * published since the last call (and counts kicks / suppressed kicks).
 */
bool vq_kick_needed(struct virtq *vq);

/* The device's used idx (one memory read). */
static inline uint16_t vq_used_idx(const struct virtq *vq)
{
    return *vq->used_idx;
}

/*
 * Takes the next used element, if any: returns true with its id and len, and
 * (with EVENT_IDX) moves used_event along so the next completion interrupts too.
 */
bool vq_pop_used(struct virtq *vq, uint32_t *id, uint32_t *len);

/* Returns the chain starting at head to the free list. */
void vq_free(struct virtq *vq, uint16_t head);

#endif
