"""The project's Linux guest on real KVM: boot to user space, shell, virtio-blk, QMP, hot-plug.

Booting Linux takes tens of seconds on software-emulated hosts, so one guest
is shared by every test in this module, in order.  Its serial log is kept in
test-artifacts/linux-guest/serial.log.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS
from tests.helpers import MONITOR, REPO, host_cpuinfo, monitor_env

pytestmark = pytest.mark.linux

GUEST = REPO / "build" / "guest"
KERNEL, INITRAMFS, ROOTFS = GUEST / "vmlinux", GUEST / "initramfs.cpio", GUEST / "rootfs.ext4"
TINY_KERNEL = GUEST / "tiny" / "vmlinux"  # scripts/build-guest-kernel tiny
BOOT_TIMEOUT = 600
USER_SPACE_MARKER = "stratovirt-py guest: user space ready"
SECTOR = 512


class LinuxGuest:
    """A booted Linux guest: console over the monitor's stdio, QMP on a socket."""

    def __init__(self, workdir: Path, log_path: Path, *args: str) -> None:
        self.qmp_path = workdir / "qmp.sock"
        self.log_path = log_path
        self.log = bytearray()
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [*MONITOR, "-kernel", str(KERNEL), "-initrd", str(INITRAMFS), "-m", "256",
             "-append", "console=ttyS0 reboot=k panic=-1", "-serial", "stdio",
             "-qmp", f"unix:{self.qmp_path},server,nowait", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=monitor_env())
        self.reader = threading.Thread(target=self._read_console, daemon=True)
        self.reader.start()
        self.qmp_buffer = b""
        self.events: list[dict] = []
        self.qmp: socket.socket | None = None

    def _read_console(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "wb") as log:
            while chunk := os.read(self.process.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                with self.lock:
                    self.log += chunk

    def text(self) -> str:
        with self.lock:
            return self.log.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text(), start)
            if match:
                return match
            assert self.process.poll() is None, f"monitor exited: {self.text()[-2000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in: {self.text()[-2000:]}"
            time.sleep(0.1)

    def shell(self, command: str, timeout: float = 120) -> str:
        """Runs a command on the guest's console; returns what it printed."""
        assert self.process.stdin is not None
        marker = f"done-{time.monotonic_ns()}"
        start = len(self.text())
        # The marker is computed by the shell, so the echoed command line cannot match it.
        typed = f"{command}; echo {marker[:5]}$((1)){marker[5:]}"
        self.process.stdin.write(typed.encode() + b"\n")
        self.process.stdin.flush()
        expected = marker[:5] + "1" + marker[5:]
        match = self.wait_for(re.escape(expected), timeout, start)
        output = self.text()[start:match.start()]
        # Drop everything up to the end of the echoed command line.
        echoed = output.rfind(typed[-20:])
        if echoed >= 0:
            output = output[echoed:].split("\n", 1)[1] if "\n" in output[echoed:] else ""
        return output

    def connect_qmp(self) -> None:
        self.qmp = socket.socket(socket.AF_UNIX)
        self.qmp.settimeout(60)
        self.qmp.connect(str(self.qmp_path))
        greeting = self._qmp_line()
        assert "QMP" in greeting

    def _qmp_line(self) -> dict:
        assert self.qmp is not None
        while b"\r\n" not in self.qmp_buffer:
            chunk = self.qmp.recv(65536)
            assert chunk, "QMP connection closed"
            self.qmp_buffer += chunk
        line, _, self.qmp_buffer = self.qmp_buffer.partition(b"\r\n")
        return json.loads(line)

    def execute(self, name: str, **arguments) -> dict:
        assert self.qmp is not None
        request: dict = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.qmp.sendall(json.dumps(request).encode())
        while True:
            message = self._qmp_line()
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def linux(tmp_path_factory):
    for artifact in (KERNEL, INITRAMFS, ROOTFS):
        if not artifact.exists():
            pytest.fail(f"{artifact} is missing: run scripts/build-guest-kernel and "
                        f"scripts/build-guest-rootfs (scripts/setup does both)")
    workdir = tmp_path_factory.mktemp("linux")
    data_disk = workdir / "data.ext4"
    shutil.copy(ROOTFS, data_disk)
    artifacts = ARTIFACTS / "linux-guest"
    artifacts.mkdir(parents=True, exist_ok=True)
    guest = LinuxGuest(workdir, artifacts / "serial.log", "-smp", "2",
                       "-drive", f"id=data,file={data_disk},direct=off,serial=DATA-DISK",
                       "-device", "virtio-blk-device,drive=data,id=data")
    guest.workdir = workdir  # type: ignore[attr-defined]
    guest.data_disk = data_disk  # type: ignore[attr-defined]
    try:
        guest.wait_for("Run /init as init process", timeout=BOOT_TIMEOUT)
        guest.connect_qmp()
        yield guest
    finally:
        guest.stop()
        (artifacts / "monitor.log").write_bytes(guest.process.stderr.read()
                                                if guest.process.stderr else b"")


def test_reaches_user_space(linux):
    linux.wait_for(re.escape(USER_SPACE_MARKER), timeout=BOOT_TIMEOUT)
    assert linux.shell("echo $((6 * 7))").strip() == "42"


def test_virtio_blk_probes_every_slot(linux):
    text = linux.text()
    capacity = linux.data_disk.stat().st_size // SECTOR
    assert re.search(rf"\[vda\] {capacity} 512-byte logical blocks", text)
    for name in "bcdef":
        assert re.search(rf"\[vd{name}\] 0 512-byte logical blocks", text)
    assert linux.shell("cat /sys/block/vda/size").strip() == str(capacity)
    assert linux.shell("cat /sys/block/vda/serial").strip() == "DATA-DISK"


def test_cpu_model_name_is_the_hosts(linux):
    """StratoVirt's users check the guest's model name against the host's (-cpu host)."""
    guest = linux.shell("grep -m1 'model name' /proc/cpuinfo")
    assert guest.strip().split(":", 1)[1].strip() == host_cpuinfo()["model name"].strip()


def test_both_vcpus_are_online(linux):
    assert "smp: Brought up 1 node, 2 CPUs" in linux.text()
    assert linux.shell("cat /sys/devices/system/cpu/online").strip() == "0-1"


def test_query_cpus_gives_real_vcpu_threads(linux):
    cpus = linux.execute("query-cpus")["return"]
    tasks = {int(t) for t in os.listdir(f"/proc/{linux.process.pid}/task")}
    assert [c["CPU"] for c in cpus] == [0, 1]
    assert {c["thread_id"] for c in cpus} <= tasks and cpus[0]["thread_id"] != cpus[1]["thread_id"]
    assert linux.execute("query-status")["return"] == {
        "running": True, "singlestep": False, "status": "running"}


def test_stop_freezes_the_shell_until_cont(linux):
    assert linux.execute("stop") == {"return": {}}
    assert linux.events[-1]["event"] == "STOP"
    start = len(linux.text())
    assert linux.process.stdin is not None
    linux.process.stdin.write(b"echo resumed-$((40 + 2))\n")
    linux.process.stdin.flush()
    time.sleep(3)
    assert "resumed-42" not in linux.text()[start:]  # a paused guest runs nothing
    assert linux.execute("cont") == {"return": {}}
    assert linux.events[-1]["event"] == "RESUME"
    linux.wait_for("resumed-42", start=start)


def test_guest_writes_to_ext4_reach_the_image(linux):
    output = linux.shell("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && "
                         "echo written-by-the-guest > /mnt/hello.txt && umount /mnt && "
                         "echo mount-ok")
    assert "mount-ok" in output, output
    dump = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(linux.data_disk)],
                          capture_output=True, timeout=60)
    assert dump.stdout.strip() == b"written-by-the-guest"


def test_hot_plug_unplug_and_data(linux):
    image = linux.workdir / "hot.img"
    with open(image, "wb") as file:
        file.truncate(8 << 20)
    start = len(linux.text())
    assert linux.execute("blockdev-add", **{
        "node-name": "drive-0", "file": {"driver": "file", "filename": str(image)},
        "cache": {"direct": True}, "read-only": False}) == {"return": {}}
    assert linux.execute("device_add", id="drive-0", driver="virtio-blk-mmio",
                         addr="0x1") == {"return": {}}
    linux.wait_for(r"vdb: detected capacity change from 0 to 16384", start=start)
    assert linux.shell("cat /sys/block/vdb/size").strip() == "16384"
    linux.shell("echo hot-plugged-data | dd of=/dev/vdb bs=512 conv=sync 2>/dev/null; sync")
    reply = linux.execute("device_del", id="drive-0")
    assert reply == {"return": {}}
    assert linux.events[-1]["event"] == "DEVICE_DELETED"
    assert linux.events[-1]["data"] == {"device": "drive-0", "path": "drive-0"}
    linux.wait_for(r"vdb: detected capacity change from 16384 to 0", start=start)
    assert image.read_bytes()[:17] == b"hot-plugged-data\n"


def test_quit_ends_the_vm(linux):
    assert linux.execute("quit") == {"return": {}}
    shutdown = linux._qmp_line()
    assert shutdown["event"] == "SHUTDOWN"
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert linux.process.wait(timeout=60) == 0
    assert not linux.qmp_path.exists()


def test_bzimage_boots_and_the_guest_powers_off(tmp_path):
    """The same kernel as a bzImage (protected-mode part at 1 MiB, 64-bit entry); poweroff.

    Without ACPI, the project's kernel powers off through the i8042 reset line
    (kernel-configs/patches/0004), which ends the VM with status 0.
    """
    bzimage = GUEST / "bzImage"
    if not bzimage.exists():
        pytest.fail(f"{bzimage} is missing: run scripts/build-guest-kernel")
    artifacts = ARTIFACTS / "linux-guest"
    artifacts.mkdir(parents=True, exist_ok=True)
    guest = LinuxGuest(tmp_path, artifacts / "serial-bzimage.log", "-kernel", str(bzimage))
    try:
        guest.wait_for(re.escape(USER_SPACE_MARKER), timeout=BOOT_TIMEOUT)
        guest.shell("echo ready")  # the shell is reading its terminal now
        assert guest.process.stdin is not None
        guest.process.stdin.write(b"poweroff -f\n")
        guest.process.stdin.flush()
        assert guest.process.wait(timeout=120) == 0
        guest.reader.join(10)
        assert "reboot: Power down" in guest.text()
        stderr = guest.process.stderr.read() if guest.process.stderr else b""
        assert b"VM exits: guest requested a reset" in stderr
    finally:
        guest.stop()


@pytest.mark.parametrize("kernel", [
    KERNEL,
    # tinyconfig's SLOB allocator: kmalloc'ed indirect descriptor tables are
    # only 8-byte aligned, which the virtio spec allows.
    TINY_KERNEL,
], ids=["microvm", "tinyconfig-slob"])
def test_root_disk_with_root_dev_vda(tmp_path, kernel):
    """No initramfs: the ext4 image on vda is the root file system, mounted read-write."""
    if not kernel.exists():
        pytest.fail(f"{kernel} is missing: run scripts/setup")
    root = tmp_path / "root.ext4"
    shutil.copy(ROOTFS, root)
    artifacts = ARTIFACTS / "linux-guest"
    artifacts.mkdir(parents=True, exist_ok=True)
    name = "root-disk" if kernel == KERNEL else "root-disk-tiny"
    monitor_log = artifacts / f"monitor-{name}.log"
    with open(monitor_log, "wb") as stderr:
        process = subprocess.Popen(
            [*MONITOR, "-kernel", str(kernel), "-m", "256", "-serial", "stdio",
             "-append", "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw",
             "-drive", f"id=rootfs,file={root},direct=off",
             "-device", "virtio-blk-device,drive=rootfs,id=rootfs"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=monitor_env())
    log = bytearray()
    try:
        assert process.stdout is not None and process.stdin is not None
        deadline = time.monotonic() + BOOT_TIMEOUT

        def read_until(pattern: bytes, start: int = 0) -> int:
            while (found := log.find(pattern, start)) < 0:
                assert time.monotonic() < deadline, log[-2000:]
                # A device the monitor gave up on never answers: fail now, not at the timeout.
                assert b"guest error" not in monitor_log.read_bytes(), monitor_log.read_text()
                if select.select([process.stdout], [], [], 1)[0]:
                    chunk = os.read(process.stdout.fileno(), 65536)
                    assert chunk, log[-2000:]
                    log.extend(chunk)
            return found + len(pattern)

        # Typed before the shell's prompt, input can be lost when it sets up the terminal.
        read_until(b"# ", read_until(USER_SPACE_MARKER.encode()))
        # Leaving the shell makes init reboot, which ends the VM.
        process.stdin.write(b"echo on-the-root-disk > /proof.txt; sync; exit\n")
        process.stdin.flush()
        read_until(b"shell exited, rebooting")
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        (artifacts / f"serial-{name}.log").write_bytes(bytes(log))
    assert b"EXT4-fs (vda): mounted filesystem" in log
    # The guest reboots without unmounting: its last changes may be only in the
    # journal, which debugfs does not read.  e2fsck replays it (and checks the rest).
    fsck = subprocess.run(["e2fsck", "-fy", str(root)], capture_output=True, timeout=120)
    assert fsck.returncode in (0, 1), fsck.stdout.decode()  # 1: the journal was replayed
    dump = subprocess.run(["debugfs", "-R", "cat /proof.txt", str(root)], capture_output=True,
                          timeout=60)
    assert dump.stdout.strip() == b"on-the-root-disk"
