"""The backends devices use, registered apart from the devices, as QEMU keeps
-blockdev/-netdev apart from -device: block nodes (blockdev-add) and, in
their own name space, netdevs (netdev_add).
"""

from __future__ import annotations

import re

from stratovirt_py.config import DriveConfig
from stratovirt_py.slots import HotplugError
from stratovirt_py.tap import Tap

# QEMU's rule for node names and ids: a letter, then letters, digits, '-', '.', '_'.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,30}")


class BackendRegistry:
    def __init__(self) -> None:
        self.nodes: dict[str, DriveConfig] = {}  # registered, no device uses them yet
        self.netdevs: dict[str, Tap] = {}  # open taps, used by a NIC or not

    @staticmethod
    def check_name(name: str, what: str) -> None:
        if not NAME.fullmatch(name):
            raise HotplugError(f"Invalid {what}: '{name}'")
