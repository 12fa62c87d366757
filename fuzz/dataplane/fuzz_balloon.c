/* virtio-balloon page lists as the I/O thread serves them: inflate and
 * deflate frame lists, the statistics buffer the device holds back, and free
 * page reporting.  Page advice really runs on the synthetic guest memory;
 * the wrapper (harness_madvise) checks it never reaches outside guest RAM. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "wrap.h"
#include "virtio_balloon.c"

static struct svpy_balloon balloon;
static uint8_t roles[SVPY_BALLOON_QUEUES];

static struct svpy_virtqueue *balloon_queue(unsigned q)
{
    return &balloon.vqs[q];
}

static void balloon_begin(struct h_reader *r)
{
    static const int kicks[SVPY_BALLOON_QUEUES] = { -1, -1, -1, -1 };
    uint16_t cfg = h_u16(r);

    if (svpy_balloon_init(&balloon, &h_mem, -1, -1, kicks) < 0)
        abort();
    /* Which queue serves what follows the negotiated features, as
     * queue_roles() in balloon.py: inflate, deflate, then statistics
     * (STATS_VQ) and free page reporting if negotiated, numbered in that order. */
    memset(roles, SVPY_BALLOON_NONE, sizeof(roles));
    roles[0] = SVPY_BALLOON_INFLATE;
    roles[1] = SVPY_BALLOON_DEFLATE;
    if (cfg & 1)
        roles[2] = SVPY_BALLOON_STATS;
    if (cfg & 2)
        roles[cfg & 1 ? 3 : 2] = SVPY_BALLOON_REPORTING;
    /* MADV_REMOVE fails on this private memory: the error path. */
    balloon.release_advice = (cfg & 0x8000) ? MADV_REMOVE : MADV_DONTNEED;
}

static void balloon_notify(unsigned q);
static bool enough_frames(void);

/* What svpy_balloon_start does (a pass over every queue), with the frame cap
 * checked between queues: a driver's re-setup is a start too. */
static void balloon_start(void)
{
    memcpy(balloon.roles, roles, sizeof(roles));
    for (unsigned q = 0; q < SVPY_BALLOON_QUEUES && !enough_frames(); q++)
        balloon_notify(q);
}

static void balloon_reset(void)
{
    svpy_lock(&balloon.dev.shared);
    svpy_balloon_stop(&balloon);
    svpy_unlock(&balloon.dev.shared);
    H_CHECK(balloon.stats_head == -1, "a reset device holds a statistics buffer");
}

/* Frames walked this input: once one pass could have been cut at the
 * device's cap (SVPY_BALLOON_PASS_MAX_FRAMES) the input has shown what it can;
 * further passes would only slow the fuzzing (each frame is ~40 traced
 * comparisons), so the device is served no more. */
#define MAX_FRAMES_PER_INPUT (SVPY_BALLOON_PASS_MAX_FRAMES / 2)

static bool enough_frames(void)
{
    const struct svpy_balloon_counters *c = &balloon.counters;

    return c->inflated_pages + c->deflated_pages + c->bad_frames > MAX_FRAMES_PER_INPUT;
}

static void balloon_notify(unsigned q)
{
    if (enough_frames())
        return;
    svpy_lock(&balloon.dev.shared);
    on_queue_notified(&balloon.dev, q);
    svpy_unlock(&balloon.dev.shared);
}

static void balloon_op(unsigned code, struct h_reader *r)
{
    (void)r;
    switch (code) {
    case 0: { /* the control plane asks for fresh statistics */
        int32_t held = balloon.stats_head;
        int ret;

        svpy_lock(&balloon.dev.shared);
        ret = svpy_balloon_request_stats(&balloon);
        svpy_unlock(&balloon.dev.shared);
        H_CHECK(ret == -1 || (held >= 0 && balloon.stats_head == -1),
                "request_stats answered %d holding %d", ret, held);
        break;
    }
    case 1:
        balloon_start();
        break;
    }
    H_CHECK(balloon.stats_len <= SVPY_BALLOON_STATS_BYTES, "stats_len %u", balloon.stats_len);
}

static void balloon_end(void)
{
    const struct svpy_balloon_counters *c = &balloon.counters;

    H_CHECK(c->released_bytes % 4096 == 0, "released %lu bytes", (unsigned long)c->released_bytes);
    H_CHECK(balloon.stats_len <= SVPY_BALLOON_STATS_BYTES, "stats_len %u", balloon.stats_len);
    balloon_reset();
}

static const struct h_device device = {
    .num_queues = SVPY_BALLOON_QUEUES,
    .num_ops = 2,
    .queue = balloon_queue,
    .broken = &balloon.dev.shared.broken,
    .begin = balloon_begin,
    .start = balloon_start,
    .reset = balloon_reset,
    .notify = balloon_notify,
    .op = balloon_op,
    .end = balloon_end,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h_run(&device, data, size);
    return 0;
}
