/*
 * svtest.action=blk-rw: drives one virtio-blk disk through writes and reads of
 * many sizes and descriptor layouts, verifies every byte, then the error cases
 * (beyond the end, unsupported type), FLUSH and GET_ID.
 *
 * Every step writes the tagged pattern (blk_pattern.h) with one layout and reads
 * it back with another into poisoned memory.  "Scattered" layouts put the
 * segments in blk_sbuf in reverse order at odd addresses with gaps, so a device
 * that assumes contiguous or aligned buffers, or mixes up segment order, fails.
 */
#include "actions.h"
#include "blk_actions.h"
#include "blk_pattern.h"
#include "guestmem.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define ACTION "blk-rw"
#define POISON 0xdb
#define MIN_CAPACITY 1024 /* sectors: the fixed regions below end at sector 480 */

/* INDIRECT_AT_8: the table 8-byte aligned, not 16 (as Linux with SLOB has them). */
enum indirect_use { DIRECT, INDIRECT, INDIRECT_AT_8, INDIRECT_IF_NEGOTIATED };

struct layout {
    const char *name;
    unsigned nseg;
    const uint32_t *sizes; /* NULL: equal parts, the remainder in the last */
    bool scatter;          /* segments in blk_sbuf (else slices of the caller's buffer) */
    enum indirect_use indirect;
};

static const uint32_t odd5[] = { 100, 412, 1000, 7, 2577 };       /* 4096 */
static const uint32_t odd4[] = { 3, 509, 1536, 2048 };             /* 4096 */
static const uint32_t odd13[] = { 1,    4095, 4096, 511,  513,  8192, 3000,
                                  5192, 4096, 4096, 7000, 4360, 4000 }; /* 49152 */

static const struct layout L_1SEG = { "1seg", 1, NULL, false, DIRECT };
static const struct layout L_1SEG_ODD = { "1seg-odd-addr", 1, NULL, true, DIRECT };
static const struct layout L_4SEG = { "4seg-scattered", 4, NULL, true, DIRECT };
static const struct layout L_8SEG = { "8seg-scattered", 8, NULL, true, DIRECT };
static const struct layout L_ODD5 = { "5seg-odd-sizes", 5, odd5, true, DIRECT };
static const struct layout L_ODD4 = { "4seg-odd-sizes", 4, odd4, true, DIRECT };
static const struct layout L_IND12 = { "indirect-12seg", 12, NULL, true, INDIRECT };
static const struct layout L_IND13 = { "indirect-13seg-odd", 13, odd13, true, INDIRECT };
static const struct layout L_IND1 = { "indirect-1seg", 1, NULL, false, INDIRECT };
static const struct layout L_IND3_AT8 = { "indirect-3seg-table-at-8", 3, NULL, true,
                                          INDIRECT_AT_8 };
static const struct layout L_2SEG_IND = { "2seg-indirect-if-negotiated", 2, NULL, true,
                                          INDIRECT_IF_NEGOTIATED };

struct rw_step {
    const char *name;
    int64_t sector; /* < 0: counted from the end (capacity + sector) */
    uint32_t bytes;
    const struct layout *write, *read;
    unsigned tag;
};

static const struct rw_step steps[] = {
    { "512", 0, 512, &L_1SEG, &L_1SEG, 1 },
    { "4k", 1, 4096, &L_1SEG, &L_1SEG_ODD, 1 },
    { "64k", 16, 65536, &L_1SEG, &L_1SEG, 1 },
    { "64k-8seg", 160, 65536, &L_8SEG, &L_1SEG, 1 },
    { "4k-odd-read", 300, 4096, &L_1SEG, &L_ODD5, 1 },
    { "4k-odd-write", 310, 4096, &L_ODD4, &L_1SEG, 1 },
    { "48k-indirect", 320, 49152, &L_IND12, &L_IND13, 1 },
    { "4k-indirect-1seg", 420, 4096, &L_IND1, &L_IND1, 1 },
    { "4k-indirect-table-at-8", 432, 4096, &L_IND3_AT8, &L_IND3_AT8, 1 },
    { "64k-overwrite", 16, 65536, &L_4SEG, &L_1SEG, 2 },
    { "last-8-sectors", -8, 4096, &L_2SEG_IND, &L_1SEG_ODD, 1 },
    { "last-sector", -1, 512, &L_1SEG, &L_1SEG, 2 },
};

/*
 * Regions read again at the end: later writes must not have touched them.  The
 * expected data is that of the last step that wrote the region (and ran).
 */
struct region {
    int64_t sector;
    uint32_t sectors;
};

static const struct region reverify[] = {
    { 0, 1 },   { 1, 8 },   { 16, 8 }, { 136, 8 }, { 300, 8 },
    { 310, 8 }, { 432, 8 }, { 448, 32 }, { -8, 7 }, { -1, 1 },
};

#define STEP_COUNT (sizeof(steps) / sizeof(steps[0]))
static bool step_done[STEP_COUNT];

#define BATCH 4
#define BATCH_SECTOR 448
#define BATCH_BYTES 4096

static struct blk_dev dev NOINIT;
static struct blk_req batch_reqs[BATCH] NOINIT;

static uint64_t resolve(int64_t sector)
{
    return sector < 0 ? dev.capacity - (uint64_t)(-sector) : (uint64_t)sector;
}

static void report_diag(void)
{
    const struct virtq *vq = &dev.vq;
    report(ACTION " diag used-idx=%u last-used=%u avail-idx=%u avail-event=%u used-flags=0x%x "
                  "dev-status=0x%x isr=0x%x kicks=%u kicks-suppressed=%u pending=%u",
           vq_used_idx(vq), vq->last_used, vq->next_avail, *vq->avail_event, *vq->used_flags,
           vm_status(dev.mmio), vm_read(dev.mmio, VIRTIO_MMIO_INTERRUPT_STATUS), vq->kicks,
           vq->kicks_suppressed, dev.pending);
}

static void fail_request(const char *step, const char *op, uint64_t sector, uint32_t bytes,
                         const char *layout, int result)
{
    report(ACTION " FAIL step=%s op=%s sector=%lu bytes=%u layout=%s result=%s", step, op,
           sector, bytes, layout, blk_result_name(result));
    if (result < 0)
        report_diag();
    finish();
}

static void fail_verify(const char *step, uint64_t sector, const uint8_t *got,
                        const uint8_t *want, size_t off)
{
    size_t word = off & ~(size_t)7;
    report(ACTION " FAIL step=%s op=verify sector=%lu offset=%u got=0x%016lx want=0x%016lx",
           step, sector + off / BLK_SECTOR_SIZE, (unsigned)(word % BLK_SECTOR_SIZE),
           load64(got + word), load64(want + word));
    finish();
}

/*
 * Cuts len bytes into segments per layout (and SIZE_MAX), placed in the caller's
 * buffer or scattered in blk_sbuf.  Returns the count, or 0 with *skip set.
 */
static unsigned build_segs(const struct layout *l, uint8_t *logical, uint32_t len,
                           struct blk_seg *segs, const char **skip)
{
    uint32_t sizes[BLK_MAX_SEGS];
    unsigned n = 0;
    uint32_t limit = (dev.accepted & VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX)) && dev.size_max
                         ? dev.size_max
                         : UINT32_MAX;
    for (unsigned i = 0; i < l->nseg; i++) {
        uint32_t size = l->sizes ? l->sizes[i]
                        : i + 1 < l->nseg ? len / l->nseg
                                          : len - (l->nseg - 1) * (len / l->nseg);
        while (size) {
            uint32_t part = size < limit ? size : limit;
            if (n == BLK_MAX_SEGS) {
                *skip = "size-max";
                return 0;
            }
            sizes[n++] = part;
            size -= part;
        }
    }
    if (n > blk_max_segs(&dev)) {
        *skip = n + 2 > dev.vq.size ? "queue-size" : n > BLK_MAX_SEGS ? "driver-limit" : "seg-max";
        return 0;
    }
    if ((l->indirect == INDIRECT || l->indirect == INDIRECT_AT_8) && !dev.indirect) {
        *skip = "indirect-not-negotiated";
        return 0;
    }
    size_t pos = 3; /* odd start, odd gaps */
    uint32_t at = 0;
    for (unsigned i = 0; i < n; i++) {
        segs[i].len = sizes[i];
        segs[i].buf = logical + at;
        at += sizes[i];
    }
    if (l->scatter) {
        for (unsigned i = n; i-- > 0;) {
            segs[i].buf = blk_sbuf + pos;
            pos += sizes[i] + 61;
        }
        if (pos > BLK_SCATTER_SIZE) {
            *skip = "scatter-area";
            return 0;
        }
    }
    return n;
}

/* A write (from logical) or read (into logical) of len bytes with a layout. */
static int transfer(uint32_t type, uint64_t sector, uint8_t *logical, uint32_t len,
                    const struct layout *l, const char **skip)
{
    struct blk_seg segs[BLK_MAX_SEGS];
    unsigned n = build_segs(l, logical, len, segs, skip);
    if (!n)
        return 0;
    bool indirect = l->indirect == INDIRECT || l->indirect == INDIRECT_AT_8 ||
                    (l->indirect == INDIRECT_IF_NEGOTIATED && dev.indirect);
    uint32_t at = 0;
    for (unsigned i = 0; i < n; i++) {
        if (type == VIRTIO_BLK_T_OUT && l->scatter)
            mem_copy(segs[i].buf, logical + at, segs[i].len);
        else if (type != VIRTIO_BLK_T_OUT)
            mem_fill(segs[i].buf, POISON, segs[i].len);
        at += segs[i].len;
    }
    dev.table_offset = l->indirect == INDIRECT_AT_8 ? 8 : 0;
    int st = blk_do(&dev, type, sector, segs, n, indirect);
    dev.table_offset = 0;
    if (st == VIRTIO_BLK_S_OK && type != VIRTIO_BLK_T_OUT && l->scatter) {
        at = 0;
        for (unsigned i = 0; i < n; i++) {
            mem_copy(logical + at, segs[i].buf, segs[i].len);
            at += segs[i].len;
        }
    }
    return st;
}

static void run_step(size_t index)
{
    const struct rw_step *s = &steps[index];
    uint64_t sector = resolve(s->sector);
    uint32_t sectors = s->bytes / BLK_SECTOR_SIZE;
    const char *skip = NULL;
    pattern_fill_tagged(blk_wbuf, sector, sectors, s->tag);
    int st = transfer(VIRTIO_BLK_T_OUT, sector, blk_wbuf, s->bytes, s->write, &skip);
    if (skip) {
        report(ACTION " skip step=%s layout=%s reason=%s", s->name, s->write->name, skip);
        return;
    }
    if (st != VIRTIO_BLK_S_OK)
        fail_request(s->name, "write", sector, s->bytes, s->write->name, st);
    mem_fill(blk_rbuf, POISON, s->bytes);
    st = transfer(VIRTIO_BLK_T_IN, sector, blk_rbuf, s->bytes, s->read, &skip);
    if (skip) {
        /* Written but not readable with that layout: read it plainly instead. */
        report(ACTION " skip step=%s layout=%s reason=%s", s->name, s->read->name, skip);
        skip = NULL;
        st = transfer(VIRTIO_BLK_T_IN, sector, blk_rbuf, s->bytes, &L_1SEG, &skip);
        if (skip) {
            report(ACTION " skip step=%s layout=%s reason=%s", s->name, L_1SEG.name, skip);
            return;
        }
    }
    if (st != VIRTIO_BLK_S_OK)
        fail_request(s->name, "read", sector, s->bytes, s->read->name, st);
    size_t off = mem_diff(blk_rbuf, blk_wbuf, s->bytes);
    if (off < s->bytes)
        fail_verify(s->name, sector, blk_rbuf, blk_wbuf, off);
    step_done[index] = true;
    report(ACTION " step=%s ok sector=%lu bytes=%u", s->name, sector, s->bytes);
}

/*
 * BATCH requests queued before one notification (fewer per round if the ring is
 * short), then waited for together: 1 segment direct, 2 direct, 1 indirect,
 * 4 indirect (direct when INDIRECT_DESC was not negotiated).
 */
static void batch(uint32_t type, uint8_t *base)
{
    static const unsigned nseg[BATCH] = { 1, 2, 1, 4 };
    static const bool use_indirect[BATCH] = { false, false, true, true };
    struct blk_seg segs[BATCH][4];
    for (unsigned k = 0; k < BATCH; k++) {
        uint32_t part = BATCH_BYTES / nseg[k];
        for (unsigned i = 0; i < nseg[k]; i++)
            segs[k][i] = (struct blk_seg){ base + k * BATCH_BYTES + i * part, part };
        if (type != VIRTIO_BLK_T_OUT)
            mem_fill(base + k * BATCH_BYTES, POISON, BATCH_BYTES);
    }
    for (unsigned k = 0; k < BATCH; k++) {
        uint64_t sector = BATCH_SECTOR + k * (BATCH_BYTES / BLK_SECTOR_SIZE);
        bool indirect = use_indirect[k] && dev.indirect;
        int st = blk_submit(&dev, &batch_reqs[k], type, sector, segs[k], nseg[k], indirect);
        if (st == BLK_ERR_SUBMIT && dev.pending) { /* ring full: drain, then retry */
            blk_kick(&dev);
            st = blk_wait_all(&dev);
            if (st)
                fail_request("batch", type == VIRTIO_BLK_T_OUT ? "write" : "read", sector,
                             BATCH_BYTES, "batch", st);
            st = blk_submit(&dev, &batch_reqs[k], type, sector, segs[k], nseg[k], indirect);
        }
        if (st)
            fail_request("batch", "submit", sector, BATCH_BYTES, "batch", st);
    }
    blk_kick(&dev);
    int st = blk_wait_all(&dev);
    if (st)
        fail_request("batch", type == VIRTIO_BLK_T_OUT ? "write" : "read", BATCH_SECTOR,
                     BATCH * BATCH_BYTES, "batch", st);
    for (unsigned k = 0; k < BATCH; k++) {
        if (batch_reqs[k].status != VIRTIO_BLK_S_OK)
            fail_request("batch", type == VIRTIO_BLK_T_OUT ? "write" : "read",
                         batch_reqs[k].hdr.sector, BATCH_BYTES, "batch", batch_reqs[k].status);
    }
}

static void run_batch(void)
{
    uint32_t sectors = BATCH * BATCH_BYTES / BLK_SECTOR_SIZE;
    pattern_fill_tagged(blk_wbuf, BATCH_SECTOR, sectors, 1);
    batch(VIRTIO_BLK_T_OUT, blk_wbuf);
    batch(VIRTIO_BLK_T_IN, blk_rbuf);
    size_t off = mem_diff(blk_rbuf, blk_wbuf, BATCH * BATCH_BYTES);
    if (off < BATCH * BATCH_BYTES)
        fail_verify("batch", BATCH_SECTOR, blk_rbuf, blk_wbuf, off);
    report(ACTION " step=batch ok sector=%u bytes=%u", BATCH_SECTOR, BATCH * BATCH_BYTES);
}

static void run_reverify(void)
{
    unsigned verified = 0;
    for (size_t i = 0; i < sizeof(reverify) / sizeof(reverify[0]); i++) {
        const struct region *r = &reverify[i];
        uint64_t sector = resolve(r->sector);
        uint32_t bytes = r->sectors * BLK_SECTOR_SIZE;
        const char *skip = NULL;
        unsigned tag = 0;
        for (size_t k = 0; k < STEP_COUNT; k++) {
            uint64_t first = resolve(steps[k].sector);
            if (step_done[k] && sector >= first &&
                sector + r->sectors <= first + steps[k].bytes / BLK_SECTOR_SIZE)
                tag = steps[k].tag;
        }
        if (sector == BATCH_SECTOR)
            tag = 1;
        if (!tag)
            continue; /* the step that writes it was skipped */
        pattern_fill_tagged(blk_wbuf, sector, r->sectors, tag);
        mem_fill(blk_rbuf, POISON, bytes);
        int st = transfer(VIRTIO_BLK_T_IN, sector, blk_rbuf, bytes, &L_1SEG, &skip);
        if (skip) {
            report(ACTION " skip step=reverify sector=%lu reason=%s", sector, skip);
            continue;
        }
        if (st != VIRTIO_BLK_S_OK)
            fail_request("reverify", "read", sector, bytes, L_1SEG.name, st);
        size_t off = mem_diff(blk_rbuf, blk_wbuf, bytes);
        if (off < bytes)
            fail_verify("reverify", sector, blk_rbuf, blk_wbuf, off);
        verified++;
    }
    report(ACTION " step=reverify ok regions=%u", verified);
}

/* Requests a correct device must refuse: beyond the end, straddling it, unknown type. */
static void run_error_checks(void)
{
    struct blk_seg seg = { blk_rbuf, BLK_SECTOR_SIZE };
    int beyond = blk_do(&dev, VIRTIO_BLK_T_IN, dev.capacity, &seg, 1, false);
    struct blk_seg seg2 = { blk_rbuf, 2 * BLK_SECTOR_SIZE };
    int straddle = blk_do(&dev, VIRTIO_BLK_T_IN, dev.capacity - 1, &seg2, 1, false);
    int unsupported = blk_do(&dev, 0x4000, 0, NULL, 0, false);
    report(ACTION " beyond-end-status=%s straddle-status=%s unsupported-status=%s",
           blk_result_name(beyond), blk_result_name(straddle), blk_result_name(unsupported));
    if (beyond == VIRTIO_BLK_S_OK || straddle == VIRTIO_BLK_S_OK)
        fail_request(beyond == VIRTIO_BLK_S_OK ? "beyond-end" : "straddle-end", "read",
                     beyond == VIRTIO_BLK_S_OK ? dev.capacity : dev.capacity - 1,
                     seg2.len, L_1SEG.name, 0);
    if (beyond < 0 || straddle < 0 || unsupported < 0)
        fail_request("error-checks", "read", dev.capacity, BLK_SECTOR_SIZE, L_1SEG.name,
                     beyond < 0 ? beyond : straddle < 0 ? straddle : unsupported);
}

void action_blk_rw(void)
{
    struct blk_options opts;
    blk_options_from_cmdline(&opts);
    blk_open_or_finish(&dev, ACTION, &opts);
    uint64_t start = rdtsc();
    report(ACTION " device=%u base=0x%lx capacity=%lu ro=%d offered=0x%lx accepted=0x%lx "
                  "queue-size=%u queue-num-max=%u event-idx=%d indirect=%d seg-max=%u "
                  "size-max=%u blk-size=%u",
           dev.mmio->index, (uint64_t)dev.mmio->base, dev.capacity, dev.ro, dev.offered,
           dev.accepted, dev.vq.size, dev.queue_num_max, dev.event_idx, dev.indirect,
           dev.seg_max, dev.size_max, dev.blk_size);
    if (dev.ro) {
        report(ACTION " FAIL init=read-only");
        finish();
    }
    if (dev.capacity < MIN_CAPACITY) {
        report(ACTION " FAIL init=too-small capacity=%lu need=%u", dev.capacity, MIN_CAPACITY);
        finish();
    }

    for (size_t i = 0; i < STEP_COUNT; i++)
        run_step(i);
    run_batch();
    run_reverify();
    run_error_checks();

    if (dev.flush) {
        int st = blk_do(&dev, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false);
        report(ACTION " flush-status=%s", blk_result_name(st));
        if (st != VIRTIO_BLK_S_OK)
            fail_request("flush", "flush", 0, 0, "none", st);
    } else {
        report(ACTION " flush-status=not-negotiated");
    }

    char serial[VIRTIO_BLK_ID_BYTES + 1];
    int st = blk_get_id(&dev, serial);
    if (st == VIRTIO_BLK_S_OK)
        report("blk-serial=%s", serial);
    else
        report("blk-serial-status=%s", blk_result_name(st));

    report(ACTION " interrupt-status-bit0=%d irq-seen=%u waits=%u kicks=%u kicks-suppressed=%u "
                  "used-len-mismatches=%u",
           dev.irq_seen > 0, dev.irq_seen, dev.waits, dev.vq.kicks, dev.vq.kicks_suppressed,
           dev.used_len_mismatches);
    if (dev.used_len_mismatches)
        report(ACTION " used-len-first-mismatch %s", dev.used_len_first);
    report(ACTION " ok requests=%u bytes=%lu", dev.requests, dev.bytes);
    report(ACTION " elapsed-ms=%lu tsc-khz=%lu tsc-source=%s", tsc_elapsed_ms(start), tsc_khz(),
           tsc_khz_source());
    finish();
}
