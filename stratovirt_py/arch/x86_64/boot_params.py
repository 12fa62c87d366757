"""The Linux zero page (struct boot_params) and its setup header.

Offsets follow Documentation/arch/x86/boot.rst and zero-page.rst of the Linux
kernel.  Only the fields a 64-bit direct boot needs are written.
"""

from __future__ import annotations

import struct

from stratovirt_py.arch.x86_64 import layout
from stratovirt_py.arch.x86_64.e820 import E820_MAX_ENTRIES_ZEROPAGE, E820Entry

ZERO_PAGE_SIZE = 4096

# Offsets inside struct boot_params.
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SETUP_HEADER = 0x1F1
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
HEADER_MAGIC = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20

BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
LOADER_TYPE_UNDEFINED = 0xFF
LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01


def setup_header_length(image: bytes) -> int:
    """Bytes of the setup header in a bzImage: it ends at 0x202 + the byte at 0x201."""
    return 0x202 + image[0x201] - SETUP_HEADER


def build_zero_page(
    e820: list[E820Entry],
    cmdline_length: int,
    setup_header: bytes | None = None,
    initrd: tuple[int, int] | None = None,
) -> bytearray:
    """Builds the zero page.

    `setup_header` is the header copied from a bzImage (None for an ELF kernel,
    which gets a minimal header of our own).  `cmdline_length` excludes the NUL.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError("too many e820 entries")
    page = bytearray(ZERO_PAGE_SIZE)
    if setup_header is not None:
        page[SETUP_HEADER:SETUP_HEADER + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", page, BOOT_FLAG, BOOT_FLAG_MAGIC)
        struct.pack_into("<I", page, HEADER_MAGIC, HDRS_MAGIC)
        struct.pack_into("<I", page, KERNEL_ALIGNMENT, 0x0100_0000)
    page[TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    page[LOADFLAGS] |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP
    # Heap end is relative to the real-mode code, which a direct boot never runs.
    struct.pack_into("<H", page, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", page, CMD_LINE_PTR, layout.CMDLINE_ADDR)
    struct.pack_into("<I", page, CMDLINE_SIZE, cmdline_length)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<I", page, RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
        struct.pack_into("<I", page, RAMDISK_SIZE, size & 0xFFFF_FFFF)
        struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", page, EXT_RAMDISK_SIZE, size >> 32)
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        struct.pack_into("<QQI", page, E820_TABLE + index * E820_ENTRY_SIZE,
                         entry.addr, entry.size, entry.type)
    return page
