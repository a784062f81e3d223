"""
Tests for L{imageio.proxy._signedticket}.
"""

from __future__ import annotations

import base64
import datetime
import json
import operator
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imageio.proxy._signedticket import (
    MAX_ALLOWED_SKEW,
    MAX_LIFETIME,
    Claims,
    ExpiredTicket,
    InvalidTicket,
    TicketVerifier,
    loadCertificate,
)
from tests import engine
from tests.engine import NOW


def clockAt(now: float) -> Callable[[], float]:
    """
    A clock that reads C{now}.
    """
    clock = Clock()
    clock.advance(now)
    return clock.seconds


def makeVerifier(now: float = NOW, **kwargs: Any) -> TicketVerifier:
    """
    A verifier for the test engine whose clock reads C{now}.
    """
    return TicketVerifier(engine.engine().pem, clock=clockAt(now), **kwargs)


def modified(**changes: str | None) -> Callable[[dict[str, str]], None]:
    """
    A C{tamper} function that sets fields (or removes those set to C{None}).
    """

    def tamper(fields: dict[str, str]) -> None:
        for name, value in changes.items():
            if value is None:
                del fields[name]
            else:
                fields[name] = value

    return tamper


class RejectionMixin:
    """
    Assertions on refused tickets.
    """

    def assertRejected(
        self: Any,
        ticket: str | bytes,
        reason: str,
        verifier: TicketVerifier | None = None,
    ) -> InvalidTicket:
        """
        Assert that C{ticket} is refused with C{reason}.
        """
        if verifier is None:
            verifier = makeVerifier()
        error: InvalidTicket = self.assertRaises(InvalidTicket, verifier.verify, ticket)
        self.assertEqual(str(error), reason)
        return error


class EngineFormatTests(SynchronousTestCase):
    """
    The test helper builds tickets the way the engine does (wire contract 4.3).
    """

    def test_v1SignedFieldsOrder(self) -> None:
        """
        v1 tickets sign in the Java engine's HashMap order.
        """
        fields = engine.decodeTicket(engine.makeTicket(v1=True))
        self.assertEqual(fields["signedFields"], "salt,data,digest,validFrom,validTo")
        self.assertEqual(fields["digest"], "sha1")
        self.assertNotIn("v2_signature", fields)

    def test_bothSignedFieldsOrder(self) -> None:
        """
        Tickets with both signatures sign the same fields in the same order.
        """
        fields = engine.decodeTicket(engine.makeTicket(v1=True, v2=True))
        self.assertEqual(fields["signedFields"], "salt,data,digest,validFrom,validTo")
        self.assertIn("signature", fields)
        self.assertIn("v2_signature", fields)

    def test_v2SignedFieldsOrder(self) -> None:
        """
        v2-only tickets have no digest and sign four fields.
        """
        fields = engine.decodeTicket(engine.makeTicket(v1=False, v2=True))
        self.assertEqual(fields["signedFields"], "salt,data,validFrom,validTo")
        self.assertNotIn("digest", fields)
        self.assertNotIn("signature", fields)

    def test_saltAndTimestamps(self) -> None:
        """
        The salt is 8 bytes in 12 base64 characters; timestamps are UTC.
        """
        fields = engine.decodeTicket(engine.makeTicket(lifetime=300))
        self.assertEqual(len(fields["salt"]), 12)
        self.assertEqual(len(base64.b64decode(fields["salt"])), 8)
        self.assertEqual(fields["validFrom"], "20231114221320")
        self.assertEqual(fields["validTo"], "20231114221820")

    def test_certificatePEM(self) -> None:
        """
        The embedded certificate has 76-character base64 lines ending in CRLF.
        """
        pem = engine.decodeTicket(engine.makeTicket())["certificate"]
        self.assertTrue(pem.startswith("-----BEGIN CERTIFICATE-----\n"))
        self.assertTrue(pem.endswith("\r\n-----END CERTIFICATE-----\n"))
        body = pem.split("\n", 1)[1].rsplit("-----END", 1)[0]
        lines = body.split("\r\n")
        self.assertEqual(lines[-1], "")
        self.assertTrue(all(len(line) == 76 for line in lines[:-2]))
        self.assertEqual(
            loadCertificate(pem.encode()).fingerprint(hashes.SHA256()),
            engine.engine().certificate.fingerprint(hashes.SHA256()),
        )

    def test_payloadLikeJackson(self) -> None:
        """
        The payload is pretty-printed with Jackson's spacing and key order.
        """
        data = engine.decodeTicket(engine.makeTicket())["data"]
        self.assertTrue(data.startswith('{\n  "nbf" : 1700000000,\n  "exp" : 1700000300,\n'))
        self.assertEqual(
            list(json.loads(data)),
            ["nbf", "exp", "iat", "transfer-ticket", "transfer-id", "imaged-uri"],
        )

    def test_ticketIsCanonicalBase64(self) -> None:
        """
        The ticket is standard base64 with padding and no line breaks.
        """
        ticket = engine.makeTicket(v1=True, v2=True)
        self.assertEqual(base64.b64encode(base64.b64decode(ticket)).decode(), ticket)
        self.assertNotIn("\n", ticket)


class ValidTicketTests(SynchronousTestCase, RejectionMixin):
    """
    Tickets as the engine makes them are accepted.
    """

    def expectedClaims(self) -> Claims:
        return Claims(
            transferTicket=engine.TRANSFER_TICKET,
            imagedURI=engine.IMAGED_URI,
            notBefore=NOW,
            expires=NOW + 300,
            issuedAt=NOW,
            transferID=engine.TRANSFER_ID,
        )

    def test_v1(self) -> None:
        """
        A v1 (PKCS#1 v1.5, SHA-1) ticket verifies and yields its claims.
        """
        claims = makeVerifier().verify(engine.makeTicket(v1=True))
        self.assertEqual(claims, self.expectedClaims())

    def test_v2(self) -> None:
        """
        A v2 (RSA-PSS, SHA-256) ticket verifies and yields its claims.
        """
        claims = makeVerifier().verify(engine.makeTicket(v1=False, v2=True))
        self.assertEqual(claims, self.expectedClaims())

    def test_v1AndV2(self) -> None:
        """
        A ticket carrying both signatures verifies.
        """
        claims = makeVerifier().verify(engine.makeTicket(v1=True, v2=True))
        self.assertEqual(claims, self.expectedClaims())

    def test_v1SHA256(self) -> None:
        """
        A v1 ticket may name SHA-256 as its digest.
        """
        ticket = engine.makeTicket(v1=True, digest="sha256")
        self.assertEqual(makeVerifier().verify(ticket), self.expectedClaims())

    def test_withEngineCA(self) -> None:
        """
        Tickets verify when the engine CA is configured and signed the engine
        certificate.
        """
        verifier = makeVerifier(engineCACert=engine.engineCA().pem)
        self.assertEqual(verifier.verify(engine.makeTicket(v2=True)), self.expectedClaims())

    def test_otherFieldOrder(self) -> None:
        """
        The verifier follows C{signedFields}, whatever the order (the engine's
        Python encoders use insertion order).
        """
        ticket = engine.makeTicket(
            v1=True, v2=True, signedFields=["salt", "digest", "validFrom", "validTo", "data"]
        )
        self.assertEqual(makeVerifier().verify(ticket), self.expectedClaims())

    def test_bytes(self) -> None:
        """
        A ticket may be given as bytes.
        """
        ticket = engine.makeTicket().encode("ascii")
        self.assertEqual(makeVerifier().verify(ticket), self.expectedClaims())

    def test_surroundingWhitespace(self) -> None:
        """
        Whitespace around the ticket (a trailing newline from a file) is
        ignored.
        """
        ticket = " " + engine.makeTicket() + "\r\n"
        self.assertEqual(makeVerifier().verify(ticket), self.expectedClaims())

    def test_optionalClaims(self) -> None:
        """
        C{iat} and C{transfer-id} are optional (engines before 4.2.7 sent no
        C{transfer-id}).
        """
        payload = engine.makePayload(transferID=None)
        del payload["iat"]
        claims = makeVerifier().verify(engine.makeTicket(payload))
        self.assertIsNone(claims.issuedAt)
        self.assertIsNone(claims.transferID)
        self.assertEqual(claims.transferTicket, engine.TRANSFER_TICKET)

    def test_payloadKept(self) -> None:
        """
        The parsed payload is available, read-only, and not part of equality.
        """
        payload = engine.makePayload()
        payload["extra"] = "kept"
        claims = makeVerifier().verify(engine.makeTicket(payload))
        self.assertEqual(claims.payload["extra"], "kept")
        self.assertRaises(TypeError, operator.setitem, claims.payload, "extra", "x")
        self.assertEqual(claims, self.expectedClaims())

    def test_compactPayload(self) -> None:
        """
        The payload is parsed as JSON, not compared as text: compact JSON is
        as good as Jackson's pretty printing.
        """
        data = json.dumps(engine.makePayload(), separators=(",", ":"))
        self.assertEqual(makeVerifier().verify(engine.makeTicket(data)), self.expectedClaims())

    def test_imagedURITrailingSlash(self) -> None:
        """
        A trailing slash on C{imaged-uri} is dropped from the claims.
        """
        payload = engine.makePayload(imagedURI="https://host.example.com:54322/")
        claims = makeVerifier().verify(engine.makeTicket(payload))
        self.assertEqual(claims.imagedURI, "https://host.example.com:54322")

    def test_embeddedCertificateIgnored(self) -> None:
        """
        The certificate embedded in the ticket plays no part: a ticket whose
        embedded certificate is junk still verifies with the configured one.
        """
        ticket = engine.makeTicket(tamper=modified(certificate="junk"))
        self.assertEqual(makeVerifier().verify(ticket), self.expectedClaims())

    def test_v2WithBrokenV1(self) -> None:
        """
        When both signatures are present only v2 counts: a broken v1
        signature does not matter.
        """
        ticket = engine.makeTicket(v1=True, v2=True, tamper=modified(signature="AAAA"))
        self.assertEqual(makeVerifier().verify(ticket), self.expectedClaims())

    def test_pssSaltLengthPinned(self) -> None:
        """
        The v2 signature must use the engine's (maximum) PSS salt length: a
        valid PSS signature with a 32-byte salt is refused.
        """

        def shortSalt(fields: dict[str, str]) -> None:
            message = engine.signatureMessage(fields)
            fields["v2_signature"] = engine.signV2(engine.engine().key, message, 32)

        ticket = engine.makeTicket(v1=False, v2=True, tamper=shortSalt)
        self.assertRejected(ticket, "invalid signature")


class ForgeryTests(SynchronousTestCase, RejectionMixin):
    """
    Forged and altered tickets are refused (reliability checklist I.43).
    """

    def test_modifiedData(self) -> None:
        """
        Changing the payload breaks the signature, v1 or v2.
        """
        data = engine.jacksonPretty(engine.makePayload(imagedURI="https://evil.example.com"))
        for v1, v2 in ((True, False), (False, True), (True, True)):
            ticket = engine.makeTicket(v1=v1, v2=v2, tamper=modified(data=data))
            self.assertRejected(ticket, "invalid signature")

    def test_modifiedValidTo(self) -> None:
        """
        Extending the validity window breaks the signature.
        """
        ticket = engine.makeTicket(v2=True, tamper=modified(validTo="20231115221820"))
        self.assertRejected(ticket, "invalid signature")

    def assertSplicedRejected(
        self, splice: Callable[[dict[str, str]], None], reason: str, v1: bool = True
    ) -> None:
        """
        Assert that a splice keeps the signed message (so the signature still
        verifies) and that the ticket is refused for C{reason}.
        """
        original: dict[str, str] = {}

        def tamper(fields: dict[str, str]) -> None:
            original.update(fields)
            splice(fields)

        ticket = engine.makeTicket(v1=v1, v2=True, tamper=tamper)
        forged = engine.decodeTicket(ticket)
        self.assertNotEqual(forged, original)
        self.assertEqual(engine.signatureMessage(forged), engine.signatureMessage(original))
        self.assertRejected(ticket, reason)

    def test_spliceSaltIntoData(self) -> None:
        """
        Moving the last character of C{salt} to the start of C{data} is
        refused by the salt's fixed format.
        """

        def splice(fields: dict[str, str]) -> None:
            fields["data"] = fields["salt"][-1] + fields["data"]
            fields["salt"] = fields["salt"][:-1]

        self.assertSplicedRejected(splice, "malformed salt")

    def test_spliceDataIntoSalt(self) -> None:
        """
        Moving the first character of C{data} to the end of C{salt} is
        refused by the salt's fixed format.
        """

        def splice(fields: dict[str, str]) -> None:
            fields["salt"] = fields["salt"] + fields["data"][0]
            fields["data"] = fields["data"][1:]

        self.assertSplicedRejected(splice, "malformed salt")

    def test_spliceDigestIntoData(self) -> None:
        """
        Moving the first character of C{digest} to the end of C{data} is
        refused: C{"ha1"} is no digest.
        """

        def splice(fields: dict[str, str]) -> None:
            fields["data"] = fields["data"] + fields["digest"][0]
            fields["digest"] = fields["digest"][1:]

        self.assertSplicedRejected(splice, "unsupported digest")

    def test_spliceValidFromIntoValidTo(self) -> None:
        """
        Moving a digit from C{validFrom} to C{validTo} is refused by the
        timestamps' fixed width.
        """

        def splice(fields: dict[str, str]) -> None:
            fields["validTo"] = fields["validFrom"][-1] + fields["validTo"]
            fields["validFrom"] = fields["validFrom"][:-1]

        self.assertSplicedRejected(splice, "malformed validFrom")

    def test_spliceValidToIntoData(self) -> None:
        """
        With C{data} signed last (the Python encoders' order), moving a digit
        of C{validTo} into C{data} is refused.
        """
        order = ["salt", "digest", "validFrom", "validTo", "data"]

        def splice(fields: dict[str, str]) -> None:
            self.assertEqual(fields["signedFields"], ",".join(order))
            fields["data"] = fields["validTo"][-1] + fields["data"]
            fields["validTo"] = fields["validTo"][:-1]

        original: dict[str, str] = {}

        def tamper(fields: dict[str, str]) -> None:
            original.update(fields)
            splice(fields)

        ticket = engine.makeTicket(signedFields=order, tamper=tamper)
        forged = engine.decodeTicket(ticket)
        self.assertEqual(engine.signatureMessage(forged), engine.signatureMessage(original))
        self.assertRejected(ticket, "malformed validTo")

    def test_swapValidity(self) -> None:
        """
        Swapping C{validFrom} and C{validTo} along with their order in
        C{signedFields} keeps the signed message but is refused, because the
        window would end before it starts.
        """

        def splice(fields: dict[str, str]) -> None:
            fields["validFrom"], fields["validTo"] = fields["validTo"], fields["validFrom"]
            fields["signedFields"] = "salt,data,digest,validTo,validFrom"

        self.assertSplicedRejected(splice, "invalid lifetime")

    def test_signedFieldsWithoutData(self) -> None:
        """
        C{data} must be signed.
        """
        ticket = engine.makeTicket(signedFields=["salt", "digest", "validFrom", "validTo"])
        self.assertRejected(ticket, "unsigned field: data")

    def test_signedFieldsWithoutValidTo(self) -> None:
        """
        C{validTo} must be signed.
        """
        ticket = engine.makeTicket(v2=True, signedFields=["salt", "data", "digest", "validFrom"])
        self.assertRejected(ticket, "unsigned field: validTo")

    def test_signedFieldsWithoutSaltOrValidFrom(self) -> None:
        """
        C{salt} and C{validFrom} must be signed too.
        """
        for name in ("salt", "validFrom"):
            order = [n for n in ("salt", "data", "digest", "validFrom", "validTo") if n != name]
            ticket = engine.makeTicket(signedFields=order)
            self.assertRejected(ticket, f"unsigned field: {name}")

    def test_unsignedDigest(self) -> None:
        """
        A v1 signature needs a signed C{digest}: otherwise it could be changed
        at will.
        """
        ticket = engine.makeTicket(signedFields=["salt", "data", "validFrom", "validTo"])
        self.assertRejected(ticket, "unsigned field: digest")

    def test_unknownSignedField(self) -> None:
        """
        Only the known fields may be signed.
        """

        def tamper(fields: dict[str, str]) -> None:
            fields["signedFields"] += ",certificate"

        self.assertRejected(engine.makeTicket(tamper=tamper), "unknown signed field")

    def test_duplicateSignedField(self) -> None:
        """
        A field may be signed only once.
        """
        order = ["salt", "salt", "data", "digest", "validFrom", "validTo"]
        self.assertRejected(engine.makeTicket(signedFields=order), "duplicate signed field")

    def test_signedFieldMissing(self) -> None:
        """
        Every field named in C{signedFields} must exist.
        """
        ticket = engine.makeTicket(v1=True, v2=True, tamper=modified(digest=None))
        self.assertRejected(ticket, "missing field: digest")

    def test_requiredFieldMissing(self) -> None:
        """
        A ticket without C{signedFields} or one of the security fields is
        refused.
        """
        for name in ("signedFields", "salt", "validFrom", "validTo", "data"):
            ticket = engine.makeTicket(tamper=modified(**{name: None}))
            self.assertRejected(ticket, f"missing field: {name}")

    def test_md5Digest(self) -> None:
        """
        A v1 ticket properly signed with MD5 is refused.
        """
        self.assertRejected(engine.makeTicket(digest="md5"), "unsupported digest")

    def test_otherDigests(self) -> None:
        """
        Digest names other than C{sha1} and C{sha256} are refused, even in
        another case, empty, or C{none}.
        """
        for digest in ("none", "", "SHA1", "sha512", "sha1 "):
            ticket = engine.makeTicket(tamper=modified(digest=digest))
            self.assertRejected(ticket, "unsupported digest")

    def test_noSignature(self) -> None:
        """
        A ticket without any signature is refused.
        """
        ticket = engine.makeTicket(tamper=modified(signature=None))
        self.assertRejected(ticket, "missing signature")

    def test_brokenV2WithGoodV1(self) -> None:
        """
        When both signatures are present v2 must verify; a good v1 signature
        does not rescue a bad v2 one.
        """

        def tamper(fields: dict[str, str]) -> None:
            other = engine.signV2(engine.stranger().key, engine.signatureMessage(fields))
            fields["v2_signature"] = other

        ticket = engine.makeTicket(v1=True, v2=True, tamper=tamper)
        self.assertRejected(ticket, "invalid signature")

    def test_malformedSignature(self) -> None:
        """
        Signatures must be canonical base64.
        """
        for name, v1, v2 in (("signature", True, False), ("v2_signature", False, True)):
            for junk in ("not base64!", "QUJD\n", "QR==", "é"):
                ticket = engine.makeTicket(v1=v1, v2=v2, tamper=modified(**{name: junk}))
                self.assertRejected(ticket, "malformed signature")

    def test_otherKey(self) -> None:
        """
        A ticket signed by another key, embedding that key's certificate, is
        refused: only the configured engine certificate counts.
        """
        for v1, v2 in ((True, False), (False, True), (True, True)):
            ticket = engine.makeTicket(v1=v1, v2=v2, signer=engine.stranger())
            self.assertRejected(ticket, "invalid signature")

    def test_certificateFromEngineCA(self) -> None:
        """
        A ticket signed by another certificate issued by the engine CA is
        refused: chaining to the CA is not enough, it must be the engine.
        """
        verifier = makeVerifier(engineCACert=engine.engineCA().pem)
        for v1, v2 in ((True, False), (False, True)):
            ticket = engine.makeTicket(v1=v1, v2=v2, signer=engine.rogue())
            self.assertRejected(ticket, "invalid signature", verifier)

    def test_duplicateKeys(self) -> None:
        """
        A ticket with a key twice is refused, whichever value would win.
        """
        ticket = engine.makeTicket()
        text = base64.b64decode(ticket).decode()
        forged = text[:-1] + ',"data":"{}"}'
        self.assertRejected(base64.b64encode(forged.encode()), "duplicate key")

    def test_duplicatePayloadKeys(self) -> None:
        """
        A payload with a key twice is refused.
        """
        data = engine.jacksonPretty(engine.makePayload())
        data = data[:-2] + ',\n  "imaged-uri" : "https://evil.example.com"\n}'
        self.assertRejected(engine.makeTicket(data), "duplicate key in payload")

    def test_megabyteTicket(self) -> None:
        """
        A 1 MB ticket is refused for its size, before it is decoded.
        """
        self.assertRejected("!" * 1_000_000, "ticket too large")
        self.assertRejected(b"A" * 1_000_000, "ticket too large")

    def test_sizeLimit(self) -> None:
        """
        The size limit is configurable and applies to the ticket text.
        """
        ticket = engine.makeTicket()
        self.assertRejected(ticket, "ticket too large", makeVerifier(maxTicketSize=len(ticket) - 1))
        makeVerifier(maxTicketSize=len(ticket)).verify(ticket)

    def test_badBase64(self) -> None:
        """
        Anything but canonical standard base64 with padding is refused.
        """
        ticket = engine.makeTicket()
        cases = [
            ticket + "!",
            ticket[:100] + "\n" + ticket[100:],
            ticket[:100] + "=" + ticket[100:],
            "é" + ticket,
            # "{}" is e30=, "\xfb\xff" is +/8=
            "e30",
            "e30==",
            "e31=",
            "-_8=",
        ]
        for case in cases:
            self.assertRejected(case, "malformed base64")

    def test_malformedJSON(self) -> None:
        """
        Text that is not JSON (or not UTF-8, or uses NaN) is refused.
        """
        for text in (b"", b"{", b"\xff\xfe{}", b'{"salt": NaN}', b"[" * 20000):
            self.assertRejected(base64.b64encode(text), "malformed JSON")

    def test_notAnObjectOfStrings(self) -> None:
        """
        The ticket must be a JSON object whose values are all strings.
        """
        fields = engine.decodeTicket(engine.makeTicket())
        cases: list[object] = [[], "x", {**fields, "salt": 1}, {**fields, "data": {"nbf": 1}}]
        for forged in cases:
            self.assertRejected(
                engine.encodeTicket(forged)
                if isinstance(forged, dict)
                else base64.b64encode(json.dumps(forged).encode()),
                "ticket is not a JSON object of strings",
            )

    def test_unknownField(self) -> None:
        """
        Fields the engine never sends are refused.
        """
        ticket = engine.makeTicket(tamper=modified(extra="x"))
        self.assertRejected(ticket, "unknown field")

    def test_loneSurrogate(self) -> None:
        """
        A signed value with no UTF-8 form (a lone surrogate) is refused.
        """
        fields = engine.decodeTicket(engine.makeTicket())
        text = json.dumps({**fields, "data": fields["data"][:-1] + ',"x":"\ud800"}'})
        self.assertRejected(base64.b64encode(text.encode()), "malformed field")

    def test_malformedSalt(self) -> None:
        """
        The salt must be 8 bytes in canonical base64.
        """
        for salt in ("AAAAAAAAAAA", "AAAAAAAAAAAAAAAA", "AAAAAAAAAAA!", "AAAAAAAAAAB=", "é" * 12):
            ticket = engine.makeTicket(tamper=modified(salt=salt))
            self.assertRejected(ticket, "malformed salt")

    def test_malformedTimestamps(self) -> None:
        """
        C{validFrom} and C{validTo} must be 14 ASCII digits forming a real
        date.
        """
        for value in (
            "2023-11-14 22:13",
            "20231314221320",
            "20230230221320",
            "20231114246000",
            "2023111422132",
            "202311142213200",
            "２０２３１１１４２２１３２０",
            "00001114221320",
            " 20231114221320",
        ):
            for name in ("validFrom", "validTo"):
                ticket = engine.makeTicket(tamper=modified(**{name: value}))
                self.assertRejected(ticket, f"malformed {name}")


class PayloadTests(SynchronousTestCase, RejectionMixin):
    """
    The payload must hold sane claims.
    """

    def assertPayloadRejected(self, payload: Any, reason: str, **kwargs: Any) -> None:
        data = payload if isinstance(payload, str) else engine.jacksonPretty(payload)
        self.assertRejected(engine.makeTicket(data), reason, makeVerifier(**kwargs))

    def test_notAnObject(self) -> None:
        """
        The payload must be a JSON object.
        """
        for data in ("[]", '"x"', "{", "1"):
            self.assertPayloadRejected(data, "malformed payload")

    def test_missingClaims(self) -> None:
        """
        C{nbf}, C{exp}, C{transfer-ticket} and C{imaged-uri} are required.
        """
        for name in ("nbf", "exp", "transfer-ticket", "imaged-uri"):
            payload = engine.makePayload()
            del payload[name]
            self.assertPayloadRejected(payload, f"missing claim: {name}")

    def test_booleansAreNotIntegers(self) -> None:
        """
        JSON booleans are refused where integers are expected.
        """
        for name in ("nbf", "exp", "iat"):
            payload = engine.makePayload()
            payload[name] = True
            self.assertPayloadRejected(payload, f"invalid claim: {name}")

    def test_otherTypes(self) -> None:
        """
        Times must be non-negative integers, ids strings.
        """
        for name, value in (
            ("nbf", NOW + 0.5),
            ("exp", str(NOW + 300)),
            ("nbf", -1),
            ("exp", 10**20),
            ("iat", None),
            ("transfer-ticket", 1),
            ("transfer-id", None),
            ("imaged-uri", ["https://host.example.com"]),
        ):
            payload = engine.makePayload()
            payload[name] = value
            self.assertPayloadRejected(payload, f"invalid claim: {name}")

    def test_unsafeTicketID(self) -> None:
        """
        The ticket id must be safe in a URL path.
        """
        for value in ("", "../tickets", "a/b", "a b", "x" * 129, "a?b", "é"):
            payload = engine.makePayload(transferTicket=value)
            self.assertPayloadRejected(payload, "invalid claim: transfer-ticket")

    def test_absurdLifetime(self) -> None:
        """
        Payloads valid for more than a year, or for no time at all, are
        refused.
        """
        for lifetime in (MAX_LIFETIME + 1, 0, -300):
            payload = engine.makePayload(lifetime=lifetime)
            self.assertPayloadRejected(payload, "invalid lifetime")

    def test_lifetimeBoundLikeDaemonTickets(self) -> None:
        """
        Signed tickets may not live longer than a daemon ticket's timeout may
        be (30 days).
        """
        payload = engine.makePayload(lifetime=31 * 24 * 3600)
        self.assertPayloadRejected(payload, "invalid lifetime")

    def test_absurdTicketLifetime(self) -> None:
        """
        Tickets whose C{validTo} is more than a year after C{validFrom} are
        refused.
        """
        ticket = engine.makeTicket(engine.makePayload(), lifetime=MAX_LIFETIME + 1)
        self.assertRejected(ticket, "invalid lifetime")

    def test_imagedURIs(self) -> None:
        """
        Only C{https://host[:port]} daemon addresses are accepted.
        """
        for uri in (
            "http://host.example.com:54322",
            "ftp://host.example.com",
            "https://user:pw@host.example.com:54322",
            "https://@host.example.com",
            "https://host.example.com:54322/images",
            "https://host.example.com:54322/?x=1",
            "https://host.example.com:54322?",
            "https://host.example.com:54322#",
            "https://host.example.com:0",
            "https://host.example.com:99999",
            "https://host.example.com:",
            "https://host.example.com:54322 ",
            "https://host\texample.com",
            "https://",
            "https:///images",
            "host.example.com:54322",
            "https://-host.example.com",
            "https://host_1.example.com",
            "https://[::1",
            "https://[fe80::1%25eth0]",
            "https://" + "a" * 300 + ".com",
        ):
            payload = engine.makePayload(imagedURI=uri)
            self.assertPayloadRejected(payload, "invalid claim: imaged-uri")

    def test_goodImagedURIs(self) -> None:
        """
        Names, private addresses and IPv6 literals, with or without a port,
        are accepted.
        """
        for uri in (
            "https://host.example.com",
            "https://host1",
            "https://10.1.2.3:54322",
            "https://[2001:db8::1]:54322",
            "HTTPS://Host.Example.Com:54322",
        ):
            claims = makeVerifier().verify(engine.makeTicket(engine.makePayload(imagedURI=uri)))
            self.assertEqual(claims.imagedURI.lower(), uri.lower())

    def test_http(self) -> None:
        """
        Plain HTTP daemon addresses are accepted only when allowed.
        """
        payload = engine.makePayload(imagedURI="http://host.example.com:54322")
        verifier = makeVerifier(allowHTTP=True)
        claims = verifier.verify(engine.makeTicket(payload))
        self.assertEqual(claims.imagedURI, "http://host.example.com:54322")

    def test_loopback(self) -> None:
        """
        Loopback addresses, in any spelling, are refused unless allowed.
        """
        for uri in (
            "https://127.0.0.1:54322",
            "https://127.9.9.9",
            "https://[::1]:54322",
            "https://[::ffff:127.0.0.1]",
            "https://localhost:54322",
            "https://a.localhost",
        ):
            payload = engine.makePayload(imagedURI=uri)
            self.assertPayloadRejected(
                payload,
                "imaged-uri names a loopback daemon, refused unless "
                "[proxy] allow_loopback = true (all-in-one labs only)",
            )
            claims = makeVerifier(allowLoopback=True).verify(engine.makeTicket(payload))
            self.assertEqual(claims.imagedURI, uri)

    def test_numericNames(self) -> None:
        """
        Numbers that resolvers read as addresses but that are not dotted
        quads are refused, even when loopback is allowed.
        """
        for uri in (
            "https://127.1",
            "https://2130706433",
            "https://0x7f000001",
            "https://0177.0.0.1",
        ):
            payload = engine.makePayload(imagedURI=uri)
            self.assertPayloadRejected(payload, "invalid claim: imaged-uri", allowLoopback=True)

    def test_neverAllowedAddresses(self) -> None:
        """
        Link-local (cloud metadata), multicast and unspecified addresses are
        always refused.
        """
        for uri in (
            "https://169.254.169.254",
            "https://[fe80::1]",
            "https://224.0.0.1",
            "https://0.0.0.0",
            "https://[::]",
            "https://[::ffff:169.254.169.254]",
        ):
            payload = engine.makePayload(imagedURI=uri)
            self.assertPayloadRejected(payload, "invalid claim: imaged-uri", allowLoopback=True)


class ValidityTests(SynchronousTestCase, RejectionMixin):
    """
    Validity windows, with clock skew tolerated in the client's favour.
    """

    def test_notYetValid(self) -> None:
        """
        A ticket whose C{nbf} is in the future is refused.
        """
        ticket = engine.makeTicket(now=NOW + 10)
        self.assertRejected(ticket, "ticket not valid yet")

    def test_nbfBeyondSkew(self) -> None:
        """
        A C{nbf} further in the future than the skew is refused.
        """
        payload = engine.makePayload(now=NOW + 31)
        ticket = engine.makeTicket(payload, now=NOW)
        self.assertRejected(ticket, "ticket not valid yet", makeVerifier(allowedSkew=30))

    def test_validFromBeyondSkew(self) -> None:
        """
        A C{validFrom} further in the future than the skew is refused.
        """
        ticket = engine.makeTicket(engine.makePayload(now=NOW), now=NOW + 31)
        self.assertRejected(ticket, "ticket not valid yet", makeVerifier(allowedSkew=30))

    def test_expired(self) -> None:
        """
        A ticket is refused from C{exp} on, as an L{ExpiredTicket}.
        """
        ticket = engine.makeTicket(lifetime=300)
        makeVerifier(now=NOW + 299.9).verify(ticket)
        error = self.assertRejected(ticket, "expired ticket", makeVerifier(now=NOW + 300))
        self.assertIsInstance(error, ExpiredTicket)

    def test_payloadExpired(self) -> None:
        """
        A payload C{exp} passed is refused even if the outer window is open.
        """
        ticket = engine.makeTicket(engine.makePayload(lifetime=60), lifetime=300)
        self.assertRejected(ticket, "expired ticket", makeVerifier(now=NOW + 60))

    def test_validToExpired(self) -> None:
        """
        A C{validTo} passed is refused even if the payload is still valid.
        """
        ticket = engine.makeTicket(engine.makePayload(lifetime=300), lifetime=60)
        self.assertRejected(ticket, "expired ticket", makeVerifier(now=NOW + 60))

    def test_skewAcceptsEarlyTicket(self) -> None:
        """
        With a skew, a ticket from an engine whose clock is ahead is accepted
        (upstream's inverted check refused it).
        """
        ticket = engine.makeTicket(now=NOW + 20)
        claims = makeVerifier(allowedSkew=30).verify(ticket)
        self.assertEqual(claims.notBefore, NOW + 20)

    def test_skewAcceptsLateTicket(self) -> None:
        """
        With a skew, a ticket that expired less than the skew ago is
        accepted.
        """
        ticket = engine.makeTicket(lifetime=300)
        makeVerifier(now=NOW + 329, allowedSkew=30).verify(ticket)
        self.assertRejected(ticket, "expired ticket", makeVerifier(now=NOW + 330, allowedSkew=30))

    def test_skewAcceptsFreshTicket(self) -> None:
        """
        With a skew, a ticket made just now is accepted (upstream refused it
        because it applied the skew against the client).
        """
        makeVerifier(allowedSkew=30).verify(engine.makeTicket(now=NOW))

    def test_skewBounds(self) -> None:
        """
        The skew must be an integer from 0 to L{MAX_ALLOWED_SKEW}.
        """
        makeVerifier(allowedSkew=MAX_ALLOWED_SKEW)
        for skew in (MAX_ALLOWED_SKEW + 1, -1, True, 1.5):
            self.assertRaises(ValueError, makeVerifier, allowedSkew=skew)

    def test_checkCurrent(self) -> None:
        """
        L{TicketVerifier.checkCurrent} re-checks kept claims against the
        clock, with the skew.
        """
        clock = Clock()
        clock.advance(NOW)
        verifier = TicketVerifier(engine.engine().pem, clock=clock.seconds, allowedSkew=10)
        claims = verifier.verify(engine.makeTicket(lifetime=300))
        clock.advance(309)
        verifier.checkCurrent(claims)
        clock.advance(1)
        self.assertRaises(ExpiredTicket, verifier.checkCurrent, claims)

    def test_reasonIsShort(self) -> None:
        """
        Refusal reasons never echo the ticket.
        """
        payload = engine.makePayload(transferTicket="secret-ticket-id", lifetime=10)
        ticket = engine.makeTicket(payload, lifetime=10)
        error = self.assertRejected(ticket, "expired ticket", makeVerifier(now=NOW + 600))
        self.assertNotIn("secret", repr(error))
        bad = engine.makeTicket(payload, tamper=modified(salt="secret-salt!"))
        error = self.assertRejected(bad, "malformed salt")
        self.assertNotIn("secret", repr(error))


class CertificateTests(SynchronousTestCase, RejectionMixin):
    """
    The engine certificate and its CA.
    """

    def test_notSignedByCA(self) -> None:
        """
        An engine certificate not issued by the configured CA is refused when
        the verifier is built.
        """
        self.assertRaises(
            ValueError,
            TicketVerifier,
            engine.stranger().pem,
            clock=lambda: NOW,
            engineCACert=engine.engineCA().pem,
        )

    def test_sameNameOtherCA(self) -> None:
        """
        A certificate naming the engine CA as issuer but signed by another key
        is refused.
        """
        fakeCA = engine.issue("engine-ca.example.com", engine.rsaKey("fake-ca"), ca=True)
        forged = engine.issue("engine.example.com", engine.rsaKey("engine"), fakeCA)
        self.assertEqual(forged.certificate.issuer, engine.engineCA().certificate.subject)
        self.assertRaises(
            ValueError,
            TicketVerifier,
            forged.pem,
            clock=lambda: NOW,
            engineCACert=engine.engineCA().pem,
        )

    def test_engineCertificateDates(self) -> None:
        """
        With a CA configured, tickets are refused while the engine
        certificate is not within its validity dates.
        """
        short = engine.issue(
            "engine.example.com",
            engine.rsaKey("engine"),
            engine.engineCA(),
            notBefore=NOW - 100,
            notAfter=NOW + 100,
        )
        ticket = engine.makeTicket(now=NOW - 200, lifetime=MAX_LIFETIME)
        for now, reason in (
            (NOW - 101, "engine certificate not valid yet"),
            (NOW + 101, "engine certificate expired"),
        ):
            verifier = TicketVerifier(
                short.pem, clock=clockAt(now), engineCACert=engine.engineCA().pem
            )
            self.assertRejected(ticket, reason, verifier)
        for now in (NOW - 100, NOW + 100):
            verifier = TicketVerifier(
                short.pem, clock=clockAt(now), engineCACert=engine.engineCA().pem
            )
            verifier.verify(ticket)

    def test_caDates(self) -> None:
        """
        With a CA configured, tickets are refused once the CA has expired.
        """
        oldCA = engine.issue("old-ca.example.com", engine.rsaKey("ca"), notAfter=NOW - 1, ca=True)
        signer = engine.issue("engine.example.com", engine.rsaKey("engine"), oldCA)
        verifier = TicketVerifier(
            signer.pem,
            clock=lambda: NOW,
            engineCACert=oldCA.pem,
        )
        self.assertRejected(engine.makeTicket(), "engine CA certificate expired", verifier)

    def test_datesUncheckedWithoutCA(self) -> None:
        """
        Without a CA, the engine certificate's dates are not checked, as
        upstream.
        """
        expired = engine.issue("engine.example.com", engine.rsaKey("engine"), notAfter=NOW - 1)
        TicketVerifier(expired.pem, clock=lambda: NOW).verify(engine.makeTicket())

    def test_notRSA(self) -> None:
        """
        An engine certificate without an RSA key is refused.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1))
            .sign(key, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.assertRaises(ValueError, TicketVerifier, pem, clock=lambda: NOW)

    def test_notPEM(self) -> None:
        """
        Junk instead of a certificate is refused.
        """
        self.assertRaises(ValueError, loadCertificate, b"junk")
        self.assertRaises(ValueError, TicketVerifier, b"junk", clock=lambda: NOW)
