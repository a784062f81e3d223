# -*- test-case-name: tests.test_tls -*-
"""
Server-side TLS on the standard library's C{ssl} module.

Twisted's own TLS layer (L{twisted.protocols.tls}) drives pyOpenSSL from
Python in 16 KiB steps and costs about twice the CPU per GiB of the stdlib's
C{ssl.SSLObject}. Image transfers move many GiB over HTTPS on small hosts, so
the server side uses this module instead: L{TLSServerProtocol} wraps an
application protocol and encrypts and decrypts with an C{SSLObject} over two
C{MemoryBIO}s, in large pieces, handing ciphertext to the TCP transport
unchanged. Producers pass straight through to the TCP transport, so
backpressure behaves exactly as it does without TLS.

L{makeServerContext} builds the C{ssl.SSLContext} (TLS 1.2 minimum, no
renegotiation, ALPN C{http/1.1}) and refuses missing, mismatched or expired
certificates with a L{TLSConfigError} naming the file;
L{TLSServerEndpoint} puts it all in front of any stream server endpoint.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, TimeoutError
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol as _Protocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio._buffers import allocate
from imageio._certdates import certificateDates
from imageio.interfaces import IDirectReader, IDirectReadTransport, IZeroCopyTransport

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IListeningPort

log = Logger()

#: Plaintext is decrypted into a per-factory buffer of this size and handed
#: to the application in pieces of up to this size. OpenSSL returns one
#: 16 KiB record per read; gathering them into one preallocated buffer halves
#: the CPU cost of a fresh C{bytes} per record.
READ_SIZE = 256 * 1024

#: Plaintext is encrypted in pieces of this size, so one huge write does not
#: hold its whole ciphertext in the outgoing BIO and a copy of it at once.
#: Measured on 2 GiB downloads, when a whole buffer was encrypted at once:
#: 512 KiB cost 12% less CPU than 256 KiB (fewer sends) and than 4 MiB
#: (ciphertext no longer in cache when sent).
WRITE_SIZE = 512 * 1024

#: Over our socket transports, plaintext is encrypted as the socket drains:
#: a written buffer is held (L{IZeroCopyTransport}) and the next piece is
#: encrypted only while less ciphertext than this waits in the transport.
#: The ciphertext queued per connection stays under this plus
#: L{WRITE_SIZE}, instead of a whole download buffer's worth (issue 12).
#: It must stay above the transport's C{bufferSize} (64 KiB), so that the
#: transport has paused its producer whenever plaintext waits here.
#: Measured against encrypting whole buffers at once (bench/run, GET HTTPS,
#: ours/before): 256 KiB pieces with 128 KiB queued cost 1.22x the CPU per
#: GiB at 0.85x the throughput (more wake-ups, each moving less); 512/128
#: 1.05-1.09x; 512/512 0.98x CPU and 1-2 MiB more at the peak than 256/128;
#: 512 KiB/1 MiB 0.99x CPU and 3 MiB more.
CIPHERTEXT_QUEUED = 512 * 1024

#: Seconds a client gets to complete the TLS handshake (reliability F.29;
#: QEMU's NBD server uses the same deadline).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: Warn at startup when the certificate expires sooner than this.
EXPIRY_WARNING = timedelta(days=30)

# OpenSSL 3 allows TLS 1.0/1.1 only at security level 0, which also accepts
# weak keys and SHA-1 signatures; it is only used when an operator enables
# TLS 1.1. Forward-secret AEAD and CBC suites only; TLS 1.1 needs the CBC ones.
_TLS11_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:DHE+AES:!aNULL:!eNULL:!MD5:@SECLEVEL=0"


class TLSConfigError(Exception):
    """
    The TLS configuration cannot be used: a file is missing or unreadable,
    the key does not match the certificate, or the certificate expired. The
    message names the file.
    """


class _Transport(Protocol):
    """
    What L{TLSServerProtocol} needs from the transport under it: an
    L{ITransport} that is also a consumer and a push producer, as every
    stream transport in Twisted is.
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def _refusePassword() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal and the daemon
    # would hang at startup; the caller turns this into a TLSConfigError.
    raise _EncryptedKey()


class _EncryptedKey(Exception):
    pass


def _readPEM(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"Cannot read {what} file {path}: {e.strerror}") from e


def _checkCertificates(path: str, pem: bytes, now: datetime) -> None:
    """
    Refuse a certificate file holding no certificate or an expired one; warn
    about one that is not valid yet or expires soon.

    Certificates are read with the standard library (L{certificateDates}),
    which also names their subjects in the warnings; cryptography, which
    costs a daemon about 9 MiB, is loaded only for a file that reads
    cannot, or to word the error that stops the daemon.
    """
    found = certificateDates(pem)
    if found is not None and all(dates.notAfter > now for dates in found):
        for dates in found:
            subject = dates.subject or "(no common name)"
            _warnDates(path, subject, dates.notBefore, dates.notAfter, now)
        return
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TLSConfigError(f"No valid PEM certificate in {path}: {e}") from e
    for cert in certs:
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        notAfter = cert.not_valid_after_utc
        if notAfter <= now:
            raise TLSConfigError(
                f"Certificate {subject} in {path} expired on {notAfter.isoformat()}"
            )
        _warnDates(path, subject, cert.not_valid_before_utc, notAfter, now)


def _warnDates(
    path: str, subject: str, notBefore: datetime, notAfter: datetime, now: datetime
) -> None:
    if notBefore > now:
        log.warn(
            "Certificate {subject} in {path} is not valid until {notBefore}; is the clock right?",
            subject=subject,
            path=path,
            notBefore=notBefore.isoformat(),
        )
    if notAfter - now < EXPIRY_WARNING:
        log.warn(
            "Certificate {subject} in {path} expires on {notAfter}",
            subject=subject,
            path=path,
            notAfter=notAfter.isoformat(),
        )


def makeServerContext(
    certFile: str, keyFile: str, *, caFile: str = "", enableTLS11: bool = False
) -> ssl.SSLContext:
    """
    Build the TLS context for a listening port.

    TLS 1.2 is the minimum; renegotiation and compression are off; ALPN
    offers C{http/1.1}; no client certificate is requested.

    @param certFile: PEM file with the server certificate, optionally
        followed by its chain (intermediates), sent to clients as is.
    @param keyFile: PEM file with the unencrypted private key.
    @param caFile: Optional PEM file with the CA certificates. It goes into
        the context's trust store, from which OpenSSL completes the chain it
        sends when C{certFile} holds only the server certificate. It is not
        used to verify clients.
    @param enableTLS11: Also accept TLS 1.1, for legacy clients. OpenSSL 3
        refuses TLS 1.1 at its default security level, so this also lowers
        the security level to 0 (C{@SECLEVEL=0} in the cipher string), which
        accepts weaker keys and SHA-1 signatures for every protocol version.
        Only forward-secret AES and ChaCha20 suites are offered.

    @return: A server-side context.

    @raise TLSConfigError: A file is missing or unreadable, holds no
        certificate or key, the key does not match the certificate, the key
        is encrypted, or a certificate in C{certFile} has expired.
    """
    certPEM = _readPEM(certFile, "certificate")
    _readPEM(keyFile, "private key")
    _checkCertificates(certFile, certPEM, datetime.now(UTC))

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if enableTLS11:
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers(_TLS11_CIPHERS)
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= (
        ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    )
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])

    try:
        context.load_cert_chain(certFile, keyFile, password=_refusePassword)
    except _EncryptedKey:
        raise TLSConfigError(
            f"Private key {keyFile} is encrypted; an unencrypted key is required"
        ) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"Private key {keyFile} does not match certificate {certFile}"
            ) from e
        raise TLSConfigError(
            f"Cannot load certificate {certFile} with private key {keyFile}: {e.reason or e}"
        ) from e

    if caFile:
        _readPEM(caFile, "CA certificate")
        try:
            context.load_verify_locations(cafile=caFile)
        except ssl.SSLError as e:
            raise TLSConfigError(
                f"No valid PEM certificate in CA file {caFile}: {e.reason or e}"
            ) from e
    return context


def _describePeer(address: IAddress) -> str:
    if isinstance(address, IPv4Address | IPv6Address):
        return f"{address.host}:{address.port}"
    return str(address)


def _describeError(error: BaseException) -> str:
    # One line, no traceback: "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", ...
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error) or type(error).__name__


#: What a connection's wrapped protocol is replaced with once it was told
#: the connection was lost.
_LOST = _Protocol()


@implementer(
    ITCPTransport,
    ISSLTransport,
    INegotiated,
    IPushProducer,
    IConsumer,
    IDirectReadTransport,
    IHalfCloseableProtocol,
    IZeroCopyTransport,
)
class TLSServerProtocol(_Protocol):
    """
    The server side of one TLS connection: decrypts what the TCP transport
    delivers for the wrapped protocol and encrypts what the wrapped protocol
    writes; to the wrapped protocol it is the transport.

    Providing L{INegotiated} (and so L{ISSLTransport
    <twisted.internet.interfaces.ISSLTransport>}) makes
    C{twisted.web}'s C{Request.isSecure()} true.

    How the connection ended, as the wrapped protocol's C{connectionLost}
    sees it:
        - L{ConnectionDone}: the peer sent C{close_notify}, or this side
          closed with L{loseConnection}.
        - L{ConnectionLost}: the peer closed TCP without C{close_notify}
          (after the handshake this means the data may be truncated).
        - C{ssl.SSLError}: the handshake failed or a record did not decrypt.
        - L{TimeoutError}: the handshake did not complete in time.
        - Otherwise what the TCP transport reported.

    A peer that sends C{close_notify} or shuts down its side of TCP after
    its last request still gets its answers when the wrapped protocol
    provides L{IHalfCloseableProtocol}: it is told the input ended (once
    every byte of plaintext before it was delivered), may write, and closes
    when it is done.

    Over one of our socket transports (L{IZeroCopyTransport}), what is
    written is held, not copied, and encrypted in pieces of L{WRITE_SIZE}
    as the socket drains, keeping at most about L{CIPHERTEXT_QUEUED} of
    ciphertext queued; L{whenDrained} fires once all of it was encrypted.
    Over other transports (Twisted's) it is encrypted at once.

    @ivar wrappedProtocol: The application protocol.
    @ivar disconnecting: L{loseConnection} or L{abortConnection} was called.
    """

    def __init__(self, factory: TLSServerFactory, wrappedProtocol: IProtocol) -> None:
        self.factory = factory
        self.wrappedProtocol = wrappedProtocol
        self.disconnecting = False
        self._tlsFactory = factory
        self._tcp: _Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = factory.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshakeDone = False
        self._handshakeTimer: IDelayedCall | None = None
        # Plaintext the wrapped protocol wrote before the handshake completed.
        self._pending: list[bytes] = []
        self._producer: IProducer | None = None
        self._readPaused = False
        self._delivering = False
        # The peer's close_notify arrived: no more plaintext will come.
        self._peerClosed = False
        # Our close_notify was sent: no more plaintext may be written.
        self._closeNotifySent = False
        self._aborted = False
        # The first failure (handshake, decryption, timeout) wins.
        self._reason: Failure | None = None
        # Decrypt into this reader's buffers (a request body) when set.
        self._directReader: IDirectReader | None = None
        # TCP read EOF, and whether the wrapped protocol was told the input
        # ended.
        self._tcpClosed = False
        self._readEnded = False
        # The TCP transport, if it is one of ours (IZeroCopyTransport): then
        # plaintext waits in _plain until the socket drains.
        self._zeroCopy: Any = None
        # Its sendNow, if it has one (ours do).
        self._sendNow: Callable[[bytes], int] | None = None
        self._plain: deque[memoryview] = deque()
        self._plainBytes = 0
        self._plainWaiters: list[Deferred[None]] = []
        self._pushing = False
        self._awaitingTCP = False
        # Close (or half-close) once the plaintext held is sent.
        self._closeWhenSent = False
        self._halfCloseWhenSent = False

    # IProtocol, as seen from the TCP transport

    def makeConnection(self, transport: ITransport) -> None:
        """
        Start the handshake deadline and connect the wrapped protocol, which
        may write at once; such writes wait for the handshake.
        """
        self._tcp = cast(_Transport, transport)
        if IZeroCopyTransport.providedBy(transport):
            self._zeroCopy = transport
            self._sendNow = getattr(transport, "sendNow", None)
        _Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self._tlsFactory.registerProtocol(self)
        self._handshakeTimer = self._tlsFactory.clock.callLater(
            self._tlsFactory.handshakeTimeout, self._handshakeTimedOut
        )
        self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Feed ciphertext to TLS, advance the handshake, and deliver whatever
        plaintext it yields.
        """
        if self._aborted or self._reason is not None:
            return
        if self._handshakeDone and self.disconnecting:
            # Closing (either side): like a TCP transport, read nothing more.
            return
        self._incoming.write(data)
        if not self._handshakeDone and not self._doHandshake():
            return
        self._deliverPlaintext()
        # Reading may have produced records to send (TLS 1.3 key updates,
        # alerts).
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Tell the wrapped protocol how the connection ended.
        """
        self._cancelHandshakeTimer()
        self.connected = False
        self._tlsFactory.unregisterProtocol(self)
        if self._reason is not None:
            reason = self._reason
        elif self._peerClosed:
            reason = Failure(ConnectionDone("TLS close_notify received"))
        elif self._closeNotifySent or self._aborted:
            pass
        elif reason.check(ConnectionDone):
            reason = Failure(ConnectionLost("Connection closed without TLS close_notify"))
        wrapped = self.wrappedProtocol
        self._producer = None
        wrapped.connectionLost(reason)
        # Nothing more will be sent: held buffers are free again. After the
        # protocol heard of the loss, so writers do not write again.
        self._dropPlain()
        # The wrapped protocol keeps us as its transport: forget it, as
        # Twisted's transports forget their protocol, so that the two (and
        # the TLS state, some 350 KiB after a transfer) are freed now
        # rather than by the cyclic garbage collector, much later.
        self.wrappedProtocol = _LOST

    # IHalfCloseableProtocol, as seen from the TCP transport

    def readConnectionLost(self) -> None:
        """
        TCP input ended (after the peer's C{close_notify}, or without one).
        """
        self._tcpClosed = True
        if self._aborted or self._reason is not None or self.disconnecting:
            return
        if not self._handshakeDone:
            self._abort()
            return
        self._endRead()

    def writeConnectionLost(self) -> None:
        pass

    def _endRead(self) -> None:
        """
        Tell the wrapped protocol its input ended, once all plaintext before
        the end was delivered; close if it cannot be told.
        """
        if self._readEnded or self._readPaused or self.disconnecting:
            return
        wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if wrapped is None:
            self.disconnecting = True
            self._sendCloseNotify()
            return
        self._readEnded = True
        wrapped.readConnectionLost()

    def logPrefix(self) -> str:
        wrapped = self.wrappedProtocol
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (TLS)"

    # The handshake

    def _doHandshake(self) -> bool:
        """
        Advance the handshake.

        @return: C{True} once it completed.
        """
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as e:
            self._handshakeFailed(e)
            return False
        self._handshakeDone = True
        self._cancelHandshakeTimer()
        # TLS 1.3 session tickets go out after the handshake.
        self._flush()
        pending, self._pending = self._pending, []
        for data in pending:
            self._send(data)
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        if self.disconnecting and self._producer is None and not self._aborted:
            self._sendCloseNotify()
        return True

    def _handshakeFailed(self, error: ssl.SSLError) -> None:
        self._reason = Failure(error)
        self._logError("TLS handshake with {peer} failed: {reason}", error)
        # Send the alert OpenSSL prepared ("protocol version", ...) so the
        # client can say what went wrong; the handshake deadline still runs
        # and aborts a close that stalls.
        self._flush()
        self._transport().loseConnection()

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        if self._reason is None:
            log.info(
                "TLS handshake with {peer} timed out after {timeout} s",
                peer=_describePeer(self.getPeer()),
                timeout=self._tlsFactory.handshakeTimeout,
            )
            self._reason = Failure(TimeoutError("TLS handshake timed out"))
        self._abort()

    def _cancelHandshakeTimer(self) -> None:
        if self._handshakeTimer is not None:
            if self._handshakeTimer.active():
                self._handshakeTimer.cancel()
            self._handshakeTimer = None

    # Reading

    def _deliverPlaintext(self) -> None:
        """
        Decrypt everything available and hand it to the wrapped protocol,
        up to L{READ_SIZE} at a time, until TLS needs more ciphertext, the
        peer closes, or the wrapped protocol pauses or closes this transport.
        """
        if self._delivering:
            # Called again from inside the wrapped protocol (resumeProducing);
            # the loop below picks up where it was.
            return
        self._delivering = True
        try:
            self._deliverLoop()
        finally:
            self._delivering = False

    def setDirectReader(self, reader: IDirectReader | None) -> None:
        """
        Decrypt into C{reader}'s buffers from now on (saving two copies per
        byte of a request body), or as usual again with C{None}.
        """
        self._directReader = reader

    def _deliverLoop(self) -> None:
        shared = self._tlsFactory.readView
        while not (self._readPaused or self.disconnecting or self._peerClosed):
            reader = self._directReader
            target = reader.readBuffer() if reader is not None else None
            if target is not None and not len(target):
                # Nothing would ever fill an empty buffer.
                target = None
            view = shared if target is None else target
            size = len(view)
            filled = 0
            error: ssl.SSLError | None = None
            wantRead = False
            while filled < size:
                try:
                    # With a buffer, read() returns a count.
                    n = cast(int, self._tls.read(size - filled, view[filled:]))
                except ssl.SSLWantReadError:
                    wantRead = True
                    break
                except ssl.SSLZeroReturnError:
                    self._peerClosed = True
                    break
                except ssl.SSLError as e:
                    error = e
                    break
                if n == 0:
                    # CPython returns 0 instead of raising SSLZeroReturnError
                    # once the peer's close_notify arrived: the peer closed.
                    # (Looping here would spin the reactor forever.)
                    self._peerClosed = True
                    break
                filled += n
            if filled:
                if target is not None:
                    assert reader is not None
                    reader.bufferFilled(filled)
                else:
                    # Copy out before calling foreign code: the buffer is
                    # shared by every connection of the factory.
                    self.wrappedProtocol.dataReceived(bytes(view[:filled]))
            if error is not None:
                self._readFailed(error)
                return
            if self._peerClosed:
                self._closedByPeer()
                return
            if wantRead:
                return

    def _readFailed(self, error: ssl.SSLError) -> None:
        if self._reason is None:
            self._reason = Failure(error)
        self._logError("TLS error from {peer}: {reason}", error)
        self._abort()

    def _logError(self, format: str, error: ssl.SSLError) -> None:
        # One line, at info: clients failing TLS are not our errors.
        log.info(format, peer=_describePeer(self.getPeer()), reason=_describeError(error))

    def _closedByPeer(self) -> None:
        """
        The peer sent close_notify: the wrapped protocol answers what it
        was asked and closes (our close_notify follows); without half-close
        support, answer with ours and close TCP once the data already
        written is sent.
        """
        self._endRead()

    # Writing

    def _transport(self) -> _Transport:
        assert self._tcp is not None, "not connected"
        return self._tcp

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._transport().write(self._outgoing.read())

    def _encrypt(self, data: bytes | memoryview) -> None:
        tls = self._tls
        try:
            if len(data) <= WRITE_SIZE:
                tls.write(data)
                self._flush()
                return
            # Our socket transports send each piece of ciphertext at once,
            # while it is in the CPU cache; Twisted's join (copy) several
            # buffered pieces, so they get one block per write.
            piecewise = IZeroCopyTransport.providedBy(self._tcp)
            with memoryview(data) as view:
                offset = 0
                while offset < len(view):
                    offset += tls.write(view[offset : offset + WRITE_SIZE])
                    if piecewise:
                        self._flush()
            self._flush()
        except ssl.SSLError as e:
            if self._reason is None:
                self._reason = Failure(e)
            self._abort()

    def _send(self, data: bytes | memoryview) -> None:
        tcp = self._zeroCopy
        if tcp is None or (
            not self._plain and len(data) <= WRITE_SIZE and tcp.pendingBytes() < CIPHERTEXT_QUEUED
        ):
            # Encrypted at once: Twisted's transports, and small writes
            # (response heads, small bodies) when nothing waits.
            self._encrypt(data)
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._plain.append(view)
        self._plainBytes += len(view)
        self._push()

    def _push(self) -> None:
        """
        Encrypt held plaintext, a piece at a time, while the TCP transport
        has less than L{CIPHERTEXT_QUEUED} queued; then wait for it to
        drain.
        """
        if self._pushing:
            return
        tcp = self._zeroCopy
        plain = self._plain
        tls = self._tls
        outgoing = self._outgoing
        sendNow = self._sendNow
        self._pushing = True
        try:
            queued = tcp.pendingBytes()
            while plain and queued < CIPHERTEXT_QUEUED:
                head = plain[0]
                n = tls.write(head[:WRITE_SIZE])
                self._plainBytes -= n
                if n == len(head):
                    plain.popleft()
                else:
                    plain[0] = head[n:]
                # Each piece to the socket at once, while in the CPU cache:
                # straight to the kernel while nothing is queued.
                data = outgoing.read()
                sent = sendNow(data) if sendNow is not None else 0
                if sent < len(data):
                    tcp.write(memoryview(data)[sent:] if sent else data)
                    queued = tcp.pendingBytes()
        except ssl.SSLError as e:
            if self._reason is None:
                self._reason = Failure(e)
            self._abort()
            return
        finally:
            self._pushing = False
        if plain:
            # More than the transport's bufferSize is queued there: pause
            # a producer registered since it filled up, as it would be
            # paused without us in between.
            tcp.pauseProducerIfFull()
            if not self._awaitingTCP:
                self._awaitingTCP = True
                tcp.whenDrained().addCallback(self._tcpDrained)
            return
        self._plainSent()

    def _tcpDrained(self, _: None) -> None:
        self._awaitingTCP = False
        if self._plain and self._writable():
            self._push()

    def _plainSent(self) -> None:
        """
        All held plaintext was encrypted: its buffers are free; a close
        that waited for it proceeds.
        """
        waiters, self._plainWaiters = self._plainWaiters, []
        for d in waiters:
            d.callback(None)
        if self._plain:
            # A waiter wrote again.
            return
        if self._closeWhenSent:
            self._closeWhenSent = False
            self._sendCloseNotify()
        elif self._halfCloseWhenSent:
            self._halfCloseWhenSent = False
            self.loseWriteConnection()

    def _dropPlain(self) -> None:
        self._plain.clear()
        self._plainBytes = 0
        waiters, self._plainWaiters = self._plainWaiters, []
        for d in waiters:
            d.callback(None)

    # IZeroCopyTransport

    def pendingBytes(self) -> int:
        """
        @return: Plaintext written and not encrypted yet.
        """
        return self._plainBytes

    def whenDrained(self) -> Deferred[None]:
        """
        @return: A Deferred firing once everything written so far was
            encrypted (or dropped, the connection being closed): the
            writer may reuse its buffers.
        """
        if not self._plain:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._plainWaiters.append(d)
        return d

    def _writable(self) -> bool:
        return bool(self.connected) and not (
            self._closeNotifySent or self._aborted or self._reason is not None
        )

    def write(self, data: bytes | memoryview) -> None:
        """
        Encrypt C{data} and send it (over our socket transports, hold it and
        encrypt it as the socket drains: a mutable buffer must not change
        until L{whenDrained} fires); before the handshake completed, keep it
        until then. Data written after the connection closed is dropped.
        """
        if not data or not self._writable():
            return
        if not self._handshakeDone:
            self._pending.append(bytes(data))
            return
        self._send(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """
        Write each of C{data}; small pieces are joined into one record.
        """
        seq = list(data)
        if sum(map(len, seq)) <= WRITE_SIZE:
            self.write(b"".join(seq))
        else:
            for item in seq:
                self.write(item)

    # Closing

    def _sendCloseNotify(self) -> None:
        """
        Send close_notify once, then close TCP after everything written.
        """
        if self._closeNotifySent:
            return
        if self._plain:
            self._closeWhenSent = True
            return
        self._closeNotifySent = True
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            # SSLWantReadError: the peer's close_notify has not arrived; we
            # do not wait for it.
            pass
        self._flush()
        self._transport().loseConnection()

    def _abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self.disconnecting = True
        self._cancelHandshakeTimer()
        self._plain.clear()
        self._plainBytes = 0
        self._transport().abortConnection()

    def loseConnection(self) -> None:
        """
        Close cleanly: send close_notify after all data written, then close
        TCP once it is sent. With a producer registered, wait until it is
        unregistered, as a TCP transport does. Before the handshake completed
        (and with nothing written) there is nothing to close cleanly, so the
        connection is aborted.
        """
        if self.disconnecting or not self.connected:
            return
        self.disconnecting = True
        if not self._handshakeDone:
            if not self._pending:
                self._abort()
            return
        if self._producer is None:
            self._sendCloseNotify()
        else:
            # Stop reading now, as TCP does; close when the producer is done.
            self._transport().pauseProducing()

    def abortConnection(self) -> None:
        """
        Close at once: no close_notify, unsent data is dropped.
        """
        if not self.connected:
            return
        self._abort()

    def loseWriteConnection(self) -> None:
        """
        Send close_notify and half-close TCP; keep reading.
        """
        if self._closeNotifySent or not self._handshakeDone:
            return
        if self._plain:
            self._halfCloseWhenSent = True
            return
        self._closeNotifySent = True
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        self._flush()
        tcp = ITCPTransport(self._tcp, None)
        if tcp is not None:
            tcp.loseWriteConnection()

    # ITCPTransport, ISSLTransport, INegotiated

    def getPeer(self) -> IPv4Address | IPv6Address:
        return cast("IPv4Address | IPv6Address", self._transport().getPeer())

    def getHost(self) -> IPv4Address | IPv6Address:
        return cast("IPv4Address | IPv6Address", self._transport().getHost())

    def getTcpNoDelay(self) -> bool:
        tcp = ITCPTransport(self._tcp, None)
        return bool(tcp.getTcpNoDelay()) if tcp is not None else False

    def setTcpNoDelay(self, enabled: bool) -> None:
        tcp = ITCPTransport(self._tcp, None)
        if tcp is not None:
            tcp.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        tcp = ITCPTransport(self._tcp, None)
        return bool(tcp.getTcpKeepAlive()) if tcp is not None else False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        tcp = ITCPTransport(self._tcp, None)
        if tcp is not None:
            tcp.setTcpKeepAlive(enabled)

    def getPeerCertificate(self) -> object:
        """
        @return: L{None}: clients are not asked for certificates.
        """
        return None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """
        The ALPN protocol selected in the handshake (C{b"http/1.1"}), or
        L{None} before the handshake or if the client did not use ALPN.
        """
        if not self._handshakeDone:
            return None
        selected = self._tls.selected_alpn_protocol()
        return selected.encode("ascii") if selected else None

    @property
    def sslObject(self) -> ssl.SSLObject:
        """
        The C{ssl.SSLObject} of this connection, for C{version()},
        C{cipher()} and the like.
        """
        return self._tls

    # IConsumer: producers pass through to the TCP transport. Plaintext is
    # encrypted as it is written and ciphertext is about the same size, so
    # the TCP transport's buffer pauses and resumes them as it would
    # without TLS.

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._aborted or not self.connected:
            producer.stopProducing()
            return
        self._transport().registerProducer(producer, streaming)
        self._producer = producer

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self._transport().unregisterProducer()
        if self.disconnecting and self._handshakeDone and not self._aborted:
            self._sendCloseNotify()

    # IPushProducer: the wrapped protocol pausing and resuming its input.

    def pauseProducing(self) -> None:
        """
        Stop delivering plaintext and stop reading from TCP.
        """
        if self._readPaused:
            return
        self._readPaused = True
        if not self.disconnecting:
            self._transport().pauseProducing()

    def resumeProducing(self) -> None:
        """
        Deliver plaintext decrypted while paused, then read from TCP again.
        """
        if not self._readPaused:
            return
        self._readPaused = False
        if self._handshakeDone and not self.disconnecting:
            self._deliverPlaintext()
            self._flush()
            if self._peerClosed or self._tcpClosed:
                self._endRead()
        if not (self._readPaused or self.disconnecting or self._tcpClosed or self._peerClosed):
            self._transport().resumeProducing()

    def stopProducing(self) -> None:
        """
        Stop reading for good: the TCP transport closes the connection.
        """
        self._transport().stopProducing()


class TLSServerFactory(ServerFactory):
    """
    Wraps a server factory so its protocols talk TLS, with the stdlib's
    C{ssl} module, to their clients.

    @ivar wrappedFactory: The application's factory.
    @ivar context: The server context; connections made from now on use it.
        Calling C{context.load_cert_chain()} again replaces the certificate
        for new connections.
    @ivar clock: Schedules the handshake deadline.
    @ivar handshakeTimeout: Seconds a client gets to complete the handshake.
    @ivar protocols: The open connections.
    @ivar readView: Where connections decrypt into; shared, since the reactor
        runs one connection at a time and each copies out before delivering.
    """

    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        context: ssl.SSLContext,
        clock: IReactorTime,
        handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.context = context
        self.clock = clock
        self.handshakeTimeout = handshakeTimeout
        self.protocols: set[TLSServerProtocol] = set()
        # Mapped, not zero-filled: an idle listener, or one whose request
        # bodies are decrypted into upload buffers, touches few of its pages.
        self.readView = memoryview(allocate(READ_SIZE))

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (TLS)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> TLSServerProtocol | None:
        """
        @return: A TLS wrapper around the wrapped factory's protocol, or
            L{None} (refusing the connection) if it returned L{None}.
        """
        wrapped = self.wrappedFactory.buildProtocol(cast("IAddress", addr))
        if wrapped is None:
            return None
        return TLSServerProtocol(self, wrapped)

    def registerProtocol(self, protocol: TLSServerProtocol) -> None:
        self.protocols.add(protocol)

    def unregisterProtocol(self, protocol: TLSServerProtocol) -> None:
        self.protocols.discard(protocol)


@implementer(IStreamServerEndpoint)
@frozen
class TLSServerEndpoint:
    """
    Listens on C{wrapped} and speaks TLS to every client.

    @ivar wrapped: The plain stream endpoint, usually TCP.
    @ivar context: From L{makeServerContext}.
    @ivar clock: Schedules handshake deadlines.
    @ivar handshakeTimeout: Seconds a client gets to complete the handshake.
    """

    wrapped: IStreamServerEndpoint
    context: ssl.SSLContext
    clock: IReactorTime
    handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        @return: The wrapped endpoint's C{listen} result, listening with
            C{protocolFactory} behind TLS.
        """
        return self.wrapped.listen(
            TLSServerFactory(protocolFactory, self.context, self.clock, self.handshakeTimeout)
        )
