"""Memory overhead of a monitor process from /proc/PID/smaps.

What is counted
    Every mapping of the process, from /proc/PID/smaps.  Threads share one
    address space, so this file already covers all threads (vCPU threads' stacks,
    I/O threads, the heap, the interpreter or binary, shared libraries).  Kernel
    memory the process causes (KVM's own structures, page tables, socket buffers)
    is not in smaps and is not counted.

How the guest RAM mapping is identified
    A mapping is a guest-RAM candidate when it is anonymous (its smaps header has
    no pathname, or an `[anon:NAME]` name; `[heap]`, `[stack]`, files and memfds
    are never RAM here) and its size (end - start, in bytes) is one of the sizes
    guest RAM is allocated in:

    1. one mapping of exactly the -m size.  This is stratovirt-py with -m up to
       3 GiB, and QEMU microvm for any size (QEMU allocates one "pc.ram" block
       and maps the parts above and below the 32-bit hole as aliases of it);
    2. failing that, two mappings, of exactly 3 GiB (below the MMIO gap) and
       -m minus 3 GiB (from 4 GiB up): stratovirt-py with -m above 3 GiB
       (`stratovirt_py.memory.ram_layout`).

    The first layout found wins; a layout that matches more than one way (two
    anonymous mappings of the same RAM size) or no layout at all is an error, so
    a wrong accounting fails loudly instead of reporting a plausible number.

Overhead
    overhead_rss = sum(Rss of all mappings) - sum(Rss of the RAM mappings), and
    the same for Pss.  Rss counts a shared page (libc, libpython, the QEMU binary)
    fully in every process; Pss divides it by the number of processes mapping it,
    so Pss depends on what else runs on the host (another QEMU, the benchmark's own
    Python interpreter) and is reported beside Rss, not instead of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
# Where stratovirt-py splits RAM around the 32-bit MMIO hole; kept here (it is
# stratovirt_py.arch.x86_64.layout.MMIO_GAP_START) so smaps parsing stays importable
# without the monitor.
RAM_SPLIT_AT = 3 * GiB

_HEADER = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>\S{4})\s+(?P<offset>[0-9a-f]+)\s+"
    r"(?P<dev>\S+)\s+(?P<inode>\d+)\s*(?P<path>.*)$")
_SIZE_FIELD = re.compile(r"^(?P<key>[A-Za-z_]+):\s+(?P<value>\d+) kB$")


class RamMappingError(RuntimeError):
    """The guest RAM mapping(s) could not be identified unambiguously."""


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    # smaps "Key: N kB" fields, converted to bytes.
    fields: dict[str, int] = field(default_factory=dict)
    vm_flags: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def rss(self) -> int:
        return self.fields.get("Rss", 0)

    @property
    def pss(self) -> int:
        return self.fields.get("Pss", 0)

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[anon:")

    def describe(self) -> str:
        return (f"{self.start:x}-{self.end:x} {self.perms} {self.path or '(anon)'} "
                f"size={self.size >> 10} kB rss={self.rss >> 10} kB")


@dataclass(frozen=True)
class MemoryAccount:
    """One process's memory split into guest RAM and everything else, in bytes."""

    total_rss: int
    total_pss: int
    ram_rss: int
    ram_pss: int
    ram_mappings: tuple[str, ...]
    mapping_count: int

    @property
    def overhead_rss(self) -> int:
        return self.total_rss - self.ram_rss

    @property
    def overhead_pss(self) -> int:
        return self.total_pss - self.ram_pss

    def as_dict(self) -> dict[str, object]:
        return {
            "total_rss": self.total_rss, "total_pss": self.total_pss,
            "ram_rss": self.ram_rss, "ram_pss": self.ram_pss,
            "overhead_rss": self.overhead_rss, "overhead_pss": self.overhead_pss,
            "ram_mappings": list(self.ram_mappings), "mapping_count": self.mapping_count,
        }


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of an smaps file, with their size fields in bytes."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            mappings.append(Mapping(start=int(header["start"], 16), end=int(header["end"], 16),
                                    perms=header["perms"], path=header["path"].strip()))
            continue
        if not mappings:
            raise ValueError(f"smaps field before any mapping header: {line!r}")
        if line.startswith("VmFlags:"):
            mappings[-1].vm_flags = line.partition(":")[2].strip()
            continue
        size = _SIZE_FIELD.match(line)
        if size:
            mappings[-1].fields[size["key"]] = int(size["value"]) * 1024
        # Other fields (THPeligible, ProtectionKey) carry no sizes.
    return mappings


def read_smaps(pid: int) -> list[Mapping]:
    return parse_smaps(Path(f"/proc/{pid}/smaps").read_text())


def ram_layouts(ram_bytes: int, split_at: int = RAM_SPLIT_AT) -> list[list[int]]:
    """The mapping sizes guest RAM may come in, most likely first."""
    layouts = [[ram_bytes]]
    if ram_bytes > split_at:
        layouts.append([split_at, ram_bytes - split_at])
    return layouts


def find_guest_ram(mappings: Iterable[Mapping], ram_bytes: int,
                   split_at: int = RAM_SPLIT_AT) -> list[Mapping]:
    """The mapping(s) holding guest RAM; see the module docstring for the rule."""
    anonymous = [m for m in mappings if m.anonymous]
    for sizes in ram_layouts(ram_bytes, split_at):
        found: list[Mapping] = []
        # Both parts have the same size when -m is 6 GiB, hence counting.
        for size in dict.fromkeys(sizes):
            wanted = sizes.count(size)
            matches = [m for m in anonymous if m.size == size]
            if len(matches) > wanted:
                raise RamMappingError(
                    f"{len(matches)} anonymous mappings of {size} bytes, cannot tell which "
                    "is guest RAM: " + "; ".join(m.describe() for m in matches))
            if len(matches) < wanted:
                break
            found.extend(matches)
        else:
            return sorted(found, key=lambda m: m.start)
    largest = sorted(anonymous, key=lambda m: m.size, reverse=True)[:5]
    raise RamMappingError(
        f"no anonymous mapping(s) of the guest RAM size {ram_bytes} bytes; largest "
        "anonymous mappings: " + "; ".join(m.describe() for m in largest))


def account(mappings: list[Mapping], ram_bytes: int, split_at: int = RAM_SPLIT_AT
            ) -> MemoryAccount:
    ram = find_guest_ram(mappings, ram_bytes, split_at)
    return MemoryAccount(
        total_rss=sum(m.rss for m in mappings), total_pss=sum(m.pss for m in mappings),
        ram_rss=sum(m.rss for m in ram), ram_pss=sum(m.pss for m in ram),
        ram_mappings=tuple(m.describe() for m in ram), mapping_count=len(mappings))


def account_process(pid: int, ram_bytes: int, split_at: int = RAM_SPLIT_AT) -> MemoryAccount:
    """Memory account of a live process (whole process: all its threads)."""
    return account(read_smaps(pid), ram_bytes, split_at)
