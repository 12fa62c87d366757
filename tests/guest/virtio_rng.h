/*
 * virtio-rng driver (virtio 1.x, section 5.4) over virtio-mmio v2, polled.
 *
 * One queue (requestq, index 0), no features of its own, no config space.
 * A request is one device-writable buffer; the device answers with how many
 * bytes it wrote (possibly fewer than asked, possibly 0).
 */
#ifndef SVTEST_VIRTIO_RNG_H
#define SVTEST_VIRTIO_RNG_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_mmio.h"
#include "virtqueue.h"

#define VIRTIO_ID_RNG 4

#define RNG_QUEUE_SIZE 64
#define RNG_BUFFER_BYTES (256u << 10) /* what one run may ask for in all */

/* rng_* results that are not a count. */
#define RNG_ERR_TIMEOUT (-1)
#define RNG_ERR_BROKEN (-2) /* DEVICE_NEEDS_RESET */
#define RNG_ERR_BAD_ID (-3) /* a used element named no chain in flight */
#define RNG_ERR_FULL (-4)   /* no free descriptor */

struct rng_dev {
    const struct virtio_mmio_dev *mmio;
    struct virtq vq;
    uint64_t offered, accepted;
    uint16_t num_max;
    unsigned timeout_ms;
    unsigned kicks;
};

/* The virtio_mmio.device= index of the first virtio-rng device, or -1; *count = rng devices. */
int rng_find(unsigned *count);

/* Reset, features (VERSION_1 only), the queue, DRIVER_OK.  NULL or what failed. */
const char *rng_init(struct rng_dev *r, const struct virtio_mmio_dev *m, uint16_t queue_size,
                     unsigned timeout_ms);

/* Posts one device-writable buffer and notifies (as the device asks).  Head or RNG_ERR_FULL. */
int rng_request(struct rng_dev *r, uint64_t addr, uint32_t len);

/*
 * Waits up to the time-out for one used element, frees its chain and returns
 * 0 with its id and len, or RNG_ERR_*.
 */
int rng_wait_used(struct rng_dev *r, uint32_t *id, uint32_t *len);

/* "timeout", "needs-reset", ... for an RNG_ERR_* value. */
const char *rng_result_name(int result);

/* The buffer the rng action fills: RNG_BUFFER_BYTES, in .noinit. */
uint8_t *rng_buffer(void);

#endif
