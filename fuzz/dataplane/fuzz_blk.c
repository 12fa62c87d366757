/* virtio-blk requests as the I/O thread serves them: reads, writes, flush,
 * get-id, discard, write-zeroes and anything else a driver may put in a
 * header, on a small memfd image, synchronously or through Linux AIO (the
 * same memfd opened twice, so the AIO path runs without O_DIRECT). */
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "wrap.h"
#include "virtio_blk.c"

#define IMAGE_BYTES (64u << 10)

static struct svpy_blk blk;
static int image_fd = -1, image_fd2 = -1;
static aio_context_t aio_ctx;
static bool image_dirty;
static bool configured_aio; /* this input's device was given an AIO context */

static struct svpy_virtqueue *blk_queue(unsigned q)
{
    (void)q;
    return &blk.vq;
}

static void blk_setup_once(void)
{
    static const int kicks[1] = { -1 };
    char path[64];

    if (image_fd >= 0)
        return;
    image_fd = memfd_create("fuzz-blk", MFD_CLOEXEC);
    if (image_fd < 0 || ftruncate(image_fd, IMAGE_BYTES) < 0)
        abort();
    snprintf(path, sizeof(path), "/proc/self/fd/%d", image_fd);
    image_fd2 = open(path, O_RDWR | O_CLOEXEC);
    if (image_fd2 < 0)
        abort();
    if (svpy_blk_init(&blk, &h_mem, -1, -1, kicks) < 0)
        abort();
    if (svpy_blk_enable_aio(&blk) < 0)
        abort(); /* a host without AIO contexts left: the AIO path would go untested */
    aio_ctx = blk.aio;
    memcpy(blk.serial, "fuzz-serial-0123456789", SVPY_BLK_ID_BYTES);
}

static void blk_begin(struct h_reader *r)
{
    uint8_t cfg = h_u8(r);
    uint8_t capacity = h_u8(r);

    blk_setup_once();
    if (image_dirty) {
        /* A fresh, all-zero image: truncation drops the pages, no writing. */
        if (ftruncate(image_fd, 0) < 0 || ftruncate(image_fd, IMAGE_BYTES) < 0)
            abort();
        image_dirty = false;
    }
    memset(&blk.stats, 0, sizeof(blk.stats));
    blk.dev.shared.broken = 0;
    blk.dev.shared.interrupt_status = 0;
    blk.read_only = cfg & 1;
    blk.discard = (cfg >> 1) & 1;
    blk.write_zeroes = (cfg >> 2) & 1;
    switch ((cfg >> 3) & 3) {
    case 0: /* the O_DIRECT shape: two fds, AIO for reads and writes */
        blk.fd = image_fd2;
        blk.buffered_fd = image_fd;
        blk.aio = aio_ctx;
        break;
    case 1: /* two fds, no AIO (io_setup failed on this host) */
        blk.fd = image_fd2;
        blk.buffered_fd = image_fd;
        blk.aio = 0;
        break;
    case 2: /* a buffered image: one fd */
        blk.fd = blk.buffered_fd = image_fd;
        blk.aio = aio_ctx;
        break;
    default: /* an empty slot */
        blk.fd = blk.buffered_fd = -1;
        blk.aio = 0;
        break;
    }
    configured_aio = blk.aio != 0;
    /* Capacity in sectors, sometimes past the image's end (reads come short). */
    blk.capacity = (cfg & 0x20) ? (uint64_t)capacity << 24 : capacity;
}

static void blk_start(void)
{
}

static void blk_reset(void)
{
    /* What the control plane does on a device reset (block.py). */
    svpy_blk_drain(&blk, 0);
    svpy_vq_deactivate(&blk.vq);
}

static void blk_notify(unsigned q)
{
    svpy_lock(&blk.dev.shared);
    on_queue_notified(&blk.dev, q);
    svpy_unlock(&blk.dev.shared);
}

static void blk_op(unsigned code, struct h_reader *r)
{
    (void)r;
    switch (code) {
    case 0: /* AIO completions reported on the eventfd */
        if (blk.aio)
            on_aio_complete(&blk);
        break;
    case 1: /* the control plane drains (snapshot, hot-unplug) */
        svpy_lock(&blk.dev.shared);
        svpy_blk_drain(&blk, 1);
        svpy_unlock(&blk.dev.shared);
        break;
    }
}

static void blk_end(void)
{
    svpy_blk_drain(&blk, blk.vq.active);
    H_CHECK(blk.inflight == 0 && blk.unsubmitted == 0, "%u requests in flight after a drain",
            blk.inflight);
    for (unsigned i = 0; i < SVPY_BLK_AIO_DEPTH; i++)
        H_CHECK(!blk.requests[i].in_use && !blk.requests[i].iov, "request slot %u in use", i);
    if (configured_aio && !blk.aio) {
        /* The device gave AIO up (abandon_aio destroyed the context): a new one. */
        if (svpy_blk_enable_aio(&blk) < 0)
            abort();
        aio_ctx = blk.aio;
    }
    if (blk.stats.requests)
        image_dirty = true;
    svpy_vq_deactivate(&blk.vq);
}

static const struct h_device device = {
    .num_queues = 1,
    .num_ops = 2,
    .queue = blk_queue,
    .broken = &blk.dev.shared.broken,
    .begin = blk_begin,
    .start = blk_start,
    .reset = blk_reset,
    .notify = blk_notify,
    .op = blk_op,
    .end = blk_end,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h_run(&device, data, size);
    return 0;
}
