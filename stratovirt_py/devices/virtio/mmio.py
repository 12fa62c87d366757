"""The virtio-mmio transport, version 2 (virtio 1.x §4.2.2): registers and device status.

One instance per 512-byte window.  The registers run in Python (they are
touched at set-up, and per interrupt for InterruptStatus/InterruptACK); queue
notifications go straight from KVM to the C I/O thread through an ioeventfd,
and completions come back through an irqfd, so no per-request work is here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.devices.virtio.dataplane import device_lock
from stratovirt_py.devices.virtio.guest_errors import GuestErrorLog

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0

# Register offsets.
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100
WINDOW_SIZE = 0x200

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX


@dataclass
class QueueSetup:
    """What the driver wrote for one queue."""

    size: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


class VirtioDevice(Protocol):
    """A device behind the transport; its data path lives in C."""

    device_id: int
    name: str
    queue_max_sizes: tuple[int, ...]
    shared: Any  # struct svpy_virtio_shared *

    def device_features(self) -> int: ...

    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, features: int, queues: list[QueueSetup]) -> int:
        """Starts the data plane (lock held); 0 or a svpy_vq_error."""
        ...

    def reset(self) -> None:
        """Stops the data plane and forgets the driver's set-up (lock held)."""
        ...


def activate_queue(vq: Any, setup: QueueSetup, features: int, max_size: int,
                   c_memory: Any) -> int:
    """Hands one queue the driver set up to the C side (struct svpy_virtqueue *):
    0, or the svpy_vq_error that refuses it (a size above `max_size` is refused)."""
    vq.size = setup.size if setup.size <= max_size else 0
    vq.desc_gpa, vq.avail_gpa, vq.used_gpa = setup.desc, setup.driver, setup.device
    vq.event_idx = int(bool(features & VIRTIO_F_RING_EVENT_IDX))
    vq.indirect = int(bool(features & VIRTIO_F_RING_INDIRECT_DESC))
    return lib.svpy_vq_activate(vq, c_memory)


def activate_ready_queues(pairs: Iterable[tuple[Any, QueueSetup]], features: int,
                          max_size: int, c_memory: Any) -> int:
    """activate_queue for each (C queue, set-up) pair the driver made ready, in order:
    0, or the first svpy_vq_error (the queues after it are left alone)."""
    for vq, setup in pairs:
        if setup.ready:
            error = activate_queue(vq, setup, features, max_size, c_memory)
            if error:
                return error
    return 0


def read_config_bytes(config: bytes, offset: int, size: int) -> int:
    """A driver's read of `size` bytes at `offset` of a config space; 0 outside it."""
    if offset + size > len(config) or size not in (1, 2, 4, 8):
        return 0
    return int.from_bytes(config[offset:offset + size], "little")


def _set_half(value: int, half: int, high: bool) -> int:
    if high:
        return (value & 0xFFFF_FFFF) | (half << 32)
    return (value & ~0xFFFF_FFFF) | half


class VirtioMmioTransport:
    """Registers of one virtio-mmio window, in front of a VirtioDevice."""

    def __init__(self, device: VirtioDevice, base: int, irq: int) -> None:
        self.device = device
        self.base = base
        self.irq = irq
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.queues = [QueueSetup() for _ in device.queue_max_sizes]
        self.config_generation = 0
        self.guest_errors = GuestErrorLog(device.name)

    @property
    def cmdline_token(self) -> str:
        return f"virtio_mmio.device={WINDOW_SIZE}@{self.base:#x}:{self.irq}"

    # Bus interface (vCPU threads).

    def read(self, offset: int, size: int) -> int:
        if offset >= REG_CONFIG:
            return self.device.read_config(offset - REG_CONFIG, size)
        if size != 4 or offset % 4:
            return 0  # registers are 32-bit only (§4.2.2.2)
        return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= REG_CONFIG:
            self.device.write_config(offset - REG_CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            return
        with device_lock(self.device.shared):
            self._write_register(offset, value)

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            features = self.offered_features()
            return (features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF \
                if self.device_features_sel < 2 else 0
        if offset == REG_QUEUE_NUM_MAX:
            return self.device.queue_max_sizes[self.queue_sel] if queue else 0
        if offset == REG_QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == REG_INTERRUPT_STATUS:
            return lib.svpy_read_interrupt_status(self.device.shared)
        if offset == REG_STATUS:
            return self.status
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        return 0

    def offered_features(self) -> int:
        return TRANSPORT_FEATURES | self.device.device_features()

    def _selected_queue(self) -> QueueSetup | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _queue_is_writable(self) -> QueueSetup | None:
        # Queue set-up belongs between FEATURES_OK and DRIVER_OK (§3.1.1).
        if self.status & STATUS_DRIVER_OK or not self.status & STATUS_FEATURES_OK:
            return None
        return self._selected_queue()

    def _write_register(self, offset: int, value: int) -> None:
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.status & STATUS_FEATURES_OK or self.driver_features_sel > 1:
                return
            self.driver_features = _set_half(self.driver_features, value,
                                             self.driver_features_sel == 1)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_INTERRUPT_ACK:
            lib.svpy_ack_interrupt(self.device.shared, value)
        elif offset == REG_STATUS:
            self._write_status(value)
        else:
            self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._queue_is_writable()
        if queue is None:
            return
        if offset == REG_QUEUE_NUM:
            queue.size = value
        elif offset == REG_QUEUE_READY:
            queue.ready = bool(value & 1)
        elif offset in (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH):
            queue.desc = _set_half(queue.desc, value, offset == REG_QUEUE_DESC_HIGH)
        elif offset in (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH):
            queue.driver = _set_half(queue.driver, value, offset == REG_QUEUE_DRIVER_HIGH)
        elif offset in (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH):
            queue.device = _set_half(queue.device, value, offset == REG_QUEUE_DEVICE_HIGH)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        # NEEDS_RESET is the device's to set; the driver cannot set or clear it.
        value &= 0xFF & ~STATUS_NEEDS_RESET
        cleared = self.status & ~value & ~STATUS_NEEDS_RESET
        if cleared:
            # Only a write of 0 resets (§2.1.2: the driver MUST NOT clear a bit).
            # Accepting it would let DRIVER_OK be set again and re-activate the
            # queue without a reset, serving requests already served.
            self._break(lib.SVPY_DEV_ERR_STATUS_CLEARED,
                        f"status 0x{self.status:02x} written as 0x{value:02x}")
            return
        newly_set = value & ~self.status
        if newly_set & STATUS_FEATURES_OK and not self._features_acceptable():
            value &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
        if newly_set & STATUS_DRIVER_OK and value & STATUS_FEATURES_OK:
            error = self.device.activate(self.driver_features, self.queues)
            if error:
                self._break(error)
        self.status = value | (self.status & STATUS_NEEDS_RESET)

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        return bool(features & VIRTIO_F_VERSION_1) and not features & ~self.offered_features()

    def _reset(self) -> None:
        self.device.reset()
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.queues = [QueueSetup() for _ in self.device.queue_max_sizes]
        shared = self.device.shared
        lib.svpy_ack_interrupt(shared, 0xFFFF_FFFF)
        shared.broken = 0

    def _break(self, error: int, detail: str = "") -> None:
        """The guest broke the protocol: DEVICE_NEEDS_RESET and a config interrupt (§2.1.2).

        The data plane stops too (the first error is the one kept).
        """
        what = ffi.string(lib.svpy_device_error_name(error)).decode()
        if detail:
            what += f" ({detail})"
        self.guest_errors.report(f"{what}; device needs reset")
        lib.svpy_mark_broken(self.device.shared, error)
        self.status |= STATUS_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.config_generation += 1
            lib.svpy_raise_interrupt(self.device.shared, lib.SVPY_INT_CONFIG)

    def on_data_plane_error(self) -> None:
        """Called on the main loop when the C side reported a broken device."""
        with device_lock(self.device.shared):
            error = self.device.shared.broken
            if error and not self.status & STATUS_NEEDS_RESET:
                self._break(error)

    def notify_config_change(self) -> None:
        """The device's configuration changed (e.g. a disk was hot-plugged)."""
        with device_lock(self.device.shared):
            self.config_generation += 1
            if self.status & STATUS_DRIVER_OK:
                lib.svpy_raise_interrupt(self.device.shared, lib.SVPY_INT_CONFIG)


def drain_eventfd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)
