"""Run state on real KVM: stop/cont stay truthful when the console's reader stops reading."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import socket
import subprocess
import termios
import time

import pytest

from tests.helpers import MONITOR, monitor_env

pytestmark = pytest.mark.kvm

F_SETPIPE_SZ = 1031
PIPE_SIZE = 4096
# Time for the guest's ticks to amount to several times the pipe's size.
CONSOLE_BACKLOG_SECONDS = 5


def bytes_in_pipe(read_end: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(read_end, termios.FIONREAD, count)
    return count[0]


class Qmp:
    """A line-at-a-time QMP client that keeps the events it reads."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buffer = b""
        self.events: list[dict] = []
        assert "QMP" in self.read()

    def read(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "QMP connection closed"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def execute(self, name: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        while "event" in (message := self.read()):
            self.events.append(message)
        return message


def wait_for_socket(process: subprocess.Popen, path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, "the monitor exited during start-up"
        assert time.monotonic() < deadline, "QMP socket never appeared"
        time.sleep(0.02)


def test_stop_and_cont_while_nobody_reads_the_console(svtest_guest, tmp_path):
    """A vCPU writing to a full stdout pipe used to block there, so `stop` timed out,
    left every vCPU parked and query-status still said running."""
    qmp_path = str(tmp_path / "qmp.sock")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    process = subprocess.Popen(
        [*MONITOR, "-kernel", str(svtest_guest), "-serial", "stdio",
         "-qmp", f"unix:{qmp_path},server,nowait",
         "-append", "svtest.action=spin svtest.tick=100"],
        stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, env=monitor_env())
    try:
        wait_for_socket(process, qmp_path)
        # The guest prints a line per tick; nobody reads the pipe.  Blocking
        # writes would fill it to the byte within a second or two; the monitor
        # stops putting output into it once it is not writable.
        deadline = time.monotonic() + 60
        while bytes_in_pipe(read_end) == 0:
            assert time.monotonic() < deadline, "the guest printed nothing"
            time.sleep(0.05)
        deadline = time.monotonic() + CONSOLE_BACKLOG_SECONDS
        while bytes_in_pipe(read_end) < PIPE_SIZE and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        qmp = Qmp(qmp_path)
        assert qmp.execute("stop") == {"return": {}}
        assert [e["event"] for e in qmp.events] == ["STOP"]
        assert qmp.execute("query-status") == {
            "return": {"running": False, "singlestep": False, "status": "paused"}}
        assert qmp.execute("cont") == {"return": {}}
        assert qmp.execute("query-status")["return"]["status"] == "running"
        # The reader comes back: the guest's output flows again.
        os.set_blocking(read_end, False)
        received = bytearray()
        deadline = time.monotonic() + 30
        while received.count(b"tick") < 20:
            assert time.monotonic() < deadline, received[-200:]
            select.select([read_end], [], [], 1)
            with contextlib.suppress(BlockingIOError):
                received += os.read(read_end, 65536)
        assert qmp.execute("quit") == {"return": {}}
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(read_end)
        os.close(write_end)
