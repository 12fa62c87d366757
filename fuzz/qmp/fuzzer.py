"""The QMP fuzz campaign: a real monitor in a network namespace, inputs in pipelined batches.

Each batch writes many inputs without waiting (the connection stays open across
batches) and ends with a probe; the oracle (oracle.py) checks every reply as
it arrives.  A dropped connection is allowed: reconnect and go on.  A dead
monitor, a missing, doubled or wrong reply, invalid output, or silence past
the timeout is a finding: the batch is saved for replay, and the campaign
goes on with a fresh connection (and a fresh monitor if it died or hung).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fuzz.qmp.generators import RESET, FuzzEnv, Input, InputGenerator
from fuzz.qmp.oracle import PROBE_PREFIX, Finding, ReplyChecker, StreamModel, canonical

REPO = Path(__file__).resolve().parents[2]
BATCH = 200
CHECK_EVERY = 10_000
TIMEOUT = 20.0  # seconds without any progress while replies are owed: a hang
PAUSE = 0.0005  # between the writes of a split input, so the monitor reads them apart
SIGSYS = 31
SIDE_EVERY = 5  # health checks between two rounds of side clients


class Monitor(Protocol):
    """The monitor under test (a real process, or a fake in unit tests)."""

    def poll(self) -> int | None: ...

    def connect(self) -> socket.socket: ...

    def restart(self) -> None: ...

    def stderr_tail(self) -> str: ...

    def rss_kib(self) -> int: ...

    def fd_count(self) -> int: ...


@dataclass
class Stats:
    inputs: int = 0
    replies: int = 0
    events: int = 0
    dropped: int = 0
    restarts: int = 0
    health_checks: int = 0
    findings: list[Finding] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    sandbox: str = ""  # the monitor's seccomp state, once it has answered
    rss_start: int = 0
    rss_end: int = 0
    fds_start: int = 0
    fds_end: int = 0
    elapsed: float = 0.0

    def distinct(self) -> dict[str, int]:
        """Findings by signature (kind and message, a crash's last stderr line)."""
        counts: dict[str, int] = {}
        for finding in self.findings:
            signature = f"{finding.kind}: {finding.message}"
            if "last-line" in finding.details:
                signature += f" / {finding.details['last-line']}"
            counts[signature] = counts.get(signature, 0) + 1
        return counts

    def summary(self) -> str:
        rate = self.inputs / self.elapsed if self.elapsed else 0.0
        return (f"qmp: {self.inputs} inputs, {self.replies} replies, {self.dropped} dropped "
                f"connections, {len(self.findings)} findings, {rate:.0f} inputs/s")


# Generators whose input is one whole JSON value made by json.dumps.
WHOLE_VALUES = frozenset({"schema", "split"})


def independent_check(item: Input) -> Finding | None:
    """The monitor's splitter and decoder must read a json.dumps value as Python's json does:
    one value, and its id.  (The oracle otherwise takes the monitor's own parser as the model.)"""
    data = item.data
    try:
        request = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:  # a lone surrogate, written raw: not UTF-8
        request = None
    except ValueError:
        return Finding("parser", "not one JSON value (a generator bug)")
    owed = StreamModel().feed(data + b"\n", 0)  # the model is idle: a fresh one is the same
    has_id = isinstance(request, dict) and "id" in request
    id_text = canonical(request["id"]) if has_id else None
    if len(owed) != 1 or owed[0].has_id != has_id or owed[0].id_text != id_text:
        return Finding("parser", "the monitor's parser reads a json.dumps value differently "
                       "from Python's json", details={
                           "owed": [(e.has_id, e.id_text) for e in owed], "id": id_text})
    return None


class Dropped(Exception):
    """The monitor closed the connection."""


class Campaign:
    """Runs batches against `monitor`; findings are saved under `out_dir`."""

    def __init__(self, monitor: Monitor, generator: InputGenerator | None, out_dir: Path,
                 timeout: float = TIMEOUT, log: Callable[[str], None] = print) -> None:
        self.monitor = monitor
        self.generator = generator
        self.out_dir = out_dir
        self.timeout = timeout
        self.log = log
        self.stats = Stats()
        self.sock: socket.socket | None = None
        self.model = StreamModel()
        self.checker = ReplyChecker()
        self._probes = 0
        self._fd_to_send = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self._disconnect()
        with contextlib.suppress(OSError):
            os.close(self._fd_to_send)

    # Connections.

    def _disconnect(self) -> None:
        for key, count in self.checker.outcomes.items():
            self.stats.outcomes[key] = self.stats.outcomes.get(key, 0) + count
        self.checker.outcomes.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> None:
        """A fresh connection, greeted and negotiated (qmp_capabilities)."""
        self._disconnect()
        self.sock = self.monitor.connect()
        self.sock.setblocking(False)
        self.model = StreamModel()
        self.checker = ReplyChecker()
        capabilities = Input("setup", [b'{"execute":"qmp_capabilities","id":"fzsetup"}\n'])
        finding = self._exchange([capabilities])
        if finding is not None:
            raise RuntimeError(f"could not negotiate with the monitor: {finding.message}")

    def _probe(self, command: str = "query-status") -> tuple[str, bytes]:
        self._probes += 1
        token = f"{PROBE_PREFIX}{self._probes}"
        return token, json.dumps({"execute": command, "id": token}).encode() + b"\n"

    # One batch.

    def _exchange(self, items: list[Input], probe_command: str = "query-status"
                  ) -> Finding | None:
        """Sends `items` and a final probe; checks every reply.  Raises Dropped."""
        assert self.sock is not None
        writes: deque[tuple[bytes, int, bool]] = deque()
        for index, item in enumerate(items):
            if item.kind in WHOLE_VALUES and self.model.idle:
                finding = independent_check(item)
                if finding is not None:
                    finding.item = index
                    return finding
            for number, chunk in enumerate(item.chunks):
                last = number == len(item.chunks) - 1
                if chunk:  # nothing to write (and no byte to carry fds)
                    writes.append((chunk, item.fds if number == 0 else 0,
                                   item.pause_between and not last))
                self.checker.expect(self.model.feed(chunk, index))
            if item.flush:
                token, probe = self._probe()
                finding = self._send_probe(writes, token, probe)
                if finding is not None:
                    finding.item = index
                    return finding
        token, probe = self._probe(probe_command)
        finding = self._send_probe(writes, token, probe)
        if finding is not None:
            return finding
        return self._pump(writes)

    def _send_probe(self, writes: deque[tuple[bytes, int, bool]], token: str,
                    probe: bytes) -> Finding | None:
        """A reset byte, then the probe: the monitor promises to parse it whatever came before."""
        data = RESET + probe
        writes.append((data, 0, False))
        expected = self.model.feed(data, -1)
        self.checker.expect(expected)
        if not expected or expected[-1].probe != token or not self.model.idle:
            return Finding("parser-reset", "a reset byte followed by a command did not bring "
                           "the monitor's splitter back to parse the command",
                           details={"owed": [e.id_text for e in expected]})
        return None

    def _pump(self, writes: deque[tuple[bytes, int, bool]]) -> Finding | None:
        """Writes while reading, until every owed reply came (or a problem)."""
        sock = self.sock
        assert sock is not None
        checker = self.checker
        offset = 0
        last_progress = time.monotonic()
        while writes or not checker.done:
            readable, writable, _ = select.select([sock], [sock] if writes else [], [], 0.25)
            progress = False
            if readable:
                try:
                    data = sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError as exc:
                    raise Dropped(str(exc)) from None
                if data == b"":
                    raise Dropped("end of stream")
                if data:
                    progress = True
                    finding = checker.feed(data)
                    if finding is not None:
                        return finding
            if writable and writes:
                chunk, fds, pause = writes[0]
                try:
                    if fds and offset == 0:
                        fd_array = array.array("i", [self._fd_to_send] * fds)
                        sent = sock.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       fd_array.tobytes())])
                    else:
                        sent = sock.send(memoryview(chunk)[offset:])
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    raise Dropped(str(exc)) from None
                if sent:
                    progress = True
                    offset += sent
                    if offset >= len(chunk):
                        writes.popleft()
                        offset = 0
                        if pause:
                            time.sleep(PAUSE)
            now = time.monotonic()
            if progress:
                last_progress = now
            elif self.monitor.poll() is not None:
                return self._death()
            elif now - last_progress > self.timeout:
                owed = checker.expected[0] if checker.expected else None
                return Finding("hang", f"no output for {self.timeout:.0f} s while "
                               f"{len(checker.expected)} reply(ies) are owed",
                               item=owed.item if owed else None,
                               details={"writes-pending": len(writes)})
        return None

    def _death(self) -> Finding:
        deadline = time.monotonic() + 10
        while self.monitor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the connection went first: let the process finish exiting
        code = self.monitor.poll()
        stderr = self.monitor.stderr_tail()
        kind = "crash"
        message = f"the monitor exited with status {code}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        bad_call = next((line for line in reversed(lines) if "seccomp: bad system call" in line),
                        None)
        if code == -SIGSYS or bad_call is not None:
            kind = "seccomp"
            message += f" (SIGSYS: outside the seccomp allow-list: {bad_call})"
        # The first value still owed a reply: the input being handled, or just after it.
        owed = self.checker.expected[0].item if self.checker.expected else None
        return Finding(kind, message, item=owed,
                       details={"last-line": lines[-1] if lines else "",
                                "stderr": stderr[-4000:]})

    def run_batch(self, items: list[Input], probe_command: str = "query-status"
                  ) -> Finding | None:
        """One batch on the current connection; a drop reconnects, a finding is returned."""
        if self.sock is None:
            try:
                self._connect()
            except (OSError, RuntimeError):
                # The monitor removes its socket on the way out: give it time to exit.
                deadline = time.monotonic() + 10
                while self.monitor.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.monitor.poll() is None:
                    raise
                return self._death()
        replies, events = self.checker.replies, self.checker.events
        try:
            finding = self._exchange(items, probe_command)
        except Dropped:
            finding = None
            deadline = time.monotonic() + 1
            while self.monitor.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)  # a monitor on its way out closes its sockets first
            if self.monitor.poll() is not None:
                finding = self._death()
            else:
                self.stats.dropped += 1
                self.stats.replies += self.checker.replies - replies
                self.stats.events += self.checker.events - events
                self._disconnect()
                return None
        self.stats.replies += self.checker.replies - replies
        self.stats.events += self.checker.events - events
        return finding

    # Clients beside the fuzzed one.

    def side_clients(self) -> Finding | None:
        """One client leaves with fds and half a value sent; one floods and never reads, so
        the monitor must drop it (a dropped connection, counted) rather than buffer forever."""
        with contextlib.closing(self.monitor.connect()) as sock:
            fds = array.array("i", [self._fd_to_send] * 4).tobytes()
            sock.sendmsg([b'{"execute":"getfd","arguments":{"fdname":"side"}}'
                          b'{"execute":"getfd","arguments":{"fdname":"half'],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        flood = b'{"execute":"query-commands"}' * 64
        with contextlib.closing(self.monitor.connect()) as sock:
            sock.setblocking(False)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                try:
                    sock.send(flood)
                except BlockingIOError:
                    select.select([], [sock], [], 0.1)
                except OSError:  # EPIPE, ECONNRESET: dropped, as it should be
                    self.stats.dropped += 1
                    return None
                if self.monitor.poll() is not None:
                    return self._death()
        return Finding("flood", f"the monitor still served, after {self.timeout:.0f} s, a "
                       "client that sends commands and never reads the replies")

    # Health.

    def health(self) -> Finding | None:
        """The monitor answers, and the guest runs (after a cont if a fuzzed stop paused it)."""
        self.stats.health_checks += 1
        for attempt in range(3):
            finding = self.run_batch([], "query-status")
            if finding is not None:
                return finding
            if self.sock is None:
                continue  # dropped: try again on a new connection
            status = self.checker.probe_replies.get(f"{PROBE_PREFIX}{self._probes}", {})
            value = status.get("return", {})
            if value.get("status") == "running" and value.get("running") is True:
                return None
            if value.get("status") == "paused" and attempt < 2:
                finding = self.run_batch([], "cont")
                if finding is not None:
                    return finding
                continue
            return Finding("health", f"query-status says {status}, not running")
        return Finding("health", "query-status did not answer after 3 connections")

    # The campaign.

    def run(self, inputs: int, seconds: float, max_findings: int = 20,
            check_every: int = CHECK_EVERY, batch: int = BATCH) -> Stats:
        assert self.generator is not None
        stats = self.stats
        # Start figures once the monitor has answered (its set-up is over by then).
        finding = self.health()
        if finding is not None:
            self._record(finding, [], 0)
        stats.rss_start, stats.fds_start = self.monitor.rss_kib(), self.monitor.fd_count()
        stats.sandbox = getattr(self.monitor, "seccomp_summary", str)()
        start = time.monotonic()
        next_check = check_every
        batch_number = 0
        while stats.inputs < inputs and time.monotonic() - start < seconds \
                and len(stats.findings) < max_findings:
            items = [self.generator.next() for _ in range(min(batch, inputs - stats.inputs))]
            stats.inputs += len(items)
            for item in items:
                stats.kinds[item.kind] = stats.kinds.get(item.kind, 0) + 1
            batch_number += 1
            finding = self.run_batch(items)
            if finding is None and stats.inputs >= next_check:
                next_check += check_every
                stats_checks = stats.health_checks
                if stats_checks % SIDE_EVERY == SIDE_EVERY - 1:
                    finding = self.side_clients()
                finding = finding or self.health()
                self.log(f"qmp: {stats.inputs} inputs, {stats.replies} replies, "
                         f"RSS {self.monitor.rss_kib()} KiB, {self.monitor.fd_count()} fds, "
                         f"{stats.inputs / (time.monotonic() - start):.0f} inputs/s")
            if finding is not None:
                self._record(finding, items, batch_number)
        stats.elapsed = time.monotonic() - start
        if self.monitor.poll() is None:
            finding = self.health()
            if finding is not None:
                self._record(finding, [], batch_number + 1)
        stats.rss_end, stats.fds_end = self.monitor.rss_kib(), self.monitor.fd_count()
        return stats

    def _record(self, finding: Finding, items: list[Input], batch_number: int) -> None:
        """Saves the batch for replay; a dead or hung monitor is restarted."""
        self.stats.findings.append(finding)
        directory = self.out_dir / f"finding-{len(self.stats.findings):03d}-{finding.kind}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "batch.json").write_text(json.dumps(
            {"batch": batch_number, "suspect": finding.item,
             "items": [item.to_json() for item in items]}, indent=1))
        if finding.item is not None and 0 <= finding.item < len(items):
            (directory / "suspect.bin").write_bytes(items[finding.item].data)
        finding.details["saved"] = str(directory)
        (directory / "finding.json").write_text(json.dumps(
            {"kind": finding.kind, "message": finding.message, "item": finding.item,
             "details": finding.details}, indent=1, default=str))
        self.log(f"qmp: FINDING {finding.kind}: {finding.message} (saved in {directory})")
        self._disconnect()
        if finding.kind in ("crash", "seccomp", "hang") or self.monitor.poll() is not None:
            self.monitor.restart()
            self.stats.restarts += 1


def replay(campaign: Campaign, batch_file: Path) -> Finding | None:
    """Sends a saved batch again (on a fresh connection) and returns what the oracle says."""
    saved = json.loads(batch_file.read_text())
    items = [Input.from_json(item) for item in saved["items"]]
    return campaign.run_batch(items)


# The real monitor.

def _guest() -> Path:
    import importlib.util
    spec = importlib.util.spec_from_file_location("svtest_build", REPO / "tests/guest/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_guest(REPO / "build" / "svtest")


def make_files(directory: Path) -> FuzzEnv:
    """Images that exist, paths that do not, and files a disk should not be (fifo, dir, ...)."""
    images = []
    for index, size in enumerate((1 << 20, 1 << 20, 4 << 20, 1000)):
        path = directory / f"img{index}.raw"
        with open(path, "wb") as image:
            image.truncate(size)
        images.append(str(path))
    (directory / "empty.raw").touch()
    (directory / "adir").mkdir()
    os.mkfifo(directory / "fifo")
    os.symlink(directory / "loop", directory / "loop")
    odd = [str(directory / name) for name in ("empty.raw", "adir", "fifo", "loop")]
    odd += ["/dev/null", "/dev/zero", "relative.raw", str(directory / "img0.raw") + "/x"]
    missing = [str(directory / "missing.raw"), "/nonexistent/dir/x.raw", ""]
    return FuzzEnv(images=images, missing=missing, odd_files=odd, taps=["fz0", "fz1"])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the fuzzer dies, however it dies (kept across the exec of
    `ip netns exec` and of the monitor, neither being set-uid)."""
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class RealMonitor:
    """stratovirt-py with the freestanding guest idling (cli; hlt), inside `namespace`."""

    def __init__(self, namespace: Any, workdir: Path, env: FuzzEnv) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.env = env
        self.guest = _guest()
        self.socket_path = workdir / "qmp.sock"
        self.stderr_path = workdir / "monitor.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        from tests.helpers import MONITOR, monitor_env
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        boot_disk = self.workdir / "boot.raw"
        with open(boot_disk, "wb") as image:
            image.truncate(1 << 20)
        args = [*MONITOR, "-kernel", str(self.guest), "-append", "svtest.action=halt-loop",
                "-serial", "none", "-m", "128", "-qmp", f"unix:{self.socket_path},server,nowait",
                "-drive", f"id=disk0,file={boot_disk}",
                "-device", "virtio-blk-device,drive=disk0,id=disk0",
                "-netdev", "tap,id=net0,ifname=fz0",
                "-device", "virtio-net-device,netdev=net0,id=net0",
                "-device", "virtio-balloon-device"]
        with open(self.stderr_path, "ab") as stderr:
            self.process = self.namespace.popen(args, env=monitor_env(),
                                                stdin=subprocess.DEVNULL, stdout=stderr,
                                                stderr=stderr, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 60
        while not self.socket_path.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"the monitor exited at start-up: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("the monitor's QMP socket never appeared")
            time.sleep(0.02)

    def poll(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        return sock

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_bytes()[-8000:].decode("utf-8", "replace")
        return ""

    def rss_kib(self) -> int:
        assert self.process is not None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def seccomp_summary(self) -> str:
        """How many of the monitor's threads run under a seccomp filter (mode 2)."""
        assert self.process is not None
        modes = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.process.pid}/task"):
                status = Path(f"/proc/{self.process.pid}/task/{task}/status").read_text()
                modes += [line.split()[1] for line in status.splitlines()
                          if line.startswith("Seccomp:")]
        return f"seccomp filter on {modes.count('2')} of {len(modes)} threads"

    def fd_count(self) -> int:
        assert self.process is not None
        with contextlib.suppress(OSError):
            return len(os.listdir(f"/proc/{self.process.pid}/fd"))
        return 0


@contextlib.contextmanager
def real_monitor(keep_stderr: Path | None = None
                 ) -> Iterator[tuple[RealMonitor, FuzzEnv, Path]]:
    """A monitor in a namespace of its own with taps fz0 and fz1; all removed at the end
    (the monitor's stderr, of every start, is copied to `keep_stderr` first)."""
    from tests.netns import net_namespace
    workdir = Path(tempfile.mkdtemp(prefix="qmpfuzz-"))
    try:
        env = make_files(workdir)
        with net_namespace("svfz") as namespace:
            for tap in env.taps:
                namespace.add_tap(tap)
            monitor = RealMonitor(namespace, workdir, env)
            try:
                yield monitor, env, workdir
            finally:
                monitor.stop()
                if keep_stderr is not None:
                    keep_stderr.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(monitor.stderr_path, keep_stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
