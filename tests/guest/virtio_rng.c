/* virtio-rng driver over virtio-mmio: initialisation, requests, polling for answers. */
#include "virtio_rng.h"

#include "blk_actions.h"
#include "guestmem.h"
#include "string.h"
#include "tsc.h"

#define RESET_TIMEOUT_MS 200
#define STATUS_POLL_US 10000 /* Status (a VM exit) is read this often while waiting */

static uint8_t ring_page[VQ_PAGE_SIZE] __attribute__((aligned(4096))) NOINIT;
static uint8_t buffer[RNG_BUFFER_BYTES] __attribute__((aligned(4096))) NOINIT;

uint8_t *rng_buffer(void)
{
    return buffer;
}

int rng_find(unsigned *count)
{
    unsigned tokens = virtio_devices_discover(), seen = 0;
    int found = -1;
    for (unsigned i = 0; i < tokens && i < VIRTIO_MMIO_MAX_DEVICES; i++) {
        const struct virtio_mmio_dev *d = &virtio_devs[i];
        if (!d->parsed || vm_read(d, VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE ||
            vm_read(d, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_RNG)
            continue;
        if (seen == 0)
            found = (int)i;
        seen++;
    }
    if (count)
        *count = seen;
    return found;
}

const char *rng_init(struct rng_dev *r, const struct virtio_mmio_dev *m, uint16_t queue_size,
                     unsigned timeout_ms)
{
    memset(r, 0, sizeof(*r));
    r->mmio = m;
    r->timeout_ms = timeout_ms ? timeout_ms : 5000;
    const char *why = vm_init_begin(m, VIRTIO_ID_RNG, "rng", RESET_TIMEOUT_MS);
    if (why)
        return why;
    r->offered = vm_device_features(m);
    if (!(r->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1)))
        return vm_init_fail(m, "no-version-1");
    r->accepted = VIRTIO_BIT(VIRTIO_F_VERSION_1);
    why = vm_init_features(m, r->accepted);
    if (why)
        return why;
    vm_write(m, VIRTIO_MMIO_QUEUE_SEL, 0);
    r->num_max = (uint16_t)vm_read(m, VIRTIO_MMIO_QUEUE_NUM_MAX);
    uint16_t num = queue_size ? queue_size : RNG_QUEUE_SIZE;
    if (num > VQ_MAX_SIZE)
        num = VQ_MAX_SIZE;
    if (r->num_max && num > r->num_max)
        num = r->num_max;
    vq_init(&r->vq, ring_page, num, false);
    why = vm_setup_queue(m, 0, num, vq_desc_addr(&r->vq), vq_driver_addr(&r->vq),
                         vq_device_addr(&r->vq));
    if (why)
        return vm_init_fail(m, why);
    return vm_init_driver_ok(m);
}

int rng_request(struct rng_dev *r, uint64_t addr, uint32_t len)
{
    struct vq_buf buf = { .addr = addr, .len = len, .write = true };
    int head = vq_add(&r->vq, &buf, 1, NULL);
    if (head < 0)
        return RNG_ERR_FULL;
    vq_publish(&r->vq, (uint16_t)head);
    if (vq_kick_needed(&r->vq)) {
        vm_notify(r->mmio, 0);
        r->kicks++;
    }
    return head;
}

int rng_wait_used(struct rng_dev *r, uint32_t *id, uint32_t *len)
{
    uint64_t deadline = tsc_deadline_ms(r->timeout_ms);
    uint64_t status_check = tsc_deadline_us(STATUS_POLL_US);
    for (;;) {
        if (vq_pop_used(&r->vq, id, len)) {
            if (*id >= r->vq.size || r->vq.chain_len[*id] == 0)
                return RNG_ERR_BAD_ID;
            vq_free(&r->vq, (uint16_t)*id);
            return 0;
        }
        if (tsc_passed(status_check)) {
            if (vm_status(r->mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
                return RNG_ERR_BROKEN;
            vm_ack_interrupts(r->mmio);
            status_check = tsc_deadline_us(STATUS_POLL_US);
        }
        if (tsc_passed(deadline))
            return RNG_ERR_TIMEOUT;
        cpu_relax();
    }
}

const char *rng_result_name(int result)
{
    switch (result) {
    case RNG_ERR_TIMEOUT:
        return "timeout";
    case RNG_ERR_BROKEN:
        return "needs-reset";
    case RNG_ERR_BAD_ID:
        return "bad-id";
    case RNG_ERR_FULL:
        return "queue-full";
    default:
        return "ok";
    }
}
