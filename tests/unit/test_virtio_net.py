"""virtio-net in C on synthetic guest memory, with a SOCK_SEQPACKET pair standing in for the tap.

A seqpacket socket keeps frame boundaries and says EAGAIN when full, as a tap
does, so the data plane's framing and back-pressure are tested here without a
tap; the integration tests use real taps inside a network namespace.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import pytest

from stratovirt_py.devices.virtio.dataplane import DeviceWiring, IoThread, device_lock
from stratovirt_py.devices.virtio.mmio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    QueueSetup,
)
from stratovirt_py.devices.virtio.net import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    VirtioNet,
    tap_offloads,
)
from stratovirt_py.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO_ECN
from tests.virtq_model import F_NEXT, F_WRITE, Queue, SyntheticGuest

HDR = 12
PAGE = 4096


class SocketTap:
    """What VirtioNet needs of a Tap, over one end of a seqpacket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ifname = "sockettap"
        self.offloads: list[int] = []

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)


class Driver:
    """One queue of the guest's driver: descriptors handed out in order, one page per buffer."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.next_desc = 0
        self.next_page = 0

    def _desc(self) -> int:
        index = self.next_desc % self.queue.size
        self.next_desc += 1
        return index

    def buffer(self, data: bytes = b"") -> int:
        addr = self.queue.data_area + PAGE * (self.next_page % 64)
        self.next_page += 1
        if data:
            self.queue.guest.write(addr, data)
        return addr

    def post(self, pieces: list[tuple[int, int, int]]) -> int:
        """A chain of (addr, length, flags) descriptors; returns its head."""
        indices = [self._desc() for _ in pieces]
        for position, ((addr, length, flags), index) in enumerate(zip(pieces, indices,
                                                                      strict=True)):
            more = position + 1 < len(pieces)
            self.queue.set_desc(index, addr, length, flags | (F_NEXT if more else 0),
                                indices[position + 1] if more else 0)
        self.queue.publish(indices[0])
        return indices[0]


class NetRig:
    def __init__(self, features: int = VIRTIO_NET_F_MRG_RXBUF, queue_size: int = 16,
                 sndbuf: int | None = None) -> None:
        self.guest = SyntheticGuest(size=1 << 20)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        self.irqfd, self.error_fd, self.rx_kick, self.tx_kick = self.fds
        self.iothread = IoThread()
        self.device = VirtioNet("eth9", DeviceWiring(self.guest.mem, self.iothread, self.irqfd,
                                                     self.error_fd,
                                                     (self.rx_kick, self.tx_kick)),
                                mac=bytes.fromhex("525400abcdef"))
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        ours.setblocking(False)
        self.peer.settimeout(5)
        self.tap = SocketTap(ours)
        self.rxq = Queue(self.guest, size=queue_size)
        self.txq = Queue(self.guest, size=queue_size, at=self.guest.base + 0x80000)
        self.rx, self.tx = Driver(self.rxq), Driver(self.txq)
        self.device.set_backend(self.tap)  # type: ignore[arg-type]
        setups = [QueueSetup(size=queue_size, ready=True, desc=q.layout.desc,
                             driver=q.layout.avail, device=q.layout.used)
                  for q in (self.rxq, self.txq)]
        with device_lock(self.device.shared):
            assert self.device.activate(VIRTIO_F_VERSION_1 | features, setups) == 0

    def post_rx(self, count: int, size: int = PAGE) -> list[tuple[int, int]]:
        buffers = []
        for _ in range(count):
            addr = self.rx.buffer()
            buffers.append((self.rx.post([(addr, size, F_WRITE)]), addr))
        os.eventfd_write(self.rx_kick, 1)
        return buffers

    def send(self, frame: bytes, segments: int = 1) -> None:
        cut = [len(frame) * i // segments for i in range(segments + 1)]
        pieces = [(self.tx.buffer(frame[a:b]), b - a, 0) for a, b in itertools.pairwise(cut)]
        self.tx.post(pieces)
        os.eventfd_write(self.tx_kick, 1)

    def wait_used(self, queue: Queue, count: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while queue.used_idx() < count:
            assert time.monotonic() < deadline, f"used idx {queue.used_idx()} < {count}"
            time.sleep(0.001)

    def close(self) -> None:
        self.iothread.stop()
        self.device.close()
        self.tap.sock.close()
        self.peer.close()
        for fd in self.fds:
            os.close(fd)
        assert self.guest.guards_intact()


@pytest.fixture
def rig():
    r = NetRig()
    yield r
    r.close()


def header(num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, num_buffers)


def test_a_frame_the_guest_sends_reaches_the_tap_whole(rig):
    frame = header() + bytes(range(256)) * 6
    rig.send(frame, segments=3)
    assert rig.peer.recv(65536) == frame  # header included: the tap reads it
    rig.wait_used(rig.txq, 1)
    assert rig.txq.used_elem(0)[1] == 0
    assert os.eventfd_read(rig.irqfd) >= 1
    assert rig.device.stats()["tx_frames"] == 1
    assert rig.device.stats()["tx_bytes"] == len(frame) - HDR


def test_a_large_frame_spreads_over_merged_buffers_with_num_buffers(rig):
    buffers = rig.post_rx(4, size=2048)
    payload = os.urandom(5000)
    rig.peer.send(header() + payload)
    rig.wait_used(rig.rxq, 3)
    used = [rig.rxq.used_elem(i) for i in range(3)]
    assert [head for head, _ in used] == [head for head, _ in buffers[:3]]
    assert [length for _, length in used] == [2048, 2048, HDR + 5000 - 4096]
    received = b"".join(rig.guest.read(addr, length)
                        for (_, addr), (_, length) in zip(buffers, used, strict=False))
    assert received[HDR:] == payload
    assert struct.unpack_from("<H", received, 10)[0] == 3
    # The fourth buffer is still the guest's: it takes the next frame.
    rig.peer.send(header() + b"small")
    rig.wait_used(rig.rxq, 4)
    assert rig.rxq.used_elem(3) == (buffers[3][0], HDR + 5)


def test_without_mergeable_buffers_a_frame_too_big_is_dropped_and_the_buffer_kept():
    rig = NetRig(features=0)
    try:
        (head, addr), = rig.post_rx(1, size=1024)
        rig.peer.send(header() + bytes(2000))
        rig.peer.send(header() + b"fits")
        rig.wait_used(rig.rxq, 1)
        assert rig.rxq.used_elem(0) == (head, HDR + 4)
        assert rig.guest.read(addr + HDR, 4) == b"fits"
        assert struct.unpack_from("<H", rig.guest.read(addr, HDR), 10)[0] == 1
        assert rig.device.stats()["rx_dropped"] == 1
    finally:
        rig.close()


def iothread_cpu_seconds(rig: NetRig) -> float:
    total = 0.0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(f"/proc/self/task/{task}/comm") as comm:
            if comm.read().strip() == "iothread":
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_with_no_receive_buffers_the_tap_waits_and_nothing_is_lost(rig):
    frames = [header() + f"frame-{i:03d}".encode() for i in range(40)]
    for frame in frames:
        rig.peer.send(frame)
    time.sleep(0.2)
    assert rig.rxq.used_idx() == 0
    assert rig.device.stats()["rx_stalls"] == 1
    # Stopped, not spinning: the I/O thread sleeps while frames wait.
    before = iothread_cpu_seconds(rig)
    time.sleep(0.5)
    assert iothread_cpu_seconds(rig) - before < 0.2
    received = []
    while len(received) < len(frames):
        buffers = rig.post_rx(10, size=256)
        base = len(received)
        rig.wait_used(rig.rxq, base + len(buffers))
        for index, (_, addr) in enumerate(buffers):
            length = rig.rxq.used_elem((base + index) % rig.rxq.size)[1]
            received.append(rig.guest.read(addr, length)[HDR:])
    assert received == [frame[HDR:] for frame in frames]
    assert rig.device.stats()["rx_frames"] == 40 and rig.device.stats()["rx_dropped"] == 0


def test_when_the_tap_is_full_frames_wait_in_the_queue_and_all_arrive():
    rig = NetRig(sndbuf=4096, queue_size=64)
    try:
        frames = [header() + bytes([i]) * 1400 for i in range(24)]
        for frame in frames:
            rig.send(frame)
        time.sleep(0.3)
        assert rig.device.stats()["tx_stalls"] >= 1
        assert rig.txq.used_idx() < len(frames)  # the rest wait for the tap
        got = [rig.peer.recv(65536) for _ in frames]
        assert got == frames
        rig.wait_used(rig.txq, len(frames))
        assert rig.device.stats()["tx_errors"] == 0
    finally:
        rig.close()


def test_a_transmit_chain_shorter_than_the_header_is_answered_and_counted(rig):
    rig.send(b"short")
    rig.wait_used(rig.txq, 1)
    assert rig.device.stats()["tx_errors"] == 1
    rig.send(header() + b"next")
    assert rig.peer.recv(100) == header() + b"next"


def test_a_receive_chain_with_no_writable_bytes_breaks_the_device(rig):
    addr = rig.rx.buffer()
    rig.rx.post([(addr, 64, 0)])  # device-readable only
    os.eventfd_write(rig.rx_kick, 1)
    rig.peer.send(header() + b"x")
    deadline = time.monotonic() + 5
    while not rig.device.shared.broken:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert os.eventfd_read(rig.error_fd) >= 1
    assert rig.rxq.used_idx() == 0


@pytest.mark.parametrize("where", ["rx", "tx"])
def test_a_buffer_outside_guest_ram_breaks_the_device_and_touches_nothing(rig, where):
    driver, kick = (rig.rx, rig.rx_kick) if where == "rx" else (rig.tx, rig.tx_kick)
    driver.post([(rig.guest.base + rig.guest.size - 8, 64, F_WRITE if where == "rx" else 0)])
    os.eventfd_write(kick, 1)
    if where == "rx":
        rig.peer.send(header() + bytes(100))
    deadline = time.monotonic() + 5
    while not rig.device.shared.broken:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert rig.guest.guards_intact()


def test_without_a_tap_the_link_is_down_and_sent_frames_are_dropped(rig):
    assert rig.device.read_config(6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert rig.device.set_backend(None) is rig.tap
    assert rig.device.read_config(6, 2) == 0
    rig.send(header() + b"into the void")
    rig.wait_used(rig.txq, 1)
    assert rig.device.stats()["tx_dropped"] == 1
    rig.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        rig.peer.recv(100)


def test_the_mac_is_in_config_space_and_reading_it_is_remembered(rig):
    rig.device.config_read = False
    assert rig.device.read_config(0, 4).to_bytes(4, "little") == bytes.fromhex("525400ab")
    assert rig.device.config_read


def test_the_tap_is_told_the_offloads_the_guest_accepts():
    assert tap_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4) == \
        TUN_F_CSUM | TUN_F_TSO4
    assert tap_offloads(VIRTIO_NET_F_GUEST_TSO4) == 0  # TSO needs the checksum offload
    rig = NetRig(features=VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4
                 | VIRTIO_F_RING_EVENT_IDX)
    try:
        assert rig.tap.offloads[-1] == TUN_F_CSUM | TUN_F_TSO4
        with device_lock(rig.device.shared):
            rig.device.reset()
        assert not rig.device.c.rxq.active and not rig.device.c.txq.active
        assert rig.device.config_read is False
    finally:
        rig.close()


def wait_for(check, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_too_few_merged_buffers_wait_for_more_without_spinning(rig):
    """The buffers given back unused once made the device retry at once, forever, with its
    lock held."""
    (head, addr), = rig.post_rx(1, size=100)
    rig.peer.send(header() + bytes(range(188)))
    wait_for(lambda: rig.device.stats()["rx_stalls"] == 1, "no stall")
    before = iothread_cpu_seconds(rig)
    time.sleep(0.5)
    assert iothread_cpu_seconds(rig) - before < 0.2
    assert rig.rxq.used_idx() == 0
    # With EVENT_IDX off the driver always notifies; the next buffer completes the frame.
    (head2, addr2), = rig.post_rx(1, size=200)
    rig.wait_used(rig.rxq, 2)
    assert rig.rxq.used_elem(0) == (head, 100) and rig.rxq.used_elem(1) == (head2, 100)
    received = rig.guest.read(addr, 100) + rig.guest.read(addr2, 100)
    assert received[HDR:] == bytes(range(188))


def test_a_frame_no_ring_of_buffers_can_hold_is_dropped():
    rig = NetRig(queue_size=4)
    try:
        rig.post_rx(4, size=64)  # at most 256 bytes, whatever the guest does
        rig.peer.send(header() + bytes(1000))
        rig.peer.send(header() + b"next")
        rig.wait_used(rig.rxq, 1)
        assert rig.device.stats()["rx_dropped"] == 1
        assert rig.rxq.used_elem(0)[1] == HDR + 4
    finally:
        rig.close()


def test_a_broken_device_does_not_spin_on_a_readable_tap(rig):
    rig.rx.post([(rig.rx.buffer(), 64, 0)])  # device-readable only: breaks the device
    os.eventfd_write(rig.rx_kick, 1)
    rig.peer.send(header() + b"x")
    wait_for(lambda: rig.device.shared.broken, "the device never broke")
    for _ in range(20):
        rig.peer.send(header() + b"more")  # the tap stays readable
    time.sleep(0.2)
    before = iothread_cpu_seconds(rig)
    time.sleep(0.5)
    assert iothread_cpu_seconds(rig) - before < 0.2


def test_detaching_the_tap_answers_the_frames_that_waited_for_it():
    rig = NetRig(sndbuf=4096, queue_size=64)
    try:
        for i in range(24):
            rig.send(header() + bytes([i]) * 1400)
        wait_for(lambda: rig.device.stats()["tx_stalls"] >= 1, "the tap never filled")
        assert rig.txq.used_idx() < 24
        rig.device.set_backend(None)
        rig.wait_used(rig.txq, 24)
        assert rig.device.stats()["tx_dropped"] >= 1
    finally:
        rig.close()


def test_ecn_is_asked_of_the_tap_only_with_segmentation():
    ecn = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_ECN
    assert tap_offloads(ecn) == TUN_F_CSUM
    assert tap_offloads(ecn | VIRTIO_NET_F_GUEST_TSO4) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
