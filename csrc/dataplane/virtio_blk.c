#include "virtio_blk.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "eventfd.h"

/* How handling one chain ended. */
enum request_outcome {
    REQUEST_ANSWERED,  /* status byte written: push with the used length */
    REQUEST_IN_FLIGHT, /* handed to Linux AIO: answered when it completes */
    REQUEST_MALFORMED, /* no status byte to answer in: the driver broke the protocol */
};

/* do_read_write's answer for a request it handed to AIO (not a status byte). */
#define STATUS_IN_FLIGHT 0x100

struct request_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct discard_segment {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* Reads the chain's device-readable bytes front to back, in one pass over the
 * buffers whatever their sizes (a request's parts may be split anywhere). */
struct chain_reader {
    const struct iovec *iov;
    unsigned left; /* buffers from iov on */
    size_t offset; /* into iov[0] */
};

static struct chain_reader readable_part(const struct svpy_chain *chain)
{
    return (struct chain_reader){ chain->iov, chain->readable, 0 };
}

static bool read_next(struct chain_reader *reader, void *out, size_t len)
{
    uint8_t *dest = out;

    while (len) {
        if (!reader->left)
            return false;
        size_t room = reader->iov->iov_len - reader->offset;
        size_t take = room < len ? room : len;

        memcpy(dest, (const uint8_t *)reader->iov->iov_base + reader->offset, take);
        dest += take;
        len -= take;
        reader->offset += take;
        if (reader->offset == reader->iov->iov_len) {
            reader->iov++;
            reader->left--;
            reader->offset = 0;
        }
    }
    return true;
}

/* Builds in blk->data_iov the sub-range [offset, offset+len) of iov[first..first+count). */
static int slice(struct svpy_blk *blk, unsigned first, unsigned count, uint64_t offset,
                 uint64_t len)
{
    int used = 0;

    for (unsigned i = first; i < first + count && len; i++) {
        const struct iovec *iov = &blk->chain.iov[i];

        if (offset >= iov->iov_len) {
            offset -= iov->iov_len;
            continue;
        }
        size_t take = iov->iov_len - offset < len ? iov->iov_len - offset : len;
        blk->data_iov[used].iov_base = (uint8_t *)iov->iov_base + offset;
        blk->data_iov[used].iov_len = take;
        used++;
        len -= take;
        offset = 0;
    }
    return len ? -1 : used;
}

static uint8_t *status_byte(struct svpy_chain *chain)
{
    const struct iovec *last = &chain->iov[chain->readable + chain->writable - 1];

    return (uint8_t *)last->iov_base + last->iov_len - 1;
}

static bool in_range(const struct svpy_blk *blk, uint64_t sector, uint64_t sectors)
{
    return sector <= blk->capacity && sectors <= blk->capacity - sector;
}

/* preadv/pwritev until done; falls back to the buffered fd when O_DIRECT's
 * alignment rules refuse the guest's buffers (EINVAL). */
static int transfer(struct svpy_blk *blk, bool write, struct iovec *iov, int iovcnt,
                    uint64_t offset)
{
    int fd = blk->fd;

    while (iovcnt > 0) {
        ssize_t done = write ? pwritev(fd, iov, iovcnt, (off_t)offset)
                             : preadv(fd, iov, iovcnt, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EINVAL && fd != blk->buffered_fd && blk->buffered_fd >= 0) {
                fd = blk->buffered_fd;
                continue;
            }
            return -1;
        }
        if (done == 0)
            return -1; /* the image shrank under us */
        offset += (uint64_t)done;
        while (iovcnt > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    if (write && fd != blk->fd) {
        /* Keep O_DIRECT's promise for the bounced write: it reaches the disk. */
        if (fdatasync(fd) < 0)
            return -1;
    }
    return 0;
}

static int submit_aio(struct svpy_blk *blk, bool write, int iovcnt, uint64_t offset,
                      uint64_t len);
static unsigned submit_batch(struct svpy_blk *blk, int push);

/* Returns a VIRTIO_BLK_S_* status, or STATUS_IN_FLIGHT; *data_len gets the
 * bytes a read put in the guest's buffers. */
static int do_read_write(struct svpy_blk *blk, const struct request_header *header,
                         bool write, uint32_t *data_len)
{
    struct svpy_chain *chain = &blk->chain;
    /* 64-bit sums: 1024 buffers of up to 4 GiB each cannot wrap them. */
    uint64_t len = write ? chain->readable_bytes - sizeof(*header) : chain->writable_bytes - 1;
    int iovcnt;

    if (len > SVPY_BLK_MAX_REQUEST_BYTES || len % SVPY_SECTOR_SIZE || blk->fd < 0)
        return VIRTIO_BLK_S_IOERR;
    if (write && blk->read_only)
        return VIRTIO_BLK_S_IOERR;
    if (!in_range(blk, header->sector, len / SVPY_SECTOR_SIZE))
        return VIRTIO_BLK_S_IOERR;
    if (write)
        iovcnt = slice(blk, 0, chain->readable, sizeof(*header), len);
    else
        iovcnt = slice(blk, chain->readable, chain->writable, 0, len);
    if (iovcnt < 0)
        return VIRTIO_BLK_S_IOERR;
    blk->pass_bytes += len;
    if (len && blk->aio && blk->fd != blk->buffered_fd) {
        int ret = submit_aio(blk, write, iovcnt, header->sector * SVPY_SECTOR_SIZE, len);

        if (ret == 0)
            return STATUS_IN_FLIGHT;
        /* Not accepted by AIO (e.g. misaligned for O_DIRECT): served below. */
    }
    if (len && transfer(blk, write, blk->data_iov, iovcnt,
                        header->sector * SVPY_SECTOR_SIZE) < 0)
        return VIRTIO_BLK_S_IOERR;
    if (write) {
        blk->stats.written_bytes += len;
    } else {
        blk->stats.read_bytes += len;
        *data_len = (uint32_t)len;
    }
    return VIRTIO_BLK_S_OK;
}

static uint8_t do_get_id(struct svpy_blk *blk, uint32_t *data_len)
{
    uint64_t room = blk->chain.writable_bytes - 1;
    uint64_t len = room < SVPY_BLK_ID_BYTES ? room : SVPY_BLK_ID_BYTES;
    int iovcnt = slice(blk, blk->chain.readable, blk->chain.writable, 0, len);
    const uint8_t *source = (const uint8_t *)blk->serial;

    if (iovcnt < 0)
        return VIRTIO_BLK_S_IOERR;
    for (int i = 0; i < iovcnt; i++) {
        memcpy(blk->data_iov[i].iov_base, source, blk->data_iov[i].iov_len);
        source += blk->data_iov[i].iov_len;
    }
    *data_len = (uint32_t)len;
    return VIRTIO_BLK_S_OK;
}

static int zero_by_writing(struct svpy_blk *blk, uint64_t offset, uint64_t len)
{
    static const uint8_t zeros[65536];

    while (len) {
        size_t chunk = len < sizeof(zeros) ? len : sizeof(zeros);
        ssize_t done = pwrite(blk->buffered_fd >= 0 ? blk->buffered_fd : blk->fd, zeros, chunk,
                              (off_t)offset);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            return -1;
        offset += (uint64_t)done;
        len -= (uint64_t)done;
    }
    return 0;
}

/* The status a DISCARD / WRITE_ZEROES segment gets before any work: the
 * advertised limits and the flag rules of virtio 1.2 §5.2.6.2, with QEMU's
 * choice of status for each (too long or out of range: IOERR; unknown flags,
 * or UNMAP on a discard: UNSUPP). */
static uint8_t check_segment(const struct svpy_blk *blk, const struct discard_segment *segment,
                             bool zeroes)
{
    uint32_t max_sectors = zeroes ? SVPY_BLK_MAX_WRITE_ZEROES_SECTORS
                                  : SVPY_BLK_MAX_DISCARD_SECTORS;

    if (segment->num_sectors > max_sectors || !in_range(blk, segment->sector,
                                                        segment->num_sectors))
        return VIRTIO_BLK_S_IOERR;
    if (segment->flags & ~(uint32_t)VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        return VIRTIO_BLK_S_UNSUPP;
    if (!zeroes && (segment->flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_UNSUPP;
    return VIRTIO_BLK_S_OK;
}

_Static_assert(SVPY_BLK_MAX_WRITE_ZEROES_SEGMENTS <= SVPY_BLK_MAX_DISCARD_SEGMENTS,
               "do_discard holds either request's segments");

/* Every segment is read and checked before any is carried out: a refused
 * request changes nothing. */
static uint8_t do_discard(struct svpy_blk *blk, const struct request_header *header,
                          struct chain_reader *payload_reader)
{
    bool zeroes = header->type == VIRTIO_BLK_T_WRITE_ZEROES;
    uint64_t payload = blk->chain.readable_bytes - sizeof(*header);
    uint64_t max_segments = zeroes ? SVPY_BLK_MAX_WRITE_ZEROES_SEGMENTS
                                   : SVPY_BLK_MAX_DISCARD_SEGMENTS;
    struct discard_segment segments[SVPY_BLK_MAX_DISCARD_SEGMENTS];
    uint64_t count;

    if (!(zeroes ? blk->write_zeroes : blk->discard))
        return VIRTIO_BLK_S_UNSUPP;
    if (payload == 0 || payload % sizeof(struct discard_segment))
        return VIRTIO_BLK_S_IOERR;
    count = payload / sizeof(struct discard_segment);
    if (count > max_segments)
        return VIRTIO_BLK_S_UNSUPP;
    if (blk->read_only || blk->fd < 0)
        return VIRTIO_BLK_S_IOERR;
    for (uint64_t i = 0; i < count; i++) {
        uint8_t status;

        if (!read_next(payload_reader, &segments[i], sizeof(segments[i])))
            return VIRTIO_BLK_S_IOERR;
        status = check_segment(blk, &segments[i], zeroes);
        if (status != VIRTIO_BLK_S_OK)
            return status;
    }
    for (uint64_t i = 0; i < count; i++) {
        uint64_t start = segments[i].sector * SVPY_SECTOR_SIZE;
        uint64_t len = (uint64_t)segments[i].num_sectors * SVPY_SECTOR_SIZE;
        int mode;

        if (!zeroes || (segments[i].flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        else
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        if (len)
            blk->pass_bytes += SVPY_BLK_PASS_COST_SYNC;
        if (len && fallocate(blk->fd, mode, (off_t)start, (off_t)len) < 0) {
            /* Discard is a hint; zeroes must be zeroes whatever the file system. */
            if (!zeroes)
                continue;
            blk->pass_bytes += len;
            if (zero_by_writing(blk, start, len) < 0)
                return VIRTIO_BLK_S_IOERR;
        }
    }
    return VIRTIO_BLK_S_OK;
}

/* Serves the popped chain; with REQUEST_ANSWERED, *used_len is what to push. */
static enum request_outcome handle_request(struct svpy_blk *blk, uint32_t *used_len)
{
    struct svpy_chain *chain = &blk->chain;
    struct chain_reader reader = readable_part(chain);
    struct request_header header;
    uint32_t data_len = 0; /* bytes the device wrote before the status byte */
    int status;

    if (chain->writable == 0)
        return REQUEST_MALFORMED;
    if (!read_next(&reader, &header, sizeof(header))) {
        status = VIRTIO_BLK_S_IOERR;
        goto done;
    }
    switch (header.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        status = do_read_write(blk, &header, header.type == VIRTIO_BLK_T_OUT, &data_len);
        if (status == STATUS_IN_FLIGHT)
            return REQUEST_IN_FLIGHT;
        break;
    case VIRTIO_BLK_T_FLUSH:
        /* A flush covers every write the guest has seen complete, and those in flight. */
        svpy_blk_drain(blk, 1);
        blk->pass_bytes += SVPY_BLK_PASS_COST_SYNC;
        status = blk->fd >= 0 && fdatasync(blk->fd) < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
        break;
    case VIRTIO_BLK_T_GET_ID:
        status = do_get_id(blk, &data_len);
        break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        status = do_discard(blk, &header, &reader);
        break;
    default:
        status = VIRTIO_BLK_S_UNSUPP;
    }
done:
    if (status != VIRTIO_BLK_S_OK)
        blk->stats.errors++;
    blk->stats.requests++;
    *status_byte(chain) = (uint8_t)status;
    *used_len = (status == VIRTIO_BLK_S_OK ? data_len : 0) + 1;
    return REQUEST_ANSWERED;
}

static bool pass_budget_spent(const struct svpy_blk *blk, unsigned requests)
{
    return requests >= SVPY_BLK_PASS_MAX_REQUESTS || blk->pass_bytes >= SVPY_BLK_PASS_MAX_BYTES;
}

void svpy_blk_process(struct svpy_blk *blk)
{
    struct svpy_virtqueue *vq = &blk->vq;
    bool completed = false;
    unsigned requests = 0;

    if (!vq->active || __atomic_load_n(&blk->dev.shared.broken, __ATOMIC_SEQ_CST))
        return;
    blk->pass_bytes = 0;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            uint32_t used_len;
            int ret;

            /* No free AIO slot: completions will call us again. */
            if (blk->inflight == SVPY_BLK_AIO_DEPTH)
                goto out;
            if (pass_budget_spent(blk, requests)) {
                /* The rest waits for the I/O thread's next turn, after the
                 * other devices and whoever waits for this device's lock. */
                blk->stats.yields++;
                svpy_device_requeue(&blk->dev, 0);
                goto out;
            }
            ret = svpy_vq_pop(vq, blk->dev.mem, &blk->chain);
            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&blk->dev.shared, ret);
                goto out;
            }
            requests++;
            switch (handle_request(blk, &used_len)) {
            case REQUEST_IN_FLIGHT:
                continue;
            case REQUEST_MALFORMED:
                svpy_mark_broken(&blk->dev.shared, SVPY_VQ_ERR_REQUEST);
                goto out;
            case REQUEST_ANSWERED:
                break;
            }
            svpy_vq_push(vq, blk->chain.head, used_len);
            completed = true;
        }
    } while (svpy_vq_enable_notify(vq));
out:
    if (blk->unsubmitted && submit_batch(blk, 1))
        completed = true;
    if (completed && svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&blk->dev.shared, SVPY_INT_VRING);
}

/* --- Linux AIO for O_DIRECT requests ------------------------------------ */

static long io_setup_(unsigned nr, aio_context_t *ctx)
{
    return syscall(SYS_io_setup, nr, ctx);
}

static long io_submit_(aio_context_t ctx, long nr, struct iocb **iocbs)
{
    return syscall(SYS_io_submit, ctx, nr, iocbs);
}

static long io_getevents_(aio_context_t ctx, long min_nr, long nr, struct io_event *events,
                          struct timespec *timeout)
{
    return syscall(SYS_io_getevents, ctx, min_nr, nr, events, timeout);
}

static int submit_aio(struct svpy_blk *blk, bool write, int iovcnt, uint64_t offset,
                      uint64_t len)
{
    struct svpy_blk_request *request = NULL;
    struct iocb *iocb;

    for (unsigned i = 0; i < SVPY_BLK_AIO_DEPTH; i++) {
        if (!blk->requests[i].in_use) {
            request = &blk->requests[i];
            break;
        }
    }
    if (!request)
        return -1;
    request->iov = malloc(sizeof(struct iovec) * (size_t)iovcnt);
    if (!request->iov)
        return -1;
    memcpy(request->iov, blk->data_iov, sizeof(struct iovec) * (size_t)iovcnt);
    request->iovcnt = iovcnt;
    request->write = write;
    request->head = blk->chain.head;
    request->status = status_byte(&blk->chain);
    request->len = len;
    request->offset = offset;
    iocb = &request->iocb;
    memset(iocb, 0, sizeof(*iocb));
    iocb->aio_data = (uint64_t)(uintptr_t)request;
    iocb->aio_lio_opcode = write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
    iocb->aio_fildes = (uint32_t)blk->fd;
    iocb->aio_buf = (uint64_t)(uintptr_t)request->iov;
    iocb->aio_nbytes = (uint64_t)iovcnt;
    iocb->aio_offset = (int64_t)offset;
    iocb->aio_flags = IOCB_FLAG_RESFD;
    iocb->aio_resfd = (uint32_t)blk->aio_watch.fd;
    request->in_use = 1;
    blk->inflight++;
    blk->batch[blk->unsubmitted++] = iocb;
    return 0;
}

static void complete_request(struct svpy_blk *blk, struct svpy_blk_request *request, long res,
                             int push);

/* Hands the pass's requests to the kernel in one io_submit.  One it refuses
 * (O_DIRECT and misaligned guest buffers: EINVAL) is served synchronously
 * through the page cache, and the rest submitted after it.  Returns how
 * many were answered here. */
static unsigned submit_batch(struct svpy_blk *blk, int push)
{
    uint32_t done = 0;
    unsigned answered = 0;

    while (done < blk->unsubmitted) {
        long count = io_submit_(blk->aio, blk->unsubmitted - done, &blk->batch[done]);

        blk->stats.aio_submits++;
        if (count > 0) {
            done += (uint32_t)count;
            continue;
        }
        if (count < 0 && errno == EINTR)
            continue;
        complete_request(blk, (void *)(uintptr_t)blk->batch[done]->aio_data, -EINVAL, push);
        answered++;
        done++;
    }
    blk->unsubmitted = 0;
    return answered;
}

/* Answers one finished AIO request in the used ring. */
static void complete_request(struct svpy_blk *blk, struct svpy_blk_request *request, long res,
                             int push)
{
    uint8_t status = VIRTIO_BLK_S_OK;

    if (res == -EINVAL && push) {
        /* O_DIRECT refused the guest's buffers: once more through the page cache. */
        res = transfer(blk, request->write, request->iov, request->iovcnt, request->offset) < 0
              ? -EIO : (long)request->len;
    }
    if (res != (long)request->len)
        status = VIRTIO_BLK_S_IOERR;
    if (status == VIRTIO_BLK_S_OK) {
        if (request->write)
            blk->stats.written_bytes += request->len;
        else
            blk->stats.read_bytes += request->len;
    } else {
        blk->stats.errors++;
    }
    blk->stats.requests++;
    if (push) {
        *request->status = status;
        svpy_vq_push(&blk->vq, request->head,
                     1 + (request->write || status ? 0 : (uint32_t)request->len));
    }
    free(request->iov);
    request->iov = NULL;
    request->in_use = 0;
    blk->inflight--;
}

/* io_getevents failed for another reason than a signal: the context is
 * unusable (EINVAL, EFAULT) and nothing in flight will ever be reported.
 * Rather than wait forever, fail those requests and serve the next ones
 * without AIO.  io_destroy first: it waits for (or cancels) what the kernel
 * still has in flight, so no buffer is touched after its request is answered. */
static unsigned abandon_aio(struct svpy_blk *blk, int push)
{
    unsigned failed = 0;

    syscall(SYS_io_destroy, blk->aio);

    for (unsigned i = 0; i < SVPY_BLK_AIO_DEPTH; i++) {
        if (blk->requests[i].in_use) {
            complete_request(blk, &blk->requests[i], -EIO, push);
            failed++;
        }
    }
    blk->aio = 0;
    return failed;
}

/* Collects finished requests; waits for at least `wait_for` of them. */
static unsigned reap(struct svpy_blk *blk, long wait_for, int push)
{
    struct io_event events[SVPY_BLK_AIO_DEPTH];
    struct timespec no_wait = {0, 0};
    unsigned done = 0;
    long count;

    do {
        count = io_getevents_(blk->aio, wait_for, SVPY_BLK_AIO_DEPTH, events,
                              wait_for ? NULL : &no_wait);
    } while (count < 0 && errno == EINTR);
    if (count < 0)
        return abandon_aio(blk, push);
    for (long i = 0; i < count; i++) {
        struct svpy_blk_request *request = (void *)(uintptr_t)events[i].data;

        complete_request(blk, request, (long)events[i].res, push);
        done++;
    }
    return done;
}

void svpy_blk_drain(struct svpy_blk *blk, int complete)
{
    unsigned completed = 0;

    /* What is waited for must have been submitted. */
    if (blk->unsubmitted)
        completed += submit_batch(blk, complete && blk->vq.active);

    /* Ends: each reap completes at least one request or turns AIO off. */
    while (blk->aio && blk->inflight)
        completed += reap(blk, (long)blk->inflight, complete && blk->vq.active);
    if (completed && complete && svpy_vq_should_interrupt(&blk->vq))
        svpy_raise_interrupt(&blk->dev.shared, SVPY_INT_VRING);
}

static void on_aio_complete(void *context)
{
    struct svpy_blk *blk = context;
    uint64_t count;

    if (read(blk->aio_watch.fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return;
    svpy_lock(&blk->dev.shared);
    if (reap(blk, 0, blk->vq.active) && svpy_vq_should_interrupt(&blk->vq))
        svpy_raise_interrupt(&blk->dev.shared, SVPY_INT_VRING);
    /* Requests may be waiting for a free slot. */
    svpy_blk_process(blk);
    svpy_unlock(&blk->dev.shared);
}

static void on_queue_notified(struct svpy_device *dev, unsigned queue)
{
    (void)queue; /* one queue */
    svpy_blk_process((struct svpy_blk *)dev);
}

int svpy_blk_init(struct svpy_blk *blk, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds)
{
    blk->fd = -1;
    blk->buffered_fd = -1;
    blk->capacity = 0;
    blk->inflight = 0;
    blk->unsubmitted = 0;
    blk->aio = 0;
    blk->aio_watch.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    blk->aio_watch.handler = on_aio_complete;
    blk->aio_watch.context = blk;
    if (blk->aio_watch.fd < 0)
        return -errno;
    return svpy_device_init(&blk->dev, mem, irqfd, error_fd, 1, kick_fds, on_queue_notified);
}

int svpy_blk_enable_aio(struct svpy_blk *blk)
{
    /* Set up on the first O_DIRECT backend only: empty slots need none. */
    if (!blk->aio && io_setup_(SVPY_BLK_AIO_DEPTH, &blk->aio) < 0) {
        blk->aio = 0;
        return -errno;
    }
    return 0;
}

int svpy_blk_attach(struct svpy_blk *blk, struct svpy_iothread *thread)
{
    int ret = svpy_device_attach(&blk->dev, thread);

    return ret ? ret : svpy_iothread_watch(thread, &blk->aio_watch);
}

void svpy_blk_destroy(struct svpy_blk *blk)
{
    svpy_blk_drain(blk, 0);
    if (blk->aio)
        syscall(SYS_io_destroy, blk->aio);
    blk->aio = 0;
    if (blk->aio_watch.fd >= 0)
        close(blk->aio_watch.fd);
    blk->aio_watch.fd = -1;
    svpy_device_destroy(&blk->dev);
}
