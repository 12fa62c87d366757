"""Python handles on the C data plane: guest memory for C, and the I/O thread."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.errors import MonitorError
from stratovirt_py.memory import GuestMemory

log = logging.getLogger(__name__)


@contextlib.contextmanager
def device_lock(shared: Any) -> Iterator[None]:
    """Holds a device's data-plane lock (struct svpy_virtio_shared) for reconfiguration."""
    lib.svpy_lock(shared)
    try:
        yield
    finally:
        lib.svpy_unlock(shared)


def c_guest_memory(memory: GuestMemory) -> Any:
    """A struct svpy_guest_memory describing `memory`; keep it alive as long as the VM."""
    regions = memory.regions
    if len(regions) > lib.SVPY_MAX_MEM_REGIONS:
        raise MonitorError("too many guest memory regions for the data plane")
    table = ffi.new("struct svpy_guest_memory *")
    table.count = len(regions)
    for index, region in enumerate(regions):
        table.regions[index].gpa = region.guest_addr
        table.regions[index].size = region.size
        table.regions[index].hva = ffi.cast("uint8_t *", region.host_addr)
    return table


class IoThread:
    """One C thread that serves every device's queue notifications.

    If it ever stops on its own (its epoll_wait failed), no disk it serves
    gets any work done: `failure_fd` becomes readable, and the control plane
    calls `failure()` to learn why (and to log it).
    """

    def __init__(self) -> None:
        self.handle = ffi.new("struct svpy_iothread *")
        ret = lib.svpy_iothread_start(self.handle)
        if ret < 0:
            raise MonitorError(f"cannot start the I/O thread: {os.strerror(-ret)}")
        self._failure_logged = False

    @property
    def failure_fd(self) -> int:
        """An eventfd signalled when the thread stops on an error."""
        return self.handle.failure_fd

    def failure(self) -> str | None:
        """Why the thread stopped on its own, or None while it runs; logged once."""
        error = self.handle.failed_errno
        if not error:
            return None
        call = ffi.string(self.handle.failed_call).decode()
        reason = f"the I/O thread stopped: {call} failed: {os.strerror(error)}; " \
                 "no disk I/O is served any more"
        if not self._failure_logged:
            self._failure_logged = True
            log.error("%s", reason)
        return reason

    def stop(self) -> None:
        lib.svpy_iothread_stop(self.handle)


@dataclass(frozen=True)
class DeviceWiring:
    """What a device's data plane is given: guest memory, its I/O thread and its eventfds."""

    c_memory: Any  # struct svpy_guest_memory *
    iothread: IoThread
    irqfd: int
    error_fd: int  # shared by every device: the data plane reports a broken device here
    kick_fds: tuple[int, ...]  # one per queue, in queue order

    @property
    def c_kick_fds(self) -> Any:
        """The kick fds as a C `int[]` (keep it alive while C initialises from it)."""
        return ffi.new("int[]", list(self.kick_fds))


def new_c_device(name: str, wiring: DeviceWiring, c_type: str, init: Any, attach: Any) -> Any:
    """A kind's C device struct (`c_type`), initialised (`init`) and watched on its I/O
    thread (`attach`), as every svpy_<kind>_init/_attach pair does it."""
    device = ffi.new(c_type)
    ret = init(device, wiring.c_memory, wiring.irqfd, wiring.error_fd, wiring.c_kick_fds)
    if ret < 0:
        raise OSError(-ret, f"{name}: cannot initialise the device lock")
    ret = attach(device, wiring.iothread.handle)
    if ret < 0:
        raise OSError(-ret, f"{name}: cannot watch its notifiers")
    return device
