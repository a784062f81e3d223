"""
Tests for L{imageio._certdates}.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.name import _ASN1Type
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from imageio import _pki
from imageio._certdates import certificateDates, validityPeriods
from imageio.web import makeServerContext


def _periods(pem: bytes) -> list[tuple[datetime, datetime]]:
    return [
        (c.not_valid_before_utc, c.not_valid_after_utc)
        for c in x509.load_pem_x509_certificates(pem)
    ]


class ValidityPeriodsTests(SynchronousTestCase):
    """
    L{validityPeriods} agrees with cryptography, or gives up.
    """

    def setUp(self) -> None:
        self.pki = _pki.makeTestPKI(self.mktemp())

    def test_agreesWithCryptography(self) -> None:
        """
        Single certificates, a chain and an expired certificate read the
        same as with cryptography.
        """
        for path in (
            self.pki.certFile,
            self.pki.chainFile,
            self.pki.caFile,
            self.pki.expiredCertFile,
        ):
            pem = Path(path).read_bytes()
            self.assertEqual(validityPeriods(pem), _periods(pem), path)

    def test_generalizedTime(self) -> None:
        """
        Dates from 2050 on are C{GeneralizedTime}; before, C{UTCTime}.
        """
        key = _pki._newKey()
        notBefore = datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC)
        notAfter = datetime(2061, 6, 7, 8, 9, 10, tzinfo=UTC)
        cert = _pki._buildCertificate(
            commonName="x",
            key=key,
            issuerKey=key,
            issuer=None,
            notBefore=notBefore,
            notAfter=notAfter,
            isCA=True,
            isServer=False,
        )
        self.assertEqual(validityPeriods(_pki._certPEM(cert)), [(notBefore, notAfter)])

    def test_noCertificate(self) -> None:
        """
        No certificate, a key only, or a damaged certificate: L{None}.
        """
        pem = Path(self.pki.certFile).read_bytes()
        damaged = pem.replace(pem[40:60], b"A" * 20)
        truncated = pem[:30] + pem[-30:]
        for data in (
            b"",
            b"garbage",
            Path(self.pki.keyFile).read_bytes(),
            damaged,
            truncated,
            b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        ):
            self.assertIsNone(validityPeriods(data), data)

    def test_serverContextWithoutCryptography(self) -> None:
        """
        Certificates valid for a while yet, or expiring within 30 days (the
        test PKI's), are checked without importing cryptography, and the
        warning names the subject; an expired one gets cryptography's look.
        """
        directory = self.mktemp()
        cert, key = _pki.ensureSelfSigned(directory)
        # The import system reads sys.modules itself: patch the entry.
        self.addCleanup(sys.modules.__setitem__, "cryptography", sys.modules["cryptography"])
        sys.modules["cryptography"] = None  # type: ignore[assignment]
        with capturedLogs() as events:
            makeServerContext(cert, key)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])
        with capturedLogs() as events:
            makeServerContext(self.pki.certFile, self.pki.keyFile)
        [event] = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(event["subject"], "CN=localhost")
        self.assertEqual(event["path"], self.pki.certFile)
        self.assertIn("expires on", formatEvent(event))
        self.assertRaises(
            ImportError,
            makeServerContext,
            self.pki.expiredCertFile,
            self.pki.expiredKeyFile,
        )

    def test_subjects(self) -> None:
        """
        L{certificateDates} names each certificate of a chain by its common
        name, or C{""} without one, in any of the string types.
        """
        pem = Path(self.pki.chainFile).read_bytes()
        subjects = [c.subject for c in certificateDates(pem) or []]
        self.assertEqual(
            subjects,
            [
                "CN=" + c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
                for c in x509.load_pem_x509_certificates(pem)
            ],
        )
        key = _pki._newKey()
        now = datetime.now(UTC)
        for name, expected in (
            (x509.Name([]), ""),
            (
                x509.Name(
                    [
                        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "o"),
                        x509.NameAttribute(x509.NameOID.COMMON_NAME, "h\u00e9"),
                    ]
                ),
                "CN=h\u00e9",
            ),
            (
                x509.Name(
                    [x509.NameAttribute(x509.NameOID.COMMON_NAME, "bmp", _type=_ASN1Type.BMPString)]
                ),
                "CN=bmp",
            ),
        ):
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")]))
                .public_key(key.public_key())
                .serial_number(1)
                .not_valid_before(now)
                .not_valid_after(now + timedelta(days=1))
                .sign(key, hashes.SHA256())
            )
            [dates] = certificateDates(_pki._certPEM(cert)) or []
            self.assertEqual(dates.subject, expected)

    def test_notYetValid(self) -> None:
        """
        A certificate valid only from tomorrow is not waved through.
        """
        key = _pki._newKey()
        now = datetime.now(UTC)
        cert = _pki._buildCertificate(
            commonName="x",
            key=key,
            issuerKey=key,
            issuer=None,
            notBefore=now + timedelta(days=1),
            notAfter=now + timedelta(days=400),
            isCA=True,
            isServer=False,
        )
        [(notBefore, _)] = validityPeriods(_pki._certPEM(cert)) or []
        self.assertGreater(notBefore, now)
