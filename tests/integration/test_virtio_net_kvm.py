"""NIC set-up on real KVM with real taps, each test inside a network namespace of its own.

The freestanding guest idles; these tests check what the host sees: taps
opened by name or inherited as an fd (as libvirt and Kata hand them over),
hot-plug errors in StratoVirt's wording, and taps let go at netdev_del.  The
frames themselves are checked by the data-plane unit tests, the Linux guest
and the freestanding guest's net actions.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import MONITOR, Qmp, monitor_env, wait_for_socket
from tests.netns import NetNamespace, net_namespace

pytestmark = pytest.mark.kvm

# Opens tap0 in the namespace as libvirt would, and execs the monitor with it as fd N.
FD_LAUNCHER = """
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"tap0", 0x0002 | 0x1000 | 0x4000))
os.set_inheritable(fd, True)
args = [a.replace("TAPFD", str(fd)) for a in sys.argv[1:]]
os.execv(args[0], args)
"""


@pytest.fixture
def namespace():
    with net_namespace() as ns:
        yield ns


def start(ns: NetNamespace, tmp_path: Path, guest: Path, *extra: str,
          launcher: list[str] | None = None) -> tuple[subprocess.Popen, Path]:
    qmp_path = tmp_path / "qmp.sock"
    process = ns.popen([*(launcher or []), *MONITOR, "-kernel", str(guest), "-append",
                        "svtest.action=halt-loop", "-serial", "none",
                        "-qmp", f"unix:{qmp_path},server,nowait", *extra],
                       env=monitor_env(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_socket(process, qmp_path)
    return process, qmp_path


def link_flags(ns: NetNamespace, name: str) -> str:
    return ns.run(["ip", "-o", "link", "show", name]).stdout


def stop(process: subprocess.Popen, qmp: Qmp) -> str:
    assert qmp.execute("quit") == {"return": {}}
    assert process.wait(30) == 0
    return process.stderr.read().decode() if process.stderr else ""


def test_a_boot_netdev_by_name_and_one_inherited_as_an_fd(namespace, tmp_path, svtest_guest):
    namespace.add_tap("tap1")
    process, qmp_path = start(
        namespace, tmp_path, svtest_guest,
        "-netdev", "tap,id=n0,fd=TAPFD", "-device", "virtio-net-device,netdev=n0,id=net0",
        "-netdev", "tap,id=n1,ifname=tap1",
        "-device", "virtio-net-device,netdev=n1,id=net1,mac=52:54:00:12:34:56",
        launcher=[sys.executable, "-c", FD_LAUNCHER])
    qmp = Qmp(qmp_path)
    try:
        # tap0 lives as long as the monitor holds the inherited fd (it is not persistent);
        # tap1, persistent and up, has carrier only while someone holds it.
        assert "tap0:" in link_flags(namespace, "tap0")
        assert "LOWER_UP" in link_flags(namespace, "tap1")
        # Both slots are taken: a third NIC has no room.
        assert qmp.execute("netdev_add", id="n2", ifname="tap2") == {"return": {}}
        assert qmp.execute("device_add", id="n2", driver="virtio-net-mmio")["error"][
            "desc"] == "A maximum of 2 virtio-net NICs are supported"
    finally:
        log = stop(process, qmp)
    assert "netdev 'n0' is tap 'tap0'" in log
    assert "NIC 'net1' (tap 'tap1', MAC 52:54:00:12:34:56) is now eth1" in log


def test_hot_plug_errors_with_real_taps(namespace, tmp_path, svtest_guest):
    namespace.add_tap("tap0")
    process, qmp_path = start(namespace, tmp_path, svtest_guest)
    qmp = Qmp(qmp_path)
    try:
        assert "NO-CARRIER" in link_flags(namespace, "tap0")
        assert qmp.execute("netdev_add", id="net-0", ifname="tap0") == {"return": {}}
        assert "LOWER_UP" in link_flags(namespace, "tap0")
        assert qmp.execute("netdev_add", id="net-1", ifname="tap0")["error"] == {
            "class": "GenericError", "desc": "Tap device already in use"}
        assert qmp.execute("netdev_add", id="net-1", ifname="lo")["error"]["desc"] == \
            "'lo' exists and is not a tap device"
        assert qmp.execute("netdev_add", id="net-1", ifname="a" * 16)["error"]["desc"] \
            .startswith("Invalid tap name")
        # A descriptor handed over with getfd that is not a tap.
        with open("/dev/null", "rb") as null:
            socket.send_fds(qmp.sock, [json.dumps({"execute": "getfd", "arguments": {
                "fdname": "notatap"}}).encode()], [null.fileno()])
        assert qmp.read() == {"return": {}}
        reply = qmp.execute("netdev_add", id="net-1", fd="notatap")
        assert reply["error"]["desc"].endswith("is not a tap device")
        assert qmp.execute("device_add", id="net-0", driver="virtio-net-mmio",
                           addr="0x1") == {"return": {}}
        assert qmp.execute("netdev_del", id="net-0")["error"]["desc"] == \
            "Netdev net-0 is in use by device 'net-0'"
        assert qmp.execute("device_del", id="net-0") == {"return": {}}
        assert qmp.execute("netdev_del", id="net-0") == {"return": {}}
        # The tap is let go: nobody holds it any more.
        deadline = time.monotonic() + 10
        while "NO-CARRIER" not in link_flags(namespace, "tap0"):
            assert time.monotonic() < deadline, link_flags(namespace, "tap0")
            time.sleep(0.05)
        # A netdev_add of a tap that does not exist creates it, as QEMU does.
        assert qmp.execute("netdev_add", id="net-2", ifname="svnew0") == {"return": {}}
        assert "svnew0" in link_flags(namespace, "svnew0")
    finally:
        stop(process, qmp)
