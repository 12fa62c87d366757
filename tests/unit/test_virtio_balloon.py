"""virtio-balloon in C on page-aligned synthetic guest memory, and the balloon's control side.

Guest RAM here is an anonymous mapping between two guard pages, so the
madvise() calls are real: a released page reads back as zeros, and the guards
prove that nothing outside guest RAM was touched.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable

import pytest

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.balloon import Balloon, BalloonError
from stratovirt_py.config import BalloonConfig
from stratovirt_py.devices.virtio.balloon import (
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
    queue_roles,
)
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, IoThread, device_lock
from stratovirt_py.devices.virtio.mmio import VIRTIO_F_VERSION_1, QueueSetup
from stratovirt_py.event_loop import EventLoop
from stratovirt_py.qmp.registry import dispatch
from tests.unit.test_qmp import FakeContext, FakeMachine
from tests.virtq_model import F_NEXT, F_WRITE, Queue

PAGE = 4096
GUEST_PAGES = 256
BASE = 0x100000


class MappedGuest:
    """Guest RAM at BASE backed by an anonymous mapping, with a guard page each side."""

    def __init__(self) -> None:
        # Private, as the monitor's guest RAM is: MADV_DONTNEED gives zero pages back.
        self.map = mmap.mmap(-1, (GUEST_PAGES + 2) * PAGE,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map[:PAGE] = b"\xa5" * PAGE
        self.map[-PAGE:] = b"\xa5" * PAGE
        self._pointer = ffi.from_buffer(self.map)
        self.base = BASE
        self.size = GUEST_PAGES * PAGE
        self.mem = ffi.new("struct svpy_guest_memory *")
        self.mem.count = 1
        self.mem.regions[0].gpa = BASE
        self.mem.regions[0].size = self.size
        self.mem.regions[0].hva = ffi.cast("uint8_t *", self._pointer) + PAGE

    def write(self, gpa: int, data: bytes) -> None:
        offset = PAGE + gpa - BASE
        assert offset >= PAGE and offset + len(data) <= PAGE + self.size
        self.map[offset:offset + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        offset = PAGE + gpa - BASE
        return bytes(self.map[offset:offset + length])

    def guards_intact(self) -> bool:
        return self.map[:PAGE] == b"\xa5" * PAGE and self.map[-PAGE:] == b"\xa5" * PAGE


DATA_PAGE = 64  # the first guest page the tests fill and balloon (rings live below)


class BalloonRig:
    def __init__(self, features: int = VIRTIO_BALLOON_F_STATS_VQ) -> None:
        self.guest = MappedGuest()
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(6)]
        self.irqfd, self.error_fd, *self.kicks = self.fds
        self.iothread = IoThread()
        self.actual_changes: list[int] = []
        self.device = VirtioBalloon("balloon", DeviceWiring(
            self.guest.mem, self.iothread, self.irqfd, self.error_fd, tuple(self.kicks)),
            BalloonConfig(free_page_reporting=True), self.actual_changes.append)
        roles = queue_roles(features)
        self.queues = [Queue(self.guest, size=16, at=BASE + index * 4 * PAGE)  # type: ignore
                       for index in range(len(roles))]
        self.next_desc = [0] * len(roles)
        setups = [QueueSetup(size=16, ready=True, desc=q.layout.desc, driver=q.layout.avail,
                             device=q.layout.used) for q in self.queues]
        setups += [QueueSetup() for _ in range(4 - len(setups))]
        with device_lock(self.device.shared):
            assert self.device.activate(VIRTIO_F_VERSION_1 | features, setups) == 0
        self.scratch = BASE + 40 * PAGE  # page lists and statistics buffers

    def post(self, queue: int, pieces: list[tuple[int, int, int]]) -> None:
        q = self.queues[queue]
        indices = []
        for _ in pieces:
            indices.append(self.next_desc[queue] % q.size)
            self.next_desc[queue] += 1
        for position, ((addr, length, flags), index) in enumerate(zip(pieces, indices,
                                                                      strict=True)):
            more = position + 1 < len(pieces)
            q.set_desc(index, addr, length, flags | (F_NEXT if more else 0),
                       indices[position + 1] if more else 0)
        q.publish(indices[0])
        os.eventfd_write(self.kicks[queue], 1)

    def frames(self, queue: int, frames: list[int], split_at: int | None = None) -> None:
        data = struct.pack(f"<{len(frames)}I", *frames)
        self.guest.write(self.scratch, data)
        if split_at is None:
            self.post(queue, [(self.scratch, len(data), 0)])
        else:
            self.post(queue, [(self.scratch, split_at, 0),
                              (self.scratch + split_at, len(data) - split_at, 0)])

    def wait_used(self, queue: int, count: int) -> None:
        deadline = time.monotonic() + 5
        while self.queues[queue].used_idx() < count:
            assert time.monotonic() < deadline, "the device did not answer"
            time.sleep(0.001)

    def close(self) -> None:
        self.iothread.stop()
        self.device.close()
        for fd in self.fds:
            os.close(fd)
        assert self.guest.guards_intact()


@pytest.fixture
def rig():
    r = BalloonRig()
    yield r
    r.close()


def frame_of(page: int) -> int:
    return (BASE >> 12) + page


def fill(rig: BalloonRig, first: int, count: int) -> None:
    for page in range(first, first + count):
        rig.guest.write(BASE + page * PAGE, bytes([page & 0xFF | 1]) * PAGE)


def test_inflated_pages_go_back_to_the_host(rig):
    fill(rig, DATA_PAGE, 40)
    # Two runs of pages, one with a gap in it, listed out of order.
    frames = [frame_of(p) for p in [*range(DATA_PAGE + 10, DATA_PAGE + 20), *range(
        DATA_PAGE, DATA_PAGE + 5)]]
    rig.frames(0, frames)
    rig.wait_used(0, 1)
    for page in range(DATA_PAGE, DATA_PAGE + 40):
        released = DATA_PAGE + 10 <= page < DATA_PAGE + 20 or page < DATA_PAGE + 5
        content = rig.guest.read(BASE + page * PAGE, PAGE)
        assert content == (bytes(PAGE) if released else bytes([page & 0xFF | 1]) * PAGE)
    counters = rig.device.counters()
    assert counters["inflated_pages"] == 15 and counters["released_bytes"] == 15 * PAGE
    assert counters["bad_frames"] == 0
    assert os.eventfd_read(rig.irqfd) >= 1


def test_frames_outside_guest_ram_are_ignored_and_counted(rig):
    fill(rig, DATA_PAGE, 4)
    frames = [(BASE >> 12) - 1, frame_of(GUEST_PAGES), 0xFFFFFFFF, 0, frame_of(DATA_PAGE)]
    rig.frames(0, frames)
    rig.wait_used(0, 1)
    counters = rig.device.counters()
    assert counters["bad_frames"] == 4 and counters["inflated_pages"] == 1
    assert rig.guest.read(BASE + DATA_PAGE * PAGE, PAGE) == bytes(PAGE)
    assert rig.guest.read(BASE + (DATA_PAGE + 1) * PAGE, 1) != b"\0"
    assert not rig.device.shared.broken  # a bad frame is the guest's loss, not an error


def test_a_frame_number_split_across_buffers_is_read_whole(rig):
    fill(rig, DATA_PAGE, 3)
    rig.frames(0, [frame_of(DATA_PAGE), frame_of(DATA_PAGE + 2)], split_at=6)
    rig.wait_used(0, 1)
    assert rig.device.counters()["inflated_pages"] == 2
    assert rig.guest.read(BASE + (DATA_PAGE + 2) * PAGE, PAGE) == bytes(PAGE)
    assert rig.guest.read(BASE + (DATA_PAGE + 1) * PAGE, 1) != b"\0"


def test_deflate_is_counted_and_changes_no_memory(rig):
    fill(rig, DATA_PAGE, 2)
    rig.frames(1, [frame_of(DATA_PAGE), frame_of(DATA_PAGE + 1)])
    rig.wait_used(1, 1)
    assert rig.device.counters()["deflated_pages"] == 2
    assert rig.guest.read(BASE + DATA_PAGE * PAGE, 1) != b"\0"


def test_reported_free_ranges_go_back_whole_pages_only():
    rig = BalloonRig(VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_REPORTING)
    try:
        assert [int(role) for role in rig.device.c.roles] == [
            lib.SVPY_BALLOON_INFLATE, lib.SVPY_BALLOON_DEFLATE, lib.SVPY_BALLOON_STATS,
            lib.SVPY_BALLOON_REPORTING]
        fill(rig, DATA_PAGE, 8)
        start = BASE + DATA_PAGE * PAGE
        # From the middle of page 0 to the middle of page 4: pages 1..3 go back.
        rig.post(3, [(start + PAGE // 2, 4 * PAGE, F_WRITE)])
        rig.wait_used(3, 1)
        assert rig.guest.read(start, PAGE // 2) != bytes(PAGE // 2)
        assert rig.guest.read(start + PAGE // 2, PAGE // 2) != bytes(PAGE // 2)
        assert rig.guest.read(start + PAGE, 3 * PAGE) == bytes(3 * PAGE)
        assert rig.guest.read(start + 4 * PAGE, PAGE) != bytes(PAGE)
        counters = rig.device.counters()
        assert counters["reported_bytes"] == 4 * PAGE
        assert counters["released_bytes"] == 3 * PAGE
    finally:
        rig.close()


def test_the_statistics_buffer_is_kept_until_the_host_asks_again(rig):
    stats = struct.pack("<HQHQHQ", 4, 100 << 20, 5, 256 << 20, 99, 7)
    rig.guest.write(rig.scratch, stats)
    rig.post(2, [(rig.scratch, len(stats), 0)])
    deadline = time.monotonic() + 5
    while rig.device.counters()["stats_updates"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert rig.queues[2].used_idx() == 0  # held back
    values, updated = rig.device.guest_stats()
    assert values["stat-free-memory"] == 100 << 20
    assert values["stat-total-memory"] == 256 << 20
    assert values["stat-swap-in"] == 2**64 - 1  # not reported by this guest, as QEMU says
    assert abs(updated - time.time()) < 60
    assert rig.device.request_stats()
    rig.wait_used(2, 1)
    assert not rig.device.request_stats()  # nothing held until the guest gives it again


def test_the_guest_writing_actual_is_reported(rig):
    rig.device.write_config(4, 4, 1234)
    rig.device.write_config(4, 4, 1234)
    assert rig.actual_changes == [1234]
    rig.device.set_target_pages(77)
    assert rig.device.read_config(0, 4) == 77 and rig.device.read_config(4, 4) == 1234
    rig.device.write_config(0, 4, 5)  # num_pages is the device's
    assert rig.device.read_config(0, 4) == 77


class FakeDevice:
    def __init__(self) -> None:
        self.num_pages = 0
        self.actual = 0
        self.stats_requests = 0

    def set_target_pages(self, pages: int) -> None:
        self.num_pages = pages

    def request_stats(self) -> bool:
        self.stats_requests += 1
        return True


def run_on_a_loop(scenario: Callable[[EventLoop], None]) -> None:
    loop = EventLoop()
    try:
        scenario(loop)
    finally:
        loop.close()


def test_targets_are_checked_and_events_come_at_most_once_a_second():
    def scenario(loop: EventLoop) -> None:
        events: list[tuple[str, dict]] = []
        balloon = Balloon("balloon0", 256 << 20, lambda name, data: events.append(
            (name, data)), loop)
        with pytest.raises(BalloonError) as error:
            balloon.actual()
        assert error.value.error_class == "DeviceNotActive"
        device = FakeDevice()
        notified: list[bool] = []
        balloon.attach(device, lambda: notified.append(True))  # type: ignore[arg-type]
        for bad, message in ((0, "Parameter 'value' expects a size"),
                             (-5, "Parameter 'value' expects a size"),
                             (1 << 20, "must be at least 67108864 bytes")):
            with pytest.raises(BalloonError, match=message):
                balloon.set_target(bad)
        balloon.set_target(1 << 40)  # above the boot size: the boot size
        assert device.num_pages == 0 and notified == [True]
        balloon.set_target(128 << 20)
        assert device.num_pages == (128 << 20) // PAGE
        for pages in (100, 200, 300):
            device.actual = pages
            balloon.on_actual_change(pages)
            loop.run_until(lambda: False, 0.01)
        assert [data["actual"] for name, data in events if name == "BALLOON_CHANGED"] == [
            (256 << 20) - 100 * PAGE]
        loop.run_until(lambda: False, 1.1)
        changed = [data["actual"] for name, data in events if name == "BALLOON_CHANGED"]
        assert changed == [(256 << 20) - 100 * PAGE, (256 << 20) - 300 * PAGE]
        assert [name for name, _ in events].count("BALLOON_CHANGE") == 2
        assert balloon.actual() == (256 << 20) - 300 * PAGE
        balloon.close()

    run_on_a_loop(scenario)


def test_statistics_polling_through_qom():
    def scenario(loop: EventLoop) -> None:
        balloon = Balloon("bal", 256 << 20, lambda name, data: None,
                          loop)
        device = FakeDevice()
        balloon.attach(device, lambda: None)  # type: ignore[arg-type]
        path = "/machine/peripheral/bal"
        assert balloon.qom_get(path, "guest-stats-polling-interval") == 0
        with pytest.raises(BalloonError) as error:
            balloon.qom_get("/machine/peripheral/other", "guest-stats")
        assert error.value.error_class == "DeviceNotFound"
        with pytest.raises(BalloonError, match="whole number of seconds"):
            balloon.qom_set(path, "guest-stats-polling-interval", -1)
        with pytest.raises(BalloonError, match="not found"):
            balloon.qom_get(path, "nonsense")
        balloon.qom_set(path, "guest-stats-polling-interval", 1)
        loop.run_until(lambda: False, 1.2)
        assert device.stats_requests == 2  # at once, then a second later
        balloon.qom_set(path, "guest-stats-polling-interval", 0)
        loop.run_until(lambda: False, 1.1)
        assert device.stats_requests == 2
        balloon.close()

    run_on_a_loop(scenario)


def test_qmp_balloon_commands():
    def scenario(loop: EventLoop) -> None:
        machine = FakeMachine()
        for command, arguments in (("balloon", {"value": 1 << 30}), ("query-balloon", {}),
                                   ("qom-get", {"path": "/machine/peripheral/balloon0",
                                                "property": "guest-stats"})):
            assert dispatch(machine, FakeContext(), {"execute": command,
                                                     "arguments": arguments}) == {
                "error": {"class": "DeviceNotActive",
                          "desc": "No balloon device has been activated"}}
        balloon = Balloon("balloon0", 1 << 30, lambda name, data: None,
                          loop)
        device = FakeDevice()
        balloon.attach(device, lambda: None)  # type: ignore[arg-type]
        machine.balloon = balloon

        def run(command: str, **arguments: object) -> dict:
            return dispatch(machine, FakeContext(), {"execute": command,
                                                     "arguments": arguments})

        assert run("balloon", value="1G")["error"]["desc"] == \
            "Invalid parameter type for 'value', expected: integer"
        assert run("balloon", value=0)["error"] == {
            "class": "GenericError", "desc": "Parameter 'value' expects a size"}
        assert run("balloon", value=512 << 20) == {"return": {}}
        assert device.num_pages == (512 << 20) // PAGE
        device.actual = (512 << 20) // PAGE
        assert run("query-balloon") == {"return": {"actual": 512 << 20}}
        balloon.close()

    run_on_a_loop(scenario)


def test_a_list_longer_than_the_cap_is_cut_not_walked(rig):
    """Frames past the cap were still read one byte at a time: a list of whole-RAM buffers
    held the device (and the I/O thread) for hours."""
    fill(rig, DATA_PAGE, 4)
    listed = lib.SVPY_BALLOON_MAX_FRAMES_PER_CHAIN + 1000
    # The same page over and over: every frame is valid, only the cap limits the work.
    rig.guest.write(rig.scratch, struct.pack("<I", frame_of(DATA_PAGE)) * listed)
    rig.post(0, [(rig.scratch, 4 * listed, 0)])
    rig.wait_used(0, 1)
    counters = rig.device.counters()
    assert counters["inflated_pages"] == lib.SVPY_BALLOON_MAX_FRAMES_PER_CHAIN
    assert counters["bad_frames"] == 1000
