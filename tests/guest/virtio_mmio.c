/* virtio-mmio discovery (command line) and register helpers. */
#include "virtio_mmio.h"

#include "cmdline.h"
#include "io.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define TOKEN_KEY "virtio_mmio.device"

/* The guest's page tables map 0..4 GiB only. */
#define MAPPED_LIMIT (1ull << 32)

bool virtio_mmio_parse_token(const char *value, unsigned len, struct virtio_mmio_dev *dev)
{
    const char *end = value + len;
    uint64_t size, base, irq, id;
    const char *p = parse_size(value, end, &size);
    if (!p || p >= end || *p != '@')
        return false;
    p = parse_u64(p + 1, end, &base);
    if (!p || p >= end || *p != ':')
        return false;
    p = parse_u64(p + 1, end, &irq);
    if (!p)
        return false;
    if (p < end) { /* optional platform device id */
        if (*p != ':')
            return false;
        p = parse_u64(p + 1, end, &id);
        if (!p || p != end)
            return false;
    }
    if (size < VIRTIO_MMIO_CONFIG || base >= MAPPED_LIMIT || size > MAPPED_LIMIT - base ||
        (base & 3) || irq > 0xffff)
        return false;
    dev->base = (uintptr_t)base;
    dev->size = size;
    dev->irq = (unsigned)irq;
    return true;
}

unsigned virtio_mmio_discover(const char *cmdline, struct virtio_mmio_dev *devs, unsigned max)
{
    unsigned count = 0;
    const char *pos = cmdline;
    struct cmdline_token t;
    while (cmdline_next(&pos, &t)) {
        if (!t.value || !str_equals_n(t.key, t.key_len, TOKEN_KEY))
            continue;
        if (count < max) {
            struct virtio_mmio_dev *d = &devs[count];
            memset(d, 0, sizeof(*d));
            d->index = count;
            d->token = t.value;
            d->token_len = (unsigned)t.value_len;
            d->parsed = virtio_mmio_parse_token(t.value, (unsigned)t.value_len, d);
        }
        count++;
    }
    return count;
}

uint64_t vm_device_features(const struct virtio_mmio_dev *d)
{
    vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t high = vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    vm_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t low = vm_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    return (high << 32) | low;
}

void vm_set_driver_features(const struct virtio_mmio_dev *d, uint64_t features)
{
    vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(features >> 32));
    vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vm_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)features);
}

bool vm_reset(const struct virtio_mmio_dev *d, unsigned timeout_ms)
{
    vm_write(d, VIRTIO_MMIO_STATUS, 0);
    if (vm_status(d) == 0)
        return true;
    uint64_t deadline = tsc_deadline_ms(timeout_ms);
    while (!tsc_passed(deadline)) {
        tsc_delay_us(100);
        if (vm_status(d) == 0)
            return true;
    }
    return false;
}

uint8_t vm_config8(const struct virtio_mmio_dev *d, unsigned off)
{
    return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint16_t vm_config16(const struct virtio_mmio_dev *d, unsigned off)
{
    return mmio_read16(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint32_t vm_config32(const struct virtio_mmio_dev *d, unsigned off)
{
    return mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint64_t vm_config64(const struct virtio_mmio_dev *d, unsigned off, uint32_t *generation)
{
    uint32_t before, after, low, high;
    unsigned tries = 0;
    do {
        before = vm_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        low = vm_config32(d, off);
        high = vm_config32(d, off + 4);
        after = vm_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
    } while (before != after && ++tries < 16);
    if (generation)
        *generation = after;
    return ((uint64_t)high << 32) | low;
}

uint32_t vm_ack_interrupts(const struct virtio_mmio_dev *d)
{
    uint32_t isr = vm_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        vm_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    return isr;
}

const char *vm_setup_queue(const struct virtio_mmio_dev *d, unsigned q, uint16_t num,
                           uint64_t desc, uint64_t driver, uint64_t device)
{
    vm_write(d, VIRTIO_MMIO_QUEUE_SEL, q);
    if (vm_read(d, VIRTIO_MMIO_QUEUE_READY) != 0)
        return "queue-ready-before-setup";
    uint32_t max = vm_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0)
        return "queue-num-max-0";
    if (num > max)
        return "queue-num-above-max";
    vm_write(d, VIRTIO_MMIO_QUEUE_NUM, num);
    vm_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    vm_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)driver);
    vm_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(driver >> 32));
    vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)device);
    vm_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(device >> 32));
    mb();
    vm_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (vm_read(d, VIRTIO_MMIO_QUEUE_READY) != 1)
        return "queue-ready-not-set";
    return NULL;
}

#define INIT_STATUS (VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK)

const char *vm_init_begin(const struct virtio_mmio_dev *m, uint32_t device_id, const char *kind,
                          unsigned reset_ms)
{
    static char why[64];
    if (!m->parsed)
        return "bad-token";
    uint32_t magic = vm_read(m, VIRTIO_MMIO_MAGIC);
    if (magic != VIRTIO_MMIO_MAGIC_VALUE) {
        ksnprintf(why, sizeof(why), "bad-magic=0x%x", magic);
        return why;
    }
    uint32_t version = vm_read(m, VIRTIO_MMIO_VERSION);
    if (version != 2) {
        ksnprintf(why, sizeof(why), "version=%u", version);
        return why;
    }
    uint32_t id = vm_read(m, VIRTIO_MMIO_DEVICE_ID);
    if (id != device_id) {
        ksnprintf(why, sizeof(why), "not-%s device-id=%u", kind, id);
        return why;
    }
    if (!vm_reset(m, reset_ms))
        return "reset-timeout";
    vm_write(m, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vm_write(m, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    return NULL;
}

const char *vm_init_fail(const struct virtio_mmio_dev *m, const char *why)
{
    vm_write(m, VIRTIO_MMIO_STATUS, vm_status(m) | VIRTIO_STATUS_FAILED);
    return why;
}

const char *vm_init_features(const struct virtio_mmio_dev *m, uint64_t accepted)
{
    vm_set_driver_features(m, accepted);
    vm_write(m, VIRTIO_MMIO_STATUS, INIT_STATUS);
    if (!(vm_status(m) & VIRTIO_STATUS_FEATURES_OK))
        return vm_init_fail(m, "features-ok-rejected");
    return NULL;
}

const char *vm_init_driver_ok(const struct virtio_mmio_dev *m)
{
    static char why[48];
    uint32_t status = INIT_STATUS | VIRTIO_STATUS_DRIVER_OK;
    vm_write(m, VIRTIO_MMIO_STATUS, status);
    uint32_t now = vm_status(m);
    if (now != status) {
        ksnprintf(why, sizeof(why), "status-after-driver-ok=0x%x", now);
        return why;
    }
    return NULL;
}
