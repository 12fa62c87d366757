"""The StratoVirt-compatible command line: argv -> MachineConfig, and main()."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stratovirt_py import __version__
from stratovirt_py.config import (
    BalloonConfig,
    ChardevConfig,
    ConsolePortConfig,
    CpuTopology,
    DiskConfig,
    DriveConfig,
    MachineConfig,
    NetdevConfig,
    NicConfig,
    RngConfig,
    VirtioSerialConfig,
    check_memory_size,
    check_rng_rate,
    parse_bool,
    parse_chardev,
    parse_int,
    parse_mac,
    parse_qmp_socket,
    parse_serial,
    parse_size,
    reject_unknown,
    split_options,
)
from stratovirt_py.errors import ConfigError, MonitorError, error_line

USAGE = """\
usage: stratovirt-py [options]
  -machine [type=]microvm[,dump-guest-core=on|off]   machine type (microvm, the default)
  -smp [cpus=]N[,maxcpus=M][,sockets=S][,cores=C][,threads=T]   vCPUs (1..254)
  -m [size=]N[K|M|G]        guest memory (default 256M; a bare number is MiB)
  -kernel PATH              guest kernel: uncompressed ELF vmlinux or bzImage
  -append CMDLINE           guest kernel command line
  -initrd PATH              initial ramdisk
  -serial stdio|pty|file,path=P|socket,path=P,server,nowait|chardev:ID|none
  -chardev stdio|pty|file|socket,id=ID[,path=P][,server,nowait]   a named backend
  -qmp unix:PATH,server,nowait   QMP socket (may be repeated); also -api-channel unix:PATH
  -drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,serial=S]
  -device virtio-blk-device,drive=ID,id=DEV[,iothread=IO] | virtio-net-device,netdev=ID,id=DEV
          [,mac=M][,iothread=IO]
          | virtio-balloon-device[,id=ID][,deflate-on-oom=on|off][,free-page-reporting=on|off]
          | virtio-serial-device[,id=ID] | virtconsole,id=ID,chardev=CID[,nr=0]
          | virtserialport,id=ID,chardev=CID,nr=N[,name=NAME]
          | virtio-rng-device,rng=ID[,id=DEV][,max-bytes=N,period=MS]
  -netdev tap,id=ID,ifname=TAP|fd=N
  -object iothread,id=ID    an I/O thread for the devices that give iothread=ID
  -object rng-random,id=ID,filename=PATH   a random source for virtio-rng-device,rng=ID
  -config FILE.json         legacy JSON configuration (command-line values win)
  -D [LOGFILE]              log to LOGFILE (or stderr)
  -daemonize, -pidfile P    run in the background; write the pid to P
  -S, -freeze               start with the vCPUs paused
  -disable-seccomp          run without the seccomp allow-list (see README "Sandbox")
  -name NAME                VM name
  -version, -help
"""

# Options libvirt and Kata pass to StratoVirt that do not apply here (config_guidebook §7).
IGNORED_WITH_VALUE = {"-uuid", "-overcommit", "-sandbox", "-msg", "-rtc", "-boot", "-realtime",
                      "-display", "-cpu", "-accel", "-global"}
IGNORED_FLAGS = {"-no-user-config", "-nodefaults", "-nographic", "-no-shutdown", "-usb",
                 "-enable-kvm", "-mem-prealloc"}


@dataclass
class _Builder:
    """Collects options in command-line order before MachineConfig is frozen."""

    values: dict[str, object] = field(default_factory=dict)
    drives: dict[str, DriveConfig] = field(default_factory=dict)
    netdevs: dict[str, NetdevConfig] = field(default_factory=dict)
    disks: list[DiskConfig] = field(default_factory=list)
    nics: list[NicConfig] = field(default_factory=list)
    iothreads: list[str] = field(default_factory=list)
    qmp_sockets: list[str] = field(default_factory=list)
    chardevs: list[ChardevConfig] = field(default_factory=list)
    config_file: str | None = None
    virtio_serial: VirtioSerialConfig | None = None  # virtio-console
    # virtio-rng: -object rng-random ids -> filename, and the device (resolved in _finish,
    # so that -object may come after -device, as QEMU allows).
    rng_objects: dict[str, str] = field(default_factory=dict)
    rng_device: RngConfig | None = None


def parse_machine(text: str, builder: _Builder) -> None:
    options = split_options(text, "-machine", positional="type")
    reject_unknown(options, {"type", "dump-guest-core", "mem-share", "accel", "usb"}, "-machine")
    machine_type = options.get("type", "microvm")
    if machine_type != "microvm":
        raise ConfigError(f"unsupported machine type '{machine_type}': only microvm is available")
    if options.get("accel", "kvm") != "kvm":
        raise ConfigError(f"unsupported accelerator '{options['accel']}': only kvm is available")
    if parse_bool(options.get("mem-share", "off"), "mem-share"):
        raise ConfigError("mem-share=on is not supported")
    if "dump-guest-core" in options:
        builder.values["dump_guest_core"] = parse_bool(options["dump-guest-core"],
                                                       "dump-guest-core")


def parse_smp(text: str) -> CpuTopology:
    options = split_options(text, "-smp", positional="cpus")
    reject_unknown(options, {"cpus", "maxcpus", "sockets", "dies", "clusters", "cores",
                             "threads"}, "-smp")
    numbers = {key: parse_int(value, f"-smp {key}") for key, value in options.items()}
    for key in ("dies", "clusters"):
        if numbers.pop(key, 1) != 1:
            raise ConfigError(f"invalid -smp: {key} other than 1 is not supported on microvm")
    if "cpus" not in numbers:
        raise ConfigError("invalid -smp: the vCPU count is missing")
    return CpuTopology.build(numbers["cpus"], numbers.get("maxcpus"), numbers.get("sockets"),
                             numbers.get("cores"), numbers.get("threads"))


def parse_memory(text: str) -> int:
    options = split_options(text, "-m", positional="size")
    reject_unknown(options, {"size", "maxmem"}, "-m")
    if "size" not in options:
        raise ConfigError("invalid -m: the memory size is missing")
    size = check_memory_size(parse_size(options["size"], "memory size"))
    if "maxmem" in options and parse_size(options["maxmem"], "maxmem") < size:
        raise ConfigError("invalid -m: maxmem is smaller than the memory size")
    return size


def parse_drive(text: str) -> DriveConfig:
    options = split_options(text, "-drive")
    reject_unknown(options, {"id", "file", "readonly", "direct", "serial", "if", "format", "aio",
                             "throttling.iops-total", "discard", "detect-zeroes", "iothread"},
                   "-drive")
    for key in ("id", "file"):
        if not options.get(key):
            raise ConfigError(f"invalid -drive: '{key}' is required")
    if options.get("format", "raw") != "raw":
        raise ConfigError(f"invalid -drive: format '{options['format']}' (only raw is supported)")
    if options.get("if", "none") != "none":
        raise ConfigError(f"invalid -drive: if='{options['if']}' (only if=none is supported)")
    return DriveConfig(
        id=options["id"], path=options["file"],
        read_only=parse_bool(options.get("readonly", "off"), "readonly"),
        direct=parse_bool(options.get("direct", "on"), "direct"),
        serial=options.get("serial"),
    )


def parse_netdev(text: str) -> NetdevConfig:
    options = split_options(text, "-netdev", positional="type")
    reject_unknown(options, {"type", "id", "ifname", "fd", "fds", "vhost", "vhostfd", "queues"},
                   "-netdev")
    if options.get("type") != "tap":
        raise ConfigError("invalid -netdev: only 'tap' backends are supported")
    if not options.get("id"):
        raise ConfigError("invalid -netdev: 'id' is required")
    if parse_bool(options.get("vhost", "off"), "vhost"):
        raise ConfigError("invalid -netdev: vhost=on is not supported")
    fd_text = options.get("fd") or options.get("fds")
    fd = parse_int(fd_text.split(":")[-1], "-netdev fd") if fd_text else None
    if fd is None and not options.get("ifname"):
        raise ConfigError("invalid -netdev: give ifname=<tap> or fd=<n>")
    return NetdevConfig(id=options["id"], ifname=options.get("ifname"), fd=fd)


def parse_device(text: str, builder: _Builder) -> None:
    options = split_options(text, "-device", positional="driver")
    driver = options.pop("driver", "")
    if driver in ("virtio-blk-device", "virtio-blk-mmio"):
        reject_unknown(options, {"id", "drive", "serial", "iothread", "bootindex"}, "-device")
        drive = builder.drives.get(options.get("drive", ""))
        if drive is None:
            raise ConfigError(f"invalid -device {driver}: no -drive with id "
                              f"'{options.get('drive', '')}' (give -drive before -device)")
        if "serial" in options:
            drive = dataclasses.replace(drive, serial=options["serial"])
        if "id" in options and not options["id"]:
            raise ConfigError(f"invalid -device {driver}: empty id")
        # As in QEMU, the device is named after its drive unless it has an id.
        builder.disks.append(DiskConfig(options.get("id", drive.id), drive,
                                        options.get("iothread") or None))
    elif driver in ("virtio-net-device", "virtio-net-mmio"):
        reject_unknown(options, {"id", "netdev", "mac", "iothread"}, "-device")
        netdev = builder.netdevs.get(options.get("netdev", ""))
        if netdev is None:
            raise ConfigError(f"invalid -device {driver}: no -netdev with id "
                              f"'{options.get('netdev', '')}' (give -netdev before -device)")
        if "id" in options and not options["id"]:
            raise ConfigError(f"invalid -device {driver}: empty id")
        mac = parse_mac(options["mac"]) if "mac" in options else None
        builder.nics.append(NicConfig(options.get("id", netdev.id), netdev, mac,
                                      options.get("iothread") or None))
    elif driver == "virtio-balloon-device":
        reject_unknown(options, {"id", "deflate-on-oom", "free-page-reporting"}, "-device")
        builder.values["balloon"] = BalloonConfig(
            id=options.get("id") or "balloon0",
            deflate_on_oom=parse_bool(options.get("deflate-on-oom", "off"), "deflate-on-oom"),
            free_page_reporting=parse_bool(options.get("free-page-reporting", "off"),
                                           "free-page-reporting"),
        )
    elif driver in CONSOLE_DRIVERS:
        parse_console_device(driver, options, builder)
    elif driver in ("virtio-rng-device", "virtio-rng-mmio"):
        builder.rng_device = _parse_rng_device(driver, options, builder)
    else:
        raise ConfigError(f"unsupported -device '{driver}'")


# --- virtio-console ---

CONSOLE_DRIVERS = ("virtio-serial-device", "virtio-serial-mmio", "virtconsole", "virtserialport")


def parse_console_device(driver: str, options: dict[str, str], builder: _Builder) -> None:
    """virtio-serial-device (one), then its virtconsole (nr 0) and virtserialports (nr >= 1).
    Whether the chardev exists is checked with the whole configuration (validate)."""
    if driver in ("virtio-serial-device", "virtio-serial-mmio"):
        reject_unknown(options, {"id"}, "-device")
        if builder.virtio_serial is not None:
            raise ConfigError("only one virtio-serial device is supported")
        builder.virtio_serial = VirtioSerialConfig(id=options.get("id") or "virtio-serial0")
        return
    reject_unknown(options, {"id", "chardev", "nr", "name"}, "-device")
    if builder.virtio_serial is None:
        raise ConfigError(f"invalid -device {driver}: no virtio-serial device (give -device "
                          "virtio-serial-device before it)")
    for key in ("id", "chardev"):
        if not options.get(key):
            raise ConfigError(f"invalid -device {driver}: '{key}' is required")
    is_console = driver == "virtconsole"
    if is_console:
        nr = parse_int(options.get("nr", "0"), f"{driver} nr")
        if nr != 0:
            raise ConfigError(f"invalid -device {driver}: the console port is nr=0")
    else:
        if "nr" not in options:
            raise ConfigError(f"invalid -device {driver}: nr=<1..> is required")
        nr = parse_int(options["nr"], f"{driver} nr")
        if nr < 1:
            raise ConfigError(f"invalid -device {driver}: nr must be at least 1 (0 is the "
                              "console port)")
    taken = [port for port in builder.virtio_serial.ports if port.nr == nr]
    if taken:
        raise ConfigError(f"invalid -device {driver}: nr={nr} is already taken by "
                          f"'{taken[0].id}'")
    port = ConsolePortConfig(id=options["id"], chardev=options["chardev"], nr=nr,
                             name=options.get("name") or None, is_console=is_console)
    builder.virtio_serial = dataclasses.replace(
        builder.virtio_serial, ports=(*builder.virtio_serial.ports, port))

# --- end virtio-console ---
# --- virtio-rng ---

def _parse_rng_device(driver: str, options: dict[str, str], builder: _Builder) -> RngConfig:
    what = f"-device {driver}"
    reject_unknown(options, {"id", "rng", "max-bytes", "period"}, what)
    if builder.rng_device is not None:
        raise ConfigError(f"invalid {what}: only one virtio-rng device is supported")
    if not options.get("rng"):
        raise ConfigError(f"invalid {what}: rng=<id of an -object rng-random> is required")
    if "id" in options and not options["id"]:
        raise ConfigError(f"invalid {what}: empty id")
    max_bytes = parse_int(options["max-bytes"], "max-bytes") if "max-bytes" in options else None
    period = parse_int(options["period"], "period") if "period" in options else None
    check_rng_rate(max_bytes, period, what)
    # The filename comes from the -object, found in _finish.
    return RngConfig(id=options.get("id") or "rng0", rng=options["rng"], filename="",
                     max_bytes=max_bytes, period_ms=period)


def _add_rng_object(options: dict[str, str], builder: _Builder) -> None:
    reject_unknown(options, {"type", "id", "filename"}, "-object rng-random")
    if not options.get("id"):
        raise ConfigError("invalid -object rng-random: 'id' is required")
    if not options.get("filename"):
        raise ConfigError("invalid -object rng-random: filename=<path> is required")
    if options["id"] in builder.rng_objects:
        raise ConfigError(f"-object rng-random id '{options['id']}' is used twice")
    builder.rng_objects[options["id"]] = options["filename"]


def _resolve_rng(builder: _Builder) -> RngConfig | None:
    device = builder.rng_device
    if device is None:
        return None
    filename = builder.rng_objects.get(device.rng)
    if filename is None:
        raise ConfigError(f"invalid -device virtio-rng-device: rng='{device.rng}' names no "
                          "-object rng-random")
    return dataclasses.replace(device, filename=filename)

# --- end virtio-rng ---


def _set(key: str, convert: Callable[[str], object] = str) -> Callable[[str, _Builder], None]:
    def apply(value: str, builder: _Builder) -> None:
        builder.values[key] = convert(value)
    return apply


def _add_drive(value: str, builder: _Builder) -> None:
    drive = parse_drive(value)
    if drive.id in builder.drives:
        raise ConfigError(f"-drive id '{drive.id}' is used twice")
    builder.drives[drive.id] = drive


def _add_netdev(value: str, builder: _Builder) -> None:
    netdev = parse_netdev(value)
    if netdev.id in builder.netdevs:
        raise ConfigError(f"-netdev id '{netdev.id}' is used twice")
    builder.netdevs[netdev.id] = netdev


def _add_object(value: str, builder: _Builder) -> None:
    """-object iothread,id=ID gives devices that name it a thread of their own, and
    -object rng-random,id=ID,filename=P a virtio-rng its source; other objects
    (libvirt's secrets, memory backends) change nothing here and are ignored."""
    options = split_options(value, "-object", positional="type")
    if options.get("type") == "rng-random":
        _add_rng_object(options, builder)
        return
    if options.get("type") != "iothread":
        return
    reject_unknown(options, {"type", "id", "poll-max-ns", "poll-grow", "poll-shrink"},
                   "-object iothread")
    if not options.get("id"):
        raise ConfigError("invalid -object iothread: 'id' is required")
    builder.iothreads.append(options["id"])


def _add_qmp(option: str) -> Callable[[str, _Builder], None]:
    def apply(value: str, builder: _Builder) -> None:
        builder.qmp_sockets.append(parse_qmp_socket(value, option))
    return apply


def _add_chardev(value: str, builder: _Builder) -> None:
    builder.chardevs.append(parse_chardev(value))


def _set_config_file(value: str, builder: _Builder) -> None:
    builder.config_file = value


OPTIONS_WITH_VALUE: dict[str, Callable[[str, _Builder], None]] = {
    "-name": _set("name"),
    "-machine": parse_machine,
    "-M": parse_machine,
    "-smp": _set("topology", parse_smp),
    "-m": _set("memory_size", parse_memory),
    "-kernel": _set("kernel"),
    "-append": _set("cmdline"),
    "-initrd": _set("initrd"),
    "-serial": _set("serial", parse_serial),
    "-chardev": _add_chardev,
    "-qmp": _add_qmp("-qmp"),
    "-api-channel": _add_qmp("-api-channel"),
    "-drive": _add_drive,
    "-netdev": _add_netdev,
    "-object": _add_object,
    "-device": parse_device,
    "-pidfile": _set("pidfile"),
    "-config": _set_config_file,
}
FLAGS = {"-daemonize": "daemonize", "-S": "freeze", "-freeze": "freeze"}
OFF_FLAGS = {"-disable-seccomp": "seccomp"}


def parse_args(argv: Sequence[str]) -> MachineConfig:
    """Parses the command line (after argv[0]) into a validated MachineConfig."""
    builder = _Builder()
    args = list(argv)
    i = 0
    while i < len(args):
        option = args[i]
        # StratoVirt and QEMU accept --option as well as -option.
        if option.startswith("--"):
            option = option[1:]
        i += 1
        if option in FLAGS:
            builder.values[FLAGS[option]] = True
        elif option in OFF_FLAGS:
            builder.values[OFF_FLAGS[option]] = False
        elif option == "-D":
            # The log file is optional: -D alone logs to stderr.
            if i < len(args) and not args[i].startswith("-"):
                builder.values["log_file"] = args[i]
                i += 1
            else:
                builder.values["log_to_stderr"] = True
        elif option in OPTIONS_WITH_VALUE or option in IGNORED_WITH_VALUE:
            if i >= len(args):
                raise ConfigError(f"option {option} needs a value")
            value = args[i]
            i += 1
            if option in OPTIONS_WITH_VALUE:
                OPTIONS_WITH_VALUE[option](value, builder)
        elif option in IGNORED_FLAGS:
            pass
        else:
            raise ConfigError(f"unknown option '{args[i - 1]}' (see -help)")
    return _finish(builder)


def _finish(builder: _Builder) -> MachineConfig:
    from stratovirt_py.json_config import load_json_config

    base = load_json_config(builder.config_file) if builder.config_file else MachineConfig()
    overrides = dict(builder.values)
    if builder.disks:
        overrides["disks"] = tuple(builder.disks)
    if builder.nics:
        overrides["nics"] = tuple(builder.nics)
    if builder.qmp_sockets:
        overrides["qmp_sockets"] = tuple(builder.qmp_sockets)
    if builder.iothreads:
        overrides["iothreads"] = tuple(builder.iothreads)
    if builder.chardevs:
        # A JSON console's chardev stays unless the command line names its id again.
        given = {chardev.id for chardev in builder.chardevs}
        overrides["chardevs"] = (*(c for c in base.chardevs if c.id not in given),
                                 *builder.chardevs)
    if builder.virtio_serial is not None:
        overrides["virtio_serial"] = builder.virtio_serial
        overrides["chardevs"] = tuple(builder.chardevs)
    rng = _resolve_rng(builder)
    if rng is not None:
        overrides["rng"] = rng
    return dataclasses.replace(base, **overrides).validate()  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-help", "--help", "-h") for a in args):
        sys.stdout.write(USAGE)
        return 0
    if any(a in ("-version", "--version", "-V") for a in args):
        sys.stdout.write(f"stratovirt-py {__version__}\n")
        return 0
    try:
        config = parse_args(args)
        from stratovirt_py.launcher import launch

        return launch(config)
    except MonitorError as exc:
        sys.stderr.write(error_line(exc))
        return 1
    except KeyboardInterrupt:
        return 1
