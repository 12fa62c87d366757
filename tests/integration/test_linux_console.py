"""The project's Linux guest with its console on a virtio console: `console=hvc0` on a
socket chardev, a shell over the socket, QMP stop/cont in between (one boot of its own)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS
from tests.helpers import MONITOR, Qmp, monitor_env, wait_for_socket
from tests.integration.test_guest_console import Client
from tests.integration.test_linux_guest import (
    BOOT_TIMEOUT,
    INITRAMFS,
    KERNEL,
    USER_SPACE_MARKER,
)

pytestmark = pytest.mark.linux

PORT_NAME = "org.stratovirt.test.1"


class HvcConsole(Client):
    """A client of the console socket; what it read is also kept in a log."""

    def __init__(self, path: Path, log: Path) -> None:
        super().__init__(path)
        self.path = path
        self.log = log

    def reconnect(self) -> None:
        self.sock.close()
        time.sleep(0.5)  # the monitor sees the client go before the next one comes
        self.sock = Client(self.path).sock

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> re.Match[bytes]:
        try:
            return self.read_until(pattern, timeout, start)
        finally:
            self.log.write_bytes(self.data)

    def shell(self, command: str, timeout: float = 120) -> str:
        """Runs `command` in the guest's shell; what it printed (the marker is computed by
        the shell, so the echoed command line cannot match it)."""
        start = len(self.data)
        # Short, so the echoed line does not wrap at 80 columns (the shell's editor
        # redraws wrapped lines); computed by the shell, so its echo cannot match.
        marker = f"{time.monotonic_ns() % 10**8:08d}"
        self.sock.sendall(f"{command}; echo =$((1)){marker}\n".encode())
        match = self.wait_for(re.escape(f"=1{marker}".encode()), timeout, start)
        output = self.data[start:match.start()].decode(errors="replace")
        # What follows the last echo of the typed line (the tty and the shell's editor
        # may both echo it, the editor wrapping it at 80 columns).
        echoed = output.rfind(marker[-4:])
        assert echoed >= 0, output
        return output[echoed:].split("\n", 1)[1] if "\n" in output[echoed:] else ""



@pytest.fixture(scope="module")
def hvc_guest(tmp_path_factory):
    for path in (KERNEL, INITRAMFS):
        if not path.exists():
            pytest.fail(f"{path} is missing: run scripts/setup")
    workdir = tmp_path_factory.mktemp("hvc")
    console_path, qmp_path = workdir / "console.sock", workdir / "qmp.sock"
    port_path = workdir / "port1.sock"
    artifacts = ARTIFACTS / "linux-console"
    artifacts.mkdir(parents=True, exist_ok=True)
    stderr = open(artifacts / "monitor.stderr", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [*MONITOR, "-kernel", str(KERNEL), "-initrd", str(INITRAMFS), "-m", "256",
         "-append", "console=hvc0 reboot=k panic=-1", "-serial", "none",
         "-device", "virtio-serial-device",
         "-chardev", f"socket,id=hvc,path={console_path},server,nowait",
         "-device", "virtconsole,id=con0,chardev=hvc",
         "-chardev", f"socket,id=p1,path={port_path},server,nowait",
         "-device", f"virtserialport,id=port1,chardev=p1,nr=1,name={PORT_NAME}",
         "-qmp", f"unix:{qmp_path},server,nowait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=monitor_env())
    try:
        wait_for_socket(process, console_path)
        started = time.monotonic()
        console = HvcConsole(console_path, artifacts / "hvc0.log")
        console.wait_for(USER_SPACE_MARKER.encode(), BOOT_TIMEOUT)
        print(f"hvc0 user space after {time.monotonic() - started:.1f} s")
        wait_for_socket(process, qmp_path)
        qmp = Qmp(qmp_path)
        qmp.execute("qmp_capabilities")
        yield console, qmp, port_path
        console.close()
    finally:
        process.kill()
        process.wait()
        stderr.close()


def test_kernel_messages_and_shell_on_hvc0(hvc_guest):
    console, _, _ = hvc_guest
    assert b"Run /init as init process" in console.data  # the kernel's own console is hvc0
    assert console.shell("echo hel$((1+1))lo; uname -s").split() == ["hel2lo", "Linux"]
    tty = console.shell("cat /proc/consoles; ls /sys/class/virtio-ports")
    assert re.search(r"^hvc0\b", tty, re.M), tty
    assert "vport" in tty and "p0" in tty, tty


def test_stop_and_cont_change_nothing(hvc_guest):
    console, qmp, _ = hvc_guest
    command = "echo $((6*7)); uname -r; test -c /dev/hvc0 && echo ok"
    before = console.shell(command)
    assert qmp.execute("stop") == {"return": {}}
    assert qmp.execute("query-status")["return"]["status"] == "paused"
    start = len(console.data)
    console.sock.sendall(b"echo typed-while-paused\n")
    time.sleep(1)
    assert b"typed-while-paused" not in console.data[start:]  # no vCPU runs: no echo
    assert qmp.execute("cont") == {"return": {}}
    console.wait_for(rb"typed-while-paused\r?\n", 60, start)  # the input was kept
    assert console.shell(command) == before
    assert before.split()[0] == "42" and before.split()[-1] == "ok"


def test_a_new_client_gets_the_shell(hvc_guest):
    console, _, _ = hvc_guest
    console.reconnect()
    assert console.shell("echo again-$((2+3))").split() == ["again-5"]


def test_a_named_serial_port_both_ways(hvc_guest):
    console, _, port_path = hvc_guest
    found = console.shell(f"grep -l {PORT_NAME} /sys/class/virtio-ports/*/name")
    device = re.search(r"virtio-ports/(vport\d+p1)/name", found)
    assert device, found
    port = Client(port_path)
    try:
        assert console.shell(f"echo from-guest > /dev/{device.group(1)}").strip() == ""
        port.read_until(rb"from-guest\n", 60)
        port.sock.sendall(b"to-guest\n")
        assert console.shell(f"head -n 1 /dev/{device.group(1)}").split() == ["to-guest"]
    finally:
        port.close()
