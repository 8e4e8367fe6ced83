"""Destination of `livemig bench cpu-state`: a process holding an ARMv8 machine that adopts
the registers it is sent (protocol: `livemig.bench.cpustate_wire`).

Run ``python -m livemig.bench.cpustate_peer --listen HOST:PORT`` (port 0: any free one). It
prints ``listening HOST PORT`` on stdout once ready, serves one source connection (or every
connection, with ``--forever``) and exits.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

from livemig.arm import Armv8Machine
from livemig.bench.cpustate import THESIS_ORDER
from livemig.bench.cpustate_udp import serve
from livemig.bench.cpustate_wire import (
    PeerError,
    digest,
    pack_registers,
    recv_msg,
    send_msg,
    unpack_registers,
    vcpus_digest,
)
from livemig.contract import MachineConfig, MachineError, MachineState


class Peer:
    """One source connection: builds the machine on hello, adopts registers or state."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.machine: Armv8Machine | None = None

    def serve(self) -> None:
        """Answer messages until `bye` or the source goes away."""
        try:
            while True:
                try:
                    msg = recv_msg(self.sock)
                except PeerError:
                    return
                op = msg.get("op")
                if op == "bye":
                    return
                try:
                    self._handle(op, msg)
                except (MachineError, PeerError, KeyError, TypeError, ValueError) as e:
                    send_msg(self.sock, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            if self.machine is not None:
                self.machine.close()
            self.sock.close()

    def _handle(self, op: Any, msg: dict[str, Any]) -> None:
        if op == "hello":
            if self.machine is not None:
                self.machine.close()
            self.machine = Armv8Machine(MachineConfig.from_dict(msg["config"]))
            send_msg(self.sock, {"ok": True, "cpu_model": self.machine.cpu_model,
                                 "pid": os.getpid()})
        elif op == "regs":
            self._adopt_registers(list(msg["names"]), bytes(msg["values"]))
        elif op == "state":
            self._adopt_state(bytes(msg["state"]))
        elif op == "udp":
            self._serve_udp(bytes(msg["key"]))
        else:
            raise PeerError(f"unknown op {op!r}")

    def _need_machine(self) -> Armv8Machine:
        if self.machine is None:
            raise PeerError("no machine yet: send hello first")
        return self.machine

    def _adopt(self, names: list[str], values: bytes) -> tuple[float, bytes]:
        """Adopt registers into the vCPUs: (ms it took, the registers read back, packed)."""
        m = self._need_machine()
        t0 = time.perf_counter()
        per_vcpu = unpack_registers(values, names, m.config.vcpus)
        for i, regs in enumerate(per_vcpu):
            m.set_registers(i, regs)
        adopt_ms = (time.perf_counter() - t0) * 1e3
        back = [m.get_registers(i, names) for i in range(m.config.vcpus)]
        return adopt_ms, pack_registers(back, names)

    def _adopt_registers(self, names: list[str], values: bytes) -> None:
        adopt_ms, back = self._adopt(names, values)
        send_msg(self.sock, {"ok": True, "adopt_ms": adopt_ms})
        send_msg(self.sock, {"digest": digest(back)})

    def _serve_udp(self, key: bytes) -> None:
        """Open a UDP socket next to the control connection; serve it until the source ends."""
        m = self._need_machine()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind((self.sock.getsockname()[0], 0))
            send_msg(self.sock, {"ok": True, "port": udp.getsockname()[1]})
            counts = serve(udp, key, m.config.vcpus, THESIS_ORDER, self._adopt)
        finally:
            udp.close()
        send_msg(self.sock, {"ok": True, "counts": counts})

    def _adopt_state(self, blob: bytes) -> None:
        m = self._need_machine()
        t0 = time.perf_counter()
        m.load_state(MachineState.decode(blob))
        adopt_ms = (time.perf_counter() - t0) * 1e3
        send_msg(self.sock, {"ok": True, "adopt_ms": adopt_ms})
        send_msg(self.sock, {"digest": vcpus_digest(m.save_state())})


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--listen wants HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    """Listen, announce the port on stdout, serve one connection (or all, with --forever)."""
    ap = argparse.ArgumentParser(prog="python -m livemig.bench.cpustate_peer",
                                 description="destination of `livemig bench cpu-state`")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free one)")
    ap.add_argument("--forever", action="store_true", help="serve connections until killed")
    args = ap.parse_args(argv)
    srv = socket.create_server(_parse_listen(args.listen))
    host, port = srv.getsockname()[:2]
    print(f"listening {host} {port}", flush=True)
    try:
        while True:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Peer(conn).serve()
            if not args.forever:
                return
    except KeyboardInterrupt:
        pass
    finally:
        srv.close()


if __name__ == "__main__":
    main(sys.argv[1:])
