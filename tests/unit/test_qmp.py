"""QMP protocol and commands against a fake machine: framing, errors, events, clients."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratovirt_py.backends import BackendRegistry
from stratovirt_py.balloon import Balloon, BalloonError
from stratovirt_py.config import CpuTopology, DriveConfig, MachineConfig, NetdevConfig
from stratovirt_py.event_loop import EventLoop
from stratovirt_py.hotplug import DeviceRequest, Hotplug
from stratovirt_py.lifecycle import Lifecycle, RunState
from stratovirt_py.machine import ExitRequest
from stratovirt_py.qmp.protocol import (
    JsonStreamSplitter,
    ParseFailure,
    QmpError,
    decode_message,
)
from stratovirt_py.qmp.registry import dispatch
from stratovirt_py.qmp.server import QmpServer
from stratovirt_py.slots import SlotTable

GREETING = (b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":4},"package":""},'
            b'"capabilities":[]}}\r\n')


class FakeVcpu:
    """A vCPU thread that parks at once, or never (a vCPU stuck outside the monitor's reach)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.stuck = False
        self.is_parked = False

    def request_pause(self) -> None:
        self.is_parked = not self.stuck

    def wait_parked(self, timeout: float) -> bool:
        return self.is_parked

    def resume(self) -> None:
        self.is_parked = False


class FakeMachine:
    def __init__(self, cpus: int = 2, max_cpus: int | None = None) -> None:
        self.config = MachineConfig(topology=CpuTopology.build(cpus, max_cpus))
        self.listeners: list = []
        self.exit_requests: list[ExitRequest] = []
        self.vcpus = [FakeVcpu(i) for i in range(cpus)]
        self.lifecycle = Lifecycle(self.vcpus, self.emit_event, pause_timeout=0.01)
        self.lifecycle.started(paused=False)
        self.hotplug = Hotplug(SlotTable(), BackendRegistry())  # no slots, unless a test adds
        self.balloon: Balloon | None = None

    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    @property
    def exit_pending(self) -> bool:
        return bool(self.exit_requests)

    def vcpu_thread_ids(self) -> list[int | None]:
        return [1000 + i for i in range(self.config.topology.cpus)]

    def query_chardevs(self) -> list[dict[str, object]]:
        return [{"label": "serial0", "filename": "pty:/dev/pts/7", "frontend-open": True}]

    def pause(self) -> None:
        self.lifecycle.pause()

    def resume(self) -> None:
        self.lifecycle.resume()

    def request_exit(self, request: ExitRequest) -> None:
        self.exit_requests.append(request)

    def powerdown(self) -> None:
        self.emit_event("POWERDOWN", {})
        self.request_exit(ExitRequest(0, True, "guest-shutdown", "powerdown"))

    def emit_event(self, name: str, data: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(name, data)

    def blockdev_add(self, drive: DriveConfig) -> None:
        self.hotplug.blockdev_add(drive)

    def blockdev_del(self, node_name: str) -> None:
        self.hotplug.blockdev_del(node_name)

    def netdev_add(self, netdev: NetdevConfig) -> None:
        self.hotplug.netdev_add(netdev)

    def netdev_del(self, netdev_id: str) -> None:
        self.hotplug.netdev_del(netdev_id)

    def device_add(self, request: DeviceRequest) -> None:
        self.hotplug.device_add(request)

    def _balloon(self) -> Balloon:
        if self.balloon is None:
            raise BalloonError("No balloon device has been activated", "DeviceNotActive")
        return self.balloon

    def balloon_set_target(self, value: int) -> None:
        self._balloon().set_target(value)

    def balloon_actual(self) -> int:
        return self._balloon().actual()

    def qom_get(self, path: str, name: str) -> Any:
        return self._balloon().qom_get(path, name)

    def qom_set(self, path: str, name: str, value: Any) -> None:
        self._balloon().qom_set(path, name, value)

    async def device_del(self, device_id: str) -> None:
        await self.hotplug.detach(device_id)
        self.emit_event("DEVICE_DELETED", {"device": device_id, "path": device_id})


class FakeContext:
    def __init__(self) -> None:
        self.named_fds: dict[str, int] = {}
        self.pending: list[int] = []

    def take_received_fd(self) -> int | None:
        return self.pending.pop(0) if self.pending else None


def run(machine, request, context=None):
    return dispatch(machine, context or FakeContext(), request)


# Framing.

def split_all(chunks: list[bytes]) -> list[bytes | ParseFailure]:
    splitter = JsonStreamSplitter()
    values = []
    for chunk in chunks:
        values += splitter.feed(chunk)
    return values + splitter.flush_bare()


def test_merged_and_split_messages():
    stream = b'{"execute":"a"}{"execute":"b"}\n {"execute":"c", "x": "}{\\"]"}'
    assert split_all([stream]) == [b'{"execute":"a"}', b'{"execute":"b"}',
                                   b'{"execute":"c", "x": "}{\\"]"}']
    assert split_all([bytes([b]) for b in stream]) == split_all([stream])


def test_bare_values_and_stray_characters():
    assert split_all([b"hello 42\n[1,2]"]) == [b"hello", b"42", b"[1,2]"]
    values = split_all([b"}{}"])
    assert isinstance(values[0], ParseFailure) and values[1] == b"{}"


def test_control_characters_resynchronise_between_values():
    assert split_all([b"\x1b\x00{}\xff"]) == [b"{}"]


def test_nesting_and_size_limits():
    deep = b"[" * 2000 + b"]" * 2000
    values = split_all([deep])
    assert values == [ParseFailure("JSON nesting depth limit exceeded")]
    # Too big: one error, the rest of the value skipped, the next one parsed.
    assert JsonStreamSplitter(max_bytes=1000).feed(b'{"a":"' + b"x" * 2000 + b'"}{}') == [
        ParseFailure("JSON token size limit exceeded"), b"{}"]


@pytest.mark.parametrize(("raw", "desc"), [
    (b'{ "execute": }', "JSON parse error, expecting value"),
    (b"hello", "JSON parse error, invalid keyword 'hello'"),
    (b'{"a":1,"a":2}', "JSON parse error, duplicate key 'a'"),
    (b"NaN", "JSON parse error, invalid keyword 'NaN'"),
    (b'"\xff"', "JSON parse error, invalid UTF-8 sequence in string"),
])
def test_parse_errors(raw, desc):
    with pytest.raises(QmpError) as info:
        decode_message(raw)
    assert info.value.desc == desc and info.value.error_class == "GenericError"


# Envelope and dispatch.

@pytest.mark.parametrize(("request_", "reply"), [
    ([], {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    ({"execute": 1, "id": 3},
     {"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"},
      "id": 3}),
    ({"execute": "stop", "arguments": [], "id": "a"},
     {"error": {"class": "GenericError",
                "desc": "QMP input member 'arguments' must be an object"}, "id": "a"}),
    ({"execute": "stop", "bogus": 1},
     {"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}),
    ({"id": 1}, {"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"},
                 "id": 1}),
    ({"execute": "nope", "id": {"any": ["json"]}},
     {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
      "id": {"any": ["json"]}}),
    ({"execute": "getfd"},
     {"error": {"class": "GenericError", "desc": "Parameter 'fdname' is missing"}}),
    ({"execute": "getfd", "arguments": {"fdname": 5}},
     {"error": {"class": "GenericError",
                "desc": "Invalid parameter type for 'fdname', expected: string"}}),
    ({"execute": "query-status", "arguments": {"x": 1}},
     {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}),
])
def test_envelope_errors(request_, reply):
    machine = FakeMachine()
    assert run(machine, request_) == reply
    assert machine.state is RunState.RUNNING and not machine.exit_requests


def test_query_status_matches_the_spec():
    reply = run(FakeMachine(), {"execute": "query-status"})
    assert json.dumps(reply, separators=(",", ":")) == (
        '{"return":{"running":true,"singlestep":false,"status":"running"}}')


def test_query_cpus_matches_the_spec_layout():
    reply = run(FakeMachine(), {"execute": "query-cpus"})
    assert json.dumps(reply, separators=(",", ":")) == (
        '{"return":[{"CPU":0,"arch":"x86","current":true,"halted":false,"props":{"core-id":0,'
        '"socket-id":0,"thread-id":0},"qom_path":"/machine/unattached/device[0]",'
        '"thread_id":1000},{"CPU":1,"arch":"x86","current":true,"halted":false,"props":'
        '{"core-id":0,"socket-id":1,"thread-id":0},"qom_path":"/machine/unattached/device[1]",'
        '"thread_id":1001}]}')


def test_query_hotpluggable_cpus_marks_offline_vcpus():
    reply = run(FakeMachine(cpus=1, max_cpus=2), {"execute": "query-hotpluggable-cpus"})
    assert json.dumps(reply, separators=(",", ":")) == (
        '{"return":[{"props":{"core-id":0,"socket-id":0,"thread-id":0},'
        '"qom-path":"/machine/unattached/device[0]","type":"host-x86-cpu","vcpus-count":1},'
        '{"props":{"core-id":0,"socket-id":1,"thread-id":0},"type":"host-x86-cpu",'
        '"vcpus-count":1}]}')


def test_query_cpus_fast_and_version():
    fast = run(FakeMachine(), {"execute": "query-cpus-fast"})["return"]
    assert fast[1] == {"cpu-index": 1, "qom-path": "/machine/unattached/device[1]",
                       "thread-id": 1001, "props": {"core-id": 0, "socket-id": 1,
                                                    "thread-id": 0}, "target": "x86_64"}
    assert run(FakeMachine(), {"execute": "query-version"}) == {
        "return": {"qemu": {"micro": 1, "minor": 0, "major": 4}, "package": ""}}
    names = [c["name"] for c in run(FakeMachine(), {"execute": "query-commands"})["return"]]
    assert {"qmp_capabilities", "query-status", "stop", "cont", "quit", "getfd"} <= set(names)


def test_stop_cont_state_machine_and_events():
    machine = FakeMachine()
    events: list = []
    machine.listeners.append(lambda name, data: events.append(name))
    assert run(machine, {"execute": "stop"}) == {"return": {}}
    assert machine.state is RunState.PAUSED and events == ["STOP"]
    reply = run(machine, {"execute": "stop"})
    assert reply["error"]["class"] == "GenericError" and events == ["STOP"]
    assert run(machine, {"execute": "cont"}) == {"return": {}}
    assert events == ["STOP", "RESUME"] and machine.state is RunState.RUNNING
    assert run(machine, {"execute": "cont"})["error"]["class"] == "GenericError"
    assert events == ["STOP", "RESUME"]


def test_stop_that_cannot_pause_rolls_back_and_keeps_running():
    machine = FakeMachine()
    events: list = []
    machine.listeners.append(lambda name, data: events.append(name))
    machine.vcpus[1].stuck = True
    reply = run(machine, {"execute": "stop"})
    assert reply["error"]["desc"] == ("Failed to pause VM: vCPU 1 did not stop within 0.01 s; "
                                      "the VM keeps running")
    # Nothing changed: still running, no STOP, every vCPU let go again.
    assert machine.state is RunState.RUNNING and events == []
    assert not any(vcpu.is_parked for vcpu in machine.vcpus)
    assert run(machine, {"execute": "cont"})["error"]["desc"] == (
        "Failed to resume VM: it is not paused (status: running)")
    machine.vcpus[1].stuck = False
    assert run(machine, {"execute": "stop"}) == {"return": {}}
    assert run(machine, {"execute": "cont"}) == {"return": {}}
    assert events == ["STOP", "RESUME"]


def test_cont_from_prelaunch():
    machine = FakeMachine()
    machine.lifecycle.started(paused=True)
    assert run(machine, {"execute": "query-status"})["return"]["status"] == "prelaunch"
    assert run(machine, {"execute": "cont"}) == {"return": {}}
    assert machine.state is RunState.RUNNING


@pytest.mark.parametrize(("command", "guest", "reason"), [
    ("quit", False, "host-qmp-quit"),
    ("system_reset", False, "host-qmp-system-reset"),
    ("system_powerdown", True, "guest-shutdown"),
])
def test_exit_commands(command, guest, reason):
    machine = FakeMachine()
    assert run(machine, {"execute": command}) == {"return": {}}
    [request] = machine.exit_requests
    assert (request.status, request.guest, request.reason) == (0, guest, reason)


def test_capabilities_is_optional_and_repeatable():
    machine = FakeMachine()
    assert run(machine, {"execute": "qmp_capabilities"}) == {"return": {}}
    assert run(machine, {"execute": "qmp_capabilities", "arguments": {}}) == {"return": {}}
    assert run(machine, {"execute": "qmp_capabilities",
                         "arguments": {"enable": ["oob"]}})["error"]["desc"] == (
        "Capability oob not available")


def test_getfd_and_closefd():
    context = FakeContext()
    read_end, write_end = os.pipe()
    context.pending.append(read_end)
    machine = FakeMachine()
    assert run(machine, {"execute": "getfd", "arguments": {"fdname": "tap"}}, context) == {
        "return": {}}
    assert context.named_fds == {"tap": read_end}
    assert run(machine, {"execute": "getfd", "arguments": {"fdname": "x"}}, context)[
        "error"]["desc"] == "No file descriptor supplied via SCM_RIGHTS"
    assert run(machine, {"execute": "getfd", "arguments": {"fdname": "1x"}}, context)[
        "error"]["desc"].startswith("Parameter 'fdname' expects a name")
    assert run(machine, {"execute": "closefd", "arguments": {"fdname": "tap"}}, context) == {
        "return": {}}
    with pytest.raises(OSError):
        os.fstat(read_end)
    assert run(machine, {"execute": "closefd", "arguments": {"fdname": "tap"}}, context)[
        "error"]["desc"] == "File descriptor named 'tap' not found"
    os.close(write_end)


# The server, on a real unix socket, with the fake machine.

class ServerHarness:
    def __init__(self, path: str, machine: FakeMachine) -> None:
        self.loop = EventLoop()
        self.machine = machine
        self.server = QmpServer(machine, self.loop, (path,))
        machine.listeners.append(self.server.broadcast_event)
        self.server.start()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.path = path

    def connect(self) -> Client:
        return Client(self.path)

    def call(self, function, *args):
        done = threading.Event()
        result: list = []

        def wrapper():
            result.append(function(*args))
            done.set()
        self.loop.call_soon_threadsafe(wrapper)
        done.wait(5)
        return result[0]

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def message(self) -> dict:
        return json.loads(self.line())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def nothing_pending(self, wait: float = 0.2) -> bool:
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return self.buffer == b""
        finally:
            self.sock.settimeout(5)
        self.buffer += data
        return False


@pytest.fixture(name="harness")
def harness_fixture(tmp_path):
    h = ServerHarness(str(tmp_path / "qmp.sock"), FakeMachine())
    yield h
    h.close()


def test_greeting_bytes_and_socket_mode(harness, tmp_path):
    client = harness.connect()
    assert client.line() == GREETING
    assert os.stat(tmp_path / "qmp.sock").st_mode & 0o777 == 0o600


def test_existing_socket_path_is_refused(tmp_path):
    from stratovirt_py.errors import ConfigError

    path = tmp_path / "taken"
    path.write_text("")
    loop = EventLoop()
    with pytest.raises(ConfigError, match="already exists"):
        QmpServer(FakeMachine(), loop, (str(path),))
    assert path.read_text() == ""
    loop.close()


def test_commands_split_byte_by_byte_and_merged(harness):
    client = harness.connect()
    client.line()
    for byte in b'{"execute": "query-status", "id": "one"}':
        client.send(bytes([byte]))
        time.sleep(0.001)
    assert client.message() == {"return": {"running": True, "singlestep": False,
                                           "status": "running"}, "id": "one"}
    client.send(b'{"execute":"query-version","id":1}{"execute":"query-status","id":2}\r\n')
    assert client.message()["id"] == 1 and client.message()["id"] == 2


def test_events_go_to_every_client_that_has_spoken(harness):
    first, second, silent = harness.connect(), harness.connect(), harness.connect()
    for client in (first, second, silent):
        client.line()
    second.send(b'{"execute":"qmp_capabilities"}')
    assert second.message() == {"return": {}}
    first.send(b'{"execute":"stop"}')
    event = first.message()
    assert event["event"] == "STOP" and event["data"] == {}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert first.message() == {"return": {}}  # the event comes before the return
    assert second.message()["event"] == "STOP"
    assert silent.nothing_pending()


def test_garbage_then_valid_command_on_the_same_connection(harness):
    client = harness.connect()
    client.line()
    client.send(b'hello\n{ "execute": }\n]\n42\n{"execute":"query-status","id":9}')
    descs = [client.message()["error"]["desc"] for _ in range(4)]
    assert descs == ["JSON parse error, invalid keyword 'hello'",
                     "JSON parse error, expecting value", "JSON parse error, stray ']'",
                     "QMP input must be a JSON object"]
    assert client.message()["id"] == 9


def test_vanishing_and_flooding_clients_leave_others_working(harness):
    good = harness.connect()
    good.line()
    gone = harness.connect()
    gone.send(b'{"execute":"query-cpus"')  # half a command, then gone
    gone.sock.close()
    flood = harness.connect()
    flood.line()
    # Over the size limit: an error, and the connection recovers once the value ends.
    flood.send(b'{"a":"' + b"x" * (2 << 20))
    assert flood.message() == {"error": {"class": "GenericError",
                                         "desc": "JSON token size limit exceeded"}}
    flood.send(b'"}{"execute":"query-status","id":"after"}')
    assert flood.message()["id"] == "after"
    good.send(b'{"execute":"query-status"}')
    assert good.message()["return"]["status"] == "running"


def test_client_that_never_reads_is_dropped(harness):
    lazy = harness.connect()
    lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.line()  # accepted by now; from here on it reads nothing
    request = b'{"execute":"query-commands"}' * 200
    try:
        for _ in range(1000):
            lazy.send(request)
            if not harness.call(lambda: len(harness.server.connections)):
                break
    except OSError:
        pass  # dropped by the server: what we want
    deadline = time.monotonic() + 10
    while harness.call(lambda: len(harness.server.connections)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness.call(lambda: len(harness.server.connections)) == 0
    other = harness.connect()
    assert other.line() == GREETING


def test_fd_passing_with_scm_rights(harness):
    client = harness.connect()
    client.line()
    read_end, write_end = os.pipe()
    # qemu.qmp style: a lone space carrying the fd, then the command.
    client.sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  read_end.to_bytes(4, "little"))])
    client.send(b'{"execute":"getfd","arguments":{"fdname":"f"},"id":"g"}')
    assert client.message() == {"return": {}, "id": "g"}
    client.send(b'{"execute":"closefd","arguments":{"fdname":"f"},"id":"c"}')
    assert client.message() == {"return": {}, "id": "c"}
    os.close(read_end)
    os.close(write_end)


def test_close_removes_the_socket_file(tmp_path):
    path = tmp_path / "q.sock"
    h = ServerHarness(str(path), FakeMachine())
    client = h.connect()
    client.line()
    h.close()
    assert not path.exists()
    with pytest.raises(EOFError):
        client.line()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_garbage_never_breaks_the_protocol(chunks):
    """Any byte stream: every reply is one JSON object, and a later command still works."""
    machine = FakeMachine()
    splitter = JsonStreamSplitter()
    context = FakeContext()
    replies = []
    for chunk in [*chunks, b'\x00 {"execute":"query-status","id":"final"}']:
        for value in splitter.feed(chunk):
            if isinstance(value, ParseFailure):
                continue
            try:
                request = decode_message(value)
            except QmpError:
                continue
            replies.append(dispatch(machine, context, request))
    assert all(isinstance(r, dict) and ("return" in r or "error" in r) for r in replies)
    assert replies[-1].get("id") == "final"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b'{"execute":"query-status","id":1}',
                                 b'{"execute":"query-version","arguments":{}}',
                                 b'  \r\n', b'{"s":"}]\\"{["}']), min_size=1, max_size=8),
       st.data())
def test_any_chunking_gives_the_same_values(messages, data):
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks, start = [], 0
    for cut in cuts:
        chunks.append(stream[start:cut])
        start = cut
    chunks.append(stream[start:])
    assert split_all(chunks) == split_all([stream])
