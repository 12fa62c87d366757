"""The virtio-mmio device manager: places every virtio-mmio device of the VM.

For each device, in the order they are added: its 512-byte window at
`VIRTIO_MMIO_BASE + 0x200·n`, its IRQ (5 + n), an irqfd for its interrupts,
one ioeventfd per queue on QueueNotify with datamatch = the queue's index (so
a notification wakes only that queue's handler, without an exit to user
space), the `virtio_mmio.device=` token that announces it to the guest, and
its entry in the vCPU fast path that answers InterruptStatus/InterruptACK in C.
A device kind only says what it is (a VirtioDevice); the manager wires it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.arch.x86_64 import layout
from stratovirt_py.devices.bus import Bus
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, IoThread
from stratovirt_py.devices.virtio.mmio import (
    REG_QUEUE_NOTIFY,
    VirtioDevice,
    VirtioMmioTransport,
    drain_eventfd,
)
from stratovirt_py.errors import MonitorError
from stratovirt_py.kvm import Vm

DeviceFactory = Callable[[DeviceWiring], VirtioDevice]


class VirtioMmioManager:
    def __init__(self, vm: Vm, bus: Bus, c_memory: Any, iothread: IoThread) -> None:
        self._vm = vm
        self._bus = bus
        self._c_memory = c_memory
        self._iothread = iothread
        self._eventfds: list[int] = []
        self.error_fd = self._new_eventfd()
        self.transports: list[VirtioMmioTransport] = []

    def _new_eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    def add(self, make_device: DeviceFactory, queues: int,
            iothread: IoThread | None = None) -> VirtioMmioTransport:
        """Places the next device (served by `iothread`, or the shared one); returns its
        transport."""
        index = len(self.transports)
        base = layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_WINDOW
        irq = layout.VIRTIO_IRQ_BASE + index
        if irq > layout.VIRTIO_IRQ_LAST:
            raise MonitorError("out of interrupt lines for virtio devices")
        if index >= lib.SVPY_FASTPATH_MAX_DEVICES:
            raise MonitorError("too many virtio devices for the vCPU fast path")
        wiring = DeviceWiring(self._c_memory, iothread or self._iothread, self._new_eventfd(),
                              self.error_fd, tuple(self._new_eventfd() for _ in range(queues)))
        device = make_device(wiring)
        assert len(device.queue_max_sizes) == queues
        self._vm.register_irqfd(wiring.irqfd, irq)
        for queue, kick_fd in enumerate(wiring.kick_fds):
            self._vm.register_ioeventfd(kick_fd, base + REG_QUEUE_NOTIFY, 4, datamatch=queue)
        transport = VirtioMmioTransport(device, base, irq)
        self._bus.insert(base, layout.VIRTIO_MMIO_WINDOW, transport)
        self.transports.append(transport)
        return transport

    def cmdline_tokens(self) -> list[str]:
        """The guest finds virtio-mmio devices only here (no ACPI, no device tree)."""
        return [transport.cmdline_token for transport in self.transports]

    def fastpath(self) -> Any:
        """The vCPU loop's table of devices (struct svpy_mmio_fastpath), in window order."""
        table = ffi.new("struct svpy_mmio_fastpath *")
        table.base = layout.VIRTIO_MMIO_BASE
        table.window_size = layout.VIRTIO_MMIO_WINDOW
        table.count = len(self.transports)
        for index, transport in enumerate(self.transports):
            table.devices[index] = transport.device.shared
        return table

    def on_data_plane_error(self) -> None:
        """The error eventfd fired (main loop): the broken devices say so to their drivers."""
        drain_eventfd(self.error_fd)
        for transport in self.transports:
            transport.on_data_plane_error()

    def close(self) -> None:
        """Closes the eventfds (after the I/O thread and the vCPUs have stopped)."""
        for fd in self._eventfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._eventfds.clear()
