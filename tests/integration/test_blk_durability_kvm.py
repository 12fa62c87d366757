"""No acknowledged write is lost: the freestanding guest writes a pattern through virtio-blk
with a FLUSH every few requests and says how far it has flushed; the monitor is then ended
(SIGKILL, SIGTERM or QMP quit) while the guest keeps writing, and every sector the guest saw
written and flushed must be in the image.  Both backends: O_DIRECT and the page cache."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MONITOR, monitor_env, wait_for_socket
from tests.integration.test_virtio_blk_kvm import SECTOR, make_image, pattern

pytestmark = pytest.mark.kvm
MiB = 1 << 20
IMAGE_BYTES = 64 * MiB
FLUSHED = re.compile(rb"svtest: blk-write-pattern flushed upto=(\d+)\r?\n")
SEED = 11


def start(guest: Path, image: Path, direct: bool, qmp: Path) -> subprocess.Popen:
    cmdline = (f"svtest.action=blk-write-pattern svtest.sector=0 "
               f"svtest.count={IMAGE_BYTES // SECTOR} svtest.seed={SEED} svtest.flush_every=2")
    process = subprocess.Popen(
        [*MONITOR, "-kernel", str(guest), "-serial", "stdio", "-append", cmdline,
         "-drive", f"id=d0,file={image},direct={'on' if direct else 'off'}",
         "-device", "virtio-blk-device,drive=d0,id=d0",
         "-qmp", f"unix:{qmp},server,nowait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=monitor_env())
    wait_for_socket(process, qmp)
    return process


def flushed_upto(process: subprocess.Popen, flushes: int, timeout: float = 60) -> int:
    """Reads the console until the guest has reported `flushes` flushes; the last sector."""
    assert process.stdout is not None
    data = b""
    deadline = time.monotonic() + timeout
    while len(FLUSHED.findall(data)) < flushes:
        assert time.monotonic() < deadline, data[-500:]
        assert process.poll() is None, data[-500:]
        if select.select([process.stdout], [], [], 0.1)[0]:
            chunk = os.read(process.stdout.fileno(), 65536)
            assert chunk, data[-500:]
            data += chunk
    return int(FLUSHED.findall(data)[-1])


def assert_written(image: Path, sectors: int) -> None:
    """The first `sectors` sectors hold the guest's pattern, compared a MiB at a time."""
    assert sectors > 0
    step = MiB // SECTOR
    with open(image, "rb") as disk:
        for first in range(0, sectors, step):
            count = min(step, sectors - first)
            assert disk.read(count * SECTOR) == pattern(SEED, first, count), (
                f"sectors {first}..{first + count - 1} of {sectors} flushed are not on disk")


def quit_over_qmp(qmp: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(qmp))
        sock.recv(4096)
        sock.sendall(json.dumps({"execute": "quit"}).encode())
        reply = b""
        while b'"return"' not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk


ENDINGS = {
    "sigkill": lambda process, qmp: process.kill(),
    "sigterm": lambda process, qmp: process.send_signal(signal.SIGTERM),
    "quit": lambda process, qmp: quit_over_qmp(qmp),
}


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_every_flushed_write_survives_the_monitor_ending(svtest_guest, tmp_path, direct,
                                                         ending):
    image = make_image(tmp_path / "disk.img", IMAGE_BYTES)
    qmp = tmp_path / "qmp.sock"
    process = start(svtest_guest, image, direct, qmp)
    try:
        sectors = flushed_upto(process, flushes=3)
        ENDINGS[ending](process, qmp)
        ended = time.monotonic()
        status = process.wait(timeout=30)
        # An orderly end (SIGTERM, quit) waits for the writes in flight, briefly: the
        # issue allows a second; the margin is for this emulating host's scheduling.
        if ending != "sigkill":
            assert status == 0, process.stderr.read() if process.stderr else b""
            assert time.monotonic() - ended < 3.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_written(image, sectors)
