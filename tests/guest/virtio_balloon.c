/* virtio-balloon driver over virtio-mmio: initialisation, page lists, statistics, reporting. */
#include "virtio_balloon.h"

#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "io.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define RESET_TIMEOUT_MS 200
#define STATUS_POLL_US 10000 /* Status (a VM exit) is read this often while waiting */

/* One page per queue (inflate, deflate, stats, reporting), the PFN lists, the stats buffer. */
static uint8_t ring_pages[4][VQ_PAGE_SIZE] __attribute__((aligned(4096))) NOINIT;
static uint32_t pfn_lists[VQ_MAX_SIZE][BALLOON_PFNS_PER_CHAIN] __attribute__((aligned(4096)))
    NOINIT;
static struct balloon_stat stats_area[BALLOON_MAX_STATS] __attribute__((aligned(64))) NOINIT;

const struct balloon_options balloon_default_options = {
    .stats = true,
    .deflate_on_oom = true,
    .reporting = true,
    .must_tell_host = true,
    .queue_size = BALLOON_QUEUE_SIZE,
    .timeout_ms = 5000,
};

void balloon_options_from_cmdline(struct balloon_options *opts)
{
    const char *cl = boot_info.cmdline;
    *opts = balloon_default_options;
    opts->stats = cmdline_get_u64(cl, "svtest.stats", 1) != 0;
    opts->deflate_on_oom = cmdline_get_u64(cl, "svtest.deflate_on_oom", 1) != 0;
    opts->reporting = cmdline_get_u64(cl, "svtest.reporting", 1) != 0;
    opts->must_tell_host = cmdline_get_u64(cl, "svtest.must_tell_host", 1) != 0;
    opts->queue_size = (uint16_t)cmdline_get_u64(cl, "svtest.queue_size", BALLOON_QUEUE_SIZE);
    opts->timeout_ms = (unsigned)cmdline_get_u64(cl, "svtest.timeout_ms", 5000);
}

int balloon_find(unsigned nth, unsigned *count)
{
    unsigned tokens = virtio_devices_discover(), seen = 0;
    int found = -1;
    for (unsigned i = 0; i < tokens && i < VIRTIO_MMIO_MAX_DEVICES; i++) {
        const struct virtio_mmio_dev *d = &virtio_devs[i];
        if (!d->parsed || vm_read(d, VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE ||
            vm_read(d, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BALLOON)
            continue;
        if (seen == nth)
            found = (int)i;
        seen++;
    }
    if (count)
        *count = seen;
    return found;
}

struct virtq *balloon_queue(struct balloon_dev *b, unsigned q)
{
    if (q == BALLOON_INFLATEQ)
        return &b->inflate;
    if (q == BALLOON_DEFLATEQ)
        return &b->deflate;
    if (b->stats_index >= 0 && q == (unsigned)b->stats_index)
        return &b->statsq;
    if (b->report_index >= 0 && q == (unsigned)b->report_index)
        return &b->reportq;
    return NULL;
}

static const char *setup_queue(struct balloon_dev *b, unsigned q, uint16_t want, bool event_idx)
{
    const struct virtio_mmio_dev *m = b->mmio;
    vm_write(m, VIRTIO_MMIO_QUEUE_SEL, q);
    uint16_t max = (uint16_t)vm_read(m, VIRTIO_MMIO_QUEUE_NUM_MAX);
    uint16_t num = want ? want : 1;
    if (num > VQ_MAX_SIZE)
        num = VQ_MAX_SIZE;
    if (max && num > max)
        num = max;
    b->num_max[q] = max;
    struct virtq *vq = balloon_queue(b, q);
    vq_init(vq, ring_pages[q], num, event_idx);
    return vm_setup_queue(m, q, num, vq_desc_addr(vq), vq_driver_addr(vq), vq_device_addr(vq));
}

const char *balloon_init(struct balloon_dev *b, const struct virtio_mmio_dev *m,
                         const struct balloon_options *opts)
{
    memset(b, 0, sizeof(*b));
    b->mmio = m;
    b->stats_index = b->report_index = -1;
    b->stats_buf = stats_area;
    b->timeout_ms = opts->timeout_ms ? opts->timeout_ms : 5000;
    const char *why = vm_init_begin(m, VIRTIO_ID_BALLOON, "balloon", RESET_TIMEOUT_MS);
    if (why)
        return why;

    b->offered = vm_device_features(m);
    if (!(b->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1)))
        return vm_init_fail(m, "no-version-1");
    uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1);
    if (opts->stats)
        wanted |= VIRTIO_BIT(VIRTIO_BALLOON_F_STATS_VQ);
    if (opts->deflate_on_oom)
        wanted |= VIRTIO_BIT(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
    if (opts->reporting)
        wanted |= VIRTIO_BIT(VIRTIO_BALLOON_F_REPORTING);
    if (opts->must_tell_host)
        wanted |= VIRTIO_BIT(VIRTIO_BALLOON_F_MUST_TELL_HOST);
    b->accepted = b->offered & wanted;
    why = vm_init_features(m, b->accepted);
    if (why)
        return why;
    b->has_stats = b->accepted & VIRTIO_BIT(VIRTIO_BALLOON_F_STATS_VQ);
    b->has_reporting = b->accepted & VIRTIO_BIT(VIRTIO_BALLOON_F_REPORTING);

    /* Queues that do not exist take no index (Linux's virtio-mmio numbering). */
    unsigned next = 2;
    if (b->has_stats)
        b->stats_index = (int)next++;
    if (b->has_reporting)
        b->report_index = (int)next++;
    const char *qerr = NULL;
    for (unsigned q = 0; q < next && !qerr; q++)
        qerr = setup_queue(b, q, opts->queue_size, false);
    if (qerr)
        return vm_init_fail(m, qerr);
    return vm_init_driver_ok(m);
}

uint32_t balloon_ack_interrupts(struct balloon_dev *b)
{
    uint32_t isr = vm_ack_interrupts(b->mmio);
    if (isr & VIRTIO_MMIO_INT_CONFIG)
        b->config_irqs++;
    return isr;
}

static void kick(struct balloon_dev *b, unsigned q)
{
    if (vq_kick_needed(balloon_queue(b, q))) {
        vm_notify(b->mmio, q);
        b->kicks++;
    }
}

int balloon_submit(struct balloon_dev *b, unsigned q, const struct vq_buf *bufs, unsigned n)
{
    struct virtq *vq = balloon_queue(b, q);
    if (!vq)
        return BALLOON_ERR_FULL;
    int head = vq_add(vq, bufs, n, NULL);
    if (head < 0)
        return BALLOON_ERR_FULL;
    vq_publish(vq, (uint16_t)head);
    kick(b, q);
    b->chains++;
    return head;
}

int balloon_wait_used(struct balloon_dev *b, unsigned q, unsigned ms, uint32_t *id,
                      uint32_t *len)
{
    struct virtq *vq = balloon_queue(b, q);
    if (!vq)
        return BALLOON_ERR_BAD_ID;
    uint64_t deadline = tsc_deadline_ms(ms ? ms : b->timeout_ms);
    uint64_t status_check = tsc_deadline_us(STATUS_POLL_US);
    for (;;) {
        if (vq_pop_used(vq, id, len)) {
            if (*id >= vq->size || vq->chain_len[*id] == 0)
                return BALLOON_ERR_BAD_ID;
            vq_free(vq, (uint16_t)*id);
            return 0;
        }
        if (tsc_passed(status_check)) {
            if (vm_status(b->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
                return BALLOON_ERR_BROKEN;
            status_check = tsc_deadline_us(STATUS_POLL_US);
        }
        if (tsc_passed(deadline))
            return BALLOON_ERR_TIMEOUT;
        cpu_relax();
    }
}

int balloon_give_pfns(struct balloon_dev *b, unsigned q, uint64_t first_pfn, uint64_t count)
{
    struct virtq *vq = balloon_queue(b, q);
    uint64_t pfn = first_pfn, end = first_pfn + count;
    while (pfn < end) {
        unsigned in_flight = 0;
        /* Descriptor i always carries list i: one descriptor per chain. */
        while (pfn < end && vq->num_free) {
            uint16_t head = vq->free_head;
            unsigned n = 0;
            for (; n < BALLOON_PFNS_PER_CHAIN && pfn < end; n++)
                pfn_lists[head][n] = (uint32_t)pfn++;
            struct vq_buf buf = { (uintptr_t)pfn_lists[head], n * 4u, false };
            int got = vq_add(vq, &buf, 1, NULL);
            if (got != head)
                return BALLOON_ERR_FULL;
            vq_publish(vq, head);
            in_flight++;
            b->chains++;
        }
        kick(b, q);
        while (in_flight) {
            uint32_t id, len;
            int err = balloon_wait_used(b, q, 0, &id, &len);
            if (err)
                return err;
            in_flight--;
        }
        balloon_ack_interrupts(b);
    }
    if (q == BALLOON_INFLATEQ)
        b->pages_inflated += count;
    else
        b->pages_deflated += count;
    return 0;
}

int balloon_report_free(struct balloon_dev *b, uint64_t addr, uint64_t len)
{
    if (b->report_index < 0)
        return BALLOON_ERR_BAD_ID;
    unsigned q = (unsigned)b->report_index, chains = 0;
    uint64_t end = addr + len;
    struct vq_buf bufs[BALLOON_REPORT_PER_CHAIN];
    while (addr < end) {
        unsigned n = 0;
        struct virtq *vq = &b->reportq;
        unsigned cap = vq->num_free < BALLOON_REPORT_PER_CHAIN ? vq->num_free
                                                               : BALLOON_REPORT_PER_CHAIN;
        for (; n < cap && addr < end; n++) {
            uint64_t chunk = end - addr < BALLOON_REPORT_CHUNK ? end - addr : BALLOON_REPORT_CHUNK;
            bufs[n] = (struct vq_buf){ addr, (uint32_t)chunk, true };
            addr += chunk;
        }
        if (balloon_submit(b, q, bufs, n) < 0)
            return BALLOON_ERR_FULL;
        uint32_t id, used_len;
        int err = balloon_wait_used(b, q, 0, &id, &used_len);
        if (err)
            return err;
        chains++;
        balloon_ack_interrupts(b);
    }
    b->bytes_reported += len;
    return (int)chains;
}

int balloon_post_stats(struct balloon_dev *b, const struct balloon_stat *stats, unsigned n)
{
    if (b->stats_index < 0 || n > BALLOON_MAX_STATS)
        return BALLOON_ERR_BAD_ID;
    mem_copy(b->stats_buf, stats, n * sizeof(*stats));
    struct vq_buf buf = { (uintptr_t)b->stats_buf, (uint32_t)(n * sizeof(*stats)), false };
    int head = balloon_submit(b, (unsigned)b->stats_index, &buf, 1);
    if (head < 0)
        return head;
    if (b->stats_posts)
        b->stats_refills++;
    b->stats_posted = true;
    b->stats_posts++;
    return 0;
}

bool balloon_stats_returned(struct balloon_dev *b)
{
    if (b->stats_index < 0 || !b->stats_posted)
        return false;
    uint32_t id, len;
    if (!vq_pop_used(&b->statsq, &id, &len))
        return false;
    if (id < b->statsq.size && b->statsq.chain_len[id])
        vq_free(&b->statsq, (uint16_t)id);
    b->stats_posted = false;
    return true;
}

const char *balloon_result_name(int result)
{
    switch (result) {
    case 0: return "ok";
    case BALLOON_ERR_TIMEOUT: return "timeout";
    case BALLOON_ERR_BROKEN: return "needs-reset";
    case BALLOON_ERR_BAD_ID: return "bad-used-id";
    case BALLOON_ERR_FULL: return "queue-full";
    default: return "error";
    }
}
