"""-serial stdio on a terminal: raw input reaches the guest, Ctrl-A x quits, tty restored."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import termios
import time

import pytest

from tests.helpers import MONITOR, monitor_env

pytestmark = pytest.mark.kvm


def read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"timed out waiting for {marker!r}; got {data!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def run_on_pty(guest, action: str):
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    process = subprocess.Popen([*MONITOR, "-kernel", str(guest), "-serial", "stdio",
                                "-append", f"svtest.action={action}"],
                               stdin=terminal, stdout=terminal, stderr=subprocess.PIPE,
                               env=monitor_env())
    return controller, terminal, before, process


def test_keys_reach_the_guest_and_the_terminal_is_restored(svtest_guest):
    controller, terminal, before, process = run_on_pty(svtest_guest, "echo")
    try:
        read_until(controller, b"action=echo")
        raw = termios.tcgetattr(terminal)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO  # raw while running
        os.write(controller, b"\x03")  # Ctrl-C goes to the guest, not to the monitor
        output = read_until(controller, b"got 0x03")
        os.write(controller, b"q")
        output += read_until(controller, b"got 0x71")
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(terminal) == before
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
        os.close(terminal)


def test_ctrl_a_x_quits(svtest_guest):
    controller, terminal, before, process = run_on_pty(svtest_guest, "spin")
    try:
        read_until(controller, b"tick")
        os.write(controller, b"\x01x")
        assert process.wait(timeout=30) == 0
        assert b"quit requested from the console" in process.stderr.read()
        assert termios.tcgetattr(terminal) == before
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
        os.close(terminal)
