/*
 * virtio-balloon driver (virtio 1.x, section 5.5) over virtio-mmio v2, polled.
 *
 * Queues are numbered compactly, as Linux's virtio-mmio driver numbers them:
 * 0 inflate, 1 deflate, then statistics (only with STATS_VQ), then free page
 * reporting (only with REPORTING).  Page frame lists are le32 PFNs in 4 KiB
 * units, BALLOON_PFNS_PER_CHAIN per chain (one descriptor, device-readable),
 * as Linux sends them.  Config space: num_pages (le32, the device's target)
 * and actual (le32, written by the driver).
 */
#ifndef SVTEST_VIRTIO_BALLOON_H
#define SVTEST_VIRTIO_BALLOON_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_mmio.h"
#include "virtqueue.h"

/* Feature bits (5.5.3). */
#define VIRTIO_BALLOON_F_MUST_TELL_HOST 0
#define VIRTIO_BALLOON_F_STATS_VQ 1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM 2
#define VIRTIO_BALLOON_F_FREE_PAGE_HINT 3
#define VIRTIO_BALLOON_F_PAGE_POISON 4
#define VIRTIO_BALLOON_F_REPORTING 5

/* Config space (struct virtio_balloon_config). */
#define VIRTIO_BALLOON_CFG_NUM_PAGES 0
#define VIRTIO_BALLOON_CFG_ACTUAL 4

/* Statistics tags (5.5.6.3). */
#define VIRTIO_BALLOON_S_SWAP_IN 0
#define VIRTIO_BALLOON_S_SWAP_OUT 1
#define VIRTIO_BALLOON_S_MAJFLT 2
#define VIRTIO_BALLOON_S_MINFLT 3
#define VIRTIO_BALLOON_S_MEMFREE 4
#define VIRTIO_BALLOON_S_MEMTOT 5
#define VIRTIO_BALLOON_S_AVAIL 6
#define VIRTIO_BALLOON_S_CACHES 7

#define BALLOON_PAGE_SHIFT 12
#define BALLOON_PAGE_SIZE 4096u
#define BALLOON_PFNS_PER_CHAIN 256
#define BALLOON_QUEUE_SIZE 64 /* QueueNum asked for (less when QueueNumMax is less) */
#define BALLOON_REPORT_CHUNK (1u << 20) /* one reported range per descriptor */
#define BALLOON_REPORT_PER_CHAIN 32     /* as Linux's PAGE_REPORTING_CAPACITY */
#define BALLOON_MAX_STATS 8

/* Fixed queue indexes; statistics and reporting are found in balloon_dev. */
#define BALLOON_INFLATEQ 0
#define BALLOON_DEFLATEQ 1

/* balloon_* results that are not a count. */
#define BALLOON_ERR_TIMEOUT (-1)
#define BALLOON_ERR_BROKEN (-2) /* DEVICE_NEEDS_RESET */
#define BALLOON_ERR_BAD_ID (-3) /* a used element named no chain in flight */
#define BALLOON_ERR_FULL (-4)   /* no free descriptor */

struct balloon_stat {
    uint16_t tag;
    uint64_t val;
} __attribute__((packed));

struct balloon_options {
    bool stats;          /* accept STATS_VQ when offered */
    bool deflate_on_oom; /* accept DEFLATE_ON_OOM when offered */
    bool reporting;      /* accept REPORTING when offered */
    bool must_tell_host; /* accept MUST_TELL_HOST when offered (pages are always told) */
    uint16_t queue_size; /* per queue, at most VQ_MAX_SIZE */
    unsigned timeout_ms; /* per wait */
};

struct balloon_dev {
    const struct virtio_mmio_dev *mmio;
    struct virtq inflate, deflate, statsq, reportq;
    uint64_t offered, accepted;
    bool has_stats, has_reporting;
    int stats_index, report_index; /* queue indexes, or -1 */
    uint16_t num_max[4];           /* QueueNumMax of the queues set up, in index order */
    unsigned timeout_ms;

    /* statistics buffer: posted, returned by the device, refilled */
    struct balloon_stat *stats_buf;
    bool stats_posted;
    unsigned stats_posts;   /* buffers posted */
    unsigned stats_refills; /* buffers posted after the first */

    /* counters */
    uint64_t pages_inflated, pages_deflated, bytes_reported;
    unsigned chains, kicks, config_irqs;
};

extern const struct balloon_options balloon_default_options;

/* svtest.stats, svtest.deflate_on_oom, svtest.reporting, svtest.queue_size, svtest.timeout_ms. */
void balloon_options_from_cmdline(struct balloon_options *opts);

/* The virtio_mmio.device= index of balloon device number nth, or -1; *count = balloons. */
int balloon_find(unsigned nth, unsigned *count);

/*
 * Full initialisation (3.1.1): reset, ACKNOWLEDGE, DRIVER, features (VERSION_1
 * required), FEATURES_OK, the queues, DRIVER_OK.  No buffer is posted.
 * Returns NULL or what failed.
 */
const char *balloon_init(struct balloon_dev *b, const struct virtio_mmio_dev *m,
                         const struct balloon_options *opts);

static inline uint32_t balloon_target(const struct balloon_dev *b)
{
    return vm_config32(b->mmio, VIRTIO_BALLOON_CFG_NUM_PAGES);
}
static inline uint32_t balloon_actual(const struct balloon_dev *b)
{
    return vm_config32(b->mmio, VIRTIO_BALLOON_CFG_ACTUAL);
}
static inline void balloon_set_actual(struct balloon_dev *b, uint32_t pages)
{
    vm_config_write32(b->mmio, VIRTIO_BALLOON_CFG_ACTUAL, pages);
}

/*
 * Lists the count frames first_pfn.. on queue q (BALLOON_INFLATEQ or _DEFLATEQ),
 * BALLOON_PFNS_PER_CHAIN per chain, as many chains in flight as the queue
 * holds, and waits until the device used all of them.  0 or BALLOON_ERR_*.
 */
int balloon_give_pfns(struct balloon_dev *b, unsigned q, uint64_t first_pfn, uint64_t count);

/*
 * Reports [addr, addr + len) as free (device-writable descriptors of
 * BALLOON_REPORT_CHUNK, BALLOON_REPORT_PER_CHAIN per chain) and waits for the
 * device.  Returns the chains used, or BALLOON_ERR_*.
 */
int balloon_report_free(struct balloon_dev *b, uint64_t addr, uint64_t len);

/* Posts the statistics buffer holding n stats (n <= BALLOON_MAX_STATS) and notifies. */
int balloon_post_stats(struct balloon_dev *b, const struct balloon_stat *stats, unsigned n);

/* True when the device has given the statistics buffer back (it must then be refilled). */
bool balloon_stats_returned(struct balloon_dev *b);

/*
 * A chain of n raw buffers on queue index q (any of the device's queues),
 * published and notified.  Returns its head or BALLOON_ERR_FULL.
 */
int balloon_submit(struct balloon_dev *b, unsigned q, const struct vq_buf *bufs, unsigned n);

/* The virtqueue of queue index q, or NULL. */
struct virtq *balloon_queue(struct balloon_dev *b, unsigned q);

/*
 * Waits up to ms (0: the device's time-out) for one used element on queue q,
 * then frees its chain.  0 (with the id and len) or BALLOON_ERR_*.
 */
int balloon_wait_used(struct balloon_dev *b, unsigned q, unsigned ms, uint32_t *id,
                      uint32_t *len);

/* Reads and acknowledges InterruptStatus; counts config interrupts. */
uint32_t balloon_ack_interrupts(struct balloon_dev *b);

/* "timeout", "needs-reset", ... for a BALLOON_ERR_* value. */
const char *balloon_result_name(int result);

#endif
