"""Console output never blocks the vCPU: a bounded buffer, then drops, and order kept."""

from __future__ import annotations

import contextlib
import fcntl
import os
import termios
import threading
import time

import pytest

from stratovirt_py.devices.output_sink import OutputSink

F_SETPIPE_SZ = 1031


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


def drain(fd: int, expected: int, timeout: float = 10.0) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < expected and time.monotonic() < deadline:
        data += os.read(fd, 65536)
    return bytes(data)


def test_a_reader_that_stops_reading_never_blocks_the_writer(pipe):
    read_end, write_end = pipe
    sink = OutputSink(write_end, "test", limit=64 << 10)
    chunk = bytes(range(256)) * 16  # 4 KiB
    finished = threading.Event()

    def write_a_lot() -> None:
        for _ in range(100):  # 400 KiB into a 4 KiB pipe nobody reads
            sink.write(chunk)
        finished.set()

    writer = threading.Thread(target=write_a_lot, daemon=True)
    writer.start()
    assert finished.wait(5), "the writer blocked on a full pipe"
    # Pipe (4 KiB) + buffer (64 KiB) were kept; the rest was dropped and counted.
    assert sink.dropped == 100 * len(chunk) - 4096 - (64 << 10)
    received = drain(read_end, 4096 + (64 << 10))
    assert received == (chunk * 17)[:len(received)] and len(received) == 4096 + (64 << 10)
    sink.close()


def test_buffered_output_goes_out_in_order_once_the_reader_is_back(pipe):
    read_end, write_end = pipe
    sink = OutputSink(write_end, "test")
    lines = [f"line {i}\r\n".encode() for i in range(2000)]  # ~19 KiB > the pipe
    for line in lines:
        sink.write(line)
    assert drain(read_end, sum(map(len, lines))) == b"".join(lines)
    assert sink.dropped == 0
    sink.close()


def test_close_gives_up_on_a_reader_that_never_comes_back(pipe):
    _read_end, write_end = pipe
    sink = OutputSink(write_end, "test")
    sink.write(b"x" * 100_000)
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 5
    sink.write(b"after close")  # ignored, no error


def test_a_broken_pipe_is_reported_once_and_output_dropped(pipe, caplog):
    read_end, write_end = pipe
    os.close(read_end)
    sink = OutputSink(write_end, "test")
    sink.write(b"first")
    sink.write(b"second")
    assert [r.getMessage() for r in caplog.records if "output failed" in r.getMessage()] == [
        "test: output failed (Broken pipe); further output is dropped"]
    sink.close()


def test_a_terminal_nobody_reads_never_blocks_and_keeps_its_own_flags():
    """A terminal whose reader stopped (scrolled back, Ctrl-S, a dead ssh link)."""
    master, slave = os.openpty()
    termios.tcflow(slave, termios.TCOOFF)  # output suspended, as after Ctrl-S
    try:
        sink = OutputSink(slave, "test", limit=64 << 10)
        finished = threading.Event()

        def write_a_lot() -> None:
            for _ in range(256):
                sink.write(b"y" * 4096)
            finished.set()

        threading.Thread(target=write_a_lot, daemon=True).start()
        assert finished.wait(5), "the writer blocked on a full terminal"
        assert sink.dropped > 0
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 5
        # The description shared with the shell is left blocking, as it was.
        assert os.get_blocking(slave)
    finally:
        os.close(master)
        os.close(slave)
