"""QMP wire format: splitting the input stream into JSON values, parsing, encoding replies.

Input is a byte stream, not lines: `qemu.qmp` sends commands with no newline,
libvirt ends them with CRLF, a person at `ncat -U` types them in pieces.  The
splitter tracks strings and bracket depth (as QEMU's json-streamer does) to
find where each top-level value ends, however the bytes were chunked.
Output is one compact ASCII JSON object per line, ending in CRLF, and never
NaN or Infinity (they are not JSON).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratovirt_py.errors import shorten

MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 1024
WHITESPACE = b" \t\r\n"
STRUCTURAL = b"{}[]:,"
OPENERS = b"{["
CLOSERS = b"}]"
# Bytes that never occur in JSON: between values they are the QMP spec's way
# for a client to force the parser back to a known-good state.
RESET_BYTES = bytes(sorted(set(range(0x20)) - set(WHITESPACE))) + b"\xfe\xff"
# Inside a string, tab, CR and LF are invalid too (JSON wants them escaped).
STRING_BREAK_BYTES = bytes(range(0x20)) + b"\xfe\xff"

SIZE_LIMIT_DESC = "JSON token size limit exceeded"
NESTING_LIMIT_DESC = "JSON nesting depth limit exceeded"


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


def _byte_class(chars: bytes) -> re.Pattern[bytes]:
    """A regex matching any one of `chars`: the scanner jumps to the next byte that matters."""
    return re.compile(b"[" + b"".join(b"\\x%02x" % c for c in sorted(set(chars))) + b"]")


_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_STRUCTURE_STOPS = _byte_class(b'"' + OPENERS + CLOSERS + RESET_BYTES)
_STRING_STOPS = _byte_class(b'"\\' + STRING_BREAK_BYTES)
_BARE_STOPS = _byte_class(WHITESPACE + STRUCTURAL + b'"' + RESET_BYTES)
_SKIP_STOPS = _byte_class(STRUCTURAL + RESET_BYTES)

# Scanner states.
_IDLE = 0  # between values
_IN_STRUCTURE = 1  # inside {} or [], outside any string
_IN_STRING = 2
_AFTER_ESCAPE = 3  # a backslash in a string ended the previous chunk
_IN_BARE = 4  # a top-level number or keyword
_SKIPPING = 5  # after a byte that broke the value: waiting for a structural character
# In each state, the bytes that matter (others are passed over in C); _AFTER_ESCAPE
# looks at one byte and does not search.
_STOPS = (_NOT_WHITESPACE, _STRUCTURE_STOPS, _STRING_STOPS, _STRING_STOPS, _BARE_STOPS,
          _SKIP_STOPS)


class JsonStreamSplitter:
    """Cuts a byte stream into complete top-level JSON values.

    Every value that starts is returned exactly once, in order: as its bytes,
    or as one ParseFailure.  A value that breaks (a byte that cannot be in it,
    too big, too deep) gets its ParseFailure at once; the rest of it is then
    skipped without being stored:

    * A reset byte (RESET_BYTES), or a control byte inside a string, breaks
      the value it is in; between values a reset byte is silently dropped.
      After the break, bytes are skipped up to the next structural character.
      An opening `{` or `[` there starts a new value (so a reset byte followed
      by a command always parses the command, as the QMP spec promises); a
      closing one or a separator is taken as the rest of the broken value,
      whose structure is followed (outside any string, at the depth it had)
      until it closes.  This is QEMU's lexer recovery, except that the broken
      value's tail does not produce more errors.
    * A reset byte while skipping the rest of a broken value returns straight
      to the top level.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._stored = bytearray()  # the current value's bytes from earlier chunks
        self._state = _IDLE
        self._depth = 0
        self._discarding = False  # the current value has had its ParseFailure
        self.values_started = 0

    @property
    def current_value(self) -> int | None:
        """The number (0-based, in stream order) of the value whose bytes come next, if any."""
        return None if self._state == _IDLE else self.values_started - 1

    def feed(self, data: bytes) -> list[bytes | ParseFailure]:
        """Returns the values completed by `data` (raw bytes, or a ParseFailure)."""
        out: list[bytes | ParseFailure] = []
        state, depth = self._state, self._depth
        start = 0  # where the current value's bytes begin in `data`
        pos, end = 0, len(data)
        # The first position in `data` past the current value's size limit.  The limit
        # strikes at that byte, not at the end of a read: how the bytes were chunked
        # must not decide what a byte that comes later does.
        limit = self._max_bytes - len(self._stored) \
            if state not in (_IDLE, _SKIPPING) and not self._discarding else end
        while pos < end:
            if state == _AFTER_ESCAPE:
                if pos >= limit and not self._discarding:
                    self._fail(SIZE_LIMIT_DESC, out)
                    limit = end
                byte = data[pos]
                pos += 1
                state = self._break(byte, out) if byte in STRING_BREAK_BYTES else _IN_STRING
                continue
            match = _STOPS[state].search(data, pos)
            if match is None:
                break
            pos = match.start()
            byte = data[pos]
            if pos >= limit and state != _IN_BARE:  # (a bare word's delimiter is not in it)
                if state != _IDLE and not self._discarding:
                    self._fail(SIZE_LIMIT_DESC, out)
                limit = end
            if state == _IDLE:
                pos += 1
                if byte in RESET_BYTES:
                    continue
                self.values_started += 1
                self._discarding = False
                start = pos - 1
                limit = start + self._max_bytes
                depth = 0
                if byte in OPENERS:
                    state, depth = _IN_STRUCTURE, 1
                elif byte == 0x22:
                    state = _IN_STRING
                elif byte in STRUCTURAL:
                    out.append(ParseFailure(f"JSON parse error, stray '{chr(byte)}'"))
                else:
                    state = _IN_BARE
            elif state == _IN_STRUCTURE:
                pos += 1
                if byte == 0x22:
                    state = _IN_STRING
                elif byte in OPENERS:
                    depth += 1
                    if depth > MAX_NESTING and not self._discarding:
                        self._fail(NESTING_LIMIT_DESC, out)
                elif byte in CLOSERS:
                    depth -= 1
                    if depth == 0:
                        self._complete(data, start, pos, out)
                        state = _IDLE
                else:
                    state = self._break(byte, out)
            elif state == _IN_STRING:
                pos += 1
                if byte == 0x5C:  # backslash: the next byte is escaped
                    if pos == end:
                        state = _AFTER_ESCAPE
                        continue
                    if pos >= limit and not self._discarding:
                        self._fail(SIZE_LIMIT_DESC, out)
                        limit = end
                    if data[pos] in STRING_BREAK_BYTES:
                        state = self._break(data[pos], out)
                        pos += 1
                    else:
                        pos += 1
                elif byte == 0x22:
                    if depth:
                        state = _IN_STRUCTURE
                    else:
                        self._complete(data, start, pos, out)
                        state = _IDLE
                else:
                    state = self._break(byte, out)
            elif state == _IN_BARE:
                # The delimiter is looked at again, between values.
                self._complete(data, start, pos, out)
                state = _IDLE
            elif byte in OPENERS:  # _SKIPPING: a new value starts here
                state = _IDLE
            else:
                pos += 1
                if byte in CLOSERS:
                    depth -= 1
                state = _IN_STRUCTURE if byte not in RESET_BYTES and depth > 0 else _IDLE
        if state not in (_IDLE, _SKIPPING) and not self._discarding:
            self._stored += data[start:end]
            if len(self._stored) > self._max_bytes:
                self._fail(SIZE_LIMIT_DESC, out)
        self._state, self._depth = state, depth
        return out

    def _complete(self, data: bytes, start: int, stop: int,
                  out: list[bytes | ParseFailure]) -> None:
        if self._discarding:
            self._discarding = False
            return
        if self._stored:
            self._stored += data[start:stop]
            value = bytes(self._stored)
            self._stored.clear()
        else:
            value = data[start:stop]
        if len(value) > self._max_bytes:
            out.append(ParseFailure(SIZE_LIMIT_DESC))
        else:
            out.append(value)

    def _fail(self, desc: str, out: list[bytes | ParseFailure]) -> None:
        """Answers the current value now; its remaining bytes are only tracked, not stored."""
        out.append(ParseFailure(desc))
        self._stored.clear()
        self._discarding = True

    def _break(self, byte: int, out: list[bytes | ParseFailure]) -> int:
        """A byte that cannot be in the current value; returns the next state."""
        if not self._discarding:
            self._fail(f"JSON parse error, invalid byte 0x{byte:02x}", out)
        elif byte in RESET_BYTES:
            return _IDLE  # a second reset while recovering: back to the top level
        return _SKIPPING

    def flush_bare(self) -> list[bytes | ParseFailure]:
        """At end of input, a pending bare word counts as complete."""
        if self._state != _IN_BARE:
            return []
        out: list[bytes | ParseFailure] = []
        self._complete(b"", 0, 0, out)
        self._state = _IDLE
        return out


def _with_nesting_headroom(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls a json function, allowing MAX_NESTING levels beyond the current stack.

    The json C code spends one recursion level per nesting level, and Python's
    default limit (1000) is below MAX_NESTING; only deep values pay for the retry.
    """
    try:
        return function(*args, **kwargs)
    except RecursionError:
        pass
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + MAX_NESTING + 100)
    try:
        return function(*args, **kwargs)
    finally:
        sys.setrecursionlimit(limit)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number '{shorten(text)}' out of range")
    return value


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
        return _with_nesting_headroom(
            json.loads, text, object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        if exc.msg == "Expecting value" and text[:1].isalpha():
            word = text.split()[0] if text.split() else text
            raise QmpError(f"JSON parse error, invalid keyword '{word}'") from None
        raise QmpError(f"JSON parse error, {exc.msg.lower()}") from None
    except RecursionError:
        raise QmpError(NESTING_LIMIT_DESC) from None
    except ValueError as exc:
        raise QmpError(f"JSON parse error, {exc}") from None


def encode(message: dict[str, Any]) -> bytes:
    """One server message: compact JSON, ASCII only, CRLF-terminated.

    Raises ValueError for NaN or Infinity (not JSON) and TypeError for what
    JSON cannot express, rather than write an invalid line.
    """
    text = _with_nesting_headroom(json.dumps, message, separators=(",", ":"),
                                  ensure_ascii=True, allow_nan=False)
    return text.encode() + b"\r\n"


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
