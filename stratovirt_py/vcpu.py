"""vCPU threads: the KVM_RUN loop, exit dispatch, and pause/resume/stop control.

Each vCPU runs on its own host thread.  KVM_RUN releases the GIL (cffi), so
vCPUs run guest code in parallel; only exits to user space (port I/O, MMIO
outside ioeventfds) come back into Python.  To stop a vCPU that is inside
KVM_RUN, the controller sets kvm_run.immediate_exit and sends the thread a
signal whose handler does nothing: KVM_RUN returns EINTR and the thread parks.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratovirt_py import sandbox
from stratovirt_py._dataplane import ffi as dataplane_ffi
from stratovirt_py._dataplane import lib as dataplane_lib
from stratovirt_py.arch.x86_64.guest_walk import code_bytes
from stratovirt_py.devices.bus import Bus
from stratovirt_py.kvm import KvmError, Vcpu, ffi, lib
from stratovirt_py.memory import GuestMemory

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN + 1

EXIT_REASON_NAMES = {
    getattr(lib, name): name
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}
INTERNAL_ERROR_NAMES = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}


class GuestExitKind(enum.Enum):
    POWER_OFF = "power-off"
    RESET = "reset"
    TRIPLE_FAULT = "triple-fault"
    FATAL = "fatal"


@dataclass(frozen=True)
class GuestExit:
    """Why the guest stopped; the machine turns it into a process exit."""

    kind: GuestExitKind
    vcpu: int
    message: str


def install_kick_handler() -> None:
    ret = lib.svpy_install_kick_handler(KICK_SIGNAL)
    if ret < 0:
        raise KvmError("sigaction for the vCPU kick signal", -ret)


class _Request(enum.Enum):
    RUN = 1
    PAUSE = 2
    STOP = 3


class VcpuThread:
    """Runs one vCPU and obeys pause/resume/stop requests from the control plane."""

    def __init__(self, vcpu: Vcpu, memory: GuestMemory, pio_bus: Bus, mmio_bus: Bus,
                 on_exit: Callable[[GuestExit], None], fastpath: Any = None) -> None:
        self.vcpu = vcpu
        # struct svpy_mmio_fastpath: exits answered in C (see csrc/dataplane/vcpu_fastpath.h).
        self._fastpath = fastpath if fastpath is not None else dataplane_ffi.NULL
        self._run_page = dataplane_ffi.cast("void *", int(ffi.cast("uintptr_t", vcpu.run_state)))
        self.index = vcpu.index
        self._memory = memory
        self._pio = pio_bus
        self._mmio = mmio_bus
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._request = _Request.PAUSE
        self._parked = False
        self._finished = False
        self.thread_id: int | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self._started = threading.Event()

    # Control plane side.

    def launch(self) -> None:
        """Starts the thread, parked: it enters its seccomp filter and waits for resume()."""
        if self._thread.ident is None:
            self._request = _Request.PAUSE
            self._thread.start()
            self._started.wait()

    def start(self, paused: bool) -> None:
        self.launch()
        if not paused:
            self.resume()

    def _kick(self) -> None:
        self.vcpu.run_state.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    def request_pause(self) -> None:
        with self._cond:
            if self._request is _Request.RUN:
                self._request = _Request.PAUSE
        self._kick()

    def wait_parked(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._parked or self._finished, timeout)

    def resume(self) -> None:
        with self._cond:
            if self._request is _Request.PAUSE:
                self._request = _Request.RUN
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._request = _Request.STOP
            self._cond.notify_all()
        self._kick()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def is_parked(self) -> bool:
        with self._cond:
            return self._parked

    # vCPU thread side.

    def _main(self) -> None:
        self.thread_id = threading.get_native_id()
        with contextlib.suppress(OSError), open(f"/proc/self/task/{self.thread_id}/comm",
                                                "w") as comm:
            comm.write(f"vcpu{self.index}")
        self._started.set()
        try:
            # Its own filter only (the thread exists before the main thread enters its
            # filter); named above, as that opens a file, which a vCPU may not do after.
            sandbox.enter(sandbox.ThreadKind.VCPU)
            self._loop()
        except Exception as exc:  # a bug here must end the VM, not hang it
            log.exception("vCPU %d failed", self.index)
            self._finish(GuestExit(GuestExitKind.FATAL, self.index,
                                   f"vCPU {self.index} failed: {exc}"))
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _wait_for_run(self) -> bool:
        """Parks while paused; returns False when the vCPU must stop."""
        with self._cond:
            while self._request is _Request.PAUSE:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait()
            self._parked = False
            return self._request is _Request.RUN

    def _finish(self, guest_exit: GuestExit) -> None:
        with self._cond:
            self._request = _Request.STOP
        self._on_exit(guest_exit)

    def _loop(self) -> None:
        run_state = self.vcpu.run_state
        fd = self.vcpu.fd
        while self._wait_for_run():
            ret = dataplane_lib.svpy_vcpu_run(fd, self._run_page, self._fastpath)
            run_state.immediate_exit = 0
            if ret < 0:
                if -ret not in (errno.EINTR, errno.EAGAIN):
                    raise KvmError("KVM_RUN", -ret)
                continue  # kicked: look at the request again
            guest_exit = self._handle_exit(run_state.exit_reason)
            if guest_exit is not None:
                self._finish(guest_exit)

    def _handle_exit(self, reason: int) -> GuestExit | None:
        if reason == lib.KVM_EXIT_IO:
            self._handle_pio()
        elif reason == lib.KVM_EXIT_MMIO:
            self._handle_mmio()
        elif reason in (lib.KVM_EXIT_HLT, lib.KVM_EXIT_INTR, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
            pass
        elif reason == lib.KVM_EXIT_SHUTDOWN:
            return GuestExit(GuestExitKind.TRIPLE_FAULT, self.index,
                             f"guest triple fault on vCPU {self.index}")
        elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
            event = self.vcpu.system_event.type
            if event == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                return GuestExit(GuestExitKind.POWER_OFF, self.index, "guest powered off")
            if event == lib.KVM_SYSTEM_EVENT_RESET:
                return GuestExit(GuestExitKind.RESET, self.index, "guest reset")
            return self._fatal(reason, f"system event {event}")
        else:
            return self._fatal(reason)
        return None

    def _handle_pio(self) -> None:
        io = self.vcpu.io
        size, port, count = io.size, io.port, io.count
        data = self.vcpu.run_page(io.data_offset, size * count)
        if io.direction == lib.KVM_EXIT_IO_OUT:
            for i in range(count):
                value = int.from_bytes(data[i * size:(i + 1) * size], "little")
                self._pio.write(port, size, value)
        else:
            for i in range(count):
                data[i * size:(i + 1) * size] = self._pio.read(port, size).to_bytes(size,
                                                                                    "little")

    def _handle_mmio(self) -> None:
        mmio = self.vcpu.mmio
        length = mmio.len
        if mmio.is_write:
            value = int.from_bytes(bytes(mmio.data[0:length]), "little")
            self._mmio.write(mmio.phys_addr, length, value)
        else:
            value = self._mmio.read(mmio.phys_addr, length)
            mmio.data[0:length] = list(value.to_bytes(length, "little"))

    def _fatal(self, reason: int, detail: str = "") -> GuestExit:
        return GuestExit(GuestExitKind.FATAL, self.index, self.describe_fatal_exit(reason, detail))

    def describe_fatal_exit(self, reason: int, detail: str = "") -> str:
        """Exit reason, suberror, RIP and the instruction bytes there, for a person to read."""
        name = EXIT_REASON_NAMES.get(reason, "unknown")
        parts = [f"vCPU {self.index}: fatal KVM exit {reason} ({name})"]
        if detail:
            parts.append(detail)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = self.vcpu.internal
            suberror = internal.suberror
            parts.append(f"suberror {suberror} "
                         f"({INTERNAL_ERROR_NAMES.get(suberror, 'unknown')})")
            extra = [f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16))]
            if extra:
                parts.append("data " + " ".join(extra))
        elif reason == lib.KVM_EXIT_FAIL_ENTRY:
            parts.append("hardware entry failure reason "
                         f"{self.vcpu.fail_entry.hardware_entry_failure_reason:#x}")
        elif reason == lib.KVM_EXIT_UNKNOWN:
            parts.append(f"hardware exit reason {self.vcpu.hw.hardware_exit_reason:#x}")
        try:
            regs = self.vcpu.get_regs()
            sregs = self.vcpu.get_sregs()
        except KvmError as exc:
            parts.append(f"registers unavailable: {exc}")
            return "; ".join(parts)
        code = code_bytes(self._memory, sregs, regs.rip)
        parts.append(f"RIP {regs.rip:#x} (CS base {sregs.cs.base:#x}, CR0 {sregs.cr0:#x}, "
                     f"EFER {sregs.efer:#x})")
        parts.append("code at RIP: " + (code.hex(" ") if code else "unreadable"))
        return "; ".join(parts)
