"""A real destination process that dies before COMMIT, for the handover tests.

It listens on a unix socket like `livemig listen --unix PATH` (the same Listener, the real
machine backends) and builds the incoming machine on the RAM descriptors the source handed
over; when the machine's state is about to be loaded (after the RAM was mapped, before READY)
the process kills itself with SIGKILL: no clean-up, no ERROR, nothing sent.

    python dying_destination.py SOCKET_PATH KEY_FILE
"""

from __future__ import annotations

import os
import signal
import sys
import time

from livemig.cli.runner import build_machine, preload_backends
from livemig.cli.security_opts import build_security
from livemig.contract import Machine, MachineConfig, MachineState
from livemig.migration.listener import Listener
from livemig.migration.transport import Address, bind


def build(cfg: MachineConfig) -> Machine:
    machine = build_machine(cfg, None)

    def die(_state: MachineState) -> None:
        print("dying with the RAM mapped", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    machine.load_state = die  # type: ignore[method-assign]
    return machine


def main() -> None:
    path, key_file = sys.argv[1], sys.argv[2]
    preload_backends()
    lst = Listener(bind(Address(path=path)), build_security(key_file, None, False), build)
    lst.start()
    print("listening", file=sys.stderr, flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
