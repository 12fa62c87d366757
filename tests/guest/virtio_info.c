/*
 * svtest.action=virtio-info: one line per virtio_mmio.device= token with the
 * transport registers, the offered features and the device's config (block:
 * capacity, read-only, limits, and the GET_ID serial when there is a disk;
 * network: MAC and link status).  Only reads registers, except for GET_ID, which
 * initialises the disk and resets it afterwards.
 */
#include "actions.h"
#include "blk_actions.h"
#include "printf.h"
#include "string.h"

#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_CFG_MAC 0
#define VIRTIO_NET_CFG_STATUS 6
#define VIRTIO_NET_CFG_MTU 10

#define LINE_MAX 480

struct line {
    char buf[LINE_MAX];
    size_t len;
};

static void add(struct line *l, const char *fmt, ...) PRINTF_LIKE(2, 3);

static void add(struct line *l, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (l->len < sizeof(l->buf))
        l->len += (size_t)kvsnprintf(l->buf + l->len, sizeof(l->buf) - l->len, fmt, ap);
    va_end(ap);
}

static void describe_block(struct line *l, const struct virtio_mmio_dev *d, uint64_t features)
{
    struct blk_dev b = { .mmio = d };
    blk_read_config(&b);
    add(l, " capacity=%lu ro=%d generation=%u", b.capacity,
        (features & VIRTIO_BIT(VIRTIO_BLK_F_RO)) != 0, b.generation);
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX))
        add(l, " seg-max=%u", b.seg_max);
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX))
        add(l, " size-max=%u", b.size_max);
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE))
        add(l, " blk-size=%u", b.blk_size);
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_CONFIG_WCE))
        add(l, " writeback=%u", vm_config8(d, VIRTIO_BLK_CFG_WRITEBACK));
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_MQ))
        add(l, " num-queues=%u", vm_config16(d, VIRTIO_BLK_CFG_NUM_QUEUES));
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_DISCARD))
        add(l, " max-discard-sectors=%u", vm_config32(d, VIRTIO_BLK_CFG_MAX_DISCARD));
    if (features & VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES))
        add(l, " max-write-zeroes-sectors=%u", vm_config32(d, VIRTIO_BLK_CFG_MAX_WRITE_ZEROES));
    if (b.capacity == 0)
        return;

    struct blk_options opts;
    blk_options_from_cmdline(&opts);
    const char *why = blk_init(&b, d, &opts);
    if (why) {
        add(l, " serial-error=%s", why);
    } else {
        char serial[VIRTIO_BLK_ID_BYTES + 1];
        int st = blk_get_id(&b, serial);
        if (st == VIRTIO_BLK_S_OK)
            add(l, " serial=%s", serial);
        else
            add(l, " serial-error=%s", blk_result_name(st));
    }
    vm_reset(d, 200);
}

static void describe_net(struct line *l, const struct virtio_mmio_dev *d, uint64_t features)
{
    if (features & VIRTIO_BIT(VIRTIO_NET_F_MAC)) {
        add(l, " mac=");
        for (unsigned i = 0; i < 6; i++)
            add(l, i ? ":%02x" : "%02x", vm_config8(d, VIRTIO_NET_CFG_MAC + i));
    }
    if (features & VIRTIO_BIT(VIRTIO_NET_F_STATUS))
        add(l, " link-status=0x%x", vm_config16(d, VIRTIO_NET_CFG_STATUS));
    if (features & VIRTIO_BIT(VIRTIO_NET_F_MTU))
        add(l, " mtu=%u", vm_config16(d, VIRTIO_NET_CFG_MTU));
}

void action_virtio_info(void)
{
    unsigned count = virtio_devices_discover();
    report("virtio-devices=%u", count);
    for (unsigned i = 0; i < count && i < VIRTIO_MMIO_MAX_DEVICES; i++) {
        const struct virtio_mmio_dev *d = &virtio_devs[i];
        struct line l = { .len = 0 };
        if (!d->parsed) {
            report("virtio %u bad-token=%.*s", i, (int)d->token_len, d->token);
            continue;
        }
        uint32_t magic = vm_read(d, VIRTIO_MMIO_MAGIC);
        add(&l, "virtio %u base=0x%lx irq=%u magic=0x%x", i, (uint64_t)d->base, d->irq, magic);
        if (magic == VIRTIO_MMIO_MAGIC_VALUE) {
            uint32_t version = vm_read(d, VIRTIO_MMIO_VERSION);
            uint32_t id = vm_read(d, VIRTIO_MMIO_DEVICE_ID);
            uint64_t features = vm_device_features(d);
            add(&l, " version=%u device-id=%u vendor=0x%x features=0x%016lx", version, id,
                vm_read(d, VIRTIO_MMIO_VENDOR_ID), features);
            if (id == VIRTIO_ID_BLOCK)
                describe_block(&l, d, features);
            else if (id == VIRTIO_ID_NET)
                describe_net(&l, d, features);
        }
        report("%s", l.buf);
    }
    if (count > VIRTIO_MMIO_MAX_DEVICES)
        report("virtio-devices-ignored=%u", count - VIRTIO_MMIO_MAX_DEVICES);
    finish();
}
