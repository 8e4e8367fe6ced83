"""Errors of the KVM bindings: each says which operation failed and why."""

from __future__ import annotations

import errno
import os


class KvmError(OSError):
    """A KVM ioctl or device operation failed; str() names the operation and the reason."""

    def __init__(self, op: str, err: int, hint: str = "") -> None:
        reason = os.strerror(err) if err else "failed"
        msg = f"{op}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(err, msg)
        self.op = op

    def __str__(self) -> str:
        return str(self.args[1])


class KvmUnavailable(KvmError):
    """/dev/kvm is missing, not permitted, or speaks an unknown API version."""


class KvmUnsupported(KvmError):
    """The host kernel lacks a capability livemig needs."""

    def __init__(self, capability: str) -> None:
        super().__init__(f"KVM capability {capability}", errno.ENOTSUP,
                         "the host kernel does not support it")
