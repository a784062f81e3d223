# -*- test-case-name: tests.test_log -*-
"""
Logging: text for a person at a terminal, JSON lines for journald.

twistd prints every event its observer gets, debug included, and a plugin
cannot filter that observer; so imageio's own L{Logger} drops events below
the configured level before they are built. Use
C{twistd --logger=imageio._log.jsonObserver} for JSON lines.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

from twisted import logger as _logger

_ORDER = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]
_enabled: set[LogLevel] = set(_ORDER[1:])


def setLevel(name: str) -> None:
    """
    Emit imageio events at C{name} (debug, info, warn, error, critical)
    and above.

    @raise ValueError: For unknown level names.
    """
    try:
        level = LogLevel.levelWithName(name.lower().replace("warning", "warn"))
    except InvalidLogLevelError:
        raise ValueError(f"Unknown log level {name!r}") from None
    _enabled.clear()
    _enabled.update(_ORDER[_ORDER.index(level) :])


def enabled(level: LogLevel) -> bool:
    """
    @return: Whether events at C{level} are emitted; lets hot paths skip
        building the arguments of a disabled event.
    """
    return level in _enabled


def currentLevel() -> LogLevel:
    return min(_enabled, key=_ORDER.index)


class Logger(_logger.Logger):
    """
    A L{twisted.logger.Logger} that skips disabled levels cheaply.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level not in _enabled:
            return
        super().emit(level, format, **kwargs)


def _filtered(observer: ILogObserver) -> ILogObserver:
    predicate = LogLevelFilterPredicate(defaultLogLevel=currentLevel())
    return FilteringLogObserver(observer, [predicate])


def textObserver() -> ILogObserver:
    """
    For C{twistd --logger}: human-readable lines on standard output.
    """
    return _filtered(textFileLogObserver(sys.stdout))


def jsonObserver() -> ILogObserver:
    """
    For C{twistd --logger}: one JSON object per line on standard output
    (journald, log shippers).
    """
    return _filtered(jsonFileLogObserver(sys.stdout, recordSeparator=""))
