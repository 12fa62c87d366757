/* virtio-rng, the entropy device (virtio 1.x §5.4), on an I/O thread.
 *
 * One request queue: the guest posts device-writable buffers, the device
 * fills them from the host's random source (a file descriptor opened by the
 * control plane, O_NONBLOCK) and answers with the byte count.
 *
 * Optional rate limit (StratoVirt's max-bytes/period): a token bucket of
 * `max_bytes` refilled when `period_ns` has passed since the period began.
 * When it is empty, requests stay in the avail ring and a timerfd, watched by
 * the same I/O thread, resumes the queue at the next period: no busy loop and
 * no sleep on the I/O thread.  A source that has nothing to give (EAGAIN) is
 * watched for EPOLLIN the same way. */
#ifndef SVPY_VIRTIO_RNG_H
#define SVPY_VIRTIO_RNG_H

#include <stdint.h>
#include <sys/uio.h>

#include "guest_memory.h"
#include "iothread.h"
#include "virtio_device.h"
#include "virtqueue.h"

/* Bytes given to one chain at most: a guest buffer as large as its RAM costs
 * the host no more than this per request (Linux asks for 64 bytes at a time). */
#define SVPY_RNG_MAX_REQUEST_BYTES 65536
/* A pass re-queues itself after this many chains or bytes, so that one guest
 * cannot hold the I/O thread (and the disks it serves) for long. */
#define SVPY_RNG_PASS_MAX_CHAINS 256
#define SVPY_RNG_PASS_MAX_BYTES (1u << 20)

struct svpy_rng_stats {
    uint64_t requests;     /* chains answered */
    uint64_t bytes;        /* random bytes written to the guest */
    uint64_t empty;        /* chains with no device-writable buffer: answered with 0 bytes */
    uint64_t read_errors;  /* the source failed or ended: the chain got 0 bytes */
    uint64_t throttled;    /* times the queue waited for the next period */
    uint64_t source_waits; /* times the source had nothing (EAGAIN) and was watched */
    uint64_t yields;       /* passes that stopped at their budget and re-queued */
};

struct svpy_rng {
    struct svpy_device dev; /* first: the generic part */
    struct svpy_virtqueue vq;
    int source_fd;          /* the random source, O_NONBLOCK, owned by the control plane */
    /* Rate limit; max_bytes 0: none. */
    uint64_t max_bytes;
    uint64_t period_ns;
    uint64_t budget;        /* bytes left in the current period */
    uint64_t period_start;  /* CLOCK_MONOTONIC ns; 0: no period has begun */
    int timer_fd;           /* timerfd (CLOCK_MONOTONIC), armed while requests wait */
    struct svpy_watch timer_watch;
    struct svpy_watch source_watch;
    struct svpy_iothread *thread;
    uint8_t source_watched; /* source_watch is in the epoll set (EPOLLONESHOT) */
    uint8_t waiting;        /* the queue waits for the timer or the source */
    struct svpy_rng_stats stats;
    struct svpy_chain chain;
    struct iovec fill[SVPY_CHAIN_MAX_SEGMENTS]; /* the part of the chain being filled */
};

/* 0 or -errno (the timerfd or the lock could not be made). */
int svpy_rng_init(struct svpy_rng *rng, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds);
int svpy_rng_attach(struct svpy_rng *rng, struct svpy_iothread *thread);
/* Before activation: the source and the rate (max_bytes 0 or period_ms 0: unlimited). */
void svpy_rng_configure(struct svpy_rng *rng, int source_fd, uint64_t max_bytes,
                        uint64_t period_ms);
/* The driver set DRIVER_OK (queue activated by the caller) or was reset; lock held. */
void svpy_rng_start(struct svpy_rng *rng);
void svpy_rng_stop(struct svpy_rng *rng);
/* After the I/O thread has stopped: closes the timerfd. */
void svpy_rng_destroy(struct svpy_rng *rng);

#endif
