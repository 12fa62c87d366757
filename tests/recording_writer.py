"""A stand-in for the vCPU loop's direct console writer (output_sink.DirectWriter)."""

from __future__ import annotations

import os
import threading
import time


class RecordingWriter:
    """Records what the output side tells it, checking that the fd it was given is still
    open whenever it is told to stop (the fd may be closed right after that)."""

    def __init__(self) -> None:
        self.fd = -1
        self.is_socket = False
        self.ready: list[bool] = []
        self.changed = threading.Event()

    def attach(self, fd: int, is_socket: bool) -> None:
        assert not (self.ready and self.ready[-1]), "attached while ready"
        self.fd, self.is_socket = fd, is_socket

    def set_ready(self, ready: bool) -> None:
        if not ready and self.fd >= 0:
            os.fstat(self.fd)  # raises if the output closed it first
        self.ready.append(ready)
        self.changed.set()

    def wait_for(self, ready: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ready[-1] is not ready:
            assert time.monotonic() < deadline, self.ready
            self.changed.wait(0.05)
            self.changed.clear()

