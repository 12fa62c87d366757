/*
 * What the virtio-net actions share: opening svtest.nic=<i> (the i-th net device
 * among the virtio_mmio.device= tokens), and sending / receiving test frames.
 *
 * Command-line keys (all optional):
 *   svtest.nic=<i>          which net device (default 0)
 *   svtest.event_idx=0|1, svtest.indirect=0|1, svtest.mrg_rxbuf=0|1   accept when offered (1)
 *   svtest.offload=0|1      accept CSUM, GUEST_CSUM and the TSO/ECN bits when offered (0)
 *   svtest.queue_size=N     QueueNum of both queues (64, capped by QueueNumMax)
 *   svtest.timeout_ms=N     longest wait for one completion / frame (5000)
 */
#ifndef SVTEST_NET_ACTIONS_H
#define SVTEST_NET_ACTIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net_pattern.h"
#include "virtio_net.h"

/* A frame received by net_recv (the largest a merged rx chain can carry here). */
extern uint8_t net_frame_buf[NET_PATTERN_MAX];

/*
 * Initialises NIC nic into n (memory set slot) with opts.  On failure prints
 * "svtest: <action> FAIL init=<why> nic=<i>" and ends the run (done + reset).
 */
void net_open_or_finish(struct net_dev *n, const char *action, unsigned nic, unsigned slot,
                        const struct net_options *opts);

/*
 * Sends count test frames of size bytes (seq first_seq...) to dst, batching as
 * many as the tx queue takes, and waits until all are used.  0 or NET_ERR_*.
 */
int net_send_frames(struct net_dev *n, const uint8_t dst[6], uint32_t size, uint32_t count,
                    uint32_t first_seq);

/*
 * One round trip through a host that reflects test frames (tests/net_peer.py
 * echo): sends one frame of seq and waits for a test frame with the same
 * sequence number and payload (other frames are skipped).  Returns true, or false
 * with why filled in.
 */
bool net_ping(struct net_dev *n, uint32_t seq, unsigned timeout_ms, char *why, size_t why_size);

#endif
