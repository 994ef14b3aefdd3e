"""Which shard of which step a worker computes next, and whether it may start: pure, no MPI.

A step's global batch is ``shards`` data shards (as data parallelism splits it over its ranks).
Server 0 hands them out as tickets ``(step, shard)``: in ``sync`` mode worker w always takes shard
w (so the run is deterministic and equals data parallelism); otherwise a worker takes the next
shard of its step that nobody has taken, so a fast worker computes more shards than a slow one.
A worker asks only for tickets of the loop step it is in, so no ticket is ever held across a
step boundary (where the loop may run a collective).

The staleness bound (``bounded`` mode) is enforced when a ticket is granted: ``a_u`` counts the
updates applied since in-flight ticket u was granted; granting one more is allowed only when
``len(in_flight) + max(a_u) <= bound``. By induction every in-flight ticket keeps
``a_u + (others in flight) <= bound``, so no gradient is applied more than ``bound`` versions after
the weights it was computed on (with one server; see :mod:`server` for several).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

__all__ = ["Tickets", "WAIT", "NONE_LEFT", "may_grant"]

WAIT = "wait"            # the bound holds this worker back until an in-flight gradient is applied
NONE_LEFT = "none left"  # every shard of the step has been handed out


def may_grant(applied_since_grant, bound: Optional[int]) -> bool:
    """Whether one more ticket may start without any gradient exceeding ``bound`` staleness."""
    if bound is None:
        return True
    in_flight = list(applied_since_grant)
    return len(in_flight) + max(in_flight, default=0) <= bound


class Tickets:
    """Server 0's book of tickets. ``grant`` answers a worker; ``applied`` records an update.

    A step's book is kept until every worker has been told that none of its shards is left: a
    slow worker may ask for a ticket of a step long after a fast one has moved several steps on,
    and must then hear "none left", not get a shard that was already handed out.
    """

    def __init__(self, shards: int, *, sync: bool, bound: Optional[int], workers: Optional[int] = None):
        if shards < 1:
            raise ValueError(f"a step needs at least one shard, got {shards}")
        self.shards, self.sync, self.bound = shards, sync, bound
        self.workers = shards if workers is None else workers
        self.next_shard: Dict[int, int] = {}           # step -> shards handed out (dynamic mode)
        self.granted: Dict[int, set] = {}              # step -> shards handed out (sync mode)
        self.told_done: Dict[int, set] = {}            # step -> workers told that none is left
        self.in_flight: Dict[Tuple[int, int], int] = {}  # ticket -> updates applied since its grant
        self._closed: set = set()                      # steps every worker has finished

    def grant(self, worker: int, step: int):
        """A ticket ``(step, shard)`` for ``worker``, :data:`NONE_LEFT` or :data:`WAIT`."""
        if self.sync:
            taken = self.granted.setdefault(step, set())
            if worker >= self.shards or worker in taken:
                return self._none_left(worker, step)
            taken.add(worker)
            ticket = (step, worker)
        else:
            shard = self.next_shard.get(step, 0)
            if shard >= self.shards:
                return self._none_left(worker, step)
            if not may_grant(self.in_flight.values(), self.bound):
                return WAIT
            self.next_shard[step] = shard + 1
            ticket = (step, shard)
        self.in_flight[ticket] = 0
        return ticket

    def finished(self, step: int) -> bool:
        """Whether every worker has been told that no shard of ``step`` is left."""
        return step in self._closed

    def forget(self, step: int) -> None:
        """The server is done with ``step``."""
        self._closed.discard(step)

    def applied(self, tickets) -> None:
        """One update (one version) applied the gradients of ``tickets``."""
        for ticket in tickets:
            self.in_flight.pop(tuple(ticket), None)
        for ticket in self.in_flight:
            self.in_flight[ticket] += 1

    def _none_left(self, worker: int, step: int) -> str:
        told = self.told_done.setdefault(step, set())
        told.add(worker)
        if len(told) == self.workers:  # nobody can ask about this step any more
            for book in (self.next_shard, self.granted, self.told_done):
                book.pop(step, None)
            self._closed.add(step)
        return NONE_LEFT
