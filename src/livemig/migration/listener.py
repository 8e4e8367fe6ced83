"""The destination's listener: serves connections concurrently, authenticates each before it
costs anything, runs at most one incoming migration at a time, and answers resolve questions.

Every connection gets its own thread and a hello deadline (`hello_timeout`, for the whole
hello however slowly the bytes come); at most `max_pending` connections may be in their
hello at once: a new one past that drops the OLDEST still in its hello, so idle peers cannot
keep a real source out, and until a peer is authenticated its records are limited to
HELLO_LIMIT bytes. Results of incoming migrations arrive on `results`.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from livemig.contract import Machine, MachineConfig
from livemig.migration import handshake, hello, records, resolve, template_ship, templates
from livemig.migration.channels import Channel, Role, SocketChannel, TlsChannel
from livemig.migration.channels.base import close_socket
from livemig.migration.codecs import SUPPORTED, CodecSet
from livemig.migration.destination import JOIN_TIMEOUT, Destination, refuse
from livemig.migration.errors import MigrationError, ProtocolError
from livemig.migration.security import Security
from livemig.migration.session import Session
from livemig.migration.stats import MigrationStats
from livemig.migration.wire import MAX_PAYLOAD, RecordType
from livemig.rampool import RamPool

HELLO_TIMEOUT = 10.0
HELLO_LIMIT = 64 << 10
MAX_PENDING = 16
MAX_STREAMS = 16
# Connections that join a migration in progress (besides the page streams `pages-N`).
JOINS = (Role.RETURN.value, Role.URGENT.value, Role.RECOVER.value, Role.NET.value)
REGISTER_WAIT = 2.0  # seconds an extra connection waits for its migration to be registered


@dataclass
class _Active:
    """An incoming migration in progress: its main channel, and the extra connections
    (RETURN, `pages-N`, URGENT, RECOVER) that joined it, by label, until the Destination
    takes them."""

    main: Channel
    joins: dict[str, queue.Queue[Channel]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _queue(self, label: str) -> queue.Queue[Channel]:
        with self.lock:
            return self.joins.setdefault(label, queue.Queue(maxsize=1))

    def put(self, label: str, chan: Channel) -> None:
        try:
            self._queue(label).put_nowait(chan)
        except queue.Full:
            chan.close()
            raise ProtocolError(f"a second {label} connection for one migration") from None

    def take(self, label: str, timeout: float) -> Channel:
        """The connection `label` once it has joined; MigrationError after `timeout`."""
        try:
            chan = self._queue(label).get(timeout=timeout)
        except queue.Empty:
            raise MigrationError(f"the source never opened its {label} connection") from None
        chan.label = label
        return chan


@dataclass
class Incoming:
    """One incoming migration's end: a running machine, or the error that ended it."""

    peer: str
    machine: Machine | None
    stats: MigrationStats
    error: MigrationError | None = None


class Listener:
    """Accepts migrations on a listening socket until closed."""

    def __init__(self, srv: socket.socket, security: Security,
                 build: Callable[[MachineConfig], Machine],
                 log: Callable[[str], None] = lambda s: None,
                 hello_timeout: float = HELLO_TIMEOUT, max_pending: int = MAX_PENDING,
                 templates_dir: str | None = None, ram_pool: RamPool | None = None) -> None:
        self.srv = srv
        self.templates_dir = templates_dir  # templates held here, for TLM (listen --templates)
        self.ram_pool = ram_pool  # RAM allocated ahead (listen --prealloc), one machine's
        self.security = security
        self.build = build
        self.log = log
        self.hello_timeout = hello_timeout
        self.results: queue.Queue[Incoming] = queue.Queue()
        self.outcomes = resolve.Outcomes()
        self.accepting_machines = True
        self.max_pending = max_pending
        # Connections in their hello, oldest first: a dup of each socket to shut it down with
        # (a TLS wrap takes the original socket object over), and the peer's name.
        self._hellos: OrderedDict[object, tuple[socket.socket, str]] = OrderedDict()
        self._busy = threading.Lock()
        self._active: dict[bytes, _Active] = {}
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)  # a migration joined _active
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_templates(self) -> tuple[int, list[str]]:
        """Hash the templates held here once, now, so that a migration mapping one need not
        (a file changed since is hashed again then). Returns how many are sound, and why
        each other one is not."""
        sound, bad = 0, []
        for t in templates.each(self.templates_dir):
            try:
                templates.verify(t)
                sound += 1
            except templates.TemplateError as e:
                bad.append(str(e))
        return sound, bad

    def close(self) -> None:
        self._closed = True
        try:
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.srv.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self.srv.accept()
            except OSError:
                return
            peer = _peer_name(addr)
            key = object()
            with self._lock:
                oldest = (self._hellos.popitem(last=False)[1]
                          if len(self._hellos) >= self.max_pending else None)
                self._hellos[key] = (socket.socket(fileno=os.dup(conn.fileno())), peer)
            if oldest is not None:
                self.log(f"dropped a connection from {oldest[1]} still in its hello: more than "
                         f"{self.max_pending} at once")
                close_socket(oldest[0])
            threading.Thread(target=self._serve, args=(conn, peer, key), name="listen-conn",
                             daemon=True).start()

    def _hello_over(self, key: object) -> None:
        """The connection `key` left its hello (authenticated or refused)."""
        with self._lock:
            entry = self._hellos.pop(key, None)
        if entry is not None:
            entry[0].close()  # only the dup: the connection itself goes on

    def _serve(self, conn: socket.socket, peer: str, key: object) -> None:
        chan: Channel | None = None
        authenticated = False
        try:
            deadline = time.monotonic() + self.hello_timeout
            chan = self._wrap(conn, deadline)
            mine = hello.Hello(encodings=list(SUPPORTED),
                               templates=templates.ids(self.templates_dir))
            try:
                offer, chosen = handshake.server(chan, mine, self.security, deadline)
            except MigrationError as e:
                refuse(chan, e)
                raise
            authenticated = True
            self._hello_over(key)
            chan.set_limit(MAX_PAYLOAD)
            self._dispatch(chan, offer, chosen, peer)
        except MigrationError as e:
            if not authenticated:
                self.log(f"refused a connection from {peer}: {e}")
        finally:
            if not authenticated:
                self._hello_over(key)
                if chan is not None:
                    chan.close()
                else:
                    conn.close()

    def _wrap(self, conn: socket.socket, deadline: float) -> Channel:
        if self.security.tls_server is None:
            return SocketChannel(conn, Role.MAIN, HELLO_LIMIT)
        return TlsChannel.wrap_server(conn, self.security.tls_server,
                                      max(0.1, deadline - time.monotonic()), HELLO_LIMIT)

    def _dispatch(self, chan: Channel, offer: hello.Hello, chosen: hello.Hello,
                  peer: str) -> None:
        assert chosen.session is not None
        if offer.role == Role.MAIN.value:
            self._receive(chan, chosen, peer)
        elif offer.role in JOINS or _is_stream(offer.role):
            # A source dials its RETURN connection as soon as it has the main WELCOME, which
            # may be before the main connection's thread has registered the migration.
            with self._registered:
                self._registered.wait_for(lambda: chosen.session in self._active,
                                          REGISTER_WAIT)
                active = self._active.get(chosen.session)
            if active is None:
                chan.close()
                raise ProtocolError(f"a {offer.role} connection for no migration in progress")
            active.put(offer.role, chan)
        elif offer.role == Role.TEMPLATE.value:
            self._template(chan, chosen.session, peer)
        elif offer.role == Role.RESOLVE.value:
            self._resolve(chan, chosen.session, peer)
        else:
            refuse(chan, ProtocolError(f"unknown connection role {offer.role!r}"))
            chan.close()

    def _template(self, chan: Channel, session: bytes, peer: str) -> None:
        """Take a template shipped for a migration in progress (TLM --ship-template)."""
        try:
            # Dialled right after the main WELCOME, maybe before the main connection's thread
            # has registered the migration (as RETURN joins, above).
            with self._registered:
                if not self._registered.wait_for(lambda: session in self._active,
                                                 REGISTER_WAIT):
                    raise ProtocolError("a template connection for no migration in progress")
            t = template_ship.receive(chan, self.templates_dir)
            chan.send(RecordType.ROUND_ACK, records.pack({"round": 0}),
                      deadline=time.monotonic() + HELLO_TIMEOUT)
            self.log(f"template {t.content_id[:16]} received from {peer}")
        except MigrationError as e:
            self.log(f"refused a template from {peer}: {e}")
            refuse(chan, e)
        finally:
            chan.close()

    def _resolve(self, chan: Channel, session: bytes, peer: str) -> None:
        """Answer whether COMMIT arrived; a migration still waiting for it is given up first
        (its connection is closed, which makes its Destination discard the copy)."""
        with self._lock:
            active = self._active.get(session)
        try:
            answer = resolve.answer(chan, self.outcomes, session, active is not None)
        finally:
            chan.close()
        if active is not None and answer is False:
            active.main.close()
        said = {True: "received", False: "never received", None: "unknown migration"}[answer]
        self.log(f"resolve from {peer}: COMMIT {said}")

    def _receive(self, chan: Channel, chosen: hello.Hello, peer: str) -> None:
        assert chosen.session is not None
        if not self.accepting_machines or not self._busy.acquire(blocking=False):
            refuse(chan, MigrationError("this destination is busy with another machine"))
            chan.close()
            return
        active = _Active(chan)
        with self._registered:
            self._active[chosen.session] = active
            self._registered.notify_all()
        sess: Session | None = None
        try:
            back = chan if chan.duplex else active.take(Role.RETURN.value, JOIN_TIMEOUT)
            sess = Session(chosen.session, chosen.min_version, chosen.features,
                           CodecSet(chosen.encodings), chan, back, self.security.describe())
            dest = Destination(sess, self.build, self.outcomes, join=active.take, log=self.log,
                               templates_dir=self.templates_dir, ram_pool=self.ram_pool)
            try:
                machine, stats = dest.run()
            except MigrationError as e:
                if self.ram_pool is not None:
                    self.ram_pool.refill()  # the failed machine's RAM may have taken it
                self.results.put(Incoming(peer, None, e.stats or dest.stats, e))
                return
            self.accepting_machines = False
            if self.ram_pool is not None:
                self.ram_pool.close()  # no other machine comes: what it did not take goes back
            self.results.put(Incoming(peer, machine, stats))
        except MigrationError as e:
            self.results.put(Incoming(peer, None, MigrationStats(status="failed"), e))
        finally:
            with self._lock:
                del self._active[chosen.session]
            for c in sess.channels() if sess is not None else [chan]:
                c.close()
            self._busy.release()


def _is_stream(role: str) -> bool:
    """`pages-0` .. `pages-15`."""
    name, _, n = role.partition("-")
    return name == Role.PAGES.value and n.isdigit() and int(n) < MAX_STREAMS


def _peer_name(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "a local peer"

