#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*): well-formed driver
programs in the harness's input language (harness.c), one per request kind.

    python3 fuzz/dataplane/seeds.py        # rewrites the seed-* files

Findings the fuzzer turned up are kept beside them as finding-* files.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "corpus"

# Generic operations (harness.c); device operations follow them.
(OP_DESC, OP_DESC_AT, OP_AVAIL, OP_AVAIL_IDX, OP_WRITE, OP_FILL, OP_RING_FLAGS, OP_KICK,
 OP_QUEUE, OP_SETUP, OP_CHAIN, OP_INDIRECT) = range(12)
OP_DEVICE = 12

# Guest regions (harness.c): 0 at 0 (64 KiB, rings first), 1 at 0x20000 (16 KiB),
# 2 at 4 GiB (4 KiB), 3 the last page of the address space.
R0, R1, R2, R3 = range(4)
WRITE = 1
EVENT_IDX = 0x10
INDIRECT = 0x20


def gpa(region: int, offset: int, below: bool = False) -> bytes:
    return bytes([region | (0x80 if below else 0)]) + struct.pack("<H", offset)


def qcfg(size_log2: int, event_idx: bool = False, indirect: bool = False) -> int:
    return size_log2 | (EVENT_IDX if event_idx else 0) | (INDIRECT if indirect else 0)


class Program:
    """One fuzz input: the queue configuration byte, the device's, then steps."""

    def __init__(self, queue_cfg: int, device_cfg: bytes = b"") -> None:
        self.data = bytearray([queue_cfg]) + device_cfg

    def write(self, region: int, offset: int, data: bytes) -> Program:
        for start in range(0, len(data), 255):
            chunk = data[start:start + 255]
            self.data += bytes([OP_WRITE]) + gpa(region, offset + start) + bytes([len(chunk)])
            self.data += chunk
        return self

    def fill(self, region: int, offset: int, length: int, byte: int) -> Program:
        self.data += bytes([OP_FILL]) + gpa(region, offset) + struct.pack("<HB", length, byte)
        return self

    def chain(self, slot: int, segments: list[tuple[int, int, int, int]]) -> Program:
        """segments: (region, offset, length, flags: 1 device-writable)."""
        self.data += bytes([OP_CHAIN, slot, len(segments) - 1])
        for region, offset, length, flags in segments:
            self.data += gpa(region, offset) + struct.pack("<HB", length, flags)
        return self

    def indirect(self, slot: int, table: tuple[int, int],
                 segments: list[tuple[int, int, int, int]]) -> Program:
        self.data += bytes([OP_INDIRECT, slot]) + gpa(*table) + bytes([len(segments) - 1])
        for region, offset, length, flags in segments:
            self.data += gpa(region, offset) + struct.pack("<HB", length, flags)
        return self

    def desc(self, index: int, region: int, offset: int, length: int, flags: int,
             next_: int) -> Program:
        self.data += bytes([OP_DESC]) + struct.pack("<H", index) + gpa(region, offset)
        self.data += struct.pack("<HBH", length, flags, next_)
        return self

    def avail(self, head: int) -> Program:
        self.data += bytes([OP_AVAIL]) + struct.pack("<H", head)
        return self

    def avail_idx(self, delta: int) -> Program:
        self.data += bytes([OP_AVAIL_IDX]) + struct.pack("<b", delta)
        return self

    def ring_flags(self, flags: int, used_event: int) -> Program:
        self.data += bytes([OP_RING_FLAGS]) + struct.pack("<HH", flags, used_event)
        return self

    def kick(self, queue: int) -> Program:
        self.data += bytes([OP_KICK, queue])
        return self

    def queue(self, queue: int) -> Program:
        self.data += bytes([OP_QUEUE, queue])
        return self

    def setup(self, cfg: int, rings: tuple[bytes, bytes, bytes] | None = None) -> Program:
        self.data += bytes([OP_SETUP, cfg | (0x40 if rings else 0)])
        if rings:
            self.data += b"".join(rings)
        return self

    def op(self, code: int, args: bytes = b"") -> Program:
        self.data += bytes([OP_DEVICE + code]) + args
        return self


# --- virtio-blk -------------------------------------------------------------

BLK_AIO, BLK_SYNC, BLK_BUFFERED, BLK_EMPTY = (0 << 3, 1 << 3, 2 << 3, 3 << 3)
BLK_RO, BLK_DISCARD, BLK_ZEROES = 1, 2, 4


def blk_header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def blk_request(p: Program, slot: int, kind: int, sector: int, data: int, data_writable: bool,
                payload: bytes = b"", at: int = 0) -> Program:
    """A request in region 1 at `at`: header, data (or payload), status."""
    p.write(R1, at, blk_header(kind, sector) + payload)
    segments = [(R1, at, 16, 0)]
    if payload:
        segments = [(R1, at, 16 + len(payload), 0)]
    if data:
        segments.append((R1, at + 0x400, data, WRITE if data_writable else 0))
    segments.append((R1, at + 0x3000, 1, WRITE))
    return p.chain(slot, segments)


def blk_seeds() -> dict[str, bytes]:
    seeds = {}
    cfg = bytes([BLK_DISCARD | BLK_ZEROES | BLK_AIO, 64])
    p = Program(qcfg(4), cfg)
    blk_request(p, 0, 1, 2, 1024, False).kick(0)  # write
    blk_request(p, 4, 0, 2, 1024, True, at=0x100).kick(0)  # read it back
    seeds["read-write-aio"] = p.data
    p = Program(qcfg(4, event_idx=True), bytes([BLK_SYNC, 16]))
    blk_request(p, 0, 0, 0, 512, True).ring_flags(0, 0).kick(0)
    seeds["read-sync-event-idx"] = p.data
    p = Program(qcfg(3), bytes([BLK_BUFFERED, 16]))
    blk_request(p, 0, 1, 15, 512, False)
    blk_request(p, 3, 4, 0, 0, False, at=0x80).kick(0).op(0).op(1)  # flush, completions, drain
    seeds["write-flush-buffered"] = p.data
    p = Program(qcfg(2), bytes([BLK_AIO, 8]))
    p.write(R1, 0, blk_header(8))
    p.chain(0, [(R1, 0, 16, 0), (R1, 0x400, 20, WRITE), (R1, 0x3000, 1, WRITE)]).kick(0)
    seeds["get-id"] = p.data
    p = Program(qcfg(2), bytes([BLK_DISCARD | BLK_AIO, 64]))
    segment = struct.pack("<QII", 4, 8, 0)
    blk_request(p, 0, 11, 0, 0, False, payload=segment).kick(0)
    seeds["discard"] = p.data
    p = Program(qcfg(2), bytes([BLK_ZEROES | BLK_SYNC, 64]))
    blk_request(p, 0, 13, 0, 0, False, payload=struct.pack("<QII", 1, 2, 1)).kick(0)
    blk_request(p, 1, 13, 0, 0, False, payload=struct.pack("<QII", 8, 4, 0), at=0x80).kick(0)
    seeds["write-zeroes"] = p.data
    p = Program(qcfg(2), bytes([BLK_RO | BLK_AIO, 64]))
    blk_request(p, 0, 99, 0, 0, False).kick(0)  # unknown type
    blk_request(p, 1, 1, 0, 512, False, at=0x80).kick(0)  # write to a read-only disk
    blk_request(p, 2, 0, 63, 1024, True, at=0x100).kick(0)  # past the end
    seeds["bad-requests"] = p.data
    p = Program(qcfg(4, indirect=True), bytes([BLK_AIO, 64]))
    p.write(R1, 0, blk_header(0, 1))
    p.indirect(2, (R0, 0x8000), [(R1, 0, 8, 0), (R1, 8, 8, 0), (R1, 0x400, 512, WRITE),
                                 (R2, 0, 512, WRITE), (R1, 0x3000, 1, WRITE)]).kick(0)
    seeds["indirect-split-header"] = p.data
    p = Program(qcfg(2), bytes([BLK_SYNC, 64]))  # a ring of 4, chains across its end
    for i in range(5):
        blk_request(p, 3 * i % 4, 0, i, 512, True, at=0x100 * i).kick(0)
    seeds["wrapped-ring"] = p.data
    p = Program(qcfg(3), bytes([BLK_EMPTY, 0]))
    blk_request(p, 0, 0, 0, 512, True).kick(0)
    seeds["empty-slot"] = p.data
    return seeds


# --- virtio-net ---------------------------------------------------------------

NET_FRAME, NET_TAP_EVENT, NET_DRAIN, NET_LINK, NET_FAULTS = range(5)
NET_MRG, NET_NO_TAP = 1, 2


def frame(length: int, head: bytes = b"") -> bytes:
    """A frame arriving on the tap: its length, then its first bytes (the rest 0x5a)."""
    return struct.pack("<H", length) + bytes([len(head)]) + head


def net_seeds() -> dict[str, bytes]:
    seeds = {}
    vnet = bytes(12)
    eth = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x00"
    p = Program(qcfg(4), bytes([0]))
    p.queue(0).chain(0, [(R1, 0, 1526, WRITE)]).chain(1, [(R1, 0x800, 1526, WRITE)]).kick(0)
    p.op(NET_FRAME, frame(60, vnet + eth))
    p.op(NET_TAP_EVENT, bytes([1]))
    seeds["rx"] = p.data
    p = Program(qcfg(4, event_idx=True), bytes([NET_MRG]))
    p.queue(0)
    for i in range(4):
        p.chain(i, [(R1, 0x1000 * i, 0x1000, WRITE)])
    p.kick(0)
    p.op(NET_FRAME, frame(9000, vnet + eth))
    p.op(NET_TAP_EVENT, bytes([1]))
    seeds["rx-mergeable"] = p.data
    p = Program(qcfg(4), bytes([0]))
    p.queue(1).write(R1, 0, vnet + eth + b"payload")
    p.chain(0, [(R1, 0, 12, 0), (R1, 12, 21, 0)]).chain(2, [(R1, 0, 33, 0)]).kick(1)
    p.op(NET_DRAIN)
    seeds["tx"] = p.data
    p = Program(qcfg(4, indirect=True), bytes([0]))
    p.queue(1).write(R1, 0, vnet + eth)
    p.op(NET_FAULTS, bytes([1]))
    p.indirect(0, (R0, 0x8000), [(R1, 0, 12, 0), (R1, 12, 14, 0)]).kick(1)
    p.op(NET_FAULTS, bytes([0])).op(NET_TAP_EVENT, bytes([4])).op(NET_DRAIN)
    seeds["tx-tap-full"] = p.data
    p = Program(qcfg(2), bytes([NET_NO_TAP]))
    p.queue(1).chain(0, [(R1, 0, 40, 0)]).kick(1).op(NET_LINK, bytes([1]))
    p.queue(0).chain(0, [(R1, 0x100, 100, WRITE)]).kick(0)
    p.op(NET_FRAME, frame(80, vnet))
    p.op(NET_TAP_EVENT, bytes([1])).op(NET_LINK, bytes([0]))
    seeds["link-down-up"] = p.data
    p = Program(qcfg(1), bytes([0]))  # receive buffers too small: dropped, then a bad one
    p.queue(0).chain(0, [(R1, 0, 64, WRITE)]).kick(0)
    p.op(NET_FRAME, frame(200))
    p.op(NET_TAP_EVENT, bytes([1]))
    p.chain(1, [(R1, 0x100, 4, WRITE)]).kick(0)
    p.op(NET_FRAME, frame(40))
    p.op(NET_TAP_EVENT, bytes([1]))
    seeds["rx-small-buffers"] = p.data
    return seeds


# --- virtio-balloon -----------------------------------------------------------

INFLATE, DEFLATE, STATS, REPORTING = 1, 2, 3, 4


def balloon_roles(*roles: int, remove: bool = False) -> bytes:
    """Inflate and deflate always; STATS and REPORTING as negotiated features."""
    cfg = (1 if STATS in roles else 0) | (2 if REPORTING in roles else 0)
    return struct.pack("<H", cfg | (0x8000 if remove else 0))


def balloon_seeds() -> dict[str, bytes]:
    seeds = {}
    frames = struct.pack("<8I", 8, 9, 10, 12, 0x22, 0x23, 0x100000, 0xFFFFFFFF)
    p = Program(qcfg(3), balloon_roles(INFLATE, DEFLATE, STATS, REPORTING))
    p.queue(0).write(R1, 0, frames).chain(0, [(R1, 0, 16, 0), (R1, 16, 16, 0)]).kick(0)
    p.queue(1).write(R1, 0x100, frames).chain(0, [(R1, 0x100, 32, 0)]).kick(1)
    seeds["inflate-deflate"] = p.data
    p = Program(qcfg(3, event_idx=True), balloon_roles(INFLATE, DEFLATE, STATS))
    stats = b"".join(struct.pack("<HQ", tag, 1000 * tag) for tag in range(10))
    p.queue(2).write(R1, 0, stats).chain(0, [(R1, 0, len(stats), 0)]).kick(2)
    p.op(0).chain(1, [(R1, 0, len(stats), 0)]).kick(2).op(0)
    seeds["stats"] = p.data
    p = Program(qcfg(2), balloon_roles(INFLATE, DEFLATE, REPORTING))
    p.queue(2).chain(0, [(R1, 0x800, 0x2000, WRITE), (R0, 0xE000, 0x1000, WRITE)]).kick(2)
    seeds["free-page-reporting"] = p.data
    p = Program(qcfg(2, indirect=True), balloon_roles(INFLATE, DEFLATE, remove=True))
    p.write(R1, 0, frames).indirect(0, (R0, 0x8000), [(R1, 0, 6, 0), (R1, 6, 26, 0)]).kick(0)
    seeds["inflate-indirect-remove"] = p.data
    return seeds


# --- virtio-console -----------------------------------------------------------

CON_INPUT, CON_INPUT_BIG, CON_ATTACH, CON_READY, CON_WRITABLE, CON_DRAIN, CON_FAULTS = range(7)
MULTIPORT = 4


def ctrl(port: int, event: int, value: int) -> bytes:
    return struct.pack("<IHH", port, event, value)


def console_seeds() -> dict[str, bytes]:
    seeds = {}
    # 2 ports, multiport; port 0 a console, port 1 named.
    p = Program(qcfg(3), bytes([1 | MULTIPORT, 1, 1 << 2]))
    p.queue(2)  # control receive: buffers for the device's messages
    for i in range(4):
        p.chain(i, [(R1, 0x100 * i, 64, WRITE)])
    p.kick(2)
    p.queue(3).write(R1, 0x1000, ctrl(0, 0, 1) + ctrl(0, 3, 1) + ctrl(1, 3, 1) + ctrl(1, 6, 1))
    for i in range(4):
        p.chain(i, [(R1, 0x1000 + 8 * i, 8, 0)])
    p.kick(3)
    p.queue(1).write(R1, 0x2000, b"hello, console\n").chain(0, [(R1, 0x2000, 15, 0)]).kick(1)
    p.queue(4).chain(0, [(R1, 0x3000, 32, WRITE)]).kick(4)
    p.op(CON_INPUT, bytes([1, 5]) + b"input").op(CON_DRAIN, b"\0")
    seeds["multiport"] = p.data
    p = Program(qcfg(2, event_idx=True), bytes([0, 1]))  # one port, no multiport
    p.queue(0).chain(0, [(R1, 0, 16, WRITE)]).kick(0)
    p.op(CON_INPUT, bytes([0, 3]) + b"abc")
    p.queue(1).write(R1, 0x100, b"out").chain(0, [(R1, 0x100, 3, 0)]).kick(1)
    seeds["single-port"] = p.data
    p = Program(qcfg(2, indirect=True), bytes([MULTIPORT, 2]))  # output kept while blocked
    p.op(CON_FAULTS, b"\0\x01").queue(1).write(R1, 0, b"x" * 100)
    p.indirect(0, (R0, 0x8000), [(R1, 0, 50, 0), (R1, 50, 50, 0)]).kick(1)
    p.op(CON_FAULTS, b"\0\0").op(CON_WRITABLE, bytes([0, 4])).op(CON_DRAIN, b"\0")
    seeds["output-blocked"] = p.data
    p = Program(qcfg(2), bytes([2 | MULTIPORT, 0, 0, 0]))  # 3 ports, attach and detach
    p.op(CON_ATTACH, bytes([2, 0])).op(CON_ATTACH, bytes([2, 1]))
    p.op(CON_INPUT_BIG, bytes([1]) + struct.pack("<H", 4000)).queue(6)
    p.chain(0, [(R1, 0, 0x1000, WRITE)]).kick(6)
    seeds["three-ports"] = p.data
    return seeds


# --- virtio-rng ---------------------------------------------------------------

def rng_seeds() -> dict[str, bytes]:
    seeds = {}
    p = Program(qcfg(2), bytes([0, 0]))
    p.op(0, bytes([64]) + bytes(range(64))).chain(0, [(R1, 0, 64, WRITE)]).kick(0)
    seeds["fill"] = p.data
    p = Program(qcfg(2, event_idx=True), bytes([1, 16]))  # rate limited
    p.op(0, bytes([64]) + bytes(64)).chain(0, [(R1, 0, 32, WRITE)]).chain(1, [(R1, 64, 32, WRITE)])
    p.kick(0).op(1)
    seeds["rate-limit"] = p.data
    p = Program(qcfg(2), bytes([0, 0]))  # the source is dry, then has bytes
    p.chain(0, [(R1, 0, 16, WRITE), (R2, 0, 16, WRITE)]).kick(0).op(0, bytes([8]) + bytes(8))
    p.op(2).chain(1, [(R1, 0x100, 8, 0)]).kick(0)
    seeds["source-dry"] = p.data
    return seeds


# --- the walker itself --------------------------------------------------------

VQ_POP, VQ_PUSH, VQ_UNPOP, VQ_FILL_FLUSH, VQ_DISABLE, VQ_ENABLE, VQ_ENABLE_AFTER, \
    VQ_INTERRUPT, VQ_AVAIL_IDX = range(9)


def virtqueue_seeds() -> dict[str, bytes]:
    seeds = {}
    p = Program(qcfg(3))
    p.chain(0, [(R1, 0, 100, 0), (R1, 0x100, 100, WRITE)]).chain(2, [(R2, 0, 8, 0)])
    p.op(VQ_POP, b"\0").op(VQ_POP, b"\0").op(VQ_PUSH, b"\0\1" + struct.pack("<I", 50))
    p.op(VQ_UNPOP, b"\0\0").op(VQ_POP, b"\0").op(VQ_FILL_FLUSH, b"\0\1" + bytes(4))
    p.op(VQ_INTERRUPT, b"\0").kick(0)
    seeds["pop-push-unpop"] = p.data
    p = Program(qcfg(4, event_idx=True, indirect=True))
    p.indirect(1, (R0, 0x8000), [(R1, 0, 16, 0), (R3, 0xF00, 256, WRITE)])
    p.ring_flags(0, 0).op(VQ_ENABLE, b"\0").kick(0).op(VQ_INTERRUPT, b"\0")
    p.op(VQ_ENABLE_AFTER, b"\0\5\0").op(VQ_DISABLE, b"\0")
    seeds["indirect-event-idx"] = p.data
    p = Program(qcfg(1))  # a wrapped ring of 2, answered in batches
    for i in range(6):
        p.chain(i % 2, [(R1, 0x10 * i, 16, WRITE)]).op(VQ_POP, b"\0")
        if i % 2:
            p.op(VQ_FILL_FLUSH, b"\0\1" + struct.pack("<I", 16))
    seeds["wrapped-batches"] = p.data
    p = Program(qcfg(2))  # malformed chains: each breaks the queue
    p.desc(0, R1, 0, 16, 1 | 0x01, 0).avail(0).kick(0)  # a loop
    p.setup(qcfg(2)).desc(1, R0, 0xFFF0, 32, 0, 0).avail(1).kick(0)  # past the region end
    p.setup(qcfg(2)).desc(2, R1, 0, 16, 2 | 1, 0).desc(0, R1, 16, 16, 0, 0).avail(2).kick(0)
    p.setup(qcfg(2)).avail(7).kick(0)  # head beyond the queue
    p.setup(qcfg(2)).avail_idx(100).kick(0)
    p.setup(qcfg(2), (gpa(R1, 8), gpa(R1, 0x400), gpa(R0, 0x1000, below=True)))
    # used->flags over avail->idx: refused (notifications would flip the index forever)
    p.setup(qcfg(1), (gpa(R0, 0), gpa(R0, 0x102), gpa(R0, 0x104)))
    p.chain(0, [(R1, 0, 16, WRITE)]).kick(0)
    seeds["malformed"] = p.data
    p = Program(qcfg(3, indirect=True))  # two queues, the second's rings elsewhere
    p.queue(1).setup(qcfg(3, indirect=True), (gpa(R1, 0x1000), gpa(R2, 0x0), gpa(R3, 0x800)))
    p.chain(0, [(R1, 0, 8, 0), (R3, 0, 8, WRITE)]).kick(1)
    p.queue(0).chain(0, [(R1, 0x2000, 64, WRITE)]).op(VQ_POP, b"\0").op(VQ_AVAIL_IDX, b"\0")
    seeds["two-queues"] = p.data
    return seeds


GENERATORS = {
    "virtqueue": virtqueue_seeds,
    "blk": blk_seeds,
    "net": net_seeds,
    "balloon": balloon_seeds,
    "console": console_seeds,
    "rng": rng_seeds,
}


def main() -> int:
    for target, generate in GENERATORS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        for name, data in generate().items():
            assert len(data) <= 4096, (target, name, len(data))
            (directory / f"seed-{name}").write_bytes(bytes(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
