"""virtio-balloon with the freestanding guest, on QEMU microvm (the reference) and on our monitor.

The guest (tests/guest, actions `balloon` and `balloon-hostile`) touches RAM of its own,
gives pages of it to the device as the target set over QMP moves, takes them back and
writes them again, keeps a statistics buffer on the stats queue and can report free
memory.  The tests set targets with QMP `balloon`, read `query-balloon`, `qom-get
guest-stats` and the monitor process's resident memory, and check the guest's lines.
No network is involved.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MONITOR, Qmp, wait_for_socket
from tests.integration.test_guest_net import (
    QEMU,
    Guest,
    fields,
    guest_line,
    host_is_pvm,
    require_qemu,
)

pytestmark = pytest.mark.kvm

MiB = 1 << 20
MEMORY_MIB = 256
PAGE = 4096
QOM_PATH = "/machine/peripheral/balloon0"
# Resident memory may move by a little for reasons of its own (page tables, the
# monitor's heap, a stray huge page): the checks allow this much.
RSS_MARGIN = 6 * MiB


class Host:
    """Starts processes as tests/netns.py's namespace does, but on the host: no network here."""

    @staticmethod
    def popen(argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(argv, **kwargs)


@pytest.fixture(params=["qemu", "ours"])
def monitor(request) -> str:
    if request.param == "qemu":
        require_qemu()
    return request.param


def machine_argv(monitor: str, guest: Path, append: str, qmp: Path, balloon: str = "",
                 second_qmp: Path | None = None) -> list[str]:
    """`monitor`'s command line: the guest, 256 MiB, a balloon (id balloon0) and a QMP socket
    (two with second_qmp: QEMU's QMP socket takes one client at a time)."""
    options = f",{balloon}" if balloon else ""
    sockets = [qmp, second_qmp] if second_qmp else [qmp]
    if monitor == "qemu":
        cpu = "host,-arch-capabilities" if host_is_pvm() else "host"
        return [QEMU, "-enable-kvm",
                "-M", "microvm,acpi=off,kernel_irqchip=on,pit=on,pic=on,rtc=off",
                "-cpu", cpu, "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config",
                "-nographic", "-no-reboot", "-serial", "stdio", "-kernel", str(guest),
                "-append", append, "-global", "virtio-mmio.force-legacy=false",
                "-device", f"virtio-balloon-device,id=balloon0{options}",
                *(arg for path in sockets for arg in ("-qmp", f"unix:{path},server=on,wait=off"))]
    return [*MONITOR, "-kernel", str(guest), "-append", append, "-serial", "stdio",
            "-m", f"{MEMORY_MIB}M", "-device", f"virtio-balloon-device,id=balloon0{options}",
            *(arg for path in sockets for arg in ("-qmp", f"unix:{path},server,nowait"))]


@contextlib.contextmanager
def balloon_guest(monitor: str, guest_elf: Path, append: str, log: Path, tmp_path: Path,
                  balloon: str = "", second_qmp: Path | None = None
                  ) -> Iterator[tuple[Guest, Qmp]]:
    qmp_path = tmp_path / "qmp.sock"
    argv = machine_argv(monitor, guest_elf, append, qmp_path, balloon, second_qmp)
    guest = Guest(Host(), argv, log)
    try:
        qmp = connect(guest, qmp_path)
        assert qmp.execute("qmp_capabilities") == {"return": {}}
        yield guest, qmp
    finally:
        guest.close()


def connect(guest: Guest, path: Path, timeout: float = 30) -> Qmp:
    """QMP once the socket listens (QEMU binds it a moment before it listens)."""
    wait_for_socket(guest.process, path, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Qmp(path)
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and guest.process.poll() is None, guest.output
            time.sleep(0.05)


def rss(pid: int) -> int:
    """Resident memory of the process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_rss(pid: int, predicate, timeout: float = 10) -> int:
    """The process's RSS once predicate(rss) holds (or the last value after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = rss(pid)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def actual(qmp: Qmp) -> int:
    reply = qmp.execute("query-balloon")
    assert "return" in reply, reply
    return reply["return"]["actual"]


def quit_guest(guest: Guest) -> str:
    """'q' on the console ends the balloon action; returns the serial output."""
    assert guest.process.stdin is not None
    guest.process.stdin.write(b"q")
    guest.process.stdin.flush()
    assert guest.wait_exit() == 0, guest.output
    return guest.output


def balloon_changed(monitor: str, qmp: Qmp, want: int, timeout: float = 5) -> None:
    """The balloon event with actual == want arrives (events are rate limited to 1/s).
    QEMU's QAPI names it BALLOON_CHANGE; ours is asked to send BALLOON_CHANGED."""
    name = "BALLOON_CHANGE" if monitor == "qemu" else "BALLOON_CHANGED"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["event"] == name and e["data"]["actual"] == want for e in qmp.events):
            return
        time.sleep(0.3)
        qmp.execute("query-status")  # collects events that came meanwhile
    raise AssertionError(f"no {name} actual={want}: {qmp.events}")


# ---------------------------------------------------------------- tests

def test_inflate_gives_memory_back_and_deflate_makes_it_usable(monitor, svtest_guest,
                                                               artifact_dir, tmp_path):
    touch, give = 64, 48  # MiB touched by the guest; MiB of it set as the balloon's target
    append = f"svtest.action=balloon svtest.touch_mb={touch}"
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log",
                       tmp_path) as (guest, qmp):
        ready = fields(guest.wait_line(r"balloon ready .*").group(0))
        assert ready["pages"] == str(touch * MiB // PAGE) and ready["actual"] == "0"
        assert actual(qmp) == MEMORY_MIB * MiB
        pid = guest.process.pid
        before = rss(pid)
        assert before >= touch * MiB, f"RSS {before} below the {touch} MiB the guest touched"

        target = (MEMORY_MIB - give) * MiB
        assert qmp.execute("balloon", value=target) == {"return": {}}
        pages = give * MiB // PAGE
        guest.wait_line(rf"balloon actual={pages} inflated={pages} ")
        intact = fields(guest.wait_line(r"balloon intact .*").group(0))
        assert intact["pages"] == str((touch - give) * MiB // PAGE) and intact["bad"] == "0"
        assert actual(qmp) == target
        balloon_changed(monitor, qmp, target)
        after = wait_rss(pid, lambda v: before - v >= give * MiB - RSS_MARGIN)
        assert before - after >= give * MiB - RSS_MARGIN, (
            f"RSS fell by {(before - after) / MiB:.1f} MiB after {give} MiB were inflated")
        figures = f"rss-before={before} rss-inflated={after} "

        # Deflate to 16 MiB in the balloon: 32 MiB come back, written and read by the guest.
        target = (MEMORY_MIB - 16) * MiB
        assert qmp.execute("balloon", value=target) == {"return": {}}
        back = 32 * MiB // PAGE
        guest.wait_line(rf"balloon actual={16 * MiB // PAGE} deflated={back} ")
        verify = fields(guest.wait_line(r"balloon deflate-verify .*").group(0))
        assert verify["pages"] == str(back) and verify["bad"] == "0", verify
        # Released pages come back zeroed: the host really let them go.
        assert verify["zeroed"] == str(back), verify
        assert actual(qmp) == target
        grown = wait_rss(pid, lambda v: v - after >= 32 * MiB - RSS_MARGIN)
        assert grown - after >= 32 * MiB - RSS_MARGIN, "the pages the guest got back and wrote "\
            "are not resident"
        (artifact_dir / "rss.txt").write_text(figures + f"rss-deflated={grown}\n")
        out = quit_guest(guest)
    done = fields(guest_line(out, "balloon done"))
    assert done["end"] == "quit" and done["rounds"] == "2", out
    # Each new target came with a configuration change interrupt.
    assert int(done["config-irqs"]) >= 2, out
    assert "FAIL" not in out, out


def test_target_above_what_the_guest_has_is_capped(monitor, svtest_guest, artifact_dir,
                                                   tmp_path):
    """A target beyond the touched region: the guest gives all it has and says so."""
    append = "svtest.action=balloon svtest.touch_mb=8 svtest.rounds=1"
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log",
                       tmp_path) as (guest, qmp):
        guest.wait_line(r"balloon ready ")
        assert qmp.execute("balloon", value=(MEMORY_MIB - 20) * MiB) == {"return": {}}
        assert guest.wait_exit() == 0, guest.output
    out = guest.output
    pages = 8 * MiB // PAGE
    assert f"balloon capped target={20 * MiB // PAGE} max={pages}" in out, out
    assert f"balloon actual={pages} inflated={pages} " in out, out


def test_statistics_arrive_through_qom_get(monitor, svtest_guest, artifact_dir, tmp_path):
    append = "svtest.action=balloon svtest.touch_mb=8"
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log",
                       tmp_path) as (guest, qmp):
        guest.wait_line(r"balloon ready ")
        ram = int(fields(guest_line(guest.output, "ram-bytes="))["ram-bytes"])
        assert qmp.execute("qom-set", path=QOM_PATH, property="guest-stats-polling-interval",
                           value=1) == {"return": {}}
        interval = qmp.execute("qom-get", path=QOM_PATH,
                               property="guest-stats-polling-interval")
        assert interval == {"return": 1}, interval
        guest.wait_line(r"balloon stats refill=2", timeout=20)
        first = qmp.execute("qom-get", path=QOM_PATH, property="guest-stats")["return"]
        stats = first["stats"]
        assert stats["stat-total-memory"] == ram, first
        assert stats["stat-free-memory"] == stats["stat-available-memory"] > 0, first
        assert stats["stat-swap-in"] == stats["stat-swap-out"] == 0, first
        # Not given by the guest: -1 as a uint64, on both (QEMU 7.2 and ours).
        assert stats["stat-disk-caches"] == 2**64 - 1, first
        assert stats["stat-minor-faults"] >= 1, first  # the buffer's number: 0 first
        assert abs(first["last-update"] - time.time()) < 30, first
        guest.wait_line(r"balloon stats refill=4", timeout=20)
        later = qmp.execute("qom-get", path=QOM_PATH, property="guest-stats")["return"]
        assert later["stats"]["stat-minor-faults"] > stats["stat-minor-faults"], (first, later)
        assert later["last-update"] >= first["last-update"]
        out = quit_guest(guest)
    assert "FAIL" not in out, out


def test_free_page_reporting_gives_memory_back(monitor, svtest_guest, artifact_dir, tmp_path):
    report = 48
    append = (f"svtest.action=balloon svtest.touch_mb=8 svtest.report_mb={report} "
              "svtest.report_delay_ms=1500")
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log", tmp_path,
                       balloon="free-page-reporting=on") as (guest, qmp):
        device = fields(guest.wait_line(r"balloon device=.*").group(0))
        assert device["reporting"] == "1", device
        guest.wait_line(r"balloon touched ")
        pid = guest.process.pid
        before = rss(pid)
        guest.wait_line(r"balloon reported mb=48 ")
        after = wait_rss(pid, lambda v: before - v >= report * MiB - RSS_MARGIN)
        assert before - after >= report * MiB - RSS_MARGIN, (
            f"RSS fell by {(before - after) / MiB:.1f} MiB after {report} MiB were reported")
        (artifact_dir / "rss.txt").write_text(f"rss-before={before} rss-reported={after}\n")
        assert actual(qmp) == MEMORY_MIB * MiB  # reported memory is not in the balloon
        out = quit_guest(guest)
    reuse = fields(guest_line(out, "balloon report-reuse"))
    pages = report * MiB // PAGE
    assert reuse["pages"] == str(pages) and reuse["bad"] == "0", out
    assert reuse["zeroed"] == str(pages), out


@pytest.mark.parametrize("options", ["", "deflate-on-oom=on"])
def test_features_and_queue_numbering(monitor, svtest_guest, artifact_dir, tmp_path, options):
    """The driver takes what is offered; without STATS_VQ, reporting takes queue 2."""
    balloon = ",".join(filter(None, [options, "free-page-reporting=on"]))
    append = "svtest.action=balloon svtest.touch_mb=4 svtest.stats=0 svtest.rounds=1"
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log", tmp_path,
                       balloon=balloon) as (guest, qmp):
        device = fields(guest.wait_line(r"balloon device=.*").group(0))
        guest.wait_line(r"balloon ready ")
        assert qmp.execute("balloon", value=(MEMORY_MIB - 1) * MiB) == {"return": {}}
        assert guest.wait_exit() == 0, guest.output
    offered, accepted = int(device["offered"], 16), int(device["accepted"], 16)
    stats, deflate_on_oom, reporting, version_1 = 1 << 1, 1 << 2, 1 << 5, 1 << 32
    assert offered & (stats | reporting | version_1) == stats | reporting | version_1, device
    assert accepted & ~offered == 0 and accepted & version_1 and not accepted & stats, device
    assert bool(accepted & deflate_on_oom) == bool(options), device
    assert (device["stats-queue"], device["report-queue"]) == ("-1", "2"), device
    assert f"balloon actual={MiB // PAGE} inflated={MiB // PAGE} " in guest.output


def test_hostile_page_lists_change_nothing(monitor, svtest_guest, artifact_dir, tmp_path):
    """Frames outside RAM, broken lists and descriptors: the device survives each (or asks
    for a reset and recovers), the guest's own memory keeps its contents, QMP answers and a
    normal inflate/deflate still works."""
    append = "svtest.action=balloon-hostile svtest.hostile_end=halt"
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log", tmp_path,
                       balloon="free-page-reporting=on") as (guest, qmp):
        guest.wait_line(r"balloon-hostile done ", timeout=120)
        assert guest.process.poll() is None
        assert qmp.execute("query-status")["return"]["status"] == "running"
        assert actual(qmp) == MEMORY_MIB * MiB
        assert qmp.execute("balloon", value=(MEMORY_MIB - 8) * MiB) == {"return": {}}
        qmp.execute("quit")
        guest.wait_exit(30)
        stderr = guest.stderr_text()
    out = guest.output
    assert "FAIL" not in out, out
    cases = {line.split()[2]: fields(line)
             for line in out.splitlines() if re.match(r"svtest: balloon-hostile \S+ queue=", line)}
    assert len(cases) == 18, out
    recovered = dict(re.findall(r"balloon-hostile (\S+) recovered=(\d)", out))
    for name, case in cases.items():
        assert case["used"] == "1" or recovered.get(name) == "1", (name, case)
    # Lists of frames outside RAM are simply used: nothing there to give back.
    for name in ("pfn-ffffffff", "pfn-past-ram", "pfn-mmio-gap", "deflate-bad-pfns",
                 "split-pfn", "odd-length", "huge-list"):
        assert cases[name]["used"] == "1" and cases[name]["needs-reset"] == "0", (name, out)
    touched = fields(guest_line(out, "balloon-hostile touched"))
    assert touched["bad"] == "0", out
    normal = fields(guest_line(out, "balloon-hostile normal"))
    assert (normal["inflate"], normal["deflate"], normal["actual"], normal["bad"]) == (
        "ok", "ok", "256", "0"), out
    assert "Traceback" not in stderr, stderr


class EventListener:
    """A second QMP client that records when each event arrives (the timestamps inside
    are when the event arose: QEMU keeps a throttled event's first one)."""

    def __init__(self, guest: Guest, path: Path) -> None:
        self.qmp = connect(guest, path)
        assert self.qmp.execute("qmp_capabilities") == {"return": {}}
        self.qmp.sock.settimeout(0.2)
        self.arrivals: list[tuple[float, dict]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                message = self.qmp.read()
            except (TimeoutError, AssertionError, OSError):
                continue
            if "event" in message:
                self.arrivals.append((time.monotonic(), message))

    def stop(self) -> list[tuple[float, dict]]:
        self.stopped.set()
        self.thread.join(5)
        return self.arrivals


def test_balloon_events_come_at_most_once_a_second(monitor, svtest_guest, artifact_dir,
                                                   tmp_path):
    """Four changes in quick succession: the events arrive at least a second apart, the
    last one carrying the final size."""
    append = "svtest.action=balloon svtest.touch_mb=16"
    events_path = tmp_path / "events.sock"
    with balloon_guest(monitor, svtest_guest, append, artifact_dir / f"{monitor}.log",
                       tmp_path, second_qmp=events_path) as (guest, qmp):
        guest.wait_line(r"balloon ready ")
        listener = EventListener(guest, events_path)
        for give in (4, 8, 2, 12):  # distinct sizes: each line is found once
            assert qmp.execute("balloon", value=(MEMORY_MIB - give) * MiB) == {"return": {}}
            guest.wait_line(rf"balloon actual={give * MiB // PAGE} ")
        final = (MEMORY_MIB - 12) * MiB
        assert actual(qmp) == final
        balloon_changed(monitor, qmp, final)
        time.sleep(1.5)  # anything still held back has come by now
        arrivals = listener.stop()
        out = quit_guest(guest)
    name = "BALLOON_CHANGE" if monitor == "qemu" else "BALLOON_CHANGED"
    events = [(t, e) for t, e in arrivals if e["event"] == name]
    assert 1 <= len(events) <= 4, arrivals
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(events)]
    assert all(gap >= 0.9 for gap in gaps), (gaps, events)
    assert events[-1][1]["data"]["actual"] == final, events
    assert "FAIL" not in out, out


def test_reporting_without_stats_is_queue_2_on_ours(svtest_guest, artifact_dir, tmp_path):
    """Compact numbering: with STATS_VQ refused, the reporting queue is 2 and works.
    (QEMU 7.2 keeps its stats queue at 2 whatever was negotiated: the same guest's report
    there waits forever, so this is checked on ours only.)"""
    append = ("svtest.action=balloon svtest.touch_mb=4 svtest.report_mb=8 svtest.stats=0 "
              "svtest.watch_ms=100")
    with balloon_guest("ours", svtest_guest, append, artifact_dir / "ours.log", tmp_path,
                       balloon="free-page-reporting=on") as (guest, _):
        assert guest.wait_exit() == 0, guest.output
    out = guest.output
    device = fields(guest_line(out, "balloon device="))
    assert (device["stats"], device["reporting"], device["report-queue"]) == ("0", "1", "2")
    assert "balloon reported mb=8 chains=1 " in out, out
    reuse = fields(guest_line(out, "balloon report-reuse"))
    assert reuse["zeroed"] == reuse["pages"] == str(8 * MiB // PAGE) and reuse["bad"] == "0", out
