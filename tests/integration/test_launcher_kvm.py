"""The monitor process: early signals clean up, and a daemon keeps relative paths meaning."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MONITOR, Qmp, monitor_env, run_monitor

pytestmark = pytest.mark.kvm


def wait_for(predicate, timeout: float, what: str, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has exited already.
    status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    return status == "Z"


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_sigterm_during_start_up_leaves_no_pidfile_or_socket(svtest_guest, tmp_path):
    """The pid file and the QMP socket exist before the VM is built: a SIGTERM then
    must still end in an orderly exit that removes both."""
    pidfile, qmp = tmp_path / "vm.pid", tmp_path / "qmp.sock"
    daemon = subprocess.Popen(
        [*MONITOR, "-kernel", str(svtest_guest), "-smp", "8", "-daemonize", "-pidfile",
         str(pidfile), "-qmp", f"unix:{qmp},server,nowait", "-D", str(tmp_path / "vm.log"),
         "-append", "svtest.action=spin"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=monitor_env())
    wait_for(lambda: read_pid(pidfile) is not None, 30, "no pid file")
    pid = read_pid(pidfile)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: process_gone(pid), 30, "the monitor did not exit", interval=0.02)
    daemon.wait(timeout=30)
    assert not pidfile.exists()
    assert not qmp.exists()


def test_sigterm_before_the_vm_runs_removes_the_socket(svtest_guest, tmp_path):
    qmp = tmp_path / "qmp.sock"
    process = subprocess.Popen(
        [*MONITOR, "-kernel", str(svtest_guest), "-smp", "8", "-qmp", f"unix:{qmp},server,nowait",
         "-append", "svtest.action=spin"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=monitor_env())
    wait_for(qmp.exists, 30, "no QMP socket")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not qmp.exists()


def test_daemon_resolves_relative_paths_where_it_was_started(svtest_guest, tmp_path):
    shutil.copy(svtest_guest, tmp_path / "guest.elf")
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    result = run_monitor(
        ["-kernel", "guest.elf", "-daemonize", "-pidfile", "vm.pid", "-D", "vm.log",
         "-qmp", "unix:qmp.sock,server,nowait", "-serial", "file,path=console.log",
         "-drive", "id=disk,file=disk.img", "-device", "virtio-blk-device,drive=disk,id=disk",
         "-append", "svtest.action=spin"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    pid = read_pid(tmp_path / "vm.pid")
    assert pid is not None
    try:
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        qmp = Qmp(str(tmp_path / "qmp.sock"))
        assert qmp.execute("query-status")["return"]["status"] == "running"
        wait_for(lambda: b"svtest: hello" in (tmp_path / "console.log").read_bytes(), 30,
                 "the guest printed nothing to console.log", interval=0.05)
        assert qmp.execute("quit") == {"return": {}}
        wait_for(lambda: process_gone(pid), 30, "the daemon did not exit", interval=0.02)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "vm.pid").exists()
    assert not (tmp_path / "qmp.sock").exists()
    assert "disk 'disk' (" + str(tmp_path / "disk.img") in (tmp_path / "vm.log").read_text()
