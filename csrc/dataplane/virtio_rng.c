#include "virtio_rng.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_MS 1000000ull
#define NS_PER_S 1000000000ull

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

/* Bytes the bucket allows now (UINT64_MAX without a limit).  A period begins
 * with the first bytes given after the previous one ended, and then the bucket
 * is full again: no window of one period ever sees more than max_bytes. */
static uint64_t allowance(struct svpy_rng *rng)
{
    if (!rng->max_bytes)
        return UINT64_MAX;
    if (rng->period_start && now_ns() - rng->period_start >= rng->period_ns) {
        rng->period_start = 0;
        rng->budget = rng->max_bytes;
    }
    return rng->budget;
}

static void take(struct svpy_rng *rng, uint64_t bytes)
{
    if (!rng->max_bytes || !bytes)
        return;
    if (!rng->period_start)
        rng->period_start = now_ns();
    rng->budget -= bytes;
}

/* The bucket is empty and requests wait: the timer resumes the queue when the
 * period ends (at once if it already has). */
static void wait_for_period(struct svpy_rng *rng)
{
    struct itimerspec when;
    uint64_t at = rng->period_start + rng->period_ns;

    memset(&when, 0, sizeof(when));
    when.it_value.tv_sec = (time_t)(at / NS_PER_S);
    when.it_value.tv_nsec = (long)(at % NS_PER_S);
    if (!when.it_value.tv_sec && !when.it_value.tv_nsec)
        when.it_value.tv_nsec = 1; /* zero would disarm it */
    if (timerfd_settime(rng->timer_fd, TFD_TIMER_ABSTIME, &when, NULL) < 0) {
        /* Cannot happen with a valid timerfd; never leave the guest waiting forever. */
        svpy_device_requeue(&rng->dev, 0);
        return;
    }
    if (!rng->waiting)
        rng->stats.throttled++;
    rng->waiting = 1;
}

/* The source has nothing now: hear when it has (one event, then re-armed). */
static int wait_for_source(struct svpy_rng *rng)
{
    int ret;

    if (!rng->thread)
        return -EINVAL;
    if (rng->source_watched)
        ret = svpy_iothread_modify(rng->thread, &rng->source_watch, EPOLLIN | EPOLLONESHOT);
    else
        ret = svpy_iothread_watch_events(rng->thread, &rng->source_watch,
                                         EPOLLIN | EPOLLONESHOT);
    if (ret)
        return ret;
    rng->source_watched = 1;
    rng->stats.source_waits++;
    rng->waiting = 1;
    return 0;
}

/* The first `len` bytes of the chain's writable buffers, as iovecs in `fill`. */
static int writable_prefix(const struct svpy_chain *chain, struct iovec *fill, uint64_t len)
{
    int count = 0;

    for (unsigned i = 0; i < chain->writable && len; i++) {
        const struct iovec *iov = &chain->iov[chain->readable + i];
        size_t chunk = iov->iov_len < len ? iov->iov_len : (size_t)len;

        if (!chunk)
            continue;
        fill[count].iov_base = iov->iov_base;
        fill[count].iov_len = chunk;
        count++;
        len -= chunk;
    }
    return count;
}

enum fill_result { FILLED, SOURCE_EMPTY };

/* Fills up to `len` bytes of the popped chain; *written is what to push. */
static enum fill_result fill_chain(struct svpy_rng *rng, uint64_t len, uint32_t *written)
{
    struct iovec *fill = rng->fill;
    int count = writable_prefix(&rng->chain, fill, len);
    ssize_t got;

    *written = 0;
    if (!count)
        return FILLED;
    do
        got = readv(rng->source_fd, fill, count);
    while (got < 0 && errno == EINTR);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return SOURCE_EMPTY;
    if (got <= 0) {
        /* A failed or finished source (a file at its end) gives nothing. */
        rng->stats.read_errors++;
        return FILLED;
    }
    *written = (uint32_t)got;
    return FILLED;
}

static void serve(struct svpy_rng *rng)
{
    struct svpy_virtqueue *vq = &rng->vq;
    unsigned chains = 0;
    uint64_t bytes = 0;
    int completed = 0;

    if (!vq->active || rng->waiting ||
        __atomic_load_n(&rng->dev.shared.broken, __ATOMIC_SEQ_CST))
        return;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            uint64_t room = allowance(rng), len;
            uint32_t written;
            int ret;

            if (chains == SVPY_RNG_PASS_MAX_CHAINS || bytes >= SVPY_RNG_PASS_MAX_BYTES) {
                rng->stats.yields++;
                svpy_device_requeue(&rng->dev, 0);
                goto out;
            }
            if (!room) {
                /* Requests stay in the avail ring until the next period. */
                if (svpy_vq_avail_idx(vq) == vq->last_avail_idx)
                    break;
                wait_for_period(rng);
                goto out;
            }
            ret = svpy_vq_pop(vq, rng->dev.mem, &rng->chain);
            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&rng->dev.shared, ret);
                goto out;
            }
            if (!rng->chain.writable) {
                /* Nothing to fill: answered, empty, as a confused driver deserves. */
                rng->stats.empty++;
                svpy_vq_push(vq, rng->chain.head, 0);
                rng->stats.requests++;
                chains++;
                completed = 1;
                continue;
            }
            len = rng->chain.writable_bytes;
            if (len > SVPY_RNG_MAX_REQUEST_BYTES)
                len = SVPY_RNG_MAX_REQUEST_BYTES;
            if (len > room)
                len = room;
            if (fill_chain(rng, len, &written) == SOURCE_EMPTY) {
                svpy_vq_unpop(vq, 1);
                if (wait_for_source(rng) < 0)
                    svpy_device_requeue(&rng->dev, 0); /* cannot watch it: try again later */
                goto out;
            }
            take(rng, written);
            svpy_vq_push(vq, rng->chain.head, written);
            rng->stats.requests++;
            rng->stats.bytes += written;
            bytes += written;
            chains++;
            completed = 1;
        }
    } while (svpy_vq_enable_notify(vq));
out:
    if (completed && svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&rng->dev.shared, SVPY_INT_VRING);
}

static void on_queue_notified(struct svpy_device *dev, unsigned queue)
{
    if (queue == 0)
        serve((struct svpy_rng *)dev);
}

static void on_timer(void *context)
{
    struct svpy_rng *rng = context;
    uint64_t expirations;

    if (read(rng->timer_fd, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
        return;
    svpy_lock(&rng->dev.shared);
    rng->waiting = 0;
    serve(rng);
    svpy_unlock(&rng->dev.shared);
}

static void on_source_ready(void *context)
{
    struct svpy_rng *rng = context;

    svpy_lock(&rng->dev.shared);
    rng->waiting = 0;
    serve(rng);
    svpy_unlock(&rng->dev.shared);
}

int svpy_rng_init(struct svpy_rng *rng, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds)
{
    int ret;

    rng->source_fd = -1;
    rng->max_bytes = rng->period_ns = rng->budget = rng->period_start = 0;
    rng->thread = NULL;
    rng->source_watched = rng->waiting = 0;
    memset(&rng->stats, 0, sizeof(rng->stats));
    rng->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (rng->timer_fd < 0)
        return -errno;
    rng->timer_watch.fd = rng->timer_fd;
    rng->timer_watch.handler = on_timer;
    rng->timer_watch.context = rng;
    rng->timer_watch.revents = 0;
    rng->source_watch.fd = -1;
    rng->source_watch.handler = on_source_ready;
    rng->source_watch.context = rng;
    rng->source_watch.revents = 0;
    ret = svpy_device_init(&rng->dev, mem, irqfd, error_fd, 1, kick_fds, on_queue_notified);
    if (ret) {
        close(rng->timer_fd);
        rng->timer_fd = -1;
    }
    return ret;
}

int svpy_rng_attach(struct svpy_rng *rng, struct svpy_iothread *thread)
{
    int ret = svpy_device_attach(&rng->dev, thread);

    if (ret)
        return ret;
    ret = svpy_iothread_watch(thread, &rng->timer_watch);
    if (ret == 0)
        rng->thread = thread;
    return ret;
}

void svpy_rng_configure(struct svpy_rng *rng, int source_fd, uint64_t max_bytes,
                        uint64_t period_ms)
{
    rng->source_fd = source_fd;
    rng->source_watch.fd = source_fd;
    rng->max_bytes = period_ms ? max_bytes : 0;
    rng->period_ns = period_ms * NS_PER_MS;
    rng->budget = rng->max_bytes;
    rng->period_start = 0;
}

void svpy_rng_start(struct svpy_rng *rng)
{
    rng->waiting = 0;
    serve(rng);
}

void svpy_rng_stop(struct svpy_rng *rng)
{
    struct itimerspec off;

    /* The bucket is kept: a driver that resets the device gets no new bytes by it. */
    memset(&off, 0, sizeof(off));
    timerfd_settime(rng->timer_fd, 0, &off, NULL);
    rng->waiting = 0;
    svpy_vq_deactivate(&rng->vq);
}

void svpy_rng_destroy(struct svpy_rng *rng)
{
    if (rng->timer_fd >= 0)
        close(rng->timer_fd);
    rng->timer_fd = -1;
    svpy_device_destroy(&rng->dev);
}
