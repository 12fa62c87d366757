"""virtio-console with the freestanding guest (tests/guest, action `console`) on our monitor.

The guest does the multiport handshake, writes a line on its console port, echoes
every line it reads and reports the control messages it gets (PORT_OPEN as socket
clients come and go) on its serial console.  The test is a client of the port's
socket chardev: the line arrives, input comes back echoed, a client leaves and
another connects, and what the guest wrote meanwhile reaches the second client.
No network is involved.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MONITOR, Qmp, monitor_env, wait_for_socket
from tests.integration.test_guest_balloon import Host
from tests.integration.test_guest_net import QEMU, Guest, host_is_pvm, require_qemu

pytestmark = pytest.mark.kvm


class Client:
    """One connection to the port's unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.settimeout(0.2)
        self.data = b""

    def read_until(self, pattern: bytes, timeout: float = 60, start: int = 0
                   ) -> re.Match[bytes]:
        """The first match of `pattern` in what was read, from `start` on."""
        deadline = time.monotonic() + timeout
        while not (match := re.compile(pattern).search(self.data, start)):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.data!r}"
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            assert chunk, f"EOF before {pattern!r}; got {self.data!r}"
            self.data += chunk
        return match

    def close(self) -> None:
        self.sock.close()


def console_argv(guest: Path, *devices: str) -> list[str]:
    """Our monitor with the `console` action, the serial on stdio, and `devices`."""
    return [*MONITOR, "-kernel", str(guest), "-serial", "stdio",
            "-append", "svtest.action=console svtest.timeout_ms=300000", *devices]


def test_console_port_output_input_and_reconnect(svtest_guest: Path, tmp_path: Path,
                                                  artifact_dir: Path) -> None:
    path = tmp_path / "console.sock"
    qmp_path = tmp_path / "qmp.sock"
    argv = console_argv(svtest_guest, "-device", "virtio-serial-device",
                        "-chardev", f"socket,id=con,path={path},server,nowait",
                        "-device", "virtconsole,id=con0,chardev=con",
                        "-qmp", f"unix:{qmp_path},server,nowait")
    guest = Guest(Host(), argv, artifact_dir / "serial.log")
    try:
        wait_for_socket(guest.process, path)
        wait_for_socket(guest.process, qmp_path)
        qmp = Qmp(qmp_path)
        qmp.execute("qmp_capabilities")
        chardevs = {c["label"]: c for c in qmp.execute("query-chardev")["return"]}
        assert chardevs["con"]["frontend-open"] is True  # the port uses it
        assert chardevs["con"]["filename"] == f"unix:{path},server=on"
        guest.wait_line(r"console ready device=\d+ max-ports=1 ", 120)
        guest.wait_line(r"console port-add id=0$", 60)
        guest.wait_line(r"console console-port id=0$", 60)
        # Nobody connected yet: the handshake sends no PORT_OPEN, the hello line waits.
        time.sleep(0.5)
        assert "port-open" not in guest.output

        first = Client(path)
        first.read_until(rb"svtest-console hello\n")
        guest.wait_line(r"console port-open id=0 value=1$", 60)
        first.sock.sendall(b"ping one\n")
        first.read_until(rb"echo: ping one\n")
        guest.wait_line(r"console rx port=0 len=\d+$", 10)
        first.close()

        # The guest sees the client go and writes while nobody is connected.
        guest.wait_line(r"console port-open id=0 value=0$", 60)
        time.sleep(0.5)
        mark = len(guest.lines)
        second = Client(path)
        second.read_until(rb"svtest-console while-away 1\n")
        assert b"hello" not in second.data  # the first client had it already
        guest.wait_line(r"console port-open id=0 value=1$", 60, start=mark)
        second.sock.sendall(b"ping two\r\nquit\n")
        second.read_until(rb"echo: ping two\n")
        guest.wait_line(r"console done echoed=2 away=1$", 60)
        guest.wait_line(r"svtest: done", 30)
        second.close()
    finally:
        guest.close()


def serial_port_argv(monitor: str, guest: Path, console: Path, port: Path) -> list[str]:
    """A console port and port 1 (named) on socket chardevs, on `monitor`."""
    if monitor == "qemu":
        cpu = "host,-arch-capabilities" if host_is_pvm() else "host"
        return [QEMU, "-enable-kvm",
                "-M", "microvm,acpi=off,kernel_irqchip=on,pit=on,pic=on,rtc=off", "-cpu", cpu,
                "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                "-serial", "stdio", "-kernel", str(guest),
                "-append", "svtest.action=console svtest.timeout_ms=300000",
                "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-serial-device",
                "-chardev", f"socket,id=con,path={console},server=on,wait=off",
                "-chardev", f"socket,id=p1,path={port},server=on,wait=off",
                "-device", "virtconsole,chardev=con",
                "-device", "virtserialport,chardev=p1,nr=1,name=org.svtest.port1"]
    return console_argv(
        guest, "-device", "virtio-serial-device,id=vs0",
        "-chardev", f"socket,id=con,path={console},server,nowait",
        "-chardev", f"socket,id=p1,path={port},server,nowait",
        "-device", "virtconsole,id=con0,chardev=con",
        "-device", "virtserialport,id=port1,chardev=p1,nr=1,name=org.svtest.port1")


@pytest.mark.parametrize("monitor", ["qemu", "ours"])
def test_serial_port_name_and_echo(monitor: str, svtest_guest: Path, tmp_path: Path,
                                   artifact_dir: Path) -> None:
    """The driver against QEMU (the reference) and ours: port 1's name, echo on it."""
    if monitor == "qemu":
        require_qemu()
    console, port = tmp_path / "console.sock", tmp_path / "port1.sock"
    argv = serial_port_argv(monitor, svtest_guest, console, port)
    guest = Guest(Host(), argv, artifact_dir / "serial.log")
    try:
        wait_for_socket(guest.process, port)
        ready = guest.wait_line(r"console ready device=\d+ max-ports=(\d+) ", 120)
        assert int(ready.group(1)) == (2 if monitor == "ours" else 31)  # QEMU's default
        guest.wait_line(r"console port-add id=1$", 60)
        guest.wait_line(r"console port-name id=1 name=org.svtest.port1$", 60)
        client = Client(port)
        guest.wait_line(r"console port-open id=1 value=1$", 60)
        client.sock.sendall(b"on port one\n")
        client.read_until(rb"echo: on port one\n")
        assert b"hello" not in client.data  # the hello line is port 0's
        first = Client(console)
        first.sock.sendall(b"quit\n")
        guest.wait_line(r"console done echoed=1 away=0$", 60)
        client.close()
        first.close()
    finally:
        guest.close()


def test_console_port_on_stdio(svtest_guest: Path, tmp_path: Path) -> None:
    """The monitor's own stdin and stdout as the console port (serial to a file)."""
    serial = tmp_path / "serial.log"
    argv = [*MONITOR, "-kernel", str(svtest_guest), "-serial", f"file,path={serial}",
            "-append", "svtest.action=console svtest.timeout_ms=300000",
            "-device", "virtio-serial-device", "-chardev", "stdio,id=s",
            "-device", "virtconsole,id=con0,chardev=s"]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=monitor_env())
    try:
        # Sent at once: the port keeps it until the guest opens the port.
        out, err = process.communicate(b"ping\nquit\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert out == b"svtest-console hello\necho: ping\n", (out, err)
    assert "svtest: console done echoed=1 away=0" in serial.read_text()
