"""Linux tap devices: the host side of a virtio-net NIC.

A tap is opened with IFF_VNET_HDR and a 12-byte header (virtio_net_hdr_v1,
what a VERSION_1 guest uses), so frames pass between the guest and the tap
unchanged, offload metadata included; the C data plane moves them.  The fd is
non-blocking: the data plane waits for it with epoll.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
IFREQ = struct.Struct("16sH22x")

# TUNSETOFFLOAD: what the tap may hand us (and so the guest) unsegmented or
# without a checksum.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_BYTES = 12


class TapError(Exception):
    """A tap could not be opened or used; the message is for the user."""


class Tap:
    def __init__(self, fd: int, ifname: str) -> None:
        self.fd = fd
        self.ifname = ifname

    @staticmethod
    def open(ifname: str) -> Tap:
        """Opens tap `ifname`, creating it if it does not exist (this needs CAP_NET_ADMIN)."""
        encoded = ifname.encode()
        if not encoded or len(encoded) >= IFNAMSIZ or b"/" in encoded or b"\0" in encoded \
                or encoded.strip() != encoded:
            raise TapError(f"Invalid tap name '{ifname}': 1 to {IFNAMSIZ - 1} characters, "
                           "no '/' or spaces")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"Failed to open {TUN_DEVICE}: {exc.strerror}") from None
        try:
            request = IFREQ.pack(encoded, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                reply = fcntl.ioctl(fd, TUNSETIFF, request)
            except OSError as exc:
                raise TapError(_open_error(ifname, exc)) from None
            tap = Tap(fd, IFREQ.unpack(reply)[0].rstrip(b"\0").decode(errors="replace"))
            tap._set_header_size()
            tap.set_offload(0)
        except BaseException:
            os.close(fd)
            raise
        return tap

    @staticmethod
    def from_fd(fd: int) -> Tap:
        """A tap someone else opened (libvirt, Kata): it must be a tap with IFF_VNET_HDR.

        The fd is ours from here on; the caller closes it if this refuses it.
        """
        try:
            reply = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size))
        except OSError as exc:
            what = "is not open" if exc.errno == errno.EBADF else "is not a tap device"
            raise TapError(f"fd {fd} {what}") from None
        name, flags = IFREQ.unpack(reply)
        ifname = name.rstrip(b"\0").decode(errors="replace")
        if not flags & IFF_TAP:
            raise TapError(f"fd {fd} ('{ifname}') is a tun device, not a tap")
        if not flags & IFF_VNET_HDR:
            raise TapError(f"fd {fd} ('{ifname}') was opened without IFF_VNET_HDR, which "
                           "virtio-net needs for its header")
        if not flags & IFF_NO_PI:
            raise TapError(f"fd {fd} ('{ifname}') was opened without IFF_NO_PI")
        tap = Tap(fd, ifname)
        tap._set_header_size()
        tap.set_offload(0)
        os.set_blocking(fd, False)
        return tap

    def _set_header_size(self) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_BYTES))
        except OSError as exc:
            raise TapError(f"tap '{self.ifname}': cannot set the virtio-net header size: "
                           f"{exc.strerror}") from None

    def set_offload(self, flags: int) -> None:
        """What the guest accepts (TUN_F_*): the tap hands over only such frames."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise TapError(f"tap '{self.ifname}': TUNSETOFFLOAD {flags:#x}: "
                           f"{exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _open_error(ifname: str, exc: OSError) -> str:
    if exc.errno == errno.EBUSY:
        return "Tap device already in use"
    if exc.errno == errno.EINVAL:
        return f"'{ifname}' exists and is not a tap device"
    if exc.errno == errno.EPERM:
        return f"Failed to create tap '{ifname}': permission denied (CAP_NET_ADMIN)"
    return f"Failed to open tap '{ifname}': {exc.strerror}"
