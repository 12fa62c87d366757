/* virtio-net driver over virtio-mmio: initialisation, rx/tx buffers, polling. */
#include "virtio_net.h"

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

/* Per open NIC: one page per queue and the buffers. */
static uint8_t ring_pages[NET_MAX_OPEN][2][VQ_PAGE_SIZE] __attribute__((aligned(4096))) NOINIT;
static uint8_t rx_area[NET_MAX_OPEN][VQ_MAX_SIZE * NET_BUF_SIZE] __attribute__((aligned(4096)))
    NOINIT;
static uint8_t tx_area[NET_MAX_OPEN][VQ_MAX_SIZE * NET_BUF_SIZE] __attribute__((aligned(4096)))
    NOINIT;

const struct net_options net_default_options = {
    .event_idx = true,
    .indirect = true,
    .mrg_rxbuf = true,
    .offload = false,
    .irq = true,
    .queue_size = NET_QUEUE_SIZE,
    .timeout_ms = 5000,
};

void net_options_from_cmdline(struct net_options *opts)
{
    const char *cl = boot_info.cmdline;
    *opts = net_default_options;
    opts->event_idx = cmdline_get_u64(cl, "svtest.event_idx", 1) != 0;
    opts->indirect = cmdline_get_u64(cl, "svtest.indirect", 1) != 0;
    opts->mrg_rxbuf = cmdline_get_u64(cl, "svtest.mrg_rxbuf", 1) != 0;
    opts->offload = cmdline_get_u64(cl, "svtest.offload", 0) != 0;
    opts->queue_size = (uint16_t)cmdline_get_u64(cl, "svtest.queue_size", NET_QUEUE_SIZE);
    opts->timeout_ms = (unsigned)cmdline_get_u64(cl, "svtest.timeout_ms", 5000);
}

int net_find(unsigned nic, unsigned *count)
{
    unsigned tokens = virtio_devices_discover(), seen = 0;
    int found = -1;
    for (unsigned i = 0; i < tokens && i < VIRTIO_MMIO_MAX_DEVICES; i++) {
        const struct virtio_mmio_dev *d = &virtio_devs[i];
        if (!d->parsed || vm_read(d, VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE ||
            vm_read(d, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_NET)
            continue;
        if (seen == nic)
            found = (int)i;
        seen++;
    }
    if (count)
        *count = seen;
    return found;
}

/* Fixed descriptors: descriptor i names buffer i. */
static void bind_buffers(struct virtq *vq, uint8_t *area, bool device_writes)
{
    for (uint16_t i = 0; i < vq->size; i++) {
        vq->desc[i] = (struct vq_desc){ .addr = (uintptr_t)(area + (uint32_t)i * NET_BUF_SIZE),
                                        .len = NET_BUF_SIZE,
                                        .flags = device_writes ? VQ_DESC_F_WRITE : 0,
                                        .next = 0 };
    }
    vq->num_free = 0; /* the free list of virtqueue.c is not used */
}

/* Without interrupts wanted: NO_INTERRUPT, or a used_event 32768 completions away. */
static void suppress_interrupts(struct virtq *vq)
{
    if (vq->event_idx)
        *vq->used_event = (uint16_t)(vq->last_used + 0x8000);
    else
        *vq->avail_flags = VQ_AVAIL_F_NO_INTERRUPT;
}

static const char *setup_queue(struct net_dev *n, unsigned q, uint16_t want, bool event_idx)
{
    const struct virtio_mmio_dev *m = n->mmio;
    vm_write(m, VIRTIO_MMIO_QUEUE_SEL, q);
    uint16_t max = (uint16_t)vm_read(m, VIRTIO_MMIO_QUEUE_NUM_MAX);
    uint16_t num = want;
    if (num > VQ_MAX_SIZE)
        num = VQ_MAX_SIZE;
    if (max && num > max)
        num = max;
    struct virtq *vq = q == NET_RXQ ? &n->rx : &n->tx;
    vq_init(vq, ring_pages[n->slot][q], num, event_idx);
    bind_buffers(vq, q == NET_RXQ ? n->rxbuf : n->txbuf, q == NET_RXQ);
    if (!n->irq)
        suppress_interrupts(vq);
    if (q == NET_RXQ)
        n->rx_num_max = max;
    else
        n->tx_num_max = max;
    return vm_setup_queue(m, q, num, vq_desc_addr(vq), vq_driver_addr(vq), vq_device_addr(vq));
}

const char *net_init(struct net_dev *n, const struct virtio_mmio_dev *m, unsigned nic,
                     unsigned slot, const struct net_options *opts)
{
    memset(n, 0, sizeof(*n));
    n->mmio = m;
    n->nic = nic;
    n->slot = slot < NET_MAX_OPEN ? slot : 0;
    n->rxbuf = rx_area[n->slot];
    n->txbuf = tx_area[n->slot];
    n->irq = opts->irq;
    n->timeout_ms = opts->timeout_ms ? opts->timeout_ms : 5000;
    const char *why = vm_init_begin(m, VIRTIO_ID_NET, "net", RESET_TIMEOUT_MS);
    if (why)
        return why;

    n->offered = vm_device_features(m);
    if (!(n->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1)))
        return vm_init_fail(m, "no-version-1");
    uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_NET_F_MAC) |
                      VIRTIO_BIT(VIRTIO_NET_F_STATUS) | VIRTIO_BIT(VIRTIO_NET_F_MTU);
    if (opts->mrg_rxbuf)
        wanted |= VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
    if (opts->event_idx)
        wanted |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    if (opts->indirect)
        wanted |= VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
    if (opts->offload) {
        wanted |= VIRTIO_BIT(VIRTIO_NET_F_CSUM) | VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO4) |
                  VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO6) | VIRTIO_BIT(VIRTIO_NET_F_HOST_ECN) |
                  VIRTIO_BIT(VIRTIO_NET_F_GUEST_CSUM);
        /* Large received frames need several 2 KiB buffers: only with MRG_RXBUF. */
        if (opts->mrg_rxbuf && (n->offered & VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF)))
            wanted |= VIRTIO_BIT(VIRTIO_NET_F_GUEST_TSO4) |
                      VIRTIO_BIT(VIRTIO_NET_F_GUEST_TSO6) | VIRTIO_BIT(VIRTIO_NET_F_GUEST_ECN);
    }
    n->accepted = n->offered & wanted;
    /* The spec ties these to their base features (5.1.3.1). */
    if (!(n->accepted & VIRTIO_BIT(VIRTIO_NET_F_CSUM)))
        n->accepted &= ~(VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO4) | VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO6) |
                         VIRTIO_BIT(VIRTIO_NET_F_HOST_ECN));
    if (!(n->accepted & VIRTIO_BIT(VIRTIO_NET_F_GUEST_CSUM)))
        n->accepted &= ~(VIRTIO_BIT(VIRTIO_NET_F_GUEST_TSO4) |
                         VIRTIO_BIT(VIRTIO_NET_F_GUEST_TSO6) | VIRTIO_BIT(VIRTIO_NET_F_GUEST_ECN));
    if (!(n->accepted & (VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO4) | VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO6))))
        n->accepted &= ~VIRTIO_BIT(VIRTIO_NET_F_HOST_ECN);
    if (!(n->accepted &
          (VIRTIO_BIT(VIRTIO_NET_F_GUEST_TSO4) | VIRTIO_BIT(VIRTIO_NET_F_GUEST_TSO6))))
        n->accepted &= ~VIRTIO_BIT(VIRTIO_NET_F_GUEST_ECN);
    why = vm_init_features(m, n->accepted);
    if (why)
        return why;
    n->mrg_rxbuf = n->accepted & VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
    bool event_idx = n->accepted & VIRTIO_BIT(VIRTIO_F_EVENT_IDX);

    if (n->accepted & VIRTIO_BIT(VIRTIO_NET_F_MAC)) {
        for (unsigned i = 0; i < 6; i++)
            n->mac[i] = vm_config8(m, VIRTIO_NET_CFG_MAC + i);
    } else {
        /* A locally administered address of our own. */
        static const uint8_t own[6] = { 0x02, 0x53, 0x56, 0x54, 0x00, 0x00 };
        mem_copy(n->mac, own, 6);
        n->mac[5] = (uint8_t)nic;
    }

    const char *qerr = setup_queue(n, NET_RXQ, opts->queue_size, event_idx);
    if (!qerr)
        qerr = setup_queue(n, NET_TXQ, opts->queue_size, event_idx);
    if (qerr)
        return vm_init_fail(m, qerr);
    /* The tx header is all zeroes (no checksum, no GSO) and never rewritten. */
    for (uint16_t i = 0; i < n->tx.size; i++) {
        mem_fill(n->txbuf + (uint32_t)i * NET_BUF_SIZE, 0, NET_HDR_LEN);
        n->tx_free[i] = (uint16_t)(n->tx.size - 1 - i);
    }
    n->tx_free_count = n->tx.size;

    return vm_init_driver_ok(m);
}

uint16_t net_link_status(const struct net_dev *n)
{
    if (!(n->offered & VIRTIO_BIT(VIRTIO_NET_F_STATUS)))
        return VIRTIO_NET_S_LINK_UP;
    return vm_config16(n->mmio, VIRTIO_NET_CFG_STATUS);
}

void net_kick(struct net_dev *n, unsigned q)
{
    if (vq_kick_needed(q == NET_RXQ ? &n->rx : &n->tx))
        vm_notify(n->mmio, q);
}

void net_repost_rx(struct net_dev *n, uint16_t id)
{
    n->rx_posted[id] = true;
    vq_publish(&n->rx, id);
}

unsigned net_post_rx(struct net_dev *n)
{
    unsigned posted = 0;
    for (uint16_t i = 0; i < n->rx.size; i++) {
        if (!n->rx_posted[i]) {
            net_repost_rx(n, i);
            posted++;
        }
    }
    if (posted)
        net_kick(n, NET_RXQ);
    return posted;
}

uint8_t *net_tx_frame(struct net_dev *n, uint16_t *id)
{
    if (!n->tx_free_count)
        return NULL;
    *id = n->tx_free[--n->tx_free_count];
    return n->txbuf + (uint32_t)*id * NET_BUF_SIZE + NET_HDR_LEN;
}

void net_queue_tx(struct net_dev *n, uint16_t id, uint32_t len)
{
    n->tx.desc[id].len = NET_HDR_LEN + len;
    n->tx_busy[id] = true;
    vq_publish(&n->tx, id);
}

/* The next used element of vq, if any; moves used_event only when interrupts are wanted. */
static bool pop_used(struct net_dev *n, struct virtq *vq, uint32_t *id, uint32_t *len)
{
    if (!n->irq) {
        if (*vq->used_idx == vq->last_used)
            return false;
        barrier(); /* x86: loads are not reordered with older loads */
        volatile struct vq_used_elem *e = &vq->used_ring[vq->last_used % vq->size];
        *id = e->id;
        *len = e->len;
        vq->last_used++;
        return true;
    }
    return vq_pop_used(vq, id, len);
}

uint32_t net_ack_interrupts(struct net_dev *n)
{
    uint32_t isr = vm_ack_interrupts(n->mmio);
    if (isr & VIRTIO_MMIO_INT_VRING)
        n->irq_seen++;
    if (isr & VIRTIO_MMIO_INT_CONFIG)
        n->config_irqs++;
    return isr;
}

int net_reap_tx(struct net_dev *n)
{
    uint32_t id, len;
    int reaped = 0;
    while (pop_used(n, &n->tx, &id, &len)) {
        if (id >= n->tx.size || !n->tx_busy[id])
            return NET_ERR_BAD_ID;
        n->tx_busy[id] = false;
        n->tx_free[n->tx_free_count++] = (uint16_t)id;
        n->frames_sent++;
        reaped++;
    }
    if (reaped && n->irq)
        net_ack_interrupts(n);
    return reaped;
}

/* Status is read every STATUS_POLL_US while waiting: DEVICE_NEEDS_RESET ends a wait. */
struct waiter {
    uint64_t deadline, status_check;
};

static struct waiter wait_start(unsigned timeout_ms)
{
    return (struct waiter){ tsc_deadline_ms(timeout_ms), tsc_deadline_us(STATUS_POLL_US) };
}

static int wait_step(struct net_dev *n, struct waiter *w)
{
    if (tsc_passed(w->deadline))
        return NET_ERR_TIMEOUT;
    if (tsc_passed(w->status_check)) {
        if (vm_status(n->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
            return NET_ERR_BROKEN;
        w->status_check = tsc_deadline_us(STATUS_POLL_US);
    }
    cpu_relax();
    return 0;
}

int net_wait_tx_free(struct net_dev *n, unsigned want)
{
    if (want > n->tx.size)
        want = n->tx.size;
    struct waiter w = wait_start(n->timeout_ms);
    while (n->tx_free_count < want) {
        int got = net_reap_tx(n);
        if (got < 0)
            return got;
        if (got > 0) {
            w = wait_start(n->timeout_ms);
            continue;
        }
        int err = wait_step(n, &w);
        if (err)
            return err;
    }
    return 0;
}

/* The next rx used element, checked. */
static int pop_rx(struct net_dev *n, struct waiter *w, uint16_t *id, uint32_t *len)
{
    uint32_t uid, ulen;
    for (;;) {
        if (pop_used(n, &n->rx, &uid, &ulen))
            break;
        int err = wait_step(n, w);
        if (err)
            return err;
    }
    if (uid >= n->rx.size || !n->rx_posted[uid])
        return NET_ERR_BAD_ID;
    n->rx_posted[uid] = false;
    n->rx_buffers_used++;
    *id = (uint16_t)uid;
    *len = ulen;
    if (ulen > NET_BUF_SIZE) {
        net_repost_rx(n, (uint16_t)uid);
        return NET_ERR_BAD_LEN;
    }
    return 0;
}

int net_recv(struct net_dev *n, uint8_t *out, uint32_t size, uint32_t *len, unsigned timeout_ms)
{
    struct waiter w = wait_start(timeout_ms ? timeout_ms : n->timeout_ms);
    uint16_t id;
    uint32_t used;
    int err = pop_rx(n, &w, &id, &used);
    if (err)
        return err;
    uint8_t *buf = n->rxbuf + (uint32_t)id * NET_BUF_SIZE;
    if (used < NET_HDR_LEN) {
        net_repost_rx(n, id);
        return NET_ERR_BAD_LEN;
    }
    const struct virtio_net_hdr_v1 *hdr = (const void *)buf;
    unsigned buffers = n->mrg_rxbuf ? hdr->num_buffers : 1;
    uint32_t total = 0;
    uint32_t chunk = used - NET_HDR_LEN;
    const uint8_t *data = buf + NET_HDR_LEN;
    for (unsigned b = 0;;) {
        if (total < size)
            mem_copy(out + total, data, chunk <= size - total ? chunk : size - total);
        total += chunk;
        net_repost_rx(n, id);
        if (++b >= buffers)
            break;
        /* The rest of a merged frame follows in the next used elements. */
        err = pop_rx(n, &w, &id, &used);
        if (err)
            return err;
        data = n->rxbuf + (uint32_t)id * NET_BUF_SIZE;
        chunk = used;
    }
    net_kick(n, NET_RXQ);
    if (n->irq)
        net_ack_interrupts(n);
    n->frames_received++;
    *len = total;
    return 0;
}

const char *net_result_name(int result)
{
    static char buf[16];
    switch (result) {
    case 0: return "ok";
    case NET_ERR_TIMEOUT: return "timeout";
    case NET_ERR_BROKEN: return "needs-reset";
    case NET_ERR_BAD_ID: return "bad-used-id";
    case NET_ERR_BAD_LEN: return "bad-used-len";
    default:
        ksnprintf(buf, sizeof(buf), "error-%d", result);
        return buf;
    }
}

void net_format_mac(const uint8_t mac[6], char out[18])
{
    for (unsigned i = 0; i < 6; i++)
        ksnprintf(out + 3 * i, 4, i < 5 ? "%02x:" : "%02x", mac[i]);
}
