"""Console backends tell the vCPU loop's direct writer where output may go, and when."""

from __future__ import annotations

import socket
import time

from stratovirt_py.devices.chardev import Chardev, SocketChardev
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
        assert (writer.fd, writer.ready) == (-1, [False, True])  # no client: discarded
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
        wait_until(lambda: writer.fd == -1 and writer.ready[-1])
        assert writer.ready == [False, True, False, True, False, True]
    finally:
        chardev.close()
