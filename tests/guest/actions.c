/* The basic actions: reset, faults, halting, ticking, echo, bad MMIO, POPCNT. */
#include "actions.h"

#include <stdint.h>

#include "bootinfo.h"
#include "cmdline.h"
#include "io.h"
#include "platform.h"
#include "printf.h"
#include "serial.h"
#include "string.h"

/* A guest-physical address in the 32-bit device hole where no device lives. */
#define UNMAPPED_MMIO_ADDR 0xd0000000u

/*
 * Busy-loop iterations between two ticks of the spin action.  spin_delay() runs
 * 2 instructions per iteration; at ~1.5 M emulated instructions/s on the kvm_pvm
 * host this gives a tick about every 0.2 s (measured under QEMU; on hardware KVM
 * ticks come a few hundred times faster).
 */
#define DEFAULT_TICK_ITERATIONS 150000

void finish(void)
{
    report("done");
    platform_reboot();
}

void action_reboot(void)
{
    finish();
}

void action_triple_fault(void)
{
    char how[8] = "ud2";
    cmdline_get_str(boot_info.cmdline, "svtest.fault", how, sizeof(how));
    enum fault_kind kind = FAULT_UD2;
    if (strcmp(how, "gp") == 0)
        kind = FAULT_GP;
    else if (strcmp(how, "int3") == 0)
        kind = FAULT_INT3;
    else if (strcmp(how, "de") == 0)
        kind = FAULT_DE;
    report("triple-fault=%s", how);
    platform_triple_fault(kind);
}

void action_halt_loop(void)
{
    report("done");
    platform_halt_forever();
}

void action_spin(void)
{
    uint64_t every = cmdline_get_u64(boot_info.cmdline, "svtest.tick", DEFAULT_TICK_ITERATIONS);
    if (every == 0)
        every = 1;
    report("tick-iterations=%lu", every);
    for (uint64_t tick = 0;; tick++) {
        report("tick %lu", tick);
        spin_delay(every);
    }
}

void action_echo(void)
{
    report("echo-ready");
    for (;;) {
        uint8_t byte = serial_getc();
        report("got 0x%02x", byte);
        if (byte == 'q')
            break;
    }
    finish();
}

void action_bad_mmio_write(void)
{
    mmio_write32(UNMAPPED_MMIO_ADDR, 0x5a5aa5a5u);
    report("bad-mmio-write=0x%x survived", UNMAPPED_MMIO_ADDR);
    finish();
}

void action_bad_mmio_read(void)
{
    uint32_t value = mmio_read32(UNMAPPED_MMIO_ADDR);
    report("bad-mmio-read=0x%x value=0x%x", UNMAPPED_MMIO_ADDR, value);
    finish();
}

void action_popcnt(void)
{
    uint64_t in = 0xf0f0f0f0f00full, out;
    /* Encoded by hand-picked mnemonic: the build has no -mpopcnt, gcc never emits it. */
    __asm__ __volatile__("popcntq %1, %0" : "=r"(out) : "r"(in));
    report("popcnt=%lu", out);
    finish();
}
