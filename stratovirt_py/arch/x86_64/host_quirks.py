"""Guest command-line and CPUID changes that only some KVM hosts need.

On kvm_pvm (a software hypervisor, see the README's "Hosts" section) guest
ring-0 code goes through KVM's instruction emulator, which lacks several
instructions, and the guest sees the host's CPUID unfiltered.  The guest
kernel is told not to use those features.  On VMX/SVM hosts nothing changes.
"""

from __future__ import annotations

import dataclasses
import os

from stratovirt_py.kvm.api import CpuidEntry

PVM_MODULE = "/sys/module/kvm_pvm"
# Features whose instructions the emulator cannot run (CLAC, POPCNT, CMPXCHG16B,
# XSAVE/XRSTOR; host-kvm.md items 2 and 3), and ERMS/FSRM, whose fast string
# copies it runs slowly.
PVM_CLEARED_CPU_FEATURES = ("smap", "smep", "popcnt", "cx16", "xsave", "xsaves", "xsaveopt",
                            "erms", "fsrm")
# noint3selftest: skip the INT3 self-test the emulator cannot run (a parameter of
# the project's kernel patch; other kernels ignore it).  vdso32=0: 32-bit user
# space makes its system calls with INT $0x80, the one path that works there.
PVM_CMDLINE = "noint3selftest vdso32=0 clearcpuid=" + ",".join(PVM_CLEARED_CPU_FEATURES)


def host_is_pvm(module_path: str = PVM_MODULE) -> bool:
    return os.path.isdir(module_path)


def host_cmdline_additions(user_cmdline: str, is_pvm: bool) -> str:
    """Extra guest arguments for this host; the user's own clearcpuid= wins."""
    if not is_pvm or "clearcpuid=" in user_cmdline:
        return ""
    return PVM_CMDLINE


LEAF_KVM_FEATURES = 0x4000_0001
# A vCPU that sends IPIs with this hypercall never returns from it on kvm_pvm:
# Linux's AP bring-up hangs there (the AP in VMCALL, the BSP on a lock it
# holds).  Without it, Linux sends IPIs through the local APIC, which works.
KVM_FEATURE_PV_SEND_IPI = 1 << 11


def host_cpuid_adjustments(entries: list[CpuidEntry], is_pvm: bool) -> list[CpuidEntry]:
    """KVM's paravirtual features the guest must not use on this host."""
    if not is_pvm:
        return entries
    return [dataclasses.replace(entry, eax=entry.eax & ~KVM_FEATURE_PV_SEND_IPI)
            if entry.function == LEAF_KVM_FEATURES else entry for entry in entries]
