/* Reset, triple fault and halt. */
#include "platform.h"

#include <stdint.h>

#include "io.h"

#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe

void platform_reboot(void)
{
    outb(I8042_RESET, I8042_COMMAND);
    /* A real controller takes a moment; a machine without one never resets. */
    spin_delay(1000);
    platform_triple_fault(FAULT_UD2);
}

void platform_triple_fault(enum fault_kind kind)
{
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } empty_idt = { 0, 0 };
    cli();
    __asm__ __volatile__("lidt %0" : : "m"(empty_idt));
    /*
     * Measured on the kvm_pvm host (KVM's emulator runs this code): ud2, a
     * non-canonical load and a divide by zero all end in KVM_EXIT_SHUTDOWN; int3
     * ends in KVM_EXIT_INTERNAL_ERROR (emulation failure) instead.
     */
    switch (kind) {
    case FAULT_GP:
        __asm__ __volatile__("movq (%0), %%rax" : : "r"(0x8000000000000000ull) : "rax", "memory");
        break;
    case FAULT_INT3:
        __asm__ __volatile__("int3");
        break;
    case FAULT_DE: {
        uint32_t zero = 0;
        __asm__ __volatile__("xorl %%edx, %%edx; movl $1, %%eax; divl %0"
                             : : "r"(zero) : "eax", "edx");
        break;
    }
    case FAULT_UD2:
    default:
        break;
    }
    for (;;)
        __asm__ __volatile__("ud2");
}

void platform_halt_forever(void)
{
    for (;;) {
        cli();
        hlt();
    }
}
