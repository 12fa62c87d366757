"""The net metric: virtio-net on a tap, in a network namespace the run creates.

Definitions are in `benchmarks.metrics` (the "net" section); this module holds
what the net runs do: the workloads, the host peer (`benchmarks.netpeer`, run
inside the namespace), the Linux guest's console, and the parsers of ping's
and svtest's output.  `benchmarks.harness` starts and ends the processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from benchmarks.metrics import (
    NS_PER_MS,
    FrameWorkload,
    ProbeError,
    SerialWatcher,
    timed_window,
)

if TYPE_CHECKING:
    from tests.netns import NetNamespace

TAP = "svpytap0"
HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
PREFIX_LEN = 24
NETMASK = "255.255.255.0"
ETHERTYPE = 0x88B5
MB = 1_000_000


def ours_nic(tap: str) -> list[str]:
    return ["-netdev", f"tap,id=n0,ifname={tap}",
            "-device", "virtio-net-device,netdev=n0,id=net0"]


def qemu_nic(tap: str) -> list[str]:
    # vhost=off: QEMU's own user-space data path, the one to compare with.  The
    # freestanding guest drives only modern (version 2) virtio-mmio.
    return ["-global", "virtio-mmio.force-legacy=false",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
            "-device", "virtio-net-device,netdev=n0"]


# --- Linux guest: TCP each way and ping, in one boot --------------------------

@dataclass(frozen=True)
class LinuxNetPlan:
    g2h_blocks: int  # dd blocks of 64 KiB the guest sends
    h2g_bytes: int  # bytes the host sends
    pings: int
    ping_interval_s: float = 0.2
    g2h_port: int = 5001
    h2g_port: int = 5002
    block: int = 64 * 1024

    @property
    def g2h_bytes(self) -> int:
        return self.g2h_blocks * self.block


# Sized for a kvm_pvm host, where the guest kernel's TCP path is emulated: QEMU
# moved 0.09 MB/s guest -> host and 0.31 MB/s host -> guest there, so these take
# about 11 s and 7 s (the ping 4 s) per run.
LINUX_NET_PLAN = LinuxNetPlan(g2h_blocks=16, h2g_bytes=2 * 1024 * 1024, pings=20)


class GuestConsole:
    """Runs commands on the Linux guest's busybox shell over its serial console."""

    def __init__(self, stdin: IO[bytes], serial: SerialWatcher,
                 check: Callable[[], None] | None = None) -> None:
        self._stdin = stdin
        self._serial = serial
        self._check = check
        self._sequence = 0

    def start(self, command: str) -> Callable[[float], tuple[int, str]]:
        """Types `command`; the returned function waits for it: (exit status, output).

        The end marker is computed by the shell (`$?` expands to the status), so
        the console's echo of the typed line can never match it.
        """
        self._sequence += 1
        tag = f"svpy-bench-{self._sequence}"
        offset = len(self._serial.data)
        self._stdin.write(f"{command}; echo {tag}=$?=end\n".encode())
        self._stdin.flush()
        pattern = re.compile(rb"\n" + re.escape(tag.encode()) + rb"=(\d+)=end")

        def wait(timeout_s: float) -> tuple[int, str]:
            match = self._serial.wait_for_pattern(pattern, offset,
                                                  time.monotonic_ns() + int(timeout_s * 1e9),
                                                  self._check)
            output = bytes(self._serial.data[offset:match.start()]).decode(errors="replace")
            # What comes first is the shell's echo of the typed line (which the
            # terminal may have wrapped): it ends where the typed line ends.
            return int(match.group(1)), output.partition("=$?=end")[2].strip()
        return wait

    def run(self, command: str, timeout_s: float) -> str:
        """Runs `command`, which must succeed; its output."""
        status, output = self.start(command)(timeout_s)
        if status != 0:
            raise ProbeError(f"guest command {command!r} exited with {status}: {output[-300:]}")
        return output


class Peer:
    """A `benchmarks.netpeer` process in the namespace."""

    def __init__(self, namespace: NetNamespace, python: str, args: list[str],
                 cwd: str) -> None:
        self.process = namespace.popen([python, "-m", "benchmarks.netpeer", *args],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, cwd=cwd)
        self.args = args
        # Lines are read from the fd itself: a buffered reader could hold a whole
        # line that select() then never reports.
        self._buffer = bytearray()

    def wait_ready(self, timeout_s: float = 30) -> None:
        assert self.process.stdout is not None
        line = self._line(timeout_s)
        if line != b"ready\n":
            raise ProbeError(f"netpeer {self.args[0]}: {line!r} "
                             f"{self._stderr_tail()}")

    def _line(self, timeout_s: float) -> bytes:
        """Its next output line; b"" if it exited without one."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while (end := self._buffer.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise ProbeError(f"netpeer {self.args[0]} said nothing in {timeout_s} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line = bytes(self._buffer[:end + 1])
        del self._buffer[:end + 1]
        return line

    def _stderr_tail(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()[-500:].decode(errors="replace")

    def go(self) -> None:
        """Starts a flood (it waits for this line)."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def result(self, timeout_s: float, stop: bool = False) -> dict[str, Any]:
        """Its JSON result; `stop` closes its stdin first (drain and flood run until then)."""
        if stop and self.process.stdin is not None:
            self.process.stdin.close()
        line = self._line(timeout_s)
        try:
            result = json.loads(line)
        except ValueError:
            raise ProbeError(f"netpeer {self.args[0]}: {line!r} {self._stderr_tail()}") from None
        if "error" in result:
            raise ProbeError(f"netpeer {self.args[0]}: {result['error']}")
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def peer(namespace: NetNamespace, args: list[str], cwd: str,
         python: str = sys.executable) -> Iterator[Peer]:
    started = Peer(namespace, python, args, cwd)
    try:
        started.wait_ready()
        yield started
    finally:
        started.kill()


def prepare_namespace(namespace: NetNamespace) -> str:
    """The tap with the host address; no IPv6 on it, so the host sends the guest
    nothing unasked (router solicitations, DAD) while it is measured."""
    tap = namespace.add_tap(TAP, f"{HOST_IP}/{PREFIX_LEN}")
    namespace.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{tap}.disable_ipv6=1"], check=False)
    return tap


@dataclass(frozen=True)
class PingResult:
    rtts_ms: list[float]
    transmitted: int
    received: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.rtts_ms)


PING_REPLY = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")
PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def parse_ping(output: str) -> PingResult:
    """iputils ping's output: every reply's time, and the summary's counts.

    A duplicate reply (DUP!) is not a round trip of its own and is left out.
    """
    summary = PING_SUMMARY.search(output)
    if summary is None:
        raise ProbeError(f"no ping summary in {output[-300:]!r}")
    rtts = [float(match.group(2)) for line in output.splitlines()
            if (match := PING_REPLY.search(line)) and "DUP!" not in line]
    transmitted, received = int(summary.group(1)), int(summary.group(2))
    if len(rtts) != received:
        raise ProbeError(f"ping: {len(rtts)} reply lines, summary says {received} received")
    return PingResult(rtts_ms=rtts, transmitted=transmitted, received=received)


def linux_net_run(namespace: NetNamespace, console: GuestConsole, plan: LinuxNetPlan,
                  cwd: str, timeout_s: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Configures eth0, then g2h, h2g and ping: (metric values, details)."""
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    # eth0 may register after user space started: wait for it (whole seconds, the
    # guest's sleep has no fractions).  ifconfig, not `ip addr add`: the guest's
    # 32-bit busybox ip fails to find the device by name ("can't find device").
    console.run("i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 60 ]; do sleep 1; "
                f"i=$((i+1)); done; ifconfig eth0 {GUEST_IP} netmask {NETMASK} up", timeout_s)
    # Link, ARP both ways and the first-packet paths, outside the timed parts.
    namespace.run(["ping", "-c", "1", "-W", str(int(timeout_s)), GUEST_IP],
                  timeout=timeout_s + 5)

    with peer(namespace, ["recv", HOST_IP, str(plan.g2h_port), str(plan.g2h_bytes),
                          "--timeout", str(timeout_s)], cwd) as receiver:
        console.run(f"dd if=/dev/zero bs={plan.block} count={plan.g2h_blocks} 2>/dev/null"
                    f" | nc {HOST_IP} {plan.g2h_port}", timeout_s)
        got = receiver.result(timeout_s)
    if got["bytes"] != plan.g2h_bytes or got["first_ns"] is None:
        raise ProbeError(f"guest->host: {got['bytes']} of {plan.g2h_bytes} bytes arrived")
    seconds = (got["last_ns"] - got["first_ns"]) / 1e9
    values["net.g2h-tcp"] = plan.g2h_bytes / seconds / MB
    details["g2h"] = {"bytes": got["bytes"], "ms": seconds * 1e3,
                      "accept_to_first_ms": (got["first_ns"] - got["accepted_ns"]) / NS_PER_MS}

    listening = console.start(f"nc -l -p {plan.h2g_port} >/dev/null </dev/null")
    with peer(namespace, ["send", GUEST_IP, str(plan.h2g_port), str(plan.h2g_bytes),
                          "--timeout", str(timeout_s)], cwd) as sender:
        sent = sender.result(timeout_s)
    status, output = listening(timeout_s)
    if status != 0:
        raise ProbeError(f"guest nc -l exited with {status}: {output[-300:]}")
    seconds = (sent["closed_ns"] - sent["connected_ns"]) / 1e9
    values["net.h2g-tcp"] = plan.h2g_bytes / seconds / MB
    details["h2g"] = {"bytes": sent["bytes"], "ms": seconds * 1e3,
                      "connect_attempts": sent["attempts"],
                      "written_ms": (sent["written_ns"] - sent["connected_ns"]) / NS_PER_MS}

    wait_s = max(5, int(timeout_s / 10))
    result = namespace.run(["ping", "-c", str(plan.pings), "-i", str(plan.ping_interval_s),
                            "-W", str(wait_s), GUEST_IP],
                           timeout=plan.pings * (plan.ping_interval_s + wait_s) + 10,
                           check=False)
    ping = parse_ping(result.stdout)
    if ping.received != plan.pings:
        raise ProbeError(f"ping: {ping.received} of {ping.transmitted} replies")
    values["net.ping-rtt"] = ping.median_ms
    details["ping"] = {"rtts_ms": ping.rtts_ms, "mean_ms": statistics.fmean(ping.rtts_ms)}
    return values, details


# --- Freestanding guest: raw frames each way (svtest net-bench) ---------------

# Seen as soon as the line begins: the rx flood starts on it.
NET_START_MARKER = b"svtest: net-bench start"
NET_START = re.compile(rb"svtest: net-bench start dir=(\w+) size=(\d+) count=(\d+)\r?\n")
NET_DONE = re.compile(rb"svtest: net-bench done frames=(\d+) bytes=(\d+) errors=(\d+)")
NET_FAIL = re.compile(rb"svtest: net-bench FAIL[^\r\n]*")
NET_GUEST = re.compile(rb"svtest: net-bench guest-ms=(\d+) tsc-ticks=(\d+) notifies=(\d+)")


@dataclass(frozen=True)
class NetBenchResult:
    direction: str
    size: int
    count: int
    frames: int
    bytes: int
    seconds: float
    # The guest's own figures, for cross-checking the host's time.
    guest_ms: int | None = None
    notifies: int | None = None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"dir": self.direction, "size": self.size, "count": self.count,
                "frames": self.frames, "bytes": self.bytes, "host_ms": self.seconds * 1e3,
                "guest_ms": self.guest_ms, "notifies": self.notifies}


def parse_net_bench(data: bytes, arrival_ns: Callable[[int], int | None]) -> NetBenchResult:
    """A net-bench run from the guest's serial output, timed as blk-bench is:
    the arrival of the start line's newline -> the arrival of the next byte, the
    done line's first (the guest prints nothing in between)."""
    failed = NET_FAIL.search(data)
    if failed:
        raise ProbeError(failed.group().decode(errors="replace"))
    start = NET_START.search(data)
    if start is None:
        raise ProbeError("no 'svtest: net-bench start' line")
    done = NET_DONE.search(data, start.end())
    if done is None:
        raise ProbeError("no 'svtest: net-bench done' line after the start line")
    frames, nbytes, errors = (int(v) for v in done.groups())
    count = int(start.group(3))
    if errors:
        raise ProbeError(f"net-bench errors={errors} of frames={frames}")
    if frames != count:
        raise ProbeError(f"net-bench moved frames={frames}, asked for count={count}")
    seconds = timed_window(data, start, done, arrival_ns, "net-bench")
    guest = NET_GUEST.search(data, done.end())
    return NetBenchResult(direction=start.group(1).decode(), size=int(start.group(2)),
                          count=count, frames=frames, bytes=nbytes, seconds=seconds,
                          guest_ms=int(guest.group(1)) if guest else None,
                          notifies=int(guest.group(3)) if guest else None)


def frame_peer_args(workload: FrameWorkload, tap: str, timeout_s: float) -> list[str]:
    """The host side of a frame workload: drain what the guest sends, or flood it."""
    common = [tap, "--ethertype", hex(ETHERTYPE), "--timeout", str(timeout_s)]
    if workload.direction == "tx":
        return ["drain", *common]
    return ["flood", *common, "--size", str(workload.size)]


def check_frame_peer(workload: FrameWorkload, result: dict[str, Any]) -> None:
    """The host saw (tx) or delivered (rx) at least the frames the guest counted."""
    if workload.direction == "tx":
        if result["frames"] < workload.count:
            raise ProbeError(f"the host saw {result['frames']} of the guest's "
                             f"{workload.count} frames on the tap")
        sizes = result["sample_sizes"]
        if sizes and sizes != [workload.size]:
            raise ProbeError(f"frames on the tap are {sizes} bytes, not {workload.size}")
    elif result["delivered"] < workload.count:
        raise ProbeError(f"the monitor took {result['delivered']} frames from the tap, "
                         f"fewer than the {workload.count} the guest counted")
