"""Console output that never blocks the vCPU writing it.

The guest writes its console one byte per port-I/O exit, on a vCPU thread.
A terminal that is scrolled back, a pipe whose reader stopped reading or a
slow socket must not stop that vCPU: a stopped vCPU cannot be paused, and
the whole VM stalls.  So a write goes out at once only if the file can take
it now; otherwise it waits in a bounded buffer that a flusher thread drains
when the file becomes writable, and what does not fit is dropped and
counted, as QEMU's chardevs drop output nobody reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time

log = logging.getLogger(__name__)

BUFFER_LIMIT = 1 << 20
# poll() promises room for PIPE_BUF bytes on a writable pipe; larger writes
# go out in pieces of this size.
ATOMIC_WRITE = select.PIPE_BUF
FLUSH_AT_CLOSE_SECONDS = 1.0


class OutputSink:
    """Writes to `fd` without blocking the caller; thread-safe."""

    def __init__(self, fd: int, name: str, limit: int = BUFFER_LIMIT) -> None:
        self._fd = fd
        self._name = name
        self._limit = limit
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._failed = False
        self.dropped = 0
        # Used with the lock held only: a poll object must not be polled twice at once.
        self._poll = self._new_poll()

    def _new_poll(self) -> select.poll:
        poll = select.poll()
        poll.register(self._fd, select.POLLOUT)
        return poll

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed or self._failed:
                return
            if not self._pending:
                data = self._write_now(data)
                if not data:
                    return
            self._queue(data)

    def _write_now(self, data: bytes) -> bytes:
        """Writes what the file takes without blocking; returns the rest (lock held)."""
        while data:
            if not self._poll.poll(0):
                return data
            try:
                done = os.write(self._fd, data[:ATOMIC_WRITE])
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
            self.dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
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

    def _flush_loop(self) -> None:
        poll = self._new_poll()
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
            # Wait for room without the lock, so writers only ever append.
            with contextlib.suppress(InterruptedError):
                poll.poll(100)
            with self._lock:
                if self._pending and not self._failed:
                    rest = self._write_now(bytes(self._pending))
                    del self._pending[:len(self._pending) - len(rest)]

    def close(self) -> None:
        """Gives buffered output a short while to go out, then stops; idempotent."""
        deadline = time.monotonic() + FLUSH_AT_CLOSE_SECONDS
        with self._lock:
            while self._pending and not self._failed and time.monotonic() < deadline:
                rest = self._write_now(bytes(self._pending))
                del self._pending[:len(self._pending) - len(rest)]
                if self._pending:
                    self._wake.wait(0.01)  # the flusher may get there first
            self._closed = True
            self._wake.notify()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=1)
