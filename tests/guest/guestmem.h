/*
 * Guest memory for device buffers, and fast bulk helpers.
 *
 * Buffers that devices read or write live in .noinit: a NOLOAD section after .bss
 * in the RW PT_LOAD segment (so it is RAM the loader accounts for) that the entry
 * code does not zero.  Zeroing .bss costs emulated instructions on the kvm_pvm
 * host; the device buffers (about 2.3 MiB with blk-bench's data area) would multiply
 * that cost on every boot.
 * Code that needs them zeroed or poisoned does it itself.
 *
 * The bulk helpers use rep movsq/stosq/cmpsq: KVM's instruction emulator runs a
 * string instruction many times faster than the equivalent C loop.
 */
#ifndef SVTEST_GUESTMEM_H
#define SVTEST_GUESTMEM_H

#include <stddef.h>
#include <stdint.h>

#define NOINIT __attribute__((section(".noinit")))

/* Copies n bytes (rep movsq, then rep movsb for the tail). */
void mem_copy(void *dst, const void *src, size_t n);

/* Sets n bytes to byte (rep stosq, then rep stosb). */
void mem_fill(void *dst, uint8_t byte, size_t n);

/* Offset of the first byte where a and b differ, or n when equal (repe cmpsq). */
size_t mem_diff(const void *a, const void *b, size_t n);

/* Reads the 8 bytes at p (any alignment). */
static inline uint64_t load64(const void *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}

/*
 * The end (exclusive) of the highest e820 RAM range below 4 GiB, from the boot
 * information; 0 when there is none.
 */
uint64_t guest_ram_top_below_4g(void);

#endif
