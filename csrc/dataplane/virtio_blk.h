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

/* What the device advertises in its config space, and enforces.
 *
 * A read or write carries at most SVPY_BLK_MAX_REQUEST_BYTES of data; larger
 * ones get IOERR before any I/O.  That bounds the time one request holds the
 * device lock, keeps the used length far from 32-bit overflow, and keeps every
 * transfer below the kernel's cap on one read/write (0x7ffff000 bytes), which
 * would cut an O_DIRECT AIO request short.  seg_max * size_max stays within it,
 * so a driver that follows the advertised limits never meets it. */
#define SVPY_BLK_SEG_MAX 126
#define SVPY_BLK_SIZE_MAX (256u << 10)
#define SVPY_BLK_MAX_REQUEST_BYTES (32u << 20)
_Static_assert((uint64_t)SVPY_BLK_SEG_MAX * SVPY_BLK_SIZE_MAX <= SVPY_BLK_MAX_REQUEST_BYTES,
               "a request within seg_max and size_max must be served");
/* Discard punches holes (file system metadata work); write-zeroes may fall back
 * to writing zeros, so it gets the same bound as a write. */
#define SVPY_BLK_MAX_DISCARD_SECTORS (1u << 22)
#define SVPY_BLK_MAX_DISCARD_SEGMENTS 16
#define SVPY_BLK_MAX_WRITE_ZEROES_SECTORS (SVPY_BLK_MAX_REQUEST_BYTES / SVPY_SECTOR_SIZE)
#define SVPY_BLK_MAX_WRITE_ZEROES_SEGMENTS 1

/* One pass over the queue stops after this much work, then re-queues itself on
 * the I/O thread, so that a guest that keeps the ring full cannot keep the
 * device lock (and the thread, and the other disks) forever.  Work is counted
 * in bytes moved; a flush or an fallocate() costs a fixed share instead. */
#define SVPY_BLK_PASS_MAX_REQUESTS 256
#define SVPY_BLK_PASS_MAX_BYTES (64u << 20)
#define SVPY_BLK_PASS_COST_SYNC (SVPY_BLK_PASS_MAX_BYTES / 16)

struct svpy_blk_stats {
    uint64_t requests;
    uint64_t read_bytes;
    uint64_t written_bytes;
    uint64_t errors;
    uint64_t yields; /* passes that stopped at the work budget and re-queued the rest */
    uint64_t aio_submits; /* io_submit calls: one per pass, however many requests */
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
    struct svpy_device dev; /* first: the generic part */
    struct svpy_virtqueue vq;
    /* Backend; fd < 0 is an empty slot (capacity 0). */
    int fd;
    int buffered_fd; /* the same file without O_DIRECT, for misaligned requests */
    uint64_t capacity; /* in 512-byte sectors */
    uint8_t read_only;
    uint8_t discard;      /* VIRTIO_BLK_F_DISCARD negotiated */
    uint8_t write_zeroes; /* VIRTIO_BLK_F_WRITE_ZEROES negotiated */
    char serial[SVPY_BLK_ID_BYTES];
    struct svpy_blk_stats stats;
    uint64_t pass_bytes; /* data moved in the current pass (its work budget) */
    struct svpy_chain chain;
    struct iovec data_iov[SVPY_CHAIN_MAX_SEGMENTS];
    /* O_DIRECT reads and writes go through Linux AIO so that many are in
     * flight at once; completions arrive on aio_event_fd.  aio == 0 means
     * AIO is unavailable and every request is served synchronously. */
    aio_context_t aio;
    struct svpy_watch aio_watch;
    uint32_t inflight;
    struct svpy_blk_request requests[SVPY_BLK_AIO_DEPTH];
    /* Requests of the current pass, handed to the kernel together (one
     * io_submit) when the pass ends or before anything waits for them. */
    uint32_t unsubmitted;
    struct iocb *batch[SVPY_BLK_AIO_DEPTH];
};

int svpy_blk_init(struct svpy_blk *blk, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds);
/* Listens for the guest's queue notifications and AIO completions on `thread`. */
int svpy_blk_attach(struct svpy_blk *blk, struct svpy_iothread *thread);
/* Drains the queue; the caller holds the device lock. */
void svpy_blk_process(struct svpy_blk *blk);
/* Waits for requests in flight (lock held).  With `complete`, they are
 * answered in the used ring; without (device reset), they are forgotten.  If
 * Linux AIO stops answering (io_getevents fails), the requests in flight fail
 * with IOERR and the device goes on without AIO. */
void svpy_blk_drain(struct svpy_blk *blk, int complete);
/* Without AIO (e.g. the host's aio-max-nr is used up) requests are synchronous. */
int svpy_blk_enable_aio(struct svpy_blk *blk);
/* io_destroy waits for an RCU grace period (tens of ms): at process exit the
 * kernel releases AIO contexts anyway, so the monitor does not call this. */
void svpy_blk_destroy(struct svpy_blk *blk);

#endif
