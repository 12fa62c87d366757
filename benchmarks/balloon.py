"""The balloon metric: how fast a monitor takes memory back through virtio-balloon.

Definitions are in `benchmarks.metrics` (the "balloon" section); this module
holds what a balloon run does once the guest is up: the device arguments, the
plan (guest RAM, target, how much the guest touches first), reading the
process's resident memory, the timed inflate over QMP and the checks of the
freestanding guest's balloon lines.  `benchmarks.harness` starts and ends the
processes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.metrics import NS_PER_MS, ProbeError, QmpClient

MiB = 1 << 20
PAGE = 4096


def ours_balloon() -> list[str]:
    # Free page reporting stays off on both monitors: with it the guest's freed
    # memory would go back before the command and the drop would measure nothing.
    return ["-device", "virtio-balloon-device,id=balloon0,free-page-reporting=off"]


def qemu_balloon() -> list[str]:
    # The freestanding guest drives only modern (version 2) virtio-mmio; Linux
    # drives both, so both guests get the same device.
    return ["-global", "virtio-mmio.force-legacy=false",
            "-device", "virtio-balloon-device,id=balloon0,free-page-reporting=off"]


@dataclass(frozen=True)
class BalloonPlan:
    """Sizes of a balloon run, MiB: boot RAM (-m), the `balloon` target, and what
    the guest touches before it (so that what it gives up was resident)."""

    mem_mib: int
    target_mib: int
    touch_mib: int
    # query-balloon is sent this often while the guest inflates.
    poll_s: float = 0.01

    @property
    def inflate_mib(self) -> int:
        return self.mem_mib - self.target_mib

    def check(self) -> None:
        """ValueError unless the sizes make a run that can reach its target."""
        if not 0 < self.target_mib < self.mem_mib:
            raise ValueError(f"the target ({self.target_mib} MiB) must be below the guest "
                             f"RAM ({self.mem_mib} MiB) and above 0")
        if self.target_mib < 64:
            raise ValueError("both monitors refuse a target below 64 MiB")
        if self.touch_mib < self.inflate_mib:
            # The freestanding guest inflates only pages it touched; Linux's freed
            # pages would not all be resident either.
            raise ValueError(f"the guest must touch at least the {self.inflate_mib} MiB "
                             f"it gives up, not {self.touch_mib}")
        if self.touch_mib >= self.mem_mib:
            raise ValueError(f"the guest cannot touch {self.touch_mib} MiB of "
                             f"{self.mem_mib} MiB")


def parse_plan(text: str) -> BalloonPlan:
    """`MEM,TARGET,TOUCH` in MiB (the --balloon-plan option), checked."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not MEM,TARGET,TOUCH (three sizes in MiB)")
    try:
        mem, target, touch = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r}: sizes are whole MiB") from None
    plan = BalloonPlan(mem_mib=mem, target_mib=target, touch_mib=touch)
    plan.check()
    return plan


# The brief's sizes (1 GiB, target 512 MiB).  The freestanding guest touches
# 600 MiB in about 12 s of emulated guest time here, so all 512 MiB it gives are
# resident.
SVTEST_PLAN = BalloonPlan(mem_mib=1024, target_mib=512, touch_mib=600)
# Linux on a kvm_pvm host: every page the guest faults in or hands to the
# balloon goes through its kernel in KVM's instruction emulator.  Measured with
# -m 1024: boot to user space 38 s, dd of 96 MiB 74 s (0.77 s/MiB), inflating
# 64 MiB 9.3 s; the brief's 600 MiB and 512 MiB would take ~8 and ~1.3 minutes,
# about 10 minutes a run.  So 1 GiB still, but 64 MiB given of 96 MiB filled:
# about 2 minutes a run.
LINUX_PLAN = BalloonPlan(mem_mib=1024, target_mib=960, touch_mib=96)


def svtest_cmdline(plan: BalloonPlan) -> str:
    """The freestanding guest's balloon action: touch, then follow the target until
    the host quits (no round limit, so it is alive when its RSS is read)."""
    return f"svtest.action=balloon svtest.touch_mb={plan.touch_mib}"


def linux_touch_command(plan: BalloonPlan) -> str:
    """Fills (and frees on exit) a buffer of touch_mib: resident on the host after."""
    return f"dd if=/dev/zero of=/dev/null bs={plan.touch_mib}M count=1 2>/dev/null"


_VM_RSS = re.compile(r"^VmRSS:\s+(\d+) kB$", re.MULTILINE)


def parse_vm_rss(status: str) -> int:
    """VmRSS of a /proc/PID/status text, bytes (whole process: threads share it)."""
    found = _VM_RSS.search(status)
    if found is None:
        raise ProbeError("no VmRSS line in /proc/PID/status (the process has exited?)")
    return int(found.group(1)) * 1024


def vm_rss(pid: int) -> int:
    try:
        return parse_vm_rss(Path(f"/proc/{pid}/status").read_text())
    except FileNotFoundError:
        raise ProbeError(f"process {pid} is gone: cannot read its RSS") from None


def query_actual(client: QmpClient) -> int:
    reply = client.execute("query-balloon")["return"]
    actual = reply.get("actual") if isinstance(reply, dict) else None
    if not isinstance(actual, int):
        raise ProbeError(f"query-balloon: no integer 'actual' in {reply}")
    return actual


@dataclass(frozen=True)
class InflateResult:
    inflate_ms: float
    rss_before: int
    rss_after: int
    polls: int
    # query-balloon's values seen on the way (Linux moves 1 MiB at a time).
    seen: list[int]

    def values(self) -> dict[str, float]:
        return {"balloon.inflate-ms": self.inflate_ms,
                "balloon.rss-before": self.rss_before / MiB,
                "balloon.rss-after": self.rss_after / MiB,
                "balloon.rss-drop": (self.rss_before - self.rss_after) / MiB}

    def as_dict(self) -> dict[str, Any]:
        return {"inflate_ms": self.inflate_ms, "rss_before": self.rss_before,
                "rss_after": self.rss_after, "polls": self.polls,
                "distinct_actual": len(self.seen), "last_before_target": self.seen[-2:-1]}


def progress(seen: list[int], actual: int, ram: int, target: int) -> None:
    """Records a polled `actual`; ProbeError when it is impossible on the way from
    ram down to target (outside that range, or growing again)."""
    if not target <= actual <= ram:
        raise ProbeError(f"query-balloon actual={actual} outside [{target}, {ram}] while "
                         "inflating")
    if seen and actual > seen[-1]:
        raise ProbeError(f"query-balloon actual grew from {seen[-1]} to {actual} while "
                         "inflating")
    if not seen or actual != seen[-1]:
        seen.append(actual)


def inflate(client: QmpClient, pid: int, plan: BalloonPlan, timeout_s: float,
            check: Callable[[], None] | None = None,
            clock: Callable[[], int] = time.monotonic_ns,
            sleep: Callable[[float], None] = time.sleep) -> InflateResult:
    """The timed part: RSS, `balloon`, query-balloon every poll_s until `actual`
    is the target, RSS again.

    The time runs from just before the `balloon` command is written to the
    arrival of the first query-balloon reply showing the target.  Polls keep a
    fixed schedule (send time + k * poll_s), so a slow reply does not shift the
    ones after it.
    """
    ram, target = plan.mem_mib * MiB, plan.target_mib * MiB
    actual = query_actual(client)
    if actual != ram:
        raise ProbeError(f"query-balloon actual={actual} before the command, not the "
                         f"boot size {ram}")
    before = vm_rss(pid)
    sent = clock()
    client.execute("balloon", arguments={"value": target})
    deadline = sent + int(timeout_s * 1e9)
    seen = [ram]
    polls = 0
    while True:
        actual = query_actual(client)
        now = clock()
        polls += 1
        progress(seen, actual, ram, target)
        if actual == target:
            break
        if now > deadline:
            raise ProbeError(f"the guest did not reach the balloon target {target} in "
                             f"{timeout_s} s: actual={actual} after {polls} polls")
        if check is not None:
            check()
        due = sent + int(polls * plan.poll_s * 1e9)
        sleep(max(0.0, (due - clock()) / 1e9))
    after = vm_rss(pid)
    return InflateResult(inflate_ms=(now - sent) / NS_PER_MS, rss_before=before,
                         rss_after=after, polls=polls, seen=seen)


# --- the freestanding guest's balloon lines -----------------------------------

SVTEST_READY_MARKER = b"svtest: balloon ready "
_SVTEST_READY = re.compile(rb"svtest: balloon ready pages=(\d+) target=(\d+) actual=(\d+)")
_SVTEST_TOUCHED = re.compile(rb"svtest: balloon touched mb=(\d+) pages=(\d+) [^\r\n]* ms=(\d+)")
_SVTEST_INFLATED = re.compile(rb"svtest: balloon actual=(\d+) inflated=(\d+) ms=(\d+)")
_SVTEST_INTACT = re.compile(rb"svtest: balloon intact pages=(\d+) bad=(\d+)")
_SVTEST_FAIL = re.compile(rb"svtest: balloon FAIL[^\r\n]*")


def svtest_fail(data: bytes) -> str | None:
    failed = _SVTEST_FAIL.search(data)
    return failed.group().decode(errors="replace") if failed else None


def check_svtest_ready(data: bytes, plan: BalloonPlan) -> dict[str, int]:
    """The guest touched what the plan says and its balloon is empty: its figures."""
    if (failed := svtest_fail(data)) is not None:
        raise ProbeError(failed)
    ready, touched = _SVTEST_READY.search(data), _SVTEST_TOUCHED.search(data)
    if ready is None or touched is None:
        raise ProbeError("no 'balloon touched' and 'balloon ready' lines")
    pages = plan.touch_mib * MiB // PAGE
    if int(ready.group(1)) != pages or int(ready.group(3)) != 0:
        raise ProbeError(f"the guest is ready with pages={ready.group(1).decode()} "
                         f"actual={ready.group(3).decode()}, not pages={pages} actual=0")
    return {"touched_pages": pages, "touch_guest_ms": int(touched.group(3))}


def check_svtest_inflated(data: bytes, plan: BalloonPlan) -> dict[str, int]:
    """The guest gave exactly the plan's pages and kept the rest intact: its figures."""
    if (failed := svtest_fail(data)) is not None:
        raise ProbeError(failed)
    inflated, intact = _SVTEST_INFLATED.search(data), _SVTEST_INTACT.search(data)
    if inflated is None or intact is None:
        raise ProbeError("no 'balloon actual=... inflated=' and 'balloon intact' lines")
    pages = plan.inflate_mib * MiB // PAGE
    if (int(inflated.group(1)), int(inflated.group(2))) != (pages, pages):
        raise ProbeError(f"the guest inflated actual={inflated.group(1).decode()} "
                         f"inflated={inflated.group(2).decode()}, not {pages} pages")
    if int(intact.group(2)) != 0:
        raise ProbeError(f"{intact.group(2).decode()} of the pages the guest kept changed "
                         "while it inflated")
    return {"inflate_guest_ms": int(inflated.group(3)), "intact_pages": int(intact.group(1))}


# Complete lines to wait for (a FAIL line ends the wait too: the check reports it).
SVTEST_READY_LINE = re.compile(rb"svtest: balloon (ready|FAIL)[^\r\n]*\r?\n")
SVTEST_INTACT_LINE = re.compile(rb"svtest: balloon (intact|FAIL)[^\r\n]*\r?\n")
