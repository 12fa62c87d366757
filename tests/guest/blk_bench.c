/*
 * svtest.action=blk-bench: keeps svtest.qd requests in flight on one virtio-blk
 * disk until svtest.count requests have completed, for the host to time.
 *
 * Guest ring-0 code is emulated on the kvm_pvm host (~1.6 M instructions/s), so
 * the timed loop does as little as it can: every in-flight slot has its header,
 * status byte, data buffer and descriptors (direct chain or indirect table) built
 * once before the start line; a completion only checks the status byte, writes
 * the next sector into that slot's header, presets the status to 0xff and puts
 * the same head back into the avail ring.  Data buffers are never touched (they
 * live in .noinit: whatever the RAM holds is what a write sends).  Everything
 * completed in one look at the used ring is published with one avail idx store
 * and at most one notification, when the device asks for it (EVENT_IDX or
 * NO_NOTIFY).  Registers are read only while nothing completes (Status, every
 * 10 ms of idleness).
 *
 * Command-line keys (besides svtest.blk / event_idx / indirect / timeout_ms):
 *   svtest.mode=randread|randwrite|seqread|seqwrite   (default randread)
 *   svtest.bs=N           bytes per request, multiple of 512, <= BENCH_BUF_SIZE (4096)
 *   svtest.count=N        requests to complete (2000)
 *   svtest.qd=N           requests in flight, <= queue size (16)
 *   svtest.queue_size=N   QueueNum (64, capped by QueueNumMax; a power of 2)
 *   svtest.seed=N         xorshift seed of the random offsets (1)
 *   svtest.irq=0|1        0: ask the device not to interrupt (a polling driver);
 *                         1: ask for an interrupt per round and read + acknowledge
 *                         InterruptStatus after each round, as a handler would (0)
 *   svtest.layout=auto|direct|indirect   descriptor layout (auto)
 */
#include "actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "io.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define ACTION "blk-bench"

/* Largest bs; also the area the slots' buffers are carved from. */
#define BENCH_BUF_SIZE (2u * 1024 * 1024)
#define BENCH_MAX_SLOTS VQ_MAX_SIZE
/* Data descriptors per request (more than one only when SIZE_MAX is small). */
#define BENCH_MAX_SEGS 16
#define BENCH_DEFAULT_QUEUE_SIZE 64
#define NO_SLOT 0xff
/* Idle polls between two looks at the TSC (so a busy run reads no clock). */
#define IDLE_SPINS 1024
#define STATUS_POLL_MS 10

static uint8_t bench_buf[BENCH_BUF_SIZE] __attribute__((aligned(4096))) NOINIT;
static struct blk_req_header bench_hdr[BENCH_MAX_SLOTS] __attribute__((aligned(64))) NOINIT;
static volatile uint8_t bench_status[BENCH_MAX_SLOTS] __attribute__((aligned(64))) NOINIT;
static struct vq_desc bench_table[BENCH_MAX_SLOTS][BENCH_MAX_SEGS + 2]
    __attribute__((aligned(16))) NOINIT;

struct bench_mode {
    const char *name;
    uint32_t type;
    bool random;
};

static const struct bench_mode modes[] = {
    { "randread", VIRTIO_BLK_T_IN, true },
    { "randwrite", VIRTIO_BLK_T_OUT, true },
    { "seqread", VIRTIO_BLK_T_IN, false },
    { "seqwrite", VIRTIO_BLK_T_OUT, false },
};

struct bench {
    struct blk_dev dev;
    const struct bench_mode *mode;
    uint64_t bs, count, qd, seed;
    bool irq, indirect_layout, shared_buf;
    unsigned segs; /* data descriptors per request */
    uint64_t blocks; /* bs-sized blocks on the disk */
    uint16_t head[BENCH_MAX_SLOTS];
    uint8_t slot_of[VQ_MAX_SIZE]; /* head -> slot, NO_SLOT for other descriptors */
    uint8_t inflight[BENCH_MAX_SLOTS];
};

static NORETURN void fail(const char *fmt, ...) PRINTF_LIKE(1, 2);

static void fail(const char *fmt, ...)
{
    char why[160];
    va_list ap;
    va_start(ap, fmt);
    kvsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    report(ACTION " FAIL %s", why);
    finish();
}

static void parse_params(struct bench *b)
{
    const char *cl = boot_info.cmdline;
    char mode[16] = "randread";
    cmdline_get_str(cl, "svtest.mode", mode, sizeof(mode));
    b->mode = NULL;
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        if (strcmp(mode, modes[i].name) == 0)
            b->mode = &modes[i];
    }
    if (!b->mode)
        fail("mode=%s", mode);
    b->bs = cmdline_get_u64(cl, "svtest.bs", 4096);
    if (b->bs == 0 || b->bs % BLK_SECTOR_SIZE || b->bs > BENCH_BUF_SIZE)
        fail("bs=%lu (a multiple of 512, at most %u)", b->bs, BENCH_BUF_SIZE);
    b->count = cmdline_get_u64(cl, "svtest.count", 2000);
    if (b->count == 0 || b->count > 0xffffffffu)
        fail("count=%lu", b->count);
    b->qd = cmdline_get_u64(cl, "svtest.qd", 16);
    if (b->qd == 0 || b->qd > BENCH_MAX_SLOTS)
        fail("qd=%lu (1..%u)", b->qd, BENCH_MAX_SLOTS);
    b->seed = cmdline_get_u64(cl, "svtest.seed", 1);
    b->irq = cmdline_get_u64(cl, "svtest.irq", 0) != 0;
}

/* Chooses the layout and builds every slot's descriptors, header and status. */
static void build_slots(struct bench *b, const char *layout)
{
    struct blk_dev *d = &b->dev;
    struct virtq *vq = &d->vq;
    uint32_t seg_len = (uint32_t)b->bs;
    if ((d->accepted & VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX)) && d->size_max &&
        d->size_max < seg_len)
        seg_len = d->size_max & ~(uint32_t)(BLK_SECTOR_SIZE - 1);
    if (seg_len == 0)
        fail("size-max=%u", d->size_max);
    b->segs = (unsigned)((b->bs + seg_len - 1) / seg_len);
    unsigned chain = b->segs + 2;
    if (b->segs > BENCH_MAX_SEGS || chain > vq->size ||
        ((d->accepted & VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX)) && d->seg_max && b->segs > d->seg_max))
        fail("bs=%lu needs %u segments (size-max=%u seg-max=%u queue-size=%u)", b->bs,
             b->segs, d->size_max, d->seg_max, vq->size);
    if (b->qd > vq->size)
        fail("qd=%lu queue-size=%u", b->qd, vq->size);

    bool direct_fits = b->qd * chain <= vq->size;
    if (strcmp(layout, "direct") == 0) {
        if (!direct_fits)
            fail("layout=direct qd=%lu chain=%u queue-size=%u", b->qd, chain, vq->size);
        b->indirect_layout = false;
    } else if (strcmp(layout, "indirect") == 0 || (strcmp(layout, "auto") == 0 && !direct_fits)) {
        if (!d->indirect)
            fail("layout=indirect needed qd=%lu chain=%u queue-size=%u indirect-desc=0", b->qd,
                 chain, vq->size);
        b->indirect_layout = true;
    } else if (strcmp(layout, "auto") == 0) {
        b->indirect_layout = false;
    } else {
        fail("layout=%s", layout);
    }

    b->shared_buf = b->qd * b->bs > BENCH_BUF_SIZE;
    bool device_writes = b->mode->type != VIRTIO_BLK_T_OUT;
    mem_fill(b->slot_of, NO_SLOT, sizeof(b->slot_of));
    for (unsigned s = 0; s < b->qd; s++) {
        uint8_t *buf = bench_buf + (b->shared_buf ? 0 : s * b->bs);
        struct vq_desc *t;
        uint16_t first; /* index of the header descriptor in t */
        if (b->indirect_layout) {
            t = bench_table[s];
            first = 0;
            b->head[s] = (uint16_t)s;
            vq->desc[s] = (struct vq_desc){ (uintptr_t)t, chain * sizeof(struct vq_desc),
                                            VQ_DESC_F_INDIRECT, 0 };
        } else {
            t = vq->desc;
            first = (uint16_t)(s * chain);
            b->head[s] = first;
        }
        b->slot_of[b->head[s]] = (uint8_t)s;
        bench_hdr[s] = (struct blk_req_header){ b->mode->type, 0, 0 };
        bench_status[s] = 0xff;
        t[first] = (struct vq_desc){ (uintptr_t)&bench_hdr[s], sizeof(bench_hdr[s]),
                                     VQ_DESC_F_NEXT, (uint16_t)(first + 1) };
        uint64_t left = b->bs;
        for (unsigned i = 0; i < b->segs; i++) {
            uint32_t len = left < seg_len ? (uint32_t)left : seg_len;
            uint16_t at = (uint16_t)(first + 1 + i);
            t[at] = (struct vq_desc){ (uintptr_t)(buf + (uint64_t)i * seg_len), len,
                                      (uint16_t)(VQ_DESC_F_NEXT |
                                                 (device_writes ? VQ_DESC_F_WRITE : 0)),
                                      (uint16_t)(at + 1) };
            left -= len;
        }
        t[first + chain - 1] = (struct vq_desc){ (uintptr_t)&bench_status[s], 1,
                                                 VQ_DESC_F_WRITE, 0 };
        b->inflight[s] = 0;
    }
}

static inline uint64_t xorshift64(uint64_t *x)
{
    uint64_t v = *x;
    v ^= v << 13;
    v ^= v >> 7;
    v ^= v << 17;
    *x = v;
    return v;
}

/*
 * The next block: uniform over the disk (xorshift64, scaled by a multiply instead
 * of a division), or the one after the previous, wrapping at the end.
 */
static inline uint64_t next_block(bool random, uint64_t *x, uint64_t *seq, uint64_t blocks)
{
    if (random)
        return (uint64_t)(((unsigned __int128)xorshift64(x) * blocks) >> 64);
    uint64_t block = *seq;
    *seq = block + 1 == blocks ? 0 : block + 1;
    return block;
}

/* Why the run stopped early, with the ring state, then done + reset. */
static NORETURN void fail_run(struct bench *b, const char *result, uint64_t completed,
                              uint64_t issued, uint16_t last_used)
{
    struct virtq *vq = &b->dev.vq;
    uint16_t used = *vq->used_idx;
    report(ACTION " FAIL result=%s completed=%lu issued=%lu used-idx=%u last-used=%u "
           "avail-idx=%u status=0x%x isr=0x%x",
           result, completed, issued, used, last_used, *vq->avail_idx, vm_status(b->dev.mmio),
           vm_read(b->dev.mmio, VIRTIO_MMIO_INTERRUPT_STATUS));
    finish();
}

void action_blk_bench(void)
{
    static struct bench bench;
    struct bench *b = &bench;
    const char *cl = boot_info.cmdline;
    parse_params(b);
    char layout[16] = "auto";
    cmdline_get_str(cl, "svtest.layout", layout, sizeof(layout));

    struct blk_options opts;
    blk_options_from_cmdline(&opts);
    opts.queue_size =
        (uint16_t)cmdline_get_u64(cl, "svtest.queue_size", BENCH_DEFAULT_QUEUE_SIZE);
    blk_open_or_finish(&b->dev, ACTION, &opts);
    struct blk_dev *d = &b->dev;
    struct virtq *vq = &d->vq;
    if (vq->size & (vq->size - 1))
        fail("queue-size=%u (not a power of 2)", vq->size);
    const uint16_t mask = (uint16_t)(vq->size - 1);

    uint64_t bs_sectors = b->bs / BLK_SECTOR_SIZE;
    b->blocks = d->capacity / bs_sectors;
    if (b->blocks == 0)
        fail("capacity=%lu sectors < bs=%lu", d->capacity, b->bs);
    build_slots(b, layout);

    /*
     * Used-buffer interrupts: asked for after every round (a driver re-enabling
     * them), or never (used_event stays 65535 behind: one interrupt per 65536
     * completions at most).
     */
    bool irq = b->irq, event_idx = vq->event_idx;
    *vq->avail_flags = (!irq && !event_idx) ? VQ_AVAIL_F_NO_INTERRUPT : 0;
    *vq->used_event = irq ? 0 : 0xffff;

    report(ACTION " config capacity=%lu queue-size=%u event-idx=%d layout=%s segs=%u "
           "buffers=%s irq=%d tsc-khz=%lu tsc-source=%s",
           d->capacity, vq->size, event_idx, b->indirect_layout ? "indirect" : "direct", b->segs,
           b->shared_buf ? "shared" : "distinct", irq, tsc_khz(), tsc_khz_source());
    report(ACTION " start mode=%s bs=%lu qd=%lu count=%lu", b->mode->name, b->bs, b->qd,
           b->count);

    /* ---- timed part ---- */
    uint64_t t0 = rdtsc();
    volatile uint16_t *avail_ring = vq->avail_ring, *avail_idx = vq->avail_idx;
    volatile uint16_t *used_idx = vq->used_idx, *used_event = vq->used_event;
    volatile struct vq_used_elem *used_ring = vq->used_ring;
    const uint64_t count = b->count, blocks = b->blocks;
    const bool random = b->mode->random;
    uint64_t x = (b->seed + 1) * 0x9e3779b97f4a7c15ull;
    if (!x)
        x = 1;
    uint64_t seq_block = 0;
    uint64_t issued = 0, completed = 0, errors = 0;
    uint16_t next_avail = vq->next_avail, last_used = vq->last_used;
    uint64_t first_error_sector = 0;
    uint8_t first_error_status = 0;

    /* Initial fill: qd requests (or count), one notification. */
    for (unsigned s = 0; s < b->qd && issued < count; s++, issued++) {
        bench_hdr[s].sector = next_block(random, &x, &seq_block, blocks) * bs_sectors;
        b->inflight[s] = 1;
        avail_ring[next_avail & mask] = b->head[s];
        next_avail++;
    }
    barrier();
    *avail_idx = next_avail;
    vq->next_avail = next_avail;
    if (vq_kick_needed(vq))
        vm_notify(d->mmio, 0);

    unsigned spins = 0;
    uint64_t idle_since = 0, status_check = 0;
    const uint64_t timeout_ticks = (uint64_t)d->timeout_ms * tsc_khz();
    const uint64_t status_ticks = STATUS_POLL_MS * tsc_khz();
    for (;;) {
        uint16_t used = *used_idx;
        if (used == last_used) {
            if (++spins < IDLE_SPINS) {
                cpu_relax();
                continue;
            }
            /* Nothing for a while: the clock, and now and then the device status. */
            spins = 0;
            uint64_t now = rdtsc();
            if (!idle_since) {
                idle_since = now;
                status_check = now + status_ticks;
            } else if (now - idle_since >= timeout_ticks) {
                fail_run(b, "timeout", completed, issued, last_used);
            } else if ((int64_t)(now - status_check) >= 0) {
                if (vm_status(d->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
                    fail_run(b, "needs-reset", completed, issued, last_used);
                status_check = now + status_ticks;
            }
            continue;
        }
        barrier(); /* x86: the used elements are read after the used idx */
        spins = 0;
        idle_since = 0;
        do {
            uint32_t id = used_ring[last_used & mask].id;
            last_used++;
            unsigned s = id < vq->size ? b->slot_of[id] : NO_SLOT;
            if (s == NO_SLOT || !b->inflight[s])
                fail_run(b, "bad-used-id", completed, issued, last_used);
            uint8_t st = bench_status[s];
            if (st != VIRTIO_BLK_S_OK) {
                if (!errors++) {
                    first_error_status = st;
                    first_error_sector = bench_hdr[s].sector;
                }
            }
            completed++;
            if (issued < count) {
                bench_hdr[s].sector = next_block(random, &x, &seq_block, blocks) * bs_sectors;
                bench_status[s] = 0xff;
                avail_ring[next_avail & mask] = (uint16_t)id;
                next_avail++;
                issued++;
            } else {
                b->inflight[s] = 0;
            }
        } while (last_used != used);
        if (completed == count)
            break;
        if (irq && event_idx)
            *used_event = last_used;
        if (next_avail != vq->next_avail) {
            barrier(); /* x86: the ring entries and headers are stored before the idx */
            *avail_idx = next_avail;
            vq->next_avail = next_avail;
            if (vq_kick_needed(vq)) /* mb(), then avail_event / NO_NOTIFY */
                vm_notify(d->mmio, 0);
        }
        if (irq) /* what an interrupt handler would do: read and acknowledge */
            vm_ack_interrupts(d->mmio);
    }
    uint64_t ticks = rdtsc() - t0;
    /* ---- end of the timed part ---- */

    report(ACTION " done requests=%lu bytes=%lu errors=%lu", completed,
           (completed - errors) * b->bs, errors);
    report(ACTION " guest-ms=%lu tsc-ticks=%lu notifies=%u", ticks / tsc_khz(), ticks,
           vq->kicks);
    if (errors)
        report(ACTION " first-error status=%u sector=%lu", first_error_status,
               first_error_sector);
    finish();
}
