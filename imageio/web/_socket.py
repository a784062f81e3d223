# -*- test-case-name: tests.test_streaming -*-
"""
Socket tuning for image transfers.
"""

from __future__ import annotations

from typing import Any

#: Bytes a socket transport hands the kernel per send, and asks of it per
#: recv. Twisted's defaults (128 KiB sends, 64 KiB reads) cost one reactor
#: iteration per 64-128 KiB: about 16,000 per GiB moved. Image transfers
#: move megabytes per request; memoryview slicing keeps larger sends free of
#: copies, and the producer pause threshold (the same bufferSize) stays far
#: below our 8 MiB buffers.
SEND_LIMIT = 1024 * 1024
RECV_SIZE = 256 * 1024


def tuneTransport(transport: Any) -> None:
    """
    Raise the send and receive sizes of the socket transport under
    C{transport} (which may be a TLS wrapper).
    """
    for _ in range(3):
        if transport is None:
            return
        if hasattr(transport, "SEND_LIMIT") and hasattr(transport, "socket"):
            transport.SEND_LIMIT = SEND_LIMIT
            transport.bufferSize = RECV_SIZE
            return
        transport = getattr(transport, "transport", None)
