# -*- test-case-name: tests.test_backends -*-
"""
Storage backends: where a ticket's C{url} leads.

Each backend module exposes C{openBackend(ctx, url, *, write, sparse, dirty)
-> Deferred[IBackend]}; L{BackendOpener} picks the module by URL scheme.
Modules are imported on first use so that, say, the proxy never loads the
NBD client. L{imageio.backends.httpclient} is not a backend: it is the HTTP
client for daemons that the C{http} backend and the proxy share.
"""

from __future__ import annotations

import importlib
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from imageio.interfaces import IBackend, IBackendOpener

if TYPE_CHECKING:
    from imageio._aio import AIOEngine
    from imageio._diskio import DiskIO, SynchronousDiskIO

#: URL scheme -> module under imageio.backends.
SCHEMES = {
    "file": "file",
    "nbd": "nbd",
    "https": "http",
    "http": "http",
    "memory": "memory",
}

#: Most extents one backend C{extents} call returns; a caller wanting the
#: rest asks again from the end of the last one. (The NBD backend may
#: return one block status reply more.)
MAX_EXTENTS = 10_000

#: Schemes whose backend relays to another daemon (proxy mode).
RELAY_SCHEMES = frozenset({"https", "http"})

#: Header our relays (the C{https:} backend, the signed-ticket proxy) put
#: on every request they send. A listener that would relay such a request
#: again refuses it (508): a ticket naming its own daemon, or two daemons
#: naming each other, would otherwise open connections without end.
RELAYED_HEADER = b"imageio-relayed"


class LoopDetected(Exception):
    """
    A relayed request would be relayed again (508 Loop Detected).
    """


def relayLoop(url: str, relayed: bool) -> LoopDetected | None:
    """
    @param url: The URL of the ticket a request would use.
    @param relayed: Whether the request carries L{RELAYED_HEADER}.
    @return: The error to answer with if serving the request would relay
        it a second time, else C{None}.
    """
    if relayed and urlsplit(url).scheme in RELAY_SCHEMES:
        return LoopDetected(
            "Loop detected: the request was relayed by an imageio daemon or proxy, "
            "and this ticket would relay it again (does the ticket URL name this "
            "daemon, or a daemon whose ticket names this one?)"
        )
    return None


#: CA files read at start by L{readCAFile}, by path.
CA_FILES: dict[str, bytes] = {}


def readCAFile(path: str) -> bytes:
    """
    Read and check a CA file for C{https:} tickets now, at start, before the
    reactor runs, and keep it for the HTTP client, which parses it with
    pyOpenSSL at the first C{https:} ticket
    (L{imageio.backends.httpclient.loadTrustRoot}). The check uses the
    standard library's C{ssl}, so a daemon that never serves such a ticket
    never loads pyOpenSSL and cryptography (about 12 MiB).

    @raise ValueError: If C{path} cannot be read or holds no valid
        certificate.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()  # off-reactor: runs at start-up
    except OSError as e:
        raise ValueError(f"Cannot read CA file {path}: {e.strerror}") from e
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"Invalid or no certificate in CA file {path}: {reason}") from e
    CA_FILES[path] = pem
    return pem


@frozen
class BackendContext:
    """
    What backends need from the service around them.

    @ivar reactor: For network backends (NBD, HTTP) and timeouts.
    @ivar diskio: Runs blocking storage calls off the reactor thread.
    @ivar bufferSize: Preferred I/O size; also the largest single request a
        network backend sends.
    @ivar maxConnections: Advertised C{max_readers}/C{max_writers}.
    @ivar caFile: CA bundle for C{https:} backends (proxy mode); empty for
        the system trust store.
    @ivar extra: Backend-specific options, by backend module name.
    @ivar aio: Completes O_DIRECT reads and writes on the reactor thread,
        if the kernel allows it; C{None} to use C{diskio} only.
    """

    reactor: Any
    diskio: DiskIO | SynchronousDiskIO
    bufferSize: int = 8 * 1024**2
    maxConnections: int = 8
    caFile: str = ""
    extra: dict[str, Any] = field(factory=dict)
    aio: AIOEngine | None = None


class _Opener(Protocol):
    def __call__(
        self, ctx: BackendContext, url: str, *, write: bool, sparse: bool, dirty: bool
    ) -> Deferred[IBackend]: ...


#: Host names that always mean this host.
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

_WILDCARDS = frozenset({"", "0", "0.0.0.0", "::"})


def ipAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    @param host: An IP address, IPv6 possibly with a zone (C{%eth0}, left
        out).
    @return: The address C{host} names, an IPv4-mapped IPv6 address as the
        IPv4 address it maps; C{None} if C{host} is no IP address.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return _unmapped(address)


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    @return: The IPv4 address an IPv4-mapped IPv6 C{address} maps, else
        C{address}.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def isLocalAddress(host: str) -> bool:
    """
    @param host: An IP address.
    @return: Whether connecting to C{host} reaches this host: loopback, the
        unspecified address, or an address of one of its interfaces (which
        a socket can bind to; no other address can).
    """
    address = ipAddress(host)
    if address is None:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def namesListener(url: str, listeners: Iterable[tuple[str, int]]) -> bool:
    """
    Whether a proxy-mode ticket URL names one of our own listeners: a
    ticket that would relay to the daemon serving it.

    Host names other than C{localhost} and this host's name are not
    resolved here (that would block); a loop through them is caught by
    L{RELAYED_HEADER} on the first relayed request.

    @param listeners: Our listening addresses, C{(host, port)}; a wildcard
        host (C{0.0.0.0}, C{::}) listens on every local address.
    """
    parts = urlsplit(url)
    if parts.scheme not in RELAY_SCHEMES or not parts.hostname:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    host = parts.hostname.lower().rstrip(".")
    ownName = host in _LOCAL_NAMES or host.endswith(".localhost")
    ownName = ownName or host == socket.gethostname().lower()
    for listenHost, listenPort in listeners:
        if listenPort != port:
            continue
        if ownName:
            return True
        if listenHost in _WILDCARDS:
            if isLocalAddress(host):
                return True
        elif _sameAddress(host, listenHost) or _unspecified(host):
            return True
    return False


def _sameAddress(a: str, b: str) -> bool:
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    return _unmapped(first) == _unmapped(second)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class UnsupportedScheme(ValueError):
    """
    The URL names no backend we have.
    """


@implementer(IBackendOpener)
@frozen
class BackendOpener:
    """
    Opens a backend for a ticket URL, choosing the module by scheme.
    """

    ctx: BackendContext

    def open(self, url: str, *, write: bool, sparse: bool, dirty: bool) -> Deferred[IBackend]:
        try:
            opener = openerFor(url)
        except UnsupportedScheme:
            return fail()
        return opener(self.ctx, url, write=write, sparse=sparse, dirty=dirty)


def openerFor(url: str) -> _Opener:
    """
    @return: The C{openBackend} function of the module serving C{url}.
    @raise UnsupportedScheme: For unknown schemes.
    """
    scheme = urlsplit(url).scheme
    try:
        name = SCHEMES[scheme]
    except KeyError:
        raise UnsupportedScheme(f"Unsupported url scheme: {scheme}") from None
    module = importlib.import_module(f"imageio.backends.{name}")
    opener: _Opener = module.openBackend
    return opener
