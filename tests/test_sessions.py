"""
Tests for L{imageio.proxy._sessions}.
"""

from __future__ import annotations

import base64
import json
import re

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imageio.proxy import _sessions
from imageio.proxy._sessions import (
    INVALID_SESSION,
    SESSION_KEY_SIZE,
    InvalidSession,
    SessionManager,
    randomSessionKey,
    sessionKeyFromFile,
)
from imageio.proxy._signedticket import Claims, TicketVerifier
from tests import engine
from tests.engine import NOW

KEY = b"k" * SESSION_KEY_SIZE
OTHER_KEY = b"o" * SESSION_KEY_SIZE


def makeClaims(expires: int = NOW + 300) -> Claims:
    """
    Claims as the verifier returns them for an engine ticket.
    """
    return Claims(
        transferTicket=engine.TRANSFER_TICKET,
        imagedURI=engine.IMAGED_URI,
        notBefore=NOW,
        expires=expires,
        issuedAt=NOW,
        transferID=engine.TRANSFER_ID,
    )


def makeClock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SessionTests(SynchronousTestCase):
    """
    Session ids carry verifiable claims.
    """

    def setUp(self) -> None:
        self.clock = makeClock()
        self.sessions = SessionManager(KEY, self.clock.seconds)

    def test_roundTrip(self) -> None:
        """
        A session id gives back the claims it was made from.
        """
        claims = makeClaims()
        self.assertEqual(self.sessions.lookup(self.sessions.create(claims)), claims)

    def test_optionalClaims(self) -> None:
        """
        Claims without C{iat} and C{transfer-id} round-trip too.
        """
        claims = Claims(engine.TRANSFER_TICKET, engine.IMAGED_URI, NOW, NOW + 300)
        self.assertEqual(self.sessions.lookup(self.sessions.create(claims)), claims)

    def test_fromTicket(self) -> None:
        """
        Claims from a verified engine ticket make a working session.
        """
        verifier = TicketVerifier(engine.engine().pem, clock=self.clock.seconds)
        claims = verifier.verify(engine.makeTicket(v2=True))
        found = self.sessions.lookup(self.sessions.create(claims))
        self.assertEqual(found, claims)
        self.assertEqual(found.payload["transfer-ticket"], engine.TRANSFER_TICKET)

    def test_unique(self) -> None:
        """
        Each session gets its own id, even for the same claims.
        """
        claims = makeClaims()
        self.assertNotEqual(self.sessions.create(claims), self.sessions.create(claims))

    def test_urlSafe(self) -> None:
        """
        Session ids fit in a header and in a query string unescaped.
        """
        sessionID = self.sessions.create(makeClaims())
        self.assertTrue(re.fullmatch(r"[A-Za-z0-9_.-]+", sessionID))
        self.assertLess(len(sessionID), 1000)

    def test_tamperedClaims(self) -> None:
        """
        Changing the claims (a later C{exp}, another ticket) invalidates the
        id.
        """
        sessionID = self.sessions.create(makeClaims())
        encoded, mac = sessionID.split(".")
        body = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        for name, value in (("exp", NOW + 10**6), ("transfer-ticket", "other")):
            forged = b64url(json.dumps({**body, name: value}).encode())
            self.assertRaises(InvalidSession, self.sessions.lookup, f"{forged}.{mac}")

    def test_tamperedIDs(self) -> None:
        """
        Altered, truncated or malformed ids are refused.
        """
        sessionID = self.sessions.create(makeClaims())
        encoded, mac = sessionID.split(".")
        flipped = "A" if mac[0] != "A" else "B"
        for forged in (
            f"{encoded}.{flipped}{mac[1:]}",
            f"{encoded[:-1]}.{mac}",
            f"{encoded}.{mac[:-1]}",
            f"{encoded}.{mac}.",
            f"{encoded}{mac}",
            f".{mac}",
            f"{encoded}.",
            "",
            " " + sessionID,
            sessionID + "\n",
            sessionID.replace(".", "\u2024"),
            "x" * 10000,
        ):
            self.assertRaises(InvalidSession, self.sessions.lookup, forged)

    def test_nonCanonicalMAC(self) -> None:
        """
        The MAC must be canonical base64url: other spellings of the same bytes
        are refused.
        """
        sessionID = self.sessions.create(makeClaims())
        encoded, mac = sessionID.split(".")
        last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        # 43 characters hold 258 bits: the last one's low 2 bits are unused.
        index = last.index(mac[-1])
        self.assertEqual(index % 4, 0)
        variant = mac[:-1] + last[index + 1]
        self.assertRaises(InvalidSession, self.sessions.lookup, f"{encoded}.{variant}")
        self.sessions.lookup(sessionID)

    def test_expired(self) -> None:
        """
        A session expires with its ticket's C{exp}.
        """
        sessionID = self.sessions.create(makeClaims(expires=NOW + 300))
        self.clock.advance(299)
        self.sessions.lookup(sessionID)
        self.clock.advance(1)
        self.assertRaises(InvalidSession, self.sessions.lookup, sessionID)

    def test_skew(self) -> None:
        """
        The allowed skew keeps a session valid that long past C{exp}.
        """
        sessions = SessionManager(KEY, self.clock.seconds, allowedSkew=30)
        sessionID = sessions.create(makeClaims(expires=NOW + 300))
        self.clock.advance(329)
        sessions.lookup(sessionID)
        self.clock.advance(1)
        self.assertRaises(InvalidSession, sessions.lookup, sessionID)

    def test_skewBounds(self) -> None:
        """
        The skew is bounded as for tickets.
        """
        for skew in (-1, 301, True):
            self.assertRaises(ValueError, SessionManager, KEY, self.clock.seconds, skew)

    def test_message(self) -> None:
        """
        L{InvalidSession} says upstream's 401 text.
        """
        error = self.assertRaises(InvalidSession, self.sessions.lookup, "x")
        self.assertEqual(str(error), "Invalid session id or session expired")
        self.assertEqual(str(error), INVALID_SESSION)


class RevocationTests(SynchronousTestCase):
    """
    C{DELETE /sessions/<id>} revokes a session on this replica.
    """

    def setUp(self) -> None:
        self.clock = makeClock()
        self.sessions = SessionManager(KEY, self.clock.seconds)

    def test_revoked(self) -> None:
        """
        A revoked session is refused; others are not affected.
        """
        revoked = self.sessions.create(makeClaims())
        kept = self.sessions.create(makeClaims())
        self.sessions.revoke(revoked)
        self.assertRaises(InvalidSession, self.sessions.lookup, revoked)
        self.sessions.lookup(kept)

    def test_revokeTwice(self) -> None:
        """
        Revoking a revoked session fails, so the second DELETE answers 404.
        """
        sessionID = self.sessions.create(makeClaims())
        self.sessions.revoke(sessionID)
        self.assertRaises(InvalidSession, self.sessions.revoke, sessionID)

    def test_revokeInvalid(self) -> None:
        """
        Ids that are not valid sessions cannot be revoked, and are not
        remembered.
        """
        self.assertRaises(InvalidSession, self.sessions.revoke, "junk.junk")
        other = SessionManager(OTHER_KEY, self.clock.seconds).create(makeClaims())
        self.assertRaises(InvalidSession, self.sessions.revoke, other)
        self.assertEqual(self.sessions.revokedCount, 0)

    def test_revokeExpired(self) -> None:
        """
        An expired session cannot be revoked.
        """
        sessionID = self.sessions.create(makeClaims(expires=NOW + 10))
        self.clock.advance(10)
        self.assertRaises(InvalidSession, self.sessions.revoke, sessionID)

    def test_pruned(self) -> None:
        """
        Revoked sessions are forgotten some time after they expire, and stay
        refused.
        """
        early = self.sessions.create(makeClaims(expires=NOW + 10))
        late = self.sessions.create(makeClaims(expires=NOW + 1000))
        self.sessions.revoke(early)
        self.sessions.revoke(late)
        self.assertEqual(self.sessions.revokedCount, 2)
        self.clock.advance(10 + _sessions._REVOKED_GRACE)
        self.assertRaises(InvalidSession, self.sessions.lookup, early)
        self.assertEqual(self.sessions.revokedCount, 1)
        self.assertRaises(InvalidSession, self.sessions.lookup, late)
        self.clock.advance(1000)
        self.assertRaises(InvalidSession, self.sessions.lookup, late)
        self.assertEqual(self.sessions.revokedCount, 0)

    def test_prunedLateAfterClockStep(self) -> None:
        """
        A revoked session is still remembered just after it expires, so a
        clock stepping back a little does not revive it.
        """
        sessionID = self.sessions.create(makeClaims(expires=NOW + 10))
        self.sessions.revoke(sessionID)
        self.clock.advance(20)
        self.assertRaises(InvalidSession, self.sessions.lookup, sessionID)
        self.clock.rightNow -= 15
        self.assertRaises(InvalidSession, self.sessions.lookup, sessionID)


class ReplicaTests(SynchronousTestCase):
    """
    Replicas share sessions through their key, not through state.
    """

    def test_sameKey(self) -> None:
        """
        A replica with the same key accepts another replica's session.
        """
        clock = makeClock()
        first = SessionManager(KEY, clock.seconds)
        second = SessionManager(KEY, clock.seconds)
        claims = makeClaims()
        self.assertEqual(second.lookup(first.create(claims)), claims)

    def test_otherKey(self) -> None:
        """
        A replica with a different key refuses the session.
        """
        clock = makeClock()
        first = SessionManager(KEY, clock.seconds)
        other = SessionManager(OTHER_KEY, clock.seconds)
        self.assertRaises(InvalidSession, other.lookup, first.create(makeClaims()))

    def test_randomKeys(self) -> None:
        """
        Managers with random keys do not accept each other's sessions.
        """
        clock = makeClock()
        first = SessionManager.withRandomKey(clock.seconds)
        second = SessionManager.withRandomKey(clock.seconds)
        sessionID = first.create(makeClaims())
        first.lookup(sessionID)
        self.assertRaises(InvalidSession, second.lookup, sessionID)

    def test_revocationIsPerReplica(self) -> None:
        """
        Revocation is not shared: another replica with the same key still
        accepts a session revoked elsewhere, until it expires.
        """
        clock = makeClock()
        first = SessionManager(KEY, clock.seconds)
        second = SessionManager(KEY, clock.seconds)
        sessionID = first.create(makeClaims())
        first.revoke(sessionID)
        self.assertRaises(InvalidSession, first.lookup, sessionID)
        second.lookup(sessionID)


class KeyTests(SynchronousTestCase):
    """
    Session keys.
    """

    def test_shortKey(self) -> None:
        """
        Keys shorter than L{SESSION_KEY_SIZE} bytes are refused.
        """
        self.assertRaises(ValueError, SessionManager, b"k" * 31, makeClock().seconds)
        self.assertRaises(ValueError, sessionKeyFromFile, b"k" * 31 + b"\n")

    def test_keyFromFile(self) -> None:
        """
        A key file's contents, without surrounding whitespace, are the key.
        """
        self.assertEqual(sessionKeyFromFile(b" " + KEY + b"\n"), KEY)

    def test_randomKey(self) -> None:
        """
        Random keys have L{SESSION_KEY_SIZE} bytes and differ.
        """
        self.assertEqual(len(randomSessionKey()), SESSION_KEY_SIZE)
        self.assertNotEqual(randomSessionKey(), randomSessionKey())

    def test_keyNotInRepr(self) -> None:
        """
        The key does not appear in the manager's repr (which may be logged).
        """
        self.assertNotIn("kkkk", repr(SessionManager(KEY, makeClock().seconds)))


class MessageTests(SynchronousTestCase):
    """
    Upstream's texts for the proxy's 401 and 403 answers.
    """

    def test_texts(self) -> None:
        """
        The texts are upstream's, word for word.
        """
        self.assertEqual(
            _sessions.COULD_NOT_INITIALIZE_SESSION.format(reason="expired ticket"),
            "Could not initialize session: expired ticket",
        )
        self.assertEqual(_sessions.INVALID_SESSION, "Invalid session id or session expired")
        self.assertEqual(_sessions.NO_SUCH_SESSION, "No such session")
        self.assertEqual(_sessions.NOT_AUTHORIZED, "Not authorized")
        self.assertEqual(
            _sessions.NOT_AUTHORIZED_REASON.format(reason="invalid signature"),
            "Not authorized (invalid signature)",
        )
        self.assertEqual(_sessions.NOT_AUTHORIZED_EXPIRED, "Not authorized (expired ticket)")
        self.assertEqual(
            _sessions.NOT_AUTHORIZED_NO_TICKET, "Not authorized (Ticket doesn't exists)"
        )
        self.assertEqual(
            _sessions.ERROR_VERIFYING_TICKET.format(reason="malformed base64"),
            "Error verifying signed ticket: malformed base64",
        )
