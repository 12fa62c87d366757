/*
 * Boot information, normalised from whichever entry ran:
 *   - Linux 64-bit boot protocol: struct boot_params ("zero page"), RSI at entry;
 *   - Xen PVH: struct hvm_start_info, EBX at entry.
 * main() only looks at struct boot_info.
 */
#ifndef SVTEST_BOOTINFO_H
#define SVTEST_BOOTINFO_H

#include <stdbool.h>
#include <stdint.h>

#define E820_RAM 1
#define E820_RESERVED 2

#define BOOT_MAX_REGIONS 128 /* E820_MAX_ENTRIES_ZEROPAGE */
#define BOOT_CMDLINE_MAX 4096

struct mem_region {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
};

struct boot_info {
    unsigned kind;          /* BOOT_KIND_* from boot_abi.h */
    const char *entry_name; /* "linux64" or "pvh" */
    uintptr_t raw_addr;     /* zero page or hvm_start_info address */
    const char *problem;    /* NULL, or why the boot structure looks wrong */

    char cmdline[BOOT_CMDLINE_MAX]; /* copied: tests may overwrite low memory */
    uintptr_t cmdline_addr;
    bool cmdline_truncated;

    unsigned region_count; /* entries announced by the boot structure */
    struct mem_region regions[BOOT_MAX_REGIONS]; /* min(region_count, BOOT_MAX_REGIONS) kept */

    /* Linux zero page only */
    uint16_t zp_boot_flag;  /* 0xaa55 */
    uint32_t zp_header;     /* "HdrS" = 0x53726448 */
    uint8_t zp_type_of_loader;

    /* PVH only */
    uint32_t pvh_version;
    uint64_t rsdp_addr;
};

extern struct boot_info boot_info;

/* Fills boot_info from the structure the entry code was handed. */
void boot_info_parse(unsigned kind, uintptr_t addr);

unsigned boot_info_regions_kept(void);
uint64_t boot_info_ram_bytes(void);

#endif
