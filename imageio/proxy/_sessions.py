# -*- test-case-name: tests.test_sessions -*-
"""
Proxy sessions that carry their own proof.

Upstream's 1.x proxy kept sessions in memory, so a client had to come back to
the same process. Here a session id is the claims of the verified signed
ticket plus an HMAC over them::

    base64url(claims JSON) "." base64url(HMAC-SHA256(key, label + part 1))

Any proxy replica that has the same key can check a session id without
shared state. The key comes from C{[proxy] session_key_file}; without one,
L{SessionManager.withRandomKey} makes a random per-process key, and then
sessions do not survive a restart and are not accepted by other replicas.

The claims are signed, not encrypted: the client can read them. They hold
nothing the client did not already have in its signed ticket (whose payload
is plain base64), but a session id does contain the transfer ticket id,
which is a credential for the daemon: do not log session ids.

Revocation (C{DELETE /sessions/<id>}) is kept in memory, per replica: another
replica keeps accepting a revoked session id until it expires. A session
never outlives its ticket's C{exp}.

This module also holds upstream's texts for the proxy's 401 and 403 answers
(wire contract 4.1, 4.2), so that the HTTP layer says exactly what upstream
said.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import os
import re
from collections.abc import Callable
from typing import NoReturn

from attrs import define, field

from imageio.proxy._signedticket import MAX_ALLOWED_SKEW, Claims
from imageio.ranges import parseJSONInteger

#: 401 when C{POST /sessions/} gets a ticket that does not verify; format
#: with C{reason}.
COULD_NOT_INITIALIZE_SESSION = "Could not initialize session: {reason}"

#: 401 for a session id that does not verify, has expired or was revoked.
INVALID_SESSION = "Invalid session id or session expired"

#: 404 for C{DELETE /sessions/<id>} with an unknown session.
NO_SUCH_SESSION = "No such session"

#: 401 when a request carries neither a ticket nor a session.
NOT_AUTHORIZED = "Not authorized"

#: 401 when a ticket in C{Authorization} does not verify; format with
#: C{reason}.
NOT_AUTHORIZED_REASON = "Not authorized ({reason})"

#: 401 when the stored ticket's C{exp} has passed.
NOT_AUTHORIZED_EXPIRED = "Not authorized (expired ticket)"

#: 401 when no ticket is stored and none was sent (upstream's wording).
NOT_AUTHORIZED_NO_TICKET = "Not authorized (Ticket doesn't exists)"

#: 403 for C{PUT /tickets/} with a ticket that does not verify; format with
#: C{reason}.
ERROR_VERIFYING_TICKET = "Error verifying signed ticket: {reason}"

#: Size of keys made by L{randomSessionKey}, and the least accepted.
SESSION_KEY_SIZE = 32

#: Longest session id looked at; real ones are about 400 characters.
MAX_SESSION_ID_SIZE = 4096

# Binds the MAC to this use and format, should the key be reused elsewhere.
_MAC_LABEL = b"imageio proxy session v1\x00"
_VERSION = 1
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}")
_NONCE_SIZE = 16

# Revoked sessions are remembered this long past their expiry, in case the
# clock steps back.
_REVOKED_GRACE = 300


class InvalidSession(Exception):
    """
    A session id did not verify, has expired, or was revoked.

    C{str()} is upstream's 401 text, L{INVALID_SESSION}.
    """

    def __str__(self) -> str:
        return INVALID_SESSION


def _fail() -> NoReturn:
    raise InvalidSession()


def randomSessionKey() -> bytes:
    """
    A new random session key, for a single process.
    """
    return os.urandom(SESSION_KEY_SIZE)


def sessionKeyFromFile(contents: bytes) -> bytes:
    """
    The session key from the contents of C{[proxy] session_key_file}.

    The whole file, without surrounding whitespace, is the key, so any
    format works as long as it is long and random enough; for example
    C{head -c 32 /dev/urandom | base64 > session.key}. Give all replicas the
    same file, readable only by the service.

    @raise ValueError: If the key is shorter than L{SESSION_KEY_SIZE} bytes.
    """
    key = contents.strip()
    if len(key) < SESSION_KEY_SIZE:
        raise ValueError(f"A session key needs at least {SESSION_KEY_SIZE} bytes")
    return key


def _checkKey(instance: object, attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) < SESSION_KEY_SIZE:
        raise ValueError(f"A session key needs at least {SESSION_KEY_SIZE} bytes")


def _checkSkew(instance: object, attribute: object, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_ALLOWED_SKEW:
        raise ValueError(f"allowedSkew must be an integer from 0 to {MAX_ALLOWED_SKEW} seconds")


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    """
    Decode canonical unpadded base64url.
    """
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        _fail()
    if _encode(data) != text:
        _fail()
    return data


@define
class SessionManager:
    """
    Create and check self-proving session ids.

    @ivar key: The HMAC key, at least L{SESSION_KEY_SIZE} bytes, shared by the
        replicas that should accept each other's sessions.
    @ivar clock: Returns the current time in epoch seconds.
    @ivar allowedSkew: Seconds a session stays valid past its C{exp}, from 0
        to L{MAX_ALLOWED_SKEW}; use the ticket verifier's value.
    @ivar randomBytes: Returns that many random bytes, for nonces.
    """

    key: bytes = field(repr=False, validator=_checkKey)
    clock: Callable[[], float]
    allowedSkew: int = field(default=0, validator=_checkSkew)
    randomBytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)
    # nonce -> expires, and a heap of (expires, nonce) to prune in order.
    _revoked: dict[str, int] = field(init=False, factory=dict, repr=False)
    _revokedHeap: list[tuple[int, str]] = field(init=False, factory=list, repr=False)

    @classmethod
    def withRandomKey(cls, clock: Callable[[], float], allowedSkew: int = 0) -> SessionManager:
        """
        A manager with a random key: its sessions are valid only in this
        process, until it exits.
        """
        return cls(randomSessionKey(), clock, allowedSkew)

    @property
    def revokedCount(self) -> int:
        """
        How many revoked sessions are remembered (they are forgotten once
        expired).
        """
        return len(self._revoked)

    def create(self, claims: Claims) -> str:
        """
        Make a session id for verified ticket claims; it expires with them.

        @return: The session id, URL-safe (C{[A-Za-z0-9_.-]}).
        """
        body: dict[str, object] = {
            "v": _VERSION,
            "n": _encode(self.randomBytes(_NONCE_SIZE)),
            "transfer-ticket": claims.transferTicket,
            "imaged-uri": claims.imagedURI,
            "nbf": claims.notBefore,
            "exp": claims.expires,
        }
        if claims.issuedAt is not None:
            body["iat"] = claims.issuedAt
        if claims.transferID is not None:
            body["transfer-id"] = claims.transferID
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        encoded = _encode(text.encode("utf-8"))
        return f"{encoded}.{_encode(self._mac(encoded))}"

    def lookup(self, sessionID: str) -> Claims:
        """
        Check a session id and return the claims it carries.

        The payload of the returned claims holds only the claims above, not
        the whole original payload.

        @raise InvalidSession: If the id was not made with this key, has
            expired (beyond the allowed skew) or was revoked here.
        """
        claims, nonce = self._open(sessionID)
        if nonce in self._revoked:
            _fail()
        return claims

    def revoke(self, sessionID: str) -> None:
        """
        Revoke a session, in this process only, until it expires.

        @raise InvalidSession: If the session is not valid (already revoked,
            expired, or not ours): C{DELETE /sessions/<id>} answers 404
            L{NO_SUCH_SESSION} then.
        """
        claims, nonce = self._open(sessionID)
        if nonce in self._revoked:
            _fail()
        self._revoked[nonce] = claims.expires
        heapq.heappush(self._revokedHeap, (claims.expires, nonce))

    def _mac(self, encoded: str) -> bytes:
        message = _MAC_LABEL + encoded.encode("ascii")
        return hmac.new(self.key, message, hashlib.sha256).digest()

    def _open(self, sessionID: str) -> tuple[Claims, str]:
        now = self.clock()
        self._prune(now)
        if not isinstance(sessionID, str) or len(sessionID) > MAX_SESSION_ID_SIZE:
            _fail()
        if not _SESSION_ID.fullmatch(sessionID):
            _fail()
        encoded, mac = sessionID.split(".")
        # Nothing of the body is looked at before its MAC is checked.
        if not hmac.compare_digest(self._mac(encoded), _decode(mac)):
            _fail()
        try:
            body = json.loads(_decode(encoded), parse_int=parseJSONInteger)
            if body["v"] != _VERSION:
                _fail()
            nonce = body["n"]
            expires = body["exp"]
            claims = Claims(
                transferTicket=body["transfer-ticket"],
                imagedURI=body["imaged-uri"],
                notBefore=body["nbf"],
                expires=expires,
                issuedAt=body.get("iat"),
                transferID=body.get("transfer-id"),
                payload={key: value for key, value in body.items() if key not in ("v", "n")},
            )
        except (ValueError, KeyError, TypeError):
            # Only with a key shared with a different format.
            _fail()
        if not isinstance(nonce, str) or type(expires) is not int:
            _fail()
        # The skew works for the client, as for tickets.
        if expires <= now - self.allowedSkew:
            _fail()
        return claims, nonce

    def _prune(self, now: float) -> None:
        heap = self._revokedHeap
        while heap and heap[0][0] <= now - self.allowedSkew - _REVOKED_GRACE:
            _, nonce = heapq.heappop(heap)
            del self._revoked[nonce]
