"""Boot-protocol and lifecycle tests on real KVM with the freestanding test guest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from stratovirt_py.arch.x86_64.e820 import build_e820
from stratovirt_py.arch.x86_64.host_quirks import host_is_pvm
from stratovirt_py.memory import ram_layout
from tests.helpers import MONITOR, host_cpuinfo, monitor_env, run_monitor

pytestmark = pytest.mark.kvm
MiB = 1 << 20
GiB = 1 << 30
LAST_BRAND_LEAF = 0x8000_0004


def facts(output: bytes) -> dict[str, str]:
    """The guest's `svtest: key=value` lines as a dict (last value wins)."""
    result = {}
    for line in output.decode(errors="replace").splitlines():
        if line.startswith("svtest: ") and "=" in line:
            key, _, value = line[len("svtest: "):].partition("=")
            result[key.strip()] = value.strip()
    return result


def boot(guest, *args: str, action: str = "reboot", cmdline: str = "", timeout: float = 60):
    return run_monitor(["-kernel", str(guest), "-serial", "stdio",
                        "-append", f"svtest.action={action} {cmdline}".strip(), *args],
                       timeout=timeout)


def test_boots_and_receives_its_command_line(svtest_guest):
    result = boot(svtest_guest, cmdline="root=/dev/vda quiet marker=\"a b\"")
    info = facts(result.stdout)
    assert result.returncode == 0, result.stderr.decode()
    assert info["entry"] == "linux64"
    assert info["cmdline"].startswith('svtest.action=reboot root=/dev/vda quiet marker="a b"')
    assert (info["zeropage-boot-flag"], info["zeropage-header"], info["zeropage-loader"]) == (
        "0xaa55", "0x53726448", "0xff")
    assert b"svtest: done" in result.stdout
    assert b"VM exits: guest requested a reset" in result.stderr


def test_host_specific_arguments_only_on_kvm_pvm(svtest_guest):
    info = facts(boot(svtest_guest).stdout)
    assert ("clearcpuid=" in info["cmdline"]) == host_is_pvm()


@pytest.mark.parametrize("memory", [128 * MiB, 256 * MiB, 5 * GiB])
def test_guest_sees_the_e820_map(svtest_guest, memory):
    result = boot(svtest_guest, "-m", f"{memory // MiB}M")
    info = facts(result.stdout)
    expected = build_e820(ram_layout(memory))
    assert int(info["e820-entries"]) == len(expected)
    lines = [line for line in result.stdout.decode().splitlines() if "svtest: e820 " in line]
    assert lines == [f"svtest: e820 {i} addr={e.addr:#x} size={e.size:#x} type={e.type}"
                     for i, e in enumerate(expected)]
    assert int(info["ram-bytes"]) == memory - (0x100000 - 0x9FC00)


@pytest.mark.parametrize(("smp", "cpus", "apic_ids"), [
    ("1", 1, "0"),
    ("4", 4, "0,1,2,3"),
    ("2,maxcpus=4", 2, "0,1"),
    ("6,sockets=2,cores=3", 6, "0,1,2,4,5,6"),
])
def test_cpu_count_from_the_mp_table(svtest_guest, smp, cpus, apic_ids):
    info = facts(boot(svtest_guest, "-smp", smp).stdout)
    assert info["mptable"] == "ok"
    assert int(info["cpus"]) == cpus
    assert info["apic-ids"] == apic_ids
    assert info["bsp-apic-id"] == "0" and info["cpuid-apic-id"] == "0"


def ids_line(output: bytes, prefix: str) -> list[dict[str, int | None]]:
    """The `svtest: <prefix> lapic-id=.. cpuid-apic-id=.. x2apic-id=..` lines, parsed."""
    result = []
    for line in output.decode(errors="replace").splitlines():
        if line.startswith(f"svtest: {prefix} "):
            pairs = dict(word.split("=", 1) for word in line.split()[2:])
            result.append({key: None if value == "none" else int(value)
                           for key, value in pairs.items()})
    return result


@pytest.mark.parametrize(("smp", "apic_ids"), [
    ("6,sockets=2,cores=3", [0, 1, 2, 4, 5, 6]),
    ("6,sockets=2,cores=1,threads=3", [0, 1, 2, 4, 5, 6]),
    ("4", [0, 1, 2, 3]),
    ("3,sockets=1,cores=3", [0, 1, 2]),
    ("8,sockets=2,cores=2,threads=2", [0, 1, 2, 3, 4, 5, 6, 7]),
    ("2,maxcpus=6,sockets=2,cores=3", [0, 1]),
    ("1", [0]),
])
def test_every_ap_starts_and_reports_its_mp_table_apic_id(svtest_guest, smp, apic_ids):
    """The guest starts each AP of the MP table by APIC id (INIT-SIPI-SIPI): each one
    answers with that id in its LAPIC ID register, CPUID leaf 1 and leaf 0xB."""
    result = boot(svtest_guest, "-smp", smp, action="smp")
    info = facts(result.stdout)
    assert result.returncode == 0, result.stderr.decode()
    assert [int(i) for i in info["apic-ids"].split(",")] == apic_ids
    has_leaf_0xb = int(info["cpuid-max-leaf"], 16) >= 0xB
    bsp, = ids_line(result.stdout, "smp-bsp")
    aps = ids_line(result.stdout, "smp-ap")
    for cpu in [bsp, *aps]:
        assert cpu["lapic-id"] == cpu["cpuid-apic-id"], cpu
        assert cpu["x2apic-id"] == (cpu["lapic-id"] if has_leaf_0xb else None), cpu
    assert bsp["lapic-id"] == 0
    assert sorted(ap["lapic-id"] for ap in aps) == apic_ids[1:]
    assert (info["smp missing"], info["smp unexpected"], info["smp mismatched"]) == (
        "none", "none", "none")
    assert info["smp result"] == "ok"
    assert b"svtest: done" in result.stdout


def test_guest_cpu_identity_is_the_hosts(svtest_guest):
    """As under QEMU's -cpu host: vendor, family/model/stepping and the brand string."""
    result = boot(svtest_guest)
    info = facts(result.stdout)
    host = host_cpuinfo()
    assert info["cpuid-vendor"] == host["vendor_id"]
    assert (int(info["cpuid-family"]), int(info["cpuid-model"]),
            int(info["cpuid-stepping"])) == (
        int(host["cpu family"]), int(host["model"]), int(host["stepping"]))
    assert int(info["cpuid-max-ext-leaf"], 16) >= LAST_BRAND_LEAF
    brand, = (line.removeprefix("svtest: cpuid-brand=").removesuffix("\r")
              for line in result.stdout.decode().splitlines()
              if line.startswith("svtest: cpuid-brand="))
    # Linux drops leading spaces and trailing white space (get_model_name()).
    assert brand.lstrip(" ").rstrip() == host["model name"]


def test_triple_fault_ends_with_status_zero(svtest_guest):
    result = boot(svtest_guest, action="triple-fault")
    assert result.returncode == 0
    assert b"VM exits: guest triple fault on vCPU 0" in result.stderr


def test_fatal_exit_gives_a_diagnostic(svtest_guest):
    result = boot(svtest_guest, action="popcnt")
    stderr = result.stderr.decode()
    if not host_is_pvm():
        pytest.skip("POPCNT only fails on kvm_pvm hosts, whose instruction emulator lacks it; "
                    "VMX/SVM run it natively, so there is no fatal exit to provoke here")
    assert result.returncode == 1
    assert "fatal KVM exit 17 (KVM_EXIT_INTERNAL_ERROR)" in stderr
    assert "suberror 1 (emulation failure)" in stderr
    # RIP and the POPCNT encoding (f3 REX.W 0f b8) read from guest memory.
    assert "RIP 0x2" in stderr
    assert "code at RIP: f3 48 0f b8" in stderr
    assert "Traceback" not in stderr


def test_write_to_unmapped_mmio_is_survived(svtest_guest):
    result = boot(svtest_guest, action="bad-mmio-write")
    assert result.returncode == 0
    assert b"svtest: done" in result.stdout
    assert b"MMIO write of 4 bytes at 0xd0000000 hits no device" in result.stderr


def test_console_input_reaches_the_guest(svtest_guest):
    result = subprocess.run([*MONITOR, "-kernel", str(svtest_guest), "-serial", "stdio",
                             "-append", "svtest.action=echo"], input=b"hi\nq",
                            capture_output=True, timeout=60, env=monitor_env())
    assert result.returncode == 0
    assert [line for line in result.stdout.decode().splitlines() if "got" in line] == [
        "svtest: got 0x68", "svtest: got 0x69", "svtest: got 0x0a", "svtest: got 0x71"]


def test_serial_to_file(svtest_guest, tmp_path):
    log = tmp_path / "console.log"
    result = run_monitor(["-kernel", str(svtest_guest), "-serial", f"file,path={log}",
                          "-append", "svtest.action=reboot"])
    assert result.returncode == 0
    assert b"svtest: done\r\n" in log.read_bytes()
    assert b"svtest" not in result.stdout


def test_serial_over_a_unix_socket(svtest_guest, tmp_path):
    path = tmp_path / "console.sock"
    process = subprocess.Popen([*MONITOR, "-kernel", str(svtest_guest), "-serial",
                                f"socket,path={path},server,nowait",
                                "-append", "svtest.action=echo"],
                               stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=monitor_env())
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mode & 0o777 == 0o600
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.sendall(b"zq")
        received = b""
        while b"got 0x71" not in received:
            chunk = client.recv(4096)
            assert chunk, f"console closed early: {received!r}"
            received += chunk
        assert b"svtest: got 0x7a\r\n" in received
        client.close()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not path.exists()


def test_sigterm_shuts_down_cleanly(svtest_guest):
    process = subprocess.Popen([*MONITOR, "-kernel", str(svtest_guest), "-serial", "stdio",
                                "-append", "svtest.action=spin"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=monitor_env())
    assert process.stdout is not None
    line = b""
    while b"tick" not in line:
        line = process.stdout.readline()
        assert line, "guest never ticked"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert b"shut down by signal SIGTERM" in stderr


def test_freeze_keeps_the_guest_from_running(svtest_guest):
    process = subprocess.Popen([*MONITOR, "-kernel", str(svtest_guest), "-serial", "stdio",
                                "-S", "-append", "svtest.action=reboot"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=monitor_env())
    time.sleep(1.5)
    assert process.poll() is None  # a running guest would have rebooted in well under 1 s
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert stdout == b""


def test_daemonize_writes_and_removes_the_pidfile(svtest_guest, tmp_path):
    pidfile = tmp_path / "vm.pid"
    log = tmp_path / "vm.log"
    result = run_monitor(["-kernel", str(svtest_guest), "-daemonize", "-pidfile", str(pidfile),
                          "-D", str(log), "-append", "svtest.action=spin"])
    assert result.returncode == 0, result.stderr.decode()
    pid = int(pidfile.read_text())
    assert pid != os.getpid()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"stratovirt_py" in cmdline
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
    assert "shut down by signal SIGTERM" in log.read_text()


def test_daemonize_reports_start_up_errors(tmp_path):
    pidfile = tmp_path / "vm.pid"
    bad = tmp_path / "bad"
    bad.write_text("not a kernel" * 100)
    result = run_monitor(["-kernel", str(bad), "-daemonize", "-pidfile", str(pidfile)])
    assert result.returncode == 1
    assert b"neither an ELF vmlinux nor a bzImage" in result.stderr
    assert not pidfile.exists()


def test_json_config_boots_the_same_guest(svtest_guest, tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(svtest_guest),
                        "boot_args": "svtest.action=reboot from=json"},
        "machine-config": {"vcpu_count": 3, "mem_size": 512 * MiB},
        "serial": {"stdio": True},
    }))
    result = run_monitor(["-config", str(config)])
    info = facts(result.stdout)
    assert result.returncode == 0
    assert info["cpus"] == "3"
    assert info["cmdline"].startswith("svtest.action=reboot from=json")
    assert int(info["ram-bytes"]) == 512 * MiB - (0x100000 - 0x9FC00)


def test_vcpu_threads_are_named(svtest_guest):
    process = subprocess.Popen([*MONITOR, "-kernel", str(svtest_guest), "-smp", "2",
                                "-append", "svtest.action=spin"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=monitor_env())
    try:
        deadline = time.monotonic() + 30
        names: list[str] = []
        while time.monotonic() < deadline:
            names = sorted(Path(f"/proc/{process.pid}/task/{tid}/comm").read_text().strip()
                           for tid in os.listdir(f"/proc/{process.pid}/task"))
            if "vcpu1" in names:
                break
            time.sleep(0.05)
        assert "vcpu0" in names and "vcpu1" in names
    finally:
        process.terminate()
        process.wait(timeout=30)
