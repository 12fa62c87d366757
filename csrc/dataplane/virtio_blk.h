/* virtio-blk request processing (virtio 1.x §5.2), run on an I/O thread. */
#ifndef SVPY_VIRTIO_BLK_H
#define SVPY_VIRTIO_BLK_H

#include <stdint.h>
#include <linux/aio_abi.h>

#include "guest_memory.h"
#include "iothread.h"
#include "virtio_device.h"
#include "virtqueue.h"

#define SVPY_BLK_ID_BYTES 20
#define SVPY_SECTOR_SIZE 512

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1

struct svpy_blk_stats {
    uint64_t requests;
    uint64_t read_bytes;
    uint64_t written_bytes;
    uint64_t errors;
};

/* Requests in flight at once with O_DIRECT (Linux AIO). */
#define SVPY_BLK_AIO_DEPTH 64

struct svpy_blk_request {
    struct iocb iocb;
    uint8_t in_use;
    uint8_t write;
    uint16_t head;
    uint8_t *status;
    uint64_t len;
    uint64_t offset;
    int iovcnt;
    struct iovec *iov;
};

struct svpy_blk {
    struct svpy_virtio_shared shared;
    struct svpy_virtqueue vq;
    const struct svpy_guest_memory *mem;
    struct svpy_watch kick;
    /* Backend; fd < 0 is an empty slot (capacity 0). */
    int fd;
    int buffered_fd; /* the same file without O_DIRECT, for misaligned requests */
    uint64_t capacity; /* in 512-byte sectors */
    uint8_t read_only;
    uint8_t discard;      /* VIRTIO_BLK_F_DISCARD negotiated */
    uint8_t write_zeroes; /* VIRTIO_BLK_F_WRITE_ZEROES negotiated */
    char serial[SVPY_BLK_ID_BYTES];
    struct svpy_blk_stats stats;
    struct svpy_chain chain;
    struct iovec data_iov[SVPY_CHAIN_MAX_SEGMENTS];
    /* O_DIRECT reads and writes go through Linux AIO so that many are in
     * flight at once; completions arrive on aio_event_fd.  aio == 0 means
     * AIO is unavailable and every request is served synchronously. */
    aio_context_t aio;
    struct svpy_watch aio_watch;
    uint32_t inflight;
    struct svpy_blk_request requests[SVPY_BLK_AIO_DEPTH];
};

int svpy_blk_init(struct svpy_blk *blk, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, int kick_fd);
/* Listens for the guest's queue notifications on `thread`. */
int svpy_blk_attach(struct svpy_blk *blk, struct svpy_iothread *thread);
/* Drains the queue; the caller holds blk->shared.lock. */
void svpy_blk_process(struct svpy_blk *blk);
/* Waits for requests in flight (lock held).  With `complete`, they are
 * answered in the used ring; without (device reset), they are forgotten. */
void svpy_blk_drain(struct svpy_blk *blk, int complete);
/* Without AIO (e.g. the host's aio-max-nr is used up) requests are synchronous. */
int svpy_blk_enable_aio(struct svpy_blk *blk);
/* io_destroy waits for an RCU grace period (tens of ms): at process exit the
 * kernel releases AIO contexts anyway, so the monitor does not call this. */
void svpy_blk_destroy(struct svpy_blk *blk);

#endif
