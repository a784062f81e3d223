# -*- test-case-name: tests.test_streaming -*-
"""
Body sinks of the web layer itself: small bodies collected in memory, and
bodies of refused requests dropped.
"""

from __future__ import annotations

from attrs import define, field
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.interfaces import IBodySink, IExchange
from imageio.web._response import HTTPError

#: Bodies of requests whose resource does not stream them (JSON messages,
#: and bodies sent with GET, HEAD or OPTIONS) are collected in memory up to
#: this size; larger ones get 413 and the connection closes. Nothing is ever
#: spooled to twisted.web's temporary file.
MAX_SMALL_BODY = 64 * 1024


def tooLarge(limit: int) -> HTTPError:
    """
    @return: The 413 answer for a body over C{limit} bytes.
    """
    return HTTPError(413, f"Request body too large: limit is {limit} bytes", close=True)


@implementer(IBodySink)
@define
class DiscardSink:
    """
    Drops a body, counting it: for requests refused before their body.
    """

    received: int = 0
    complete: bool = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def bodyComplete(self) -> None:
        self.complete = True

    def connectionLost(self, reason: Failure) -> None:
        pass


@implementer(IBodySink)
@define
class CollectSink:
    """
    Collects a small body (JSON) in memory, up to C{limit} bytes; beyond
    that the request is refused with 413 and the connection closed.

    @ivar exchange: The request (L{imageio.web.exchangeOf}).
    """

    exchange: IExchange
    limit: int
    _data: list[bytes] = field(factory=list, init=False)
    _size: int = field(default=0, init=False)

    @property
    def data(self) -> bytes:
        return b"".join(self._data)

    def dataReceived(self, data: bytes) -> None:
        if self.exchange.respondedEarly:
            return
        self._size += len(data)
        if self._size > self.limit:
            self._data.clear()
            self.exchange.respondEarly(tooLarge(self.limit))
            return
        self._data.append(data)

    def bodyComplete(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self._data.clear()
