"""APIC ids from the socket/core/thread topology, as x86 firmware assigns them.

Each level gets a bit field wide enough for its count (rounded up to a power
of two), so APIC ids can have holes: 3 cores per socket use 2 bits.
"""

from __future__ import annotations

from stratovirt_py.config import CpuTopology
from stratovirt_py.errors import ConfigError

MAX_XAPIC_ID = 254  # 255 is the broadcast id; the IOAPIC takes max id + 1


def field_width(count: int) -> int:
    return (count - 1).bit_length()


def thread_bits(topology: CpuTopology) -> int:
    return field_width(topology.threads)


def core_bits(topology: CpuTopology) -> int:
    return field_width(topology.cores)


def apic_id(topology: CpuTopology, index: int) -> int:
    socket, core, thread = topology.ids(index)
    shift = thread_bits(topology)
    return (socket << (shift + core_bits(topology))) | (core << shift) | thread


def apic_ids(topology: CpuTopology) -> list[int]:
    ids = [apic_id(topology, i) for i in range(topology.max_cpus)]
    if max(ids) + 1 > MAX_XAPIC_ID:
        raise ConfigError(
            f"-smp topology needs APIC id {max(ids)}, beyond what an xAPIC microvm can address; "
            f"use power-of-two cores and threads or fewer vCPUs"
        )
    return ids
