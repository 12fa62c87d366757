/* virtio-rng as the I/O thread runs it: the guest's buffers filled from a
 * source (a pipe the input writes, so it can run dry: EAGAIN), with and
 * without a rate limit, its timer and the source's readiness events. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "wrap.h"
#include "virtio_rng.c"

static struct svpy_rng rng;
static struct svpy_iothread thread; /* only its epoll set */
static int source[2] = { -1, -1 };
static uint8_t scratch[65536];

static struct svpy_virtqueue *rng_queue(unsigned q)
{
    (void)q;
    return &rng.vq;
}

static void rng_begin(struct h_reader *r)
{
    static const int kicks[1] = { -1 };
    uint8_t cfg = h_u8(r);
    uint8_t max_bytes = h_u8(r);

    if (source[0] < 0) {
        thread.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (thread.epoll_fd < 0 || pipe2(source, O_NONBLOCK | O_CLOEXEC) < 0 ||
            svpy_rng_init(&rng, &h_mem, -1, -1, kicks) < 0)
            abort();
        rng.thread = &thread;
    }
    rng.dev.shared.broken = 0;
    memset(&rng.stats, 0, sizeof(rng.stats));
    rng.waiting = 0;
    /* A rate limit of a few bytes per (long) period, or none. */
    svpy_rng_configure(&rng, source[0], cfg & 1 ? max_bytes : 0, cfg & 1 ? 3600000 : 0);
    if (cfg & 2)
        rng.period_start = 1; /* a period that began long ago: the bucket refills */
}

static void rng_start(void)
{
    svpy_lock(&rng.dev.shared);
    svpy_rng_start(&rng);
    svpy_unlock(&rng.dev.shared);
}

static void rng_reset(void)
{
    svpy_lock(&rng.dev.shared);
    svpy_rng_stop(&rng);
    svpy_unlock(&rng.dev.shared);
}

static void rng_notify(unsigned q)
{
    svpy_lock(&rng.dev.shared);
    on_queue_notified(&rng.dev, q);
    svpy_unlock(&rng.dev.shared);
}

static void rng_op(unsigned code, struct h_reader *r)
{
    switch (code) {
    case 0: { /* entropy arrives at the source */
        const uint8_t *bytes;
        size_t len = h_take(r, &bytes, h_u8(r));

        (void)!write(source[1], bytes, len);
        break;
    }
    case 1:
        on_timer(&rng);
        break;
    case 2:
        on_source_ready(&rng);
        break;
    }
    H_CHECK(!rng.max_bytes || rng.budget <= rng.max_bytes, "budget %lu of %lu",
            (unsigned long)rng.budget, (unsigned long)rng.max_bytes);
}

static void rng_end(void)
{
    rng_reset();
    while (read(source[0], scratch, sizeof(scratch)) > 0)
        ;
}

static const struct h_device device = {
    .num_queues = 1,
    .num_ops = 3,
    .queue = rng_queue,
    .broken = &rng.dev.shared.broken,
    .begin = rng_begin,
    .start = rng_start,
    .reset = rng_reset,
    .notify = rng_notify,
    .op = rng_op,
    .end = rng_end,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h_run(&device, data, size);
    return 0;
}
