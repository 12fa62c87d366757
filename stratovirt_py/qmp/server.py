"""QMP unix-socket server: connections, per-connection buffers, and event broadcast.

Everything runs on the monitor's asyncio loop with raw non-blocking sockets
(recvmsg, for SCM_RIGHTS file descriptors).  Several clients may be connected
at once; each gets its own replies in request order, and every client that has
sent at least one command receives the events.  A client that vanishes,
floods, or stops reading loses its connection and nothing else.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from stratovirt_py.devices.chardev import create_unix_listener, remove_socket_file
from stratovirt_py.qmp.protocol import (
    JsonStreamSplitter,
    ParseFailure,
    QmpError,
    decode_message,
    encode,
    error_message,
    event_message,
)
from stratovirt_py.qmp.registry import QEMU_VERSION, ManagedMachine, dispatch

log = logging.getLogger(__name__)

GREETING = {"QMP": {"version": QEMU_VERSION, "capabilities": []}}
READ_CHUNK = 65536
MAX_FDS_PER_MESSAGE = 16
MAX_QUEUED_FDS = 64
# A client that lets this much output pile up is not reading: drop it.
MAX_PENDING_OUTPUT = 4 << 20
FLUSH_AT_EXIT_SECONDS = 2.0


class Connection:
    """One QMP client."""

    def __init__(self, server: QmpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.splitter = JsonStreamSplitter()
        self.output = bytearray()
        self.received_fds: list[int] = []
        self.named_fds: dict[str, int] = {}
        self.events_enabled = False
        self.closed = False
        self._writer_registered = False

    # CommandContext for getfd/closefd.
    def take_received_fd(self) -> int | None:
        return self.received_fds.pop(0) if self.received_fds else None

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        self.output += encode(message)
        if len(self.output) > MAX_PENDING_OUTPUT:
            log.warning("QMP client is not reading its replies; disconnecting it")
            self.close()
            return
        self.flush()

    def flush(self) -> None:
        while self.output and not self.closed:
            try:
                sent = self.sock.send(self.output)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.output[:sent]
        loop = self.server.loop
        if self.output and not self._writer_registered and not self.closed:
            loop.add_writer(self.sock.fileno(), self.flush)
            self._writer_registered = True
        elif not self.output and self._writer_registered:
            loop.remove_writer(self.sock.fileno())
            self._writer_registered = False

    def on_readable(self) -> None:
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                READ_CHUNK, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self._collect_fds(ancillary)
        if not data:
            if self.server.machine.exit_pending:
                # The client sent quit and closed its end: keep the socket so
                # the SHUTDOWN event still reaches it before the monitor exits.
                self.server.loop.remove_reader(self.sock.fileno())
            else:
                self.close()
            return
        for value in self.splitter.feed(data):
            if self.closed:
                return
            self.handle(value)

    def _collect_fds(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                if len(self.received_fds) < MAX_QUEUED_FDS:
                    os.set_inheritable(fd, False)
                    self.received_fds.append(fd)
                else:
                    os.close(fd)

    def handle(self, value: bytes | ParseFailure) -> None:
        if isinstance(value, ParseFailure):
            self.send(error_message(QmpError(value.desc)))
            return
        try:
            request = decode_message(value)
        except QmpError as exc:
            self.send(error_message(exc))
            return
        # Events start flowing once the client has spoken (spec: commands may
        # come straight after the greeting, so qmp_capabilities is optional),
        # in time for the STOP that its own first command may cause.
        self.events_enabled = True
        self.send(dispatch(self.server.machine, self, request))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.sock.fileno())
        if self._writer_registered:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for fd in [*self.received_fds, *self.named_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.received_fds.clear()
        self.named_fds.clear()
        self.server.connections.discard(self)


class QmpServer:
    """Listens on every -qmp / -api-channel path and serves all of them."""

    def __init__(self, machine: ManagedMachine, loop: asyncio.AbstractEventLoop,
                 paths: tuple[str, ...]) -> None:
        self.machine = machine
        self.loop = loop
        self.paths: list[str] = []
        self.listeners: list[socket.socket] = []
        self.connections: set[Connection] = set()
        try:
            for path in paths:
                self.listeners.append(create_unix_listener(path, "QMP socket"))
                self.paths.append(path)
        except Exception:
            self.close()
            raise

    def start(self) -> None:
        for listener in self.listeners:
            listener.setblocking(False)
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("QMP accept failed: %s", exc)
            return
        sock.setblocking(False)
        connection = Connection(self, sock)
        self.connections.add(connection)
        connection.send(GREETING)
        if not connection.closed:
            self.loop.add_reader(sock.fileno(), connection.on_readable)

    def broadcast_event(self, name: str, data: dict[str, Any]) -> None:
        message = event_message(name, data)
        for connection in list(self.connections):
            if connection.events_enabled:
                connection.send(message)

    def close(self) -> None:
        """Flushes pending output (briefly), closes clients and removes the socket files."""
        deadline = time.monotonic() + FLUSH_AT_EXIT_SECONDS
        for connection in list(self.connections):
            if connection.output:
                connection.sock.setblocking(True)
                connection.sock.settimeout(max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(OSError):
                    connection.sock.sendall(connection.output)
                connection.output.clear()
            connection.close()
        for listener in self.listeners:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(listener.fileno())
            listener.close()
        for path in self.paths:
            remove_socket_file(path)
        self.listeners.clear()
        self.paths.clear()
