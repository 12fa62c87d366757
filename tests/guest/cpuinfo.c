/* CPUID: APIC ids, vendor, family/model/stepping and the brand string. */
#include "cpuinfo.h"

#include "io.h"
#include "printf.h"

#define LEAF_TOPOLOGY 0xbu
#define LEAF_EXT_MAX 0x80000000u
#define LEAF_BRAND_FIRST 0x80000002u
#define LEAF_BRAND_LAST 0x80000004u
#define BRAND_BYTES 48

uint32_t cpuid_initial_apic_id(void)
{
    return cpuid(1, 0).ebx >> 24;
}

bool cpuid_x2apic_id(uint32_t *id)
{
    if (cpuid(0, 0).eax < LEAF_TOPOLOGY)
        return false;
    struct cpuid_regs r = cpuid(LEAF_TOPOLOGY, 0);
    if (((r.ecx >> 8) & 0xff) == 0 && (r.ebx & 0xffff) == 0)
        return false;
    *id = r.edx;
    return true;
}

/*
 * The family and model as Linux computes them: the extended family is added only
 * for family 0xf, the extended model only for families 6 and up.
 */
static void report_signature(uint32_t signature)
{
    unsigned family = (signature >> 8) & 0xf, model = (signature >> 4) & 0xf;
    if (family == 0xf)
        family += (signature >> 20) & 0xff;
    if (family >= 6)
        model += ((signature >> 16) & 0xf) << 4;
    report("cpuid-signature=0x%x", signature);
    report("cpuid-family=%u", family);
    report("cpuid-model=%u", model);
    report("cpuid-stepping=%u", signature & 0xf);
}

void report_cpu_identity(void)
{
    report("cpuid-apic-id=%u", cpuid_initial_apic_id());
    uint32_t x2apic_id;
    if (cpuid_x2apic_id(&x2apic_id))
        report("cpuid-x2apic-id=%u", x2apic_id);

    struct cpuid_regs leaf0 = cpuid(0, 0);
    uint32_t vendor[4] = { leaf0.ebx, leaf0.edx, leaf0.ecx, 0 };
    report("cpuid-vendor=%s", (const char *)vendor);
    report("cpuid-max-leaf=0x%x", leaf0.eax);
    report_signature(cpuid(1, 0).eax);

    uint32_t max_ext = cpuid(LEAF_EXT_MAX, 0).eax;
    report("cpuid-max-ext-leaf=0x%x", max_ext);
    /* The brand string as the CPU gives it, up to its NUL: Linux trims the spaces. */
    uint32_t brand[BRAND_BYTES / 4 + 1] = { 0 };
    if (max_ext >= LEAF_BRAND_LAST) {
        for (uint32_t leaf = LEAF_BRAND_FIRST; leaf <= LEAF_BRAND_LAST; leaf++) {
            struct cpuid_regs r = cpuid(leaf, 0);
            uint32_t *out = &brand[(leaf - LEAF_BRAND_FIRST) * 4];
            out[0] = r.eax;
            out[1] = r.ebx;
            out[2] = r.ecx;
            out[3] = r.edx;
        }
    }
    report("cpuid-brand=%s", (const char *)brand);
}
