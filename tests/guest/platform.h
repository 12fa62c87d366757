/* Ways for the guest to stop: reset, triple fault, halt. */
#ifndef SVTEST_PLATFORM_H
#define SVTEST_PLATFORM_H

/* How platform_triple_fault() raises the exception that cannot be delivered. */
enum fault_kind {
    FAULT_UD2,  /* ud2: #UD (default) */
    FAULT_GP,   /* load from a non-canonical address: #GP */
    FAULT_DE,   /* divide by zero: #DE */
    FAULT_INT3, /* int3: #BP.  KVM's instruction emulator (kvm_pvm host) cannot run it:
                 * the VM ends with KVM_EXIT_INTERNAL_ERROR instead of a triple fault. */
};

/* Port 0x64 <- 0xFE (i8042 reset); if the machine is still running, a triple fault. */
__attribute__((noreturn)) void platform_reboot(void);

/* Loads an empty IDT (limit 0) and raises an exception: the fault cannot be delivered,
 * nor can the double fault that follows: the CPU shuts down (triple fault). */
__attribute__((noreturn)) void platform_triple_fault(enum fault_kind kind);

/* cli; hlt forever: the vCPU halts with interrupts off (no exit). */
__attribute__((noreturn)) void platform_halt_forever(void);

#endif
