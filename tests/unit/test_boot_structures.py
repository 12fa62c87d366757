"""Boot structures byte for byte: zero page, e820, MP table, page tables, GDT, CPUID."""

import struct

import pytest

from stratovirt_py.arch.x86_64 import boot_params as bp
from stratovirt_py.arch.x86_64 import layout
from stratovirt_py.arch.x86_64.cpu_topology import apic_id, apic_ids
from stratovirt_py.arch.x86_64.cpuid import vcpu_cpuid
from stratovirt_py.arch.x86_64.e820 import E820_RAM, E820_RESERVED, E820Entry, build_e820
from stratovirt_py.arch.x86_64.host_quirks import PVM_CMDLINE, host_cmdline_additions
from stratovirt_py.arch.x86_64.loader import initrd_address
from stratovirt_py.arch.x86_64.mptable import build_mptable, checksum_byte
from stratovirt_py.arch.x86_64.registers import GDT, page_tables
from stratovirt_py.config import CpuTopology
from stratovirt_py.errors import BootError, ConfigError
from stratovirt_py.kvm.api import CpuidEntry
from stratovirt_py.memory import ram_layout

MiB = 1 << 20
GiB = 1 << 30


def test_ram_below_the_gap_is_one_region():
    assert ram_layout(256 * MiB) == [(0, 256 * MiB)]
    assert ram_layout(3 * GiB) == [(0, 3 * GiB)]


def test_large_ram_is_split_around_the_mmio_gap():
    assert ram_layout(5 * GiB) == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]


def test_e820_small_memory():
    assert build_e820(ram_layout(256 * MiB)) == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x400, E820_RESERVED),
        E820Entry(0xF0000, 0x10000, E820_RESERVED),
        E820Entry(0x100000, 256 * MiB - 0x100000, E820_RAM),
    ]


def test_e820_large_memory_skips_the_gap():
    entries = build_e820(ram_layout(6 * GiB))
    assert entries[3] == E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM)
    assert entries[4] == E820Entry(4 * GiB, 3 * GiB, E820_RAM)
    ram = sum(e.size for e in entries if e.type == E820_RAM)
    assert ram == 6 * GiB - (0x100000 - 0x9FC00)  # only the legacy hole below 1 MiB is lost


def test_zero_page_for_elf_kernel():
    e820 = build_e820(ram_layout(256 * MiB))
    page = bp.build_zero_page(e820, cmdline_length=21, initrd=(0x7000000, 0x123456))
    assert len(page) == 4096
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<I", page, 0x228)[0] == layout.CMDLINE_ADDR
    assert struct.unpack_from("<I", page, 0x238)[0] == 21
    assert struct.unpack_from("<II", page, 0x218) == (0x7000000, 0x123456)
    assert struct.unpack_from("<II", page, 0xC0) == (0, 0)
    assert page[0x1E8] == len(e820) == 4
    for index, entry in enumerate(e820):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * index) == (
            entry.addr, entry.size, entry.type)


def test_zero_page_keeps_a_bzimage_header():
    header = bytearray(0x80)
    header[0x206 - 0x1F1:0x208 - 0x1F1] = struct.pack("<H", 0x020F)
    header[0x236 - 0x1F1] = 1
    page = bp.build_zero_page(build_e820(ram_layout(256 * MiB)), 5, bytes(header))
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x020F
    assert page[0x236] == 1
    assert page[0x210] == 0xFF


def test_initrd_goes_high_and_page_aligned():
    addr = initrd_address(0x12345, ram_end_below_gap=256 * MiB, kernel_end=0x2000000)
    assert addr % 4096 == 0
    assert addr + 0x12345 <= 256 * MiB and addr + 0x12345 + 4096 > 256 * MiB
    # Large memory: capped by the boot protocol's initrd_addr_max.
    addr = initrd_address(MiB, ram_end_below_gap=3 * GiB, kernel_end=0x2000000)
    assert addr + MiB <= layout.INITRD_ADDR_MAX + 1


def test_initrd_too_big_is_refused():
    with pytest.raises(BootError, match="does not fit"):
        initrd_address(200 * MiB, ram_end_below_gap=128 * MiB, kernel_end=0x2000000)


def parse_mptable(pointer: bytes, table: bytes):
    assert len(pointer) == 16 and pointer[:4] == b"_MP_" and sum(pointer) % 256 == 0
    assert struct.unpack_from("<I", pointer, 4)[0] == 0xF0000
    assert pointer[8] == 1 and pointer[9] == 4  # 16 bytes, spec 1.4
    assert table[:4] == b"PCMP" and sum(table) % 256 == 0
    length, revision = struct.unpack_from("<HB", table, 4)
    assert length == len(table) and revision == 4
    count, lapic = struct.unpack_from("<HI", table, 34)
    assert lapic == layout.LAPIC_ADDR
    offset, entries = 44, []
    for _ in range(count):
        kind = table[offset]
        size = 20 if kind == 0 else 8
        entries.append(table[offset:offset + size])
        offset += size
    assert offset == len(table)
    return entries


def test_mptable_two_cpus():
    pointer, table = build_mptable([0, 1], online=2)
    entries = parse_mptable(pointer, table)
    cpus = [e for e in entries if e[0] == 0]
    assert [(e[1], e[3]) for e in cpus] == [(0, 0x03), (1, 0x01)]  # BSP flag on CPU 0 only
    ioapic = [e for e in entries if e[0] == 2]
    assert len(ioapic) == 1 and ioapic[0][1] == 2 and ioapic[0][3] == 1
    assert struct.unpack_from("<I", ioapic[0], 4)[0] == layout.IOAPIC_ADDR
    irqs = [e for e in entries if e[0] == 3]
    assert [(e[5], e[6], e[7]) for e in irqs] == [(0, 2, 0)] + [(i, 2, i) for i in range(1, 16)]
    assert irqs[0][1] == 3  # IRQ 0 through the PIC (ExtINT)
    local = [e for e in entries if e[0] == 4]
    assert [(e[1], e[6], e[7]) for e in local] == [(3, 0xFF, 0), (1, 0xFF, 1)]
    assert entries[2][0] == 1 and entries[2][2:8] == b"ISA   "


def test_mptable_offline_cpus_are_disabled():
    pointer, table = build_mptable([0, 1, 2, 3], online=2)
    cpus = [e for e in parse_mptable(pointer, table) if e[0] == 0]
    assert [e[3] & 1 for e in cpus] == [1, 1, 0, 0]


def test_mptable_254_cpus_fits():
    pointer, table = build_mptable(list(range(254)), online=254)
    assert len([e for e in parse_mptable(pointer, table) if e[0] == 0]) == 254


def test_checksum_byte():
    assert (sum(b"abc") + checksum_byte(b"abc")) % 256 == 0


def test_apic_ids_follow_topology_bit_fields():
    topology = CpuTopology.build(6, sockets=2, cores=3, threads=1)
    # Three cores need two bits: socket 1 starts at APIC id 4.
    assert apic_ids(topology) == [0, 1, 2, 4, 5, 6]
    smt = CpuTopology.build(8, sockets=2, cores=2, threads=2)
    assert apic_id(smt, 7) == 7 and apic_id(smt, 2) == 2


def test_apic_ids_beyond_xapic_are_refused():
    with pytest.raises(ConfigError, match="APIC id"):
        apic_ids(CpuTopology.build(252, sockets=84, cores=3, threads=1))


def test_page_tables_identity_map_four_gib():
    tables = page_tables()
    pml4 = struct.unpack("<Q", tables[layout.PML4_ADDR])[0]
    assert pml4 == layout.PDPT_ADDR | 3
    pdpt = struct.unpack("<4Q", tables[layout.PDPT_ADDR])
    assert pdpt == tuple((layout.PD_ADDR + i * 0x1000) | 3 for i in range(4))
    for pd_index in range(4):
        entries = struct.unpack("<512Q", tables[layout.PD_ADDR + pd_index * 0x1000])
        for i in (0, 1, 511):
            assert entries[i] == ((pd_index * 512 + i) << 21) | 0x83
    assert max(tables) + 0x1000 <= layout.CMDLINE_ADDR  # tables stay clear of the cmdline


def test_gdt_descriptors():
    code, data = GDT[2], GDT[3]
    assert code == 0x00AF9B000000FFFF  # present, DPL 0, code, long mode, 4 KiB granularity
    assert data == 0x00CF93000000FFFF
    assert GDT[0] == GDT[1] == 0


def supported_cpuid() -> list[CpuidEntry]:
    return [
        CpuidEntry(0x1, 0, 0, 0x000A0F10, 0x00000800, 0x7ED8320B, 0x178BFBFF),
        CpuidEntry(0x4, 0, 1, 0x00000121, 0, 0, 0),
        CpuidEntry(0x4, 3, 1, 0x00000163, 0, 0, 0),
        CpuidEntry(0xB, 0, 1, 0, 0, 0, 0),
        CpuidEntry(0xB, 1, 1, 0, 0, 0, 0),
        CpuidEntry(0xB, 2, 1, 0, 0, 0, 0),
        CpuidEntry(0x4000_0000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
    ]


def test_cpuid_reports_topology_and_apic_ids():
    topology = CpuTopology.build(8, sockets=2, cores=2, threads=2)
    table = {(e.function, e.index): e for e in vcpu_cpuid(supported_cpuid(), topology, 5)}
    leaf1 = table[(1, 0)]
    assert leaf1.ebx >> 24 == 5 and (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ecx & (1 << 31) and leaf1.edx & (1 << 28)
    assert (table[(0xB, 0)].eax, table[(0xB, 0)].ebx, table[(0xB, 0)].ecx) == (1, 2, 0x100)
    assert (table[(0xB, 1)].eax, table[(0xB, 1)].ebx, table[(0xB, 1)].ecx) == (2, 4, 0x201)
    assert table[(0xB, 2)].ecx == 2 and table[(0xB, 1)].edx == 5
    assert table[(4, 0)].eax >> 26 == 1 and (table[(4, 0)].eax >> 14) & 0xFFF == 1
    assert (table[(4, 3)].eax >> 14) & 0xFFF == 3  # L3 shared by the whole package
    assert table[(0x4000_0000, 0)] == supported_cpuid()[-1]


def test_cpuid_single_vcpu_has_no_htt():
    table = vcpu_cpuid(supported_cpuid(), CpuTopology(), 0)
    assert not table[0].edx & (1 << 28) and table[0].ebx >> 16 == 1


def test_host_cmdline_additions_only_on_pvm():
    assert host_cmdline_additions("console=ttyS0", is_pvm=False) == ""
    assert host_cmdline_additions("console=ttyS0", is_pvm=True) == PVM_CMDLINE
    assert host_cmdline_additions("clearcpuid=avx", is_pvm=True) == ""
