# -*- test-case-name: tests.test_twisted_seams -*-
"""
Quarantine for the HTTP/1.1 client protocol seam: Twisted's HTTP/1.1 client
protocol and its request and error classes, from their private module,
without C{twisted.web.client}.

C{twisted.web.client} (L{twisted.web.client.Agent}) imports
C{twisted.internet.endpoints}, which imports pyOpenSSL and cryptography
(about 0.1 CPU seconds and 12 MiB at start-up) even for a program that
never makes a TLS connection through Twisted. The client
(L{imageio.client}) connects with the reactor's C{connectUNIX} and
C{connectTCP} and its own stdlib TLS, and speaks HTTP with the same
protocol C{Agent} uses, taken from here. The same classes are what
C{twisted.web.client} re-exports, so failures compare equal either way.

The private names (C{PRIVATE_NAMES}) are pinned by
C{tests.test_twisted_seams}.
"""

from __future__ import annotations

from twisted.web._newclient import (
    HTTP11ClientProtocol,
    Request,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)

#: The private names used here, for the pinning tests.
PRIVATE_NAMES = (("twisted.web", "_newclient"),)

__all__ = [
    "HTTP11ClientProtocol",
    "Request",
    "RequestGenerationFailed",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseDone",
    "ResponseFailed",
    "ResponseNeverReceived",
]
