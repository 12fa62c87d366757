"""What the vCPU loop needs to answer the console's per-byte exits in C.

A console writer reads the UART's line status and writes its transmit
register for every byte.  The vCPU loop answers both in C
(csrc/dataplane/vcpu_fastpath.h) from two structs this keeps: the UART model
(serial.py) publishes its receive state and whether a transmit only sends
its byte; the console backend's output side (chardev.py, output_sink.py)
publishes where such a byte may be written and whether it may be now.  Each
side knows only its own half.
"""

from __future__ import annotations

from typing import Any

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.devices.serial import DATA, LSR


class ConsoleFastPath:
    """The structs the vCPU loop reads; `status` goes into its table (fastpath.uart)."""

    def __init__(self, port_base: int) -> None:
        self._output = ffi.new("struct svpy_console_output *")
        self._output.fd = -1  # not ready: transmits go to Python until the output says so
        self.status: Any = ffi.new("struct svpy_uart_status *")
        self.status.lsr_port = port_base + LSR
        self.status.thr_port = port_base + DATA
        self.status.output = self._output

    # The UART model's half (Serial's callbacks); single-byte stores, read atomically in C.

    def rx_ready_changed(self, ready: bool) -> None:
        self.status.rx_ready = int(ready)

    def thr_passthrough_changed(self, passthrough: bool) -> None:
        self.status.thr_passthrough = int(passthrough)

    # The output's half (output_sink.DirectWriter).

    def attach(self, fd: int, is_socket: bool) -> None:
        # Only while not ready: the vCPU loop reads these after seeing `ready`.
        assert not self._output.ready, "the output changed while C may write to it"
        self._output.fd = fd
        self._output.is_socket = int(is_socket)

    def set_ready(self, ready: bool) -> None:
        lib.svpy_console_output_set_ready(self._output, int(ready))

    def bytes_written(self) -> int:
        """Console bytes the vCPU loop wrote (or discarded) itself."""
        return int(self._output.written)
