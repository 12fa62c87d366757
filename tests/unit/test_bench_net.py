"""The net benchmark's parsing, bookkeeping and host peer (no KVM).

The peer's raw-frame modes run against a tap this test opens itself, inside a
namespace it creates (root only, like every network test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import harness, net, netpeer
from benchmarks.__main__ import parse_args
from benchmarks.metrics import (
    FRAME_WORKLOADS,
    LINUX_NET_METRICS,
    METRICS,
    FrameWorkload,
    ProbeError,
    SerialWatcher,
)
from tests.netns import net_namespace, netns_unavailable
from tests.unit.test_bench_stats import _arrivals

REPO = Path(__file__).resolve().parents[2]

PING_OUTPUT = """PING 10.0.2.15 (10.0.2.15) 56(84) bytes of data.
64 bytes from 10.0.2.15: icmp_seq=1 ttl=64 time=1.92 ms
64 bytes from 10.0.2.15: icmp_seq=2 ttl=64 time=0.871 ms
64 bytes from 10.0.2.15: icmp_seq=2 ttl=64 time=0.990 ms (DUP!)
64 bytes from 10.0.2.15: icmp_seq=3 ttl=64 time=1.05 ms

--- 10.0.2.15 ping statistics ---
3 packets transmitted, 3 received, +1 duplicates, 0% packet loss, time 402ms
rtt min/avg/max/mdev = 0.871/1.280/1.920/0.462 ms
"""


def test_ping_replies_and_their_median():
    result = net.parse_ping(PING_OUTPUT)
    assert result.rtts_ms == [1.92, 0.871, 1.05]
    assert (result.transmitted, result.received) == (3, 3)
    assert result.median_ms == 1.05


def test_ping_with_lost_replies_counts_only_those_received():
    output = PING_OUTPUT.replace(
        "64 bytes from 10.0.2.15: icmp_seq=3 ttl=64 time=1.05 ms\n", "").replace(
        "3 received, +1 duplicates", "2 received, +1 duplicates")
    result = net.parse_ping(output)
    assert (result.transmitted, result.received, len(result.rtts_ms)) == (3, 2, 2)


@pytest.mark.parametrize("output, message", [
    ("ping: connect: Network is unreachable\n", "no ping summary"),
    (PING_OUTPUT.replace("3 received", "4 received"), "3 reply lines, summary says 4"),
])
def test_ping_output_that_does_not_add_up(output, message):
    with pytest.raises(ProbeError, match=message):
        net.parse_ping(output)


NET_START = b"svtest: net-bench start dir=tx size=64 count=20000\r\n"
NET_DONE = (b"svtest: net-bench done frames=20000 bytes=1280000 errors=0\r\n"
            b"svtest: net-bench guest-ms=240 tsc-ticks=600000000 notifies=33 ignored=0\r\n"
            b"svtest: done\r\n")


def test_net_bench_is_timed_from_the_start_newline_to_the_done_line():
    data, arrival_ns = _arrivals(b"svtest: hello\r\n" + NET_START, NET_DONE)
    result = net.parse_net_bench(data, arrival_ns)
    assert (result.direction, result.size, result.count) == ("tx", 64, 20000)
    assert (result.frames, result.bytes) == (20000, 1280000)
    assert result.seconds == 0.25
    assert result.frames_per_second == 80000.0
    assert result.as_dict()["host_ms"] == 250.0
    assert (result.guest_ms, result.notifies) == (240, 33)


def test_net_bench_without_the_guests_own_figures():
    done = b"svtest: net-bench done frames=20000 bytes=1280000 errors=0\r\nsvtest: done\r\n"
    data, arrival_ns = _arrivals(NET_START, done)
    result = net.parse_net_bench(data, arrival_ns)
    assert (result.frames, result.guest_ms, result.notifies) == (20000, None, None)


@pytest.mark.parametrize("output, message", [
    (NET_START + b"svtest: net-bench FAIL result=timeout frames=5\r\n", "FAIL result=timeout"),
    (b"svtest: net-bench FAIL init=no-nic\r\nsvtest: done\r\n", "FAIL init=no-nic"),
    (b"svtest: unknown-action=net-bench\r\nsvtest: done\r\n", "no 'svtest: net-bench start'"),
    (NET_START, "no 'svtest: net-bench done'"),
    (NET_START + b"svtest: net-bench done frames=19999 bytes=1279936 errors=0\r\n",
     "frames=19999.*count=20000"),
    (NET_START + b"svtest: net-bench done frames=20000 bytes=1280000 errors=2\r\n",
     "errors=2"),
    (NET_START + b"svtest: tick\r\n" + NET_DONE, "between the net-bench start and done"),
])
def test_net_bench_failures(output, message):
    data, arrival_ns = _arrivals(output[:len(NET_START)], output[len(NET_START):])
    with pytest.raises(ProbeError, match=message):
        net.parse_net_bench(data, arrival_ns)


def test_net_bench_done_in_the_same_read_as_the_start_newline_is_refused():
    data, arrival_ns = _arrivals(NET_START + NET_DONE)
    with pytest.raises(ProbeError, match="one read"):
        net.parse_net_bench(data, arrival_ns)


class FakeShell:
    """Answers typed commands the way busybox's shell on a console does: echo, output, marker."""

    def __init__(self, outputs: dict[str, tuple[int, bytes]]) -> None:
        self.console_read, self.console_write = os.pipe()
        self.input_read, input_write = os.pipe()
        self.stdin = os.fdopen(input_write, "wb")
        self.outputs = outputs
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with os.fdopen(self.input_read, "rb") as typed:
            for line in typed:
                # The echo, as a slow terminal gives it: in pieces.
                for i in range(0, len(line), 7):
                    os.write(self.console_write, line[i:i + 7].replace(b"\n", b"\r\n"))
                command, _, rest = line.decode().partition("; echo ")
                status, output = self.outputs[command]
                tag = rest.split("=")[0]
                os.write(self.console_write, output + f"{tag}={status}=end\r\n/ # ".encode())
        os.close(self.console_write)


def test_console_commands_report_status_and_output():
    shell = FakeShell({"uname": (0, b"Linux\r\n"), "false": (1, b""),
                       "ip link set eth0 up": (0, b"")})
    serial = SerialWatcher(shell.console_read, {})
    console = net.GuestConsole(shell.stdin, serial)
    try:
        assert console.run("uname", 10) == "Linux"
        with pytest.raises(ProbeError, match="'false' exited with 1"):
            console.run("false", 10)
        waiting = console.start("ip link set eth0 up")
        assert waiting(10) == (0, "")
    finally:
        shell.stdin.close()
        serial.join()
        os.close(shell.console_read)


def test_console_wait_gives_up_at_the_deadline():
    shell = FakeShell({})
    serial = SerialWatcher(shell.console_read, {})
    # Nothing is typed: the marker can never come.
    console = net.GuestConsole(open(os.devnull, "wb"), serial)  # noqa: SIM115
    try:
        with pytest.raises(ProbeError, match="in time"):
            console.start("sleep 100")(0.3)
    finally:
        shell.stdin.close()
        serial.join()
        os.close(shell.console_read)


def test_tcp_peers_count_every_byte_over_loopback(capsys):
    results = {}
    port = 45000 + os.getpid() % 10000
    size = 3 * netpeer.CHUNK + 123
    receiver = threading.Thread(target=lambda: results.update(
        recv=netpeer.recv("127.0.0.1", port, size, 20)))
    receiver.start()
    time.sleep(0.2)
    sent = netpeer.send("127.0.0.1", port, size, 20)
    receiver.join(20)
    got = results["recv"]
    assert got["bytes"] == sent["bytes"] == size
    assert got["accepted_ns"] <= got["first_ns"] <= got["last_ns"]
    assert sent["connected_ns"] <= sent["written_ns"] <= sent["closed_ns"]
    assert capsys.readouterr().out == "ready\nready\n"


def test_tcp_sender_retries_until_the_listener_is_up():
    port = 45000 + (os.getpid() + 1) % 10000
    results = {}

    def late_receiver():
        time.sleep(0.3)
        results["recv"] = netpeer.recv("127.0.0.1", port, 1000, 20)
    thread = threading.Thread(target=late_receiver)
    thread.start()
    sent = netpeer.send("127.0.0.1", port, 1000, 20)
    thread.join(20)
    assert sent["attempts"] > 1
    assert results["recv"]["bytes"] == 1000


class ScriptNamespace:
    """Stands in for a NetNamespace: runs a given Python script instead of the peer."""

    def __init__(self, script: str) -> None:
        self.script = script

    def popen(self, command, **kwargs):
        return subprocess.Popen([sys.executable, "-c", self.script], **kwargs)


def test_peer_lines_that_arrive_together_are_both_read():
    # Both lines in one write: the result must not wait for more output.
    script = "import os; os.write(1, b'ready\\n{\"sent\": 3}\\n'); import time; time.sleep(30)"
    with net.peer(ScriptNamespace(script), ["flood"], str(REPO)) as started:
        began = time.monotonic()
        assert started.result(20) == {"sent": 3}
        assert time.monotonic() - began < 5


@pytest.mark.parametrize("script, message", [
    ("print('ready'); print('{\"error\": \"OSError: no such device\"}')", "no such device"),
    ("print('ready')", "netpeer drain: b''"),
    ("print('ready'); print('not json')", "not json"),
])
def test_peer_failures_are_probe_errors(script, message):
    with net.peer(ScriptNamespace(script), ["drain"], str(REPO)) as started, \
            pytest.raises(ProbeError, match=message):
        started.result(10)


def test_frame_metrics_are_defined_for_every_workload():
    names = [w.metric for w in FRAME_WORKLOADS]
    assert len(names) == len(set(names))
    assert {"net.tx-64B", "net.rx-64B"} <= set(names)
    for workload in FRAME_WORKLOADS:
        info = METRICS[workload.metric]
        assert (info.group, info.unit, info.better) == ("net", "frames/s", "higher")
        assert workload.cmdline() == (
            f"svtest.action=net-bench svtest.dir={workload.direction} "
            f"svtest.size={workload.size} svtest.count={workload.count}")
    for name in LINUX_NET_METRICS:
        assert METRICS[name].group == "net"
    assert METRICS["net.ping-rtt"].better == "lower"
    assert METRICS["net.g2h-tcp"].unit == METRICS["net.h2g-tcp"].unit == "MB/s"


def test_nic_arguments_of_both_monitors():
    assert harness.MONITORS["ours"].nic("tap9") == [
        "-netdev", "tap,id=n0,ifname=tap9",
        "-device", "virtio-net-device,netdev=n0,id=net0"]
    qemu = harness.MONITORS["qemu"].nic("tap9")
    assert "tap,id=n0,ifname=tap9,script=no,downscript=no,vhost=off" in qemu
    assert qemu[:2] == ["-global", "virtio-mmio.force-legacy=false"]


def test_peer_arguments_and_checks_per_direction():
    tx, rx = FrameWorkload("tx", 64, 100), FrameWorkload("rx", 1514, 100)
    assert net.frame_peer_args(tx, "t0", 30)[0] == "drain"
    rx_args = net.frame_peer_args(rx, "t0", 30)
    assert rx_args[0] == "flood" and rx_args[rx_args.index("--size") + 1] == "1514"
    net.check_frame_peer(tx, {"frames": 100, "sample_sizes": [64]})
    with pytest.raises(ProbeError, match="saw 99"):
        net.check_frame_peer(tx, {"frames": 99, "sample_sizes": [64]})
    with pytest.raises(ProbeError, match=r"\[60\] bytes"):
        net.check_frame_peer(tx, {"frames": 100, "sample_sizes": [60]})
    net.check_frame_peer(rx, {"delivered": 150})
    with pytest.raises(ProbeError, match="took 80 frames"):
        net.check_frame_peer(rx, {"delivered": 80})


def _settings(groups):
    return harness.Settings(mem_mib=256, smp=1, qmp_requests=10, groups=frozenset(groups),
                            python=sys.executable, qemu="qemu-system-x86_64")


def _linux_guest():
    return harness.Guest(name="linux", kernel=Path("vmlinux"), initrd=Path("initrd"),
                         session_cmdline="console=ttyS0", ready=b"x", session_markers={},
                         boot_cmdline=None, settle_s=1, timeout_s=1)


def test_net_run_kinds_and_metrics_per_guest():
    svtest = harness.svtest_guest(Path("g"), 1.0, 30.0)
    assert harness.run_kinds(svtest, frozenset({"net"})) == [w.metric for w in FRAME_WORKLOADS]
    assert harness.expected_metrics(svtest, frozenset({"net"})) == [
        w.metric for w in FRAME_WORKLOADS]
    linux = _linux_guest()
    assert harness.run_kinds(linux, frozenset({"net"})) == ["net"]
    assert harness.run_kinds(linux, frozenset({"qmp", "net"})) == ["session", "net"]
    assert harness.expected_metrics(linux, frozenset({"net"})) == list(LINUX_NET_METRICS)
    assert harness.frame_workloads(linux, frozenset({"net"})) == []


def test_net_runs_get_the_nic_and_their_own_cmdline(monkeypatch, tmp_path):
    seen = []

    def fake_frames(record, monitor, guest, workload, workdir):
        seen.append((record.kind, workload))
        record.values[workload.metric] = 1000.0 + record.pair

    monkeypatch.setattr(harness, "run_net_frames", fake_frames)
    guest = harness.with_extra_cmdline(harness.svtest_guest(Path("g"), 1.0, 30.0),
                                       "svtest.irq=1")
    monitors = [harness.MONITORS["ours"], harness.MONITORS["qemu"]]
    records = harness.run_pairs(monitors, guest, _settings({"net"}), 2, 0, tmp_path)
    assert len(records) == 2 * len(FRAME_WORKLOADS) * 2
    first = records[0]
    assert first.kind == FRAME_WORKLOADS[0].metric
    assert first.argv[first.argv.index("-append") + 1] == (
        f"{FRAME_WORKLOADS[0].cmdline()} svtest.irq=1")
    assert "tap,id=n0,ifname=svpytap0" in first.argv
    assert [r.monitor for r in records[:2]] == ["ours", "qemu"]
    assert all(kind == workload.metric for kind, workload in seen)

    linux_seen = []
    monkeypatch.setattr(harness, "run_net_linux",
                        lambda record, *args: linux_seen.append(record))
    records = harness.run_pairs(monitors, _linux_guest(), _settings({"net"}), 1, 0, tmp_path)
    assert [r.kind for r in records] == ["net", "net"] and len(linux_seen) == 2
    assert records[1].argv[records[1].argv.index("-append") + 1].startswith("console=ttyS0")
    assert "tap,id=n0,ifname=svpytap0,script=no,downscript=no,vhost=off" in records[1].argv


def test_net_is_in_the_default_metrics_where_namespaces_work():
    for guest in ("svtest", "linux"):
        args = parse_args(["--guest", guest])
        assert ("net" in args.groups) == (netns_unavailable() is None)
        assert parse_args(["--guest", guest, "--metrics", "net"]).groups == {"net"}


# The raw-frame peers against a real tap, in a namespace of the test's own.

TUNSETIFF = 0x400454CA
IFF_TAP_NO_PI = 0x0002 | 0x1000

TAP_HELPER = f"""
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, {TUNSETIFF}, struct.pack("16sH", sys.argv[1].encode(), {IFF_TAP_NO_PI}))
print("open", flush=True)
if sys.argv[2] == "write":
    frame = b"\\xff" * 6 + b"\\x02" * 6 + b"\\x88\\xb5" + bytes(50)
    for _ in range(int(sys.argv[3])):
        os.write(fd, frame)
    print("wrote", flush=True)
else:
    sizes = set()
    for _ in range(int(sys.argv[3])):
        frame = os.read(fd, 65536)
        if frame[12:14] == b"\\x88\\xb5":
            sizes.add(len(frame))
    print(sorted(sizes), flush=True)
"""


@pytest.fixture
def namespace_with_tap():
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"host capability missing: {reason}")
    with net_namespace("svpy-unit") as namespace:
        yield namespace, net.prepare_namespace(namespace)


def _peer(namespace, *args):
    return namespace.popen([sys.executable, "-m", "benchmarks.netpeer", *args],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)


def test_flood_sends_nothing_before_go(namespace_with_tap):
    namespace, tap = namespace_with_tap
    flood = _peer(namespace, "flood", tap, "--timeout", "60")
    assert flood.stdout.readline() == "ready\n"
    time.sleep(0.2)
    flood.stdin.close()
    assert json.loads(flood.stdout.readline()) == {"error": "no 'go' line on stdin"}
    assert flood.wait(10) == 1
    stats = namespace.run(["cat", f"/sys/class/net/{tap}/statistics/tx_packets",
                           f"/sys/class/net/{tap}/statistics/tx_dropped"]).stdout.split()
    assert stats == ["0", "0"]


def test_drain_counts_every_frame_the_monitor_side_writes(namespace_with_tap):
    namespace, tap = namespace_with_tap
    drain = _peer(namespace, "drain", tap, "--timeout", "60")
    assert drain.stdout.readline() == "ready\n"
    writer = namespace.run([sys.executable, "-c", TAP_HELPER, tap, "write", "5000"])
    assert writer.stdout.split() == ["open", "wrote"]
    drain.stdin.close()
    result = json.loads(drain.stdout.readline())
    assert drain.wait(10) == 0
    # The socket is never read while counting: the kernel's count has them all.
    assert result["frames"] == 5000
    assert result["sample_sizes"] == [64]


def test_flood_keeps_the_reader_fed_without_flooding_the_tap(namespace_with_tap):
    namespace, tap = namespace_with_tap
    reader = namespace.popen([sys.executable, "-c", TAP_HELPER, tap, "read", "3000"],
                             stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "open\n"
    flood = _peer(namespace, "flood", tap, "--size", "100", "--inflight", "64",
                  "--timeout", "60")
    assert flood.stdout.readline() == "ready\n"
    flood.stdin.write("go\n")
    flood.stdin.flush()
    assert reader.stdout.readline() == "[100]\n"
    assert reader.wait(30) == 0
    flood.stdin.close()
    result = json.loads(flood.stdout.readline())
    assert flood.wait(10) == 0
    assert result["delivered"] >= 3000
    # Paced by the tap's counters: only frames queued when the reader left are lost.
    assert result["tap_dropped"] <= 64 + 1
    assert result["sent"] <= result["delivered"] + result["tap_dropped"] + 64
