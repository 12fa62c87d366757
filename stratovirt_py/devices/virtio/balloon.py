"""virtio-balloon (virtio 1.x §5.5): the memory target, the guest's answer, its statistics.

Page lists are processed by the C data plane (csrc/dataplane/virtio_balloon.c),
which gives inflated and reported pages back to the host.  Here the device
offers its features, keeps its config space (`num_pages`, the target set by
the host; `actual`, what the guest has given), and reads the statistics the
guest left in its buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.config import BalloonConfig
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, device_lock, new_c_device
from stratovirt_py.devices.virtio.mmio import QueueSetup, activate_ready_queues, read_config_bytes

DEVICE_ID_BALLOON = 5
QUEUE_MAX_SIZE = 256
PAGE_SIZE = 4096  # the balloon's unit, whatever the guest's page size
QUEUES = lib.SVPY_BALLOON_QUEUES  # inflate, deflate, statistics, free page reporting

VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2
VIRTIO_BALLOON_F_REPORTING = 1 << 5

# struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val.
CONFIG_LAYOUT = struct.Struct("<IIII")
ACTUAL_OFFSET = 4
STAT = struct.Struct("<HQ")
# What QEMU shows for a statistic the guest did not give: -1 as an unsigned 64-bit number.
STAT_NOT_REPORTED = 2**64 - 1
# QEMU's names for the virtio statistics tags (qom-get guest-stats).
STAT_NAMES = ("stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults",
              "stat-free-memory", "stat-total-memory", "stat-available-memory",
              "stat-disk-caches", "stat-htlb-pgalloc", "stat-htlb-pgfail")


def queue_roles(features: int) -> list[int]:
    """What each queue index serves: queues that do not exist take no index."""
    roles = [lib.SVPY_BALLOON_INFLATE, lib.SVPY_BALLOON_DEFLATE]
    if features & VIRTIO_BALLOON_F_STATS_VQ:
        roles.append(lib.SVPY_BALLOON_STATS)
    if features & VIRTIO_BALLOON_F_REPORTING:
        roles.append(lib.SVPY_BALLOON_REPORTING)
    return roles


class VirtioBalloon:
    device_id = DEVICE_ID_BALLOON
    queue_max_sizes = (QUEUE_MAX_SIZE,) * QUEUES

    def __init__(self, name: str, wiring: DeviceWiring, config: BalloonConfig,
                 on_actual_change: Callable[[int], None]) -> None:
        self.name = name
        self.config = config
        self._c_memory = wiring.c_memory  # the C side points into it
        self.c = new_c_device(name, wiring, "struct svpy_balloon *", lib.svpy_balloon_init,
                              lib.svpy_balloon_attach)
        self.shared = ffi.addressof(self.c.dev, "shared")
        self.num_pages = 0  # the target: pages the guest should give
        self.actual = 0  # pages it says it has given
        self._on_actual_change = on_actual_change  # called on a vCPU thread

    # VirtioDevice.

    def device_features(self) -> int:
        features = VIRTIO_BALLOON_F_STATS_VQ
        if self.config.deflate_on_oom:
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if self.config.free_page_reporting:
            features |= VIRTIO_BALLOON_F_REPORTING
        return features

    def config_bytes(self) -> bytes:
        return CONFIG_LAYOUT.pack(self.num_pages, self.actual, 0, 0)

    def read_config(self, offset: int, size: int) -> int:
        return read_config_bytes(self.config_bytes(), offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # Only `actual` is the driver's to write (a whole or part of it).
        if size not in (1, 2, 4) or offset < ACTUAL_OFFSET or offset + size > ACTUAL_OFFSET + 4:
            return
        config = bytearray(self.config_bytes())
        config[offset:offset + size] = value.to_bytes(size, "little")
        actual = CONFIG_LAYOUT.unpack(config)[1]
        if actual != self.actual:
            self.actual = actual
            self._on_actual_change(actual)

    def activate(self, features: int, queues: list[QueueSetup]) -> int:
        roles = queue_roles(features)
        error = activate_ready_queues(
            ((ffi.addressof(self.c, "vqs", index), queues[index]) for index in range(len(roles))),
            features, QUEUE_MAX_SIZE, self._c_memory)
        if error:
            return error
        for index, role in enumerate(roles):
            if queues[index].ready:
                self.c.roles[index] = role
        lib.svpy_balloon_start(self.c)
        return 0

    def reset(self) -> None:
        lib.svpy_balloon_stop(self.c)

    def close(self) -> None:
        lib.svpy_balloon_destroy(self.c)

    # Control plane.

    def set_target_pages(self, pages: int) -> None:
        self.num_pages = pages

    def request_stats(self) -> bool:
        """Hands the statistics buffer back for the guest to refill; False if it has none."""
        with device_lock(self.shared):
            return lib.svpy_balloon_request_stats(self.c) == 0

    def guest_stats(self) -> tuple[dict[str, int], int]:
        """The last statistics (QEMU's names and its "none" value) and when they
        came (seconds since the epoch, 0 if never)."""
        stats = dict.fromkeys(STAT_NAMES, STAT_NOT_REPORTED)
        with device_lock(self.shared):
            raw = bytes(ffi.buffer(self.c.stats, self.c.stats_len))
            updated = self.c.stats_time
        for offset in range(0, len(raw) - STAT.size + 1, STAT.size):
            tag, value = STAT.unpack_from(raw, offset)
            if tag < len(STAT_NAMES):
                stats[STAT_NAMES[tag]] = value
        return stats, updated

    def counters(self) -> dict[str, int]:
        counters = self.c.counters
        return {name: getattr(counters, name) for name in (
            "inflated_pages", "deflated_pages", "reported_bytes", "bad_frames",
            "released_bytes", "madvise_errors", "stats_updates")}
