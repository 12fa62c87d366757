"""Bad input: one clear line on stderr, exit status 1, never a traceback."""

import os
import subprocess

import pytest

from tests.helpers import MONITOR, elf_image, monitor_env, run_monitor

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change /dev or uid")


def assert_one_line_error(result, pattern: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("stratovirt-py: error: "), stderr
    assert pattern in lines[0], stderr


@pytest.fixture
def kernel(tmp_path):
    # A loadable ELF whose code is never reached: each check fails before the guest runs.
    path = tmp_path / "vmlinux"
    path.write_bytes(elf_image([(0x200000, b"\xf4", 1)], entry=0x200000))
    return str(path)


@pytest.mark.parametrize(("args", "pattern"), [
    (["--unsupported"], "unknown option '--unsupported'"),
    (["-kernel"], "option -kernel needs a value"),
    ([], "no kernel given"),
    (["-kernel", "/nonexistent/vmlinux"], "cannot read kernel '/nonexistent/vmlinux'"),
    (["-kernel", "KERNEL", "-m", "12X"], "invalid memory size '12X'"),
    (["-kernel", "KERNEL", "-m", "64M"], "must be between 128 MiB and 512 GiB"),
    (["-kernel", "KERNEL", "-m", "1T"], "must be between 128 MiB and 512 GiB"),
    (["-kernel", "KERNEL", "-smp", "0"], "out of range 1..254"),
    (["-kernel", "KERNEL", "-smp", "255"], "out of range 1..254"),
    (["-kernel", "KERNEL", "-smp", "2,maxcpus=1"], "less than cpus"),
    (["-kernel", "KERNEL", "-initrd", "/nonexistent/initrd"], "cannot read initrd"),
    (["-kernel", "KERNEL", "-pidfile", "/tmp/p"], "-pidfile must be used with -daemonize"),
    (["-kernel", "KERNEL", "-serial", "bogus"], "invalid -serial 'bogus'"),
    (["-kernel", "KERNEL", "-machine", "q35"], "unsupported machine type 'q35'"),
    (["-config", "/nonexistent.json"], "cannot read -config file"),
    # Neither creates an interface: 'lo' exists (and is no tap), fd 0 is no tap.
    (["-kernel", "KERNEL", "-netdev", "tap,id=n0,ifname=lo", "-device",
      "virtio-net-device,netdev=n0,id=n0"], "netdev 'n0': 'lo' exists and is not a tap device"),
    (["-kernel", "KERNEL", "-netdev", "tap,id=n0,fd=0", "-device",
      "virtio-net-device,netdev=n0,id=n0"], "netdev 'n0': fd 0 is not a tap device"),
    (["-kernel", "KERNEL", "-device", "virtio-balloon-device,deflate-on-oom=maybe"],
     "invalid value 'maybe' for deflate-on-oom: expected on or off"),
])
def test_bad_options(args, pattern, kernel):
    args = [kernel if a == "KERNEL" else a for a in args]
    assert_one_line_error(run_monitor(args), pattern)


def test_kernel_that_is_not_a_kernel(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a kernel\n" * 100)
    assert_one_line_error(run_monitor(["-kernel", str(path)]),
                          "is neither an ELF vmlinux nor a bzImage")


def test_elf_that_is_not_a_kernel():
    assert_one_line_error(run_monitor(["-kernel", "/bin/true"]), "below 1 MiB")


def test_unreadable_kernel_directory(tmp_path):
    assert_one_line_error(run_monitor(["-kernel", str(tmp_path)]), "cannot read kernel")


def test_existing_pidfile(tmp_path, kernel):
    pidfile = tmp_path / "vm.pid"
    pidfile.write_text("1234\n")
    result = run_monitor(["-kernel", kernel, "-daemonize", "-pidfile", str(pidfile)])
    assert_one_line_error(result, "already exists")
    assert pidfile.read_text() == "1234\n"  # untouched


@needs_root
def test_no_dev_kvm(kernel):
    # A private /dev without kvm, in a mount namespace of its own.
    script = "mount -t tmpfs none /dev && exec " + " ".join(MONITOR) + f" -kernel {kernel}"
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], capture_output=True, timeout=60, env=monitor_env(),
                            stdin=subprocess.DEVNULL)
    assert_one_line_error(result, "cannot use KVM: open /dev/kvm failed: No such file")


@needs_root
def test_no_permission_on_dev_kvm(kernel, tmp_path):
    os.chmod(tmp_path, 0o755)
    os.chmod(kernel, 0o644)
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             *MONITOR, "-kernel", kernel], capture_output=True, timeout=60,
                            env=monitor_env(), stdin=subprocess.DEVNULL, cwd="/")
    assert_one_line_error(result, "cannot use KVM: open /dev/kvm failed: Permission denied")
