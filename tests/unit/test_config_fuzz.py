"""No command line and no -config file reaches a traceback: one clear line and status 1.

main() runs for real, up to the point where it would start a VM (launch is
replaced by a stub), so every check in the command-line and JSON front ends is
exercised, with arbitrary input from hypothesis.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stratovirt_py.launcher
from stratovirt_py.cli import main
from stratovirt_py.config import MachineConfig
from tests.helpers import MONITOR, monitor_env

OPTIONS = ["-machine", "-M", "-smp", "-m", "-kernel", "-append", "-initrd", "-serial", "-qmp",
           "-api-channel", "-drive", "-netdev", "-device", "-pidfile", "-config", "-name",
           "-daemonize", "-S", "-freeze", "-D", "-uuid", "-cpu", "-enable-kvm", "--smp", "-"]
PIECES = ["=", ",", ":", "unix:", "server", "nowait", "on", "off", "id", "file", "path",
          "drive", "netdev", "tap", "virtio-blk-device", "virtio-net-device",
          "virtio-balloon-device", "stdio", "socket", "microvm", "cpus", "maxcpus", "sockets",
          "cores", "threads", "size", "K", "M", "G", "0x", "-1", "\0", "é", "\udcff"]

huge_number = st.integers(min_value=5000, max_value=20000).map(lambda n: "9" * n)
value = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.sampled_from(PIECES), st.integers(-5, 300).map(str), huge_number),
             max_size=8).map("".join),
)
argv = st.lists(st.one_of(st.sampled_from(OPTIONS).map(lambda o: [o]), st.tuples(
    st.sampled_from(OPTIONS), value).map(list), value.map(lambda v: [v])), max_size=6).map(
    lambda groups: [token for group in groups for token in group])


@pytest.fixture
def no_vm(monkeypatch):
    """launch() stands in for the VM: a valid configuration ends with status 0."""
    launched: list[MachineConfig] = []

    def fake_launch(config: MachineConfig) -> int:
        assert isinstance(config, MachineConfig)
        # What launch() would hand to the OS must be usable there.
        for path in (config.kernel, config.initrd, config.serial.path, config.pidfile,
                     config.log_file, *config.qmp_sockets, *(d.drive.path for d in config.disks)):
            assert path is None or "\0" not in path
        launched.append(config)
        return 0

    monkeypatch.setattr(stratovirt_py.launcher, "launch", fake_launch)
    return launched


def run_main(args: list[str], capsys) -> tuple[int, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.err


def assert_one_clear_line(status: int, err: str) -> None:
    if status == 0:
        assert err == ""
        return
    assert status == 1
    assert err.startswith("stratovirt-py: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=argv)
def test_any_command_line_gives_a_config_or_one_clear_line(args, no_vm, capsys):
    if any(a in ("-help", "--help", "-h", "-version", "--version", "-V") for a in args):
        return
    assert_one_clear_line(*run_main(["-kernel", "/k", *args], capsys))


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20), st.sampled_from(["MicroVm", "1G", "\0", ""]))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
SECTIONS = {
    "machine-config": ["type", "vcpu_count", "max_vcpus", "mem_size", "mem_path",
                       "dump_guest_core", "mem_share"],
    "boot-source": ["kernel_image_path", "boot_args", "initrd_fs_path"],
    "drive": ["drive_id", "path_on_host", "read_only", "direct", "serial_num", "iothread",
              "iops"],
    "net": ["iface_id", "host_dev_name", "mac", "tap_fd", "vhost_type", "vhost_fd"],
    "serial": ["stdio"],
    "balloon": ["deflate_on_oom", "free_page_reporting"],
}


@st.composite
def json_configs(draw) -> object:
    """Mostly the right shape with wrong values, sometimes anything at all."""
    if draw(st.booleans()):
        return draw(json_value)
    config: dict[str, object] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True)):
        fields = {key: draw(json_value) for key in draw(
            st.lists(st.sampled_from(SECTIONS[section]), unique=True))}
        config[section] = [fields] if section in ("drive", "net") and draw(st.booleans()) \
            else fields
    return config


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(document=json_configs())
def test_any_json_config_gives_a_config_or_one_clear_line(document, no_vm, capsys):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(document, file)
    try:
        assert_one_clear_line(*run_main(["-config", file.name], capsys))
    finally:
        os.unlink(file.name)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(
    st.binary(max_size=200),
    st.integers(5000, 20000).map(lambda n: b'{"machine-config":{"vcpu_count":' + b"9" * n + b"}}"),
    st.integers(100, 5000).map(lambda n: b"[" * n + b"]" * n),
))
def test_any_bytes_as_a_config_file_give_one_clear_line(content, no_vm, capsys):
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as file:
        file.write(content)
    try:
        assert_one_clear_line(*run_main(["-config", file.name], capsys))
    finally:
        os.unlink(file.name)


@pytest.mark.parametrize("args", [
    ["-m", "9" * 5000],
    ["-smp", "9" * 5000],
    ["-m", "size=" + "1" * 100000 + "G"],
    ["-drive", "id=a,file=/x" + "\udcff"],
])
def test_the_monitor_process_answers_huge_or_odd_values_with_one_line(args):
    result = subprocess.run([*MONITOR, "-kernel", "/nonexistent", *args],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                            env=monitor_env())
    assert result.returncode == 1
    err = result.stderr.decode(errors="replace")
    assert err.startswith("stratovirt-py: error: ") and err.count("\n") == 1, err
