"""QMP hardening (issue 8): strict JSON out, recovery from bad bytes, one reply per command,
fd ownership, events written with their reply, QEMU's limits and check order."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratovirt_py.qmp.protocol import (
    SIZE_LIMIT_DESC,
    JsonStreamSplitter,
    ParseFailure,
    QmpError,
    decode_message,
    encode,
)
from stratovirt_py.qmp.registry import COMMANDS, command
from tests.unit.test_qmp import (
    FakeMachine,
    ServerHarness,
    harness_fixture,  # noqa: F401 (the `harness` fixture)
    run,
    split_all,
)


def strict_loads(line: bytes):
    """JSON as RFC 8259 has it: NaN and Infinity are errors."""
    def reject(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=reject)


def strict_message(client) -> dict:
    message = strict_loads(client.line())
    assert isinstance(message, dict)
    return message


@pytest.fixture
def register(monkeypatch):
    """Registers a command for one test only."""
    def add(name: str, handler, schema=None) -> None:
        monkeypatch.setitem(COMMANDS, name, None)  # undone at teardown: the name goes away
        command(name, schema)(handler)
    return add


def greeted(harness):
    client = harness.connect()
    client.line()
    return client


# Item 7: never NaN/Infinity on the wire.

@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1.5e400"])
def test_non_finite_numbers_are_parse_errors(number):
    with pytest.raises(QmpError) as info:
        decode_message(b'{"execute":"query-status","id":' + number + b"}")
    assert info.value.desc == f"JSON parse error, number '{number.decode()}' out of range"


def test_encode_refuses_non_finite_numbers():
    with pytest.raises(ValueError):
        encode({"return": float("inf")})
    with pytest.raises(ValueError):
        encode({"return": float("nan")})


def test_handler_returning_nan_still_gets_one_valid_reply(harness, register, caplog):
    register("test-nan", lambda machine, context, args: {"value": float("nan")})
    client = greeted(harness)
    client.send(b'{"execute":"test-nan","id":"n"}{"execute":"query-status","id":"s"}')
    reply = strict_message(client)
    assert reply["id"] == "n" and reply["error"]["class"] == "GenericError"
    assert strict_message(client)["id"] == "s"


# Item 8: a bad byte inside a value costs that value only.

@pytest.mark.parametrize(("stream", "errors"), [
    # The case: one error, then the next command, whole.
    (b'{"execute":"qu\xffit"}', 1),
    (b'{"execute":"qu\x01it","id":1}', 1),
    # A raw newline in a string (an unterminated string typed at ncat).
    (b'{"execute":"query-status}\n', 1),
    # The broken value's remaining structure is skipped, strings and all.
    (b'{"a":"x\xffy", "b": {"c":"}"}, "d":[1]}', 1),
    (b'{"a":"\\\x01"}', 1),
    # The spec's reset: a control byte abandons a half-sent command.
    (b'{"execute":\x00', 1),
    (b'{"a":"half\x00', 1),
    # A second reset while skipping the broken value's tail: back at the top level.
    (b'{"a":[[["x\xff"],\x00', 1),
    # Between values a reset byte is silent.
    (b'\x1b\xff\xfe', 0),
])
def test_one_error_per_broken_value(stream, errors):
    stream += b'{"ok":1}\xff[2]'
    for chunks in ([stream], [bytes([b]) for b in stream]):
        result = split_all(chunks)
        assert result[errors:] == [b'{"ok":1}', b"[2]"]
        assert all(isinstance(value, ParseFailure) for value in result[:errors])


@pytest.mark.parametrize(("bad", "desc"), [
    (b'{"execute":"query-status","id":1e999}', "JSON parse error, number '1e999' out of range"),
    (b'{"execute":"qu\xffit"}', "JSON parse error, invalid byte 0xff"),
    (b'{"execute":"query\x01-status","id":"x"}\r\n', "JSON parse error, invalid byte 0x01"),
    (b'{"execute":"query-status}\n', "JSON parse error, invalid byte 0x0a"),
])
def test_bad_value_gets_one_valid_error_and_the_connection_goes_on(harness, bad, desc):
    client = greeted(harness)
    client.send(bad + b'{"execute":"query-status","id":1}')
    assert strict_message(client) == {"error": {"class": "GenericError", "desc": desc}}
    assert strict_message(client)["id"] == 1
    for request_id in range(2, 5):
        client.send(b'{"execute":"query-status","id":%d}' % request_id)
        assert strict_message(client) == {
            "return": {"running": True, "singlestep": False, "status": "running"},
            "id": request_id}
    assert client.nothing_pending()


def test_splitter_numbers_values_in_stream_order():
    splitter = JsonStreamSplitter()
    assert splitter.current_value is None
    assert splitter.feed(b' {"a":') == []
    assert splitter.current_value == 0 and splitter.values_started == 1
    assert splitter.feed(b'1} ]{"b":"\xff') == [
        b'{"a":1}', ParseFailure("JSON parse error, stray ']'"),
        ParseFailure("JSON parse error, invalid byte 0xff")]
    # Skipping the broken value's tail: still value 2's bytes.
    assert splitter.current_value == 2
    assert splitter.feed(b'"} ') == []
    assert splitter.current_value is None and splitter.values_started == 3


# Item 9: every command gets exactly one reply.

def test_unexpected_exception_becomes_generic_error(harness, register, caplog):
    def broken(machine, context, args):
        raise RuntimeError("boom")
    register("test-broken", broken)
    client = greeted(harness)
    with caplog.at_level(logging.ERROR, logger="stratovirt_py.qmp"):
        client.send(b'{"execute":"test-broken","id":1}{"execute":"query-status","id":2}'
                    b'{"execute":"test-broken","id":3}{"execute":"query-status","id":4}')
        replies = [strict_message(client) for _ in range(4)]
    assert replies[0] == {"error": {"class": "GenericError",
                                    "desc": "test-broken failed: RuntimeError: boom"}, "id": 1}
    assert replies[2]["id"] == 3 and replies[2]["error"]["class"] == "GenericError"
    assert [r["id"] for r in replies] == [1, 2, 3, 4]
    assert "return" in replies[1] and "return" in replies[3]
    logged = [r for r in caplog.records if "test-broken" in r.getMessage()]
    assert logged and logged[0].exc_info and "RuntimeError: boom" in caplog.text


def test_unexpected_exception_in_dispatch_keeps_the_id(register):
    def broken(machine, context, args):
        raise ValueError("embedded null byte")
    register("test-broken", broken)
    assert run(FakeMachine(), {"execute": "test-broken", "id": [1]}) == {
        "error": {"class": "GenericError",
                  "desc": "test-broken failed: ValueError: embedded null byte"},
        "id": [1]}


# Item 10: an fd belongs to the message it came with.

def send_fd(client, data: bytes, fd: int) -> None:
    client.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])


class Pipe:
    """A pipe whose read end goes to the server: writing tells whether the server still has it."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()

    def hand_over(self) -> int:
        return self.read_end

    def sent(self) -> None:
        os.close(self.read_end)  # now only the server's copy keeps the pipe readable

    def held_by_server(self) -> bool:
        try:
            os.write(self.write_end, b"x")
        except BrokenPipeError:
            return False
        return True

    def close(self) -> None:
        os.close(self.write_end)


@pytest.fixture
def pipes():
    made: list[Pipe] = []

    def make() -> Pipe:
        made.append(Pipe())
        return made[-1]
    yield make
    for pipe in made:
        pipe.close()


def test_refused_getfd_closes_its_fd_and_the_next_getfd_binds_its_own(harness, pipes):
    client = greeted(harness)
    first, second = pipes(), pipes()
    send_fd(client, b'{"execute":"getfd","arguments":{"fdname":"1bad"},"id":1}', first.read_end)
    first.sent()
    assert strict_message(client)["error"]["desc"].startswith("Parameter 'fdname' expects")
    assert not first.held_by_server()
    send_fd(client, b'{"execute":"getfd","arguments":{"fdname":"good"},"id":2}\r\n',
            second.read_end)
    second.sent()
    assert strict_message(client) == {"return": {}, "id": 2}
    assert second.held_by_server()
    client.send(b'{"execute":"closefd","arguments":{"fdname":"good"},"id":3}')
    assert strict_message(client) == {"return": {}, "id": 3}
    assert not second.held_by_server()


def test_fd_sent_with_another_command_is_closed_at_once(harness, pipes):
    client = greeted(harness)
    for request in (b'{"execute":"query-status","id":1}', b'{"execute": oops}', b'[1, 2]'):
        pipe = pipes()
        send_fd(client, request, pipe.read_end)
        pipe.sent()
        strict_message(client)
        assert not pipe.held_by_server()
    client.send(b'{"execute":"getfd","arguments":{"fdname":"f"},"id":9}')
    assert strict_message(client)["error"]["desc"] == "No file descriptor supplied via SCM_RIGHTS"


def test_fd_received_between_values_goes_to_the_next_command(harness, pipes):
    client = greeted(harness)
    pipe = pipes()
    send_fd(client, b" ", pipe.read_end)  # qemu.qmp's send_fd_scm()
    pipe.sent()
    time.sleep(0.1)  # its own read
    client.send(b'{"execute":"getfd","arguments":{"fdname":"f"},"id":1}')
    assert strict_message(client) == {"return": {}, "id": 1}
    assert pipe.held_by_server()


def test_qemu_qmp_space_merged_behind_a_command_goes_to_the_next_command(harness, pipes):
    """qemu.qmp's fd-carrying space read together with the command before it (the
    monitor was busy): the fd is for the getfd that follows, not for that command."""
    client = greeted(harness)
    pipe = pipes()
    send_fd(client, b'{"execute":"query-status","id":0} ', pipe.read_end)
    pipe.sent()
    assert strict_message(client)["id"] == 0
    client.send(b'{"execute":"getfd","arguments":{"fdname":"f"},"id":1}')
    assert strict_message(client) == {"return": {}, "id": 1}
    assert pipe.held_by_server()


def test_fd_received_mid_value_goes_to_that_value(harness, pipes):
    client = greeted(harness)
    pipe = pipes()
    client.send(b'{"execute":"getfd",')
    time.sleep(0.1)  # read separately
    send_fd(client, b'"arguments":{"fdname":"f"},"id":1}', pipe.read_end)
    pipe.sent()
    assert strict_message(client) == {"return": {}, "id": 1}
    assert pipe.held_by_server()


def test_fd_with_the_second_of_two_commands_read_together(harness, pipes):
    """The kernel ends a read with the message that carried fds: they are the last command's."""
    client = greeted(harness)
    pipe = pipes()
    harness.loop.call_soon_threadsafe(time.sleep, 0.3)  # the server reads both at once
    client.send(b'{"execute":"query-status","id":1}')
    send_fd(client, b'{"execute":"getfd","arguments":{"fdname":"f"},"id":2}\r\n',
            pipe.read_end)
    pipe.sent()
    assert strict_message(client)["id"] == 1
    assert strict_message(client) == {"return": {}, "id": 2}
    assert pipe.held_by_server()


def test_getfd_through_qemu_qmp(harness, pipes):
    import asyncio

    from qemu.qmp import QMPClient

    pipe = pipes()

    async def scenario() -> None:
        qmp = QMPClient("fd")
        await qmp.connect(harness.path)
        qmp.send_fd_scm(pipe.read_end)
        pipe.sent()
        assert await qmp.execute("getfd", {"fdname": "disk"}) == {}
        assert pipe.held_by_server()
        assert await qmp.execute("closefd", {"fdname": "disk"}) == {}
        assert not pipe.held_by_server()
        await qmp.disconnect()

    asyncio.run(scenario())


def test_connection_close_releases_named_fds(harness, pipes):
    client = greeted(harness)
    pipe = pipes()
    send_fd(client, b'{"execute":"getfd","arguments":{"fdname":"f"}}', pipe.read_end)
    pipe.sent()
    assert strict_message(client) == {"return": {}}
    client.sock.close()
    deadline = time.monotonic() + 5
    while pipe.held_by_server() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pipe.held_by_server()


# Item 18: a command's events and its return in one write.

def test_events_of_a_command_come_in_the_same_read_as_its_return(harness):
    client = greeted(harness)
    for _ in range(100):
        for name in (b"stop", b"cont"):
            client.sock.sendall(b'{"execute":"%s"}' % name)
            first = client.sock.recv(1024)  # hydropper's client: one read per command
            lines = first.split(b"\r\n")
            assert lines[-1] == b"" and lines[1] == b'{"return":{}}', first
            assert strict_loads(lines[0])["event"] == ("STOP" if name == b"stop" else "RESUME")


def test_events_wait_for_the_reply_only_on_the_commands_own_connection(harness, register):
    released = threading.Event()

    def slow(machine, context, args):
        machine.emit_event("TEST_EVENT", {"n": 1})
        assert released.wait(5)  # the loop is busy here: nothing else can be written
        return {"done": True}
    register("test-slow", slow)
    caller, watcher = greeted(harness), greeted(harness)
    watcher.send(b'{"execute":"qmp_capabilities"}')
    assert strict_message(watcher) == {"return": {}}
    caller.send(b'{"execute":"test-slow","id":7}')
    assert strict_message(watcher)["event"] == "TEST_EVENT"  # at once
    assert caller.nothing_pending(0.1)  # held back until the reply
    released.set()
    data = b""
    while data.count(b"\r\n") < 2:
        data += caller.sock.recv(65536)
    event, reply = (strict_loads(line) for line in data.split(b"\r\n")[:2])
    assert event["event"] == "TEST_EVENT" and reply == {"return": {"done": True}, "id": 7}


def test_events_of_a_command_in_the_specs_order(harness, register):
    def stop_then_exit(machine, context, args):
        machine.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        machine.emit_event("STOP", {})
    register("test-stop-exit", stop_then_exit)
    client = greeted(harness)
    for request, names in ((b"test-stop-exit", ["STOP", None, "SHUTDOWN"]),
                           (b"system_powerdown", [None, "POWERDOWN"])):
        client.sock.sendall(b'{"execute":"%s"}' % request)
        lines = client.sock.recv(1024).split(b"\r\n")
        assert lines[-1] == b"" and len(lines) == len(names) + 1
        assert [strict_loads(line).get("event") for line in lines[:-1]] == names
        assert strict_loads(lines[names.index(None)]) == {"return": {}}


def test_event_after_a_command_is_sent_at_once(harness):
    client = greeted(harness)
    client.send(b'{"execute":"qmp_capabilities"}')
    strict_message(client)
    harness.call(harness.server.broadcast_event, "POWERDOWN", {})
    assert strict_message(client)["event"] == "POWERDOWN"


# Item 19: QEMU's check order and limits.

def test_missing_arguments_are_reported_before_unexpected_ones():
    machine = FakeMachine()
    assert run(machine, {"execute": "getfd", "arguments": {"bogus": 1}})["error"]["desc"] == (
        "Parameter 'fdname' is missing")
    reply = run(machine, {"execute": "blockdev-add", "arguments": {
        "bogus": 1, "node-name": "n", "file": {"extra": 1, "filename": "x"}}})
    assert reply["error"]["desc"] == "Parameter 'file.driver' is missing"
    reply = run(machine, {"execute": "blockdev-add", "arguments": {
        "bogus": 1, "node-name": "n", "file": {"extra": 1, "filename": "x", "driver": "file"}}})
    assert reply["error"]["desc"] == "Parameter 'file.extra' is unexpected"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_limit_is_1024():
    assert split_all([nested(1024)]) == [nested(1024)]
    assert split_all([nested(1025)]) == [ParseFailure("JSON nesting depth limit exceeded")]
    value = decode_message(nested(1024))
    for _ in range(1023):
        value = value[0]
    assert value == []


def test_deep_id_is_parsed_and_echoed(harness):
    client = greeted(harness)
    deep_id = nested(1023)  # 1024 levels with the request object around it
    client.send(b'{"execute":"query-status","id":' + deep_id + b"}")
    reply = client.line()
    assert reply.endswith(b',"id":' + deep_id + b"}\r\n")
    client.send(b'{"execute":"query-status","id":' + nested(1024) + b"}")
    assert strict_message(client) == {"error": {"class": "GenericError",
                                                "desc": "JSON nesting depth limit exceeded"}}
    client.send(b'{"execute":"nope","id":' + deep_id + b"}")
    assert b"CommandNotFound" in client.line()


def test_deep_capability_list_is_a_type_error():
    reply = run(FakeMachine(), {"execute": "qmp_capabilities",
                                "arguments": {"enable": ["oob", decode_message(nested(1020))]}})
    assert reply["error"]["desc"] == "Invalid parameter type for 'enable[1]', expected: string"


def test_oversized_message_gets_an_error_and_the_connection_recovers(harness):
    client = greeted(harness)
    big = b'{"execute":"query-status","id":"' + b"x" * (1 << 20) + b'","more":{"a":"}"}}'
    client.send(big + b'{"execute":"query-status","id":"next"}')
    assert strict_message(client) == {"error": {"class": "GenericError",
                                                "desc": "JSON token size limit exceeded"}}
    assert strict_message(client)["id"] == "next"
    assert client.nothing_pending()


# Any bytes at all, between valid commands.

@pytest.fixture(scope="module")
def shared_harness(tmp_path_factory):
    h = ServerHarness(str(tmp_path_factory.mktemp("qmp") / "qmp.sock"), FakeMachine())
    yield h
    h.close()


# Garbage: random bytes, and pieces of JSON and QMP that make unfinished or odd values.
JSONISH = st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b"1e999", b"-0.5", b"NaN",
    b"tru", b"\xff", b"\x00", b"\x01", b"\t", b'"execute"', b'"query-status"', b'"id"',
    b'"arguments"', b"\xc3", b"\xa9"]), max_size=24).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=48), JSONISH), max_size=8), st.data())
def test_splitter_returns_every_value_once_however_chunked(pieces, data):
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole, chunked = JsonStreamSplitter(), JsonStreamSplitter()
    values = whole.feed(stream)
    assert [v for chunk in chunks for v in chunked.feed(chunk)] == values
    assert chunked.values_started == whole.values_started
    unfinished = whole.current_value is not None and whole.current_value >= len(values)
    assert len(values) == whole.values_started - unfinished


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=48), JSONISH), min_size=1, max_size=8), st.data())
def test_arbitrary_bytes_between_commands_never_break_the_protocol(shared_harness, garbage,
                                                                     data):
    """Every valid command is answered exactly once, in order; every output line is strict JSON."""
    client = shared_harness.connect()
    try:
        client.line()
        expected = []
        for index, blob in enumerate(garbage):
            client.send(blob)
            if data.draw(st.booleans(), label=f"command after blob {index}"):
                request_id = f"valid-{index}"
                expected.append(request_id)
                # A reset byte first, so that the garbage cannot swallow the command.
                client.send(b'\x00{"execute":"query-status","id":"%s"}' % request_id.encode())
        client.send(b'\x00{"execute":"query-version","id":"end"}')
        answered = []
        while True:
            message = strict_message(client)
            assert set(message) & {"return", "error", "event"}, message
            if message.get("id") == "end":
                break
            if isinstance(message.get("id"), str) and message["id"].startswith("valid-"):
                assert "return" in message, message
                answered.append(message["id"])
        assert answered == expected
    finally:
        client.sock.close()


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=24), JSONISH), max_size=8), st.data())
def test_the_size_limit_strikes_at_the_same_byte_however_chunked(pieces, data):
    """Found by fuzz/qmp: a value was only measured at the end of a read, so a reset byte
    past the limit broke it (then skipping) in one read and ended it (then the top level)
    in small reads: the same bytes got different numbers of replies."""
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole, chunked = JsonStreamSplitter(max_bytes=12), JsonStreamSplitter(max_bytes=12)
    values = whole.feed(stream)
    assert [v for chunk in chunks for v in chunked.feed(chunk)] == values
    assert chunked.values_started == whole.values_started


def test_a_reset_byte_past_the_size_limit_ends_the_value_however_it_was_read():
    # The fuzzer's case, scaled down: an unclosed value grows past the limit, then a reset.
    stream = b'{"a":"' + b"A" * 20 + b'"' + b'{"e\x18xecute",,"id":[1]}\n'
    whole, bytewise = JsonStreamSplitter(max_bytes=16), JsonStreamSplitter(max_bytes=16)
    values = whole.feed(stream)
    assert [v for byte in stream for v in bytewise.feed(bytes([byte]))] == values
    assert values[0] == ParseFailure(SIZE_LIMIT_DESC)
