"""What the downloader may connect to, and for how long.

Addresses. A catalogue row is hostile input: its URL, or any redirect it answers with,
may name ``localhost``, ``169.254.169.254`` (a cloud's metadata service) or a host on
the private network (SSRF). Every connection is made here, to an address checked
*after* DNS resolution (so a name that resolves to a private address, or a
``DNS rebinding`` answer that changes between a check and the connect, is refused too):
loopback, private, link-local, shared, reserved and multicast addresses, and IPv6
forms that embed them, are refused unless ``allow_private``.

Time. ``requests``' timeout bounds each read, so a server sending a byte every few
seconds holds a worker forever. ``Guard.deadline`` bounds a whole download: when it
passes, every socket the download opened is shut down, which ends any read in progress.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class PrivateAddress(OSError):
    """A connection to an address the policy refuses."""


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_ipv4(ip: IP) -> IP:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo, NAT64), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip.sixtofour:
            return ip.sixtofour
        if ip.teredo:
            return ip.teredo[1]
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public(address: str) -> bool:
    """Whether ``address`` is a globally routable unicast address."""
    ip = embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
    return ip.is_global and not ip.is_multicast


class _Download:
    """The sockets of one download, shut down together when its deadline passes."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.done = False
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)


class _Watchdog:
    """One thread for every deadline (a thread per download cost a millisecond each)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Download]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, when: float, download: _Download) -> None:
        with self._cond:
            sooner = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, id(download), download))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            if sooner:  # only a new earliest deadline changes how long the thread sleeps
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                download = heapq.heappop(self._heap)[2]
            download.expire()


_watchdog = _Watchdog()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # shutdown wakes a thread blocked reading; close won't
        sock.shutdown(socket.SHUT_RDWR)


class Guard:
    def __init__(self, allow_private: bool = False):
        self.allow_private = allow_private
        self._local = threading.local()

    def allowed(self, address: str) -> bool:
        return self.allow_private or is_public(address)

    def check_literal(self, host: str) -> None:
        """Refuse ``host`` at once if it is an IP address this guard does not allow."""
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return  # a name: checked after DNS, at connect
        if not self.allowed(host.strip("[]")):
            raise PrivateAddress(
                f"{host} is a private, loopback or link-local address; "
                "pass --allow-private to download from it"
            )

    def addresses(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """``host``'s addresses this guard allows (getaddrinfo entries), or PrivateAddress."""
        found = socket.getaddrinfo(host, port, connection.allowed_gai_family(), socket.SOCK_STREAM)
        allowed = [entry for entry in found if self.allowed(str(entry[4][0]))]
        if not allowed:
            shown = ", ".join(sorted({str(entry[4][0]) for entry in found})) or "nothing"
            raise PrivateAddress(
                f"{host} is a private, loopback or link-local address ({shown}); "
                "pass --allow-private to download from it"
            )
        return allowed

    def connect(self, conn: HTTPConnection) -> socket.socket:
        """A socket to ``conn``'s host, on an allowed address, watched by the deadline."""
        host = conn._dns_host.strip("[]")
        try:
            entries = self.addresses(host, conn.port or 80)
        except socket.gaierror as e:
            raise NameResolutionError(conn.host, conn, e) from e
        error: OSError | None = None
        for family, kind, proto, _, address in entries:
            sock = socket.socket(family, kind, proto)
            try:
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                if isinstance(conn.timeout, int | float):
                    sock.settimeout(conn.timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect(address)
            except TimeoutError as e:
                sock.close()
                raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out") from e
            except OSError as e:
                sock.close()
                error = e
                continue
            download = getattr(self._local, "download", None)
            if download is not None:
                download.add(sock)
            return sock
        # Chained, so network.explain names the cause (refused, unreachable...).
        raise NewConnectionError(conn, f"Failed to establish a new connection: {error}") from error

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[_Download]:
        """Shut every socket this thread opens inside the block down after ``seconds``."""
        download = _Download()
        self._local.download = download
        _watchdog.watch(time.monotonic() + max(0.0, seconds), download)
        try:
            yield download
        finally:
            download.done = True
            self._local.download = None

    def session(self) -> requests.Session:
        """A requests session whose every connection goes through this guard."""
        session = requests.Session()
        # Proxies from the environment would make the connection checked here the
        # proxy's, not the server's: they are not used.
        session.trust_env = False
        adapter = _GuardedAdapter(self)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: Guard):
        self.guard = guard
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard = self.guard

        class Plain(HTTPConnection):
            def _new_conn(self) -> socket.socket:
                return guard.connect(self)

        class Secure(HTTPSConnection):
            def _new_conn(self) -> socket.socket:
                return guard.connect(self)

        class PlainPool(HTTPConnectionPool):
            ConnectionCls = Plain

        class SecurePool(HTTPSConnectionPool):
            ConnectionCls = Secure

        self.poolmanager.pool_classes_by_scheme = {"http": PlainPool, "https": SecurePool}


def refusal_in(error: BaseException) -> PrivateAddress | None:
    """The PrivateAddress somewhere inside what requests raised (it wraps it twice)."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PrivateAddress):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return None
