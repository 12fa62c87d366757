"""The slice of the i8042 keyboard controller a microvm needs: the reset line.

Linux with `reboot=k` writes 0xFE to port 0x64 to reboot; a microvm treats a
guest reboot as the end of the VM, as StratoVirt and Firecracker do.
"""

from __future__ import annotations

from collections.abc import Callable

COMMAND_RESET = 0xFE
STATUS_PORT_OFFSET = 4  # 0x64 relative to 0x60
DATA_PORT_OFFSET = 0


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        # Status 0: no data to read, input buffer empty (ready for commands).
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == STATUS_PORT_OFFSET and value & 0xFF == COMMAND_RESET:
            self._on_reset()
