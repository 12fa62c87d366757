"""Run state on real KVM: stop/cont stay truthful when the console's reader stops reading."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import subprocess
import termios
import time

import pytest

from stratovirt_py.builder import build_vm
from stratovirt_py.config import DiskConfig, DriveConfig, MachineConfig
from stratovirt_py.event_loop import EventLoop
from stratovirt_py.lifecycle import RunState
from stratovirt_py.machine import MicroVM
from tests.helpers import Qmp, running_monitor, wait_for_socket

pytestmark = pytest.mark.kvm

F_SETPIPE_SZ = 1031
PIPE_SIZE = 4096
# Time for the guest's ticks to amount to several times the pipe's size.
CONSOLE_BACKLOG_SECONDS = 5


def bytes_in_pipe(read_end: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(read_end, termios.FIONREAD, count)
    return count[0]


def test_stop_and_cont_while_nobody_reads_the_console(svtest_guest, tmp_path):
    """A vCPU writing to a full stdout pipe used to block there, so `stop` timed out,
    left every vCPU parked and query-status still said running."""
    qmp_path = str(tmp_path / "qmp.sock")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    with running_monitor(["-kernel", str(svtest_guest), "-serial", "stdio",
                          "-qmp", f"unix:{qmp_path},server,nowait",
                          "-append", "svtest.action=spin svtest.tick=100"],
                         stdout=write_end, stderr=subprocess.PIPE) as process:
        wait_for_socket(process, qmp_path)
        # The guest prints a line per tick; nobody reads the pipe.  Blocking
        # writes would fill it to the byte within a second or two; the monitor
        # stops putting output into it once it is not writable.
        deadline = time.monotonic() + 60
        while bytes_in_pipe(read_end) == 0:
            assert time.monotonic() < deadline, "the guest printed nothing"
            time.sleep(0.05)
        deadline = time.monotonic() + CONSOLE_BACKLOG_SECONDS
        while bytes_in_pipe(read_end) < PIPE_SIZE and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        qmp = Qmp(qmp_path)
        assert qmp.execute("stop") == {"return": {}}
        assert [e["event"] for e in qmp.events] == ["STOP"]
        assert qmp.execute("query-status") == {
            "return": {"running": False, "singlestep": False, "status": "paused"}}
        assert qmp.execute("cont") == {"return": {}}
        assert qmp.execute("query-status")["return"]["status"] == "running"
        # The reader comes back: the guest's output flows again.
        os.set_blocking(read_end, False)
        received = bytearray()
        deadline = time.monotonic() + 30
        while received.count(b"tick") < 20:
            assert time.monotonic() < deadline, received[-200:]
            select.select([read_end], [], [], 1)
            with contextlib.suppress(BlockingIOError):
                received += os.read(read_end, 65536)
        assert qmp.execute("quit") == {"return": {}}
        assert process.wait(timeout=10) == 0
    os.close(read_end)
    os.close(write_end)


@pytest.mark.parametrize("own_thread", [False, True])
def test_io_thread_failure_ends_the_vm_with_an_error(svtest_guest, tmp_path, own_thread):
    """No disk would answer again: the VM ends with status 1 and says why, instead of
    a guest hanging on its disks while QMP reports it running.  With its own thread
    (-object iothread, iothread= on the device), the disk's I/O is what wakes that one:
    had the disk stayed on the shared thread, its failure would never come."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = MachineConfig(
        kernel=str(svtest_guest), cmdline="svtest.action=blk-bench svtest.count=100000000",
        iothreads=("io1",) if own_thread else (),
        disks=(DiskConfig("d", DriveConfig("d", str(image), direct=False),
                          "io1" if own_thread else None),)).validate()
    loop = EventLoop()
    machine = MicroVM(config, loop)
    try:
        build_vm(machine)
        machine.start()
        assert machine.hardware is not None
        assert len(machine.hardware.iothreads) == (2 if own_thread else 1)
        iothread = machine.hardware.iothreads[-1]
        # Something that is not an epoll instance under the thread's epoll fd: its next
        # epoll_wait fails, as any failing epoll_wait would.  The guest's I/O wakes it.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, iothread.handle.epoll_fd)
        os.close(devnull)
        assert loop.run_until(machine.exited.done, 30)
        request = machine.exited.result()
        assert (request.status, request.guest, request.reason) == (1, False, "host-error")
        assert "the I/O thread stopped: epoll_wait failed: Invalid argument" in request.message
        assert machine.state is RunState.INTERNAL_ERROR
    finally:
        machine.destroy()
        loop.close()
