"""The per-vCPU CPUID table: host brand string, topology leaves and APIC ids."""

from __future__ import annotations

from stratovirt_py.arch.x86_64.cpu_topology import apic_ids
from stratovirt_py.arch.x86_64.cpuid import BRAND_LEAVES, vcpu_cpuid, with_host_brand
from stratovirt_py.arch.x86_64.mptable import ENTRY_PROCESSOR, build_mptable
from stratovirt_py.config import CpuTopology
from stratovirt_py.kvm.api import CpuidEntry

BRAND = b"AMD EPYC 7B13 64-Core Processor".ljust(48, b"\0")


def host_cpuid(function: int, index: int) -> CpuidEntry:
    """A host whose extended leaves end at 0x80000021 and whose brand is BRAND."""
    if function == 0x8000_0000:
        return CpuidEntry(function, index, 0, 0x8000_0021, 0x68747541, 0x444D4163, 0x69746E65)
    if function in BRAND_LEAVES:
        chunk = BRAND[(function - BRAND_LEAVES[0]) * 16:][:16]
        regs = [int.from_bytes(chunk[i:i + 4], "little") for i in range(0, 16, 4)]
        return CpuidEntry(function, index, 0, *regs)
    raise AssertionError(f"unexpected host CPUID leaf {function:#x}")


def kvm_supported(ext_max: int = 0x8000_0021) -> list[CpuidEntry]:
    """What KVM_GET_SUPPORTED_CPUID gives on the kvm_pvm host: zeros for the brand, and
    leaf 0xB with subleaf 0 only."""
    entries = [
        CpuidEntry(0x0, 0, 0, 0x1C, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x1, 0, 0, 0x00A10F11, 0x01020800, 0x81202000, 0x078BFBFF),
        CpuidEntry(0xB, 0, 1, 0, 0, 0, 1),
        CpuidEntry(0x8000_0000, 0, 0, ext_max, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x8000_0001, 0, 0, 0x00A10F11, 0x40000000, 0x00400393, 0x23D3FBFF),
    ]
    if ext_max >= BRAND_LEAVES[-1]:
        entries += [CpuidEntry(leaf, 0, 0, 0, 0, 0, 0) for leaf in BRAND_LEAVES]
        entries.append(CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0x50020005, 0x7001, 0))
    return entries


def brand_of(table: list[CpuidEntry]) -> bytes:
    leaves = {e.function: e for e in table}
    return b"".join(reg.to_bytes(4, "little") for leaf in BRAND_LEAVES
                    for reg in (leaves[leaf].eax, leaves[leaf].ebx, leaves[leaf].ecx,
                                leaves[leaf].edx))


def test_the_brand_string_comes_from_the_host():
    supported = kvm_supported()
    table = with_host_brand(supported, host_cpuid)
    assert brand_of(table) == BRAND
    assert [(e.function, e.index) for e in table] == [(e.function, e.index) for e in supported]
    untouched = [e for e in table if e.function not in BRAND_LEAVES]
    assert untouched == [e for e in supported if e.function not in BRAND_LEAVES]


def test_the_brand_leaves_are_added_when_kvm_stops_short_of_them():
    table = with_host_brand(kvm_supported(ext_max=0x8000_0001), host_cpuid)
    assert {e.function: e for e in table}[0x8000_0000].eax == BRAND_LEAVES[-1]
    assert brand_of(table) == BRAND


def test_a_host_without_a_brand_string_leaves_the_table_alone():
    def no_brand(function: int, index: int) -> CpuidEntry:
        assert function == 0x8000_0000
        return CpuidEntry(function, index, 0, 0x8000_0001, 0, 0, 0)

    supported = kvm_supported()
    assert with_host_brand(supported, no_brand) == supported


def test_every_vcpu_gets_the_host_brand():
    topology = CpuTopology.build(4)
    supported = with_host_brand(kvm_supported(), host_cpuid)
    for index in range(topology.cpus):
        assert brand_of(vcpu_cpuid(supported, topology, index)) == BRAND


def test_topology_leaf_has_every_level_when_kvm_lists_only_subleaf_0():
    topology = CpuTopology.build(6, sockets=2, cores=3)
    table = vcpu_cpuid(kvm_supported(), topology, 3)  # socket 1, core 0: APIC id 4
    leaf_b = [(e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in table if e.function == 0xB]
    assert leaf_b == [
        (0, 1, 0, 1, 0x100, 4),  # SMT level: no thread bits, 1 thread per core
        (1, 1, 2, 3, 0x201, 4),  # core level: 2 bits for 3 cores, 3 threads per package
        (2, 1, 0, 0, 0x002, 4),  # end of the levels
    ]


def test_cpuid_apic_ids_are_the_mp_table_ones_for_non_power_of_two_topologies():
    for topology in (CpuTopology.build(6, sockets=2, cores=3),
                     CpuTopology.build(6, sockets=2, cores=1, threads=3),
                     CpuTopology.build(2, max_cpus=6, sockets=2, cores=3)):
        _pointer, table = build_mptable(apic_ids(topology), topology.cpus)
        processors = table[44:44 + topology.max_cpus * ENTRY_PROCESSOR.size]
        mp_ids = [entry[1] for entry in ENTRY_PROCESSOR.iter_unpack(processors)]
        for index in range(topology.cpus):
            leaves = {(e.function, e.index): e
                      for e in vcpu_cpuid(kvm_supported(), topology, index)}
            assert leaves[(1, 0)].ebx >> 24 == mp_ids[index]
            assert leaves[(0xB, 1)].edx == mp_ids[index]
