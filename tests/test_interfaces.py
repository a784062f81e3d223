# -*- test-case-name: tests.test_interfaces -*-
"""
Tests for L{imageio.interfaces}: the value types and domain errors shared
by every layer, and that the implementations provide the interfaces.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio.control import Metrics
from imageio.interfaces import Extent, HostTimedOut, IMetrics, RemoteError


class ExtentTests(SynchronousTestCase):
    def test_wireForm(self) -> None:
        """
        Zero extents carry C{hole}; dirty extents carry C{dirty} instead, in
        upstream's key order.
        """
        self.assertEqual(
            list(Extent(0, 4, zero=True).toJSON().items()),
            [("start", 0), ("length", 4), ("zero", True), ("hole", False)],
        )
        self.assertEqual(
            list(Extent(0, 4, zero=False, dirty=True).toJSON()),
            ["start", "length", "dirty", "zero"],
        )


class DomainErrorTests(SynchronousTestCase):
    def test_remoteError(self) -> None:
        """
        A L{RemoteError} reads as the daemon's status and text.
        """
        e = RemoteError(403, "no")
        self.assertEqual((str(e), e.contentRange), ("403 no", None))

    def test_hostError(self) -> None:
        """
        A L{HostError} reads as its message and does not close by default.
        """
        e = HostTimedOut("Timed out waiting for host")
        self.assertEqual((str(e), e.message, e.close), (e.message, e.message, False))


class MetricsTests(SynchronousTestCase):
    def test_provides(self) -> None:
        """
        L{Metrics} provides L{IMetrics}, which the web layer's site uses.
        """
        self.assertTrue(verifyObject(IMetrics, Metrics()))
