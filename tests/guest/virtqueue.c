/* Split virtqueue, driver side. */
#include "virtqueue.h"

#include "guestmem.h"
#include "io.h"

void vq_init(struct virtq *vq, void *page, uint16_t size, bool event_idx)
{
    uintptr_t base = (uintptr_t)page;
    mem_fill(page, 0, VQ_PAGE_SIZE);
    *vq = (struct virtq){ .size = size, .event_idx = event_idx, .page = base };
    vq->desc = (struct vq_desc *)(base + VQ_DESC_OFFSET);
    vq->avail_flags = (volatile uint16_t *)(base + VQ_AVAIL_OFFSET);
    vq->avail_idx = vq->avail_flags + 1;
    vq->avail_ring = vq->avail_flags + 2;
    vq->used_event = vq->avail_ring + size;
    vq->used_flags = (volatile uint16_t *)(base + VQ_USED_OFFSET);
    vq->used_idx = vq->used_flags + 1;
    vq->used_ring = (volatile struct vq_used_elem *)(base + VQ_USED_OFFSET + 4);
    vq->avail_event = (volatile uint16_t *)(base + VQ_USED_OFFSET + 4 + 8u * size);
    for (uint16_t i = 0; i < size; i++)
        vq->desc[i].next = (uint16_t)(i + 1);
    vq->free_head = 0;
    vq->num_free = size;
}

int vq_add(struct virtq *vq, const struct vq_buf *bufs, unsigned n, struct vq_desc *indirect)
{
    unsigned needed = indirect ? 1 : n;
    if (n == 0 || needed > vq->num_free)
        return -1;
    struct vq_desc *table = indirect ? indirect : vq->desc;
    uint16_t head = vq->free_head;
    uint16_t idx = head;           /* index in vq->desc when direct */
    for (unsigned i = 0; i < n; i++) {
        unsigned slot = indirect ? i : idx;
        struct vq_desc *d = &table[slot];
        uint16_t following = indirect ? (uint16_t)(i + 1) : d->next; /* free-list link */
        d->addr = bufs[i].addr;
        d->len = bufs[i].len;
        d->flags = (uint16_t)((bufs[i].write ? VQ_DESC_F_WRITE : 0) |
                              (i + 1 < n ? VQ_DESC_F_NEXT : 0));
        d->next = i + 1 < n ? following : 0;
        if (!indirect && i + 1 < n)
            idx = following;
        else if (!indirect)
            vq->free_head = following;
    }
    if (indirect) {
        struct vq_desc *d = &vq->desc[head];
        vq->free_head = d->next;
        d->addr = (uintptr_t)indirect;
        d->len = (uint32_t)(n * sizeof(struct vq_desc));
        d->flags = VQ_DESC_F_INDIRECT;
        d->next = 0;
    }
    vq->num_free = (uint16_t)(vq->num_free - needed);
    vq->chain_len[head] = (uint16_t)needed;
    return head;
}

void vq_publish(struct virtq *vq, uint16_t head)
{
    vq->avail_ring[vq->next_avail % vq->size] = head;
    barrier(); /* x86: stores are not reordered with older stores */
    vq->next_avail++;
    *vq->avail_idx = vq->next_avail;
}

bool vq_kick_needed(struct virtq *vq)
{
    mb(); /* the avail idx store before the avail_event / flags load */
    uint16_t old = vq->last_kick, now = vq->next_avail;
    vq->last_kick = now;
    bool needed;
    if (vq->event_idx)
        needed = (uint16_t)(now - *vq->avail_event - 1) < (uint16_t)(now - old);
    else
        needed = !(*vq->used_flags & VQ_USED_F_NO_NOTIFY);
    if (needed)
        vq->kicks++;
    else
        vq->kicks_suppressed++;
    return needed;
}

bool vq_pop_used(struct virtq *vq, uint32_t *id, uint32_t *len)
{
    if (*vq->used_idx == vq->last_used)
        return false;
    barrier(); /* x86: loads are not reordered with older loads */
    volatile struct vq_used_elem *e = &vq->used_ring[vq->last_used % vq->size];
    *id = e->id;
    *len = e->len;
    vq->last_used++;
    if (vq->event_idx) {
        *vq->used_event = vq->last_used;
        mb();
    }
    return true;
}

void vq_free(struct virtq *vq, uint16_t head)
{
    uint16_t n = vq->chain_len[head];
    uint16_t last = head;
    for (uint16_t i = 1; i < n; i++)
        last = vq->desc[last].next;
    vq->desc[last].next = vq->free_head;
    vq->free_head = head;
    vq->num_free = (uint16_t)(vq->num_free + n);
    vq->chain_len[head] = 0;
}
