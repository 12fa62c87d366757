"""The six virtio-blk slots (vda..vdf) and the block nodes that fill them.

Slots exist from boot; an empty slot is a disk of capacity 0.  Filling or
emptying one is a config change the guest hears about at once.  This is the
spec's hot-plug: `blockdev-add` registers a node, `device_add` puts it in a
slot, `device_del` empties the slot, `blockdev-del` forgets an unused node.
Node names are unique among registered nodes and the nodes devices use;
device ids are unique among devices.

Emptying a slot waits for the guest's requests in flight and syncs the image:
`detach` does that on a worker thread, between `begin_detach` and
`finish_detach` on the event loop, while the slot stays reserved.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from stratovirt_py.config import MAX_DISKS, DriveConfig
from stratovirt_py.devices.virtio.block import (
    BackendError,
    DiskBackend,
    VirtioBlock,
    open_image,
)

log = logging.getLogger(__name__)


class DiskError(Exception):
    """A refused block operation; `error_class` is the QMP error class to report."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class Slot:
    index: int
    device: VirtioBlock
    notify_config_change: Callable[[], None]
    device_id: str | None = None
    node_name: str | None = None
    detaching: bool = False

    @property
    def guest_name(self) -> str:
        return "vd" + chr(ord("a") + self.index)


class DiskSlots:
    def __init__(self, slots: list[Slot]) -> None:
        assert len(slots) == MAX_DISKS
        self.slots = slots
        self.nodes: dict[str, DriveConfig] = {}

    def _identity(self, path: str) -> tuple[int, int] | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _slot_using(self, identity: tuple[int, int] | None) -> Slot | None:
        for slot in self.slots:
            backend = slot.device.backend
            if identity is not None and backend is not None and backend.identity == identity:
                return slot
        return None

    def add_node(self, drive: DriveConfig) -> None:
        """blockdev-add: checks the image now, so errors come with the command."""
        if drive.id in self.nodes or self.find_device(drive.id, by_node=True) is not None:
            raise DiskError(f"Duplicate node name '{drive.id}'")
        if not drive.id or not (drive.id[0].isalpha()) or len(drive.id) > 31 or not all(
                c.isalnum() or c in "-._" for c in drive.id):
            raise DiskError(f"Invalid node-name: '{drive.id}'")
        if len(self.nodes) + self.occupied() >= MAX_DISKS:
            raise DiskError(f"A maximum of {MAX_DISKS} virtio-blk disks are supported "
                            f"({self.occupied()} attached, {len(self.nodes)} waiting)")
        try:
            os.close(open_image(drive.path, os.O_RDONLY if drive.read_only else os.O_RDWR))
        except BackendError as exc:
            raise DiskError(str(exc.strerror)) from None
        user = self._slot_using(self._identity(drive.path))
        if user is not None:
            raise DiskError(f"'{drive.path}' is already in use by disk '{user.device_id}' "
                            f"({user.guest_name})")
        self.nodes[drive.id] = drive

    def remove_node(self, node_name: str) -> None:
        """blockdev-del."""
        if node_name in self.nodes:
            del self.nodes[node_name]
            return
        slot = self.find_device(node_name, by_node=True)
        if slot is not None:
            raise DiskError(f"Node {node_name} is in use by device '{slot.device_id}'")
        raise DiskError(f"Failed to find node with node-name='{node_name}'")

    def occupied(self) -> int:
        return sum(1 for s in self.slots if s.device_id is not None)

    def find_device(self, name: str, by_node: bool = False) -> Slot | None:
        for slot in self.slots:
            if (slot.node_name if by_node else slot.device_id) == name:
                return slot
        return None

    def attach(self, slot_index: int | None, device_id: str, node_name: str,
               serial: str | None = None, boot: bool = False) -> Slot:
        """device_add (or a -drive at boot): fills a slot with a registered node."""
        if self.find_device(device_id) is not None:
            raise DiskError(f"Duplicate device ID '{device_id}'")
        drive = self.nodes.get(node_name)
        if drive is None:
            raise DiskError(f"Failed to find block node '{node_name}': use blockdev-add first",
                            "DeviceNotFound")
        if slot_index is None:
            free = [s for s in self.slots if s.device_id is None]
            if not free:
                raise DiskError(f"A maximum of {MAX_DISKS} virtio-blk disks are supported")
            slot = free[0]
        else:
            if not 0 <= slot_index < MAX_DISKS:
                last = self.slots[-1]
                raise DiskError(f"Invalid addr {slot_index:#x}: the disk slots are 0x0 (vda) "
                                f"to {last.index:#x} ({last.guest_name})")
            slot = self.slots[slot_index]
            if slot.device_id is not None:
                raise DiskError(f"The slot {slot_index:#x} ({slot.guest_name}) is occupied by "
                                f"'{slot.device_id}'")
        user = self._slot_using(self._identity(drive.path))
        if user is not None:
            raise DiskError(f"'{drive.path}' is already in use by disk '{user.device_id}' "
                            f"({user.guest_name})")
        if serial is not None:
            drive = dataclasses.replace(drive, serial=serial)
        try:
            backend = DiskBackend.open(drive)
        except BackendError as exc:
            raise DiskError(str(exc.strerror)) from None
        slot.device.set_backend(backend)
        slot.device_id = device_id
        slot.node_name = node_name
        del self.nodes[node_name]
        if not boot:
            slot.notify_config_change()
        log.info("disk '%s' (%s, %d sectors%s) is now %s", device_id, drive.path,
                 backend.sectors, ", read-only" if drive.read_only else "", slot.guest_name)
        return slot

    async def detach(self, device_id: str) -> None:
        """device_del: empties the slot without blocking the event loop."""
        slot = self.begin_detach(device_id)
        emptied = asyncio.get_running_loop().run_in_executor(None, self.empty, slot)
        try:
            # Cancelled (the monitor exits): the worker still finishes its work.
            await asyncio.shield(emptied)
        finally:
            if emptied.done():
                self.finish_detach(slot)
            else:
                emptied.add_done_callback(lambda _: self.finish_detach(slot))

    def begin_detach(self, device_id: str) -> Slot:
        """device_del, first step: the slot stays reserved (id and place) until finished."""
        slot = self.find_device(device_id)
        if slot is None:
            raise DiskError(f"Device '{device_id}' not found", "DeviceNotFound")
        if slot.detaching:
            raise DiskError(f"Device {device_id} is already in the process of unplug")
        slot.detaching = True
        return slot

    @staticmethod
    def empty(slot: Slot) -> None:
        """device_del, the blocking step (any thread): requests in flight end, the guest
        is told, and the image is synced and closed."""
        previous = slot.device.set_backend(None)
        slot.notify_config_change()
        if previous is not None:
            previous.close()

    def finish_detach(self, slot: Slot) -> None:
        """device_del, last step: the slot is free; the node went away with the device."""
        log.info("disk '%s' removed from %s", slot.device_id, slot.guest_name)
        slot.device_id = slot.node_name = None
        slot.detaching = False

    def close(self) -> None:
        """At exit, after the I/O thread has stopped: images are synced and closed."""
        for slot in self.slots:
            backend = slot.device.set_backend(None)
            if backend is not None:
                backend.close()
