# -*- test-case-name: tests.test_client_tls -*-
"""
Tests for L{imageio.client._tls}: the client's stdlib TLS, against the
daemon's TLS server on a real loopback socket with the test PKI.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from imageio import _pki
from imageio.client import _tls
from imageio.client._connect import READ_SIZE, SEND_SIZE, UNIX_SNDBUF, tuneSocket
from imageio.web import TLSServerEndpoint, makeServerContext

reactor: Any = _reactor


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Collect(Protocol):
    def __init__(self, expected: int, payload: bytes) -> None:
        self.expected = expected
        self.payload = payload
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)


class _SocketTransport:
    """
    The attributes of a Twisted socket transport that L{tuneSocket} tunes.
    """

    bufferSize = 65536
    SEND_LIMIT = 131072

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


class TuningTests(TestCase):
    def test_unixSocket(self) -> None:
        """
        A UNIX socket connection reads 256 KiB and sends 1 MiB at once, with
        a send buffer of 1 MiB (the kernel reports it doubled).
        """
        a, b = socket.socketpair(socket.AF_UNIX)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        before = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        transport = _SocketTransport(a)
        tuneSocket(transport)
        self.assertEqual(transport.bufferSize, READ_SIZE)
        self.assertEqual(transport.SEND_LIMIT, SEND_SIZE)
        after = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.assertGreater(after, before)
        self.assertGreaterEqual(after, UNIX_SNDBUF)

    def test_tcpSocketKeepsItsBuffer(self) -> None:
        """
        A TCP socket's send buffer is left to the kernel's autotuning.
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        before = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        transport = _SocketTransport(s)
        tuneSocket(transport)
        self.assertEqual(transport.SEND_LIMIT, SEND_SIZE)
        self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), before)


class ContextTests(TestCase):
    def test_unreadableCAFile(self) -> None:
        """
        A CA file that cannot be read is named, as before.
        """
        e = self.assertRaises(ValueError, _tls.makeClientContext, "/nonexistent/ca.pem", True)
        self.assertIn("Cannot read CA file /nonexistent/ca.pem", str(e))

    def test_notACertificate(self) -> None:
        """
        A CA file without certificates is refused.
        """
        path = Path(self.mktemp())
        path.write_text("not a certificate\n")
        e = self.assertRaises(ValueError, _tls.makeClientContext, str(path), True)
        self.assertIn(f"CA file {path}", str(e))

    def test_secure(self) -> None:
        """
        By default the server's certificate and host name are verified, TLS
        1.2 at least.
        """
        pki = _pki.makeTestPKI(self.mktemp())
        context = _tls.makeClientContext(pki.caFile, True)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)

    def test_insecure(self) -> None:
        """
        C{--insecure} verifies nothing but still needs TLS 1.2.
        """
        context = _tls.makeClientContext(None, False)
        self.assertEqual(context.verify_mode, ssl.CERT_NONE)
        self.assertFalse(context.check_hostname)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)


class ConnectionTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.pki = _pki.makeTestPKI(self.mktemp())
        self.port = yield self.listen(self.pki.certFile, self.pki.keyFile)

    @inlineCallbacks
    def listen(self, cert: str, key: str, tcp: Any = None) -> Any:
        server = TLSServerEndpoint(
            tcp or TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            makeServerContext(cert, key),
            reactor,
        )
        port = yield server.listen(Factory.forProtocol(_Echo))
        self.addCleanup(port.stopListening)
        return port

    @inlineCallbacks
    def roundTrip(self, port: Any, host: bytes, cafile: str | None, secure: bool = True) -> Any:
        context = _tls.makeClientContext(cafile, secure)
        hostname = host.decode("ascii").strip("[]")
        address = "::1" if hostname == "::1" else "127.0.0.1"
        payload = bytes(range(256)) * 4096 * 3  # 3 MiB: many records both ways
        collect = _Collect(len(payload), payload)
        factory = _tls.wrapFactory(
            reactor, ClientFactory.forProtocol(lambda: collect), context, hostname
        )
        reactor.connectTCP(address, port.getHost().port, factory, timeout=5)
        try:
            data = yield collect.done
        finally:
            if collect.transport is not None:
                collect.transport.loseConnection()
        self.assertEqual(data, payload)
        return collect

    def test_verified(self) -> None:
        """
        The server's certificate verifies against the CA and its IP address;
        data travels both ways.
        """
        return self.roundTrip(self.port, b"127.0.0.1", self.pki.caFile)

    def test_dnsName(self) -> None:
        """
        A DNS name in the URL is checked against the certificate's names.
        """
        return self.roundTrip(self.port, b"localhost", self.pki.caFile)

    @inlineCallbacks
    def test_ipv6(self) -> Any:
        """
        An IPv6 address in brackets is checked without them.
        """
        try:
            port = yield self.listen(
                self.pki.certFile, self.pki.keyFile, TCP6ServerEndpoint(reactor, 0, interface="::1")
            )
        except CannotListenError:
            raise SkipTest("No IPv6 loopback") from None
        yield self.roundTrip(port, b"[::1]", self.pki.caFile)

    @inlineCallbacks
    def test_wrongName(self) -> Any:
        """
        A certificate that does not name the host fails the connection with
        a certificate error.
        """
        port = yield self.listen(self.pki.wrongNameCertFile, self.pki.wrongNameKeyFile)
        e = yield self.assertFailure(
            self.roundTrip(port, b"127.0.0.1", self.pki.caFile), ssl.SSLCertVerificationError
        )
        self.assertIn("certificate", str(e))

    @inlineCallbacks
    def test_unknownCA(self) -> Any:
        """
        Without the CA (the system's trust store) the test certificate does
        not verify.
        """
        e = yield self.assertFailure(
            self.roundTrip(self.port, b"127.0.0.1", None), ssl.SSLCertVerificationError
        )
        self.assertIn("certificate", str(e))

    def test_insecure(self) -> Any:
        """
        Not secure: a certificate for another name is accepted.
        """

        @inlineCallbacks
        def run() -> Any:
            port = yield self.listen(self.pki.wrongNameCertFile, self.pki.wrongNameKeyFile)
            yield self.roundTrip(port, b"127.0.0.1", None, secure=False)

        return run()
