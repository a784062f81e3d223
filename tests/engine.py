# -*- test-case-name: tests.test_signedticket -*-
"""
Build signed tickets exactly as oVirt engine does, for tests.

The engine's C{TicketEncoder} (Java) puts C{salt}, C{digest}, C{validFrom},
C{validTo} and C{data} in a C{HashMap}, signs the values in the map's
iteration order, then adds C{signature}, C{signedFields}, C{v2_signature} and
C{certificate} and serialises the map with Jackson (compact), in base64. The
payload in C{data} is pretty-printed by Jackson. This module reproduces all
of it, including the C{HashMap} order, so that the verifier is tested against
what the engine really sends rather than against our own reading of it.

Keys are generated once per process (RSA 2048), so tests stay fast.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

#: A fixed "now" for tests: 2023-11-14T22:13:20Z.
NOW = 1_700_000_000

TRANSFER_TICKET = "7b4c0ab8-5a8e-4c4e-9b73-1f2d3c4b5a69"
TRANSFER_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
IMAGED_URI = "https://host.example.com:54322"

_DAY = datetime.timedelta(days=1)

# Digests the engine could name; md5 and sha512 only for forgery tests.
_DIGESTS: Mapping[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha512": hashes.SHA512,
    "md5": hashes.MD5,
}


@functools.cache
def rsaKey(name: str) -> rsa.RSAPrivateKey:
    """
    An RSA 2048 key, generated once per process for each C{name}.
    """
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@frozen
class Identity:
    """
    A key and the certificate for it.
    """

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        """
        The certificate as an ordinary PEM file, as in C{engine_cert_file}.
        """
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def issue(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: Identity | None = None,
    *,
    notBefore: float = NOW - 365 * 86400,
    notAfter: float = NOW + 10 * 365 * 86400,
    ca: bool = False,
) -> Identity:
    """
    Issue a certificate for C{key}, signed by C{issuer} (self-signed when
    C{None}).
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer = key if issuer is None else issuer.key
    issuerName = name if issuer is None else issuer.certificate.subject
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuerName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(notBefore, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(notAfter, datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
    return Identity(key, certificate)


@functools.cache
def engineCA() -> Identity:
    """
    The engine CA (C{/etc/pki/ovirt-engine/ca.pem}).
    """
    return issue("engine-ca.example.com", rsaKey("ca"), ca=True)


@functools.cache
def engine() -> Identity:
    """
    The engine's signing identity (C{certs/engine.cer}), issued by
    L{engineCA}.
    """
    return issue("engine.example.com", rsaKey("engine"), engineCA())


@functools.cache
def rogue() -> Identity:
    """
    Another identity issued by L{engineCA} (a host, say): it chains to the
    CA but is not the engine.
    """
    return issue("host.example.com", rsaKey("rogue"), engineCA())


@functools.cache
def stranger() -> Identity:
    """
    A self-signed identity unrelated to the engine.
    """
    return issue("stranger.example.com", rsaKey("stranger"))


def makePayload(
    *,
    now: int = NOW,
    lifetime: int = 300,
    transferTicket: str = TRANSFER_TICKET,
    transferID: str | None = TRANSFER_ID,
    imagedURI: str = IMAGED_URI,
) -> dict[str, object]:
    """
    The engine's payload, keys in the engine's order (C{createSignedTicket}).
    """
    payload: dict[str, object] = {"nbf": now, "exp": now + lifetime, "iat": now}
    payload["transfer-ticket"] = transferTicket
    if transferID is not None:
        payload["transfer-id"] = transferID
    payload["imaged-uri"] = imagedURI
    return payload


def jacksonPretty(payload: Mapping[str, object]) -> str:
    """
    Serialise a flat object as Jackson's default pretty printer does:
    C{{\\n  "nbf" : 1,\\n  "exp" : 2\\n}}.
    """
    return json.dumps(payload, indent=2, separators=(",", " : "), ensure_ascii=False)


def javaHashMapOrder(keys: Iterable[str]) -> list[str]:
    """
    The iteration order of a C{java.util.HashMap<String, String>} into which
    C{keys} were put in this order (at most 12 keys: no resize).
    """
    keys = list(keys)
    assert len(keys) <= 12

    def bucket(key: str) -> int:
        h = 0
        for char in key:
            h = (31 * h + ord(char)) & 0xFFFFFFFF
        return (h ^ (h >> 16)) & 15

    # Within a bucket, entries stay in insertion order.
    return sorted(keys, key=lambda key: (bucket(key), keys.index(key)))


def enginePEM(certificate: x509.Certificate) -> str:
    """
    The C{certificate} field: commons-codec C{Base64(76)} lines end in CRLF.
    """
    der = base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()
    lines = "".join(der[i : i + 76] + "\r\n" for i in range(0, len(der), 76))
    return f"-----BEGIN CERTIFICATE-----\n{lines}-----END CERTIFICATE-----\n"


def engineSaltLength(key: rsa.RSAPrivateKey) -> int:
    """
    The engine's PSS salt length, C{TicketEncoder.getSaltMaxLength}.
    """
    return math.ceil((key.key_size - 1) / 8) - hashes.SHA256.digest_size - 2


def formatTimestamp(when: float) -> str:
    """
    UTC C{yyyyMMddHHmmss}.
    """
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y%m%d%H%M%S")


def signatureMessage(fields: Mapping[str, str], signedFields: Sequence[str] | None = None) -> bytes:
    """
    The bytes a ticket's signatures cover: the values named by
    C{signedFields} (by default the ticket's own), concatenated.
    """
    if signedFields is None:
        signedFields = fields["signedFields"].split(",")
    return b"".join(fields[name].encode("utf-8") for name in signedFields)


def signV1(key: rsa.RSAPrivateKey, message: bytes, digest: str = "sha1") -> str:
    """
    A v1 C{signature}: PKCS#1 v1.5 with the named digest.
    """
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), _DIGESTS[digest]())).decode()


def signV2(key: rsa.RSAPrivateKey, message: bytes, saltLength: int | None = None) -> str:
    """
    A C{v2_signature}: RSASSA-PSS, SHA-256, MGF1-SHA-256, the engine's salt
    length unless told otherwise.
    """
    if saltLength is None:
        saltLength = engineSaltLength(key)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=saltLength)
    return base64.b64encode(key.sign(message, pss, hashes.SHA256())).decode()


def encodeTicket(fields: Mapping[str, Any]) -> str:
    """
    Serialise a ticket as the engine does (compact Jackson, base64), with
    the fields in the given order. Values need not be strings.
    """
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(text.encode("utf-8")).decode()


def decodeTicket(ticket: str) -> dict[str, str]:
    """
    The fields of a ticket, in order.
    """
    result: dict[str, str] = json.loads(base64.b64decode(ticket))
    return result


def makeTicket(
    payload: Mapping[str, object] | str | None = None,
    *,
    now: int = NOW,
    lifetime: int = 300,
    v1: bool = True,
    v2: bool = False,
    signer: Identity | None = None,
    digest: str = "sha1",
    salt: bytes | None = None,
    signedFields: Sequence[str] | None = None,
    tamper: Callable[[dict[str, str]], object] | None = None,
) -> str:
    """
    Build a signed ticket as the engine does.

    @param payload: The payload, serialised like Jackson's pretty printer; a
        string is used as it is. By default L{makePayload} for C{now} and
        C{lifetime}.
    @param now: The engine's clock, epoch seconds.
    @param lifetime: Seconds from C{validFrom} to C{validTo}.
    @param v1: Add the v1 C{signature} (and the signed C{digest}): engines
        before January 2022.
    @param v2: Add the C{v2_signature}: engines since January 2021. Engines
        of 2021 sent both.
    @param signer: Who signs, and whose certificate is embedded; the engine
        by default.
    @param digest: The v1 digest name.
    @param salt: The 8 salt bytes; random by default.
    @param signedFields: The signing order; the Java engine's C{HashMap}
        order by default (other engines' encoders used other orders).
    @param tamper: Called with the finished fields (mutable, in order) to
        forge a ticket after signing.
    """
    if not (v1 or v2):
        raise ValueError("a ticket needs v1, v2 or both")
    if signer is None:
        signer = engine()
    if payload is None:
        payload = makePayload(now=now, lifetime=lifetime)
    data = payload if isinstance(payload, str) else jacksonPretty(payload)
    if salt is None:
        salt = os.urandom(8)

    fields: dict[str, str] = {"salt": base64.b64encode(salt).decode()}
    if v1:
        fields["digest"] = digest
    fields["validFrom"] = formatTimestamp(now)
    fields["validTo"] = formatTimestamp(now + lifetime)
    fields["data"] = data
    if signedFields is None:
        signedFields = javaHashMapOrder(fields)
    message = signatureMessage(fields, signedFields)

    # Put order of TicketEncoder.encode; iteration order of its HashMap.
    if v1:
        fields["signature"] = signV1(signer.key, message, digest)
    fields["signedFields"] = ",".join(signedFields)
    if v2:
        fields["v2_signature"] = signV2(signer.key, message)
    fields["certificate"] = enginePEM(signer.certificate)
    fields = {key: fields[key] for key in javaHashMapOrder(fields)}

    if tamper is not None:
        tamper(fields)
    return encodeTicket(fields)
