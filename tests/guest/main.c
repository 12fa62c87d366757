/*
 * The svtest guest: reports what the machine gave it, one fact per line
 * ("svtest: key=value"), then runs the action named by svtest.action=.
 */
#include <stddef.h>
#include <stdint.h>

#include "actions.h"
#include "boot_abi.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "cpuinfo.h"
#include "io.h"
#include "mptable.h"
#include "platform.h"
#include "printf.h"
#include "smp.h"
#include "string.h"

struct action {
    const char *name;
    void (*run)(void);
};

static const struct action actions[] = {
    { "reboot", action_reboot },
    { "triple-fault", action_triple_fault },
    { "halt-loop", action_halt_loop },
    { "spin", action_spin },
    { "echo", action_echo },
    { "bad-mmio-write", action_bad_mmio_write },
    { "bad-mmio-read", action_bad_mmio_read },
    { "popcnt", action_popcnt },
    { "selftest", action_selftest },
    { "virtio-info", action_virtio_info },
    { "blk-rw", action_blk_rw },
    { "blk-write-pattern", action_blk_write_pattern },
    { "blk-read-pattern", action_blk_read_pattern },
    { "blk-read-hex", action_blk_read_hex },
    { "blk-ro-check", action_blk_ro_check },
    { "blk-watch", action_blk_watch },
    { "blk-bench", action_blk_bench },
    { "hostile", action_hostile },
    { "net-info", action_net_info },
    { "net-send", action_net_send },
    { "net-recv", action_net_recv },
    { "net-echo", action_net_echo },
    { "net-watch", action_net_watch },
    { "net-bench", action_net_bench },
    { "net-hostile", action_net_hostile },
    { "balloon", action_balloon },
    { "balloon-hostile", action_balloon_hostile },
    { "console", action_console },
    { "rng", action_rng },
    { "rng-hostile", action_rng_hostile },
    { "smp", action_smp },
};

#define DEFAULT_ACTION "reboot"

static void report_boot_info(void)
{
    report("entry=%s", boot_info.entry_name);
    report("bootinfo-addr=0x%lx", (uint64_t)boot_info.raw_addr);
    if (boot_info.problem)
        report("bootinfo-problem=%s", boot_info.problem);
    if (boot_info.kind == BOOT_KIND_LINUX64) {
        report("zeropage-boot-flag=0x%x", boot_info.zp_boot_flag);
        report("zeropage-header=0x%x", boot_info.zp_header);
        report("zeropage-loader=0x%x", boot_info.zp_type_of_loader);
    } else if (boot_info.kind == BOOT_KIND_PVH) {
        report("pvh-version=%u", boot_info.pvh_version);
        report("rsdp=0x%lx", boot_info.rsdp_addr);
    }
    report("cmdline-addr=0x%lx", (uint64_t)boot_info.cmdline_addr);
    report("cmdline=%s", boot_info.cmdline);
    if (boot_info.cmdline_truncated)
        report("cmdline-truncated=%u", BOOT_CMDLINE_MAX - 1);

    report("e820-entries=%u", boot_info.region_count);
    for (unsigned i = 0; i < boot_info_regions_kept(); i++) {
        const struct mem_region *r = &boot_info.regions[i];
        report("e820 %u addr=0x%lx size=0x%lx type=%u", i, r->addr, r->size, r->type);
    }
    report("ram-bytes=%lu", boot_info_ram_bytes());
}

static void report_cpus(void)
{
    struct mp_info mp;
    mptable_scan(&mp);
    report("mptable=%s", mp_status_name(mp.status));
    if (mp.floating_addr)
        report("mpf-addr=0x%lx", (uint64_t)mp.floating_addr);
    if (mp.status == MP_OK) {
        report("mpc-addr=0x%lx", (uint64_t)mp.table_addr);
        report("lapic-addr=0x%x", mp.lapic_addr);
        report("mpc-entries=%u", mp.entries);
        report("mpc-header-entry-count=%u", mp.header_entry_count);
        report("cpus=%u", mp.cpus);
        char ids[4 * MP_MAX_CPUS + 1] = "";
        size_t len = 0;
        for (unsigned i = 0; i < mp.cpus && i < MP_MAX_CPUS; i++)
            len += (size_t)ksnprintf(ids + len, sizeof(ids) - len, i ? ",%u" : "%u",
                                     mp.apic_ids[i]);
        report("apic-ids=%s", ids);
        if (mp.bsp_apic_id >= 0)
            report("bsp-apic-id=%d", mp.bsp_apic_id);
        report("ioapics=%u", mp.ioapics);
        for (unsigned i = 0; i < mp.ioapics && i < MP_MAX_IOAPICS; i++)
            report("ioapic %u id=%u addr=0x%x", i, mp.ioapic[i].id, mp.ioapic[i].addr);
        report("mp-irq-entries=%u", mp.irq_entries);
    }
    report_cpu_identity();
}

static void run_action(void)
{
    char name[32] = DEFAULT_ACTION;
    cmdline_get_str(boot_info.cmdline, "svtest.action", name, sizeof(name));
    report("action=%s", name);
    for (size_t i = 0; i < sizeof(actions) / sizeof(actions[0]); i++) {
        if (strcmp(name, actions[i].name) == 0)
            actions[i].run();
    }
    report("unknown-action=%s", name);
    finish();
}

/* Called by entry.S on the guest's own stack, with .bss zeroed. */
__attribute__((noreturn)) void guest_start(unsigned kind, uintptr_t addr);

void guest_start(unsigned kind, uintptr_t addr)
{
    boot_info_parse(kind, addr);
    report("hello");
    report_boot_info();
    report_cpus();
    run_action();
    platform_triple_fault(FAULT_UD2);
}
