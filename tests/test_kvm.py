"""The KVM bindings: errors say what failed and why; structure sizes match linux/kvm.h."""

from __future__ import annotations

import ctypes
import errno

import pytest
from conftest import needs_kvm

from livemig.kvm import Kvm, KvmError, KvmRegs, KvmSregs, KvmUnavailable
from livemig.kvm import ioctl as K
from livemig.kvm.structs import KvmRun


def test_missing_device_is_explained(tmp_path) -> None:
    with pytest.raises(KvmUnavailable, match="not available"):
        Kvm(str(tmp_path / "kvm"))


def test_structure_sizes_match_the_kernel() -> None:
    assert ctypes.sizeof(KvmRegs) == 144
    assert ctypes.sizeof(KvmSregs) == 312
    assert KvmRun.exit.offset == 32
    assert K.KVM_RUN == 0xAE80
    assert K.KVM_GET_REGS == 0x8090AE81
    assert K.KVM_SET_USER_MEMORY_REGION == 0x4020AE46


@needs_kvm
def test_system_queries_and_failed_ioctl_message() -> None:
    kvm = Kvm()
    try:
        assert kvm.vcpu_mmap_size >= 4096
        assert any(e.function == 0 for e in kvm.supported_cpuid())
        assert 0x10 in kvm.msr_index_list()  # IA32_TSC
        vm = kvm.create_vm()
        with pytest.raises(KvmError, match="KVM_SET_TSS_ADDR") as info:
            vm.set_tss_addr(0xFFFF_F000_0000)  # above 4 GiB: refused
        assert info.value.errno in (errno.EINVAL, errno.EEXIST, errno.ENOMEM)
        vm.close()
    finally:
        kvm.close()
