"""QMP hardening (issue 8): strict JSON out, recovery from bad bytes, one reply per command,
fd ownership, events written with their reply, QEMU's limits and check order."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratovirt_py.qmp.protocol import (
    JsonStreamSplitter,
    ParseFailure,
    QmpError,
    decode_message,
    encode,
)
from stratovirt_py.qmp.registry import COMMANDS, command
from tests.unit.test_qmp import (
    FakeMachine,
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

