"""x86_64 microvm platform: memory map, boot protocol, MP table, CPUID, registers."""
