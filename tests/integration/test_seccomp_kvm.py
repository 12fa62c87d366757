"""A running monitor's threads are under their seccomp filters; -disable-seccomp lifts them.

That the lists are sufficient is proved by the rest of the suite, which runs every monitor
with the filters on (the default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Qmp, running_monitor, wait_for_socket

pytestmark = pytest.mark.kvm


def thread_filters(pid: int) -> dict[str, tuple[int, int, int]]:
    """comm -> (Seccomp mode, filters stacked, NoNewPrivs) for every thread of `pid`."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
                      if ":\t" in line)
        name = (task / "comm").read_text().strip()
        threads[f"{name}/{task.name}"] = (int(fields["Seccomp"]), int(fields["Seccomp_filters"]),
                                          int(fields["NoNewPrivs"]))
    return threads


def start(svtest_guest: Path, tmp_path: Path, *extra: str):
    socket_path = tmp_path / "qmp.sock"
    return socket_path, running_monitor(
        ["-kernel", str(svtest_guest), "-smp", "2", "-serial", "none",
         "-append", "svtest.action=spin", "-qmp", f"unix:{socket_path},server,nowait",
         "-drive", f"id=d0,file={tmp_path / 'disk.img'}", "-device",
         "virtio-blk-device,drive=d0,id=blk0", *extra])


def test_every_thread_runs_under_its_filter(svtest_guest, tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    socket_path, monitor = start(svtest_guest, tmp_path, "-object", "iothread,id=io1")
    with monitor as process:
        wait_for_socket(process, socket_path)
        qmp = Qmp(socket_path)
        assert qmp.execute("query-status")["return"]["running"]
        threads = thread_filters(process.pid)
        # Mode 2 is SECCOMP_MODE_FILTER; no thread is left out.
        assert all(mode == 2 and no_new_privs == 1
                   for mode, _, no_new_privs in threads.values()), threads
        vcpus = [filters for name, (_, filters, _) in threads.items() if name.startswith("vcpu")]
        iothreads = [filters for name, (_, filters, _) in threads.items()
                     if name.startswith("iothread")]
        main = threads[f"{Path(f'/proc/{process.pid}/comm').read_text().strip()}/{process.pid}"]
        assert vcpus == [1, 1]  # their own only: they start before the main thread enters
        assert iothreads == [1, 1]  # the shared one and io1: their own only
        assert main[1] == 1
        assert qmp.execute("quit") == {"return": {}}
        assert process.wait(timeout=30) == 0


def test_disable_seccomp_turns_it_off(svtest_guest, tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    socket_path, monitor = start(svtest_guest, tmp_path, "-disable-seccomp")
    with monitor as process:
        wait_for_socket(process, socket_path)
        qmp = Qmp(socket_path)
        assert qmp.execute("query-status")["return"]["running"]
        threads = thread_filters(process.pid)
        assert len(threads) >= 4  # main, two vCPUs, the I/O thread
        assert all(mode == 0 and filters == 0 for mode, filters, _ in threads.values()), threads
        assert qmp.execute("quit") == {"return": {}}
        assert process.wait(timeout=30) == 0
