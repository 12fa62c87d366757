"""Kernel image loading into guest memory (no KVM needed)."""

import struct

import pytest

from stratovirt_py.arch.x86_64.loader import load_initrd, load_kernel
from stratovirt_py.errors import BootError
from stratovirt_py.memory import GuestMemory, GuestMemoryError
from tests.helpers import elf_image

MiB = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory(128 * MiB)
    yield mem
    mem.close()


def test_elf_segments_land_at_their_physical_addresses(memory, tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(elf_image([(0x200000, b"\x90\xf4", 0x3000), (0x400000, b"data", 4)],
                               entry=0x200000))
    kernel = load_kernel(memory, str(path))
    assert kernel.entry == 0x200000 and kernel.end == 0x400004
    assert kernel.setup_header is None
    assert memory.read(0x200000, 2) == b"\x90\xf4"
    assert memory.read(0x400000, 4) == b"data"


def test_bzimage_protected_mode_part_goes_to_1mib(memory, tmp_path):
    image = bytearray(5 * 512 + 64)
    image[0x1F1] = 4  # setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x201] = 0x6A  # header ends at 0x26C
    struct.pack_into("<I", image, 0x202, 0x53726448)
    struct.pack_into("<H", image, 0x206, 0x020F)
    image[0x236] = 1  # XLF_KERNEL_64
    struct.pack_into("<I", image, 0x260, 0x10000)  # init_size
    image[5 * 512:5 * 512 + 4] = b"KERN"
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(image))
    kernel = load_kernel(memory, str(path))
    assert kernel.entry == 0x100200
    assert memory.read(0x100000, 4) == b"KERN"
    assert kernel.setup_header == bytes(image[0x1F1:0x26C])


def test_old_bzimage_protocol_is_refused(memory, tmp_path):
    image = bytearray(4096)
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    struct.pack_into("<I", image, 0x202, 0x53726448)
    struct.pack_into("<H", image, 0x206, 0x0204)
    path = tmp_path / "old"
    path.write_bytes(bytes(image))
    with pytest.raises(BootError, match=r"2\.12 or newer"):
        load_kernel(memory, str(path))


@pytest.mark.parametrize(("content", "message"), [
    (b"MZ not a kernel" * 100, "neither an ELF vmlinux nor a bzImage"),
    (b"\x7fELF\x01\x01", "truncated ELF"),
    (b"", "neither"),
])
def test_bad_kernels(memory, tmp_path, content, message):
    path = tmp_path / "kernel"
    path.write_bytes(content)
    with pytest.raises(BootError, match=message):
        load_kernel(memory, str(path))


def test_elf_segment_outside_ram_is_refused(memory, tmp_path):
    path = tmp_path / "big"
    path.write_bytes(elf_image([(200 * MiB, b"x", 1)], entry=200 * MiB))
    with pytest.raises(BootError, match="does not fit in guest memory"):
        load_kernel(memory, str(path))


def test_elf_for_another_machine_is_refused(memory, tmp_path):
    image = bytearray(elf_image([(0x200000, b"x", 1)], entry=0x200000))
    image[18] = 183  # EM_AARCH64
    path = tmp_path / "arm"
    path.write_bytes(bytes(image))
    with pytest.raises(BootError, match="not a 64-bit x86 ELF"):
        load_kernel(memory, str(path))


def test_missing_kernel_and_initrd(memory, tmp_path):
    with pytest.raises(BootError, match=r"cannot read kernel .*No such file"):
        load_kernel(memory, str(tmp_path / "nope"))
    path = tmp_path / "vmlinux"
    path.write_bytes(elf_image([(0x200000, b"x", 1)], entry=0x200000))
    kernel = load_kernel(memory, str(path))
    with pytest.raises(BootError, match="cannot read initrd"):
        load_initrd(memory, str(tmp_path / "nope"), kernel)


def test_initrd_is_copied_below_the_limit(memory, tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(elf_image([(0x200000, b"x", 1)], entry=0x200000))
    kernel = load_kernel(memory, str(path))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"070701" + bytes(5000))
    addr, size = load_initrd(memory, str(initrd), kernel)
    assert size == 5006 and addr % 4096 == 0 and addr + size <= 128 * MiB
    assert memory.read(addr, 6) == b"070701"


def test_guest_memory_bounds_are_enforced(memory):
    memory.write(128 * MiB - 4, b"abcd")
    with pytest.raises(GuestMemoryError):
        memory.write(128 * MiB - 2, b"abcd")
    with pytest.raises(GuestMemoryError):
        memory.read(-1, 2)
    assert not memory.contains(128 * MiB) and memory.contains(0, 128 * MiB)
