"""QMP on a real KVM guest: the spec's sequence through qemu.qmp and ncat, and lifecycle checks."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.helpers import MONITOR, monitor_env

pytestmark = pytest.mark.kvm

GREETING = (b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":4},"package":""},'
            b'"capabilities":[]}}\r\n')


class RunningVM:
    """A monitor process with a QMP socket and its serial output in a file."""

    def __init__(self, guest: Path, tmp: Path, *args: str, action: str = "spin",
                 qmp_option: str = "-qmp") -> None:
        self.socket_path = tmp / "qmp.sock"
        self.console = tmp / "console.log"
        spec = (f"unix:{self.socket_path},server,nowait" if qmp_option == "-qmp"
                else f"unix:{self.socket_path}")
        self.process = subprocess.Popen(
            [*MONITOR, "-kernel", str(guest), "-serial", f"file,path={self.console}",
             qmp_option, spec, "-append", f"svtest.action={action} svtest.tick=20000", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=monitor_env())
        deadline = time.monotonic() + 30
        while not self.socket_path.exists():
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "QMP socket never appeared"
            time.sleep(0.02)

    def ticks(self) -> int:
        return self.console.read_bytes().count(b"tick") if self.console.exists() else 0

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def vm_factory(svtest_guest, tmp_path):
    vms: list[RunningVM] = []

    def make(*args: str, **kwargs) -> RunningVM:
        vm = RunningVM(svtest_guest, tmp_path, *args, **kwargs)
        vms.append(vm)
        return vm
    yield make
    for vm in vms:
        vm.kill()


def test_spec_sequence_through_qemu_qmp(vm_factory):
    vm = vm_factory("-smp", "2")

    async def scenario() -> None:
        qmp = QMPClient("spec")
        await qmp.connect(str(vm.socket_path))
        assert qmp.greeting._raw == json.loads(GREETING)
        assert await qmp.execute("query-status") == {
            "running": True, "singlestep": False, "status": "running"}
        cpus = await qmp.execute("query-cpus")
        tids = {int(t) for t in os.listdir(f"/proc/{vm.process.pid}/task")}
        assert [c["CPU"] for c in cpus] == [0, 1]
        assert all(c["thread_id"] in tids for c in cpus)
        assert len({c["thread_id"] for c in cpus}) == 2
        for cpu in cpus:
            comm = Path(f"/proc/{vm.process.pid}/task/{cpu['thread_id']}/comm").read_text()
            assert comm.strip() == f"vcpu{cpu['CPU']}"
        assert [c["props"] for c in cpus] == [
            {"core-id": 0, "socket-id": 0, "thread-id": 0},
            {"core-id": 0, "socket-id": 1, "thread-id": 0}]
        hotpluggable = await qmp.execute("query-hotpluggable-cpus")
        assert [h["qom-path"] for h in hotpluggable] == [
            "/machine/unattached/device[0]", "/machine/unattached/device[1]"]
        with qmp.listener("STOP") as stops:
            assert await qmp.execute("stop") == {}
            assert (await asyncio.wait_for(stops.get(), 5))["event"] == "STOP"
        assert (await qmp.execute("query-status"))["status"] == "paused"
        with pytest.raises(ExecuteError) as error:
            await qmp.execute("stop")
        assert error.value.error_class == "GenericError"
        with qmp.listener("RESUME") as resumes:
            assert await qmp.execute("cont") == {}
            assert (await asyncio.wait_for(resumes.get(), 5))["event"] == "RESUME"
        with pytest.raises(ExecuteError) as error:
            await qmp.execute("cont")
        assert error.value.error_class == "GenericError"
        with qmp.listener("SHUTDOWN") as shutdowns:
            assert await qmp.execute("quit") == {}
            event = await asyncio.wait_for(shutdowns.get(), 5)
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await qmp.disconnect()

    asyncio.run(scenario())
    assert vm.wait() == 0
    assert not vm.socket_path.exists()


def ncat(socket_path: Path, commands: bytes, until: bytes, timeout: float = 15) -> bytes:
    """Types commands into `ncat -U` as a person would and collects its output."""
    process = subprocess.Popen(["ncat", "-U", str(socket_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout
    while not output.startswith(GREETING) or (until and until not in output):
        if commands and output.startswith(GREETING):
            process.stdin.write(commands)
            process.stdin.flush()
            commands = b""
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
        assert time.monotonic() < deadline, output
    process.stdin.close()
    process.wait(timeout)
    return output


def test_spec_sequence_through_ncat(vm_factory):
    vm = vm_factory("-smp", "2", qmp_option="-api-channel")
    typed = (b'{ "execute": "query-status" }\n'
             b'{"execute":"stop"}\n{"execute":"query-status"}\n{"execute":"cont"}\n'
             b'{"execute":"quit"}\n')
    output = ncat(vm.socket_path, typed, b"SHUTDOWN")
    lines = output.split(b"\r\n")
    assert output.startswith(GREETING)
    assert lines[1] == b'{"return":{"running":true,"singlestep":false,"status":"running"}}'
    assert json.loads(lines[2])["event"] == "STOP" and lines[3] == b'{"return":{}}'
    assert json.loads(lines[4])["return"]["status"] == "paused"
    assert json.loads(lines[5])["event"] == "RESUME" and lines[6] == b'{"return":{}}'
    assert lines[7] == b'{"return":{}}'
    shutdown = json.loads(lines[8])
    assert shutdown["event"] == "SHUTDOWN"
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert set(shutdown["timestamp"]) == {"seconds", "microseconds"}
    assert abs(shutdown["timestamp"]["seconds"] - time.time()) < 60
    assert vm.wait() == 0
    assert not vm.socket_path.exists()


def wait_for(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def command(sock_path: Path, *requests: dict) -> list[dict]:
    """Sends requests on a fresh connection and returns every message up to the last reply."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        data = b""
        sock.sendall(b"".join(json.dumps(r).encode() for r in requests))
        messages: list[dict] = []
        while sum(1 for m in messages if "return" in m or "error" in m) < len(requests):
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, messages
                data += chunk
            line, _, data = data.partition(b"\r\n")
            message = json.loads(line)
            if "QMP" not in message:
                messages.append(message)
        return messages


def test_stop_really_freezes_the_guest(vm_factory):
    vm = vm_factory()
    wait_for(lambda: vm.ticks() >= 3)
    command(vm.socket_path, {"execute": "stop"})
    frozen = vm.ticks()
    time.sleep(1.0)
    assert vm.ticks() <= frozen + 1  # at most a line that was mid-flight
    command(vm.socket_path, {"execute": "cont"})
    wait_for(lambda: vm.ticks() >= frozen + 3)
    command(vm.socket_path, {"execute": "quit"})
    assert vm.wait() == 0


def test_freeze_starts_in_prelaunch(vm_factory):
    vm = vm_factory("-S")
    [reply] = command(vm.socket_path, {"execute": "query-status"})
    assert reply == {"return": {"running": False, "singlestep": False, "status": "prelaunch"}}
    time.sleep(0.5)
    assert vm.ticks() == 0
    messages = command(vm.socket_path, {"execute": "cont"})
    assert messages[0]["event"] == "RESUME" and messages[1] == {"return": {}}
    wait_for(lambda: vm.ticks() >= 2)
    command(vm.socket_path, {"execute": "quit"})
    assert vm.wait() == 0


def test_guest_reset_emits_shutdown_to_clients(vm_factory):
    vm = vm_factory("-S", action="reboot")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(str(vm.socket_path))
        sock.sendall(b'{"execute":"cont"}')
        data = b""
        while b"SHUTDOWN" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    event = json.loads(data.split(b"\r\n")[-2])
    assert event["data"] == {"guest": True, "reason": "guest-reset"}
    assert vm.wait() == 0


def test_bad_input_keeps_monitor_and_guest_running(vm_factory):
    vm = vm_factory()
    wait_for(lambda: vm.ticks() >= 1)
    garbage = [b"\x00\xff{{{", b'{"execute":', b"]]]", b"x" * 5000, b'{"execute":"quit"',
               bytes(range(256))]
    for blob in garbage:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(vm.socket_path))
            sock.sendall(blob)  # and vanish mid-command
    messages = command(vm.socket_path, {"execute": "device_del"},
                       {"execute": "query-status", "arguments": {"bogus": 1}, "id": 1},
                       {"execute": "query-status", "id": 2})
    assert messages[0]["error"]["class"] in ("CommandNotFound", "GenericError")
    assert messages[1] == {"error": {"class": "GenericError",
                                     "desc": "Parameter 'bogus' is unexpected"}, "id": 1}
    assert messages[2]["return"]["status"] == "running"
    before = vm.ticks()
    wait_for(lambda: vm.ticks() > before)  # the guest kept running
    command(vm.socket_path, {"execute": "quit"})
    assert vm.wait() == 0


def test_several_qmp_sockets_and_clients(vm_factory, tmp_path):
    second = tmp_path / "second.sock"
    vm = vm_factory("-qmp", f"unix:{second},server,nowait")
    wait_for(second.exists)  # bound just after the first socket the factory waited for
    assert command(second, {"execute": "query-status"})[0]["return"]["status"] == "running"
    with socket.socket(socket.AF_UNIX) as watcher:
        watcher.settimeout(10)
        watcher.connect(str(second))
        watcher.sendall(b'{"execute":"qmp_capabilities"}')
        command(vm.socket_path, {"execute": "stop"})
        data = b""
        while b"STOP" not in data:
            chunk = watcher.recv(65536)
            assert chunk
            data += chunk
    command(vm.socket_path, {"execute": "quit"})
    assert vm.wait() == 0
    assert not second.exists() and not vm.socket_path.exists()


def test_existing_socket_path_is_refused(svtest_guest, tmp_path):
    path = tmp_path / "taken.sock"
    path.write_text("keep me")
    result = subprocess.run([*MONITOR, "-kernel", str(svtest_guest), "-qmp",
                             f"unix:{path},server,nowait"], capture_output=True, timeout=30,
                            env=monitor_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert b"QMP socket '" in result.stderr and b"already exists" in result.stderr
    assert path.read_text() == "keep me"


def test_sigterm_sends_shutdown_and_removes_the_socket(vm_factory):
    vm = vm_factory()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(vm.socket_path))
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        data = b""
        while b"return" not in data:
            data += sock.recv(65536)
        vm.process.terminate()
        while b"SHUTDOWN" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert b'"reason":"host-signal"' in data
    assert vm.wait() == 0
    assert not vm.socket_path.exists()


def test_a_command_and_its_events_come_in_one_read(vm_factory):
    """StratoVirt's hydropper client reads once per command and wants the return in that read."""
    vm = vm_factory()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(vm.socket_path))
        assert sock.recv(1024).startswith(b'{"QMP"')
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        assert sock.recv(1024) == b'{"return":{}}\r\n'
        without_return = 0
        for _ in range(100):
            for name, event in ((b"stop", b"STOP"), (b"cont", b"RESUME")):
                sock.sendall(b'{"execute":"%s"}' % name)
                data = sock.recv(1024)
                if b'"return"' not in data:
                    without_return += 1
                while not data.endswith(b'{"return":{}}\r\n'):
                    chunk = sock.recv(1024)
                    assert chunk, data
                    data += chunk
                lines = data.split(b"\r\n")
                assert len(lines) == 3 and json.loads(lines[0])["event"] == event.decode()
        assert without_return == 0, f"{without_return} of 200 first reads had no return"
    command(vm.socket_path, {"execute": "quit"})
    assert vm.wait() == 0


def test_unexpected_failure_is_answered_and_later_commands_too(vm_factory):
    vm = vm_factory()
    messages = command(
        vm.socket_path,
        {"execute": "blockdev-add", "id": 1, "arguments": {
            "node-name": "nul", "file": {"driver": "file", "filename": "disk\u0000.img"}}},
        {"execute": "query-status", "id": 2})
    assert messages[0]["id"] == 1 and messages[0]["error"]["class"] == "GenericError"
    assert messages[1] == {"return": {"running": True, "singlestep": False,
                                      "status": "running"}, "id": 2}
    command(vm.socket_path, {"execute": "quit"})
    assert vm.wait() == 0
