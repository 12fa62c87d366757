"""MicroVM: builds the x86_64 microvm from a MachineConfig and runs its lifecycle.

The run state and its events belong to a Lifecycle (lifecycle.py).  The vCPU
threads report guest exits here; the control plane (the asyncio loop in
launcher.py, and QMP) waits for `exited` and asks for pause, resume and
shutdown.  Events reach the listeners on the event-loop thread, whichever
thread raised them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratovirt_py._dataplane import ffi as dataplane_ffi
from stratovirt_py._dataplane import lib as dataplane_lib
from stratovirt_py.arch.x86_64 import boot_params, layout
from stratovirt_py.arch.x86_64.boot_params import build_zero_page
from stratovirt_py.arch.x86_64.cpu_topology import apic_id, apic_ids
from stratovirt_py.arch.x86_64.cpuid import vcpu_cpuid, with_host_brand
from stratovirt_py.arch.x86_64.e820 import build_e820
from stratovirt_py.arch.x86_64.host_quirks import (
    host_cmdline_additions,
    host_cpuid_adjustments,
    host_is_pvm,
)
from stratovirt_py.arch.x86_64.loader import LoadedKernel, load_initrd, load_kernel
from stratovirt_py.arch.x86_64.mptable import (
    CONFIG_TABLE_ADDR,
    FLOATING_POINTER_ADDR,
    build_mptable,
)
from stratovirt_py.arch.x86_64.registers import (
    setup_entry_regs,
    setup_long_mode_sregs,
    write_boot_tables,
)
from stratovirt_py.config import MAX_DISKS, MachineConfig
from stratovirt_py.devices.bus import Bus
from stratovirt_py.devices.chardev import Chardev, create_chardev
from stratovirt_py.devices.i8042 import I8042
from stratovirt_py.devices.serial import Serial
from stratovirt_py.devices.virtio.block import VirtioBlock
from stratovirt_py.devices.virtio.dataplane import IoThread, c_guest_memory
from stratovirt_py.devices.virtio.mmio import (
    REG_QUEUE_NOTIFY,
    VirtioMmioTransport,
    drain_eventfd,
)
from stratovirt_py.disks import DiskError, DiskSlots, Slot
from stratovirt_py.errors import BootError, MonitorError
from stratovirt_py.kvm import Kvm, KvmError, Vcpu, Vm, ffi, lib
from stratovirt_py.lifecycle import Lifecycle, RunState
from stratovirt_py.memory import GuestMemory
from stratovirt_py.vcpu import GuestExit, GuestExitKind, VcpuThread, install_kick_handler

log = logging.getLogger(__name__)

# Linux x86 keeps at most COMMAND_LINE_SIZE (2048) bytes, NUL included.
KERNEL_CMDLINE_LIMIT = 2048
PAUSE_TIMEOUT = 2.0
REQUIRED_CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_IOEVENTFD", "KVM_CAP_IRQFD",
                 "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_PIT2")
LAPIC_LVT0 = 0x350
LAPIC_LVT1 = 0x360
DELIVERY_MODE_EXTINT = 0x7
DELIVERY_MODE_NMI = 0x4


__all__ = ["ExitRequest", "MicroVM", "RunState"]


@dataclass(frozen=True)
class ExitRequest:
    """How and why the monitor process ends."""

    status: int
    guest: bool
    reason: str  # QMP ShutdownCause
    message: str


EventListener = Callable[[str, dict[str, Any]], None]


class MicroVM:
    def __init__(self, config: MachineConfig, loop: asyncio.AbstractEventLoop,
                 is_pvm: bool | None = None) -> None:
        self.config = config
        self._loop = loop
        self._is_pvm = host_is_pvm() if is_pvm is None else is_pvm
        self._loop_thread = threading.get_ident()
        self.exited: asyncio.Future[ExitRequest] = loop.create_future()
        self.event_listeners: list[EventListener] = []
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.vcpu_threads: list[VcpuThread] = []
        self.lifecycle = Lifecycle(self.vcpu_threads, self.emit_event, PAUSE_TIMEOUT)
        self.pio_bus = Bus("port I/O")
        self.mmio_bus = Bus("MMIO", unclaimed_log_level=logging.WARNING)
        self.chardev: Chardev = Chardev()
        self.serial: Serial | None = None
        self.cmdline = ""
        self._exit_lock = threading.Lock()
        self._exit_claimed = False
        self.virtio_transports: list[VirtioMmioTransport] = []
        self.iothread: IoThread | None = None
        self.disks: DiskSlots | None = None
        self._eventfds: list[int] = []
        self._virtio_error_fd = -1
        self._c_memory: Any = None
        self._fastpath: Any = None

    # Construction.

    def build(self) -> None:
        config = self.config
        # Parsed already (one config model for every front end), not yet emulated.
        if config.nics:
            raise MonitorError("virtio-net devices are not available yet in this version")
        if config.balloon is not None:
            raise MonitorError("the virtio-balloon device is not available yet in this version")
        try:
            self.kvm = Kvm()
        except KvmError as exc:
            raise MonitorError(f"cannot use KVM: {exc}") from None
        for cap in REQUIRED_CAPS:
            if not self.kvm.check_extension(getattr(lib, cap)):
                raise MonitorError(f"KVM on this host lacks {cap}")
        vm = self.vm = self.kvm.create_vm()
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()

        memory = self.memory = GuestMemory(config.memory_size, config.dump_guest_core)
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)

        self._build_disk_slots()
        assert config.kernel is not None
        kernel = load_kernel(memory, config.kernel)
        initrd = load_initrd(memory, config.initrd, kernel) if config.initrd else None
        self.cmdline = self._guest_cmdline()
        self._write_cmdline(kernel)
        e820 = build_e820([(r.guest_addr, r.size) for r in memory.regions])
        memory.write(layout.ZERO_PAGE_ADDR,
                     build_zero_page(e820, len(self.cmdline), kernel.setup_header, initrd))
        pointer, table = build_mptable(apic_ids(config.topology), config.topology.cpus)
        memory.write(FLOATING_POINTER_ADDR, pointer)
        memory.write(CONFIG_TABLE_ADDR, table)
        write_boot_tables(memory)

        self._build_legacy_devices()
        self._fastpath = self._build_fastpath()
        install_kick_handler()
        supported_cpuid = host_cpuid_adjustments(with_host_brand(self.kvm.supported_cpuid()),
                                                 self._is_pvm)
        for index in range(config.topology.cpus):
            # KVM's vCPU id becomes the LAPIC id: it must be the APIC id of the MP table and
            # CPUID (holes for non-power-of-two topologies).  Index 0 has id 0, KVM's BSP.
            vcpu = vm.create_vcpu(apic_id(config.topology, index), index)
            vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, config.topology, index))
            self._setup_lapic(vcpu)
            if index == 0:
                self._setup_boot_vcpu(vcpu, kernel)
            self.vcpu_threads.append(VcpuThread(vcpu, memory, self.pio_bus, self.mmio_bus,
                                                self._on_guest_exit, self._fastpath))
        log.info("VM '%s' built: %d vCPU(s), %d MiB, kernel %s, cmdline: %s", config.name,
                 config.topology.cpus, config.memory_size >> 20, config.kernel, self.cmdline)

    def _guest_cmdline(self) -> str:
        parts = [self.config.cmdline.strip()]
        extra = host_cmdline_additions(self.config.cmdline, self._is_pvm)
        if extra:
            log.info("kvm_pvm host: adding '%s' to the guest command line", extra)
            parts.append(extra)
        # The guest finds virtio-mmio devices only here (no ACPI, no device tree).
        parts.extend(t.cmdline_token for t in self.virtio_transports)
        return " ".join(p for p in parts if p)

    def _new_eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    def _add_virtio_device(self, make_device: Callable[[int, int, int], Any]) -> Any:
        """Places the next virtio-mmio window; returns its transport."""
        assert self.vm is not None
        index = len(self.virtio_transports)
        base = layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_WINDOW
        irq = layout.VIRTIO_IRQ_BASE + index
        if irq > layout.VIRTIO_IRQ_LAST:
            raise MonitorError("out of interrupt lines for virtio devices")
        irqfd, kick_fd = self._new_eventfd(), self._new_eventfd()
        device = make_device(irqfd, self._virtio_error_fd, kick_fd)
        self.vm.register_irqfd(irqfd, irq)
        self.vm.register_ioeventfd(kick_fd, base + REG_QUEUE_NOTIFY, 4)
        transport = VirtioMmioTransport(device, base, irq)
        self.mmio_bus.insert(base, layout.VIRTIO_MMIO_WINDOW, transport)
        self.virtio_transports.append(transport)
        return transport

    def _build_fastpath(self) -> Any:
        """Lets the vCPU loop answer InterruptStatus/InterruptACK in C (no Python per I/O)."""
        fastpath = dataplane_ffi.new("struct svpy_mmio_fastpath *")
        fastpath.base = layout.VIRTIO_MMIO_BASE
        fastpath.window_size = layout.VIRTIO_MMIO_WINDOW
        if len(self.virtio_transports) > dataplane_lib.SVPY_FASTPATH_MAX_DEVICES:
            raise MonitorError("too many virtio devices for the vCPU fast path")
        fastpath.count = len(self.virtio_transports)
        for index, transport in enumerate(self.virtio_transports):
            assert transport.base == layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_WINDOW
            fastpath.devices[index] = transport.device.shared
        return fastpath

    def _build_disk_slots(self) -> None:
        """Six virtio-blk slots, vda..vdf, first in the virtio-mmio order; boot disks fill them."""
        assert self.memory is not None
        self._c_memory = c_guest_memory(self.memory)
        self.iothread = IoThread()
        self._virtio_error_fd = self._new_eventfd()
        slots = []
        for index in range(MAX_DISKS):
            name = "vd" + chr(ord("a") + index)
            transport = self._add_virtio_device(
                functools.partial(VirtioBlock, name, self._c_memory, self.iothread))
            slots.append(Slot(index, transport.device, transport.notify_config_change))
        self.disks = DiskSlots(slots)
        for disk in self.config.disks:
            try:
                self.disks.add_node(disk.drive)
                self.disks.attach(None, disk.id, disk.drive.id, boot=True)
            except DiskError as exc:
                raise BootError(f"drive '{disk.drive.id}': {exc.desc}") from None

    def _write_cmdline(self, kernel: LoadedKernel) -> None:
        assert self.memory is not None
        encoded = self.cmdline.encode()
        limit = KERNEL_CMDLINE_LIMIT
        if kernel.setup_header is not None:
            offset = boot_params.CMDLINE_SIZE - boot_params.SETUP_HEADER
            limit = struct.unpack_from("<I", kernel.setup_header, offset)[0] + 1
        if len(encoded) + 1 > min(limit, layout.CMDLINE_MAX_SIZE):
            raise BootError(f"the guest command line is {len(encoded)} bytes; this kernel "
                            f"accepts at most {limit - 1}")
        self.memory.write(layout.CMDLINE_ADDR, encoded + b"\0")

    def _build_legacy_devices(self) -> None:
        assert self.vm is not None
        vm = self.vm
        self.chardev = create_chardev(self.config.serial)
        self.serial = Serial(self.chardev.write,
                             lambda level: vm.set_irq_line(layout.SERIAL_IRQ, int(level)))
        self.pio_bus.insert(layout.SERIAL_PORT_BASE, 8, self.serial)
        self.pio_bus.insert(0x60, 5, I8042(self._on_guest_reset))

    def _setup_lapic(self, vcpu: Vcpu) -> None:
        # LINT0 takes the PIC's ExtINT and LINT1 the NMI, as PC firmware leaves them.
        state = vcpu.get_lapic()
        registers = ffi.buffer(state.regs)
        for offset, mode in ((LAPIC_LVT0, DELIVERY_MODE_EXTINT), (LAPIC_LVT1, DELIVERY_MODE_NMI)):
            value = struct.unpack_from("<I", registers, offset)[0]
            struct.pack_into("<I", registers, offset, (value & ~0x700) | (mode << 8))
        vcpu.set_lapic(state)

    def _setup_boot_vcpu(self, vcpu: Vcpu, kernel: LoadedKernel) -> None:
        sregs = vcpu.get_sregs()
        setup_long_mode_sregs(sregs)
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        setup_entry_regs(regs, kernel.entry)
        vcpu.set_regs(regs)

    # Lifecycle.

    def start(self) -> None:
        paused = self.config.freeze
        for thread in self.vcpu_threads:
            thread.start(paused=paused)
        self.chardev.start(self._feed_console, self.request_quit_from_console)
        if self._virtio_error_fd >= 0:
            self._loop.add_reader(self._virtio_error_fd, self._on_data_plane_error)
        if self.iothread is not None:
            self._loop.add_reader(self.iothread.failure_fd, self._on_iothread_failure)
        self.lifecycle.started(paused)
        log.info("VM started%s", " paused (-S)" if paused else "")

    def _on_iothread_failure(self) -> None:
        """The I/O thread stopped on an error: no disk would ever answer again, so the VM
        ends with an error instead of hanging on its disks."""
        assert self.iothread is not None
        drain_eventfd(self.iothread.failure_fd)
        reason = self.iothread.failure()
        if reason is not None:
            self.request_exit(ExitRequest(1, False, "host-error", reason))

    def _on_data_plane_error(self) -> None:
        drain_eventfd(self._virtio_error_fd)
        for transport in self.virtio_transports:
            transport.on_data_plane_error()

    async def device_del(self, device_id: str) -> None:
        """QMP device_del: empties the disk's slot, then DEVICE_DELETED.

        Waiting for the requests in flight and syncing the image happen on a
        worker thread, so the event loop keeps serving other clients and signals.
        """
        if self.disks is None:
            raise DiskError(f"Device '{device_id}' not found", "DeviceNotFound")
        await self.disks.detach(device_id)
        self.emit_event("DEVICE_DELETED", {"device": device_id, "path": device_id})

    def vcpu_thread_ids(self) -> list[int | None]:
        return [thread.thread_id for thread in self.vcpu_threads]

    def _feed_console(self, data: bytes) -> None:
        if self.serial is not None:
            self.serial.feed_input(data)

    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    def pause(self) -> None:
        """QMP stop: raises LifecycleError (and the VM keeps running) if it cannot."""
        self.lifecycle.pause()

    def resume(self) -> None:
        """QMP cont: raises LifecycleError unless paused or in prelaunch."""
        self.lifecycle.resume()

    def emit_event(self, name: str, data: dict[str, Any]) -> None:
        """Delivers an event to the listeners on the event-loop thread, in order."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.emit_event, name, data)
            return
        for listener in list(self.event_listeners):
            listener(name, data)

    @property
    def exit_pending(self) -> bool:
        return self._exit_claimed

    def request_exit(self, request: ExitRequest) -> None:
        """Ends the VM; the first request wins.  Safe from any thread."""
        with self._exit_lock:
            if self._exit_claimed:
                return
            self._exit_claimed = True
        self._loop.call_soon_threadsafe(self._finish_exit, request)

    def _finish_exit(self, request: ExitRequest) -> None:
        self.lifecycle.shut_down(bool(request.status), request.guest, request.reason)
        if not self.exited.done():
            self.exited.set_result(request)

    def powerdown(self) -> None:
        """QMP system_powerdown: a microvm has no ACPI, so the monitor powers the guest off.

        QMP writes POWERDOWN after the command's return, as QEMU does; SHUTDOWN follows.
        """
        self.emit_event("POWERDOWN", {})
        self.request_exit(ExitRequest(0, True, "guest-shutdown",
                                      "system_powerdown requested over QMP"))

    def request_quit_from_console(self) -> None:
        self.request_exit(ExitRequest(0, False, "host-ui", "quit requested from the console"))

    def _on_guest_reset(self) -> None:
        self.request_exit(ExitRequest(0, True, "guest-reset", "guest requested a reset"))

    def _on_guest_exit(self, guest_exit: GuestExit) -> None:
        if guest_exit.kind is GuestExitKind.FATAL:
            self.request_exit(ExitRequest(1, False, "host-error", guest_exit.message))
        elif guest_exit.kind is GuestExitKind.POWER_OFF:
            self.request_exit(ExitRequest(0, True, "guest-shutdown", guest_exit.message))
        else:
            self.request_exit(ExitRequest(0, True, "guest-reset", guest_exit.message))

    def destroy(self) -> None:
        """Stops the vCPUs and releases host resources; idempotent."""
        for thread in self.vcpu_threads:
            thread.stop()
        for thread in self.vcpu_threads:
            thread.join(timeout=2.0)
        if self.iothread is not None:
            with contextlib.suppress(ValueError, OSError):  # the loop may be closed
                self._loop.remove_reader(self.iothread.failure_fd)
            self.iothread.stop()
            self.iothread = None
        if self.disks is not None:
            self.disks.close()
        self.chardev.close()
