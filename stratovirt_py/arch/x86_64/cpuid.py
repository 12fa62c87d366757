"""Per-vCPU CPUID: KVM's supported set with topology and APIC ids made consistent with -smp.

KVM_GET_SUPPORTED_CPUID passes the host's vendor, family/model/stepping and
maximum leaves through, but returns zeros for the brand string (leaves
0x80000002..4): `with_host_brand` copies it from the host, as QEMU's `-cpu host`
does, so the guest's model name is the host's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from stratovirt_py.arch.x86_64.cpu_topology import apic_id, core_bits, thread_bits
from stratovirt_py.config import CpuTopology
from stratovirt_py.kvm.api import CpuidEntry, host_cpuid

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
LEAF_EXT_MAX = 0x8000_0000
BRAND_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)
LEAF_AMD_SIZE = 0x8000_0008
LEAF_AMD_TOPOLOGY = 0x8000_001E
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28
LEVEL_SMT = 1
LEVEL_CORE = 2
FLAG_SIGNIFICANT_INDEX = 0x1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

HostCpuid = Callable[[int, int], CpuidEntry]


def with_host_brand(supported: list[CpuidEntry],
                    read_host: HostCpuid = host_cpuid) -> list[CpuidEntry]:
    """`supported` with the host's brand-string leaves (unchanged if the host has none)."""
    if read_host(LEAF_EXT_MAX, 0).eax < BRAND_LEAVES[-1]:
        return list(supported)
    brand = {leaf: dataclasses.replace(read_host(leaf, 0), flags=0) for leaf in BRAND_LEAVES}
    result = []
    for entry in supported:
        if entry.function == LEAF_EXT_MAX and entry.eax < BRAND_LEAVES[-1]:
            entry = dataclasses.replace(entry, eax=BRAND_LEAVES[-1])
        result.append(brand.pop(entry.function, entry))
    # KVM lists every extended leaf up to its maximum; these only if it did not.
    return result + list(brand.values())


def _topology_leaves(function: int, topology: CpuTopology, x2apic_id: int) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F: subleaf 0 the SMT level, 1 the core level, 2 the invalid end marker.

    Built whole rather than edited from KVM's entries: KVM lists the host's
    subleaves, which on some hosts stop after subleaf 0.
    """
    threads_shift = thread_bits(topology)
    levels = [
        (threads_shift, topology.threads, LEVEL_SMT),
        (threads_shift + core_bits(topology), topology.threads * topology.cores, LEVEL_CORE),
        (0, 0, 0),
    ]
    return [CpuidEntry(function, subleaf, FLAG_SIGNIFICANT_INDEX, eax, ebx,
                       (level << 8) | subleaf, x2apic_id)
            for subleaf, (eax, ebx, level) in enumerate(levels)]


def vcpu_cpuid(supported: list[CpuidEntry], topology: CpuTopology, index: int) -> list[CpuidEntry]:
    """The CPUID table for vCPU `index` (whose KVM vCPU id is its APIC id)."""
    my_apic_id = apic_id(topology, index)
    logical_per_package = 1 << (thread_bits(topology) + core_bits(topology))
    result = []
    for entry in supported:
        if entry.function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            if entry.index == 0:
                result += _topology_leaves(entry.function, topology, my_apic_id)
            continue
        if entry.function == LEAF_FEATURES:
            ebx = (entry.ebx & 0x0000_FFFF) | (min(logical_per_package, 255) << 16) \
                | (my_apic_id << 24)
            edx = entry.edx | EDX_HTT if logical_per_package > 1 else entry.edx & ~EDX_HTT
            entry = dataclasses.replace(entry, ebx=ebx, ecx=entry.ecx | ECX_HYPERVISOR, edx=edx)
        elif entry.function == LEAF_CACHE_PARAMS and entry.eax & 0x1F:
            # EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            cores_field = (1 << core_bits(topology)) - 1
            cache_level = (entry.eax >> 5) & 0x7
            sharing = topology.threads - 1 if cache_level < 3 else logical_per_package - 1
            eax = (entry.eax & 0x3FFF) | (sharing << 14) | (cores_field << 26)
            entry = dataclasses.replace(entry, eax=eax)
        elif entry.function == LEAF_AMD_SIZE:
            ecx = (entry.ecx & ~0xF0FF) | (logical_per_package - 1) \
                | ((thread_bits(topology) + core_bits(topology)) << 12)
            entry = dataclasses.replace(entry, ecx=ecx)
        elif entry.function == LEAF_AMD_TOPOLOGY:
            socket, core, _thread = topology.ids(index)
            entry = dataclasses.replace(entry, eax=my_apic_id,
                                        ebx=((topology.threads - 1) << 8) | core,
                                        ecx=socket)
        result.append(entry)
    return result
