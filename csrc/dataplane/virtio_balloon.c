#include "virtio_balloon.h"

#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE_SIZE (1ull << SVPY_BALLOON_PAGE_SHIFT)

/* Consecutive frames are released with one madvise(). */
struct run {
    uint8_t *start;
    uint64_t len;
};

static void release(struct svpy_balloon *balloon, uint8_t *start, uint64_t len)
{
    if (!len)
        return;
    if (madvise(start, len, balloon->release_advice) == 0)
        balloon->counters.released_bytes += len;
    else
        balloon->counters.madvise_errors++;
}

static void add_frame(struct svpy_balloon *balloon, struct run *run, uint32_t frame,
                      int inflate)
{
    uint8_t *page = svpy_translate(balloon->dev.mem, (uint64_t)frame << SVPY_BALLOON_PAGE_SHIFT,
                                   PAGE_SIZE);

    if (!page) {
        balloon->counters.bad_frames++;
        return;
    }
    if (!inflate) {
        /* Nothing to do: a released page comes back when the guest touches it. */
        balloon->counters.deflated_pages++;
        return;
    }
    balloon->counters.inflated_pages++;
    if (run->len && page == run->start + run->len) {
        run->len += PAGE_SIZE;
        return;
    }
    release(balloon, run->start, run->len);
    run->start = page;
    run->len = PAGE_SIZE;
}

/* A list of little-endian 32-bit frame numbers over the chain's readable
 * buffers; a number may straddle two buffers.  Returns the frames read. */
static unsigned walk_frames(struct svpy_balloon *balloon, int inflate)
{
    const struct svpy_chain *chain = &balloon->chain;
    uint64_t listed = chain->readable_bytes / 4;
    unsigned frames = 0, have = 0;
    struct run run = { NULL, 0 };
    uint8_t bytes[4];

    if (listed > SVPY_BALLOON_MAX_FRAMES_PER_CHAIN)
        balloon->counters.bad_frames += listed - SVPY_BALLOON_MAX_FRAMES_PER_CHAIN;
    for (unsigned i = 0; i < chain->readable; i++) {
        const uint8_t *data = chain->iov[i].iov_base;

        for (size_t j = 0; j < chain->iov[i].iov_len; j++) {
            bytes[have++] = __atomic_load_n(&data[j], __ATOMIC_RELAXED);
            if (have < 4)
                continue;
            have = 0;
            add_frame(balloon, &run, (uint32_t)bytes[0] | (uint32_t)bytes[1] << 8 |
                                     (uint32_t)bytes[2] << 16 | (uint32_t)bytes[3] << 24,
                      inflate);
            if (++frames == SVPY_BALLOON_MAX_FRAMES_PER_CHAIN)
                goto done;
        }
    }
done:
    release(balloon, run.start, run.len);
    return frames;
}

/* Free page reporting: the chain's writable buffers are the free ranges
 * themselves (already checked to lie in guest RAM); whole pages go back. */
static void release_reported(struct svpy_balloon *balloon)
{
    const struct svpy_chain *chain = &balloon->chain;

    for (unsigned i = 0; i < chain->writable; i++) {
        const struct iovec *iov = &chain->iov[chain->readable + i];
        uintptr_t start = (uintptr_t)iov->iov_base, end = start + iov->iov_len;
        uintptr_t first = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        uintptr_t last = end & ~(PAGE_SIZE - 1);

        balloon->counters.reported_bytes += iov->iov_len;
        if (last > first)
            release(balloon, (uint8_t *)first, last - first);
    }
}

static void keep_stats(struct svpy_balloon *balloon, struct svpy_virtqueue *vq)
{
    const struct svpy_chain *chain = &balloon->chain;
    struct timespec now;
    uint32_t len = 0;

    for (unsigned i = 0; i < chain->readable && len < SVPY_BALLOON_STATS_BYTES; i++) {
        size_t chunk = chain->iov[i].iov_len;

        if (chunk > SVPY_BALLOON_STATS_BYTES - len)
            chunk = SVPY_BALLOON_STATS_BYTES - len;
        memcpy(balloon->stats + len, chain->iov[i].iov_base, chunk);
        len += chunk;
    }
    /* A guest that gives a second buffer gets the first one back. */
    if (balloon->stats_head >= 0)
        svpy_vq_push(vq, (uint16_t)balloon->stats_head, 0);
    balloon->stats_head = chain->head;
    balloon->stats_len = len;
    clock_gettime(CLOCK_REALTIME, &now);
    balloon->stats_time = now.tv_sec;
    balloon->counters.stats_updates++;
}

static void serve(struct svpy_balloon *balloon, unsigned queue)
{
    struct svpy_virtqueue *vq = &balloon->vqs[queue];
    uint8_t role = balloon->roles[queue];
    unsigned chains = 0, frames = 0;
    int completed = 0;

    if (!vq->active || role == SVPY_BALLOON_NONE ||
        __atomic_load_n(&balloon->dev.shared.broken, __ATOMIC_SEQ_CST))
        return;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            int ret;

            if (chains == SVPY_BALLOON_PASS_MAX_CHAINS ||
                frames >= SVPY_BALLOON_PASS_MAX_FRAMES) {
                svpy_device_requeue(&balloon->dev, queue);
                goto out;
            }
            ret = svpy_vq_pop(vq, balloon->dev.mem, &balloon->chain);
            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&balloon->dev.shared, ret);
                goto out;
            }
            chains++;
            if (role == SVPY_BALLOON_STATS) {
                int held = balloon->stats_head >= 0;

                keep_stats(balloon, vq);
                completed |= held;
                continue;
            }
            if (role == SVPY_BALLOON_REPORTING)
                release_reported(balloon);
            else
                frames += walk_frames(balloon, role == SVPY_BALLOON_INFLATE);
            svpy_vq_push(vq, balloon->chain.head, 0);
            completed = 1;
        }
    } while (svpy_vq_enable_notify(vq));
out:
    if (completed && svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&balloon->dev.shared, SVPY_INT_VRING);
}

static void on_queue_notified(struct svpy_device *dev, unsigned queue)
{
    if (queue < SVPY_BALLOON_QUEUES)
        serve((struct svpy_balloon *)dev, queue);
}

int svpy_balloon_init(struct svpy_balloon *balloon, const struct svpy_guest_memory *mem,
                      int irqfd, int error_fd, const int *kick_fds)
{
    memset(balloon->roles, 0, sizeof(balloon->roles));
    balloon->release_advice = MADV_DONTNEED;
    balloon->stats_head = -1;
    balloon->stats_len = 0;
    balloon->stats_time = 0;
    memset(&balloon->counters, 0, sizeof(balloon->counters));
    return svpy_device_init(&balloon->dev, mem, irqfd, error_fd, SVPY_BALLOON_QUEUES, kick_fds,
                            on_queue_notified);
}

int svpy_balloon_attach(struct svpy_balloon *balloon, struct svpy_iothread *thread)
{
    return svpy_device_attach(&balloon->dev, thread);
}

void svpy_balloon_start(struct svpy_balloon *balloon)
{
    for (unsigned i = 0; i < SVPY_BALLOON_QUEUES; i++)
        serve(balloon, i);
}

void svpy_balloon_stop(struct svpy_balloon *balloon)
{
    for (unsigned i = 0; i < SVPY_BALLOON_QUEUES; i++) {
        svpy_vq_deactivate(&balloon->vqs[i]);
        balloon->roles[i] = SVPY_BALLOON_NONE;
    }
    balloon->stats_head = -1;
}

int svpy_balloon_request_stats(struct svpy_balloon *balloon)
{
    for (unsigned i = 0; i < SVPY_BALLOON_QUEUES; i++) {
        struct svpy_virtqueue *vq = &balloon->vqs[i];

        if (balloon->roles[i] != SVPY_BALLOON_STATS || !vq->active || balloon->stats_head < 0)
            continue;
        svpy_vq_push(vq, (uint16_t)balloon->stats_head, 0);
        balloon->stats_head = -1;
        if (svpy_vq_should_interrupt(vq))
            svpy_raise_interrupt(&balloon->dev.shared, SVPY_INT_VRING);
        return 0;
    }
    return -1;
}

void svpy_balloon_destroy(struct svpy_balloon *balloon)
{
    svpy_device_destroy(&balloon->dev);
}
