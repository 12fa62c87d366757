/* TSC frequency discovery and deadlines for bounded polling. */
#include "tsc.h"

#include "io.h"

#define HYPERVISOR_LEAF_BASE 0x40000000u
#define HYPERVISOR_LEAF_TIMING 0x40000010u /* EAX = TSC kHz (VMware/KVM convention) */

static uint64_t khz;
static const char *khz_source;

static void probe(void)
{
    uint32_t max_leaf = cpuid(0, 0).eax;
    if (max_leaf >= 0x15) {
        struct cpuid_regs r = cpuid(0x15, 0);
        /* EBX/EAX = TSC / crystal ratio, ECX = crystal Hz (0 when not enumerated). */
        if (r.eax && r.ebx && r.ecx) {
            khz = (uint64_t)r.ecx * r.ebx / r.eax / 1000;
            khz_source = "cpuid-15";
            return;
        }
    }
    if (max_leaf >= 0x16) {
        uint32_t mhz = cpuid(0x16, 0).eax & 0xffff; /* processor base frequency */
        if (mhz) {
            khz = (uint64_t)mhz * 1000;
            khz_source = "cpuid-16";
            return;
        }
    }
    if (cpuid(1, 0).ecx & (1u << 31)) { /* running under a hypervisor */
        uint32_t max_hv = cpuid(HYPERVISOR_LEAF_BASE, 0).eax;
        if (max_hv >= HYPERVISOR_LEAF_TIMING && max_hv < HYPERVISOR_LEAF_BASE + 0x10000) {
            uint32_t hv_khz = cpuid(HYPERVISOR_LEAF_TIMING, 0).eax;
            if (hv_khz >= 100000 && hv_khz <= 10000000) {
                khz = hv_khz;
                khz_source = "hypervisor";
                return;
            }
        }
    }
    khz = TSC_ASSUMED_KHZ;
    khz_source = "assumed";
}

uint64_t tsc_khz(void)
{
    if (!khz)
        probe();
    return khz;
}

const char *tsc_khz_source(void)
{
    tsc_khz();
    return khz_source;
}

uint64_t tsc_deadline_ms(uint64_t ms)
{
    return rdtsc() + ms * tsc_khz();
}

uint64_t tsc_deadline_us(uint64_t us)
{
    return rdtsc() + us * tsc_khz() / 1000;
}

uint64_t tsc_elapsed_ms(uint64_t start)
{
    return (rdtsc() - start) / tsc_khz();
}

void tsc_delay_us(uint64_t us)
{
    uint64_t deadline = tsc_deadline_us(us);
    while (!tsc_passed(deadline))
        cpu_relax();
}
