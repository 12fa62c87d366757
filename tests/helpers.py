"""Shared helpers for tests that run the monitor as a process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MONITOR = [sys.executable, "-m", "stratovirt_py"]


def monitor_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_monitor(args: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Runs the monitor to completion, stdin closed, capturing bytes."""
    kwargs.setdefault("env", monitor_env())
    return subprocess.run([*MONITOR, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, **kwargs)


def elf_image(segments: list[tuple[int, bytes, int]], entry: int) -> bytes:
    """A minimal ELF64 x86-64 executable: (physical address, file bytes, memory size)."""
    header_size, phdr_size = 64, 56
    data_offset = header_size + phdr_size * len(segments)
    phdrs, blobs = b"", b""
    for paddr, blob, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_offset + len(blobs), paddr, paddr,
                             len(blob), memsz, 0x1000)
        blobs += blob
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, header_size, 0, 0,
                         header_size, phdr_size, len(segments), 64, 0, 0)
    return header + phdrs + blobs


@contextlib.contextmanager
def running_monitor(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """The monitor as a background process, killed at the end if it is still running."""
    kwargs.setdefault("env", monitor_env())
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    process = subprocess.Popen([*MONITOR, *args], **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_socket(process: subprocess.Popen, path: str | Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, "the monitor exited during start-up"
        assert time.monotonic() < deadline, "QMP socket never appeared"
        time.sleep(0.02)


class Qmp:
    """A line-at-a-time QMP client that keeps the events it reads."""

    def __init__(self, path: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buffer = b""
        self.events: list[dict] = []
        assert "QMP" in self.read()

    def read(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "QMP connection closed"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def execute(self, name: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        while "event" in (message := self.read()):
            self.events.append(message)
        return message


def host_cpuinfo() -> dict[str, str]:
    """The first processor's fields in the host's /proc/cpuinfo, values as Linux prints them."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value[1:]
    return fields
