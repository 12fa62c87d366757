"""Typed wrappers over the KVM ioctls the monitor uses: system, VM and vCPU objects."""

from stratovirt_py.kvm.api import Kvm, KvmError, Vcpu, Vm, ffi, lib

__all__ = ["Kvm", "KvmError", "Vcpu", "Vm", "ffi", "lib"]
