/* Search and parse of the MP floating pointer and configuration table. */
#include "mptable.h"

#include "string.h"

#define MPF_SIGNATURE 0x5f504d5f /* "_MP_" little-endian */
#define MPC_SIGNATURE 0x504d4350 /* "PCMP" */

/* Floating pointer structure */
#define MPF_PHYSPTR 4 /* u32 */
#define MPF_LENGTH 8  /* u8, in 16-byte units */

/* Configuration table header */
#define MPC_BASE_LENGTH 4  /* u16 */
#define MPC_LAPIC_ADDR 36  /* u32 */
#define MPC_ENTRY_COUNT 34 /* u16 */
#define MPC_HEADER_SIZE 44

/* Entry types and sizes */
#define MP_PROCESSOR 0 /* 20 bytes */
#define MP_BUS 1
#define MP_IOAPIC 2
#define MP_IOINTR 3
#define MP_LINTR 4
#define MP_PROCESSOR_SIZE 20
#define MP_OTHER_SIZE 8
#define CPU_ENABLED 0x01
#define CPU_BSP 0x02

/* BIOS data area words that locate the EBDA and the end of base memory */
#define BDA_EBDA_SEGMENT 0x40e
#define BDA_BASE_MEMORY_KIB 0x413

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

static uint8_t checksum(uintptr_t a, size_t len)
{
    uint8_t sum = 0;
    for (size_t i = 0; i < len; i++)
        sum += rd8(a + i);
    return sum;
}

/*
 * Looks for "_MP_" on 16-byte boundaries in [start, start+len).  Returns the
 * address of the first one whose checksum is right; *bad is set when a signature
 * with a wrong checksum was seen.
 */
static uintptr_t search(uintptr_t start, size_t len, int *bad)
{
    for (uintptr_t a = start; a + 16 <= start + len; a += 16) {
        if (rd32(a) != MPF_SIGNATURE)
            continue;
        unsigned length = rd8(a + MPF_LENGTH) * 16u;
        if (length == 0 || length > 256 || checksum(a, length) != 0) {
            *bad = 1;
            continue;
        }
        return a;
    }
    return 0;
}

static uintptr_t find_floating_pointer(int *bad)
{
    uintptr_t ebda = (uintptr_t)rd16(BDA_EBDA_SEGMENT) << 4;
    uintptr_t base_kib = rd16(BDA_BASE_MEMORY_KIB);
    uintptr_t base_end = (base_kib >= 1 && base_kib <= 640 ? base_kib : 640) * 1024;
    uintptr_t areas[3][2] = {
        { ebda ? ebda : 0x9fc00, 1024 },
        { base_end - 1024, 1024 },
        { 0xf0000, 0x10000 },
    };
    for (unsigned i = 0; i < 3; i++) {
        if (i == 1 && areas[1][0] == areas[0][0])
            continue;
        uintptr_t a = search(areas[i][0], areas[i][1], bad);
        if (a)
            return a;
    }
    return 0;
}

static enum mp_status parse_table(struct mp_info *info, uintptr_t mpc)
{
    if (mpc == 0 || rd32(mpc) != MPC_SIGNATURE)
        return MP_BAD_TABLE;
    unsigned length = rd16(mpc + MPC_BASE_LENGTH);
    if (length < MPC_HEADER_SIZE)
        return MP_BAD_TABLE;
    if (checksum(mpc, length) != 0)
        return MP_BAD_CHECKSUM;
    info->lapic_addr = rd32(mpc + MPC_LAPIC_ADDR);

    /*
     * Walk the entries by the base table length, as Linux does: some firmware
     * (qboot) leaves the header's entry count at 0.
     */
    info->header_entry_count = rd16(mpc + MPC_ENTRY_COUNT);
    uintptr_t p = mpc + MPC_HEADER_SIZE, end = mpc + length;
    while (p < end) {
        uint8_t type = rd8(p);
        unsigned size = type == MP_PROCESSOR ? MP_PROCESSOR_SIZE : MP_OTHER_SIZE;
        if (type > MP_LINTR || p + size > end)
            return MP_BAD_TABLE;
        if (type == MP_PROCESSOR) {
            info->cpu_entries++;
            uint8_t flags = rd8(p + 3);
            if (flags & CPU_ENABLED) {
                if (info->cpus < MP_MAX_CPUS)
                    info->apic_ids[info->cpus] = rd8(p + 1);
                info->cpus++;
                if (flags & CPU_BSP)
                    info->bsp_apic_id = rd8(p + 1);
            }
        } else if (type == MP_IOAPIC) {
            if (info->ioapics < MP_MAX_IOAPICS) {
                struct mp_ioapic *io = &info->ioapic[info->ioapics];
                io->id = rd8(p + 1);
                io->flags = rd8(p + 3);
                io->addr = rd32(p + 4);
            }
            info->ioapics++;
        } else if (type == MP_IOINTR) {
            info->irq_entries++;
        }
        info->entries++;
        p += size;
    }
    return MP_OK;
}

void mptable_scan(struct mp_info *info)
{
    memset(info, 0, sizeof(*info));
    info->bsp_apic_id = -1;
    int bad = 0;
    uintptr_t mpf = find_floating_pointer(&bad);
    if (!mpf) {
        info->status = bad ? MP_BAD_CHECKSUM : MP_MISSING;
        return;
    }
    info->floating_addr = mpf;
    info->table_addr = rd32(mpf + MPF_PHYSPTR);
    info->status = parse_table(info, info->table_addr);
}

const char *mp_status_name(enum mp_status status)
{
    switch (status) {
    case MP_OK: return "ok";
    case MP_MISSING: return "missing";
    case MP_BAD_CHECKSUM: return "bad-checksum";
    case MP_BAD_TABLE: return "bad-table";
    }
    return "?";
}
