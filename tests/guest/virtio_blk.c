/* virtio-blk driver over virtio-mmio: initialisation, requests, polling. */
#include "virtio_blk.h"

#include "guestmem.h"
#include "io.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define RESET_TIMEOUT_MS 200
/* Device status is read (one VM exit) this often while waiting for completions. */
#define STATUS_POLL_US 10000
/* After a completion, InterruptStatus is read up to this many times, this far apart. */
#define ISR_READS 5
#define ISR_READ_GAP_US 20

/* Ring memory of the one queue driven at a time. */
static uint8_t queue_page[VQ_PAGE_SIZE] __attribute__((aligned(VQ_PAGE_SIZE))) NOINIT;
/* The request blk_do() and blk_get_id() use: static, so a late completion cannot hit a stack. */
static struct blk_req single_req NOINIT;
static uint8_t id_buf[VIRTIO_BLK_ID_BYTES] __attribute__((aligned(64))) NOINIT;

uint32_t blk_device_id(const struct virtio_mmio_dev *m)
{
    return vm_read(m, VIRTIO_MMIO_DEVICE_ID);
}

void blk_read_config(struct blk_dev *b)
{
    const struct virtio_mmio_dev *m = b->mmio;
    b->capacity = vm_config64(m, VIRTIO_BLK_CFG_CAPACITY, &b->generation);
    b->size_max = vm_config32(m, VIRTIO_BLK_CFG_SIZE_MAX);
    b->seg_max = vm_config32(m, VIRTIO_BLK_CFG_SEG_MAX);
    b->blk_size = vm_config32(m, VIRTIO_BLK_CFG_BLK_SIZE);
}

const char *blk_init(struct blk_dev *b, const struct virtio_mmio_dev *m,
                     const struct blk_options *opts)
{
    memset(b, 0, sizeof(*b));
    b->mmio = m;
    b->timeout_ms = opts->timeout_ms ? opts->timeout_ms : 5000;
    const char *why = vm_init_begin(m, VIRTIO_ID_BLOCK, "block", RESET_TIMEOUT_MS);
    if (why)
        return why;

    b->offered = vm_device_features(m);
    if (!(b->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1)))
        return vm_init_fail(m, "no-version-1");
    uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) |
                      VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX) |
                      VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE) | VIRTIO_BIT(VIRTIO_BLK_F_RO) |
                      VIRTIO_BIT(VIRTIO_BLK_F_GEOMETRY) | VIRTIO_BIT(VIRTIO_BLK_F_TOPOLOGY);
    if (opts->event_idx)
        wanted |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    if (opts->indirect)
        wanted |= VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
    if (opts->discard)
        wanted |= VIRTIO_BIT(VIRTIO_BLK_F_DISCARD) | VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES);
    b->accepted = b->offered & wanted;
    why = vm_init_features(m, b->accepted);
    if (why)
        return why;

    b->event_idx = b->accepted & VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    b->indirect = b->accepted & VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
    b->ro = b->accepted & VIRTIO_BIT(VIRTIO_BLK_F_RO);
    b->flush = b->accepted & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH);
    blk_read_config(b);

    vm_write(m, VIRTIO_MMIO_QUEUE_SEL, 0);
    b->queue_num_max = (uint16_t)vm_read(m, VIRTIO_MMIO_QUEUE_NUM_MAX);
    uint16_t num = opts->queue_size ? opts->queue_size : BLK_QUEUE_SIZE;
    if (num > VQ_MAX_SIZE)
        num = VQ_MAX_SIZE;
    if (b->queue_num_max && num > b->queue_num_max)
        num = b->queue_num_max;
    vq_init(&b->vq, queue_page, num, b->event_idx);
    const char *qerr = vm_setup_queue(m, 0, num, vq_desc_addr(&b->vq), vq_driver_addr(&b->vq),
                                      vq_device_addr(&b->vq));
    if (qerr)
        return vm_init_fail(m, qerr);
    return vm_init_driver_ok(m);
}

unsigned blk_max_segs(const struct blk_dev *b)
{
    unsigned max = BLK_MAX_SEGS;
    if (b->vq.size >= 3 && max > b->vq.size - 2u)
        max = b->vq.size - 2u;
    if ((b->accepted & VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX)) && b->seg_max && max > b->seg_max)
        max = b->seg_max;
    return max;
}

int blk_submit(struct blk_dev *b, struct blk_req *r, uint32_t type, uint64_t sector,
               const struct blk_seg *segs, unsigned nseg, bool indirect)
{
    if (nseg > BLK_MAX_SEGS)
        return BLK_ERR_SUBMIT;
    struct vq_buf bufs[BLK_MAX_SEGS + 2];
    bool device_writes = type != VIRTIO_BLK_T_OUT;
    r->hdr.type = type;
    r->hdr.reserved = 0;
    r->hdr.sector = sector;
    r->status = 0xff;
    r->done = false;
    r->used_len = 0;
    r->indirect = indirect;
    r->data_len = 0;
    bufs[0] = (struct vq_buf){ (uintptr_t)&r->hdr, sizeof(r->hdr), false };
    for (unsigned i = 0; i < nseg; i++) {
        bufs[1 + i] = (struct vq_buf){ (uintptr_t)segs[i].buf, segs[i].len, device_writes };
        r->data_len += segs[i].len;
    }
    bufs[1 + nseg] = (struct vq_buf){ (uintptr_t)&r->status, 1, true };
    struct vq_desc *table = (struct vq_desc *)((uintptr_t)r->table + b->table_offset);
    int head = vq_add(&b->vq, bufs, nseg + 2, indirect ? table : NULL);
    if (head < 0)
        return BLK_ERR_SUBMIT;
    r->head = head;
    b->inflight[head] = r;
    b->pending++;
    vq_publish(&b->vq, (uint16_t)head);
    return 0;
}

void blk_kick(struct blk_dev *b)
{
    if (vq_kick_needed(&b->vq))
        vm_notify(b->mmio, 0);
}

static void check_interrupt(struct blk_dev *b)
{
    b->waits++;
    for (unsigned i = 0; i < ISR_READS; i++) {
        if (vm_ack_interrupts(b->mmio) & VIRTIO_MMIO_INT_VRING) {
            b->irq_seen++;
            return;
        }
        tsc_delay_us(ISR_READ_GAP_US);
    }
}

static int complete(struct blk_dev *b, uint32_t id, uint32_t len)
{
    if (id >= b->vq.size || !b->inflight[id])
        return BLK_ERR_BAD_ID;
    struct blk_req *r = b->inflight[id];
    b->inflight[id] = NULL;
    b->pending--;
    vq_free(&b->vq, (uint16_t)id);
    r->used_len = len;
    r->done = true;
    b->requests++;
    if (r->status == VIRTIO_BLK_S_OK)
        b->bytes += r->data_len;
    /* Bytes the device wrote: the data of a read-like request, and the status byte. */
    uint32_t want = (r->hdr.type == VIRTIO_BLK_T_OUT || r->hdr.type == VIRTIO_BLK_T_FLUSH
                         ? 0
                         : r->data_len) + 1;
    if (r->status == VIRTIO_BLK_S_OK && len != want) {
        if (!b->used_len_mismatches)
            ksnprintf(b->used_len_first, sizeof(b->used_len_first),
                      "type=%u sector=%lu want=%u got=%u", r->hdr.type, r->hdr.sector, want,
                      len);
        b->used_len_mismatches++;
    }
    return 0;
}

int blk_wait_all(struct blk_dev *b)
{
    uint64_t deadline = tsc_deadline_ms(b->timeout_ms);
    uint64_t status_check = tsc_deadline_us(STATUS_POLL_US);
    while (b->pending) {
        uint32_t id, len;
        bool got = false;
        while (vq_pop_used(&b->vq, &id, &len)) {
            got = true;
            int err = complete(b, id, len);
            if (err)
                return err;
        }
        if (got) {
            check_interrupt(b);
            continue;
        }
        if (tsc_passed(deadline))
            return BLK_ERR_TIMEOUT;
        if (tsc_passed(status_check)) {
            if (vm_status(b->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
                return BLK_ERR_BROKEN;
            status_check = tsc_deadline_us(STATUS_POLL_US);
        }
        cpu_relax();
    }
    return 0;
}

int blk_do(struct blk_dev *b, uint32_t type, uint64_t sector, const struct blk_seg *segs,
           unsigned nseg, bool indirect)
{
    struct blk_req *r = &single_req;
    int err = blk_submit(b, r, type, sector, segs, nseg, indirect);
    if (err)
        return err;
    blk_kick(b);
    err = blk_wait_all(b);
    if (err)
        return err;
    return r->status;
}

int blk_get_id(struct blk_dev *b, char out[VIRTIO_BLK_ID_BYTES + 1])
{
    mem_fill(id_buf, 0, sizeof(id_buf));
    struct blk_seg seg = { id_buf, sizeof(id_buf) };
    int result = blk_do(b, VIRTIO_BLK_T_GET_ID, 0, &seg, 1, false);
    unsigned n = 0;
    if (result == VIRTIO_BLK_S_OK) {
        for (; n < VIRTIO_BLK_ID_BYTES && id_buf[n]; n++)
            out[n] = id_buf[n] > ' ' && id_buf[n] < 0x7f ? (char)id_buf[n] : '?';
    }
    out[n] = '\0';
    return result;
}

const char *blk_result_name(int result)
{
    static char buf[16];
    switch (result) {
    case VIRTIO_BLK_S_OK: return "ok";
    case VIRTIO_BLK_S_IOERR: return "ioerr";
    case VIRTIO_BLK_S_UNSUPP: return "unsupp";
    case BLK_ERR_TIMEOUT: return "timeout";
    case BLK_ERR_SUBMIT: return "submit-failed";
    case BLK_ERR_BROKEN: return "needs-reset";
    case BLK_ERR_BAD_ID: return "bad-used-id";
    default:
        ksnprintf(buf, sizeof(buf), "status-%d", result);
        return buf;
    }
}
