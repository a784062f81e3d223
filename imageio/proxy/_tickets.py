# -*- test-case-name: tests.test_proxy -*-
"""
Signed tickets the engine stored with C{PUT /tickets/} (engines that talked
to the 1.2.1-1.6 proxy): the verified claims, keyed by the daemon ticket id
(C{transfer-ticket}).

They live in memory, in this process only; a replica behind a load
balancer that did not get the C{PUT} does not know them (clients that send
the signed ticket in C{Authorization}, or a session id, work with any
replica). Expired tickets are kept for L{EXPIRED_GRACE} seconds so that a
late client hears "expired ticket" rather than "not authorized", then
forgotten.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from attrs import define, field

from imageio.proxy._signedticket import Claims

#: Seconds an expired ticket is remembered.
EXPIRED_GRACE = 3600

#: Most tickets stored at once; an engine has a few hundred transfers at
#: most.
MAX_TICKETS = 100_000


class TooManyTickets(Exception):
    """
    The store is full.
    """


@define
class ProxyTickets:
    """
    Claims of stored signed tickets.

    @ivar clock: Epoch seconds.
    """

    clock: Callable[[], float]
    maxTickets: int = MAX_TICKETS
    _tickets: dict[str, Claims] = field(factory=dict, init=False)
    _heap: list[tuple[int, str]] = field(factory=list, init=False)

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, claims: Claims) -> None:
        """
        Store (or replace) the claims of a verified ticket.

        @raise TooManyTickets: If the store is full.
        """
        self._prune()
        key = claims.transferTicket
        if key not in self._tickets and len(self._tickets) >= self.maxTickets:
            raise TooManyTickets(f"Too many tickets: {len(self._tickets)}")
        self._tickets[key] = claims
        heapq.heappush(self._heap, (claims.expires, key))

    def get(self, transferTicket: str) -> Claims | None:
        return self._tickets.get(transferTicket)

    def remove(self, transferTicket: str) -> bool:
        """
        @return: Whether a ticket was removed.
        """
        return self._tickets.pop(transferTicket, None) is not None

    def _prune(self) -> None:
        horizon = self.clock() - EXPIRED_GRACE
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            expires, key = heapq.heappop(heap)
            claims = self._tickets.get(key)
            # A replaced ticket has its own, later, heap entry.
            if claims is not None and claims.expires == expires:
                del self._tickets[key]
        # Removed and replaced tickets leave stale entries: rebuild now and
        # then so the heap stays proportional to the store.
        if len(heap) > 2 * len(self._tickets) + 1024:
            self._heap = [(c.expires, k) for k, c in self._tickets.items()]
            heapq.heapify(self._heap)
