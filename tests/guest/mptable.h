/*
 * Intel MultiProcessor Specification 1.4 tables: the floating pointer ("_MP_")
 * and the configuration table ("PCMP") the monitor writes for its vCPUs and IOAPIC.
 */
#ifndef SVTEST_MPTABLE_H
#define SVTEST_MPTABLE_H

#include <stdint.h>

#define MP_MAX_CPUS 64
#define MP_MAX_IOAPICS 8

enum mp_status {
    MP_OK,
    MP_MISSING,      /* no "_MP_" signature in the searched areas */
    MP_BAD_CHECKSUM, /* floating pointer or configuration table checksum wrong */
    MP_BAD_TABLE,    /* no table pointer, bad "PCMP" signature, bad entry type or overrun */
};

struct mp_ioapic {
    uint8_t id;
    uint8_t flags; /* bit 0: usable */
    uint32_t addr;
};

struct mp_info {
    enum mp_status status;
    uintptr_t floating_addr; /* where "_MP_" was found */
    uintptr_t table_addr;    /* the "PCMP" table */
    uint32_t lapic_addr;
    unsigned cpus;        /* enabled processor entries */
    unsigned cpu_entries; /* all processor entries, enabled or not */
    uint8_t apic_ids[MP_MAX_CPUS];
    int bsp_apic_id; /* -1 when no entry has the BSP flag */
    unsigned ioapics;
    struct mp_ioapic ioapic[MP_MAX_IOAPICS];
    unsigned irq_entries; /* I/O interrupt assignment entries */
    unsigned entries;     /* all entries, walked by the base table length */
    unsigned header_entry_count; /* the header's entry count field */
};

void mptable_scan(struct mp_info *info);
const char *mp_status_name(enum mp_status status);

#endif
