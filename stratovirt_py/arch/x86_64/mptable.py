"""The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs.

The floating pointer sits at the start of the EBDA, where Linux looks for it;
the configuration table is in the BIOS area because with 254 vCPUs it is far
larger than the 1 KiB EBDA.
"""

from __future__ import annotations

import struct

from stratovirt_py.arch.x86_64 import layout

FLOATING_POINTER_ADDR = layout.EBDA_START
CONFIG_TABLE_ADDR = layout.BIOS_AREA_START
MP_SPEC_REVISION = 4
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_FLAG_ENABLED = 0x01
CPU_FLAG_BSP = 0x02
# Family 6 signature and FPU+APIC feature flags, as PC firmware reports them.
CPU_SIGNATURE = 0x600
CPU_FEATURES = 0x201
ISA_IRQS = 16
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
ALL_LOCAL_APICS = 0xFF

ENTRY_PROCESSOR = struct.Struct("<BBBBII8x")
ENTRY_BUS = struct.Struct("<BB6s")
ENTRY_IOAPIC = struct.Struct("<BBBBI")
ENTRY_INTERRUPT = struct.Struct("<BBHBBBB")
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
FLOATING_POINTER = struct.Struct("<4sIBBB5s")


def checksum_byte(data: bytes) -> int:
    """The byte that makes `data` plus it sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def build_mptable(apic_ids: list[int], online: int) -> tuple[bytes, bytes]:
    """Returns (floating pointer, configuration table) for these vCPUs.

    `apic_ids` lists every possible vCPU; the first `online` are enabled.  The
    IOAPIC takes the APIC id after the highest vCPU id.
    """
    ioapic_id = max(apic_ids) + 1
    entries = bytearray()
    for index, apic_id in enumerate(apic_ids):
        flags = (CPU_FLAG_ENABLED if index < online else 0) | (CPU_FLAG_BSP if index == 0 else 0)
        entries += ENTRY_PROCESSOR.pack(0, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE,
                                        CPU_FEATURES)
    bus_id = 0
    entries += ENTRY_BUS.pack(1, bus_id, b"ISA   ")
    entries += ENTRY_IOAPIC.pack(2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR)
    # ISA IRQ n arrives on IOAPIC pin n; pin 0 is wired through the PIC (ExtINT).
    for irq in range(ISA_IRQS):
        irq_type = INT_TYPE_EXTINT if irq == 0 else INT_TYPE_INT
        entries += ENTRY_INTERRUPT.pack(3, irq_type, 0, bus_id, irq, ioapic_id, irq)
    entries += ENTRY_INTERRUPT.pack(4, INT_TYPE_EXTINT, 0, bus_id, 0, ALL_LOCAL_APICS, 0)
    entries += ENTRY_INTERRUPT.pack(4, INT_TYPE_NMI, 0, bus_id, 0, ALL_LOCAL_APICS, 1)
    entry_count = len(apic_ids) + 1 + 1 + ISA_IRQS + 2

    def header(checksum: int) -> bytes:
        return CONFIG_HEADER.pack(b"PCMP", CONFIG_HEADER.size + len(entries), MP_SPEC_REVISION,
                                  checksum, b"SVPY    ", b"MICROVM     ", 0, 0, entry_count,
                                  layout.LAPIC_ADDR, 0, 0, 0)

    table = header(0) + entries
    table = header(checksum_byte(table)) + entries

    pointer = FLOATING_POINTER.pack(b"_MP_", CONFIG_TABLE_ADDR, 1, MP_SPEC_REVISION, 0,
                                    bytes(5))
    pointer = FLOATING_POINTER.pack(b"_MP_", CONFIG_TABLE_ADDR, 1, MP_SPEC_REVISION,
                                    checksum_byte(pointer), bytes(5))
    if len(table) > layout.HIGH_MEMORY_START - CONFIG_TABLE_ADDR:
        raise ValueError("MP table does not fit in the BIOS area")
    return pointer, table
