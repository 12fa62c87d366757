/*
 * Wall-clock time from the TSC, for bounded polling.
 *
 * The guest has no timer interrupt, so waits are measured with RDTSC against a
 * frequency taken from CPUID (leaf 0x15, 0x16, or the hypervisor leaf 0x40000010)
 * or, when none gives one, assumed to be TSC_ASSUMED_KHZ.  With the assumption a
 * "500 ms" wait lasts between about 0.4 s and 1.5 s on any x86 host made in the
 * last 15 years: good enough for time-outs, not for measurements.
 */
#ifndef SVTEST_TSC_H
#define SVTEST_TSC_H

#include <stdbool.h>
#include <stdint.h>

#define TSC_ASSUMED_KHZ 2500000u

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ __volatile__("pause" ::: "memory");
}

/* TSC ticks per millisecond (computed once, on first use). */
uint64_t tsc_khz(void);

/* Where tsc_khz() came from: "cpuid-15", "cpuid-16", "hypervisor", "assumed". */
const char *tsc_khz_source(void);

/* The TSC value ms milliseconds from now. */
uint64_t tsc_deadline_ms(uint64_t ms);

/* The TSC value us microseconds from now. */
uint64_t tsc_deadline_us(uint64_t us);

static inline bool tsc_passed(uint64_t deadline)
{
    return (int64_t)(rdtsc() - deadline) >= 0;
}

/* Milliseconds elapsed since the TSC value start. */
uint64_t tsc_elapsed_ms(uint64_t start);

/* Busy-waits (pause loop, no exits) for us microseconds. */
void tsc_delay_us(uint64_t us);

#endif
