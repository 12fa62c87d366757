/*
 * The AP start-up trampoline of the `smp` action.
 *
 * smp_trampoline_start..smp_trampoline_end is copied to SMP_TRAMPOLINE_ADDR (below
 * 1 MiB) by the BSP, which then sends INIT-SIPI-SIPI with vector SMP_SIPI_VECTOR.
 * An AP starts there in real mode (CS = vector << 8, IP = 0), loads the trampoline's
 * GDT, enters protected mode, turns on PAE with the BSP's page tables (CR3 from the
 * trampoline's data), EFER.LME and paging, and far-jumps to smp_ap_entry64 in the
 * image.  That takes a stack slot with lock xadd and calls smp_ap_main(slot).
 *
 * Everything in the copied part is addressed as SMP_TRAMPOLINE_ADDR + its offset,
 * because the image is linked at 2 MiB.
 */
#include "boot_abi.h"
#include "mode_switch.h"
#include "smp.h"

#define TRAMPOLINE_OFFSET(sym) ((sym) - smp_trampoline_start)
#define TRAMPOLINE_ADDR(sym) (SMP_TRAMPOLINE_ADDR + TRAMPOLINE_OFFSET(sym))

        /* The copy's CR3 field, one word for the enable_long_mode macro. */
        .set    tr_cr3_field, TRAMPOLINE_ADDR(smp_trampoline_cr3)

        .section .text.smp_trampoline, "ax"

        .code16
        .globl smp_trampoline_start
smp_trampoline_start:
        cli
        cld
        movw    %cs, %ax
        movw    %ax, %ds
        lgdtl   TRAMPOLINE_OFFSET(tr_gdt_descriptor)
        movl    %cr0, %eax
        orl     $CR0_PE, %eax
        movl    %eax, %cr0
        ljmpl   $SMP_GDT_CODE32, $TRAMPOLINE_ADDR(tr_protected)

        .code32
tr_protected:
        load_data_segments GDT_DATA
        enable_long_mode tr_cr3_field
        ljmpl   $GDT_CODE64, $smp_ap_entry64

        .balign 8
tr_gdt:
        .quad   0                       /* 0x00 null */
        .quad   0x00cf9a000000ffff      /* 0x08 flat 32-bit code */
        .quad   0x00af9a000000ffff      /* 0x10 64-bit code */
        .quad   0x00cf92000000ffff      /* 0x18 flat data */
tr_gdt_end:
tr_gdt_descriptor:
        .word   tr_gdt_end - tr_gdt - 1
        .long   TRAMPOLINE_ADDR(tr_gdt)
        .balign 4
        .globl smp_trampoline_cr3
smp_trampoline_cr3:
        .long   0
        .globl smp_trampoline_end
smp_trampoline_end:

/* ---------------------------------------------------------------- in the image */
        .text
        .code64
smp_ap_entry64:
        load_data_segments GDT_DATA
        movl    $1, %eax
        lock xaddl %eax, smp_ap_slots_taken(%rip)
        cmpl    $SMP_MAX_APS, %eax
        jae     ap_halt
        movl    %eax, %edi              /* slot: smp_ap_main's argument */
        incl    %eax
        imull   $SMP_AP_STACK_SIZE, %eax, %eax  /* the top of the slot's stack */
        leaq    smp_ap_stacks(%rip), %rsp
        addq    %rax, %rsp
        xorl    %ebp, %ebp
        call    smp_ap_main
ap_halt:
        cli
        hlt
        jmp     ap_halt

        .section .note.GNU-stack, "", @progbits
