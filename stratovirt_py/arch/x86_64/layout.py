"""Guest-physical memory map of the x86_64 microvm machine.

Every fixed address the boot loader writes and every device window lives here, so
the map can be read in one place.  Values follow the Linux x86 boot protocol and
StratoVirt's microvm layout.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Low memory: the real-mode IVT/BDA region is left alone; boot structures follow.
GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000  # struct boot_params; RSI points here at entry
BOOT_STACK_TOP = 0x8FF0  # initial RSP/RBP
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories, 0xB000..0xEFFF, map 0..4 GiB
IDENTITY_MAPPED_BYTES = 4 * GiB  # covers RAM below the gap and the MMIO window
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000  # bytes, including the terminating NUL
EBDA_START = 0x9FC00  # MP floating pointer and MP table live here
LOW_RAM_END = EBDA_START  # first e820 RAM entry is [0, EBDA_START)
BIOS_AREA_START = 0xF0000
HIGH_MEMORY_START = 0x100000  # 1 MiB: bzImage protected-mode code goes here
INITRD_ADDR_MAX = 0x37FFFFFF  # highest byte an initrd may use (boot protocol default)

# The 32-bit hole for devices, and RAM that does not fit below it continues at 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
RAM_ABOVE_4G_START = MMIO_GAP_END

# Device windows inside the gap.
VIRTIO_MMIO_BASE = 0xF010_0000
VIRTIO_MMIO_WINDOW = 0x200
KVM_IDENTITY_MAP_ADDR = 0xFEF0_C000  # one page, needed by VMX for real mode
KVM_TSS_ADDR = 0xFEF0_D000  # three pages
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# Legacy I/O ports.
SERIAL_PORT_BASE = 0x3F8
SERIAL_IRQ = 4
I8042_COMMAND_PORT = 0x64  # writing 0xFE here resets (ends) the VM
I8042_RESET_VALUE = 0xFE

# Interrupt lines: the UART keeps 4; virtio-mmio devices take 5..15 in creation order.
VIRTIO_IRQ_BASE = 5
VIRTIO_IRQ_LAST = 15
