"""A host TAP device (`/dev/net/tun`): Ethernet frames in and out of the host's network stack.

The device is opened by name (created if it does not exist, which needs CAP_NET_ADMIN; a
persistent TAP made by `ip tuntap add` is attached to), without the packet-information
header, non-blocking.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct

from livemig.contract import ConfigError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_FRAME = 65550
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


class TapError(ConfigError):
    """A TAP device cannot be opened or used; the message says which and why."""


def parse_mac(text: str) -> bytes:
    """Six bytes from `52:54:00:12:34:56`; ConfigError if malformed or multicast."""
    if not _MAC.match(text):
        raise ConfigError(f"malformed MAC address {text!r}: expected six hex bytes such as "
                          "52:54:00:12:34:56")
    mac = bytes(int(b, 16) for b in text.split(":"))
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text} is a multicast address; a NIC needs a unicast one")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Tap:
    """An open TAP device: `read()` one frame (None when there is none), `write(frame)`."""

    def __init__(self, name: str) -> None:
        if not _NAME.match(name):
            raise TapError(f"TAP name {name!r} is not a network interface name (1-15 of "
                           "letters, digits, '_', '.', '-')")
        self.name = name
        try:
            self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"cannot open TAP {name}: {_why(e)}") from e
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(self.fd)
            raise TapError(f"cannot open TAP {name}: {_why(e)}") from e

    def read(self) -> bytes | None:
        try:
            return os.read(self.fd, MAX_FRAME)
        except BlockingIOError:
            return None

    def write(self, frame: bytes) -> bool:
        """Send one frame to the host; False when the host side dropped it (queue full,
        interface down)."""
        try:
            os.write(self.fd, frame)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _why(e: OSError) -> str:
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENODEV:
        return f"{TUN_PATH} does not exist on this host (no TUN/TAP support)"
    if e.errno in (errno.EPERM, errno.EACCES):
        return "permission denied (needs root or CAP_NET_ADMIN, or a TAP owned by this user)"
    if e.errno == errno.EBUSY:
        return "it is in use by another process"
    if e.errno == errno.EINVAL:
        return "an interface of that name exists and is not a TAP"
    return e.strerror or str(e)
