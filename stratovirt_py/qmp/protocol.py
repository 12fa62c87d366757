"""QMP wire format: splitting the input stream into JSON values, parsing, encoding replies.

Input is a byte stream, not lines: `qemu.qmp` sends commands with no newline,
libvirt ends them with CRLF, a person at `ncat -U` types them in pieces.  The
splitter tracks strings and bracket depth (as QEMU's json-streamer does) to
find where each top-level value ends, however the bytes were chunked.
Output is one compact ASCII JSON object per line, ending in CRLF.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 1024
WHITESPACE = b" \t\r\n"
STRUCTURAL = b"{}[]:,"
RESYNC_BYTES = frozenset(set(range(0x20)) - set(WHITESPACE)) | {0xFE, 0xFF}


class QmpError(Exception):
    """A command failure, reported as {"error": {"class": ..., "desc": ...}}."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class ParseFailure:
    """A value in the stream that could not be used; answered without an id."""

    desc: str


class MessageTooLarge(Exception):
    """A single value grew past MAX_MESSAGE_BYTES; the connection is dropped."""


class JsonStreamSplitter:
    """Cuts a byte stream into complete top-level JSON values."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._value = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # inside a top-level number/keyword
        self._too_deep = False

    def feed(self, data: bytes) -> list[bytes | ParseFailure]:
        """Returns the values completed by `data` (raw bytes, or a ParseFailure)."""
        out: list[bytes | ParseFailure] = []
        value = self._value
        for byte in data:
            if byte in RESYNC_BYTES:
                # Never valid in JSON: the QMP spec's way to reset the parser.
                if value or self._depth:
                    out.append(ParseFailure("JSON parse error, invalid control character"))
                    self._reset()
                continue
            if self._in_string:
                value.append(byte)
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # closing quote
                    self._in_string = False
                    if self._depth == 0:
                        self._complete(out)
            elif self._bare:
                if byte in WHITESPACE or byte in STRUCTURAL or byte == 0x22:
                    self._complete(out)
                    self._start(byte, out)
                else:
                    value.append(byte)
            elif self._depth:
                value.append(byte)
                if byte == 0x22:
                    self._in_string = True
                elif byte in b"{[":
                    self._depth += 1
                    if self._depth > MAX_NESTING:
                        self._too_deep = True
                elif byte in b"}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._complete(out)
            else:
                self._start(byte, out)
            if len(value) > self._max_bytes:
                raise MessageTooLarge(f"a QMP message exceeded {self._max_bytes} bytes")
        return out

    def _start(self, byte: int, out: list[bytes | ParseFailure]) -> None:
        """Handles a byte between values."""
        if byte in WHITESPACE:
            return
        self._value.append(byte)
        if byte in b"{[":
            self._depth = 1
        elif byte == 0x22:
            self._in_string = True
        elif byte in b"}]:,":
            out.append(ParseFailure(f"JSON parse error, stray '{chr(byte)}'"))
            self._value.clear()
        else:
            self._bare = True

    def _complete(self, out: list[bytes | ParseFailure]) -> None:
        if self._too_deep:
            out.append(ParseFailure("JSON nesting depth limit exceeded"))
        else:
            out.append(bytes(self._value))
        self._reset()

    def _reset(self) -> None:
        self._value.clear()
        self._depth = 0
        self._bare = self._in_string = self._escape = self._too_deep = False

    def flush_bare(self) -> list[bytes | ParseFailure]:
        """At end of input, a pending bare word counts as complete."""
        if not self._bare:
            return []
        out: list[bytes | ParseFailure] = []
        self._complete(out)
        return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def decode_message(raw: bytes) -> Any:
    """Parses one value from the splitter; raises QmpError with QEMU's parse-error wording."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise QmpError("JSON parse error, invalid UTF-8 sequence in string") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if exc.msg == "Expecting value" and text[:1].isalpha():
            word = text.split()[0] if text.split() else text
            raise QmpError(f"JSON parse error, invalid keyword '{word}'") from None
        raise QmpError(f"JSON parse error, {exc.msg.lower()}") from None
    except RecursionError:
        raise QmpError("JSON nesting depth limit exceeded") from None
    except ValueError as exc:
        raise QmpError(f"JSON parse error, {exc}") from None


def encode(message: dict[str, Any]) -> bytes:
    """One server message: compact JSON, ASCII only, CRLF-terminated."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode() + b"\r\n"


def timestamp() -> dict[str, int]:
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


def event_message(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": timestamp()}


def error_message(error: QmpError, request_id: Any = None, has_id: bool = False) -> dict:
    message: dict[str, Any] = {"error": {"class": error.error_class, "desc": error.desc}}
    if has_id:
        message["id"] = request_id
    return message


def return_message(value: Any, request_id: Any = None, has_id: bool = False) -> dict:
    message: dict[str, Any] = {"return": value}
    if has_id:
        message["id"] = request_id
    return message
