# -*- test-case-name: tests.test_ranges -*-
"""
Byte ranges: the C{Range}, C{Content-Range} and C{Content-Length} headers of
the images API, and a set of merged ranges for a ticket's C{transferred}
counter and the record of what an upload wrote.

Everything here is a pure function of its arguments. Numbers are parsed
strictly: ASCII digits only, at most L{MAX_DIGITS} of them, so C{+5},
C{1_0}, C{0x10}, C{1e3}, C{" 5"} or Arabic-Indic digits never pass, and
no header can make us build a huge integer. Error texts match upstream
ovirt-imageio's where upstream has one; they become the plain-text body of
the error response.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

from attrs import define, field, frozen

MAX_DIGITS = 20
"""
Longest number we parse. 20 digits hold any 64-bit offset; a longer number
is rejected before it is converted.
"""

MAX_HEADER = 4096
"""
Longest header value we look at. Valid values are far shorter; longer ones
are rejected without scanning them.
"""

_SHOWN = 100
"""
How much of a rejected header value is echoed in the error text.
"""

_RANGE = re.compile(rb"bytes=([0-9]*)-([0-9]*)")
_CONTENT_RANGE = re.compile(rb"bytes ([0-9]+)-([0-9]+|\*)/([0-9]+|\*)")
_DIGITS = re.compile(rb"[0-9]+")
_NEGATIVE = re.compile(rb"-[0-9]+")


MAX_JSON_DIGITS = 32
"""
Longest integer accepted in JSON. Fields that hold offsets and sizes check
their own bounds (a size past 64 bits is 416, as for any size past the
ticket); this bound only keeps C{int()} from working on thousands of digits.
"""


def parseJSONInteger(text: str) -> int:
    """
    The C{parse_int} hook for C{json.loads} on anything a peer sends: a
    JSON number of more than L{MAX_JSON_DIGITS} digits is refused before it
    is converted (C{int()} of a long digit string costs quadratic time, and
    no field we read holds such a number).

    @raise ValueError: With the reason, which callers turn into a 400.
    """
    digits = len(text) - text.startswith("-")
    if digits > MAX_JSON_DIGITS:
        raise ValueError(f"Number too long: {digits} digits, at most {MAX_JSON_DIGITS}")
    return int(text)


class RangeError(Exception):
    """
    A byte-range or body-framing header cannot be honoured.

    @ivar message: The error text for the response body, without a trailing
        newline.
    @ivar status: The HTTP status to answer with.
    """

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRange(RangeError):
    """
    The C{Range} header of a GET is malformed or asks for several ranges.
    """

    status = 416


class RangeNotSatisfiable(RangeError):
    """
    The C{Range} of a GET lies outside what the ticket allows or the image
    holds.

    @ivar completeLength: The length to announce in C{Content-Range: bytes
        */<completeLength>}.
    """

    status = 416

    def __init__(self, message: str, completeLength: int) -> None:
        super().__init__(message)
        self.completeLength = completeLength

    def contentRange(self) -> bytes:
        """
        @return: The C{Content-Range} header value for this 416 response.
        """
        return b"bytes */%d" % (self.completeLength,)


class InvalidContentRange(RangeError):
    """
    The C{Content-Range} header of a PUT is malformed or inconsistent.
    """

    status = 400


class InvalidContentLength(RangeError):
    """
    The C{Content-Length} header is not a single non-negative decimal number.
    """

    status = 400


class InvalidFraming(RangeError):
    """
    The request body is framed in a way we refuse: C{Content-Length} together
    with C{Transfer-Encoding}, or a transfer coding other than C{chunked}.
    """

    status = 400


def _show(value: bytes) -> str:
    """
    Quote a header value for an error text the way upstream does (Python's
    C{repr} of the ISO-8859-1 decoded value), shortening long values.
    """
    text = value[:_SHOWN].decode("latin-1")
    if len(value) > _SHOWN:
        return f"{text!r}... ({len(value)} bytes)"
    return repr(text)


@frozen
class ByteRange:
    """
    A single range of a C{Range: bytes=...} header.

    @ivar first: Offset of the first byte, or C{None} for a suffix range
        (C{bytes=-N}).
    @ivar last: Offset of the last byte (inclusive), or C{None} for an
        open-ended range (C{bytes=N-}); for a suffix range, the number of
        bytes wanted from the end.
    """

    first: int | None
    last: int | None


@frozen
class ContentRange:
    """
    A parsed C{Content-Range: bytes first-last/complete} header of a PUT.

    Only C{first} matters to upstream-compatible clients: it is the write
    offset, and the length written is the C{Content-Length}.

    @ivar first: Offset of the first byte.
    @ivar last: Offset of the last byte, or C{None} for C{*}.
    @ivar complete: The complete length, or C{None} for C{*}.
    """

    first: int
    last: int | None
    complete: int | None


def parseRange(value: bytes) -> ByteRange:
    """
    Parse the C{Range} header of a GET.

    The grammar is upstream's: C{bytes=first-last}, C{bytes=first-} or
    C{bytes=-suffix}, lower-case unit, no spaces, one range only. Unlike
    upstream we accept suffix ranges; C{bytes=-0} parses here and is refused
    by L{resolveRange}.

    @param value: The raw header value.
    @return: The range asked for.
    @raise InvalidRange: (416) for anything else, including numbers longer
        than L{MAX_DIGITS} digits and C{first > last}.
    """
    if len(value) > MAX_HEADER:
        # Long junk: decided on its length alone.
        m = None
    else:
        m = _RANGE.fullmatch(value)
    if m is None:
        raise InvalidRange(f"Cannot satisfy range {_show(value)}, invalid range or multiple ranges")
    first, last = m.groups()
    if len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
        raise InvalidRange(f"Cannot satisfy range {_show(value)}, number too large")
    if not first:
        if not last:
            raise InvalidRange(f"Cannot satisfy range {_show(value)}, no first or last")
        return ByteRange(None, int(last))
    if not last:
        return ByteRange(int(first), None)
    if int(first) > int(last):
        raise InvalidRange(f"Cannot satisfy range {_show(value)}, first > last")
    return ByteRange(int(first), int(last))


def resolveRange(r: ByteRange | None, ticketSize: int, available: int) -> tuple[int, int]:
    """
    Decide which bytes a GET sends.

    The caller answers C{206 Partial Content} with
    C{Content-Range: <contentRangeHeader(offset, length, ticketSize)>}
    whenever the request had a C{Range} header (C{r} is not C{None}), and
    C{200 OK} without C{Content-Range} otherwise. Like upstream, the complete
    length announced in a 206 is the ticket size.

    Closed ranges follow upstream exactly: past the ticket size is
    C{Requested range out of allowed range} with C{bytes */<ticketSize>};
    past the available bytes is C{Requested more bytes than available:
    <last + 1> > <available>} with C{bytes */<available>}.

    Where upstream is loose we answer 416 too: an open-ended range starting
    at or past the end (upstream sent a broken 400), and suffix ranges that
    select nothing (C{bytes=-0}, or any suffix of an empty image). A suffix
    range C{bytes=-N} selects the last C{N} available bytes, or all of them
    when C{N} is larger.

    @param r: The parsed C{Range} header, or C{None} when there was none.
    @param ticketSize: The ticket's C{size}.
    @param available: The bytes that can be served, C{min(ticketSize,
        imageSize)}; a larger value (the plain image size) is clipped to the
        ticket size here.
    @return: C{(offset, length)} of the bytes to send. With a range,
        C{length} is at least 1 and C{offset + length <= available}.
    @raise RangeNotSatisfiable: (416) when the range selects nothing
        servable.
    """
    available = min(available, ticketSize)
    if r is None:
        return 0, available

    if r.first is None:
        assert r.last is not None
        if r.last == 0:
            raise RangeNotSatisfiable(
                "Cannot satisfy range, suffix length is 0", completeLength=available
            )
        if available == 0:
            raise RangeNotSatisfiable(
                f"Requested more bytes than available: {r.last} > 0", completeLength=0
            )
        length = min(r.last, available)
        return available - length, length

    if r.last is None:
        if r.first >= ticketSize:
            raise RangeNotSatisfiable(
                "Requested range out of allowed range", completeLength=ticketSize
            )
        if r.first >= available:
            raise RangeNotSatisfiable(
                f"Requested more bytes than available: {r.first + 1} > {available}",
                completeLength=available,
            )
        return r.first, available - r.first

    requested = r.last + 1
    if requested > ticketSize:
        raise RangeNotSatisfiable("Requested range out of allowed range", completeLength=ticketSize)
    if requested > available:
        raise RangeNotSatisfiable(
            f"Requested more bytes than available: {requested} > {available}",
            completeLength=available,
        )
    return r.first, requested - r.first


def contentRangeHeader(offset: int, length: int, completeLength: int) -> bytes:
    """
    Format the C{Content-Range} of a 206 response.

    @param length: Bytes sent; at least 1, since an empty range cannot be
        expressed.
    @return: C{b"bytes <first>-<last>/<completeLength>"}.
    @raise ValueError: If C{length} is less than 1.
    """
    if length < 1:
        raise ValueError(f"Content-Range needs a non-empty range, got length {length}")
    return b"bytes %d-%d/%d" % (offset, offset + length - 1, completeLength)


def parseContentRange(value: bytes) -> ContentRange:
    """
    Parse the C{Content-Range} header of a PUT.

    Upstream's grammar, C{bytes first-last/complete} where C{last} and
    C{complete} may be C{*}, with strict ASCII digits. The unsatisfied form
    C{bytes */complete} is refused.

    @param value: The raw header value.
    @return: The parsed header; the caller writes at C{first}.
    @raise InvalidContentRange: (400) C{Invalid Content-Range '<value>'},
        with C{, first > last} or C{, last >= complete} appended for
        inconsistent numbers.
    """
    shown = _show(value)
    m = None if len(value) > MAX_HEADER else _CONTENT_RANGE.fullmatch(value)
    if m is None:
        raise InvalidContentRange(f"Invalid Content-Range {shown}")
    if any(len(g) > MAX_DIGITS for g in m.groups()):
        raise InvalidContentRange(f"Invalid Content-Range {shown}, number too large")
    rawFirst, rawLast, rawComplete = m.groups()
    first = int(rawFirst)
    last = None if rawLast == b"*" else int(rawLast)
    complete = None if rawComplete == b"*" else int(rawComplete)
    if last is not None and last < first:
        raise InvalidContentRange(f"Invalid Content-Range {shown}, first > last")
    if last is not None and complete is not None and last >= complete:
        raise InvalidContentRange(f"Invalid Content-Range {shown}, last >= complete")
    return ContentRange(first, last, complete)


def parseContentLength(values: list[bytes] | None) -> int | None:
    """
    Parse the C{Content-Length} request headers.

    @param values: Every C{Content-Length} value the request carried, as
        C{Headers.getRawHeaders} returns them, or C{None}.
    @return: The length, or C{None} when the header is absent.
    @raise InvalidContentLength: (400) C{Duplicate Content-Length headers}
        when there are several (even equal ones); C{Negative Content-Length:
        <n>} (upstream's text) for a negative number; C{Invalid
        Content-Length: '<value>'} for anything but ASCII digits, or more than
        L{MAX_DIGITS} of them.
    """
    if values is None:
        return None
    if len(values) != 1:
        raise InvalidContentLength("Duplicate Content-Length headers")
    value = values[0]
    if len(value) <= MAX_DIGITS and _DIGITS.fullmatch(value):
        return int(value)
    if len(value) <= MAX_DIGITS + 1 and _NEGATIVE.fullmatch(value) and int(value) < 0:
        raise InvalidContentLength(f"Negative Content-Length: {int(value)}")
    raise InvalidContentLength(f"Invalid Content-Length: {_show(value)}")


def checkFraming(contentLength: list[bytes] | None, transferEncoding: list[bytes] | None) -> None:
    """
    Refuse request bodies whose framing is ambiguous or unsupported.

    A body is framed by one C{Content-Length} (checked by
    L{parseContentLength}) or by C{Transfer-Encoding: chunked} alone
    (case-insensitive, as transfer codings are). Twisted's parser already
    refuses some of these; this check does not rely on it.

    @param contentLength: The C{Content-Length} values, or C{None}.
    @param transferEncoding: The C{Transfer-Encoding} values, or C{None}.
    @raise InvalidFraming: (400) for C{Content-Length} together with
        C{Transfer-Encoding}, or any C{Transfer-Encoding} but one C{chunked}.
    """
    if transferEncoding is None:
        return
    if contentLength is not None:
        raise InvalidFraming("Content-Length and Transfer-Encoding must not be used together")
    if len(transferEncoding) != 1 or transferEncoding[0].lower() != b"chunked":
        shown = _show(b", ".join(transferEncoding))
        raise InvalidFraming(f"Unsupported Transfer-Encoding: {shown}, only 'chunked' is supported")


@define
class RangeSet:
    """
    A union of half-open byte ranges C{[start, end)}.

    Used for a ticket's C{transferred} (the length of the union of the ranges
    its operations touched) and for the ranges an upload wrote. Ranges are
    kept merged in two sorted lists, so adding a range costs a binary search
    plus the ranges it absorbs, and L{total} is kept up to date.
    """

    _starts: list[int] = field(init=False, factory=list)
    _ends: list[int] = field(init=False, factory=list)
    _total: int = field(init=False, default=0)

    def add(self, start: int, end: int) -> None:
        """
        Add C{[start, end)}, merging it with the ranges it overlaps or
        touches. An empty range (C{start == end}) changes nothing.

        @raise ValueError: If C{start} is negative or C{end < start}.
        """
        if start < 0 or end < start:
            raise ValueError(f"Invalid range [{start}, {end})")
        if start == end:
            return
        # Ranges [i, j) are those with end >= start and start <= end:
        # overlapping or adjacent.
        i = bisect_left(self._ends, start)
        j = bisect_right(self._starts, end)
        if i < j:
            absorbed = sum(self._ends[k] - self._starts[k] for k in range(i, j))
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
            self._total -= absorbed
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        self._total += end - start

    def total(self) -> int:
        """
        @return: The number of bytes in the union.
        """
        return self._total

    def ranges(self) -> list[tuple[int, int]]:
        """
        @return: The merged ranges as C{(start, end)} pairs, sorted; no two
            overlap or touch.
        """
        return list(zip(self._starts, self._ends, strict=True))

    def copy(self) -> RangeSet:
        """
        @return: An independent copy.
        """
        other = RangeSet()
        other._starts = self._starts.copy()
        other._ends = self._ends.copy()
        other._total = self._total
        return other
