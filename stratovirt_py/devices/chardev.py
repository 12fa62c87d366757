"""Character backends (-serial, -chardev): none, stdio, a pty, a file, or a unix socket.

Each backend takes guest output through `write` and, where it has input,
feeds it to the UART from a thread of its own.  Output never blocks the
vCPU: a terminal, pipe or file that stops taking it loses output beyond a
bounded buffer (output_sink.py), a socket client that stops reading loses it
at once, rather than stalling the guest.  While no client is connected to a
socket backend, its output waits in a bounded buffer for the next client.

A backend may also let a direct writer (the vCPU loop, in C) write its output
without calling `write`, whenever that keeps the output in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import termios
import threading
import tty
from collections.abc import Callable

from stratovirt_py.config import ChardevConfig, SerialKind
from stratovirt_py.devices.output_sink import DirectWriter, OutputSink
from stratovirt_py.errors import ConfigError
from stratovirt_py.unix_listener import create_unix_listener, remove_socket_file

log = logging.getLogger(__name__)

InputSink = Callable[[bytes], None]
ESCAPE_CHAR = 0x01  # Ctrl-A, as in QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A


class Chardev:
    """Discards output and has no input."""

    label = ""  # its id (-chardev id=, or serial0 for -serial's own), for query-chardev

    def filename(self) -> str:
        """What query-chardev reports as its `filename` (QEMU's forms)."""
        return "null"

    def describe(self, frontend_open: bool) -> dict[str, object]:
        return {"label": self.label, "filename": self.filename(), "frontend-open": frontend_open}

    def start(self, sink: InputSink, request_quit: Callable[[], None]) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def set_direct_writer(self, writer: DirectWriter) -> None:
        """Lets `writer` write output itself while that keeps it in order."""
        writer.attach(-1, False)  # nothing to write to: it discards, as write() does
        writer.set_ready(True)

    def close(self) -> None:
        pass


class _Reader(threading.Thread):
    """Reads a file descriptor until EOF or stop, without blocking shutdown."""

    def __init__(self, name: str, fd: int, on_data: Callable[[bytes], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._fd = fd
        self._on_data = on_data
        self.stop_event = threading.Event()
        self._wake_read, self._wake_write = os.pipe()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    ready, _, _ = select.select([self._fd, self._wake_read], [], [])
                except (OSError, ValueError):
                    return
                if self._wake_read in ready:
                    return
                try:
                    data = os.read(self._fd, 4096)
                except OSError:
                    return
                if not data:
                    return
                self._on_data(data)
        finally:
            os.close(self._wake_read)

    def stop(self) -> None:
        self.stop_event.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=1)
        with contextlib.suppress(OSError):
            os.close(self._wake_write)


class StdioChardev(Chardev):
    """The monitor's own terminal: raw mode while running, restored at exit."""

    def __init__(self) -> None:
        self._saved_tty: list | None = None
        self._reader: _Reader | None = None
        self._escape_pending = False
        self._output = OutputSink(sys.stdout.fileno() if sys.stdout is not None else 1,
                                  "serial stdio")

    def start(self, sink: InputSink, request_quit: Callable[[], None]) -> None:
        stdin = sys.stdin.fileno() if sys.stdin is not None else -1
        if stdin < 0:
            return
        if os.isatty(stdin):
            self._saved_tty = termios.tcgetattr(stdin)
            # Raw input so the guest sees every key (Ctrl-C included); output
            # post-processing stays on so the guest's \r\n looks right.
            tty.setraw(stdin, termios.TCSANOW)
            attrs = termios.tcgetattr(stdin)
            attrs[1] |= termios.OPOST | termios.ONLCR
            termios.tcsetattr(stdin, termios.TCSANOW, attrs)

        def on_input(data: bytes) -> None:
            sink(self._filter_escape(data, request_quit))

        self._reader = _Reader("serial-stdin", stdin, on_input)
        self._reader.start()

    def filename(self) -> str:
        return "stdio"

    def _filter_escape(self, data: bytes, request_quit: Callable[[], None]) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape_pending:
                self._escape_pending = False
                if byte in (ord("x"), ord("X")):
                    request_quit()
                    continue
                if byte != ESCAPE_CHAR:
                    out.append(ESCAPE_CHAR)
                out.append(byte)
            elif byte == ESCAPE_CHAR and self._saved_tty is not None:
                self._escape_pending = True
            else:
                out.append(byte)
        return bytes(out)

    def write(self, data: bytes) -> None:
        self._output.write(data)

    def set_direct_writer(self, writer: DirectWriter) -> None:
        self._output.set_direct_writer(writer)

    def close(self) -> None:
        self._output.close()
        if self._reader is not None:
            self._reader.stop()
        if self._saved_tty is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None


class FileChardev(Chardev):
    """Appends guest output to a file."""

    def __init__(self, path: str) -> None:
        try:
            # Not blocking: a FIFO without a reader is refused at once (ENXIO) rather
            # than holding up start-up, and output never waits for the file.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                               | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open serial file '{path}': {exc.strerror}") from None
        self._path = path
        self._output = OutputSink(self._fd, "serial file")

    def filename(self) -> str:
        return f"file:{self._path}"

    def write(self, data: bytes) -> None:
        self._output.write(data)

    def set_direct_writer(self, writer: DirectWriter) -> None:
        self._output.set_direct_writer(writer)

    def close(self) -> None:
        if self._fd >= 0:
            self._output.close()
            os.close(self._fd)
            self._fd = -1


SOCKET_BACKLOG_LIMIT = 64 << 10


class SocketChardev(Chardev):
    """A unix socket server; one client at a time gets the console.

    What the guest writes while no client is connected waits (up to 64 KiB; older
    bytes are dropped first) and goes to the next client when it connects.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._listener = create_unix_listener(path, "serial socket")
        self._client: socket.socket | None = None
        self._backlog = bytearray()  # output while no client is connected
        self.dropped = 0
        self._lock = threading.Lock()
        self._direct: DirectWriter | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def filename(self) -> str:
        return f"unix:{self._path},server=on"

    def start(self, sink: InputSink, request_quit: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._serve, args=(sink,), name="serial-socket",
                                        daemon=True)
        self._thread.start()

    def _serve(self, sink: InputSink) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setblocking(True)
            with self._lock:
                self._client = client
                self._send_backlog(client)
                self._publish_client()
            try:
                while True:
                    data = client.recv(4096)
                    if not data:
                        break
                    sink(data)
            except OSError:
                pass
            finally:
                with self._lock:
                    self._client = None
                    self._publish_client()
                client.close()

    def _send_backlog(self, client: socket.socket) -> None:
        """Hands what waited to the new client (lock held; a unix socket takes 64 KiB)."""
        while self._backlog:
            try:
                sent = client.send(self._backlog, socket.MSG_DONTWAIT)
            except OSError:
                break  # a client that takes nothing now gets only what comes next
            del self._backlog[:sent]
        self.dropped += len(self._backlog)
        self._backlog.clear()

    def has_client(self) -> bool:
        with self._lock:
            return self._client is not None

    def set_direct_writer(self, writer: DirectWriter) -> None:
        with self._lock:
            self._direct = writer
            self._publish_client()

    def _publish_client(self) -> None:
        """Points the direct writer at the current client (lock held); with none, output
        takes the Python path, which keeps it for the next client."""
        if self._direct is None:
            return
        # Returns once no direct write to the previous client is in flight, so
        # that client's fd may be closed (and its number reused) afterwards.
        self._direct.set_ready(False)
        if self._client is not None:
            self._direct.attach(self._client.fileno(), True)
            self._direct.set_ready(True)
        else:
            self._direct.attach(-1, False)  # stays not ready: nothing to write to

    def write(self, data: bytes) -> None:
        with self._lock:
            client = self._client
            if client is None:
                self._backlog += data
                excess = len(self._backlog) - SOCKET_BACKLOG_LIMIT
                if excess > 0:
                    del self._backlog[:excess]
                    self.dropped += excess
                return
            try:
                # A client that does not read must not stall the vCPU.
                client.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(OSError):
                    self._client.shutdown(socket.SHUT_RDWR)
        remove_socket_file(self._path)


class PtyChardev(Chardev):
    """A pseudo-terminal; its path (/dev/pts/N) is logged and reported by query-chardev.

    The monitor keeps the terminal's other side open too, so that a program that
    opens it (screen, minicom) and quits does not hang up the guest's console.
    """

    def __init__(self, label: str) -> None:
        self._master, self._slave = os.openpty()
        os.set_inheritable(self._master, False)
        os.set_inheritable(self._slave, False)
        tty.setraw(self._slave, termios.TCSANOW)  # bytes pass unchanged, both ways
        os.set_blocking(self._master, False)  # ours alone: OutputSink writes it as it is
        self.path = os.ttyname(self._slave)
        self._output = OutputSink(self._master, f"chardev {label} pty")
        self._reader: _Reader | None = None
        log.info("char device redirected to %s (label %s)", self.path, label)

    def filename(self) -> str:
        return f"pty:{self.path}"

    def start(self, sink: InputSink, request_quit: Callable[[], None]) -> None:
        self._reader = _Reader("chardev-pty", self._master, sink)
        self._reader.start()

    def write(self, data: bytes) -> None:
        self._output.write(data)

    def set_direct_writer(self, writer: DirectWriter) -> None:
        self._output.set_direct_writer(writer)

    def close(self) -> None:
        if self._master < 0:
            return
        self._output.close()
        if self._reader is not None:
            self._reader.stop()
        os.close(self._master)
        os.close(self._slave)
        self._master = self._slave = -1


def create_chardev(config: ChardevConfig) -> Chardev:
    chardev: Chardev
    if config.kind is SerialKind.STDIO:
        chardev = StdioChardev()
    elif config.kind is SerialKind.FILE:
        assert config.path is not None
        chardev = FileChardev(config.path)
    elif config.kind is SerialKind.SOCKET:
        assert config.path is not None
        chardev = SocketChardev(config.path)
    elif config.kind is SerialKind.PTY:
        chardev = PtyChardev(config.id)
    else:
        chardev = Chardev()
    chardev.label = config.id
    return chardev
