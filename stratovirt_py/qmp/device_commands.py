"""QMP hot-plug: blockdev-add/-del, netdev_add/-del, device_add and device_del, as the spec
shows them.

Both the spec's (StratoVirt) argument shapes and QEMU's are accepted:
`{"node-name", "file": {"driver": "file", "filename"}, "cache": {"direct"},
"read-only"}`, with or without a top-level `"driver": "raw"`, and QEMU's flat
`{"driver": "file", "node-name", "filename"}`.  `device_add` checks its
arguments against the schema of the driver it names, then asks the machine
for the device; the handlers never touch slots or backends themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratovirt_py.config import MAX_DISKS, DriveConfig, NetdevConfig
from stratovirt_py.errors import shorten
from stratovirt_py.hotplug import DeviceRequest, DiskRequest, HotplugError, NicRequest
from stratovirt_py.qmp.protocol import QmpError
from stratovirt_py.qmp.registry import CommandContext, ManagedMachine, command
from stratovirt_py.qmp.schema import Arg, Schema, check_arguments, opt

AIO_MODES = ("native", "io_uring", "threads", "off")
# device_add properties that QEMU, StratoVirt, libvirt or Kata send and that
# change nothing on a microvm slot.
IGNORED_DEVICE_PROPERTIES = {"bus", "iothread", "bootindex", "boot_index", "num-queues",
                             "queue-size", "chardev", "multifunction"}

BLOCKDEV_SCHEMA = {
    "node-name": Arg("str"),
    "driver": opt("str", choices=("raw", "file")),
    "file": opt({
        "driver": Arg("str", choices=("file",)),
        "filename": Arg("str"),
        "aio": opt("str", choices=AIO_MODES),
        "locking": opt("str"),
    }),
    "filename": opt("str"),
    "aio": opt("str", choices=AIO_MODES),
    "cache": opt({"direct": opt("bool"), "no-flush": opt("bool")}),
    "read-only": opt("bool"),
    "auto-read-only": opt("bool"),
    "discard": opt("str", choices=("ignore", "unmap")),
    "detect-zeroes": opt("str", choices=("off", "on", "unmap")),
    "media": opt("str"),
    "id": opt("str"),
    "options": opt("object"),
    "throttling.iops-total": opt("int"),
}


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except HotplugError as exc:
        raise QmpError(exc.desc, exc.error_class) from None


@command("blockdev-add", BLOCKDEV_SCHEMA)
def blockdev_add(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    file = args.get("file")
    if file is not None:
        filename = file["filename"]
    elif args.get("driver") == "file" and "filename" in args:
        filename = args["filename"]
    else:
        raise QmpError("Parameter 'file.filename' is missing")
    drive = DriveConfig(
        id=args["node-name"], path=filename,
        read_only=args.get("read-only", False),
        # StratoVirt's default: O_DIRECT unless the client asks otherwise.
        direct=args.get("cache", {}).get("direct", True),
    )
    _run(lambda: machine.blockdev_add(drive))


@command("blockdev-del", {"node-name": Arg("str")})
def blockdev_del(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    _run(lambda: machine.blockdev_del(args["node-name"]))


def _slot_from(args: dict[str, Any], device_id: str) -> int | None:
    if "addr" in args:
        addr = args["addr"]
        if isinstance(addr, int) and not isinstance(addr, bool):
            return addr
        if not isinstance(addr, str):
            raise QmpError("Invalid parameter type for 'addr', expected: string")
        # Short: a slot number never needs more, and int() of a huge string is slow.
        try:
            if len(addr) <= 16:
                return int(addr, 0)
        except ValueError:
            pass
        raise QmpError(f"Invalid addr '{shorten(addr)}' for device '{device_id}'")
    if "lun" in args:
        lun = args["lun"]
        if not isinstance(lun, int) or isinstance(lun, bool):
            raise QmpError("Invalid parameter type for 'lun', expected: integer")
        # The spec: lun 0 is vdb, and so on to the last slot; vda has no lun.
        if not 0 <= lun <= MAX_DISKS - 2:
            raise QmpError(f"Invalid lun {lun}: luns 0 (vdb) to {MAX_DISKS - 2} "
                           f"(vd{chr(ord('a') + MAX_DISKS - 1)}) are the disk slots after vda")
        return lun + 1
    return None


def _disk_request(args: dict[str, Any]) -> DeviceRequest:
    device_id = args["id"]
    return DiskRequest(device_id, args.get("drive", device_id), _slot_from(args, device_id),
                       args.get("serial"))


def _nic_request(args: dict[str, Any]) -> DeviceRequest:
    device_id = args["id"]
    # The spec: the device's id is its netdev's, unless `netdev` names another.
    return NicRequest(device_id, args.get("netdev", device_id), _slot_from(args, device_id),
                      args.get("mac"))


@dataclass(frozen=True)
class DeviceDriver:
    """A device_add driver: its own arguments, and the request they make."""

    schema: Schema
    request: Callable[[dict[str, Any]], DeviceRequest]


BLOCK_DRIVER = DeviceDriver({"id": Arg("str"), "drive": opt("str"), "addr": opt("any"),
                             "lun": opt("int"), "serial": opt("str")}, _disk_request)
NET_DRIVER = DeviceDriver({"id": Arg("str"), "netdev": opt("str"), "addr": opt("any"),
                           "mac": opt("str")}, _nic_request)
DRIVERS = {"virtio-blk-mmio": BLOCK_DRIVER, "virtio-blk-device": BLOCK_DRIVER,
           "virtio-net-mmio": NET_DRIVER, "virtio-net-device": NET_DRIVER}


@command("device_add", {"driver": Arg("str")} | {
    name: opt("any") for driver in DRIVERS.values() for name in driver.schema}
    | {name: opt("any") for name in IGNORED_DEVICE_PROPERTIES})
def device_add(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    name = args["driver"]
    driver = DRIVERS.get(name)
    if driver is None:
        raise QmpError(f"'{name}' is not a valid device model name")
    properties = {key: value for key, value in args.items()
                  if key != "driver" and key not in IGNORED_DEVICE_PROPERTIES}
    unknown = sorted(set(properties) - set(driver.schema))
    if unknown:
        raise QmpError(f"Property '{name}.{unknown[0]}' not found")
    check_arguments(properties, driver.schema)
    if not properties["id"]:
        raise QmpError("Parameter 'id' is missing")
    request = driver.request(properties)
    _run(lambda: machine.device_add(request))


# netdev_add arguments that StratoVirt, libvirt or Kata send and that change nothing here.
IGNORED_NETDEV_ARGUMENTS = ("queues", "script", "downscript", "dnssearch", "chardev", "macnat",
                            "vhostfd", "vhostfds", "sndbuf", "vnet_hdr")


NETDEV_SCHEMA = {"id": Arg("str"), "type": opt("str", choices=("tap",)), "ifname": opt("str"),
                 "fd": opt("str"), "fds": opt("str"), "vhost": opt("any")} | {
    name: opt("any") for name in IGNORED_NETDEV_ARGUMENTS}


@command("netdev_add", NETDEV_SCHEMA)
def netdev_add(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    if args.get("vhost") in (True, "on", "true"):
        raise QmpError("vhost is not supported: netdevs are served by the monitor (vhost=off)")
    descriptor = args.get("fds", args.get("fd"))
    if descriptor is None and not args.get("ifname"):
        raise QmpError("Parameter 'ifname' is missing (or give fd/fds)")
    fd = _take_fd(context, descriptor) if descriptor is not None else None
    # The netdev owns `fd` now, and closes it should it refuse it.
    _run(lambda: machine.netdev_add(NetdevConfig(args["id"], args.get("ifname"), fd)))


def _take_fd(context: CommandContext, descriptor: str) -> int:
    """An fd for a netdev: a `getfd` name (handed over), or a number (an inherited fd,
    duplicated: the original stays the process's); "a:b" means the last, as in StratoVirt."""
    name = descriptor.split(":")[-1]
    fd = context.named_fds.pop(name, None)
    if fd is not None:
        return fd
    if name.isdigit() and len(name) <= 9:
        try:
            return os.dup(int(name))
        except OSError as exc:
            raise QmpError(f"File descriptor {name}: {exc.strerror}") from None
    raise QmpError(f"File descriptor named '{shorten(name)}' not found")


@command("netdev_del", {"id": Arg("str")})
def netdev_del(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    _run(lambda: machine.netdev_del(args["id"]))


@command("device_del", {"id": Arg("str")})
async def device_del(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    # The machine empties the slot off the event loop and emits DEVICE_DELETED
    # before this returns: the removal is complete before the return.
    try:
        await machine.device_del(args["id"])
    except HotplugError as exc:
        raise QmpError(exc.desc, exc.error_class) from None
