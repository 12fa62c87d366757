/*
 * Port I/O, MMIO accessors, barriers and a few CPU instructions.
 *
 * Port I/O helpers take (value, port) like Linux's outb().  MMIO helpers take an
 * identity-mapped guest-physical address (both entry paths map 0..4 GiB 1:1).
 */
#ifndef SVTEST_IO_H
#define SVTEST_IO_H

#include <stdint.h>

/* Compiler-only barrier. */
#define barrier() __asm__ __volatile__("" ::: "memory")

/*
 * Full memory barrier: a locked no-op on the stack, as Linux's smp_mb() on x86_64.
 * (MFENCE works too, also under KVM's instruction emulator on the kvm_pvm host.)
 */
static inline void mb(void)
{
    __asm__ __volatile__("lock; orl $0, (%%rsp)" ::: "memory", "cc");
}

static inline void outb(uint8_t value, uint16_t port)
{
    __asm__ __volatile__("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outw(uint16_t value, uint16_t port)
{
    __asm__ __volatile__("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(uint32_t value, uint16_t port)
{
    __asm__ __volatile__("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ __volatile__("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t value;
    __asm__ __volatile__("inw %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t value;
    __asm__ __volatile__("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint8_t mmio_read8(uintptr_t addr)
{
    return *(volatile uint8_t *)addr;
}

static inline uint16_t mmio_read16(uintptr_t addr)
{
    return *(volatile uint16_t *)addr;
}

static inline uint32_t mmio_read32(uintptr_t addr)
{
    return *(volatile uint32_t *)addr;
}

static inline uint64_t mmio_read64(uintptr_t addr)
{
    return *(volatile uint64_t *)addr;
}

static inline void mmio_write8(uintptr_t addr, uint8_t value)
{
    *(volatile uint8_t *)addr = value;
}

static inline void mmio_write16(uintptr_t addr, uint16_t value)
{
    *(volatile uint16_t *)addr = value;
}

static inline void mmio_write32(uintptr_t addr, uint32_t value)
{
    *(volatile uint32_t *)addr = value;
}

static inline void mmio_write64(uintptr_t addr, uint64_t value)
{
    *(volatile uint64_t *)addr = value;
}

struct cpuid_regs {
    uint32_t eax, ebx, ecx, edx;
};

static inline struct cpuid_regs cpuid(uint32_t leaf, uint32_t subleaf)
{
    struct cpuid_regs r;
    __asm__ __volatile__("cpuid"
                         : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
                         : "a"(leaf), "c"(subleaf));
    return r;
}

/*
 * Busy-waits for n iterations of a two-instruction loop (sub; jnz), so that the
 * instruction count, and the time on an emulating host, does not depend on the
 * compiler.  n == 0 does nothing.
 */
static inline void spin_delay(uint64_t n)
{
    if (n)
        __asm__ __volatile__("1: subq $1, %0; jnz 1b" : "+r"(n) : : "cc");
}

static inline void cli(void)
{
    __asm__ __volatile__("cli" ::: "memory");
}

static inline void hlt(void)
{
    __asm__ __volatile__("hlt" ::: "memory");
}

#endif
