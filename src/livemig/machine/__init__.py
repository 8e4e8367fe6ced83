"""The x86-64 machine on KVM: RAM, vCPU threads, devices, multiboot loader, state capture."""

from livemig.machine.machine import KvmMachine
from livemig.machine.vcpu import install_kick_handler as prepare_process

__all__ = ["KvmMachine", "prepare_process"]
