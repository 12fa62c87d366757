"""Command-line and -config JSON parsing into MachineConfig."""

import json
import os

import pytest

from stratovirt_py.cli import parse_args
from stratovirt_py.config import (
    CpuTopology,
    MiB,
    SerialKind,
    parse_size,
)
from stratovirt_py.errors import ConfigError

KERNEL = ["-kernel", "/boot/vmlinux"]


def parse(*args: str):
    return parse_args([*KERNEL, *args])


@pytest.mark.parametrize(("text", "expected"), [
    ("256", 256 * MiB), ("256M", 256 * MiB), ("1G", 1 << 30), ("131072K", 128 * MiB),
    ("2g", 2 << 30), ("512MB", 512 * MiB),
])
def test_sizes_default_to_mib(text, expected):
    assert parse_size(text, "memory") == expected


@pytest.mark.parametrize("text", ["", "abc", "12X", "-5", "1.5G", "M"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ConfigError, match="invalid memory"):
        parse_size(text, "memory")


def test_defaults_match_stratovirt():
    config = parse()
    assert config.memory_size == 256 * MiB
    assert config.topology == CpuTopology(1, 1, 1, 1, 1)
    assert config.serial.kind is SerialKind.NONE
    assert config.name == "stratovirt-py"
    assert not config.freeze and not config.daemonize


def test_memory_forms():
    assert parse("-m", "1024").memory_size == 1024 * MiB
    assert parse("-m", "size=2G").memory_size == 2 << 30
    assert parse("-m", "128M").memory_size == 128 * MiB


@pytest.mark.parametrize("value", ["127M", "513G", "0", "big", "size=", "100K"])
def test_memory_out_of_range_or_malformed(value):
    with pytest.raises(ConfigError):
        parse("-m", value)


def test_smp_only_count_gives_one_socket_per_vcpu():
    # The spec's query-cpus example: CPU 1 is socket 1, core 0.
    topology = parse("-smp", "2").topology
    assert topology == CpuTopology(cpus=2, max_cpus=2, sockets=2, cores=1, threads=1)
    assert topology.ids(1) == (1, 0, 0)


def test_smp_full_topology():
    topology = parse("-smp", "cpus=4,maxcpus=8,sockets=2,cores=2,threads=2").topology
    assert (topology.cpus, topology.max_cpus) == (4, 8)
    assert [topology.ids(i) for i in (0, 1, 2, 5, 7)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]


def test_smp_fills_missing_counts():
    assert parse("-smp", "8,cores=4").topology.sockets == 2
    assert parse("-smp", "8,sockets=2").topology.cores == 4
    assert parse("-smp", "4,maxcpus=8").topology.sockets == 8


@pytest.mark.parametrize(("value", "message"), [
    ("0", "out of range"), ("255", "out of range"), ("4,maxcpus=2", "less than"),
    ("4,sockets=3", "must equal"), ("4,cores=0", "at least 1"), ("x", "integer"),
    ("4,bogus=1", "unknown parameter"), ("maxcpus=4", "count is missing"),
    ("4,dies=2", "not supported"),
])
def test_smp_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        parse("-smp", value)


def test_smp_254_is_the_limit():
    assert parse("-smp", "254").topology.cpus == 254


def test_serial_backends():
    assert parse("-serial", "stdio").serial.kind is SerialKind.STDIO
    file_serial = parse("-serial", "file,path=/tmp/console.log").serial
    assert (file_serial.kind, file_serial.path) == (SerialKind.FILE, "/tmp/console.log")
    sock = parse("-serial", "socket,path=/tmp/c.sock,server,nowait").serial
    assert (sock.kind, sock.path) == (SerialKind.SOCKET, "/tmp/c.sock")


def test_chardevs_and_serial_on_a_named_one():
    config = parse("-serial", "chardev:con0",
                   "-chardev", "socket,id=con0,path=/tmp/c.sock,server,nowait",
                   "-chardev", "pty,id=p", "-chardev", "file,id=f,path=/tmp/out",
                   "-chardev", "stdio,id=s")
    assert [(c.id, c.kind, c.path) for c in config.chardevs] == [
        ("con0", SerialKind.SOCKET, "/tmp/c.sock"), ("p", SerialKind.PTY, None),
        ("f", SerialKind.FILE, "/tmp/out"), ("s", SerialKind.STDIO, None)]
    assert config.serial_backend() == config.chardevs[0]
    own = parse("-serial", "pty").serial_backend()
    assert (own.id, own.kind) == ("serial0", SerialKind.PTY)


@pytest.mark.parametrize(("args", "message"), [
    (("-chardev", "pty"), "id=<id> is required"),
    (("-chardev", "socket,id=a,port=4444,server,nowait"), "only unix sockets"),
    (("-chardev", "socket,id=a,path=/x"), "needs 'server,nowait'"),
    (("-chardev", "serial,id=a"), "invalid -chardev 'serial'"),
    (("-chardev", "pty,id=a,path=/x"), "unknown"),
    (("-chardev", "pty,id=a", "-chardev", "stdio,id=a"), "chardev id 'a' is used twice"),
    (("-serial", "chardev:nope"), "no -chardev with that id"),
    (("-serial", "chardev:"), "no chardev id"),
    (("-daemonize", "-chardev", "stdio,id=a"), "-chardev stdio cannot be used with -daemonize"),
])
def test_chardev_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse(*args)


def test_chardev_paths_become_absolute_for_a_daemon():
    config = parse("-chardev", "file,id=f,path=out.log").with_absolute_paths()
    assert config.chardevs[0].path == os.path.abspath("out.log")


@pytest.mark.parametrize("value", ["tcp:1", "file", "socket,path=/x", "stdio,path=/x",
                                   "pty,path=/x"])
def test_serial_errors(value):
    with pytest.raises(ConfigError, match="-serial"):
        parse("-serial", value)


def test_qmp_and_api_channel_sockets_accumulate():
    config = parse("-qmp", "unix:/tmp/a.sock,server,nowait", "-api-channel", "unix:/tmp/b.sock")
    assert config.qmp_sockets == ("/tmp/a.sock", "/tmp/b.sock")


@pytest.mark.parametrize("value", ["unix:/tmp/a.sock", "tcp:127.0.0.1:4444,server,nowait",
                                   "unix:,server,nowait", "unix:/a,server,nowait,bogus"])
def test_qmp_errors(value):
    with pytest.raises(ConfigError):
        parse("-qmp", value)


def test_machine_option():
    assert parse("-machine", "microvm").dump_guest_core
    assert not parse("-machine", "type=microvm,dump-guest-core=off").dump_guest_core
    with pytest.raises(ConfigError, match="unsupported machine type 'q35'"):
        parse("-machine", "q35")


def test_libvirt_options_are_accepted_and_ignored():
    config = parse("-uuid", "4c3d2e1f-0000-1111-2222-333344445555", "-no-user-config",
                   "-nodefaults", "-nographic", "-no-shutdown",
                   "-cpu", "host", "-rtc", "base=utc", "-display", "none")
    assert config.kernel == "/boot/vmlinux"


def test_disable_seccomp_turns_the_sandbox_off():
    assert parse().seccomp
    assert not parse("-disable-seccomp").seccomp
    assert not parse("--disable-seccomp").seccomp


def test_flags_and_values():
    config = parse("-name", "vm1", "-append", "console=ttyS0", "-initrd", "/tmp/initrd", "-S",
                   "-D", "/tmp/log")
    assert (config.name, config.cmdline, config.initrd) == ("vm1", "console=ttyS0",
                                                            "/tmp/initrd")
    assert config.freeze and config.log_file == "/tmp/log"
    assert parse("-freeze").freeze
    assert parse("-D").log_to_stderr


def test_pidfile_needs_daemonize():
    with pytest.raises(ConfigError, match="-pidfile must be used with -daemonize"):
        parse("-pidfile", "/tmp/x.pid")
    assert parse("-daemonize", "-pidfile", "/tmp/x.pid").pidfile == "/tmp/x.pid"


def test_daemonize_refuses_stdio_serial():
    with pytest.raises(ConfigError, match="stdio"):
        parse("-daemonize", "-serial", "stdio")


@pytest.mark.parametrize(("args", "message"), [
    (["--unsupported"], "unknown option '--unsupported'"),
    (["-m"], "needs a value"),
    ([], "no kernel"),
])
def test_option_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(args if args == [] else [*KERNEL, *args])


def test_double_dash_options_work():
    assert parse_args(["--kernel", "/k", "--m", "512"]).memory_size == 512 * MiB


def test_drives_and_devices_fill_slots_in_device_order():
    config = parse("-drive", "id=a,file=/a.img,readonly=on,direct=off",
                   "-drive", "id=b,file=/b.img",
                   "-device", "virtio-blk-device,drive=b,id=disk-b,serial=SER",
                   "-device", "virtio-blk-device,drive=a,id=disk-a")
    assert [(d.id, d.drive.id, d.drive.path, d.drive.read_only, d.drive.direct, d.drive.serial)
            for d in config.disks] == [("disk-b", "b", "/b.img", False, True, "SER"),
                                       ("disk-a", "a", "/a.img", True, False, None)]


def test_a_device_without_id_is_named_after_its_drive():
    config = parse("-drive", "id=a,file=/a.img", "-device", "virtio-blk-device,drive=a")
    assert [(d.id, d.drive.id) for d in config.disks] == [("a", "a")]


def test_device_errors():
    with pytest.raises(ConfigError, match="no -drive with id 'x'"):
        parse("-device", "virtio-blk-device,drive=x,id=y")
    with pytest.raises(ConfigError, match="unsupported -device 'virtio-gpu'"):
        parse("-device", "virtio-gpu")
    with pytest.raises(ConfigError, match="used twice"):
        parse("-drive", "id=a,file=/a", "-drive", "id=a,file=/b")
    with pytest.raises(ConfigError, match="device id 'dev' is used twice"):
        parse("-drive", "id=a,file=/a", "-drive", "id=b,file=/b",
              "-device", "virtio-blk-device,drive=a,id=dev",
              "-device", "virtio-blk-device,drive=b,id=dev")
    with pytest.raises(ConfigError, match="drive id 'a' is used twice"):
        parse("-drive", "id=a,file=/a", "-device", "virtio-blk-device,drive=a,id=x",
              "-device", "virtio-blk-device,drive=a,id=y")
    seven = []
    for i in range(7):
        seven += ["-drive", f"id=d{i},file=/d{i}", "-device", f"virtio-blk-device,drive=d{i}"]
    with pytest.raises(ConfigError, match="at most 6"):
        parse(*seven)


def test_netdev_and_balloon():
    config = parse("-netdev", "tap,id=n0,ifname=tap0",
                   "-device", "virtio-net-device,netdev=n0,id=net0,mac=52:54:00:12:34:56",
                   "-device", "virtio-balloon-device,deflate-on-oom=true")
    [nic] = config.nics
    assert (nic.id, nic.netdev.id, nic.netdev.ifname, nic.mac) == (
        "net0", "n0", "tap0", "52:54:00:12:34:56")
    assert config.balloon is not None and config.balloon.deflate_on_oom


@pytest.mark.parametrize(("args", "message"), [
    (["-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34"], "invalid mac"),
    (["-device", "virtio-net-device,netdev=n0,mac=01:00:5e:00:00:01"], "multicast"),
    (["-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:zz"], "six hex pairs"),
    (["-device", "virtio-net-device,netdev=n1"], "no -netdev with id 'n1'"),
    (["-netdev", "tap,id=n1,ifname=tap1", "-device", "virtio-net-device,netdev=n0,id=x",
      "-device", "virtio-net-device,netdev=n1,id=x"], "device id 'x' is used twice"),
    (["-device", "virtio-net-device,netdev=n0,mac=52:54:00:0:0:1"], "six hex pairs"),
    (["-netdev", "tap,id=n1,ifname=tap1",
      "-device", "virtio-net-device,netdev=n0,id=a,mac=52:54:00:00:00:01",
      "-device", "virtio-net-device,netdev=n1,id=b,mac=52:54:00:00:00:01"],
     "mac '52:54:00:00:00:01' is used twice"),
    (["-drive", "id=d,file=/d", "-device", "virtio-blk-device,drive=d,id=same",
      "-device", "virtio-net-device,netdev=n0,id=same"], "device id 'same' is used twice"),
])
def test_nic_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse("-netdev", "tap,id=n0,ifname=tap0", *args)


# The legacy -config JSON file.

DEFAULT_JSON = {
    "boot-source": {
        "kernel_image_path": "/path/to/kernel",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off tsc=reliable ipv6.disable=1 "
                     "root=/dev/vda",
    },
    "machine-config": {"vcpu_count": 2, "mem_size": 268435456},
    "drive": [{"drive_id": "rootfs", "path_on_host": "/path/to/rootfs/image", "direct": False,
               "read_only": False}],
    "net": [{"iface_id": "net0", "host_dev_name": "tap0", "mac": "12:34:56:78:9A:BC"}],
    "balloon": {"deflate_on_oom": True},
    "serial": {"stdio": True},
}


def write_json(tmp_path, data) -> str:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_json_config_builds_the_same_model(tmp_path):
    config = parse_args(["-config", write_json(tmp_path, DEFAULT_JSON),
                         "-api-channel", "unix:/tmp/sv.sock"])
    assert config.kernel == "/path/to/kernel"
    assert config.cmdline.startswith("console=ttyS0")
    assert config.topology.cpus == 2 and config.memory_size == 256 * MiB
    assert config.disks[0].drive.path == "/path/to/rootfs/image"
    assert not config.disks[0].drive.direct
    assert config.nics[0].netdev.ifname == "tap0"
    assert config.balloon is not None and config.balloon.deflate_on_oom
    assert config.serial.kind is SerialKind.STDIO
    assert config.qmp_sockets == ("/tmp/sv.sock",)


def test_json_and_command_line_agree(tmp_path):
    from_json = parse_args(["-config", write_json(tmp_path, DEFAULT_JSON)])
    from_cli = parse_args([
        "-kernel", "/path/to/kernel", "-append", DEFAULT_JSON["boot-source"]["boot_args"],
        "-smp", "2", "-m", "256", "-serial", "stdio",
        "-drive", "id=rootfs,file=/path/to/rootfs/image,readonly=off,direct=off",
        "-device", "virtio-blk-device,drive=rootfs,id=rootfs",
        "-netdev", "tap,id=net0,ifname=tap0",
        "-device", "virtio-net-device,netdev=net0,id=net0,mac=12:34:56:78:9A:BC",
        "-device", "virtio-balloon-device,deflate-on-oom=on",
    ])
    assert from_json == from_cli


def test_command_line_overrides_json(tmp_path):
    config = parse_args(["-config", write_json(tmp_path, DEFAULT_JSON), "-m", "512",
                         "-kernel", "/other"])
    assert config.memory_size == 512 * MiB and config.kernel == "/other"
    assert config.topology.cpus == 2


def test_json_mem_size_with_suffix(tmp_path):
    data = {"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"mem_size": "1G"}}
    assert parse_args(["-config", write_json(tmp_path, data)]).memory_size == 1 << 30


@pytest.mark.parametrize(("data", "message"), [
    ({"bogus": {}}, "unknown top-level key 'bogus'"),
    ({"machine-config": {"vcpus": 1}}, "unknown field 'machine-config.vcpus'"),
    ({"machine-config": {"vcpu_count": "2"}}, "wrong type"),
    ({"machine-config": {"vcpu_count": True}}, "wrong type"),
    ({"machine-config": {"vcpu_count": 300}}, "out of range"),
    ({"machine-config": {"mem_size": 1024}}, "between 128 MiB"),
    ({"drive": [{"drive_id": "x"}]}, "lacks 'path_on_host'"),
    ({"drive": {"drive_id": "x"}}, "wrong type"),
    ({"vsock": {"vsock_id": "v", "guest_cid": 3}}, "not supported"),
    ([], "wrong type"),
])
def test_json_errors(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["-config", write_json(tmp_path, data), "-kernel", "/k"])


def test_json_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="cannot read -config file"):
        parse_args(["-config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_args(["-config", str(bad)])


def test_iothread_objects_serve_the_devices_that_name_them():
    config = parse("-object", "iothread,id=io1", "-object", "secret,id=s0,data=x",
                   "-drive", "id=d,file=/tmp/disk.img",
                   "-device", "virtio-blk-device,drive=d,iothread=io1",
                   "-netdev", "tap,id=n0,ifname=tap0",
                   "-device", "virtio-net-device,netdev=n0,iothread=io1")
    assert config.iothreads == ("io1",)  # other objects change nothing
    assert config.disks[0].iothread == config.nics[0].iothread == "io1"


@pytest.mark.parametrize(("args", "message"), [
    (["-drive", "id=d,file=/tmp/d", "-device", "virtio-blk-device,drive=d,iothread=io9"],
     "device 'd': no -object iothread with id 'io9'"),
    (["-object", "iothread"], "invalid -object iothread: 'id' is required"),
    (["-object", "iothread,id=a", "-object", "iothread,id=a"], "iothread id is used twice"),
    (["-object", "iothread,id=a,color=red"], "color"),
])
def test_iothread_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse(*args)
