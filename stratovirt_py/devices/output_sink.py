"""Console output that never blocks the vCPU writing it.

The guest writes its console one byte per port-I/O exit, on a vCPU thread.
A terminal that is scrolled back or stopped with Ctrl-S, a pipe whose reader
stopped reading or a slow socket must not stop that vCPU: a stopped vCPU
cannot be paused, and the whole VM stalls.  So every write is non-blocking:
what the file does not take at once waits in a bounded buffer that a flusher
thread drains when the file becomes writable, and what does not fit is
dropped and counted, as QEMU's chardevs drop output nobody reads.

The monitor's stdout is a file description it shares with the shell that
started it, so it must not be made non-blocking: terminals and pipes are
reopened through /proc/self/fd (a description of our own, O_NONBLOCK),
sockets are written with MSG_DONTWAIT, and regular files never block anyway.

A direct writer (the vCPU loop, in C) may write to the same file without
going through `write`, but only while the sink says it may: no backlog (its
bytes would overtake queued ones), no failure, not closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

BUFFER_LIMIT = 1 << 20
FLUSH_AT_CLOSE_SECONDS = 1.0
FLUSH_POLL_MS = 100


class DirectWriter(Protocol):
    """Writes a sink's output itself, to `fd`, while the sink lets it."""

    def attach(self, fd: int, is_socket: bool) -> None:
        """The non-blocking fd to write to (sockets with MSG_DONTWAIT); not yet ready."""

    def set_ready(self, ready: bool) -> None:
        """Whether it may write now; False returns once no direct write is in flight."""


class OutputSink:
    """Writes to `fd` without ever blocking the caller; thread-safe.  `fd` stays the caller's."""

    def __init__(self, fd: int, name: str, limit: int = BUFFER_LIMIT) -> None:
        self._name = name
        self._limit = limit
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._failed = False
        self.dropped = 0
        self._own_fd = -1
        self._socket: socket.socket | None = None
        self._direct: DirectWriter | None = None
        self._direct_ready = False
        # The fd a direct writer may use: one that never blocks, or none (-1).
        self._direct_fd = -1
        self._fd, self._send = self._non_blocking_writer(fd)

    def _non_blocking_writer(self, fd: int) -> tuple[int, Callable[[bytes], int]]:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            self._direct_fd = fd
            return fd, lambda data: os.write(fd, data)
        if stat.S_ISSOCK(mode):
            self._socket = socket.socket(fileno=os.dup(fd))
            sock = self._socket
            self._direct_fd = sock.fileno()
            return fd, lambda data: sock.send(data, socket.MSG_DONTWAIT)
        if os.get_blocking(fd):
            try:
                self._own_fd = os.open(f"/proc/self/fd/{fd}",
                                       os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                log.warning("%s: cannot write without blocking (%s): a reader that stops may "
                            "stall the guest", self._name, exc.strerror)
                return fd, lambda data: os.write(fd, data)
            fd = self._own_fd
        self._direct_fd = fd
        return fd, lambda data: os.write(fd, data)

    def set_direct_writer(self, writer: DirectWriter) -> None:
        """Lets `writer` write to the file itself whenever that keeps the output in order."""
        if self._direct_fd < 0:
            return  # the file may block: every byte stays on the buffered path
        with self._lock:
            self._direct = writer
            writer.attach(self._direct_fd, self._socket is not None)
            self._update_direct()

    def _update_direct(self) -> None:
        """Tells the direct writer whether it may write now (lock held)."""
        ready = not (self._pending or self._failed or self._closing)
        if self._direct is not None and ready != self._direct_ready:
            self._direct.set_ready(ready)
            self._direct_ready = ready

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed or self._failed:
                return
            if not self._pending:
                data = self._write_now(data)
                if not data:
                    return
            self._queue(data)
            self._update_direct()  # a backlog: direct bytes would overtake it

    def _write_now(self, data: bytes) -> bytes:
        """Writes what the file takes at once; returns the rest (lock held)."""
        while data:
            try:
                done = self._send(data)
            except InterruptedError:
                continue
            except BlockingIOError:
                return data
            except OSError as exc:
                self._fail(exc)
                return b""
            data = data[done:]
        return b""

    def _queue(self, data: bytes) -> None:
        room = self._limit - len(self._pending)
        if len(data) > room:
            if not self.dropped:
                log.warning("%s is not taking output: dropping what does not fit in %d KiB",
                            self._name, self._limit >> 10)
            self.dropped += len(data) - room
            data = data[:room]
        self._pending += data
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"{self._name}-out")
            self._flusher.start()
        self._wake.notify()

    def _fail(self, exc: OSError) -> None:
        if not self._failed:
            log.warning("%s: output failed (%s); further output is dropped", self._name,
                        exc.strerror)
        self._failed = True
        self._pending.clear()
        self._update_direct()

    def _flush_pending(self) -> None:
        """Writes what the file takes of the buffer (lock held)."""
        if self._pending and not self._failed:
            rest = self._write_now(bytes(self._pending))
            del self._pending[:len(self._pending) - len(rest)]

    def _flush_loop(self) -> None:
        poll = select.poll()
        poll.register(self._fd, select.POLLOUT)
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
            # Wait for room without the lock, so writers only ever append.
            with contextlib.suppress(InterruptedError):
                poll.poll(FLUSH_POLL_MS)
            with self._lock:
                self._flush_pending()
                self._update_direct()

    def close(self) -> None:
        """Gives buffered output a short while to go out, then stops; idempotent."""
        deadline = time.monotonic() + FLUSH_AT_CLOSE_SECONDS
        with self._lock:
            self._closing = True
            self._update_direct()  # before the fd goes: every byte comes through write()
            self._flush_pending()
            while self._pending and not self._failed and time.monotonic() < deadline:
                self._wake.wait(0.01)  # the flusher writes when there is room
                self._flush_pending()
            self._closed = True
            self._wake.notify()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=1)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._own_fd >= 0:
            os.close(self._own_fd)
            self._own_fd = -1
