"""cffi (API mode) build script for the KVM bindings.

Struct layouts and ioctl numbers come from the kernel's <linux/kvm.h> at
compile time: every struct below is declared partial (`...;`), so cffi asks the
C compiler for the real offsets instead of trusting this file.
"""

import os
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent

CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[4];
};

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_cpuid_entry2 {
    __u32 function, index, flags, eax, ebx, ecx, edx;
    ...;
};

struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_pit_config {
    __u32 flags;
    ...;
};

struct kvm_irq_level {
    __u32 irq;
    __u32 level;
    ...;
};

struct kvm_msr_entry {
    __u32 index;
    __u64 data;
    ...;
};

struct kvm_msrs {
    __u32 nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};

struct kvm_mp_state {
    __u32 mp_state;
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    ...;
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    ...;
};

/* kvm_run's exit data is an anonymous union; each member used here gets a
   typedef name in the C source (via __typeof__) and its offset in kvm_run. */
typedef struct { __u8 direction; __u8 size; __u16 port; __u32 count;
                 __u64 data_offset; ...; } kvm_run_io_t;
typedef struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write;
                 ...; } kvm_run_mmio_t;
typedef struct { __u32 suberror; __u32 ndata; __u64 data[16]; ...; } kvm_run_internal_t;
typedef struct { __u64 hardware_entry_failure_reason; __u32 cpu; ...; } kvm_run_fail_entry_t;
typedef struct { __u64 hardware_exit_reason; ...; } kvm_run_hw_t;
typedef struct { __u32 type; __u32 ndata; ...; } kvm_run_system_event_t;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    ...;
};

static const size_t SVPY_KVM_RUN_EXIT_DATA_OFFSET;

#define KVM_API_VERSION ...
#define KVM_NR_INTERRUPTS ...

#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IOEVENTFD ...
#define KVM_IRQFD ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_SET_MSRS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...

#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_DEASSIGN ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...

#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...

#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_MP_STATE_RUNNABLE ...

long svpy_ioctl_ptr(int fd, unsigned long request, void *arg);
long svpy_ioctl_int(int fd, unsigned long request, unsigned long arg);
void *svpy_map_guest_ram(size_t size, int dump_core, int *err);
int svpy_unmap(void *addr, size_t size);
int svpy_discard(void *addr, size_t size);
int svpy_install_kick_handler(int signo);
void svpy_host_cpuid(uint32_t function, uint32_t index, uint32_t regs[4]);
"""

SOURCE_PRELUDE = """
#include <stddef.h>
#include <linux/kvm.h>
#include "kvm_helpers.h"

#define KVM_RUN_MEMBER_TYPE(member) __typeof__(((struct kvm_run *)0)->member)
typedef KVM_RUN_MEMBER_TYPE(io) kvm_run_io_t;
typedef KVM_RUN_MEMBER_TYPE(mmio) kvm_run_mmio_t;
typedef KVM_RUN_MEMBER_TYPE(internal) kvm_run_internal_t;
typedef KVM_RUN_MEMBER_TYPE(fail_entry) kvm_run_fail_entry_t;
typedef KVM_RUN_MEMBER_TYPE(hw) kvm_run_hw_t;
typedef KVM_RUN_MEMBER_TYPE(system_event) kvm_run_system_event_t;

/* Every union member starts at the same offset. */
static const size_t SVPY_KVM_RUN_EXIT_DATA_OFFSET = offsetof(struct kvm_run, io);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF.replace("__s32", "int32_t"))
ffibuilder.set_source(
    "stratovirt_py.kvm._kvm_cffi",
    SOURCE_PRELUDE,
    # setuptools insists on paths relative to the project root.
    sources=[os.path.relpath(CSRC / "kvm_helpers.c")],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-Wall", "-Wextra", "-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(CSRC.parent / "build" / "cffi"), verbose=False)
