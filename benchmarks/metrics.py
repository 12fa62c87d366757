"""The benchmark metrics and the probes that take them.

All times are host wall-clock from `time.monotonic_ns()`.  "exec" is the instant
just before `subprocess.Popen` starts the monitor, so fork+exec of the monitor
process is inside every exec-relative time, for both monitors alike.  Both
monitors get the same guest, -m, -smp, serial on stdout (a pipe) and a QMP unix
socket; QEMU gets the same host-specific guest arguments our monitor adds by
itself (`host_cmdline_additions`).  The monitor is started the way a user starts
it: running, not paused with -S, so the guest boots while the monitor is still
getting its QMP socket ready.

start  (ms, lower is better), in the session run; the guest is idle-bound
    (svtest `halt-loop`, or Linux).
      start.qmp-greeting   exec -> the complete QMP greeting line received on the
          QMP socket.  The harness tries to connect to the socket path every
          millisecond until the connection succeeds, then reads the greeting.
      start.query-running  exec -> the reply to the first `query-status` that
          says `"running": true`.  After the greeting: `qmp_capabilities`, then
          `query-status`; while the answer is `prelaunch` (a monitor that reports
          running only once its vCPUs run), the next goes 1 ms after the reply
          (`wait_running`).  QEMU without -S is running as soon as it answers
          commands, which it does only once its main loop runs, later than its
          greeting.  Any other status fails the run.

boot   (ms, lower is better), read from the serial console through a pipe; a
    marker's time is when the pipe read that completes it returns.
    svtest (its own run, `svtest.action=reboot`, QMP socket configured, no
    client):
      boot.first-byte  exec -> the first byte of guest serial output;
      boot.hello       exec -> the line `svtest: hello` (the guest's first line);
      boot.exit        exec -> the monitor process has exited, after the guest
                       printed `svtest: done` and reset (QEMU runs with
                       -no-reboot, our monitor exits on reset).  The exit is seen
                       through a pidfd.  A run fails unless the exit status is 0
                       and `svtest: done` was printed.
    linux (in the same run as start, memory and qmp, a QMP client connected):
      boot.first-byte  exec -> first console byte (the kernel's console comes up);
      boot.run-init    exec -> kernel line `Run /init as init process`;
      boot.userspace   exec -> `stratovirt-py guest: user space ready`, only when
                       the guest's init prints it before the memory sample.
    linux, a run of its own with `console=hvc0` instead of ttyS0: the console is a
    virtconsole on a virtio-serial-device, its chardev a unix socket the bench
    connects to as soon as it accepts (ours keeps what comes before; Linux prints
    nothing there before its hvc driver is up anyway), markers read from it:
      boot.hvc0-run-init   exec -> `Run /init as init process` on hvc0;
      boot.hvc0-userspace  exec -> `stratovirt-py guest: user space ready` on hvc0.

memory (MiB, lower is better)
    With the guest idle (svtest `halt-loop`, `settle` seconds after
    `svtest: done`; Linux: `settle` seconds after `Run /init`), the monitor
    process's memory that is not guest RAM, from /proc/PID/smaps (whole process,
    all threads; see `benchmarks.smaps` for how the RAM mapping is found):
      memory.overhead-rss  Rss of all mappings minus Rss of the guest-RAM mapping(s);
      memory.overhead-pss  the same with Pss (shared pages divided among sharers).
    Taken before any QMP command other than qmp_capabilities and query-status.

qmp, over the one connection opened for `start`, after `qmp_capabilities`
(QEMU refuses commands without it; ours accepts it):
      qmp.latency-p50 / qmp.latency-p99  (µs, lower is better): N sequential
          `query-status` commands, each sent after the previous reply arrived;
          per command, send -> complete reply line; nearest-rank percentiles.
      qmp.throughput  (commands/s, HIGHER is better): N `query-status` commands
          written back to back without waiting (the client keeps reading while it
          writes, so neither side blocks on a full socket buffer); N divided by
          the time from the first byte sent to the last reply received.  Every
          reply must be a `return` carrying its request's id, in order.

block  (svtest only; IOPS or MiB/s, HIGHER is better)
    One run (one boot) per workload, cache mode and monitor.  The guest runs
    `svtest.action=blk-bench svtest.mode=M svtest.bs=B svtest.qd=Q svtest.count=N
    svtest.irq=0`, then --append (which may change other keys, e.g. svtest.irq=1,
    but not those four: such a run fails): it keeps Q requests of B bytes in flight on
    its one virtio-blk disk (device index 0, queue size 64) until N have
    completed, polling the used ring; irq=0 asks the device for no interrupts, so
    the run times the request path, not interrupt delivery.  Random offsets come
    from the guest's fixed seed: both monitors get the same requests.
    The disk: one file of 256 MiB random bytes (every block allocated, not
    sparse), written once per harness run in its temporary directory, given to
    both monitors.  Cache modes:
      *.buffered  ours `-drive ...,direct=off`, QEMU `-drive ...,cache=writeback`;
      *.direct    ours `-drive ...,direct=on`,  QEMU `-drive ...,cache=none` (both O_DIRECT).
    Before every run the harness calls os.sync() (no dirty pages of an earlier
    run are written back during this one), then sets the image's host page cache
    to a fixed state, so the order of the runs does not decide what a run finds
    cached: buffered runs start with the whole image cached (read once through),
    direct runs with none of it (POSIX_FADV_DONTNEED).
    Time: from the arrival (the pipe read that returns it) of the newline ending
    the guest's `svtest: blk-bench start ...` line to the arrival of the next
    byte, the `s` of `svtest: blk-bench done ...` (the guest prints nothing in
    between).  Then:
      block.randread-4k-qd16.*, block.randread-4k-qd1.*, block.randwrite-4k-qd16.*,
      block.randwrite-4k-qd1.*   (IOPS): 4 KiB requests, requests / time;
      block.seqread-128k-qd16.*, block.seqwrite-128k-qd16.*  (MiB/s): 128 KiB
          requests from block 0 on, wrapping at the end; bytes / time / 2^20.
    Request counts (`BLOCK_WORKLOADS`) make a run last ~0.8 s or more here.
    block.cpu-<workload>.<cache>  (ms per 1000 requests, lower is better): in
      the same run and window, the monitor process's CPU time (utime + stime,
      /proc/PID/stat fields 14 and 15: every thread, exited ones included),
      sampled on the serial reader's thread right after the read completing
      the start line and right after the read bringing the next byte
      (`benchmarks.cpu`), divided by the requests and multiplied by 1000.  The
      kernel gives the times in clock ticks (SC_CLK_TCK = 100 here), each
      sample truncated to 10 ms: the counts are sized so that a window holds
      ~100 ticks or more (~1 %).  It includes the vCPU thread, which on this
      host runs the guest's polling loop in KVM's instruction emulator (system
      time) all through the window; the JSON keeps each thread's ticks.
    A run fails (it is reported, not dropped) when the output has
    a `blk-bench FAIL` line, no `blk-bench done` line right after the start
    line, errors= other than 0, requests= other than the start line's count, or
    the monitor does not exit with status 0 after the guest's reset.

net  (virtio-net on a tap; code in `benchmarks.net`, host side `benchmarks.netpeer`)
    Every net run creates its own network namespace (tests/netns.py) holding
    one tap, 10.0.2.1/24 on the host side, IPv6 off on it; the monitor runs
    under `ip netns exec`, and so do the host's peer programs and ping.  The
    namespace, tap and everything in it are removed after the run, whatever
    happened.  Ours: `-netdev tap,id=n0,ifname=TAP -device
    virtio-net-device,netdev=n0,id=net0`; QEMU: `-netdev tap,...,script=no,
    downscript=no,vhost=off -device virtio-net-device,netdev=n0` (its
    user-space data path, as ours) with modern virtio-mmio.
    linux (one boot per monitor and pair, the same guest and cmdline as the
    session run, plus the NIC): after `user space ready`, the harness types on
    the console `ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up` (once eth0
    exists), pings the guest once (ARP and link up, untimed), then:
      net.g2h-tcp  (MB/s = 10^6 bytes/s, higher is better): the guest runs
          `dd if=/dev/zero bs=65536 count=16 | nc 10.0.2.1 5001` (1 MiB); the
          host's receiver times the first byte's arrival -> the last byte's
          arrival, bytes / time.
      net.h2g-tcp  (MB/s, higher is better): the guest runs `nc -l -p 5002
          >/dev/null`; the host connects (retrying until the listener is up),
          sends 2 MiB, shuts down its write side and waits for the guest's
          close: connected -> the guest's FIN seen, bytes / time (so every byte
          was read by the guest's nc).
      net.ping-rtt (ms, lower is better): `ping -c 20 -i 0.2 10.0.2.15` on the
          host; the median of the 20 round trips (every reply must come).
    svtest (one boot per frame workload, monitor and pair): the guest runs
    `svtest.action=net-bench svtest.dir=D svtest.size=S svtest.count=N` on NIC 0:
      net.tx-<S>B  (frames/s, higher is better): the guest sends N frames of S
          bytes (ethertype 0x88b5, S counted from the destination MAC, no FCS);
          the host counts them on the tap (an AF_PACKET socket, its kernel
          statistics, so none is missed) and the run fails if it saw fewer.
      net.rx-<S>B  (frames/s, higher is better): the host writes frames of S
          bytes and ethertype 0x88b5 into the tap (AF_PACKET) from the moment
          the guest's start line begins to arrive until the guest is done (none
          before: frames queued in the tap during boot would come for free),
          keeping at most 256 queued for the monitor (paced by the tap's own
          counters, so the sender does not spin on a full queue and take a core
          from the guest); the guest counts N.
      Time: as blk-bench, from the arrival of the newline of `svtest: net-bench
      start ...` to the arrival of the next byte, the done line's; frames / time.
      A run fails on a `net-bench FAIL` line, errors= other than 0, frames=
      other than N, or a monitor exit status other than 0.

balloon  (virtio-balloon inflate; code in `benchmarks.balloon`)
    One boot per monitor and pair, with its own RAM size (the plan's, default
    -m 1024 for both, whatever --mem says) and a balloon: ours `-device
    virtio-balloon-device,id=balloon0,free-page-reporting=off`, QEMU the same
    with modern virtio-mmio.  Neither has free page reporting (it would give the
    guest's freed memory back before the command) nor deflate-on-oom; neither
    polls statistics.  First the guest fills memory, so that what it will give
    up is resident in the monitor process:
      svtest: `svtest.action=balloon svtest.touch_mb=600` writes every page of
          600 MiB (its `balloon ready` line), then polls the balloon's target
          every 10 ms and inflates with the touched pages;
      linux: after `user space ready`, the console runs `dd if=/dev/zero
          of=/dev/null bs=600M count=1` (the buffer is faulted in, then freed
          when dd exits; the guest keeps the freed pages on its free lists).
    Then, with `query-balloon` showing the boot size, over the QMP connection:
      balloon.rss-before  (MiB, lower is better): VmRSS of the monitor process
          (/proc/PID/status, whole process) just before the command;
      balloon.inflate-ms  (ms, lower is better): `{"execute":"balloon",
          "arguments":{"value":TARGET}}` (default 512 MiB) written -> the reply
          to the first `query-balloon` whose `actual` is TARGET arrived.
          query-balloon is sent every 10 ms on a fixed schedule from the
          command (the first right after its reply), so the figure is late by
          up to 10 ms plus one round trip; `actual` must only fall, and stay
          within [TARGET, boot size];
      balloon.rss-after   (MiB, lower is better): VmRSS right after that reply;
      balloon.rss-drop    (MiB, HIGHER is better): rss-before - rss-after.
    svtest runs also check the guest's lines: exactly (boot - TARGET) / 4 KiB
    pages inflated, and every page it kept still holds its pattern (`balloon
    intact ... bad=0`); otherwise the run fails.  Then `quit`.

many  (ten VMs at once; `benchmarks.many`)
    Ten monitors of the same kind, the session run's guest and command line
    (svtest `halt-loop`, or Linux), -m and -smp, each with its own QMP socket
    and serial pipe, exec'd one after the other as fast as the harness can;
    each VM's probe starts on a thread of its own right after its exec, as in
    start.query-running: connect as soon as the socket accepts, greeting,
    qmp_capabilities, query-status until running.
      many.all-running   (ms, lower is better): the first exec -> the last of
          the ten `running` replies.
      many.overhead-rss  (MiB, lower is better): once all ten have answered,
          the sum of their memory.overhead-rss (smaps, the same definition).
    Then all ten get `quit` and must exit with status 0; whatever happens, all
    ten are killed at the end of the run.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.stats import percentile

NS_PER_MS = 1_000_000
_Found = TypeVar("_Found")
NS_PER_US = 1_000


@dataclass(frozen=True)
class MetricInfo:
    name: str
    group: str
    unit: str
    better: str  # "lower" or "higher"
    label: str


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("start.qmp-greeting", "start", "ms", "lower", "exec -> QMP greeting"),
    MetricInfo("start.query-running", "start", "ms", "lower",
               "exec -> query-status running"),
    MetricInfo("boot.first-byte", "boot", "ms", "lower", "exec -> first serial byte"),
    MetricInfo("boot.hello", "boot", "ms", "lower", "exec -> 'svtest: hello'"),
    MetricInfo("boot.exit", "boot", "ms", "lower", "exec -> exit after reset"),
    MetricInfo("boot.run-init", "boot", "ms", "lower", "exec -> 'Run /init'"),
    MetricInfo("boot.userspace", "boot", "ms", "lower", "exec -> user space ready"),
    MetricInfo("boot.hvc0-run-init", "boot", "ms", "lower", "exec -> 'Run /init' on hvc0"),
    MetricInfo("boot.hvc0-userspace", "boot", "ms", "lower", "exec -> user space, hvc0"),
    MetricInfo("memory.overhead-rss", "memory", "MiB", "lower", "RSS outside guest RAM"),
    MetricInfo("memory.overhead-pss", "memory", "MiB", "lower", "PSS outside guest RAM"),
    MetricInfo("qmp.latency-p50", "qmp", "us", "lower", "query-status p50"),
    MetricInfo("qmp.latency-p99", "qmp", "us", "lower", "query-status p99"),
    MetricInfo("qmp.throughput", "qmp", "cmd/s", "higher", "pipelined query-status"),
)}
GROUPS = ("start", "boot", "memory", "qmp", "block", "net", "balloon", "many")
MiB = 1 << 20


@dataclass(frozen=True)
class BlockWorkload:
    name: str
    mode: str  # svtest.mode
    bs: int
    qd: int
    count: int

    @property
    def unit(self) -> str:
        return "IOPS" if self.mode.startswith("rand") else "MiB/s"

    def cmdline(self) -> str:
        return (f"svtest.action=blk-bench svtest.mode={self.mode} svtest.bs={self.bs} "
                f"svtest.qd={self.qd} svtest.count={self.count} svtest.irq=0")


# Counts: about 0.8-1.2 s on the faster monitor here, where the best runs reach
# 23 k IOPS at qd 16, 10 k at qd 1 and 2.4 GiB/s sequential (page cache).  The
# block.cpu-* figures need that length: the monitor's CPU time comes in 10 ms
# clock ticks, and a window holds ~100 of them or more (the IOPS alone would do
# with 0.2 s, which keeps the ~1 ms of serial latency at each end below 1 %).
BLOCK_WORKLOADS = (
    BlockWorkload("randread-4k-qd16", "randread", 4096, 16, 24000),
    BlockWorkload("randread-4k-qd1", "randread", 4096, 1, 9000),
    BlockWorkload("randwrite-4k-qd16", "randwrite", 4096, 16, 18000),
    BlockWorkload("randwrite-4k-qd1", "randwrite", 4096, 1, 7500),
    BlockWorkload("seqread-128k-qd16", "seqread", 128 * 1024, 16, 18000),
    BlockWorkload("seqwrite-128k-qd16", "seqwrite", 128 * 1024, 16, 18000),
)
# The block.cpu-* metrics: ms of the monitor's CPU time per 1000 requests.
CPU_UNIT = "ms/1k req"
# Cache mode -> direct (O_DIRECT) or not.
BLOCK_CACHES = {"buffered": False, "direct": True}


@dataclass(frozen=True)
class BlockCase:
    workload: BlockWorkload
    cache: str  # a BLOCK_CACHES key

    @property
    def metric(self) -> str:
        return f"block.{self.workload.name}.{self.cache}"

    @property
    def cpu_metric(self) -> str:
        """The monitor's CPU time per 1000 requests, taken in the same run."""
        return f"block.cpu-{self.workload.name}.{self.cache}"

    @property
    def direct(self) -> bool:
        return BLOCK_CACHES[self.cache]


# All buffered cases first: the page cache is then warmed and dropped once per pair
# rather than once per workload.
BLOCK_CASES = tuple(BlockCase(w, c) for c in BLOCK_CACHES for w in BLOCK_WORKLOADS)
METRICS.update({case.metric: MetricInfo(
    case.metric, "block", case.workload.unit, "higher",
    f"{case.workload.mode} {case.workload.bs // 1024}K qd{case.workload.qd}"
    f"{' O_DIRECT' if case.direct else ' page cache'}") for case in BLOCK_CASES})
METRICS.update({case.cpu_metric: MetricInfo(
    case.cpu_metric, "block", CPU_UNIT, "lower", f"monitor CPU, {METRICS[case.metric].label}")
    for case in BLOCK_CASES})


@dataclass(frozen=True)
class FrameWorkload:
    """An svtest net-bench run: `count` frames of `size` bytes one way."""

    direction: str  # "tx" (guest -> host) or "rx" (host -> guest)
    size: int  # frame bytes from the destination MAC on (no FCS)
    count: int

    @property
    def metric(self) -> str:
        return f"net.{self.direction}-{self.size}B"

    def cmdline(self) -> str:
        return (f"svtest.action=net-bench svtest.dir={self.direction} svtest.size={self.size} "
                f"svtest.count={self.count}")


# Counts: see the net section of the module's docstring.
FRAME_WORKLOADS = (
    FrameWorkload("tx", 64, 20000),
    FrameWorkload("rx", 64, 20000),
    FrameWorkload("tx", 1514, 20000),
    FrameWorkload("rx", 1514, 20000),
)
LINUX_NET_METRICS = ("net.g2h-tcp", "net.h2g-tcp", "net.ping-rtt")
METRICS.update({m.name: m for m in (
    MetricInfo("net.g2h-tcp", "net", "MB/s", "higher", "TCP guest -> host (Linux)"),
    MetricInfo("net.h2g-tcp", "net", "MB/s", "higher", "TCP host -> guest (Linux)"),
    MetricInfo("net.ping-rtt", "net", "ms", "lower", "ping host -> guest, median"),
    *(MetricInfo(w.metric, "net", "frames/s", "higher", f"{w.size}-byte frames "
                 f"{'guest -> host' if w.direction == 'tx' else 'host -> guest'}")
      for w in FRAME_WORKLOADS),
)})


BALLOON_METRICS = ("balloon.inflate-ms", "balloon.rss-before", "balloon.rss-after",
                   "balloon.rss-drop")
METRICS.update({m.name: m for m in (
    MetricInfo("balloon.inflate-ms", "balloon", "ms", "lower", "balloon -> query-balloon target"),
    MetricInfo("balloon.rss-before", "balloon", "MiB", "lower", "RSS before the balloon"),
    MetricInfo("balloon.rss-after", "balloon", "MiB", "lower", "RSS at the target"),
    MetricInfo("balloon.rss-drop", "balloon", "MiB", "higher", "RSS given back"),
)})


MANY_VMS = 10
MANY_METRICS = ("many.all-running", "many.overhead-rss")
METRICS.update({m.name: m for m in (
    MetricInfo("many.all-running", "many", "ms", "lower",
               f"first exec -> all {MANY_VMS} query-status running"),
    MetricInfo("many.overhead-rss", "many", "MiB", "lower",
               f"sum of {MANY_VMS} RSS outside guest RAM"),
)})


class ProbeError(RuntimeError):
    """A probe gave up: timeout, the monitor died, or a wrong answer."""


# (output so far, its length before this read, the read's arrival time in ns)
ReadHook = Callable[[bytearray, int, int], None]


class SerialWatcher:
    """Reads a monitor's serial output from a pipe on a thread, timestamping markers."""

    def __init__(self, fd: int, markers: dict[str, bytes],
                 on_read: ReadHook | None = None) -> None:
        self._fd = fd
        self._markers = markers
        # Called on the reader thread after each read, outside the lock: it must be
        # quick, as the next read's arrival time waits for it.
        self._on_read = on_read
        self.data = bytearray()
        self.first_byte_ns: int | None = None
        self.marker_ns: dict[str, int] = {}
        self.eof = False
        # End offset and time of every read, so any byte's arrival can be looked up.
        self._read_ends: list[int] = []
        self._read_ns: list[int] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="serial-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            now = time.monotonic_ns()
            with self._changed:
                if not chunk:
                    self.eof = True
                    self._changed.notify_all()
                    return
                if self.first_byte_ns is None:
                    self.first_byte_ns = now
                searched_to = len(self.data)
                self.data += chunk
                self._read_ends.append(len(self.data))
                self._read_ns.append(now)
                for name, marker in self._markers.items():
                    if name in self.marker_ns:
                        continue
                    # Only the new bytes, plus enough before them for a marker split
                    # across reads.
                    if self.data.find(marker, max(0, searched_to - len(marker) + 1)) >= 0:
                        self.marker_ns[name] = now
                self._changed.notify_all()
            if self._on_read is not None:
                # Only this thread appends to data, so it may read it unlocked.
                self._on_read(self.data, searched_to, now)

    def wait_for(self, name: str, deadline_ns: int, check: Any = None) -> int:
        """Time the marker was seen; ProbeError on EOF or timeout.

        `check()` runs about every 0.2 s while waiting, outside the lock so the
        reader thread's timestamps never wait for it; it raises ProbeError to give
        up early (the monitor died, the guest stopped).
        """
        return self._wait(lambda: self.marker_ns.get(name), repr(self._markers[name]),
                          deadline_ns, check)

    def wait_for_pattern(self, pattern: re.Pattern[bytes], start: int, deadline_ns: int,
                         check: Any = None) -> re.Match[bytes]:
        """The first match of `pattern` in the output from offset `start` on.

        Like `wait_for`, for text only known once the run is under way (the
        console commands of the net metric).
        """
        return self._wait(lambda: pattern.search(self.data, start), repr(pattern.pattern),
                          deadline_ns, check)

    def _wait(self, find: Callable[[], _Found | None], what: str, deadline_ns: int,
              check: Any) -> _Found:
        """Until `find()` (called under the lock) finds something: EOF or the deadline
        raise ProbeError."""
        while True:
            with self._changed:
                found = find()
                if found is not None:
                    return found
                if self.eof:
                    raise ProbeError(f"serial output ended before {what}")
                remaining = (deadline_ns - time.monotonic_ns()) / 1e9
                if remaining <= 0:
                    raise ProbeError(f"no {what} on the serial console in time")
                self._changed.wait(min(remaining, 0.2))
                found = find()
                if found is not None:
                    return found
            if check is not None:
                check()

    def arrival_ns(self, offset: int) -> int | None:
        """When the read returning byte `offset` of the output returned; None if not yet."""
        with self._changed:
            index = bisect.bisect_right(self._read_ends, offset)
            return self._read_ns[index] if index < len(self._read_ns) else None

    def tail(self, limit: int = 1500) -> str:
        with self._changed:
            return bytes(self.data[-limit:]).decode(errors="replace")

    def join(self, timeout: float = 5) -> None:
        self._thread.join(timeout)


class ExitWatcher:
    """Waits for a child's exit through a pidfd, so the exit time is exact.

    Popen.wait(timeout) polls with sleeps of up to 50 ms, too coarse for boot.exit.
    """

    def __init__(self, pid: int) -> None:
        self._fd = os.pidfd_open(pid)

    def wait(self, deadline_ns: int) -> int | None:
        """The time the process was seen to exit, None on timeout."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            remaining_ms = (deadline_ns - time.monotonic_ns()) // NS_PER_MS
            if remaining_ms <= 0:
                return None
            if poller.poll(remaining_ms):
                return time.monotonic_ns()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class QmpClient:
    """A minimal line-oriented QMP client on a blocking unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProbeError("QMP reply timed out")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise ProbeError("QMP reply timed out") from None
            if not chunk:
                raise ProbeError("QMP connection closed by the monitor")
            self._buffer += chunk

    def read_reply(self, timeout: float) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            message = json.loads(self.read_line(timeout))
            if "event" not in message:
                return message

    def execute(self, command: str, timeout: float = 10, **extra: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"execute": command, **extra}).encode() + b"\r\n")
        reply = self.read_reply(timeout)
        if "return" not in reply:
            raise ProbeError(f"{command}: {reply}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_qmp(path: Path, deadline_ns: int, alive: Any) -> tuple[int, QmpClient]:
    """Connects as soon as the socket accepts, reads the greeting: (time, client)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if time.monotonic_ns() > deadline_ns:
            raise ProbeError(f"QMP socket {path} did not accept a connection in time")
        if not alive():
            raise ProbeError("monitor exited before its QMP socket accepted a connection")
        time.sleep(0.001)
    client = QmpClient(sock)
    try:
        line = client.read_line(max(0.001, (deadline_ns - time.monotonic_ns()) / 1e9))
        now = time.monotonic_ns()
        greeting = json.loads(line)
    except (ProbeError, ValueError):
        client.close()
        raise
    if "QMP" not in greeting:
        client.close()
        raise ProbeError(f"not a QMP greeting: {line!r}")
    return now, client


# How often `wait_running` asks: as often as `connect_qmp` tries the socket.
RUNNING_POLL_S = 0.001


def wait_running(client: QmpClient, deadline_ns: int, alive: Callable[[], bool],
                 interval_s: float = RUNNING_POLL_S) -> tuple[int, int]:
    """`query-status` until it answers `"running": true`: (that reply's arrival, queries).

    A monitor still getting its vCPUs ready answers another status (`prelaunch`);
    the next query goes `interval_s` after each such reply, so the time is late by
    at most that plus one round trip.  Any other status cannot become running on
    its own (paused, shutdown, internal-error): a ProbeError at once.
    """
    queries = 0
    while True:
        remaining = (deadline_ns - time.monotonic_ns()) / 1e9
        if remaining <= 0:
            raise ProbeError(f"query-status did not say running in time ({queries} queries)")
        reply = client.execute("query-status", timeout=remaining)
        answered = time.monotonic_ns()
        queries += 1
        status = reply["return"]
        if status.get("running") is True:
            return answered, queries
        if status.get("status") != "prelaunch":
            raise ProbeError(f"query-status answered {status} before running")
        if not alive():
            raise ProbeError("monitor exited before query-status said running")
        time.sleep(interval_s)


@dataclass(frozen=True)
class LatencyResult:
    p50_us: float
    p99_us: float
    max_us: float
    count: int


def query_status_latency(client: QmpClient, count: int, timeout: float = 10) -> LatencyResult:
    """`count` sequential query-status round trips."""
    samples: list[float] = []
    for i in range(count):
        request = b'{"execute":"query-status","id":%d}\r\n' % i
        started = time.monotonic_ns()
        client.sock.sendall(request)
        line = client.read_line(timeout)
        elapsed_us: float | None = (time.monotonic_ns() - started) / NS_PER_US
        reply = json.loads(line)
        if "event" in reply:
            # An event came first: this round trip is not a clean sample, drop it.
            reply = client.read_reply(timeout)
            elapsed_us = None
        if reply.get("id") != i or "return" not in reply:
            raise ProbeError(f"query-status #{i}: unexpected reply {reply}")
        if elapsed_us is not None:
            samples.append(elapsed_us)
    return LatencyResult(p50_us=percentile(samples, 50), p99_us=percentile(samples, 99),
                         max_us=max(samples), count=len(samples))


@dataclass(frozen=True)
class ThroughputResult:
    commands_per_second: float
    count: int
    seconds: float


def query_status_throughput(client: QmpClient, count: int, timeout: float = 60
                            ) -> ThroughputResult:
    """`count` pipelined query-status commands; replies must come back complete, in order."""
    payload = b"".join(b'{"execute":"query-status","id":%d}\r\n' % i for i in range(count))
    sock = client.sock
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    sent = 0
    replies = 0
    buffer = bytearray()
    try:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        started = time.monotonic_ns()
        deadline = started + int(timeout * 1e9)
        while replies < count:
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0:
                raise ProbeError(f"pipelined query-status: {replies}/{count} replies in "
                                 f"{timeout} s ({sent}/{len(payload)} bytes sent)")
            for _key, events in selector.select(remaining):
                if events & selectors.EVENT_WRITE and sent < len(payload):
                    with contextlib.suppress(BlockingIOError):
                        sent += sock.send(payload[sent:sent + 65536])
                    if sent == len(payload):
                        selector.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(262144)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise ProbeError(f"QMP connection closed after {replies} replies")
                    buffer += chunk
                    replies = _check_replies(buffer, replies)
        finished = time.monotonic_ns()
    finally:
        selector.close()
        sock.setblocking(True)
    seconds = (finished - started) / 1e9
    return ThroughputResult(commands_per_second=count / seconds, count=count, seconds=seconds)


def _check_replies(buffer: bytearray, replies: int) -> int:
    """Consumes complete reply lines from buffer, checking ids; the new reply count."""
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            return replies
        line = bytes(buffer[:end + 1])
        del buffer[:end + 1]
        message = json.loads(line)
        if "event" in message:
            continue
        if message.get("id") != replies or "return" not in message:
            raise ProbeError(f"pipelined query-status #{replies}: unexpected reply {message}")
        replies += 1


BLK_START = re.compile(rb"svtest: blk-bench start mode=(\w+) bs=(\d+) qd=(\d+) count=(\d+)\r?\n")
BLK_DONE = re.compile(rb"svtest: blk-bench done requests=(\d+) bytes=(\d+) errors=(\d+)")
BLK_GUEST = re.compile(rb"svtest: blk-bench guest-ms=(\d+) tsc-ticks=(\d+) notifies=(\d+)")
BLK_FAIL = re.compile(rb"svtest: blk-bench FAIL[^\r\n]*")
BLK_FIRST_ERROR = re.compile(rb"svtest: blk-bench first-error[^\r\n]*")


@dataclass(frozen=True)
class BlkBenchResult:
    mode: str
    bs: int
    qd: int
    requests: int
    bytes: int
    seconds: float
    # The guest's own figures, for cross-checking the host's time.
    guest_ms: int | None
    tsc_ticks: int | None
    notifies: int | None

    def value(self, unit: str) -> float:
        """The metric value: IOPS, or MiB/s of data moved."""
        if unit == "IOPS":
            return self.requests / self.seconds
        if unit == "MiB/s":
            return self.bytes / self.seconds / MiB
        raise ValueError(f"no block metric in {unit}")

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "bs": self.bs, "qd": self.qd, "requests": self.requests,
                "bytes": self.bytes, "host_ms": self.seconds * 1e3, "guest_ms": self.guest_ms,
                "tsc_ticks": self.tsc_ticks, "notifies": self.notifies}


def timed_window(data: bytes, start: re.Match[bytes], done: re.Match[bytes],
                 arrival_ns: Callable[[int], int | None], action: str) -> float:
    """Seconds from the arrival of the newline ending the `start` line to the
    arrival of the next byte, which must be the `done` line's first."""
    if done.start() != start.end():
        # Something else came in the timed window: the time would include it.
        raise ProbeError(f"output between the {action} start and done lines: "
                         f"{data[start.end():done.start()][:200]!r}")
    newline = start.end() - 1
    began, ended = arrival_ns(newline), arrival_ns(newline + 1)
    if began is None or ended is None:
        raise ProbeError(f"no arrival time for the end of the {action} start line")
    if ended <= began:
        # One read returned both: the run's time was spent before the reader woke.
        raise ProbeError(f"the {action} start line's end and the done line came in one read")
    return (ended - began) / 1e9


def parse_blk_bench(data: bytes, arrival_ns: Callable[[int], int | None]) -> BlkBenchResult:
    """A blk-bench run from the guest's complete serial output; ProbeError if it failed.

    `arrival_ns(offset)` is when byte `offset` of `data` arrived (`SerialWatcher`).
    """
    failed = BLK_FAIL.search(data)
    if failed:
        raise ProbeError(failed.group().decode(errors="replace"))
    start = BLK_START.search(data)
    if start is None:
        raise ProbeError("no 'svtest: blk-bench start' line")
    done = BLK_DONE.search(data, start.end())
    if done is None:
        raise ProbeError("no 'svtest: blk-bench done' line after the start line")
    requests, nbytes, errors = (int(v) for v in done.groups())
    if errors:
        first = BLK_FIRST_ERROR.search(data, done.end())
        detail = f" ({first.group().decode(errors='replace')})" if first else ""
        raise ProbeError(f"blk-bench errors={errors} of requests={requests}{detail}")
    count = int(start.group(4))
    if requests != count:
        raise ProbeError(f"blk-bench completed requests={requests}, asked for count={count}")
    seconds = timed_window(data, start, done, arrival_ns, "blk-bench")
    guest = BLK_GUEST.search(data, done.end())
    guest_ms, tsc_ticks, notifies = ((int(v) for v in guest.groups()) if guest
                                     else (None, None, None))
    return BlkBenchResult(mode=start.group(1).decode(), bs=int(start.group(2)),
                          qd=int(start.group(3)), requests=requests, bytes=nbytes,
                          seconds=seconds, guest_ms=guest_ms,
                          tsc_ticks=tsc_ticks, notifies=notifies)
