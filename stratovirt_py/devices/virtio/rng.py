"""virtio-rng (virtio 1.x §5.4): entropy for the guest from a host random source.

Requests are served by the C data plane (csrc/dataplane/virtio_rng.c), which
reads the source straight into the guest's buffers and applies the rate limit
(max-bytes per period) with a timer on the I/O thread.  Here the source is
opened and the device has no features and no config space of its own.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.config import RngConfig
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, new_c_device
from stratovirt_py.devices.virtio.mmio import QueueSetup, activate_ready_queues
from stratovirt_py.errors import ConfigError

DEVICE_ID_RNG = 4
QUEUE_MAX_SIZE = 256
QUEUES = 1  # requestq

STAT_NAMES = ("requests", "bytes", "empty", "read_errors", "throttled", "source_waits",
              "yields")


def open_rng_source(config: RngConfig) -> int:
    """The random source, opened non-blocking (the I/O thread must never wait on it);
    a clear ConfigError naming the file if it cannot be read."""
    try:
        fd = os.open(config.filename, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"rng-random '{config.rng}': cannot open filename "
                          f"'{config.filename}': {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # open() succeeds on a directory; read() would not
        os.close(fd)
        raise ConfigError(f"rng-random '{config.rng}': filename '{config.filename}' "
                          "is a directory")
    return fd


class VirtioRng:
    device_id = DEVICE_ID_RNG
    queue_max_sizes = (QUEUE_MAX_SIZE,)

    def __init__(self, name: str, wiring: DeviceWiring, config: RngConfig,
                 source_fd: int) -> None:
        """Takes ownership of `source_fd` (closed by close())."""
        self.name = name
        self.config = config
        self._c_memory = wiring.c_memory  # the C side points into it
        self.source_fd = source_fd
        self.c: Any = new_c_device(name, wiring, "struct svpy_rng *", lib.svpy_rng_init,
                                   lib.svpy_rng_attach)
        self.shared = ffi.addressof(self.c.dev, "shared")
        lib.svpy_rng_configure(self.c, source_fd, config.max_bytes or 0, config.period_ms or 0)

    # VirtioDevice.

    def device_features(self) -> int:
        return 0  # virtio-rng has none of its own

    def read_config(self, offset: int, size: int) -> int:
        return 0  # and no config space

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def activate(self, features: int, queues: list[QueueSetup]) -> int:
        error = activate_ready_queues(((ffi.addressof(self.c, "vq"), queues[0]),), features,
                                      QUEUE_MAX_SIZE, self._c_memory)
        if error:
            return error
        lib.svpy_rng_start(self.c)
        return 0

    def reset(self) -> None:
        lib.svpy_rng_stop(self.c)

    def close(self) -> None:
        """After the I/O thread has stopped."""
        lib.svpy_rng_destroy(self.c)
        if self.source_fd >= 0:
            os.close(self.source_fd)
            self.source_fd = -1

    def stats(self) -> dict[str, int]:
        stats = self.c.stats
        return {name: getattr(stats, name) for name in STAT_NAMES}
