"""A 16550A UART at 0x3f8/IRQ 4: the guest console.

Register behaviour follows the 16550A data sheet closely enough for Linux's
8250 driver, including its probe (scratch register, loopback test) and the
transmitter-empty interrupt it needs to start sending.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

# Register offsets.
DATA = 0  # RBR on read, THR on write; DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR = 2  # FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_MASK = 0x0F
IIR_NONE = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_BITS = 0xC0
FCR_ENABLE_FIFO = 0x01
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_IDLE = 0x40
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# A console with no modem lines: carrier, data set ready and clear to send.
MSR_DEFAULT = MSR_DCD | MSR_DSR | MSR_CTS

RX_BUFFER_LIMIT = 4096


class Serial:
    """The UART's registers; output goes to `write_output`, IRQ changes to `set_irq`.

    The vCPU loop answers some accesses in C from what this model publishes
    (csrc/dataplane/vcpu_fastpath.h): line status reads from `rx_ready_changed`
    (received bytes start or stop waiting), and transmit register writes while
    `thr_passthrough_changed` last said True: the divisor latch, loopback and
    the transmitter-empty interrupt are all off, so such a write only sends its
    byte and changes nothing here (enabling that interrupt raises it anyway).
    """

    def __init__(self, write_output: Callable[[bytes], None],
                 set_irq: Callable[[bool], None],
                 rx_ready_changed: Callable[[bool], None] | None = None,
                 thr_passthrough_changed: Callable[[bool], None] | None = None) -> None:
        self._write_output = write_output
        self._set_irq = set_irq
        self._rx_ready_changed = rx_ready_changed
        self._rx_ready = False
        self._thr_passthrough_changed = thr_passthrough_changed
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03  # 8 data bits, no parity, one stop bit
        self._mcr = MCR_OUT2
        self._msr = MSR_DEFAULT
        self._scr = 0
        self._divisor = 12  # 9600 baud
        self._fifo_enabled = False
        self._thr_interrupt_pending = False
        self._irq_level = False
        self._thr_passthrough = self._transmit_only_sends()
        if thr_passthrough_changed is not None:
            thr_passthrough_changed(self._thr_passthrough)

    # Guest side (vCPU threads).

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read_register(offset)
            self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            output = self._write_register(offset, value & 0xFF)
            self._update_irq()
        if output is not None:
            self._write_output(output)

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._divisor & 0xFF
            if not self._rx:
                return 0
            value = self._rx.popleft()
            self._space.notify_all()
            return value
        if offset == IER:
            return (self._divisor >> 8) if dlab else self._ier
        if offset == IIR:
            fifo_bits = IIR_FIFO_BITS if self._fifo_enabled else 0
            if self._ier & IER_RDI and self._rx:
                return IIR_RDI | fifo_bits
            if self._ier & IER_THRI and self._thr_interrupt_pending:
                # Reading IIR acknowledges the transmitter-empty interrupt.
                self._thr_interrupt_pending = False
                return IIR_THRI | fifo_bits
            return IIR_NONE | fifo_bits
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_IDLE | (LSR_DATA_READY if self._rx else 0)
        if offset == MSR:
            return self._modem_status()
        return self._scr

    def _modem_status(self) -> int:
        if self._mcr & MCR_LOOP:
            # Loopback wires the modem control outputs to the status inputs.
            return ((MSR_CTS if self._mcr & MCR_RTS else 0)
                    | (MSR_DSR if self._mcr & MCR_DTR else 0)
                    | (MSR_RI if self._mcr & MCR_OUT1 else 0)
                    | (MSR_DCD if self._mcr & MCR_OUT2 else 0))
        return self._msr

    def _write_register(self, offset: int, value: int) -> bytes | None:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
                return None
            self._thr_interrupt_pending = True
            if self._mcr & MCR_LOOP:
                if len(self._rx) < RX_BUFFER_LIMIT:
                    self._rx.append(value)
                return None
            return bytes((value,))
        if offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
                return None
            if value & IER_THRI and not self._ier & IER_THRI:
                # Enabling the interrupt while the transmitter is empty raises it.
                self._thr_interrupt_pending = True
            self._ier = value & IER_MASK
        elif offset == IIR:
            self._fifo_enabled = bool(value & FCR_ENABLE_FIFO)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & MCR_MASK
        elif offset == SCR:
            self._scr = value
        return None

    def _transmit_only_sends(self) -> bool:
        return not (self._lcr & LCR_DLAB or self._mcr & MCR_LOOP or self._ier & IER_THRI)

    def _update_irq(self) -> None:
        # Every register access and every input ends here, so what the fast
        # path shows follows the receive buffer and the registers.
        ready = bool(self._rx)
        if ready != self._rx_ready:
            self._rx_ready = ready
            if self._rx_ready_changed is not None:
                self._rx_ready_changed(ready)
        passthrough = self._transmit_only_sends()
        if passthrough != self._thr_passthrough:
            self._thr_passthrough = passthrough
            if self._thr_passthrough_changed is not None:
                self._thr_passthrough_changed(passthrough)
        level = bool((self._ier & IER_RDI and self._rx)
                     or (self._ier & IER_THRI and self._thr_interrupt_pending))
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    # Host side (console input threads).

    def feed_input(self, data: bytes) -> None:
        """Queues bytes for the guest, waiting while the receive buffer is full."""
        for byte in data:
            with self._lock:
                while len(self._rx) >= RX_BUFFER_LIMIT:
                    self._space.wait(timeout=0.1)
                self._rx.append(byte)
                self._update_irq()
