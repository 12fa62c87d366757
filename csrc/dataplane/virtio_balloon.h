/* virtio-balloon page lists (virtio 1.x §5.5), processed on an I/O thread.
 *
 * The guest gives pages back by listing their frame numbers (4 KiB units) on
 * the inflate queue, takes them back on the deflate queue, and with free page
 * reporting hands over ranges of free memory.  Every frame and range is
 * checked against guest RAM; what is inside is released to the host with
 * madvise(), so the monitor's resident memory really falls, and a page the
 * guest touches again comes back zeroed.  A frame outside guest RAM is
 * ignored and counted.
 *
 * The statistics queue holds one buffer from the guest: the device keeps it
 * (and a copy of the statistics in it) until the control plane asks for fresh
 * ones, then hands it back so the guest refills it. */
#ifndef SVPY_VIRTIO_BALLOON_H
#define SVPY_VIRTIO_BALLOON_H

#include <stdint.h>

#include "guest_memory.h"
#include "iothread.h"
#include "virtio_device.h"
#include "virtqueue.h"

#define SVPY_BALLOON_PAGE_SHIFT 12
#define SVPY_BALLOON_QUEUES 4
/* What each queue index serves depends on the negotiated features: queues
 * that do not exist take no index (virtio-mmio drivers number only the
 * queues they use). */
enum svpy_balloon_role {
    SVPY_BALLOON_NONE = 0,
    SVPY_BALLOON_INFLATE = 1,
    SVPY_BALLOON_DEFLATE = 2,
    SVPY_BALLOON_STATS = 3,
    SVPY_BALLOON_REPORTING = 4,
};
/* struct virtio_balloon_stat is 10 bytes (le16 tag, le64 value, packed);
 * there are 10 tags in virtio 1.2, room for a few more. */
#define SVPY_BALLOON_STATS_BYTES 320
#define SVPY_BALLOON_PASS_MAX_CHAINS 64
/* Linux lists 256 frames per chain; a longer list is cut here (the rest is
 * counted as bad, not read) so that one chain cannot hold the device for
 * long, and a pass stops after this many frames and re-queues the rest. */
#define SVPY_BALLOON_MAX_FRAMES_PER_CHAIN 4096
#define SVPY_BALLOON_PASS_MAX_FRAMES 16384

struct svpy_balloon_counters {
    uint64_t inflated_pages;  /* frames the guest gave back, within guest RAM */
    uint64_t deflated_pages;  /* frames it took back */
    uint64_t reported_bytes;  /* free memory reported (free page reporting) */
    uint64_t bad_frames;      /* frames or ranges outside guest RAM: ignored */
    uint64_t released_bytes;  /* madvise()d back to the host */
    uint64_t madvise_errors;
    uint64_t stats_updates;   /* statistics buffers received */
};

struct svpy_balloon {
    struct svpy_device dev; /* first: the generic part */
    struct svpy_virtqueue vqs[SVPY_BALLOON_QUEUES];
    uint8_t roles[SVPY_BALLOON_QUEUES];
    /* MADV_REMOVE for shared mappings (it frees the backing pages), else MADV_DONTNEED. */
    int release_advice;
    /* The statistics buffer held back from the guest, or -1. */
    int32_t stats_head;
    uint32_t stats_len;
    uint8_t stats[SVPY_BALLOON_STATS_BYTES];
    int64_t stats_time; /* when they arrived: seconds since the epoch, 0 never */
    struct svpy_balloon_counters counters;
    struct svpy_chain chain;
};

int svpy_balloon_init(struct svpy_balloon *balloon, const struct svpy_guest_memory *mem,
                      int irqfd, int error_fd, const int *kick_fds);
int svpy_balloon_attach(struct svpy_balloon *balloon, struct svpy_iothread *thread);
/* After the caller activated the queues and set their roles (lock held). */
void svpy_balloon_start(struct svpy_balloon *balloon);
void svpy_balloon_stop(struct svpy_balloon *balloon);
/* Gives the statistics buffer back so the guest refills it; 0, or -1 if the
 * guest has not given one (lock held). */
int svpy_balloon_request_stats(struct svpy_balloon *balloon);
void svpy_balloon_destroy(struct svpy_balloon *balloon);

#endif
