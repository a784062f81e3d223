# -*- test-case-name: tests.test_control -*-
"""
Strict JSON for request bodies: the standard parser accepts NaN and
Infinity and keeps the last of duplicate keys; clients sending either are
confused or hostile, so both are refused. Numbers of more than 20 digits
are refused before they are converted.
"""

from __future__ import annotations

import json
from typing import Any

from imageio.ranges import parseJSONInteger
from imageio.web._response import HTTPError


def _noConstants(name: str) -> None:
    raise ValueError(f"Invalid constant {name}")


def _noDuplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"Duplicate key {key!r}")
        result[key] = value
    return result


def loadJSON(data: bytes, prefix: str) -> Any:
    """
    Decode a request body: UTF-8 JSON without NaN, Infinity or duplicate
    keys; deep nesting is an error, not a crash.

    @param prefix: Start of the 400 message, followed by the reason
        (upstream's C{Invalid JSON message }, C{Ticket is not in a json
        format: }...).
    @raise HTTPError: 400 with C{prefix} and the parser's reason.
    """
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_constant=_noConstants,
            object_pairs_hook=_noDuplicates,
            parse_int=parseJSONInteger,
        )
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"{prefix}{e}") from None
