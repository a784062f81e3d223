# -*- test-case-name: tests.test_signedticket -*-
"""
Verify the signed tickets that oVirt engine hands to clients of the proxy.

A signed ticket is C{base64(JSON object of strings)} made by the engine's
C{TicketEncoder}: a random C{salt}, a validity window (C{validFrom},
C{validTo}), the payload (C{data}, itself JSON naming the daemon ticket and
the daemon's address), the comma-separated names of the signed fields
(C{signedFields}) and one or two RSA signatures over the concatenated values
of those fields (C{signature}: PKCS#1 v1.5 with the C{digest} field's hash;
C{v2_signature}: RSASSA-PSS with SHA-256).

We accept what the engine sends and nothing looser:

  - the ticket is capped in size before it is decoded, and its base64 must be
    canonical (standard alphabet, padding, nothing else);
  - the JSON must be an object of strings without duplicate keys;
  - C{salt}, C{validFrom}, C{validTo} and C{data} must all be signed (and
    C{digest} when the v1 signature is used), only known fields may be signed,
    and only SHA-1 or SHA-256 are allowed with v1;
  - signatures are checked with the configured engine certificate's key,
    never with the certificate embedded in the ticket;
  - every signed field has a strict format, because the signed message is a
    concatenation without separators (see L{_checkFieldFormats});
  - clock skew is tolerated in the client's favour and bounded by
    L{MAX_ALLOWED_SKEW}.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NoReturn
from urllib.parse import urlsplit

from attrs import define, field, frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from imageio.ranges import parseJSONInteger
from imageio.tickets import MAX_TIMEOUT

#: Largest ticket accepted, in bytes of its base64 text. Engine tickets are
#: about 4 KiB (most of it the embedded certificate).
MAX_TICKET_SIZE = 64 * 1024

#: Largest clock skew tolerance a verifier accepts, in seconds. More than a
#: few minutes of skew means the clocks need fixing, not a wider window.
MAX_ALLOWED_SKEW = 300

#: Longest ticket lifetime accepted (C{exp - nbf}, C{validTo - validFrom}).
#: The engine's lifetimes are minutes to hours; the bound is the one of a
#: daemon ticket's C{timeout} (30 days).
MAX_LIFETIME = MAX_TIMEOUT

# 9999-12-31T23:59:59Z: keeps every later conversion in range.
_MAX_TIMESTAMP = 253402300799

# Fields that may be signed; the first four must be.
_SIGNABLE = frozenset({"salt", "digest", "validFrom", "validTo", "data"})
_REQUIRED_SIGNED = ("salt", "validFrom", "validTo", "data")
_UNSIGNED = frozenset({"signedFields", "signature", "v2_signature", "certificate"})
_KNOWN_FIELDS = _SIGNABLE | _UNSIGNED

# Hashes allowed with the v1 signature. No name is a prefix of another, so a
# digest's length is fixed by its content (this matters for splicing).
_V1_DIGESTS: Mapping[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
}

# 8 random bytes in standard base64: 11 characters, then one "=".
_SALT = re.compile(r"[A-Za-z0-9+/]{11}=")
_TIMESTAMP = re.compile(r"[0-9]{14}")
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_MAX_URI_LENGTH = 2048
_URI_TEXT = re.compile(r"[\x21-\x7e]+")
_NETLOC = re.compile(
    r"(?:(?P<name>[A-Za-z0-9.-]+)|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?"
)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class InvalidTicket(Exception):
    """
    A signed ticket was refused.

    C{str()} is a short reason that is safe to send to the client and to log:
    it never contains the ticket or any part of it.

    @ivar reason: The same short reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ExpiredTicket(InvalidTicket):
    """
    A signed ticket (or its validity window) has expired.

    Its reason is C{"expired ticket"}, as in upstream's
    C{Not authorized (expired ticket)}.
    """

    def __init__(self) -> None:
        super().__init__("expired ticket")


def _convertPayload(payload: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(payload))


@frozen
class Claims:
    """
    What a verified signed ticket grants.

    @ivar transferTicket: The daemon ticket id (C{transfer-ticket}), used as
        C{/images/<transferTicket>} on the proxy and on the daemon.
    @ivar imagedURI: The daemon's address (C{imaged-uri}), normalised to
        C{scheme://host[:port]} with no trailing slash.
    @ivar notBefore: C{nbf}, epoch seconds.
    @ivar expires: C{exp}, epoch seconds.
    @ivar issuedAt: C{iat}, epoch seconds, if the engine sent it.
    @ivar transferID: The engine's image transfer id (C{transfer-id}), if
        sent (engine 4.2.7 and later).
    @ivar payload: The parsed payload, read-only, as the engine sent it.
    """

    transferTicket: str
    imagedURI: str
    notBefore: int
    expires: int
    issuedAt: int | None = None
    transferID: str | None = None
    payload: Mapping[str, object] = field(
        factory=dict, converter=_convertPayload, eq=False, repr=False
    )


def loadCertificate(pem: bytes) -> x509.Certificate:
    """
    Load the first certificate of a PEM file.

    @param pem: PEM text, as read from C{engine_cert_file} or
        C{engine_ca_cert_file}.
    @raise ValueError: If C{pem} holds no readable certificate.
    """
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ValueError("Not a PEM certificate") from e


def _checkSkew(instance: object, attribute: object, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_ALLOWED_SKEW:
        raise ValueError(f"allowedSkew must be an integer from 0 to {MAX_ALLOWED_SKEW} seconds")


def _checkTicketSize(instance: object, attribute: object, value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError("maxTicketSize must be a positive integer")


def _fail(reason: str) -> NoReturn:
    raise InvalidTicket(reason)


@define
class TicketVerifier:
    """
    Verify signed tickets with the engine's certificate.

    @ivar engineCert: PEM of the engine certificate (C{[proxy]
        engine_cert_file}); its RSA key is the only key that signatures are
        checked with.
    @ivar clock: Returns the current time in epoch seconds.
    @ivar engineCACert: PEM of the engine CA (C{[proxy] engine_ca_cert_file}),
        or C{None}. When set, the engine certificate must be issued and signed
        by it (checked once, here), and both certificates must be within their
        validity dates whenever a ticket is verified.
    @ivar allowedSkew: Clock skew tolerated between engine and proxy, in
        seconds, from 0 to L{MAX_ALLOWED_SKEW}. It widens the validity window
        on both sides: a ticket is accepted from C{nbf - allowedSkew} until
        C{exp + allowedSkew}.
    @ivar maxTicketSize: Largest ticket accepted, in bytes of base64 text.
    @ivar allowHTTP: Accept C{http://} daemon addresses (tests and labs only:
        image data would cross the network unencrypted).
    @ivar allowLoopback: Accept loopback daemon addresses (C{127.0.0.0/8},
        C{::1}, C{localhost}); off by default so that a ticket cannot point
        the proxy at services on its own host. Link-local, multicast and
        unspecified addresses are always refused.
    """

    engineCert: bytes = field(repr=False)
    clock: Callable[[], float] = field(kw_only=True)
    engineCACert: bytes | None = field(default=None, kw_only=True, repr=False)
    allowedSkew: int = field(default=0, kw_only=True, validator=_checkSkew)
    maxTicketSize: int = field(default=MAX_TICKET_SIZE, kw_only=True, validator=_checkTicketSize)
    allowHTTP: bool = field(default=False, kw_only=True)
    allowLoopback: bool = field(default=False, kw_only=True)
    _certificate: x509.Certificate = field(init=False, repr=False)
    _caCertificate: x509.Certificate | None = field(init=False, repr=False)
    _publicKey: rsa.RSAPublicKey = field(init=False, repr=False)
    _pssSaltLength: int = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._certificate = loadCertificate(self.engineCert)
        key = self._certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("The engine certificate must have an RSA key")
        self._publicKey = key
        # The engine's PSS salt length (TicketEncoder.getSaltMaxLength).
        # cryptography's PSS.MAX_LENGTH accepts any salt length when
        # verifying, so we pin the exact one, as the Java decoder does.
        emLen = math.ceil((key.key_size - 1) / 8)
        self._pssSaltLength = emLen - hashes.SHA256.digest_size - 2
        self._caCertificate = None
        if self.engineCACert is not None:
            ca = loadCertificate(self.engineCACert)
            try:
                self._certificate.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature) as e:
                raise ValueError("The engine certificate is not signed by the engine CA") from e
            self._caCertificate = ca

    def verify(self, ticket: bytes | str) -> Claims:
        """
        Verify a signed ticket and return what it grants.

        @param ticket: The ticket as sent by the engine or the client
            (surrounding ASCII whitespace is ignored).
        @return: The ticket's claims.
        @raise ExpiredTicket: If the ticket's validity window or payload
            C{exp} has passed, even with the allowed skew.
        @raise InvalidTicket: If the ticket is malformed, not signed by the
            engine, not valid yet, or grants something unsafe.
        """
        now = self.clock()
        fields = self._decode(ticket)
        signedNames = _signedFieldNames(fields)
        validFrom, validTo = _checkFieldFormats(fields, signedNames)
        self._checkCertificates(now)
        self._checkSignature(fields, signedNames)
        _checkWindow(validFrom, validTo, now, self.allowedSkew)
        claims = _parsePayload(fields["data"], self.allowHTTP, self.allowLoopback)
        _checkWindow(claims.notBefore, claims.expires, now, self.allowedSkew)
        return claims

    def checkCurrent(self, claims: Claims) -> None:
        """
        Check that verified claims are valid now (C{nbf}/C{exp} with the
        allowed skew), for tickets kept after verification.

        @raise ExpiredTicket: If C{exp} has passed.
        @raise InvalidTicket: If C{nbf} is still in the future.
        """
        _checkWindow(claims.notBefore, claims.expires, self.clock(), self.allowedSkew)

    def _decode(self, ticket: bytes | str) -> dict[str, str]:
        # Size first: nothing below should run on a huge input.
        if len(ticket) > self.maxTicketSize:
            _fail("ticket too large")
        if isinstance(ticket, str):
            ticket = ticket.strip(" \t\r\n")
        else:
            ticket = ticket.strip(b" \t\r\n")
        raw = _decodeBase64(ticket, "malformed base64")
        try:
            decoded = json.loads(
                raw.decode("utf-8"),
                object_pairs_hook=_uniqueKeys,
                parse_constant=_rejectConstant,
                parse_int=parseJSONInteger,
            )
        except _DuplicateKey:
            _fail("duplicate key")
        except (ValueError, RecursionError):
            _fail("malformed JSON")
        if not isinstance(decoded, dict) or not all(isinstance(v, str) for v in decoded.values()):
            _fail("ticket is not a JSON object of strings")
        if not _KNOWN_FIELDS.issuperset(decoded):
            _fail("unknown field")
        for name in ("signedFields", *_REQUIRED_SIGNED):
            if name not in decoded:
                _fail(f"missing field: {name}")
        return decoded

    def _checkCertificates(self, now: float) -> None:
        if self._caCertificate is None:
            return
        when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        for name, certificate in (
            ("engine CA", self._caCertificate),
            ("engine", self._certificate),
        ):
            if when < certificate.not_valid_before_utc:
                _fail(f"{name} certificate not valid yet")
            if when > certificate.not_valid_after_utc:
                _fail(f"{name} certificate expired")

    def _checkSignature(self, fields: Mapping[str, str], signedNames: list[str]) -> None:
        try:
            message = b"".join(fields[name].encode("utf-8") for name in signedNames)
        except UnicodeEncodeError:
            # Lone surrogates from "\ud800" escapes have no UTF-8 form.
            _fail("malformed field")
        # Prefer v2; when present it must verify and v1 is not considered.
        if "v2_signature" in fields:
            signature = _decodeBase64(fields["v2_signature"], "malformed signature")
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=self._pssSaltLength
            )
            algorithm: hashes.HashAlgorithm = hashes.SHA256()
        elif "signature" in fields:
            if "digest" not in signedNames:
                _fail("unsigned field: digest")
            makeHash = _V1_DIGESTS.get(fields["digest"])
            if makeHash is None:
                _fail("unsupported digest")
            signature = _decodeBase64(fields["signature"], "malformed signature")
            pad = padding.PKCS1v15()
            algorithm = makeHash()
        else:
            _fail("missing signature")
        try:
            self._publicKey.verify(signature, message, pad, algorithm)
        except InvalidSignature:
            _fail("invalid signature")


class _DuplicateKey(ValueError):
    pass


def _uniqueKeys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey()
    return result


def _rejectConstant(name: str) -> NoReturn:
    # NaN, Infinity and -Infinity are not JSON.
    raise ValueError(name)


def _decodeBase64(text: bytes | str, reason: str) -> bytes:
    """
    Decode canonical standard base64 with padding: the only text accepted
    is the text that encoding the result gives back.
    """
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            _fail(reason)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _fail(reason)
    if base64.b64encode(raw) != text:
        _fail(reason)
    return raw


def _signedFieldNames(fields: Mapping[str, str]) -> list[str]:
    names = fields["signedFields"].split(",")
    if not _SIGNABLE.issuperset(names):
        _fail("unknown signed field")
    if len(set(names)) != len(names):
        _fail("duplicate signed field")
    for name in _REQUIRED_SIGNED:
        if name not in names:
            _fail(f"unsigned field: {name}")
    for name in names:
        if name not in fields:
            _fail(f"missing field: {name}")
    return names


def _checkFieldFormats(fields: Mapping[str, str], signedNames: list[str]) -> tuple[int, int]:
    """
    Check the format of every signed field but C{data}, and return
    C{validFrom} and C{validTo} in epoch seconds.

    The signed message concatenates the values with no separator, so moving
    bytes from one field to its neighbour keeps the signature valid. That
    cannot produce an acceptable ticket: C{data} is the only field of free
    length; C{salt} (12 characters), C{validFrom} and C{validTo} (14 digits
    each) have fixed lengths, and the allowed digests are prefix-free, so a
    shifted boundary breaks a format. Reordering C{signedFields} (which is not
    signed) along with the values could only swap C{validFrom} and
    C{validTo}, which then fails the C{validFrom < validTo} check.
    """
    salt = fields["salt"]
    if not _SALT.fullmatch(salt):
        _fail("malformed salt")
    _decodeBase64(salt, "malformed salt")
    if "digest" in fields and fields["digest"] not in _V1_DIGESTS:
        _fail("unsupported digest")
    validFrom = _parseTimestamp(fields["validFrom"], "malformed validFrom")
    validTo = _parseTimestamp(fields["validTo"], "malformed validTo")
    if not validFrom < validTo <= validFrom + MAX_LIFETIME:
        _fail("invalid lifetime")
    return validFrom, validTo


def _parseTimestamp(text: str, reason: str) -> int:
    """
    Parse the engine's UTC C{yyyyMMddHHmmss} timestamp to epoch seconds.
    """
    if not _TIMESTAMP.fullmatch(text):
        _fail(reason)
    # By position: strptime's variable-width fields could shift boundaries.
    year, month, day = int(text[0:4]), int(text[4:6]), int(text[6:8])
    hour, minute, second = int(text[8:10]), int(text[10:12]), int(text[12:14])
    try:
        when = datetime.datetime(year, month, day, hour, minute, second)
    except ValueError:
        _fail(reason)
    return calendar.timegm(when.timetuple())


def _checkWindow(notBefore: int, expires: int, now: float, skew: int) -> None:
    # The skew works for the client: a little early or late is still fine.
    if notBefore > now + skew:
        _fail("ticket not valid yet")
    if expires <= now - skew:
        raise ExpiredTicket()


def _parsePayload(data: str, allowHTTP: bool, allowLoopback: bool) -> Claims:
    try:
        payload = json.loads(
            data,
            object_pairs_hook=_uniqueKeys,
            parse_constant=_rejectConstant,
            parse_int=parseJSONInteger,
        )
    except _DuplicateKey:
        _fail("duplicate key in payload")
    except (ValueError, RecursionError):
        _fail("malformed payload")
    if not isinstance(payload, dict):
        _fail("malformed payload")
    for name in ("nbf", "exp", "transfer-ticket", "imaged-uri"):
        if name not in payload:
            _fail(f"missing claim: {name}")
    notBefore = _timestampClaim(payload, "nbf")
    expires = _timestampClaim(payload, "exp")
    issuedAt = _timestampClaim(payload, "iat") if "iat" in payload else None
    if not notBefore < expires <= notBefore + MAX_LIFETIME:
        _fail("invalid lifetime")
    transferTicket = _idClaim(payload, "transfer-ticket")
    transferID = _idClaim(payload, "transfer-id") if "transfer-id" in payload else None
    imagedURI = _checkImagedURI(payload["imaged-uri"], allowHTTP, allowLoopback)
    return Claims(
        transferTicket=transferTicket,
        imagedURI=imagedURI,
        notBefore=notBefore,
        expires=expires,
        issuedAt=issuedAt,
        transferID=transferID,
        payload=payload,
    )


def _timestampClaim(payload: Mapping[str, object], name: str) -> int:
    value = payload[name]
    # type() and not isinstance(): JSON true is not 1.
    if type(value) is not int or not 0 <= value <= _MAX_TIMESTAMP:
        _fail(f"invalid claim: {name}")
    return value


def _idClaim(payload: Mapping[str, object], name: str) -> str:
    value = payload[name]
    # Ends up in URL paths and logs: keep it to safe characters.
    if not isinstance(value, str) or not _ID.fullmatch(value):
        _fail(f"invalid claim: {name}")
    return value


def _checkImagedURI(value: object, allowHTTP: bool, allowLoopback: bool) -> str:
    """
    Check C{imaged-uri} and return it as C{scheme://host[:port]}.

    Only a scheme, a host and a port are allowed: the proxy appends
    C{/images/<ticket>} itself.
    """
    reason = "invalid claim: imaged-uri"
    if not isinstance(value, str) or len(value) > _MAX_URI_LENGTH:
        _fail(reason)
    if not _URI_TEXT.fullmatch(value) or "?" in value or "#" in value:
        _fail(reason)
    try:
        parts = urlsplit(value)
    except ValueError:
        _fail(reason)
    schemes = ("https", "http") if allowHTTP else ("https",)
    if parts.scheme not in schemes or parts.path not in ("", "/"):
        _fail(reason)
    match = _NETLOC.fullmatch(parts.netloc)
    if match is None:
        _fail(reason)
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        _fail(reason)
    address = _hostAddress(match.group("name"), match.group("ipv6"), reason)
    if address is None:
        name = match.group("name").lower()
        loopback = name == "localhost" or name.endswith(".localhost")
    else:
        if address.is_link_local or address.is_multicast or address.is_unspecified:
            _fail(reason)
        loopback = address.is_loopback
    if loopback and not allowLoopback:
        _fail(
            "imaged-uri names a loopback daemon, refused unless "
            "[proxy] allow_loopback = true (all-in-one labs only)"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _hostAddress(
    name: str | None, ipv6: str | None, reason: str
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    Return the address of an IP literal host, or C{None} for a host name.
    """
    if ipv6 is not None:
        try:
            address = ipaddress.IPv6Address(ipv6)
        except ValueError:
            _fail(reason)
        return address.ipv4_mapped or address
    assert name is not None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        _fail(reason)
    if labels[-1][0].isdigit():
        # Resolvers read 127.1, 2130706433 or 0x7f000001 as addresses: a
        # name that may be a number must be a canonical dotted quad.
        try:
            return ipaddress.IPv4Address(name)
        except ValueError:
            _fail(reason)
    return None
