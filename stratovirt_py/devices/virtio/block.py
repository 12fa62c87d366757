"""virtio-blk (virtio 1.x §5.2): configuration, feature bits and backend files.

Requests are served by the C data plane (csrc/dataplane/virtio_blk.c).  Here
the device offers its features and config space, opens and swaps backend
image files (hot-plug), and hands the C side its queue when the driver is
ready.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.config import DriveConfig
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, device_lock, new_c_device
from stratovirt_py.devices.virtio.mmio import QueueSetup, activate_queue, read_config_bytes

log = logging.getLogger(__name__)

DEVICE_ID_BLOCK = 2
QUEUE_MAX_SIZE = 256
SECTOR_SIZE = 512
# The limits the C side enforces (csrc/dataplane/virtio_blk.h says why these).
# Data segments per request, header and status apart, and bytes per segment:
# together they keep a driver's requests within the C side's request bound.
SEG_MAX = lib.SVPY_BLK_SEG_MAX
SIZE_MAX = lib.SVPY_BLK_SIZE_MAX
MAX_DISCARD_SECTORS = lib.SVPY_BLK_MAX_DISCARD_SECTORS  # per segment
MAX_DISCARD_SEGMENTS = lib.SVPY_BLK_MAX_DISCARD_SEGMENTS
MAX_WRITE_ZEROES_SECTORS = lib.SVPY_BLK_MAX_WRITE_ZEROES_SECTORS
MAX_WRITE_ZEROES_SEGMENTS = lib.SVPY_BLK_MAX_WRITE_ZEROES_SEGMENTS
DISCARD_ALIGNMENT_SECTORS = 8

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14
BASE_FEATURES = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)

# struct virtio_blk_config, as far as the offered features reach.
CONFIG_LAYOUT = struct.Struct("<QII HBB I BBH I BBH IIIII B3x")


class BackendError(OSError):
    """An image file could not be opened."""


def open_image(path: str, flags: int) -> int:
    """Opens a raw image (a regular file or a block device) without ever blocking.

    O_NONBLOCK keeps a FIFO or a device that waits in open() from stopping the
    monitor's event loop; anything but a regular file or block device is
    refused, and O_NONBLOCK is cleared again for the data plane.
    """
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise BackendError(exc.errno, f"Could not open '{path}': {exc.strerror}") from None
    except ValueError:  # an embedded NUL
        raise BackendError(errno.EINVAL, f"Could not open '{path}': invalid file name") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or _is_block_device(mode)):
            raise BackendError(errno.ENODEV, f"Could not open '{path}': not a regular file "
                               "or block device")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class DiskBackend:
    """An open image: the fds the C side uses and what the guest is told."""

    drive: DriveConfig
    fd: int
    buffered_fd: int
    sectors: int
    identity: tuple[int, int]  # (st_dev, st_ino), to spot the same image twice

    @staticmethod
    def open(drive: DriveConfig) -> DiskBackend:
        flags = os.O_RDONLY if drive.read_only else os.O_RDWR
        buffered_fd = open_image(drive.path, flags)
        try:
            info = os.fstat(buffered_fd)
            size = info.st_size if not _is_block_device(info.st_mode) else \
                os.lseek(buffered_fd, 0, os.SEEK_END)
            fd = buffered_fd
            if drive.direct:
                try:
                    # Through /proc: the very file just opened, whatever the path
                    # names by now.
                    fd = os.open(f"/proc/self/fd/{buffered_fd}",
                                 flags | os.O_DIRECT | os.O_CLOEXEC)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise BackendError(exc.errno, f"Could not open '{drive.path}' with "
                                           f"O_DIRECT: {exc.strerror}") from None
                    # tmpfs and some others have no O_DIRECT; the data still gets there.
                    log.warning("'%s' does not support O_DIRECT; using buffered I/O",
                                drive.path)
        except BaseException:
            os.close(buffered_fd)
            raise
        return DiskBackend(drive, fd, buffered_fd, size // SECTOR_SIZE,
                           (info.st_dev, info.st_ino))

    def close(self) -> None:
        # Whatever the guest wrote is on the file once the disk is gone.
        with contextlib.suppress(OSError):
            os.fdatasync(self.buffered_fd)
        for fd in {self.fd, self.buffered_fd}:
            with contextlib.suppress(OSError):
                os.close(fd)


def _is_block_device(mode: int) -> bool:
    return stat.S_ISBLK(mode)


class VirtioBlock:
    """One virtio-blk device (a slot); empty when it has no backend."""

    device_id = DEVICE_ID_BLOCK
    queue_max_sizes = (QUEUE_MAX_SIZE,)

    def __init__(self, name: str, wiring: DeviceWiring) -> None:
        self.name = name
        self._c_memory = wiring.c_memory  # the C side points into it
        self.c = new_c_device(name, wiring, "struct svpy_blk *", lib.svpy_blk_init,
                              lib.svpy_blk_attach)
        self.shared = ffi.addressof(self.c.dev, "shared")
        self.backend: DiskBackend | None = None

    # VirtioDevice.

    def device_features(self) -> int:
        read_only = self.backend is not None and self.backend.drive.read_only
        return BASE_FEATURES | (VIRTIO_BLK_F_RO if read_only else 0)

    def config_bytes(self) -> bytes:
        sectors = self.backend.sectors if self.backend else 0
        return CONFIG_LAYOUT.pack(
            sectors, SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry
            SECTOR_SIZE,
            0, 0, 0,  # topology: physical block exponent, alignment, min io size
            0,  # opt_io_size
            0, 0, 1,  # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, DISCARD_ALIGNMENT_SECTORS,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS,
            1,  # write_zeroes_may_unmap
        )

    def read_config(self, offset: int, size: int) -> int:
        return read_config_bytes(self.config_bytes(), offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # writeback is not offered: the config space is read-only

    def activate(self, features: int, queues: list[QueueSetup]) -> int:
        queue = queues[0]
        if not queue.ready:
            return 0
        self.c.discard = int(bool(features & VIRTIO_BLK_F_DISCARD))
        self.c.write_zeroes = int(bool(features & VIRTIO_BLK_F_WRITE_ZEROES))
        error = activate_queue(ffi.addressof(self.c, "vq"), queue, features, QUEUE_MAX_SIZE,
                               self._c_memory)
        if error:
            return error
        lib.svpy_blk_process(self.c)  # requests queued before DRIVER_OK
        return 0

    def reset(self) -> None:
        # Requests still in flight belong to the old driver: finish them unanswered.
        lib.svpy_blk_drain(self.c, 0)
        lib.svpy_vq_deactivate(ffi.addressof(self.c, "vq"))

    def close(self) -> None:
        """Releases the C side's resources (the I/O thread must be stopped already).

        Not needed at process exit, where the kernel releases them faster.
        """
        lib.svpy_blk_destroy(self.c)

    # Backends (control plane, main loop).

    def set_backend(self, backend: DiskBackend | None) -> DiskBackend | None:
        """Swaps the image under the device lock; returns the previous one (to close)."""
        with device_lock(self.shared):
            # The old image must see every request in flight finish first.
            lib.svpy_blk_drain(self.c, 1)
            previous = self.backend
            self.backend = backend
            if backend is None:
                self.c.fd = self.c.buffered_fd = -1
                self.c.capacity = 0
                self.c.read_only = 0
                self.c.serial = b"\0" * lib.SVPY_BLK_ID_BYTES
            else:
                if backend.fd != backend.buffered_fd and lib.svpy_blk_enable_aio(self.c) < 0:
                    log.warning("%s: Linux AIO unavailable; O_DIRECT requests run one at a "
                                "time", self.name)
                self.c.fd = backend.fd
                self.c.buffered_fd = backend.buffered_fd
                self.c.capacity = backend.sectors
                self.c.read_only = int(backend.drive.read_only)
                serial = (backend.drive.serial or "").encode()[:lib.SVPY_BLK_ID_BYTES]
                self.c.serial = serial.ljust(lib.SVPY_BLK_ID_BYTES, b"\0")
        return previous

    def stats(self) -> dict[str, int]:
        stats = self.c.stats
        return {"requests": stats.requests, "read_bytes": stats.read_bytes,
                "written_bytes": stats.written_bytes, "errors": stats.errors,
                "yields": stats.yields, "aio_submits": stats.aio_submits}
