"""virtio-net (virtio 1.x §5.1): MAC, link status, offloads, and the tap behind it.

Frames are moved by the C data plane (csrc/dataplane/virtio_net.c).  Here the
device offers its features and config space, tells the tap which offloads
the guest accepts, and attaches or detaches the tap (hot-plug): a NIC without
a tap is a NIC with its link down.
"""

from __future__ import annotations

import contextlib
import logging
import struct

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, device_lock, new_c_device
from stratovirt_py.devices.virtio.mmio import QueueSetup, activate_ready_queues, read_config_bytes
from stratovirt_py.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    Tap,
    TapError,
)

log = logging.getLogger(__name__)

DEVICE_ID_NET = 1
QUEUE_MAX_SIZE = 256
RX_QUEUE, TX_QUEUE = 0, 1

VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_GUEST_UFO = 1 << 10
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_HOST_UFO = 1 << 14
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
FEATURES = (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN
            | VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_STATUS)

# What the tap may give the guest, by the guest's receive features.
TAP_OFFLOADS = ((VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM), (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6), (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
                (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO))

VIRTIO_NET_S_LINK_UP = 1
MAC_OFFSET = 0
MAC_BYTES = 6
# struct virtio_net_config as far as the offered features reach: mac, status,
# max_virtqueue_pairs.
CONFIG_LAYOUT = struct.Struct("<6sHH")


def tap_offloads(features: int) -> int:
    """The TUNSETOFFLOAD flags for what a driver with `features` accepts."""
    if not features & VIRTIO_NET_F_GUEST_CSUM:
        return 0  # segmentation offloads need the checksum one
    flags = sum(flag for feature, flag in TAP_OFFLOADS if features & feature)
    if not flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags &= ~TUN_F_TSO_ECN  # the kernel refuses ECN without TSO
    return flags


def format_mac(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def mac_from_text(text: str) -> bytes:
    """The six octets of a MAC that config.parse_mac accepted."""
    return bytes(int(part, 16) for part in text.split(":"))


class VirtioNet:
    """One virtio-net device (a slot): rx and tx queues; link up while a tap is attached."""

    device_id = DEVICE_ID_NET
    queue_max_sizes = (QUEUE_MAX_SIZE, QUEUE_MAX_SIZE)

    def __init__(self, name: str, wiring: DeviceWiring, mac: bytes) -> None:
        self.name = name
        self._c_memory = wiring.c_memory  # the C side points into it
        self.c = new_c_device(name, wiring, "struct svpy_net *", lib.svpy_net_init,
                              lib.svpy_net_attach)
        self.shared = ffi.addressof(self.c.dev, "shared")
        self.mac = mac
        self.backend: Tap | None = None
        self.driver_features = 0  # as of the last DRIVER_OK, until a reset
        # Linux reads the MAC once, at probe: after that a new one would go unseen.
        self.config_read = False

    @property
    def mac_text(self) -> str:
        return format_mac(self.mac)

    def set_mac(self, text: str) -> None:
        self.mac = mac_from_text(text)

    @property
    def link_up(self) -> bool:
        return self.backend is not None

    # VirtioDevice.

    def device_features(self) -> int:
        return FEATURES

    def config_bytes(self) -> bytes:
        return CONFIG_LAYOUT.pack(self.mac, VIRTIO_NET_S_LINK_UP if self.link_up else 0, 1)

    def read_config(self, offset: int, size: int) -> int:
        if offset < MAC_OFFSET + MAC_BYTES:
            self.config_read = True
        return read_config_bytes(self.config_bytes(), offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # VIRTIO_NET_F_CTRL_MAC_ADDR is not offered: the MAC is read-only

    def activate(self, features: int, queues: list[QueueSetup]) -> int:
        self.driver_features = features
        self.c.mrg_rxbuf = int(bool(features & VIRTIO_NET_F_MRG_RXBUF))
        error = activate_ready_queues(
            ((ffi.addressof(self.c, field), queue)
             for field, queue in zip(("rxq", "txq"), queues, strict=True)),
            features, QUEUE_MAX_SIZE, self._c_memory)
        if error:
            return error
        self._apply_offloads()
        lib.svpy_net_start(self.c)
        return 0

    def reset(self) -> None:
        lib.svpy_net_stop(self.c)
        self.driver_features = 0
        self.config_read = False

    def close(self) -> None:
        """Releases the C side's resources (the I/O thread must be stopped already)."""
        lib.svpy_net_destroy(self.c)

    # Backends (control plane, main loop).

    def set_backend(self, tap: Tap | None) -> Tap | None:
        """Attaches a tap (link up) or detaches it (link down); returns the previous one.

        The caller tells the guest (a config interrupt) and keeps the tap: it
        belongs to its netdev.
        """
        with device_lock(self.shared):
            previous = self.backend
            self.backend = tap
            self._apply_offloads()
            ret = lib.svpy_net_set_tap(self.c, tap.fd if tap is not None else -1)
            if ret < 0:
                self.backend = None
                lib.svpy_net_set_tap(self.c, -1)
                raise OSError(-ret, f"{self.name}: cannot watch tap '{tap.ifname}'"
                              if tap is not None else f"{self.name}: cannot detach its tap")
        return previous

    def _apply_offloads(self) -> None:
        if self.backend is None:
            return
        try:
            self.backend.set_offload(tap_offloads(self.driver_features))
        except TapError as exc:
            # Plain frames only, then: every guest takes those.
            log.warning("%s: %s; no offloads", self.name, exc)
            with contextlib.suppress(TapError):
                self.backend.set_offload(0)

    def stats(self) -> dict[str, int]:
        stats = self.c.stats
        return {name: getattr(stats, name) for name in (
            "rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "rx_dropped", "tx_errors",
            "tx_dropped", "rx_stalls", "tx_stalls", "yields")}
