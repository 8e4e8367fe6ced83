"""`livemig bench net`: clients outside the guest measure a migration of `netserve`."""

from __future__ import annotations

# What QEMU's -cpu model is probed with: netserve stops without a NIC (a NIC with no peer
# will do: the probe only waits for heartbeats).
PROBE_NIC = ["-device", "virtio-net-pci"]


def qemu_nic_args(tap: str, mac: str) -> list[str]:
    """QEMU options for the NIC livemig gives `--net tap=TAP,mac=MAC`: virtio-net-pci on an
    existing TAP, no scripts."""
    return ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
