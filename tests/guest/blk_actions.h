/*
 * What the virtio-blk actions share: the device list from the command line,
 * options, opening svtest.blk=<index>, the data buffers, and a 4 KiB check.
 *
 * Command-line keys (all optional):
 *   svtest.blk=<index>        which virtio_mmio.device= token (default 0)
 *   svtest.event_idx=0|1      accept VIRTIO_F_EVENT_IDX when offered (default 1)
 *   svtest.indirect=0|1       accept VIRTIO_F_INDIRECT_DESC when offered (default 1)
 *   svtest.queue_size=N       QueueNum to ask for (default 16, capped by QueueNumMax)
 *   svtest.timeout_ms=N       time-out of one wait for completions (default 5000)
 */
#ifndef SVTEST_BLK_ACTIONS_H
#define SVTEST_BLK_ACTIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "virtio_blk.h"
#include "virtio_mmio.h"

#define BLK_BUF_SIZE (64 * 1024)
#define BLK_SCATTER_SIZE (80 * 1024)

/* Device buffers in .noinit: write staging, read target, scatter area. */
extern uint8_t blk_wbuf[BLK_BUF_SIZE];
extern uint8_t blk_rbuf[BLK_BUF_SIZE];
extern uint8_t blk_sbuf[BLK_SCATTER_SIZE];

extern struct virtio_mmio_dev virtio_devs[VIRTIO_MMIO_MAX_DEVICES];

/* Parses the virtio_mmio.device= tokens into virtio_devs; returns the token count. */
unsigned virtio_devices_discover(void);

void blk_options_from_cmdline(struct blk_options *opts);

/*
 * Discovers the devices and initialises svtest.blk=<index> into b.  On failure
 * prints "svtest: <action> FAIL init=<why> ..." and ends the run (done + reset).
 */
void blk_open_or_finish(struct blk_dev *b, const char *action, const struct blk_options *opts);

/*
 * Writes 4 KiB of the tagged pattern at sector, reads it back into other memory
 * and compares.  Returns true, or false with why filled in.
 */
bool blk_check_4k(struct blk_dev *b, uint64_t sector, unsigned tag, char *why, size_t why_size);

#endif
