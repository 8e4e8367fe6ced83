"""The guest-visible gap: the largest pause between probe heartbeats across the migration."""

from __future__ import annotations

from livemig.probe import ProbeKind, ProbeLog


def guest_gap_ms(source: ProbeLog, since: float, first_dest: float | None) -> float | None:
    """Largest gap between consecutive heartbeats from the last one before `since` (wall time,
    the migration's start) at the source, then
    from the source's last heartbeat to the destination's first (`first_dest`, wall time).

    None when the guest sent no heartbeat at the source or none arrived at the destination.
    Across hosts the figure is only as good as the two clocks' agreement.
    """
    beats = [e.time for e in source.events(ProbeKind.HEARTBEAT)]
    before = [t for t in beats if t < since]
    times = before[-1:] + [t for t in beats if t >= since]
    if not times or first_dest is None:
        return None
    times.append(first_dest)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return max(gaps) * 1000 if gaps else None
