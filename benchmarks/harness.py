"""Runs the monitors under test in alternating pairs and collects the samples.

Order: for each pair (warm-up pairs first, their samples discarded), for each
run kind, ours then the reference: A B A B ...  Run i of ours and run i of QEMU
are back to back, which is what makes the per-pair ratios meaningful
(`benchmarks.stats`).

Run kinds:
    boot     svtest only: `svtest.action=reboot`, the monitor runs to its exit.
    session  the guest boots and stays up (svtest `halt-loop`, or Linux); the
             harness connects to QMP as early as it can and asks query-status
             until running (start), waits until the guest is idle (boot markers
             for Linux), samples memory, runs the QMP probes, then sends `quit`.
    block.*  svtest only, one per block metric (the kind is the metric's name):
             the disk image's page cache is put in its state, then the guest runs
             `blk-bench` with the disk attached and the monitor runs to its exit;
             the monitor's CPU time is sampled at both ends of the timed window.
             All block kinds run in the first `block_reps` pairs only.
    balloon  the guest boots with 1 GiB and a balloon, fills memory (svtest
             touches it, Linux runs dd), then the inflate to the target is timed
             over QMP with the process's RSS before and after
             (`benchmarks.balloon`), then `quit`.
    net      Linux only: in a network namespace of its own, with a tap, the guest
             boots, its eth0 is configured over the console, then TCP each way
             and ping (`benchmarks.net.linux_net_run`), then `quit`.
    net.*    svtest only, one per frame workload (the kind is the metric's name):
             in a namespace of its own, the host drains or floods the tap while
             the guest runs `net-bench`; the monitor runs to its exit.
    many     ten monitors with the session guest, exec'd back to back, each
             probed on its own thread until query-status says running; then
             their memory, then `quit` to all ten.

Net runs start the monitor under `ip netns exec`; the namespace, its tap and
every process in it are removed when the run ends, whatever happened.

Every monitor process is killed in a `finally` (SIGKILL if still alive), every
wait has a deadline, sockets live in a temporary directory, and a run that fails
is kept as a record with its error, the tail of its serial output and stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import balloon, cpu, many, metrics, net
from benchmarks.metrics import (
    BALLOON_METRICS,
    BLOCK_CASES,
    FRAME_WORKLOADS,
    LINUX_NET_METRICS,
    MANY_METRICS,
    MANY_VMS,
    NS_PER_MS,
    BlockCase,
    FrameWorkload,
    ProbeError,
)
from benchmarks.smaps import RamMappingError, account_process
from stratovirt_py.arch.x86_64.host_quirks import host_cmdline_additions, host_is_pvm
from tests.netns import NetnsError, net_namespace

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

SVTEST_HELLO = b"svtest: hello"
SVTEST_DONE = b"svtest: done"
LINUX_RUN_INIT = b"Run /init as init process"
LINUX_USERSPACE = b"stratovirt-py guest: user space ready"
LINUX_CMDLINE = "console=ttyS0 reboot=k panic=-1"


class GuestUnavailable(RuntimeError):
    """The requested guest's files are missing."""


class DiskImageError(RuntimeError):
    """The block metric's disk image cannot be made or used."""


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
    # Whether the guest has the blk-bench action (the block metric).
    block: bool = False
    # --append, kept apart so the block runs can put it after their own arguments.
    extra_cmdline: str = ""

    def block_cmdline(self, case: BlockCase) -> str:
        return f"{case.workload.cmdline()} {self.extra_cmdline}".strip()

    def net_cmdline(self, workload: FrameWorkload) -> str:
        return f"{workload.cmdline()} {self.extra_cmdline}".strip()

    def balloon_cmdline(self, plan: balloon.BalloonPlan) -> str:
        """svtest's balloon action; Linux boots as in its session run."""
        if self.name == "linux":
            return self.session_cmdline
        return f"{balloon.svtest_cmdline(plan)} {self.extra_cmdline}".strip()


def svtest_guest(kernel: Path, settle_s: float, timeout_s: float) -> Guest:
    return Guest(name="svtest", kernel=kernel, initrd=None,
                 session_cmdline="svtest.action=halt-loop", ready=SVTEST_DONE,
                 session_markers={}, boot_cmdline="svtest.action=reboot",
                 settle_s=settle_s, timeout_s=timeout_s, block=True)


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
                               boot_cmdline=boot, extra_cmdline=extra)


@dataclass(frozen=True)
class Settings:
    mem_mib: int
    smp: int
    qmp_requests: int
    groups: frozenset[str]
    python: str
    qemu: str
    # The block metric's disk image (made by `make_disk_image`) and its pair count.
    block_image: Path | None = None
    block_reps: int | None = None  # None: as many as the other metrics
    # The Linux net run's transfer sizes and ping count.
    net_plan: net.LinuxNetPlan = net.LINUX_NET_PLAN
    # The balloon run's sizes (its -m replaces mem_mib in that run).
    balloon_plan: balloon.BalloonPlan = balloon.SVTEST_PLAN


@dataclass(frozen=True)
class Monitor:
    name: str
    # (guest, cmdline, qmp socket path, settings) -> argv
    command: Callable[[Guest, str, Path, Settings], list[str]]
    # (image, direct) -> the arguments adding it as the guest's disk 0
    disk: Callable[[Path, bool], list[str]]
    # tap name -> the arguments adding a virtio-net NIC on it
    nic: Callable[[str], list[str]]
    # the arguments adding a virtio-balloon (no free page reporting)
    balloon: Callable[[], list[str]]
    # socket path -> the arguments adding a virtconsole (hvc0) on that unix socket
    virtconsole: Callable[[Path], list[str]]
    env: dict[str, str] | None = None


def ours_command(guest: Guest, cmdline: str, qmp: Path, settings: Settings) -> list[str]:
    # The monitor adds the kvm_pvm guest arguments itself (it logs them).  It runs as users
    # run it: the installed command (no runpy), else through the interpreter.
    script = Path(settings.python).with_name("stratovirt-py")
    launcher = [str(script)] if script.is_file() else [settings.python, "-m", "stratovirt_py"]
    argv = [*launcher, "-kernel", str(guest.kernel)]
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


def ours_disk(image: Path, direct: bool) -> list[str]:
    return ["-drive", f"id=d0,file={image},direct={'on' if direct else 'off'}",
            "-device", "virtio-blk-device,drive=d0,id=d0"]


def qemu_disk(image: Path, direct: bool) -> list[str]:
    # The guest drives only modern (version 2) virtio-mmio; cache=none is O_DIRECT
    # like direct=on, cache=writeback goes through the page cache like direct=off.
    cache = "none" if direct else "writeback"
    return ["-global", "virtio-mmio.force-legacy=false",
            "-drive", f"id=d0,file={image},format=raw,if=none,cache={cache}",
            "-device", "virtio-blk-device,drive=d0"]


def ours_virtconsole(path: Path) -> list[str]:
    return ["-device", "virtio-serial-device",
            "-chardev", f"socket,id=hvc,path={path},server,nowait",
            "-device", "virtconsole,id=con0,chardev=hvc"]


def qemu_virtconsole(path: Path) -> list[str]:
    return ["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-serial-device",
            "-chardev", f"socket,id=hvc,path={path},server=on,wait=off",
            "-device", "virtconsole,chardev=hvc"]


def ours_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


MONITORS = {
    "ours": Monitor("ours", ours_command, ours_disk, net.ours_nic, balloon.ours_balloon,
                    ours_virtconsole,
                    ours_env()),
    "qemu": Monitor("qemu", qemu_command, qemu_disk, net.qemu_nic, balloon.qemu_balloon,
                    qemu_virtconsole,
                    None),
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
             stderr_path: Path, console_input: bool = False,
             read_hook: Callable[[int], metrics.ReadHook] | None = None) -> Iterator[Launched]:
    """Starts a monitor with its serial on a pipe; kills it on the way out, whatever happens.

    With `console_input` the serial's input is a pipe too (process.stdin);
    `read_hook(pid)` gives the serial reader a hook run after each read.
    """
    stdin = subprocess.PIPE if console_input else subprocess.DEVNULL
    with stderr_path.open("wb") as stderr:
        t0 = time.monotonic_ns()
        process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                   stderr=stderr, cwd=REPO, env=env)
    assert process.stdout is not None
    serial = None
    exits = None
    try:
        exits = metrics.ExitWatcher(process.pid)
        serial = metrics.SerialWatcher(process.stdout.fileno(), markers,
                                       read_hook(process.pid) if read_hook else None)
        yield Launched(process, t0, serial, exits, stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if serial is not None:
            serial.join()
        process.stdout.close()
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if exits is not None:
            exits.close()


def _ms(start_ns: int, end_ns: int) -> float:
    return (end_ns - start_ns) / NS_PER_MS


def _wait_for_exit(run: Launched, guest: Guest, record: RunRecord) -> tuple[int, int]:
    """Waits for the monitor to exit on its own, all output read: (status, exit time in ns)."""
    exited = run.exits.wait(run.t0 + int(guest.timeout_s * 1e9))
    if exited is None:
        raise ProbeError(f"the monitor did not exit within {guest.timeout_s} s")
    code = run.process.wait(timeout=10)
    # All output is in once the reader has seen the end of the pipe.
    run.serial.join()
    record.details["exit_status"] = code
    return code, exited


def run_boot(record: RunRecord, monitor: Monitor, guest: Guest, workdir: Path) -> None:
    """svtest boot run: exec -> first byte, `svtest: hello`, process exit."""
    markers = {"boot.hello": SVTEST_HELLO, "done": SVTEST_DONE}
    stderr_path = workdir / f"{record.monitor}-boot-{record.pair}.stderr"
    with launched(record.argv, monitor.env, markers, stderr_path) as run:
        try:
            code, exited = _wait_for_exit(run, guest, record)
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


HVC0_MARKERS = {"boot.hvc0-run-init": LINUX_RUN_INIT, "boot.hvc0-userspace": LINUX_USERSPACE}


def hvc0_cmdline(guest: Guest) -> str:
    """The Linux session's command line with its console on hvc0 instead of ttyS0."""
    return guest.session_cmdline.replace("console=ttyS0", "console=hvc0")


def connect_unix(path: Path, deadline_ns: int, alive: Callable[[], bool]) -> socket.socket:
    """A connection to the unix socket at `path`, retried until it accepts."""
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if not alive():
            raise ProbeError("the monitor exited before its console socket accepted")
        if time.monotonic_ns() > deadline_ns:
            raise ProbeError(f"the console socket {path} never accepted")
        time.sleep(0.002)


def run_hvc0(record: RunRecord, monitor: Monitor, guest: Guest, console_path: Path,
             workdir: Path) -> None:
    """Linux boot with its console on a virtconsole (hvc0): exec -> markers read there."""
    stderr_path = workdir / f"{record.monitor}-hvc0-{record.pair}.stderr"
    with launched(record.argv, monitor.env, {}, stderr_path) as run:
        console = None
        watcher = None
        try:
            deadline = run.t0 + int(guest.timeout_s * 1e9)
            console = connect_unix(console_path, deadline, run.alive)
            watcher = metrics.SerialWatcher(console.fileno(), HVC0_MARKERS)
            for name in HVC0_MARKERS:
                record.values[name] = _ms(run.t0, watcher.wait_for(name, deadline,
                                                                   _alive_check(run)))
        except (ProbeError, OSError) as error:
            record.error = str(error)
            record.details["console_tail"] = watcher.tail() if watcher else ""
            record.details["stderr_tail"] = run.stderr_tail()
        finally:
            if run.process.poll() is None:
                run.process.kill()
            if console is not None:
                console.shutdown(socket.SHUT_RDWR)
                if watcher is not None:
                    watcher.join()
                console.close()


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
            running, queries = metrics.wait_running(client, deadline, run.alive)
            record.values["start.query-running"] = _ms(run.t0, running)
            record.details["running_queries"] = queries
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
            _failed(record, run, error)
        finally:
            if client is not None:
                client.close()


def make_disk_image(path: Path, size: int) -> None:
    """`size` random bytes, every block written (a sparse image would read holes for free).

    DiskImageError when the file system cannot hold it or refuses O_DIRECT, which
    the .direct block runs need (tmpfs before Linux 6.6 does: set TMPDIR elsewhere).
    """
    chunk = 1 << 20
    try:
        with path.open("wb") as image:
            for _ in range(size // chunk):
                image.write(os.urandom(chunk))
            image.write(os.urandom(size % chunk))
            image.flush()
            os.fsync(image.fileno())
        allocated = path.stat().st_blocks * 512
        if allocated < size:
            raise DiskImageError(f"{path}: only {allocated} of {size} bytes allocated")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
    except OSError as error:
        if error.errno == errno.EINVAL:
            raise DiskImageError(f"{path.parent} does not support O_DIRECT: set TMPDIR to a "
                                 "directory on a disk file system") from error
        raise DiskImageError(f"cannot write the disk image {path}: {error}") from error


def prepare_image_cache(image: Path, cached: bool) -> dict[str, float]:
    """Syncs, then leaves `image` wholly in the page cache (cached) or wholly out of it.

    The timings go into the run's details.
    """
    started = time.monotonic()
    os.sync()
    synced = time.monotonic()
    fd = os.open(image, os.O_RDONLY)
    try:
        if cached:
            buffer = bytearray(1 << 20)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as reader:
                while reader.readinto(buffer):
                    pass
        else:
            # Clean pages only: that is why the sync comes first.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"sync_ms": (synced - started) * 1e3, "cache_ms": (time.monotonic() - synced) * 1e3}


def run_block(record: RunRecord, monitor: Monitor, guest: Guest, case: BlockCase,
              image: Path, workdir: Path) -> None:
    """One blk-bench run: page cache state, boot with the disk, time the run, exit."""
    record.details["prepare"] = prepare_image_cache(image, cached=not case.direct)
    stderr_path = workdir / f"{record.monitor}-{record.kind}-{record.pair}.stderr"
    samplers: list[cpu.WindowSampler] = []

    def sampler(pid: int) -> metrics.ReadHook:
        samplers.append(cpu.WindowSampler(pid, metrics.BLK_START))
        return samplers[0].on_read

    with launched(record.argv, monitor.env, {}, stderr_path, read_hook=sampler) as run:
        try:
            code, _ = _wait_for_exit(run, guest, record)
            result = metrics.parse_blk_bench(bytes(run.serial.data), run.serial.arrival_ns)
            record.details["blk_bench"] = result.as_dict()
            ran = (result.mode, result.bs, result.qd, result.requests)
            wanted = (case.workload.mode, case.workload.bs, case.workload.qd,
                      case.workload.count)
            if ran != wanted:
                # --append overrode a key the metric's name stands for.
                raise ProbeError(f"the guest ran mode, bs, qd, count = {ran}, not {wanted}")
            if code != 0:
                raise ProbeError(f"the monitor exited with status {code}")
            record.details["cpu"] = samplers[0].as_dict()
            cpu_ms = samplers[0].ms_per_1000(result.requests)
            record.values[case.metric] = result.value(case.workload.unit)
            record.values[case.cpu_metric] = cpu_ms
        except (ProbeError, OSError, subprocess.TimeoutExpired) as error:
            record.error = str(error)
            record.details["serial_tail"] = run.serial.tail()
            record.details["stderr_tail"] = run.stderr_tail()


def run_net_linux(record: RunRecord, monitor: Monitor, guest: Guest, qmp_path: Path,
                  workdir: Path, plan: net.LinuxNetPlan) -> None:
    """Linux in a namespace with a tap: boot, eth0 up, TCP each way, ping, quit."""
    stderr_path = workdir / f"{record.monitor}-net-{record.pair}.stderr"
    client = None
    with net_namespace("svpy-bench") as namespace:
        net.prepare_namespace(namespace)
        record.argv = [*namespace.exec_prefix, *record.argv]
        markers = {"ready": LINUX_USERSPACE}
        with launched(record.argv, monitor.env, markers, stderr_path,
                      console_input=True) as run:
            try:
                deadline = run.t0 + int(guest.timeout_s * 1e9)
                _, client = metrics.connect_qmp(qmp_path, deadline, run.alive)
                client.execute("qmp_capabilities")
                check = _boot_check(run, client)
                run.serial.wait_for("ready", deadline, check)
                record.details["userspace_ms"] = _ms(run.t0, run.serial.marker_ns["ready"])
                assert run.process.stdin is not None
                console = net.GuestConsole(run.process.stdin, run.serial, check)
                values, details = net.linux_net_run(namespace, console, plan, str(REPO),
                                                    guest.timeout_s)
                record.values.update(values)
                record.details.update(details)
                _quit(record, run, client)
            except (ProbeError, NetnsError, OSError, ValueError, KeyError,
                    subprocess.TimeoutExpired) as error:
                _failed(record, run, error)
            finally:
                if client is not None:
                    client.close()


def run_net_frames(record: RunRecord, monitor: Monitor, guest: Guest,
                   workload: FrameWorkload, workdir: Path) -> None:
    """One svtest net-bench run in a namespace: the host drains or floods the tap."""
    stderr_path = workdir / f"{record.monitor}-{record.kind}-{record.pair}.stderr"
    with net_namespace("svpy-bench") as namespace:
        tap = net.prepare_namespace(namespace)
        record.argv = [*namespace.exec_prefix, *record.argv]
        peer_args = net.frame_peer_args(workload, tap, guest.timeout_s)
        markers = {"start": net.NET_START_MARKER}
        with net.peer(namespace, peer_args, str(REPO)) as host, \
                launched(record.argv, monitor.env, markers, stderr_path) as run:
            try:
                if workload.direction == "rx":
                    run.serial.wait_for("start", run.t0 + int(guest.timeout_s * 1e9))
                    host.go()
                code, _ = _wait_for_exit(run, guest, record)
                # The host's side first: it tells why a failed run failed, too.
                host_side = host.result(10, stop=True)
                record.details["host"] = host_side
                result = net.parse_net_bench(bytes(run.serial.data), run.serial.arrival_ns)
                record.details["net_bench"] = result.as_dict()
                ran = (result.direction, result.size, result.count)
                wanted = (workload.direction, workload.size, workload.count)
                if ran != wanted:
                    raise ProbeError(f"the guest ran dir, size, count = {ran}, not {wanted}")
                if code != 0:
                    raise ProbeError(f"the monitor exited with status {code}")
                net.check_frame_peer(workload, host_side)
                record.values[workload.metric] = result.frames_per_second
            except (ProbeError, OSError, ValueError, KeyError,
                    subprocess.TimeoutExpired) as error:
                _failed(record, run, error)


# Boot plus touching 600 MiB takes the freestanding guest ~13 s here: more than
# the 30 s a plain svtest run may take once the host is busy.
BALLOON_SVTEST_MIN_TIMEOUT_S = 120.0


def run_balloon(record: RunRecord, monitor: Monitor, guest: Guest, plan: balloon.BalloonPlan,
                qmp_path: Path, workdir: Path) -> None:
    """Boot with a balloon, fill guest memory, time the inflate to the target, quit."""
    linux = guest.name == "linux"
    timeout_s = guest.timeout_s if linux else max(guest.timeout_s,
                                                  BALLOON_SVTEST_MIN_TIMEOUT_S)
    stderr_path = workdir / f"{record.monitor}-balloon-{record.pair}.stderr"
    markers = {"ready": LINUX_USERSPACE if linux else balloon.SVTEST_READY_MARKER}
    client = None
    with launched(record.argv, monitor.env, markers, stderr_path, console_input=True) as run:
        try:
            deadline = run.t0 + int(timeout_s * 1e9)
            _, client = metrics.connect_qmp(qmp_path, deadline, run.alive)
            client.execute("qmp_capabilities")
            check = _boot_check(run, client)
            if linux:
                run.serial.wait_for("ready", deadline, check)
                record.details["userspace_ms"] = _ms(run.t0, run.serial.marker_ns["ready"])
                assert run.process.stdin is not None
                console = net.GuestConsole(run.process.stdin, run.serial, check)
                started = time.monotonic_ns()
                console.run(balloon.linux_touch_command(plan), timeout_s)
                record.details["touch_ms"] = _ms(started, time.monotonic_ns())
            else:
                # The line, or a FAIL line, which the check reports.
                run.serial.wait_for_pattern(balloon.SVTEST_READY_LINE, 0, deadline, check)
                record.details.update(balloon.check_svtest_ready(bytes(run.serial.data), plan))
                record.details["ready_ms"] = _ms(run.t0, run.serial.marker_ns["ready"])
            result = balloon.inflate(client, run.process.pid, plan, timeout_s,
                                     _alive_check(run))
            record.details["balloon"] = result.as_dict()
            if not linux:
                run.serial.wait_for_pattern(balloon.SVTEST_INTACT_LINE, 0,
                                            time.monotonic_ns() + int(timeout_s * 1e9), check)
                record.details.update(balloon.check_svtest_inflated(bytes(run.serial.data),
                                                                    plan))
            # Only a run whose guest did what it should counts.
            record.values.update(result.values())
            _quit(record, run, client)
        except (ProbeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as error:
            _failed(record, run, error)
        finally:
            if client is not None:
                client.close()


def many_vms(monitor: Monitor, guest: Guest, settings: Settings, workdir: Path,
             pair: int) -> list[tuple[list[str], Path]]:
    """The ten monitors' command lines and QMP sockets: the same guest, a socket each."""
    vms = []
    for index in range(MANY_VMS):
        qmp_path = workdir / f"{monitor.name}-many-{pair}-{index}.qmp"
        vms.append((monitor.command(guest, guest.session_cmdline, qmp_path, settings),
                    qmp_path))
    return vms


def run_many(record: RunRecord, monitor: Monitor, guest: Guest, settings: Settings,
             vms: list[tuple[list[str], Path]], workdir: Path) -> None:
    """Ten monitors at once: all answer query-status running, their overhead RSS, quit."""
    record.details["argvs"] = [argv for argv, _ in vms]
    starts: list[Future[many.VmStart]] = []
    runs: list[Launched] = []
    try:
        # The stack is left first: the monitors are killed (their `launched` exits)
        # before the executor joins the probe threads, so no probe waits out its
        # deadline.
        with ThreadPoolExecutor(max_workers=len(vms),
                                thread_name_prefix="many-probe") as probes, \
                contextlib.ExitStack() as stack:
            for index, (argv, qmp_path) in enumerate(vms):
                stderr_path = workdir / f"{record.monitor}-many-{record.pair}-{index}.stderr"
                run = stack.enter_context(launched(argv, monitor.env, {}, stderr_path))
                runs.append(run)
                deadline = run.t0 + int(guest.timeout_s * 1e9)
                starts.append(probes.submit(many.probe_running, qmp_path, deadline,
                                            run.alive))
            try:
                _many_measure(record, settings, runs, starts)
            except (ProbeError, RamMappingError, OSError, ValueError,
                    subprocess.TimeoutExpired) as error:
                failed = next((i for i, f in enumerate(starts)
                               if f.done() and f.exception() is not None), 0)
                _failed(record, runs[failed], error)
                record.details["failed_vm"] = failed
    finally:
        for start in starts:
            if start.done() and start.exception() is None:
                start.result().client.close()


def _many_measure(record: RunRecord, settings: Settings, runs: list[Launched],
                  starts: list[Future[many.VmStart]]) -> None:
    results = [start.result() for start in starts]  # a probe's ProbeError comes out here
    values = {"many.all-running": many.all_running_ms([run.t0 for run in runs],
                                                      [r.running_ns for r in results])}
    # Once all ten answer, before anything else is asked of them.
    accounts = [account_process(run.process.pid, settings.mem_mib * MiB) for run in runs]
    values["many.overhead-rss"] = many.total_overhead_mib([a.overhead_rss for a in accounts])
    first = runs[0].t0
    record.details["vms"] = [
        {"exec_ms": _ms(first, run.t0), "greeting_ms": _ms(first, result.greeted_ns),
         "running_ms": _ms(first, result.running_ns), "running_queries": result.queries,
         "overhead_rss_mib": memory.overhead_rss / MiB}
        for run, result, memory in zip(runs, results, accounts, strict=True)]
    # All are told to quit before any exit is awaited: they shut down in parallel.
    for result in results:
        result.client.execute("quit")
    statuses = []
    for index, run in enumerate(runs):
        if run.exits.wait(time.monotonic_ns() + 10 * 1_000_000_000) is None:
            raise ProbeError(f"VM {index} did not exit within 10 s of 'quit'")
        statuses.append(run.process.wait(timeout=10))
    record.details["exit_statuses"] = statuses
    if any(statuses):
        raise ProbeError(f"exit statuses after 'quit': {statuses}")
    record.values.update(values)


def _alive_check(run: Launched) -> Callable[[], None]:
    """Gives up early once the monitor has exited (no QMP traffic of its own)."""
    def check() -> None:
        if not run.alive():
            raise ProbeError(f"the monitor exited (status {run.process.returncode})")
    return check


def _failed(record: RunRecord, run: Launched, error: Exception) -> None:
    """Keeps why a run failed, with the tails of its console and stderr."""
    record.error = f"{type(error).__name__}: {error}"
    record.details["serial_tail"] = run.serial.tail()
    record.details["stderr_tail"] = run.stderr_tail()


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
    if guest.name == "linux" and "boot" in groups:
        kinds.append("hvc0")
    if guest.name == "linux" and "net" in groups:
        kinds.append("net")
    if "balloon" in groups:
        kinds.append("balloon")
    if "many" in groups:
        kinds.append("many")
    return (kinds + [case.metric for case in block_cases(guest, groups)]
            + [workload.metric for workload in frame_workloads(guest, groups)])


def block_cases(guest: Guest, groups: frozenset[str]) -> list[BlockCase]:
    return list(BLOCK_CASES) if guest.block and "block" in groups else []


def frame_workloads(guest: Guest, groups: frozenset[str]) -> list[FrameWorkload]:
    """svtest's net-bench runs (the Linux guest measures net through TCP and ping)."""
    return list(FRAME_WORKLOADS) if guest.name == "svtest" and "net" in groups else []


def kind_reps(kind: str, settings: Settings, reps: int) -> int:
    """Measured pairs of a run kind: the block kinds may have fewer than the rest."""
    if kind.startswith("block.") and settings.block_reps is not None:
        return settings.block_reps
    return reps


def metric_reps(names: list[str], settings: Settings, reps: int) -> dict[str, int]:
    """Measured pairs per metric (a block metric's run kind is the metric's name)."""
    return {name: kind_reps(name, settings, reps) for name in names}


def expected_metrics(guest: Guest, groups: frozenset[str]) -> list[str]:
    """The metric names this guest and group selection produce, in table order."""
    names = ["start.qmp-greeting", "start.query-running"]
    names += (["boot.first-byte", "boot.hello", "boot.exit"] if guest.name == "svtest"
              else ["boot.first-byte", "boot.run-init", "boot.userspace",
                    *HVC0_MARKERS])
    names += ["memory.overhead-rss", "memory.overhead-pss",
              "qmp.latency-p50", "qmp.latency-p99", "qmp.throughput"]
    names = [n for n in names if metrics.METRICS[n].group in groups]
    if guest.name == "linux" and "net" in groups:
        names += LINUX_NET_METRICS
    if "balloon" in groups:
        names += BALLOON_METRICS
    if "many" in groups:
        names += MANY_METRICS
    cases = block_cases(guest, groups)
    return (names + [case.metric for case in cases] + [case.cpu_metric for case in cases]
            + [workload.metric for workload in frame_workloads(guest, groups)])


def run_pairs(monitors: list[Monitor], guest: Guest, settings: Settings, reps: int,
              warmup: int, workdir: Path,
              progress: Callable[[RunRecord, int], None] | None = None) -> list[RunRecord]:
    """All runs, warm-up pairs first (pair index -warmup..-1), then pairs 0..reps-1.

    A kind with fewer pairs (`kind_reps`, the block metric) runs in the first ones.
    """
    records: list[RunRecord] = []
    kinds = run_kinds(guest, settings.groups)
    cases = {case.metric: case for case in block_cases(guest, settings.groups)}
    frames = {w.metric: w for w in frame_workloads(guest, settings.groups)}
    if cases and settings.block_image is None:
        raise ValueError("the block metric needs Settings.block_image")
    last_pair = max((kind_reps(kind, settings, reps) for kind in kinds), default=0)
    for pair in range(-warmup, last_pair):
        for kind in kinds:
            pairs = kind_reps(kind, settings, reps)
            if pair >= pairs:
                continue
            case = cases.get(kind)
            for monitor in monitors:
                qmp_path = workdir / f"{monitor.name}-{kind}-{pair}.qmp"
                if case is not None:
                    assert settings.block_image is not None
                    argv = (monitor.command(guest, guest.block_cmdline(case), qmp_path,
                                            settings)
                            + monitor.disk(settings.block_image, case.direct))
                elif kind in frames:
                    argv = (monitor.command(guest, guest.net_cmdline(frames[kind]), qmp_path,
                                            settings) + monitor.nic(net.TAP))
                elif kind == "net":
                    argv = (monitor.command(guest, guest.session_cmdline, qmp_path, settings)
                            + monitor.nic(net.TAP))
                elif kind == "hvc0":
                    console_path = workdir / f"{monitor.name}-hvc0-{pair}.sock"
                    argv = (monitor.command(guest, hvc0_cmdline(guest), qmp_path, settings)
                            + monitor.virtconsole(console_path))
                elif kind == "many":
                    vms = many_vms(monitor, guest, settings, workdir, pair)
                    argv = vms[0][0]
                elif kind == "balloon":
                    plan = settings.balloon_plan
                    sized = dataclasses.replace(settings, mem_mib=plan.mem_mib)
                    argv = (monitor.command(guest, guest.balloon_cmdline(plan), qmp_path,
                                            sized) + monitor.balloon())
                else:
                    cmdline = guest.boot_cmdline if kind == "boot" else guest.session_cmdline
                    assert cmdline is not None
                    argv = monitor.command(guest, cmdline, qmp_path, settings)
                record = RunRecord(pair=pair, kind=kind, monitor=monitor.name, argv=argv)
                try:
                    if case is not None:
                        assert settings.block_image is not None
                        run_block(record, monitor, guest, case, settings.block_image, workdir)
                    elif kind in frames:
                        run_net_frames(record, monitor, guest, frames[kind], workdir)
                    elif kind == "net":
                        run_net_linux(record, monitor, guest, qmp_path, workdir,
                                      settings.net_plan)
                    elif kind == "hvc0":
                        run_hvc0(record, monitor, guest, console_path, workdir)
                    elif kind == "many":
                        run_many(record, monitor, guest, settings, vms, workdir)
                    elif kind == "balloon":
                        run_balloon(record, monitor, guest, settings.balloon_plan, qmp_path,
                                    workdir)
                    elif kind == "boot":
                        run_boot(record, monitor, guest, workdir)
                    else:
                        run_session(record, monitor, guest, settings, qmp_path, workdir)
                except Exception as error:
                    # A harness bug in one run must not lose the others' samples.
                    record.error = f"harness error: {type(error).__name__}: {error}"
                records.append(record)
                if progress is not None:
                    progress(record, pairs)
    return records


def samples_by_pair(records: list[RunRecord], metric: str, monitor: str, reps: int
                    ) -> list[float | None]:
    """metric's value for each measured pair (None where the run failed or lacked it)."""
    values: list[float | None] = [None] * reps
    for record in records:
        if (record.monitor == monitor and 0 <= record.pair < reps
                and record.error is None):
            value = record.values.get(metric)
            if value is not None:
                values[record.pair] = value
    return values
