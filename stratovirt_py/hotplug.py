"""Hot-plug: backends in, devices into slots and out again, as the spec shows.

`blockdev-add` registers a block node and `netdev_add` a netdev (backends.py),
`device_add` puts a device using one into a slot of its kind (slots.py),
`device_del` empties the slot, `blockdev-del` / `netdev_del` forget an unused
backend.  As in StratoVirt, a disk's node goes away with its device; a netdev
stays, as in QEMU, until `netdev_del`.  Filling or emptying a slot is a config
change the guest hears about at once.

The same operations put the command line's devices in their slots at boot.
Emptying a slot waits for the guest's requests in flight and syncs the disk:
`detach` does that on a worker thread while the slot stays reserved, so the
event loop keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

from stratovirt_py.backends import BackendRegistry
from stratovirt_py.config import DriveConfig, NetdevConfig, parse_mac
from stratovirt_py.devices.virtio.block import BackendError, DiskBackend, open_image
from stratovirt_py.errors import ConfigError
from stratovirt_py.event_loop import running_loop
from stratovirt_py.slots import DISK, NIC, HotplugError, Slot, SlotKind, SlotTable
from stratovirt_py.tap import Tap, TapError

log = logging.getLogger(__name__)

__all__ = ["DeviceRequest", "DiskRequest", "Hotplug", "HotplugError", "NicRequest"]


@dataclass(frozen=True)
class DiskRequest:
    """device_add of a virtio-blk device: `index` is QMP's addr (None: the first free slot)."""

    device_id: str
    node_name: str
    index: int | None = None
    serial: str | None = None


@dataclass(frozen=True)
class NicRequest:
    """device_add of a virtio-net device: `index` is QMP's addr (None: the first free slot)."""

    device_id: str
    netdev_id: str
    index: int | None = None
    mac: str | None = None


DeviceRequest = DiskRequest | NicRequest


class Hotplug:
    def __init__(self, slots: SlotTable, backends: BackendRegistry) -> None:
        self.slots = slots
        self.backends = backends

    # Block nodes.

    def blockdev_add(self, drive: DriveConfig) -> None:
        """Checks the image now, so that errors come with the command."""
        BackendRegistry.check_name(drive.id, "node-name")
        if drive.id in self.backends.nodes or self.slots.using(DISK, drive.id) is not None:
            raise HotplugError(f"Duplicate node name '{drive.id}'")
        disks = len(self.slots.of_kind(DISK))
        attached = self.slots.occupied(DISK)
        if len(self.backends.nodes) + attached >= disks:
            raise HotplugError(f"A maximum of {disks} {DISK.name}s are supported "
                               f"({attached} attached, {len(self.backends.nodes)} waiting)")
        try:
            os.close(open_image(drive.path, os.O_RDONLY if drive.read_only else os.O_RDWR))
        except BackendError as exc:
            raise HotplugError(str(exc.strerror)) from None
        self._refuse_image_in_use(drive.path)
        self.backends.nodes[drive.id] = drive

    def blockdev_del(self, node_name: str) -> None:
        if self.backends.nodes.pop(node_name, None) is not None:
            return
        slot = self.slots.using(DISK, node_name)
        if slot is not None:
            raise HotplugError(f"Node {node_name} is in use by device '{slot.device_id}'")
        raise HotplugError(f"Failed to find node with node-name='{node_name}'")

    def _refuse_image_in_use(self, path: str) -> None:
        try:
            info = os.stat(path)
        except OSError:
            return
        for slot in self.slots.of_kind(DISK):
            backend = slot.device.backend
            if backend is not None and backend.identity == (info.st_dev, info.st_ino):
                raise HotplugError(f"'{path}' is already in use by disk '{slot.device_id}' "
                                   f"({slot.guest_name})")

    # Netdevs.

    def netdev_add(self, netdev: NetdevConfig) -> None:
        """Opens the tap now (creating it if it does not exist), as QEMU and StratoVirt do.

        A netdev given by fd owns that fd from here on, refused or not.
        """
        try:
            BackendRegistry.check_name(netdev.id, "netdev id")
            if netdev.id in self.backends.netdevs:
                raise HotplugError(f"{netdev.id} is already registered.")
            try:
                tap = Tap.from_fd(netdev.fd) if netdev.fd is not None else \
                    Tap.open(netdev.ifname or "")
            except TapError as exc:
                raise HotplugError(str(exc)) from None
        except HotplugError:
            if netdev.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(netdev.fd)
            raise
        self.backends.netdevs[netdev.id] = tap
        log.info("netdev '%s' is tap '%s'", netdev.id, tap.ifname)

    def netdev_del(self, netdev_id: str) -> None:
        slot = self.slots.using(NIC, netdev_id)
        if slot is not None:
            raise HotplugError(f"Netdev {netdev_id} is in use by device '{slot.device_id}'")
        tap = self.backends.netdevs.pop(netdev_id, None)
        if tap is None:
            raise HotplugError(f"Failed to find netdev with id '{netdev_id}'", "DeviceNotFound")
        tap.close()

    # Devices.

    def device_add(self, request: DeviceRequest) -> Slot:
        if isinstance(request, NicRequest):
            return self.add_nic(request.device_id, request.netdev_id, request.index, request.mac)
        return self.add_disk(request.device_id, request.node_name, request.index,
                             request.serial)

    def add_nic(self, device_id: str, netdev_id: str, index: int | None = None,
                mac: str | None = None, boot: bool = False) -> Slot:
        """device_add of a virtio-net device (or a -device at boot): the link comes up."""
        slot = self.slots.choose(NIC, device_id, index)
        tap = self.backends.netdevs.get(netdev_id)
        if tap is None:
            raise HotplugError(f"Failed to find netdev '{netdev_id}': use netdev_add first",
                               "DeviceNotFound")
        user = self.slots.using(NIC, netdev_id)
        if user is not None:
            raise HotplugError(f"Netdev {netdev_id} is in use by device '{user.device_id}'")
        if mac is not None:
            self._set_mac(slot, mac)
        try:
            slot.device.set_backend(tap)
        except OSError as exc:
            raise HotplugError(f"Cannot attach tap '{tap.ifname}': {exc.strerror}") from None
        self._occupy(slot, device_id, netdev_id, boot)
        log.info("NIC '%s' (tap '%s', MAC %s) is now %s", device_id, tap.ifname,
                 slot.device.mac_text, slot.guest_name)
        return slot

    def _set_mac(self, slot: Slot, text: str) -> None:
        try:
            mac = parse_mac(text)
        except ConfigError as exc:
            raise HotplugError(str(exc)) from None
        for other in self.slots.of_kind(NIC):
            if other is not slot and other.device.mac_text == mac:
                raise HotplugError(f"MAC {mac} is already {other.guest_name}'s")
        current = slot.device.mac_text
        if mac == current:
            return
        if slot.device.config_read:
            # virtio-net has no way to tell a driver that its MAC changed.
            raise HotplugError(f"The guest read {slot.guest_name}'s MAC ({current}) when it "
                               f"probed the NIC and would not see {mac}: leave mac out, or "
                               f"give {current}")
        slot.device.set_mac(mac)

    def add_disk(self, device_id: str, node_name: str, index: int | None = None,
                 serial: str | None = None, boot: bool = False) -> Slot:
        """device_add of a virtio-blk device (or a -device at boot)."""
        slot = self.slots.choose(DISK, device_id, index)
        drive = self.backends.nodes.get(node_name)
        if drive is None:
            raise HotplugError(f"Failed to find block node '{node_name}': use blockdev-add "
                               "first", "DeviceNotFound")
        self._refuse_image_in_use(drive.path)
        if serial is not None:
            drive = dataclasses.replace(drive, serial=serial)
        try:
            backend = DiskBackend.open(drive)
        except BackendError as exc:
            raise HotplugError(str(exc.strerror)) from None
        slot.device.set_backend(backend)
        self._occupy(slot, device_id, node_name, boot)
        del self.backends.nodes[node_name]
        log.info("disk '%s' (%s, %d sectors%s) is now %s", device_id, drive.path,
                 backend.sectors, ", read-only" if drive.read_only else "", slot.guest_name)
        return slot

    @staticmethod
    def _occupy(slot: Slot, device_id: str, backend_id: str, boot: bool) -> None:
        slot.device_id = device_id
        slot.backend_id = backend_id
        if not boot:
            slot.notify_config_change()

    async def detach(self, device_id: str) -> SlotKind:
        """device_del: empties the device's slot without blocking the event loop."""
        slot = self.slots.begin_release(device_id)
        emptied = running_loop().run_in_executor(self.empty, slot)
        try:
            # Cancelled (the monitor exits): the worker still finishes its work.
            await emptied
        finally:
            if emptied.done():
                self._finish_detach(slot)
            else:
                emptied.add_done_callback(lambda _: self._finish_detach(slot))
        return slot.kind

    @staticmethod
    def empty(slot: Slot) -> None:
        """The blocking part of device_del (any thread): requests in flight end and the
        guest is told.  A disk's image is synced and closed; a tap stays with its netdev."""
        previous = slot.device.set_backend(None)
        slot.notify_config_change()
        if previous is not None and slot.kind is DISK:
            previous.close()

    def _finish_detach(self, slot: Slot) -> None:
        log.info("%s '%s' removed from %s", slot.kind.name, slot.device_id, slot.guest_name)
        self.slots.release(slot)

    def close(self) -> None:
        """At exit, after the I/O thread has stopped: backends are released (disks synced)."""
        for slot in self.slots.of_kind(DISK):
            backend = slot.device.set_backend(None)
            if backend is not None:
                backend.close()
        for tap in self.backends.netdevs.values():
            tap.close()
        self.backends.netdevs.clear()
