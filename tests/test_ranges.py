# -*- test-case-name: tests.test_ranges -*-
"""
Tests for L{imageio.ranges}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imageio.ranges import (
    ByteRange,
    ContentRange,
    InvalidContentLength,
    InvalidContentRange,
    InvalidFraming,
    InvalidRange,
    RangeError,
    RangeNotSatisfiable,
    RangeSet,
    checkFraming,
    contentRangeHeader,
    parseContentLength,
    parseContentRange,
    parseRange,
    resolveRange,
)

T = 1024**2


def rangeFor(header: bytes, ticketSize: int = T, available: int = T) -> tuple[int, int]:
    """
    Parse and resolve a C{Range} header the way the GET handler does.
    """
    return resolveRange(parseRange(header), ticketSize, available)


class ParseRangeTests(SynchronousTestCase):
    """
    Tests for L{parseRange}.
    """

    def assertInvalid(self, header: bytes, message: str) -> None:
        e = self.assertRaises(InvalidRange, parseRange, header)
        self.assertEqual(e.message, message)
        self.assertEqual(e.status, 416)

    def test_closed(self) -> None:
        """
        C{bytes=first-last} parses to both offsets.
        """
        self.assertEqual(parseRange(b"bytes=0-99"), ByteRange(0, 99))

    def test_openEnded(self) -> None:
        """
        C{bytes=first-} parses to an open-ended range.
        """
        self.assertEqual(parseRange(b"bytes=7-"), ByteRange(7, None))

    def test_suffix(self) -> None:
        """
        C{bytes=-N} parses to a suffix range of N bytes.
        """
        self.assertEqual(parseRange(b"bytes=-10"), ByteRange(None, 10))

    def test_suffixZeroParses(self) -> None:
        """
        C{bytes=-0} is well formed; it is refused when resolved.
        """
        self.assertEqual(parseRange(b"bytes=-0"), ByteRange(None, 0))

    def test_noFirstOrLast(self) -> None:
        """
        C{bytes=-} is refused with upstream's text.
        """
        self.assertInvalid(b"bytes=-", "Cannot satisfy range 'bytes=-', no first or last")

    def test_firstAfterLast(self) -> None:
        """
        C{bytes=5-4} is refused with upstream's text.
        """
        self.assertInvalid(b"bytes=5-4", "Cannot satisfy range 'bytes=5-4', first > last")

    def test_multipleRanges(self) -> None:
        """
        Several ranges are refused, not served as the first one.
        """
        self.assertInvalid(
            b"bytes=0-1,2-3",
            "Cannot satisfy range 'bytes=0-1,2-3', invalid range or multiple ranges",
        )

    def test_manyOverlappingRanges(self) -> None:
        """
        A thousand overlapping ranges are refused with a shortened echo of the
        header.
        """
        header = b"bytes=" + b",".join([b"0-%d" % (i,) for i in range(1000)])
        e = self.assertRaises(InvalidRange, parseRange, header)
        self.assertEqual(
            e.message,
            "Cannot satisfy range 'bytes=0-0,0-1,0-2,0-3,0-4,0-5,0-6,0-7,0-8,0-9,0-10,"
            "0-11,0-12,0-13,0-14,0-15,0-16,0-17,0-18,0-19,0-20'... "
            "(5895 bytes), invalid range or multiple ranges",
        )

    def test_hugeHeader(self) -> None:
        """
        A 64 KiB header of digits is refused, and the error text stays short.
        """
        header = b"bytes=0-" + b"1" * 65536
        e = self.assertRaises(InvalidRange, parseRange, header)
        self.assertTrue(e.message.endswith("... (65544 bytes), invalid range or multiple ranges"))
        self.assertLess(len(e.message), 200)

    def test_twentyDigits(self) -> None:
        """
        Numbers of 20 digits parse (they cover every 64-bit offset).
        """
        self.assertEqual(
            parseRange(b"bytes=0-18446744073709551615"), ByteRange(0, 18446744073709551615)
        )
        self.assertEqual(
            parseRange(b"bytes=99999999999999999999-"), ByteRange(99999999999999999999, None)
        )

    def test_tooManyDigits(self) -> None:
        """
        A number longer than 20 digits is refused, not converted.
        """
        self.assertInvalid(
            b"bytes=0-123456789012345678901",
            "Cannot satisfy range 'bytes=0-123456789012345678901', number too large",
        )
        self.assertInvalid(
            b"bytes=-000000000000000000001",
            "Cannot satisfy range 'bytes=-000000000000000000001', number too large",
        )

    def test_notStrictGrammar(self) -> None:
        """
        Upper-case units, spaces, signs, hex, underscores, other units and
        trailing junk are refused.
        """
        for header in [
            b"BYTES=0-1",
            b"bytes = 0-1",
            b"bytes=0 -1",
            b"bytes=+1-2",
            b"bytes=0x10-0x20",
            b"bytes=1_0-2_0",
            b"items=0-1",
            b"bytes=0-1\n",
            b"bytes=0-1 ",
            b"bytes=",
            b"",
        ]:
            self.assertInvalid(
                header,
                f"Cannot satisfy range {header.decode()!r}, invalid range or multiple ranges",
            )

    def test_nonAsciiDigits(self) -> None:
        """
        Arabic-Indic digits are refused; the echo shows the raw bytes as
        ISO-8859-1, as upstream's does.
        """
        header = "bytes=\u0661-\u0662".encode()
        self.assertInvalid(
            header,
            "Cannot satisfy range 'bytes=Ù¡-Ù¢', invalid range or multiple ranges",
        )

    def test_controlCharactersEscaped(self) -> None:
        """
        Control characters in the header are escaped in the error text.
        """
        self.assertInvalid(
            b"bytes=0-1\x1b[2J",
            "Cannot satisfy range 'bytes=0-1\\x1b[2J', invalid range or multiple ranges",
        )

    @given(st.binary(max_size=64))
    def test_anyBytes(self, header: bytes) -> None:
        """
        Arbitrary bytes either parse to a range with first <= last or raise
        L{InvalidRange}.
        """
        self.checkParse(header)

    @given(
        st.from_regex(r"bytes=[0-9+_x\u0660-\u0669 ]{0,25}-[0-9+_x\u0660-\u0669 ]{0,25}"),
    )
    def test_nearlyValid(self, header: str) -> None:
        """
        Headers close to the grammar either parse to a range with
        first <= last or raise L{InvalidRange}.
        """
        self.checkParse(header.encode())

    def checkParse(self, header: bytes) -> None:
        try:
            r = parseRange(header)
        except RangeError as e:
            self.assertIsInstance(e, InvalidRange)
            self.assertEqual(e.status, 416)
            return
        self.assertFalse(r.first is None and r.last is None)
        if r.first is not None and r.last is not None:
            self.assertLessEqual(r.first, r.last)
        for n in r.first, r.last:
            self.assertTrue(n is None or 0 <= n < 10**20)


class ResolveRangeTests(SynchronousTestCase):
    """
    Tests for L{resolveRange}.
    """

    def assertUnsatisfiable(
        self, header: bytes, message: str, completeLength: int, available: int = T
    ) -> None:
        e = self.assertRaises(RangeNotSatisfiable, rangeFor, header, T, available)
        self.assertEqual((e.message, e.status), (message, 416))
        self.assertEqual(e.completeLength, completeLength)
        self.assertEqual(e.contentRange(), b"bytes */%d" % (completeLength,))

    def test_noRange(self) -> None:
        """
        Without a range the whole available size is sent.
        """
        self.assertEqual(resolveRange(None, T, T), (0, T))

    def test_imageLargerThanTicket(self) -> None:
        """
        An image larger than the ticket is served up to the ticket size.
        """
        self.assertEqual(resolveRange(None, T, 2 * T), (0, T))
        self.assertEqual(rangeFor(b"bytes=0-", T, 2 * T), (0, T))

    def test_ticketLargerThanImage(self) -> None:
        """
        A ticket larger than the image is served up to the image size.
        """
        self.assertEqual(resolveRange(None, 2 * T, T), (0, T))

    def test_emptyImage(self) -> None:
        """
        An empty image with an empty ticket is an empty full response.
        """
        self.assertEqual(resolveRange(None, 0, 0), (0, 0))

    def test_exactLengths(self) -> None:
        """
        The first byte, the last byte and an open range from 0 have exact
        lengths.
        """
        self.assertEqual(rangeFor(b"bytes=0-0"), (0, 1))
        self.assertEqual(rangeFor(b"bytes=%d-%d" % (T - 1, T - 1)), (T - 1, 1))
        self.assertEqual(rangeFor(b"bytes=0-"), (0, T))
        self.assertEqual(rangeFor(b"bytes=0-%d" % (T - 1,)), (0, T))
        self.assertEqual(rangeFor(b"bytes=10-"), (10, T - 10))

    def test_openPastTicket(self) -> None:
        """
        An open range starting at the ticket size is out of the allowed range.
        """
        self.assertUnsatisfiable(b"bytes=%d-" % (T,), "Requested range out of allowed range", T)

    def test_closedPastTicket(self) -> None:
        """
        A closed range ending past the ticket size is out of the allowed range.
        """
        self.assertUnsatisfiable(
            b"bytes=%d-%d" % (T, T + 10), "Requested range out of allowed range", T
        )
        self.assertUnsatisfiable(b"bytes=0-%d" % (T,), "Requested range out of allowed range", T)

    def test_hugeNumbers(self) -> None:
        """
        20-digit offsets are out of the allowed range, with no overflow.
        """
        self.assertUnsatisfiable(
            b"bytes=0-18446744073709551615", "Requested range out of allowed range", T
        )
        self.assertUnsatisfiable(
            b"bytes=99999999999999999999-", "Requested range out of allowed range", T
        )

    def test_closedPastImage(self) -> None:
        """
        A closed range within the ticket but past the image end reports how
        many bytes it needs and how many there are.
        """
        self.assertUnsatisfiable(
            b"bytes=100-%d" % (T - 1,),
            f"Requested more bytes than available: {T} > 1000",
            1000,
            available=1000,
        )
        self.assertUnsatisfiable(
            b"bytes=999-1000",
            "Requested more bytes than available: 1001 > 1000",
            1000,
            available=1000,
        )
        self.assertEqual(rangeFor(b"bytes=999-999", T, 1000), (999, 1))

    def test_openPastImage(self) -> None:
        """
        An open range starting at the image end is 416, not an empty or
        negative range.
        """
        self.assertUnsatisfiable(
            b"bytes=1000-",
            "Requested more bytes than available: 1001 > 1000",
            1000,
            available=1000,
        )
        self.assertEqual(rangeFor(b"bytes=999-", T, 1000), (999, 1))

    def test_rangeOnEmptyImage(self) -> None:
        """
        Any range of an empty image is unsatisfiable.
        """
        for header in [b"bytes=0-", b"bytes=0-0", b"bytes=-1"]:
            self.assertRaises(RangeNotSatisfiable, rangeFor, header, 0, 0)
            self.assertRaises(RangeNotSatisfiable, rangeFor, header, T, 0)

    def test_suffix(self) -> None:
        """
        A suffix range selects the last N available bytes, or all of them.
        """
        self.assertEqual(rangeFor(b"bytes=-1"), (T - 1, 1))
        self.assertEqual(rangeFor(b"bytes=-%d" % (T,)), (0, T))
        self.assertEqual(rangeFor(b"bytes=-%d" % (T + 5,)), (0, T))
        self.assertEqual(rangeFor(b"bytes=-10", 2 * T, 100), (90, 10))

    def test_suffixZero(self) -> None:
        """
        C{bytes=-0} selects nothing and is unsatisfiable.
        """
        self.assertUnsatisfiable(b"bytes=-0", "Cannot satisfy range, suffix length is 0", T)

    @given(
        st.one_of(
            st.none(),
            st.builds(ByteRange, st.none(), st.integers(0, 2**64)),
            st.builds(ByteRange, st.integers(0, 2**64), st.none()),
            st.tuples(st.integers(0, 2**64), st.integers(0, 2**64)).map(
                lambda t: ByteRange(min(t), max(t))
            ),
        ),
        st.integers(0, 2**64),
        st.integers(0, 2**64),
    )
    def test_withinAvailable(self, r: ByteRange | None, ticketSize: int, imageSize: int) -> None:
        """
        A resolved range always lies within the available bytes, and a
        requested range is never empty.
        """
        available = min(ticketSize, imageSize)
        try:
            offset, length = resolveRange(r, ticketSize, imageSize)
        except RangeNotSatisfiable as e:
            self.assertIsNot(r, None)
            self.assertIn(e.completeLength, (ticketSize, available))
            return
        self.assertGreaterEqual(offset, 0)
        self.assertLessEqual(offset + length, available)
        if r is None:
            self.assertEqual((offset, length), (0, available))
        else:
            self.assertGreaterEqual(length, 1)
            if r.first is not None:
                self.assertEqual(offset, r.first)


class ContentRangeHeaderTests(SynchronousTestCase):
    """
    Tests for L{contentRangeHeader}.
    """

    def test_format(self) -> None:
        """
        The header names the first and last byte and the complete length.
        """
        self.assertEqual(contentRangeHeader(0, 5, 1048576), b"bytes 0-4/1048576")
        self.assertEqual(contentRangeHeader(T - 1, 1, T), b"bytes 1048575-1048575/1048576")

    def test_empty(self) -> None:
        """
        An empty range cannot be expressed.
        """
        self.assertRaises(ValueError, contentRangeHeader, 0, 0, T)


class ParseContentRangeTests(SynchronousTestCase):
    """
    Tests for L{parseContentRange}.
    """

    def assertInvalid(self, header: bytes, message: str) -> None:
        e = self.assertRaises(InvalidContentRange, parseContentRange, header)
        self.assertEqual((e.message, e.status), (message, 400))

    def test_full(self) -> None:
        """
        All three numbers are parsed.
        """
        self.assertEqual(parseContentRange(b"bytes 0-99/100"), ContentRange(0, 99, 100))

    def test_stars(self) -> None:
        """
        The last byte and the complete length may be unknown.
        """
        self.assertEqual(
            parseContentRange(b"bytes 2097152-2162687/*"), ContentRange(2097152, 2162687, None)
        )
        self.assertEqual(parseContentRange(b"bytes 7-*/*"), ContentRange(7, None, None))
        self.assertEqual(parseContentRange(b"bytes 7-*/10"), ContentRange(7, None, 10))

    def test_lengthMismatchAccepted(self) -> None:
        """
        A range that disagrees with the body length parses; the caller writes
        Content-Length bytes at C{first}.
        """
        self.assertEqual(parseContentRange(b"bytes 0-99/*").first, 0)

    def test_malformed(self) -> None:
        """
        Malformed values are refused with upstream's text.
        """
        for header in [
            b"5-9",
            b"bytes 7-13",
            b"bytes */100",
            b"bytes=0-1/2",
            b"Bytes 0-1/2",
            b"bytes +0-1/2",
            b"bytes 0x0-0x1/2",
            b"bytes 1_0-2_0/30",
            b"bytes 0-1/2 ",
            b"bytes 0-1/2\n",
        ]:
            self.assertInvalid(header, f"Invalid Content-Range {header.decode()!r}")

    def test_firstAfterLast(self) -> None:
        """
        C{first > last} is refused with upstream's text.
        """
        self.assertInvalid(b"bytes 13-7/20", "Invalid Content-Range 'bytes 13-7/20', first > last")

    def test_lastNotBeforeComplete(self) -> None:
        """
        C{last >= complete} is refused with upstream's text.
        """
        self.assertInvalid(
            b"bytes 0-20/20", "Invalid Content-Range 'bytes 0-20/20', last >= complete"
        )

    def test_tooManyDigits(self) -> None:
        """
        Numbers longer than 20 digits are refused, not converted.
        """
        header = b"bytes " + b"1" * 21 + b"-*/*"
        self.assertInvalid(header, f"Invalid Content-Range {header.decode()!r}, number too large")

    def test_hugeHeader(self) -> None:
        """
        A huge header is refused with a short error text.
        """
        e = self.assertRaises(InvalidContentRange, parseContentRange, b"bytes " + b"9" * 65536)
        self.assertLess(len(e.message), 200)

    @given(st.binary(max_size=64))
    def test_anyBytes(self, header: bytes) -> None:
        """
        Arbitrary bytes either parse consistently or raise
        L{InvalidContentRange}.
        """
        try:
            r = parseContentRange(header)
        except InvalidContentRange:
            return
        self.assertTrue(r.last is None or r.first <= r.last)
        self.assertTrue(r.last is None or r.complete is None or r.last < r.complete)


class ParseContentLengthTests(SynchronousTestCase):
    """
    Tests for L{parseContentLength}.
    """

    def assertInvalid(self, values: list[bytes], message: str) -> None:
        e = self.assertRaises(InvalidContentLength, parseContentLength, values)
        self.assertEqual((e.message, e.status), (message, 400))

    def test_absent(self) -> None:
        """
        No header means no declared length.
        """
        self.assertIsNone(parseContentLength(None))

    def test_digits(self) -> None:
        """
        Decimal digits parse, including zero and 64-bit values.
        """
        self.assertEqual(parseContentLength([b"0"]), 0)
        self.assertEqual(parseContentLength([b"65536"]), 65536)
        self.assertEqual(parseContentLength([b"9223372036854775808"]), 2**63)

    def test_negative(self) -> None:
        """
        A negative length gets upstream's text.
        """
        self.assertInvalid([b"-1"], "Negative Content-Length: -1")

    def test_notDigits(self) -> None:
        """
        Signs, spaces, underscores, hex, exponents and non-ASCII digits are
        refused.
        """
        for value in [b"+5", b"5 ", b" 5", b"1_000", b"0x10", b"1e3", b"", b"-0", b"5, 5", b"abc"]:
            self.assertInvalid([value], f"Invalid Content-Length: {value.decode()!r}")
        self.assertInvalid(["\u0661\u0662".encode()], "Invalid Content-Length: 'Ù¡Ù¢'")

    def test_tooManyDigits(self) -> None:
        """
        More than 20 digits are refused, not converted.
        """
        self.assertInvalid([b"1" * 21], f"Invalid Content-Length: '{'1' * 21}'")
        self.assertInvalid([b"-" + b"1" * 21], f"Invalid Content-Length: '-{'1' * 21}'")
        e = self.assertRaises(InvalidContentLength, parseContentLength, [b"1" * 65536])
        self.assertLess(len(e.message), 200)

    def test_duplicates(self) -> None:
        """
        Two headers are refused, whether equal or not.
        """
        self.assertInvalid([b"5", b"5"], "Duplicate Content-Length headers")
        self.assertInvalid([b"5", b"6"], "Duplicate Content-Length headers")

    @given(st.binary(max_size=24))
    def test_onlyPlainDigits(self, value: bytes) -> None:
        """
        A value parses exactly when it is 1 to 20 ASCII digits.
        """
        plain = value.isdigit() and len(value) <= 20
        try:
            length = parseContentLength([value])
        except InvalidContentLength:
            self.assertFalse(plain)
        else:
            self.assertTrue(plain)
            self.assertEqual(length, int(value))


class CheckFramingTests(SynchronousTestCase):
    """
    Tests for L{checkFraming}.
    """

    def test_contentLengthOnly(self) -> None:
        """
        A body framed by Content-Length alone is fine.
        """
        checkFraming([b"5"], None)
        checkFraming(None, None)

    def test_chunkedOnly(self) -> None:
        """
        A chunked body without Content-Length is fine, in any letter case.
        """
        checkFraming(None, [b"chunked"])
        checkFraming(None, [b"Chunked"])

    def test_both(self) -> None:
        """
        Content-Length together with Transfer-Encoding is refused.
        """
        e = self.assertRaises(InvalidFraming, checkFraming, [b"5"], [b"chunked"])
        self.assertEqual(
            (e.message, e.status),
            ("Content-Length and Transfer-Encoding must not be used together", 400),
        )

    def test_otherCodings(self) -> None:
        """
        Any transfer coding but a single C{chunked} is refused.
        """
        for values, shown in [
            ([b"gzip"], "'gzip'"),
            ([b"identity"], "'identity'"),
            ([b"chunked, identity"], "'chunked, identity'"),
            ([b"gzip", b"chunked"], "'gzip, chunked'"),
            ([b"chunked", b"chunked"], "'chunked, chunked'"),
        ]:
            e = self.assertRaises(InvalidFraming, checkFraming, None, values)
            self.assertEqual(
                e.message, f"Unsupported Transfer-Encoding: {shown}, only 'chunked' is supported"
            )


class RangeSetTests(SynchronousTestCase):
    """
    Tests for L{RangeSet}.
    """

    def test_empty(self) -> None:
        """
        A new set is empty.
        """
        s = RangeSet()
        self.assertEqual((s.ranges(), s.total()), ([], 0))

    def test_emptyRangeIgnored(self) -> None:
        """
        Adding an empty range changes nothing.
        """
        s = RangeSet()
        s.add(5, 5)
        self.assertEqual((s.ranges(), s.total()), ([], 0))

    def test_invalidRange(self) -> None:
        """
        Negative starts and reversed ranges are programming errors.
        """
        s = RangeSet()
        self.assertRaises(ValueError, s.add, -1, 5)
        self.assertRaises(ValueError, s.add, 5, 4)

    def test_mergeAdjacent(self) -> None:
        """
        Touching ranges merge into one.
        """
        s = RangeSet()
        s.add(0, 5)
        s.add(10, 20)
        s.add(5, 10)
        self.assertEqual((s.ranges(), s.total()), ([(0, 20)], 20))

    def test_upstreamTransferred(self) -> None:
        """
        A PUT of 5 bytes at 5, a zero of [0, 4096) and a GET of [0, 10)
        count 4096 bytes, as upstream reports.
        """
        s = RangeSet()
        s.add(5, 10)
        s.add(0, 4096)
        s.add(0, 10)
        self.assertEqual((s.ranges(), s.total()), ([(0, 4096)], 4096))

    def test_bridge(self) -> None:
        """
        A range overlapping several others absorbs them all.
        """
        s = RangeSet()
        for start in range(0, 100, 10):
            s.add(start, start + 5)
        s.add(12, 63)
        self.assertEqual(s.ranges(), [(0, 5), (10, 65), (70, 75), (80, 85), (90, 95)])
        self.assertEqual(s.total(), 75)

    def test_copy(self) -> None:
        """
        A copy does not change with the original.
        """
        s = RangeSet()
        s.add(0, 10)
        c = s.copy()
        s.add(20, 30)
        self.assertEqual((c.ranges(), c.total()), ([(0, 10)], 10))
        self.assertEqual(s.total(), 20)

    def test_manyRanges(self) -> None:
        """
        Many disjoint ranges, then one covering them all, leave one range.
        """
        s = RangeSet()
        for i in range(100000, 0, -1):
            s.add(2 * i, 2 * i + 1)
        self.assertEqual(s.total(), 100000)
        s.add(0, 10**6)
        self.assertEqual((s.ranges(), s.total()), ([(0, 10**6)], 10**6))

    @given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=40))
    def test_model(self, ops: list[tuple[int, int]]) -> None:
        """
        The set agrees with a set of integers on union, total and merged
        ranges.
        """
        s = RangeSet()
        model: set[int] = set()
        for start, length in ops:
            s.add(start, start + length)
            model.update(range(start, start + length))
            self.assertEqual(s.total(), len(model))
        expected: list[list[int]] = []
        for n in sorted(model):
            if expected and expected[-1][1] == n:
                expected[-1][1] = n + 1
            else:
                expected.append([n, n + 1])
        self.assertEqual(s.ranges(), [tuple(r) for r in expected])
