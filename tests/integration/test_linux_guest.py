"""The project's Linux guest on real KVM: boot to user space, shell, virtio-blk, QMP, hot-plug.

Booting Linux takes tens of seconds on software-emulated hosts, so one guest
is shared by every test in this module, in order.  Its serial log is kept in
test-artifacts/linux-guest/serial.log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS
from tests.helpers import MONITOR, REPO, host_cpuinfo, monitor_env
from tests.netns import net_namespace

pytestmark = pytest.mark.linux

GUEST = REPO / "build" / "guest"
KERNEL, INITRAMFS, ROOTFS = GUEST / "vmlinux", GUEST / "initramfs.cpio", GUEST / "rootfs.ext4"
TINY_KERNEL = GUEST / "tiny" / "vmlinux"  # scripts/build-guest-kernel tiny
BOOT_TIMEOUT = 600
USER_SPACE_MARKER = "stratovirt-py guest: user space ready"
SECTOR = 512
TAPS = ("tap0", "tap1")  # in the test's namespace, for eth0 and eth1
HOST_ADDRESSES = ("10.0.2.1", "10.0.3.1")
GUEST_ADDRESSES = ("10.0.2.15", "10.0.3.15")
TRANSFER_BYTES = 128 << 10


class LinuxGuest:
    """A booted Linux guest: console over the monitor's stdio, QMP on a socket."""

    def __init__(self, workdir: Path, log_path: Path, *args: str,
                 prefix: tuple[str, ...] = ()) -> None:
        self.qmp_path = workdir / "qmp.sock"
        self.log_path = log_path
        self.log = bytearray()
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [*prefix, *MONITOR, "-kernel", str(KERNEL), "-initrd", str(INITRAMFS), "-m", "256",
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
    # The guest's NICs reach only taps in a namespace of the test's own.
    with net_namespace() as namespace:
        for tap, address in zip(TAPS, HOST_ADDRESSES, strict=True):
            namespace.add_tap(tap, f"{address}/24")
        guest = LinuxGuest(workdir, artifacts / "serial.log", "-smp", "2",
                           "-drive", f"id=data,file={data_disk},direct=off,serial=DATA-DISK",
                           "-device", "virtio-blk-device,drive=data,id=data",
                           "-device", "virtio-balloon-device,free-page-reporting=on",
                           # virtio-rng: /dev/hwrng (its checks: test_hwrng_*)
                           "-object", "rng-random,id=rng0,filename=/dev/urandom",
                           "-device", "virtio-rng-device,rng=rng0,id=vrng0",
                           prefix=tuple(namespace.exec_prefix))
        guest.workdir = workdir  # type: ignore[attr-defined]
        guest.data_disk = data_disk  # type: ignore[attr-defined]
        guest.namespace = namespace  # type: ignore[attr-defined]
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


def carrier(linux, index: int) -> str:
    return linux.shell(f"cat /sys/class/net/eth{index}/carrier").strip()


def wait_for_carrier(linux, index: int, value: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while carrier(linux, index) != value:
        assert time.monotonic() < deadline, f"eth{index} carrier never became {value}"
        time.sleep(0.5)


def sha256_of(output: str, path: str) -> str:
    """sha256sum's answer for `path` (kernel messages may share the console)."""
    match = re.search(rf"\b([0-9a-f]{{64}})  {re.escape(path)}", output)
    assert match, output
    return match.group(1)


def ping(linux, index: int, count: int = 2) -> subprocess.CompletedProcess:
    return linux.namespace.run(["ping", "-c", str(count), "-W", "10", "-i", "0.5",
                                GUEST_ADDRESSES[index]], timeout=120, check=False)


def test_both_nics_exist_with_their_link_down_before_any_hot_plug(linux):
    for index in (0, 1):
        linux.shell(f"ip link set eth{index} up")
        assert carrier(linux, index) == "0"
    addresses = [linux.shell(f"cat /sys/class/net/eth{i}/address").strip() for i in (0, 1)]
    # Locally administered, unicast, and different.
    assert all(int(a[:2], 16) & 3 == 2 for a in addresses) and addresses[0] != addresses[1]


@pytest.mark.parametrize("index", [0, 1])
def test_nic_hot_plug_pings_and_moves_files_both_ways(linux, index, tmp_path):
    netdev = f"net-{index}"
    assert linux.execute("netdev_add", id=netdev, ifname=TAPS[index]) == {"return": {}}
    assert linux.execute("device_add", id=netdev, driver="virtio-net-mmio",
                         addr=f"{index:#x}") == {"return": {}}
    wait_for_carrier(linux, index, "1")
    # The guest's busybox `ip addr add` says "can't find device 'eth0'"; ifconfig works.
    linux.shell(f"ifconfig eth{index} {GUEST_ADDRESSES[index]} netmask 255.255.255.0 up")
    result = ping(linux, index)
    assert result.returncode == 0, result.stdout + result.stderr

    served = tmp_path / "served"
    served.write_bytes(os.urandom(TRANSFER_BYTES))
    peer = linux.namespace.popen(
        [sys.executable, "-m", "tests.http_peer", HOST_ADDRESSES[index], "8080", str(served)],
        stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert peer.stdout.readline().strip() == "ready"
        url = f"http://{HOST_ADDRESSES[index]}:8080"
        # host -> guest
        got = linux.shell(f"wget -q -O /tmp/in {url}/file && sha256sum /tmp/in", timeout=300)
        assert sha256_of(got, "/tmp/in") == hashlib.sha256(served.read_bytes()).hexdigest()
        # guest -> host
        # busybox wget posts a file as a C string: the data must hold no NUL, so base64.
        sent = linux.shell(f"dd if=/dev/urandom bs=1k count={TRANSFER_BYTES >> 10} 2>/dev/null "
                           f"| base64 > /tmp/out; sha256sum /tmp/out; wc -c < /tmp/out; "
                           f"wget -q -O /dev/null --post-file /tmp/out {url}/upload",
                           timeout=300)
        size = int(re.findall(r"^(\d+)\s*$", sent, re.MULTILINE)[-1])
        assert size > TRANSFER_BYTES
        assert peer.stdout.readline().split() == ["upload", sha256_of(sent, "/tmp/out"),
                                                  str(size)]
    finally:
        peer.kill()
        peer.wait()

    start = len(linux.events)
    assert linux.execute("device_del", id=netdev) == {"return": {}}
    assert {"device": netdev, "path": netdev} in [
        event["data"] for event in linux.events[start:] if event["event"] == "DEVICE_DELETED"]
    wait_for_carrier(linux, index, "0")
    assert ping(linux, index, count=1).returncode != 0

    # The netdev (and its tap) stayed: a new device_add brings the link back.
    assert linux.execute("device_add", id=netdev, driver="virtio-net-mmio",
                         addr=f"{index:#x}") == {"return": {}}
    wait_for_carrier(linux, index, "1")
    result = ping(linux, index)
    assert result.returncode == 0, result.stdout + result.stderr


def monitor_rss(linux) -> int:
    with open(f"/proc/{linux.process.pid}/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS:"))


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_free_page_reporting_gives_freed_memory_back_without_a_command(linux):
    before = monitor_rss(linux)
    # dd fills a 64 MiB buffer (more than the guest has touched since boot, so the host must
    # back most of it) and frees it when it exits. Filling takes a while on emulating hosts.
    linux.shell("dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null & :")
    wait_until(lambda: monitor_rss(linux) - before > 48 << 20, 600,
               f"the guest's buffer never showed in the monitor's RSS ({before >> 20} MiB)")
    wait_until(lambda: monitor_rss(linux) - before < 24 << 20, 300,
               f"the freed memory never came back: RSS {monitor_rss(linux) >> 20} MiB, "
               f"{before >> 20} MiB before")


def test_balloon_takes_memory_from_the_guest_and_gives_it_back(linux):
    ram = 256 << 20
    assert linux.execute("query-balloon") == {"return": {"actual": ram}}
    linux.shell("dd if=/dev/zero of=/dev/null bs=48M count=1 2>/dev/null", timeout=300)
    start = len(linux.events)
    target = ram - (64 << 20)
    assert linux.execute("balloon", value=target) == {"return": {}}
    wait_until(lambda: linux.execute("query-balloon")["return"]["actual"] == target, 300,
               "the guest never reached the balloon target")

    def changed_to_target() -> bool:
        linux.execute("query-status")  # collects the events sent meanwhile
        return {"actual": target} in [e["data"] for e in linux.events[start:]
                                      if e["event"] == "BALLOON_CHANGED"]

    # Events come at most once a second: the last value follows within that second.
    wait_until(changed_to_target, 30, "no BALLOON_CHANGED with the target")
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", linux.shell("cat /proc/meminfo")).group(1))
    assert total_kb << 10 < target  # the guest really gave the memory up
    # Above the boot size means the boot size: everything comes back.
    assert linux.execute("balloon", value=ram * 4) == {"return": {}}
    wait_until(lambda: linux.execute("query-balloon")["return"]["actual"] == ram, 300,
               "the guest never took its memory back")
    stats_path = "/machine/peripheral/balloon0"
    assert linux.execute("qom-set", path=stats_path, property="guest-stats-polling-interval",
                         value=1) == {"return": {}}
    wait_until(lambda: linux.execute("qom-get", path=stats_path, property="guest-stats")[
        "return"]["stats"]["stat-total-memory"] > 0, 60, "no statistics from the guest")


# --- virtio-rng ---

def test_hwrng_is_the_virtio_rng(linux):
    assert linux.shell("cat /sys/class/misc/hw_random/rng_current").strip() == "virtio_rng.0"


def last_line(output: str) -> str:
    # A long command line wraps on the console, so its echo may not be cut off whole.
    return output.strip().splitlines()[-1].strip()


def test_hwrng_gives_bytes_before_and_after_stop_and_cont(linux):
    read = "dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c"
    digest = "dd if=/dev/hwrng bs=64 count=1 2>/dev/null | md5sum"
    assert last_line(linux.shell(read)) == "256"
    before = last_line(linux.shell(digest)).split()[0]
    assert linux.execute("stop") == {"return": {}}
    time.sleep(1)
    assert linux.execute("cont") == {"return": {}}
    assert last_line(linux.shell(read)) == "256"
    after = last_line(linux.shell(digest)).split()[0]
    assert len(before) == len(after) == 32 and before != after  # fresh bytes each time


# --- end virtio-rng ---


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
