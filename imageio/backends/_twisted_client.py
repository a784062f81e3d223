# -*- test-case-name: tests.test_twisted_seams -*-
"""
Quarantine for the Twisted internals of the HTTP client pool seam.

Every private Twisted name the HTTP client (L{imageio.backends.httpclient})
relies on is used here and only here, and each is pinned by
C{tests.test_twisted_seams}, which fails loudly when a Twisted release
renames or changes one:

  - C{twisted.web.client._HTTP11ClientFactory}: the factory a pool uses
    for each new connection, subclassed to be quiet;
  - C{HTTPConnectionPool._factory}: the class attribute naming that
    factory, set per pool.

Without this, Twisted logs "Starting factory" and "Stopping factory" for
every connection to a daemon.
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

#: The private names used here, for the pinning tests.
PRIVATE_NAMES = (
    ("twisted.web.client", "_HTTP11ClientFactory"),
    ("twisted.web.client.HTTPConnectionPool", "_factory"),
)


class QuietClientFactory(_HTTP11ClientFactory):  # type: ignore[misc]
    """
    The pool's connection factory without "Starting factory" log lines for
    every connection.
    """

    noisy = False


def quietPool(reactor: Any) -> HTTPConnectionPool:
    """
    @return: A persistent L{HTTPConnectionPool} whose connections do not
        log their factory starting and stopping.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = QuietClientFactory
    return pool
