"""virtio-rng: the C data plane on synthetic guest memory, and its configuration.

The device reads from a real source: /dev/urandom, a pipe (so that a test
controls what arrives and when, and an empty source is an EAGAIN), or an empty
file (a source at its end).  The rate limit is checked by counting the bytes
delivered against the periods that can have begun since the requests were
posted, never against a tight wall-clock duration.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from stratovirt_py._dataplane import lib
from stratovirt_py.cli import parse_args
from stratovirt_py.config import RngConfig
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, IoThread, device_lock
from stratovirt_py.devices.virtio.mmio import VIRTIO_F_VERSION_1, QueueSetup
from stratovirt_py.devices.virtio.rng import DEVICE_ID_RNG, VirtioRng, open_rng_source
from stratovirt_py.errors import ConfigError
from tests.virtq_model import F_NEXT, F_WRITE, Queue, SyntheticGuest

PREFILL = 0x5A
QUEUE_SIZE = 16


class RngRig:
    def __init__(self, source_fd: int, max_bytes: int | None = None,
                 period_ms: int | None = None) -> None:
        self.guest = SyntheticGuest(size=1 << 20, base=0x10000)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        self.irqfd, self.error_fd, self.kick = self.fds
        self.iothread = IoThread()
        self.device = VirtioRng("rng", DeviceWiring(
            self.guest.mem, self.iothread, self.irqfd, self.error_fd, (self.kick,)),
            RngConfig(max_bytes=max_bytes, period_ms=period_ms), source_fd)
        self.queue = Queue(self.guest, size=QUEUE_SIZE)
        self.data = self.queue.data_area
        self.guest.write(self.data, bytes([PREFILL]) * (512 << 10))
        self.next_desc = 0
        setup = QueueSetup(size=QUEUE_SIZE, ready=True, desc=self.queue.layout.desc,
                           driver=self.queue.layout.avail, device=self.queue.layout.used)
        with device_lock(self.device.shared):
            assert self.device.activate(VIRTIO_F_VERSION_1, [setup]) == 0

    def post(self, pieces: list[tuple[int, int, int]], kick: bool = True) -> None:
        """One chain of (guest address, length, flags) descriptors."""
        q = self.queue
        indices = [(self.next_desc + i) % q.size for i in range(len(pieces))]
        self.next_desc += len(pieces)
        for position, ((addr, length, flags), index) in enumerate(zip(pieces, indices,
                                                                      strict=True)):
            more = position + 1 < len(pieces)
            q.set_desc(index, addr, length, flags | (F_NEXT if more else 0),
                       indices[position + 1] if more else 0)
        q.publish(indices[0])
        if kick:
            os.eventfd_write(self.kick, 1)

    def wait_used(self, count: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.queue.used_idx() < count:
            assert time.monotonic() < deadline, \
                f"the device answered {self.queue.used_idx()} of {count}"
            time.sleep(0.001)

    def used_lens(self) -> list[int]:
        return [self.queue.used_elem(i)[1] for i in range(self.queue.used_idx())]

    def close(self) -> None:
        self.iothread.stop()
        self.device.close()
        for fd in self.fds:
            os.close(fd)
        assert self.guest.guards_intact()


def urandom() -> int:
    return os.open("/dev/urandom", os.O_RDONLY | os.O_NONBLOCK)


@pytest.fixture
def rig():
    r = RngRig(urandom())
    yield r
    r.close()


def test_the_device_is_entropy_with_one_queue(rig):
    assert rig.device.device_id == DEVICE_ID_RNG == 4
    assert rig.device.queue_max_sizes == (256,)
    assert rig.device.device_features() == 0 and rig.device.read_config(0, 4) == 0


def test_random_bytes_fill_the_buffer_and_the_used_length_says_how_many(rig):
    rig.post([(rig.data, 64, F_WRITE)])
    rig.wait_used(1)
    head, length = rig.queue.used_elem(0)
    assert (head, length) == (0, 64)
    data = rig.guest.read(rig.data, 64)
    assert data != bytes([PREFILL]) * 64 and len(set(data)) > 8  # 64 random bytes, not a fill
    assert rig.guest.read(rig.data + 64, 64) == bytes([PREFILL]) * 64  # nothing past it
    assert os.eventfd_read(rig.irqfd) >= 1
    assert rig.device.stats()["bytes"] == 64 and rig.device.stats()["requests"] == 1


def test_a_chain_split_over_descriptors_is_filled_in_order(rig):
    header = rig.data + 4096
    rig.guest.write(header, b"R" * 8)
    pieces = [(header, 8, 0), (rig.data, 5, F_WRITE), (rig.data + 100, 7, F_WRITE),
              (rig.data + 200, 20, F_WRITE)]
    rig.post(pieces)
    rig.wait_used(1)
    assert rig.used_lens() == [32]
    assert rig.guest.read(header, 8) == b"R" * 8  # device-readable: left alone
    for addr, length in ((rig.data, 5), (rig.data + 100, 7), (rig.data + 200, 20)):
        assert rig.guest.read(addr + length, 1) == bytes([PREFILL])
    written = b"".join(rig.guest.read(a, n) for a, n in
                       ((rig.data, 5), (rig.data + 100, 7), (rig.data + 200, 20)))
    assert written != bytes([PREFILL]) * 32
    assert rig.guest.read(rig.data + 5, 95) == bytes([PREFILL]) * 95


def test_a_chain_with_nothing_writable_is_answered_empty(rig):
    rig.post([(rig.data, 64, 0)])
    rig.wait_used(1)
    assert rig.used_lens() == [0]
    assert rig.guest.read(rig.data, 64) == bytes([PREFILL]) * 64
    assert rig.device.stats()["empty"] == 1
    assert not rig.device.shared.broken
    rig.post([(rig.data, 16, F_WRITE)])  # the queue still works
    rig.wait_used(2)
    assert rig.used_lens() == [0, 16]


def test_a_huge_buffer_gets_at_most_the_request_cap(rig):
    size = 512 << 10
    rig.post([(rig.data, size, F_WRITE)])
    rig.wait_used(1)
    cap = lib.SVPY_RNG_MAX_REQUEST_BYTES
    assert rig.used_lens() == [cap]
    assert rig.guest.read(rig.data + cap, size - cap) == bytes([PREFILL]) * (size - cap)


def test_a_buffer_outside_guest_ram_breaks_the_device_and_writes_nothing(rig):
    end = rig.guest.base + rig.guest.size
    rig.post([(end - 8, 64, F_WRITE)])
    deadline = time.monotonic() + 5
    while not rig.device.shared.broken:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert rig.device.shared.broken == 6  # SVPY_VQ_ERR_BUFFER_ADDRESS: NEEDS_RESET follows
    assert rig.queue.used_idx() == 0
    assert os.eventfd_read(rig.error_fd) == 1
    assert rig.device.stats()["bytes"] == 0


def collect(rig: RngRig, count: int, timeout: float) -> list[tuple[float, int]]:
    """(time seen, bytes delivered so far) at every change until `count` chains are used."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    used = 0
    while used < count:
        assert time.monotonic() < deadline, f"only {used} of {count} answered"
        now_used = rig.queue.used_idx()
        if now_used != used:
            used = now_used
            seen.append((time.monotonic(), sum(rig.used_lens()[:used])))
        time.sleep(0.002)
    return seen


def test_the_rate_limit_gives_at_most_max_bytes_per_period():
    max_bytes, period = 64, 0.1
    rig = RngRig(urandom(), max_bytes=64, period_ms=100)
    try:
        # A burst: 16 requests of 16 bytes (256 bytes, four periods' worth), one kick.
        for index in range(QUEUE_SIZE):
            rig.post([(rig.data + 64 * index, 16, F_WRITE)], kick=False)
        posted = time.monotonic()
        os.eventfd_write(rig.kick, 1)
        seen = collect(rig, QUEUE_SIZE, timeout=10)
        for when, delivered in seen:
            # The first period began after the post; period k after k periods more.
            periods = int((when - posted) / period) + 1
            assert delivered <= max_bytes * periods, (when - posted, delivered)
        assert seen[-1][1] == 256 and rig.used_lens() == [16] * QUEUE_SIZE
        # 256 bytes need four periods: the last cannot begin before three have passed.
        assert seen[-1][0] - posted >= 3 * period
        stats = rig.device.stats()
        assert stats["throttled"] >= 3 and stats["bytes"] == 256
        for index in range(QUEUE_SIZE):
            assert rig.guest.read(rig.data + 64 * index, 16) != bytes([PREFILL]) * 16
    finally:
        rig.close()


def test_a_request_larger_than_the_budget_gets_what_is_left_then_waits():
    rig = RngRig(urandom(), max_bytes=64, period_ms=100)
    try:
        rig.post([(rig.data, 200, F_WRITE)], kick=False)
        rig.post([(rig.data + 256, 200, F_WRITE)])
        posted = time.monotonic()
        rig.wait_used(1)
        assert rig.used_lens()[0] == 64
        rig.wait_used(2)
        assert time.monotonic() - posted >= 0.1
        assert rig.used_lens() == [64, 64]
        assert rig.guest.read(rig.data + 64, 136) == bytes([PREFILL]) * 136
    finally:
        rig.close()


def test_without_a_limit_a_burst_is_served_at_once(rig):
    for index in range(QUEUE_SIZE):
        rig.post([(rig.data + 64 * index, 64, F_WRITE)], kick=False)
    os.eventfd_write(rig.kick, 1)
    rig.wait_used(QUEUE_SIZE)
    assert rig.device.stats()["throttled"] == 0 and rig.device.stats()["bytes"] == 1024


def test_bytes_come_from_the_source_and_an_empty_source_is_waited_for():
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    rig = RngRig(read_end)
    try:
        rig.post([(rig.data, 64, F_WRITE)])
        deadline = time.monotonic() + 5
        while rig.device.stats()["source_waits"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.05)
        assert rig.queue.used_idx() == 0  # still in the avail ring, nothing made up
        os.write(write_end, b"0123456789")
        rig.wait_used(1)
        assert rig.used_lens() == [10]
        assert rig.guest.read(rig.data, 11) == b"0123456789" + bytes([PREFILL])
        os.write(write_end, b"abc")  # a second wait is armed again
        rig.post([(rig.data + 64, 64, F_WRITE)])
        rig.wait_used(2)
        assert rig.used_lens() == [10, 3]
    finally:
        rig.close()
        os.close(write_end)


def test_a_source_at_its_end_gives_zero_bytes(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    rig = RngRig(os.open(empty, os.O_RDONLY | os.O_NONBLOCK))
    try:
        rig.post([(rig.data, 64, F_WRITE)])
        rig.wait_used(1)
        assert rig.used_lens() == [0]
        assert rig.device.stats()["read_errors"] == 1
        assert not rig.device.shared.broken
    finally:
        rig.close()


def test_reset_while_waiting_for_a_period_then_the_guest_starts_again():
    rig = RngRig(urandom(), max_bytes=64, period_ms=200)
    try:
        rig.post([(rig.data, 64, F_WRITE)], kick=False)
        rig.post([(rig.data + 64, 64, F_WRITE)])
        rig.wait_used(1)
        with device_lock(rig.device.shared):
            rig.device.reset()
        time.sleep(0.3)
        assert rig.queue.used_idx() == 1  # a stopped device answers nothing
    finally:
        rig.close()


# Configuration: the command line, the JSON file, the source.

KERNEL = ["-kernel", "/boot/vmlinux"]
OBJECT = ["-object", "rng-random,id=objrng0,filename=/dev/urandom"]


def parse(*args: str):
    return parse_args([*KERNEL, *args])


def test_command_line_rng():
    config = parse(*OBJECT, "-device",
                   "virtio-rng-device,rng=objrng0,id=rng1,max-bytes=1234,period=1000")
    assert config.rng == RngConfig(id="rng1", rng="objrng0", filename="/dev/urandom",
                                   max_bytes=1234, period_ms=1000)
    # The object may come after the device; no rate means no limit; mmio alias.
    config = parse("-device", "virtio-rng-mmio,rng=objrng0", *OBJECT)
    assert config.rng == RngConfig(id="rng0", rng="objrng0", filename="/dev/urandom")
    assert parse(*OBJECT).rng is None


@pytest.mark.parametrize(("args", "message"), [
    (["-device", "virtio-rng-device,rng=nope"],
     "rng='nope' names no -object rng-random"),
    ([*OBJECT, "-device", "virtio-rng-device"], "rng=<id of an -object rng-random> is required"),
    (["-object", "rng-random,id=r"], "invalid -object rng-random: filename=<path> is required"),
    (["-object", "rng-random,filename=/dev/urandom"], "invalid -object rng-random: 'id' is "
     "required"),
    (["-object", "rng-random,id=r,filename=/dev/urandom,size=4"],
     "unknown parameter 'size'"),
    ([*OBJECT, *OBJECT], "-object rng-random id 'objrng0' is used twice"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=100"],
     "max-bytes and period go together ('period' is missing)"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,period=100"],
     "max-bytes and period go together ('max-bytes' is missing)"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=63,period=1000"],
     "max-bytes=63,period=1000 is 63 bytes/s; the rate must lie in [64, 1000000000]"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=1000000001,period=1000"],
     "is 1000000001 bytes/s; the rate must lie in [64, 1000000000]"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=64,period=0"],
     "period=0 is out of range"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=-64,period=1000"],
     "the rate must lie in [64, 1000000000]"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=lots,period=1000"],
     "invalid max-bytes 'lots': expected an integer"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,id="], "empty id"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0,speed=9"], "unknown parameter 'speed'"),
    ([*OBJECT, "-device", "virtio-rng-device,rng=objrng0", "-device",
      "virtio-rng-device,rng=objrng0"], "only one virtio-rng device is supported"),
])
def test_command_line_errors(args, message):
    with pytest.raises(ConfigError) as error:
        parse(*args)
    assert message in str(error.value)


def test_rate_bounds_are_inclusive():
    low = parse(*OBJECT, "-device", "virtio-rng-device,rng=objrng0,max-bytes=64,period=1000")
    assert low.rng is not None and low.rng.max_bytes == 64
    high = parse(*OBJECT, "-device",
                 "virtio-rng-device,rng=objrng0,max-bytes=1000000000,period=1000")
    assert high.rng is not None and high.rng.period_ms == 1000


def write_json(tmp_path, data) -> str:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_json_rng(tmp_path):
    boot = {"boot-source": {"kernel_image_path": "/k"}}
    config = parse_args(["-config", write_json(tmp_path, {
        **boot, "rng": {"random_file": "/dev/random", "bytes_per_sec": 4096}})])
    assert config.rng == RngConfig(filename="/dev/random", max_bytes=4096, period_ms=1000)
    config = parse_args(["-config", write_json(tmp_path, {**boot, "rng": {
        "random_file": "/dev/urandom"}})])
    assert config.rng == RngConfig(filename="/dev/urandom")
    # The command line wins over the file.
    config = parse_args(["-config", write_json(tmp_path, {**boot, "rng": {
        "random_file": "/dev/random"}}), *OBJECT, "-device", "virtio-rng-device,rng=objrng0"])
    assert config.rng is not None and config.rng.filename == "/dev/urandom"


@pytest.mark.parametrize(("rng", "message"), [
    ({}, "'rng.random_file' is required"),
    ({"random_file": ""}, "'rng.random_file' is empty"),
    ({"random_file": 5}, "'rng.random_file' has the wrong type"),
    ({"random_file": "/dev/urandom", "bytes_per_sec": 63},
     "rng.bytes_per_sec=63 is out of range [64, 1000000000]"),
    ({"random_file": "/dev/urandom", "bytes_per_sec": 10**10}, "is out of range"),
    ({"random_file": "/dev/urandom", "bytes_per_sec": "fast"}, "has the wrong type"),
    ({"random_file": "/dev/urandom", "period": 5}, "unknown field 'rng.period'"),
])
def test_json_rng_errors(tmp_path, rng, message):
    path = write_json(tmp_path, {"boot-source": {"kernel_image_path": "/k"}, "rng": rng})
    with pytest.raises(ConfigError) as error:
        parse_args(["-config", path])
    assert message in str(error.value)


def test_the_source_must_be_readable(tmp_path):
    fd = open_rng_source(RngConfig(filename="/dev/urandom"))
    assert len(os.read(fd, 16)) == 16
    os.close(fd)
    missing = str(tmp_path / "nothing")
    with pytest.raises(ConfigError) as error:
        open_rng_source(RngConfig(rng="r0", filename=missing))
    assert str(error.value) == (f"rng-random 'r0': cannot open filename '{missing}': "
                                "No such file or directory")
    with pytest.raises(ConfigError, match="is a directory"):
        open_rng_source(RngConfig(filename=str(tmp_path)))


def test_daemon_paths_are_made_absolute():
    config = parse("-object", "rng-random,id=r,filename=random.bin", "-device",
                   "virtio-rng-device,rng=r").with_absolute_paths()
    assert config.rng is not None
    assert config.rng.filename == os.path.join(os.getcwd(), "random.bin")

