# -*- test-case-name: tests.test_backends -*-
"""
Storage backends: where a ticket's C{url} leads.

Each backend module exposes C{openBackend(ctx, url, *, write, sparse, dirty)
-> Deferred[IBackend]}; L{BackendOpener} picks the module by URL scheme.
Modules are imported on first use so that, say, the proxy never loads the
NBD client.
"""

from __future__ import annotations

import importlib
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

#: Schemes a ticket may name over the control API (C{memory:} is for tests).
TICKET_SCHEMES = frozenset({"file", "nbd", "https", "http"})


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
