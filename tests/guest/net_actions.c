/*
 * virtio-net actions for the host's tests: net-info, net-send, net-recv, net-echo,
 * net-watch (README.md, "virtio-net actions"); and what all net actions share.
 */
#include "net_actions.h"

#include "actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "io.h"
#include "printf.h"
#include "serial.h"
#include "string.h"
#include "tsc.h"

#define MAX_PROBLEM_LINES 16
#define FOREVER_MS 0xffffffffu

uint8_t net_frame_buf[NET_PATTERN_MAX] __attribute__((aligned(64))) NOINIT;

static struct net_dev nic_dev NOINIT;

void net_open_or_finish(struct net_dev *n, const char *action, unsigned nic, unsigned slot,
                        const struct net_options *opts)
{
    unsigned nics;
    int index = net_find(nic, &nics);
    if (index < 0) {
        report("%s FAIL init=no-device nic=%u nics=%u", action, nic, nics);
        finish();
    }
    const char *why = net_init(n, &virtio_devs[index], nic, slot, opts);
    if (why) {
        report("%s FAIL init=%s nic=%u", action, why, nic);
        finish();
    }
    net_pattern_init();
}

static unsigned nic_from_cmdline(void)
{
    return (unsigned)cmdline_get_u64(boot_info.cmdline, "svtest.nic", 0);
}

static const char *link_name(const struct net_dev *n)
{
    return net_link_status(n) & VIRTIO_NET_S_LINK_UP ? "up" : "down";
}

int net_send_frames(struct net_dev *n, const uint8_t dst[6], uint32_t size, uint32_t count,
                    uint32_t first_seq)
{
    uint32_t queued = 0;
    while (queued < count) {
        unsigned batch = 0;
        uint16_t id;
        uint8_t *frame;
        while (queued < count && (frame = net_tx_frame(n, &id))) {
            net_frame_build(frame, size, dst, n->mac, first_seq + queued);
            net_queue_tx(n, id, size);
            queued++;
            batch++;
        }
        if (batch)
            net_kick(n, NET_TXQ);
        int err = net_wait_tx_free(n, 1);
        if (err)
            return err;
    }
    return net_wait_tx(n);
}

bool net_ping(struct net_dev *n, uint32_t seq, unsigned timeout_ms, char *why, size_t why_size)
{
    int err = net_send_frames(n, net_broadcast, 64, 1, seq);
    if (err) {
        ksnprintf(why, why_size, "send=%s", net_result_name(err));
        return false;
    }
    uint64_t deadline = tsc_deadline_ms(timeout_ms);
    for (;;) {
        uint32_t len;
        err = net_recv(n, net_frame_buf, sizeof(net_frame_buf), &len, timeout_ms);
        if (err) {
            ksnprintf(why, why_size, "recv=%s", net_result_name(err));
            return false;
        }
        if (len >= NET_MIN_FRAME && net_frame_type(net_frame_buf) == NET_ETHERTYPE &&
            net_frame_seq(net_frame_buf) == seq) {
            if (len != 64 || net_frame_check(net_frame_buf, len) != len) {
                ksnprintf(why, why_size, "echo-corrupt len=%u", len);
                return false;
            }
            return true;
        }
        if (tsc_passed(deadline)) {
            ksnprintf(why, why_size, "recv=timeout");
            return false;
        }
    }
}

/* ------------------------------------------------------------ net-info */

void action_net_info(void)
{
    static const char action[] = "net-info";
    struct net_options opts;
    net_options_from_cmdline(&opts);
    unsigned nics;
    net_find(0, &nics);
    for (unsigned nic = 0; nic < nics; nic++) {
        int index = net_find(nic, NULL);
        const struct virtio_mmio_dev *m = &virtio_devs[index];
        const char *why = net_init(&nic_dev, m, nic, 0, &opts);
        if (why) {
            report("%s nic=%u index=%d base=0x%lx irq=%u FAIL init=%s", action, nic, index,
                   (uint64_t)m->base, m->irq, why);
            vm_reset(m, 200);
            continue;
        }
        struct net_dev *n = &nic_dev;
        char mac[18];
        net_format_mac(n->mac, mac);
        uint16_t link = net_link_status(n);
        report("%s nic=%u index=%d base=0x%lx irq=%u mac=%s link=%s link-status=0x%x "
               "offered=0x%016lx accepted=0x%016lx mrg-rxbuf=%d event-idx=%d rx-queue-size=%u "
               "tx-queue-size=%u queue-num-max=%u/%u",
               action, nic, index, (uint64_t)m->base, m->irq, mac,
               link & VIRTIO_NET_S_LINK_UP ? "up" : "down", link, n->offered, n->accepted,
               n->mrg_rxbuf, n->rx.event_idx, n->rx.size, n->tx.size, n->rx_num_max,
               n->tx_num_max);
        vm_reset(m, 200);
    }
    report("%s nics=%u", action, nics);
    finish();
}

/* ------------------------------------------------------------ net-send */

static uint32_t size_from_cmdline(const char *action, uint32_t fallback, uint32_t max)
{
    uint64_t size = cmdline_get_u64(boot_info.cmdline, "svtest.size", fallback);
    if (size < NET_MIN_FRAME || size > max) {
        report("%s FAIL size=%lu min=%u max=%u", action, size, NET_MIN_FRAME, max);
        finish();
    }
    return (uint32_t)size;
}

void action_net_send(void)
{
    static const char action[] = "net-send";
    struct net_options opts;
    net_options_from_cmdline(&opts);
    struct net_dev *n = &nic_dev;
    net_open_or_finish(n, action, nic_from_cmdline(), 0, &opts);
    uint32_t size = size_from_cmdline(action, 64, NET_MAX_FRAME);
    uint32_t count = (uint32_t)cmdline_get_u64(boot_info.cmdline, "svtest.count", 1);
    char mac[18];
    net_format_mac(n->mac, mac);
    report("%s nic=%u mac=%s link=%s size=%u count=%u", action, n->nic, mac, link_name(n),
           size, count);
    int err = net_send_frames(n, net_broadcast, size, count, 0);
    if (err) {
        report("%s FAIL result=%s sent=%u", action, net_result_name(err), n->frames_sent);
        finish();
    }
    report("%s done frames=%u bytes=%lu", action, n->frames_sent,
           (uint64_t)n->frames_sent * size);
    finish();
}

/* ------------------------------------------------------------ net-recv */

void action_net_recv(void)
{
    static const char action[] = "net-recv";
    const char *cl = boot_info.cmdline;
    struct net_options opts;
    net_options_from_cmdline(&opts);
    struct net_dev *n = &nic_dev;
    net_open_or_finish(n, action, nic_from_cmdline(), 0, &opts);
    uint32_t count = (uint32_t)cmdline_get_u64(cl, "svtest.count", 1);
    uint64_t rxdelay = cmdline_get_u64(cl, "svtest.rxdelay", 0);
    char mac[18];
    net_format_mac(n->mac, mac);
    if (rxdelay) {
        /* No rx buffer yet: what the host sends meanwhile must wait, not vanish. */
        report("%s holding nic=%u mac=%s rxdelay=%lu", action, n->nic, mac, rxdelay);
        tsc_delay_us(rxdelay * 1000);
    }
    unsigned posted = net_post_rx(n);
    report("%s ready nic=%u mac=%s link=%s buffers=%u", action, n->nic, mac, link_name(n),
           posted);
    uint32_t frames = 0, bad = 0, ignored = 0, problems = 0;
    uint64_t bytes = 0;
    while (frames < count) {
        uint32_t len;
        int err = net_recv(n, net_frame_buf, sizeof(net_frame_buf), &len, 0);
        if (err) {
            report("%s FAIL result=%s frames=%u bad=%u", action, net_result_name(err), frames,
                   bad);
            finish();
        }
        if (len < NET_ETH_HLEN || net_frame_type(net_frame_buf) != NET_ETHERTYPE) {
            ignored++;
            continue;
        }
        const char *why = NULL;
        uint32_t seq = len >= NET_MIN_FRAME ? net_frame_seq(net_frame_buf) : 0;
        uint32_t off = len;
        if (len < NET_MIN_FRAME)
            why = "short";
        else if (seq != frames)
            why = "seq";
        else if (len > sizeof(net_frame_buf))
            why = "too-long";
        else if ((off = net_frame_check(net_frame_buf, len)) != len)
            why = "pattern";
        if (why) {
            bad++;
            if (problems++ < MAX_PROBLEM_LINES)
                report("%s bad frame=%u seq=%u want-seq=%u len=%u why=%s offset=%u", action,
                       frames, seq, frames, len, why, off);
        }
        frames++;
        bytes += len;
    }
    report("%s done frames=%u bad=%u ignored=%u bytes=%lu rx-buffers=%u", action, frames, bad,
           ignored, bytes, n->rx_buffers_used);
    finish();
}

/* ------------------------------------------------------------ net-echo */

void action_net_echo(void)
{
    static const char action[] = "net-echo";
    struct net_options opts;
    net_options_from_cmdline(&opts);
    struct net_dev *n = &nic_dev;
    net_open_or_finish(n, action, nic_from_cmdline(), 0, &opts);
    char mac[18];
    net_format_mac(n->mac, mac);
    unsigned posted = net_post_rx(n);
    report("%s ready nic=%u mac=%s link=%s buffers=%u", action, n->nic, mac, link_name(n),
           posted);
    uint32_t echoed = 0, ignored = 0;
    for (;;) {
        uint32_t len;
        int err = net_recv(n, net_frame_buf, sizeof(net_frame_buf), &len, FOREVER_MS);
        if (err) {
            report("%s FAIL result=%s frames=%u", action, net_result_name(err), echoed);
            finish();
        }
        if (len < NET_ETH_HLEN || net_frame_type(net_frame_buf) != NET_ETHERTYPE) {
            ignored++;
            continue;
        }
        if (net_frame_is_quit(net_frame_buf, len))
            break;
        if (len > NET_MAX_FRAME) {
            ignored++;
            continue;
        }
        err = net_wait_tx_free(n, 1);
        uint16_t id;
        uint8_t *out = err ? NULL : net_tx_frame(n, &id);
        if (!out) {
            report("%s FAIL result=%s frames=%u", action, net_result_name(err), echoed);
            finish();
        }
        /* Back to the sender, from us; the rest as it came. */
        mem_copy(out, net_frame_buf + 6, 6);
        mem_copy(out + 6, n->mac, 6);
        mem_copy(out + 12, net_frame_buf + 12, len - 12);
        net_queue_tx(n, id, len);
        net_kick(n, NET_TXQ);
        echoed++;
        net_reap_tx(n);
    }
    int err = net_wait_tx(n);
    report("%s done frames=%u ignored=%u tx=%s", action, echoed, ignored, net_result_name(err));
    finish();
}

/* ------------------------------------------------------------ net-watch */

/*
 * Initialises the NIC (so STATUS is negotiated) and polls the config status field,
 * InterruptStatus and Status every svtest.poll_us (3 VM exits, and one UART read).
 */
void action_net_watch(void)
{
    static const char action[] = "net-watch";
    const char *cl = boot_info.cmdline;
    struct net_options opts;
    net_options_from_cmdline(&opts);
    struct net_dev *n = &nic_dev;
    net_open_or_finish(n, action, nic_from_cmdline(), 0, &opts);
    uint64_t want_changes = cmdline_get_u64(cl, "svtest.changes", 0);
    uint64_t poll_us = cmdline_get_u64(cl, "svtest.poll_us", 2000);
    uint64_t limit_ms = cmdline_get_u64(cl, "svtest.watch_ms", 0);
    uint64_t start = rdtsc();
    char mac[18];
    net_format_mac(n->mac, mac);
    bool irq = net_ack_interrupts(n) & VIRTIO_MMIO_INT_CONFIG;
    uint16_t link = net_link_status(n);
    uint32_t status = vm_status(n->mmio);
    report("%s nic=%u mac=%s link=%s link-status=0x%x status=0x%x status-feature=%d", action,
           n->nic, mac, link & VIRTIO_NET_S_LINK_UP ? "up" : "down", link, status,
           (n->accepted & VIRTIO_BIT(VIRTIO_NET_F_STATUS)) != 0);
    irq = false;
    uint64_t changes = 0;
    for (;;) {
        tsc_delay_us(poll_us);
        if (net_ack_interrupts(n) & VIRTIO_MMIO_INT_CONFIG)
            irq = true;
        uint16_t now = net_link_status(n);
        uint32_t st = vm_status(n->mmio);
        if (st != status) {
            report("%s nic=%u device-status=0x%x", action, n->nic, st);
            status = st;
        }
        if ((now ^ link) & VIRTIO_NET_S_LINK_UP) {
            /* The interrupt may follow the config update by a moment. */
            uint64_t grace = tsc_deadline_ms(20);
            while (!irq && !tsc_passed(grace)) {
                tsc_delay_us(500);
                if (net_ack_interrupts(n) & VIRTIO_MMIO_INT_CONFIG)
                    irq = true;
            }
            changes++;
            uint8_t now_mac[6]; /* a hot-plugged NIC brings its own MAC */
            for (unsigned i = 0; i < 6; i++)
                now_mac[i] = vm_config8(n->mmio, VIRTIO_NET_CFG_MAC + i);
            net_format_mac(now_mac, mac);
            report("net-link nic=%u %s config-irq=%d link-status=0x%x mac=%s", n->nic,
                   now & VIRTIO_NET_S_LINK_UP ? "up" : "down", irq, now, mac);
            irq = false;
        }
        link = now;
        uint8_t key;
        if (serial_try_getc(&key) && key == 'q') {
            report("%s stopped changes=%lu", action, changes);
            finish();
        }
        if (want_changes && changes >= want_changes) {
            report("%s done changes=%lu", action, changes);
            finish();
        }
        if (limit_ms && tsc_elapsed_ms(start) >= limit_ms) {
            report("%s timeout changes=%lu", action, changes);
            finish();
        }
    }
}
