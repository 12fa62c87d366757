"""The VM's run state: the one owner of running / paused / shut down, and of their events.

Every change of state goes through a Lifecycle: a pause that completes sets
`paused` and emits STOP; one that cannot complete rolls back and raises,
leaving the VM running; RESUME and SHUTDOWN likewise come from here and
nowhere else.  Callers (QMP handlers, the launcher) ask; they never set the
state themselves.  All methods run on the monitor's event-loop thread.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from stratovirt_py.errors import MonitorError


class RunState(enum.Enum):
    """QMP's RunState names."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


class LifecycleError(MonitorError):
    """A state change that was refused or could not complete; nothing changed."""


class VcpuControl(Protocol):
    """What the lifecycle needs of a vCPU thread."""

    index: int

    def request_pause(self) -> None: ...

    def wait_parked(self, timeout: float) -> bool: ...

    def resume(self) -> None: ...

    @property
    def is_parked(self) -> bool: ...


EventSink = Callable[[str, dict[str, Any]], None]


class Lifecycle:
    def __init__(self, vcpus: Sequence[VcpuControl], emit: EventSink,
                 pause_timeout: float) -> None:
        self._vcpus = vcpus
        self._emit = emit
        self._pause_timeout = pause_timeout
        self._state = RunState.PRELAUNCH

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def is_running(self) -> bool:
        return self._state is RunState.RUNNING

    def started(self, paused: bool) -> None:
        """The vCPU threads exist now: running, or parked until `cont` (-S)."""
        self._state = RunState.PRELAUNCH if paused else RunState.RUNNING

    def pause(self) -> None:
        """Parks every vCPU outside KVM_RUN, then `paused` and STOP; else rolls back and raises."""
        if self._state is RunState.PAUSED:
            raise LifecycleError("it is already paused")
        if self._state not in (RunState.RUNNING, RunState.PRELAUNCH):
            raise LifecycleError(f"it is not running (status: {self._state.value})")
        for vcpu in self._vcpus:
            vcpu.request_pause()
        deadline = time.monotonic() + self._pause_timeout
        parked = [vcpu.wait_parked(max(0.0, deadline - time.monotonic())) for vcpu in self._vcpus]
        if not all(parked):
            # The VM keeps running: a half-paused VM would be one that QMP
            # reports as running while some of its vCPUs never run again.
            for vcpu in self._vcpus:
                vcpu.resume()
            stuck = ", ".join(str(v.index) for v, done in zip(self._vcpus, parked, strict=True)
                              if not done)
            raise LifecycleError(f"vCPU {stuck} did not stop within {self._pause_timeout:g} s; "
                                 "the VM keeps running")
        self._state = RunState.PAUSED
        self._emit("STOP", {})

    def resume(self) -> None:
        """From `paused` or `prelaunch`: RESUME, then the vCPUs run again."""
        if self._state not in (RunState.PAUSED, RunState.PRELAUNCH):
            raise LifecycleError(f"it is not paused (status: {self._state.value})")
        self._state = RunState.RUNNING
        # As QEMU does, the event goes out before the vCPUs are let go.
        self._emit("RESUME", {})
        for vcpu in self._vcpus:
            vcpu.resume()

    def shut_down(self, failed: bool, guest: bool, reason: str) -> None:
        """The VM ends: `shutdown` (or `internal-error`) and SHUTDOWN, once."""
        if self._state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
            return
        self._state = RunState.INTERNAL_ERROR if failed else RunState.SHUTDOWN
        self._emit("SHUTDOWN", {"guest": guest, "reason": reason})
