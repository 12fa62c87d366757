/*
 * Disk data patterns.
 *
 * Tagged pattern (blk-rw, hostile recovery), 64-bit little-endian word j (0..63)
 * of sector s written in pass t:
 *     j == 0:  ((t << 56) | ((s mod 2^48) << 8))        XOR 0x5a5a5a5a5a5a5a5a
 *     j >= 1:  ((t << 56) | (j << 40) | (j << 8))        XOR 0x5a5a5a5a5a5a5a5a
 * The first word names the sector, every word its pass and place in the sector
 * (so misplaced sectors, stale data and reordered segments all show).  Only the
 * first word depends on the sector: the rest is copied, which the instruction
 * emulator of the kvm_pvm host runs 5 times faster than computing it.
 *
 * Host pattern (blk-write-pattern / blk-read-pattern), which a test on the host
 * recomputes: byte i (0..511) of sector s with seed x is
 *     (x * 131 + s * 7 + i) mod 256
 */
#ifndef SVTEST_BLK_PATTERN_H
#define SVTEST_BLK_PATTERN_H

#include <stddef.h>
#include <stdint.h>

uint64_t pattern_tagged_word(uint64_t sector, unsigned tag, unsigned j);
void pattern_fill_tagged(void *buf, uint64_t sector, uint32_t sectors, unsigned tag);
void pattern_fill_host(void *buf, uint64_t sector, uint32_t sectors, uint64_t seed);

/* Offset of the first byte of buf (sectors long) that differs from the host pattern. */
size_t pattern_check_host(const void *buf, uint64_t sector, uint32_t sectors, uint64_t seed);

#endif
