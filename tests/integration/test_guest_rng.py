"""virtio-rng with the freestanding guest, on QEMU microvm (the reference) and on our monitor.

The guest (tests/guest, action `rng`) asks the device for random bytes in requests
of a chosen size and reports how many came, a checksum of them (FNV-1a 64 in answer
order), the bytes the device changed past the length it reported, and how long it
took by the guest's TSC.  With a file of known bytes as the source, the checksum
proves the bytes are the source's; with max-bytes/period, the time proves the rate
limit (bounds from the period, with generous margins: a behaviour check, not a
benchmark).  No network is involved.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import MONITOR, run_monitor
from tests.integration.test_cli_errors import assert_one_line_error
from tests.integration.test_guest_balloon import Host
from tests.integration.test_guest_balloon import monitor as monitor  # the qemu/ours fixture
from tests.integration.test_guest_net import QEMU, Guest, fields, host_is_pvm

pytestmark = pytest.mark.kvm

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a(data: bytes) -> int:
    value = FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & (2**64 - 1)
    return value


def rng_argv(monitor: str, guest: Path, append: str, source: str, rate: str = "",
             extra: tuple[str, ...] = ()) -> list[str]:
    device = f"virtio-rng-device,rng=rng0,id=vrng0{',' + rate if rate else ''}"
    if monitor == "qemu":
        cpu = "host,-arch-capabilities" if host_is_pvm() else "host"
        return [QEMU, "-enable-kvm",
                "-M", "microvm,acpi=off,kernel_irqchip=on,pit=on,pic=on,rtc=off",
                "-cpu", cpu, "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
                "-no-reboot", "-serial", "stdio", "-kernel", str(guest), "-append", append,
                "-global", "virtio-mmio.force-legacy=false", *extra,
                "-object", f"rng-random,id=rng0,filename={source}", "-device", device]
    return [*MONITOR, "-kernel", str(guest), "-append", append, "-serial", "stdio", *extra,
            "-object", f"rng-random,id=rng0,filename={source}", "-device", device]


def run_rng(monitor: str, guest: Path, log: Path, append: str, source: str = "/dev/urandom",
            rate: str = "", extra: tuple[str, ...] = ()) -> tuple[Guest, dict[str, str]]:
    """Runs the rng action to its end; the guest and the fields of its result line."""
    guest_run = Guest(Host(), rng_argv(monitor, guest, f"svtest.action=rng {append}", source,
                                       rate, extra), log)
    try:
        result = guest_run.wait_line(r"svtest: rng (OK|FAIL)", timeout=60)
        assert result.group(1) == "OK", guest_run.output
        assert guest_run.wait_exit() == 0, guest_run.output
    finally:
        guest_run.close()
    line = next(line for line in guest_run.output.splitlines()
                if line.startswith("svtest: rng OK"))
    return guest_run, fields(line)


def test_random_bytes_arrive(monitor, svtest_guest, artifact_dir):
    guest, result = run_rng(monitor, svtest_guest, artifact_dir / f"{monitor}.log",
                            "svtest.bytes=4096 svtest.chunk=64")
    assert int(result["got"]) == 4096 and int(result["beyond"]) == 0
    assert int(result["empty"]) == 0
    # Random bytes are zero 16 times in 4096 on average; a zero-filled answer would be 4096.
    assert int(result["zero-bytes"]) < 100
    device = fields(next(line for line in guest.output.splitlines()
                         if line.startswith("svtest: rng device=")))
    assert int(device["accepted"], 16) == 1 << 32  # VERSION_1, nothing else to negotiate


def test_the_bytes_are_the_sources(monitor, svtest_guest, artifact_dir, tmp_path):
    """A file as the source: the guest's checksum is the checksum of its first bytes."""
    source = tmp_path / "entropy.bin"
    content = os.urandom(8192)
    source.write_bytes(content)
    _, result = run_rng(monitor, svtest_guest, artifact_dir / f"{monitor}.log",
                        "svtest.bytes=3000 svtest.chunk=100", source=str(source))
    assert int(result["got"]) == 3000
    assert int(result["sum"], 16) == fnv1a(content[:3000])


def test_max_bytes_per_period_limits_the_rate(monitor, svtest_guest, artifact_dir):
    """64 bytes per 100 ms, 1024 bytes asked in 16-byte requests, 8 at a time: the
    last bytes come in the 16th period, so at least 1.5 s after the first request."""
    max_bytes, period_ms, want = 64, 100, 1024
    guest, result = run_rng(monitor, svtest_guest, artifact_dir / f"{monitor}.log",
                            f"svtest.bytes={want} svtest.chunk=16 svtest.inflight=8",
                            rate=f"max-bytes={max_bytes},period={period_ms}")
    assert int(result["got"]) == want and int(result["beyond"]) == 0
    periods = -(-want // max_bytes)
    lower_ms = (periods - 1) * period_ms
    guest_ms = int(result["us"]) / 1000
    # The guest's own clock: never faster than the limit, and not stalled either.
    assert 0.9 * lower_ms <= guest_ms <= 3 * periods * period_ms + 2000, result
    rate = want / (guest_ms / 1000)
    assert rate <= max_bytes * 1000 / period_ms * periods / (periods - 1) * 1.12, result
    # The host's clock agrees (the guest's TSC frequency may be assumed, not read).
    host_s = guest.line_time(r"svtest: rng OK") - guest.line_time(r"svtest: rng start")
    assert host_s >= 0.8 * lower_ms / 1000, host_s


def test_without_a_limit_the_same_bytes_come_at_once(svtest_guest, artifact_dir):
    _, result = run_rng("ours", svtest_guest, artifact_dir / "ours.log",
                        "svtest.bytes=1024 svtest.chunk=16 svtest.inflight=8")
    assert int(result["got"]) == 1024
    assert int(result["us"]) < 1_000_000  # the limited run above needs at least 1.5 s


def test_the_device_is_placed_after_the_balloon(svtest_guest, artifact_dir):
    guest, _ = run_rng("ours", svtest_guest, artifact_dir / "ours.log", "svtest.bytes=64",
                       extra=("-device", "virtio-balloon-device"))
    device = fields(next(line for line in guest.output.splitlines()
                         if line.startswith("svtest: rng device=")))
    # Six disk slots (IRQ 5..10), two NIC slots (11, 12), the balloon (13), then the rng.
    assert (device["device"], device["irq"], device["base"]) == ("9", "14", "0xf0101200")


def test_a_missing_source_is_a_clear_error_and_leaves_nothing(svtest_guest, tmp_path):
    qmp = tmp_path / "qmp.sock"
    missing = tmp_path / "no-such-random"
    result = run_monitor(["-kernel", str(svtest_guest), "-qmp", f"unix:{qmp},server,nowait",
                          "-object", f"rng-random,id=rng0,filename={missing}",
                          "-device", "virtio-rng-device,rng=rng0"])
    assert_one_line_error(result, f"rng-random 'rng0': cannot open filename '{missing}': "
                                  "No such file or directory")
    assert not qmp.exists()


@pytest.mark.parametrize(("rng_args", "pattern"), [
    (["-device", "virtio-rng-device,rng=nope"], "rng='nope' names no -object rng-random"),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-device",
      "virtio-rng-device,rng=r,max-bytes=10,period=1000"],
     "max-bytes=10,period=1000 is 10 bytes/s; the rate must lie in [64, 1000000000]"),
])
def test_bad_rng_options(svtest_guest, rng_args, pattern):
    assert_one_line_error(run_monitor(["-kernel", str(svtest_guest), *rng_args]), pattern)


def test_hostile_requests_then_the_device_recovers(svtest_guest, artifact_dir):
    """Ours only: QEMU 7.2 leaves a chain with nothing writable unanswered (the guest's
    wait times out) and answers the buffer beyond RAM, so it is no reference here."""
    guest = Guest(Host(), [*MONITOR, "-kernel", str(svtest_guest), "-serial", "stdio",
                           "-append", "svtest.action=rng-hostile",
                           "-object", "rng-random,id=rng0,filename=/dev/urandom",
                           "-device", "virtio-rng-device,rng=rng0"], artifact_dir / "ours.log")
    try:
        guest.wait_line(r"svtest: rng-hostile recovered", timeout=60)
        assert guest.wait_exit() == 0, guest.output
    finally:
        guest.close()
    results = {f["case"]: f for f in (fields(line) for line in guest.output.splitlines()
                                      if line.startswith("svtest: rng-hostile case="))}
    # Nothing writable: answered with 0 bytes and the read-only buffer untouched.
    assert (results["readonly"]["result"], results["readonly"]["len"],
            results["readonly"]["changed"]) == ("ok", "0", "0")
    # 1 MiB asked: one request's cap, 64 KiB.
    assert (results["huge"]["result"], results["huge"]["len"]) == ("ok", "65536")
    # Beyond RAM: the device needs a reset (and the monitor says why).
    assert results["oob"]["result"] == "needs-reset"
    stderr = (artifact_dir / "ours.stderr").read_text()
    assert "rng: guest error: buffer outside guest RAM; device needs reset" in stderr
    recovered = fields(next(line for line in guest.output.splitlines()
                            if "rng-hostile recovered" in line))
    assert (recovered["result"], recovered["len"]) == ("ok", "64")
