"""virtio-blk on real KVM with the freestanding guest: slots, I/O, read-only, hostile, hot-plug."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MONITOR, monitor_env, run_monitor

pytestmark = pytest.mark.kvm
SECTOR = 512
MiB = 1 << 20


def make_image(path: Path, size: int, fill: int | None = None) -> Path:
    with open(path, "wb") as image:
        if fill is None:
            image.truncate(size)
        else:
            image.write(bytes([fill]) * size)
    return path


def pattern(seed: int, sector: int, count: int) -> bytes:
    """The test guest's pattern: byte i of sector s is (seed*131 + s*7 + i) & 0xff."""
    return b"".join(bytes((seed * 131 + s * 7 + i) & 0xFF for i in range(SECTOR))
                    for s in range(sector, sector + count))


def disk_args(*drives: tuple[str, Path, str]) -> list[str]:
    args: list[str] = []
    for drive_id, path, extra in drives:
        args += ["-drive", f"id={drive_id},file={path}{extra}",
                 "-device", f"virtio-blk-device,drive={drive_id},id={drive_id}"]
    return args


def boot(guest: Path, action: str, *args: str, cmdline: str = "", timeout: float = 90):
    return run_monitor(["-kernel", str(guest), "-serial", "stdio",
                        "-append", f"svtest.action={action} {cmdline}".strip(), *args],
                       timeout=timeout)


def lines(result, prefix: str) -> list[str]:
    return [line[len("svtest: "):] for line in result.stdout.decode().splitlines()
            if line.startswith("svtest: " + prefix)]


def test_six_disk_slots_then_two_nic_slots_in_order(svtest_guest, tmp_path):
    disk = make_image(tmp_path / "root.img", 2 * MiB)
    result = boot(svtest_guest, "virtio-info",
                  *disk_args(("rootfs", disk, ",direct=off,serial=ROOT-SERIAL")))
    assert result.returncode == 0
    devices = lines(result, "virtio ")
    assert len(devices) == 8
    for index, line in enumerate(devices):
        fields = dict(item.split("=", 1) for item in line.split()[2:])
        assert fields["base"] == hex(0xF0100000 + index * 0x200)
        assert fields["irq"] == str(5 + index)
        # virtio-blk (2) for vda..vdf, then virtio-net (1) for eth0 and eth1.
        assert (fields["magic"], fields["version"], fields["device-id"]) == (
            "0x74726976", "2", "2" if index < 6 else "1")
        features = int(fields["features"], 16)
        assert features & (1 << 32) and features & (1 << 28) and features & (1 << 29)
        if index < 6:
            assert fields["capacity"] == (str(2 * MiB // SECTOR) if index == 0 else "0")
    assert "serial=ROOT-SERIAL" in devices[0]


@pytest.mark.parametrize("options", [
    "svtest.event_idx=1 svtest.indirect=1",
    "svtest.event_idx=0 svtest.indirect=0",
    "svtest.queue_size=4",
])
@pytest.mark.parametrize("direct", ["on", "off"])
def test_read_write_verify(svtest_guest, tmp_path, options, direct):
    disk = make_image(tmp_path / "disk.img", 4 * MiB)
    result = boot(svtest_guest, "blk-rw",
                  *disk_args(("d0", disk, f",direct={direct},serial=SN-RW")), cmdline=options)
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "FAIL" not in out, out
    assert re.search(r"blk-rw ok requests=\d+ bytes=\d+", out), out
    assert "blk-serial=SN-RW" in out
    assert "beyond-end-status=ioerr straddle-status=ioerr unsupported-status=unsupp" in out
    assert "flush-status=ok" in out


def test_pattern_written_by_the_guest_is_on_the_host_file(svtest_guest, tmp_path):
    disk = make_image(tmp_path / "disk.img", 1 * MiB)
    result = boot(svtest_guest, "blk-write-pattern", *disk_args(("d0", disk, "")),
                  cmdline="svtest.sector=100 svtest.count=40 svtest.seed=9")
    assert result.returncode == 0 and b"blk-write-pattern ok" in result.stdout
    data = disk.read_bytes()
    assert data[100 * SECTOR:140 * SECTOR] == pattern(9, 100, 40)
    assert data[:100 * SECTOR] == bytes(100 * SECTOR)  # nothing else touched


def test_guest_reads_what_the_host_wrote(svtest_guest, tmp_path):
    disk = make_image(tmp_path / "disk.img", 1 * MiB)
    with open(disk, "r+b") as image:
        image.seek(7 * SECTOR)
        image.write(pattern(3, 7, 5))
    result = boot(svtest_guest, "blk-read-pattern", *disk_args(("d0", disk, ",readonly=on")),
                  cmdline="svtest.sector=7 svtest.count=5 svtest.seed=3")
    assert b"blk-read-pattern ok" in result.stdout, result.stdout


def test_read_only_drive(svtest_guest, tmp_path):
    disk = make_image(tmp_path / "ro.img", 1 * MiB, fill=0x5A)
    result = boot(svtest_guest, "blk-ro-check", *disk_args(("ro", disk, ",readonly=on")))
    out = result.stdout.decode()
    assert "blk-ro write-status=1 read=ok unchanged=1 ro-feature=1" in out, out
    assert disk.read_bytes() == bytes([0x5A]) * MiB


class QmpVM:
    def __init__(self, guest: Path, tmp: Path, action: str, cmdline: str, *args: str) -> None:
        self.socket_path = tmp / "qmp.sock"
        self.console = tmp / "console.log"
        self.process = subprocess.Popen(
            [*MONITOR, "-kernel", str(guest), "-serial", f"file,path={self.console}",
             "-qmp", f"unix:{self.socket_path},server,nowait",
             "-append", f"svtest.action={action} {cmdline}", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=monitor_env())
        deadline = time.monotonic() + 30
        while not self.socket_path.exists():
            assert self.process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(self.socket_path))
        self.buffer = b""
        self.events: list[dict] = []
        self._line()  # greeting

    def _line(self) -> dict:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "QMP connection closed"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return json.loads(line)

    def execute(self, name: str, **arguments) -> dict:
        """Returns the reply; events that came before it are kept in self.events."""
        request: dict = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())
        while True:
            message = self._line()
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console_text():
            assert self.process.poll() is None, self.console_text()
            assert time.monotonic() < deadline, self.console_text()
            time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def qmp_vm(svtest_guest, tmp_path):
    vms: list[QmpVM] = []

    def make(action: str, cmdline: str = "", *args: str) -> QmpVM:
        vm = QmpVM(svtest_guest, tmp_path, action, cmdline, *args)
        vms.append(vm)
        return vm
    yield make
    for vm in vms:
        vm.close()


def blockdev(node: str, path: Path, **extra) -> dict:
    return {"node-name": node, "file": {"driver": "file", "filename": str(path)},
            "cache": {"direct": False}, "read-only": False, **extra}


def test_hot_plug_as_the_spec_shows(qmp_vm, tmp_path):
    image = make_image(tmp_path / "hot.img", 2 * MiB)
    vm = qmp_vm("blk-watch", "svtest.blk=1 svtest.changes=2")
    vm.wait_console("blk-watch capacity=0")
    assert vm.execute("blockdev-add", **blockdev("drive-0", image)) == {"return": {}}
    assert vm.execute("device_add", id="drive-0", driver="virtio-blk-mmio", addr="0x1") == {
        "return": {}}
    vm.wait_console(f"blk-watch capacity={2 * MiB // SECTOR}")
    [plugged] = [line for line in vm.console_text().splitlines()
                 if f"capacity={2 * MiB // SECTOR}" in line]
    assert "config-irq=1" in plugged  # the guest heard of it through a config interrupt
    reply = vm.execute("device_del", id="drive-0")
    assert reply == {"return": {}}
    assert [e["event"] for e in vm.events] == ["DEVICE_DELETED"]
    assert vm.events[0]["data"] == {"device": "drive-0", "path": "drive-0"}
    vm.wait_console("blk-watch done changes=2")
    assert vm.process.wait(timeout=30) == 0


def test_lun_means_the_next_slot(qmp_vm, tmp_path):
    image = make_image(tmp_path / "lun.img", 1 * MiB)
    vm = qmp_vm("blk-watch", "svtest.blk=1 svtest.changes=1")
    vm.wait_console("blk-watch capacity=0")
    vm.execute("blockdev-add", **blockdev("drive-1", image))
    assert vm.execute("device_add", id="drive-1", driver="virtio-blk-device", lun=0) == {
        "return": {}}
    vm.wait_console("blk-watch done changes=1")


def test_hot_plug_errors(qmp_vm, tmp_path):
    root = make_image(tmp_path / "root.img", 1 * MiB)
    images = [make_image(tmp_path / f"d{i}.img", 1 * MiB) for i in range(7)]
    vm = qmp_vm("spin", "", *disk_args(("rootfs", root, "")))

    def error(name: str, **arguments) -> tuple[str, str]:
        reply = vm.execute(name, **arguments)
        assert "error" in reply, reply
        return reply["error"]["class"], reply["error"]["desc"]

    assert error("blockdev-add", **blockdev("root-again", root)) == (
        "GenericError", f"'{root}' is already in use by disk 'rootfs' (vda)")
    assert error("blockdev-add", **blockdev("gone", tmp_path / "missing.img"))[1] == (
        f"Could not open '{tmp_path / 'missing.img'}': No such file or directory")
    assert vm.execute("blockdev-add", **blockdev("n1", images[1])) == {"return": {}}
    assert error("blockdev-add", **blockdev("n1", images[2]))[1] == "Duplicate node name 'n1'"
    assert error("device_add", id="n1", driver="virtio-blk-mmio", addr="0x0")[1] == (
        "The slot 0x0 (vda) is occupied by 'rootfs'")
    assert error("device_add", id="n1", driver="virtio-blk-mmio", addr="0x6")[1].startswith(
        "Invalid addr 0x6")
    assert error("device_add", id="n1", driver="virtio-blk-mmio", addr="zz")[1] == (
        "Invalid addr 'zz' for device 'n1'")
    assert error("device_add", id="rootfs", driver="virtio-blk-mmio", addr="0x2")[1] == (
        "Duplicate device ID 'rootfs'")
    assert error("device_add", id="nope", driver="virtio-blk-mmio")[0] == "DeviceNotFound"
    assert error("device_add", id="n1", driver="virtio-gpu")[1] == (
        "'virtio-gpu' is not a valid device model name")
    assert error("device_del", id="nope") == ("DeviceNotFound", "Device 'nope' not found")
    assert error("blockdev-del", **{"node-name": "nope"})[1] == (
        "Failed to find node with node-name='nope'")
    assert error("blockdev-add", **{"node-name": "x"})[1] == "Parameter 'file.filename' is missing"
    # Fill every slot, then one more.
    assert vm.execute("device_add", id="n1", driver="virtio-blk-mmio") == {"return": {}}
    for i in range(2, 6):
        vm.execute("blockdev-add", **blockdev(f"n{i}", images[i]))
        assert vm.execute("device_add", id=f"n{i}", driver="virtio-blk-mmio") == {"return": {}}
    assert error("blockdev-add", **blockdev("n6", images[6]))[1].startswith(
        "A maximum of 6 virtio-blk disks are supported")
    assert error("blockdev-del", **{"node-name": "n1"})[1] == "Node n1 is in use by device 'n1'"
    assert vm.execute("query-status")["return"]["status"] == "running"
    vm.execute("quit")
    assert vm.process.wait(timeout=30) == 0


def test_hot_plugged_disk_before_start_takes_guest_writes(qmp_vm, tmp_path):
    image = make_image(tmp_path / "late.img", 1 * MiB)
    vm = qmp_vm("blk-write-pattern", "svtest.blk=2 svtest.sector=3 svtest.count=9 "
                "svtest.seed=77", "-S")
    vm.execute("blockdev-add", **blockdev("late", image, cache={"direct": True}))
    assert vm.execute("device_add", id="late", driver="virtio-blk-mmio", addr="0x2") == {
        "return": {}}
    vm.execute("cont")
    vm.wait_console("blk-write-pattern ok")
    assert vm.process.wait(timeout=30) == 0
    assert image.read_bytes()[3 * SECTOR:12 * SECTOR] == pattern(77, 3, 9)


# How a well-behaved device answers each hostile case: "break" (DEVICE_NEEDS_RESET
# and a config interrupt), or the facts of its answer.  Cases not named here may be
# broken or answered with an error (never served).
HOSTILE_ANSWERS = {
    # 256000 aliased segments (1000 descriptors): refused at once, not parsed for seconds.
    "discard-aliased": ["needs-reset=0", "used-idx=1", "req-status=0x02", "used-len=1"],
    # 2 GiB of aliased buffers: IOERR before any I/O, answered (not a broken device).
    "read-2g-aliased": ["needs-reset=0", "used-idx=1", "req-status=0x01", "used-len=1",
                        "alias-intact=1"],
    # DRIVER_OK cleared and set: a driver error, and the read is not served again.
    "driver-ok-toggle": ["needs-reset=1 config-irq=1", "vring-irq=0", "req-status=0xff"],
}
MAY_BE_ANSWERED = ("indirect-oversized", "short-header")
HOSTILE_CASES = 20


@pytest.mark.parametrize("direct", ["on", "off"])
def test_hostile_guest_gets_a_broken_device_and_the_monitor_goes_on(qmp_vm, tmp_path, direct):
    # The victim is sparse and large enough for a 2 GiB read of sector 0.
    victim = make_image(tmp_path / "victim.img", 3 << 30)
    other = make_image(tmp_path / "other.img", 1 * MiB)
    vm = qmp_vm("hostile", "svtest.hostile=all svtest.hostile_other=1 svtest.hostile_end=halt",
                *disk_args(("a", victim, f",direct={direct}"), ("b", other, f",direct={direct}")))
    # After every case the monitor answers QMP while the guest goes on.
    answered: set[str] = set()
    deadline = time.monotonic() + 120
    while "hostile done" not in vm.console_text():
        assert vm.process.poll() is None and time.monotonic() < deadline, vm.console_text()
        for line in vm.console_text().splitlines():
            if " other-disk=" in line and line not in answered:
                answered.add(line)
                assert vm.execute("query-status")["return"]["status"] == "running"
        time.sleep(0.05)
    out = vm.console_text()
    assert f"hostile done cases={HOSTILE_CASES}" in out, out
    assert "FAIL" not in out and "skip" not in out, out
    reports = [line.split("svtest: ", 1)[1] for line in out.splitlines()
               if line.startswith("svtest: hostile ") and " status=" in line]
    assert len(reports) == HOSTILE_CASES
    for report in reports:
        case = report.split()[1]
        assert "canary=ok" in report and "ring-intact=1" in report, report
        for fact in HOSTILE_ANSWERS.get(case, []):
            assert fact in report, report
        if case not in HOSTILE_ANSWERS and case not in MAY_BE_ANSWERED:
            assert "needs-reset=1 config-irq=1" in report, report
    for kind in ("recovered=", "other-disk="):
        results = [line for line in out.splitlines() if kind in line]
        assert len(results) == HOSTILE_CASES, out
        assert all(f"{kind}{'1' if kind == 'recovered=' else 'ok'}" in line
                   for line in results), out
    # The guest is halted: QMP quit still ends the monitor promptly.
    assert vm.execute("quit") == {"return": {}}
    assert vm.process.wait(timeout=5) == 0
    stderr = vm.process.stderr.read()
    assert b"guest error:" in stderr and b"device needs reset" in stderr
    data = other.read_bytes()  # the other disk: only the checks' sectors were written
    assert data[:8 * SECTOR] == bytes(8 * SECTOR) and data[16 * SECTOR:] == bytes(MiB - 16 * SECTOR)
