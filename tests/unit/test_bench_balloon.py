"""The balloon benchmark's parsing and bookkeeping (no KVM): the plan, VmRSS, the
timed inflate against a fake QMP server, the freestanding guest's lines, and how
the harness wires the run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import balloon, harness
from benchmarks.__main__ import parse_args, print_progress
from benchmarks.balloon import BalloonPlan, MiB
from benchmarks.metrics import BALLOON_METRICS, GROUPS, METRICS, ProbeError, QmpClient
from benchmarks.report import format_table, metric_rows

STATUS = """Name:\tqemu-system-x86
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t 1234567 kB
VmSize:\t 1234000 kB
VmHWM:\t  654321 kB
VmRSS:\t  639092 kB
RssAnon:\t  600000 kB
Threads:\t4
"""


def test_vm_rss_is_read_in_bytes():
    assert balloon.parse_vm_rss(STATUS) == 639092 * 1024


def test_status_without_vm_rss_is_an_error():
    # A zombie's status has no Vm* lines.
    with pytest.raises(ProbeError, match="no VmRSS"):
        balloon.parse_vm_rss(STATUS.replace("VmRSS:", "VmXXX:"))


def test_vm_rss_of_a_live_process_and_of_a_gone_one():
    assert balloon.vm_rss(os.getpid()) > 1 * MiB
    with pytest.raises(ProbeError, match="gone"):
        balloon.vm_rss(2**22 + 12345)  # above pid_max's ceiling: never a process


def test_plan_from_the_command_line():
    plan = balloon.parse_plan("1024,512,600")
    assert plan == BalloonPlan(mem_mib=1024, target_mib=512, touch_mib=600)
    assert plan.inflate_mib == 512


@pytest.mark.parametrize("text, message", [
    ("1024,512", "MEM,TARGET,TOUCH"),
    ("1024,512,600,1", "MEM,TARGET,TOUCH"),
    ("1G,512,600", "whole MiB"),
    ("1024,1024,600", "below the guest RAM"),
    ("1024,0,600", "below the guest RAM"),
    ("1024,32,1000", "below 64 MiB"),
    ("1024,512,256", "at least the 512 MiB"),
    ("1024,512,1024", "cannot touch 1024 MiB"),
])
def test_plans_that_cannot_run_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        balloon.parse_plan(text)


def test_default_plans_are_valid():
    for plan in (balloon.SVTEST_PLAN, balloon.LINUX_PLAN):
        plan.check()


def test_balloon_arguments_of_both_monitors():
    ours = balloon.ours_balloon()
    assert ours == ["-device", "virtio-balloon-device,id=balloon0,free-page-reporting=off"]
    qemu = balloon.qemu_balloon()
    assert "virtio-mmio.force-legacy=false" in qemu
    assert qemu[-1] == ours[-1]  # the same device and options


def test_polled_actual_must_move_down_to_the_target():
    seen = [1024]
    balloon.progress(seen, 1024, 1024, 512)
    balloon.progress(seen, 800, 1024, 512)
    balloon.progress(seen, 800, 1024, 512)
    balloon.progress(seen, 512, 1024, 512)
    assert seen == [1024, 800, 512]
    with pytest.raises(ProbeError, match="grew from 512 to 600"):
        balloon.progress(seen, 600, 1024, 512)
    with pytest.raises(ProbeError, match="outside"):
        balloon.progress([1024], 256, 1024, 512)
    with pytest.raises(ProbeError, match="outside"):
        balloon.progress([1024], 2048, 1024, 512)


# --- the timed inflate against a fake QMP server ------------------------------

PLAN = BalloonPlan(mem_mib=1024, target_mib=512, touch_mib=600, poll_s=0.001)
RAM, TARGET = 1024 * MiB, 512 * MiB


def _fake_monitor(sock: socket.socket, actuals: list[int], commands: list[dict]) -> None:
    """query-balloon answers `actuals` in turn (the last one forever); `balloon` returns.

    An event now and then, as QEMU and ours send BALLOON_CHANGE(D).
    """
    answers = iter(actuals)
    last = actuals[-1]
    with sock, sock.makefile("rb") as reader, contextlib.suppress(ConnectionError):
        for line in reader:
            request = json.loads(line)
            commands.append(request)
            if request["execute"] == "query-balloon":
                last = next(answers, last)
                sock.sendall(b'{"event":"BALLOON_CHANGE","data":{"actual":%d}}\r\n' % last)
                reply = {"return": {"actual": last}}
            else:
                reply = {"return": {}}
            sock.sendall(json.dumps(reply).encode() + b"\r\n")


@pytest.fixture
def fake_monitor():
    sockets = []
    threads = []

    def serve(actuals: list[int]) -> tuple[QmpClient, list[dict]]:
        client_sock, server_sock = socket.socketpair()
        sockets.append(client_sock)
        commands: list[dict] = []
        thread = threading.Thread(target=_fake_monitor, args=(server_sock, actuals, commands),
                                  daemon=True)
        thread.start()
        threads.append(thread)
        return QmpClient(client_sock), commands
    yield serve
    for sock in sockets:
        sock.close()
    for thread in threads:
        thread.join(5)


def test_inflate_is_timed_from_the_command_to_the_reply_showing_the_target(fake_monitor):
    client, commands = fake_monitor([RAM, RAM, RAM - 64 * MiB, RAM - 300 * MiB, TARGET])
    now = [0]

    def clock() -> int:
        now[0] += 1_000_000  # every reading is 1 ms after the previous one
        return now[0]
    sleeps: list[float] = []
    result = balloon.inflate(client, os.getpid(), PLAN, 10, clock=clock, sleep=sleeps.append)
    sent = [c for c in commands if c["execute"] == "balloon"]
    assert sent == [{"execute": "balloon", "arguments": {"value": TARGET}}]
    # The query before the command, then four polls, the last one showing the target.
    assert [c["execute"] for c in commands] == ["query-balloon", "balloon", *["query-balloon"] * 4]
    assert result.polls == 4
    assert result.seen == [RAM, RAM - 64 * MiB, RAM - 300 * MiB, TARGET]
    # Readings: sent at 1 ms; then per poll one after the reply and one for the
    # sleep; the target's reply is the 8th reading (8 ms): 7 ms after sending.
    assert result.inflate_ms == 7.0
    assert len(sleeps) == 3 and all(s >= 0 for s in sleeps)
    values = result.values()
    assert set(values) == set(BALLOON_METRICS)
    assert values["balloon.rss-drop"] == pytest.approx(
        values["balloon.rss-before"] - values["balloon.rss-after"])
    assert result.as_dict()["polls"] == 4


def test_inflate_polls_on_a_fixed_schedule(fake_monitor):
    client, _ = fake_monitor([RAM, RAM, RAM, RAM, TARGET])
    ticks = iter(range(0, 10**12, 4_000_000))  # readings 4 ms apart: slow replies
    sleeps: list[float] = []
    balloon.inflate(client, os.getpid(), BalloonPlan(1024, 512, 600, poll_s=0.010), 10,
                    clock=lambda: next(ticks), sleep=sleeps.append)
    # Sent at 0 ms; poll k is due at 10k ms whatever the replies cost.
    assert sleeps == [pytest.approx(0.010 - 0.008), pytest.approx(0.020 - 0.016),
                      pytest.approx(0.030 - 0.024)]


def test_inflate_that_never_reaches_the_target_gives_up(fake_monitor):
    client, _ = fake_monitor([RAM, RAM - 4 * MiB])
    with pytest.raises(ProbeError, match=r"did not reach the balloon target .* after \d+ polls"):
        balloon.inflate(client, os.getpid(), PLAN, 0.05)


def test_inflate_needs_an_empty_balloon_first(fake_monitor):
    client, commands = fake_monitor([RAM - 4096])
    with pytest.raises(ProbeError, match="before the command"):
        balloon.inflate(client, os.getpid(), PLAN, 1)
    assert [c["execute"] for c in commands] == ["query-balloon"]


def test_inflate_refuses_an_actual_that_grows_back(fake_monitor):
    client, _ = fake_monitor([RAM, RAM - 8 * MiB, RAM - 4 * MiB])
    with pytest.raises(ProbeError, match="grew"):
        balloon.inflate(client, os.getpid(), PLAN, 5)


def test_inflate_stops_when_the_check_says_the_monitor_died(fake_monitor):
    client, _ = fake_monitor([RAM, RAM])

    def dead() -> None:
        raise ProbeError("the monitor exited (status 1)")
    with pytest.raises(ProbeError, match="exited"):
        balloon.inflate(client, os.getpid(), PLAN, 5, dead)


def test_query_balloon_without_an_integer_actual():
    client_sock, server_sock = socket.socketpair()
    with client_sock, server_sock:
        server_sock.sendall(b'{"return":{"actual":"1G"}}\r\n')
        with pytest.raises(ProbeError, match="no integer 'actual'"):
            balloon.query_actual(QmpClient(client_sock))


# --- the freestanding guest's lines -------------------------------------------

READY = (b"svtest: action=balloon\r\n"
         b"svtest: balloon device=8 base=0xf0101000 irq=13 offered=0x0000000130000002 "
         b"accepted=0x0000000100000002 stats=1 reporting=0 deflate-on-oom=0 queue-size=64 "
         b"queue-num-max=256 stats-queue=2 report-queue=-1 ram-end=0x40000000\r\n"
         b"svtest: balloon touched mb=600 pages=153600 addr=0x600000 report-mb=0 ms=6674\r\n"
         b"svtest: balloon ready pages=153600 target=0 actual=0\r\n")
INFLATED = (b"svtest: balloon target=131072 actual=0\r\n"
            b"svtest: balloon actual=131072 inflated=131072 ms=944\r\n"
            b"svtest: balloon intact pages=22528 bad=0 first-bad=0x0\r\n")


def test_ready_and_intact_lines_are_found_whole_with_crlf():
    # The guest ends lines with \r\n: the wait patterns must match them complete.
    assert balloon.SVTEST_READY_LINE.search(READY).group(1) == b"ready"
    assert balloon.SVTEST_READY_LINE.search(READY[:-2]) is None
    assert balloon.SVTEST_INTACT_LINE.search(READY + INFLATED).group(1) == b"intact"
    failed = b"svtest: balloon FAIL op=inflate result=timeout\r\n"
    assert balloon.SVTEST_INTACT_LINE.search(READY + failed).group(1) == b"FAIL"


def test_svtest_ready_and_inflated_figures():
    assert balloon.check_svtest_ready(READY, balloon.SVTEST_PLAN) == {
        "touched_pages": 153600, "touch_guest_ms": 6674}
    assert balloon.check_svtest_inflated(READY + INFLATED, balloon.SVTEST_PLAN) == {
        "inflate_guest_ms": 944, "intact_pages": 22528}


@pytest.mark.parametrize("output, message", [
    (b"svtest: balloon FAIL init=no-device balloons=0\r\n", "FAIL init=no-device"),
    (b"svtest: unknown-action=balloon\r\n", "no 'balloon touched'"),
    (READY.replace(b"pages=153600 target", b"pages=8192 target"), "pages=8192 actual=0"),
    (READY.replace(b"actual=0\r\n", b"actual=5\r\n"), "actual=5"),
])
def test_svtest_ready_failures(output, message):
    with pytest.raises(ProbeError, match=message):
        balloon.check_svtest_ready(output, balloon.SVTEST_PLAN)


@pytest.mark.parametrize("output, message", [
    (READY + b"svtest: balloon FAIL op=inflate result=needs-reset\r\n", "needs-reset"),
    (READY, "no 'balloon actual"),
    (READY + INFLATED.replace(b"inflated=131072", b"inflated=131000"), "not 131072 pages"),
    (READY + INFLATED.replace(b"bad=0", b"bad=3"), "3 of the pages the guest kept"),
])
def test_svtest_inflated_failures(output, message):
    with pytest.raises(ProbeError, match=message):
        balloon.check_svtest_inflated(output, balloon.SVTEST_PLAN)


# --- wiring -------------------------------------------------------------------

def _linux() -> harness.Guest:
    # harness.linux_guest wants its files to exist; the Guest itself does not.
    return harness.Guest(name="linux", kernel=Path("vmlinux"), initrd=Path("initrd"),
                         session_cmdline="console=ttyS0", ready=b"x", session_markers={},
                         boot_cmdline=None, settle_s=1, timeout_s=1)


def test_balloon_metrics_are_a_group_of_their_own():
    assert "balloon" in GROUPS
    assert {METRICS[m].group for m in BALLOON_METRICS} == {"balloon"}
    assert METRICS["balloon.inflate-ms"].better == "lower"
    assert METRICS["balloon.rss-drop"].better == "higher"
    svtest = harness.svtest_guest(Path("g"), 1.0, 30.0)
    for guest in (svtest, _linux()):
        assert harness.run_kinds(guest, frozenset({"balloon"})) == ["balloon"]
        assert harness.expected_metrics(guest, frozenset({"balloon"})) == list(BALLOON_METRICS)


def test_balloon_options_and_defaults():
    args = parse_args([])
    assert "balloon" in args.groups and args.balloon_plan == balloon.SVTEST_PLAN
    linux = parse_args(["--guest", "linux"])
    assert "balloon" in linux.groups and linux.balloon_plan == balloon.LINUX_PLAN
    assert parse_args(["--balloon-plan", "512,256,300"]).balloon_plan == BalloonPlan(512, 256,
                                                                                      300)
    with pytest.raises(SystemExit):
        parse_args(["--balloon-plan", "512,256,100"])


def test_balloon_runs_boot_both_monitors_with_the_plan(monkeypatch, tmp_path):
    runs = []

    def fake_balloon(record, monitor, guest, plan, qmp_path, workdir):
        runs.append((record, plan))
        record.values["balloon.inflate-ms"] = 100.0 if record.monitor == "ours" else 200.0

    monkeypatch.setattr(harness, "run_balloon", fake_balloon)
    plan = BalloonPlan(mem_mib=768, target_mib=256, touch_mib=600)
    settings = harness.Settings(mem_mib=256, smp=1, qmp_requests=10,
                                groups=frozenset({"balloon"}), python=sys.executable,
                                qemu="qemu-system-x86_64", balloon_plan=plan)
    monitors = [harness.MONITORS["ours"], harness.MONITORS["qemu"]]
    guest = harness.with_extra_cmdline(harness.svtest_guest(Path("g"), 1.0, 30.0),
                                       "svtest.poll_ms=5")
    records = harness.run_pairs(monitors, guest, settings, 2, 0, tmp_path)
    assert [(r.pair, r.monitor) for r in records] == [(0, "ours"), (0, "qemu"), (1, "ours"),
                                                     (1, "qemu")]
    assert all(p == plan for _, p in runs)
    for record in records:
        argv = record.argv
        # The plan's RAM, not --mem's, for both monitors (ours starts with `python -m`).
        memory = len(argv) - 1 - argv[::-1].index("-m")
        assert argv[memory + 1] == "768"
        assert argv[argv.index("-append") + 1].startswith(
            "svtest.action=balloon svtest.touch_mb=600 svtest.poll_ms=5")
        assert "virtio-balloon-device,id=balloon0,free-page-reporting=off" in argv
    assert "virtio-mmio.force-legacy=false" in records[1].argv
    # A Linux guest boots as in its session run.
    assert _linux().balloon_cmdline(plan) == "console=ttyS0"

    rows = metric_rows(records, ["balloon.inflate-ms"], ["ours", "qemu"], 2)
    assert rows[0]["ratio_ours_over_qemu"]["median"] == 0.5


def test_table_explains_a_higher_is_better_memory_ratio():
    row = {"metric": "balloon.rss-drop", "unit": "MiB", "better": "higher", "label": "",
           "reps": 1, "ours": None, "qemu": None, "ratio_ours_over_qemu": None}
    table = format_table([row], ["ours", "qemu"], 1)
    assert "for memory given back (MiB, higher is better), > 1 means ours gave back more" in (
        table)
    assert "for rates" not in table


def test_progress_lines_print_figures_as_the_table_does(capsys):
    record = harness.RunRecord(pair=1, kind="balloon", monitor="qemu", argv=[],
                               values={"balloon.inflate-ms": 11701.3, "balloon.rss-drop": 62.05})
    print_progress(record, 3)
    assert capsys.readouterr().err == (
        "bench: pair 2/3 balloon qemu: inflate-ms 11701 ms, rss-drop 62.05 MiB\n")
