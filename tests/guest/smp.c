/*
 * The `smp` action: the BSP starts every AP of the MP table with INIT-SIPI-SIPI
 * through its local APIC; each AP reports the APIC ids it sees (LAPIC ID register,
 * CPUID leaf 1, CPUID leaf 0xB) and checks in; the BSP waits for all of them, up to
 * svtest.smp_timeout_ms, and reports which did not come.
 *
 * Report lines are serialised with a spinlock: APs print while the BSP waits.
 */
#include "smp.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "cpuinfo.h"
#include "guestmem.h"
#include "io.h"
#include "mptable.h"
#include "platform.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

/* Local APIC registers (offsets from the MP table's LAPIC address). */
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define SVR_APIC_ENABLE 0x100
#define SVR_SPURIOUS_VECTOR 0xff
#define ICR_INIT 0x500
#define ICR_STARTUP 0x600
#define ICR_LEVEL_ASSERT 0x4000
#define ICR_SEND_PENDING 0x1000
#define ICR_POLL_LIMIT 1000

/* The MP specification's start-up sequence: INIT, 10 ms, SIPI, 200 us, SIPI. */
#define INIT_DELAY_US 10000
#define SIPI_DELAY_US 200
#define DEFAULT_TIMEOUT_MS 5000

/* Room for "255," per id. */
#define ID_LIST_SIZE (4 * MP_MAX_CPUS + 1)

uint32_t smp_ap_slots_taken;
uint8_t smp_ap_stacks[SMP_MAX_APS][SMP_AP_STACK_SIZE] NOINIT __attribute__((aligned(16)));

struct ap_ids {
    uint32_t lapic;
    uint32_t cpuid;
    uint32_t x2apic;
    bool has_x2apic;
};

static uintptr_t lapic_base;
static uint32_t report_lock;
static struct ap_ids checked_in_ids[SMP_MAX_APS];
static uint8_t checked_in[SMP_MAX_APS]; /* by slot; set after checked_in_ids[slot] */

static void lock_reports(void)
{
    while (__atomic_exchange_n(&report_lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&report_lock, __ATOMIC_RELAXED))
            cpu_relax();
}

static void unlock_reports(void)
{
    __atomic_store_n(&report_lock, 0, __ATOMIC_RELEASE);
}

static uint32_t lapic_read(unsigned reg)
{
    return mmio_read32(lapic_base + reg);
}

static void lapic_write(unsigned reg, uint32_t value)
{
    mmio_write32(lapic_base + reg, value);
}

static struct ap_ids read_ids(void)
{
    struct ap_ids ids = { .lapic = lapic_read(LAPIC_ID) >> 24, .cpuid = cpuid_initial_apic_id() };
    ids.has_x2apic = cpuid_x2apic_id(&ids.x2apic);
    return ids;
}

static bool ids_agree(const struct ap_ids *ids)
{
    return ids->lapic == ids->cpuid && (!ids->has_x2apic || ids->x2apic == ids->lapic);
}

static void report_ids(const char *who, const struct ap_ids *ids)
{
    char x2apic[12] = "none";
    if (ids->has_x2apic)
        ksnprintf(x2apic, sizeof(x2apic), "%u", ids->x2apic);
    report("%s lapic-id=%u cpuid-apic-id=%u x2apic-id=%s", who, ids->lapic, ids->cpuid, x2apic);
}

void smp_ap_main(unsigned slot)
{
    struct ap_ids ids = read_ids();
    lock_reports();
    report_ids("smp-ap", &ids);
    unlock_reports();
    checked_in_ids[slot] = ids;
    __atomic_store_n(&checked_in[slot], 1, __ATOMIC_RELEASE);
    platform_halt_forever();
}

/* Sends one IPI; false if the LAPIC still shows it pending after ICR_POLL_LIMIT reads. */
static bool send_ipi(uint32_t apic_id, uint32_t command)
{
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, command);
    for (unsigned i = 0; i < ICR_POLL_LIMIT; i++) {
        if (!(lapic_read(LAPIC_ICR_LOW) & ICR_SEND_PENDING))
            return true;
    }
    return false;
}

/* Sends `command` to every AP; reports the ones whose IPI stayed pending. */
static void send_to_aps(const struct mp_info *mp, uint32_t self, uint32_t command,
                        const char *name)
{
    for (unsigned i = 0; i < mp->cpus && i < MP_MAX_CPUS; i++) {
        if (mp->apic_ids[i] != self && !send_ipi(mp->apic_ids[i], command))
            report("smp ipi-stuck ipi=%s apic-id=%u", name, mp->apic_ids[i]);
    }
}

static void copy_trampoline(void)
{
    size_t size = (size_t)(smp_trampoline_end - smp_trampoline_start);
    uint64_t cr3;
    __asm__ __volatile__("mov %%cr3, %0" : "=r"(cr3));
    memcpy((void *)(uintptr_t)SMP_TRAMPOLINE_ADDR, smp_trampoline_start, size);
    uint32_t cr3_field = (uint32_t)cr3;
    memcpy((void *)(uintptr_t)(SMP_TRAMPOLINE_ADDR + (smp_trampoline_cr3 - smp_trampoline_start)),
           &cr3_field, sizeof(cr3_field));
    mb();
}

static unsigned count_checked_in(void)
{
    unsigned n = 0;
    for (unsigned slot = 0; slot < SMP_MAX_APS; slot++)
        n += __atomic_load_n(&checked_in[slot], __ATOMIC_ACQUIRE);
    return n;
}

static void append_id(char *list, size_t *len, uint32_t id)
{
    *len += (size_t)ksnprintf(list + *len, ID_LIST_SIZE - *len, *len ? ",%u" : "%u", id);
}

static bool in_mptable(const struct mp_info *mp, uint32_t id)
{
    for (unsigned i = 0; i < mp->cpus && i < MP_MAX_CPUS; i++) {
        if (mp->apic_ids[i] == id)
            return true;
    }
    return false;
}

static bool checked_in_as(uint32_t lapic_id)
{
    for (unsigned slot = 0; slot < SMP_MAX_APS; slot++) {
        if (__atomic_load_n(&checked_in[slot], __ATOMIC_ACQUIRE) &&
            checked_in_ids[slot].lapic == lapic_id)
            return true;
    }
    return false;
}

/* Called with the report lock held, which it keeps: late APs must not print any more. */
static NORETURN void report_result(const struct mp_info *mp, uint32_t self, unsigned expected)
{
    char missing[ID_LIST_SIZE] = "", unexpected[ID_LIST_SIZE] = "", mismatched[ID_LIST_SIZE] = "";
    size_t missing_len = 0, unexpected_len = 0, mismatched_len = 0;
    for (unsigned i = 0; i < mp->cpus && i < MP_MAX_CPUS; i++) {
        if (mp->apic_ids[i] != self && !checked_in_as(mp->apic_ids[i]))
            append_id(missing, &missing_len, mp->apic_ids[i]);
    }
    for (unsigned slot = 0; slot < SMP_MAX_APS; slot++) {
        if (!__atomic_load_n(&checked_in[slot], __ATOMIC_ACQUIRE))
            continue;
        const struct ap_ids *ids = &checked_in_ids[slot];
        if (!in_mptable(mp, ids->lapic) || ids->lapic == self)
            append_id(unexpected, &unexpected_len, ids->lapic);
        if (!ids_agree(ids))
            append_id(mismatched, &mismatched_len, ids->lapic);
    }
    unsigned arrived = count_checked_in();
    report("smp checked-in=%u expected=%u", arrived, expected);
    report("smp missing=%s", missing_len ? missing : "none");
    report("smp unexpected=%s", unexpected_len ? unexpected : "none");
    report("smp mismatched=%s", mismatched_len ? mismatched : "none");
    bool ok = arrived == expected && !missing_len && !unexpected_len && !mismatched_len;
    report("smp result=%s", ok ? "ok" : "fail");
    finish();
}

void action_smp(void)
{
    struct mp_info mp;
    mptable_scan(&mp);
    if (mp.status != MP_OK) {
        report("smp FAIL mptable=%s", mp_status_name(mp.status));
        finish();
    }
    lapic_base = mp.lapic_addr;
    uint64_t timeout_ms = cmdline_get_u64(boot_info.cmdline, "svtest.smp_timeout_ms",
                                          DEFAULT_TIMEOUT_MS);
    struct ap_ids bsp = read_ids();
    unsigned listed = mp.cpus < MP_MAX_CPUS ? mp.cpus : MP_MAX_CPUS;
    unsigned expected = listed - (in_mptable(&mp, bsp.lapic) ? 1 : 0);
    report("smp cpus=%u expected-aps=%u trampoline=0x%x sipi-vector=0x%x timeout-ms=%lu",
           mp.cpus, expected, SMP_TRAMPOLINE_ADDR, SMP_SIPI_VECTOR, timeout_ms);
    report_ids("smp-bsp", &bsp);

    copy_trampoline();
    lapic_write(LAPIC_SVR, SVR_APIC_ENABLE | SVR_SPURIOUS_VECTOR);
    uint64_t start = rdtsc();
    lock_reports();
    send_to_aps(&mp, bsp.lapic, ICR_INIT | ICR_LEVEL_ASSERT, "init");
    unlock_reports();
    tsc_delay_us(INIT_DELAY_US);
    for (unsigned round = 0; round < 2; round++) {
        lock_reports();
        send_to_aps(&mp, bsp.lapic, ICR_STARTUP | ICR_LEVEL_ASSERT | SMP_SIPI_VECTOR, "sipi");
        unlock_reports();
        tsc_delay_us(SIPI_DELAY_US);
    }

    uint64_t deadline = tsc_deadline_ms(timeout_ms);
    while (count_checked_in() < expected && !tsc_passed(deadline))
        cpu_relax();
    lock_reports();
    report("smp waited-ms=%lu", tsc_elapsed_ms(start));
    report_result(&mp, bsp.lapic, expected);
}
