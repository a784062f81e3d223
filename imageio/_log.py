# -*- test-case-name: tests.test_log -*-
"""
Logging: text for a person at a terminal, JSON lines for journald.

twistd prints every event its observer gets, debug included, and a plugin
cannot filter that observer; so imageio's own L{Logger} drops events below
the configured level before they are built. Use
C{twistd --logger=imageio._log.jsonObserver} for JSON lines.

Where the lines go is standard output unless upstream's logging
configuration names a handler (L{setDestination}): a log file rotated as
upstream's C{RotatingFileHandler} rotates it, or standard error.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

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


_destination: tuple[str, str, int, int] = ("stdout", "", 0, 0)
_file: Any = None


def setDestination(kind: str, path: str = "", maxBytes: int = 0, backupCount: int = 0) -> None:
    """
    Where L{textObserver}, L{jsonObserver} and L{configuredObserver}
    write: C{"stdout"}, C{"stderr"} or C{"file"} (C{path}, rotated at
    C{maxBytes} keeping C{backupCount} old files, as upstream's
    C{RotatingFileHandler}: C{daemon.log.1} is the newest; 0 does not
    rotate).
    """
    global _destination, _file
    _destination = (kind, path, maxBytes, backupCount)
    _file = None


def _output() -> IO[str]:
    global _file
    kind, path, maxBytes, backupCount = _destination
    if kind == "stderr":
        return sys.stderr
    if kind != "file":
        return sys.stdout
    if _file is None:
        target = Path(path).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        _file = LogFile(
            target.name,
            str(target.parent),
            rotateLength=maxBytes or None,
            maxRotatedFiles=backupCount or None,
            defaultMode=0o640,
        )
    output: IO[str] = _file
    return output


def describeDestination() -> str:
    """
    @return: Where logs go, for start-up messages.
    """
    kind, path, maxBytes, backupCount = _destination
    if kind != "file":
        return kind
    if not maxBytes:
        return path
    return f"{path} (rotated at {maxBytes} bytes, {backupCount} kept)"


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    One JSON object per event and line: C{time} (ISO 8601, UTC),
    C{level}, C{namespace}, the rendered C{message}, the event's plain
    fields (C{ticketID}, C{status}...) and C{traceback} for failures.
    """

    _RESERVED = frozenset({"time", "level", "namespace", "message", "traceback"})

    def __init__(self, output: IO[str]) -> None:
        self._output = output

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        stamp = event.get("log_time")
        record: dict[str, object] = {
            "time": datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
            if isinstance(stamp, int | float)
            else None,
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in self._RESERVED or key == "format":
                continue
            if value is None or isinstance(value, str | int | float | bool):
                record[key] = value
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            record["traceback"] = failure.getTraceback()
        self._output.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._output.flush()


def textObserver() -> ILogObserver:
    """
    For C{twistd --logger}: human-readable lines on standard output, or
    where the configuration says (L{setDestination}).
    """
    return _filtered(textFileLogObserver(_output()))


def jsonObserver() -> ILogObserver:
    """
    For C{twistd --logger}: one JSON object per line (L{JSONLinesObserver})
    on standard output, or where the configuration says (journald, log
    shippers).
    """
    return _filtered(JSONLinesObserver(_output()))


def configuredObserver() -> ILogObserver | None:
    """
    @return: The text observer for a configured log file or standard
        error, or C{None} to keep twistd's own (standard output with
        C{-n}, C{--logfile}).
    """
    if _destination[0] == "stdout":
        return None
    return textObserver()
