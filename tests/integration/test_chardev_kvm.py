"""Named character backends (-chardev) behind the UART, on the freestanding guest: a socket
that keeps what the guest wrote while nobody was connected, a pty, and query-chardev."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import time

import pytest

from tests.integration.test_qmp_kvm import RunningVM, command


@pytest.fixture(name="vm_factory")
def vm_factory_fixture(svtest_guest, tmp_path):
    vms: list[RunningVM] = []

    def make(*args: str, **kwargs) -> RunningVM:
        vms.append(RunningVM(svtest_guest, tmp_path, *args, **kwargs))
        return vms[-1]
    yield make
    for vm in vms:
        vm.kill()


def ticks(data: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"svtest: tick (\d+)\r\n", data)]


def read_for(sock: socket.socket, seconds: float) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.05)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return bytes(data)


def read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while marker not in data:
        assert time.monotonic() < deadline, bytes(data)
        if select.select([fd], [], [], 0.1)[0]:
            with contextlib.suppress(BlockingIOError):
                data += os.read(fd, 65536)
    return bytes(data)


def test_a_socket_chardev_keeps_output_for_the_next_client(vm_factory, tmp_path):
    path = tmp_path / "console.sock"
    vm = vm_factory("-chardev", f"socket,id=con0,path={path},server,nowait",
                    "-serial", "chardev:con0")
    assert command(vm.socket_path, {"execute": "query-chardev"})[0]["return"] == [
        {"label": "con0", "filename": f"unix:{path},server=on", "frontend-open": True}]
    time.sleep(1.0)  # the guest boots and ticks with nobody connected
    first = socket.socket(socket.AF_UNIX)
    first.connect(str(path))
    seen = read_for(first, 1.5)
    # What was written before anyone connected comes first, then the live output.
    assert seen.startswith(b"svtest: "), seen[:200]
    assert b"svtest: hello" in seen
    numbers = ticks(seen)
    assert len(numbers) >= 2 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    first.close()
    time.sleep(1.0)  # ticks while nobody is connected
    second = socket.socket(socket.AF_UNIX)
    second.connect(str(path))
    later = ticks(read_for(second, 1.0))
    second.close()
    assert later and later == list(range(later[0], later[0] + len(later)))
    # The second client starts where the first stopped reading (only what was in flight
    # to the first client's socket when it closed can be missing), not at reconnection.
    assert numbers[-1] < later[0] <= numbers[-1] + 3, (numbers[-1], later[:3])
    assert later[-1] - later[0] >= 2  # a second of ticks while nobody was there, then live


def test_a_pty_chardev_is_reported_and_carries_both_ways(vm_factory):
    vm = vm_factory("-serial", "pty", action="echo")
    (entry,) = command(vm.socket_path, {"execute": "query-chardev"})[0]["return"]
    assert entry["label"] == "serial0" and entry["frontend-open"] is True
    assert entry["filename"].startswith("pty:/dev/pts/")
    pty_path = entry["filename"][len("pty:"):]
    fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        # Written before this open: the terminal kept it.
        assert b"svtest: hello" in read_until(fd, b"svtest: hello")
        os.write(fd, b"q")
        assert b"svtest: got 0x71" in read_until(fd, b"svtest: got 0x71")
    finally:
        os.close(fd)
    assert vm.process.poll() is None


def test_an_unused_chardev_is_listed_as_not_open(vm_factory, tmp_path):
    spare = tmp_path / "spare.sock"
    vm = vm_factory("-chardev", f"socket,id=spare,path={spare},server,nowait")
    replies = command(vm.socket_path, {"execute": "query-chardev"})[0]["return"]
    assert replies == [
        {"label": "serial0", "filename": f"file:{tmp_path / 'console.log'}",
         "frontend-open": True},
        {"label": "spare", "filename": f"unix:{spare},server=on", "frontend-open": False}]
    vm.kill()
