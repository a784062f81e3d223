"""
Tests for the log lines an operator reads when a transfer is refused or
fails: one line at the default level, ticket ids shortened.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imageio import _log
from tests._http import ImagesHarness, request

TICKET = "0123456789abcdef-secret-ticket-id"


class ImagesLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ImagesHarness()
        self.addCleanup(self.h.cleanup)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(_log.setLevel, _log.currentLevel().name)
        _log.setLevel("info")

    def lines(self) -> list[tuple[str, str]]:
        return [
            (e["log_level"].name, formatEvent(e))
            for e in self.events
            if e.get("log_namespace", "").startswith("imageio")
        ]

    def assertOneLine(self, level: str, *parts: str) -> None:
        lines = self.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(lines[0][0], level, lines)
        for part in parts:
            self.assertIn(part, lines[0][1])
        self.assertNotIn(TICKET, lines[0][1])

    def test_forbidden(self) -> None:
        """
        A refused request (no such ticket) is one INFO line with the status
        and reason, the ticket id shortened in both.
        """
        response = self.h.roundTrip(request(b"GET", f"/images/{TICKET}".encode()))
        self.assertEqual(response.status, 403)
        self.assertOneLine("info", "GET /images/01234567... 403", "No such ticket 01234567...")

    def test_notFoundAndRange(self) -> None:
        """
        404 and 416 are INFO lines too.
        """
        self.h.addTicket(b"x" * 10, uuid=TICKET, transfer_id="tr")
        del self.events[:]
        response = self.h.roundTrip(
            request(b"GET", f"/images/{TICKET}/extents?context=dirty".encode())
        )
        self.assertEqual(response.status, 404)
        self.assertOneLine("info", "GET /images/01234567.../extents 404", "dirty extents")
        del self.events[:]
        response = self.h.roundTrip(
            request(b"GET", f"/images/{TICKET}".encode(), {b"Range": b"bytes=20-30"})
        )
        self.assertEqual(response.status, 416)
        self.assertOneLine("info", "GET /images/01234567... 416")

    def test_successStaysDebug(self) -> None:
        """
        Successful data requests stay at DEBUG: thousands a second.
        """
        self.h.addTicket(b"x" * 10, uuid=TICKET, transfer_id="tr")
        del self.events[:]
        response = self.h.roundTrip(request(b"GET", f"/images/{TICKET}".encode()))
        self.assertEqual(response.status, 200)
        self.assertEqual(self.lines(), [])

    def test_missingImageFile(self) -> None:
        """
        A ticket whose image file is missing fails with ERROR lines naming
        the file and the reason, never a CRITICAL traceback.
        """
        from imageio.backends import BackendContext, BackendOpener
        from imageio.daemon.images import ImagesService, imagesResource
        from imageio.web import ImageioSite

        h = self.h
        opener = BackendOpener(BackendContext(reactor=h.clock, diskio=h.diskio, bufferSize=4096))
        h.service = ImagesService(
            registry=h.registry,
            opener=opener,
            clock=h.clock,
            runInPool=h.diskio.run,
            bufferSize=8192,
            unixSocket=None,
        )
        h.site = ImageioSite(imagesResource(h.service), "remote", reactor=h.clock)
        ticket = h.addTicket(b"", uuid=TICKET, size=4096, transfer_id="tr")
        ticket.url = "file:///nonexistent/imageio-test/disk.raw"
        del self.events[:]
        response = h.roundTrip(request(b"GET", f"/images/{TICKET}".encode()))
        self.assertEqual(response.status, 500)
        lines = self.lines()
        self.assertTrue(lines, lines)
        self.assertEqual({level for level, _ in lines}, {"error"}, lines)
        text = "\n".join(line for _, line in lines)
        self.assertIn("/nonexistent/imageio-test/disk.raw", text)
        self.assertIn("No such file or directory", text)
        self.assertIn("GET /images/01234567... 500", text)
        self.assertNotIn(TICKET, text)
        self.assertFalse([e for e in self.events if e.get("log_failure") is not None])
