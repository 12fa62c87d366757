"""Hot-plug without KVM: slots and backends behind blockdev-add/-del and device_add/-del."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import pytest

from stratovirt_py.backends import BackendRegistry
from stratovirt_py.config import MAX_DISKS, DriveConfig
from stratovirt_py.devices.virtio.block import DiskBackend
from stratovirt_py.hotplug import Hotplug, HotplugError
from stratovirt_py.qmp.registry import dispatch
from stratovirt_py.slots import DISK, Slot, SlotTable
from tests.unit.test_qmp import FakeContext, FakeMachine, ServerHarness


class FakeBlockDevice:
    """Stands in for VirtioBlock: holds a backend; `gate` makes set_backend wait, as the
    real one waits for the guest's requests in flight."""

    def __init__(self) -> None:
        self.backend: DiskBackend | None = None
        self.gate: threading.Event | None = None

    def set_backend(self, backend: DiskBackend | None) -> DiskBackend | None:
        if self.gate is not None:
            assert self.gate.wait(10)
        previous, self.backend = self.backend, backend
        return previous


@pytest.fixture
def hotplug() -> Hotplug:
    table = SlotTable()
    for index in range(MAX_DISKS):
        table.add(Slot(DISK, index, FakeBlockDevice(), lambda: None))
    plug = Hotplug(table, BackendRegistry())
    yield plug
    plug.close()


def image(tmp_path, name: str = "disk.img") -> str:
    path = tmp_path / name
    path.write_bytes(bytes(1 << 16))
    return str(path)


def test_a_node_used_by_a_device_of_another_name_cannot_be_added_again(hotplug, tmp_path):
    hotplug.blockdev_add(DriveConfig("node0", image(tmp_path)))
    hotplug.add_disk("dev0", "node0")
    with pytest.raises(HotplugError, match="Duplicate node name 'node0'"):
        hotplug.blockdev_add(DriveConfig("node0", image(tmp_path, "other.img")))
    # A node may share a name with a device: QEMU keeps the two apart.
    hotplug.blockdev_add(DriveConfig("dev0", image(tmp_path, "third.img")))


def test_device_ids_are_unique(hotplug, tmp_path):
    hotplug.blockdev_add(DriveConfig("a", image(tmp_path, "a.img")))
    hotplug.blockdev_add(DriveConfig("b", image(tmp_path, "b.img")))
    hotplug.add_disk("dev", "a")
    with pytest.raises(HotplugError, match="Duplicate device ID 'dev'"):
        hotplug.add_disk("dev", "b")


def run_with_timeout(action, timeout: float = 5.0) -> Any:
    """Runs `action` on a thread; fails the test if it has not returned in time."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(action())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked"
    return outcome[0]


@pytest.mark.parametrize("read_only", [False, True])
def test_a_fifo_is_refused_at_once_instead_of_blocking(hotplug, tmp_path, read_only):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = run_with_timeout(lambda: hotplug.blockdev_add(DriveConfig("f", str(fifo),
                                                                read_only=read_only)))
    assert isinstance(error, HotplugError)
    assert error.desc == f"Could not open '{fifo}': not a regular file or block device"
    assert "f" not in hotplug.backends.nodes


def test_a_file_name_with_nul_is_a_clear_error(hotplug):
    with pytest.raises(HotplugError, match="invalid file name"):
        hotplug.blockdev_add(DriveConfig("n", "/tmp/a\0b"))


def test_unplug_keeps_the_slot_reserved_until_it_is_finished(hotplug, tmp_path):
    hotplug.blockdev_add(DriveConfig("a", image(tmp_path, "a.img")))
    slot = hotplug.add_disk("a", "a", 0)
    started = hotplug.slots.begin_release("a")
    assert started is slot
    with pytest.raises(HotplugError, match="already in the process of unplug"):
        hotplug.slots.begin_release("a")
    hotplug.blockdev_add(DriveConfig("b", image(tmp_path, "b.img")))
    with pytest.raises(HotplugError, match="occupied by 'a'"):
        hotplug.add_disk("b", "b", 0)
    hotplug.empty(slot)
    hotplug.slots.release(slot)
    assert slot.device_id is None and slot.device.backend is None
    hotplug.add_disk("b", "b", 0)


def qmp(machine, name: str, **arguments) -> dict:
    return dispatch(machine, FakeContext(), {"execute": name, "arguments": arguments})


@pytest.mark.parametrize(("lun", "desc"), [
    (-1, "Invalid lun -1: luns 0 (vdb) to 4 (vdf) are the disk slots after vda"),
    (5, "Invalid lun 5: luns 0 (vdb) to 4 (vdf) are the disk slots after vda"),
])
def test_lun_outside_the_slots_is_refused(hotplug, tmp_path, lun, desc):
    machine = FakeMachine()
    machine.hotplug = hotplug
    assert qmp(machine, "blockdev-add", **{"node-name": "d", "file": {
        "driver": "file", "filename": image(tmp_path)}}) == {"return": {}}
    reply = qmp(machine, "device_add", id="d", driver="virtio-blk-mmio", lun=lun)
    assert reply == {"error": {"class": "GenericError", "desc": desc}}
    assert all(slot.device_id is None for slot in hotplug.slots)
    assert qmp(machine, "device_add", id="d", driver="virtio-blk-mmio", lun=4) == {"return": {}}
    assert hotplug.slots.of_kind(DISK)[5].device_id == "d"


def test_device_del_waits_off_the_event_loop(hotplug, tmp_path):
    """Draining and syncing a disk used to run on the loop: no other client was answered."""
    machine = FakeMachine()
    machine.hotplug = hotplug
    hotplug.blockdev_add(DriveConfig("d", image(tmp_path)))
    slot = hotplug.add_disk("d", "d", 0)
    hotplug.blockdev_add(DriveConfig("x", image(tmp_path, "x.img")))
    gate = slot.device.gate = threading.Event()
    harness = ServerHarness(str(tmp_path / "qmp.sock"), machine)
    try:
        remover, other = harness.connect(), harness.connect()
        remover.line(), other.line()
        remover.send(b'{"execute":"device_del","arguments":{"id":"d"},"id":1}')
        other.send(b'{"execute":"query-status","id":2}')
        assert other.message() == {"return": {"running": True, "singlestep": False,
                                              "status": "running"}, "id": 2}
        assert remover.nothing_pending(0.1)
        other.send(b'{"execute":"device_add","arguments":{"id":"x","driver":"virtio-blk-mmio",'
                   b'"addr":"0x0"},"id":3}')
        assert other.message()["error"]["desc"] == "The slot 0x0 (vda) is occupied by 'd'"
        gate.set()
        lines = [json.loads(line) for line in remover.sock.recv(1024).split(b"\r\n")[:-1]]
        assert [line.get("event") for line in lines] == ["DEVICE_DELETED", None]
        assert lines[1] == {"return": {}, "id": 1}
        assert slot.device_id is None and slot.device.backend is None
    finally:
        gate.set()
        harness.close()


@pytest.mark.parametrize(("addr", "desc"), [
    ([[[[1]]]], "Invalid parameter type for 'addr', expected: string"),
    ({"a": 1}, "Invalid parameter type for 'addr', expected: string"),
    ("zero", "Invalid addr 'zero' for device 'd'"),
    ("9" * 5000, "Invalid addr '" + "9" * 40 + "... (5000 characters)' for device 'd'"),
    ("-0x1", "Invalid addr -0x1: the virtio-blk disk slots are 0x0 (vda) to 0x5 (vdf)"),
])
def test_bad_addr_is_a_clear_error(hotplug, tmp_path, addr, desc):
    machine = FakeMachine()
    machine.hotplug = hotplug
    qmp(machine, "blockdev-add", **{"node-name": "d", "file": {
        "driver": "file", "filename": image(tmp_path)}})
    reply = qmp(machine, "device_add", id="d", driver="virtio-blk-mmio", addr=addr)
    assert reply == {"error": {"class": "GenericError", "desc": desc}}
