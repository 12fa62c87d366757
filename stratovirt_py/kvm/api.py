"""Kvm (the /dev/kvm system fd), Vm and Vcpu: thin, typed wrappers over ioctls.

Every failing ioctl raises KvmError naming the ioctl and the errno, so a
message such as "KVM_CREATE_VM failed: Permission denied (errno 13)" reaches
the user instead of a bare OSError.  cffi releases the GIL around each call, so
vCPU threads blocked in KVM_RUN do not hold up the rest of the monitor.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from stratovirt_py.kvm._kvm_cffi import ffi, lib

KVM_DEVICE = "/dev/kvm"
MAX_CPUID_ENTRIES = 256


class KvmError(OSError):
    """A KVM ioctl (or the open of /dev/kvm) failed."""

    def __init__(self, operation: str, err: int) -> None:
        super().__init__(err, f"{operation} failed: {os.strerror(err)} (errno {err})")
        self.operation = operation

    def __str__(self) -> str:
        return str(self.strerror)


def _check(operation: str, ret: int) -> int:
    if ret < 0:
        raise KvmError(operation, -ret)
    return ret


def _ioctl(fd: int, name: str, arg: Any = ffi.NULL) -> int:
    return _check(name, lib.svpy_ioctl_ptr(fd, getattr(lib, name), arg))


def _ioctl_int(fd: int, name: str, arg: int = 0) -> int:
    return _check(name, lib.svpy_ioctl_int(fd, getattr(lib, name), arg))


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def host_cpuid(function: int, index: int = 0) -> CpuidEntry:
    """CPUID leaf `function`, subleaf `index`, as the host CPU itself answers it."""
    regs = ffi.new("uint32_t[4]")
    lib.svpy_host_cpuid(function, index, regs)
    return CpuidEntry(function, index, 0, regs[0], regs[1], regs[2], regs[3])


class Kvm:
    """The KVM system handle."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or errno.EIO) from None
        version = _ioctl_int(self.fd, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"KVM API version {version} (want {lib.KVM_API_VERSION})", errno.EINVAL)

    def check_extension(self, cap: int) -> int:
        return _ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    def vcpu_mmap_size(self) -> int:
        return _ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry]:
        # The flexible array needs real storage behind it.
        storage = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                          + MAX_CPUID_ENTRIES * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", storage)
        cpuid.nent = MAX_CPUID_ENTRIES
        _ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))
        ]

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl_int(self.fd, "KVM_CREATE_VM", 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A KVM virtual machine."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return _ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               host_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": size, "userspace_addr": host_addr,
        })
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("__u64 *", addr)
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", value)

    def create_irqchip(self) -> None:
        _ioctl_int(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, "KVM_CREATE_PIT2", config)

    def set_irq_line(self, irq: int, level: int) -> None:
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        _ioctl(self.fd, "KVM_IRQ_LINE", line)

    def register_ioeventfd(self, eventfd: int, addr: int, length: int,
                           datamatch: int | None = None, pio: bool = False,
                           deassign: bool = False) -> None:
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length,
            "fd": eventfd, "flags": flags,
        })
        _ioctl(self.fd, "KVM_IOEVENTFD", request)

    def register_irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        request = ffi.new("struct kvm_irqfd *", {
            "fd": eventfd, "gsi": gsi,
            "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0,
        })
        _ioctl(self.fd, "KVM_IRQFD", request)

    def create_vcpu(self, vcpu_id: int, index: int | None = None) -> Vcpu:
        """A vCPU with KVM id `vcpu_id`, which on x86 is its initial (LAPIC) APIC id.

        `index` is the monitor's own number for it (its place in -smp order, as
        QMP shows it); it defaults to the id.
        """
        fd = _ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        return Vcpu(self, vcpu_id if index is None else index, vcpu_id, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A KVM virtual CPU and its shared kvm_run page."""

    def __init__(self, vm: Vm, index: int, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.vcpu_id = vcpu_id
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size()
        self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_base = ffi.from_buffer(self._run_map)
        self.run_state = ffi.cast("struct kvm_run *", self._run_base)
        exit_data = self._run_base + lib.SVPY_KVM_RUN_EXIT_DATA_OFFSET
        self.io = ffi.cast("kvm_run_io_t *", exit_data)
        self.mmio = ffi.cast("kvm_run_mmio_t *", exit_data)
        self.internal = ffi.cast("kvm_run_internal_t *", exit_data)
        self.fail_entry = ffi.cast("kvm_run_fail_entry_t *", exit_data)
        self.hw = ffi.cast("kvm_run_hw_t *", exit_data)
        self.system_event = ffi.cast("kvm_run_system_event_t *", exit_data)

    def run_page(self, offset: int, length: int) -> memoryview:
        """Bytes of the kvm_run page, e.g. port I/O data at io.data_offset."""
        return memoryview(self._run_map)[offset:offset + length]

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: Any) -> None:
        _ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        _ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        storage = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                          + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", storage)
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            slot = cpuid.entries[i]
            slot.function, slot.index, slot.flags = entry.function, entry.index, entry.flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
        _ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def set_msrs(self, msrs: dict[int, int]) -> None:
        storage = ffi.new("char[]", ffi.sizeof("struct kvm_msrs")
                          + len(msrs) * ffi.sizeof("struct kvm_msr_entry"))
        request = ffi.cast("struct kvm_msrs *", storage)
        request.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            request.entries[i].index = index
            request.entries[i].data = value
        written = _ioctl(self.fd, "KVM_SET_MSRS", request)
        if written != len(msrs):
            failed = list(msrs)[written]
            raise KvmError(f"KVM_SET_MSRS (MSR {failed:#x})", errno.EINVAL)

    def get_lapic(self) -> Any:
        state = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, "KVM_GET_LAPIC", state)
        return state

    def set_lapic(self, state: Any) -> None:
        _ioctl(self.fd, "KVM_SET_LAPIC", state)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, "KVM_GET_MP_STATE", state)
        return int(state.mp_state)

    def close(self) -> None:
        if self.fd >= 0:
            self._run_base = None
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1
