"""The x86-64 machine on KVM: RAM, vCPU threads, devices, multiboot loader, state capture."""

from livemig.machine.machine import KvmMachine

__all__ = ["KvmMachine"]
