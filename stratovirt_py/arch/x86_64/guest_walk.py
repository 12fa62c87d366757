"""Reading guest code for diagnostics: virtual-to-physical translation by walking guest tables."""

from __future__ import annotations

from typing import Any

from stratovirt_py.arch.x86_64.registers import CR0_PG, CR4_PAE, EFER_LMA
from stratovirt_py.memory import GuestMemory, GuestMemoryError

CR4_LA57 = 1 << 12
PRESENT = 0x1
HUGE = 0x80
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000


def translate(memory: GuestMemory, sregs: Any, linear: int) -> int | None:
    """Guest-physical address for `linear`, or None if it is not mapped.

    Handles no paging and 4/5-level long-mode paging, the modes a 64-bit boot
    can be in; 32-bit paging modes return None.
    """
    if not sregs.cr0 & CR0_PG:
        return linear & 0xFFFF_FFFF
    if not (sregs.efer & EFER_LMA and sregs.cr4 & CR4_PAE):
        return None
    levels = 5 if sregs.cr4 & CR4_LA57 else 4
    table = sregs.cr3 & ADDRESS_MASK
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        index = (linear >> shift) & 0x1FF
        try:
            entry = memory.read_int(table + index * 8, 8)
        except GuestMemoryError:
            return None
        if not entry & PRESENT:
            return None
        if level in (2, 3) and entry & HUGE:
            page_mask = (1 << shift) - 1
            return (entry & ADDRESS_MASK & ~page_mask) | (linear & page_mask)
        table = entry & ADDRESS_MASK
    return table | (linear & 0xFFF)


def code_bytes(memory: GuestMemory, sregs: Any, rip: int, count: int = 16) -> bytes:
    """Up to `count` instruction bytes at CS:RIP (fewer if a page boundary is unmapped)."""
    linear = (sregs.cs.base + rip) & 0xFFFF_FFFF_FFFF_FFFF
    result = bytearray()
    while len(result) < count:
        physical = translate(memory, sregs, linear + len(result))
        if physical is None:
            break
        chunk = min(count - len(result), 0x1000 - (physical & 0xFFF))
        try:
            result += memory.read(physical, chunk)
        except GuestMemoryError:
            break
    return bytes(result)
