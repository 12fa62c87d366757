"""The e820 memory map handed to the guest in the zero page."""

from __future__ import annotations

from dataclasses import dataclass

from stratovirt_py.arch.x86_64 import layout

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def build_e820(ram_regions: list[tuple[int, int]]) -> list[E820Entry]:
    """RAM regions (guest address, size) -> e820 entries, low memory carved out.

    The first MiB holds RAM up to the EBDA, then the EBDA (MP floating pointer)
    and the BIOS area (MP configuration table) as reserved, as on a PC.
    """
    low_base, low_size = ram_regions[0]
    assert low_base == 0 and low_size > layout.HIGH_MEMORY_START
    entries = [
        E820Entry(0, layout.LOW_RAM_END, E820_RAM),
        E820Entry(layout.EBDA_START, 0xA0000 - layout.EBDA_START, E820_RESERVED),
        E820Entry(layout.BIOS_AREA_START, layout.HIGH_MEMORY_START - layout.BIOS_AREA_START,
                  E820_RESERVED),
        E820Entry(layout.HIGH_MEMORY_START, low_size - layout.HIGH_MEMORY_START, E820_RAM),
    ]
    entries.extend(E820Entry(base, size, E820_RAM) for base, size in ram_regions[1:])
    return entries
