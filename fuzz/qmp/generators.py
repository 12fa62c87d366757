"""Seeded, reproducible QMP inputs: schema-aware commands, structural mutations, raw bytes.

Every input is bytes for the monitor's QMP socket, possibly in several writes
(to split a value across reads) and possibly with file descriptors attached
(SCM_RIGHTS).  The same seed gives the same inputs in the same order.

Commands that end the VM (quit, system_reset, system_powerdown: a microvm reset
ends it) are left out of the stream, so one monitor serves the whole run; any
input whose bytes name one of them is drawn again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import stratovirt_py.qmp  # noqa: F401  (registers every command)
from stratovirt_py.qmp.registry import COMMANDS
from stratovirt_py.qmp.schema import Arg, Schema

VM_ENDING_COMMANDS = ("quit", "system_reset", "system_powerdown")
_VM_ENDING_BYTES = tuple(name.encode() for name in VM_ENDING_COMMANDS)
FUZZED_COMMANDS = tuple(sorted(name for name in COMMANDS if name not in VM_ENDING_COMMANDS))

# A byte that never occurs in JSON: the QMP parser's way back to the top level.
RESET = b"\x18"


@dataclass
class Input:
    """One fuzz input: `chunks` are written separately (pause_between makes them separate reads)."""

    kind: str
    chunks: list[bytes]
    fds: int = 0  # copies of an fd sent with the first chunk
    flush: bool = False  # follow with a reset byte and a probe command
    pause_between: bool = False

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "chunks": [c.hex() for c in self.chunks], "fds": self.fds,
                "flush": self.flush, "pause_between": self.pause_between}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Input:
        return cls(data["kind"], [bytes.fromhex(c) for c in data["chunks"]], data["fds"],
                   data["flush"], data["pause_between"])


@dataclass
class FuzzEnv:
    """What the monitor's host side has, so that hot-plug arguments can name real things."""

    images: list[str] = field(default_factory=list)  # raw images that exist
    missing: list[str] = field(default_factory=list)  # paths that do not exist
    odd_files: list[str] = field(default_factory=list)  # a directory, a fifo, /dev/null, ...
    taps: list[str] = field(default_factory=list)  # taps in the monitor's namespace
    balloon_path: str = "/machine/peripheral/balloon0"


BOUNDARY_INTS = (0, 1, -1, 2, 7, 255, 256, 4096, (1 << 31) - 1, 1 << 31, -(1 << 31),
                 (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, -(1 << 63), (1 << 64) - 1,
                 1 << 64, -(1 << 64), 10**30, -(10**30), 64 << 20, 128 << 20, 256 << 20)
BOUNDARY_FLOATS = (0.0, -0.0, 0.5, -1.5, 1e308, -1e308, 5e-324, 1.7976931348623157e308, 1e-7)
ODD_STRINGS = ("", "a", "x" * 256, "é€😀", "\u0000", "a\u0000b", "\ud800", "\udfff",
               "\n\t\r", "../../../../etc/passwd", "%s%n%x", "${IFS}", "0", "-1", "0x1f",
               "on", "off", "true", "null", "\u202e\ufeff", "\\", '"', "\x7f", "ÿ" * 40)
NAMES = ("d0", "d1", "d2", "disk0", "n0", "n1", "net0", "balloon0", "", "ü", "x" * 300,
         "1d", "a b", "a,b")
FD_NAMES = ("fdA", "fdB", "fdC", "1bad", "", "x" * 200)
FD_DESCRIPTORS = ("0", "1", "2", "3", "5", "7", "9", "99", "999999999", "9999999999", "-1",
                  "abc", "fdA", "fdB", "fdA:fdB", ":", "", "0x3", "٣")
MACS = ("52:54:00:12:34:56", "52:54:00:ab:cd:ef", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
        "00:00:00:00:00:00", "zz:zz:zz:zz:zz:zz", "52:54:00:12:34", "", "52-54-00-12-34-56")
ADDRS: tuple[Any, ...] = (0, 1, 2, 3, 5, 31, 32, -1, 1 << 64, "0x1", "0x2", "0x1f", "0x20",
                          "3", "zz", "0" * 20, "", "0b11", "1_0", True, None, 1.5, [], {})
QOM_PROPERTIES = ("guest-stats-polling-interval", "guest-stats", "type", "actual", "", "x")
QOM_VALUES: tuple[Any, ...] = (0, 1, 2, 5, 3600, -1, 2**31, 2**63, 2**64, 10**30, 0.5, 1e308,
                               "1", "", None, True, [], {})
DRIVER_NAMES = ("virtio-blk-mmio", "virtio-blk-device", "virtio-net-mmio", "virtio-net-device",
                "virtio-balloon-device", "virtio-rng-device", "e1000", "", "virtio-blk-pci")
IDS_OF_EVERY_TYPE: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 2**63, -(2**64), 10**40, 0.5, -0.0, 1e308, 5e-324, "", "id",
    "é€😀", "\u0000", "\ud800", "x" * 1000, [], [1, "a", None], {}, {"a": {"b": [1, {}]}},
    [[[[[]]]]])


def _choice(rng: random.Random, seq: tuple[Any, ...] | list[Any]) -> Any:
    return seq[int(rng.random() * len(seq))]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, small, with boundary numbers and odd strings."""
    pick = rng.random()
    if depth > 3 or pick < 0.25:
        return _choice(rng, (None, True, False))
    if pick < 0.45:
        return _choice(rng, BOUNDARY_INTS)
    if pick < 0.55:
        return _choice(rng, BOUNDARY_FLOATS)
    if pick < 0.8:
        return _choice(rng, ODD_STRINGS)
    if pick < 0.9:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_choice(rng, ODD_STRINGS): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _wrong_type(rng: random.Random, type_name: str) -> Any:
    """A value that is not of `type_name` (schema type name)."""
    while True:
        value = random_json(rng)
        if type_name in ("int", "uint") and isinstance(value, int) and not isinstance(value, bool):
            continue
        if type_name == "str" and isinstance(value, str):
            continue
        if type_name == "bool" and isinstance(value, bool):
            continue
        if type_name == "object" and isinstance(value, dict):
            continue
        if type_name == "array" and isinstance(value, list):
            continue
        return value


class InputGenerator:
    """Draws inputs from the three generators; reproducible from `seed`."""

    def __init__(self, seed: int, env: FuzzEnv) -> None:
        self.rng = random.Random(seed)
        self.env = env
        self.count = 0
        self._generators: list[tuple[float, Callable[[], Input]]] = [
            (0.60, self.schema_input), (0.30, self.mutated_input), (0.10, self.raw_input)]

    def next(self) -> Input:
        while True:
            pick = self.rng.random()
            generate = self._generators[-1][1]
            for weight, candidate in self._generators:
                pick -= weight
                if pick < 0:
                    generate = candidate
                    break
            item = generate()
            data = item.data
            if not any(name in data for name in _VM_ENDING_BYTES):
                self.count += 1
                return item

    # (a) Schema-aware commands.

    def _string_for(self, name: str, arg: Arg, command: str) -> Any:
        rng, env = self.rng, self.env
        if arg.choices is not None and rng.random() < 0.85:
            return _choice(rng, arg.choices)
        if name in ("filename",):
            pools = [env.images] * 5 + [env.missing, env.odd_files]
            pool = _choice(rng, [p for p in pools if p] or [list(ODD_STRINGS)])
            return _choice(rng, pool)
        if name == "ifname":
            return _choice(rng, [*env.taps, *env.taps, "fzmissing0", "x" * 20, "", "lo",
                                 "fz%d", "tap_ü"])
        if name in ("fd", "fds"):
            return _choice(rng, FD_DESCRIPTORS)
        if name == "fdname":
            return _choice(rng, FD_NAMES)
        if name == "mac":
            return _choice(rng, MACS)
        if name == "path":
            return _choice(rng, (env.balloon_path, env.balloon_path, "/machine/peripheral/x",
                                 "", "/", "balloon0", "/machine/peripheral/balloon0/"))
        if name == "property":
            return _choice(rng, QOM_PROPERTIES)
        if name == "driver" and command == "device_add":
            return _choice(rng, DRIVER_NAMES)
        if name in ("node-name", "id", "drive", "netdev"):
            return _choice(rng, NAMES)
        return _choice(rng, ODD_STRINGS) if rng.random() < 0.5 else _choice(rng, NAMES)

    def _valid_value(self, name: str, arg: Arg, command: str) -> Any:
        rng = self.rng
        if isinstance(arg.type, dict):
            return self._arguments(arg.type, command, mutate=False)
        type_name = arg.type
        if type_name in ("int", "uint"):
            if name == "value":  # balloon: sizes around the guest's memory
                return _choice(rng, (64 << 20, 100 << 20, 128 << 20, 127 << 20, 1 << 40, 1, 0))
            return _choice(rng, BOUNDARY_INTS)
        if type_name == "number":
            return _choice(rng, BOUNDARY_FLOATS)
        if type_name == "bool":
            return rng.random() < 0.5
        if type_name == "str":
            return self._string_for(name, arg, command)
        if type_name == "array":
            item = arg.items or "any"
            return [self._valid_value(name, Arg(item), command) for _ in range(rng.randrange(3))]
        if type_name == "object":
            return {} if rng.random() < 0.5 else random_json(rng, 2)
        # "any": device_add/netdev_add properties and qom-set's value.
        if name == "addr":
            return _choice(rng, ADDRS)
        if name == "value":
            return _choice(rng, QOM_VALUES)
        if name in ("id", "drive", "netdev"):
            return _choice(rng, NAMES)
        if name == "mac":
            return _choice(rng, MACS)
        if name == "vhost":
            return _choice(rng, (True, False, "on", "off", "true", None, 1))
        if name == "serial":
            return _choice(rng, ODD_STRINGS)
        return random_json(rng)

    def _arguments(self, schema: Schema, command: str, mutate: bool) -> dict[str, Any]:
        rng = self.rng
        args: dict[str, Any] = {}
        for name, arg in schema.items():
            if arg.required or rng.random() < 0.4:
                args[name] = self._valid_value(name, arg, command)
        if command == "device_add" and "id" not in args and rng.random() < 0.9:
            args["id"] = _choice(rng, NAMES)
        if not mutate:
            return args
        how = rng.random()
        names = list(schema)
        if how < 0.45 or not names:
            pass  # valid
        elif how < 0.55:
            required = [n for n in names if schema[n].required]
            if required:
                args.pop(_choice(rng, required), None)
        elif how < 0.68:
            name = _choice(rng, names)
            arg = schema[name]
            args[name] = _wrong_type(rng, "object" if isinstance(arg.type, dict) else arg.type)
        elif how < 0.76:
            args[_choice(rng, ("extra", "x" * 100, "", "é", "node_name", "ID"))] = \
                random_json(rng)
        elif how < 0.84:
            args[_choice(rng, names)] = _choice(rng, (None, -1, -(1 << 63), 1 << 64, 10**30))
        elif how < 0.97:
            args[_choice(rng, names)] = _choice(rng, ODD_STRINGS)
        else:  # long strings; kept rare, as they cost most of the bytes sent
            args[_choice(rng, names)] = "H" * _choice(rng, (1000,) * 14 + (4096,) * 5 + (65536,))
        return args

    def _request(self) -> dict[str, Any]:
        rng = self.rng
        name = _choice(rng, FUZZED_COMMANDS)
        entry = COMMANDS[name]
        request: dict[str, Any] = {"execute": name}
        envelope = rng.random()
        if entry.schema or rng.random() < 0.3:
            request["arguments"] = self._arguments(entry.schema, name, mutate=True)
        if envelope < 0.04:
            request["execute"] = _choice(rng, ("no-such-command", "", "Query-Status",
                                               "query-status ", "x" * 5000, "\u0000"))
        elif envelope < 0.07:
            request["execute"] = _wrong_type(rng, "str")
        elif envelope < 0.09:
            request["arguments"] = _wrong_type(rng, "object")
        elif envelope < 0.11:
            del request["execute"]
        elif envelope < 0.13:
            request[_choice(rng, ("control", "exec-oob", "Execute", ""))] = random_json(rng)
        if rng.random() < 0.7:
            request["id"] = _choice(rng, IDS_OF_EVERY_TYPE)
        if rng.random() < 0.2:  # the id first, as some clients send it
            request = dict(sorted(request.items(), key=lambda kv: kv[0] != "id"))
        return request

    def _valid_request(self) -> dict[str, Any]:
        """A well-formed hot-plug, balloon or fd request on names that exist (or just did):
        without these, nearly every hot-plug would fail its argument checks."""
        rng, env = self.rng, self.env
        disk = _choice(rng, ("d0", "d1", "d2", "disk0"))
        nic = _choice(rng, ("n0", "n1", "net0"))
        templates: list[tuple[str, dict[str, Any]]] = [
            ("blockdev-add", {"node-name": disk, "file": {
                "driver": "file", "filename": _choice(rng, env.images or ["/nonexistent"])},
                "cache": {"direct": rng.random() < 0.5}, "read-only": rng.random() < 0.3}),
            ("blockdev-add", {"driver": "file", "node-name": disk,
                              "filename": _choice(rng, env.images or ["/nonexistent"])}),
            ("device_add", {"driver": _choice(rng, ("virtio-blk-mmio", "virtio-blk-device")),
                            "id": disk, "drive": disk}),
            ("device_add", {"driver": _choice(rng, ("virtio-net-mmio", "virtio-net-device")),
                            "id": nic, "netdev": nic}),
            ("device_del", {"id": _choice(rng, (disk, nic))}),
            ("blockdev-del", {"node-name": disk}),
            ("netdev_add", {"id": nic, "ifname": _choice(rng, env.taps or ["fz0"])}),
            ("netdev_add", {"id": nic, "fd": _choice(rng, FD_NAMES[:3])}),
            ("netdev_del", {"id": nic}),
            ("getfd", {"fdname": _choice(rng, FD_NAMES[:3])}),
            ("closefd", {"fdname": _choice(rng, FD_NAMES[:3])}),
            ("balloon", {"value": _choice(rng, (64 << 20, 96 << 20, 128 << 20))}),
            ("qom-set", {"path": env.balloon_path, "property": "guest-stats-polling-interval",
                         "value": _choice(rng, (0, 1, 2, 3600))}),
            ("qom-get", {"path": env.balloon_path,
                         "property": _choice(rng, QOM_PROPERTIES[:2])}),
            ("stop", {}), ("cont", {}),
        ]
        name, arguments = _choice(rng, templates)
        request: dict[str, Any] = {"execute": name, "arguments": arguments}
        if rng.random() < 0.7:
            request["id"] = _choice(rng, IDS_OF_EVERY_TYPE)
        return request

    def schema_input(self) -> Input:
        rng = self.rng
        request = self._valid_request() if rng.random() < 0.25 else self._request()
        if rng.random() < 0.02:  # a bare value, an array, a string: not an object
            request = _choice(rng, ([request], "query-status", 1, None, []))
        text = json.dumps(request, ensure_ascii=rng.random() < 0.5,
                          separators=_choice(rng, ((",", ":"), (", ", ": "))))
        data = text.encode("utf-8", "surrogatepass")
        data += _choice(rng, (b"", b"\n", b"\r\n", b" "))
        fds = 0
        if (request.get("execute") if isinstance(request, dict) else None) == "getfd":
            fds = _choice(rng, (0, 1, 1, 1, 3, 20))  # 20: more than the monitor takes (16)
        elif rng.random() < 0.01:
            fds = 1  # fds with a command that takes none: closed by the monitor
        return Input("schema", [data], fds=fds)

    # (b) Structural mutations of schema-aware commands.

    def mutated_input(self) -> Input:
        rng = self.rng
        base = self.schema_input().data
        op = rng.random()
        flush = rng.random() < 0.7
        if op < 0.16:
            return Input("truncate", [base[:rng.randrange(max(1, len(base)))]], flush=flush)
        if op < 0.32:
            data = bytearray(base)
            for _ in range(rng.randrange(1, 5)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            return Input("flip", [bytes(data)], flush=flush)
        if op < 0.45:
            data = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                special = _choice(rng, (b"\x00", b"\xff", b"\xfe", b"\x18", b"\\", b'"', b"{",
                                        b"}", b"[", b"]", b",", b":", b"\xc3\x28",
                                        b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\\u", b"\\ud800",
                                        b"\t", b"\n", b"0", b"-", b"e999"))
                at = rng.randrange(len(data) + 1)
                data[at:at] = special
            return Input("insert", [bytes(data)], flush=flush)
        if op < 0.54:
            data = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                if data:
                    at = rng.randrange(len(data))
                    del data[at:at + rng.randrange(1, 8)]
            return Input("delete", [bytes(data)], flush=flush)
        if op < 0.66:
            parts = [base] + [self.schema_input().data for _ in range(rng.randrange(1, 6))]
            glue = _choice(rng, (b"", b" ", b"\n", b"\r\n", b"\t"))
            return Input("several", [glue.join(p.rstrip() for p in parts) + b"\n"])
        if op < 0.78:
            cuts = sorted(rng.sample(range(1, len(base)), min(len(base) - 1, rng.randrange(1, 6))))
            pieces = [base[a:b] for a, b in zip([0, *cuts], [*cuts, len(base)], strict=True)]
            return Input("split", pieces, pause_between=rng.random() < 0.15)
        if op < 0.81:
            return self._deep_nesting()
        if op < 0.83:
            return self._huge()
        if op < 0.92:
            return self._bad_string(base)
        return self._escapes(base)

    def _deep_nesting(self) -> Input:
        rng = self.rng
        # 10^5 levels cost the monitor (and the model) 10^5 steps each: kept rare.
        depth = _choice(rng, (100, 1000, 1023, 1024, 1025, 5000) * 3 + (100_000,))
        opener, closer = (b"[", b"]") if depth > 5000 or rng.random() < 0.5 else (b'{"a":', b"}")
        closed = rng.random() < 0.6
        inner = opener * depth + b"1" + (closer * depth if closed else b"")
        if rng.random() < 0.5:
            data = b'{"execute":"query-status","arguments":{"x":' + inner + b'},"id":"deep"}'
        else:
            data = inner
        return Input("nest", [data], flush=not closed or rng.random() < 0.5)

    def _huge(self) -> Input:
        rng = self.rng
        what = rng.random()
        if what < 0.05:  # past the 1 MiB message limit
            size = _choice(rng, ((1 << 20) + 1, (1 << 20) + 4096))
            data = b'{"execute":"query-status","id":"' + b"A" * size + b'"}'
        elif what < 0.3:
            data = b'{"execute":"balloon","arguments":{"value":' + b"9" * \
                _choice(rng, (4300, 4301, 20000)) + b'},"id":1}'
        elif what < 0.5:
            data = b'{"execute":"balloon","arguments":{"value":' + \
                _choice(rng, (b"1e999", b"-1e999", b"1e-999", b"1.0e308", b"-0", b"0.0e0",
                              b"123456789012345678901234567890.5")) + b'},"id":2}'
        elif what < 0.7:
            data = b'{"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0",' \
                b'"property":"guest-stats-polling-interval","value":' + \
                _choice(rng, (b"1e999", b"99999999999999999999999", b"-1", b"0.000001",
                              b"1e300", b"[1]")) + b'},"id":3}'
        else:
            data = b'{"execute":"blockdev-add","arguments":{"node-name":"' + \
                b"n" * _choice(rng, (4096, 100_000)) + b'","file":{"driver":"file",' \
                b'"filename":"' + b"/x" * _choice(rng, (2048, 50_000)) + b'"}},"id":4}'
        return Input("huge", [data], flush=rng.random() < 0.3)

    def _bad_string(self, base: bytes) -> Input:
        """Invalid UTF-8 or a NUL byte inside a string."""
        rng = self.rng
        quote = base.find(b'"', 1)
        at = quote + 1 if quote >= 0 else 0
        bad = _choice(rng, (b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80",
                            b"\xf4\x90\x80\x80", b"\x00", b"\x01", b"\xe2\x82"))
        return Input("badstring", [base[:at] + bad + base[at:]], flush=rng.random() < 0.5)

    def _escapes(self, base: bytes) -> Input:
        """Characters of the input rewritten as \\u escapes, some of them lone surrogates."""
        rng = self.rng
        text = base.decode("utf-8", "surrogatepass")
        out = []
        in_string = False
        for char in text:
            if char == '"':
                in_string = not in_string
            if in_string and char.isalnum() and rng.random() < 0.3:
                out.append(f"\\u{ord(char):04x}")
            else:
                out.append(char)
        data = "".join(out).encode("utf-8", "surrogatepass")
        if rng.random() < 0.3:
            data = data.replace(b'":"', b'":"\\udc80', 1)
        return Input("escape", [data])

    # (c) Raw bytes.

    def raw_input(self) -> Input:
        rng = self.rng
        size = rng.randrange(1, 80)
        how = rng.random()
        if how < 0.3:
            data = rng.randbytes(size)
        elif how < 0.7:
            alphabet = b'{}[]:,"\\ \n\r\t0123456789-+.eEtrufalsn'
            data = bytes(_choice(rng, alphabet) for _ in range(size))
        else:
            tokens = (b"{", b"}", b"[", b"]", b":", b",", b'"execute"', b'"arguments"', b'"id"',
                      b'"query-status"', b'"stop"', b'"cont"', b"true", b"null", b"1", b"-0.5e3",
                      b'"\\u0000"', b'"\\ud800"', b" ", b"\n", b'"', b"\\")
            data = b"".join(_choice(rng, tokens) for _ in range(size // 3 + 1))
        return Input("raw", [data], flush=rng.random() < 0.7)
