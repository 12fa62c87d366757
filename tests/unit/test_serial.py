"""The 16550 UART's registers as Linux's 8250 driver uses them."""

from stratovirt_py.devices import serial as uart
from stratovirt_py.devices.serial import Serial


class Harness:
    def __init__(self) -> None:
        self.output = bytearray()
        self.irq_levels: list[bool] = []
        self.uart = Serial(self.output.extend, self.irq_levels.append)

    def read(self, offset: int) -> int:
        return self.uart.read(offset, 1)

    def write(self, offset: int, value: int) -> None:
        self.uart.write(offset, 1, value)


def test_transmit_goes_to_the_backend():
    h = Harness()
    for byte in b"hello\n":
        assert h.read(uart.LSR) & uart.LSR_THR_EMPTY
        h.write(uart.DATA, byte)
    assert bytes(h.output) == b"hello\n"
    assert h.irq_levels == []  # no interrupt without IER


def test_scratch_register_and_divisor_latch():
    h = Harness()
    h.write(uart.SCR, 0xA5)
    assert h.read(uart.SCR) == 0xA5
    h.write(uart.LCR, 0x83)
    h.write(uart.DATA, 0x01)
    h.write(uart.IER, 0x00)
    assert (h.read(uart.DATA), h.read(uart.IER)) == (0x01, 0x00)
    h.write(uart.LCR, 0x03)
    assert h.output == b""  # divisor writes are not data


def test_loopback_reflects_modem_lines_and_data():
    h = Harness()
    h.write(uart.MCR, uart.MCR_LOOP | 0x0A)  # RTS | OUT2, as Linux's probe does
    assert h.read(uart.MSR) & 0xF0 == 0x90
    h.write(uart.DATA, 0x55)
    assert h.read(uart.LSR) & uart.LSR_DATA_READY
    assert h.read(uart.DATA) == 0x55
    assert h.output == b""
    h.write(uart.MCR, 0)
    assert h.read(uart.MSR) & 0xB0 == 0xB0  # DCD, DSR, CTS without loopback


def test_thr_empty_interrupt_raised_on_enable_and_cleared_by_iir():
    h = Harness()
    h.write(uart.IER, uart.IER_THRI)
    assert h.irq_levels == [True]
    assert h.read(uart.IIR) & 0x0F == uart.IIR_THRI
    assert h.irq_levels == [True, False]
    assert h.read(uart.IIR) & 0x0F == uart.IIR_NONE
    h.write(uart.DATA, ord("x"))  # the transmitter empties again at once
    assert h.irq_levels == [True, False, True]


def test_receive_interrupt_and_fifo_bits():
    h = Harness()
    h.write(uart.IIR, uart.FCR_ENABLE_FIFO)
    h.write(uart.IER, uart.IER_RDI)
    assert h.read(uart.IIR) == 0xC1
    h.uart.feed_input(b"ab")
    assert h.irq_levels == [True]
    assert h.read(uart.IIR) == 0xC4
    assert h.read(uart.DATA) == ord("a")
    assert h.read(uart.DATA) == ord("b")
    assert h.irq_levels == [True, False]
    assert not h.read(uart.LSR) & uart.LSR_DATA_READY
    assert h.read(uart.DATA) == 0  # empty FIFO reads as zero


def test_the_fast_path_hears_when_received_bytes_wait_and_when_they_are_gone():
    """The vCPU loop answers line status reads in C from this: data ready must follow the
    receive buffer, from input and from loopback alike."""
    changes: list[bool] = []
    port = Serial(bytearray().extend, lambda level: None, changes.append)
    port.feed_input(b"ab")
    assert changes == [True]
    port.read(uart.DATA, 1)
    assert changes == [True]  # one byte still waits
    port.read(uart.DATA, 1)
    assert changes == [True, False]
    port.write(uart.MCR, 1, uart.MCR_LOOP)
    port.write(uart.DATA, 1, 0x55)  # looped back into the receive buffer
    assert changes == [True, False, True]
    assert port.read(uart.LSR, 1) & uart.LSR_DATA_READY


def test_the_fast_path_may_send_only_while_a_transmit_just_sends():
    """The vCPU loop answers transmit writes in C (no model state changes) while this says
    so: never with the divisor latch (a write sets the divisor), loopback (it feeds the
    receiver) or the transmitter-empty interrupt (it must be raised again) on."""
    changes: list[bool] = []
    port = Serial(bytearray().extend, lambda level: None, None, changes.append)
    assert changes == [True]  # reset state: 8N1, no loopback, no interrupts
    steps = [
        (uart.LCR, 0x83, False), (uart.LCR, 0x03, True),  # divisor latch
        (uart.MCR, uart.MCR_LOOP | uart.MCR_OUT2, False), (uart.MCR, uart.MCR_OUT2, True),
        (uart.IER, uart.IER_RDI, True),  # receive interrupts do not matter
        (uart.IER, uart.IER_RDI | uart.IER_THRI, False), (uart.IER, uart.IER_RDI, True),
    ]
    for offset, value, passthrough in steps:
        port.write(offset, 1, value)
        assert changes[-1] is passthrough, (offset, value)
    assert changes == [True, False, True, False, True, False, True]  # only changes are told
    # With DLAB set, IER's offset is the divisor's high byte: THRI's bit is not an enable.
    port.write(uart.LCR, 1, 0x83)
    port.write(uart.IER, 1, uart.IER_THRI)
    port.write(uart.LCR, 1, 0x03)
    assert changes[-1] is True


def test_a_transmit_the_fast_path_may_take_changes_nothing_in_the_model():
    """What C skips (the model's write) must leave no trace that Python's path would keep:
    the same interrupts and register reads follow with or without it."""
    def run(send_through_model: bool) -> tuple[list[bool], list[int]]:
        h = Harness()
        h.write(uart.IER, uart.IER_RDI)
        if send_through_model:
            h.write(uart.DATA, ord("x"))
        h.write(uart.IER, uart.IER_RDI | uart.IER_THRI)
        reads = [h.read(uart.IIR), h.read(uart.IIR), h.read(uart.LSR)]
        return h.irq_levels, reads

    assert run(True) == run(False)
