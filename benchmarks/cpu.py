"""Host CPU time of a monitor process over the blk-bench window (`block.cpu-*` metrics).

The process's utime + stime come from /proc/PID/stat (fields 14 and 15), which
covers every thread of the process, those that have already exited included.
The kernel reports them in clock ticks (SC_CLK_TCK, 100 per second here): each
sample is truncated to 10 ms, so a difference of two samples is within 10 ms of
the truth, and the block workloads are sized so that a window holds well over a
second of the monitor's CPU time (`benchmarks.metrics.BLOCK_WORKLOADS`).

The samples are taken on the serial reader's thread, right after the read that
completes blk-bench's start line returns and right after the next read (the
done line's first byte, see `metrics.timed_window`) returns: the same window the
IOPS and MiB/s figures time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from benchmarks.metrics import ProbeError

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MS_PER_S = 1000


@dataclass(frozen=True)
class CpuTimes:
    """A process's CPU time in clock ticks (all threads, exited ones included)."""

    utime: int
    stime: int
    # Time the process's vCPU threads ran guest code natively (field 43); a
    # software-emulated guest kernel is stime instead.  Kept for reading, not used.
    guest_time: int

    @property
    def total(self) -> int:
        return self.utime + self.stime


def parse_proc_stat(text: str) -> CpuTimes:
    """utime, stime and guest_time from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so the fields are counted from the last ')'.
    """
    close = text.rfind(")")
    if close < 0:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    # After ')': field 3 (state) is index 0, so field N is index N - 3.
    fields = text[close + 1:].split()
    if len(fields) < 43 - 2:
        raise ValueError(f"/proc/PID/stat has {len(fields) + 2} fields, fewer than 43")
    try:
        return CpuTimes(utime=int(fields[14 - 3]), stime=int(fields[15 - 3]),
                        guest_time=int(fields[43 - 3]))
    except ValueError:
        raise ValueError(f"non-numeric CPU fields in /proc/PID/stat: {text[:200]!r}") from None


def read_cpu_times(pid: int) -> CpuTimes:
    with open(f"/proc/{pid}/stat") as stat:
        return parse_proc_stat(stat.read())


def thread_name(text: str) -> str:
    """The command name (field 2) of a /proc/.../stat line."""
    return text[text.find("(") + 1:text.rfind(")")]


def read_thread_times(pid: int) -> dict[str, int]:
    """utime + stime of each live thread, keyed "TID name", for reading where the time went.

    Not the metric: a thread that exits takes its ticks with it here.
    """
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except FileNotFoundError:
            continue  # exited since the listing
        threads[f"{tid} {thread_name(text)}"] = parse_proc_stat(text).total
    return threads


def thread_deltas(start: dict[str, int], end: dict[str, int]) -> dict[str, int]:
    """Ticks each thread used between two `read_thread_times` (0 at start if it is new)."""
    return {name: ticks - start.get(name, 0) for name, ticks in end.items()}


def cpu_ms_per_1000(before: CpuTimes, after: CpuTimes, requests: int,
                    ticks_per_second: int = CLOCK_TICKS) -> float:
    """Milliseconds of CPU (utime + stime) the process used per 1000 requests."""
    if requests <= 0:
        raise ValueError(f"no requests to divide the CPU time by ({requests})")
    used = after.total - before.total
    if used < 0 or after.utime < before.utime or after.stime < before.stime:
        raise ValueError(f"CPU time went backwards: {before} -> {after}")
    return used * MS_PER_S / ticks_per_second / requests * 1000


class WindowSampler:
    """Samples a process's CPU time at the end of a start line and at the next byte.

    Installed as a `SerialWatcher` read hook: `on_read` runs on the reader thread
    after each read, with the output so far and the length before that read.
    """

    def __init__(self, pid: int, start_line: re.Pattern[bytes], longest_line: int = 200,
                 read: Any = read_cpu_times, read_threads: Any = read_thread_times) -> None:
        self._pid = pid
        self._start_line = start_line
        self._longest = longest_line
        self._read = read
        self._read_threads = read_threads
        self._start_end: int | None = None
        self.start: CpuTimes | None = None
        self.end: CpuTimes | None = None
        self._threads_start: dict[str, int] = {}
        self.threads: dict[str, int] = {}
        self.error: str | None = None

    def on_read(self, data: bytearray, before: int, now_ns: int) -> None:
        if self.end is not None or self.error is not None:
            return
        try:
            if self._start_end is None:
                found = self._start_line.search(data, max(0, before - self._longest))
                if found is None:
                    return
                self._start_end = found.end()
                # The process's figure first, the breakdown after it: the metric's
                # sample stays as close to the read as it can be.
                self.start = self._read(self._pid)
                self._threads_start = self._read_threads(self._pid)
                if len(data) > found.end():
                    # The next byte came in the same read: no window to sample
                    # (the timed window refuses this run too).
                    self.error = "the blk-bench start line's end and the next byte in one read"
            elif len(data) > self._start_end:
                self.end = self._read(self._pid)
                self.threads = thread_deltas(self._threads_start,
                                             self._read_threads(self._pid))
        except (OSError, ValueError) as error:
            self.error = f"reading the monitor's CPU time: {error}"

    def ms_per_1000(self, requests: int) -> float:
        """The window's CPU time per 1000 requests; ProbeError if it was not sampled."""
        if self.error is not None:
            raise ProbeError(self.error)
        if self.start is None or self.end is None:
            raise ProbeError("the monitor's CPU time was not sampled at both ends of "
                             "the blk-bench window")
        try:
            return cpu_ms_per_1000(self.start, self.end, requests)
        except ValueError as error:
            raise ProbeError(str(error)) from None

    def as_dict(self) -> dict[str, Any]:
        def ticks(times: CpuTimes | None) -> dict[str, int] | None:
            return None if times is None else {
                "utime": times.utime, "stime": times.stime, "guest_time": times.guest_time}
        return {"clock_ticks_per_s": CLOCK_TICKS, "start": ticks(self.start),
                "end": ticks(self.end), "thread_ticks": self.threads}
