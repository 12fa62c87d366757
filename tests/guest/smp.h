/*
 * Starting the application processors (the `smp` action): constants shared by the
 * AP trampoline (smp_trampoline.S) and the C side (smp.c).  Plain #defines only
 * outside the __ASSEMBLER__ block: this header is included from assembly too.
 */
#ifndef SVTEST_SMP_H
#define SVTEST_SMP_H

/*
 * Where the real-mode trampoline is copied: a page below 1 MiB that the monitor's
 * memory map leaves free (stratovirt_py/arch/x86_64/layout.py: the IDT ends at
 * 0x528, the zero page starts at 0x7000).  The SIPI vector is its page number.
 */
#define SMP_TRAMPOLINE_ADDR 0x6000
#define SMP_SIPI_VECTOR (SMP_TRAMPOLINE_ADDR >> 12)

/* 32-bit code selector of the trampoline's GDT (0x10 and 0x18 as in boot_abi.h). */
#define SMP_GDT_CODE32 0x08

/* One stack per AP, taken in check-in order; APs beyond the last one halt. */
#define SMP_MAX_APS 63
#define SMP_AP_STACK_SIZE 4096

#ifndef __ASSEMBLER__
#include <stdint.h>

/* Trampoline bytes in the image, copied to SMP_TRAMPOLINE_ADDR before the SIPIs. */
extern const uint8_t smp_trampoline_start[], smp_trampoline_end[];
/* The trampoline's 32-bit CR3 field; the BSP fills it in the copy, with its own CR3. */
extern const uint8_t smp_trampoline_cr3[];

/* Called by smp_trampoline.S on each AP, in long mode on its own stack. */
__attribute__((noreturn)) void smp_ap_main(unsigned slot);

/* Next free AP stack slot (taken with lock xadd by the trampoline). */
extern uint32_t smp_ap_slots_taken;
extern uint8_t smp_ap_stacks[SMP_MAX_APS][SMP_AP_STACK_SIZE];

__attribute__((noreturn)) void action_smp(void);
#endif

#endif
