"""The host end of the net benchmark, run inside the benchmark's network namespace.

`ip netns exec NS python -m benchmarks.netpeer MODE ...`: the harness process
stays in the host's namespace (Python 3.11 has no os.setns), so whatever must
touch the namespace's tap or addresses runs as this small program there.  It
prints `ready` once its socket is set up, then one JSON line with its result,
and exits.

    recv   TCP: accept one connection on ADDRESS:PORT, read BYTES, close.
           Times the first byte's arrival -> the last expected byte's arrival.
    send   TCP: connect to ADDRESS:PORT (retrying while the guest's listener is
           not up yet), send BYTES, shut down the write side, wait for the guest
           to close.  Times connected -> the guest's close seen.
    drain  raw frames of ETHERTYPE arriving on the tap from the guest: counts
           them (kernel socket statistics, so frames the socket could not hold
           still count) until its stdin closes.
    flood  raw frames of ETHERTYPE and SIZE into the tap, toward the guest, as
           fast as the guest takes them, from a `go` line on its stdin until its
           stdin closes.  The tap's own
           counters pace it: at most INFLIGHT frames are kept queued for the
           monitor, so the sender does not spin on a full queue and take the CPU
           the guest and monitor need (this host has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024
# struct tpacket_stats: tp_packets (including drops), tp_drops.
PACKET_STATISTICS = 6
SOL_PACKET = 263
BROADCAST = b"\xff" * 6
# A locally administered unicast address for the host's frames.
HOST_MAC = bytes.fromhex("020000000001")


def _say(message: dict[str, Any] | str) -> None:
    text = message if isinstance(message, str) else json.dumps(message)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def recv(address: str, port: int, nbytes: int, timeout: float) -> dict[str, Any]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(1)
    listener.settimeout(timeout)
    _say("ready")
    connection, _ = listener.accept()
    accepted = time.monotonic_ns()
    listener.close()
    connection.settimeout(timeout)
    buffer = bytearray(1 << 20)
    received = 0
    first = last = None
    with connection:
        while received < nbytes:
            count = connection.recv_into(buffer)
            if count == 0:
                break
            last = time.monotonic_ns()
            if first is None:
                first = last
            received += count
    return {"bytes": received, "accepted_ns": accepted, "first_ns": first, "last_ns": last}


def send(address: str, port: int, nbytes: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    _say("ready")
    attempts = 0
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        attempts += 1
        try:
            sock.connect((address, port))
            break
        except (ConnectionRefusedError, TimeoutError):
            # The guest's listener is not up yet: it is typed on a slow console.
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    connected = time.monotonic_ns()
    payload = bytes(CHUNK)
    sent = 0
    with sock:
        while sent < nbytes:
            sent += sock.send(payload[:min(CHUNK, nbytes - sent)])
        sock.shutdown(socket.SHUT_WR)
        written = time.monotonic_ns()
        # The guest's nc closes once it has read everything (our FIN last).
        extra = 0
        while chunk := sock.recv(4096):
            extra += len(chunk)
        closed = time.monotonic_ns()
    return {"bytes": sent, "attempts": attempts, "connected_ns": connected,
            "written_ns": written, "closed_ns": closed, "guest_sent": extra}


def _packet_socket(ifname: str, ethertype: int) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    sock.bind((ifname, ethertype))
    return sock


def _packet_stats(sock: socket.socket) -> tuple[int, int]:
    """(frames seen including drops, drops) since the last call (the kernel resets them)."""
    packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return packets, drops


def drain(ifname: str, ethertype: int, timeout: float) -> dict[str, Any]:
    sock = _packet_socket(ifname, ethertype)
    _packet_stats(sock)  # start from zero
    _say("ready")
    # Nothing is read while the guest runs: the counters see every frame anyway,
    # and reading would take CPU from the guest.  stdin closing ends the count.
    select.select([sys.stdin], [], [], timeout)
    frames, drops = _packet_stats(sock)
    sizes = set()
    sock.setblocking(False)
    for _ in range(16):
        try:
            sizes.add(len(sock.recv(65536)))
        except BlockingIOError:
            break
    sock.close()
    return {"frames": frames, "socket_drops": drops, "sample_sizes": sorted(sizes)}


class TapCounters:
    """The tap's transmit counters: frames the monitor read, frames the tap dropped."""

    def __init__(self, ifname: str) -> None:
        base = Path("/sys/class/net") / ifname / "statistics"
        self._files = [os.open(base / name, os.O_RDONLY) for name in ("tx_packets", "tx_dropped")]

    def read(self) -> tuple[int, int]:
        packets, dropped = (int(os.pread(fd, 32, 0)) for fd in self._files)
        return packets, dropped

    def taken(self) -> int:
        return sum(self.read())

    def close(self) -> None:
        for fd in self._files:
            os.close(fd)


def flood(ifname: str, ethertype: int, size: int, inflight: int, timeout: float
          ) -> dict[str, Any]:
    sock = _packet_socket(ifname, ethertype)
    sock.setblocking(False)
    counters = TapCounters(ifname)
    header = BROADCAST + HOST_MAC + struct.pack("!H", ethertype)
    frame = bytearray(header + bytes(max(0, size - len(header))))
    _say("ready")
    deadline = time.monotonic() + timeout
    stdin = sys.stdin.fileno()
    # Nothing before the guest is counting: frames queued earlier would be free.
    if not select.select([stdin], [], [], timeout)[0] or os.read(stdin, 16) != b"go\n":
        return {"error": "no 'go' line on stdin"}
    sent = errors = resyncs = 0
    first_packets, first_dropped = counters.read()
    base = first_packets + first_dropped
    stalled_since = None
    while time.monotonic() < deadline:
        if select.select([stdin], [], [], 0)[0]:
            break
        taken = counters.taken() - base
        queued = sent - taken
        if queued >= inflight:
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since > 0.05:
                # Frames lost before the tap counted them (no carrier yet, the
                # qdisc dropped them): stop waiting for them.
                base += queued
                resyncs += 1
                stalled_since = None
            time.sleep(0.0002)
            continue
        stalled_since = None
        for _ in range(inflight - queued):
            struct.pack_into("!I", frame, len(header), sent & 0xFFFFFFFF)
            try:
                sock.send(frame)
            except (BlockingIOError, OSError):
                # ENOBUFS, ENETDOWN before the monitor opens the tap: retry later.
                errors += 1
                time.sleep(0.001)
                break
            sent += 1
    packets, dropped = counters.read()
    counters.close()
    sock.close()
    # delivered: frames the monitor read from the tap while this ran.
    return {"sent": sent, "send_errors": errors, "resyncs": resyncs,
            "delivered": packets - first_packets, "tap_dropped": dropped - first_dropped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netpeer")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("recv", "send"):
        tcp = sub.add_parser(mode)
        tcp.add_argument("address")
        tcp.add_argument("port", type=int)
        tcp.add_argument("bytes", type=int)
        tcp.add_argument("--timeout", type=float, default=120)
    for mode in ("drain", "flood"):
        raw = sub.add_parser(mode)
        raw.add_argument("ifname")
        raw.add_argument("--ethertype", type=lambda text: int(text, 0), default=0x88B5)
        raw.add_argument("--timeout", type=float, default=120)
        if mode == "flood":
            raw.add_argument("--size", type=int, default=64)
            raw.add_argument("--inflight", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        if args.mode == "recv":
            result = recv(args.address, args.port, args.bytes, args.timeout)
        elif args.mode == "send":
            result = send(args.address, args.port, args.bytes, args.timeout)
        elif args.mode == "drain":
            result = drain(args.ifname, args.ethertype, args.timeout)
        else:
            result = flood(args.ifname, args.ethertype, args.size, args.inflight, args.timeout)
    except OSError as error:
        _say({"error": f"{type(error).__name__}: {error}"})
        return 1
    _say(result)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
