"""The virtio-mmio transport's registers, driven as a guest driver writes them."""

from __future__ import annotations

import logging

import pytest

from stratovirt_py._dataplane import lib
from stratovirt_py.devices.virtio import guest_errors
from stratovirt_py.devices.virtio.guest_errors import GuestErrorLog
from stratovirt_py.devices.virtio.mmio import (
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_INTERRUPT_STATUS,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_SEL,
    REG_STATUS,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VirtioMmioTransport,
)
from tests.virtq_model import SECTOR, Queue, Rig

T_OUT = 1
S_OK = 0
FULLY_ON = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


class MmioDriver:
    """Writes a transport's registers in the order virtio 1.x §3.1.1 gives."""

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self.transport = transport

    def write(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    def read(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def initialise(self, queue: Queue, desc: int | None = None) -> None:
        status = STATUS_ACKNOWLEDGE
        self.write(REG_STATUS, 0)
        self.write(REG_STATUS, status)
        status |= STATUS_DRIVER
        self.write(REG_STATUS, status)
        for select, half in ((1, VIRTIO_F_VERSION_1 >> 32), (0, 0)):
            self.write(REG_DRIVER_FEATURES_SEL, select)
            self.write(REG_DRIVER_FEATURES, half)
        status |= STATUS_FEATURES_OK
        self.write(REG_STATUS, status)
        self.write(REG_QUEUE_SEL, 0)
        self.write(REG_QUEUE_NUM, queue.size)
        for low, high, address in (
                (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH,
                 queue.layout.desc if desc is None else desc),
                (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, queue.layout.avail),
                (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, queue.layout.used)):
            self.write(low, address & 0xFFFF_FFFF)
            self.write(high, address >> 32)
        self.write(REG_QUEUE_READY, 1)
        self.write(REG_STATUS, status | STATUS_DRIVER_OK)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, activate=False)
    yield r
    r.close()


@pytest.fixture
def transport(rig):
    return VirtioMmioTransport(rig.device, base=0xF0100000, irq=5)


def test_driver_ok_cleared_and_set_again_does_not_reactivate_the_queue(rig, transport):
    driver = MmioDriver(transport)
    driver.initialise(rig.queue)
    assert driver.read(REG_STATUS) == FULLY_ON
    status = rig.driver.submit(T_OUT, sector=2, data=b"\x11" * SECTOR)
    rig.run()
    assert rig.status(status) == S_OK
    rig.guest.write(status, b"\xee")
    lib.svpy_ack_interrupt(rig.device.shared, 0xFFFF_FFFF)

    driver.write(REG_STATUS, FULLY_ON & ~STATUS_DRIVER_OK)  # a driver error (§2.1.2)
    driver.write(REG_QUEUE_NUM, 8)  # queue set-up stays closed
    driver.write(REG_STATUS, FULLY_ON)

    assert driver.read(REG_STATUS) == FULLY_ON | STATUS_NEEDS_RESET
    assert driver.read(REG_INTERRUPT_STATUS) & lib.SVPY_INT_CONFIG
    assert transport.queues[0].size == rig.queue.size
    assert rig.status(status) == 0xEE  # the write was not served a second time
    assert rig.device.stats()["requests"] == 1
    assert transport.guest_errors.count == 1


def test_only_a_write_of_zero_resets(rig, transport):
    driver = MmioDriver(transport)
    driver.initialise(rig.queue)
    driver.write(REG_STATUS, STATUS_ACKNOWLEDGE)
    assert driver.read(REG_STATUS) == FULLY_ON | STATUS_NEEDS_RESET
    driver.write(REG_STATUS, 0)
    assert driver.read(REG_STATUS) == 0
    assert rig.device.shared.broken == 0


def test_the_driver_cannot_set_needs_reset(rig, transport):
    driver = MmioDriver(transport)
    driver.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_NEEDS_RESET)
    assert driver.read(REG_STATUS) == STATUS_ACKNOWLEDGE


def test_guest_errors_are_counted_and_logged_at_a_bounded_rate(rig, transport, caplog):
    driver = MmioDriver(transport)
    caplog.set_level(logging.WARNING)
    # 2000 initialisations with a descriptor table outside guest RAM: 36000
    # register writes, each DRIVER_OK a guest error.
    for _ in range(2000):
        driver.initialise(rig.queue, desc=0x7FFF_0000)
        assert driver.read(REG_STATUS) & STATUS_NEEDS_RESET
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == guest_errors.BURST + 1, lines
    assert all(line.startswith("vdt: ") for line in lines)
    assert "virtqueue ring outside guest RAM or misaligned; device needs reset" in lines[0]
    assert transport.guest_errors.count == 2000


def test_suppressed_guest_errors_are_reported_once_per_interval(caplog):
    now = [0.0]
    errors = GuestErrorLog("vdx", burst=2, interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    for _ in range(5):
        errors.report("bad ring")
    assert len(caplog.records) == 3  # two errors and the notice that more are counted
    now[0] = 9.0
    errors.report("bad ring")
    assert len(caplog.records) == 3
    now[0] = 12.5
    errors.report("bad chain")
    assert caplog.records[-1].getMessage() == (
        "vdx: guest error: bad chain (4 more since the last report)")
    assert errors.count == 7
