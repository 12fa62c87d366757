"""Port-I/O and MMIO buses: dispatch a vCPU exit to the device owning the address."""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class Bus:
    """Non-overlapping address ranges, each owned by one device.

    Accesses that hit no device read as all ones and are otherwise ignored, as
    on real hardware; the first few per address are logged.
    """

    def __init__(self, name: str, unclaimed_log_level: int = logging.DEBUG) -> None:
        self.name = name
        self._unclaimed_log_level = unclaimed_log_level
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []
        self._reported: set[int] = set()

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        position = bisect.bisect(self._starts, base)
        neighbours = self._ranges[max(position - 1, 0):position + 1]
        for other_base, other_length, _ in neighbours:
            if base < other_base + other_length and other_base < base + length:
                raise ValueError(f"{self.name} range {base:#x}+{length:#x} overlaps "
                                 f"{other_base:#x}+{other_length:#x}")
        self._starts.insert(position, base)
        self._ranges.insert(position, (base, length, device))

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        position = bisect.bisect(self._starts, addr) - 1
        if position >= 0:
            base, length, device = self._ranges[position]
            if addr < base + length:
                return addr - base, device
        return None

    def _unclaimed(self, kind: str, addr: int, size: int, value: int | None = None) -> None:
        if len(self._reported) < 64 and addr not in self._reported:
            self._reported.add(addr)
            detail = f" value {value:#x}" if value is not None else ""
            log.log(self._unclaimed_log_level, "guest %s %s of %d bytes at %#x hits no "
                    "device%s (ignored)", self.name, kind, size, addr, detail)

    def read(self, addr: int, size: int) -> int:
        found = self.find(addr)
        if found is None:
            self._unclaimed("read", addr, size)
            return (1 << (8 * size)) - 1
        offset, device = found
        return device.read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        found = self.find(addr)
        if found is None:
            self._unclaimed("write", addr, size, value)
            return
        offset, device = found
        device.write(offset, size, value)
