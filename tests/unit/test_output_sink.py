"""Console output never blocks the vCPU: a bounded buffer, then drops, and order kept."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import termios
import threading
import time

import pytest

from stratovirt_py.devices.output_sink import OutputSink
from tests.recording_writer import RecordingWriter

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


def test_a_direct_writer_gets_a_non_blocking_fd_to_the_same_pipe(pipe):
    read_end, write_end = pipe
    sink = OutputSink(write_end, "test")
    writer = RecordingWriter()
    sink.set_direct_writer(writer)
    assert writer.ready == [True]
    assert not writer.is_socket
    assert not os.get_blocking(writer.fd)  # a vCPU must never block on it
    assert os.get_blocking(write_end)  # the caller's description is left as it was
    assert os.fstat(writer.fd).st_ino == os.fstat(write_end).st_ino
    os.write(writer.fd, b"direct")
    assert os.read(read_end, 100) == b"direct"
    sink.close()
    assert writer.ready == [True, False]


def test_a_backlog_stops_direct_writes_until_it_has_drained_in_order(pipe):
    read_end, write_end = pipe
    sink = OutputSink(write_end, "test")
    writer = RecordingWriter()
    sink.set_direct_writer(writer)
    sink.write(b"a" * 4096)  # fills the pipe
    assert writer.ready == [True]
    sink.write(b"b" * 100)  # the backlog starts: a direct byte now would overtake it
    assert writer.ready == [True, False]
    sink.write(b"c" * 100)
    assert writer.ready == [True, False]
    received = drain(read_end, 4296)
    writer.wait_for(True)  # the flusher emptied the buffer
    os.write(writer.fd, b"d")  # what the vCPU loop then writes comes after the backlog
    received += drain(read_end, 1)
    assert received == b"a" * 4096 + b"b" * 100 + b"c" * 100 + b"d"
    sink.close()
    assert writer.ready == [True, False, True, False]


def test_a_failed_output_stops_direct_writes_for_good(pipe):
    read_end, write_end = pipe
    sink = OutputSink(write_end, "test")
    writer = RecordingWriter()
    sink.set_direct_writer(writer)
    os.close(read_end)
    sink.write(b"x")  # EPIPE: the sink gives up on the file
    assert writer.ready == [True, False]
    sink.write(b"y")
    sink.close()
    assert writer.ready == [True, False]


def test_a_regular_file_is_written_directly_through_the_callers_fd(tmp_path):
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    sink = OutputSink(fd, "test")
    writer = RecordingWriter()
    sink.set_direct_writer(writer)
    assert (writer.fd, writer.ready) == (fd, [True])
    sink.close()
    assert writer.ready == [True, False]
    os.close(fd)


def test_a_socket_is_written_directly_through_the_sinks_own_fd():
    ours, peer = socket.socketpair()
    sink = OutputSink(ours.fileno(), "test")
    writer = RecordingWriter()
    sink.set_direct_writer(writer)
    assert writer.is_socket and writer.ready == [True]
    assert writer.fd != ours.fileno()  # the sink's dup, closed only after set_ready(False)
    sink.close()
    assert writer.ready == [True, False]
    ours.close()
    peer.close()
