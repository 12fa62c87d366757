/*
 * virtio-mmio transport (virtio 1.x, section 4.2), version 2 ("modern") registers,
 * and discovery of the devices the command line announces, the way Linux's
 * CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES does: one token
 *     virtio_mmio.device=<size>@<base>:<irq>[:<id>]
 * per device (size with an optional K/M/G suffix).  Index n is the n-th such token.
 */
#ifndef SVTEST_VIRTIO_MMIO_H
#define SVTEST_VIRTIO_MMIO_H

#include <stdbool.h>
#include <stdint.h>

/* Register offsets (4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976u /* "virt" */

/* InterruptStatus bits. */
#define VIRTIO_MMIO_INT_VRING 0x1
#define VIRTIO_MMIO_INT_CONFIG 0x2

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Device-independent feature bits (6). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED 34

#define VIRTIO_BIT(n) (1ull << (n))

/* Device IDs (5). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_BALLOON 5

#define VIRTIO_MMIO_MAX_DEVICES 16

struct virtio_mmio_dev {
    unsigned index;  /* position among the virtio_mmio.device= tokens */
    bool parsed;     /* false: the token did not parse, or the window is unreachable */
    uintptr_t base;  /* guest-physical = virtual (identity map) */
    uint64_t size;
    unsigned irq;
    const char *token; /* the token's value in boot_info.cmdline (not NUL-terminated) */
    unsigned token_len;
};

/*
 * Parses every virtio_mmio.device= token of the command line, in order, into
 * devs[0..max).  Returns how many tokens there were (may exceed max).
 */
unsigned virtio_mmio_discover(const char *cmdline, struct virtio_mmio_dev *devs, unsigned max);

/* Parses one token value "<size>@<base>:<irq>[:<id>]"; false when malformed. */
bool virtio_mmio_parse_token(const char *value, unsigned len, struct virtio_mmio_dev *dev);

static inline uint32_t vm_read(const struct virtio_mmio_dev *d, unsigned off)
{
    return *(volatile uint32_t *)(d->base + off);
}

static inline void vm_write(const struct virtio_mmio_dev *d, unsigned off, uint32_t v)
{
    *(volatile uint32_t *)(d->base + off) = v;
}

static inline uint32_t vm_status(const struct virtio_mmio_dev *d)
{
    return vm_read(d, VIRTIO_MMIO_STATUS);
}

/* The 64 feature bits the device offers (DeviceFeaturesSel 0 and 1). */
uint64_t vm_device_features(const struct virtio_mmio_dev *d);

/* Writes the 64 driver feature bits (DriverFeaturesSel 0 and 1). */
void vm_set_driver_features(const struct virtio_mmio_dev *d, uint64_t features);

/*
 * Writes 0 to Status and polls until it reads back 0, at most timeout_ms.
 * Returns true when it did.
 */
bool vm_reset(const struct virtio_mmio_dev *d, unsigned timeout_ms);

/* Config space reads at byte offset off (8/16/32-bit aligned accesses, 64 as 2x32). */
uint8_t vm_config8(const struct virtio_mmio_dev *d, unsigned off);
uint16_t vm_config16(const struct virtio_mmio_dev *d, unsigned off);
uint32_t vm_config32(const struct virtio_mmio_dev *d, unsigned off);
/* Two 32-bit reads inside a ConfigGeneration check (retried when it changes). */
uint64_t vm_config64(const struct virtio_mmio_dev *d, unsigned off, uint32_t *generation);

/* Config space write (the balloon's `actual`: the one field a driver writes). */
static inline void vm_config_write32(const struct virtio_mmio_dev *d, unsigned off, uint32_t v)
{
    *(volatile uint32_t *)(d->base + VIRTIO_MMIO_CONFIG + off) = v;
}

/* Reads InterruptStatus; when non-zero, writes the same bits to InterruptACK. */
uint32_t vm_ack_interrupts(const struct virtio_mmio_dev *d);

/*
 * Queue setup (4.2.3.2): selects queue q, checks QueueReady is 0 and QueueNumMax,
 * writes QueueNum and the three ring addresses, then QueueReady = 1.
 * Returns NULL or what went wrong.
 */
const char *vm_setup_queue(const struct virtio_mmio_dev *d, unsigned q, uint16_t num,
                           uint64_t desc, uint64_t driver, uint64_t device);

/*
 * The device initialisation steps (3.1.1) every driver here shares.  Each returns
 * NULL or what went wrong (a static buffer for messages with a value).
 *
 * vm_init_begin: the token parsed, magic, version 2 and device_id (else
 * "not-<kind> device-id=N"), reset (polled up to reset_ms), ACKNOWLEDGE, DRIVER.
 */
const char *vm_init_begin(const struct virtio_mmio_dev *m, uint32_t device_id, const char *kind,
                          unsigned reset_ms);
/* Writes the driver features and FEATURES_OK, which must stay set. */
const char *vm_init_features(const struct virtio_mmio_dev *m, uint64_t accepted);
/* Writes DRIVER_OK; Status must then read exactly 0x0f. */
const char *vm_init_driver_ok(const struct virtio_mmio_dev *m);
/* Sets FAILED in Status and returns why. */
const char *vm_init_fail(const struct virtio_mmio_dev *m, const char *why);

static inline void vm_notify(const struct virtio_mmio_dev *d, unsigned q)
{
    vm_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q);
}

#endif
