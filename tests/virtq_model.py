"""Synthetic guest memory with split virtqueues, for testing the C data plane without KVM."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.config import DriveConfig
from stratovirt_py.devices.virtio.block import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    DiskBackend,
    VirtioBlock,
)
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, IoThread, device_lock
from stratovirt_py.devices.virtio.mmio import VIRTIO_F_RING_INDIRECT_DESC, QueueSetup

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
GUARD = 4096
CANARY = 0xA5


@dataclass
class Layout:
    desc: int
    avail: int
    used: int


class SyntheticGuest:
    """`size` bytes of guest RAM at guest address `base`, with guard bytes around it."""

    def __init__(self, size: int = 1 << 20, base: int = 0x10000) -> None:
        self.base = base
        self.size = size
        self.backing = bytearray([CANARY]) * (size + 2 * GUARD)
        self.backing[GUARD:GUARD + size] = bytes(size)
        self._pointer = ffi.from_buffer(self.backing)
        self.mem = ffi.new("struct svpy_guest_memory *")
        self.mem.count = 1
        self.mem.regions[0].gpa = base
        self.mem.regions[0].size = size
        self.mem.regions[0].hva = ffi.cast("uint8_t *", self._pointer) + GUARD
        self.host_start = int(ffi.cast("uintptr_t", self.mem.regions[0].hva))

    def write(self, gpa: int, data: bytes) -> None:
        offset = GUARD + gpa - self.base
        assert offset >= GUARD and offset + len(data) <= GUARD + self.size
        self.backing[offset:offset + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        offset = GUARD + gpa - self.base
        return bytes(self.backing[offset:offset + length])

    def guards_intact(self) -> bool:
        return (all(b == CANARY for b in self.backing[:GUARD])
                and all(b == CANARY for b in self.backing[GUARD + self.size:]))

    def iov_inside(self, iov) -> bool:
        start = int(ffi.cast("uintptr_t", iov.iov_base))
        return self.host_start <= start and start + iov.iov_len <= self.host_start + self.size

    def gpa_of(self, pointer) -> int:
        return int(ffi.cast("uintptr_t", pointer)) - self.host_start + self.base


class Queue:
    """A driver-side view of one split virtqueue in a SyntheticGuest."""

    def __init__(self, guest: SyntheticGuest, size: int = 16, at: int | None = None,
                 event_idx: bool = False, indirect: bool = True) -> None:
        self.guest = guest
        self.size = size
        start = guest.base if at is None else at
        self.layout = Layout(desc=start, avail=start + 16 * size,
                             used=(start + 16 * size + 6 + 2 * size + 3) & ~3)
        self.vq = ffi.new("struct svpy_virtqueue *")
        self.vq.size = size
        self.vq.event_idx = int(event_idx)
        self.vq.indirect = int(indirect)
        self.vq.desc_gpa = self.layout.desc
        self.vq.avail_gpa = self.layout.avail
        self.vq.used_gpa = self.layout.used
        self.avail_idx = 0
        self.data_area = (self.layout.used + 6 + 8 * size + 4 + 4095) & ~4095

    def activate(self) -> int:
        return lib.svpy_vq_activate(self.vq, self.guest.mem)

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                 table: int | None = None) -> None:
        base = self.layout.desc if table is None else table
        self.guest.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_))

    def publish(self, head: int, advance: int = 1) -> None:
        self.guest.write(self.layout.avail + 4 + 2 * (self.avail_idx % self.size),
                         struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + advance) & 0xFFFF
        self.guest.write(self.layout.avail + 2, struct.pack("<H", self.avail_idx))

    def set_used_event(self, value: int) -> None:
        self.guest.write(self.layout.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.guest.read(self.layout.used + 2, 2))[0]

    def used_elem(self, index: int) -> tuple[int, int]:
        return struct.unpack("<II", self.guest.read(self.layout.used + 4 + 8 * index, 8))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.guest.read(self.layout.used + 4 + 8 * self.size, 2))[0]


def new_chain():
    return ffi.new("struct svpy_chain *")


class BlkDriver:
    """Builds virtio-blk requests in a Queue, as a guest driver would."""

    HEADER = struct.Struct("<IIQ")

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.next_desc = 0
        self.scratch = queue.data_area
        self.pending: list[tuple[int, int]] = []  # (head, status address)

    def alloc(self, length: int, offset: int = 0) -> int:
        """Guest memory for buffers: 64-byte aligned, plus `offset`."""
        addr = self.scratch + offset
        self.scratch = (addr + length + 63) & ~63
        assert self.scratch < self.queue.guest.base + self.queue.guest.size
        return addr

    def _desc(self) -> int:
        index = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.queue.size
        return index

    def header(self, kind: int, sector: int = 0) -> int:
        """A request header in guest memory; returns its address."""
        addr = self.alloc(16)
        self.queue.guest.write(addr, self.HEADER.pack(kind, 0, sector))
        return addr

    def status_byte(self) -> int:
        """A status byte preset to 0xee (no status); returns its address."""
        addr = self.alloc(1)
        self.queue.guest.write(addr, b"\xee")
        return addr

    def submit(self, kind: int, sector: int = 0, data: bytes = b"", read_len: int = 0,
               segments: int = 1) -> int:
        """Queues one request; returns the guest address of its status byte."""
        chain = [(self.header(kind, sector), 16, 0)]
        payload = data if data else bytes(read_len)
        flags = 0 if data else F_WRITE
        if payload:
            piece = -(-len(payload) // segments)
            for start in range(0, len(payload), piece):
                addr = self.alloc(len(payload[start:start + piece]))
                if data:
                    self.queue.guest.write(addr, payload[start:start + piece])
                chain.append((addr, len(payload[start:start + piece]), flags))
        status = self.status_byte()
        chain.append((status, 1, F_WRITE))
        self.pending.append((self.submit_chain(chain), status))
        return status

    def submit_chain(self, chain: list[tuple[int, int, int]], table: int | None = None) -> int:
        """Queues (address, length, flags) buffers as one chain: in the ring, or in an
        indirect table at guest address `table` (any alignment); returns the head."""
        if table is not None:
            for position, (addr, length, flags) in enumerate(chain):
                last = position == len(chain) - 1
                self.queue.set_desc(position, addr, length, flags | (0 if last else F_NEXT),
                                    0 if last else position + 1, table=table)
            chain = [(table, 16 * len(chain), F_INDIRECT)]
        indices = [self._desc() for _ in chain]
        for position, (addr, length, flags) in enumerate(chain):
            last = position == len(chain) - 1
            self.queue.set_desc(indices[position], addr, length,
                                flags | (0 if last else F_NEXT),
                                0 if last else indices[position + 1])
        self.queue.publish(indices[0])
        return indices[0]

    def data_at(self, status_addr: int, length: int) -> bytes:
        """The read buffer(s) just before a status byte (single-segment reads)."""
        return self.queue.guest.read(status_addr - ((length + 63) & ~63), length)


SECTOR = 512


class Rig:
    """A VirtioBlock on synthetic memory, with its I/O thread running.

    The image holds a byte pattern (`image_sectors`), or is sparse (`sparse_bytes`).
    With `activate`, the queue is handed to the device as a driver would at DRIVER_OK,
    with INDIRECT_DESC, DISCARD and WRITE_ZEROES negotiated (and `features`).
    """

    def __init__(self, tmp_path: Path, image_sectors: int = 64, read_only: bool = False,
                 direct: bool = False, serial: str | None = "SN-1234", features: int = 0,
                 guest_size: int = 1 << 21, sparse_bytes: int = 0, activate: bool = True):
        self.guest = SyntheticGuest(size=guest_size)
        self.image = tmp_path / "disk.img"
        if sparse_bytes:
            with open(self.image, "wb") as image:
                image.truncate(sparse_bytes)
        else:
            self.image.write_bytes(bytes(range(256)) * (image_sectors * SECTOR // 256))
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        self.irqfd, self.error_fd, self.kick_fd = self.fds
        self.iothread = IoThread()
        self.device = VirtioBlock("vdt", DeviceWiring(self.guest.mem, self.iothread, self.irqfd,
                                                      self.error_fd, (self.kick_fd,)))
        drive = DriveConfig("d", str(self.image), read_only=read_only, direct=direct,
                            serial=serial)
        self.device.set_backend(DiskBackend.open(drive))
        self.queue = Queue(self.guest, size=64)
        self.driver = BlkDriver(self.queue)
        if activate:
            setup = QueueSetup(size=64, ready=True, desc=self.queue.layout.desc,
                               driver=self.queue.layout.avail, device=self.queue.layout.used)
            with device_lock(self.device.shared):
                assert self.device.activate(
                    features | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_BLK_F_DISCARD
                    | VIRTIO_BLK_F_WRITE_ZEROES, [setup]) == 0

    def run(self, count: int = 1) -> None:
        """Notifies the device and waits for `count` more completions."""
        target = self.queue.used_idx() + count
        os.eventfd_write(self.kick_fd, 1)
        deadline = time.monotonic() + 5
        while self.queue.used_idx() < target:
            assert time.monotonic() < deadline, "the device did not complete the request"
            time.sleep(0.001)

    def status(self, addr: int) -> int:
        return self.guest.read(addr, 1)[0]

    def close(self) -> None:
        self.iothread.stop()
        backend = self.device.set_backend(None)
        if backend:
            backend.close()
        self.device.close()
        for fd in self.fds:
            os.close(fd)
