"""virtio-console (virtio 1.x §5.3) with multiport: a console port (hvc0) and serial ports.

Guest output is copied to each port's chardev by the C data plane
(csrc/dataplane/virtio_console.c) on the I/O thread, non-blocking, with a
bounded buffer; Python never sees it.  Host input comes from the chardev's
reader thread one chunk at a time and is handed to C, which copies it into
the guest's receive buffers.  Here: features, config space (max_nr_ports),
and the glue between chardevs and ports: a chardev's direct writer is the
port's output, so a socket client coming and going moves the port's fd and
sends PORT_OPEN to the guest.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

from stratovirt_py._dataplane import ffi, lib
from stratovirt_py.config import VirtioSerialConfig
from stratovirt_py.devices.chardev import Chardev, SocketChardev
from stratovirt_py.devices.virtio.dataplane import DeviceWiring, device_lock
from stratovirt_py.devices.virtio.mmio import QueueSetup, activate_ready_queues, read_config_bytes

DEVICE_ID_CONSOLE = 3
QUEUE_MAX_SIZE = 256
VIRTIO_CONSOLE_F_MULTIPORT = 1 << lib.VIRTIO_CONSOLE_F_MULTIPORT
# struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr.
CONFIG_LAYOUT = struct.Struct("<HHII")
INPUT_RETRY_SECONDS = 0.01  # input waits this long for the guest to take earlier input


def queue_count(max_nr_ports: int) -> int:
    """Port 0's two queues, the control pair, then two per further port."""
    return 2 * (max_nr_ports + 1)


class VirtioConsole:
    device_id = DEVICE_ID_CONSOLE

    def __init__(self, name: str, wiring: DeviceWiring, config: VirtioSerialConfig,
                 keep_output: frozenset[int] = frozenset()) -> None:
        """`keep_output`: ports whose output waits for a backend that is not there yet."""
        self.name = name
        self.config = config
        self.max_nr_ports = max((port.nr for port in config.ports), default=0) + 1
        self.queue_max_sizes = (QUEUE_MAX_SIZE,) * queue_count(self.max_nr_ports)
        self._c_memory = wiring.c_memory
        self.c = ffi.new("struct svpy_console *")
        ret = lib.svpy_console_init(self.c, wiring.c_memory, wiring.irqfd, wiring.error_fd,
                                    wiring.c_kick_fds, self.max_nr_ports)
        if ret < 0:
            raise OSError(-ret, f"{name}: cannot initialise the device")
        ret = lib.svpy_console_attach(self.c, wiring.iothread.handle)
        if ret < 0:
            raise OSError(-ret, f"{name}: cannot watch its notifiers")
        self.shared = ffi.addressof(self.c.dev, "shared")
        for port in config.ports:
            name_arg = port.name.encode() if port.name else ffi.NULL
            ret = lib.svpy_console_add_port(self.c, port.nr, int(port.is_console),
                                            int(port.nr in keep_output), name_arg)
            if ret < 0:
                raise OSError(-ret, f"{name}: cannot add port {port.nr}")

    # VirtioDevice.

    def device_features(self) -> int:
        return VIRTIO_CONSOLE_F_MULTIPORT

    def config_bytes(self) -> bytes:
        return CONFIG_LAYOUT.pack(0, 0, self.max_nr_ports, 0)

    def read_config(self, offset: int, size: int) -> int:
        return read_config_bytes(self.config_bytes(), offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, not offered

    def activate(self, features: int, queues: list[QueueSetup]) -> int:
        multiport = bool(features & VIRTIO_CONSOLE_F_MULTIPORT)
        used = len(queues) if multiport else 2  # without multiport: port 0 only
        error = activate_ready_queues(
            ((ffi.addressof(self.c, "vqs", index), queues[index]) for index in range(used)),
            features, QUEUE_MAX_SIZE, self._c_memory)
        if error:
            return error
        lib.svpy_console_start(self.c, int(multiport))
        return 0

    def reset(self) -> None:
        lib.svpy_console_stop(self.c)

    def close(self) -> None:
        lib.svpy_console_destroy(self.c)

    # Ports.

    def port_input(self, nr: int, data: bytes, stopped: threading.Event | None = None) -> int:
        """Gives host input to port nr, waiting (per chunk) while the guest has not taken
        earlier input; returns the bytes given (fewer only when `stopped` is set)."""
        view = memoryview(data)
        given = 0
        while view:
            buffer = ffi.from_buffer("uint8_t[]", view)
            with device_lock(self.shared):
                taken = lib.svpy_console_input(self.c, nr, buffer, len(view))
            given += taken
            view = view[taken:]
            if view and (stopped is None or stopped.wait(INPUT_RETRY_SECONDS)):
                break
        return given

    def port_output(self, nr: int) -> PortOutput:
        return PortOutput(self, nr)

    def port_state(self, nr: int) -> dict[str, int]:
        """The port's state and counters (tests, query commands)."""
        with device_lock(self.shared):
            port = self.c.ports[nr]
            counters = port.counters
            state = {name: int(getattr(port, name)) for name in (
                "guest_ready", "guest_open", "host_open", "fd", "out_len", "in_len")}
            state.update({name: int(getattr(counters, name)) for name in (
                "tx_bytes", "written_bytes", "dropped_bytes", "rx_bytes", "write_errors")})
        return state


class PortOutput:
    """The direct writer (output_sink.DirectWriter) a chardev drives for one port."""

    def __init__(self, device: VirtioConsole, nr: int) -> None:
        self._device = device
        self._nr = nr

    def attach(self, fd: int, is_socket: bool) -> None:
        with device_lock(self._device.shared):
            lib.svpy_console_port_attach(self._device.c, self._nr, fd, int(is_socket))

    def set_ready(self, ready: bool) -> None:
        # Under the device lock: once it returns, no write to the old fd is in flight.
        with device_lock(self._device.shared):
            lib.svpy_console_port_set_ready(self._device.c, self._nr, int(ready))


class VirtioSerial:
    """The console device's ports and their chardevs (the builder's: it closes them)."""

    def __init__(self, config: VirtioSerialConfig, chardevs: dict[str, Chardev]) -> None:
        self.config = config
        self.chardevs = {port.nr: chardevs[port.chardev] for port in config.ports}
        self.device: VirtioConsole | None = None
        self._stopped = threading.Event()

    def keep_output(self) -> frozenset[int]:
        """Ports whose backend comes and goes (a socket): output waits for the next one."""
        return frozenset(nr for nr, chardev in self.chardevs.items()
                         if isinstance(chardev, SocketChardev))

    def make_device(self, wiring: DeviceWiring) -> VirtioConsole:
        self.device = VirtioConsole("console", wiring, self.config, self.keep_output())
        for nr, chardev in self.chardevs.items():
            chardev.set_direct_writer(self.device.port_output(nr))
        return self.device

    def start(self, request_quit: Callable[[], None]) -> None:
        for nr, chardev in self.chardevs.items():
            chardev.start(self._input_sink(nr), request_quit)

    def _input_sink(self, nr: int) -> Callable[[bytes], Any]:
        def sink(data: bytes) -> None:
            if self.device is not None:
                self.device.port_input(nr, data, self._stopped)
        return sink

    def stop(self) -> None:
        """Input stops waiting for the guest (before the chardevs close)."""
        self._stopped.set()
