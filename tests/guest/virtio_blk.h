/*
 * virtio-blk driver (virtio 1.x, section 5.2) over virtio-mmio, one request
 * queue, polled.  Requests are a header (device-readable), data buffers, and a
 * status byte (device-writable), as a direct chain or through an indirect table.
 */
#ifndef SVTEST_VIRTIO_BLK_H
#define SVTEST_VIRTIO_BLK_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_mmio.h"
#include "virtqueue.h"

/* Feature bits (5.2.3). */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_CONFIG_WCE 11
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

/* Config space offsets (struct virtio_blk_config). */
#define VIRTIO_BLK_CFG_CAPACITY 0           /* le64, 512-byte sectors */
#define VIRTIO_BLK_CFG_SIZE_MAX 8           /* le32 */
#define VIRTIO_BLK_CFG_SEG_MAX 12           /* le32 */
#define VIRTIO_BLK_CFG_BLK_SIZE 20          /* le32 */
#define VIRTIO_BLK_CFG_WRITEBACK 32         /* u8 */
#define VIRTIO_BLK_CFG_NUM_QUEUES 34        /* le16 */
#define VIRTIO_BLK_CFG_MAX_DISCARD 36       /* le32 max_discard_sectors */
#define VIRTIO_BLK_CFG_MAX_WRITE_ZEROES 48  /* le32 max_write_zeroes_sectors */

/* Request types and status values (5.2.6). */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20

#define BLK_SECTOR_SIZE 512
#define BLK_MAX_SEGS 16 /* data buffers per request this driver builds at most */
#define BLK_QUEUE_SIZE 16 /* QueueNum this driver asks for (less if QueueNumMax is less) */

/* blk_do() results that are not a device status byte. */
#define BLK_ERR_TIMEOUT (-1) /* no completion before the time-out */
#define BLK_ERR_SUBMIT (-2)  /* too many segments for the ring / seg_max */
#define BLK_ERR_BROKEN (-3)  /* the device set DEVICE_NEEDS_RESET while we waited */
#define BLK_ERR_BAD_ID (-4)  /* a used element named a descriptor we did not submit */

struct blk_options {
    bool event_idx; /* accept VIRTIO_F_EVENT_IDX when offered */
    bool indirect;  /* accept VIRTIO_F_INDIRECT_DESC when offered */
    bool discard;   /* accept VIRTIO_BLK_F_DISCARD and WRITE_ZEROES when offered */
    uint16_t queue_size;
    unsigned timeout_ms; /* per wait for completions */
};

struct blk_seg {
    void *buf;
    uint32_t len;
};

struct blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct blk_req {
    struct blk_req_header hdr;
    volatile uint8_t status; /* 0xff until the device writes it */
    bool indirect;
    bool done;
    int head;
    uint32_t used_len;
    uint32_t data_len; /* sum of the segments */
    /* The indirect table, at table + blk_dev.table_offset bytes (so one spare entry). */
    struct vq_desc table[BLK_MAX_SEGS + 3] __attribute__((aligned(16)));
};

struct blk_dev {
    const struct virtio_mmio_dev *mmio;
    struct virtq vq;
    uint64_t offered, accepted;
    uint16_t queue_num_max;
    bool event_idx, indirect, ro, flush;
    uint64_t capacity;
    uint32_t generation, size_max, seg_max, blk_size;
    unsigned timeout_ms;
    /* Added to the address of every indirect table: 8 puts tables 8-byte aligned
     * as Linux's SLOB allocator does (the spec asks no alignment). */
    uint32_t table_offset;

    struct blk_req *inflight[VQ_MAX_SIZE];
    unsigned pending;

    /* statistics */
    unsigned requests;   /* completed */
    uint64_t bytes;      /* data bytes of completed requests with status OK */
    unsigned waits;      /* completion rounds that found something */
    unsigned irq_seen;   /* rounds after which InterruptStatus bit 0 was set */
    unsigned used_len_mismatches;
    char used_len_first[96];
};

/* Reads the device registers and config without touching Status. */
uint32_t blk_device_id(const struct virtio_mmio_dev *m);
void blk_read_config(struct blk_dev *b);

/*
 * Full initialisation (3.1.1): reset, ACKNOWLEDGE, DRIVER, features (VERSION_1
 * required; EVENT_IDX / INDIRECT_DESC / DISCARD + WRITE_ZEROES per options; FLUSH,
 * SEG_MAX, SIZE_MAX, BLK_SIZE, RO, GEOMETRY, TOPOLOGY when offered), FEATURES_OK
 * and its check, queue 0, DRIVER_OK.  Returns NULL, or what failed ("version=1", ...).
 */
const char *blk_init(struct blk_dev *b, const struct virtio_mmio_dev *m,
                     const struct blk_options *opts);

/* Most data buffers one request may carry (queue size, seg_max, BLK_MAX_SEGS). */
unsigned blk_max_segs(const struct blk_dev *b);

/*
 * Queues a request (no notification).  segs may be device-readable (OUT) or
 * device-writable (anything else).  Returns 0 or BLK_ERR_SUBMIT.
 */
int blk_submit(struct blk_dev *b, struct blk_req *r, uint32_t type, uint64_t sector,
               const struct blk_seg *segs, unsigned nseg, bool indirect);

/* Notifies the device if it asks for it. */
void blk_kick(struct blk_dev *b);

/* Waits until nothing is pending: 0, or BLK_ERR_TIMEOUT / BLK_ERR_BROKEN / BLK_ERR_BAD_ID. */
int blk_wait_all(struct blk_dev *b);

/* submit + kick + wait: the status byte (0..255) or a BLK_ERR_* value. */
int blk_do(struct blk_dev *b, uint32_t type, uint64_t sector, const struct blk_seg *segs,
           unsigned nseg, bool indirect);

/* GET_ID into out (NUL-terminated, non-printable bytes as '?'): the status or BLK_ERR_*. */
int blk_get_id(struct blk_dev *b, char out[VIRTIO_BLK_ID_BYTES + 1]);

/* "ok", "ioerr", "unsupp", "timeout", ... for a blk_do() result. */
const char *blk_result_name(int result);

#endif
