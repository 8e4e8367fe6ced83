"""The emulated ARMv8 board (unicorn): `Armv8Machine` implements livemig's Machine contract."""

from livemig.arm.devices import UART_BASE
from livemig.arm.loader import CMDLINE_ADDR, RAM_BASE
from livemig.arm.machine import CPU_MODEL, MAX_VCPUS, Armv8Machine
from livemig.arm.memory import ArmMemory

__all__ = [
    "Armv8Machine",
    "ArmMemory",
    "CPU_MODEL",
    "MAX_VCPUS",
    "RAM_BASE",
    "UART_BASE",
    "CMDLINE_ADDR",
]
