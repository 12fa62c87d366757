"""QMP unix-socket server: connections, per-connection buffers, and event broadcast.

Everything runs on the monitor's event loop (event_loop.py) with raw non-blocking sockets
(recvmsg, for SCM_RIGHTS file descriptors).  Several clients may be connected
at once; each gets exactly one reply per request, in request order, and every
client that has sent at least one command receives the events.  A client that
vanishes, floods, or stops reading loses its connection and nothing else.

Events a command causes reach its own client in the same write as its reply:
clients such as StratoVirt's hydropper read once per command and take the
first non-event message as the reply.  While a command runs, its connection's
events are held back for that write, in the spec's order: STOP, RESUME and
DEVICE_DELETED before the return, SHUTDOWN, RESET and POWERDOWN (which QEMU
sends once the request has been carried out) after it.  Other connections get
events at once.

A synchronous command is a plain call on the loop.  An async one runs as a
task; its connection stops reading until the reply is written, and keeps the
requests it has already read queued, so replies stay in order.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from stratovirt_py.event_loop import EventLoop, Task, wait_for_all
from stratovirt_py.qmp.protocol import (
    JsonStreamSplitter,
    ParseFailure,
    QmpError,
    decode_message,
    encode,
    error_message,
    event_message,
)
from stratovirt_py.qmp.registry import QEMU_VERSION, ManagedMachine, Reply, dispatch
from stratovirt_py.unix_listener import create_unix_listener, remove_socket_file

log = logging.getLogger(__name__)

GREETING = {"QMP": {"version": QEMU_VERSION, "capabilities": []}}
READ_CHUNK = 65536
MAX_FDS_PER_MESSAGE = 16
MAX_QUEUED_FDS = 64
# Replies to one read are written together; past this much, write as we go.
WRITE_BATCH = 65536
# A client that lets this much output pile up is not reading: drop it.
MAX_PENDING_OUTPUT = 4 << 20
FLUSH_AT_EXIT_SECONDS = 2.0
EVENTS_AFTER_REPLY = frozenset({"SHUTDOWN", "RESET", "POWERDOWN"})


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class Connection:
    """One QMP client; the CommandContext of the commands it sends."""

    def __init__(self, server: QmpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.splitter = JsonStreamSplitter()
        self.output = bytearray()
        self.named_fds: dict[str, int] = {}
        self.events_enabled = False
        self.closed = False
        self._writer_registered = False
        self._reading = False
        # Values are numbered in stream order (the splitter returns every one).
        self._values_received = 0
        self._values_handled = 0
        # SCM_RIGHTS fds, by the number of the value they came with.
        self._fds_by_value: dict[int, list[int]] = {}
        self._command_fds: list[int] = []  # those of the command running now
        # Set while one of this connection's commands runs: its events wait for its reply.
        self._command_running = False
        self._held_events = bytearray()  # written before the reply
        self._held_after_reply = bytearray()
        self._async_reply: Task[Reply] | None = None
        self._backlog: deque[bytes | ParseFailure] = deque()

    # CommandContext for getfd/closefd: only the fds that came with this command.
    def take_received_fd(self) -> int | None:
        return self._command_fds.pop(0) if self._command_fds else None

    def start_reading(self) -> None:
        if not self._reading and not self.closed and not self.server.closing:
            self.server.loop.add_reader(self.sock.fileno(), self.on_readable)
            self._reading = True

    def stop_reading(self) -> None:
        if self._reading:
            with contextlib.suppress(ValueError, OSError):
                self.server.loop.remove_reader(self.sock.fileno())
            self._reading = False

    # Output.

    def send(self, message: dict[str, Any]) -> None:
        self._write(encode(message))
        self.flush()

    def deliver_event(self, name: str, encoded: bytes) -> None:
        if self._command_running:
            held = self._held_after_reply if name in EVENTS_AFTER_REPLY else self._held_events
            held += encoded
            if len(self._held_events) + len(self._held_after_reply) > MAX_PENDING_OUTPUT:
                log.warning("QMP client's events pile up behind a running command; "
                            "disconnecting it")
                self.close()
        else:
            self._write(encoded)
            self.flush()

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        self.output += data
        if len(self.output) >= WRITE_BATCH:
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
        if self.closed:
            return
        if len(self.output) > MAX_PENDING_OUTPUT:
            log.warning("QMP client is not reading its replies; disconnecting it")
            self.close()
            return
        loop = self.server.loop
        if self.output and not self._writer_registered:
            loop.add_writer(self.sock.fileno(), self.flush)
            self._writer_registered = True
        elif not self.output and self._writer_registered:
            loop.remove_writer(self.sock.fileno())
            self._writer_registered = False

    # Input.

    def on_readable(self) -> None:
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                READ_CHUNK, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        fds = self._received_fds(ancillary)
        if not data:
            _close_fds(fds)
            if self.server.machine.exit_pending:
                # The client sent quit and closed its end: keep the socket so
                # the SHUTDOWN event still reaches it before the monitor exits.
                self.stop_reading()
            else:
                self.close()
            return
        splitter = self.splitter
        continued = splitter.current_value
        started_before = splitter.values_started
        values = splitter.feed(data)
        first_new = self._values_received
        self._values_received += len(values)
        if fds:
            self._assign_fds(fds, self._fd_owner(data, continued, started_before), first_new)
        self._handle_values(values)
        self.flush()

    def _fd_owner(self, data: bytes, continued: int | None, started_before: int) -> int:
        """The number of the value that fds received with the last read belong to.

        The kernel ends a read with the message that carried fds, so the fds
        go with the last value that started in it (libvirt sends the fd with
        the command); else with the value the read continued; else with the
        next value to start (qemu.qmp sends the fd with a lone space, then
        the command).  A read that ends in a lone space after a complete value
        is qemu.qmp's space merged behind an earlier command: the next value's.
        """
        started_now = self.splitter.values_started
        lone_space = data.endswith(b" ") and data[-2:-1] not in b" \t\r\n"
        if lone_space and self.splitter.current_value is None:
            return started_now
        if started_now > started_before:
            return started_now - 1
        if continued is not None:
            return continued
        return started_now

    def _assign_fds(self, fds: list[int], owner: int, first_new: int) -> None:
        if owner < first_new:
            _close_fds(fds)  # the rest of a value that has been answered already
            return
        held = sum(len(v) for v in self._fds_by_value.values())
        keep = fds[:max(0, MAX_QUEUED_FDS - held)]
        _close_fds(fds[len(keep):])
        if keep:
            self._fds_by_value.setdefault(owner, []).extend(keep)

    def _received_fds(self, ancillary: list[tuple[int, int, bytes]]) -> list[int]:
        received: list[int] = []
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.set_inheritable(fd, False)
                received.append(fd)
        return received

    def _handle_values(self, values: list[bytes | ParseFailure]) -> None:
        for index, value in enumerate(values):
            if self.closed:
                return
            self._handle(value)
            if self._async_reply is not None:
                self._backlog.extend(values[index + 1:])
                self.stop_reading()
                return

    def _handle(self, value: bytes | ParseFailure) -> None:
        """Answers one value from the stream, exactly once."""
        number = self._values_handled
        self._values_handled += 1
        fds = self._fds_by_value.pop(number, []) if self._fds_by_value else []
        if isinstance(value, ParseFailure):
            _close_fds(fds)
            self._write(encode(error_message(QmpError(value.desc))))
            return
        try:
            request = decode_message(value)
        except QmpError as exc:
            _close_fds(fds)
            self._write(encode(error_message(exc)))
            return
        # Events start flowing once the client has spoken (spec: commands may
        # come straight after the greeting, so qmp_capabilities is optional),
        # in time for the STOP that its own first command may cause.
        self.events_enabled = True
        self._command_fds = fds
        self._command_running = True
        reply = dispatch(self.server.machine, self, request)
        if isinstance(reply, dict):
            self._finish_command(reply)
        else:
            self._start_async(reply)

    def _start_async(self, reply: Coroutine[Any, Any, Reply]) -> None:
        task = self.server.loop.create_task(reply)
        self._async_reply = task
        self.server.tasks.add(task)
        task.add_done_callback(self._on_async_reply)

    def _on_async_reply(self, task: Task[Reply]) -> None:
        self.server.tasks.discard(task)
        self._async_reply = None
        if task.cancelled():  # the monitor is shutting down
            self._command_running = False
            _close_fds(self._command_fds)
            return
        self._finish_command(task.result())
        while self._backlog and self._async_reply is None and not self.closed:
            self._handle(self._backlog.popleft())
        if self._async_reply is None:
            self.start_reading()
        self.flush()

    def _finish_command(self, reply: Reply) -> None:
        """Writes the events held during the command and its reply, in one piece."""
        _close_fds(self._command_fds)  # those the command did not take
        self._command_running = False
        if self.closed:
            # The client went away meanwhile; the command completed, its reply is dropped.
            _close_fds(list(self.named_fds.values()))
            self.named_fds.clear()
            return
        try:
            encoded = encode(reply)
        except (ValueError, TypeError) as exc:
            log.error("QMP reply could not be encoded: %s", exc)
            encoded = encode(error_message(QmpError(f"the reply could not be encoded: {exc}"),
                                           reply.get("id"), "id" in reply))
        if self._held_events or self._held_after_reply:
            encoded = bytes(self._held_events + encoded + self._held_after_reply)
            self._held_events.clear()
            self._held_after_reply.clear()
        self._write(encoded)

    def close_at_exit(self, deadline: float) -> None:
        """Writes what is pending, held events included, for at most until `deadline`."""
        if not self.closed:
            self.output += self._held_events + self._held_after_reply
            if self.output:
                self.sock.setblocking(True)
                self.sock.settimeout(max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(OSError):
                    self.sock.sendall(self.output)
                self.output.clear()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        self.stop_reading()
        if self._writer_registered:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for fds in self._fds_by_value.values():
            _close_fds(fds)
        self._fds_by_value.clear()
        _close_fds(list(self.named_fds.values()))
        self.named_fds.clear()
        self._backlog.clear()
        self._held_events.clear()
        self._held_after_reply.clear()
        self.server.connections.discard(self)


class QmpServer:
    """Listens on every -qmp / -api-channel path and serves all of them."""

    def __init__(self, machine: ManagedMachine, loop: EventLoop,
                 paths: tuple[str, ...]) -> None:
        self.machine = machine
        self.loop = loop
        self.paths: list[str] = []
        self.listeners: list[socket.socket] = []
        self.connections: set[Connection] = set()
        self.tasks: set[Task[Reply]] = set()  # async commands under way
        self.closing = False
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
        connection.start_reading()

    def broadcast_event(self, name: str, data: dict[str, Any]) -> None:
        try:
            encoded = encode(event_message(name, data))
        except (ValueError, TypeError) as exc:
            log.error("QMP event %s could not be encoded (%s); not sent", name, exc)
            return
        for connection in list(self.connections):
            if connection.events_enabled:
                connection.deliver_event(name, encoded)

    def stop_serving(self) -> None:
        """No command may start any more, and those still running are ended; idempotent.

        Clients stay connected, so that what is still to be sent (SHUTDOWN) reaches them.
        """
        if self.closing:
            return
        self.closing = True
        for listener in self.listeners:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(listener.fileno())
        for connection in list(self.connections):
            connection.stop_reading()
        self._end_async_commands()

    def close(self) -> None:
        """Flushes pending output (briefly), closes clients and removes the sockets."""
        self.stop_serving()
        deadline = time.monotonic() + FLUSH_AT_EXIT_SECONDS
        for connection in list(self.connections):
            connection.close_at_exit(deadline)
        for listener in self.listeners:
            listener.close()
        for path in self.paths:
            remove_socket_file(path)
        self.listeners.clear()
        self.paths.clear()

    def _end_async_commands(self) -> None:
        """Cancels commands still waiting, so that none can hold up the monitor's exit."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks and not self.loop.is_running() and not self.loop.is_closed():
            # Let them unwind (their finally blocks run) for a bounded time.
            wait_for_all(self.loop, tasks, FLUSH_AT_EXIT_SECONDS)
