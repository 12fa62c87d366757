"""virtio-net with the freestanding guest, on QEMU microvm (the reference) and on our monitor.

Everything runs inside a network namespace of its own (tests/netns.py): the taps, the
monitor or QEMU (under `ip netns exec`) and the host's end of the link, tests/net_peer.py,
an AF_PACKET socket bound to the tap.  Frames carry ethertype 0x88b5 and the test pattern
of tests/guest/net_pattern.h; nothing is ever sent to an address outside the namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MONITOR, Qmp, monitor_env
from tests.netns import NetNamespace, net_namespace, netns_unavailable

pytestmark = pytest.mark.kvm

PEER = str(Path(__file__).resolve().parent.parent / "net_peer.py")
MACS = ["52:54:00:5e:00:01", "52:54:00:5e:00:02"]
QEMU = "qemu-system-x86_64"
MONITORS = ["qemu", "ours"]


def host_is_pvm() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


@pytest.fixture(params=MONITORS)
def monitor(request) -> str:
    if request.param == "qemu":
        require_qemu()
    return request.param


def require_qemu() -> None:
    if shutil.which(QEMU) is not None:
        return
    # The reference needs QEMU: CI must install qemu-system-x86 (apt-get) before the tests.
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {QEMU} is not installed (apt-get install qemu-system-x86)")
    pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with net_namespace("svnet") as namespace:
        yield namespace


def add_tap(ns: NetNamespace, name: str) -> str:
    ns.add_tap(name)
    # No IPv6 on the tap: nothing but the test's own frames travels on it.
    ns.run(["sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{name}/disable_ipv6"])
    return name


def machine_argv(monitor: str, guest: Path, append: str, taps: list[str], *,
                 qmp: Path | None = None, disk: Path | None = None) -> list[str]:
    """The command line of `monitor` for the guest with one NIC per tap (MACs from MACS)."""
    if monitor == "qemu":
        cpu = "host,-arch-capabilities" if host_is_pvm() else "host"
        argv = [QEMU, "-enable-kvm",
                "-M", "microvm,acpi=off,kernel_irqchip=on,pit=on,pic=on,rtc=off",
                "-cpu", cpu, "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
                "-no-reboot", "-serial", "stdio", "-kernel", str(guest), "-append", append,
                "-global", "virtio-mmio.force-legacy=false"]
        if disk:
            argv += ["-drive", f"id=d0,file={disk},format=raw,if=none",
                     "-device", "virtio-blk-device,drive=d0"]
        for i, tap in enumerate(taps):
            argv += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no,vhost=off",
                     "-device", f"virtio-net-device,netdev=n{i},mac={MACS[i]}"]
        if qmp:
            argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        return argv
    argv = [*MONITOR, "-kernel", str(guest), "-append", append, "-serial", "stdio"]
    if disk:
        argv += ["-drive", f"id=d0,file={disk},direct=off",
                 "-device", "virtio-blk-device,drive=d0,id=d0"]
    for i, tap in enumerate(taps):
        argv += ["-netdev", f"tap,id=n{i},ifname={tap}",
                 "-device", f"virtio-net-device,netdev=n{i},id=net{i},mac={MACS[i]}"]
    if qmp:
        argv += ["-qmp", f"unix:{qmp},server,nowait"]
    return argv


class Guest:
    """A running machine in the namespace; its serial lines are collected by a thread."""

    def __init__(self, ns: NetNamespace, argv: list[str], log: Path) -> None:
        self.log = log
        self.stderr = open(log.with_suffix(".stderr"), "wb")  # noqa: SIM115 (closed in close)
        self.process = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.stderr, env=monitor_env())
        self.lines: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with open(self.log, "w") as log:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                with self.changed:
                    self.lines.append((time.monotonic(), line))
                    self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "\n".join(line for _, line in self.lines)

    def wait_line(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[str]:
        """The first serial line from index `start` on that matches `pattern` (re.search)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for _, line in self.lines[start:]:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                finished = not self.reader.is_alive()
                why = "the machine exited" if finished else "timeout"
                assert left > 0 and not finished, (
                    f"no line matching {pattern!r} ({why}); output:\n"
                    f"{self.output_unlocked()}\nstderr:\n{self.stderr_text()}")
                self.changed.wait(min(left, 0.5))

    def output_unlocked(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def line_time(self, pattern: str) -> float:
        regex = re.compile(pattern)
        with self.changed:
            return next(t for t, line in self.lines if regex.search(line))

    def stderr_text(self) -> str:
        self.stderr.flush()
        return self.log.with_suffix(".stderr").read_text(errors="replace")[-4000:]

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self.reader.join(10)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.reader.join(10)
        self.stderr.close()


@contextlib.contextmanager
def guest_running(ns: NetNamespace, argv: list[str], log: Path) -> Iterator[Guest]:
    guest = Guest(ns, argv, log)
    try:
        yield guest
    finally:
        guest.close()


class Peer:
    """tests/net_peer.py in the namespace: JSON lines, the first once its socket is bound."""

    def __init__(self, ns: NetNamespace, *args: str) -> None:
        self.process = ns.popen([sys.executable, PEER, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        assert first and "ready" in json.loads(first), (first, self.process.stderr.read())

    def results(self, timeout: float = 60) -> list[dict]:
        out, _ = self.process.communicate(timeout=timeout)
        assert self.process.returncode is not None
        return [json.loads(line) for line in out.splitlines() if line]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.communicate(timeout=10)


@contextlib.contextmanager
def peer(ns: NetNamespace, *args: str) -> Iterator[Peer]:
    p = Peer(ns, *args)
    try:
        yield p
    finally:
        p.stop()


def qmp_call(qmp: Qmp, command: str, arguments: dict) -> dict:
    """Like Qmp.execute, for arguments that clash with its own (set_link's `name`)."""
    qmp.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
    while "event" in (message := qmp.read()):
        qmp.events.append(message)
    return message


def fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def guest_line(output: str, prefix: str) -> str:
    for line in output.splitlines():
        if line.startswith("svtest: " + prefix):
            return line[len("svtest: "):]
    raise AssertionError(f"no line 'svtest: {prefix}...' in:\n{output}")


# ---------------------------------------------------------------- tests

def test_net_info(monitor, ns, svtest_guest, artifact_dir):
    tap = add_tap(ns, "tap0")
    argv = machine_argv(monitor, svtest_guest, "svtest.action=net-info", [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}.log") as guest:
        assert guest.wait_exit() == 0, guest.output
    out = guest.output
    nic0 = fields(guest_line(out, "net-info nic=0 "))
    assert nic0["mac"] == MACS[0] and nic0["link"] == "up", out
    accepted = int(nic0["accepted"], 16)
    for bit in (32, 5, 16, 15):  # VERSION_1, MAC, STATUS, MRG_RXBUF
        assert accepted >> bit & 1, f"feature {bit} not negotiated: {nic0}"
    assert nic0["rx-queue-size"] == nic0["tx-queue-size"] == "64"
    if monitor == "ours":
        # Two NIC slots after the six disk slots; the one without a tap has its link down.
        assert fields(guest_line(out, "net-info nics="))["nics"] == "2"
        assert nic0["index"] == "6" and nic0["irq"] == "11"
        nic1 = fields(guest_line(out, "net-info nic=1 "))
        assert nic1["index"] == "7" and nic1["irq"] == "12" and nic1["link"] == "down"
    else:
        assert fields(guest_line(out, "net-info nics="))["nics"] == "1"


@pytest.mark.parametrize("size", [60, 1514])
def test_guest_frames_arrive_on_the_tap_intact(monitor, ns, svtest_guest, artifact_dir, size):
    tap = add_tap(ns, "tap0")
    count = 60
    argv = machine_argv(monitor, svtest_guest,
                        f"svtest.action=net-send svtest.count={count} svtest.size={size}", [tap])
    with peer(ns, "recv", "--iface", tap, "--count", str(count), "--timeout", "60") as p, \
            guest_running(ns, argv, artifact_dir / f"{monitor}-{size}.log") as guest:
        assert guest.wait_exit() == 0, guest.output
        frames = p.results()
    out = guest.output
    assert f"net-send done frames={count} bytes={count * size}" in out, out
    assert frames[-1] == {"done": count}
    received = frames[:-1]
    assert [f["seq"] for f in received] == list(range(count))
    assert all(f["ok"] and f["len"] == size for f in received), received
    assert {(f["src"], f["dst"]) for f in received} == {(MACS[0], "ff:ff:ff:ff:ff:ff")}


@pytest.mark.parametrize(("size", "options"), [
    (60, ""),
    (1514, ""),
    (1514, "svtest.mrg_rxbuf=0 svtest.event_idx=0"),
    (1514, "svtest.offload=1 svtest.queue_size=8"),
    (5000, ""),  # spans three 2 KiB buffers: merged rx buffers
], ids=["60", "1514", "1514-no-mrg-no-event-idx", "1514-offload-queue-8", "5000-merged"])
def test_host_frames_arrive_in_the_guest(monitor, ns, svtest_guest, artifact_dir, size, options):
    tap = add_tap(ns, "tap0")
    if size > 1514:
        ns.run(["ip", "link", "set", tap, "mtu", "9000"])
    count = 100
    argv = machine_argv(monitor, svtest_guest,
                        f"svtest.action=net-recv svtest.count={count} {options}", [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}-{size}.log") as guest:
        buffers = 8 if "queue_size=8" in options else 64
        guest.wait_line(rf"net-recv ready .*buffers={buffers}")
        sent = ns.run([sys.executable, PEER, "send", "--iface", tap, "--count", str(count),
                       "--size", str(size), "--dst", MACS[0]])
        assert json.loads(sent.stdout.splitlines()[-1]) == {"sent": count}
        assert guest.wait_exit() == 0, guest.output
    out = guest.output
    done = fields(guest_line(out, "net-recv done"))
    assert (done["frames"], done["bad"], done["bytes"]) == (str(count), "0", str(count * size)), out
    if size > 2048 - 12:
        assert int(done["rx-buffers"]) == count * 3, out


def test_guest_reports_a_damaged_or_missing_frame(monitor, ns, svtest_guest, artifact_dir):
    """The guest's checks can fail: a flipped byte and a lost frame are both reported."""
    tap = add_tap(ns, "tap0")
    argv = machine_argv(monitor, svtest_guest, "svtest.action=net-recv svtest.count=4", [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}.log") as guest:
        guest.wait_line(r"net-recv ready ")
        ns.run([sys.executable, PEER, "send", "--iface", tap, "--count", "3", "--size", "100",
                "--dst", MACS[0], "--corrupt", "1"])
        ns.run([sys.executable, PEER, "send", "--iface", tap, "--count", "1", "--size", "100",
                "--dst", MACS[0], "--first-seq", "7"])
        assert guest.wait_exit() == 0, guest.output
    out = guest.output
    assert "net-recv bad frame=1 seq=1 want-seq=1 len=100 why=pattern offset=40" in out, out
    assert "net-recv bad frame=3 seq=7 want-seq=3 len=100 why=seq" in out, out
    assert "net-recv done frames=4 bad=2 " in out, out


def test_offload_features_follow_their_dependencies(monitor, ns, svtest_guest, artifact_dir):
    tap = add_tap(ns, "tap0")
    argv = machine_argv(monitor, svtest_guest, "svtest.action=net-info svtest.offload=1", [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}.log") as guest:
        assert guest.wait_exit() == 0, guest.output
    nic0 = fields(guest_line(guest.output, "net-info nic=0 "))
    offered, accepted = int(nic0["offered"], 16), int(nic0["accepted"], 16)
    assert accepted & ~offered == 0, nic0
    csum, guest_csum, guest_tso4, host_tso4, mrg = 0, 1, 7, 11, 15
    assert accepted >> csum & 1 == offered >> csum & 1
    assert accepted >> guest_csum & 1 == offered >> guest_csum & 1
    if accepted >> host_tso4 & 1:
        assert accepted >> csum & 1
    if accepted >> guest_tso4 & 1:
        assert accepted >> guest_csum & 1 and accepted >> mrg & 1
    assert not accepted >> 17 & 1  # never CTRL_VQ: the driver has no control queue


def test_rx_back_pressure_loses_nothing(monitor, ns, svtest_guest, artifact_dir):
    """Frames written while the guest posts no rx buffer wait in the tap, none is lost."""
    tap = add_tap(ns, "tap0")
    count = 300  # below the tap's queue (qlen 1000): whatever is lost, the device lost
    argv = machine_argv(monitor, svtest_guest,
                        f"svtest.action=net-recv svtest.count={count} svtest.rxdelay=2000",
                        [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}.log") as guest:
        guest.wait_line(r"net-recv holding ")
        sent = ns.run([sys.executable, PEER, "send", "--iface", tap, "--count", str(count),
                       "--size", "200", "--dst", MACS[0]])
        sent_at = time.monotonic()
        assert json.loads(sent.stdout.splitlines()[-1]) == {"sent": count}
        guest.wait_line(r"net-recv ready ")
        # All of them were written before the guest had a single buffer.
        assert sent_at < guest.line_time(r"net-recv ready ")
        assert guest.wait_exit() == 0, guest.output
    done = fields(guest_line(guest.output, "net-recv done"))
    assert (done["frames"], done["bad"]) == (str(count), "0"), guest.output


def test_echo_round_trips(monitor, ns, svtest_guest, artifact_dir):
    tap = add_tap(ns, "tap0")
    count = 30
    argv = machine_argv(monitor, svtest_guest, "svtest.action=net-echo", [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}.log") as guest:
        guest.wait_line(r"net-echo ready ")
        result = ns.run([sys.executable, PEER, "ping", "--iface", tap, "--count", str(count),
                         "--size", "300", "--dst", MACS[0], "--timeout", "10"], check=False)
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary["ok"] == count and not summary["bad"], summary
        assert guest.wait_exit() == 0, guest.output
    assert f"net-echo done frames={count} " in guest.output, guest.output


def test_net_bench_tx_and_rx(monitor, ns, svtest_guest, artifact_dir):
    tap = add_tap(ns, "tap0")
    count = 500
    bench = "svtest.action=net-bench svtest.dir="
    argv = machine_argv(monitor, svtest_guest, f"{bench}tx svtest.size=64 svtest.count={count}",
                        [tap])
    with peer(ns, "recv", "--iface", tap, "--count", str(count), "--timeout", "60") as p, \
            guest_running(ns, argv, artifact_dir / f"{monitor}-tx.log") as guest:
        assert guest.wait_exit() == 0, guest.output
        frames = p.results()
    assert f"net-bench done frames={count} bytes={count * 64} errors=0" in guest.output
    assert frames[-1] == {"done": count} and all(f["ok"] for f in frames[:-1])

    argv = machine_argv(monitor, svtest_guest, f"{bench}rx svtest.size=128 svtest.count={count}",
                        [tap])
    with guest_running(ns, argv, artifact_dir / f"{monitor}-rx.log") as guest:
        guest.wait_line(r"net-bench start dir=rx size=128 count=500")
        ns.run([sys.executable, PEER, "send", "--iface", tap, "--count", str(count),
                "--size", "128", "--dst", MACS[0]])
        assert guest.wait_exit() == 0, guest.output
    out = guest.output
    assert f"net-bench done frames={count} bytes={count * 128} errors=0" in out, out
    assert re.search(r"net-bench guest-ms=\d+ tsc-ticks=\d+", out), out


def test_link_follows_set_link_on_qemu(ns, svtest_guest, artifact_dir, tmp_path):
    """QEMU's set_link drives the status field and a config interrupt, as our hot-plug should."""
    require_qemu()
    tap = add_tap(ns, "tap0")
    qmp_path = tmp_path / "qmp.sock"
    argv = machine_argv("qemu", svtest_guest, "svtest.action=net-watch svtest.changes=2", [tap],
                        qmp=qmp_path)
    with guest_running(ns, argv, artifact_dir / "qemu.log") as guest:
        guest.wait_line(r"net-watch nic=0 .*link=up .*status-feature=1")
        qmp = Qmp(qmp_path)
        assert qmp.execute("qmp_capabilities") == {"return": {}}
        assert qmp_call(qmp, "set_link", {"name": "n0", "up": False}) == {"return": {}}
        guest.wait_line(r"net-link nic=0 down config-irq=1")
        assert qmp_call(qmp, "set_link", {"name": "n0", "up": True}) == {"return": {}}
        guest.wait_line(r"net-link nic=0 up config-irq=1")
        assert guest.wait_exit() == 0, guest.output
    assert "net-watch done changes=2" in guest.output


def test_link_follows_hot_plug_on_ours(ns, svtest_guest, artifact_dir, tmp_path):
    """The second NIC slot starts empty (link down); device_add brings it up, device_del down."""
    tap0, tap1 = add_tap(ns, "tap0"), add_tap(ns, "tap1")
    qmp_path = tmp_path / "qmp.sock"
    argv = machine_argv("ours", svtest_guest,
                        "svtest.action=net-watch svtest.nic=1 svtest.changes=2", [tap0],
                        qmp=qmp_path)
    with guest_running(ns, argv, artifact_dir / "ours.log") as guest:
        guest.wait_line(r"net-watch nic=1 .*link=down")
        qmp = Qmp(qmp_path)
        assert qmp.execute("netdev_add", id="n1", ifname=tap1) == {"return": {}}
        assert qmp.execute("device_add", id="n1", driver="virtio-net-mmio",
                           addr="0x1") == {"return": {}}
        guest.wait_line(r"net-link nic=1 up config-irq=1 .*mac=52:54:00:")
        assert "return" in qmp.execute("device_del", id="n1")
        guest.wait_line(r"net-link nic=1 down config-irq=1")
        assert guest.wait_exit() == 0, guest.output
    assert "net-watch done changes=2" in guest.output


def test_hot_plugged_nic_moves_frames_on_ours(ns, svtest_guest, artifact_dir, tmp_path):
    """A driver that set up the empty slot's queues gets frames once a tap is plugged in."""
    tap0, tap1 = add_tap(ns, "tap0"), add_tap(ns, "tap1")
    qmp_path = tmp_path / "qmp.sock"
    argv = machine_argv("ours", svtest_guest, "svtest.action=net-echo svtest.nic=1", [tap0],
                        qmp=qmp_path)
    with guest_running(ns, argv, artifact_dir / "ours.log") as guest:
        mac = guest.wait_line(r"net-echo ready nic=1 mac=(\S+) link=down").group(1)
        qmp = Qmp(qmp_path)
        assert qmp.execute("netdev_add", id="n1", ifname=tap1) == {"return": {}}
        assert qmp.execute("device_add", id="n1", driver="virtio-net-mmio",
                           addr="0x1") == {"return": {}}
        # The slot keeps the MAC the guest read before the plug.
        result = ns.run([sys.executable, PEER, "ping", "--iface", tap1, "--count", "10",
                         "--size", "100", "--dst", mac, "--timeout", "10"], check=False)
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary["ok"] == 10 and not summary["bad"], summary
        assert guest.wait_exit() == 0, guest.output
    assert "net-echo done frames=10 " in guest.output, guest.output


def sector_pattern(seed: int, sector: int, count: int) -> bytes:
    """The guest's host pattern: byte i of sector s is (seed*131 + s*7 + i) & 0xff."""
    return b"".join(bytes((seed * 131 + s * 7 + i) & 0xFF for i in range(512))
                    for s in range(sector, sector + count))


def test_hostile_guest_leaves_the_machine_working(monitor, ns, svtest_guest, artifact_dir,
                                                  tmp_path):
    """Malformed chains on NIC 0: the device survives each, recovers after a reset, and the
    other NIC, a disk and QMP still work afterwards."""
    tap0, tap1 = add_tap(ns, "tap0"), add_tap(ns, "tap1")
    disk = tmp_path / "disk.img"
    disk.write_bytes(sector_pattern(5, 0, 8) + bytes(1 << 20))
    qmp_path = tmp_path / "qmp.sock"
    append = ("svtest.action=net-hostile svtest.hostile_other=1 svtest.hostile_blk=0 "
              "svtest.seed=5 svtest.hostile_end=halt")
    argv = machine_argv(monitor, svtest_guest, append, [tap0, tap1], qmp=qmp_path, disk=disk)
    with peer(ns, "echo", "--iface", tap0, "--timeout", "300"), \
            peer(ns, "echo", "--iface", tap1, "--timeout", "300"), \
            guest_running(ns, argv, artifact_dir / f"{monitor}.log") as guest:
        guest.wait_line(r"net-hostile done cases=\d+", timeout=240)
        qmp = Qmp(qmp_path)
        assert qmp.execute("qmp_capabilities") == {"return": {}}
        assert qmp.execute("query-status")["return"]["status"] == "running"
        qmp.execute("quit")
        guest.wait_exit(30)
    out = guest.output
    assert "FAIL" not in out, out
    cases = [fields(line) | {"case": line.split()[1]}
             for line in out.splitlines() if re.match(r"svtest: net-hostile \S+ status=", line)]
    assert len(cases) >= 17, out
    for case in cases:
        assert case["canary"] == "ok" and case["ring-intact"] == "1", case
        assert case.get("served", "1") == "1" or case["needs-reset"] == "1", case
    recovered = re.findall(r"net-hostile (\S+) recovered=(\d)", out)
    assert len(recovered) == len(cases) and all(r == "1" for _, r in recovered), recovered
    assert "net-hostile other-nic=1 ok" in out
    assert "net-hostile disk=0 ok" in out
