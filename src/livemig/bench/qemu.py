"""QEMU's own live migration on the same guest image as livemig: the baseline.

Two ``qemu-system-x86_64`` processes run on loopback: a source that boots the guest image and a
destination started with ``-incoming defer``. Both are driven through QMP with the
``qemu.qmp`` library (its asyncio ``QMPClient`` runs on a private event-loop thread and is used
synchronously here). The guest's serial port is not a file but a unix socket that this module
listens on, so every line is stamped with host time on arrival; heartbeat lines
(``<workload> hb N``) give the guest-visible gap around the switch-over and prove that the guest
keeps running on the destination.

Both run the same ``-cpu`` model, picked once per process by `probe_cpu_model`: the first of
`CPU_CANDIDATES` under which QEMU actually boots the guest image (``-cpu host`` dies on some
nested-KVM hosts with "failed to set MSR 0x10a"). The result names it (``cpu_model``).

Figures come from ``query-migrate`` on the source and use livemig's key names (see
`QemuMigrationResult.to_dict`). Processes, sockets and temporary files are always cleaned up,
also on exceptions and KeyboardInterrupt.

Example::

    cfg = QemuMigrationConfig(image="guests/build/hotset.elf", cmdline="wss=100M", mem="1G")
    print(run_qemu_migration(cfg).to_dict())
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

T = TypeVar("T")

QEMU_BINARY = "qemu-system-x86_64"
QEMU_DEFAULT_DOWNTIME_MS = 300
HEARTBEAT_RE = re.compile(rb"^\s*(\w+) hb (\d+)\s*$")
FINAL_STATES = ("completed", "failed", "cancelled")
# What libvirt sets for "no limit" (INT64_MAX MiB/s in bytes, rounded): far above any link.
UNLIMITED_BANDWIDTH = 1 << 62
# -cpu models tried in order: the host's CPU; the same without IA32_ARCH_CAPABILITIES (MSR
# 0x10a, which nested KVM on AMD may refuse); QEMU's "max" likewise; the plain 64-bit model.
CPU_CANDIDATES: tuple[str, ...] = ("host", "host,-arch-capabilities", "max,-arch-capabilities",
                                   "qemu64")
CPU_PROBE_TIMEOUT_S = 10.0


class QemuError(RuntimeError):
    """QEMU could not be started, driven or migrated; the message is meant for the user."""


class QemuUnsupportedError(QemuError):
    """This QEMU build lacks a feature the configuration asks for (e.g. multifd zstd)."""


class QemuNotFoundError(QemuError):
    """``qemu-system-x86_64`` (or the binary asked for) is not installed or not executable."""


def find_qemu(binary: str | None = None) -> str:
    """Return the path of the QEMU binary, or raise `QemuNotFoundError` with a clear message."""
    name = binary or os.environ.get("LIVEMIG_QEMU", QEMU_BINARY)
    path = shutil.which(name)
    if path is None:
        raise QemuNotFoundError(
            f"{name} not found: install QEMU (e.g. `apt-get install qemu-system-x86`) "
            "or set LIVEMIG_QEMU to its path"
        )
    return path


def kvm_available() -> bool:
    """True when /dev/kvm exists and can be opened read-write."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def mem_arg(mem: str | int) -> str:
    """QEMU ``-m`` value: a size string as is ("1G", "256M"), or bytes rounded to MiB."""
    if isinstance(mem, int):
        return f"{max(1, mem >> 20)}M"
    return mem


# --------------------------------------------------------------------------------------------
# Serial capture
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SerialLine:
    """One complete line from the guest's serial port, stamped with host monotonic time."""

    time: float
    text: bytes


class SerialCapture:
    """Listens on a unix socket that QEMU's serial chardev connects to; records lines.

    Each complete line is stamped with ``time.monotonic()`` when its newline arrives, appended
    to `lines`, and written (raw) to ``log_path``.
    """

    def __init__(self, sock_path: Path, log_path: Path) -> None:
        self.sock_path = sock_path
        self.log_path = log_path
        self.lines: list[SerialLine] = []
        self._cond = threading.Condition()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(sock_path))
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"serial:{sock_path.name}",
                                        daemon=True)
        self._thread.start()

    def chardev_arg(self, chardev_id: str) -> str:
        """The ``-chardev`` option that makes QEMU connect to this capture."""
        return f"socket,id={chardev_id},path={self.sock_path}"

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        self._conn = conn
        buf = b""
        with open(self.log_path, "wb") as log:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                now = time.monotonic()
                log.write(data)
                buf += data
                *complete, buf = buf.split(b"\n")
                if complete:
                    with self._cond:
                        self.lines.extend(SerialLine(now, ln.rstrip(b"\r")) for ln in complete)
                        self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def heartbeats(self) -> list[tuple[float, int]]:
        """(host time, counter) of every heartbeat line received so far."""
        with self._cond:
            lines = list(self.lines)
        out = []
        for ln in lines:
            m = HEARTBEAT_RE.match(ln.text)
            if m:
                out.append((ln.time, int(m.group(2))))
        return out

    def wait_heartbeats(self, count: int, timeout: float, since: float = 0.0,
                        alive: Callable[[], bool] | None = None) -> bool:
        """Wait until ``count`` heartbeats stamped at or after ``since`` have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            if sum(1 for t, _ in self.heartbeats() if t >= since) >= count:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (alive is not None and not alive()):
                return False
            with self._cond:
                self._cond.wait(min(remaining, 0.1))

    def text(self) -> str:
        """Everything received so far, decoded leniently (for error messages)."""
        with self._cond:
            return "\n".join(ln.text.decode(errors="replace") for ln in self.lines)

    def close(self) -> None:
        """Stop listening and close the connection; the reader thread ends."""
        for s in (self._conn, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self._thread.join(timeout=2)


# --------------------------------------------------------------------------------------------
# QMP, synchronously
# --------------------------------------------------------------------------------------------


class QmpSync:
    """A `qemu.qmp.QMPClient` used from synchronous code through a private event-loop thread."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp:{name}",
                                        daemon=True)
        self._thread.start()
        self._client = QMPClient(name)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def connect(self, path: Path, timeout: float = 10.0,
                alive: Callable[[], bool] | None = None) -> None:
        """Connect to QEMU's QMP unix socket, retrying until it appears or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if path.exists():
                try:
                    self._run(self._client.connect(str(path)), timeout=5.0)
                    return
                except (QMPError, OSError):
                    pass
            if alive is not None and not alive():
                raise QemuError("QEMU exited before its QMP socket was ready")
            if time.monotonic() > deadline:
                raise QemuError(f"no QMP connection on {path} after {timeout:.0f} s")
            time.sleep(0.05)

    def cmd(self, name: str, timeout: float = 30.0, **args: Any) -> Any:
        """Execute one QMP command and return its value; errors raise `QemuError`."""
        try:
            return self._run(self._client.execute(name, args or None), timeout)
        except QMPError as e:
            raise QemuError(f"QMP {name} failed: {e}") from e

    def events(self) -> list[dict[str, Any]]:
        """Every QMP event received since the last call (``event``, ``timestamp``, ``data``)."""
        async def take() -> list[dict[str, Any]]:
            return [dict(m) for m in self._client.events.clear()]
        return self._run(take(), timeout=5.0)

    def close(self) -> None:
        """Disconnect (ignoring errors) and stop the loop thread."""
        with contextlib.suppress(BaseException):
            self._run(self._client.disconnect(), timeout=2.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            self._loop.close()


# --------------------------------------------------------------------------------------------
# One QEMU process
# --------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: the child is killed if the thread that started it dies (PR_SET_PDEATHSIG).

    It also dumps no core: a CPU model that the host refuses makes QEMU abort.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    with contextlib.suppress(Exception):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class QemuProcess:
    """One qemu-system-x86_64 process with its QMP client and serial capture."""

    def __init__(self, name: str, workdir: Path, argv: list[str]) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.serial = SerialCapture(workdir / f"{name}.serial.sock",
                                    workdir / f"{name}.serial.log")
        self.stderr_path = workdir / f"{name}.stderr"
        self.argv = argv + [
            "-chardev", self.serial.chardev_arg("ser0"), "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QmpSync(name)

    def start(self) -> None:
        """Launch QEMU and connect QMP; raises `QemuError` with QEMU's stderr on failure."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        try:
            self.qmp.connect(self.qmp_path, alive=self.alive)
        except QemuError as e:
            raise QemuError(f"{self.name}: {e}\n{self.stderr_tail()}") from e

    def alive(self) -> bool:
        """True while the QEMU process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, n: int = 2000) -> str:
        """The end of QEMU's stdout/stderr, for error messages."""
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop QMP, terminate (then kill) QEMU, stop the serial capture. Never raises."""
        with contextlib.suppress(BaseException):
            self.qmp.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    self.proc.kill()
                self.proc.wait(timeout=3)
        with contextlib.suppress(BaseException):
            self.serial.close()


# --------------------------------------------------------------------------------------------
# Migration
# --------------------------------------------------------------------------------------------


@dataclass
class QemuMigrationConfig:
    """What to migrate and how. ``None`` parameters keep QEMU's defaults."""

    image: str
    cmdline: str = ""
    mem: str | int = "1G"
    smp: int = 1
    downtime_limit_ms: int | None = None  # QEMU default: 300 ms
    # bytes/s. QEMU's own default throttles migration to 32 MiB/s; like libvirt, the baseline
    # lifts it (UNLIMITED_BANDWIDTH) so that QEMU uses the link as livemig does. None keeps
    # QEMU's default.
    max_bandwidth: int | None = UNLIMITED_BANDWIDTH
    auto_converge: bool = False
    # multifd (QEMU's parallel page channels) with this many channels, on both sides; None: off.
    multifd_channels: int | None = None
    # multifd-compression on both sides ("zstd", "zlib"); implies multifd (channels: the
    # multifd_channels above, else QEMU's default). A build without it: `QemuUnsupportedError`.
    multifd_compression: str | None = None
    xbzrle_cache_size: int | None = None  # bytes; turns the xbzrle capability on
    # Post-copy (postcopy-ram on both sides, postcopy-blocktime on the destination): None: off;
    # 0: `migrate-start-postcopy` right after `migrate`; N: once N pre-copy rounds are done
    # (ram.dirty-sync-count reaches N + 1: QEMU counts a sync at setup). QEMU still completes
    # as pre-copy when what is left fits the downtime limit before it switches; the result's
    # ``mode`` says which happened.
    postcopy_after: int | None = None
    # x-ignore-shared on both sides: RAM on a shared memory backend (in extra_args) is not
    # sent (QEMU's same-host migration, the baseline of livemig's handover).
    ignore_shared: bool = False
    # Commands the source / destination QEMU run under (e.g. `ip netns exec NS`), and the
    # address the destination listens on (the destination namespace's, then).
    src_prefix: list[str] = field(default_factory=list)
    dst_prefix: list[str] = field(default_factory=list)
    listen_host: str = "127.0.0.1"
    warmup_heartbeats: int = 3
    settle_heartbeats: int = 3
    boot_timeout_s: float = 30.0
    migrate_timeout_s: float = 300.0
    poll_interval_s: float = 0.01
    qemu_binary: str | None = None
    # -cpu model for both sides; None: $LIVEMIG_QEMU_CPU, else the first that boots the guest.
    cpu_model: str | None = None
    log_dir: str | None = None  # keep serial logs and QEMU stderr here; else a temp dir
    extra_args: list[str] = field(default_factory=list)
    dst_args: list[str] = field(default_factory=list)  # the destination's only (-mem-prealloc)
    # Called once the guest is warm, just before `migrate` (clients start there), and once
    # the destination settled, before both QEMUs are stopped (clients finish there).
    before_migrate: Callable[[], None] | None = None
    after_migrate: Callable[[], None] | None = None


@dataclass
class QemuMigrationResult:
    """QEMU's figures for one migration, in livemig's vocabulary.

    From the source's final ``query-migrate``: ``total_ms`` = total-time, ``downtime_ms`` =
    downtime (QEMU's own figure: source stop to destination start), ``setup_ms`` = setup-time,
    ``rounds`` = ram.dirty-sync-count (QEMU counts its first sync at setup and the final one in
    stop-and-copy), ``bytes_sent`` = ram.transferred (RAM stream; device state is not counted),
    ``pages_raw`` / ``pages_zero`` = ram.normal / ram.duplicate, ``mbps`` = ram.mbps (Mbit/s).
    ``cpu_model`` is the ``-cpu`` model that both QEMU processes ran.
    After post-copy (``mode`` "postcopy"), ``faults`` holds what QEMU tells of it: ``count`` =
    the source's ram.postcopy-requests (pages the destination asked for), ``blocked_ms`` = the
    destination's postcopy-blocktime (vCPU time blocked on faults; None when QEMU gave none),
    ``latency_ms`` None (QEMU does not measure it); ``postcopy_round`` is the
    dirty-sync-count when `migrate-start-postcopy` was sent.
    ``stop_to_resume_ms``: from the source's STOP event to the destination's RESUME event (QMP
    event timestamps, the host's clock): the guest's pause as livemig's ``downtime_ms``
    counts it. QEMU's own ``downtime`` ends, in post-copy, once the source has *sent* the
    device state, before the destination has loaded it and started the vCPUs.
    ``guest_gap_ms`` is the largest gap between guest heartbeats seen on the serial ports
    (host arrival time), source and destination merged, from the last one before migration
    started; it includes one heartbeat period.
    """

    status: str
    total_ms: float
    downtime_ms: float
    setup_ms: float
    rounds: int
    bytes_sent: int
    pages_raw: int
    pages_zero: int
    mbps: float
    guest_gap_ms: float | None
    hb_source_last: int | None
    hb_dest_first: int | None
    hb_dest_count: int
    error: str = ""
    mode: str = "precopy"
    cpu_model: str = ""
    qemu_version: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] | None = None
    postcopy_round: int | None = None
    stop_to_resume_ms: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def heartbeats_continue(self) -> bool:
        """The guest heartbeats on the destination, counting on from where the source stopped."""
        return (self.hb_dest_count > 0 and self.hb_dest_first is not None
                and (self.hb_source_last is None or self.hb_dest_first > self.hb_source_last))

    def to_dict(self) -> dict[str, Any]:
        """livemig's key names, plus a few QEMU-only extras (``mbps``, ``heartbeats``)."""
        d: dict[str, Any] = {
            "status": self.status,
            "mode": self.mode,
            "cpu_model": self.cpu_model,
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "stop_to_resume_ms": self.stop_to_resume_ms,
            "setup_ms": self.setup_ms,
            "rounds": self.rounds,
            "bytes_sent": self.bytes_sent,
            "pages": {"raw": self.pages_raw, "zero": self.pages_zero},
            "guest_gap_ms": self.guest_gap_ms,
            "mbps": self.mbps,
            "heartbeats": {
                "source_last": self.hb_source_last,
                "dest_first": self.hb_dest_first,
                "dest_count": self.hb_dest_count,
                "continue": self.heartbeats_continue,
            },
        }
        if "xbzrle-cache" in self.raw:  # QEMU's cache counters (hits, misses, overflows...)
            d["xbzrle"] = self.raw["xbzrle-cache"]
        if self.qemu_version:
            d["qemu_version"] = self.qemu_version
        if self.faults is not None:
            d["faults"] = self.faults
        if self.postcopy_round is not None:
            d["postcopy_round"] = self.postcopy_round
        if self.settings:
            d["settings"] = self.settings
        if self.error:
            d["error"] = self.error
        return d


def base_argv(binary: str, cfg: QemuMigrationConfig, cpu_model: str = "host") -> list[str]:
    """Command line shared by source and destination (chardev/QMP options are added later)."""
    return [
        binary, "-enable-kvm", "-cpu", cpu_model, "-m", mem_arg(cfg.mem), "-smp", str(cfg.smp),
        "-kernel", str(cfg.image), "-append", cfg.cmdline, "-display", "none", "-nodefaults",
        *cfg.extra_args,
    ]


# --------------------------------------------------------------------------------------------
# CPU model
# --------------------------------------------------------------------------------------------

_cpu_models: dict[tuple[str, str], str] = {}
_cpu_lock = threading.Lock()


def _failure_reason(proc: QemuProcess) -> str:
    """One line saying why QEMU did not run the guest: its first error line, else its last."""
    lines = [ln.strip() for ln in proc.stderr_tail().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines[-1:]
    if not errors:
        return "no heartbeat from the guest" if proc.alive() else "QEMU exited"
    return errors[0].split(": ", 1)[-1] if ": " in errors[0] else errors[0]


def cpu_model_boots(binary: str, cfg: QemuMigrationConfig, cpu_model: str,
                    timeout_s: float = CPU_PROBE_TIMEOUT_S) -> str | None:
    """Boot ``cfg.image`` briefly under ``-cpu cpu_model``; None when it heartbeats, else why."""
    tmp = Path(tempfile.mkdtemp(prefix="livemig-qemu-probe-"))
    proc = QemuProcess("probe", tmp, base_argv(binary, cfg, cpu_model))
    try:
        try:
            proc.start()
        except QemuError:
            return _failure_reason(proc)
        if proc.serial.wait_heartbeats(1, timeout_s, alive=proc.alive):
            return None
        return _failure_reason(proc)
    finally:
        proc.close()
        shutil.rmtree(tmp, ignore_errors=True)


def probe_cpu_model(binary: str, cfg: QemuMigrationConfig,
                    candidates: tuple[str, ...] = CPU_CANDIDATES,
                    timeout_s: float = CPU_PROBE_TIMEOUT_S) -> str:
    """The first of ``candidates`` under which QEMU boots ``cfg.image``; cached per process.

    Raises `QemuError` (one line, every model with its reason) when none boots.
    """
    key = (binary, str(Path(cfg.image).resolve()))
    with _cpu_lock:
        if key in _cpu_models:
            return _cpu_models[key]
        tried: list[str] = []
        for model in candidates:
            why = cpu_model_boots(binary, cfg, model, timeout_s)
            if why is None:
                _cpu_models[key] = model
                return model
            tried.append(f"{model}: {why}")
        raise QemuError(f"no -cpu model boots {Path(cfg.image).name} under QEMU "
                        f"({'; '.join(tried)})")


def clear_cpu_model_cache() -> None:
    """Forget the probed models (tests; or after the host changed)."""
    with _cpu_lock:
        _cpu_models.clear()


def choose_cpu_model(binary: str, cfg: QemuMigrationConfig,
                     timeout_s: float = CPU_PROBE_TIMEOUT_S) -> str:
    """``cfg.cpu_model``, else ``$LIVEMIG_QEMU_CPU``, else `probe_cpu_model` (each model
    given `timeout_s` to heartbeat)."""
    return (cfg.cpu_model or os.environ.get("LIVEMIG_QEMU_CPU")
            or probe_cpu_model(binary, cfg, timeout_s=timeout_s))


def guest_gap_ms(src: list[tuple[float, int]], dst: list[tuple[float, int]],
                 since: float) -> float | None:
    """Largest gap between consecutive heartbeats around the migration, in ms.

    Uses the source's last heartbeat before ``since`` (migration start) and every heartbeat
    after it, on both sides, merged by host arrival time. None without destination heartbeats.
    """
    if not dst:
        return None
    before = [hb for hb in src if hb[0] < since][-1:]
    events = sorted(before + [hb for hb in src if hb[0] >= since] + dst)
    times = [t for t, _ in events]
    if len(times) < 2:
        return None
    return max(b - a for a, b in zip(times, times[1:], strict=False)) * 1000.0


def migration_settings(cfg: QemuMigrationConfig, side: str) -> tuple[dict[str, bool],
                                                                      dict[str, Any]]:
    """The capabilities and parameters that ``cfg`` sets on ``side`` ("source" or "dest").

    multifd and its channels and compression, and postcopy-ram, must match on both sides;
    postcopy-blocktime is measured at the destination; xbzrle, auto-converge, the downtime
    limit and the bandwidth matter only where the migration is sent from.
    """
    caps: dict[str, bool] = {}
    params: dict[str, Any] = {}
    if cfg.postcopy_after is not None:
        caps["postcopy-ram"] = True
        if side == "dest":
            caps["postcopy-blocktime"] = True
    if cfg.ignore_shared:
        caps["x-ignore-shared"] = True
    if cfg.multifd_channels is not None or cfg.multifd_compression is not None:
        caps["multifd"] = True
        if cfg.multifd_channels is not None:
            params["multifd-channels"] = int(cfg.multifd_channels)
        if cfg.multifd_compression is not None:
            params["multifd-compression"] = cfg.multifd_compression
    if side == "source":
        if cfg.xbzrle_cache_size is not None:
            caps["xbzrle"] = True
            params["xbzrle-cache-size"] = int(cfg.xbzrle_cache_size)
        if cfg.auto_converge:
            caps["auto-converge"] = True
        if cfg.downtime_limit_ms is not None:
            params["downtime-limit"] = int(cfg.downtime_limit_ms)
        if cfg.max_bandwidth is not None:
            params["max-bandwidth"] = int(cfg.max_bandwidth)
    return caps, params


def _apply_settings(proc: QemuProcess, cfg: QemuMigrationConfig, side: str) -> dict[str, Any]:
    """Set ``migration_settings`` on one side; what was set (for the result)."""
    caps, params = migration_settings(cfg, side)
    if caps:
        proc.qmp.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    compression = params.pop("multifd-compression", None)
    if params:
        proc.qmp.cmd("migrate-set-parameters", **params)
    if compression is not None:
        try:
            proc.qmp.cmd("migrate-set-parameters", **{"multifd-compression": compression})
        except QemuError as e:
            raise QemuUnsupportedError(
                f"this QEMU build has no multifd-compression {compression} ({e})") from e
        params["multifd-compression"] = compression
    return {"capabilities": caps, "parameters": params}


def _listen_port(dst: QemuProcess, host: str = "127.0.0.1") -> int:
    """Start the destination's incoming migration on an ephemeral port of ``host``; return it."""
    dst.qmp.cmd("migrate-incoming", uri=f"tcp:{host}:0")
    info = dst.qmp.cmd("query-migrate")
    for addr in info.get("socket-address", []):
        if addr.get("type") in ("inet", "tcp") and int(addr.get("port", 0)):
            return int(addr["port"])
    raise QemuError(f"destination did not report its listening port: {info}")


@dataclass
class _PostcopySwitch:
    """Sends `migrate-start-postcopy` once ``after`` pre-copy rounds are done (0: at once), and
    notes whether the migration went into post-copy."""

    after: int | None
    sent_at: int | None = None  # dirty-sync-count when it was sent
    entered: bool = False

    def poll(self, src: QemuProcess, info: dict[str, Any]) -> None:
        if self.after is None:
            return
        status = info.get("status")
        self.entered = self.entered or status == "postcopy-active"
        syncs = int(info.get("ram", {}).get("dirty-sync-count", 0))
        if self.sent_at is None and status in ("setup", "active") and (
                self.after == 0 or syncs >= self.after + 1):
            src.qmp.cmd("migrate-start-postcopy")
            self.sent_at = syncs


def _poll_migration(src: QemuProcess, cfg: QemuMigrationConfig,
                    switch: _PostcopySwitch) -> dict[str, Any]:
    """Poll ``query-migrate`` on the source until a final state, switching to post-copy when
    ``switch`` says; cancel on timeout."""
    deadline = time.monotonic() + cfg.migrate_timeout_s
    while True:
        info: dict[str, Any] = src.qmp.cmd("query-migrate")
        switch.poll(src, info)
        if info.get("status") in FINAL_STATES:
            return info
        if not src.alive():
            raise QemuError(f"source QEMU died during migration\n{src.stderr_tail()}")
        if time.monotonic() > deadline:
            with contextlib.suppress(QemuError):
                src.qmp.cmd("migrate_cancel")
            info = dict(info)
            info["status"] = "timeout"
            return info
        time.sleep(cfg.poll_interval_s)


def _blocktime_ms(dst: QemuProcess, wait_s: float = 10.0) -> float | None:
    """The destination's postcopy-blocktime (ms) once its side has completed; None when QEMU
    gives none."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info: dict[str, Any] = dst.qmp.cmd("query-migrate", timeout=5.0)
        except QemuError:
            return None
        done = info.get("status") in FINAL_STATES
        if done or time.monotonic() > deadline:
            bt = info.get("postcopy-blocktime")
            return float(bt) if bt is not None else None
        time.sleep(0.05)


def _event_time(events: list[dict[str, Any]], name: str, last: bool) -> float | None:
    times = [float(e["timestamp"]["seconds"]) + float(e["timestamp"]["microseconds"]) / 1e6
             for e in events if e.get("event") == name and isinstance(e.get("timestamp"), dict)]
    if not times:
        return None
    return times[-1] if last else times[0]


def stop_to_resume_ms(src_events: list[dict[str, Any]],
                      dst_events: list[dict[str, Any]]) -> float | None:
    """The source's last STOP to the destination's first RESUME after it, in ms (None when
    either event is missing)."""
    stop = _event_time(src_events, "STOP", last=True)
    resume = _event_time(dst_events, "RESUME", last=False)
    if stop is None or resume is None or resume < stop:
        return None
    return (resume - stop) * 1000.0


def _result(info: dict[str, Any], src_hb: list[tuple[float, int]],
            dst_hb: list[tuple[float, int]], t_start: float) -> QemuMigrationResult:
    """Turn a final ``query-migrate`` answer and the heartbeats into a result."""
    ram = info.get("ram", {})
    before = [n for t, n in src_hb if t < t_start]
    after_src = [n for t, n in src_hb if t >= t_start]
    seen = after_src or before
    src_last = seen[-1] if seen else None
    return QemuMigrationResult(
        status=str(info.get("status", "unknown")),
        total_ms=float(info.get("total-time", 0)),
        downtime_ms=float(info.get("downtime", 0)),
        setup_ms=float(info.get("setup-time", 0)),
        rounds=int(ram.get("dirty-sync-count", 0)),
        bytes_sent=int(ram.get("transferred", 0)),
        pages_raw=int(ram.get("normal", 0)),
        pages_zero=int(ram.get("duplicate", 0)),
        mbps=float(ram.get("mbps", 0.0)),
        guest_gap_ms=guest_gap_ms(src_hb, dst_hb, t_start),
        hb_source_last=src_last,
        hb_dest_first=dst_hb[0][1] if dst_hb else None,
        hb_dest_count=len(dst_hb),
        error=str(info.get("error-desc", "")),
        raw=info,
    )


def _migrate(src: QemuProcess, dst: QemuProcess, cfg: QemuMigrationConfig) -> QemuMigrationResult:
    """Boot, warm up, migrate, and watch the destination heartbeat (processes already built)."""
    src.start()
    dst.start()
    if not src.serial.wait_heartbeats(cfg.warmup_heartbeats, cfg.boot_timeout_s,
                                      alive=src.alive):
        raise QemuError(
            f"guest printed fewer than {cfg.warmup_heartbeats} heartbeats in "
            f"{cfg.boot_timeout_s:.0f} s; serial so far:\n{src.serial.text()[-2000:]}\n"
            f"{src.stderr_tail()}"
        )
    settings = {"source": _apply_settings(src, cfg, "source"),
                "dest": _apply_settings(dst, cfg, "dest")}
    port = _listen_port(dst, cfg.listen_host)
    switch = _PostcopySwitch(cfg.postcopy_after)
    if cfg.before_migrate is not None:
        cfg.before_migrate()
    t_start = time.monotonic()
    src.qmp.cmd("migrate", uri=f"tcp:{cfg.listen_host}:{port}")
    info = _poll_migration(src, cfg, switch)
    if info.get("status") == "completed":
        dst.serial.wait_heartbeats(cfg.settle_heartbeats, cfg.boot_timeout_s, alive=dst.alive)
    if cfg.after_migrate is not None:
        cfg.after_migrate()
    res = _result(info, src.serial.heartbeats(), dst.serial.heartbeats(), t_start)
    res.settings = settings
    with contextlib.suppress(QemuError, TimeoutError):
        res.stop_to_resume_ms = stop_to_resume_ms(src.qmp.events(), dst.qmp.events())
    if switch.after is not None:
        res.postcopy_round = switch.sent_at
        ram = info.get("ram", {})
        if switch.entered or int(ram.get("postcopy-bytes", 0)):
            res.mode = "postcopy"
            res.faults = {"count": int(ram.get("postcopy-requests", 0)),
                          "blocked_ms": _blocktime_ms(dst), "latency_ms": None}
    with contextlib.suppress(QemuError, KeyError, TypeError):
        v = src.qmp.cmd("query-version", timeout=5.0)
        q = v["qemu"]
        res.qemu_version = f"{q['major']}.{q['minor']}.{q['micro']}"
    return res


def run_qemu_migration(cfg: QemuMigrationConfig) -> QemuMigrationResult:
    """Run one QEMU live migration of ``cfg.image`` over loopback and return its figures.

    Raises `QemuNotFoundError` when QEMU is missing, `QemuError` when /dev/kvm is unusable, the
    image is missing, no ``-cpu`` model boots it (`choose_cpu_model`), or QEMU fails to start
    or boot the guest. A migration that QEMU itself
    reports as failed is returned with ``status="failed"`` (``"timeout"`` when it did not finish
    within ``cfg.migrate_timeout_s``; it is then cancelled).
    """
    binary = find_qemu(cfg.qemu_binary)
    if not kvm_available():
        raise QemuError("/dev/kvm is missing or not accessible: QEMU runs with -enable-kvm")
    if not Path(cfg.image).is_file():
        raise QemuError(f"guest image not found: {cfg.image}")
    cpu_model = choose_cpu_model(binary, cfg)
    argv = base_argv(binary, cfg, cpu_model)
    tmp = tempfile.mkdtemp(prefix="livemig-qemu-")
    workdir = Path(cfg.log_dir) if cfg.log_dir else Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[QemuProcess] = []
    try:
        # Unix socket paths are short-lived and kept in the temp dir (108-byte path limit).
        src = QemuProcess("source", Path(tmp), [*cfg.src_prefix, *argv])
        procs.append(src)
        dst = QemuProcess("dest", Path(tmp),
                          [*cfg.dst_prefix, *argv, *cfg.dst_args, "-incoming", "defer"])
        procs.append(dst)
        res = _migrate(src, dst, cfg)
        res.cpu_model = cpu_model
        return res
    finally:
        for p in reversed(procs):
            p.close()
        if cfg.log_dir:
            for p in procs:
                for f in (p.serial.log_path, p.stderr_path):
                    with contextlib.suppress(OSError):
                        shutil.copy(f, workdir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m livemig.bench.qemu IMAGE [--mem 1G] [--append wss=100M] ...``: print JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("image")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--append", default="")
    ap.add_argument("--downtime-limit-ms", type=int)
    ap.add_argument("--max-bandwidth", type=int, help="bytes/s")
    ap.add_argument("--auto-converge", action="store_true")
    ap.add_argument("--multifd-channels", type=int)
    ap.add_argument("--multifd-compression", help="zstd, zlib (implies multifd)")
    ap.add_argument("--xbzrle-cache-size", type=int, help="bytes (turns xbzrle on)")
    ap.add_argument("--postcopy-after", type=int, help="rounds before migrate-start-postcopy")
    ap.add_argument("--cpu", help="-cpu model (default: probed)")
    ap.add_argument("--log-dir")
    a = ap.parse_args(argv)
    cfg = QemuMigrationConfig(image=a.image, cmdline=a.append, mem=a.mem, smp=a.smp,
                              downtime_limit_ms=a.downtime_limit_ms,
                              max_bandwidth=a.max_bandwidth, auto_converge=a.auto_converge,
                              multifd_channels=a.multifd_channels,
                              multifd_compression=a.multifd_compression,
                              xbzrle_cache_size=a.xbzrle_cache_size,
                              postcopy_after=a.postcopy_after, cpu_model=a.cpu, log_dir=a.log_dir)
    res = run_qemu_migration(cfg)
    print(json.dumps(res.to_dict(), indent=2))
    return 0 if res.status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
