"""NIC hot-plug without KVM or taps: netdev_add/-del and device_add/-del of virtio-net NICs.

Taps are faked here (opening a real one creates a host interface); tests/integration/
test_virtio_net_kvm.py opens real ones, inside a network namespace.
"""

from __future__ import annotations

import os
from typing import ClassVar

import pytest

from stratovirt_py import hotplug as hotplug_module
from stratovirt_py.backends import BackendRegistry
from stratovirt_py.config import MAX_NICS, NetdevConfig
from stratovirt_py.devices.virtio.net import format_mac, mac_from_text
from stratovirt_py.event_loop import EventLoop
from stratovirt_py.hotplug import Hotplug, HotplugError, NicRequest
from stratovirt_py.qmp.registry import dispatch
from stratovirt_py.slots import NIC, Slot, SlotTable
from stratovirt_py.tap import TapError
from tests.unit.test_hotplug import qmp
from tests.unit.test_qmp import FakeContext, FakeMachine


class FakeTap:
    opened: ClassVar[set[str]] = set()

    def __init__(self, fd: int, ifname: str) -> None:
        self.fd, self.ifname, self.closed = fd, ifname, False

    @classmethod
    def open(cls, ifname: str) -> FakeTap:
        if ifname in cls.opened:
            raise TapError("Tap device already in use")
        cls.opened.add(ifname)
        return cls(-1, ifname)

    @classmethod
    def from_fd(cls, fd: int) -> FakeTap:
        if os.fstat(fd).st_size > 0:  # a file with content stands for "not a tap"
            raise TapError(f"fd {fd} is not a tap device")
        return cls(fd, f"fd{fd}")

    def close(self) -> None:
        self.closed = True
        FakeTap.opened.discard(self.ifname)
        if self.fd >= 0:
            os.close(self.fd)


class FakeNic:
    """Stands in for VirtioNet: a MAC, a tap or none, and whether the driver read the MAC."""

    def __init__(self, index: int) -> None:
        self.mac = bytes([0x52, 0x54, 0, 0x12, 0x34, index])
        self.backend: FakeTap | None = None
        self.config_read = False

    @property
    def mac_text(self) -> str:
        return format_mac(self.mac)

    def set_mac(self, text: str) -> None:
        self.mac = mac_from_text(text)

    def set_backend(self, tap: FakeTap | None) -> FakeTap | None:
        previous, self.backend = self.backend, tap
        return previous


@pytest.fixture
def hotplug(monkeypatch) -> Hotplug:
    monkeypatch.setattr(hotplug_module, "Tap", FakeTap)
    FakeTap.opened = set()
    table = SlotTable()
    notified: list[int] = []
    for index in range(MAX_NICS):
        table.add(Slot(NIC, index, FakeNic(index), lambda i=index: notified.append(i)))
    plug = Hotplug(table, BackendRegistry())
    plug.notified = notified  # type: ignore[attr-defined]
    yield plug
    plug.close()


def nic(hotplug: Hotplug, index: int) -> FakeNic:
    return hotplug.slots.of_kind(NIC)[index].device


def test_the_spec_sequence_brings_the_link_up_and_device_del_down(hotplug):
    machine = FakeMachine()
    machine.hotplug = hotplug
    assert qmp(machine, "netdev_add", id="net-0", ifname="tap0") == {"return": {}}
    assert qmp(machine, "device_add", id="net-0", driver="virtio-net-mmio",
               addr="0x0") == {"return": {}}
    assert nic(hotplug, 0).backend.ifname == "tap0"
    assert hotplug.notified == [0]  # the guest hears of it (config interrupt)
    loop = EventLoop()
    assert loop.run_until_complete(_device_del(machine, "net-0")) == {"return": {}}
    loop.close()
    assert nic(hotplug, 0).backend is None and hotplug.notified == [0, 0]
    # The tap stays with its netdev until netdev_del, as in QEMU.
    assert "tap0" in FakeTap.opened
    assert qmp(machine, "device_add", id="net-0", driver="virtio-net-device",
               addr="0x1") == {"return": {}}
    assert nic(hotplug, 1).backend.ifname == "tap0"


async def _device_del(machine: FakeMachine, device_id: str) -> dict:
    return await dispatch(machine, FakeContext(),
                          {"execute": "device_del", "arguments": {"id": device_id}})


def test_errors_are_clear_and_change_nothing(hotplug):
    machine = FakeMachine()
    machine.hotplug = hotplug
    cases = [
        ("device_add", dict(id="n0", driver="virtio-net-mmio"), "DeviceNotFound",
         "Failed to find netdev 'n0': use netdev_add first"),
        ("netdev_add", dict(id="n0"), "GenericError",
         "Parameter 'ifname' is missing (or give fd/fds)"),
        ("netdev_add", dict(id="n0", ifname="tap0", vhost=True), "GenericError",
         "vhost is not supported: netdevs are served by the monitor (vhost=off)"),
        ("netdev_add", dict(id="9x", ifname="tap0"), "GenericError", None),
        ("netdev_del", dict(id="nope"), "DeviceNotFound", "Failed to find netdev with id 'nope'"),
    ]
    for command, arguments, error_class, desc in cases:
        reply = qmp(machine, command, **arguments)
        assert reply["error"]["class"] == error_class, (command, reply)
        if desc:
            assert reply["error"]["desc"] == desc
    assert not hotplug.backends.netdevs and not FakeTap.opened

    assert qmp(machine, "netdev_add", id="a", ifname="tap0") == {"return": {}}
    assert qmp(machine, "netdev_add", id="a", ifname="tap1")["error"]["desc"] == \
        "a is already registered."
    assert qmp(machine, "netdev_add", id="b", ifname="tap0")["error"]["desc"] == \
        "Tap device already in use"
    assert qmp(machine, "device_add", id="a", driver="virtio-net-mmio", addr="0x2")[
        "error"]["desc"] == "Invalid addr 0x2: the virtio-net NIC slots are 0x0 (eth0) to " \
                            "0x1 (eth1)"
    assert qmp(machine, "device_add", id="a", driver="virtio-net-mmio", addr="0x1") == \
        {"return": {}}
    assert qmp(machine, "netdev_del", id="a")["error"]["desc"] == \
        "Netdev a is in use by device 'a'"
    assert qmp(machine, "netdev_add", id="b", ifname="tap1") == {"return": {}}
    assert qmp(machine, "device_add", id="b", driver="virtio-net-mmio", addr="0x1")[
        "error"]["desc"] == "The slot 0x1 (eth1) is occupied by 'a'"
    assert qmp(machine, "device_add", id="c", netdev="a", driver="virtio-net-mmio")[
        "error"]["desc"] == "Netdev a is in use by device 'a'"
    assert qmp(machine, "device_add", id="b", driver="virtio-net-mmio") == {"return": {}}
    assert qmp(machine, "netdev_add", id="c", ifname="tap2") == {"return": {}}
    assert qmp(machine, "device_add", id="c", driver="virtio-net-mmio")["error"]["desc"] == \
        "A maximum of 2 virtio-net NICs are supported"
    assert qmp(machine, "device_add", id="a", driver="virtio-blk-mmio")["error"]["desc"] == \
        "Duplicate device ID 'a'"


def test_a_mac_the_guest_already_read_is_refused_with_the_reason(hotplug):
    hotplug.netdev_add(NetdevConfig("n", "tap0"))
    nic(hotplug, 0).config_read = True  # the driver probed eth0 at boot
    current = nic(hotplug, 0).mac_text
    with pytest.raises(HotplugError, match=f"The guest read eth0's MAC \\({current}\\) when it "
                                           "probed the NIC and would not see 52:54:00:00:00:99"):
        hotplug.device_add(NicRequest("n", "n", 0, "52:54:00:00:00:99"))
    assert nic(hotplug, 0).backend is None
    hotplug.device_add(NicRequest("n", "n", 0, current.upper()))  # the same MAC is fine
    assert nic(hotplug, 0).backend is not None


def test_a_mac_is_checked_and_unique_before_the_guest_reads_it(hotplug):
    hotplug.netdev_add(NetdevConfig("n", "tap0"))
    with pytest.raises(HotplugError, match="a multicast address cannot be a NIC's"):
        hotplug.device_add(NicRequest("n", "n", 0, "01:00:5e:00:00:01"))
    with pytest.raises(HotplugError, match="is already eth1's"):
        hotplug.device_add(NicRequest("n", "n", 0, nic(hotplug, 1).mac_text))
    hotplug.device_add(NicRequest("n", "n", 0, "52:54:00:AB:CD:EF"))
    assert nic(hotplug, 0).mac_text == "52:54:00:ab:cd:ef"


def test_a_netdev_fd_is_owned_and_closed_when_refused(hotplug, tmp_path):
    machine = FakeMachine()
    machine.hotplug = hotplug
    context = FakeContext()
    not_a_tap = tmp_path / "file"
    not_a_tap.write_bytes(b"x")
    fd = os.open(not_a_tap, os.O_RDONLY)
    context.named_fds["tapfd"] = fd
    reply = dispatch(machine, context, {"execute": "netdev_add",
                                        "arguments": {"id": "n", "fd": "tapfd"}})
    assert reply["error"]["desc"] == f"fd {fd} is not a tap device"
    assert "tapfd" not in context.named_fds
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: a refused fd does not leak
    empty = tmp_path / "tap-stand-in"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    context.named_fds["tapfd"] = fd
    assert dispatch(machine, context, {"execute": "netdev_add",
                                       "arguments": {"id": "n", "fds": "tapfd"}}) == \
        {"return": {}}
    assert hotplug.backends.netdevs["n"].fd == fd
    assert qmp(machine, "netdev_del", id="n") == {"return": {}}
    with pytest.raises(OSError):
        os.fstat(fd)
