/*
 * Constants shared by the assembly entry code and the C side.
 * Plain #defines only: this header is included from entry.S too.
 */
#ifndef SVTEST_BOOT_ABI_H
#define SVTEST_BOOT_ABI_H

/* Which entry path ran (first argument of guest_start). */
#define BOOT_KIND_LINUX64 1 /* 64-bit Linux boot protocol: RSI = zero page */
#define BOOT_KIND_PVH 2     /* Xen PVH: EBX = struct hvm_start_info */

/* Selectors of the guest's own GDT; they match the monitor's GDT at 0x500. */
#define GDT_CODE64 0x10
#define GDT_DATA 0x18

#define GUEST_STACK_SIZE 16384

/* ELF note type of the 32-bit PVH entry point (Xen public elfnote.h). */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

/* Control register and MSR bits used by the PVH entry. */
#define CR0_PE 0x00000001
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xC0000080
#define EFER_LME 0x00000100

/* Page table entry bits. */
#define PTE_PRESENT 0x001
#define PTE_WRITE 0x002
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_LARGE 0x080

#endif
