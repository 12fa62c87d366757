"""The benchmark's statistics and its smaps memory accounting (nothing here is timed)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.__main__ import BLOCK_REPS, parse_args
from benchmarks.harness import RunRecord, samples_by_pair
from benchmarks.metrics import (
    BLOCK_CASES,
    BLOCK_WORKLOADS,
    METRICS,
    ProbeError,
    QmpClient,
    SerialWatcher,
    parse_blk_bench,
    query_status_latency,
    query_status_throughput,
)
from benchmarks.report import format_table, metric_rows
from benchmarks.smaps import (
    GiB,
    RamMappingError,
    account,
    account_process,
    find_guest_ram,
    parse_smaps,
)
from benchmarks.stats import paired_ratios, percentile, ratio_summary, summarize

MiB = 1 << 20


# Statistics


def test_summary_of_odd_and_even_counts():
    odd = summarize([5.0, 1.0, 3.0])
    assert odd is not None
    assert (odd.n, odd.median, odd.min, odd.max) == (3, 3.0, 1.0, 5.0)
    even = summarize([4.0, 1.0, 3.0, 10.0])
    assert even is not None
    assert (even.n, even.median, even.min, even.max) == (4, 3.5, 1.0, 10.0)


def test_summary_of_nothing_is_none():
    assert summarize([]) is None


def test_nearest_rank_percentiles_are_observed_samples():
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0.5) == 1.0
    assert percentile([7.0], 99) == 7.0
    # 2000 samples: p99 is the 1980th smallest.
    assert percentile([float(v) for v in range(1, 2001)], 99) == 1980.0


@pytest.mark.parametrize("p", [0, -1, 101])
def test_percentile_outside_its_range_is_refused(p):
    with pytest.raises(ValueError):
        percentile([1.0], p)


def test_percentile_of_nothing_is_refused():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_paired_ratios_skip_failed_pairs_and_zero_references():
    ours = [2.0, None, 3.0, 4.0, 1.0]
    reference = [1.0, 5.0, None, 0.0, 4.0]
    assert paired_ratios(ours, reference) == [2.0, 0.25]


def test_pairs_must_line_up():
    with pytest.raises(ValueError, match="pairs must line up"):
        paired_ratios([1.0], [1.0, 2.0])


def test_median_of_ratios_is_not_the_ratio_of_medians():
    # Pairwise: 1/1, 10/5, 3/6 -> ratios 1, 2, 0.5 -> median 1.0.
    ours = [1.0, 10.0, 3.0]
    reference = [1.0, 5.0, 6.0]
    summary = ratio_summary(ours, reference)
    assert summary is not None
    assert (summary.n, summary.median, summary.min, summary.max) == (3, 1.0, 0.5, 2.0)
    # The ratio of the medians would be 3/5.
    ours_summary, reference_summary = summarize(ours), summarize(reference)
    assert ours_summary is not None and reference_summary is not None
    assert ours_summary.median / reference_summary.median == 0.6


def test_samples_by_pair_ignore_warmup_and_failed_runs():
    def record(pair, monitor, value, error=None):
        return RunRecord(pair=pair, kind="session", monitor=monitor, argv=[],
                         values={"start.qmp-greeting": value}, error=error)

    records = [record(-1, "ours", 999.0), record(-1, "qemu", 999.0),
               record(0, "ours", 200.0), record(0, "qemu", 40.0),
               record(1, "ours", 300.0, error="boom"), record(1, "qemu", 50.0),
               record(2, "ours", 210.0), record(2, "qemu", 42.0)]
    assert samples_by_pair(records, "start.qmp-greeting", "ours", 3) == [200.0, None, 210.0]
    assert samples_by_pair(records, "start.qmp-greeting", "qemu", 3) == [40.0, 50.0, 42.0]
    rows = metric_rows(records, ["start.qmp-greeting"], ["ours", "qemu"], 3)
    assert rows[0]["ours"] == {"n": 2, "median": 205.0, "min": 200.0, "max": 210.0}
    assert rows[0]["ratio_ours_over_qemu"]["n"] == 2
    assert rows[0]["ratio_ours_over_qemu"]["median"] == pytest.approx((5.0 + 5.0) / 2)
    table = format_table(rows, ["ours", "qemu"], 3)
    assert "205.0 [200.0-210.0] (2/3)" in table
    assert "5.000 (n=2)" in table


# smaps parsing and accounting

SMAPS = textwrap.dedent("""\
    55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 1234    /usr/bin/qemu-system-x86_64
    Size:               1024 kB
    Rss:                 800 kB
    Pss:                 400 kB
    Private_Dirty:         0 kB
    THPeligible:    0
    VmFlags: rd ex mr mw me
    55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0       [heap]
    Size:               2048 kB
    Rss:                1500 kB
    Pss:                1500 kB
    VmFlags: rd wr mr mw me ac
    7f0000000000-7f0010000000 rw-p 00000000 00:00 0
    Size:             262144 kB
    Rss:                4096 kB
    Pss:                4096 kB
    VmFlags: rd wr mr mw me ac hg
    7f0010000000-7f0010800000 rw-p 00000000 00:00 0       [anon:glibc malloc]
    Size:               8192 kB
    Rss:                 100 kB
    Pss:                 100 kB
    7f0020000000-7f0020001000 r--p 00000000 fd:01 99      /lib/x86_64-linux-gnu/lib c.so (deleted)
    Size:                  4 kB
    Rss:                   4 kB
    Pss:                   2 kB
    """)


def test_smaps_fields_are_parsed_in_bytes():
    mappings = parse_smaps(SMAPS)
    assert [m.path for m in mappings] == [
        "/usr/bin/qemu-system-x86_64", "[heap]", "", "[anon:glibc malloc]",
        "/lib/x86_64-linux-gnu/lib c.so (deleted)"]
    qemu = mappings[0]
    assert (qemu.size, qemu.rss, qemu.pss, qemu.perms) == (1 * MiB, 800 * 1024, 400 * 1024,
                                                            "r-xp")
    assert qemu.vm_flags == "rd ex mr mw me"
    assert [m.anonymous for m in mappings] == [False, False, True, True, False]


def test_account_excludes_exactly_the_ram_mapping():
    mappings = parse_smaps(SMAPS)
    memory = account(mappings, 256 * MiB)
    assert memory.total_rss == (800 + 1500 + 4096 + 100 + 4) * 1024
    assert memory.total_pss == (400 + 1500 + 4096 + 100 + 2) * 1024
    assert memory.ram_rss == memory.ram_pss == 4096 * 1024
    assert memory.overhead_rss == (800 + 1500 + 100 + 4) * 1024
    assert memory.overhead_pss == (400 + 1500 + 100 + 2) * 1024
    assert memory.ram_mappings == ("7f0000000000-7f0010000000 rw-p (anon) size=262144 kB "
                                   "rss=4096 kB",)
    assert memory.mapping_count == 5


def _mapping_lines(start: int, size: int, rss_kb: int, path: str = "") -> str:
    return (f"{start:x}-{start + size:x} rw-p 00000000 00:00 0 {path}\n"
            f"Size: {size >> 10} kB\nRss: {rss_kb} kB\nPss: {rss_kb} kB\n")


def test_ram_split_around_the_mmio_gap_is_two_mappings():
    # -m 4096 on stratovirt-py: 3 GiB below the gap and 1 GiB from 4 GiB up, mapped
    # separately (and not next to each other).
    text = (_mapping_lines(0x7E0000000000, 3 * GiB, 1000)
            + _mapping_lines(0x7F0000000000, 1 * GiB, 10)
            + _mapping_lines(0x7F8000000000, 16 * MiB, 50))
    mappings = parse_smaps(text)
    ram = find_guest_ram(mappings, 4 * GiB)
    assert [m.size for m in ram] == [3 * GiB, 1 * GiB]
    memory = account(mappings, 4 * GiB)
    assert memory.ram_rss == 1010 * 1024
    assert memory.overhead_rss == 50 * 1024


def test_ram_in_one_mapping_wins_over_the_split():
    # QEMU maps all of -m 4096 as one block even though the guest sees it split.
    text = (_mapping_lines(0x7E0000000000, 4 * GiB, 1000)
            + _mapping_lines(0x7F0000000000, 1 * GiB, 10))
    assert [m.size for m in find_guest_ram(parse_smaps(text), 4 * GiB)] == [4 * GiB]


def test_equal_halves_of_a_6_gib_split():
    text = (_mapping_lines(0x7E0000000000, 3 * GiB, 1)
            + _mapping_lines(0x7F0000000000, 3 * GiB, 2))
    assert len(find_guest_ram(parse_smaps(text), 6 * GiB)) == 2


def test_ambiguous_ram_mappings_are_an_error():
    text = (_mapping_lines(0x7E0000000000, 256 * MiB, 1)
            + _mapping_lines(0x7F0000000000, 256 * MiB, 2))
    with pytest.raises(RamMappingError, match="cannot tell which"):
        find_guest_ram(parse_smaps(text), 256 * MiB)


def test_missing_ram_mapping_is_an_error_naming_the_candidates():
    text = _mapping_lines(0x7E0000000000, 128 * MiB, 1)
    with pytest.raises(RamMappingError, match="largest anonymous mappings: 7e0000000000"):
        find_guest_ram(parse_smaps(text), 256 * MiB)


def test_only_anonymous_mappings_can_be_ram():
    text = (_mapping_lines(0x7E0000000000, 256 * MiB, 1, "/memfd:pc.ram (deleted)")
            + _mapping_lines(0x7F0000000000, 256 * MiB, 2, "[heap]"))
    with pytest.raises(RamMappingError):
        find_guest_ram(parse_smaps(text), 256 * MiB)


def test_field_before_header_is_refused():
    with pytest.raises(ValueError):
        parse_smaps("Rss: 4 kB\n")


# A live process: an anonymous region of a known size with N pages touched.

REGION_BYTES = 40 * MiB + 7 * mmap.PAGESIZE  # an unusual size, found only as this region
TOUCHED_PAGES = 37
CHILD = """
import ctypes, mmap, sys
size, pages = int(sys.argv[1]), int(sys.argv[2])
region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
# Small pages only, so N touches are exactly N pages of Rss whatever THP is set to.
region.madvise(mmap.MADV_NOHUGEPAGE)
for i in range(pages):
    region[i * mmap.PAGESIZE] = 1
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(region))), flush=True)
sys.stdin.read()
"""


def _wait_until_blocked(pid: int) -> None:
    """Waits until the child sleeps in its final read, so its memory no longer changes."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "S":
            return
        time.sleep(0.01)
    raise AssertionError("the child never blocked on stdin")


@pytest.fixture
def child_with_region():
    with subprocess.Popen([sys.executable, "-c", CHILD, str(REGION_BYTES),
                           str(TOUCHED_PAGES)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            address = int(process.stdout.readline(), 16)
            _wait_until_blocked(process.pid)
            yield process.pid, address
        finally:
            process.kill()


def _rollup_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in smaps_rollup")


def test_live_process_region_is_found_and_excluded(child_with_region):
    pid, address = child_with_region
    memory = account_process(pid, REGION_BYTES)
    assert len(memory.ram_mappings) == 1
    assert memory.ram_mappings[0].startswith(f"{address:x}-{address + REGION_BYTES:x} rw-p")
    assert memory.ram_rss == TOUCHED_PAGES * mmap.PAGESIZE
    # The whole process is counted (all mappings, as smaps_rollup sums them); the
    # overhead is everything but the region: the interpreter, libraries, heap.
    assert memory.total_rss == _rollup_kb(pid, "Rss") * 1024
    assert memory.overhead_rss == memory.total_rss - TOUCHED_PAGES * mmap.PAGESIZE
    assert memory.overhead_rss > 1 * MiB
    assert 0 < memory.overhead_pss <= memory.overhead_rss


def test_live_process_without_a_region_of_the_size(child_with_region):
    pid, _ = child_with_region
    with pytest.raises(RamMappingError):
        account_process(pid, REGION_BYTES + mmap.PAGESIZE)


# The probes' bookkeeping, against fakes (what they count, not how fast).


def _fake_qmp_server(sock: socket.socket, wrong_id_at: int | None = None) -> None:
    """Answers query-status one line at a time, as QEMU does, with an event now and then.

    A client that gives up (the out-of-order test) may close its end mid-stream.
    """
    with sock, sock.makefile("rb") as reader, contextlib.suppress(ConnectionError):
        for number, line in enumerate(reader):
            request = json.loads(line)
            reply_id = -1 if number == wrong_id_at else request["id"]
            if number % 7 == 3:
                sock.sendall(b'{"event":"RTC_CHANGE","data":{},"timestamp":{}}\r\n')
            sock.sendall(json.dumps({"return": {"status": "running"}, "id": reply_id}).encode()
                         + b"\r\n")


@pytest.fixture
def qmp_pair():
    client_sock, server_sock = socket.socketpair()
    threads = []

    def serve(**kwargs):
        thread = threading.Thread(target=_fake_qmp_server, args=(server_sock,), kwargs=kwargs,
                                  daemon=True)
        thread.start()
        threads.append(thread)
        return QmpClient(client_sock)
    yield serve
    client_sock.close()
    for thread in threads:
        thread.join(5)


def test_pipelined_burst_counts_every_reply_past_events(qmp_pair):
    # 3000 requests are more than a socket buffer holds either way: the client must
    # read while it writes.
    result = query_status_throughput(qmp_pair(), 3000, timeout=60)
    assert result.count == 3000
    assert result.commands_per_second > 0


def test_pipelined_burst_rejects_a_reply_out_of_order(qmp_pair):
    with pytest.raises(ProbeError, match="#5"):
        query_status_throughput(qmp_pair(wrong_id_at=5), 20, timeout=60)


def test_sequential_latency_drops_samples_an_event_delayed(qmp_pair):
    result = query_status_latency(qmp_pair(), 70)
    # Requests 3, 10, 17, ... (every 7th from 3) were answered after an event.
    assert result.count == 70 - 10
    assert 0 < result.p50_us <= result.p99_us <= result.max_us


def test_serial_marker_split_across_reads_is_found():
    read_end, write_end = os.pipe()
    watcher = SerialWatcher(read_end, {"hello": b"svtest: hello"})
    try:
        os.write(write_end, b"svtest: he")
        time.sleep(0.05)  # let the reader see the first half on its own
        os.write(write_end, b"llo\r\n")
        seen = watcher.wait_for("hello", time.monotonic_ns() + 10 * 10**9)
        assert watcher.first_byte_ns is not None and watcher.first_byte_ns <= seen
    finally:
        os.close(write_end)
        watcher.join()
        os.close(read_end)
    assert watcher.eof


def test_serial_end_before_the_marker_is_an_error():
    read_end, write_end = os.pipe()
    watcher = SerialWatcher(read_end, {"done": b"svtest: done"})
    os.write(write_end, b"svtest: hello\r\n")
    os.close(write_end)
    try:
        with pytest.raises(ProbeError, match="ended before"):
            watcher.wait_for("done", time.monotonic_ns() + 10 * 10**9)
    finally:
        watcher.join()
        os.close(read_end)


# The block metric: blk-bench output, run bookkeeping, the disk image.

BLK_CONFIG = (b"svtest: action=blk-bench\r\n"
              b"svtest: blk-bench config capacity=524288 queue-size=64 event-idx=1 "
              b"layout=direct segs=1 buffers=distinct irq=0 tsc-khz=2500000 "
              b"tsc-source=assumed\r\n")
BLK_START = b"svtest: blk-bench start mode=randread bs=4096 qd=16 count=8000\r\n"
BLK_DONE = (b"svtest: blk-bench done requests=8000 bytes=32768000 errors=0\r\n"
            b"svtest: blk-bench guest-ms=410 tsc-ticks=1025000000 notifies=377\r\n"
            b"svtest: done\r\n")


def _arrivals(*reads: bytes, step_ns: int = 250_000_000):
    """The output of these reads, and arrival_ns as if read i returned at i * step_ns."""
    ends = []
    total = 0
    for chunk in reads:
        total += len(chunk)
        ends.append(total)

    def arrival_ns(offset: int) -> int | None:
        for i, end in enumerate(ends):
            if offset < end:
                return i * step_ns
        return None
    return b"".join(reads), arrival_ns


def test_blk_bench_time_runs_from_the_start_newline_to_the_next_byte():
    # The start line's newline closes read 1, the done line opens read 2: 0.25 s.
    data, arrival_ns = _arrivals(BLK_CONFIG + BLK_START[:20], BLK_START[20:], BLK_DONE)
    result = parse_blk_bench(data, arrival_ns)
    assert (result.mode, result.bs, result.qd, result.requests) == ("randread", 4096, 16, 8000)
    assert result.seconds == 0.25
    assert result.value("IOPS") == 32000.0
    assert result.value("MiB/s") == 32768000 / 0.25 / MiB
    assert (result.guest_ms, result.tsc_ticks, result.notifies) == (410, 1025000000, 377)
    assert result.as_dict()["host_ms"] == 250.0


def test_blk_bench_done_in_the_same_read_as_the_start_newline_is_refused():
    data, arrival_ns = _arrivals(BLK_CONFIG, BLK_START + BLK_DONE)
    with pytest.raises(ProbeError, match="one read"):
        parse_blk_bench(data, arrival_ns)


@pytest.mark.parametrize("output, message", [
    # Request errors: a failed run, with the first error's line.
    (BLK_START + b"svtest: blk-bench done requests=8000 bytes=32755712 errors=3\r\n"
     b"svtest: blk-bench guest-ms=1 tsc-ticks=1 notifies=1\r\n"
     b"svtest: blk-bench first-error status=1 sector=88\r\n", "errors=3.*status=1 sector=88"),
    (BLK_START + b"svtest: blk-bench FAIL result=timeout completed=5 issued=21 used-idx=5 "
     b"last-used=5 avail-idx=21 status=0xf isr=0x0\r\nsvtest: done\r\n", "FAIL result=timeout"),
    (b"svtest: blk-bench FAIL init=no-version-1\r\nsvtest: done\r\n", "FAIL init"),
    (BLK_START, "no 'svtest: blk-bench done'"),
    (b"svtest: unknown-action=blk-bench\r\nsvtest: done\r\n", "no 'svtest: blk-bench start'"),
    (BLK_START + b"svtest: blk-bench done requests=7999 bytes=32763904 errors=0\r\n",
     "requests=7999.*count=8000"),
    (BLK_START + b"svtest: tick 1\r\n" + BLK_DONE, "between the blk-bench start and done"),
])
def test_blk_bench_failures(output, message):
    data, arrival_ns = _arrivals(BLK_CONFIG + output[:len(BLK_START)],
                                 output[len(BLK_START):])
    with pytest.raises(ProbeError, match=message):
        parse_blk_bench(data, arrival_ns)


def test_serial_arrival_of_each_byte():
    read_end, write_end = os.pipe()
    watcher = SerialWatcher(read_end, {"start": b"start\n"})
    try:
        os.write(write_end, b"start\n")
        watcher.wait_for("start", time.monotonic_ns() + 10 * 10**9)
        os.write(write_end, b"done\n")
    finally:
        os.close(write_end)
        watcher.join()
        os.close(read_end)
    first = watcher.arrival_ns(0)
    assert first is not None and first == watcher.first_byte_ns == watcher.arrival_ns(5)
    # The second write came in a later read, never an earlier one.
    assert watcher.arrival_ns(6) == watcher.arrival_ns(10) >= first
    assert watcher.arrival_ns(11) is None


def test_block_metrics_cover_every_workload_and_cache_mode():
    names = [case.metric for case in BLOCK_CASES]
    assert len(names) == len(set(names)) == 2 * len(BLOCK_WORKLOADS)
    assert {"block.randread-4k-qd16.buffered", "block.randread-4k-qd1.direct",
            "block.randwrite-4k-qd16.direct", "block.randwrite-4k-qd1.buffered",
            "block.seqread-128k-qd16.direct", "block.seqwrite-128k-qd16.buffered"} <= set(names)
    for case in BLOCK_CASES:
        info = METRICS[case.metric]
        assert (info.group, info.better) == ("block", "higher")
        assert info.unit == ("IOPS" if case.workload.mode.startswith("rand") else "MiB/s")
        assert case.direct == (case.cache == "direct")
        cmdline = case.workload.cmdline()
        assert f"svtest.mode={case.workload.mode} " in cmdline
        assert "svtest.action=blk-bench" in cmdline


def test_disk_arguments_of_both_monitors():
    image = Path("/tmp/x/disk.img")
    assert harness.ours_disk(image, True) == [
        "-drive", "id=d0,file=/tmp/x/disk.img,direct=on",
        "-device", "virtio-blk-device,drive=d0,id=d0"]
    assert "id=d0,file=/tmp/x/disk.img,direct=off" in harness.ours_disk(image, False)
    qemu = harness.qemu_disk(image, True)
    assert qemu[:2] == ["-global", "virtio-mmio.force-legacy=false"]
    assert "id=d0,file=/tmp/x/disk.img,format=raw,if=none,cache=none" in qemu
    assert "id=d0,file=/tmp/x/disk.img,format=raw,if=none,cache=writeback" in (
        harness.qemu_disk(image, False))


def test_block_is_in_the_default_metrics_of_svtest_only():
    args = parse_args([])
    assert "block" in args.groups
    assert (args.reps, args.block_reps) == (10, BLOCK_REPS)
    assert parse_args(["--reps", "3"]).block_reps == 3
    assert "block" not in parse_args(["--guest", "linux"]).groups
    with pytest.raises(SystemExit):
        parse_args(["--guest", "linux", "--metrics", "block"])


def _settings(groups, block_reps=None, image=None):
    return harness.Settings(mem_mib=256, smp=1, qmp_requests=10, groups=frozenset(groups),
                            python=sys.executable, qemu="qemu-system-x86_64",
                            block_image=image, block_reps=block_reps)


def test_block_runs_take_the_first_block_reps_pairs(monkeypatch, tmp_path):
    def fake_block(record, monitor, guest, case, image, workdir):
        record.values[case.metric] = 100.0 + record.pair
        if record.pair == 1 and record.monitor == "qemu":
            record.error = "blk-bench errors=1 of requests=8000"

    def fake_session(record, *args):
        record.values["start.qmp-greeting"] = 50.0

    monkeypatch.setattr(harness, "run_block", fake_block)
    monkeypatch.setattr(harness, "run_session", fake_session)
    guest = harness.svtest_guest(Path("guest.elf"), 1.0, 30.0)
    image = tmp_path / "disk.img"
    settings = _settings({"start", "block"}, block_reps=2, image=image)
    monitors = [harness.MONITORS["ours"], harness.MONITORS["qemu"]]
    records = harness.run_pairs(monitors, guest, settings, 4, 1, tmp_path)

    block = [r for r in records if r.kind.startswith("block.")]
    # Warm-up pair and 2 measured pairs, each case on ours then QEMU, back to back.
    assert len(block) == 3 * len(BLOCK_CASES) * 2
    assert {r.pair for r in block} == {-1, 0, 1}
    assert [r.monitor for r in block[:4]] == ["ours", "qemu", "ours", "qemu"]
    assert block[0].kind == block[1].kind == BLOCK_CASES[0].metric
    assert len([r for r in records if r.kind == "session"]) == 5 * 2
    ours = block[0].argv
    assert ours[ours.index("-append") + 1] == BLOCK_CASES[0].workload.cmdline()
    assert f"id=d0,file={image},direct=off" in ours
    assert f"id=d0,file={image},format=raw,if=none,cache=writeback" in block[1].argv

    names = harness.expected_metrics(guest, settings.groups)
    assert names == ["start.qmp-greeting", "start.query-running",
                     *(case.metric for case in BLOCK_CASES),
                     *(case.cpu_metric for case in BLOCK_CASES)]
    reps = harness.metric_reps(names, settings, 4)
    assert reps["start.qmp-greeting"] == 4 and reps[BLOCK_CASES[0].metric] == 2
    rows = metric_rows(records, names, ["ours", "qemu"], 4, reps)
    first = rows[2]
    assert first["reps"] == 2
    assert first["samples"] == {"ours": [100.0, 101.0], "qemu": [100.0, None]}
    assert first["ratio_ours_over_qemu"]["n"] == 1
    table = format_table(rows, ["ours", "qemu"], 4)
    assert "100.5 [100.0-101.0]  " in table  # 2 of 2 pairs: no count shown
    assert "100.0 [100.0-100.0] (1/2)" in table
    assert "50.00 [50.00-50.00]  " in table
    assert "for rates (IOPS, MiB/s, higher is better)" in table


def test_linux_guest_has_no_block_runs():
    # harness.linux_guest wants its files to exist; the Guest itself does not.
    linux = harness.Guest(name="linux", kernel=Path("vmlinux"), initrd=None,
                          session_cmdline="console=ttyS0", ready=b"x", session_markers={},
                          boot_cmdline=None, settle_s=1, timeout_s=1)
    assert harness.block_cases(linux, frozenset({"block"})) == []
    assert harness.run_kinds(linux, frozenset({"block"})) == []


def test_block_cmdline_puts_append_last():
    guest = harness.with_extra_cmdline(harness.svtest_guest(Path("g"), 1.0, 30.0),
                                       "svtest.irq=1")
    case = BLOCK_CASES[0]
    assert guest.block_cmdline(case) == f"{case.workload.cmdline()} svtest.irq=1"
    assert guest.session_cmdline == "svtest.action=halt-loop svtest.irq=1"


def test_disk_image_is_fully_allocated_random_bytes(tmp_path):
    image = tmp_path / "disk.img"
    size = 3 * MiB + 512
    try:
        harness.make_disk_image(image, size)
    except harness.DiskImageError as error:
        if "O_DIRECT" in str(error):
            pytest.skip(str(error))
        raise
    assert image.stat().st_size == size
    assert image.stat().st_blocks * 512 >= size
    data = image.read_bytes()
    assert data.count(0) < len(data) // 64
    for cached in (True, False):
        assert set(harness.prepare_image_cache(image, cached)) == {"sync_ms", "cache_ms"}
