# -*- test-case-name: tests.test_certdates -*-
"""
The validity periods of PEM certificates, read with the standard library.

A daemon checks its certificates' dates at every start. Doing that with
cryptography would load its Rust extension (about 9 MiB of resident
memory) into a daemon that otherwise never needs it: our TLS server uses
the standard library's C{ssl}. L{validityPeriods} walks just enough of each
certificate's DER to reach its validity (RFC 5280, section 4.1); anything
it does not recognise makes it answer L{None}, and the caller falls back
to cryptography. L{certificateDates} also reads each subject's common
name, so that warnings about a certificate that expires soon or is not
valid yet name it without cryptography either.
"""

from __future__ import annotations

import binascii
import re
from datetime import UTC, datetime

from attrs import frozen

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)

_SEQUENCE = 0x30
_VERSION = 0xA0
_SET = 0x31
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18

#: The DER of the commonName attribute's OID, 2.5.4.3.
_COMMON_NAME = bytes((0x55, 0x04, 0x03))

#: String types an attribute value may have: UTF8String, PrintableString,
#: TeletexString, IA5String (Latin-1 is close enough for the two odd ones)
#: and BMPString.
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x14: "latin-1", 0x16: "latin-1", 0x1E: "utf-16-be"}


@frozen
class CertificateDates:
    """
    What a daemon checks at start about one certificate.

    @ivar notBefore: Start of its validity, UTC.
    @ivar notAfter: End of its validity, UTC.
    @ivar subject: C{CN=<common name>} of its subject, or C{""} if it has
        none.
    """

    notBefore: datetime
    notAfter: datetime
    subject: str


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


def _commonName(der: bytes, pos: int, end: int) -> str:
    """
    @return: C{CN=<value>} for the first common name in the DER C{Name} from
        C{pos} to C{end}, or C{""}.
    """
    while pos < end:
        tag, start, pos = _element(der, pos, end)  # RelativeDistinguishedName
        if tag != _SET:
            raise ValueError("bad name")
        while start < pos:
            tag, attr, start = _element(der, start, pos)  # AttributeTypeAndValue
            if tag != _SEQUENCE:
                raise ValueError("bad name")
            tag, oid, value = _element(der, attr, start)
            if tag == _OID and der[oid:value] == _COMMON_NAME:
                tag, first, last = _element(der, value, start)
                if tag in _STRINGS:
                    return "CN=" + der[first:last].decode(_STRINGS[tag])
    return ""


def _dates(der: bytes) -> CertificateDates:
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
    tag, pos, validityEnd = _element(der, pos, end)  # Validity
    if tag != _SEQUENCE:
        raise ValueError("no validity")
    tag, start, stop = _element(der, pos, validityEnd)
    notBefore = _time(tag, der[start:stop])
    tag, start, stop = _element(der, stop, validityEnd)
    notAfter = _time(tag, der[start:stop])
    tag, start, stop = _element(der, validityEnd, end)  # subject
    if tag != _SEQUENCE:
        raise ValueError("no subject")
    return CertificateDates(notBefore, notAfter, _commonName(der, start, stop))


def certificateDates(pem: bytes) -> list[CertificateDates] | None:
    """
    @param pem: The contents of a PEM file.
    @return: The validity and subject of each certificate in C{pem}, or
        L{None} if it holds none or one this cannot read.
    """
    found = []
    for match in _PEM.finditer(pem):
        try:
            der = binascii.a2b_base64(match.group(1))
            found.append(_dates(der))
        except (ValueError, binascii.Error, UnicodeDecodeError, IndexError):
            return None
    return found or None


def validityPeriods(pem: bytes) -> list[tuple[datetime, datetime]] | None:
    """
    @param pem: The contents of a PEM file.
    @return: The C{(notBefore, notAfter)} of each certificate in C{pem}, in
        UTC, or L{None} if it holds none or one this cannot read.
    """
    found = certificateDates(pem)
    return None if found is None else [(c.notBefore, c.notAfter) for c in found]
