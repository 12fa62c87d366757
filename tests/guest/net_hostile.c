/*
 * svtest.action=net-hostile: a guest that breaks the virtqueue and net rules on
 * purpose, on NIC svtest.nic (default 0), whose tap has a host peer that reflects
 * test frames (tests/net_peer.py echo).
 *
 * For each case: reset and initialise the NIC normally (no rx buffer posted),
 * write one malformed chain straight into the rx or tx ring, notify; an rx case
 * then sends one valid frame for the peer to reflect into the bad buffer.  Poll
 * (the target's used idx every iteration, Status every millisecond) for at most
 * svtest.hostile_ms (500) milliseconds, until the used idx moves or
 * DEVICE_NEEDS_RESET shows.  Report what the device did, check it wrote nothing it
 * must not (canaries around the buffers, the descriptor table and avail ring),
 * then reset, initialise again and do one round trip through the peer.
 *
 * svtest.hostile=<case>|all; svtest.hostile_other=<nic>: afterwards a round trip on
 * that NIC too; svtest.hostile_blk=<n>: and a 4 KiB read of the n-th virtio-blk device checked
 * against the host pattern with svtest.seed (default 0); svtest.hostile_end=halt:
 * halt at the end instead of resetting (so the host can talk to the monitor).
 */
#include "actions.h"
#include "blk_actions.h"
#include "blk_pattern.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "io.h"
#include "net_actions.h"
#include "platform.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define ACTION "net-hostile"
#define OOB_ADDR 0x7fff00000000ull
#define OVERFLOW_ADDR 0xfffffffffffff000ull
#define CANARY 0xc5
#define STATUS_POLL_US 1000
#define GRACE_MS 20
#define PING_MS 2000
#define NONE ~0ull

/* Buffers of the malformed chains, canary bytes between them. */
#define H_FRAME 0x100  /* virtio header + a 64-byte test frame, device-readable */
#define H_FRAME_LEN (NET_HDR_LEN + 64)
#define H_RX0 0x400    /* rx buffers the device may write */
#define H_RX1 0x900
#define H_RX_LEN 0x400
#define H_SIZE 0x1000
static uint8_t hmem[H_SIZE] __attribute__((aligned(4096))) NOINIT;
static uint8_t hsaved[H_SIZE] NOINIT;
static uint8_t ring_saved[VQ_USED_OFFSET] NOINIT;

/* tx-huge-chain: an indirect table of HUGE_SEGS descriptors, the frame 1 byte each. */
#define HUGE_SEGS 1100
static struct vq_desc huge_table[HUGE_SEGS] __attribute__((aligned(16))) NOINIT;
static uint8_t huge_frame[HUGE_SEGS] NOINIT;

static const struct {
    uint32_t start, end;
} writable[] = {
    { H_RX0, H_RX0 + H_RX_LEN },
    { H_RX1, H_RX1 + H_RX_LEN },
};

static struct net_dev dev NOINIT;
static struct net_dev other NOINIT;
static struct net_options opts;
static unsigned nic;
static uint32_t ping_seq = 0x1000;

enum target { TX, RX, STATUS };

struct hostile_case {
    const char *name;
    enum target target;
    void (*build)(struct net_dev *n, struct virtq *vq);
    const char *(*unusable)(const struct net_dev *n);
};

static uint64_t addr(uint32_t off)
{
    return (uintptr_t)hmem + off;
}

static void put(struct vq_desc *d, uint64_t a, uint32_t len, uint16_t flags, uint16_t next)
{
    *d = (struct vq_desc){ .addr = a, .len = len, .flags = flags, .next = next };
}

static void one(struct virtq *vq, uint64_t a, uint32_t len, uint16_t flags)
{
    put(&vq->desc[0], a, len, flags, 0);
    vq_publish(vq, 0);
}

static void build_tx_oob_addr(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, OOB_ADDR, H_FRAME_LEN, 0);
}

static void build_tx_addr_overflow(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, OVERFLOW_ADDR, 0x2000, 0);
}

static void build_tx_zero_len(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, addr(H_FRAME), 0, 0);
}

static void build_tx_short_header(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, addr(H_FRAME), 8, 0);
}

static void build_tx_writable(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, addr(H_RX0), H_FRAME_LEN, VQ_DESC_F_WRITE);
}

/* header -> first half -> second half -> (back to the first half) ... */
static void build_tx_desc_loop(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    put(&vq->desc[0], addr(H_FRAME), NET_HDR_LEN, VQ_DESC_F_NEXT, 1);
    put(&vq->desc[1], addr(H_FRAME + NET_HDR_LEN), 32, VQ_DESC_F_NEXT, 2);
    put(&vq->desc[2], addr(H_FRAME + NET_HDR_LEN + 32), 32, VQ_DESC_F_NEXT, 1);
    vq_publish(vq, 0);
}

/* Every descriptor chained in order, the last pointing back to the head. */
static void build_tx_chain_too_long(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    for (uint16_t i = 0; i < vq->size; i++)
        put(&vq->desc[i], addr(H_FRAME), 4, VQ_DESC_F_NEXT, (uint16_t)((i + 1) % vq->size));
    vq_publish(vq, 0);
}

static void build_tx_bad_next(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    put(&vq->desc[0], addr(H_FRAME), H_FRAME_LEN, VQ_DESC_F_NEXT, vq->size);
    vq_publish(vq, 0);
}

static void build_tx_bad_head(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    put(&vq->desc[0], addr(H_FRAME), H_FRAME_LEN, 0, 0);
    vq_publish(vq, vq->size);
}

/* Valid frames everywhere, but avail idx runs queue size + 3 ahead. */
static void build_tx_avail_idx_jump(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    for (uint16_t i = 0; i < vq->size; i++) {
        put(&vq->desc[i], addr(H_FRAME), H_FRAME_LEN, 0, 0);
        vq->avail_ring[i] = i;
    }
    vq->next_avail = (uint16_t)(vq->size + 3);
    mb();
    *vq->avail_idx = vq->next_avail;
}

/* A well-formed frame in 1100 one-byte segments of an indirect table (> 1024). */
static void build_tx_huge_chain(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    mem_copy(huge_frame, hmem + H_FRAME, NET_HDR_LEN);
    net_frame_build(huge_frame + NET_HDR_LEN, HUGE_SEGS - NET_HDR_LEN, net_broadcast,
                    n->mac, 0x7fffffff);
    for (uint16_t i = 0; i < HUGE_SEGS; i++)
        put(&huge_table[i], (uintptr_t)&huge_frame[i], 1,
            i + 1 < HUGE_SEGS ? VQ_DESC_F_NEXT : 0, (uint16_t)(i + 1));
    put(&vq->desc[0], (uintptr_t)huge_table, sizeof(huge_table), VQ_DESC_F_INDIRECT, 0);
    vq_publish(vq, 0);
}

static const char *needs_indirect(const struct net_dev *n)
{
    return n->accepted & VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC) ? NULL : "indirect-not-negotiated";
}

static void build_rx_zero_len(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, addr(H_RX0), 0, VQ_DESC_F_WRITE);
}

static void build_rx_short(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, addr(H_RX0), 8, VQ_DESC_F_WRITE);
}

static void build_rx_readonly(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, addr(H_RX0), H_RX_LEN, 0);
}

static void build_rx_oob_addr(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    one(vq, OOB_ADDR, H_RX_LEN, VQ_DESC_F_WRITE);
}

/* Two small writable buffers chained to each other, no end. */
static void build_rx_desc_loop(struct net_dev *n, struct virtq *vq)
{
    (void)n;
    put(&vq->desc[0], addr(H_RX0), 16, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 1);
    put(&vq->desc[1], addr(H_RX1), 16, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 0);
    vq_publish(vq, 0);
}

/* Status rewritten without DRIVER_OK and set again (only a write of 0 resets). */
static void build_driver_ok_toggle(struct net_dev *n, struct virtq *vq)
{
    (void)vq;
    uint32_t st = vm_status(n->mmio);
    vm_write(n->mmio, VIRTIO_MMIO_STATUS, st & ~(uint32_t)VIRTIO_STATUS_DRIVER_OK);
    vm_write(n->mmio, VIRTIO_MMIO_STATUS, st);
}

/* The Status it reads written back as it is, as a careless driver might. */
static void build_status_write_back(struct net_dev *n, struct virtq *vq)
{
    (void)vq;
    vm_write(n->mmio, VIRTIO_MMIO_STATUS, vm_status(n->mmio));
}

static const struct hostile_case cases[] = {
    { "tx-oob-addr", TX, build_tx_oob_addr, NULL },
    { "tx-addr-overflow", TX, build_tx_addr_overflow, NULL },
    { "tx-zero-len", TX, build_tx_zero_len, NULL },
    { "tx-short-header", TX, build_tx_short_header, NULL },
    { "tx-writable", TX, build_tx_writable, NULL },
    { "tx-desc-loop", TX, build_tx_desc_loop, NULL },
    { "tx-chain-too-long", TX, build_tx_chain_too_long, NULL },
    { "tx-bad-next", TX, build_tx_bad_next, NULL },
    { "tx-bad-head", TX, build_tx_bad_head, NULL },
    { "tx-avail-idx-jump", TX, build_tx_avail_idx_jump, NULL },
    { "tx-huge-chain", TX, build_tx_huge_chain, needs_indirect },
    { "rx-zero-len", RX, build_rx_zero_len, NULL },
    { "rx-short", RX, build_rx_short, NULL },
    { "rx-readonly", RX, build_rx_readonly, NULL },
    { "rx-oob-addr", RX, build_rx_oob_addr, NULL },
    { "rx-desc-loop", RX, build_rx_desc_loop, NULL },
    { "driver-ok-toggle", STATUS, build_driver_ok_toggle, NULL },
    { "status-write-back", STATUS, build_status_write_back, NULL },
};

#define NCASES (sizeof(cases) / sizeof(cases[0]))

static void prepare_memory(const struct net_dev *n)
{
    mem_fill(hmem, CANARY, H_SIZE);
    mem_fill(hmem + H_FRAME, 0, NET_HDR_LEN);
    net_frame_build(hmem + H_FRAME + NET_HDR_LEN, 64, net_broadcast, n->mac, 0x7ffffffe);
}

/* "ok", or "clobbered@0x<offset>" for the first byte the device must not have written. */
static void check_canary(char *out, size_t size)
{
    uint32_t start = 0;
    for (unsigned w = 0; w <= sizeof(writable) / sizeof(writable[0]); w++) {
        uint32_t end = w < sizeof(writable) / sizeof(writable[0]) ? writable[w].start : H_SIZE;
        size_t off = mem_diff(hmem + start, hsaved + start, end - start);
        if (off < end - start) {
            ksnprintf(out, size, "clobbered@0x%lx", (uint64_t)(start + off));
            return;
        }
        if (w < sizeof(writable) / sizeof(writable[0]))
            start = writable[w].end;
    }
    ksnprintf(out, size, "ok");
}

static void init_or_report(struct net_dev *n, const char *name)
{
    const char *why = net_init(n, n->mmio, nic, 0, &opts);
    if (why) {
        report(ACTION " %s FAIL init=%s", name, why);
        finish();
    }
}

static void recover(struct net_dev *n, const char *name)
{
    if (!vm_reset(n->mmio, 500)) {
        report(ACTION " %s recovered=0 reason=reset-timeout status=0x%x", name,
               vm_status(n->mmio));
        return;
    }
    const char *why = net_init(n, n->mmio, nic, 0, &opts);
    if (why) {
        report(ACTION " %s recovered=0 reason=init=%s", name, why);
        return;
    }
    net_post_rx(n);
    char reason[64];
    if (net_ping(n, ping_seq++, PING_MS, reason, sizeof(reason)))
        report(ACTION " %s recovered=1", name);
    else
        report(ACTION " %s recovered=0 reason=%s", name, reason);
}

static void run_case(struct net_dev *n, const struct hostile_case *c, uint64_t wait_ms)
{
    init_or_report(n, c->name);
    const char *skip = c->unusable ? c->unusable(n) : NULL;
    if (skip) {
        report(ACTION " %s skip reason=%s", c->name, skip);
        return;
    }
    struct virtq *vq = c->target == RX ? &n->rx : &n->tx;
    unsigned q = c->target == RX ? NET_RXQ : NET_TXQ;
    prepare_memory(n);
    c->build(n, vq);
    mem_copy(hsaved, hmem, H_SIZE);
    mem_copy(ring_saved, (void *)vq->page, VQ_USED_OFFSET);
    uint16_t used_before = *vq->used_idx;
    char served[48] = "";
    if (c->target == STATUS) {
        /* The "request" is an ordinary round trip on the rewritten device. */
        net_post_rx(n);
        char why[40];
        bool ok = net_ping(n, ping_seq++, PING_MS, why, sizeof(why));
        ksnprintf(served, sizeof(served), " served=%d%s%s", ok, ok ? "" : " why=", ok ? "" : why);
    } else {
        vm_notify(n->mmio, q);
        if (c->target == RX) {
            /* Something for the peer to reflect into the bad buffer. */
            uint16_t id;
            uint8_t *frame = net_tx_frame(n, &id);
            if (frame) {
                net_frame_build(frame, 64, net_broadcast, n->mac, ping_seq++);
                net_queue_tx(n, id, 64);
                net_kick(n, NET_TXQ);
            }
        }
    }
    uint64_t start = rdtsc(), deadline = tsc_deadline_ms(wait_ms);
    uint64_t status_check = tsc_deadline_us(STATUS_POLL_US);
    bool broken = false;
    while (c->target != STATUS && *vq->used_idx == used_before && !tsc_passed(deadline)) {
        if (tsc_passed(status_check)) {
            if (vm_status(n->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
                broken = true;
                break;
            }
            status_check = tsc_deadline_us(STATUS_POLL_US);
        }
        cpu_relax();
    }
    uint64_t waited = tsc_elapsed_ms(start);
    bool config_irq = false, vring_irq = false;
    uint64_t grace = tsc_deadline_ms(GRACE_MS);
    uint32_t status;
    do {
        uint32_t isr = vm_ack_interrupts(n->mmio);
        config_irq |= (isr & VIRTIO_MMIO_INT_CONFIG) != 0;
        vring_irq |= (isr & VIRTIO_MMIO_INT_VRING) != 0;
        status = vm_status(n->mmio);
        if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
            broken = true;
        tsc_delay_us(1000);
    } while (!tsc_passed(grace));
    char canary[32], used[48] = "";
    check_canary(canary, sizeof(canary));
    bool ring_intact =
        c->target == STATUS || mem_diff(ring_saved, (void *)vq->page, VQ_USED_OFFSET) ==
                                   VQ_USED_OFFSET;
    uint16_t used_now = *vq->used_idx;
    if (used_now != used_before) {
        volatile struct vq_used_elem *e = &vq->used_ring[used_before % vq->size];
        ksnprintf(used, sizeof(used), " used-id=%u used-len=%u", e->id, e->len);
    }
    report(ACTION " %s status=0x%x needs-reset=%d config-irq=%d vring-irq=%d used-idx=%u "
           "waited-ms=%lu canary=%s ring-intact=%d%s%s",
           c->name, status, broken, config_irq, vring_irq, used_now, waited, canary,
           ring_intact, used, served);
    recover(n, c->name);
}

static void check_other_nic(uint64_t other_nic)
{
    unsigned count;
    int index = net_find((unsigned)other_nic, &count);
    if (index < 0) {
        report(ACTION " other-nic=%lu FAIL init=no-device nics=%u", other_nic, count);
        return;
    }
    const char *why = net_init(&other, &virtio_devs[index], (unsigned)other_nic, 1, &opts);
    if (why) {
        report(ACTION " other-nic=%lu FAIL init=%s", other_nic, why);
        return;
    }
    net_post_rx(&other);
    char reason[64];
    if (net_ping(&other, ping_seq++, PING_MS, reason, sizeof(reason)))
        report(ACTION " other-nic=%lu ok", other_nic);
    else
        report(ACTION " other-nic=%lu FAIL %s", other_nic, reason);
    vm_reset(other.mmio, 200);
}

static void check_disk(uint64_t index)
{
    struct blk_options bopts;
    blk_options_from_cmdline(&bopts);
    static struct blk_dev disk NOINIT;
    /* index counts block devices only, as svtest.nic counts NICs. */
    unsigned tokens = virtio_devices_discover(), seen = 0;
    const struct virtio_mmio_dev *m = NULL;
    for (unsigned i = 0; i < tokens && i < VIRTIO_MMIO_MAX_DEVICES && !m; i++) {
        const struct virtio_mmio_dev *d = &virtio_devs[i];
        if (d->parsed && vm_read(d, VIRTIO_MMIO_MAGIC) == VIRTIO_MMIO_MAGIC_VALUE &&
            blk_device_id(d) == VIRTIO_ID_BLOCK && seen++ == index)
            m = d;
    }
    if (!m) {
        report(ACTION " disk=%lu FAIL init=no-device disks=%u", index, seen);
        return;
    }
    const char *why = blk_init(&disk, m, &bopts);
    if (why) {
        report(ACTION " disk=%lu FAIL init=%s", index, why);
        return;
    }
    uint64_t seed = cmdline_get_u64(boot_info.cmdline, "svtest.seed", 0);
    mem_fill(blk_rbuf, 0xdb, 4096);
    struct blk_seg seg = { blk_rbuf, 4096 };
    int st = blk_do(&disk, VIRTIO_BLK_T_IN, 0, &seg, 1, false);
    if (st != VIRTIO_BLK_S_OK) {
        report(ACTION " disk=%lu FAIL read=%s", index, blk_result_name(st));
    } else {
        size_t off = pattern_check_host(blk_rbuf, 0, 8, seed);
        if (off < 4096)
            report(ACTION " disk=%lu FAIL mismatch offset=%lu", index, (uint64_t)off);
        else
            report(ACTION " disk=%lu ok", index);
    }
    vm_reset(disk.mmio, 200);
}

void action_net_hostile(void)
{
    const char *cl = boot_info.cmdline;
    net_options_from_cmdline(&opts);
    nic = (unsigned)cmdline_get_u64(cl, "svtest.nic", 0);
    uint64_t wait_ms = cmdline_get_u64(cl, "svtest.hostile_ms", 500);
    uint64_t other_nic = cmdline_get_u64(cl, "svtest.hostile_other", NONE);
    uint64_t disk = cmdline_get_u64(cl, "svtest.hostile_blk", NONE);
    char which[32] = "all", end[8] = "reset";
    cmdline_get_str(cl, "svtest.hostile", which, sizeof(which));
    cmdline_get_str(cl, "svtest.hostile_end", end, sizeof(end));

    struct net_dev *n = &dev;
    net_open_or_finish(n, ACTION, nic, 0, &opts);
    net_post_rx(n);
    char why[64];
    if (!net_ping(n, ping_seq++, PING_MS, why, sizeof(why))) {
        report(ACTION " FAIL baseline %s", why);
        finish();
    }
    char mac[18];
    net_format_mac(n->mac, mac);
    report(ACTION " nic=%u mac=%s queue-size=%u event-idx=%d indirect=%d mrg-rxbuf=%d wait-ms=%lu",
           nic, mac, n->tx.size, n->tx.event_idx,
           (n->accepted & VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC)) != 0, n->mrg_rxbuf, wait_ms);
    unsigned ran = 0;
    for (unsigned i = 0; i < NCASES; i++) {
        if (strcmp(which, "all") != 0 && strcmp(which, cases[i].name) != 0)
            continue;
        run_case(n, &cases[i], wait_ms);
        ran++;
    }
    if (!ran) {
        report(ACTION " FAIL unknown-case=%s", which);
        finish();
    }
    vm_reset(n->mmio, 200);
    if (other_nic != NONE)
        check_other_nic(other_nic);
    if (disk != NONE)
        check_disk(disk);
    report(ACTION " done cases=%u", ran);
    if (strcmp(end, "halt") == 0)
        platform_halt_forever();
    finish();
}
