# -*- test-case-name: tests.test_head -*-
"""
A request head that arrived whole, parsed in one pass.

Twisted's C{HTTPChannel} parses a request line by line (C{LineReceiver}
callbacks, then C{headerReceived} per header, each header name encoded
again as it is stored): about a fifth of a small request's Python. When
the whole head is in one received buffer, L{parseHead} splits it once and
checks what Twisted checks, or gives up (C{None}) on anything it does not
handle the way Twisted does, so that Twisted's own parser takes that head
and answers it as it always did:

  - a request line that is not C{token SP target SP HTTP/1.x} with a
    known method and a printable target (Twisted: 400);
  - a NUL, or a CR or LF that is not part of a line's CRLF (Twisted: 400
    for a value, a bad name otherwise);
  - a header line without a colon, a name that is not a token, and
    continuation lines (obs-fold; the name starts with whitespace);
  - C{Content-Length}, C{Transfer-Encoding} and C{Expect}: the framing of
    a body, its smuggling checks (duplicates, conflicts, bad values) and
    C{100 Continue} stay with Twisted;
  - a head longer than L{MAX_HEAD} or with more than L{MAX_HEADERS}
    headers (the size limits and their answers: 414, 431, 400).

What it returns is what Twisted would have stored: the request line's
three parts, and the headers under Twisted's canonical names
(C{Content-Type}), values stripped of spaces and tabs, in order.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

#: Longest head taken here (request line, headers, CRLFs between them):
#: Twisted's limits (request line 4096 bytes in our channel, 16 KiB of
#: headers) cannot be reached below it.
MAX_HEAD = 4096

#: Most header lines taken here (Twisted allows 500).
MAX_HEADERS = 100

#: The methods the service answers: taken here (any token is valid; others
#: go to Twisted), routed by L{imageio.web._router}, counted by name in the
#: metrics.
METHODS = frozenset({b"GET", b"HEAD", b"PUT", b"PATCH", b"POST", b"DELETE", b"OPTIONS"})

#: Headers left to Twisted's parser: body framing and 100 Continue.
FRAMING = frozenset({b"Content-Length", b"Transfer-Encoding", b"Expect"})

#: RFC 9110 tchar.
_TCHAR = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"

#: What Twisted accepts in a request target (33-176).
_TARGET = bytes(range(33, 177))

#: Canonical header names by the names clients sent (bounded).
_names: dict[bytes, bytes] = {}
_MAX_NAMES = 1000


def canonicalName(name: bytes) -> bytes | None:
    """
    @return: Twisted's canonical form of header name C{name}
        (C{b"content-type"} -> C{b"Content-Type"}), or C{None} if it is not
        a token.
    """
    canonical = _names.get(name)
    if canonical is not None:
        return canonical
    if not name or name.translate(None, _TCHAR):
        return None
    headers = Headers()
    headers.addRawHeader(name, b"")
    [(canonical, _)] = headers.getAllRawHeaders()
    if len(_names) < _MAX_NAMES:
        _names[name] = canonical
    return canonical


def parseHead(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, list[bytes]]] | None:
    """
    Parse a whole request head.

    @param head: The request line and header lines, each but the last
        ending with CRLF (the blank line that ends the head not included).
    @return: Method, target, version and headers (canonical name ->
        values), or C{None} for a head Twisted's parser must take.
    """
    if len(head) > MAX_HEAD:
        return None
    lines = head.split(b"\r\n")
    count = len(lines)
    # NUL, CR and LF only in the CRLFs between lines.
    if count > MAX_HEADERS + 1 or len(head) - len(head.translate(None, b"\0\r\n")) != 2 * (
        count - 1
    ):
        return None
    try:
        method, target, version = lines[0].split(b" ")
    except ValueError:
        return None
    if (
        method not in METHODS
        or (version != b"HTTP/1.1" and version != b"HTTP/1.0")
        or not target
        or target.translate(None, _TARGET)
    ):
        return None
    headers: dict[bytes, list[bytes]] = {}
    for i in range(1, count):
        name, colon, value = lines[i].partition(b":")
        canonical = _names.get(name) or canonicalName(name)
        if not colon or canonical is None or canonical in FRAMING:
            return None
        value = value.strip(b" \t")
        values = headers.get(canonical)
        if values is None:
            headers[canonical] = [value]
        else:
            values.append(value)
    return method, target, version, headers
