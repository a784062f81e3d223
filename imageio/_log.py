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

Our observers (L{textObserver}, L{jsonObserver}) format each event where it
is emitted, then hand the line to a thread of their own that writes it
(L{BackgroundOutput}): a journal that stopped reading its stream or a log
disk that hangs never blocks the reactor, and so never every transfer.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
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


#: The most characters of formatted lines waiting for a log output; lines
#: beyond are dropped (and counted) rather than held without bound.
BACKLOG = 1024**2
#: How long the process waits at exit for waiting lines to be written.
EXIT_WAIT = 5.0


class BackgroundOutput:
    """
    A text output for a log observer that returns at once: lines wait
    (at most L{BACKLOG} characters of them) for a thread of its own, which
    writes and flushes them to the real output in order.

    When the real output stalls and the backlog is full, further lines are
    dropped and counted; once the thread has written what waited, it writes
    a line saying how many were lost (formatted by C{notice} from a
    warning event). A failing output (a closed journal stream, a full disk)
    is treated as dropping the lines it refused. What waits at exit is
    written within L{EXIT_WAIT} seconds. A fork (twistd daemonizing) first
    waits for what waits to be written (L{FORK_WAIT} at most) and for the
    thread to be out of the output's C{write}; the child starts a thread of
    its own.

    @ivar dropped: Lines dropped since the output was made.
    """

    # What Twisted's FileLogObserver asks to decide between text and bytes.
    encoding = "utf-8"

    def __init__(
        self,
        output: IO[str],
        notice: Callable[[dict[str, Any]], str | None],
        backlog: int = BACKLOG,
    ) -> None:
        self._output = output
        self._notice = notice
        self._backlog = backlog
        self.dropped = 0
        self._lines: list[str] = []
        self._waiting = 0
        self._lost = 0
        self._unsaid = 0
        self._direct = False
        self._busy = False
        self._thread: threading.Thread | None = None
        # Reentrant: a signal handler that logs (twistd's SIGTERM) may run
        # on the main thread while it holds the lock inside write().
        self._lock = threading.Condition(threading.RLock())
        _outputs.add(self)

    def write(self, text: str) -> None:
        if self._direct:
            self.dropped += self._put([text])
            return
        with self._lock:
            if self._waiting + len(text) > self._backlog and self._lines:
                self.dropped += 1
                self._lost += 1
                return
            self._lines.append(text)
            self._waiting += len(text)
            if self._thread is None:
                self._start()
            elif len(self._lines) == 1:
                self._lock.notify()

    def flush(self) -> None:
        # The thread flushes after each batch.
        pass

    def drain(self, timeout: float) -> bool:
        """
        Wait until every line written so far was handed to the real output.

        @return: Whether it happened within C{timeout} seconds.
        """
        with self._lock:
            return self._waitWritten(time.monotonic() + timeout)

    def _waitWritten(self, deadline: float) -> bool:
        # Called with the lock held (which waiting lets go of meanwhile).
        while self._lines or self._busy or self._lost:
            left = deadline - time.monotonic()
            if left <= 0 or self._thread is None:
                return False
            self._lock.wait(left)
        return True

    def writeDirectly(self, timeout: float) -> bool:
        """
        Write what waits (within C{timeout} seconds), then write each line
        at once on the caller's thread: for the last lines of a process that
        may end without running C{atexit} (twistd re-raises the signal that
        stopped it). A stuck output stays in the background.

        @return: Whether lines are now written directly.
        """
        if self.drain(timeout):
            self._direct = True
        return self._direct

    def _start(self) -> None:
        # Called with the lock held.
        self._thread = threading.Thread(target=self._run, name="imageio-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._lines or self._lost):
                    self._lock.wait()
                lines, self._lines, self._waiting = self._lines, [], 0
                lost, self._lost = self._lost, 0
                self._busy = True
            failed = 0
            missing = self._unsaid + lost
            try:
                if lines:
                    failed = self._put(lines)
                missing += failed
                if missing:
                    text = self._notice(_dropNotice(missing))
                    if not text or not self._put([text]):
                        missing = 0
            except Exception:
                # A notice that cannot be formatted: the thread goes on,
                # or nothing would be logged again.
                pass
            finally:
                with self._lock:
                    self._busy = False
                    self.dropped += failed
                    # A warning the output refused goes with the next one.
                    self._unsaid = missing
                    self._lock.notify_all()

    def _put(self, lines: list[str]) -> int:
        """
        Write C{lines} one by one (a rotating log file rotates between
        lines), then flush.

        @return: How many lines the output refused.
        """
        done = 0
        try:
            for line in lines:
                self._output.write(line)
                done += 1
            self._output.flush()
        except (OSError, ValueError, RuntimeError):
            # Nowhere to say it but the next line that gets through. (A
            # signal handler writing while the same thread is inside the
            # buffer's write gets RuntimeError: reentrant call.)
            return len(lines) - done
        return 0

    def _forked(self) -> None:
        # In a forked child: the parent's thread and lock are not ours.
        self._lock = threading.Condition(threading.RLock())
        self._thread = None
        self._busy = False
        if self._lines or self._lost:
            self._start()


def _dropNotice(count: int) -> dict[str, Any]:
    return {
        "log_level": LogLevel.warn,
        "log_namespace": __name__,
        "log_time": time.time(),
        "log_format": "{count} log lines dropped: the log output did not keep up",
        "count": count,
    }


_outputs: weakref.WeakSet[BackgroundOutput] = weakref.WeakSet()


def drain(timeout: float = EXIT_WAIT) -> bool:
    """
    Wait until the lines every observer of ours was given are written (at
    exit, and for tests that read a log).

    @return: Whether it happened within C{timeout} seconds.
    """
    return _eachWithin(timeout, BackgroundOutput.drain)


def droppedLines() -> int:
    """
    @return: Log lines our outputs dropped (a stalled or failing output)
        since the process started.
    """
    return sum(output.dropped for output in list(_outputs))


def writeDirectly(timeout: float = EXIT_WAIT) -> None:
    """
    L{BackgroundOutput.writeDirectly} for every output of ours: called when
    the reactor has shut down, so that its last lines are not lost.
    """
    _eachWithin(timeout, BackgroundOutput.writeDirectly)


def _eachWithin(timeout: float, wait: Callable[[BackgroundOutput, float], bool]) -> bool:
    """
    @return: Whether C{wait(output, left)} succeeded for every output, all
        within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    done = True
    for output in list(_outputs):
        done = wait(output, max(0.0, deadline - time.monotonic())) and done
    return done


#: Outputs whose lock the forking thread holds (L{_beforeFork}).
_held_for_fork: list[BackgroundOutput] = []

#: How long a fork waits for the log threads to write what waits.
FORK_WAIT = 1.0


def _beforeFork() -> None:
    # As the logging module does: no thread may be inside the output's
    # write (and its buffer's lock) when the process forks, or the child's
    # copy of that lock stays taken. Write what waits (a child must not
    # write it again), then hold each output's lock across the fork.
    deadline = time.monotonic() + FORK_WAIT
    for output in list(_outputs):
        output._lock.acquire()
        _held_for_fork.append(output)
        output._waitWritten(deadline)


def _afterForkInParent() -> None:
    while _held_for_fork:
        _held_for_fork.pop()._lock.release()


def _afterFork() -> None:
    del _held_for_fork[:]
    for output in list(_outputs):
        output._forked()


atexit.register(drain)
os.register_at_fork(
    before=_beforeFork, after_in_parent=_afterForkInParent, after_in_child=_afterFork
)

#: One background output per destination (its file object's id), so that
#: observers made twice write in one order.
_background: dict[int, BackgroundOutput] = {}


def _backgroundFor(output: IO[str], notice: Callable[[dict[str, Any]], str | None]) -> IO[str]:
    background = _background.get(id(output))
    if background is None or background._output is not output:
        background = _background[id(output)] = BackgroundOutput(output, notice)
    # File-like enough for Twisted's FileLogObserver: write and flush.
    return cast(IO[str], background)


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


_RESERVED = frozenset({"time", "level", "namespace", "message", "traceback"})


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    One JSON object per event and line: C{time} (ISO 8601, UTC),
    C{level}, C{namespace}, the rendered C{message}, the event's plain
    fields (C{ticketID}, C{status}...) and C{traceback} for failures.
    """

    def __init__(self, output: IO[str]) -> None:
        self._output = output

    def __call__(self, event: dict[str, Any]) -> None:
        self._output.write(jsonLine(event))
        self._output.flush()


def jsonLine(event: dict[str, Any]) -> str:
    """
    @return: C{event} as L{JSONLinesObserver} writes it, newline included.
    """
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
        if key.startswith("log_") or key in _RESERVED or key == "format":
            continue
        if value is None or isinstance(value, str | int | float | bool):
            record[key] = value
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def textObserver() -> ILogObserver:
    """
    For C{twistd --logger}: human-readable lines on standard output, or
    where the configuration says (L{setDestination}), written by a thread
    of their own (L{BackgroundOutput}).
    """
    return _filtered(textFileLogObserver(_backgroundFor(_output(), formatEventAsClassicLogText)))


def jsonObserver() -> ILogObserver:
    """
    For C{twistd --logger}: one JSON object per line (L{JSONLinesObserver})
    on standard output, or where the configuration says (journald, log
    shippers), written by a thread of their own (L{BackgroundOutput}).
    """
    return _filtered(FileLogObserver(_backgroundFor(_output(), jsonLine), jsonLine))


def configuredObserver(stdout: bool = False) -> ILogObserver | None:
    """
    @param stdout: Whether twistd would write to standard output itself
        (C{-n} without C{--logfile}, C{--logger} or C{--syslog}): ours does
        instead, from its thread.
    @return: The text observer for a configured log file or standard
        error, or for standard output when C{stdout}; C{None} to keep
        twistd's own (its C{--logfile}, C{--syslog}, its log file when
        daemonized).
    """
    if _destination[0] == "stdout" and not stdout:
        return None
    return textObserver()
