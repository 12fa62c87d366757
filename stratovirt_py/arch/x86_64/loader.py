"""Kernel and initrd loading for the 64-bit direct boot.

Two kernel formats: an uncompressed ELF64 vmlinux (segments placed at their
physical addresses, entered at e_entry) and a bzImage (protected-mode part at
1 MiB, entered at its 64-bit entry point 0x200 bytes in).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from stratovirt_py.arch.x86_64 import boot_params as bp
from stratovirt_py.arch.x86_64 import layout
from stratovirt_py.errors import BootError
from stratovirt_py.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
# The 64-bit boot protocol (xloadflags, 64-bit entry) arrived with version 2.12.
MIN_BZIMAGE_PROTOCOL = 0x020C
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200


@dataclass(frozen=True)
class LoadedKernel:
    entry: int
    end: int  # first guest address after the kernel image
    setup_header: bytes | None  # bzImage only: to be copied into the zero page


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise BootError(f"cannot read {what} '{path}': {exc.strerror}") from None


def _place(memory: GuestMemory, addr: int, data: bytes | memoryview, what: str,
           span: int | None = None) -> None:
    span = len(data) if span is None else span
    if addr < layout.HIGH_MEMORY_START:
        raise BootError(f"{what} would load at {addr:#x}, below 1 MiB where the boot structures "
                        f"live: this is not a kernel for a 64-bit direct boot")
    if not memory.contains(addr, max(span, 1)):
        raise BootError(f"{what} does not fit in guest memory at {addr:#x} (+{span:#x} bytes): "
                        f"give the VM more memory")
    memory.write(addr, data)


def load_elf(memory: GuestMemory, image: bytes, path: str) -> LoadedKernel:
    if len(image) < ELF64_HEADER.size:
        raise BootError(f"kernel '{path}' is a truncated ELF file")
    (ident, _type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = ELF64_HEADER.unpack_from(image)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise BootError(f"kernel '{path}' is not a 64-bit x86 ELF image")
    if phentsize != ELF64_PHDR.size or phoff + phnum * phentsize > len(image):
        raise BootError(f"kernel '{path}' has a malformed ELF program header table")
    view = memoryview(image)
    end = 0
    loaded = 0
    for index in range(phnum):
        (p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz,
         _align) = ELF64_PHDR.unpack_from(image, phoff + index * phentsize)
        if p_type != PT_LOAD:
            continue
        if p_offset + p_filesz > len(image) or p_filesz > p_memsz:
            raise BootError(f"kernel '{path}' has a malformed ELF segment {index}")
        # Guest RAM starts zeroed, so only the file part needs copying (bss is free).
        _place(memory, p_paddr, view[p_offset:p_offset + p_filesz], f"kernel segment {index}",
               span=p_memsz)
        end = max(end, p_paddr + p_memsz)
        loaded += 1
    if not loaded:
        raise BootError(f"kernel '{path}' has no loadable ELF segments")
    if not memory.contains(entry):
        raise BootError(f"kernel '{path}' has its entry point {entry:#x} outside guest memory")
    return LoadedKernel(entry=entry, end=end, setup_header=None)


def load_bzimage(memory: GuestMemory, image: bytes, path: str) -> LoadedKernel:
    version = struct.unpack_from("<H", image, bp.VERSION)[0]
    if version < MIN_BZIMAGE_PROTOCOL:
        raise BootError(f"kernel '{path}' uses boot protocol {version >> 8}.{version & 0xFF}; "
                        f"2.12 or newer is needed for a 64-bit boot")
    if not image[bp.XLOADFLAGS] & bp.XLF_KERNEL_64:
        raise BootError(f"kernel '{path}' has no 64-bit entry point (xloadflags)")
    setup_sects = image[bp.SETUP_SECTS] or 4  # 0 means 4, for historical reasons
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(image):
        raise BootError(f"kernel '{path}' is a truncated bzImage")
    header = bytes(image[bp.SETUP_HEADER:bp.SETUP_HEADER + bp.setup_header_length(image)])
    load_addr = layout.HIGH_MEMORY_START
    payload = memoryview(image)[kernel_offset:]
    # init_size is what the kernel needs in place to decompress itself.
    init_size = struct.unpack_from("<I", image, 0x260)[0]
    _place(memory, load_addr, payload, "kernel", span=max(len(payload), init_size))
    return LoadedKernel(entry=load_addr + BZIMAGE_64BIT_ENTRY_OFFSET,
                        end=load_addr + max(len(payload), init_size), setup_header=header)


def is_bzimage(image: bytes) -> bool:
    return (len(image) > 0x264
            and struct.unpack_from("<H", image, bp.BOOT_FLAG)[0] == bp.BOOT_FLAG_MAGIC
            and struct.unpack_from("<I", image, bp.HEADER_MAGIC)[0] == bp.HDRS_MAGIC)


def load_kernel(memory: GuestMemory, path: str) -> LoadedKernel:
    image = read_file(path, "kernel")
    if image.startswith(ELF_MAGIC):
        return load_elf(memory, image, path)
    if is_bzimage(image):
        return load_bzimage(memory, image, path)
    raise BootError(f"kernel '{path}' is neither an ELF vmlinux nor a bzImage")


def initrd_address(size: int, ram_end_below_gap: int, kernel_end: int,
                   addr_max: int = layout.INITRD_ADDR_MAX) -> int:
    """Highest page-aligned address where `size` bytes fit below the boot protocol limit."""
    top = min(addr_max + 1, ram_end_below_gap)
    addr = (top - size) & ~0xFFF
    if addr < kernel_end or size > top:
        raise BootError(f"initrd of {size} bytes does not fit in guest memory below "
                        f"{top:#x}: give the VM more memory")
    return addr


def load_initrd(memory: GuestMemory, path: str, kernel: LoadedKernel) -> tuple[int, int]:
    """Places the initrd; returns (guest address, size)."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BootError(f"cannot read initrd '{path}': {exc.strerror}") from None
    addr_max = layout.INITRD_ADDR_MAX
    if kernel.setup_header is not None:
        # A bzImage states its own limit in the header.
        offset = bp.INITRD_ADDR_MAX - bp.SETUP_HEADER
        addr_max = struct.unpack_from("<I", kernel.setup_header, offset)[0] or addr_max
    addr = initrd_address(size, memory.ram_end_below_gap(), kernel.end, addr_max)
    data = read_file(path, "initrd")
    if len(data) != size:
        raise BootError(f"initrd '{path}' changed while being read")
    memory.write(addr, data)
    return addr, size
