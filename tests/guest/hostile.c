/*
 * svtest.action=hostile: a guest that breaks the virtqueue rules on purpose.
 *
 * svtest.hostile=<case>|all, svtest.blk=<index> (a disk with at least 16 sectors;
 * read-2g-aliased needs 2 GiB).  For each case: reset and initialise the disk
 * normally, write one malformed request straight into the rings, notify, then
 * poll (used idx in memory every iteration; Status every millisecond) for at most
 * svtest.hostile_ms (default 500) milliseconds, until the device answers (used
 * idx moves) or marks itself broken (DEVICE_NEEDS_RESET).  Then report what the
 * device did, check that it wrote nothing it must not (canaries around the
 * buffers, descriptor table, avail ring, indirect tables), reset it, initialise it
 * again and run one 4 KiB write + read + verify.  With svtest.hostile_other=<index>,
 * the same check then runs on that other disk.  svtest.hostile_end=halt leaves the
 * guest halted after the last case instead of resetting (for the host to go on
 * talking to the monitor).
 *
 * The requests are reads (VIRTIO_BLK_T_IN) of sector 0 into 512-byte buffers
 * (or DISCARDs of sector 0), so a device that does serve one only writes guest
 * buffers.
 */
#include "actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "io.h"
#include "platform.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define ACTION "hostile"
#define OOB_ADDR 0x7fff00000000ull           /* far outside any guest RAM */
#define OVERFLOW_ADDR 0xfffffffffffff000ull /* + OVERFLOW_LEN wraps past 2^64 */
#define OVERFLOW_LEN 0x2000u
#define RECOVERY_SECTOR 8
#define CANARY 0xc5
#define STATUS_POLL_US 1000
#define GRACE_MS 20
#define NO_OTHER_DISK ~0ull

/* Buffers of the malformed requests, with canary bytes between them. */
#define H_HDR 0x100
#define H_STATUS 0x140
#define H_DATA0 0x200
#define H_DATA1 0x500
#define H_TABLE 0x800  /* 64 descriptors */
#define H_TABLE2 0xc00 /* 16 descriptors */
#define H_SIZE 0x2000
static uint8_t hmem[H_SIZE] __attribute__((aligned(4096))) NOINIT;
static uint8_t hsaved[H_SIZE] NOINIT;      /* hmem as submitted */
static uint8_t ring_saved[VQ_PAGE_SIZE] NOINIT; /* queue page as submitted */

/* Ranges of hmem the device may write: the status byte and the two data buffers. */
static const struct {
    uint32_t start, end;
} writable[] = {
    { H_STATUS, H_STATUS + 1 },
    { H_DATA0, H_DATA0 + 512 },
    { H_DATA1, H_DATA1 + 512 },
};

/* discard-aliased: a table of ALIASES + 2 entries, ALIASES of them naming one
 * page of DISCARD segments (256000 segments in all). */
#define ALIASES 1000
static struct vq_desc alias_table[ALIASES + 2] __attribute__((aligned(16))) NOINIT;
static uint8_t segment_page[4096] __attribute__((aligned(4096))) NOINIT;

/* read-2g-aliased: READ_ALIASES buffers of READ_ALIAS_BYTES, all at READ_ALIAS_ADDR
 * (guest RAM this program does not use), 2 GiB in all. */
#define READ_ALIAS_ADDR (16ull << 20)
#define READ_ALIAS_BYTES (64u << 20)
#define READ_ALIASES 32
#define READ_ALIAS_POISON 0x77
#define READ_ALIAS_CHECKED 4096

static struct blk_dev dev NOINIT;
static struct blk_dev other_dev NOINIT;
static struct blk_options opts;

struct hostile_case {
    const char *name;
    void (*build)(struct virtq *vq);
    /* Optional: why the case cannot run on this machine (NULL: it can). */
    const char *(*unusable)(void);
    /* Optional: more "key=value" facts for the report line. */
    void (*check)(char *out, size_t size);
};

static uint64_t addr(uint32_t off)
{
    return (uintptr_t)hmem + off;
}

static struct vq_desc *table(uint32_t off)
{
    return (struct vq_desc *)(hmem + off);
}

static void put(struct vq_desc *d, uint64_t a, uint32_t len, uint16_t flags, uint16_t next)
{
    *d = (struct vq_desc){ .addr = a, .len = len, .flags = flags, .next = next };
}

static void put_hdr(struct vq_desc *d, uint16_t next)
{
    put(d, addr(H_HDR), sizeof(struct blk_req_header), VQ_DESC_F_NEXT, next);
}

static void put_status(struct vq_desc *d)
{
    put(d, addr(H_STATUS), 1, VQ_DESC_F_WRITE, 0);
}

/* hdr -> data0 (W) -> status (W) in descriptors 0, 1, 2: a well-formed read. */
static void valid_chain(struct virtq *vq)
{
    put_hdr(&vq->desc[0], 1);
    put(&vq->desc[1], addr(H_DATA0), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 2);
    put_status(&vq->desc[2]);
}

static void build_desc_loop(struct virtq *vq)
{
    put_hdr(&vq->desc[0], 1);
    put(&vq->desc[1], addr(H_DATA0), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 2);
    put(&vq->desc[2], addr(H_DATA1), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 1);
    vq_publish(vq, 0);
}

/* Every descriptor of the table chained in order, the last pointing back to the head. */
static void build_chain_too_long(struct virtq *vq)
{
    put_hdr(&vq->desc[0], 1);
    for (uint16_t i = 1; i < vq->size; i++)
        put(&vq->desc[i], addr(i & 1 ? H_DATA0 : H_DATA1), 512,
            VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, (uint16_t)((i + 1) % vq->size));
    vq_publish(vq, 0);
}

static void build_data_desc(struct virtq *vq, uint64_t a, uint32_t len)
{
    valid_chain(vq);
    vq->desc[1].addr = a;
    vq->desc[1].len = len;
    vq_publish(vq, 0);
}

static void build_oob_addr(struct virtq *vq)
{
    build_data_desc(vq, OOB_ADDR, 512);
}

static void build_addr_overflow(struct virtq *vq)
{
    build_data_desc(vq, OVERFLOW_ADDR, OVERFLOW_LEN);
}

/* 4 KiB below the top of RAM (below 4 GiB), 4 GiB - 1 long: runs far past the end of RAM. */
static void build_huge_len(struct virtq *vq)
{
    uint64_t top = guest_ram_top_below_4g();
    build_data_desc(vq, top >= 0x1000000 ? top - 0x1000 : addr(H_DATA0), 0xffffffffu);
}

static void build_bad_next(struct virtq *vq)
{
    valid_chain(vq);
    vq->desc[0].next = vq->size;
    vq_publish(vq, 0);
}

static void indirect_head(struct virtq *vq, uint64_t table_addr, uint32_t len)
{
    put(&vq->desc[0], table_addr, len, VQ_DESC_F_INDIRECT, 0);
    vq_publish(vq, 0);
}

/* hdr -> data0 -> status as entries 0..2 of the indirect table. */
static void valid_table(struct vq_desc *t)
{
    put_hdr(&t[0], 1);
    put(&t[1], addr(H_DATA0), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 2);
    put_status(&t[2]);
}

static void build_indirect_loop(struct virtq *vq)
{
    struct vq_desc *t = table(H_TABLE);
    put_hdr(&t[0], 1);
    put(&t[1], addr(H_DATA0), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 2);
    put(&t[2], addr(H_DATA1), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 1);
    put_status(&t[3]);
    indirect_head(vq, addr(H_TABLE), 4 * sizeof(struct vq_desc));
}

static void build_indirect_oob(struct virtq *vq)
{
    indirect_head(vq, OOB_ADDR, 4 * sizeof(struct vq_desc));
}

static void build_indirect_bad_len(struct virtq *vq)
{
    valid_table(table(H_TABLE));
    indirect_head(vq, addr(H_TABLE), 24);
}

static void build_indirect_zero_len(struct virtq *vq)
{
    valid_table(table(H_TABLE));
    indirect_head(vq, addr(H_TABLE), 0);
}

/* A well-formed indirect table of queue size + 8 entries (the spec's limit is the queue size). */
static void build_indirect_oversized(struct virtq *vq)
{
    struct vq_desc *t = table(H_TABLE);
    unsigned n = vq->size + 8u;
    if (n > (H_TABLE2 - H_TABLE) / sizeof(struct vq_desc))
        n = (H_TABLE2 - H_TABLE) / sizeof(struct vq_desc);
    put_hdr(&t[0], 1);
    for (unsigned i = 1; i + 1 < n; i++)
        put(&t[i], addr(i & 1 ? H_DATA0 : H_DATA1), 512, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT,
            (uint16_t)(i + 1));
    put_status(&t[n - 1]);
    indirect_head(vq, addr(H_TABLE), n * (uint32_t)sizeof(struct vq_desc));
}

static void build_nested_indirect(struct virtq *vq)
{
    struct vq_desc *t = table(H_TABLE), *t2 = table(H_TABLE2);
    put(&t2[0], addr(H_DATA0), 512, VQ_DESC_F_WRITE, 0);
    put_hdr(&t[0], 1);
    put(&t[1], addr(H_TABLE2), sizeof(struct vq_desc), VQ_DESC_F_INDIRECT | VQ_DESC_F_NEXT, 2);
    put_status(&t[2]);
    indirect_head(vq, addr(H_TABLE), 3 * sizeof(struct vq_desc));
}

/* Every ring entry names the valid chain at 0, and idx claims size + 3 new entries. */
static void build_avail_idx_jump(struct virtq *vq)
{
    valid_chain(vq);
    for (uint16_t i = 0; i < vq->size; i++)
        vq->avail_ring[i] = 0;
    barrier();
    *vq->avail_idx = (uint16_t)(vq->size + 3);
}

static void build_bad_head(struct virtq *vq)
{
    valid_chain(vq);
    vq_publish(vq, vq->size);
}

static void build_status_readonly(struct virtq *vq)
{
    valid_chain(vq);
    vq->desc[2].flags = 0;
    vq_publish(vq, 0);
}

static void build_no_status(struct virtq *vq)
{
    put(&vq->desc[0], addr(H_HDR), sizeof(struct blk_req_header), 0, 0);
    vq_publish(vq, 0);
}

static void build_short_header(struct virtq *vq)
{
    valid_chain(vq);
    vq->desc[0].len = 8;
    vq_publish(vq, 0);
}

/* DISCARD with ALIASES descriptors of 4 KiB, all naming one page of segments. */
static void build_discard_aliased(struct virtq *vq)
{
    struct blk_req_header *hdr = (struct blk_req_header *)(hmem + H_HDR);
    struct { uint64_t sector; uint32_t num_sectors, flags; } segment = { 0, 1, 0 };
    hdr->type = VIRTIO_BLK_T_DISCARD;
    for (size_t off = 0; off < sizeof(segment_page); off += sizeof(segment))
        mem_copy(segment_page + off, &segment, sizeof(segment));
    put_hdr(&alias_table[0], 1);
    for (uint16_t i = 1; i <= ALIASES; i++)
        put(&alias_table[i], (uintptr_t)segment_page, sizeof(segment_page), VQ_DESC_F_NEXT,
            (uint16_t)(i + 1));
    put_status(&alias_table[ALIASES + 1]);
    indirect_head(vq, (uintptr_t)alias_table, sizeof(alias_table));
}

static const char *read_2g_unusable(void)
{
    if (guest_ram_top_below_4g() < READ_ALIAS_ADDR + READ_ALIAS_BYTES)
        return "ram";
    if (dev.capacity < (uint64_t)READ_ALIASES * READ_ALIAS_BYTES / BLK_SECTOR_SIZE)
        return "capacity";
    return NULL;
}

/* A 2 GiB read of sector 0: READ_ALIASES buffers that all alias one area. */
static void build_read_2g_aliased(struct virtq *vq)
{
    struct vq_desc *t = table(H_TABLE);
    mem_fill((void *)(uintptr_t)READ_ALIAS_ADDR, READ_ALIAS_POISON, READ_ALIAS_CHECKED);
    put_hdr(&t[0], 1);
    for (uint16_t i = 1; i <= READ_ALIASES; i++)
        put(&t[i], READ_ALIAS_ADDR, READ_ALIAS_BYTES, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT,
            (uint16_t)(i + 1));
    put_status(&t[READ_ALIASES + 1]);
    indirect_head(vq, addr(H_TABLE), (READ_ALIASES + 2) * (uint32_t)sizeof(struct vq_desc));
}

/* alias-intact=1: the start of the aliased area still holds the poison (no data landed). */
static void check_read_2g_aliased(char *out, size_t size)
{
    const uint8_t *area = (const uint8_t *)(uintptr_t)READ_ALIAS_ADDR;
    size_t n = 0;
    while (n < READ_ALIAS_CHECKED && area[n] == READ_ALIAS_POISON)
        n++;
    ksnprintf(out, size, " alias-intact=%d", n == READ_ALIAS_CHECKED);
}

/*
 * A valid read, served; then Status written with DRIVER_OK cleared and set again.
 * Only a write of 0 resets a device: a device that took the second write as a new
 * DRIVER_OK would serve the read once more (the status byte, preset to 0xff again,
 * would change).
 */
static void build_driver_ok_toggle(struct virtq *vq)
{
    const struct virtio_mmio_dev *m = dev.mmio;
    valid_chain(vq);
    vq_publish(vq, 0);
    mb();
    vm_notify(m, 0);
    uint64_t deadline = tsc_deadline_ms(GRACE_MS * 10);
    while (vq_used_idx(vq) == 0 && !tsc_passed(deadline))
        cpu_relax();
    vm_ack_interrupts(m);
    hmem[H_STATUS] = 0xff;
    uint32_t status = vm_status(m);
    vm_write(m, VIRTIO_MMIO_STATUS, status & ~VIRTIO_STATUS_DRIVER_OK);
    vm_write(m, VIRTIO_MMIO_STATUS, status);
}

static const struct hostile_case cases[] = {
    { "desc-loop", build_desc_loop, NULL, NULL },
    { "chain-too-long", build_chain_too_long, NULL, NULL },
    { "oob-addr", build_oob_addr, NULL, NULL },
    { "addr-overflow", build_addr_overflow, NULL, NULL },
    { "huge-len", build_huge_len, NULL, NULL },
    { "bad-next", build_bad_next, NULL, NULL },
    { "indirect-loop", build_indirect_loop, NULL, NULL },
    { "indirect-oob", build_indirect_oob, NULL, NULL },
    { "indirect-bad-len", build_indirect_bad_len, NULL, NULL },
    { "indirect-zero-len", build_indirect_zero_len, NULL, NULL },
    { "indirect-oversized", build_indirect_oversized, NULL, NULL },
    { "nested-indirect", build_nested_indirect, NULL, NULL },
    { "avail-idx-jump", build_avail_idx_jump, NULL, NULL },
    { "bad-head", build_bad_head, NULL, NULL },
    { "status-readonly", build_status_readonly, NULL, NULL },
    { "no-status", build_no_status, NULL, NULL },
    { "short-header", build_short_header, NULL, NULL },
    { "discard-aliased", build_discard_aliased, NULL, NULL },
    { "read-2g-aliased", build_read_2g_aliased, read_2g_unusable, check_read_2g_aliased },
    { "driver-ok-toggle", build_driver_ok_toggle, NULL, NULL },
};
#define CASE_COUNT (sizeof(cases) / sizeof(cases[0]))

static void init_or_finish(const char *what)
{
    const char *why = blk_init(&dev, dev.mmio, &opts);
    if (why) {
        report(ACTION " %s FAIL init=%s", what, why);
        finish();
    }
}

static bool may_write(uint32_t off)
{
    for (size_t i = 0; i < sizeof(writable) / sizeof(writable[0]); i++) {
        if (off >= writable[i].start && off < writable[i].end)
            return true;
    }
    return false;
}

/* First offset of hmem the device changed outside the writable ranges, or -1. */
static int32_t clobbered(void)
{
    for (uint32_t off = 0; off < H_SIZE;) {
        size_t n = mem_diff(hmem + off, hsaved + off, H_SIZE - off);
        if (off + n >= H_SIZE)
            return -1;
        off += (uint32_t)n;
        if (!may_write(off))
            return (int32_t)off;
        off++;
    }
    return -1;
}

/* The same 4 KiB check on the other disk: the victim's troubles must not reach it. */
static void check_other_disk(const struct hostile_case *c, unsigned number, uint64_t index)
{
    char why[64] = "ok";
    vm_reset(dev.mmio, 500); /* both drivers use the one ring page */
    const char *err = blk_init(&other_dev, &virtio_devs[index], &opts);
    if (err)
        ksnprintf(why, sizeof(why), "init=%s", err);
    else
        blk_check_4k(&other_dev, RECOVERY_SECTOR, 0x80 + number, why, sizeof(why));
    vm_reset(other_dev.mmio, 500);
    report(ACTION " %s other-disk=%s", c->name, why);
}

static void run_case(unsigned number, const struct hostile_case *c, uint64_t wait_ms,
                     uint64_t other)
{
    init_or_finish(c->name);
    struct virtq *vq = &dev.vq;
    const struct virtio_mmio_dev *m = dev.mmio;
    const char *unusable = c->unusable ? c->unusable() : NULL;
    if (unusable) {
        report(ACTION " %s skip reason=%s", c->name, unusable);
        return;
    }

    mem_fill(hmem, CANARY, H_SIZE);
    struct blk_req_header *hdr = (struct blk_req_header *)(hmem + H_HDR);
    *hdr = (struct blk_req_header){ .type = VIRTIO_BLK_T_IN, .reserved = 0, .sector = 0 };
    hmem[H_STATUS] = 0xff;
    c->build(vq);
    mem_copy(hsaved, hmem, H_SIZE);
    mem_copy(ring_saved, (void *)vq->page, VQ_USED_OFFSET);
    mb();
    vm_notify(m, 0);

    uint64_t start = rdtsc(), deadline = tsc_deadline_ms(wait_ms);
    uint64_t status_check = 0;
    uint32_t status = 0, isr = 0;
    bool answered = false, broken = false;
    while (!tsc_passed(deadline)) {
        if (vq_used_idx(vq) != 0) {
            answered = true;
            break;
        }
        if (tsc_passed(status_check)) {
            status = vm_status(m);
            if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
                broken = true;
                break;
            }
            status_check = tsc_deadline_us(STATUS_POLL_US);
        }
        cpu_relax();
    }
    uint64_t waited = tsc_elapsed_ms(start);
    /* Let the device finish what it does next (interrupt, status change). */
    uint64_t grace = tsc_deadline_ms(GRACE_MS);
    do {
        isr |= vm_ack_interrupts(m);
        status = vm_status(m);
        if ((status & VIRTIO_STATUS_DEVICE_NEEDS_RESET) && (isr & VIRTIO_MMIO_INT_CONFIG))
            break;
        if (answered && (isr & VIRTIO_MMIO_INT_VRING))
            break;
        tsc_delay_us(STATUS_POLL_US);
    } while (!tsc_passed(grace));
    broken = status & VIRTIO_STATUS_DEVICE_NEEDS_RESET;
    uint16_t used_idx = vq_used_idx(vq);

    char used[48] = "";
    if (used_idx != 0)
        ksnprintf(used, sizeof(used), " used-id=%u used-len=%u", vq->used_ring[0].id,
                  vq->used_ring[0].len);
    int32_t bad = clobbered();
    char canary[32] = "ok";
    if (bad >= 0)
        ksnprintf(canary, sizeof(canary), "clobbered@0x%x", (unsigned)bad);
    bool ring_intact = mem_diff((void *)vq->page, ring_saved, VQ_USED_OFFSET) == VQ_USED_OFFSET;
    char extra[48] = "";
    if (c->check)
        c->check(extra, sizeof(extra));
    report(ACTION " %s status=0x%x needs-reset=%d config-irq=%d used-idx=%u vring-irq=%d "
                  "req-status=0x%02x waited-ms=%lu canary=%s ring-intact=%d%s%s",
           c->name, status, broken, (isr & VIRTIO_MMIO_INT_CONFIG) != 0, used_idx,
           (isr & VIRTIO_MMIO_INT_VRING) != 0, hmem[H_STATUS], waited, canary, ring_intact,
           used, extra);

    /* Recovery: reset, check it took, initialise again, one normal request. */
    char why[64] = "";
    bool ok = vm_reset(m, 500);
    if (!ok)
        ksnprintf(why, sizeof(why), "reset-timeout status=0x%x", vm_status(m));
    if (ok) {
        const char *err = blk_init(&dev, m, &opts);
        if (err) {
            ok = false;
            ksnprintf(why, sizeof(why), "init=%s", err);
        }
    }
    if (ok)
        ok = blk_check_4k(&dev, RECOVERY_SECTOR, 0x40 + number, why, sizeof(why));
    if (ok)
        report(ACTION " %s recovered=1", c->name);
    else
        report(ACTION " %s recovered=0 reason=%s", c->name, why);
    if (other != NO_OTHER_DISK)
        check_other_disk(c, number, other);
}

void action_hostile(void)
{
    const char *cl = boot_info.cmdline;
    char which[32] = "all", end[8] = "reset";
    cmdline_get_str(cl, "svtest.hostile", which, sizeof(which));
    cmdline_get_str(cl, "svtest.hostile_end", end, sizeof(end));
    uint64_t wait_ms = cmdline_get_u64(cl, "svtest.hostile_ms", 500);
    uint64_t other = cmdline_get_u64(cl, "svtest.hostile_other", NO_OTHER_DISK);
    blk_options_from_cmdline(&opts);
    opts.indirect = true; /* the indirect cases need it (they use the flag regardless) */
    opts.discard = true;  /* and discard-aliased DISCARD */
    blk_open_or_finish(&dev, ACTION, &opts);
    if (other != NO_OTHER_DISK && (other >= virtio_devices_discover() ||
                                   other >= VIRTIO_MMIO_MAX_DEVICES || other == dev.mmio->index)) {
        report(ACTION " FAIL init=bad-other-disk index=%lu", other);
        finish();
    }
    if (dev.capacity < RECOVERY_SECTOR + 8) {
        report(ACTION " FAIL init=too-small capacity=%lu need=%u", dev.capacity,
               RECOVERY_SECTOR + 8);
        finish();
    }
    char why[64];
    if (!blk_check_4k(&dev, RECOVERY_SECTOR, 0x3f, why, sizeof(why))) {
        report(ACTION " FAIL baseline %s", why);
        finish();
    }
    report(ACTION " device=%u queue-size=%u event-idx=%d indirect=%d wait-ms=%lu ram-top=0x%lx",
           dev.mmio->index, dev.vq.size, dev.event_idx, dev.indirect, wait_ms,
           guest_ram_top_below_4g());
    bool all = strcmp(which, "all") == 0;
    unsigned ran = 0;
    for (unsigned i = 0; i < CASE_COUNT; i++) {
        if (all || strcmp(which, cases[i].name) == 0) {
            run_case(i, &cases[i], wait_ms, other);
            ran++;
        }
    }
    if (!ran)
        report(ACTION " FAIL unknown-case=%s", which);
    else
        report(ACTION " done cases=%u", ran);
    if (ran && strcmp(end, "halt") == 0)
        platform_halt_forever();
    finish();
}
