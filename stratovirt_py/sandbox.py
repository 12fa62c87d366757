"""The seccomp sandbox: after set-up every thread runs under an allow-list of system calls.

The list and the filters live in C (csrc/dataplane/sandbox.c, built with libseccomp); this
module picks the mode, and each thread kind enters its filter at its own point:

- the I/O threads as they start (they only ever run C),
- each vCPU thread as it starts, parked, before the main thread's filter (so it has only its
  own),
- the main thread once the VM is built and its sockets exist (launcher.py), so every Python
  thread it starts later (chardev readers, output flushers, the unplug worker) inherits it.

A call outside the list is reported on the log (its number first) and the process dies of
SIGSYS. STRATOVIRT_SECCOMP=log lets such calls through and has the kernel log them instead
(the audit log: `dmesg | grep type=1326`), which is how one finds a missing entry.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator
from typing import Any

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.errors import MonitorError


class SandboxMode(enum.IntEnum):
    OFF = lib.SVPY_SANDBOX_OFF
    ENFORCE = lib.SVPY_SANDBOX_ENFORCE
    LOG = lib.SVPY_SANDBOX_LOG


class ThreadKind(enum.IntEnum):
    MAIN = lib.SVPY_THREAD_MAIN
    VCPU = lib.SVPY_THREAD_VCPU
    IO = lib.SVPY_THREAD_IO


CONDITIONS = {
    lib.SVPY_RULE_ANY: "",
    lib.SVPY_RULE_THREADS_ONLY: "only with CLONE_THREAD",
    lib.SVPY_RULE_OWN_PROCESS: "only to this process",
    lib.SVPY_RULE_ENOSYS: "fails with ENOSYS",
    lib.SVPY_RULE_EACCES: "fails with EACCES",
    lib.SVPY_RULE_NO_EXEC: "never PROT_EXEC",
    lib.SVPY_RULE_IOCTLS: "only the requests below",
}


class SandboxError(MonitorError):
    pass


def mode_for(enabled: bool) -> SandboxMode:
    """OFF with -disable-seccomp; LOG when STRATOVIRT_SECCOMP=log; ENFORCE otherwise."""
    if not enabled:
        return SandboxMode.OFF
    wanted = os.environ.get("STRATOVIRT_SECCOMP", "").lower()
    if wanted in ("", "on", "enforce"):
        return SandboxMode.ENFORCE
    if wanted == "log":
        return SandboxMode.LOG
    raise SandboxError(f"invalid STRATOVIRT_SECCOMP '{wanted}' (use enforce or log)")


def prepare(mode: SandboxMode, log_fd: int) -> None:
    """Chooses the mode for every later enter() and installs the bad-call reporter, which
    writes its line to `log_fd`. Call once, before any thread that enters a filter starts."""
    ret = lib.svpy_sandbox_prepare(int(mode), log_fd)
    if ret < 0:
        raise SandboxError(f"cannot prepare the seccomp filters: {os.strerror(-ret)}")


def enter(kind: ThreadKind) -> None:
    """Puts the calling thread under `kind`'s filter (for good); nothing when the mode is OFF."""
    ret = lib.svpy_sandbox_enter(int(kind))
    if ret < 0:
        raise SandboxError(f"cannot load the seccomp filter of the {kind.name.lower()} "
                           f"thread: {os.strerror(-ret)}")


def mode() -> SandboxMode:
    return SandboxMode(lib.svpy_sandbox_mode())


def _entries(entry_at: Callable[[int], Any]) -> Iterator[tuple[Any, str, frozenset[ThreadKind],
                                                                 str]]:
    """A C table's entries in order (it ends with NULL): (entry, name, thread kinds, why)."""
    index = 0
    while (entry := entry_at(index)) != ffi.NULL:
        kinds = frozenset(kind for kind in ThreadKind if entry.kinds & kind)
        yield entry, ffi.string(entry.name).decode(), kinds, ffi.string(entry.why).decode()
        index += 1


def rules() -> list[tuple[str, frozenset[ThreadKind], str, str]]:
    """The allow-list: (system call, thread kinds, condition, why), in the C table's order."""
    return [(name, kinds, CONDITIONS[rule.condition], why)
            for rule, name, kinds, why in _entries(lib.svpy_sandbox_rule)]


def ioctls() -> list[tuple[str, frozenset[ThreadKind], str]]:
    """The ioctl requests allowed: (request, thread kinds, why)."""
    return [(name, kinds, why) for _, name, kinds, why in _entries(lib.svpy_sandbox_ioctl)]


def _marks(kinds: frozenset[ThreadKind]) -> str:
    return " | ".join("x" if kind in kinds else "" for kind in ThreadKind)


def markdown_table() -> str:
    """The allow-list as the README shows it (kept equal by tests/unit/test_sandbox.py)."""
    lines = ["| system call | main | vCPU | I/O | only | why |", "|---|---|---|---|---|---|"]
    for name, kinds, condition, why in rules():
        lines.append(f"| `{name}` | {_marks(kinds)} | {condition} | {why} |")
    lines += ["", "| ioctl request | main | vCPU | I/O | why |", "|---|---|---|---|---|"]
    for name, kinds, why in ioctls():
        lines.append(f"| `{name}` | {_marks(kinds)} | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
