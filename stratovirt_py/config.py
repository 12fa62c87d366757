"""MachineConfig: the validated, frozen description of one microVM.

Both front ends (the command line in cli.py and the legacy `-config` JSON file
in json_config.py) build a MachineConfig through the helpers here, so a value
means the same thing and is checked the same way whichever way it came in.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from enum import Enum

from stratovirt_py.errors import ConfigError, shorten

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

MIN_VCPUS = 1
MAX_VCPUS = 254
MIN_MEMORY = 128 * MiB
MAX_MEMORY = 512 * GiB
DEFAULT_MEMORY = 256 * MiB
MAX_DISKS = 6
MAX_NICS = 2

# No size or count needs more; longer numbers are refused before conversion.
MAX_NUMBER_DIGITS = 24

_SIZE_SUFFIXES = {"": None, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str, what: str, default_unit: int = MiB) -> int:
    """Parses "512", "512M", "1G", "1048576K" into bytes.

    A bare number is in `default_unit` (MiB on the command line, as in
    StratoVirt; bytes in the JSON file).
    """
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not match:
        raise ConfigError(
            f"invalid {what} '{shorten(text)}': expected a number with an optional K/M/G suffix")
    if len(match.group(1)) > MAX_NUMBER_DIGITS:
        raise ConfigError(f"invalid {what} '{shorten(text)}': the number is too large")
    number, suffix = int(match.group(1)), match.group(2).lower()
    unit = _SIZE_SUFFIXES[suffix] or default_unit
    return number * unit


def parse_bool(text: str, what: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"invalid value '{text}' for {what}: expected on or off")


def parse_int(text: str, what: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise ConfigError(f"invalid {what} '{shorten(text)}': the number is too large")
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"invalid {what} '{text}': expected an integer") from None



def split_options(text: str, option: str, positional: str | None = None) -> dict[str, str]:
    """Splits "a=1,b=2,flag" into a dict; a leading bare value goes to `positional`.

    Bare words after the first become flags with the value "" (e.g. "server").
    """
    result: dict[str, str] = {}
    for index, item in enumerate(text.split(",")):
        if item == "":
            raise ConfigError(f"invalid {option} '{text}': empty item")
        key, sep, value = item.partition("=")
        if not sep:
            if index == 0 and positional is not None:
                key, value = positional, item
            else:
                value = ""
        if key in result:
            raise ConfigError(f"invalid {option} '{text}': '{key}' given twice")
        result[key] = value
    return result


def reject_unknown(options: dict[str, str], allowed: set[str], option: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"invalid {option}: unknown parameter '{unknown[0]}' "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


@dataclass(frozen=True)
class CpuTopology:
    """vCPU count and topology; boot vCPUs are the first `cpus` of `max_cpus`."""

    cpus: int = 1
    max_cpus: int = 1
    sockets: int = 1
    cores: int = 1
    threads: int = 1

    def ids(self, index: int) -> tuple[int, int, int]:
        """(socket, core, thread) of vCPU `index`."""
        thread = index % self.threads
        core = (index // self.threads) % self.cores
        socket = index // (self.threads * self.cores)
        return socket, core, thread

    @staticmethod
    def build(cpus: int, max_cpus: int | None = None, sockets: int | None = None,
              cores: int | None = None, threads: int | None = None) -> CpuTopology:
        """Fills the missing numbers the way QEMU did before 6.2 and StratoVirt's spec shows.

        With only a count, every vCPU is its own socket (the spec's query-cpus
        example: CPU 1 has socket-id 1, core-id 0).
        """
        max_cpus = cpus if max_cpus is None else max_cpus
        for name, value in (("cpus", cpus), ("maxcpus", max_cpus)):
            if not MIN_VCPUS <= value <= MAX_VCPUS:
                raise ConfigError(f"invalid -smp: {name}={value} is out of range "
                                  f"{MIN_VCPUS}..{MAX_VCPUS}")
        if max_cpus < cpus:
            raise ConfigError(f"invalid -smp: maxcpus={max_cpus} is less than cpus={cpus}")
        for name, value in (("sockets", sockets), ("cores", cores), ("threads", threads)):
            if value is not None and value < 1:
                raise ConfigError(f"invalid -smp: {name} must be at least 1")
        threads = threads or 1
        if sockets is None and cores is None:
            cores = 1
        if sockets is None:
            assert cores is not None
            sockets = max(1, max_cpus // (cores * threads))
        elif cores is None:
            cores = max(1, max_cpus // (sockets * threads))
        if sockets * cores * threads != max_cpus:
            raise ConfigError(
                f"invalid -smp: sockets ({sockets}) * cores ({cores}) * threads ({threads}) "
                f"must equal maxcpus ({max_cpus})"
            )
        return CpuTopology(cpus, max_cpus, sockets, cores, threads)


class SerialKind(Enum):
    """A character backend's kind (-serial's own, or a named -chardev's)."""
    NONE = "none"
    STDIO = "stdio"
    FILE = "file"
    SOCKET = "socket"
    PTY = "pty"


@dataclass(frozen=True)
class ChardevConfig:
    """A character backend: `-chardev KIND,id=ID,...`, or the one `-serial` describes itself."""
    id: str
    kind: SerialKind
    path: str | None = None


@dataclass(frozen=True)
class SerialConfig:
    kind: SerialKind = SerialKind.NONE
    path: str | None = None
    chardev: str | None = None  # `-serial chardev:ID`: the -chardev named ID


SERIAL_CHARDEV_LABEL = "serial0"  # what QEMU calls -serial's own backend (query-chardev)


def _backend(kind: str, options: dict[str, str], option: str) -> tuple[SerialKind, str | None]:
    """The backend part shared by -serial and -chardev (`options` without id/backend)."""
    if kind in ("stdio", "none", "null", "pty"):
        reject_unknown(options, set(), option)
        return {"stdio": SerialKind.STDIO, "pty": SerialKind.PTY}.get(kind, SerialKind.NONE), None
    if kind == "file":
        reject_unknown(options, {"path"}, option)
        if not options.get("path"):
            raise ConfigError(f"invalid {option}: file needs path=<file>")
        return SerialKind.FILE, options["path"]
    if kind == "socket":
        if "port" in options or "host" in options:
            raise ConfigError(f"invalid {option}: only unix sockets (path=) are supported")
        reject_unknown(options, {"path", "server", "nowait"}, option)
        if not options.get("path"):
            raise ConfigError(f"invalid {option}: socket needs path=<unix socket path>")
        if "server" not in options or "nowait" not in options:
            raise ConfigError(f"invalid {option}: a socket backend needs 'server,nowait'")
        return SerialKind.SOCKET, options["path"]
    raise ConfigError(f"invalid {option} '{shorten(kind)}': expected stdio, pty, "
                      "file,path=P, socket,path=P,server,nowait or none")


def parse_serial(text: str) -> SerialConfig:
    """`-serial stdio | pty | file,path=P | socket,path=P,server,nowait | chardev:ID | none`."""
    if text.startswith("chardev:"):
        chardev = text[len("chardev:"):]
        if not chardev:
            raise ConfigError("invalid -serial 'chardev:': no chardev id")
        return SerialConfig(chardev=chardev)
    options = split_options(text, "-serial", positional="backend")
    kind, path = _backend(options.pop("backend", ""), options, "-serial")
    return SerialConfig(kind, path)


def parse_chardev(text: str) -> ChardevConfig:
    """`-chardev stdio|pty|file|socket,id=ID[,path=P][,server,nowait]`."""
    options = split_options(text, "-chardev", positional="backend")
    chardev_id = options.pop("id", "")
    if not chardev_id:
        raise ConfigError("invalid -chardev: id=<id> is required")
    kind, path = _backend(options.pop("backend", ""), options, "-chardev")
    return ChardevConfig(chardev_id, kind, path)


def parse_qmp_socket(text: str, option: str) -> str:
    """`-qmp unix:PATH,server,nowait` or `-api-channel unix:PATH`; returns PATH."""
    if not text.startswith("unix:"):
        raise ConfigError(f"invalid {option} '{text}': only unix:<path> sockets are supported")
    path, *flags = text[len("unix:"):].split(",")
    if not path:
        raise ConfigError(f"invalid {option} '{text}': empty socket path")
    unknown = set(flags) - {"server", "nowait"}
    if unknown:
        raise ConfigError(f"invalid {option}: unknown parameter '{sorted(unknown)[0]}'")
    if option == "-qmp" and set(flags) != {"server", "nowait"}:
        raise ConfigError("invalid -qmp: 'server,nowait' are required (unix:<path>,server,nowait)")
    return path


def check_memory_size(size: int) -> int:
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ConfigError(f"invalid memory size {size} bytes: must be between 128 MiB and 512 GiB")
    if size % (4 * KiB):
        raise ConfigError(f"invalid memory size {size} bytes: must be a multiple of 4 KiB")
    return size


@dataclass(frozen=True)
class DriveConfig:
    """A block backend (`-drive`, JSON `drive`, or QMP blockdev-add)."""

    id: str
    path: str
    read_only: bool = False
    direct: bool = True
    serial: str | None = None


@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk device (`-device virtio-blk-device` or a JSON `drive`) and its drive."""

    id: str
    drive: DriveConfig
    iothread: str | None = None  # an -object iothread's id; None: the shared one


@dataclass(frozen=True)
class NetdevConfig:
    """A tap backend (`-netdev tap`, JSON `net`, or QMP netdev_add): a tap by name, or an
    open tap fd."""

    id: str
    ifname: str | None = None
    fd: int | None = None


@dataclass(frozen=True)
class NicConfig:
    """A virtio-net device (`-device virtio-net-device` or a JSON `net`) and its netdev."""

    id: str
    netdev: NetdevConfig
    mac: str | None = None  # canonical "52:54:00:12:34:56"; None: generated
    iothread: str | None = None  # an -object iothread's id; None: the shared one


def parse_mac(text: str, what: str = "mac") -> str:
    """A unicast Ethernet address as six hex pairs; returns it in lower case."""
    octets = text.split(":")
    if len(octets) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", o) for o in octets):
        raise ConfigError(f"invalid {what} '{shorten(text)}': expected six hex pairs such as "
                          "52:54:00:12:34:56")
    if int(octets[0], 16) & 1:
        raise ConfigError(f"invalid {what} '{text}': a multicast address cannot be a NIC's")
    return text.lower()


@dataclass(frozen=True)
class BalloonConfig:
    id: str = "balloon0"  # its QOM path is /machine/peripheral/<id>
    deflate_on_oom: bool = False
    free_page_reporting: bool = False


# --- virtio-console: virtio-serial-device, virtconsole, virtserialport ---

MAX_CONSOLE_PORTS = 3  # ports 0..2: the C data plane's SVPY_CONSOLE_MAX_PORTS


@dataclass(frozen=True)
class ConsolePortConfig:
    id: str
    chardev: str  # the -chardev id
    nr: int  # 0 is the console port (virtconsole); others are virtserialports
    name: str | None = None  # /sys/class/virtio-ports/vportXpN/name in the guest
    is_console: bool = False


@dataclass(frozen=True)
class VirtioSerialConfig:
    id: str = "virtio-serial0"
    ports: tuple[ConsolePortConfig, ...] = ()

    def validate(self, chardevs: tuple[ChardevConfig, ...], serial_chardev: str | None) -> None:
        known = {chardev.id for chardev in chardevs}
        numbers = [port.nr for port in self.ports]
        used = [port.chardev for port in self.ports]
        for port in self.ports:
            if not 0 <= port.nr < MAX_CONSOLE_PORTS:
                raise ConfigError(f"port '{port.id}': nr={port.nr} is out of range "
                                  f"(0..{MAX_CONSOLE_PORTS - 1})")
            if numbers.count(port.nr) > 1:
                raise ConfigError(f"port '{port.id}': nr={port.nr} is already taken")
            if port.chardev not in known:
                raise ConfigError(f"port '{port.id}': no -chardev with id '{port.chardev}'")
            if used.count(port.chardev) > 1 or port.chardev == serial_chardev:
                raise ConfigError(f"port '{port.id}': chardev '{port.chardev}' is already used "
                                  "by another device")

# --- end virtio-console ---
# --- virtio-rng (-object rng-random + -device virtio-rng-device, JSON `rng`) ---

# StratoVirt's bounds for the rate, max-bytes / period * 1000, in bytes per second.
RNG_MIN_BYTES_PER_SEC = 64
RNG_MAX_BYTES_PER_SEC = 1_000_000_000
# Longer periods gain nothing and would overflow the data plane's nanoseconds.
RNG_MAX_PERIOD_MS = 1 << 32


@dataclass(frozen=True)
class RngConfig:
    """A virtio-rng device and its random source (`-object rng-random` or JSON `rng`).

    Without max_bytes/period the guest gets what it asks for; with them, at most
    max_bytes in any `period_ms` milliseconds."""

    id: str = "rng0"  # the device's id
    rng: str = "rng0"  # the -object rng-random it reads from
    filename: str = "/dev/urandom"
    max_bytes: int | None = None
    period_ms: int | None = None


def check_rng_rate(max_bytes: int | None, period_ms: int | None, what: str) -> None:
    """StratoVirt's rule: both or neither, and max_bytes * 1000 / period_ms (integer
    bytes per second) within [64, 1e9]."""
    if (max_bytes is None) != (period_ms is None):
        missing = "period" if period_ms is None else "max-bytes"
        raise ConfigError(f"invalid {what}: max-bytes and period go together ('{missing}' "
                          "is missing)")
    if max_bytes is None or period_ms is None:
        return
    if not 1 <= period_ms <= RNG_MAX_PERIOD_MS:
        raise ConfigError(f"invalid {what}: period={period_ms} is out of range "
                          f"1..{RNG_MAX_PERIOD_MS} (milliseconds)")
    rate = max_bytes * 1000 // period_ms
    if not RNG_MIN_BYTES_PER_SEC <= rate <= RNG_MAX_BYTES_PER_SEC:
        raise ConfigError(
            f"invalid {what}: max-bytes={max_bytes},period={period_ms} is {rate} bytes/s; "
            f"the rate must lie in [{RNG_MIN_BYTES_PER_SEC}, {RNG_MAX_BYTES_PER_SEC}]")


# --- end virtio-rng ---


@dataclass(frozen=True)
class MachineConfig:
    name: str = "stratovirt-py"
    topology: CpuTopology = field(default_factory=CpuTopology)
    memory_size: int = DEFAULT_MEMORY
    dump_guest_core: bool = True
    kernel: str | None = None
    cmdline: str = ""
    initrd: str | None = None
    serial: SerialConfig = field(default_factory=SerialConfig)
    chardevs: tuple[ChardevConfig, ...] = ()  # -chardev: named backends
    qmp_sockets: tuple[str, ...] = ()
    disks: tuple[DiskConfig, ...] = ()
    iothreads: tuple[str, ...] = ()  # -object iothread,id=ID: I/O threads of their own
    nics: tuple[NicConfig, ...] = ()
    balloon: BalloonConfig | None = None
    virtio_serial: VirtioSerialConfig | None = None  # virtio-console
    rng: RngConfig | None = None
    log_file: str | None = None
    log_to_stderr: bool = False
    daemonize: bool = False
    pidfile: str | None = None
    freeze: bool = False
    seccomp: bool = True  # -disable-seccomp turns the allow-list off (sandbox.py)

    def validate(self) -> MachineConfig:
        """Cross-option rules; returns self so callers can chain."""
        if self.kernel is None:
            raise ConfigError("no kernel given: use -kernel <vmlinux or bzImage>")
        if self.pidfile is not None and not self.daemonize:
            raise ConfigError("-pidfile must be used with -daemonize together")
        chardev_ids = [chardev.id for chardev in self.chardevs]
        duplicates = sorted({i for i in chardev_ids if chardev_ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"chardev id '{duplicates[0]}' is used twice")
        if self.serial.chardev is not None and self.serial.chardev not in chardev_ids:
            raise ConfigError(f"-serial chardev:{self.serial.chardev}: no -chardev with that id")
        if self.daemonize and any(c.kind is SerialKind.STDIO for c in self.chardevs):
            raise ConfigError("-chardev stdio cannot be used with -daemonize")
        if self.daemonize and self.serial.kind is SerialKind.STDIO:
            raise ConfigError("-serial stdio cannot be used with -daemonize")
        if self.virtio_serial is not None:
            self.virtio_serial.validate(self.chardevs, self.serial.chardev)
        if len(self.disks) > MAX_DISKS:
            raise ConfigError(f"at most {MAX_DISKS} virtio-blk disks are supported")
        if len(self.nics) > MAX_NICS:
            raise ConfigError(f"at most {MAX_NICS} virtio-net devices are supported")
        for kind, ids in (("device id", [d.id for d in (*self.disks, *self.nics)]),
                          ("drive id", [d.drive.id for d in self.disks]),
                          ("netdev id", [n.netdev.id for n in self.nics]),
                          ("mac", [n.mac for n in self.nics if n.mac is not None])):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ConfigError(f"{kind} '{duplicates[0]}' is used twice")
        if len(set(self.iothreads)) != len(self.iothreads):
            raise ConfigError("an -object iothread id is used twice")
        for device in (*self.disks, *self.nics):
            if device.iothread is not None and device.iothread not in self.iothreads:
                raise ConfigError(f"device '{device.id}': no -object iothread with id "
                                  f"'{device.iothread}'")
        if len(set(self.qmp_sockets)) != len(self.qmp_sockets):
            raise ConfigError("the same QMP socket path is given twice")
        for what, path in self._paths():
            if "\0" in path:
                raise ConfigError(f"the {what} path contains a NUL character")
        check_memory_size(self.memory_size)
        return self

    def serial_backend(self) -> ChardevConfig:
        """The UART's backend: the -chardev it names, or the one -serial describes."""
        if self.serial.chardev is not None:
            for chardev in self.chardevs:
                if chardev.id == self.serial.chardev:
                    return chardev
            raise ConfigError(f"-serial chardev:{self.serial.chardev}: no -chardev with that id")
        return ChardevConfig(SERIAL_CHARDEV_LABEL, self.serial.kind, self.serial.path)

    def _paths(self) -> list[tuple[str, str]]:
        """(what, path) for every host path in the configuration."""
        paths = [("kernel", self.kernel), ("initrd", self.initrd), ("serial", self.serial.path),
                 ("log file", self.log_file), ("pid file", self.pidfile)]
        paths += [("QMP socket", path) for path in self.qmp_sockets]
        paths += [(f"chardev '{c.id}'", c.path) for c in self.chardevs if c.path is not None]
        paths += [(f"drive '{disk.drive.id}'", disk.drive.path) for disk in self.disks]
        if self.rng is not None:
            paths.append((f"rng-random '{self.rng.rng}' filename", self.rng.filename))
        return [(what, path) for what, path in paths if path is not None]

    def with_absolute_paths(self) -> MachineConfig:
        """The same configuration with every host path made absolute.

        A daemon changes to / after forking: relative paths given by the user
        must keep meaning what they meant where the command was typed.
        """
        def absolute(path: str | None) -> str | None:
            return os.path.abspath(path) if path else path

        return dataclasses.replace(
            self,
            kernel=absolute(self.kernel),
            initrd=absolute(self.initrd),
            serial=dataclasses.replace(self.serial, path=absolute(self.serial.path)),
            chardevs=tuple(dataclasses.replace(chardev, path=absolute(chardev.path))
                           for chardev in self.chardevs),
            qmp_sockets=tuple(os.path.abspath(path) for path in self.qmp_sockets),
            disks=tuple(dataclasses.replace(disk, drive=dataclasses.replace(
                disk.drive, path=os.path.abspath(disk.drive.path))) for disk in self.disks),
            log_file=absolute(self.log_file),
            pidfile=absolute(self.pidfile),
            rng=None if self.rng is None else dataclasses.replace(
                self.rng, filename=os.path.abspath(self.rng.filename)),
        )
