/*
 * Entry points of the svtest guest.
 *
 *   linux64_start  64-bit Linux boot protocol (our monitor, Firecracker, StratoVirt):
 *                  long mode, identity paging set up by the monitor, RSI = zero page.
 *   pvh_start      Xen PVH (QEMU -kernel): 32-bit protected mode, paging off,
 *                  EBX = struct hvm_start_info.  Builds its own identity map of
 *                  0..4 GiB with 2 MiB pages, enters long mode and joins the C side.
 *
 * Both zero .bss, switch to the guest's own stack and call
 * guest_start(kind, boot_info_address), which never returns.
 */
#include "boot_abi.h"
#include "mode_switch.h"

        .section .text.entry, "ax"

/* ---------------------------------------------------------------- 64-bit entry */
        .code64
        .globl linux64_start
        .type linux64_start, @function
linux64_start:
        cli
        cld
        movq    %rsi, %r12              /* zero page; rep stos leaves r12 alone */

        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        shrl    $3, %ecx
        xorl    %eax, %eax
        rep stosq

        movq    $guest_stack_top, %rsp
        xorl    %ebp, %ebp
        movl    $BOOT_KIND_LINUX64, %edi
        movq    %r12, %rsi
        call    guest_start
        jmp     entry_halt
        .size linux64_start, . - linux64_start

/* ---------------------------------------------------------------- PVH entry */
        .code32
        .globl pvh_start
        .type pvh_start, @function
pvh_start:
        cli
        cld
        movl    %ebx, %esi              /* hvm_start_info; kept in esi throughout */

        lgdt    gdt_descriptor
        load_data_segments GDT_DATA

        /* Zero .bss (page tables and stack included): nothing is in use yet. */
        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        xorl    %eax, %eax
        rep stosl

        /* PML4[0] -> PDPT */
        movl    $(pvh_pdpt + PTE_PRESENT + PTE_WRITE), %eax
        movl    %eax, pvh_pml4

        /* PDPT[0..3] -> the four page directories */
        movl    $(pvh_pd + PTE_PRESENT + PTE_WRITE), %eax
        xorl    %ecx, %ecx
1:      movl    %eax, pvh_pdpt(,%ecx,8)
        addl    $0x1000, %eax
        incl    %ecx
        cmpl    $4, %ecx
        jb      1b

        /* PD[0..2047]: 2 MiB pages covering 0..4 GiB; the 3..4 GiB device hole uncached. */
        movl    $(PTE_PRESENT + PTE_WRITE + PTE_LARGE), %eax
        xorl    %ecx, %ecx
2:      movl    %eax, %edx
        cmpl    $1536, %ecx
        jb      3f
        orl     $(PTE_PCD + PTE_PWT), %edx
3:      movl    %edx, pvh_pd(,%ecx,8)
        addl    $0x200000, %eax
        incl    %ecx
        cmpl    $2048, %ecx
        jb      2b

        enable_long_mode $pvh_pml4

        ljmp    $GDT_CODE64, $pvh_start64
        .size pvh_start, . - pvh_start

        .code64
pvh_start64:
        load_data_segments GDT_DATA
        movq    $guest_stack_top, %rsp
        xorl    %ebp, %ebp
        movl    $BOOT_KIND_PVH, %edi
        movl    %esi, %esi              /* zero-extend the start info address */
        call    guest_start

entry_halt:
        cli
        hlt
        jmp     entry_halt

/* ---------------------------------------------------------------- PVH ELF note */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz: "Xen\0" */
        .long   8                       /* descsz */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .balign 4
        .quad   pvh_start
        .balign 4

/* ---------------------------------------------------------------- GDT */
        .section .data
        .balign 16
gdt:
        .quad   0                       /* 0x00 null */
        .quad   0                       /* 0x08 unused */
        .quad   0x00af9a000000ffff      /* 0x10 64-bit code, DPL 0 */
        .quad   0x00cf92000000ffff      /* 0x18 flat data, DPL 0 */
gdt_end:

        .balign 8
        .skip   6                       /* pad: keeps the base 8-byte aligned */
gdt_descriptor:
        .word   gdt_end - gdt - 1
        .quad   gdt

/* ---------------------------------------------------------------- .bss */
        .section .bss
        .balign 4096
pvh_pml4:
        .skip   4096
pvh_pdpt:
        .skip   4096
pvh_pd:
        .skip   4 * 4096

        .balign 16
        .globl guest_stack_bottom
guest_stack_bottom:
        .skip   GUEST_STACK_SIZE
        .globl guest_stack_top
guest_stack_top:

        .section .note.GNU-stack, "", @progbits
