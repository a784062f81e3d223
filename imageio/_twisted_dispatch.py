# -*- test-case-name: tests.test_twisted_seams -*-
"""
The epoll reactor's dispatch of our own busy descriptors without the logging
context Twisted sets up for every event, and its main loop without the
bookkeeping calls of a turn that has nothing to run but I/O.

Twisted's C{EPollReactor.doPoll} calls each ready descriptor through
C{log.callWithLogger(selectable, reactor._doReadOrWrite, ...)}: the
descriptor's C{logPrefix}, a copy of the current log context, and the
context tracker's push and pop, about twelve Python frames per event, only
so that legacy C{log.msg} events carry the descriptor's prefix as their
C{system}. A 4 KiB read costs the daemon two events (the client's socket,
then the AIO engine's eventfd).

L{install} gives the reactor instance a C{doIteration} of its own: the same
poll, and for descriptors of the classes it is given (C{type(d) in
classes}, not subclasses) the read and write calls of
C{_doReadOrWrite} without that context. What Twisted does on an error
stays: an exception from C{doRead} or C{doWrite} is logged (C{log.err},
under the descriptor's prefix) and the descriptor is disconnected with it, as
is one whose C{doRead} or C{doWrite} returns a reason; hang-ups and closed
descriptors go through Twisted's own C{_doReadOrWrite}. Every other
descriptor is dispatched by Twisted as before.

The main loop: Twisted's C{mainLoop} runs, every turn, C{runUntilCurrent}
(thread calls, new and due timed calls) and C{timeout} (new timed calls,
the time to the first one), about ten Python calls, though on a busy data
listener nearly every turn has nothing for them: a 4 KiB read is two turns
(the client's socket, then the AIO eventfd). L{install} also gives the
reactor instance a C{mainLoop} of its own: Twisted's turn, then, for as
long as nothing is for C{runUntilCurrent} (no thread call queued, no timed
call new or due, no stop, no pending compaction of cancelled calls), a turn
that only polls, for as long as the first timed call allows, as C{timeout}
computes it. Anything else ends those turns and Twisted's turn runs, in the
same order as before. C{mainLoop} is looked up when the reactor starts
running (C{twistd} starts services before), so a reactor already running
keeps Twisted's loop and gets only the lean dispatch.

After each poll's dispatch, L{install} runs the C{afterPoll} functions it is
given: the AIO engine delivers there a completion that happened inside
C{io_submit} (a small read on tmpfs) in the same turn, instead of a poll
later through its eventfd. An exception from one is logged as the main
loop logs its own.

Only an C{EPollReactor} (exactly that class) is changed; L{install} leaves
any other reactor alone and says so. The private names used
(L{PRIVATE_NAMES}) are pinned by C{tests.test_twisted_seams}.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet import posixbase
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger as TwistedLogger
from twisted.python import log

from imageio._log import Logger

_log = Logger()

#: The Twisted private names this module relies on: (owner, name).
PRIVATE_NAMES = (
    ("twisted.internet.epollreactor.EPollReactor", "_poller"),
    ("twisted.internet.epollreactor.EPollReactor", "_selectables"),
    ("twisted.internet.epollreactor.EPollReactor", "_doReadOrWrite"),
    ("twisted.internet.epollreactor.EPollReactor", "_disconnectSelectable"),
    ("twisted.internet.epollreactor.EPollReactor", "_POLL_DISCONNECTED"),
    ("twisted.internet.epollreactor.EPollReactor", "_POLL_IN"),
    ("twisted.internet.epollreactor.EPollReactor", "_POLL_OUT"),
    ("twisted.internet.posixbase", "_NO_FILEDESC"),
    ("twisted.internet.base.ReactorBase", "_started"),
    ("twisted.internet.base.ReactorBase", "_justStopped"),
    ("twisted.internet.base.ReactorBase", "_newTimedCalls"),
    ("twisted.internet.base.ReactorBase", "_pendingTimedCalls"),
    ("twisted.internet.base.ReactorBase", "_cancellations"),
)

#: Twisted's C{ReactorBase.timeout} bound: the longest C{epoll_wait}
#: timeout in milliseconds that a C int holds, in seconds.
LONGEST_TIMEOUT = 2147483

#: What Twisted's main loop logs (C{twisted.internet.base}'s logger).
_BASE_LOG = TwistedLogger(namespace="twisted.internet.base")
_LOOP_ERRORS = _BASE_LOG.failureHandler("Unexpected error in main loop")


def install(
    reactor: Any, classes: Iterable[type], afterPoll: Iterable[Callable[[], object]] = ()
) -> bool:
    """
    Dispatch ready descriptors of C{classes} on C{reactor} without a
    logging context per event, and run its main loop with lean turns (see
    the module's docstring).

    Installing again replaces the classes; L{uninstall} undoes it.

    @param afterPoll: Called, in order, after each poll that dispatched
        something.

    @return: Whether C{reactor} is Twisted's epoll reactor and now
        dispatches that way; if not, nothing changed.
    """
    if type(reactor) is not EPollReactor:
        return False
    uninstall(reactor)
    doPoll = _leanPoll(reactor, frozenset(classes), tuple(afterPoll))
    # Instance attributes: mainLoop and iterate call self.doIteration, run
    # calls self.mainLoop.
    vars(reactor)["doIteration"] = doPoll
    vars(reactor)["mainLoop"] = _LeanLoop(reactor, doPoll).mainLoop
    return True


def wakerClasses(reactor: Any) -> tuple[type, ...]:
    """
    @return: The exact class of C{reactor}'s waker, if it has one: every
        C{callFromThread} (each result of the disk-io pool) wakes the
        reactor through it, so it is worth dispatching lean too. Its
        C{doRead} only drains its pipe.
    """
    waker = getattr(reactor, "waker", None)
    return () if waker is None else (type(waker),)


def uninstall(reactor: Any) -> None:
    """
    Give C{reactor} back Twisted's own dispatch and main loop (a lean loop
    already running goes on with Twisted's turns only).
    """
    if type(reactor) is EPollReactor:
        vars(reactor).pop("doIteration", None)
        loop = vars(reactor).pop("mainLoop", None)
        owner = getattr(loop, "__self__", None)
        if isinstance(owner, _LeanLoop):
            owner.installed = False


class _LeanLoop:
    """
    C{ReactorBase.mainLoop} with turns that only poll while nothing is for
    C{runUntilCurrent} (see the module's docstring).

    @ivar installed: Whether lean turns are still wanted (L{uninstall}).
    """

    def __init__(self, reactor: EPollReactor, doPoll: Any) -> None:
        self.reactor = reactor
        self.doPoll = doPoll
        self.installed = True

    def mainLoop(self) -> None:
        # ReactorBase.mainLoop, then the lean turns.
        reactor: Any = self.reactor
        while reactor._started:
            with _LOOP_ERRORS:
                reactor.runUntilCurrent()
                t2 = reactor.timeout()
                t = reactor.running and t2
                reactor.doIteration(t)
                self._leanTurns()
        _BASE_LOG.info("Main loop terminated.")

    def _leanTurns(self) -> None:
        """
        Poll and dispatch for as long as C{runUntilCurrent} would have
        nothing to do before the poll: what C{mainLoop} would do, without
        its calls.
        """
        reactor: Any = self.reactor
        doPoll = self.doPoll
        while self.installed and reactor.running:
            if (
                reactor.threadCallQueue
                or reactor._newTimedCalls
                or reactor._justStopped
                or reactor._cancellations > 50
            ):
                return
            pending = reactor._pendingTimedCalls
            if pending:
                # ReactorBase.timeout; a call due now is runUntilCurrent's.
                delay = pending[0].time - reactor.seconds()
                if delay <= 0:
                    return
                doPoll(delay if delay < LONGEST_TIMEOUT else LONGEST_TIMEOUT)
            else:
                doPoll(None)


def _leanPoll(
    reactor: EPollReactor, lean: frozenset[type], afterPoll: tuple[Callable[[], object], ...]
) -> Any:
    """
    @return: C{reactor}'s C{doPoll}, dispatching descriptors of the classes
        in C{lean} without a logging context, then calling C{afterPoll}.
    """
    poller = reactor._poller
    selectables: dict[int, Any] = reactor._selectables
    twistedDispatch = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    hangUp = reactor._POLL_DISCONNECTED
    readable = reactor._POLL_IN
    writable = reactor._POLL_OUT
    noFileDescriptor = posixbase._NO_FILEDESC
    callWithLogger = log.callWithLogger

    def doPoll(timeout: float | None) -> None:
        # EPollReactor.doPoll, but for the lean dispatch below.
        if timeout is None:
            timeout = -1
        try:
            events = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectable: Any
        for fd, event in events:
            try:
                selectable = selectables[fd]
            except KeyError:
                continue
            kind = selectable.__class__
            if kind not in lean or (event & hangUp and not event & readable):
                callWithLogger(selectable, twistedDispatch, selectable, fd, event)
                continue
            # EPollReactor._doReadOrWrite's read and write, less the context.
            why: Any = None
            inRead = False
            try:
                if selectable.fileno() == -1:
                    why = noFileDescriptor
                else:
                    if event & readable:
                        why = selectable.doRead()
                        inRead = True
                    if not why and event & writable:
                        why = selectable.doWrite()
                        inRead = False
            except BaseException:
                why = sys.exc_info()[1]
                callWithLogger(selectable, log.err)
            if why:
                callWithLogger(selectable, disconnect, selectable, why, inRead)
        if events:
            for function in afterPoll:
                try:
                    function()
                except Exception:
                    _BASE_LOG.failure("Unexpected error in main loop")

    return doPoll


class LeanDispatchService(Service):
    """
    L{install} while running, for the reactor and classes given; logs
    whether the reactor took it.
    """

    name = "lean-dispatch"

    def __init__(
        self,
        reactor: Any,
        classes: Iterable[type],
        afterPoll: Iterable[Callable[[], object]] = (),
    ) -> None:
        self.reactor = reactor
        self.classes = tuple(classes)
        self.afterPoll = tuple(afterPoll)

    def startService(self) -> None:
        super().startService()
        if install(self.reactor, self.classes, self.afterPoll):
            _log.debug("Reactor: lean dispatch of our own sockets and the AIO eventfd")
        else:
            _log.debug(
                "Reactor: {reactor} dispatches every descriptor itself",
                reactor=type(self.reactor).__name__,
            )

    def stopService(self) -> None:
        super().stopService()
        uninstall(self.reactor)
