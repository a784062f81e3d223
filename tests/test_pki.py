"""
Tests for L{imageio._pki}: the self-signed certificate and the test PKI.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from imageio import _pki
from imageio._pki import ensureSelfSigned, makeTestPKI
from imageio.web._tls import makeServerContext


def _load(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """
    Run a TLS handshake between two contexts in memory.

    @raise ssl.SSLError: The client refused the server.
    """
    sIn, sOut, cIn, cOut = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(sIn, sOut, server_side=True)
    c = client.wrap_bio(cIn, cOut, server_hostname=hostname)
    for _ in range(10):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        sIn.write(cOut.read())
        cIn.write(sOut.read())
        if done == 2:
            return
    raise AssertionError("handshake did not complete")


def _pinning(caFile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=caFile)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


class EnsureSelfSignedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()

    def test_creates(self) -> None:
        """
        The first call creates an ECDSA P-256 certificate naming the given
        hosts and addresses, valid for ten years, that is its own CA.
        """
        certFile, keyFile = ensureSelfSigned(self.directory)
        self.assertEqual(certFile, os.path.join(self.directory, "cert.pem"))
        self.assertEqual(keyFile, os.path.join(self.directory, "key.pem"))
        [cert] = _load(certFile)
        self.assertEqual(cert.issuer, cert.subject)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        lifetime = cert.not_valid_after_utc - datetime.now(UTC)
        self.assertGreater(lifetime, timedelta(days=3649))
        self.assertLess(lifetime, timedelta(days=3651))
        self.assertLess(cert.not_valid_before_utc, datetime.now(UTC))
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp256r1")

    def test_keyMode(self) -> None:
        """
        The key is readable by its owner only, whatever the umask, and no
        temporary files are left.
        """
        old = os.umask(0)
        try:
            _, keyFile = ensureSelfSigned(self.directory)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(keyFile).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.directory)), ["cert.pem", "key.pem"])

    def test_directoryCreated(self) -> None:
        """
        A missing directory is created, readable by its owner only; a
        FilePath is accepted.
        """
        directory = FilePath(self.directory).child("a").child("pki")
        certFile, _ = ensureSelfSigned(directory)
        self.assertTrue(os.path.exists(certFile))
        self.assertEqual(stat.S_IMODE(os.stat(directory.path).st_mode), 0o700)

    def test_reused(self) -> None:
        """
        Later calls reuse the existing certificate and key.
        """
        certFile, keyFile = ensureSelfSigned(self.directory)
        with open(certFile, "rb") as f:
            cert = f.read()
        with open(keyFile, "rb") as f:
            key = f.read()
        self.assertEqual(ensureSelfSigned(self.directory), (certFile, keyFile))
        with open(certFile, "rb") as f:
            self.assertEqual(f.read(), cert)
        with open(keyFile, "rb") as f:
            self.assertEqual(f.read(), key)

    def test_lonelyKeyReplaced(self) -> None:
        """
        A key without its certificate (a crash between the two renames) is
        replaced by a new matching pair.
        """
        certFile, keyFile = ensureSelfSigned(self.directory)
        with open(keyFile, "rb") as f:
            key = f.read()
        os.unlink(certFile)
        ensureSelfSigned(self.directory)
        with open(keyFile, "rb") as f:
            self.assertNotEqual(f.read(), key)
        makeServerContext(certFile, keyFile)

    def test_names(self) -> None:
        """
        The certificate names the given hosts and addresses; the first host
        is the common name.
        """
        certFile, _ = ensureSelfSigned(
            self.directory, hostnames=["host.example", "alias.example"], ips=["192.0.2.1"]
        )
        [cert] = _load(certFile)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["host.example", "alias.example"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.1")]
        )
        [cn] = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.assertEqual(cn.value, "host.example")

    def test_pinnable(self) -> None:
        """
        A strict client using the certificate as its CA file accepts the
        server by name and by address.
        """
        certFile, keyFile = ensureSelfSigned(self.directory)
        server = makeServerContext(certFile, keyFile)
        for hostname in ("localhost", "127.0.0.1", "::1"):
            _handshake(server, _pinning(certFile), hostname)
        with self.assertRaises(ssl.SSLCertVerificationError):
            _handshake(server, _pinning(certFile), "other.example")


class MakeTestPKITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = makeTestPKI(self.mktemp())

    def test_serverTrusted(self) -> None:
        """
        The server certificate is accepted by a strict client trusting the CA,
        by name and by address, alone and as a chain.
        """
        for certFile in (self.pki.certFile, self.pki.chainFile):
            server = makeServerContext(certFile, self.pki.keyFile)
            for hostname in ("localhost", "127.0.0.1", "::1"):
                _handshake(server, _pinning(self.pki.caFile), hostname)

    def test_chain(self) -> None:
        """
        The chain file holds the server certificate and then the CA.
        """
        self.assertEqual(
            _load(self.pki.chainFile), _load(self.pki.certFile) + _load(self.pki.caFile)
        )

    def test_wrongName(self) -> None:
        """
        The wrong-name certificate is refused for localhost.
        """
        server = makeServerContext(self.pki.wrongNameCertFile, self.pki.wrongNameKeyFile)
        with self.assertRaises(ssl.SSLCertVerificationError):
            _handshake(server, _pinning(self.pki.caFile), "localhost")
        _handshake(server, _pinning(self.pki.caFile), "wrong.example")

    def test_expired(self) -> None:
        """
        The expired certificate expired, and was signed by the CA.
        """
        [cert] = _load(self.pki.expiredCertFile)
        [ca] = _load(self.pki.caFile)
        self.assertLess(cert.not_valid_after_utc, datetime.now(UTC))
        cert.verify_directly_issued_by(ca)

    def test_otherKey(self) -> None:
        """
        The other key matches no certificate.
        """
        with open(self.pki.otherKeyFile, "rb") as f:
            other = f.read()
        for keyFile in (
            self.pki.keyFile,
            self.pki.wrongNameKeyFile,
            self.pki.expiredKeyFile,
        ):
            with open(keyFile, "rb") as f:
                self.assertNotEqual(f.read(), other)

    def test_keysCached(self) -> None:
        """
        Keys are made once per process; certificates are made per call.
        """
        again = makeTestPKI(self.mktemp())
        with open(self.pki.keyFile, "rb") as f, open(again.keyFile, "rb") as g:
            self.assertEqual(f.read(), g.read())
        self.assertNotEqual(_load(self.pki.certFile), _load(again.certFile))
        self.assertIn("server", _pki._keys)
