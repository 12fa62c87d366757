"""Runs the monitors under test in alternating pairs and collects the samples.

Order: for each pair (warm-up pairs first, their samples discarded), for each
run kind, ours then the reference: A B A B ...  Run i of ours and run i of QEMU
are back to back, which is what makes the per-pair ratios meaningful
(`benchmarks.stats`).

Run kinds:
    boot     svtest only: `svtest.action=reboot`, the monitor runs to its exit.
    session  the guest boots and stays up (svtest `halt-loop`, or Linux); the
             harness connects to QMP as early as it can (start), waits until the
             guest is idle (boot markers for Linux), samples memory, runs the QMP
             probes, then sends `quit`.

Every monitor process is killed in a `finally` (SIGKILL if still alive), every
wait has a deadline, sockets live in a temporary directory, and a run that fails
is kept as a record with its error, the tail of its serial output and stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import metrics
from benchmarks.metrics import NS_PER_MS, ProbeError
from benchmarks.smaps import RamMappingError, account_process
from stratovirt_py.arch.x86_64.host_quirks import host_cmdline_additions, host_is_pvm

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

SVTEST_HELLO = b"svtest: hello"
SVTEST_DONE = b"svtest: done"
LINUX_RUN_INIT = b"Run /init as init process"
LINUX_USERSPACE = b"stratovirt-py guest: user space ready"
LINUX_CMDLINE = "console=ttyS0 reboot=k panic=-1"


class GuestUnavailable(RuntimeError):
    """The requested guest's files are missing."""


@dataclass(frozen=True)
class Guest:
    name: str
    kernel: Path
    initrd: Path | None
    session_cmdline: str
    # The serial marker after which the session guest counts as booted and idle.
    ready: bytes
    # Other markers timed in the session run (metric name -> marker).
    session_markers: dict[str, bytes]
    # svtest's separate boot run; None when boot is timed in the session (Linux).
    boot_cmdline: str | None
    settle_s: float
    timeout_s: float


def svtest_guest(kernel: Path, settle_s: float, timeout_s: float) -> Guest:
    return Guest(name="svtest", kernel=kernel, initrd=None,
                 session_cmdline="svtest.action=halt-loop", ready=SVTEST_DONE,
                 session_markers={}, boot_cmdline="svtest.action=reboot",
                 settle_s=settle_s, timeout_s=timeout_s)


def linux_guest(kernel: Path, initrd: Path | None, settle_s: float, timeout_s: float) -> Guest:
    if not kernel.is_file():
        raise GuestUnavailable(
            f"the Linux guest kernel {kernel} does not exist: build it with "
            "scripts/build-guest-kernel (or pass --kernel)")
    if initrd is None or not initrd.is_file():
        raise GuestUnavailable(
            f"the Linux guest initramfs {initrd} does not exist: build it with "
            "scripts/build-guest-rootfs (or pass --initrd); without an init the kernel "
            "panics before 'Run /init', the boot marker")
    return Guest(name="linux", kernel=kernel, initrd=initrd, session_cmdline=LINUX_CMDLINE,
                 ready=LINUX_RUN_INIT,
                 session_markers={"boot.run-init": LINUX_RUN_INIT,
                                  "boot.userspace": LINUX_USERSPACE},
                 boot_cmdline=None, settle_s=settle_s, timeout_s=timeout_s)


def with_extra_cmdline(guest: Guest, extra: str) -> Guest:
    """The guest with `extra` appended to each of its command lines."""
    extra = extra.strip()
    if not extra:
        return guest
    boot = f"{guest.boot_cmdline} {extra}" if guest.boot_cmdline is not None else None
    return dataclasses.replace(guest, session_cmdline=f"{guest.session_cmdline} {extra}",
                               boot_cmdline=boot)


@dataclass(frozen=True)
class Settings:
    mem_mib: int
    smp: int
    qmp_requests: int
    groups: frozenset[str]
    python: str
    qemu: str


@dataclass(frozen=True)
class Monitor:
    name: str
    # (guest, cmdline, qmp socket path, settings) -> argv
    command: Callable[[Guest, str, Path, Settings], list[str]]
    env: dict[str, str] | None = None


def ours_command(guest: Guest, cmdline: str, qmp: Path, settings: Settings) -> list[str]:
    # The monitor adds the kvm_pvm guest arguments itself (it logs them).
    argv = [settings.python, "-m", "stratovirt_py", "-kernel", str(guest.kernel)]
    if guest.initrd:
        argv += ["-initrd", str(guest.initrd)]
    return [*argv, "-append", cmdline, "-m", str(settings.mem_mib), "-smp", str(settings.smp),
            "-serial", "stdio", "-qmp", f"unix:{qmp},server,nowait"]


def qemu_command(guest: Guest, cmdline: str, qmp: Path, settings: Settings) -> list[str]:
    pvm = host_is_pvm()
    extra = host_cmdline_additions(cmdline, pvm)
    # kvm_pvm aborts QEMU on MSR 0x10a unless arch-capabilities is off; elsewhere
    # the guest keeps the host's CPU model untouched.
    cpu = "host,-arch-capabilities" if pvm else "host"
    argv = [settings.qemu, "-enable-kvm",
            "-M", "microvm,acpi=off,kernel_irqchip=on,pit=on,pic=on,rtc=off",
            "-cpu", cpu, "-m", str(settings.mem_mib), "-smp", str(settings.smp),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-kernel", str(guest.kernel)]
    if guest.initrd:
        argv += ["-initrd", str(guest.initrd)]
    return [*argv, "-append", f"{cmdline} {extra}".strip()]


def ours_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


MONITORS = {
    "ours": Monitor("ours", ours_command, ours_env()),
    "qemu": Monitor("qemu", qemu_command, None),
}


@dataclass
class RunRecord:
    pair: int  # negative for warm-up pairs
    kind: str
    monitor: str
    argv: list[str]
    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def warmup(self) -> bool:
        return self.pair < 0

    def as_dict(self) -> dict[str, Any]:
        return {"pair": self.pair, "warmup": self.warmup, "kind": self.kind,
                "monitor": self.monitor, "argv": self.argv, "values": self.values,
                "details": self.details, "error": self.error}


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    t0: int
    serial: metrics.SerialWatcher
    exits: metrics.ExitWatcher
    stderr_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_tail(self, limit: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_bytes()[-limit:].decode(errors="replace")
        return ""


@contextlib.contextmanager
def launched(argv: list[str], env: dict[str, str] | None, markers: dict[str, bytes],
             stderr_path: Path) -> Iterator[Launched]:
    """Starts a monitor with its serial on a pipe; kills it on the way out, whatever happens."""
    with stderr_path.open("wb") as stderr:
        t0 = time.monotonic_ns()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=stderr, cwd=REPO, env=env)
    assert process.stdout is not None
    serial = None
    exits = None
    try:
        exits = metrics.ExitWatcher(process.pid)
        serial = metrics.SerialWatcher(process.stdout.fileno(), markers)
        yield Launched(process, t0, serial, exits, stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if serial is not None:
            serial.join()
        process.stdout.close()
        if exits is not None:
            exits.close()


def _ms(start_ns: int, end_ns: int) -> float:
    return (end_ns - start_ns) / NS_PER_MS


def run_boot(record: RunRecord, monitor: Monitor, guest: Guest, workdir: Path) -> None:
    """svtest boot run: exec -> first byte, `svtest: hello`, process exit."""
    markers = {"boot.hello": SVTEST_HELLO, "done": SVTEST_DONE}
    stderr_path = workdir / f"{record.monitor}-boot-{record.pair}.stderr"
    with launched(record.argv, monitor.env, markers, stderr_path) as run:
        try:
            exited = run.exits.wait(run.t0 + int(guest.timeout_s * 1e9))
            if exited is None:
                raise ProbeError(f"the monitor did not exit within {guest.timeout_s} s")
            code = run.process.wait(timeout=10)
            run.serial.join()
            record.details["exit_status"] = code
            if code != 0:
                raise ProbeError(f"the monitor exited with status {code}")
            if "done" not in run.serial.marker_ns or "boot.hello" not in run.serial.marker_ns:
                raise ProbeError("the guest did not print 'svtest: hello' ... 'svtest: done'")
            assert run.serial.first_byte_ns is not None
            record.values["boot.first-byte"] = _ms(run.t0, run.serial.first_byte_ns)
            record.values["boot.hello"] = _ms(run.t0, run.serial.marker_ns["boot.hello"])
            record.values["boot.exit"] = _ms(run.t0, exited)
            # How much of boot.exit is the guest and how much the monitor's teardown.
            record.details["done_ms"] = _ms(run.t0, run.serial.marker_ns["done"])
        except (ProbeError, OSError, subprocess.TimeoutExpired) as error:
            record.error = str(error)
            record.details["serial_tail"] = run.serial.tail()
            record.details["stderr_tail"] = run.stderr_tail()


def run_session(record: RunRecord, monitor: Monitor, guest: Guest, settings: Settings,
                qmp_path: Path, workdir: Path) -> None:
    """Boots the guest to idle: start, (Linux) boot, memory and QMP probes, then quit."""
    markers = {"ready": guest.ready, **guest.session_markers}
    stderr_path = workdir / f"{record.monitor}-session-{record.pair}.stderr"
    client = None
    with launched(record.argv, monitor.env, markers, stderr_path) as run:
        try:
            deadline = run.t0 + int(guest.timeout_s * 1e9)
            greeted, client = metrics.connect_qmp(qmp_path, deadline, run.alive)
            record.values["start.qmp-greeting"] = _ms(run.t0, greeted)
            # QEMU accepts nothing else (not even quit) before it.
            client.execute("qmp_capabilities")
            run.serial.wait_for("ready", deadline, _boot_check(run, client))
            if guest.boot_cmdline is None:
                _settle(run, guest.settle_s)
                assert run.serial.first_byte_ns is not None
                record.values["boot.first-byte"] = _ms(run.t0, run.serial.first_byte_ns)
                for name in guest.session_markers:
                    seen = run.serial.marker_ns.get(name)
                    if seen is not None:
                        record.values[name] = _ms(run.t0, seen)
            elif "memory" in settings.groups:
                _settle(run, guest.settle_s)
            if "memory" in settings.groups:
                memory = account_process(run.process.pid, settings.mem_mib * MiB)
                record.details["memory"] = memory.as_dict()
                record.values["memory.overhead-rss"] = memory.overhead_rss / MiB
                record.values["memory.overhead-pss"] = memory.overhead_pss / MiB
            if "qmp" in settings.groups:
                latency = metrics.query_status_latency(client, settings.qmp_requests)
                record.values["qmp.latency-p50"] = latency.p50_us
                record.values["qmp.latency-p99"] = latency.p99_us
                record.details["qmp_latency_max_us"] = latency.max_us
                burst = metrics.query_status_throughput(client, settings.qmp_requests)
                record.values["qmp.throughput"] = burst.commands_per_second
                record.details["qmp_burst_seconds"] = burst.seconds
            _quit(record, run, client)
        except (ProbeError, RamMappingError, OSError, ValueError) as error:
            record.error = f"{type(error).__name__}: {error}"
            record.details["serial_tail"] = run.serial.tail()
            record.details["stderr_tail"] = run.stderr_tail()
        finally:
            if client is not None:
                client.close()


def _boot_check(run: Launched, client: metrics.QmpClient) -> Callable[[], None]:
    """Gives up on a boot early: the monitor exited, or QMP says the guest stopped.

    QEMU keeps running with the VM stopped after a fatal KVM exit (status
    internal-error), so only QMP tells; it is asked every 2 s, which costs a
    monitor well under a millisecond per query.
    """
    next_query = time.monotonic() + 2

    def check() -> None:
        nonlocal next_query
        if not run.alive():
            raise ProbeError(f"the monitor exited (status {run.process.returncode}) before "
                             "the guest was up")
        if time.monotonic() >= next_query:
            status = client.execute("query-status")["return"].get("status")
            if status != "running":
                raise ProbeError(f"the guest stopped during boot: QMP status {status!r}")
            next_query = time.monotonic() + 2
    return check


def _settle(run: Launched, seconds: float) -> None:
    """Lets the guest go idle; the monitor must stay up meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not run.alive():
            raise ProbeError(f"the monitor exited (status {run.process.returncode}) while "
                             "the guest should be idle")
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _quit(record: RunRecord, run: Launched, client: metrics.QmpClient) -> None:
    """`quit` over QMP; a monitor that does not exit cleanly fails the run."""
    client.execute("quit")
    exited = run.exits.wait(time.monotonic_ns() + 10 * 1_000_000_000)
    if exited is None:
        raise ProbeError("the monitor did not exit within 10 s of 'quit'")
    code = run.process.wait(timeout=10)
    record.details["exit_status"] = code
    if code != 0:
        raise ProbeError(f"the monitor exited with status {code} after 'quit'")


def run_kinds(guest: Guest, groups: frozenset[str]) -> list[str]:
    kinds = []
    if guest.boot_cmdline is not None and "boot" in groups:
        kinds.append("boot")
    session_groups = {"start", "memory", "qmp"} | ({"boot"} if guest.boot_cmdline is None
                                                    else set())
    if groups & session_groups:
        kinds.append("session")
    return kinds


def expected_metrics(guest: Guest, groups: frozenset[str]) -> list[str]:
    """The metric names this guest and group selection produce, in table order."""
    names = ["start.qmp-greeting"]
    names += (["boot.first-byte", "boot.hello", "boot.exit"] if guest.name == "svtest"
              else ["boot.first-byte", "boot.run-init", "boot.userspace"])
    names += ["memory.overhead-rss", "memory.overhead-pss",
              "qmp.latency-p50", "qmp.latency-p99", "qmp.throughput"]
    return [n for n in names if metrics.METRICS[n].group in groups]


def run_pairs(monitors: list[Monitor], guest: Guest, settings: Settings, reps: int,
              warmup: int, workdir: Path,
              progress: Callable[[RunRecord, int], None] | None = None) -> list[RunRecord]:
    """All runs, warm-up pairs first (pair index -warmup..-1), then pairs 0..reps-1."""
    records: list[RunRecord] = []
    for pair in range(-warmup, reps):
        for kind in run_kinds(guest, settings.groups):
            for monitor in monitors:
                qmp_path = workdir / f"{monitor.name}-{kind}-{pair}.qmp"
                cmdline = (guest.boot_cmdline if kind == "boot" else guest.session_cmdline)
                assert cmdline is not None
                record = RunRecord(pair=pair, kind=kind, monitor=monitor.name,
                                   argv=monitor.command(guest, cmdline, qmp_path, settings))
                try:
                    if kind == "boot":
                        run_boot(record, monitor, guest, workdir)
                    else:
                        run_session(record, monitor, guest, settings, qmp_path, workdir)
                except Exception as error:
                    # A harness bug in one run must not lose the others' samples.
                    record.error = f"harness error: {type(error).__name__}: {error}"
                records.append(record)
                if progress is not None:
                    progress(record, reps)
    return records


def samples_by_pair(records: list[RunRecord], metric: str, monitor: str, reps: int
                    ) -> list[float | None]:
    """metric's value for each measured pair (None where the run failed or lacked it)."""
    values: list[float | None] = [None] * reps
    for record in records:
        if record.monitor == monitor and not record.warmup and record.error is None:
            value = record.values.get(metric)
            if value is not None:
                values[record.pair] = value
    return values
