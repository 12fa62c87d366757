"""Shared helpers for tests that run the monitor as a process."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
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
