/*
 * Assembler macros shared by the PVH entry (entry.S) and the AP trampoline
 * (smp_trampoline.S): both go from 32-bit protected mode to long mode the same way.
 * Include from .S files only.
 */
#ifndef SVTEST_MODE_SWITCH_H
#define SVTEST_MODE_SWITCH_H

#include "boot_abi.h"

/* Loads every data segment register with `selector` (clobbers eax). */
.macro load_data_segments selector
        movl    $\selector, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
.endm

/*
 * In 32-bit protected mode with paging off: PAE, CR3 <- `root` (an operand of movl:
 * $symbol or a memory address), EFER.LME, then paging.  The CPU is then in
 * compatibility mode; a far jump to a 64-bit code segment must follow.  Clobbers
 * eax, ecx and edx.
 */
.macro enable_long_mode root
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    \root, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $(CR0_PG + CR0_PE), %eax
        movl    %eax, %cr0
.endm

#endif
