"""The QMP fuzzer's oracle can fail: a fake monitor that doubles, drops, garbles or dies is caught.

The fake answers over a socketpair like the real one (greeting, then one reply
per JSON value, found with the monitor's own splitter), except for the one
misbehaviour a test asks for.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import pytest

from fuzz.qmp.fuzzer import Campaign, independent_check
from fuzz.qmp.generators import FuzzEnv, Input, InputGenerator
from fuzz.qmp.oracle import Expected, ReplyChecker, StreamModel, canonical, parse_line
from stratovirt_py.qmp.protocol import JsonStreamSplitter, ParseFailure, QmpError, decode_message

GREETING = b'{"QMP":{"version":{},"capabilities":[]}}\r\n'


class FakeMonitor:
    """Answers every value, but misbehaves on the command named `target`."""

    def __init__(self, mode: str = "ok", target: str = "query-version",
                 die_at: int | None = None) -> None:
        self.mode = mode
        self.target = target
        self.die_at = die_at  # dies on the value with this number (over all connections)
        self.values = 0
        self.silent = False
        self.exit_code: int | None = None
        self.death_code = -9
        self.stderr = "fake monitor\n"
        self.threads: list[threading.Thread] = []

    def poll(self) -> int | None:
        return self.exit_code

    def restart(self) -> None:
        self.exit_code = None

    def stderr_tail(self) -> str:
        return self.stderr

    def rss_kib(self) -> int:
        return 0

    def fd_count(self) -> int:
        return 0

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        thread.start()
        self.threads.append(thread)
        return ours

    def _serve(self, sock: socket.socket) -> None:
        splitter = JsonStreamSplitter()
        with sock, contextlib.suppress(OSError):  # the client may hang up at any time
            sock.sendall(GREETING)
            while data := sock.recv(65536):
                for value in splitter.feed(data):
                    if not self._answer(sock, value):
                        return

    def _answer(self, sock: socket.socket, value: bytes | ParseFailure) -> bool:
        self.values += 1
        if self.silent:  # hung: reads on, answers nothing
            return True
        if self.values == self.die_at:
            self.exit_code = -11
            return False
        reply: dict = {"error": {"class": "GenericError", "desc": "bad"}}
        request = None
        if not isinstance(value, ParseFailure):
            with contextlib.suppress(QmpError):
                request = decode_message(value)
        if isinstance(request, dict):
            result = {"status": "running", "running": True} \
                if request.get("execute") == "query-status" else {}
            reply = {"return": result}
            if "id" in request:
                reply["id"] = request["id"]
        line = json.dumps(reply).encode() + b"\r\n"
        if isinstance(request, dict) and request.get("execute") == self.target:
            if self.mode == "double":
                line += line
            elif self.mode == "miss":
                line = b""
            elif self.mode == "invalid":
                line = b'{"return": {}, \r\n'
            elif self.mode == "wrong-id":
                line = json.dumps({"return": {}, "id": 1.0}).encode() + b"\r\n"
            elif self.mode == "hang":
                self.silent = True
                return True
            elif self.mode == "die":
                self.exit_code = self.death_code
                return False
        sock.sendall(line)
        return True


def campaign(tmp_path: Path, mode: str, **kwargs) -> Campaign:
    return Campaign(FakeMonitor(mode, **kwargs), None, tmp_path, timeout=1.0,
                    log=lambda _line: None)


def batch(*commands: str, flush: bool = False) -> list[Input]:
    return [Input("schema", [json.dumps({"execute": name, "id": number}).encode()], flush=flush)
            for number, name in enumerate(commands)]


COMMANDS = ("query-status", "query-version", "query-cpus")


def test_a_well_behaved_fake_gives_no_finding(tmp_path):
    fuzz = campaign(tmp_path, "ok")
    assert fuzz.run_batch(batch(*COMMANDS)) is None
    assert fuzz.run_batch(batch(*COMMANDS, flush=True)) is None
    assert fuzz.health() is None
    assert fuzz.stats.replies >= 2 * len(COMMANDS) + 2


@pytest.mark.parametrize(("mode", "kind"), [
    ("double", "doubled-reply"), ("miss", "missing-reply"), ("invalid", "invalid-json"),
    ("wrong-id", "wrong-reply"), ("die", "crash"), ("hang", "hang")])
def test_each_misbehaviour_is_a_finding(tmp_path, mode, kind):
    fuzz = campaign(tmp_path, mode)
    finding = fuzz.run_batch(batch(*COMMANDS))
    assert finding is not None
    assert finding.kind == kind, finding.message


def test_a_finding_is_saved_for_replay_and_a_dead_monitor_restarted(tmp_path):
    monitor = FakeMonitor(die_at=10)
    fuzz = Campaign(monitor, InputGenerator(3, FuzzEnv()), tmp_path, timeout=1.0,
                    log=lambda _line: None)
    stats = fuzz.run(inputs=50, seconds=30, max_findings=1, batch=50)
    assert [f.kind for f in stats.findings] == ["crash"]
    assert stats.restarts == 1 and monitor.poll() is None
    saved = json.loads((tmp_path / "finding-001-crash" / "batch.json").read_text())
    assert len(saved["items"]) == 50
    assert Input.from_json(saved["items"][0]).to_json() == saved["items"][0]


def test_a_dropped_connection_is_not_a_finding(tmp_path):
    fuzz = campaign(tmp_path, "die")
    fuzz.monitor.exit_code = None
    fake = fuzz.monitor
    assert isinstance(fake, FakeMonitor)
    fake.mode = "ok"
    assert fuzz.run_batch(batch(*COMMANDS)) is None
    assert fuzz.sock is not None
    fuzz.sock.shutdown(socket.SHUT_RD)  # as if the monitor had closed it
    assert fuzz.run_batch(batch(*COMMANDS)) is None
    assert fuzz.stats.dropped == 1


def test_ids_are_compared_by_json_type():
    checker = ReplyChecker()
    checker.feed(GREETING)
    checker.expect([Expected(True, canonical(1), 0), Expected(True, canonical(True), 1)])
    assert checker.feed(b'{"return":{},"id":1}\r\n') is None
    for wrong in (b"1.0", b"1", b'"true"'):  # true is owed; 1 again is a doubled reply
        copy = ReplyChecker()
        copy.feed(GREETING)
        copy.expect(list(checker.expected))
        copy._answered.extend(checker._answered)
        finding = copy.feed(b'{"return":{},"id":' + wrong + b"}\r\n")
        assert finding is not None
        assert finding.kind == ("doubled-reply" if wrong == b"1" else "wrong-reply")
    assert checker.feed(b'{"return":{},"id":true}\r\n') is None
    assert checker.done


@pytest.mark.parametrize("line", [
    b'{"return":{}}\n', b'{"return":NaN}\r\n', b'{"return":{},"return":{}}\r\n',
    b'[1]\r\n', b'{"return":{},"error":{"class":"a","desc":"b"}}\r\n',
    b'{"error":{"class":"a"}}\r\n', b'{"return":{},"x":1}\r\n', b'{"return":"\xc3\xa9"}\r\n',
    b'{"event":"STOP"}\r\n'])
def test_output_that_is_not_qmp_framing_is_rejected(line):
    with pytest.raises(ValueError):
        parse_line(line.removesuffix(b"\n"))


def test_the_model_owes_one_reply_per_value_with_its_id():
    model = StreamModel()
    owed = model.feed(b'{"execute":"x","id":[1]} 7 "s" {"id":2,\x00 {"id":3}\n', 0)
    assert [(e.has_id, e.id_text) for e in owed] == [
        (True, "[1]"), (False, None), (False, None), (False, None), (True, "3")]
    assert model.idle


def test_the_generators_are_reproducible_and_leave_out_vm_ending_commands():
    env = FuzzEnv(images=["/i"], missing=["/m"], odd_files=["/dev/null"], taps=["fz0"])
    one, two, other = InputGenerator(7, env), InputGenerator(7, env), InputGenerator(8, env)
    inputs = [one.next().data for _ in range(2000)]
    assert inputs == [two.next().data for _ in range(2000)]
    assert inputs != [other.next().data for _ in range(2000)]
    assert not any(b"quit" in data or b"system_" in data for data in inputs)
    kinds = {InputGenerator(9, env).next().kind for _ in range(1)} | \
        {item.kind for item in (two.next() for _ in range(2000))}
    assert {"schema", "raw", "truncate", "flip", "split", "several"} <= kinds


def test_the_monitors_parser_is_checked_against_pythons_json_on_whole_values(monkeypatch):
    command = Input("schema", [b'{"execute":"x","id":[1.5,{"a":null}]}'])
    assert independent_check(command) is None
    assert independent_check(Input("schema", [b'"\xed\xa0\x80"'])) is None  # not UTF-8: no id
    # A decoder that loses ids disagrees with Python's json.
    monkeypatch.setattr("fuzz.qmp.oracle.decode_message", lambda raw: {"execute": "x"})
    finding = independent_check(command)
    assert finding is not None and finding.kind == "parser"


def test_a_monitor_killed_by_seccomp_is_named_with_its_system_call(tmp_path):
    fuzz = campaign(tmp_path, "die")
    fake = fuzz.monitor
    assert isinstance(fake, FakeMonitor)
    fake.death_code = -31
    line = ("stratovirt-py: seccomp: bad system call 41 (socket: 0x1, 0x1, 0x0, 0x0, 0x0, 0x0) "
            "on thread 7 (main filter): the monitor is killed with SIGSYS")
    fake.stderr = f"INFO: started\n{line}\n"
    finding = fuzz.run_batch(batch(*COMMANDS))
    assert finding is not None and finding.kind == "seccomp"
    assert "bad system call 41 (socket" in finding.message
    assert finding.item == 1  # query-version's input: the first still owed a reply


def test_a_monitor_that_keeps_a_client_that_never_reads_is_a_finding(tmp_path):
    # The fake never drops anyone: it blocks writing replies nobody reads.
    finding = campaign(tmp_path, "ok").side_clients()
    assert finding is not None and finding.kind == "flood"
