"""Long-mode entry state: identity page tables, GDT, and the BSP's registers."""

from __future__ import annotations

import struct
from typing import Any

from stratovirt_py.arch.x86_64 import layout
from stratovirt_py.memory import GuestMemory

PAGE_PRESENT = 0x1
PAGE_WRITABLE = 0x2
PAGE_HUGE = 0x80
TWO_MIB = 2 << 20

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 0x2

# Linux's boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
CODE_SELECTOR = 0x10
DATA_SELECTOR = 0x18
TSS_SELECTOR = 0x20


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Packs a segment descriptor from (flags word as in the CPU manual, base, 20-bit limit)."""
    return (((base & 0xFF00_0000) << (56 - 24)) | ((flags & 0xF0FF) << 40)
            | ((limit & 0xF_0000) << (48 - 16)) | ((base & 0x00FF_FFFF) << 16)
            | (limit & 0xFFFF))


GDT = [
    0,
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 64-bit code
    gdt_entry(0xC093, 0, 0xFFFFF),  # data
    gdt_entry(0x808B, 0, 0xFFFFF),  # TSS (busy), only its cached form is used
]


def page_tables() -> dict[int, bytes]:
    """Identity map of 0..4 GiB with 2 MiB pages: {guest address: table bytes}."""
    pd_count = layout.IDENTITY_MAPPED_BYTES // (512 * TWO_MIB)
    tables = {
        layout.PML4_ADDR: struct.pack("<Q", layout.PDPT_ADDR | PAGE_PRESENT | PAGE_WRITABLE),
        layout.PDPT_ADDR: struct.pack(f"<{pd_count}Q", *(
            (layout.PD_ADDR + i * 0x1000) | PAGE_PRESENT | PAGE_WRITABLE
            for i in range(pd_count))),
    }
    for pd in range(pd_count):
        tables[layout.PD_ADDR + pd * 0x1000] = struct.pack("<512Q", *(
            ((pd * 512 + i) * TWO_MIB) | PAGE_PRESENT | PAGE_WRITABLE | PAGE_HUGE
            for i in range(512)))
    return tables


def write_boot_tables(memory: GuestMemory) -> None:
    for addr, table in page_tables().items():
        memory.write(addr, table)
    memory.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    memory.write(layout.IDT_ADDR, bytes(8))


def _segment(segment: Any, selector: int, descriptor: int) -> None:
    """Fills a kvm_segment from a GDT descriptor, as the CPU would cache it."""
    segment.selector = selector
    segment.base = 0
    segment.limit = 0xFFFFFFFF if (descriptor >> 55) & 1 else (descriptor & 0xFFFF)
    segment.type = (descriptor >> 40) & 0xF
    segment.s = (descriptor >> 44) & 1
    segment.dpl = (descriptor >> 45) & 3
    segment.present = (descriptor >> 47) & 1
    segment.avl = (descriptor >> 52) & 1
    segment.l = (descriptor >> 53) & 1
    segment.db = (descriptor >> 54) & 1
    segment.g = (descriptor >> 55) & 1
    segment.unusable = 0


def setup_long_mode_sregs(sregs: Any) -> None:
    """Edits the vCPU's special registers for 64-bit entry with the tables above."""
    _segment(sregs.cs, CODE_SELECTOR, GDT[2])
    for segment in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(segment, DATA_SELECTOR, GDT[3])
    _segment(sregs.tr, TSS_SELECTOR, GDT[4])
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(GDT) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA


def setup_entry_regs(regs: Any, entry: int) -> None:
    regs.rip = entry
    regs.rsp = layout.BOOT_STACK_TOP
    regs.rbp = layout.BOOT_STACK_TOP
    regs.rsi = layout.ZERO_PAGE_ADDR
    regs.rflags = RFLAGS_RESERVED
