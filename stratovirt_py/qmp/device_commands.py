"""QMP hot-plug: blockdev-add/-del, device_add and device_del, as the spec shows them.

Both the spec's (StratoVirt) argument shapes and QEMU's are accepted:
`{"node-name", "file": {"driver": "file", "filename"}, "cache": {"direct"},
"read-only"}`, with or without a top-level `"driver": "raw"`, and QEMU's flat
`{"driver": "file", "node-name", "filename"}`.  `device_add` checks its
arguments against the schema of the driver it names, then asks the machine
for the device; the handlers never touch slots or backends themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratovirt_py.config import MAX_DISKS, DriveConfig
from stratovirt_py.errors import shorten
from stratovirt_py.hotplug import DeviceRequest, DiskRequest, HotplugError
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


@dataclass(frozen=True)
class DeviceDriver:
    """A device_add driver: its own arguments, and the request they make."""

    schema: Schema
    request: Callable[[dict[str, Any]], DeviceRequest]


BLOCK_DRIVER = DeviceDriver({"id": Arg("str"), "drive": opt("str"), "addr": opt("any"),
                             "lun": opt("int"), "serial": opt("str")}, _disk_request)
DRIVERS = {"virtio-blk-mmio": BLOCK_DRIVER, "virtio-blk-device": BLOCK_DRIVER}


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


@command("device_del", {"id": Arg("str")})
async def device_del(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    # The machine empties the slot off the event loop and emits DEVICE_DELETED
    # before this returns: the removal is complete before the return.
    try:
        await machine.device_del(args["id"])
    except HotplugError as exc:
        raise QmpError(exc.desc, exc.error_class) from None
