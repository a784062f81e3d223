# -*- test-case-name: tests.test_httpclient -*-
"""
Tests for L{imageio.backends.httpclient}: the HTTP client for daemons
shared by the C{https:} backend and the proxy: error classification, its
limits, request bodies and the silence watchdog.
"""

from __future__ import annotations

import ssl

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from imageio.backends import httpclient
from imageio.backends.httpclient import (
    MAX_ERROR_TEXT,
    BadResponse,
    BytesProducer,
    ReadTimeout,
    hostError,
    remoteError,
)
from imageio.interfaces import HostError, HostInvalid, HostTimedOut, HostUnavailable, RemoteError
from imageio.web import httpErrorFor


def status(e: HostError | RemoteError) -> tuple[int, str]:
    """
    @return: The status and text the web layer answers C{e} with.
    """
    mapped = httpErrorFor(e)
    assert mapped is not None
    return mapped.status, mapped.message


class FakeResponse:
    """
    Enough of L{twisted.web.iweb.IResponse} for L{remoteError}.
    """

    def __init__(self, code: int, phrase: bytes = b"", headers: Headers | None = None) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers or Headers()


class LimitsTests(SynchronousTestCase):
    """
    One set of limits for both users of the client.
    """

    def test_oneSetOfLimits(self) -> None:
        """
        The backend and the proxy relay use the client's timeouts and caps,
        not their own.
        """
        from imageio.backends import http
        from imageio.proxy import _relay

        for name in ("READ_TIMEOUT", "MAX_ERROR_TEXT", "CACHED_CONNECTION_TIMEOUT"):
            ours = getattr(httpclient, name)
            for module in (http, _relay):
                self.assertIs(getattr(module, name, ours), ours, f"{module.__name__}.{name}")
        self.assertEqual(httpclient.READ_TIMEOUT, 120.0)
        self.assertEqual(httpclient.MAX_ERROR_TEXT, 4096)


class RemoteErrorTests(SynchronousTestCase):
    def test_statusTextAndRange(self) -> None:
        """
        A daemon's error answer keeps its status, text (without the final
        newline) and C{Content-Range}; 403 closes the client connection.
        """
        response = FakeResponse(416, headers=Headers({b"content-range": [b"bytes */100"]}))
        e = remoteError(response, b"Requested range not satisfiable\n")  # type: ignore[arg-type]
        self.assertEqual(
            (e.status, e.text, e.contentRange),
            (416, "Requested range not satisfiable", b"bytes */100"),
        )
        mapped = httpErrorFor(e)
        assert mapped is not None
        self.assertEqual(list(mapped.headers), [(b"content-range", b"bytes */100")])
        self.assertFalse(mapped.close)
        forbidden = httpErrorFor(remoteError(FakeResponse(403), b"no"))  # type: ignore[arg-type]
        assert forbidden is not None
        self.assertTrue(forbidden.close)

    def test_textCapped(self) -> None:
        """
        At most L{MAX_ERROR_TEXT} bytes of the daemon's text are relayed.
        """
        e = remoteError(FakeResponse(500), b"x" * (MAX_ERROR_TEXT + 10))  # type: ignore[arg-type]
        self.assertEqual(len(e.text), MAX_ERROR_TEXT)

    def test_emptyTextUsesPhrase(self) -> None:
        """
        Without a text, the status phrase is the message.
        """
        e = remoteError(FakeResponse(404, b"Not Found"), b"")  # type: ignore[arg-type]
        self.assertEqual(e.text, "Not Found")


class HostErrorTests(SynchronousTestCase):
    def test_connectTimeout(self) -> None:
        """
        A connect timeout is 504 C{Timed out connecting to host}.
        """
        e = hostError(Failure(error.TimeoutError()))
        self.assertIsInstance(e, HostTimedOut)
        self.assertEqual(status(e), (504, "Timed out connecting to host"))

    def test_readTimeout(self) -> None:
        """
        A read timeout, ours or a Deferred's, is 504 C{Timed out waiting for host}.
        """
        for exc in (ReadTimeout("x"), defer.TimeoutError()):
            e = hostError(Failure(ResponseFailed([Failure(exc)])))
            self.assertIsInstance(e, HostTimedOut)
            self.assertEqual(status(e), (504, "Timed out waiting for host"))

    def test_refused(self) -> None:
        """
        A refused connection is 503.
        """
        e = hostError(Failure(error.ConnectionRefusedError()))
        self.assertIsInstance(e, HostUnavailable)
        code, message = status(e)
        self.assertEqual(code, 503)
        self.assertTrue(message.startswith("Failed communicating with host: "))

    def test_wrapped(self) -> None:
        """
        Failures wrapped by the HTTP client are unwrapped.
        """
        wrapped = ResponseNeverReceived([Failure(error.ConnectionLost("gone"))])
        self.assertEqual(status(hostError(Failure(wrapped)))[0], 503)

    def test_badResponse(self) -> None:
        """
        An answer outside the images API is L{HostInvalid}: 502.
        """
        e = hostError(Failure(ResponseFailed([Failure(BadResponse("bad extents"))])))
        self.assertIsInstance(e, HostInvalid)
        self.assertEqual(status(e), (502, "Invalid response from host: bad extents"))

    def test_certificateErrors(self) -> None:
        """
        A certificate the client cannot verify, from pyOpenSSL or from the
        standard library's C{ssl}, is L{HostInvalid} naming the cause.
        """
        for exc in (SSL.Error("certificate verify failed"), ssl.SSLError(1, "bad cert")):
            e = hostError(Failure(ResponseNeverReceived([Failure(exc)])))
            self.assertIsInstance(e, HostInvalid)
            self.assertTrue(str(e).startswith("Cannot verify the host's TLS certificate: "), e)

    def test_domainErrorsKept(self) -> None:
        """
        A L{RemoteError} or L{HostError} is passed through.
        """
        for original in (RemoteError(403, "no"), HostInvalid("odd")):
            self.assertIs(hostError(Failure(original)), original)


class BytesProducerTests(SynchronousTestCase):
    def test_pauseAndResume(self) -> None:
        """
        The producer writes in pieces, stops while paused, and finishes
        once everything was written.
        """
        data = bytes(range(256)) * 4096  # 1 MiB
        producer = BytesProducer(memoryview(data))
        self.assertEqual(producer.length, len(data))
        consumer = StringTransport()
        writes: list[int] = []

        def write(chunk: bytes) -> None:
            writes.append(len(chunk))
            StringTransport.write(consumer, chunk)
            producer.pauseProducing()

        consumer.write = write  # type: ignore[method-assign]
        done = producer.startProducing(consumer)
        self.assertEqual(writes, [httpclient.WRITE_CHUNK])
        self.assertNoResult(done)
        while not done.called:
            producer.resumeProducing()
        self.successResultOf(done)
        self.assertEqual(consumer.value(), data)

    def test_stopped(self) -> None:
        """
        A stopped producer writes nothing more and never fires.
        """
        producer = BytesProducer(b"x" * (3 * httpclient.WRITE_CHUNK))
        consumer = StringTransport()
        consumer.write = lambda chunk: producer.pauseProducing()  # type: ignore[method-assign]
        done = producer.startProducing(consumer)
        producer.stopProducing()
        producer.resumeProducing()
        self.assertNoResult(done)


class WatchdogTests(SynchronousTestCase):
    def test_fires(self) -> None:
        """
        The watchdog fires once the timeout (and at most half as much again)
        passed without kicks, not before.
        """
        clock = Clock()
        fired: list[bool] = []
        dog = httpclient.Watchdog(clock, 10, lambda: fired.append(True))
        dog.kick()
        clock.pump([1] * 9)
        dog.kick()
        clock.pump([1] * 10)
        self.assertEqual(fired, [])
        clock.pump([1] * 5)
        self.assertEqual(fired, [True])
        self.assertEqual(clock.getDelayedCalls(), [])
