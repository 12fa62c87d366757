"""Console backends tell the vCPU loop's direct writer where output may go, and when."""

from __future__ import annotations

import os
import socket
import time

from stratovirt_py.config import ChardevConfig, SerialKind
from stratovirt_py.devices.chardev import (
    SOCKET_BACKLOG_LIMIT,
    Chardev,
    PtyChardev,
    SocketChardev,
    create_chardev,
)
from tests.recording_writer import RecordingWriter


def test_no_backend_lets_the_direct_writer_discard():
    writer = RecordingWriter()
    Chardev().set_direct_writer(writer)
    assert (writer.fd, writer.ready) == (-1, [True])


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_socket_console_follows_its_client_and_never_leaves_a_closed_fd_ready(tmp_path):
    path = str(tmp_path / "console.sock")
    chardev = SocketChardev(path)
    writer = RecordingWriter()
    chardev.set_direct_writer(writer)
    chardev.start(lambda data: None, lambda: None)
    try:
        # No client: the Python path takes the output (and keeps it for the next one).
        assert writer.ready == [False]
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        wait_until(lambda: writer.fd >= 0 and writer.ready[-1])
        assert writer.is_socket
        sent = socket.socket(fileno=writer.fd)
        try:
            sent.send(b"direct", socket.MSG_DONTWAIT)
        finally:
            sent.detach()  # the chardev's fd, not ours to close
        assert client.recv(100) == b"direct"
        client.close()  # RecordingWriter checks the fd is still open when told to stop
        wait_until(lambda: not writer.ready[-1])
        assert writer.ready == [False, False, True, False]
    finally:
        chardev.close()


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    sock.settimeout(5)
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, data
        data += chunk
    return data


def test_output_without_a_client_waits_for_the_next_one_within_a_bound(tmp_path):
    path = str(tmp_path / "console.sock")
    chardev = SocketChardev(path)
    chardev.start(lambda data: None, lambda: None)
    try:
        chardev.write(b"early ")
        chardev.write(b"bytes\n")
        first = socket.socket(socket.AF_UNIX)
        first.connect(path)
        assert read_exactly(first, 12) == b"early bytes\n"
        chardev.write(b"live")
        assert read_exactly(first, 4) == b"live"
        first.close()
        wait_until(lambda: not chardev.has_client())
        # More than the bound while nobody listens: the newest 64 KiB wait, the rest is counted.
        blob = bytes(range(256)) * ((SOCKET_BACKLOG_LIMIT + 1000) // 256 + 1)
        chardev.write(blob)
        assert chardev.dropped == len(blob) - SOCKET_BACKLOG_LIMIT
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        assert read_exactly(second, SOCKET_BACKLOG_LIMIT) == blob[-SOCKET_BACKLOG_LIMIT:]
        second.close()
    finally:
        chardev.close()


def test_a_pty_backend_carries_bytes_both_ways_and_reports_its_path():
    chardev = create_chardev(ChardevConfig("con1", SerialKind.PTY))
    received: list[bytes] = []
    chardev.start(received.append, lambda: None)
    try:
        assert isinstance(chardev, PtyChardev)
        assert chardev.describe(True) == {"label": "con1", "filename": f"pty:{chardev.path}",
                                          "frontend-open": True}
        chardev.write(b"from the guest")  # before anyone opened it: the terminal keeps it
        fd = os.open(chardev.path, os.O_RDWR | os.O_NOCTTY)
        try:
            data = b""
            while len(data) < 14:
                data += os.read(fd, 100)
            assert data == b"from the guest"  # raw: no \n -> \r\n or echo
            os.write(fd, b"typed\n")
            wait_until(lambda: b"".join(received) == b"typed\n")
        finally:
            os.close(fd)
        chardev.write(b"nobody reads this")  # a closed reader hangs nothing up
    finally:
        chardev.close()
