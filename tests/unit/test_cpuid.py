"""The per-vCPU CPUID table: host brand string, topology leaves and APIC ids."""

from __future__ import annotations

from stratovirt_py.arch.x86_64.cpuid import vcpu_cpuid
from stratovirt_py.config import CpuTopology
from stratovirt_py.kvm.api import CpuidEntry


def kvm_supported(ext_max: int = 0x8000_0021) -> list[CpuidEntry]:
    """What KVM_GET_SUPPORTED_CPUID gives on the kvm_pvm host: leaf 0xB with subleaf 0 only."""
    entries = [
        CpuidEntry(0x0, 0, 0, 0x1C, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x1, 0, 0, 0x00A10F11, 0x01020800, 0x81202000, 0x078BFBFF),
        CpuidEntry(0xB, 0, 1, 0, 0, 0, 1),
        CpuidEntry(0x8000_0000, 0, 0, ext_max, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x8000_0001, 0, 0, 0x00A10F11, 0x40000000, 0x00400393, 0x23D3FBFF),
    ]
    entries.append(CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0x50020005, 0x7001, 0))
    return entries


def test_topology_leaf_has_every_level_when_kvm_lists_only_subleaf_0():
    topology = CpuTopology.build(6, sockets=2, cores=3)
    table = vcpu_cpuid(kvm_supported(), topology, 3)  # socket 1, core 0: APIC id 4
    leaf_b = [(e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in table if e.function == 0xB]
    assert leaf_b == [
        (0, 1, 0, 1, 0x100, 4),  # SMT level: no thread bits, 1 thread per core
        (1, 1, 2, 3, 0x201, 4),  # core level: 2 bits for 3 cores, 3 threads per package
        (2, 1, 0, 0, 0x002, 4),  # end of the levels
    ]
