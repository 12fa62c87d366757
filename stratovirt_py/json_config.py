"""The legacy StratoVirt `-config FILE.json` format (v0.x/v1), read into MachineConfig.

Keys as in StratoVirt's old config guidebook: machine-config, boot-source,
drive, net, serial, balloon, console, rng.  Memory sizes here default to bytes, as they did
there.  Unknown keys are errors, so a typo never silently changes the VM.
"""

from __future__ import annotations

import json
from typing import Any

from stratovirt_py.config import (
    RNG_MAX_BYTES_PER_SEC,
    RNG_MIN_BYTES_PER_SEC,
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
    SerialConfig,
    SerialKind,
    VirtioSerialConfig,
    check_memory_size,
    parse_mac,
    parse_size,
)
from stratovirt_py.errors import ConfigError

TOP_LEVEL_KEYS = {"machine-config", "boot-source", "drive", "net", "serial", "balloon",
                  "console", "vsock", "iothread", "rng", "pflash"}
NOT_SUPPORTED_KEYS = {"vsock", "pflash"}


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int in Python; a JSON true must not pass as a count.
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"-config: '{where}' has the wrong type")
    if not isinstance(value, kind):
        raise ConfigError(f"-config: '{where}' has the wrong type")
    return value


def _section(data: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    section = _expect(data.get(key, {}), dict, key)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"-config: unknown field '{key}.{unknown[0]}'")
    return section


def _memory(value: Any) -> int:
    if isinstance(value, str):
        return check_memory_size(parse_size(value, "mem_size", default_unit=1))
    return check_memory_size(_expect(value, int, "machine-config.mem_size"))


def _items(data: dict[str, Any], key: str, allowed: set[str], required: set[str]) -> list[dict]:
    items = _expect(data.get(key, []), list, key)
    result = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        _expect(item, dict, where)
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(f"-config: unknown field '{where}.{unknown[0]}'")
        missing = sorted(required - set(item))
        if missing:
            raise ConfigError(f"-config: '{where}' lacks '{missing[0]}'")
        result.append(item)
    return result


def _nic(item: dict[str, Any]) -> NicConfig:
    """A `net` item: the legacy format names the device and its tap backend alike."""
    netdev = NetdevConfig(
        id=_expect(item["iface_id"], str, "net.iface_id"),
        ifname=_expect(item.get("host_dev_name"), (str, type(None)), "net.host_dev_name"),
        fd=_expect(item.get("tap_fd"), (int, type(None)), "net.tap_fd"),
    )
    if netdev.ifname is None and netdev.fd is None:
        raise ConfigError(f"-config: net '{netdev.id}' needs host_dev_name or tap_fd")
    mac = _expect(item.get("mac"), (str, type(None)), "net.mac")
    return NicConfig(netdev.id, netdev, parse_mac(mac, "net.mac") if mac is not None else None)


def parse_json_config(data: Any) -> MachineConfig:
    """Builds a MachineConfig (not yet validated) from the decoded JSON document."""
    _expect(data, dict, "the top level")
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"-config: unknown top-level key '{unknown[0]}'")
    unsupported = sorted(set(data) & NOT_SUPPORTED_KEYS)
    if unsupported:
        raise ConfigError(f"-config: '{unsupported[0]}' devices are not supported")

    values: dict[str, Any] = {}
    machine = _section(data, "machine-config", {"type", "vcpu_count", "max_vcpus", "mem_size",
                                                "mem_path", "dump_guest_core", "mem_share"})
    if machine.get("type", "MicroVm") not in ("MicroVm", "microvm"):
        raise ConfigError(f"-config: unsupported machine type '{machine['type']}'")
    if "vcpu_count" in machine:
        count = _expect(machine["vcpu_count"], int, "machine-config.vcpu_count")
        max_count = _expect(machine.get("max_vcpus", count), int, "machine-config.max_vcpus")
        values["topology"] = CpuTopology.build(count, max_count)
    if "mem_size" in machine:
        values["memory_size"] = _memory(machine["mem_size"])
    if "dump_guest_core" in machine:
        values["dump_guest_core"] = _expect(machine["dump_guest_core"], bool,
                                            "machine-config.dump_guest_core")
    if machine.get("mem_share", False) or machine.get("mem_path"):
        raise ConfigError("-config: mem_share and mem_path are not supported")

    boot = _section(data, "boot-source", {"kernel_image_path", "boot_args", "initrd_fs_path"})
    for json_key, field_name in (("kernel_image_path", "kernel"), ("boot_args", "cmdline"),
                                 ("initrd_fs_path", "initrd")):
        if json_key in boot:
            values[field_name] = _expect(boot[json_key], str, f"boot-source.{json_key}")

    drives = _items(data, "drive", {"drive_id", "path_on_host", "read_only", "direct",
                                    "serial_num", "iothread", "iops"},
                    {"drive_id", "path_on_host"})
    if drives:
        # The legacy format names the device and its drive alike.
        values["disks"] = tuple(
            DiskConfig(_expect(d["drive_id"], str, "drive.drive_id"), DriveConfig(
                id=d["drive_id"],
                path=_expect(d["path_on_host"], str, "drive.path_on_host"),
                read_only=_expect(d.get("read_only", False), bool, "drive.read_only"),
                direct=_expect(d.get("direct", True), bool, "drive.direct"),
                serial=_expect(d.get("serial_num"), (str, type(None)), "drive.serial_num"),
            ))
            for d in drives
        )
    nets = _items(data, "net", {"iface_id", "host_dev_name", "mac", "tap_fd", "vhost_type",
                                "vhost_fd", "iothread"}, {"iface_id"})
    if nets:
        if any("vhost_type" in n for n in nets):
            raise ConfigError("-config: vhost networking is not supported")
        values["nics"] = tuple(_nic(n) for n in nets)
    serial = _section(data, "serial", {"stdio"})
    if serial:
        stdio = _expect(serial.get("stdio", False), bool, "serial.stdio")
        values["serial"] = SerialConfig(SerialKind.STDIO if stdio else SerialKind.NONE)
    if "balloon" in data:
        balloon = _section(data, "balloon", {"deflate_on_oom", "free_page_reporting"})
        values["balloon"] = BalloonConfig(
            deflate_on_oom=_expect(balloon.get("deflate_on_oom", False), bool,
                                   "balloon.deflate_on_oom"),
            free_page_reporting=_expect(balloon.get("free_page_reporting", False), bool,
                                        "balloon.free_page_reporting"),
        )
    values.update(_console(data))
    if "rng" in data:
        values["rng"] = _rng(data)
    return MachineConfig(**values)


# --- virtio-console ---

def _console(data: dict[str, Any]) -> dict[str, Any]:
    """`console: [{"console_id": ID, "socket_path": P}]`: StratoVirt v1's virtio console,
    one port (hvc0) on a unix socket server; as -device virtio-serial-device -chardev
    socket,id=ID,path=P,server,nowait -device virtconsole,id=ID,chardev=ID."""
    consoles = _items(data, "console", {"console_id", "socket_path"},
                      {"console_id", "socket_path"})
    if not consoles:
        return {}
    if len(consoles) > 1:
        raise ConfigError("-config: only one console is supported")
    console_id = _expect(consoles[0]["console_id"], str, "console.console_id")
    path = _expect(consoles[0]["socket_path"], str, "console.socket_path")
    if not console_id or not path:
        raise ConfigError("-config: console.console_id and console.socket_path must not be "
                          "empty")
    return {"chardevs": (ChardevConfig(console_id, SerialKind.SOCKET, path),),
            "virtio_serial": VirtioSerialConfig(ports=(
                ConsolePortConfig(console_id, console_id, 0, is_console=True),))}

# --- end virtio-console ---


def _rng(data: dict[str, Any]) -> RngConfig:
    """StratoVirt v1's `rng`: {"random_file": PATH, "bytes_per_sec": N?}; the rate is
    max-bytes=N per period=1000 ms, under the command line's [64, 1e9] rule."""
    rng = _section(data, "rng", {"random_file", "bytes_per_sec"})
    if "random_file" not in rng:
        raise ConfigError("-config: 'rng.random_file' is required")
    path = _expect(rng["random_file"], str, "rng.random_file")
    if not path:
        raise ConfigError("-config: 'rng.random_file' is empty")
    rate = _expect(rng.get("bytes_per_sec"), (int, type(None)), "rng.bytes_per_sec")
    if rate is not None and not RNG_MIN_BYTES_PER_SEC <= rate <= RNG_MAX_BYTES_PER_SEC:
        raise ConfigError(f"-config: rng.bytes_per_sec={rate} is out of range "
                          f"[{RNG_MIN_BYTES_PER_SEC}, {RNG_MAX_BYTES_PER_SEC}]")
    return RngConfig(filename=path, max_bytes=rate, period_ms=None if rate is None else 1000)


def load_json_config(path: str) -> MachineConfig:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read -config file '{path}': {exc.strerror}") from None
    except ValueError as exc:  # malformed JSON, bad UTF-8, a number too long to convert
        raise ConfigError(f"-config file '{path}' is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"-config file '{path}' is nested too deeply") from None
    return parse_json_config(data)
