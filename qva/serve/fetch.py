"""Fetching a remote image or video URL (`--allow-remote-media`) without lending out the server's network.

A fetch must not reach what only the server can reach, nor hold a worker, nor report what it found:

- http and https only, on every hop; redirects (at most `MAX_REDIRECTS`) are followed here, one by one,
  each checked like the first URL;
- each hop's host is resolved and every address it resolves to must be public: loopback, private,
  link-local, multicast, reserved, unspecified and shared (carrier-grade NAT) addresses are refused
  before any connection is made, and the connection goes to the address that was checked (no second
  lookup that could answer differently);
- one deadline covers the whole fetch (lookups, connects, redirects, headers, body): a watchdog shuts
  the socket when it passes, so a server that drips a byte at a time cannot hold the thread;
- a byte cap (what is left of the request's media budget), checked against Content-Length and while reading;
- at most `FETCHES_AT_ONCE` fetches run at a time; past that a request is refused at once (429), so
  slow fetches cannot take the worker threads every other request needs;
- a failure says "could not fetch <url>" and our own reason, never what the target answered.

`QVA_SERVE_ALLOW_LOOPBACK_FETCH=1` lets loopback addresses (only those) through. It exists for the tests,
which fetch from a server of their own on 127.0.0.1; it is not a deployment setting.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urljoin, urlsplit

from .errors import APIError, bad

LOOPBACK_ENV = "QVA_SERVE_ALLOW_LOOPBACK_FETCH"
MAX_REDIRECTS = 5
FETCHES_AT_ONCE = 8
READ_SIZE = 1 << 16
KINDS = (("unspecified", "an unspecified address"), ("link_local", "a link-local address"), ("multicast", "a multicast address"),
         ("reserved", "a reserved address"), ("private", "a private address"))  # checked in this order (240.0.0.0/4 is both)

_slots = threading.BoundedSemaphore(FETCHES_AT_ONCE)
_lookups = ThreadPoolExecutor(max_workers=FETCHES_AT_ONCE, thread_name_prefix="qva-lookup")  # getaddrinfo has no timeout of its own


class _Failed(Exception):
    def __init__(self, reason: str, code: str = "remote_media_failed"):
        super().__init__(reason)
        self.code = code


def fetch_url(url: str, where: str, max_bytes: int, timeout: float) -> bytes:
    """The body of `url` (http/https, public addresses only), at most `max_bytes`, within `timeout` seconds."""
    if not _slots.acquire(blocking=False):
        raise APIError(429, f"{where}: this server is already fetching {FETCHES_AT_ONCE} remote URLs; retry later, or send "
                            "the media inline as a data: URL", where, "remote_media_busy", "rate_limit_error")
    try:
        return _fetch(url, max_bytes, timeout)
    except _Failed as e:
        raise bad(f"{where}: could not fetch {url[:200]} ({e})", where, e.code) from None
    finally:
        _slots.release()


def refusal(address: str) -> str | None:
    """Why an IP address may not be fetched from ("a loopback address", ...), or None for a public one."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone ("fe80::1%eth0") does not change the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if ip.is_loopback:
        return None if os.environ.get(LOOPBACK_ENV) == "1" else "a loopback address"
    for kind, words in KINDS:
        if getattr(ip, "is_" + kind):
            return words
    return None if ip.is_global else "an address that is not publicly routable"


def _fetch(url: str, max_bytes: int, timeout: float) -> bytes:
    watchdog = _Watchdog(timeout)
    conn = None
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise _Failed("it redirects to a URL that is not http(s)", "remote_media_forbidden")
            try:
                host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise _Failed("its port is not a number from 0 to 65535") from None
            if not host:
                raise _Failed("it has no host")
            address = _public_address(host, port, watchdog)
            kind = _PinnedTLS if parts.scheme == "https" else _Pinned
            conn = kind(host, port, address, watchdog.left())
            watchdog.watch(conn)
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": "qva-serve", "Accept": "image/*, */*;q=0.5", "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            watchdog.left()  # a head cut short by the watchdog reads as a complete one: refuse it
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                conn.close()
                if not location:
                    raise _Failed("it redirects without saying where")
                url = urljoin(url, location.strip())
                continue
            if resp.status != 200:
                raise _Failed("the answer was not 200 OK")
            length = resp.getheader("Content-Length", "")
            if length.strip().isdigit() and int(length) > max_bytes:
                raise _Failed(f"it is over the {max_bytes} bytes left for this request's media", "remote_media_too_large")
            data = bytearray()
            while piece := resp.read1(READ_SIZE):
                data += piece
                if len(data) > max_bytes:
                    raise _Failed(f"it is over the {max_bytes} bytes left for this request's media", "remote_media_too_large")
                watchdog.left()
            watchdog.left()  # so does a body cut short
            return bytes(data)
        raise _Failed(f"it redirects more than {MAX_REDIRECTS} times")
    except _Failed:
        raise
    except Exception:  # the socket shut by the watchdog, refused, reset, TLS, malformed HTTP: our words, not theirs
        if watchdog.fired:
            raise _Failed(f"no complete answer within {timeout:g} s") from None
        raise _Failed("the connection or the answer failed") from None
    finally:
        watchdog.stop()
        if conn is not None:
            conn.close()


def _public_address(host: str, port: int, watchdog: "_Watchdog") -> str:
    """The first address `host` resolves to, when every one of them is public; _Failed otherwise."""
    try:
        infos = _lookups.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(timeout=watchdog.left())
    except FutureTimeout:
        raise _Failed("its host name did not resolve in time") from None
    except (OSError, UnicodeError):
        raise _Failed("its host name does not resolve") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        why = refusal(address)
        if why is not None:
            raise _Failed(f"its host is {why}, which this server does not fetch from", "remote_media_forbidden")
    if not addresses:
        raise _Failed("its host name does not resolve")
    return addresses[0]


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to `address` (already checked), sending `host` in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    """As `_Pinned`, over TLS: the certificate is checked against `host`."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)  # watched during the handshake too
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class _Watchdog:
    """The fetch's deadline: `left()` is the time remaining (_Failed once none is), and when the deadline passes
    the watched connection's socket is shut, which ends any read or write blocked on it."""

    def __init__(self, timeout: float):
        self.deadline, self.timeout, self.fired, self.conn = time.monotonic() + timeout, timeout, False, None
        self.timer = threading.Timer(timeout, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.fired:
            self.fired = True
            raise _Failed(f"no complete answer within {self.timeout:g} s")
        return left

    def watch(self, conn) -> None:
        self.conn = conn

    def _fire(self) -> None:
        self.fired = True
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.timer.cancel()
