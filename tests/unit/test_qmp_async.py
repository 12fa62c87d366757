"""Async QMP commands: a handler that waits does not stop the monitor, and keeps its order."""

from __future__ import annotations

import contextlib
import inspect
import json
import socket
import threading
import time

import pytest

from stratovirt_py.event_loop import CancelledError, EventLoop
from stratovirt_py.qmp.registry import COMMANDS, command, dispatch
from stratovirt_py.qmp.schema import Arg
from stratovirt_py.qmp.server import QmpServer
from tests.unit.test_qmp import (
    FakeContext,
    FakeMachine,
    harness_fixture,  # noqa: F401 (the `harness` fixture)
)


class Gate:
    """A future on the harness loop that the test thread completes."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.event = loop.create_future()
        self.entered = threading.Event()
        self.finished = threading.Event()
        self.cancelled = threading.Event()

    def open(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set_result, None)


@pytest.fixture
def gate(harness, monkeypatch):
    """Registers `test-wait`: an async command that returns once the gate opens."""
    gate = Gate(harness.loop)

    async def wait(machine, context, args):
        gate.entered.set()
        try:
            await gate.event
        except CancelledError:
            gate.cancelled.set()
            raise
        if args.get("event"):
            machine.emit_event("TEST_DONE", {})
        if args.get("fail"):
            raise OSError(5, "Input/output error")
        gate.finished.set()
        return {"waited": True}
    monkeypatch.setitem(COMMANDS, "test-wait", None)
    command("test-wait", {"event": Arg("bool", required=False),
                          "fail": Arg("bool", required=False)})(wait)
    return gate


def greeted(harness):
    client = harness.connect()
    client.line()
    return client


def test_dispatch_returns_an_awaitable_only_for_async_commands(gate):
    machine = FakeMachine()
    assert dispatch(machine, FakeContext(), {"execute": "query-status"})["return"]
    bad = dispatch(machine, FakeContext(), {"execute": "test-wait", "arguments": {"x": 1}})
    assert bad == {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}
    assert not gate.entered.is_set()  # arguments are checked before anything runs
    pending = dispatch(machine, FakeContext(), {"execute": "test-wait", "id": 4})
    assert inspect.iscoroutine(pending)
    pending.close()


def test_others_are_served_while_a_command_waits_and_replies_stay_in_order(harness, gate):
    waiting, other = greeted(harness), greeted(harness)
    waiting.send(b'{"execute":"test-wait","id":1}{"execute":"query-status","id":2}')
    assert gate.entered.wait(5)
    waiting.send(b'{"execute":"query-version","id":3}')
    other.send(b'{"execute":"query-status","id":"other"}')
    assert other.message()["id"] == "other"
    assert waiting.nothing_pending(0.2)
    gate.open()
    replies = [waiting.message() for _ in range(3)]
    assert replies[0] == {"return": {"waited": True}, "id": 1}
    assert [r["id"] for r in replies] == [1, 2, 3]
    waiting.send(b'{"execute":"query-status","id":4}')  # reading again
    assert waiting.message()["id"] == 4


def test_async_failure_is_a_generic_error(harness, gate):
    client = greeted(harness)
    client.send(b'{"execute":"test-wait","arguments":{"fail":true},"id":"f"}'
                b'{"execute":"query-status","id":"s"}')
    gate.open()
    assert client.message() == {"error": {
        "class": "GenericError", "desc": "test-wait failed: OSError: [Errno 5] Input/output error"},
        "id": "f"}
    assert client.message()["id"] == "s"


def test_events_during_an_async_command_come_with_its_reply(harness, gate):
    caller, watcher = greeted(harness), greeted(harness)
    watcher.send(b'{"execute":"qmp_capabilities"}')
    assert watcher.message() == {"return": {}}
    caller.send(b'{"execute":"test-wait","arguments":{"event":true},"id":1}')
    assert gate.entered.wait(5)
    harness.call(harness.server.broadcast_event, "UNRELATED", {})
    assert watcher.message()["event"] == "UNRELATED"
    assert caller.nothing_pending(0.1)
    gate.open()
    assert watcher.message()["event"] == "TEST_DONE"
    data = b""
    while data.count(b"\r\n") < 3:
        data += caller.sock.recv(65536)
    lines = [json.loads(line) for line in data.split(b"\r\n")[:3]]
    assert [m.get("event") for m in lines[:2]] == ["UNRELATED", "TEST_DONE"]
    assert lines[2] == {"return": {"waited": True}, "id": 1}


def test_command_completes_when_its_client_has_gone(harness, gate):
    client = greeted(harness)
    client.send(b'{"execute":"test-wait","id":1}')
    assert gate.entered.wait(5)
    client.sock.shutdown(socket.SHUT_RDWR)
    client.sock.close()
    gate.open()
    assert gate.finished.wait(5)
    deadline = time.monotonic() + 5
    while harness.call(lambda: len(harness.server.connections)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert harness.call(lambda: len(harness.server.connections)) == 0
    assert harness.call(lambda: len(harness.server.tasks)) == 0
    assert greeted(harness) is not None


def test_shutdown_does_not_wait_for_pending_commands(harness, gate):
    client = greeted(harness)
    client.send(b'{"execute":"test-wait","id":1}')
    assert gate.entered.wait(5)
    started = time.monotonic()
    harness.close()
    assert time.monotonic() - started < 5
    assert gate.cancelled.is_set() and not gate.finished.is_set()
    with pytest.raises(EOFError):
        client.line()


def test_shutdown_with_the_loop_stopped_cancels_pending_commands(tmp_path, monkeypatch):
    """The launcher closes the server after its loop has stopped: nothing may hang there."""
    loop = EventLoop()
    entered, cancelled = [], []

    async def wait_forever(machine, context, args):
        entered.append(True)
        try:
            await loop.create_future()  # never completed
        except CancelledError:
            cancelled.append(True)
            raise
    monkeypatch.setitem(COMMANDS, "test-forever", None)
    command("test-forever")(wait_forever)
    server = QmpServer(FakeMachine(), loop, (str(tmp_path / "q.sock"),))
    server.start()
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "q.sock"))
    client.sendall(b'{"execute":"test-forever"}')
    deadline = time.monotonic() + 5
    while not entered and time.monotonic() < deadline:
        loop.run_until(lambda: bool(entered), 0.01)
    assert entered
    # Another client's command arrives while the server is closing: the machine is
    # about to be torn down, so it must not run.
    other = socket.socket(socket.AF_UNIX)
    other.connect(str(tmp_path / "q.sock"))
    loop.run_until(lambda: False, 0.05)  # accepted, greeted
    other.sendall(b'{"execute":"test-forever","id":"late"}')
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 5
    assert cancelled == [True] and entered == [True] and not server.tasks
    other.settimeout(5)
    received = b""
    # Closed with the request unread: the peer may reset rather than end the stream.
    with contextlib.suppress(ConnectionResetError):
        while chunk := other.recv(65536):
            received += chunk
    assert b'"late"' not in received
    loop.close()
    client.close()
    other.close()


def test_synchronous_commands_create_no_task(harness, monkeypatch):
    created = []
    create_task = harness.loop.create_task

    def counting_create_task(coro):
        created.append(coro)
        return create_task(coro)
    monkeypatch.setattr(harness.loop, "create_task", counting_create_task)
    client = greeted(harness)
    client.send(b'{"execute":"query-status"}' * 50)
    for _ in range(50):
        assert "return" in client.message()
    assert created == []
