"""The fuzzer's oracle: which replies the monitor owes, and whether its output pays them.

What is owed comes from a model of the connection's input stream: the
monitor's own stream splitter and decoder, fed every byte we send in one piece
per input, while the monitor reads the same bytes in whatever pieces the
kernel makes.  Each complete JSON value is owed exactly one reply, carrying
the value's `id` if it was an object with one, and no id otherwise (a value
that does not parse, or is not an object).  Probes (query-status with an id
starting with PROBE_PREFIX) cut the stream into segments: a probe's reply
arriving early means replies are missing, a reply arriving when the probe's
is due is one too many.

Output must be QMP framing: one ASCII JSON object per CRLF-terminated line,
each a reply (`return` or `error`, optional `id`) or an event.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from stratovirt_py.qmp.protocol import JsonStreamSplitter, ParseFailure, QmpError, decode_message

PROBE_PREFIX = "fzprobe:"
REPLY_KEYS = frozenset({"return", "error", "id"})
EVENT_KEYS = frozenset({"event", "data", "timestamp"})
# Longest output line we accept (replies are small; query-commands is the longest).
MAX_LINE = 1 << 20


def canonical(value: Any) -> str:
    """The id as JSON text: 1, 1.0 and true stay distinct, key order counts."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class Expected:
    """One reply the monitor owes."""

    has_id: bool
    id_text: str | None  # canonical(id)
    item: int  # the input (index in its batch) whose bytes completed the value; -1: a probe
    probe: str | None = None  # the probe's id, if this is a probe
    command: str | None = None  # `execute`, when the value was an object naming a string


@dataclass
class Finding:
    kind: str  # crash, hang, missing-reply, doubled-reply, wrong-reply, invalid-json, ...
    message: str
    item: int | None = None  # the suspect input's index in the batch, when known
    details: dict[str, Any] = field(default_factory=dict)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice in an object")
    return result


def parse_line(line: bytes) -> dict[str, Any]:
    """One line of monitor output (without its LF): a reply or an event; ValueError otherwise."""
    if not line.endswith(b"\r"):
        raise ValueError("line does not end in CRLF")
    if not line.isascii():
        raise ValueError("line is not ASCII")
    message = json.loads(line[:-1], parse_constant=_no_constants, object_pairs_hook=_unique)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    keys = set(message)
    if "event" in message:
        if keys != EVENT_KEYS or not isinstance(message["event"], str) \
                or not isinstance(message["data"], dict):
            raise ValueError("malformed event")
        return message
    if not keys <= REPLY_KEYS or ("return" in keys) == ("error" in keys):
        raise ValueError("neither a reply nor an event")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict) or set(error) != {"class", "desc"} \
                or not isinstance(error["class"], str) or not isinstance(error["desc"], str):
            raise ValueError("malformed error")
    return message


class StreamModel:
    """The replies one connection's input stream is owed, from the monitor's own splitter."""

    def __init__(self) -> None:
        self.splitter = JsonStreamSplitter()

    @property
    def idle(self) -> bool:
        """No value is open: the next `{` starts a new one."""
        return self.splitter.current_value is None

    def feed(self, data: bytes, item: int) -> list[Expected]:
        out = []
        for value in self.splitter.feed(data):
            out.append(self._expected(value, item))
        return out

    @staticmethod
    def _expected(value: bytes | ParseFailure, item: int) -> Expected:
        if isinstance(value, ParseFailure):
            return Expected(False, None, item)
        try:
            request = decode_message(value)
        except QmpError:
            return Expected(False, None, item)
        if not isinstance(request, dict):
            return Expected(False, None, item)
        command = request.get("execute")
        command = command if isinstance(command, str) else None
        if "id" not in request:
            return Expected(False, None, item, command=command)
        request_id = request["id"]
        probe = request_id if isinstance(request_id, str) and \
            request_id.startswith(PROBE_PREFIX) else None
        return Expected(True, canonical(request_id), -1 if probe else item, probe, command)


class ReplyChecker:
    """Checks one connection's output against what is owed, reply by reply, in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.expected: deque[Expected] = deque()
        self.replies = 0
        self.events = 0
        self.greeted = False
        self.probe_replies: dict[str, dict[str, Any]] = {}
        self.recent: deque[str] = deque(maxlen=16)
        # (command, "return" or "error") -> count: how deep the inputs reach.
        self.outcomes: dict[tuple[str, str], int] = {}  # the last replies, for a finding's report
        # Replies matched since the last probe: a repeat of one of them is a doubled reply.
        self._answered: deque[tuple[bool, str | None]] = deque(maxlen=64)

    @property
    def done(self) -> bool:
        return not self.expected

    def expect(self, expected: list[Expected]) -> None:
        self.expected.extend(expected)

    def feed(self, data: bytes) -> Finding | None:
        """Takes output bytes; the first problem found, if any."""
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    return Finding("invalid-json", f"an output line longer than {MAX_LINE} bytes",
                                   details={"start": bytes(self.buffer[:200]).hex()})
                return None
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            finding = self._line(line)
            if finding is not None:
                return finding

    def _line(self, line: bytes) -> Finding | None:
        try:
            if not self.greeted:
                message = self._greeting(line)
                self.greeted = True
                return None
            message = parse_line(line)
        except ValueError as exc:
            return Finding("invalid-json", f"invalid output line: {exc}",
                           details={"line": line[:2000].decode("latin-1")})
        if "event" in message:
            self.events += 1
            return None
        self.replies += 1
        self.recent.append(line[:200].decode("latin-1"))
        has_id = "id" in message
        id_text = canonical(message["id"]) if has_id else None
        probe = message["id"] if has_id and isinstance(message["id"], str) and \
            message["id"].startswith(PROBE_PREFIX) else None
        shown = line[:300].decode("latin-1")
        if probe is not None:
            position = next((i for i, e in enumerate(self.expected) if e.probe == probe), None)
            if position is None:
                return Finding("doubled-reply", f"a reply to probe {probe} that is not owed "
                               "(answered twice, or never sent)", details={"reply": shown})
            if position > 0:
                missing = self.expected[0]
                owed = [(e.item, e.id_text) for e in list(self.expected)[:position]]
                return Finding("missing-reply", f"{position} reply(ies) missing before probe "
                               f"{probe}'s reply", item=missing.item,
                               details={"first-missing": missing.id_text, "reply": shown,
                                        "owed (item, id)": owed,
                                        "last replies": list(self.recent)})
            self.expected.popleft()
            self.probe_replies[probe] = message
            self._answered.clear()
            return None
        if not self.expected or self.expected[0].probe is not None:
            head = self.expected[0].probe if self.expected else None
            return Finding("doubled-reply", "a reply more than the input is owed "
                           f"(the next owed reply is probe {head}'s)", details={"reply": shown})
        owed = self.expected[0]
        if owed.has_id != has_id or owed.id_text != id_text:
            return self._mismatch(owed, has_id, id_text, shown)
        self.expected.popleft()
        self._answered.append((has_id, id_text))
        if owed.command is not None:
            outcome = "return" if "return" in message else "error"
            key = (owed.command, outcome)
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
        return None

    def _mismatch(self, owed: Expected, has_id: bool, id_text: str | None,
                  shown: str) -> Finding:
        """Names a wrong reply: one answered already, one whose turn has not come, or neither."""
        details = {"reply": shown, "owed-id": owed.id_text}
        if has_id and (True, id_text) in self._answered:
            return Finding("doubled-reply", f"a second reply with id {id_text}", item=owed.item,
                           details=details)
        for later in self.expected:
            if later.probe is not None:
                break
            if later.has_id == has_id and later.id_text == id_text:
                return Finding("missing-reply", f"no reply for the value owed id {owed.id_text} "
                               f"(the reply for id {id_text} came in its place)",
                               item=owed.item, details=details)
        return Finding("wrong-reply", f"reply with id {id_text} where id {owed.id_text} "
                       "was owed", item=owed.item, details=details)

    @staticmethod
    def _greeting(line: bytes) -> dict[str, Any]:
        message = json.loads(line.rstrip(b"\r"))
        if not line.endswith(b"\r") or not isinstance(message, dict) or set(message) != {"QMP"}:
            raise ValueError("not a QMP greeting")
        return message
