"""Network namespaces that a test or benchmark creates for itself, and always removes.

Every network test runs the monitor (or QEMU) under `ip netns exec` in a
namespace of its own, with its taps inside, so that no packet it sends can
reach any address outside: the namespace has no route anywhere else.  The
namespace, its taps and every process still in it go away on exit, whatever
the outcome.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    pass


def netns_unavailable() -> str | None:
    """Why this host cannot create namespaces and taps, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is missing"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


@dataclass
class NetNamespace:
    """A named namespace; `exec_prefix` runs a command inside it."""

    name: str
    taps: list[str] = field(default_factory=list)

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, command: Sequence[str], timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.exec_prefix, *command], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise NetnsError(f"{' '.join(command)} in {self.name}: exit {result.returncode}: "
                             f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def popen(self, command: Sequence[str], **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen([*self.exec_prefix, *command], **kwargs)  # type: ignore[call-overload]

    def add_tap(self, name: str, address: str | None = None) -> str:
        """A persistent tap inside the namespace, up, with `address` (CIDR) on the host side.

        Its carrier comes up once a monitor opens it.
        """
        self.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])
        self.taps.append(name)
        if address:
            self.run(["ip", "addr", "add", address, "dev", name])
        self.run(["ip", "link", "set", name, "up"])
        return name

    def pids(self) -> list[int]:
        with contextlib.suppress(NetnsError):
            return [int(pid) for pid in _ip("netns", "pids", self.name).split()]
        return []

    def destroy(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for tap in self.taps:
            self.run(["ip", "link", "del", tap], check=False)
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", self.name)


def remove_orphans(prefix: str) -> None:
    """Removes namespaces `prefix-PID-...` whose creator is gone and that hold no process:
    left behind by a run that was killed before it could clean up (SIGKILL, SIGTERM)."""
    for line in _ip("netns", "list").splitlines():
        match = re.fullmatch(rf"({re.escape(prefix)}-(\d+)-[0-9a-f]+)(\s.*)?", line.strip())
        if not match or os.path.exists(f"/proc/{match.group(2)}"):
            continue
        orphan = NetNamespace(match.group(1))
        if not orphan.pids():
            orphan.destroy()


@contextlib.contextmanager
def net_namespace(prefix: str = "svpy") -> Iterator[NetNamespace]:
    """A fresh namespace with only `lo` (up), removed on exit whatever happens."""
    reason = netns_unavailable()
    if reason:
        raise NetnsError(reason)
    remove_orphans(prefix)
    namespace = NetNamespace(f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    _ip("netns", "add", namespace.name)
    try:
        namespace.run(["ip", "link", "set", "lo", "up"])
        yield namespace
    finally:
        namespace.destroy()
