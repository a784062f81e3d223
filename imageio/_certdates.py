# -*- test-case-name: tests.test_certdates -*-
"""
The validity periods of PEM certificates, read with the standard library.

A daemon checks its certificates' dates at every start. Doing that with
cryptography would load its Rust extension (about 9 MiB of resident
memory) into a daemon that otherwise never needs it: our TLS server uses
the standard library's C{ssl}. L{validityPeriods} walks just enough of each
certificate's DER to reach its validity (RFC 5280, section 4.1); anything
it does not recognise makes it answer L{None}, and the caller falls back
to cryptography, which also words the error and warning messages.
"""

from __future__ import annotations

import binascii
import re
from datetime import UTC, datetime

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)

_SEQUENCE = 0x30
_VERSION = 0xA0
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


def _element(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """
    @return: The tag, the start and the end of the contents of the DER
        element at C{pos}, which must end by C{end}.
    @raise ValueError: If it does not.
    """
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or pos + size > end:
            raise ValueError("bad length")
        length = int.from_bytes(der[pos : pos + size], "big")
        pos += size
    if pos + length > end:
        raise ValueError("truncated")
    return tag, pos, pos + length


def _time(tag: int, value: bytes) -> datetime:
    text = value.decode("ascii")
    if tag == _UTC_TIME and len(text) == 13:
        # RFC 5280 4.1.2.5.1: YY >= 50 is 19YY.
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME or len(text) != 15:
        raise ValueError("not an RFC 5280 time")
    if not text.endswith("Z") or not text[:-1].isdigit():
        raise ValueError("not an RFC 5280 time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _validity(der: bytes) -> tuple[datetime, datetime]:
    tag, pos, end = _element(der, 0, len(der))  # Certificate
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, pos, end = _element(der, pos, end)  # TBSCertificate
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, start, stop = _element(der, pos, end)
    if tag == _VERSION:
        pos = stop
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _element(der, pos, end)[2]
    tag, pos, end = _element(der, pos, end)  # Validity
    if tag != _SEQUENCE:
        raise ValueError("no validity")
    tag, start, stop = _element(der, pos, end)
    notBefore = _time(tag, der[start:stop])
    tag, start, stop = _element(der, stop, end)
    notAfter = _time(tag, der[start:stop])
    return notBefore, notAfter


def validityPeriods(pem: bytes) -> list[tuple[datetime, datetime]] | None:
    """
    @param pem: The contents of a PEM file.
    @return: The C{(notBefore, notAfter)} of each certificate in C{pem}, in
        UTC, or L{None} if it holds none or one this cannot read.
    """
    periods = []
    for match in _PEM.finditer(pem):
        try:
            der = binascii.a2b_base64(match.group(1))
            periods.append(_validity(der))
        except (ValueError, binascii.Error, UnicodeDecodeError, IndexError):
            return None
    return periods or None
