"""Builds the x86_64 microvm a MachineConfig describes, and hands it to a MicroVM to run.

In order: KVM and its in-kernel irqchip and PIT, guest memory, the devices
(the virtio-mmio slots first, so that the guest names its disks and NICs in
a fixed order, then the UART and the reset line), the kernel, initrd, command
line, zero page and MP table, and the vCPUs with their CPUID and registers.
Nothing here runs the guest: MicroVM (machine.py) does.
"""

from __future__ import annotations

import functools
import logging
import os
import struct

from stratovirt_py.arch.x86_64 import boot_params, layout
from stratovirt_py.arch.x86_64.boot_params import build_zero_page
from stratovirt_py.arch.x86_64.cpu_topology import apic_id, apic_ids
from stratovirt_py.arch.x86_64.cpuid import vcpu_cpuid, with_host_brand
from stratovirt_py.arch.x86_64.e820 import build_e820
from stratovirt_py.arch.x86_64.host_quirks import (
    host_cmdline_additions,
    host_cpuid_adjustments,
    host_is_pvm,
)
from stratovirt_py.arch.x86_64.loader import LoadedKernel, load_initrd, load_kernel
from stratovirt_py.arch.x86_64.mptable import (
    CONFIG_TABLE_ADDR,
    FLOATING_POINTER_ADDR,
    build_mptable,
)
from stratovirt_py.arch.x86_64.registers import (
    setup_entry_regs,
    setup_long_mode_sregs,
    write_boot_tables,
)
from stratovirt_py.backends import BackendRegistry
from stratovirt_py.balloon import Balloon
from stratovirt_py.config import MAX_DISKS, MAX_NICS
from stratovirt_py.devices.bus import Bus
from stratovirt_py.devices.chardev import Chardev, create_chardev
from stratovirt_py.devices.console_fastpath import ConsoleFastPath
from stratovirt_py.devices.i8042 import I8042
from stratovirt_py.devices.serial import Serial
from stratovirt_py.devices.virtio.balloon import QUEUES as BALLOON_QUEUES
from stratovirt_py.devices.virtio.balloon import VirtioBalloon
from stratovirt_py.devices.virtio.block import VirtioBlock
from stratovirt_py.devices.virtio.console import VirtioSerial, queue_count
from stratovirt_py.devices.virtio.dataplane import IoThread, c_guest_memory
from stratovirt_py.devices.virtio.manager import VirtioMmioManager
from stratovirt_py.devices.virtio.net import VirtioNet
from stratovirt_py.devices.virtio.rng import QUEUES as RNG_QUEUES
from stratovirt_py.devices.virtio.rng import VirtioRng, open_rng_source
from stratovirt_py.errors import BootError, MonitorError
from stratovirt_py.hotplug import Hotplug, HotplugError
from stratovirt_py.kvm import Kvm, KvmError, Vcpu, Vm, ffi, lib
from stratovirt_py.machine import ExitRequest, Hardware, MicroVM
from stratovirt_py.memory import GuestMemory
from stratovirt_py.slots import DISK, NIC, Slot, SlotTable
from stratovirt_py.vcpu import install_kick_handler

log = logging.getLogger(__name__)

# Linux x86 keeps at most COMMAND_LINE_SIZE (2048) bytes, NUL included.
KERNEL_CMDLINE_LIMIT = 2048
REQUIRED_CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_IOEVENTFD", "KVM_CAP_IRQFD",
                 "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_PIT2")
LAPIC_LVT0 = 0x350
LAPIC_LVT1 = 0x360
DELIVERY_MODE_EXTINT = 0x7
DELIVERY_MODE_NMI = 0x4


def _nth(threads: list[IoThread], index: int) -> IoThread | None:
    return threads[index] if index < len(threads) else None


def build_vm(machine: MicroVM, is_pvm: bool | None = None) -> None:
    """Builds the VM of `machine.config` and installs it in `machine`."""
    VmBuilder(machine, host_is_pvm() if is_pvm is None else is_pvm).build()


class VmBuilder:
    def __init__(self, machine: MicroVM, is_pvm: bool) -> None:
        self.machine = machine
        self.config = machine.config
        self.is_pvm = is_pvm

    def build(self) -> None:
        config = self.config
        kvm = self._open_kvm()
        vm = kvm.create_vm()
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        memory = GuestMemory(config.memory_size, config.dump_guest_core)
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)

        mmio_bus = Bus("MMIO", unclaimed_log_level=logging.WARNING)
        # The shared I/O thread first, then one per -object iothread.
        iothreads = {name: IoThread() for name in (None, *config.iothreads)}
        virtio = VirtioMmioManager(vm, mmio_bus, c_guest_memory(memory), iothreads[None])
        hotplug = Hotplug(self._add_slots(virtio, iothreads), BackendRegistry())
        self._plug_boot_devices(hotplug)
        balloon = self._add_balloon(virtio, memory.total)
        # Every chardev now: the console's ports use theirs.
        chardevs = self._create_chardevs()
        console = self._add_console(virtio, chardevs)
        try:
            rng = self._add_rng(virtio)
        except BaseException:
            for chardev in chardevs.values():  # sockets made are removed again
                chardev.close()
            raise

        kernel = load_kernel(memory, config.kernel or "")
        initrd = load_initrd(memory, config.initrd, kernel) if config.initrd else None
        cmdline = self._guest_cmdline(virtio)
        self._write_cmdline(memory, kernel, cmdline)
        e820 = build_e820([(r.guest_addr, r.size) for r in memory.regions])
        memory.write(layout.ZERO_PAGE_ADDR,
                     build_zero_page(e820, len(cmdline), kernel.setup_header, initrd))
        pointer, table = build_mptable(apic_ids(config.topology), config.topology.cpus)
        memory.write(FLOATING_POINTER_ADDR, pointer)
        memory.write(CONFIG_TABLE_ADDR, table)
        write_boot_tables(memory)

        pio_bus = Bus("port I/O")
        chardev = chardevs[config.serial_backend().id]
        # Line status reads and plain transmits (one each per byte a console
        # writes) are answered in C, the bytes written there to the backend.
        console_fastpath = ConsoleFastPath(layout.SERIAL_PORT_BASE)
        serial = Serial(chardev.write,
                        lambda level: vm.set_irq_line(layout.SERIAL_IRQ, int(level)),
                        console_fastpath.rx_ready_changed,
                        console_fastpath.thr_passthrough_changed)
        chardev.set_direct_writer(console_fastpath)
        fastpath = virtio.fastpath()
        fastpath.uart = console_fastpath.status
        pio_bus.insert(layout.SERIAL_PORT_BASE, 8, serial)
        pio_bus.insert(0x60, 5, I8042(functools.partial(
            self.machine.request_exit,
            ExitRequest(0, True, "guest-reset", "guest requested a reset"))))

        vcpus = self._create_vcpus(kvm, vm, kernel)
        self.machine.install(Hardware(
            kvm=kvm, vm=vm, memory=memory, vcpus=vcpus, pio_bus=pio_bus, mmio_bus=mmio_bus,
            chardev=chardev, chardevs=list(chardevs.values()), serial=serial, virtio=virtio,
            iothreads=list(iothreads.values()),
            hotplug=hotplug,
            cmdline=cmdline, fastpath=fastpath, console_fastpath=console_fastpath,
            balloon=balloon, console=console, rng=rng))
        log.info("VM '%s' built: %d vCPU(s), %d MiB, kernel %s, cmdline: %s", config.name,
                 config.topology.cpus, config.memory_size >> 20, config.kernel, cmdline)

    def _create_chardevs(self) -> dict[str, Chardev]:
        """Every -chardev, and -serial's own backend unless it names one; by label."""
        configs = list(self.config.chardevs)
        if self.config.serial.chardev is None:
            configs.insert(0, self.config.serial_backend())
        chardevs: dict[str, Chardev] = {}
        try:
            for chardev_config in configs:
                chardevs[chardev_config.id] = create_chardev(chardev_config)
        except BaseException:
            for chardev in chardevs.values():  # sockets made so far are removed again
                chardev.close()
            raise
        return chardevs

    @staticmethod
    def _open_kvm() -> Kvm:
        try:
            kvm = Kvm()
        except KvmError as exc:
            raise MonitorError(f"cannot use KVM: {exc}") from None
        for cap in REQUIRED_CAPS:
            if not kvm.check_extension(getattr(lib, cap)):
                raise MonitorError(f"KVM on this host lacks {cap}")
        return kvm

    def _add_slots(self, virtio: VirtioMmioManager,
                   iothreads: dict[str | None, IoThread]) -> SlotTable:
        """The hot-pluggable slots, first in the virtio-mmio order: six disks, vda..vdf,
        then two NICs, eth0 and eth1.  The command line's devices fill the first slots of
        their kind, in order: a slot whose device names an iothread is served by it."""
        disk_threads = [iothreads[disk.iothread] for disk in self.config.disks]
        nic_threads = [iothreads[nic.iothread] for nic in self.config.nics]
        slots = SlotTable()
        for index in range(MAX_DISKS):
            transport = virtio.add(functools.partial(VirtioBlock, DISK.guest_name(index)),
                                   queues=1, iothread=_nth(disk_threads, index))
            slots.add(Slot(DISK, index, transport.device, transport.notify_config_change))
        # Locally administered (0x52), as QEMU's 52:54:00 prefix; random per VM so that
        # VMs on one bridge differ, and the slot index last so NICs of one VM differ.
        vm_octets = os.urandom(2)
        for index in range(MAX_NICS):
            mac = b"\x52\x54\x00" + vm_octets + bytes([index])
            transport = virtio.add(functools.partial(VirtioNet, NIC.guest_name(index),
                                                     mac=mac), queues=2,
                                   iothread=_nth(nic_threads, index))
            slots.add(Slot(NIC, index, transport.device, transport.notify_config_change))
        return slots

    def _add_balloon(self, virtio: VirtioMmioManager, ram_bytes: int) -> Balloon | None:
        """The balloon, after the slots (IRQ 13), if the configuration has one."""
        config = self.config.balloon
        if config is None:
            return None
        balloon = Balloon(config.id, ram_bytes, self.machine.emit_event, self.machine.loop)
        transport = virtio.add(functools.partial(VirtioBalloon, "balloon", config=config,
                                                 on_actual_change=balloon.on_actual_change),
                               queues=BALLOON_QUEUES)
        balloon.attach(transport.device, transport.notify_config_change)
        return balloon

    # --- virtio-console ---

    def _add_console(self, virtio: VirtioMmioManager,
                     chardevs: dict[str, Chardev]) -> VirtioSerial | None:
        """The virtio-serial device (after the balloon), if the configuration has one."""
        config = self.config.virtio_serial
        if config is None:
            return None
        console = VirtioSerial(config, chardevs)
        max_nr_ports = max((port.nr for port in config.ports), default=0) + 1
        try:
            virtio.add(console.make_device, queues=queue_count(max_nr_ports))
        except BaseException:
            for chardev in chardevs.values():  # sockets made are removed again
                chardev.close()
            raise
        return console

    # --- end virtio-console ---

    def _add_rng(self, virtio: VirtioMmioManager) -> VirtioRng | None:
        """The virtio-rng device, after the balloon (the next window and IRQ), if the
        configuration has one.  An unreadable source is a ConfigError naming it."""
        config = self.config.rng
        if config is None:
            return None
        source_fd = open_rng_source(config)
        try:
            transport = virtio.add(functools.partial(VirtioRng, "rng", config=config,
                                                     source_fd=source_fd), queues=RNG_QUEUES)
        except BaseException:
            os.close(source_fd)
            raise
        assert isinstance(transport.device, VirtioRng)
        return transport.device

    def _plug_boot_devices(self, hotplug: Hotplug) -> None:
        for disk in self.config.disks:
            try:
                hotplug.blockdev_add(disk.drive)
                hotplug.add_disk(disk.id, disk.drive.id, boot=True)
            except HotplugError as exc:
                raise BootError(f"drive '{disk.drive.id}': {exc.desc}") from None
        for nic in self.config.nics:
            try:
                hotplug.netdev_add(nic.netdev)
                hotplug.add_nic(nic.id, nic.netdev.id, mac=nic.mac, boot=True)
            except HotplugError as exc:
                raise BootError(f"netdev '{nic.netdev.id}': {exc.desc}") from None

    def _guest_cmdline(self, virtio: VirtioMmioManager) -> str:
        parts = [self.config.cmdline.strip()]
        extra = host_cmdline_additions(self.config.cmdline, self.is_pvm)
        if extra:
            log.info("kvm_pvm host: adding '%s' to the guest command line", extra)
            parts.append(extra)
        parts.extend(virtio.cmdline_tokens())
        return " ".join(part for part in parts if part)

    @staticmethod
    def _write_cmdline(memory: GuestMemory, kernel: LoadedKernel, cmdline: str) -> None:
        encoded = cmdline.encode()
        limit = KERNEL_CMDLINE_LIMIT
        if kernel.setup_header is not None:
            offset = boot_params.CMDLINE_SIZE - boot_params.SETUP_HEADER
            limit = struct.unpack_from("<I", kernel.setup_header, offset)[0] + 1
        if len(encoded) + 1 > min(limit, layout.CMDLINE_MAX_SIZE):
            raise BootError(f"the guest command line is {len(encoded)} bytes; this kernel "
                            f"accepts at most {limit - 1}")
        memory.write(layout.CMDLINE_ADDR, encoded + b"\0")

    def _create_vcpus(self, kvm: Kvm, vm: Vm, kernel: LoadedKernel) -> list[Vcpu]:
        topology = self.config.topology
        install_kick_handler()
        supported = host_cpuid_adjustments(with_host_brand(kvm.supported_cpuid()), self.is_pvm)
        vcpus = []
        for index in range(topology.cpus):
            # KVM's vCPU id becomes the LAPIC id: it must be the APIC id of the MP table and
            # CPUID (holes for non-power-of-two topologies).  Index 0 has id 0, KVM's BSP.
            vcpu = vm.create_vcpu(apic_id(topology, index), index)
            vcpu.set_cpuid(vcpu_cpuid(supported, topology, index))
            self._setup_lapic(vcpu)
            if index == 0:
                self._setup_boot_vcpu(vcpu, kernel)
            vcpus.append(vcpu)
        return vcpus

    @staticmethod
    def _setup_lapic(vcpu: Vcpu) -> None:
        # LINT0 takes the PIC's ExtINT and LINT1 the NMI, as PC firmware leaves them.
        state = vcpu.get_lapic()
        registers = ffi.buffer(state.regs)
        for offset, mode in ((LAPIC_LVT0, DELIVERY_MODE_EXTINT), (LAPIC_LVT1, DELIVERY_MODE_NMI)):
            value = struct.unpack_from("<I", registers, offset)[0]
            struct.pack_into("<I", registers, offset, (value & ~0x700) | (mode << 8))
        vcpu.set_lapic(state)

    @staticmethod
    def _setup_boot_vcpu(vcpu: Vcpu, kernel: LoadedKernel) -> None:
        sregs = vcpu.get_sregs()
        setup_long_mode_sregs(sregs)
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        setup_entry_regs(regs, kernel.entry)
        vcpu.set_regs(regs)
