/*
 * What CPUID tells this CPU about itself: its APIC ids and its identity (vendor,
 * family/model/stepping, brand string), as Linux shows them in /proc/cpuinfo.
 */
#ifndef SVTEST_CPUINFO_H
#define SVTEST_CPUINFO_H

#include <stdbool.h>
#include <stdint.h>

/* Initial APIC id: CPUID leaf 1 EBX[31:24]. */
uint32_t cpuid_initial_apic_id(void);

/*
 * x2APIC id: CPUID leaf 0xB EDX.  False when the leaf is beyond the maximum basic
 * leaf or its subleaf 0 is invalid (level type 0 and no logical processors).
 */
bool cpuid_x2apic_id(uint32_t *id);

/* Boot report lines cpuid-apic-id, cpuid-x2apic-id, cpuid-vendor, cpuid-max-leaf,
 * cpuid-max-ext-leaf, cpuid-family/model/stepping and cpuid-brand (README.md). */
void report_cpu_identity(void);

#endif
