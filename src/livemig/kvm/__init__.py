"""Typed ctypes bindings for the Linux KVM API (x86-64): what livemig's machine needs."""

from livemig.kvm.errors import KvmError, KvmUnavailable, KvmUnsupported
from livemig.kvm.structs import ExitReason, KvmRegs, KvmSregs, MpState
from livemig.kvm.system import Kvm, Vcpu, Vm

__all__ = [
    "ExitReason", "Kvm", "KvmError", "KvmRegs", "KvmSregs", "KvmUnavailable", "KvmUnsupported",
    "MpState", "Vcpu", "Vm",
]
