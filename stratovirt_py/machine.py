"""MicroVM: runs a built microvm (builder.py builds it): its lifecycle and its operations.

The run state and its events belong to a Lifecycle (lifecycle.py).  The vCPU
threads report guest exits here; the control plane (the event loop in
launcher.py, and QMP) waits for `exited` and asks for pause, resume,
hot-plug and shutdown.  Events reach the listeners on the event-loop thread,
whichever thread raised them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratovirt_py.balloon import Balloon, BalloonError
from stratovirt_py.config import DriveConfig, MachineConfig, NetdevConfig
from stratovirt_py.devices.bus import Bus
from stratovirt_py.devices.chardev import Chardev
from stratovirt_py.devices.console_fastpath import ConsoleFastPath
from stratovirt_py.devices.serial import Serial
from stratovirt_py.devices.virtio.console import VirtioSerial
from stratovirt_py.devices.virtio.dataplane import IoThread
from stratovirt_py.devices.virtio.manager import VirtioMmioManager
from stratovirt_py.devices.virtio.mmio import drain_eventfd
from stratovirt_py.devices.virtio.rng import VirtioRng
from stratovirt_py.event_loop import EventLoop, Future
from stratovirt_py.hotplug import DeviceRequest, Hotplug
from stratovirt_py.kvm import Kvm, Vcpu, Vm
from stratovirt_py.lifecycle import Lifecycle, RunState
from stratovirt_py.memory import GuestMemory
from stratovirt_py.vcpu import GuestExit, GuestExitKind, VcpuThread

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 2.0

__all__ = ["ExitRequest", "Hardware", "MicroVM", "RunState"]


@dataclass(frozen=True)
class ExitRequest:
    """How and why the monitor process ends."""

    status: int
    guest: bool
    reason: str  # QMP ShutdownCause
    message: str


@dataclass
class Hardware:
    """What the builder made: KVM objects, memory, buses and devices."""

    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[Vcpu]
    pio_bus: Bus
    mmio_bus: Bus
    chardev: Chardev  # the UART's
    chardevs: list[Chardev]  # every character backend, the UART's included
    serial: Serial
    virtio: VirtioMmioManager
    iothreads: list[IoThread]  # the shared one first, then one per -object iothread
    hotplug: Hotplug
    cmdline: str
    fastpath: Any  # struct svpy_mmio_fastpath: exits the vCPU loop answers in C
    console_fastpath: ConsoleFastPath  # the UART structs it points to (kept alive here)
    balloon: Balloon | None = None
    console: VirtioSerial | None = None  # virtio-console ports (their chardevs are in chardevs)
    rng: VirtioRng | None = None

    def exit_counts(self) -> dict[str, int]:
        """vCPU exits answered in C and those that reached Python; console bytes C wrote."""
        return {"answered_in_c": int(self.fastpath.handled),
                "to_python": int(self.fastpath.returned),
                "console_bytes_in_c": self.console_fastpath.bytes_written()}


EventListener = Callable[[str, dict[str, Any]], None]


class MicroVM:
    def __init__(self, config: MachineConfig, loop: EventLoop) -> None:
        self.config = config
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self.exited: Future[ExitRequest] = loop.create_future()
        self.event_listeners: list[EventListener] = []
        self.hardware: Hardware | None = None
        self.vcpu_threads: list[VcpuThread] = []
        self.lifecycle = Lifecycle(self.vcpu_threads, self.emit_event, PAUSE_TIMEOUT)
        self._exit_lock = threading.Lock()
        self._exit_claimed = False

    def install(self, hardware: Hardware) -> None:
        """Takes the built VM (builder.py): one thread per vCPU, parked until start()."""
        self.hardware = hardware
        fastpath = hardware.fastpath
        for vcpu in hardware.vcpus:
            self.vcpu_threads.append(VcpuThread(vcpu, hardware.memory, hardware.pio_bus,
                                                hardware.mmio_bus, self._on_guest_exit,
                                                fastpath))

    def _hardware(self) -> Hardware:
        if self.hardware is None:
            raise RuntimeError("the VM has not been built")
        return self.hardware

    @property
    def loop(self) -> EventLoop:
        """The event loop the control plane runs on (timers, events)."""
        return self._loop

    # Lifecycle.

    def launch_vcpus(self) -> None:
        """Starts the vCPU threads parked, each under its own seccomp filter (launcher.py
        calls this before the main thread enters its filter, so they do not inherit it)."""
        for thread in self.vcpu_threads:
            thread.launch()

    def start(self) -> None:
        hardware = self._hardware()
        paused = self.config.freeze
        for thread in self.vcpu_threads:
            thread.start(paused=paused)
        hardware.chardev.start(hardware.serial.feed_input, self.request_quit_from_console)
        if hardware.console is not None:
            hardware.console.start(self.request_quit_from_console)
        self._loop.add_reader(hardware.virtio.error_fd, hardware.virtio.on_data_plane_error)
        for iothread in hardware.iothreads:
            self._loop.add_reader(iothread.failure_fd, self._on_iothread_failure, iothread)
        self.lifecycle.started(paused)
        log.info("VM started%s", " paused (-S)" if paused else "")

    def _on_iothread_failure(self, iothread: IoThread) -> None:
        """An I/O thread stopped on an error: its disks would never answer again, so the VM
        ends with an error instead of hanging on them."""
        drain_eventfd(iothread.failure_fd)
        reason = iothread.failure()
        if reason is not None:
            self.request_exit(ExitRequest(1, False, "host-error", reason))

    # Hot-plug (QMP); every refusal is a HotplugError.

    def blockdev_add(self, drive: DriveConfig) -> None:
        self._hardware().hotplug.blockdev_add(drive)

    def blockdev_del(self, node_name: str) -> None:
        self._hardware().hotplug.blockdev_del(node_name)

    def netdev_add(self, netdev: NetdevConfig) -> None:
        self._hardware().hotplug.netdev_add(netdev)

    def netdev_del(self, netdev_id: str) -> None:
        self._hardware().hotplug.netdev_del(netdev_id)

    def device_add(self, request: DeviceRequest) -> None:
        self._hardware().hotplug.device_add(request)

    def _balloon(self) -> Balloon:
        balloon = self._hardware().balloon
        if balloon is None:
            raise BalloonError("No balloon device has been activated", "DeviceNotActive")
        return balloon

    def balloon_set_target(self, value: int) -> None:
        self._balloon().set_target(value)

    def balloon_actual(self) -> int:
        return self._balloon().actual()

    def qom_get(self, path: str, name: str) -> Any:
        return self._balloon().qom_get(path, name)

    def qom_set(self, path: str, name: str, value: Any) -> None:
        self._balloon().qom_set(path, name, value)

    async def device_del(self, device_id: str) -> None:
        """Empties the device's slot, then DEVICE_DELETED (before QMP's return).

        Waiting for the requests in flight and syncing a disk happen on a
        worker thread, so the event loop keeps serving other clients and signals.
        """
        await self._hardware().hotplug.detach(device_id)
        self.emit_event("DEVICE_DELETED", {"device": device_id, "path": device_id})

    def query_chardevs(self) -> list[dict[str, object]]:
        """query-chardev: every character backend (a -chardev no device uses is not open)."""
        hardware = self._hardware()
        ports = hardware.console.chardevs.values() if hardware.console is not None else ()
        return [chardev.describe(frontend_open=chardev is hardware.chardev or chardev in ports)
                for chardev in hardware.chardevs]

    def vcpu_thread_ids(self) -> list[int | None]:
        return [thread.thread_id for thread in self.vcpu_threads]

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
        hardware, self.hardware = self.hardware, None
        if hardware is None:
            return
        for fd in (*(thread.failure_fd for thread in hardware.iothreads),
                   hardware.virtio.error_fd):
            with contextlib.suppress(ValueError, OSError):  # the loop may be closed
                self._loop.remove_reader(fd)
        if hardware.balloon is not None:
            hardware.balloon.close()
        for iothread in hardware.iothreads:
            iothread.stop()
        if hardware.rng is not None:
            hardware.rng.close()  # its source and timer, once no thread uses them
        hardware.hotplug.close()
        hardware.virtio.close()
        if hardware.console is not None:
            hardware.console.stop()  # input no longer waits for the guest
        for chardev in hardware.chardevs:
            chardev.close()
