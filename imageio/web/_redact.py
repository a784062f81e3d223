# -*- test-case-name: tests.test_streaming -*-
"""
Secrets out of logs: ticket and session ids are credentials, so access
logs and error lines show a prefix only.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from imageio.tickets import shortID

_SECRET_PATH = re.compile(rb"^(/(?:images|tickets|sessions)/)([^/?]{8})[^/?]*")
_SECRET_ID = re.compile(rb"^(/(?:images|tickets|sessions)/)([^/?]+)")


def redactPath(path: bytes) -> str:
    """
    @return: C{path} with the ticket or session id shortened and the query
        dropped (C{session_id} may be in it), for logs.
    """
    path = path.split(b"?", 1)[0]
    return _SECRET_PATH.sub(rb"\1\2...", path).decode("ascii", "replace")


def redactMessage(message: str, uri: bytes) -> str:
    """
    @return: An error message for the log with the request's ticket or
        session id shortened, as L{redactPath} shortens it in the path.
    """
    match = _SECRET_ID.match(uri.split(b"?", 1)[0])
    if match is None or len(match.group(2)) <= 8:
        return message
    secret = unquote_to_bytes(match.group(2)).decode("utf-8", "replace")
    return message.replace(secret, shortID(secret))
