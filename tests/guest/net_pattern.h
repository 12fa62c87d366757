/*
 * The test frames of the net actions, which the host recomputes:
 *   destination MAC, source MAC, ethertype 0x88b5 (IEEE local experimental 1),
 *   payload byte i:  i < 4: the sequence number, 32-bit big-endian;
 *                    i >= 4: (seq + i) mod 256
 * e.g. in Python: seq.to_bytes(4, "big") + bytes((seq + i) & 0xff for i in range(4, n)).
 * The payload after the sequence number is a window into one ramp (byte k = k mod 256)
 * starting at seq mod 256, so building and checking a frame are bulk copies and
 * compares (rep movsq / repe cmpsq), which the emulating host runs fast.
 */
#ifndef SVTEST_NET_PATTERN_H
#define SVTEST_NET_PATTERN_H

#include <stdbool.h>
#include <stdint.h>

#define NET_ETHERTYPE 0x88b5
#define NET_MIN_FRAME 18      /* header + sequence number */
#define NET_PATTERN_MAX 65536 /* longest frame built or checked */

extern const uint8_t net_broadcast[6];

/* Builds the ramp once (cheap on later calls). */
void net_pattern_init(void);

/* Writes a whole test frame of size bytes (NET_MIN_FRAME..NET_PATTERN_MAX). */
void net_frame_build(uint8_t *frame, uint32_t size, const uint8_t dst[6], const uint8_t src[6],
                     uint32_t seq);

/* The ethertype of a frame of at least 14 bytes. */
static inline uint16_t net_frame_type(const uint8_t *frame)
{
    return (uint16_t)(frame[12] << 8 | frame[13]);
}

/* The sequence number of a test frame of at least NET_MIN_FRAME bytes. */
static inline uint32_t net_frame_seq(const uint8_t *frame)
{
    return (uint32_t)frame[14] << 24 | (uint32_t)frame[15] << 16 | (uint32_t)frame[16] << 8 |
           frame[17];
}

/*
 * Offset (from the frame start) of the first payload byte after the sequence number
 * that breaks the pattern of the frame's own sequence number; len when none does.
 */
uint32_t net_frame_check(const uint8_t *frame, uint32_t len);

/* True when the payload starts with the 4 bytes "quit". */
bool net_frame_is_quit(const uint8_t *frame, uint32_t len);

#endif
