/* Test frames: building and checking (see net_pattern.h). */
#include "net_pattern.h"

#include "guestmem.h"

const uint8_t net_broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

/* byte k = k mod 256; room for the start offset (up to 259) past the longest payload. */
static uint8_t ramp[NET_PATTERN_MAX + 260] __attribute__((aligned(64))) NOINIT;
static bool ramp_ready;

void net_pattern_init(void)
{
    if (ramp_ready)
        return;
    for (unsigned k = 0; k < 256; k++)
        ramp[k] = (uint8_t)k;
    /* Doubling copies: a few thousand string-instruction iterations in all. */
    for (uint32_t have = 256; have < sizeof(ramp);) {
        uint32_t n = have <= sizeof(ramp) - have ? have : (uint32_t)sizeof(ramp) - have;
        mem_copy(ramp + have, ramp, n);
        have += n;
    }
    ramp_ready = true;
}

void net_frame_build(uint8_t *frame, uint32_t size, const uint8_t dst[6], const uint8_t src[6],
                     uint32_t seq)
{
    mem_copy(frame, dst, 6);
    mem_copy(frame + 6, src, 6);
    frame[12] = NET_ETHERTYPE >> 8;
    frame[13] = NET_ETHERTYPE & 0xff;
    frame[14] = (uint8_t)(seq >> 24);
    frame[15] = (uint8_t)(seq >> 16);
    frame[16] = (uint8_t)(seq >> 8);
    frame[17] = (uint8_t)seq;
    if (size > NET_MIN_FRAME)
        mem_copy(frame + NET_MIN_FRAME, ramp + (seq & 0xff) + 4, size - NET_MIN_FRAME);
}

uint32_t net_frame_check(const uint8_t *frame, uint32_t len)
{
    if (len <= NET_MIN_FRAME)
        return len;
    uint32_t n = len - NET_MIN_FRAME;
    if (n > NET_PATTERN_MAX)
        n = NET_PATTERN_MAX;
    uint32_t seq = net_frame_seq(frame);
    size_t off = mem_diff(frame + NET_MIN_FRAME, ramp + (seq & 0xff) + 4, n);
    return off < n ? NET_MIN_FRAME + (uint32_t)off : len;
}

bool net_frame_is_quit(const uint8_t *frame, uint32_t len)
{
    return len >= NET_MIN_FRAME && frame[14] == 'q' && frame[15] == 'u' && frame[16] == 'i' &&
           frame[17] == 't';
}
