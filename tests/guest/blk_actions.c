/*
 * virtio-blk actions for the host's tests: blk-write-pattern, blk-read-pattern,
 * blk-read-hex, blk-ro-check, blk-watch; and what all blk actions share.
 */
#include "blk_actions.h"

#include "actions.h"
#include "blk_pattern.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

uint8_t blk_wbuf[BLK_BUF_SIZE] __attribute__((aligned(4096))) NOINIT;
uint8_t blk_rbuf[BLK_BUF_SIZE] __attribute__((aligned(4096))) NOINIT;
uint8_t blk_sbuf[BLK_SCATTER_SIZE] __attribute__((aligned(4096))) NOINIT;

struct virtio_mmio_dev virtio_devs[VIRTIO_MMIO_MAX_DEVICES] NOINIT;

#define POISON 0xdb
#define MAX_CHUNK_SECTORS (BLK_BUF_SIZE / BLK_SECTOR_SIZE)

unsigned virtio_devices_discover(void)
{
    return virtio_mmio_discover(boot_info.cmdline, virtio_devs, VIRTIO_MMIO_MAX_DEVICES);
}

void blk_options_from_cmdline(struct blk_options *opts)
{
    const char *cl = boot_info.cmdline;
    opts->event_idx = cmdline_get_u64(cl, "svtest.event_idx", 1) != 0;
    opts->indirect = cmdline_get_u64(cl, "svtest.indirect", 1) != 0;
    opts->discard = false;
    opts->queue_size = (uint16_t)cmdline_get_u64(cl, "svtest.queue_size", BLK_QUEUE_SIZE);
    opts->timeout_ms = (unsigned)cmdline_get_u64(cl, "svtest.timeout_ms", 5000);
}

void blk_open_or_finish(struct blk_dev *b, const char *action, const struct blk_options *opts)
{
    unsigned count = virtio_devices_discover();
    uint64_t index = cmdline_get_u64(boot_info.cmdline, "svtest.blk", 0);
    if (index >= count || index >= VIRTIO_MMIO_MAX_DEVICES) {
        report("%s FAIL init=no-device index=%lu devices=%u", action, index, count);
        finish();
    }
    const char *why = blk_init(b, &virtio_devs[index], opts);
    if (why) {
        report("%s FAIL init=%s index=%lu", action, why, index);
        finish();
    }
}

bool blk_check_4k(struct blk_dev *b, uint64_t sector, unsigned tag, char *why, size_t why_size)
{
    const uint32_t len = 4096;
    if (b->capacity < sector + len / BLK_SECTOR_SIZE) {
        ksnprintf(why, why_size, "capacity=%lu", b->capacity);
        return false;
    }
    pattern_fill_tagged(blk_wbuf, sector, len / BLK_SECTOR_SIZE, tag);
    struct blk_seg wseg = { blk_wbuf, len }, rseg = { blk_rbuf, len };
    int st = blk_do(b, VIRTIO_BLK_T_OUT, sector, &wseg, 1, false);
    if (st != VIRTIO_BLK_S_OK) {
        ksnprintf(why, why_size, "write=%s", blk_result_name(st));
        return false;
    }
    mem_fill(blk_rbuf, POISON, len);
    st = blk_do(b, VIRTIO_BLK_T_IN, sector, &rseg, 1, false);
    if (st != VIRTIO_BLK_S_OK) {
        ksnprintf(why, why_size, "read=%s", blk_result_name(st));
        return false;
    }
    size_t off = mem_diff(blk_rbuf, blk_wbuf, len);
    if (off < len) {
        ksnprintf(why, why_size, "mismatch offset=%lu", (uint64_t)off);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------ pattern actions */

struct range {
    uint64_t sector, count, seed;
};

static struct range range_from_cmdline(const struct blk_dev *b, const char *action)
{
    const char *cl = boot_info.cmdline;
    struct range r = {
        .sector = cmdline_get_u64(cl, "svtest.sector", 0),
        .count = cmdline_get_u64(cl, "svtest.count", 1),
        .seed = cmdline_get_u64(cl, "svtest.seed", 0),
    };
    if (r.count == 0 || r.sector >= b->capacity || r.count > b->capacity - r.sector) {
        report("%s FAIL range sector=%lu count=%lu capacity=%lu", action, r.sector, r.count,
               b->capacity);
        finish();
    }
    return r;
}

/* Sectors in the next chunk of a range: a whole buffer, or what is left. */
static uint32_t next_chunk(const struct range *r, uint64_t done)
{
    return r->count - done > MAX_CHUNK_SECTORS ? MAX_CHUNK_SECTORS : (uint32_t)(r->count - done);
}

/* One request on a chunk; a failure is reported and ends the run. */
static void chunk_io_or_finish(struct blk_dev *b, const char *action, uint32_t type,
                               uint64_t sector, uint8_t *buf, uint32_t n)
{
    struct blk_seg seg = { buf, n * BLK_SECTOR_SIZE };
    int st = blk_do(b, type, sector, &seg, 1, false);

    if (st != VIRTIO_BLK_S_OK) {
        report("%s FAIL sector=%lu count=%u status=%s", action, sector, n, blk_result_name(st));
        finish();
    }
}

void action_blk_write_pattern(void)
{
    static const char action[] = "blk-write-pattern";
    struct blk_options opts;
    struct blk_dev b;
    blk_options_from_cmdline(&opts);
    blk_open_or_finish(&b, action, &opts);
    struct range r = range_from_cmdline(&b, action);
    /* svtest.flush_every=N: a FLUSH after every N chunks, and the sector below which
     * everything was written and flushed, for a host that kills the monitor then. */
    uint64_t flush_every = cmdline_get_u64(boot_info.cmdline, "svtest.flush_every", 0);
    uint64_t chunks = 0;
    for (uint64_t done = 0; done < r.count;) {
        uint32_t n = next_chunk(&r, done);
        pattern_fill_host(blk_wbuf, r.sector + done, n, r.seed);
        chunk_io_or_finish(&b, action, VIRTIO_BLK_T_OUT, r.sector + done, blk_wbuf, n);
        done += n;
        if (flush_every && b.flush && ++chunks % flush_every == 0) {
            int st = blk_do(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false);
            if (st != VIRTIO_BLK_S_OK) {
                report("%s FAIL flush=%s", action, blk_result_name(st));
                finish();
            }
            report("%s flushed upto=%lu", action, r.sector + done);
        }
    }
    const char *flush = "not-negotiated";
    if (b.flush) {
        int st = blk_do(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false);
        flush = blk_result_name(st);
    }
    report("%s ok sector=%lu count=%lu seed=%lu flush=%s", action, r.sector, r.count, r.seed,
           flush);
    finish();
}

void action_blk_read_pattern(void)
{
    static const char action[] = "blk-read-pattern";
    struct blk_options opts;
    struct blk_dev b;
    blk_options_from_cmdline(&opts);
    blk_open_or_finish(&b, action, &opts);
    struct range r = range_from_cmdline(&b, action);
    for (uint64_t done = 0; done < r.count;) {
        uint32_t n = next_chunk(&r, done);
        uint32_t len = n * BLK_SECTOR_SIZE;
        mem_fill(blk_rbuf, POISON, len);
        chunk_io_or_finish(&b, action, VIRTIO_BLK_T_IN, r.sector + done, blk_rbuf, n);
        size_t off = pattern_check_host(blk_rbuf, r.sector + done, n, r.seed);
        if (off < len) {
            uint64_t sector = r.sector + done + off / BLK_SECTOR_SIZE;
            unsigned i = (unsigned)(off % BLK_SECTOR_SIZE);
            uint8_t want = (uint8_t)(r.seed * 131 + sector * 7 + i);
            report("%s mismatch sector=%lu offset=%u got=0x%02x want=0x%02x", action, sector,
                   i, blk_rbuf[off], want);
            finish();
        }
        done += n;
    }
    report("%s ok sector=%lu count=%lu seed=%lu", action, r.sector, r.count, r.seed);
    finish();
}

void action_blk_read_hex(void)
{
    static const char action[] = "blk-read-hex";
    struct blk_options opts;
    struct blk_dev b;
    blk_options_from_cmdline(&opts);
    blk_open_or_finish(&b, action, &opts);
    uint64_t sector = cmdline_get_u64(boot_info.cmdline, "svtest.sector", 0);
    if (sector >= b.capacity) {
        report("%s FAIL range sector=%lu capacity=%lu", action, sector, b.capacity);
        finish();
    }
    mem_fill(blk_rbuf, POISON, BLK_SECTOR_SIZE);
    struct blk_seg seg = { blk_rbuf, BLK_SECTOR_SIZE };
    int st = blk_do(&b, VIRTIO_BLK_T_IN, sector, &seg, 1, false);
    if (st != VIRTIO_BLK_S_OK) {
        report("%s FAIL sector=%lu status=%s", action, sector, blk_result_name(st));
        finish();
    }
    char hex[65];
    for (unsigned i = 0; i < 32; i++)
        ksnprintf(hex + 2 * i, 3, "%02x", blk_rbuf[i]);
    report("%s sector=%lu data=%s", action, sector, hex);
    finish();
}

/* ------------------------------------------------------------ read-only disk */

void action_blk_ro_check(void)
{
    static const char action[] = "blk-ro";
    struct blk_options opts;
    struct blk_dev b;
    blk_options_from_cmdline(&opts);
    blk_open_or_finish(&b, action, &opts);
    if (b.capacity == 0) {
        report("%s FAIL capacity=0", action);
        finish();
    }
    uint32_t len = b.capacity >= 8 ? 4096 : BLK_SECTOR_SIZE;
    struct blk_seg rseg = { blk_rbuf, len }, wseg = { blk_wbuf, len };

    mem_fill(blk_rbuf, POISON, len);
    int read1 = blk_do(&b, VIRTIO_BLK_T_IN, 0, &rseg, 1, false);
    mem_copy(blk_sbuf, blk_rbuf, len);

    pattern_fill_tagged(blk_wbuf, 0, len / BLK_SECTOR_SIZE, 0x52);
    int write = blk_do(&b, VIRTIO_BLK_T_OUT, 0, &wseg, 1, false);

    mem_fill(blk_rbuf, POISON, len);
    int read2 = blk_do(&b, VIRTIO_BLK_T_IN, 0, &rseg, 1, false);
    bool unchanged = read1 == VIRTIO_BLK_S_OK && read2 == VIRTIO_BLK_S_OK &&
                     mem_diff(blk_rbuf, blk_sbuf, len) == len;

    char write_status[16];
    if (write >= 0)
        ksnprintf(write_status, sizeof(write_status), "%d", write);
    else
        strlcpy(write_status, blk_result_name(write), sizeof(write_status));
    const char *read = read1 != VIRTIO_BLK_S_OK ? blk_result_name(read1)
                       : read2 != VIRTIO_BLK_S_OK ? blk_result_name(read2)
                                                  : "ok";
    report("%s write-status=%s read=%s unchanged=%d ro-feature=%d bytes=%u", action,
           write_status, read, unchanged, b.ro, len);
    finish();
}

/* ------------------------------------------------------------ hot-plug watch */

/*
 * Polls capacity, ConfigGeneration and InterruptStatus (5 VM exits) every
 * svtest.poll_us (default 2000) microseconds.
 */
void action_blk_watch(void)
{
    static const char action[] = "blk-watch";
    const char *cl = boot_info.cmdline;
    struct blk_options opts;
    struct blk_dev b;
    blk_options_from_cmdline(&opts);
    blk_open_or_finish(&b, action, &opts);
    uint64_t want_changes = cmdline_get_u64(cl, "svtest.changes", 1);
    uint64_t poll_us = cmdline_get_u64(cl, "svtest.poll_us", 2000);
    uint64_t limit_ms = cmdline_get_u64(cl, "svtest.watch_ms", 0);
    uint64_t start = rdtsc();

    bool irq = vm_ack_interrupts(b.mmio) & VIRTIO_MMIO_INT_CONFIG;
    uint32_t generation;
    uint64_t capacity = vm_config64(b.mmio, VIRTIO_BLK_CFG_CAPACITY, &generation);
    report("%s capacity=%lu generation=%u config-irq=%d status=0x%x", action, capacity,
           generation, irq, vm_status(b.mmio));
    irq = false;
    uint64_t changes = 0;
    while (changes < want_changes) {
        tsc_delay_us(poll_us);
        if (vm_ack_interrupts(b.mmio) & VIRTIO_MMIO_INT_CONFIG)
            irq = true;
        uint64_t now = vm_config64(b.mmio, VIRTIO_BLK_CFG_CAPACITY, &generation);
        if (now != capacity) {
            /* The interrupt may follow the config update by a moment. */
            uint64_t grace = tsc_deadline_ms(20);
            while (!irq && !tsc_passed(grace)) {
                tsc_delay_us(500);
                if (vm_ack_interrupts(b.mmio) & VIRTIO_MMIO_INT_CONFIG)
                    irq = true;
            }
            capacity = now;
            changes++;
            report("%s capacity=%lu generation=%u config-irq=%d status=0x%x", action, capacity,
                   generation, irq, vm_status(b.mmio));
            irq = false;
        }
        if (limit_ms && tsc_elapsed_ms(start) >= limit_ms) {
            report("%s timeout changes=%lu", action, changes);
            finish();
        }
    }
    report("%s done changes=%lu", action, changes);
    finish();
}
