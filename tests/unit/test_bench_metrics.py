"""The start.query-running, block.cpu-* and many.* metrics: parsing and arithmetic
(nothing here is timed)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import cpu, harness, many
from benchmarks.__main__ import GUEST_GROUPS, parse_args
from benchmarks.cpu import CpuTimes, WindowSampler, cpu_ms_per_1000, parse_proc_stat
from benchmarks.metrics import (
    BLK_START,
    BLOCK_CASES,
    BLOCK_WORKLOADS,
    CPU_UNIT,
    MANY_METRICS,
    MANY_VMS,
    METRICS,
    ProbeError,
    QmpClient,
    SerialWatcher,
    wait_running,
)
from benchmarks.report import format_table, metric_rows

# A real /proc/PID/stat line (kernel 6.x) whose name holds a space and a ')':
# utime 1234, stime 567, guest_time 89.
STAT = ("4242 (CPU 0/KVM) x) S 1 4242 4242 0 -1 4194624 2969 0 0 0 1234 567 0 0 20 0 "
        "3 0 12345 2000000000 6000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 "
        "0 0 0 89 0 0 0 0 0 0 0 0 0")


# /proc/PID/stat


def test_proc_stat_cpu_fields_are_counted_from_the_last_parenthesis():
    times = parse_proc_stat(STAT)
    assert times == CpuTimes(utime=1234, stime=567, guest_time=89)
    assert times.total == 1801
    assert cpu.thread_name(STAT) == "CPU 0/KVM) x"


def test_proc_stat_of_this_process_grows_with_work():
    before = cpu.read_cpu_times(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = cpu.read_cpu_times(os.getpid())
    assert after.total >= before.total
    assert after.utime >= before.utime and after.stime >= before.stime
    threads = cpu.read_thread_times(os.getpid())
    assert any(name.startswith(f"{os.getpid()} ") for name in threads)


@pytest.mark.parametrize("text", [
    "4242 comm S 1 2 3",  # no parentheses
    "4242 (qemu) S 1 2 3 4 5 6 7 8 9 10 11 12",  # too short
    STAT.replace(" 1234 ", " x "),
])
def test_malformed_proc_stat_is_refused(text):
    with pytest.raises(ValueError):
        parse_proc_stat(text)


def test_cpu_per_1000_requests():
    before = CpuTimes(utime=100, stime=1000, guest_time=0)
    after = CpuTimes(utime=110, stime=1090, guest_time=0)
    # 100 ticks of 10 ms = 1000 ms for 8000 requests: 125 ms per 1000.
    assert cpu_ms_per_1000(before, after, 8000, ticks_per_second=100) == 125.0
    assert cpu_ms_per_1000(before, after, 8000, ticks_per_second=1000) == 12.5
    with pytest.raises(ValueError, match="no requests"):
        cpu_ms_per_1000(before, after, 0)
    with pytest.raises(ValueError, match="backwards"):
        cpu_ms_per_1000(after, before, 8000)


# The window sampler, fed as the serial reader feeds it.

START_LINE = b"svtest: blk-bench start mode=randread bs=4096 qd=16 count=24000\r\n"
DONE_LINE = b"svtest: blk-bench done requests=24000 bytes=98304000 errors=0\r\n"


class FakeProcess:
    """CPU ticks that grow by 7 utime and 90 stime per read."""

    def __init__(self) -> None:
        self.reads = 0

    def times(self, pid: int) -> CpuTimes:
        self.reads += 1
        return CpuTimes(utime=7 * self.reads, stime=90 * self.reads, guest_time=0)

    def threads(self, pid: int) -> dict[str, int]:
        return {"1 python3": 5 * self.reads, f"{self.reads} new": 3}


def _feed(sampler: WindowSampler, *reads: bytes) -> None:
    data = bytearray()
    for index, chunk in enumerate(reads):
        before = len(data)
        data += chunk
        sampler.on_read(data, before, index)


def test_sampler_takes_the_start_line_end_and_the_next_read():
    process = FakeProcess()
    sampler = WindowSampler(1, BLK_START, read=process.times, read_threads=process.threads)
    # The start line split across reads: sampled once it is complete, not before.
    _feed(sampler, b"svtest: hello\r\n" + START_LINE[:30], START_LINE[30:], DONE_LINE[:1],
          DONE_LINE[1:], b"svtest: done\r\n")
    assert process.reads == 2
    assert sampler.start == CpuTimes(7, 90, 0) and sampler.end == CpuTimes(14, 180, 0)
    # 97 ticks (970 ms at 100 per second) for 24000 requests.
    assert sampler.ms_per_1000(24000) == pytest.approx(97 * 1000 / cpu.CLOCK_TICKS / 24)
    assert sampler.threads == {"1 python3": 5, "2 new": 3}
    assert sampler.as_dict()["end"] == {"utime": 14, "stime": 180, "guest_time": 0}


def test_sampler_without_a_window_is_an_error():
    process = FakeProcess()
    sampler = WindowSampler(1, BLK_START, read=process.times, read_threads=process.threads)
    _feed(sampler, START_LINE + DONE_LINE)
    with pytest.raises(ProbeError, match="one read"):
        sampler.ms_per_1000(24000)
    never = WindowSampler(1, BLK_START, read=process.times, read_threads=process.threads)
    _feed(never, START_LINE)
    with pytest.raises(ProbeError, match="both ends"):
        never.ms_per_1000(24000)


def test_sampler_reports_a_process_it_cannot_read():
    def gone(pid: int) -> CpuTimes:
        raise FileNotFoundError(f"/proc/{pid}/stat")
    sampler = WindowSampler(1, BLK_START, read=gone)
    _feed(sampler, START_LINE, DONE_LINE)
    with pytest.raises(ProbeError, match="/proc/1/stat"):
        sampler.ms_per_1000(24000)


def test_serial_watcher_runs_the_hook_after_each_read():
    read_end, write_end = os.pipe()
    seen: list[tuple[bytes, int]] = []
    watcher = SerialWatcher(read_end, {"b": b"b\n"},
                            lambda data, before, now: seen.append((bytes(data), before)))
    try:
        os.write(write_end, b"a\n")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(write_end, b"b\n")
        watcher.wait_for("b", time.monotonic_ns() + 10 * 10**9)
    finally:
        os.close(write_end)
        watcher.join()
        os.close(read_end)
    assert seen == [(b"a\n", 0), (b"a\nb\n", 2)]


def test_sampler_on_a_live_process_sees_its_cpu_time():
    """A child that burns CPU between two lines, as a monitor does between blk-bench's.

    It idles around the burn so that a reader thread the host schedules late
    still samples before and after it.
    """
    script = ("import sys, time\n"
              f"sys.stdout.buffer.write({START_LINE!r}); sys.stdout.flush()\n"
              "time.sleep(0.3)\n"
              "end = time.process_time() + 0.3\n"
              "while time.process_time() < end: pass\n"
              f"sys.stdout.buffer.write({DONE_LINE!r}); sys.stdout.flush()\n"
              "time.sleep(0.5)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout is not None
    sampler = WindowSampler(child.pid, BLK_START)
    watcher = SerialWatcher(child.stdout.fileno(), {}, sampler.on_read)
    try:
        assert child.wait(30) == 0
        watcher.join()
    finally:
        child.stdout.close()
    used_ms = sampler.ms_per_1000(1000)
    # 0.3 s of CPU, give or take a tick at each end.
    assert 300 - 2 * 1000 / cpu.CLOCK_TICKS <= used_ms <= 300 + 4 * 1000 / cpu.CLOCK_TICKS


# query-status until running


def _status_server(sock: socket.socket, statuses: list[str]) -> None:
    """Answers each query-status with the next status (the last one repeated)."""
    with sock, sock.makefile("rb") as reader:
        for number, line in enumerate(reader):
            assert json.loads(line)["execute"] == "query-status"
            status = statuses[min(number, len(statuses) - 1)]
            if number == 0:
                sock.sendall(b'{"event":"RESUME","data":{},"timestamp":{}}\r\n')
            reply = {"return": {"status": status, "singlestep": False,
                                "running": status == "running"}}
            sock.sendall(json.dumps(reply).encode() + b"\r\n")


def _client_for(statuses: list[str]) -> tuple[QmpClient, threading.Thread]:
    client_sock, server_sock = socket.socketpair()
    server = threading.Thread(target=_status_server, args=(server_sock, statuses), daemon=True)
    server.start()
    return QmpClient(client_sock), server


def test_wait_running_asks_until_running():
    client, server = _client_for(["prelaunch", "prelaunch", "prelaunch", "running"])
    try:
        started = time.monotonic_ns()
        answered, queries = wait_running(client, started + 10 * 10**9, lambda: True)
    finally:
        client.close()
        server.join(5)
    assert queries == 4
    assert answered >= started


@pytest.mark.parametrize("status", ["paused", "shutdown", "internal-error"])
def test_wait_running_gives_up_on_a_status_that_stays(status):
    client, server = _client_for(["prelaunch", status])
    try:
        with pytest.raises(ProbeError, match=status):
            wait_running(client, time.monotonic_ns() + 10 * 10**9, lambda: True)
    finally:
        client.close()
        server.join(5)


def test_wait_running_gives_up_when_the_monitor_died():
    client, server = _client_for(["prelaunch"])
    try:
        with pytest.raises(ProbeError, match="exited"):
            wait_running(client, time.monotonic_ns() + 10 * 10**9, lambda: False)
    finally:
        client.close()
        server.join(5)


# Ten VMs at once


def test_all_running_runs_from_the_first_exec_to_the_last_running():
    # The earliest exec counts, whichever VM it was.
    execs = [2_000_000, 4_000_000, 1_000_000]
    running = [90_000_000, 51_000_000, 301_000_000]
    assert many.all_running_ms(execs, running) == 300.0
    with pytest.raises(ValueError, match="3 execs against 2"):
        many.all_running_ms(execs, running[:2])
    with pytest.raises(ValueError, match="VM 1"):
        many.all_running_ms(execs, [90_000_000, 3_000_000, 5_000_000])
    with pytest.raises(ValueError):
        many.all_running_ms([], [])


def test_many_overhead_is_the_sum_in_mib():
    assert many.total_overhead_mib([23 << 20, (22 << 20) + (1 << 19)]) == 45.5
    with pytest.raises(ProbeError):
        many.total_overhead_mib([1 << 20, -1])


def test_many_vms_get_a_qmp_socket_each(tmp_path):
    guest = harness.svtest_guest(Path("guest.elf"), 1.0, 30.0)
    settings = harness.Settings(mem_mib=256, smp=1, qmp_requests=10,
                                groups=frozenset({"many"}), python=sys.executable,
                                qemu="qemu-system-x86_64")
    for name in ("ours", "qemu"):
        vms = harness.many_vms(harness.MONITORS[name], guest, settings, tmp_path, 3)
        assert len(vms) == MANY_VMS
        assert len({path for _, path in vms}) == MANY_VMS
        for argv, path in vms:
            assert any(str(path) in arg for arg in argv)
            assert argv[argv.index("-append") + 1].startswith("svtest.action=halt-loop")
            assert ("-m", "256") in itertools.pairwise(argv)


# Where the metrics go


def test_new_metrics_are_defined_and_grouped():
    info = METRICS["start.query-running"]
    assert (info.group, info.unit, info.better) == ("start", "ms", "lower")
    for name in MANY_METRICS:
        assert METRICS[name].group == "many" and METRICS[name].better == "lower"
    assert len(BLOCK_WORKLOADS) * 2 == len(BLOCK_CASES)
    for case in BLOCK_CASES:
        row = METRICS[case.cpu_metric]
        assert case.cpu_metric == f"block.cpu-{case.workload.name}.{case.cache}"
        assert (row.group, row.unit, row.better) == ("block", CPU_UNIT, "lower")


def test_linux_runs_start_and_many_but_not_block():
    linux = parse_args(["--guest", "linux", "--metrics", "start,many"])
    assert linux.groups == {"start", "many"}
    assert "many" in GUEST_GROUPS["linux"] and "block" not in GUEST_GROUPS["linux"]
    assert "many" in parse_args(["--guest", "linux"]).groups
    guest = harness.Guest(name="linux", kernel=Path("vmlinux"), initrd=None,
                          session_cmdline="console=ttyS0", ready=b"x", session_markers={},
                          boot_cmdline=None, settle_s=1, timeout_s=1)
    groups = frozenset({"start", "many", "block"})
    assert harness.run_kinds(guest, groups) == ["session", "many"]
    assert harness.expected_metrics(guest, groups) == [
        "start.qmp-greeting", "start.query-running", *MANY_METRICS]


def test_block_cpu_rows_follow_their_runs(monkeypatch, tmp_path):
    def fake_block(record, monitor, guest, case, image, workdir):
        record.values[case.metric] = 1000.0
        record.values[case.cpu_metric] = 50.0 if record.monitor == "ours" else 100.0

    monkeypatch.setattr(harness, "run_block", fake_block)
    guest = harness.svtest_guest(Path("guest.elf"), 1.0, 30.0)
    settings = harness.Settings(mem_mib=256, smp=1, qmp_requests=10,
                                groups=frozenset({"block"}), python=sys.executable,
                                qemu="qemu-system-x86_64", block_image=tmp_path / "d.img",
                                block_reps=2)
    records = harness.run_pairs([harness.MONITORS["ours"], harness.MONITORS["qemu"]], guest,
                                settings, 4, 0, tmp_path)
    names = harness.expected_metrics(guest, settings.groups)
    assert names[len(BLOCK_CASES):] == [case.cpu_metric for case in BLOCK_CASES]
    reps = harness.metric_reps(names, settings, 4)
    assert reps[BLOCK_CASES[0].cpu_metric] == 2
    rows = metric_rows(records, names, ["ours", "qemu"], 4, reps)
    cpu_row = rows[len(BLOCK_CASES)]
    assert cpu_row["samples"] == {"ours": [50.0, 50.0], "qemu": [100.0, 100.0]}
    assert cpu_row["ratio_ours_over_qemu"]["median"] == 0.5
    table = format_table(rows, ["ours", "qemu"], 4)
    assert "CPU time per 1000 requests (ms/1k req), < 1 means ours used less" in table


def _linux_guest(tmp_path: Path) -> harness.Guest:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return harness.linux_guest(kernel, initrd, settle_s=1.0, timeout_s=60.0)


def test_the_linux_boot_group_adds_a_run_with_the_console_on_hvc0(tmp_path):
    guest = _linux_guest(tmp_path)
    assert "hvc0" in harness.run_kinds(guest, frozenset({"boot"}))
    assert "hvc0" not in harness.run_kinds(guest, frozenset({"start", "memory"}))
    assert harness.hvc0_cmdline(guest) == guest.session_cmdline.replace("ttyS0", "hvc0")
    assert "console=ttyS0" not in harness.hvc0_cmdline(guest)
    names = harness.expected_metrics(guest, frozenset({"boot"}))
    assert names[-2:] == ["boot.hvc0-run-init", "boot.hvc0-userspace"]
    for monitor in harness.MONITORS.values():
        args = monitor.virtconsole(tmp_path / "c.sock")
        assert "virtio-serial-device" in args and f"{tmp_path / 'c.sock'}" in " ".join(args)


def test_the_console_socket_is_retried_until_it_accepts(tmp_path):
    path = tmp_path / "late.sock"

    def listen_later() -> None:
        time.sleep(0.1)
        server.bind(str(path))
        server.listen(1)
    server = socket.socket(socket.AF_UNIX)
    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        deadline = time.monotonic_ns() + 5 * 10**9
        client = harness.connect_unix(path, deadline, lambda: True)
        client.close()
        with pytest.raises(harness.ProbeError, match="exited"):
            harness.connect_unix(tmp_path / "never.sock", deadline, lambda: False)
    finally:
        thread.join()
        server.close()
