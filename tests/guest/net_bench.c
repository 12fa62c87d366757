/*
 * svtest.action=net-bench: the raw frame rate of one NIC (svtest.nic, default 0),
 * for the host to time.  svtest.dir=tx: sends svtest.count frames of svtest.size
 * bytes (ethertype 0x88b5) as fast as the tx queue takes them; dir=rx: receives
 * svtest.count frames of ethertype 0x88b5 (others are ignored).
 *
 * Ring-0 code is emulated on the kvm_pvm host, so the timed loop does little: tx
 * buffers hold their frame (test pattern of seq = buffer index) from before the
 * start line and are only put back into the avail ring; rx buffers are all posted
 * before the start line and each used one is checked (ethertype, length) and put
 * back at once.  Everything found in one look at a used ring is published with
 * one notification at most, when the device asks for it.  Interrupts are
 * suppressed (NO_INTERRUPT, or used_event far ahead with EVENT_IDX).  Registers
 * are read only while nothing completes (Status, every 10 ms of idleness).
 */
#include "actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "io.h"
#include "net_actions.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define ACTION "net-bench"
#define IDLE_SPINS 1024
#define STATUS_POLL_MS 10

static struct net_dev bench_dev NOINIT;

struct bench_result {
    uint32_t frames, errors, ignored;
    uint64_t bytes;
    const char *fail; /* NULL, "timeout", "needs-reset" */
};

/* Idle polling: the TSC every IDLE_SPINS empty looks, Status every STATUS_POLL_MS. */
struct poller {
    unsigned spins;
    uint64_t last_progress, status_check, timeout_ticks;
};

/*
 * Spins until the used idx of vq moves past what was consumed; returns it in *used,
 * or false when the run must end (timeout or DEVICE_NEEDS_RESET, noted in r).
 */
static bool wait_used(struct net_dev *n, struct virtq *vq, struct poller *p,
                      struct bench_result *r, uint16_t *used)
{
    while ((*used = *vq->used_idx) == vq->last_used) {
        if (++p->spins < IDLE_SPINS) {
            cpu_relax();
            continue;
        }
        p->spins = 0;
        uint64_t now = rdtsc();
        if (now - p->last_progress > p->timeout_ticks) {
            r->fail = "timeout";
            return false;
        }
        if ((int64_t)(now - p->status_check) >= 0) {
            if (vm_status(n->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
                r->fail = "needs-reset";
                return false;
            }
            p->status_check = now + STATUS_POLL_MS * tsc_khz();
        }
    }
    barrier(); /* x86: the used elements are read after the idx */
    return true;
}

static void bench_tx(struct net_dev *n, uint32_t size, uint32_t count, uint64_t timeout_ticks,
                     struct bench_result *r)
{
    struct virtq *vq = &n->tx;
    uint16_t size_q = vq->size;
    for (uint16_t i = 0; i < size_q; i++)
        vq->desc[i].len = NET_HDR_LEN + size;
    uint32_t queued = 0, done = 0;
    struct poller p = { 0, rdtsc(), rdtsc(), timeout_ticks };
    /* Fill the queue once, then put every completed buffer straight back. */
    for (uint16_t i = 0; i < size_q && queued < count; i++, queued++)
        vq_publish(vq, i);
    if (vq_kick_needed(vq))
        vm_notify(n->mmio, NET_TXQ);
    uint16_t used;
    while (done < count && wait_used(n, vq, &p, r, &used)) {
        bool refilled = false;
        while (vq->last_used != used) {
            uint32_t id = vq->used_ring[vq->last_used % size_q].id;
            vq->last_used++;
            done++;
            if (id >= size_q) {
                r->errors++;
                continue;
            }
            if (queued < count) {
                vq_publish(vq, (uint16_t)id);
                queued++;
                refilled = true;
            }
        }
        p.last_progress = rdtsc();
        if (refilled && vq_kick_needed(vq))
            vm_notify(n->mmio, NET_TXQ);
    }
    r->frames = done - r->errors;
    r->bytes = (uint64_t)r->frames * size;
}

static void bench_rx(struct net_dev *n, uint32_t size, uint32_t count, uint64_t timeout_ticks,
                     struct bench_result *r)
{
    struct virtq *vq = &n->rx;
    uint16_t size_q = vq->size;
    struct poller p = { 0, rdtsc(), rdtsc(), timeout_ticks };
    uint32_t extra = 0; /* buffers still to skip of a merged frame */
    uint16_t used;
    while (r->frames < count && wait_used(n, vq, &p, r, &used)) {
        while (vq->last_used != used && r->frames < count) {
            volatile struct vq_used_elem *e = &vq->used_ring[vq->last_used % size_q];
            uint32_t id = e->id, len = e->len;
            vq->last_used++;
            if (id >= size_q) {
                r->errors++;
                continue;
            }
            const uint8_t *buf = n->rxbuf + id * NET_BUF_SIZE;
            if (extra) {
                extra--;
            } else if (len < NET_HDR_LEN + NET_ETH_HLEN) {
                r->errors++;
            } else {
                uint16_t buffers = n->mrg_rxbuf ? ((const struct virtio_net_hdr_v1 *)buf)->num_buffers
                                                : 1;
                if (buffers > 1)
                    extra = buffers - 1u;
                if (net_frame_type(buf + NET_HDR_LEN) != NET_ETHERTYPE) {
                    r->ignored++;
                } else {
                    r->frames++;
                    r->bytes += len - NET_HDR_LEN;
                    if (len - NET_HDR_LEN != size && buffers == 1)
                        r->errors++;
                }
            }
            vq_publish(vq, (uint16_t)id);
        }
        p.last_progress = rdtsc();
        if (vq_kick_needed(vq))
            vm_notify(n->mmio, NET_RXQ);
    }
}

void action_net_bench(void)
{
    const char *cl = boot_info.cmdline;
    struct net_options opts;
    net_options_from_cmdline(&opts);
    opts.irq = false;
    struct net_dev *n = &bench_dev;
    unsigned nic = (unsigned)cmdline_get_u64(cl, "svtest.nic", 0);
    net_open_or_finish(n, ACTION, nic, 0, &opts);
    char dir[8] = "tx";
    cmdline_get_str(cl, "svtest.dir", dir, sizeof(dir));
    bool tx = strcmp(dir, "tx") == 0;
    if (!tx && strcmp(dir, "rx") != 0) {
        report(ACTION " FAIL dir=%s", dir);
        finish();
    }
    uint64_t size = cmdline_get_u64(cl, "svtest.size", 64);
    uint64_t count = cmdline_get_u64(cl, "svtest.count", 10000);
    if (size < NET_MIN_FRAME || size > NET_MAX_FRAME || count == 0 || count > 0xffffffffu) {
        report(ACTION " FAIL size=%lu count=%lu min-size=%u max-size=%u", size, count,
               NET_MIN_FRAME, NET_MAX_FRAME);
        finish();
    }
    if (tx) {
        for (uint16_t i = 0; i < n->tx.size; i++)
            net_frame_build(n->txbuf + (uint32_t)i * NET_BUF_SIZE + NET_HDR_LEN,
                            (uint32_t)size, net_broadcast, n->mac, i);
    } else {
        for (uint16_t i = 0; i < n->rx.size; i++) {
            n->rx_posted[i] = true;
            vq_publish(&n->rx, i);
        }
        net_kick(n, NET_RXQ);
    }
    char mac[18];
    net_format_mac(n->mac, mac);
    report(ACTION " config nic=%u mac=%s link=%s queue-size=%u event-idx=%d mrg-rxbuf=%d "
           "accepted=0x%016lx tsc-khz=%lu tsc-source=%s",
           nic, mac, net_link_status(n) & VIRTIO_NET_S_LINK_UP ? "up" : "down",
           tx ? n->tx.size : n->rx.size, n->tx.event_idx, n->mrg_rxbuf, n->accepted, tsc_khz(),
           tsc_khz_source());
    uint64_t timeout_ticks = (uint64_t)n->timeout_ms * tsc_khz();
    struct bench_result r = { 0 };
    report(ACTION " start dir=%s size=%lu count=%lu", dir, size, count);
    uint64_t t0 = rdtsc();
    if (tx)
        bench_tx(n, (uint32_t)size, (uint32_t)count, timeout_ticks, &r);
    else
        bench_rx(n, (uint32_t)size, (uint32_t)count, timeout_ticks, &r);
    uint64_t ticks = rdtsc() - t0;
    report(ACTION " done frames=%u bytes=%lu errors=%u", r.frames, r.bytes, r.errors);
    if (r.fail)
        report(ACTION " FAIL result=%s frames=%u", r.fail, r.frames);
    struct virtq *vq = tx ? &n->tx : &n->rx;
    report(ACTION " guest-ms=%lu tsc-ticks=%lu notifies=%u ignored=%u", ticks / tsc_khz(), ticks,
           vq->kicks, r.ignored);
    finish();
}
