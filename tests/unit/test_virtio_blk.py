"""virtio-blk in C on synthetic guest memory, driven through the Python device class."""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time

import pytest

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.devices.virtio.block import VIRTIO_BLK_F_RO
from stratovirt_py.devices.virtio.mmio import VIRTIO_F_RING_EVENT_IDX
from tests.virtq_model import F_WRITE, SECTOR, Rig

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_write_then_read_back(rig):
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(4 * SECTOR))
    status = rig.driver.submit(T_OUT, sector=5, data=pattern, segments=3)
    rig.run()
    assert rig.status(status) == S_OK
    assert rig.image.read_bytes()[5 * SECTOR:9 * SECTOR] == pattern
    status = rig.driver.submit(T_IN, sector=5, read_len=4 * SECTOR)
    rig.run()
    assert rig.status(status) == S_OK
    assert rig.driver.data_at(status, 4 * SECTOR) == pattern
    head, _ = rig.driver.pending[-1]
    assert rig.queue.used_elem(1) == (head, 4 * SECTOR + 1)
    assert lib.svpy_read_interrupt_status(rig.device.shared) & 1
    assert os.eventfd_read(rig.irqfd) >= 1
    stats = rig.device.stats()
    assert stats["requests"] == 2 and stats["written_bytes"] == stats["read_bytes"] == 2048


def test_many_requests_in_one_notification(rig):
    statuses = [rig.driver.submit(T_OUT, sector=i, data=bytes([i]) * SECTOR) for i in range(10)]
    rig.run(10)
    assert all(rig.status(s) == S_OK for s in statuses)
    image = rig.image.read_bytes()
    assert all(image[i * SECTOR:(i + 1) * SECTOR] == bytes([i]) * SECTOR for i in range(10))


def test_flush_and_get_id(rig):
    flush = rig.driver.submit(T_FLUSH)
    get_id = rig.driver.submit(T_GET_ID, read_len=20)
    rig.run(2)
    assert rig.status(flush) == S_OK
    assert rig.status(get_id) == S_OK
    assert rig.driver.data_at(get_id, 20) == b"SN-1234".ljust(20, b"\0")


@pytest.mark.parametrize(("kind", "sector", "length"), [
    (T_IN, 64, SECTOR),  # just past the end
    (T_IN, 63, 2 * SECTOR),  # straddles the end
    (T_IN, 2**63, SECTOR),  # offset overflow
    (T_IN, 0, 100),  # not a whole sector
    (T_OUT, 64, SECTOR),
])
def test_out_of_range_requests_fail_with_ioerr(rig, kind, sector, length):
    if kind == T_OUT:
        status = rig.driver.submit(kind, sector=sector, data=b"x" * length)
    else:
        status = rig.driver.submit(kind, sector=sector, read_len=length)
    rig.run()
    assert rig.status(status) == S_IOERR
    assert rig.image.stat().st_size == 64 * SECTOR


def test_unknown_request_type(rig):
    status = rig.driver.submit(99, read_len=SECTOR)
    rig.run()
    assert rig.status(status) == S_UNSUPP


def test_read_only_drive_refuses_writes(tmp_path):
    rig = Rig(tmp_path, read_only=True)
    try:
        assert rig.device.device_features() & VIRTIO_BLK_F_RO
        before = rig.image.read_bytes()
        write = rig.driver.submit(T_OUT, sector=0, data=b"\xff" * SECTOR)
        read = rig.driver.submit(T_IN, sector=0, read_len=SECTOR)
        discard = rig.driver.submit(T_DISCARD, data=bytes(16))
        rig.run(3)
        assert rig.status(write) == S_IOERR and rig.status(discard) == S_IOERR
        assert rig.status(read) == S_OK
        assert rig.image.read_bytes() == before
    finally:
        rig.close()


def test_direct_io_with_unaligned_guest_buffers(tmp_path):
    rig = Rig(tmp_path, direct=True)
    try:
        # Buffers at 64-byte alignment: O_DIRECT refuses them; the device bounces.
        data = bytes(range(256)) * 4
        write = rig.driver.submit(T_OUT, sector=3, data=data, segments=2)
        read = rig.driver.submit(T_IN, sector=3, read_len=1024)
        rig.run(2)
        assert rig.status(write) == S_OK and rig.status(read) == S_OK
        assert rig.driver.data_at(read, 1024) == data
        assert rig.image.read_bytes()[3 * SECTOR:5 * SECTOR] == data
    finally:
        rig.close()


def test_discard_and_write_zeroes(rig):
    segment = struct.pack("<QII", 8, 8, 0)
    zeroes = rig.driver.submit(T_WRITE_ZEROES, data=segment)
    unmap = rig.driver.submit(T_DISCARD, data=struct.pack("<QII", 32, 8, 0))
    bad = rig.driver.submit(T_DISCARD, data=struct.pack("<QII", 60, 8, 0))
    rig.run(3)
    assert (rig.status(zeroes), rig.status(unmap), rig.status(bad)) == (S_OK, S_OK, S_IOERR)
    image = rig.image.read_bytes()
    assert image[8 * SECTOR:16 * SECTOR] == bytes(8 * SECTOR)
    assert image[32 * SECTOR:40 * SECTOR] == bytes(8 * SECTOR)  # holes read as zeros
    assert image[16 * SECTOR:17 * SECTOR] != bytes(SECTOR)


def test_empty_slot_has_no_capacity(rig):
    backend = rig.device.set_backend(None)
    assert backend is not None
    backend.close()
    assert rig.device.read_config(0, 8) == 0
    status = rig.driver.submit(T_IN, read_len=SECTOR)
    rig.run()
    assert rig.status(status) == S_IOERR


def test_config_space(rig):
    assert rig.device.read_config(0, 8) == 64  # capacity in sectors
    assert rig.device.read_config(0x0C, 4) == 126  # seg_max
    assert rig.device.read_config(0x14, 4) == 512  # blk_size
    assert rig.device.read_config(0x24, 4) == 1 << 22  # max_discard_sectors


def test_hostile_chain_marks_the_device_broken(rig):
    rig.queue.set_desc(0, 0x7FFF00000000, 16)
    rig.queue.publish(0)
    os.eventfd_write(rig.kick_fd, 1)
    deadline = time.monotonic() + 5
    while not rig.device.shared.broken:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert os.eventfd_read(rig.error_fd) == 1
    assert ffi_string(lib.svpy_vq_error_name(rig.device.shared.broken)) == (
        "buffer outside guest RAM")
    assert rig.guest.guards_intact()


def test_request_without_status_byte_breaks_the_device(rig):
    rig.queue.set_desc(0, rig.queue.data_area, 16)
    rig.queue.publish(0)
    os.eventfd_write(rig.kick_fd, 1)
    deadline = time.monotonic() + 5
    while not rig.device.shared.broken:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert rig.queue.used_idx() == 0


def test_event_idx_negotiated(tmp_path):
    rig = Rig(tmp_path, features=VIRTIO_F_RING_EVENT_IDX)
    try:
        assert rig.device.c.vq.event_idx == 1
        status = rig.driver.submit(T_OUT, sector=1, data=b"e" * SECTOR)
        rig.run()
        assert rig.status(status) == S_OK
        assert rig.queue.avail_event() == 1  # the device asks for the next notification
    finally:
        rig.close()


def ffi_string(pointer) -> str:
    return ffi.string(pointer).decode()


def test_host_io_error_becomes_ioerr(rig):
    # The image shrinks under the device: the read hits end of file, a host error.
    with open(rig.image, "r+b") as image:
        image.truncate(8 * SECTOR)
    status = rig.driver.submit(T_IN, sector=10, read_len=SECTOR)
    rig.run()
    assert rig.status(status) == S_IOERR
    assert rig.device.stats()["errors"] == 1
    good = rig.driver.submit(T_IN, sector=1, read_len=SECTOR)
    rig.run()
    assert rig.status(good) == S_OK  # the device goes on


# --- Indirect tables at any address (issue 8, item 1) -----------------------------


@pytest.mark.parametrize("misalignment", [8, 1])
def test_read_through_an_indirect_table_at_any_alignment(rig, misalignment):
    header = rig.driver.header(T_IN, sector=3)
    data = rig.driver.alloc(2 * SECTOR)
    status = rig.driver.status_byte()
    table = rig.driver.alloc(3 * 16, offset=misalignment)
    rig.driver.submit_chain([(header, 16, 0), (data, 2 * SECTOR, F_WRITE), (status, 1, F_WRITE)],
                            table=table)
    rig.run()
    assert rig.status(status) == S_OK
    assert rig.guest.read(data, 2 * SECTOR) == rig.image.read_bytes()[3 * SECTOR:5 * SECTOR]
    assert not rig.device.shared.broken


# --- DISCARD / WRITE_ZEROES limits (item 2) ---------------------------------------

MAX_DISCARD = lib.SVPY_BLK_MAX_DISCARD_SECTORS
MAX_ZEROES = lib.SVPY_BLK_MAX_WRITE_ZEROES_SECTORS
UNMAP = 1


def segments_payload(*segments: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", *segment) for segment in segments)


@pytest.mark.parametrize(("kind", "segments", "expected"), [
    (T_DISCARD, [(0, 8, 0)] * 16, S_OK),  # the advertised maximum
    (T_DISCARD, [(0, 8, 0)] * 17, S_UNSUPP),  # one segment more
    (T_WRITE_ZEROES, [(0, 8, 0)], S_OK),
    (T_WRITE_ZEROES, [(0, 8, 0)] * 2, S_UNSUPP),  # max_write_zeroes_seg is 1
    (T_DISCARD, [(0, MAX_DISCARD, 0)], S_OK),
    (T_DISCARD, [(0, MAX_DISCARD + 1, 0)], S_IOERR),
    (T_WRITE_ZEROES, [(0, MAX_ZEROES, 0)], S_OK),
    (T_WRITE_ZEROES, [(0, MAX_ZEROES + 1, UNMAP)], S_IOERR),
    (T_DISCARD, [(0, 8, UNMAP)], S_UNSUPP),  # UNMAP is for WRITE_ZEROES only
    (T_WRITE_ZEROES, [(0, 8, 2)], S_UNSUPP),  # an unknown flag
])
def test_discard_and_write_zeroes_limits(tmp_path, kind, segments, expected):
    # Sparse and large enough that every range above lies inside the disk.
    rig = Rig(tmp_path, sparse_bytes=(MAX_DISCARD + 64) * SECTOR)
    try:
        status = rig.driver.submit(kind, data=segments_payload(*segments))
        rig.run()
        assert rig.status(status) == expected
        assert not rig.device.shared.broken
    finally:
        rig.close()


def test_a_refused_discard_changes_nothing(rig):
    before = rig.image.read_bytes()
    status = rig.driver.submit(T_DISCARD, data=segments_payload((0, 8, 0), (8, 8, 2)))
    rig.run()
    assert rig.status(status) == S_UNSUPP
    assert rig.image.read_bytes() == before  # the valid first segment was not carried out


def test_discard_segments_split_across_tiny_buffers(rig):
    request = struct.pack("<IIQ", T_DISCARD, 0, 0) + segments_payload((8, 8, 0), (32, 8, 0))
    sizes = [1, 2, 3, 5, 7, 11, 13, 6]  # 48 bytes, cut across every field
    chain, at = [], 0
    for size in sizes:
        buffer = rig.driver.alloc(size)
        rig.guest.write(buffer, request[at:at + size])
        chain.append((buffer, size, 0))
        at += size
    status = rig.driver.status_byte()
    rig.driver.submit_chain([*chain, (status, 1, F_WRITE)])
    rig.run()
    assert rig.status(status) == S_OK
    image = rig.image.read_bytes()
    assert image[8 * SECTOR:16 * SECTOR] == bytes(8 * SECTOR)
    assert image[32 * SECTOR:40 * SECTOR] == bytes(8 * SECTOR)
    assert image[16 * SECTOR:32 * SECTOR] != bytes(16 * SECTOR)


def test_discard_of_many_aliased_segments_is_refused_at_once(rig):
    # 1000 descriptors naming one page of segments: 256000 segments, which the
    # device once parsed (rescanning the chain for each) and carried out.
    page = rig.driver.alloc(4096)
    rig.guest.write(page, segments_payload((0, 1, 0)) * 256)
    header = rig.driver.header(T_DISCARD)
    status = rig.driver.status_byte()
    table = rig.driver.alloc(16 * 1002)
    rig.driver.submit_chain([(header, 16, 0), *[(page, 4096, 0)] * 1000, (status, 1, F_WRITE)],
                            table=table)
    rig.run()  # within 5 s
    assert rig.status(status) == S_UNSUPP
    assert rig.image.read_bytes()[:SECTOR] == bytes(range(256)) * 2


def test_a_long_queue_is_served_in_passes_that_yield_the_lock(tmp_path):
    # Three reads of the largest size: more than one pass may do while holding the lock.
    piece = 1 << 20
    count = lib.SVPY_BLK_MAX_REQUEST_BYTES // piece
    rig = Rig(tmp_path, guest_size=1 << 22, sparse_bytes=64 << 20)
    try:
        buffer = rig.driver.alloc(piece)
        statuses = []
        for _ in range(3):
            header = rig.driver.header(T_IN)
            status = rig.driver.status_byte()
            table = rig.driver.alloc(16 * (count + 2))
            rig.driver.submit_chain(
                [(header, 16, 0), *[(buffer, piece, F_WRITE)] * count, (status, 1, F_WRITE)],
                table=table)
            statuses.append(status)
        rig.run(3)
        assert [rig.status(status) for status in statuses] == [S_OK] * 3
        assert rig.device.stats()["yields"] >= 1
    finally:
        rig.close()


@pytest.mark.parametrize("kind", ["flush", "discard"])
def test_flushes_and_discards_count_against_a_pass(tmp_path, kind):
    """Each costs a system call that may sync the disk: a ring of them is served in
    several passes, not in one that holds the lock for all of them."""
    requests = 20  # three descriptors each fit the 64-entry queue
    rig = Rig(tmp_path, sparse_bytes=64 << 20)
    try:
        statuses = [rig.driver.submit(T_FLUSH) if kind == "flush" else
                    rig.driver.submit(T_DISCARD, data=struct.pack("<QII", i * 8, 8, 0))
                    for i in range(requests)]
        rig.run(requests)
        assert [rig.status(status) for status in statuses] == [S_OK] * requests
        assert rig.device.stats()["yields"] >= 1
    finally:
        rig.close()


# --- Request size bound, used length apart from errors (items 3 and 6) ------------


def aliased_read(rig: Rig, total: int, piece: int, buffer: int) -> tuple[int, int]:
    """A read of `total` bytes into `piece`-byte buffers that all alias one area
    (the spec allows it); returns (head, status address)."""
    pieces = [piece] * (total // piece) + ([total % piece] if total % piece else [])
    header = rig.driver.header(T_IN)
    status = rig.driver.status_byte()
    table = rig.driver.alloc(16 * (len(pieces) + 2))
    head = rig.driver.submit_chain(
        [(header, 16, 0), *[(buffer, size, F_WRITE) for size in pieces], (status, 1, F_WRITE)],
        table=table)
    return head, status


@pytest.mark.parametrize(("total", "direct"), [
    (2 << 30, False),  # once: read, status OK, then the device broke instead of answering
    ((4 << 30) + SECTOR, False),  # once: read, then answered with a used length of 513
    (0x7FFFF000 + SECTOR, True),  # once: cut short by the kernel's cap on one AIO transfer
    (lib.SVPY_BLK_MAX_REQUEST_BYTES + SECTOR, False),
])
def test_a_read_above_the_request_bound_gets_ioerr_before_any_io(tmp_path, total, direct):
    piece = 8 << 20
    rig = Rig(tmp_path, guest_size=2 * piece, sparse_bytes=(4 << 30) + (1 << 20),
              direct=direct)
    try:
        buffer = rig.driver.alloc(piece)
        rig.guest.write(buffer, b"\x5a" * piece)
        head, status = aliased_read(rig, total, piece, buffer)
        rig.run()
        assert rig.status(status) == S_IOERR
        assert rig.queue.used_elem(0) == (head, 1)
        assert not rig.device.shared.broken
        assert rig.guest.read(buffer, piece) == b"\x5a" * piece  # no I/O was done
        assert rig.device.stats()["read_bytes"] == 0
        good = rig.driver.submit(T_IN, sector=1, read_len=SECTOR)
        rig.run()
        assert rig.status(good) == S_OK
    finally:
        rig.close()


@pytest.mark.parametrize("direct", [False, True])
def test_a_read_of_the_request_bound_is_served(tmp_path, direct):
    piece = 4 << 20
    total = lib.SVPY_BLK_MAX_REQUEST_BYTES
    rig = Rig(tmp_path, guest_size=2 * piece, sparse_bytes=64 << 20, direct=direct)
    try:
        buffer = rig.driver.alloc(piece)
        head, status = aliased_read(rig, total, piece, buffer)
        rig.run()
        assert rig.status(status) == S_OK
        assert rig.queue.used_elem(0) == (head, total + 1)
        assert rig.device.stats()["read_bytes"] == total
    finally:
        rig.close()


def test_drain_ends_when_aio_stops_answering(tmp_path):
    rig = Rig(tmp_path, direct=True)
    c = rig.device.c
    context = c.aio
    assert context, "O_DIRECT backends use Linux AIO"
    # One request in flight on a context io_getevents refuses (EINVAL).
    c.requests[0].in_use = 1
    c.inflight = 1
    c.aio = 1
    drained = threading.Event()

    def drain() -> None:
        lib.svpy_blk_drain(c, 0)
        drained.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert drained.wait(5), "svpy_blk_drain kept waiting for a failed context"
        assert (c.inflight, c.requests[0].in_use, c.aio) == (0, 0, 0)
        assert rig.device.stats()["errors"] == 1
        status = rig.driver.submit(T_IN, sector=1, read_len=SECTOR)
        rig.run()  # served without AIO
        assert rig.status(status) == S_OK
    finally:
        if not drained.is_set():  # let a spinning drain out, so that close() can finish
            c.requests[0].in_use = 0
            c.inflight = 0
            c.aio = context
            drained.wait(5)
        rig.close()


def test_io_thread_failure_reaches_the_control_plane(rig, caplog):
    thread = rig.iothread
    assert thread.failure() is None
    # Put something that is not an epoll instance under the thread's epoll fd:
    # its next epoll_wait fails (EINVAL), as any other epoll_wait failure would.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, thread.handle.epoll_fd)
    os.close(devnull)
    os.eventfd_write(rig.kick_fd, 1)  # wakes the thread from the wait it is in
    readable, _, _ = select.select([thread.failure_fd], [], [], 5)
    assert readable, "the failure was not signalled"
    reason = thread.failure()
    assert reason is not None and "epoll_wait failed: Invalid argument" in reason
    assert thread.failure() == reason
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.getMessage() for record in errors] == [reason]  # logged once


def aligned_read(rig: Rig, sector: int, length: int, misalign: int = 0) -> int:
    """A read into a page-aligned buffer (O_DIRECT takes it as it is), or one `misalign`
    bytes off; returns the status byte's address."""
    driver = rig.driver
    header = driver.header(T_IN, sector)
    driver.scratch = (driver.scratch + 4095) & ~4095
    data = driver.alloc(length, misalign)
    status = driver.status_byte()
    driver.pending.append((driver.submit_chain([(header, 16, 0), (data, length, F_WRITE),
                                                (status, 1, F_WRITE)]), status))
    return status


def test_o_direct_requests_of_one_pass_go_to_the_kernel_in_one_submission(tmp_path):
    rig = Rig(tmp_path, direct=True, guest_size=1 << 22)
    try:
        assert rig.device.c.aio, "O_DIRECT backends use Linux AIO"
        # The middle one is misaligned: O_DIRECT refuses it (at submission or completion,
        # by file system), and it is served from the page cache.
        statuses = [aligned_read(rig, 8 * i, 4096, misalign=64 if i == 3 else 0)
                    for i in range(7)]
        rig.run(7)
        image = rig.image.read_bytes()
        for i, status in enumerate(statuses):
            assert rig.status(status) == S_OK
            assert rig.driver.data_at(status, 4096) == image[4096 * i:4096 * (i + 1)]
        # One io_submit for the pass; if the kernel refuses one on the spot, that call and
        # one for the requests after it (three, where one request each made seven).
        assert rig.device.stats()["aio_submits"] in (1, 3)
        assert rig.device.stats()["requests"] == 7
    finally:
        rig.close()
