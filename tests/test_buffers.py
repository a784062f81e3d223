# -*- test-case-name: tests.test_buffers -*-
"""
Tests for L{imageio._buffers}: page-aligned buffers and the memory budget
transfers share.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imageio import _buffers
from imageio._buffers import BufferBudget, BufferPool


class AllocateTests(SynchronousTestCase):
    def test_pageAligned(self) -> None:
        """
        Buffers are whole pages.
        """
        self.assertEqual(len(_buffers.allocate(1)), _buffers.ALIGNMENT)
        self.assertEqual(len(_buffers.allocate(_buffers.ALIGNMENT + 1)), 2 * _buffers.ALIGNMENT)


class BudgetTests(SynchronousTestCase):
    """
    L{BufferBudget} accounting.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, text: str) -> int:
        return sum(text in formatEvent(e) for e in self.events)

    def test_withinLimit(self) -> None:
        """
        Requests within the limit are granted at once and counted in
        C{used} until released; releasing twice gives back once.
        """
        budget = BufferBudget(100)
        a = self.successResultOf(budget.acquire(60))
        b = budget.tryAcquire(40)
        assert b is not None
        self.assertEqual(budget.used, 100)
        a.release()
        a.release()
        self.assertEqual(budget.used, 40)
        b.release()
        self.assertEqual(budget.used, 0)

    def test_waitsInOrder(self) -> None:
        """
        Past the limit, requests wait and are granted in the order they
        asked as bytes are released; C{tryAcquire} does not jump the queue.
        """
        budget = BufferBudget(100)
        held = self.successResultOf(budget.acquire(100))
        first = budget.acquire(60)
        second = budget.acquire(30)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(budget.waiting, 2)
        self.assertIsNone(budget.tryAcquire(1))
        held.release()
        a = self.successResultOf(first)
        b = self.successResultOf(second)
        self.assertEqual((a.size, b.size, budget.used, budget.waiting), (60, 30, 90, 0))
        self.assertEqual(budget.waits, 2)

    def test_largerThanBudget(self) -> None:
        """
        A request larger than the whole budget is granted once nothing else
        is held.
        """
        budget = BufferBudget(100)
        held = self.successResultOf(budget.acquire(10))
        big = budget.acquire(500)
        self.assertNoResult(big)
        held.release()
        self.assertEqual(self.successResultOf(big).size, 500)
        self.assertEqual(budget.used, 500)

    def test_cancel(self) -> None:
        """
        A cancelled wait leaves the queue, and the requests behind it get
        their turn.
        """
        budget = BufferBudget(100)
        held = self.successResultOf(budget.acquire(50))
        big = budget.acquire(80)
        small = budget.acquire(20)
        big.cancel()
        self.failureResultOf(big, CancelledError)
        self.assertEqual(self.successResultOf(small).size, 20)
        held.release()
        self.assertEqual(budget.used, 20)

    def test_unlimited(self) -> None:
        """
        A limit of 0 never makes anyone wait.
        """
        budget = BufferBudget(0)
        leases = [self.successResultOf(budget.acquire(1 << 30)) for _ in range(10)]
        self.assertEqual(budget.used, 10 << 30)
        for lease in leases:
            lease.release()
        self.assertEqual(budget.used, 0)

    def test_poolsGiveBack(self) -> None:
        """
        Spare buffers kept by connections are given back when work would
        wait; a closed pool keeps nothing.
        """
        budget = BufferBudget(100)
        pool = BufferPool(budget)
        for _ in range(2):
            lease = budget.tryAcquire(40)
            assert lease is not None
            pool.give(memoryview(bytearray(1)), lease)
        self.assertEqual((len(pool), budget.used), (2, 80))
        extra = budget.tryAcquire(10)
        assert extra is not None
        pool.give(memoryview(bytearray(1)), extra)
        self.assertEqual((len(pool), budget.used), (2, 80))
        lease = self.successResultOf(budget.acquire(50))
        self.assertEqual((len(pool), budget.used), (0, 50))
        pool.close()
        pool.give(memoryview(bytearray(1)), lease)
        self.assertEqual((len(pool), budget.used), (0, 0))

    def test_loggedOncePerEpisode(self) -> None:
        """
        Waiting is logged once when it starts and once when it ends, not
        per request.
        """
        budget = BufferBudget(100)
        held = self.successResultOf(budget.acquire(100))
        waiting = [budget.acquire(100) for _ in range(5)]
        self.assertEqual(self.logged("transfers wait for buffers"), 1)
        held.release()
        for d in waiting:
            self.successResultOf(d).release()
        self.assertEqual(self.logged("available again after 5 waits"), 1)
        self.assertEqual(budget.used, 0)
