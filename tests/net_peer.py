"""The host's end of the svtest guest's net actions: an AF_PACKET socket on one tap.

Run inside the test's network namespace (``ns.popen([sys.executable, __file__, ...])``);
it only ever talks to the tap it is bound to, with ethertype 0x88b5 frames.  Every
line it prints is one JSON object, the first ``{"ready": ...}`` once the socket is
bound (so a test knows nothing the guest sends from then on is missed).

  recv --iface T --count N [--timeout S]   frames from the guest, one line each
  send --iface T --count N --size S --dst MAC [--first-seq K] [--gap-us U] [--corrupt SEQ]
  echo --iface T [--timeout S]             reflects every frame back (dst = its src)
  ping --iface T --count N --size S --dst MAC [--timeout S]   round trips, then "quit"

The test frame (tests/guest/net_pattern.h): dst, src, ethertype 0x88b5, then the
sequence number (32-bit big-endian) and byte i of the payload = (seq + i) mod 256.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

ETHERTYPE = 0x88B5
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33  # not in Python's socket module
PEER_MAC = bytes.fromhex("02535650ee01")  # locally administered, the peer's own
BROADCAST = b"\xff" * 6
MIN_FRAME = 18


def payload(seq: int, length: int) -> bytes:
    """The test payload of `length` bytes (at least 4) for sequence number `seq`."""
    ramp = bytes((seq + i) & 0xFF for i in range(256))
    body = (ramp * (length // 256 + 2))[4:length]
    return seq.to_bytes(4, "big") + body


def frame(seq: int, size: int, dst: bytes, src: bytes) -> bytes:
    return dst + src + ETHERTYPE.to_bytes(2, "big") + payload(seq, size - 14)


def quit_frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + ETHERTYPE.to_bytes(2, "big") + b"quit" + bytes(46)


def frame_seq(data: bytes) -> int:
    return int.from_bytes(data[14:18], "big")


def frame_ok(data: bytes) -> bool:
    """Whether a frame of ours carries the pattern of its own sequence number."""
    return (len(data) >= MIN_FRAME and data[12:14] == ETHERTYPE.to_bytes(2, "big")
            and data[14:] == payload(frame_seq(data), len(data) - 14))


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def mac_text(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class Port:
    """An AF_PACKET socket bound to one interface for ethertype 0x88b5."""

    def __init__(self, iface: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        # Room for a whole benchmark burst: beyond rmem_max, which root may do (RCVBUFFORCE).
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind((iface, ETHERTYPE))
        self.iface = iface

    def receive(self, deadline: float) -> bytes | None:
        """The next frame that came in from the tap (not one we sent), or None at the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            data, address = self.sock.recvfrom(65536)
            if address[2] != PACKET_OUTGOING:
                return data

    def send(self, data: bytes) -> None:
        self.sock.send(data)


def run_recv(port: Port, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    got = 0
    while got < args.count:
        data = port.receive(deadline)
        if data is None:
            break
        got += 1
        emit(len=len(data), dst=mac_text(data[:6]), src=mac_text(data[6:12]),
             seq=frame_seq(data) if len(data) >= MIN_FRAME else None, ok=frame_ok(data))
    emit(done=got)
    return 0 if got == args.count else 1


def run_send(port: Port, args: argparse.Namespace) -> int:
    dst = mac_bytes(args.dst)
    for i in range(args.count):
        data = frame(args.first_seq + i, args.size, dst, PEER_MAC)
        if args.first_seq + i in args.corrupt:
            data = data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]
        port.send(data)
        if args.gap_us:
            time.sleep(args.gap_us / 1e6)
    emit(sent=args.count)
    return 0


def run_echo(port: Port, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    echoed = 0
    while (data := port.receive(deadline)) is not None:
        port.send(data[6:12] + PEER_MAC + data[12:])
        echoed += 1
    emit(echoed=echoed)
    return 0


def run_ping(port: Port, args: argparse.Namespace) -> int:
    dst = mac_bytes(args.dst)
    ok, bad, rtts = 0, [], []
    for seq in range(args.count):
        sent = frame(seq, args.size, dst, PEER_MAC)
        start = time.monotonic()
        port.send(sent)
        deadline = start + args.timeout
        while (data := port.receive(deadline)) is not None:
            if len(data) >= MIN_FRAME and frame_seq(data) == seq:
                break
        if data is None:
            bad.append({"seq": seq, "why": "timeout"})
            break
        rtts.append(round((time.monotonic() - start) * 1000, 3))
        if data == PEER_MAC + dst + sent[12:]:
            ok += 1
        else:
            bad.append({"seq": seq, "why": "different", "len": len(data),
                        "dst": mac_text(data[:6]), "src": mac_text(data[6:12])})
    port.send(quit_frame(dst, PEER_MAC))
    emit(ok=ok, bad=bad, rtt_ms=rtts)
    return 0 if ok == args.count else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["recv", "send", "echo", "ping"])
    parser.add_argument("--iface", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--dst", default=mac_text(BROADCAST))
    parser.add_argument("--first-seq", type=int, default=0)
    parser.add_argument("--gap-us", type=int, default=0)
    parser.add_argument("--corrupt", type=int, action="append", default=[],
                        help="send: flip byte 40 of the frame with this sequence number")
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args(argv)
    port = Port(args.iface)
    emit(ready=args.iface, mac=mac_text(PEER_MAC))
    runner = {"recv": run_recv, "send": run_send, "echo": run_echo, "ping": run_ping}[args.mode]
    return runner(port, args)


if __name__ == "__main__":
    sys.exit(main())
