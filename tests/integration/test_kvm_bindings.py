"""The cffi KVM bindings against the real /dev/kvm."""

import pytest

from stratovirt_py.kvm import Kvm, KvmError, lib

pytestmark = pytest.mark.kvm


def test_vm_and_vcpu_objects():
    kvm = Kvm()
    assert kvm.check_extension(lib.KVM_CAP_IRQCHIP)
    assert kvm.vcpu_mmap_size() >= 4096
    assert any(entry.function == 0 for entry in kvm.supported_cpuid())
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(sregs)
    assert vcpu.get_regs().rflags & 2
    vcpu.close()
    vm.close()
    kvm.close()


def test_a_failing_ioctl_names_itself_and_the_errno():
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as error:
            # A size that is not a multiple of the page size is refused by KVM.
            vm.set_user_memory_region(0, 0, 1000, 0x1000)
        assert str(error.value) == (
            "KVM_SET_USER_MEMORY_REGION failed: Invalid argument (errno 22)")
        assert error.value.errno == 22
        with pytest.raises(KvmError, match=r"^KVM_CREATE_VCPU failed: .*\(errno \d+\)$"):
            vm.create_vcpu(1 << 20)
    finally:
        vm.close()
        kvm.close()
