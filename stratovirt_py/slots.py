"""Hot-pluggable device slots, by kind: StratoVirt's replaceable devices.

Every slot exists from boot with its device (an empty disk slot is a disk of
capacity 0, an empty NIC slot a NIC with its link down), so the guest names
them in a fixed order.  A slot is numbered within its kind: that number is
QMP's `addr` (0x0 is vda for disks, eth0 for NICs).  Device ids are unique
across every kind.  This table knows places and names only; what filling a
slot means for a device is the hot-plug layer's business (hotplug.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class HotplugError(Exception):
    """A refused hot-plug operation; `error_class` is the QMP error class to report."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class SlotKind:
    name: str  # for messages: "virtio-blk disk"
    guest_name: Callable[[int], str]


DISK = SlotKind("virtio-blk disk", lambda index: "vd" + chr(ord("a") + index))
NIC = SlotKind("virtio-net NIC", lambda index: f"eth{index}")


@dataclass
class Slot:
    kind: SlotKind
    index: int
    device: Any  # the kind's device: VirtioBlock, VirtioNet
    notify_config_change: Callable[[], None]
    device_id: str | None = None
    backend_id: str | None = None  # the block node or netdev it uses
    detaching: bool = False  # device_del under way: still reserved

    @property
    def guest_name(self) -> str:
        return self.kind.guest_name(self.index)


class SlotTable:
    def __init__(self) -> None:
        self._slots: dict[SlotKind, list[Slot]] = {}

    def add(self, slot: Slot) -> None:
        slots = self._slots.setdefault(slot.kind, [])
        assert slot.index == len(slots)
        slots.append(slot)

    def of_kind(self, kind: SlotKind) -> list[Slot]:
        return self._slots.get(kind, [])

    def __iter__(self) -> Iterator[Slot]:
        for slots in self._slots.values():
            yield from slots

    def find(self, device_id: str) -> Slot | None:
        """The slot of device `device_id`, of any kind."""
        return next((slot for slot in self if slot.device_id == device_id), None)

    def using(self, kind: SlotKind, backend_id: str) -> Slot | None:
        """The slot whose device uses backend `backend_id` of this kind's backends."""
        return next((slot for slot in self.of_kind(kind) if slot.backend_id == backend_id),
                    None)

    def occupied(self, kind: SlotKind) -> int:
        return sum(1 for slot in self.of_kind(kind) if slot.device_id is not None)

    def choose(self, kind: SlotKind, device_id: str, index: int | None) -> Slot:
        """The slot a new device goes to: `index`, or the first free one."""
        if self.find(device_id) is not None:
            raise HotplugError(f"Duplicate device ID '{device_id}'")
        slots = self.of_kind(kind)
        if index is None:
            free = [slot for slot in slots if slot.device_id is None]
            if not free:
                raise HotplugError(f"A maximum of {len(slots)} {kind.name}s are supported")
            return free[0]
        if not 0 <= index < len(slots):
            raise HotplugError(f"Invalid addr {index:#x}: the {kind.name} slots are 0x0 "
                               f"({slots[0].guest_name}) to {len(slots) - 1:#x} "
                               f"({slots[-1].guest_name})")
        slot = slots[index]
        if slot.device_id is not None:
            raise HotplugError(f"The slot {index:#x} ({slot.guest_name}) is occupied by "
                               f"'{slot.device_id}'")
        return slot

    def begin_release(self, device_id: str) -> Slot:
        """device_del, first step: the slot stays reserved (id and place) until released."""
        slot = self.find(device_id)
        if slot is None:
            raise HotplugError(f"Device '{device_id}' not found", "DeviceNotFound")
        if slot.detaching:
            raise HotplugError(f"Device {device_id} is already in the process of unplug")
        slot.detaching = True
        return slot

    @staticmethod
    def release(slot: Slot) -> None:
        slot.device_id = slot.backend_id = None
        slot.detaching = False
