"""virtio-console in C on synthetic guest memory: the multiport handshake, output to a
backend fd (direct, buffered while nobody is connected, bounded), input, config space;
and the command-line options with their errors."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from stratovirt_py.cli import parse_args
from stratovirt_py.config import ChardevConfig, ConsolePortConfig, SerialKind, VirtioSerialConfig
from stratovirt_py.devices.virtio.console import (
    VIRTIO_CONSOLE_F_MULTIPORT,
    VirtioConsole,
    queue_count,
)
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, IoThread, device_lock
from stratovirt_py.devices.virtio.mmio import VIRTIO_F_VERSION_1, QueueSetup
from stratovirt_py.errors import ConfigError
from stratovirt_py.json_config import parse_json_config
from tests.unit.test_virtio_balloon import BalloonRig
from tests.virtq_model import F_WRITE, Queue, SyntheticGuest

DEVICE_READY, PORT_ADD, PORT_READY, CONSOLE_PORT, PORT_OPEN, PORT_NAME = 0, 1, 3, 4, 6, 7
CONTROL = struct.Struct("<IHH")
OUT_BYTES = 65536
PORT1_NAME = "org.stratovirt.test"
BASE = 0x10000
CTRL_RX, CTRL_TX = 2, 3
RX = {0: 0, 1: 4}
TX = {0: 1, 1: 5}


class ConsoleRig:
    def __init__(self, multiport: bool = True) -> None:
        self.guest = SyntheticGuest(size=4 << 20, base=BASE)
        config = VirtioSerialConfig(ports=(
            ConsolePortConfig("con0", "c0", 0, is_console=True),
            ConsolePortConfig("port1", "c1", 1, name=PORT1_NAME)))
        nqueues = queue_count(2)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2 + nqueues)]
        self.irqfd, self.error_fd, *self.kicks = self.fds
        self.iothread = IoThread()
        self.device = VirtioConsole("console", DeviceWiring(
            self.guest.mem, self.iothread, self.irqfd, self.error_fd, tuple(self.kicks)),
            config, keep_output=frozenset({0, 1}))
        self.queues = [Queue(self.guest, size=16, at=BASE + index * 0x1000)
                       for index in range(nqueues)]
        self.next_desc = [0] * nqueues
        self.data = BASE + 0x100000  # buffers are handed out from here
        setups = [QueueSetup(size=16, ready=True, desc=q.layout.desc, driver=q.layout.avail,
                             device=q.layout.used) for q in self.queues]
        features = VIRTIO_F_VERSION_1 | (VIRTIO_CONSOLE_F_MULTIPORT if multiport else 0)
        with device_lock(self.device.shared):
            assert self.device.activate(features, setups) == 0
        self.ctrl_seen = 0
        self.rx_seen = {0: 0, 1: 0}

    def alloc(self, length: int) -> int:
        addr = self.data
        self.data += (length + 63) & ~63
        return addr

    # The balloon rig's driver side works on the same attributes (queues, next_desc, kicks).
    post = BalloonRig.post
    wait_used = BalloonRig.wait_used

    def give_ctrl_buffers(self, count: int) -> None:
        self.ctrl_buffers = getattr(self, "ctrl_buffers", {})
        for _ in range(count):
            addr = self.alloc(128)
            index = self.next_desc[CTRL_RX] % 16
            self.ctrl_buffers[index] = addr
            self.post(CTRL_RX, [(addr, 128, F_WRITE)])

    def send(self, port: int, event: int, value: int) -> None:
        addr = self.alloc(CONTROL.size)
        self.guest.write(addr, CONTROL.pack(port, event, value))
        before = self.queues[CTRL_TX].used_idx()
        self.post(CTRL_TX, [(addr, CONTROL.size, 0)])
        self.wait_used(CTRL_TX, before + 1)

    def messages(self, count: int) -> list[tuple[int, int, int, bytes]]:
        """The next `count` control messages the device sent."""
        self.wait_used(CTRL_RX, self.ctrl_seen + count)
        result = []
        for _ in range(count):
            head, length = self.queues[CTRL_RX].used_elem(self.ctrl_seen % 16)
            self.ctrl_seen += 1
            raw = self.guest.read(self.ctrl_buffers[head], length)
            result.append((*CONTROL.unpack_from(raw), raw[CONTROL.size:]))
        return result

    def no_more_messages(self) -> bool:
        time.sleep(0.05)
        return self.queues[CTRL_RX].used_idx() == self.ctrl_seen

    def write(self, port: int, data: bytes, split: int | None = None) -> None:
        addr = self.alloc(len(data))
        self.guest.write(addr, data)
        pieces = [(addr, len(data), 0)] if split is None else [
            (addr, split, 0), (addr + split, len(data) - split, 0)]
        before = self.queues[TX[port]].used_idx()
        self.post(TX[port], pieces)
        self.wait_used(TX[port], before + 1)

    def give_rx_buffer(self, port: int, length: int) -> int:
        addr = self.alloc(length)
        self.post(RX[port], [(addr, length, F_WRITE)])
        return addr

    def received(self, port: int, addr: int) -> bytes:
        self.rx_seen[port] += 1
        self.wait_used(RX[port], self.rx_seen[port])
        _, length = self.queues[RX[port]].used_elem((self.rx_seen[port] - 1) % 16)
        return self.guest.read(addr, length)

    def connect(self, port: int) -> socket.socket:
        """A client appears, as SocketChardev publishes it to the port's direct writer."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        output = self.device.port_output(port)
        output.set_ready(False)
        output.attach(ours.fileno(), True)
        output.set_ready(True)
        self._sockets = [*getattr(self, "_sockets", []), ours]
        return theirs

    def disconnect(self, port: int) -> None:
        output = self.device.port_output(port)
        output.set_ready(False)
        output.attach(-1, False)

    def handshake(self) -> None:
        self.give_ctrl_buffers(8)
        self.send(0, DEVICE_READY, 1)
        assert self.messages(2) == [(0, PORT_ADD, 1, b""), (1, PORT_ADD, 1, b"")]

    def close(self) -> None:
        self.iothread.stop()
        self.device.close()
        for fd in self.fds:
            os.close(fd)
        for sock in getattr(self, "_sockets", []):
            sock.close()
        assert self.guest.guards_intact()


@pytest.fixture
def rig():
    r = ConsoleRig()
    yield r
    r.close()


def read_exactly(sock: socket.socket, length: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def test_config_space_features_and_queues(rig):
    assert rig.device.device_id == 3
    assert rig.device.device_features() == VIRTIO_CONSOLE_F_MULTIPORT
    assert rig.device.read_config(4, 4) == 2  # max_nr_ports: ports 0 and 1
    assert rig.device.read_config(0, 4) == 0  # no size given
    assert len(rig.device.queue_max_sizes) == 6 == queue_count(2)


def test_multiport_handshake(rig):
    rig.handshake()
    client = rig.connect(0)  # port 0's backend has a client; port 1's has none
    rig.send(0, PORT_READY, 1)
    assert rig.messages(2) == [(0, CONSOLE_PORT, 1, b""), (0, PORT_OPEN, 1, b"")]
    rig.send(1, PORT_READY, 1)
    assert rig.messages(1) == [(1, PORT_NAME, 1, PORT1_NAME.encode())]
    assert rig.no_more_messages()  # no PORT_OPEN for port 1: nobody is connected
    rig.send(1, PORT_OPEN, 1)
    assert rig.device.port_state(1)["guest_open"] == 1
    client.close()


def test_a_second_device_ready_adds_no_port_twice(rig):
    rig.handshake()
    rig.send(0, DEVICE_READY, 1)
    assert rig.no_more_messages()


def test_messages_wait_for_control_buffers():
    rig = ConsoleRig()
    try:
        rig.send(0, DEVICE_READY, 1)  # no control receive buffer yet
        assert rig.queues[CTRL_RX].used_idx() == 0
        rig.give_ctrl_buffers(1)
        assert rig.messages(1) == [(0, PORT_ADD, 1, b"")]
        rig.give_ctrl_buffers(1)
        assert rig.messages(1) == [(1, PORT_ADD, 1, b"")]
    finally:
        rig.close()


def test_port_open_follows_the_client(rig):
    rig.handshake()
    rig.send(0, PORT_READY, 1)
    assert rig.messages(1) == [(0, CONSOLE_PORT, 1, b"")]  # nobody connected yet
    first = rig.connect(0)
    assert rig.messages(1) == [(0, PORT_OPEN, 1, b"")]
    rig.disconnect(0)
    first.close()
    assert rig.messages(1) == [(0, PORT_OPEN, 0, b"")]
    second = rig.connect(0)
    assert rig.messages(1) == [(0, PORT_OPEN, 1, b"")]
    assert rig.device.port_state(0)["host_open"] == 1
    second.close()


def test_output_goes_to_the_backend_in_order(rig):
    client = rig.connect(0)
    rig.write(0, b"hello, ", split=3)
    rig.write(0, b"world\n")
    assert read_exactly(client, 13) == b"hello, world\n"
    assert rig.queues[TX[0]].used_elem(0)[1] == 0  # nothing written into guest memory
    state = rig.device.port_state(0)
    assert state["tx_bytes"] == state["written_bytes"] == 13 and state["dropped_bytes"] == 0
    client.close()


def test_output_while_nobody_is_connected_goes_to_the_next_client(rig):
    first = rig.connect(0)
    rig.write(0, b"one\n")
    assert read_exactly(first, 4) == b"one\n"
    rig.disconnect(0)
    first.close()
    rig.write(0, b"while away\n")
    assert rig.device.port_state(0)["out_len"] == 11
    second = rig.connect(0)
    rig.write(0, b"two\n")
    assert read_exactly(second, 15) == b"while away\ntwo\n"
    second.close()


def test_output_beyond_the_bound_is_dropped_and_counted(rig):
    for _ in range(5):
        rig.write(0, bytes(range(256)) * 64)  # 16 KiB each, nobody connected
    state = rig.device.port_state(0)
    assert state["out_len"] == OUT_BYTES
    assert state["dropped_bytes"] == 5 * 16384 - OUT_BYTES
    client = rig.connect(0)
    assert read_exactly(client, OUT_BYTES) == bytes(range(256)) * 256  # the oldest 64 KiB
    client.close()


def test_a_client_that_does_not_read_never_blocks_the_device(rig):
    client = rig.connect(0)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    start = time.monotonic()
    for _ in range(64):
        rig.write(0, b"x" * 16384)  # 1 MiB: far more than the socket and the buffer hold
    assert time.monotonic() - start < 5
    state = rig.device.port_state(0)
    assert state["dropped_bytes"] > 0
    assert state["written_bytes"] + state["out_len"] + state["dropped_bytes"] == 64 * 16384
    # Once the client reads, what was buffered follows (the I/O thread waits for room).
    got = 0
    client.settimeout(5)
    expected = state["written_bytes"] + state["out_len"]
    while got < expected:
        got += len(client.recv(1 << 16))
    assert got == expected
    client.close()


def test_a_port_without_a_backend_discards(rig):
    output = rig.device.port_output(1)
    rig.device.c.ports[1].keep_when_detached = 0  # as for a chardev with nowhere to write
    output.attach(-1, False)
    output.set_ready(True)
    rig.write(1, b"lost")
    state = rig.device.port_state(1)
    assert state["dropped_bytes"] == 4 and state["out_len"] == 0


def test_input_reaches_the_guest_per_chunk(rig):
    assert rig.device.port_input(1, b"early ") == 6  # no receive buffer yet: kept
    addr = rig.give_rx_buffer(1, 64)
    time.sleep(0.05)
    assert rig.queues[RX[1]].used_idx() == 0  # the port is not open in the guest: it waits
    rig.send(1, PORT_OPEN, 1)
    assert rig.received(1, addr) == b"early "
    addr = rig.give_rx_buffer(1, 4)
    assert rig.device.port_input(1, b"abcdefgh") == 8
    assert rig.received(1, addr) == b"abcd"
    addr = rig.give_rx_buffer(1, 64)
    assert rig.received(1, addr) == b"efgh"
    assert rig.device.port_state(1)["rx_bytes"] == 14


def test_input_waits_while_the_guest_has_the_port_closed(rig):
    rig.send(1, PORT_OPEN, 1)
    addr = rig.give_rx_buffer(1, 64)
    rig.device.port_input(1, b"one")
    assert rig.received(1, addr) == b"one"
    rig.send(1, PORT_OPEN, 0)
    addr = rig.give_rx_buffer(1, 64)
    rig.device.port_input(1, b"two")
    time.sleep(0.05)
    assert rig.device.port_state(1)["in_len"] == 3 and rig.queues[RX[1]].used_idx() == 1
    rig.send(1, PORT_OPEN, 1)
    assert rig.received(1, addr) == b"two"


def test_without_multiport_port_0_still_works():
    rig = ConsoleRig(multiport=False)
    try:
        client = rig.connect(0)
        rig.write(0, b"single\n")
        assert read_exactly(client, 7) == b"single\n"
        addr = rig.give_rx_buffer(0, 16)
        rig.device.port_input(0, b"in")
        assert rig.received(0, addr) == b"in"
        assert not rig.device.c.multiport
        client.close()
    finally:
        rig.close()


def test_odd_chains_and_messages_are_survived(rig):
    rig.handshake()
    for port, event in ((7, PORT_READY), (0xFFFFFFFF, PORT_OPEN), (1, 99), (2, PORT_READY)):
        rig.send(port, event, 1)  # ports that do not exist, an unknown event
    assert rig.no_more_messages()
    short, before = rig.alloc(4), rig.queues[CTRL_TX].used_idx()
    rig.post(CTRL_TX, [(short, 4, 0)])  # shorter than a message: ignored
    rig.wait_used(CTRL_TX, before + 1)
    assert rig.no_more_messages()
    # A receive buffer the device may not write and a transmit buffer it may.
    rig.send(1, PORT_OPEN, 1)
    readonly = rig.alloc(16)
    rig.guest.write(readonly, b"R" * 16)
    rig.post(RX[1], [(readonly, 16, 0)])
    rig.device.port_input(1, b"data")
    rig.wait_used(RX[1], 1)
    assert rig.queues[RX[1]].used_elem(0) == (0, 0)
    assert rig.guest.read(readonly, 16) == b"R" * 16
    assert rig.device.port_state(1)["in_len"] == 4  # kept for a buffer it may write
    writable = rig.alloc(16)
    rig.post(TX[1], [(writable, 16, F_WRITE)])
    rig.wait_used(TX[1], 1)
    assert not rig.device.shared.broken
    assert rig.device.port_state(1)["tx_bytes"] == 0


def test_a_broken_control_chain_breaks_the_device(rig):
    rig.post(CTRL_TX, [(0xDEAD0000, 8, 0)])  # outside guest RAM
    deadline = time.monotonic() + 5
    while not rig.device.shared.broken:
        assert time.monotonic() < deadline
        time.sleep(0.001)


# Command line.

CONSOLE = ["-kernel", "k", "-device", "virtio-serial-device",
           "-chardev", "socket,id=c0,path=/tmp/c0.sock,server,nowait"]


def test_cli_console_and_serial_port():
    config = parse_args([*CONSOLE, "-device", "virtconsole,id=con0,chardev=c0",
                         "-chardev", "file,id=f1,path=/tmp/p1",
                         "-device", "virtserialport,id=p1,chardev=f1,nr=2,name=org.x"])
    assert config.virtio_serial == VirtioSerialConfig(ports=(
        ConsolePortConfig("con0", "c0", 0, None, True),
        ConsolePortConfig("p1", "f1", 2, "org.x", False)))
    assert ChardevConfig("c0", SerialKind.SOCKET, "/tmp/c0.sock") in config.chardevs


@pytest.mark.parametrize(("args", "message"), [
    (["-device", "virtconsole,id=con0,chardev=nope"], "no -chardev with id 'nope'"),
    (["-device", "virtconsole,id=con0,chardev=c0,nr=1"], "the console port is nr=0"),
    (["-device", "virtserialport,id=p,chardev=c0"], "nr=<1..> is required"),
    (["-device", "virtserialport,id=p,chardev=c0,nr=0"], "nr must be at least 1"),
    (["-device", "virtserialport,id=p,chardev=c0,nr=3"], "out of range"),
    (["-device", "virtconsole,id=a,chardev=c0", "-chardev", "stdio,id=s",
      "-device", "virtconsole,id=b,chardev=s"], "nr=0 is already taken by 'a'"),
    (["-device", "virtio-serial-device"], "only one virtio-serial device"),
    (["-device", "virtconsole,id=a,chardev=c0", "-chardev", "stdio,id=s",
      "-device", "virtserialport,id=b,chardev=c0,nr=1"], "already used by another device"),
    (["-device", "virtconsole,chardev=c0"], "'id' is required"),
    (["-device", "virtconsole,id=a,chardev=c0,speed=9"], "unknown parameter 'speed'"),
])
def test_cli_console_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([*CONSOLE, *args])


def test_cli_port_without_a_serial_device():
    with pytest.raises(ConfigError, match="no virtio-serial device"):
        parse_args(["-kernel", "k", "-chardev", "stdio,id=s",
                    "-device", "virtconsole,id=con0,chardev=s"])


def test_cli_chardev_used_by_the_uart_and_a_port():
    with pytest.raises(ConfigError, match="already used by another device"):
        parse_args([*CONSOLE, "-serial", "chardev:c0", "-device", "virtconsole,id=a,chardev=c0"])


# Legacy JSON (-config).

def test_json_console_is_a_virtconsole_on_a_socket(tmp_path):
    config = parse_json_config({"boot-source": {"kernel_image_path": "k"},
                                "console": [{"console_id": "charconsole0",
                                             "socket_path": "/tmp/con.sock"}]}).validate()
    assert config.chardevs == (ChardevConfig("charconsole0", SerialKind.SOCKET,
                                             "/tmp/con.sock"),)
    assert config.virtio_serial == VirtioSerialConfig(ports=(
        ConsolePortConfig("charconsole0", "charconsole0", 0, None, True),))
    # A -chardev on the command line keeps the JSON console's.
    path = tmp_path / "vm.json"
    path.write_text('{"console": [{"console_id": "c", "socket_path": "/tmp/c.sock"}]}')
    config = parse_args(["-config", str(path), "-kernel", "k",
                         "-chardev", "socket,id=other,path=/tmp/o.sock,server,nowait"])
    assert [chardev.id for chardev in config.chardevs] == ["c", "other"]


@pytest.mark.parametrize(("console", "message"), [
    ([{"console_id": "a", "socket_path": "/a"}, {"console_id": "b", "socket_path": "/b"}],
     "only one console"),
    ([{"console_id": "a"}], "lacks 'socket_path'"),
    ([{"console_id": "a", "socket_path": "/a", "speed": 1}], "unknown field"),
    ([{"console_id": 1, "socket_path": "/a"}], "wrong type"),
    ({"console_id": "a", "socket_path": "/a"}, "wrong type"),
])
def test_json_console_errors(console, message):
    with pytest.raises(ConfigError, match=message):
        parse_json_config({"console": console})
