# -*- test-case-name: tests.test_backends -*-
"""
Tests for L{imageio.backends}: choosing a backend module by URL scheme.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imageio.backends import SCHEMES, UnsupportedScheme, openerFor
from imageio.tickets import TICKET_SCHEMES


class SchemeTests(SynchronousTestCase):
    """
    The schemes tickets accept and the schemes backends serve agree.
    """

    def test_everyTicketSchemeHasABackend(self) -> None:
        """
        Every scheme a ticket may name (L{imageio.tickets.TICKET_SCHEMES})
        opens a backend: a valid ticket never fails for want of one.
        """
        self.assertEqual(TICKET_SCHEMES - set(SCHEMES), set())
        for scheme in TICKET_SCHEMES:
            self.assertTrue(callable(openerFor(f"{scheme}://host/path")))

    def test_memoryIsNotATicketScheme(self) -> None:
        """
        The in-memory backend serves tests only: tickets cannot name it.
        """
        self.assertIn("memory", SCHEMES)
        self.assertNotIn("memory", TICKET_SCHEMES)

    def test_unknownScheme(self) -> None:
        """
        A scheme without a backend raises L{UnsupportedScheme} naming it.
        """
        e = self.assertRaises(UnsupportedScheme, openerFor, "gopher://host/x")
        self.assertEqual(str(e), "Unsupported url scheme: gopher")
