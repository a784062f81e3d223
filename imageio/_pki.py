# -*- test-case-name: tests.test_pki -*-
"""
Certificates imageio makes for itself: a self-signed server certificate for
a daemon started without TLS configuration, and a small PKI for tests.

Keys are ECDSA P-256: generating one takes a millisecond where RSA 2048
takes tens to hundreds, signing in each handshake is several times cheaper
than RSA, and every TLS 1.2+ client (curl, Python, Java, browsers, the
oVirt engine) accepts it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from attrs import frozen
from twisted.logger import Logger
from twisted.python.filepath import FilePath

if TYPE_CHECKING:
    # cryptography is imported where a certificate or key is made, never
    # by an ordinary start that finds its files in place: it costs a
    # daemon about 10 MiB of resident memory (issue 12).
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

log = Logger()

#: File names L{ensureSelfSigned} uses in its directory.
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"

#: Validity of the self-signed certificate.
SELF_SIGNED_VALIDITY = timedelta(days=3650)

# Certificates start being valid a little in the past, so a client whose
# clock is behind still accepts them.
_BACKDATE = timedelta(hours=1)


def _newKey() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certPEM(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _subjectAltName(hostnames: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    from cryptography import x509

    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return x509.SubjectAlternativeName(names)


def _buildCertificate(
    *,
    commonName: str,
    key: ec.EllipticCurvePrivateKey,
    issuerKey: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    notBefore: datetime,
    notAfter: datetime,
    isCA: bool,
    isServer: bool,
    hostnames: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> x509.Certificate:
    """
    Build and sign one certificate, with the extensions strict verifiers
    (Python 3.13's C{VERIFY_X509_STRICT}) insist on: critical basic
    constraints and key usage, subject and authority key identifiers.

    @param issuer: The issuing CA; L{None} for a self-signed certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imageio"),
            x509.NameAttribute(NameOID.COMMON_NAME, commonName),
        ]
    )
    publicKey = key.public_key()
    if issuer is None:
        issuerName = subject
        authorityKeyID = x509.AuthorityKeyIdentifier.from_issuer_public_key(publicKey)
    else:
        issuerName = issuer.subject
        authorityKeyID = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuerName)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.BasicConstraints(ca=isCA, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=isServer,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=isCA,
                crl_sign=isCA,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
        .add_extension(authorityKeyID, critical=False)
    )
    if isServer:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(_subjectAltName(hostnames, ips), critical=False)
    return builder.sign(issuerKey, hashes.SHA256())


def _writeAtomically(path: str, data: bytes, mode: int, sync: bool = True) -> None:
    """
    Write C{data} to C{path} through a temporary file in the same directory,
    created with C{mode} (so a key is never readable by others, not even
    for a moment), synced (unless C{sync} is false) and renamed over
    C{path}.
    """
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]  # off-reactor: runs at start-up
            if sync:
                os.fsync(fd)  # off-reactor: runs at start-up
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not sync:
        return
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)  # off-reactor: runs at start-up
    finally:
        os.close(dirfd)


def ensureSelfSigned(
    directory: FilePath[str] | str,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
) -> tuple[str, str]:
    """
    Make sure C{directory} holds a self-signed server certificate and its
    key, creating them on first use and reusing them afterwards.

    The certificate (ECDSA P-256, SHA-256, valid for 10 years) names
    C{hostnames} and C{ips} in its subject alternative names and is its own
    CA (C{CA:TRUE}), so a client can pin C{cert.pem} as its CA file. The key
    file is created with mode 0600; both files are written to temporary
    files and renamed into place, under an exclusive lock on the directory,
    so a crash or a second process never leaves a key without its
    certificate or a key readable by others.

    This blocks on the file system: call it at startup, before the reactor
    runs.

    @param directory: Where C{cert.pem} and C{key.pem} live; created (mode
        0700) if missing.
    @param hostnames: DNS names for the certificate; the first one is also
        its common name.
    @param ips: IP addresses for the certificate.

    @return: The certificate and key paths.
    """
    path = directory.path if isinstance(directory, FilePath) else os.fspath(directory)
    os.makedirs(path, mode=0o700, exist_ok=True)
    certPath = os.path.join(path, CERT_NAME)
    keyPath = os.path.join(path, KEY_NAME)

    dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dirfd, fcntl.LOCK_EX)
        if os.path.exists(certPath) and os.path.exists(keyPath):
            mode = os.stat(keyPath).st_mode
            if mode & 0o077:
                log.warn(
                    "Private key {path} is accessible to other users (mode {mode:o})",
                    path=keyPath,
                    mode=mode & 0o777,
                )
            return certPath, keyPath

        key = _newKey()
        now = datetime.now(UTC)
        cert = _buildCertificate(
            commonName=hostnames[0] if hostnames else "imageio",
            key=key,
            issuerKey=key,
            issuer=None,
            notBefore=now - _BACKDATE,
            notAfter=now + SELF_SIGNED_VALIDITY,
            isCA=True,
            isServer=True,
            hostnames=hostnames,
            ips=ips,
        )
        # Key first: a certificate is only ever renamed into place next to
        # its own key, and a lone key is replaced on the next start.
        _writeAtomically(keyPath, _keyPEM(key), 0o600)
        _writeAtomically(certPath, _certPEM(cert), 0o644)
        log.info(
            "Created a self-signed certificate {path} for {names}",
            path=certPath,
            names=", ".join([*hostnames, *ips]),
        )
        return certPath, keyPath
    finally:
        os.close(dirfd)  # releases the lock


@frozen
class TestPKI:
    """
    Paths of a small PKI made by L{makeTestPKI}. Every server certificate is
    signed by the CA and names C{localhost}, C{127.0.0.1} and C{::1}, except
    where noted.

    @ivar caFile: The CA certificate.
    @ivar certFile: The server certificate.
    @ivar keyFile: The server key.
    @ivar chainFile: The server certificate followed by the CA certificate.
    @ivar wrongNameCertFile: A server certificate for C{wrong.example} only.
    @ivar wrongNameKeyFile: Its key.
    @ivar expiredCertFile: A server certificate that expired yesterday.
    @ivar expiredKeyFile: Its key.
    @ivar otherKeyFile: A key that matches none of the certificates.
    """

    __test__ = False  # not a test case, whatever the name says

    caFile: str
    certFile: str
    keyFile: str
    chainFile: str
    wrongNameCertFile: str
    wrongNameKeyFile: str
    expiredCertFile: str
    expiredKeyFile: str
    otherKeyFile: str


# Generated once per process: tests make many PKIs.
_keys: dict[str, ec.EllipticCurvePrivateKey] = {}


def _cachedKey(name: str) -> ec.EllipticCurvePrivateKey:
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _newKey()
    return key


def makeTestPKI(directory: FilePath[str] | str) -> TestPKI:
    """
    Write a test CA and server certificates signed by it into C{directory}.
    For tests only: keys are reused across calls in one process.

    @return: The paths.
    """
    path = directory.path if isinstance(directory, FilePath) else os.fspath(directory)
    os.makedirs(path, exist_ok=True)
    now = datetime.now(UTC)
    caKey = _cachedKey("ca")
    ca = _buildCertificate(
        commonName="imageio test CA",
        key=caKey,
        issuerKey=caKey,
        issuer=None,
        notBefore=now - _BACKDATE,
        notAfter=now + timedelta(days=30),
        isCA=True,
        isServer=False,
    )

    def server(
        name: str, hostnames: Sequence[str], ips: Sequence[str], notAfter: datetime
    ) -> x509.Certificate:
        return _buildCertificate(
            commonName=hostnames[0],
            key=_cachedKey(name),
            issuerKey=caKey,
            issuer=ca,
            notBefore=min(now - _BACKDATE, notAfter - timedelta(days=1)),
            notAfter=notAfter,
            isCA=False,
            isServer=True,
            hostnames=hostnames,
            ips=ips,
        )

    local = ("localhost",), ("127.0.0.1", "::1")
    files = {
        "ca.pem": _certPEM(ca),
        "server.pem": _certPEM(server("server", *local, now + timedelta(days=30))),
        "server-key.pem": _keyPEM(_cachedKey("server")),
        "wrong-name.pem": _certPEM(
            server("wrong-name", ("wrong.example",), (), now + timedelta(days=30))
        ),
        "wrong-name-key.pem": _keyPEM(_cachedKey("wrong-name")),
        "expired.pem": _certPEM(server("expired", *local, now - timedelta(days=1))),
        "expired-key.pem": _keyPEM(_cachedKey("expired")),
        "other-key.pem": _keyPEM(_cachedKey("other")),
    }
    files["chain.pem"] = files["server.pem"] + files["ca.pem"]
    for name, data in files.items():
        mode = 0o600 if name.endswith("key.pem") else 0o644
        _writeAtomically(os.path.join(path, name), data, mode, sync=False)

    def p(name: str) -> str:
        return os.path.join(path, name)

    return TestPKI(
        caFile=p("ca.pem"),
        certFile=p("server.pem"),
        keyFile=p("server-key.pem"),
        chainFile=p("chain.pem"),
        wrongNameCertFile=p("wrong-name.pem"),
        wrongNameKeyFile=p("wrong-name-key.pem"),
        expiredCertFile=p("expired.pem"),
        expiredKeyFile=p("expired-key.pem"),
        otherKeyFile=p("other-key.pem"),
    )
