#include "virtqueue.h"

#include <stddef.h>
#include <string.h>

/* Fields shared with the guest are read once each, through these, so that a
 * value checked is the value used (the guest may change memory at any time). */
#define READ_ONCE(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define WRITE_ONCE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

static const char *const error_names[] = {
    [SVPY_VQ_OK] = "ok",
    [SVPY_VQ_ERR_RING_ADDRESS] = "virtqueue ring outside guest RAM or misaligned",
    [SVPY_VQ_ERR_AVAIL_IDX] = "available index moved by more than the queue size",
    [SVPY_VQ_ERR_HEAD_INDEX] = "available ring entry beyond the queue size",
    [SVPY_VQ_ERR_NEXT_INDEX] = "descriptor 'next' beyond the table",
    [SVPY_VQ_ERR_CHAIN_TOO_LONG] = "descriptor chain loops or is too long",
    [SVPY_VQ_ERR_BUFFER_ADDRESS] = "buffer outside guest RAM",
    [SVPY_VQ_ERR_INDIRECT] = "malformed indirect descriptor table",
    [SVPY_VQ_ERR_ORDER] = "device-readable descriptor after a device-writable one",
    [SVPY_VQ_ERR_REQUEST] = "malformed request",
};

const char *svpy_vq_error_name(int error)
{
    if (error < 0)
        error = -error;
    if (error >= (int)(sizeof(error_names) / sizeof(error_names[0])) || !error_names[error])
        return "unknown error";
    return error_names[error];
}

int svpy_vq_activate(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem)
{
    uint64_t size = vq->size;

    vq->active = 0;
    if (size == 0 || size > SVPY_VQ_MAX_SIZE || (size & (size - 1)))
        return SVPY_VQ_ERR_RING_ADDRESS;
    /* Alignment from §2.7: descriptors 16, available ring 2, used ring 4. */
    if ((vq->desc_gpa & 15) || (vq->avail_gpa & 1) || (vq->used_gpa & 3))
        return SVPY_VQ_ERR_RING_ADDRESS;
    vq->desc = svpy_translate(mem, vq->desc_gpa, size * sizeof(struct virtq_desc));
    vq->avail = svpy_translate(mem, vq->avail_gpa, 6 + 2 * size);
    vq->used = svpy_translate(mem, vq->used_gpa, 6 + 8 * size);
    if (!vq->desc || !vq->avail || !vq->used)
        return SVPY_VQ_ERR_RING_ADDRESS;
    /* The device writes the used ring and reads the available one: were they
     * to overlap, its own writes would move the index it reads (used->flags
     * over avail->idx flips it on every disable/enable of notifications, and
     * a pass would never end, holding the device lock and the I/O thread). */
    if ((uint8_t *)vq->used < (uint8_t *)vq->avail + 6 + 2 * size &&
        (uint8_t *)vq->avail < (uint8_t *)vq->used + 6 + 8 * size)
        return SVPY_VQ_ERR_RING_ADDRESS;
    vq->last_avail_idx = 0;
    vq->used_idx = 0;
    vq->signalled_used = 0;
    vq->signalled_used_valid = 0;
    vq->active = 1;
    return SVPY_VQ_OK;
}

void svpy_vq_deactivate(struct svpy_virtqueue *vq)
{
    vq->active = 0;
    vq->desc = NULL;
    vq->avail = NULL;
    vq->used = NULL;
}

/* Appends one descriptor's buffer to the chain, enforcing the order rule. */
static int add_buffer(struct svpy_chain *chain, const struct svpy_guest_memory *mem,
                      uint64_t addr, uint32_t len, uint16_t flags, unsigned *segments)
{
    void *host;

    if (++*segments > SVPY_CHAIN_MAX_SEGMENTS)
        return -SVPY_VQ_ERR_CHAIN_TOO_LONG;
    if (len == 0)
        return 0;
    host = svpy_translate(mem, addr, len);
    if (!host)
        return -SVPY_VQ_ERR_BUFFER_ADDRESS;
    if (flags & VIRTQ_DESC_F_WRITE) {
        chain->iov[chain->readable + chain->writable].iov_base = host;
        chain->iov[chain->readable + chain->writable].iov_len = len;
        chain->writable++;
        chain->writable_bytes += len;
    } else {
        if (chain->writable)
            return -SVPY_VQ_ERR_ORDER;
        chain->iov[chain->readable].iov_base = host;
        chain->iov[chain->readable].iov_len = len;
        chain->readable++;
        chain->readable_bytes += len;
    }
    return 0;
}

/* Copies one descriptor out of guest memory.  Indirect tables may sit at any
 * address (the spec asks no alignment of them), so this copies bytes instead
 * of dereferencing a struct pointer; the barrier keeps the compiler from
 * reading guest memory again later in place of the copy (read once). */
static void read_desc(const uint8_t *slot, struct virtq_desc *desc)
{
    memcpy(desc, slot, sizeof(*desc));
    __asm__ __volatile__("" ::: "memory");
}

/* Walks an indirect table: its own index space, no nesting, bounded length. */
static int walk_indirect(struct svpy_chain *chain, const struct svpy_guest_memory *mem,
                         uint64_t table_gpa, uint32_t table_len, unsigned *segments)
{
    const uint8_t *table;
    uint32_t count, index = 0, steps = 0;

    if (table_len == 0 || table_len % sizeof(struct virtq_desc))
        return -SVPY_VQ_ERR_INDIRECT;
    count = table_len / sizeof(struct virtq_desc);
    if (count > SVPY_CHAIN_MAX_SEGMENTS)
        return -SVPY_VQ_ERR_INDIRECT;
    table = svpy_translate(mem, table_gpa, table_len);
    if (!table)
        return -SVPY_VQ_ERR_INDIRECT;
    for (;;) {
        struct virtq_desc desc;
        int ret;

        read_desc(table + (size_t)index * sizeof(desc), &desc);
        if (desc.flags & VIRTQ_DESC_F_INDIRECT)
            return -SVPY_VQ_ERR_INDIRECT;
        ret = add_buffer(chain, mem, desc.addr, desc.len, desc.flags, segments);
        if (ret)
            return ret;
        if (!(desc.flags & VIRTQ_DESC_F_NEXT))
            return 0;
        if (++steps >= count)
            return -SVPY_VQ_ERR_CHAIN_TOO_LONG;
        if (desc.next >= count)
            return -SVPY_VQ_ERR_NEXT_INDEX;
        index = desc.next;
    }
}

int svpy_vq_pop(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem,
                struct svpy_chain *chain)
{
    uint16_t avail_idx, head, index;
    unsigned segments = 0, steps = 0;

    if (!vq->active)
        return 0;
    /* Acquire: the ring entry and descriptors are read after the index. */
    avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    if (avail_idx == vq->last_avail_idx)
        return 0;
    if ((uint16_t)(avail_idx - vq->last_avail_idx) > vq->size)
        return -SVPY_VQ_ERR_AVAIL_IDX;
    head = READ_ONCE(vq->avail->ring[vq->last_avail_idx % vq->size]);
    if (head >= vq->size)
        return -SVPY_VQ_ERR_HEAD_INDEX;

    chain->head = head;
    chain->readable = chain->writable = 0;
    chain->readable_bytes = chain->writable_bytes = 0;
    index = head;
    for (;;) {
        struct virtq_desc desc;
        int ret;

        read_desc((const uint8_t *)&vq->desc[index], &desc);
        if (desc.flags & VIRTQ_DESC_F_INDIRECT) {
            /* An indirect descriptor must be the chain's only one (§2.7.5.3). */
            if (!vq->indirect || (desc.flags & VIRTQ_DESC_F_NEXT) || steps)
                return -SVPY_VQ_ERR_INDIRECT;
            ret = walk_indirect(chain, mem, desc.addr, desc.len, &segments);
            if (ret)
                return ret;
            break;
        }
        ret = add_buffer(chain, mem, desc.addr, desc.len, desc.flags, &segments);
        if (ret)
            return ret;
        if (!(desc.flags & VIRTQ_DESC_F_NEXT))
            break;
        /* A chain longer than the queue must contain a loop. */
        if (++steps >= vq->size)
            return -SVPY_VQ_ERR_CHAIN_TOO_LONG;
        if (desc.next >= vq->size)
            return -SVPY_VQ_ERR_NEXT_INDEX;
        index = desc.next;
    }
    vq->last_avail_idx++;
    return 1;
}

void svpy_vq_push(struct svpy_virtqueue *vq, uint16_t head, uint32_t written)
{
    struct virtq_used_elem *elem = &vq->used->ring[vq->used_idx % vq->size];

    WRITE_ONCE(elem->id, head);
    WRITE_ONCE(elem->len, written);
    vq->used_idx++;
    /* Release: the element is visible before the index that publishes it. */
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

void svpy_vq_unpop(struct svpy_virtqueue *vq, uint16_t count)
{
    vq->last_avail_idx -= count;
}

void svpy_vq_fill(struct svpy_virtqueue *vq, uint16_t offset, uint16_t head, uint32_t written)
{
    struct virtq_used_elem *elem = &vq->used->ring[(uint16_t)(vq->used_idx + offset) % vq->size];

    WRITE_ONCE(elem->id, head);
    WRITE_ONCE(elem->len, written);
}

void svpy_vq_flush(struct svpy_virtqueue *vq, uint16_t count)
{
    vq->used_idx += count;
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

static uint16_t *avail_event(struct svpy_virtqueue *vq)
{
    return (uint16_t *)&vq->used->ring[vq->size];
}

static uint16_t *used_event(struct svpy_virtqueue *vq)
{
    return &vq->avail->ring[vq->size];
}

void svpy_vq_disable_notify(struct svpy_virtqueue *vq)
{
    /* With EVENT_IDX the driver notifies only when it passes avail_event,
     * which stays behind while we work; without it, the flag says so. */
    if (!vq->active || vq->event_idx)
        return;
    WRITE_ONCE(vq->used->flags, READ_ONCE(vq->used->flags) | VIRTQ_USED_F_NO_NOTIFY);
}

bool svpy_vq_enable_notify_after(struct svpy_virtqueue *vq, uint16_t seen)
{
    if (!vq->active)
        return false;
    if (vq->event_idx)
        WRITE_ONCE(*avail_event(vq), seen);
    else
        WRITE_ONCE(vq->used->flags, READ_ONCE(vq->used->flags) & ~VIRTQ_USED_F_NO_NOTIFY);
    /* Full barrier: publish the above before looking for buffers the driver
     * added without notifying (it saw notifications still disabled). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE) != seen;
}

bool svpy_vq_enable_notify(struct svpy_virtqueue *vq)
{
    return svpy_vq_enable_notify_after(vq, vq->last_avail_idx);
}

uint16_t svpy_vq_avail_idx(struct svpy_virtqueue *vq)
{
    return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
}

bool svpy_vq_should_interrupt(struct svpy_virtqueue *vq)
{
    uint16_t old, new_idx, event;
    bool valid;

    if (!vq->active)
        return false;
    /* Order our used-ring writes before reading the driver's suppression state. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vq->event_idx)
        return !(READ_ONCE(vq->avail->flags) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    old = vq->signalled_used;
    valid = vq->signalled_used_valid;
    new_idx = vq->used_idx;
    event = READ_ONCE(*used_event(vq));
    vq->signalled_used = new_idx;
    vq->signalled_used_valid = 1;
    /* vring_need_event(): interrupt if used_event lies in (old, new]. */
    return !valid || (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}
