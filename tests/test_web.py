# -*- test-case-name: tests.test_web -*-
"""
Tests for L{imageio.web}'s surface and for L{imageio.web.httpErrorFor}, the
one place domain errors become HTTP statuses.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

import imageio.web
from imageio.interfaces import (
    HostError,
    HostInvalid,
    HostTimedOut,
    HostUnavailable,
    RemoteError,
    UnsupportedOperation,
)
from imageio.web import HTTPError, httpErrorFor


class SurfaceTests(SynchronousTestCase):
    """
    C{imageio.web} publishes what the layers above use.
    """

    def test_allNamesExist(self) -> None:
        """
        Every name in C{imageio.web.__all__} is defined, and comes from a
        private module of the package.
        """
        for name in imageio.web.__all__:
            value = getattr(imageio.web, name)
            module = getattr(value, "__module__", "imageio.web._")
            self.assertTrue(module.startswith("imageio.web._"), f"{name}: {module}")


class HTTPErrorForTests(SynchronousTestCase):
    """
    Domain errors map to the statuses clients of upstream expect.
    """

    def test_httpErrorItself(self) -> None:
        """
        An L{HTTPError} is its own answer.
        """
        e = HTTPError(400, "bad")
        self.assertIs(httpErrorFor(e), e)

    def test_remoteError(self) -> None:
        """
        Another daemon's refusal keeps its status, text and
        C{Content-Range}; its 403 closes the connection, as upstream does.
        """
        e = httpErrorFor(RemoteError(416, "Requested range not satisfiable", b"bytes */10"))
        assert e is not None
        self.assertEqual(
            (e.status, e.message, list(e.headers), e.close),
            (416, "Requested range not satisfiable", [(b"content-range", b"bytes */10")], False),
        )
        forbidden = httpErrorFor(RemoteError(403, "no"))
        assert forbidden is not None
        self.assertEqual((forbidden.status, forbidden.close), (403, True))

    def test_hostErrors(self) -> None:
        """
        Unreachable is 503, too slow 504, misbehaving 502; the message and
        the close flag are kept.
        """
        cases = [
            (HostUnavailable("Failed communicating with host: refused"), 503),
            (HostTimedOut("Timed out waiting for host"), 504),
            (HostInvalid("Unexpected response from host: 201", close=True), 502),
            (HostError("other"), 503),
        ]
        for error, status in cases:
            mapped = httpErrorFor(error)
            assert mapped is not None
            self.assertEqual(
                (mapped.status, mapped.message, mapped.close),
                (status, error.message, error.close),
            )

    def test_others(self) -> None:
        """
        Anything else is the caller's business: C{None}.
        """
        for error in (UnsupportedOperation("x"), OSError(5, "EIO"), ValueError(), None):
            self.assertIsNone(httpErrorFor(error))
