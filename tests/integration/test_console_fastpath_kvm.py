"""The console's bytes on real KVM: written by the vCPU loop in C, with no exit to Python,
byte for byte what the Python path writes, and in order when the reader stalls."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import socket
import time
from collections.abc import Iterator

import pytest

from stratovirt_py.builder import build_vm
from stratovirt_py.config import MachineConfig, SerialConfig, SerialKind
from stratovirt_py.devices.console_fastpath import ConsoleFastPath
from stratovirt_py.event_loop import EventLoop
from stratovirt_py.machine import MicroVM

pytestmark = pytest.mark.kvm

F_SETPIPE_SZ = 1031
# Exits a freestanding boot still sends to Python besides the console (the reset).
OTHER_EXITS = 10


@contextlib.contextmanager
def running(guest, cmdline: str, serial: SerialConfig) -> Iterator[MicroVM]:
    loop = EventLoop()
    machine = MicroVM(MachineConfig(kernel=str(guest), cmdline=cmdline,
                                    serial=serial).validate(), loop)
    try:
        build_vm(machine)
        machine.start()
        yield machine
        if cmdline.startswith("svtest.action=reboot"):
            assert loop.run_until(machine.exited.done, 60)
            request = machine.exited.result()
            assert request.reason == "guest-reset", request.message
    finally:
        machine.destroy()
        loop.close()


def boot_log(guest, path) -> tuple[bytes, dict[str, int]]:
    with running(guest, "svtest.action=reboot", SerialConfig(SerialKind.FILE, str(path))) \
            as machine:
        assert machine.hardware is not None
        hardware = machine.hardware
    return path.read_bytes(), hardware.exit_counts()


def test_the_boot_log_goes_out_through_c_byte_for_byte(svtest_guest, tmp_path, monkeypatch):
    fast, fast_counts = boot_log(svtest_guest, tmp_path / "fast.log")
    assert fast.startswith(b"svtest: hello\r\n") and fast.endswith(b"svtest: done\r\n")
    assert fast_counts["console_bytes_in_c"] == len(fast)
    assert fast_counts["to_python"] < OTHER_EXITS  # no exit per byte
    # The output never says C may write: every byte takes the Python path, as before.
    monkeypatch.setattr(ConsoleFastPath, "set_ready", lambda self, ready: None)
    slow, slow_counts = boot_log(svtest_guest, tmp_path / "slow.log")
    assert slow_counts["console_bytes_in_c"] == 0
    assert slow_counts["to_python"] >= len(slow)
    assert fast == slow


def ticks(data: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"svtest: tick (\d+)\r\n", data)]


def read_available(fd: int, timeout: float) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([fd], [], [], 0.05)
        with contextlib.suppress(BlockingIOError):
            data += os.read(fd, 65536)
    return bytes(data)


def wait_for(condition, message: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_a_stalled_reader_neither_stalls_the_guest_nor_reorders_its_output(svtest_guest,
                                                                             tmp_path):
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
    try:
        with running(svtest_guest, "svtest.action=spin svtest.tick=2000",
                     SerialConfig(SerialKind.FILE, str(fifo))) as machine:
            assert machine.hardware is not None
            counts = machine.hardware.exit_counts
            received = read_available(reader, 1.0)
            assert len(ticks(received)) > 5, received[-200:]
            before_stall = counts()
            assert before_stall["console_bytes_in_c"] > 0
            # Nobody reads: the pipe fills, then the bytes wait in the monitor's buffer,
            # each through Python, while the guest keeps running.
            wait_for(lambda: counts()["to_python"] > before_stall["to_python"] + 500,
                     "the guest stalled, or its output never reached Python")
            stalled = counts()
            # The reader is back: the backlog comes out first, then C writes again.
            deadline = time.monotonic() + 30
            while counts()["console_bytes_in_c"] < stalled["console_bytes_in_c"] + 500:
                assert time.monotonic() < deadline, "C never wrote again"
                received += read_available(reader, 0.2)
            received += read_available(reader, 0.5)
        numbers = ticks(received)
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert len(numbers) > 50
    finally:
        os.close(reader)


def test_a_socket_console_client_gets_the_guests_bytes_from_c(svtest_guest, tmp_path):
    path = tmp_path / "console.sock"
    with running(svtest_guest, "svtest.action=echo",
                 SerialConfig(SerialKind.SOCKET, str(path))) as machine:
        assert machine.hardware is not None
        counts = machine.hardware.exit_counts
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        received = b""
        try:
            # Typed input still reaches the guest (its receive buffer read goes to Python).
            for key in b"zyx":
                before = counts()
                client.sendall(bytes((key,)))
                line = f"svtest: got {key:#04x}\r\n".encode()
                deadline = time.monotonic() + 30
                while line not in received:
                    assert time.monotonic() < deadline, received
                    select.select([client], [], [], 1)
                    received += client.recv(4096)
                # The vCPU counts a byte once send() has returned, which can be after the
                # client already read it: let the count catch up with the line.
                while (counts()["console_bytes_in_c"] - before["console_bytes_in_c"] < len(line)
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
                after = counts()
                assert after["console_bytes_in_c"] - before["console_bytes_in_c"] >= len(line)
                assert after["to_python"] - before["to_python"] < len(line)
        finally:
            client.close()
