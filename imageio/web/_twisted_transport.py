# -*- test-case-name: tests.test_twisted_seams -*-
"""
Quarantine for the Twisted internals of the socket transport seam.

Our zero-copy transports (L{imageio.web._transport}) replace the output
buffering of Twisted's C{tcp.Server} and C{unix.Server}, which means
taking part in L{twisted.internet.abstract.FileDescriptor}'s private
protocol. Every private name involved is used here and only here, behind
public names, and each is pinned by C{tests.test_twisted_seams}:

  - C{_dataReceived(data)} (C{tcp.Connection}): hand read bytes to the
    protocol; C{b""} means the peer closed;
  - C{_maybePauseProducer()}: pause a streaming producer when the send
    buffer is full, as Twisted's C{write} does;
  - C{_isSendBufferFull()}: what C{_maybePauseProducer} asks; overridden;
  - C{_postLoseConnection()}: what C{doWrite} returns once a
    C{loseConnection} flushed everything;
  - C{_closeWriteConnection()}: the half-close after C{loseWriteConnection};
  - C{_writeDisconnecting}, C{_writeDisconnected}: the half-close flags.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure

#: The private names this module touches, by the Twisted class that
#: defines them (for the pinning tests).
PRIVATE_NAMES = (
    ("twisted.internet.tcp.Connection", "_dataReceived"),
    ("twisted.internet.abstract.FileDescriptor", "_maybePauseProducer"),
    ("twisted.internet.abstract.FileDescriptor", "_isSendBufferFull"),
    ("twisted.internet.abstract.FileDescriptor", "_postLoseConnection"),
    ("twisted.internet.tcp.Connection", "_closeWriteConnection"),
    ("twisted.internet.abstract.FileDescriptor", "_writeDisconnecting"),
    ("twisted.internet.abstract.FileDescriptor", "_writeDisconnected"),
)


class FileDescriptorSeam:
    """
    Mixed in before a Twisted socket transport (C{tcp.Server},
    C{unix.Server}): its private members under public names.
    """

    _writeDisconnecting: bool
    _writeDisconnected: bool

    @property
    def writeDisconnecting(self) -> bool:
        """
        C{loseWriteConnection} was called: half-close once all is sent.
        """
        return self._writeDisconnecting

    @property
    def writeDisconnected(self) -> bool:
        """
        The write side is closed: nothing more may be sent.
        """
        return self._writeDisconnected

    def deliverData(self, data: bytes) -> Any:
        """
        Hand bytes read from the socket to the protocol; C{b""} is the end
        of the stream.

        @return: What C{doRead} returns (a reason to disconnect, or C{None}).
        """
        return self._dataReceived(data)  # type: ignore[attr-defined]

    def pauseProducerIfFull(self) -> None:
        """
        Pause the registered streaming producer if L{sendBufferFull}.
        """
        self._maybePauseProducer()  # type: ignore[attr-defined]

    def finishLoseConnection(self) -> Failure | Exception | None:
        """
        Everything was sent after C{loseConnection}.

        @return: What C{doWrite} returns: the reason the connection ends.
        """
        return self._postLoseConnection()  # type: ignore[attr-defined,no-any-return]

    def finishHalfClose(self) -> Failure | Exception | None:
        """
        Everything was sent after C{loseWriteConnection}: shut the write
        side down and tell the protocol.

        @return: What C{doWrite} returns.
        """
        self._writeDisconnected = True
        return self._closeWriteConnection()  # type: ignore[attr-defined,no-any-return]

    def sendBufferFull(self) -> bool:
        """
        @return: Whether writers should be paused; subclasses decide.
        """
        raise NotImplementedError()

    # Called by Twisted (FileDescriptor._maybePauseProducer).
    def _isSendBufferFull(self) -> bool:
        return self.sendBufferFull()
