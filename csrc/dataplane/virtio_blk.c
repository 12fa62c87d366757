#include "virtio_blk.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>

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

/* Copies `len` bytes at `offset` of the chain's readable part into `out`. */
static int gather(const struct svpy_chain *chain, uint64_t offset, void *out, size_t len)
{
    uint8_t *dest = out;

    for (unsigned i = 0; i < chain->readable && len; i++) {
        const struct iovec *iov = &chain->iov[i];

        if (offset >= iov->iov_len) {
            offset -= iov->iov_len;
            continue;
        }
        size_t take = iov->iov_len - offset < len ? iov->iov_len - offset : len;
        memcpy(dest, (uint8_t *)iov->iov_base + offset, take);
        dest += take;
        len -= take;
        offset = 0;
    }
    return len ? -1 : 0;
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
static int transfer(struct svpy_blk *blk, bool write, int iovcnt, uint64_t offset)
{
    struct iovec *iov = blk->data_iov;
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

static uint8_t do_read_write(struct svpy_blk *blk, const struct request_header *header,
                             bool write, uint32_t *written)
{
    struct svpy_chain *chain = &blk->chain;
    uint64_t len = write ? chain->readable_bytes - sizeof(*header) : chain->writable_bytes - 1;
    int iovcnt;

    if (len % SVPY_SECTOR_SIZE || blk->fd < 0)
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
    if (len && transfer(blk, write, iovcnt, header->sector * SVPY_SECTOR_SIZE) < 0)
        return VIRTIO_BLK_S_IOERR;
    if (write) {
        blk->stats.written_bytes += len;
    } else {
        blk->stats.read_bytes += len;
        *written += (uint32_t)len;
    }
    return VIRTIO_BLK_S_OK;
}

static uint8_t do_get_id(struct svpy_blk *blk, uint32_t *written)
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
    *written += (uint32_t)len;
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

static uint8_t do_discard(struct svpy_blk *blk, const struct request_header *header)
{
    bool zeroes = header->type == VIRTIO_BLK_T_WRITE_ZEROES;
    uint64_t payload = blk->chain.readable_bytes - sizeof(*header);

    if (!(zeroes ? blk->write_zeroes : blk->discard))
        return VIRTIO_BLK_S_UNSUPP;
    if (blk->read_only || blk->fd < 0 || payload == 0 || payload % sizeof(struct discard_segment))
        return VIRTIO_BLK_S_IOERR;
    for (uint64_t offset = sizeof(*header); offset < blk->chain.readable_bytes;
         offset += sizeof(struct discard_segment)) {
        struct discard_segment segment;
        int mode;

        if (gather(&blk->chain, offset, &segment, sizeof(segment)) < 0
            || !in_range(blk, segment.sector, segment.num_sectors))
            return VIRTIO_BLK_S_IOERR;
        uint64_t start = segment.sector * SVPY_SECTOR_SIZE;
        uint64_t len = (uint64_t)segment.num_sectors * SVPY_SECTOR_SIZE;
        if (!zeroes || (segment.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        else
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        if (len && fallocate(blk->fd, mode, (off_t)start, (off_t)len) < 0) {
            /* Discard is a hint; zeroes must be zeroes whatever the file system. */
            if (!zeroes)
                continue;
            if (zero_by_writing(blk, start, len) < 0)
                return VIRTIO_BLK_S_IOERR;
        }
    }
    return VIRTIO_BLK_S_OK;
}

/* Handles one chain; returns the used length, or -1 if it cannot be answered. */
static int handle_request(struct svpy_blk *blk)
{
    struct svpy_chain *chain = &blk->chain;
    struct request_header header;
    uint32_t written = 1; /* the status byte */
    uint8_t status;

    if (chain->writable == 0)
        return -1; /* nowhere to put a status: the driver broke the protocol */
    if (gather(chain, 0, &header, sizeof(header)) < 0) {
        status = VIRTIO_BLK_S_IOERR;
        goto done;
    }
    switch (header.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        status = do_read_write(blk, &header, header.type == VIRTIO_BLK_T_OUT, &written);
        break;
    case VIRTIO_BLK_T_FLUSH:
        status = blk->fd >= 0 && fdatasync(blk->fd) < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
        break;
    case VIRTIO_BLK_T_GET_ID:
        status = do_get_id(blk, &written);
        break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        status = do_discard(blk, &header);
        break;
    default:
        status = VIRTIO_BLK_S_UNSUPP;
    }
done:
    if (status != VIRTIO_BLK_S_OK)
        blk->stats.errors++;
    blk->stats.requests++;
    *status_byte(chain) = status;
    return (int)written;
}

void svpy_blk_process(struct svpy_blk *blk)
{
    struct svpy_virtqueue *vq = &blk->vq;
    bool completed = false;

    if (!vq->active || __atomic_load_n(&blk->shared.broken, __ATOMIC_SEQ_CST))
        return;
    do {
        svpy_vq_disable_notify(vq);
        for (;;) {
            int ret = svpy_vq_pop(vq, blk->mem, &blk->chain);
            int written;

            if (ret == 0)
                break;
            if (ret < 0) {
                svpy_mark_broken(&blk->shared, ret);
                goto out;
            }
            written = handle_request(blk);
            if (written < 0) {
                svpy_mark_broken(&blk->shared, SVPY_VQ_ERR_REQUEST);
                goto out;
            }
            svpy_vq_push(vq, blk->chain.head, (uint32_t)written);
            completed = true;
        }
    } while (svpy_vq_enable_notify(vq));
out:
    if (completed && svpy_vq_should_interrupt(vq))
        svpy_raise_interrupt(&blk->shared, SVPY_INT_VRING);
}

static void on_kick(void *context)
{
    struct svpy_blk *blk = context;
    uint64_t count;

    /* Clear the ioeventfd; several notifications collapse into one pass. */
    if (read(blk->kick.fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return;
    svpy_lock(&blk->shared);
    svpy_blk_process(blk);
    svpy_unlock(&blk->shared);
}

int svpy_blk_init(struct svpy_blk *blk, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, int kick_fd)
{
    blk->mem = mem;
    blk->fd = -1;
    blk->buffered_fd = -1;
    blk->capacity = 0;
    blk->kick.fd = kick_fd;
    blk->kick.handler = on_kick;
    blk->kick.context = blk;
    return svpy_shared_init(&blk->shared, irqfd, error_fd);
}

int svpy_blk_attach(struct svpy_blk *blk, struct svpy_iothread *thread)
{
    return svpy_iothread_watch(thread, &blk->kick);
}
