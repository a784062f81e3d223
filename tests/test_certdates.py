"""
Tests for L{imageio._certdates}.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from imageio import _pki
from imageio._certdates import validityPeriods
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
        A certificate valid for a while yet is checked without importing
        cryptography; one expiring soon still gets cryptography's look.
        """
        directory = self.mktemp()
        cert, key = _pki.ensureSelfSigned(directory)
        # The import system reads sys.modules itself: patch the entry.
        self.addCleanup(sys.modules.__setitem__, "cryptography", sys.modules["cryptography"])
        sys.modules["cryptography"] = None  # type: ignore[assignment]
        makeServerContext(cert, key)
        self.assertRaises(
            ImportError, makeServerContext, self.pki.certFile, self.pki.keyFile
        )  # expires within 30 days: cryptography words the warning

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
