"""Guest RAM: anonymous host mappings, and bounds-checked guest-physical access.

RAM is split around the 32-bit MMIO gap: [0, min(size, gap start)) and, for
the remainder, [4 GiB, ...).  Every access checks that the whole range lies
inside one region, so a guest-supplied address can never reach host memory
outside guest RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from stratovirt_py.arch.x86_64 import layout
from stratovirt_py.errors import BootError
from stratovirt_py.kvm import ffi, lib


class GuestMemoryError(ValueError):
    """A guest-physical range is not (entirely) inside guest RAM."""


@dataclass(frozen=True)
class RamRegion:
    guest_addr: int
    size: int
    host_addr: int

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def ram_layout(total: int) -> list[tuple[int, int]]:
    """(guest address, size) of each RAM region for `total` bytes of memory."""
    below_gap = min(total, layout.MMIO_GAP_START)
    regions = [(0, below_gap)]
    if total > below_gap:
        regions.append((layout.RAM_ABOVE_4G_START, total - below_gap))
    return regions


class GuestMemory:
    """Owns guest RAM for the VM's lifetime."""

    def __init__(self, total: int, dump_core: bool = True) -> None:
        self.total = total
        self.regions: list[RamRegion] = []
        self._views: list[memoryview] = []
        err = ffi.new("int *")
        for guest_addr, size in ram_layout(total):
            pointer = lib.svpy_map_guest_ram(size, int(dump_core), err)
            if pointer == ffi.NULL:
                self.close()
                raise BootError(f"cannot allocate {size >> 20} MiB of guest memory "
                                f"(errno {err[0]})")
            host_addr = int(ffi.cast("uintptr_t", pointer))
            self.regions.append(RamRegion(guest_addr, size, host_addr))
            self._views.append(memoryview(ffi.buffer(pointer, size)))

    def _locate(self, guest_addr: int, length: int) -> tuple[memoryview, int]:
        if length < 0 or guest_addr < 0:
            raise GuestMemoryError(f"bad guest range {guest_addr:#x}+{length:#x}")
        for region, view in zip(self.regions, self._views, strict=True):
            if region.guest_addr <= guest_addr and guest_addr + length <= region.end:
                return view, guest_addr - region.guest_addr
        raise GuestMemoryError(f"guest range {guest_addr:#x}+{length:#x} is outside RAM")

    def contains(self, guest_addr: int, length: int = 1) -> bool:
        try:
            self._locate(guest_addr, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, guest_addr: int, length: int) -> bytes:
        view, offset = self._locate(guest_addr, length)
        return bytes(view[offset:offset + length])

    def write(self, guest_addr: int, data: bytes | bytearray | memoryview) -> None:
        view, offset = self._locate(guest_addr, len(data))
        view[offset:offset + len(data)] = data

    def read_int(self, guest_addr: int, size: int) -> int:
        return int.from_bytes(self.read(guest_addr, size), "little")

    def write_int(self, guest_addr: int, size: int, value: int) -> None:
        self.write(guest_addr, value.to_bytes(size, "little"))

    def ram_end_below_gap(self) -> int:
        return self.regions[0].end

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views = []
        for region in self.regions:
            lib.svpy_unmap(ffi.cast("void *", region.host_addr), region.size)
        self.regions = []
