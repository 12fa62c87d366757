/* Parsing of the Linux zero page and of the PVH start info into struct boot_info. */
#include "bootinfo.h"

#include "boot_abi.h"
#include "string.h"

struct boot_info boot_info;

/* struct boot_params (Linux Documentation/arch/x86/zero-page.rst) */
#define ZP_EXT_CMD_LINE_PTR 0x0c8 /* u32: high half of cmd_line_ptr */
#define ZP_E820_ENTRIES 0x1e8     /* u8 */
#define ZP_BOOT_FLAG 0x1fe        /* u16 */
#define ZP_HEADER 0x202           /* u32 */
#define ZP_TYPE_OF_LOADER 0x210   /* u8 */
#define ZP_CMD_LINE_PTR 0x228     /* u32 */
#define ZP_E820_TABLE 0x2d0       /* struct boot_e820_entry[128], 20 bytes each, packed */
#define ZP_E820_ENTRY_SIZE 20

/* struct hvm_start_info (Xen public arch-x86/hvm/start_info.h) */
#define PVH_MAGIC_VALUE 0x336ec578
#define PVH_MAGIC 0x00           /* u32 */
#define PVH_VERSION 0x04         /* u32 */
#define PVH_CMDLINE_PADDR 0x18   /* u64 */
#define PVH_RSDP_PADDR 0x20      /* u64 */
#define PVH_MEMMAP_PADDR 0x28    /* u64, version >= 1 */
#define PVH_MEMMAP_ENTRIES 0x30  /* u32, version >= 1 */
#define PVH_MEMMAP_ENTRY_SIZE 24 /* u64 addr, u64 size, u32 type, u32 reserved */

static uint8_t rd8(uintptr_t a)
{
    return *(const volatile uint8_t *)a;
}

static uint16_t rd16(uintptr_t a)
{
    uint16_t v;
    memcpy(&v, (const void *)a, sizeof(v));
    return v;
}

static uint32_t rd32(uintptr_t a)
{
    uint32_t v;
    memcpy(&v, (const void *)a, sizeof(v));
    return v;
}

static uint64_t rd64(uintptr_t a)
{
    uint64_t v;
    memcpy(&v, (const void *)a, sizeof(v));
    return v;
}

/* Guest-physical addresses the guest can read: the identity map covers 0..4 GiB. */
static bool readable(uint64_t addr)
{
    return addr != 0 && addr < (1ull << 32);
}

static void copy_cmdline(uint64_t addr)
{
    boot_info.cmdline_addr = (uintptr_t)addr;
    if (!readable(addr))
        return;
    const char *src = (const char *)(uintptr_t)addr;
    size_t n = strnlen(src, BOOT_CMDLINE_MAX);
    if (n == BOOT_CMDLINE_MAX) {
        boot_info.cmdline_truncated = true;
        n = BOOT_CMDLINE_MAX - 1;
    }
    memcpy(boot_info.cmdline, src, n);
    boot_info.cmdline[n] = '\0';
}

static void parse_zero_page(uintptr_t zp)
{
    boot_info.entry_name = "linux64";
    if (!readable(zp)) {
        boot_info.problem = "zero-page-address";
        return;
    }
    boot_info.zp_boot_flag = rd16(zp + ZP_BOOT_FLAG);
    boot_info.zp_header = rd32(zp + ZP_HEADER);
    boot_info.zp_type_of_loader = rd8(zp + ZP_TYPE_OF_LOADER);

    uint64_t cmdline = rd32(zp + ZP_CMD_LINE_PTR) | (uint64_t)rd32(zp + ZP_EXT_CMD_LINE_PTR) << 32;
    copy_cmdline(cmdline);

    boot_info.region_count = rd8(zp + ZP_E820_ENTRIES);
    for (unsigned i = 0; i < boot_info_regions_kept(); i++) {
        uintptr_t e = zp + ZP_E820_TABLE + i * ZP_E820_ENTRY_SIZE;
        boot_info.regions[i].addr = rd64(e);
        boot_info.regions[i].size = rd64(e + 8);
        boot_info.regions[i].type = rd32(e + 16);
    }
}

static void parse_pvh(uintptr_t si)
{
    boot_info.entry_name = "pvh";
    if (!readable(si)) {
        boot_info.problem = "start-info-address";
        return;
    }
    if (rd32(si + PVH_MAGIC) != PVH_MAGIC_VALUE) {
        boot_info.problem = "start-info-magic";
        return;
    }
    boot_info.pvh_version = rd32(si + PVH_VERSION);
    boot_info.rsdp_addr = rd64(si + PVH_RSDP_PADDR);
    copy_cmdline(rd64(si + PVH_CMDLINE_PADDR));
    if (boot_info.pvh_version < 1)
        return; /* no memory map in version 0 */

    uint64_t map = rd64(si + PVH_MEMMAP_PADDR);
    if (!readable(map))
        return;
    boot_info.region_count = rd32(si + PVH_MEMMAP_ENTRIES);
    for (unsigned i = 0; i < boot_info_regions_kept(); i++) {
        uintptr_t e = (uintptr_t)map + i * PVH_MEMMAP_ENTRY_SIZE;
        boot_info.regions[i].addr = rd64(e);
        boot_info.regions[i].size = rd64(e + 8);
        boot_info.regions[i].type = rd32(e + 16);
    }
}

void boot_info_parse(unsigned kind, uintptr_t addr)
{
    boot_info.kind = kind;
    boot_info.raw_addr = addr;
    if (kind == BOOT_KIND_LINUX64)
        parse_zero_page(addr);
    else if (kind == BOOT_KIND_PVH)
        parse_pvh(addr);
    else {
        boot_info.entry_name = "unknown";
        boot_info.problem = "entry-kind";
    }
}

unsigned boot_info_regions_kept(void)
{
    return boot_info.region_count < BOOT_MAX_REGIONS ? boot_info.region_count : BOOT_MAX_REGIONS;
}

uint64_t boot_info_ram_bytes(void)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < boot_info_regions_kept(); i++)
        if (boot_info.regions[i].type == E820_RAM)
            total += boot_info.regions[i].size;
    return total;
}
